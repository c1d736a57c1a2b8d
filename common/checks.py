"""Fail-fast checks that run before step 1, and the LoRA + gradient-checkpointing input-grad fix.

Every check raises `CheckFailed` with a message that says what is wrong *and what to change*.
They exist because each of these failures once cost a full training job (see CHRONICLES.md):
LoRA on the wrong modules, a severed autograd graph, all-masked labels, EOS never learned, a
template without generation markers, a job on the wrong device or world size, and 4-bit
weights silently repacked on CPU.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


class CheckFailed(RuntimeError):
    """A pre-flight check found a problem; the message says how to fix it."""


# ---------------------------------------------------------------------------------------------
# The input-grad fix: LoRA + gradient checkpointing with frozen embeddings gets no gradient
# ---------------------------------------------------------------------------------------------
def enable_input_grads(model):
    """Make the input-embedding output require grad, so checkpointed blocks keep a graph.

    With a frozen base (LoRA/QLoRA) nothing entering a reentrant-checkpointed block requires
    grad, so the block's output does not either and the loss ends up with no grad_fn. Uses
    `enable_input_require_grads` when the model has it, else a forward hook on the embedding.
    Returns the hook handle in the fallback case (None otherwise).
    """
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return None

    def _output_requires_grad(module, inputs, output):
        if isinstance(output, torch.Tensor):
            output.requires_grad_(True)

    return model.get_input_embeddings().register_forward_hook(_output_requires_grad)


# ---------------------------------------------------------------------------------------------
# Parameters and LoRA placement
# ---------------------------------------------------------------------------------------------
def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) counting the real number of weights, also for packed 4-bit tensors."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2 * p.element_size()  # two 4-bit values per byte of storage
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def linear_module_names(model) -> dict[str, int]:
    """Leaf names of Linear-like layers in the base model (what LoRA can target), with counts."""
    names: dict[str, int] = {}
    for full, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in full and not full.endswith("base_layer"):
            leaf = full.rsplit(".", 1)[-1]
            names[leaf] = names.get(leaf, 0) + 1
    return names


def check_lora_targets(model, target_modules: list[str] | str, train_router: bool = False) -> int:
    """Every requested target got adapters, on every layer that has it; returns the module count.
    MoE models (common/moe.py): the experts and the router got LoRA exactly as asked, or it stops with the fix."""
    from common import moe

    lora_layers = [name for name, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0]
    layout = moe.moe_layout(model)
    if layout is not None:
        moe.check_expert_targets(model, target_modules, train_router)
    if not lora_layers:
        raise CheckFailed("no LoRA layer was attached; check --lora_target_modules against the model's Linear "
                          f"layers: {sorted(linear_module_names(model))}")
    base_linears = linear_module_names(model)
    got: dict[str, int] = {}
    for name in lora_layers:
        leaf = name.rsplit(".", 1)[-1]
        got[leaf] = got.get(leaf, 0) + 1
    if layout is not None:  # the experts and the router were checked above; the Linear layers are checked here
        resolved = moe.resolve_lora_targets(model, target_modules, train_router)["target_modules"]
        for t in resolved:
            if "." in t:  # a dotted suffix such as shared_expert.gate_proj (peft matches names by suffix)
                got[t] = sum(name.endswith(f".{t}") for name in lora_layers)
        wanted = {t: base_linears.get(t, 0) + got.get(t, 0) for t in resolved}
    elif target_modules == "all-linear":
        wanted = {k: v for k, v in base_linears.items() if k != "lm_head"}
    else:
        wanted = {t: base_linears.get(t, 0) + got.get(t, 0) for t in target_modules}
    missing = [t for t in wanted if got.get(t, 0) == 0]
    if missing:
        raise CheckFailed(f"LoRA target(s) {missing} matched no layer. This model's Linear layers are "
                          f"{sorted(base_linears)}; set --lora_target_modules to some of them or 'all-linear'")
    short = {t: (got.get(t, 0), n) for t, n in wanted.items() if got.get(t, 0) != n}
    if short:
        raise CheckFailed(f"LoRA covers only part of the requested layers (got, expected): {short}")
    log.info("LoRA attached to %d modules: %s", len(lora_layers), ", ".join(f"{k} x{v}" for k, v in sorted(got.items())))
    return len(lora_layers)


def log_parameter_counts(model) -> tuple[int, int]:
    trainable, total = count_parameters(model)
    log.info("trainable params: %s / %s (%.4f%%)", f"{trainable:,}", f"{total:,}", 100.0 * trainable / max(total, 1))
    if trainable == 0:
        raise CheckFailed("no parameter requires grad: nothing would train. Attach LoRA (get_peft_model) or "
                          "unfreeze the parameters you mean to train")
    return trainable, total


# ---------------------------------------------------------------------------------------------
# One-batch gradient flow
# ---------------------------------------------------------------------------------------------
# (first matrix, the zero-initialized matrix after it): LoRA's A/B, the bottleneck adapter's down/up
ZERO_INIT_PAIRS = ((".lora_A.", ".lora_B."), (".adapter_down.", ".adapter_up."))


def _structurally_zero(name: str, params: dict[str, torch.nn.Parameter]) -> bool:
    """lora_A's gradient is exactly zero while its lora_B is still all zeros (LoRA's init); the same for
    a bottleneck adapter's down-projection (weight and bias) while its up-projection weight is zero
    (harnesses.adapters)."""
    for first, second in ZERO_INIT_PAIRS:
        if first in name:
            b = params.get(name.replace(first, second).rsplit(".", 1)[0] + ".weight")
            return b is not None and not bool(b.detach().any())
    return False


def check_gradient_flow(model, batch: dict[str, torch.Tensor]) -> int:
    """Forward + backward one batch: the loss has a graph, every trainable tensor gets a finite,
    non-zero gradient, and no frozen one gets any. Leaves no gradient behind. Returns the number
    of trainable tensors that received a gradient.
    """
    from common.moe import RouterRecorder, experts_without_gradient

    was_training = model.training
    model.train()
    device = next(p for p in model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    router = RouterRecorder(model, gradient_path=True)  # MoE: which experts got tokens that reach the loss
    try:
        loss = model(**batch).loss
        if not loss.requires_grad or loss.grad_fn is None:
            raise CheckFailed(
                "the loss does not require grad (grad_fn is None): the autograd graph is severed, so "
                "backward() would fail with 'element 0 of tensors does not require grad and does not have a "
                "grad_fn'. With a frozen base (LoRA/QLoRA) and gradient checkpointing, call "
                "common.checks.enable_input_grads(model) after get_peft_model and use non-reentrant "
                "checkpointing (gradient_checkpointing_kwargs={'use_reentrant': False})")
        if not torch.isfinite(loss):
            raise CheckFailed(f"the first batch's loss is {loss.item()}: check the labels (all -100?) and the "
                              "precision (fp16 overflow?) before training")
        loss.backward()
        params = dict(model.named_parameters())
        no_grad, bad, zero, frozen_with_grad, ok = [], [], [], [], 0
        for name, p in params.items():
            if not p.requires_grad:
                if p.grad is not None:
                    frozen_with_grad.append(name)
                continue
            if p.grad is None:
                no_grad.append(name)
            elif not torch.isfinite(p.grad).all():
                bad.append(name)
            elif not p.grad.any() and not _structurally_zero(name, params):
                zero.append(name)
            else:
                ok += 1
        # top-k routing: an expert no token reaching the loss was sent to gets no gradient; every other one must
        starved = experts_without_gradient(model, router) if router.hits else []
        problems = []
        if no_grad:
            problems.append(f"{len(no_grad)} trainable tensors got no gradient (e.g. {no_grad[:3]}): they are "
                            "not on the path from input to loss")
        if bad:
            problems.append(f"{len(bad)} got non-finite gradients (e.g. {bad[:3]}): lower the learning rate or "
                            "use bf16/fp32 instead of fp16")
        if zero:
            problems.append(f"{len(zero)} got all-zero gradients (e.g. {zero[:3]}): the graph is cut above them")
        if frozen_with_grad:
            problems.append(f"{len(frozen_with_grad)} frozen tensors got gradients (e.g. {frozen_with_grad[:3]})")
        if starved:
            problems.append(f"{len(starved)} experts the router sent tokens to got no LoRA gradient (e.g. {starved[:3]}): "
                            "their adapters are not on the path from input to loss")
        if problems:
            raise CheckFailed("gradient-flow check failed: " + "; ".join(problems))
        if router.hits:
            routed = {b: int((router.hits_on_path.get(b, h) > 0).sum()) for b, h in router.hits.items()}
            log.info("MoE: experts that got tokens reaching the loss in this batch (per layer, of %d): %s; each one's "
                     "LoRA got a gradient", router.layout.num_experts, routed)
        log.info("gradient flow OK: loss %.4f, %d trainable tensors got finite gradients", loss.item(), ok)
        return ok
    finally:
        router.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# Labels, EOS, chat template
# ---------------------------------------------------------------------------------------------
def check_first_batch(model, features: list[dict], collator, padded_collator, tokenizer, device: torch.device,
                      precision: str, labelled_logits_only: bool) -> None:
    """The first micro-batch, run like a training step: labels built after padding, then gradients that reach
    every trainable tensor (in the batch layout and precision training uses)."""
    from peft.helpers import disable_input_dtype_casting

    from common.trainer import accepts_logits_to_keep, labelled_logits_inputs

    check_labels(padded_collator(features), tokenizer.eos_token_id, tokenizer.pad_token_id)
    batch = {k: v for k, v in collator(features).items() if torch.is_tensor(v)}
    if labelled_logits_only and accepts_logits_to_keep(model):
        batch = labelled_logits_inputs(batch)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"), \
            disable_input_dtype_casting(model, active=precision == "bf16"):
        check_gradient_flow(model, batch)


def check_labels(batch: dict[str, torch.Tensor], eos_token_id: int, pad_token_id: int | None) -> float:
    """Every example has labelled tokens and learns EOS; returns the batch's labelled fraction."""
    labels, attention = batch["labels"], batch["attention_mask"]
    per_example = (labels != IGNORE_INDEX).sum(dim=1)
    if (per_example == 0).any():
        rows = (per_example == 0).nonzero().flatten().tolist()
        raise CheckFailed(f"batch rows {rows} have no labelled token (all labels -100): the assistant mask is "
                          "empty. Check the chat template's {% generation %} markers or raise --max_length")
    fraction = float((labels != IGNORE_INDEX).sum() / attention.sum())
    learns_eos = (labels == eos_token_id).any(dim=1)
    if not learns_eos.all():
        rows = (~learns_eos).nonzero().flatten().tolist()
        hint = (" The pad token equals the EOS token, so labels derived from `input_ids != pad` mask EOS too."
                if pad_token_id == eos_token_id else "")
        raise CheckFailed(f"batch rows {rows} never have EOS (id {eos_token_id}) as a label, so the model will not "
                          f"learn to stop and will generate forever.{hint} Build labels from the assistant mask "
                          "(common.collator.CausalLMCollator) and keep the end-of-turn token inside {% generation %}")
    if pad_token_id == eos_token_id:
        log.info("pad token == EOS token (id %d): handled, labels come from the loss mask and EOS is a label in "
                 "every example", eos_token_id)
    log.info("labelled tokens in the first batch: %.1f%% of non-pad tokens", 100 * fraction)
    return fraction


PROBE_CONVERSATION = [
    {"role": "user", "content": "Say one."},
    {"role": "assistant", "content": "One."},
    {"role": "user", "content": "Say two."},
    {"role": "assistant", "content": "Two."},
]


def check_chat_template(tokenizer, source: str = "the tokenizer") -> None:
    """The template exists, marks assistant tokens for training, and the marks end with EOS."""
    fix = ("Fix: give the tokenizer a training-compatible template, e.g. "
           "`tokenizer.chat_template = common.assets.chatml_template()` for ChatML models, or wrap each "
           "assistant message and its end-of-turn token in {% generation %} ... {% endgeneration %}")
    if not getattr(tokenizer, "chat_template", None):
        raise CheckFailed(f"{source} has no chat template, so chat data cannot be formatted. {fix}")
    if "{% generation %}" not in tokenizer.chat_template and "{%- generation" not in tokenizer.chat_template:
        raise CheckFailed(f"{source}'s chat template has no {{% generation %}} markers, so the assistant-token "
                          f"mask would be all zeros and nothing would be learned. {fix}")
    from common.collator import assistant_spans, encode_chat

    ids, mask = encode_chat(PROBE_CONVERSATION, tokenizer)
    spans = assistant_spans(mask)
    if len(spans) != 2:
        raise CheckFailed(f"{source}'s template marked {len(spans)} assistant spans in a 2-turn probe. {fix}")
    for (start, end), turn in zip(spans, PROBE_CONVERSATION[1::2]):
        text = tokenizer.decode(ids[start:end])
        if turn["content"] not in text:
            raise CheckFailed(f"{source}'s template marks {text!r} for an assistant turn {turn['content']!r}. {fix}")
        if ids[end - 1] != tokenizer.eos_token_id:
            raise CheckFailed(f"{source}'s template marks assistant turns without the EOS token "
                              f"({tokenizer.eos_token!r}), so the model never learns to stop. {fix}")


# ---------------------------------------------------------------------------------------------
# Device and world size
# ---------------------------------------------------------------------------------------------
def resolve_device(requested: str) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda'/'cpu' are checked against the machine."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise CheckFailed("--device cuda was requested but torch sees no GPU (torch.cuda.is_available() is False; "
                          f"torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). "
                          "Install a CUDA build of torch, fix CUDA_VISIBLE_DEVICES, or pass --device cpu")
    if requested not in ("cpu", "cuda"):
        raise CheckFailed(f"--device {requested!r}: choose auto, cpu or cuda")
    return torch.device(requested)


def busy_cpu_warning(device: torch.device) -> str | None:
    """On a CPU whose cores other jobs already fill (1-minute load average >= the cores this process may use), a
    run with several OpenMP threads spends its steps with threads waiting on a partner that is descheduled:
    measured here 10-20x slower than one thread (CHRONICLES 96). Returns the warning, or None."""
    if device.type != "cpu" or torch.get_num_threads() < 2:
        return None
    cores, load = len(os.sched_getaffinity(0)), os.getloadavg()[0]
    if load < cores:
        return None
    return (f"the CPU is busy before this run starts (load average {load:.1f} on {cores} cores) and it uses "
            f"{torch.get_num_threads()} OpenMP threads: with other jobs on the cores its steps can be 10-20x slower "
            "(CHRONICLES 96). Run it alone, or give each job one thread (OMP_NUM_THREADS=1)")


def check_world_size(expected: int) -> int:
    """The number of processes that actually started equals what the job asked for."""
    actual = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        actual = torch.distributed.get_world_size()
    if actual != expected:
        raise CheckFailed(f"world size is {actual} but {expected} was requested. A launcher started a different "
                          "number of processes than the job expects (e.g. `accelerate launch --cpu "
                          "--num_processes 2` runs one). Use the launcher in launch/ for this recipe")
    return actual


def check_model_device(model, device: torch.device) -> None:
    wrong = {str(p.device) for p in model.parameters() if p.device.type != device.type}
    if wrong:
        raise CheckFailed(f"model parameters are on {sorted(wrong)} but the run uses {device}; load with "
                          f"device_map={{'': '{device}'}} or move the model before training")


# ---------------------------------------------------------------------------------------------
# bitsandbytes 4-bit on CPU: an eval-mode forward repacks the weights and later backward passes
# return no input gradient (only a warning). Refuse such forwards while training is ahead.
# ---------------------------------------------------------------------------------------------
def _cpu_4bit_layers(model):
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, Linear4bit) and m.weight.device.type == "cpu"]


def check_4bit_weights_unpacked(model) -> None:
    packed = [m for m in _cpu_4bit_layers(model) if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    if packed:
        raise CheckFailed(f"{len(packed)} 4-bit layers were repacked for CPU inference by an eval-mode forward "
                          "(eval, generate); training them now gives silently wrong gradients. Run evaluation "
                          "and generation only after training when using 4-bit weights on CPU")


class Cpu4bitEvalGuard:
    """While active, an eval-mode forward through a CPU 4-bit layer raises instead of corrupting training."""

    def __init__(self, model):
        self.handles = []
        for layer in _cpu_4bit_layers(model):
            self.handles.append(layer.register_forward_pre_hook(self._refuse_eval_forward))

    @staticmethod
    def _refuse_eval_forward(module, args):
        if not module.training:
            raise CheckFailed("eval-mode forward through a bitsandbytes 4-bit layer on CPU before or during "
                              "training: it repacks the weights and later gradients are silently wrong. With "
                              "4-bit on CPU set --eval_steps 0 and evaluate/generate after training")

    @property
    def active(self) -> bool:
        return bool(self.handles)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
