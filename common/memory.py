"""Memory and parameter planner: predict what a fine-tuning run needs from the model config alone.

    python -m common.memory --model <model dir or config.json> --method {full,lora,qlora} [--lora_r R]
        [--lora_targets q_proj,v_proj | all-linear] [--seq_len 512] [--batch_size 1] [--optim adamw_torch]
        [--dtype bf16|mixed|fp16|fp32] [--grad_ckpt [--ckpt_every_n N]] [--world_size 1] [--zero {0,1,2,3}] [--device cuda|cpu] --json
    python -m common.memory --model <...> --seq_len 2048 --batch_size 4 --compare   # lora, qlora, full bf16, full mixed
    python -m common.memory --model <...> --budget_gb 24 --recommend [--json]
    python -m common.memory --model <...> --budget_gb 24 --find_batch_size [--json]

Defaults are what recipes/sft_memory_diet.py runs: LoRA rank, dropout, target modules, optimizer and
checkpointing are read from recipes/configs/sft_memory_diet.yaml (`recipe_defaults`), not declared here.

Parameter counts are exact: the model is instantiated on the meta device from its config (no weights,
no downloads) and LoRA is attached with peft, so the numbers are what `from_pretrained` +
`get_peft_model` give. Bytes are computed per component:

- weights: the base in --dtype (this repo loads models in the training precision); LoRA adapters in
  fp32 (peft upcasts them); QLoRA: bitsandbytes NF4, 0.5 byte/weight packed in uint8, plus one absmax
  per 64 weights (fp32, or 8-bit + one fp32 per 256 absmax with double quantization). QLoRA's other
  parameters (embeddings, lm_head, norms) are fp32: `prepare_model_for_kbit_training` upcasts them.
  Precisions (`PRECISIONS`): bf16 is pure bf16, the model loaded in bf16, so a full fine-tune has bf16
  weights, gradients and AdamW states and no fp32 master copy (torchtune's dtype=bf16, this repo's
  recipes); mixed is HF mixed precision, `TrainingArguments(bf16=True)` on a model loaded in fp32: fp32
  (master) weights, fp32 gradients and AdamW states, bf16 autocast activations, plus the bf16 copy of
  every weight autocast makes in the forward pass and backward keeps until it reaches that layer.
- gradients: one per trainable parameter, in its dtype.
- optimizer states: AdamW 2 states in the parameter dtype (8 B/param for fp32); 8-bit AdamW 2 B/param
  plus an fp32 absmax per 256 values (tensors under 4,096 values stay 32-bit); paged_* the same bytes in
  CUDA unified memory, which can spill to the host and is not counted by torch's allocator; Adafactor
  one factored second moment (rows + columns); SGD without momentum nothing.
- fp32 master weights under DeepSpeed bf16/fp16 (ZeRO >= 1). ZeRO stage s over N ranks divides the
  optimizer states and master weights (s >= 1), the gradients (s >= 2) and the weights (s = 3) by N.
- activations: what autograd keeps per token per layer of a Llama-style block (RMSNorm, sdpa or flash
  attention, SwiGLU MLP), from the tensors the real code saves (`layer_activation_bytes`; a test
  compares it with a saved-tensor count); gradient checkpointing keeps each layer's input and
  recomputes one layer in backward. Eager attention (batch x heads x seq^2 probabilities) is not modelled.
- Mixture-of-Experts (Mixtral, Qwen2-MoE, OLMoE; common/moe.py): `moe` in the output has the routed experts,
  router and shared-expert parameters, `active_params_per_token` (every parameter but the routed experts a
  token skips: total - (E - k) / E x routed experts), the expert and router LoRA parameters, and
  `moe_activation_bytes`: per MoE layer the router's fp32 probabilities and top-k picks per token, per routed
  slot (tokens x top-k) the expert's gate/up/act outputs, its output and the permutation indices; with LoRA
  on the experts also each slot's input and act output, and once per layer peft's materialized
  W + scale * B @ A of every expert (ParamWrapper folds the factors into the weight for the grouped matmul).
  `--lora_targets` takes `experts`; the router gets LoRA only with --lora_train_router.
- logits: the loss upcasts logits to fp32; backward starts with 12 bytes per logit alive
  (log-softmax output, its gradient and the gradient of the logits; batch x seq x vocab).
- overhead: CUDA: the CUDA context (not in torch.cuda.max_memory_allocated) and allocator slack; CPU:
  the process baseline (interpreter + torch + transformers + data), measured on the reference machine.

The peak is the largest of a few phases (`phases` in the output; `peak_phase` names the largest and
`peak_phase_description` says it in words): the end of the forward pass (with the logits), the
backward pass, the optimizer step; each for the training steps (under autocast, optimizer states
allocated) and for the one-batch gradient check the recipes run before step 1
(common.checks.check_gradient_flow on the first micro-batch, before the optimizer has states).
recipes/sft_memory_diet.py runs that check like a training step (the same autocast, peft's input cast
off, the LM head on labelled positions), so it is never the peak there; `--check_outside_autocast`
plans a check run outside autocast (harnesses/compare.py, sft_multigpu_qlora.py), where peft casts every
adapter input to fp32 and LoRA without checkpointing can need more than full fine-tuning.
The training steps run with peft's input cast off under autocast (common.trainer.TokenCountingTrainer,
`--peft_input_cast` for a plain peft + Trainer run). Logits are planned at every position (an upper
bound for the recipes, whose LM head runs on labelled positions only).

`peak_bytes` predicts what a recipe's metrics.json reports as `peak_memory_bytes` on that device
(CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak RSS, VmHWM, see `cpu_rss_peak`).
`required_bytes` adds what that measurement leaves out (CUDA context, allocator slack): compare it to a
budget. docs/memory.md, "Memory planner" has the validation table (predicted vs measured on CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

log = logging.getLogger(__name__)

GB = 1024**3
# precision: (bytes per base weight as loaded, bytes of what autocast computes in, what it is)
PRECISIONS = {
    "bf16": (2, 2, "pure bf16: the model is loaded in bf16; weights, gradients and AdamW states are bf16, no fp32 "
                   "master copy"),
    "fp16": (2, 2, "pure fp16: the model is loaded in fp16 (full fine-tuning in fp16 needs a loss scaler)"),
    "fp32": (4, 4, "fp32: weights, gradients, optimizer states and activations fp32, no autocast"),
    "mixed": (4, 2, "mixed precision: fp32 master weights, fp32 gradients and AdamW states, bf16 autocast "
                    "activations and bf16 weight copies (TrainingArguments(bf16=True) on a model loaded in fp32)"),
}
CONFIG_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "torch.bfloat16": 2, "torch.float16": 2,
                      "torch.float32": 4}
RECIPE_CONFIG = Path(__file__).resolve().parent.parent / "recipes" / "configs" / "sft_memory_diet.yaml"

# bitsandbytes 4-bit (bnb 0.50): 64 weights per absmax; double quantization stores those absmax values
# in 8 bits with one fp32 absmax per 256 of them, plus a 256-entry fp32 code table and an fp32 offset.
NF4_BLOCKSIZE, NF4_NESTED_BLOCKSIZE, NF4_CODE_BYTES = 64, 256, 16 * 4
# bitsandbytes 8-bit optimizers: blockwise quantization in blocks of 256; smaller tensors stay 32-bit.
BNB8_BLOCKSIZE, BNB8_MIN_SIZE = 256, 4096

OPTIMIZERS = {
    # name (TrainingArguments.optim): (kind, paged)
    "adamw_torch": ("adamw", False), "adamw_torch_fused": ("adamw", False), "adamw_hf": ("adamw", False),
    "adamw": ("adamw", False), "adamw_apex_fused": ("adamw", False),
    "adamw_bnb_8bit": ("adamw8bit", False), "adamw_8bit": ("adamw8bit", False),
    "paged_adamw_8bit": ("adamw8bit", True), "paged_adamw_32bit": ("adamw32bit", True),
    "paged_adamw": ("adamw32bit", True),
    "adafactor": ("adafactor", False), "sgd": ("sgd", False),
}

# Reference machine for the CPU constants below: the 2-core x86_64 VM with AVX512-BF16 this repo is
# measured on (torch 2.13, transformers 5.23, peft 0.21.2, bitsandbytes 0.50.2, glibc malloc).
# CPU_BASELINE_BYTES: VmHWM of a recipe process before the model loads (Python, torch, transformers,
# peft, tokenizer, data), read from metrics.json `baseline_rss_bytes`.
# CPU_HEAP_RETENTION: RSS growth beyond the live tensors, as a share of the activation bytes one forward
# pass allocates (all layers): glibc's dynamic mmap threshold (see cpu_rss_peak). Set from four one-batch
# gradient checks of SmolLM2-135M outside the validation table (lora/qlora, 512-1,024 tokens, with and
# without checkpointing: 0.29, 0.38, 0.49, 0.50). It depends on tensor shapes, not only bytes: 1 x 1,024
# tokens gave 0.03 where 4 x 256 gave 0.50. With MALLOC_MMAP_THRESHOLD_ set it is 0 (--cpu_heap_retention 0).
CPU_BASELINE_BYTES = 537 * 2**20
CPU_HEAP_RETENTION = 0.4
# CUDA: context + cuBLAS workspaces (not in max_memory_allocated), caching-allocator slack.
CUDA_CONTEXT_BYTES = 600 * 2**20
CUDA_FRAGMENTATION = 0.10

LLAMA_GROUPS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
                "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_out"}


class PlanError(ValueError):
    """A setting the planner cannot model; the message says what to change."""


_RECIPE_DEFAULTS: dict = {}


def recipe_defaults() -> dict:
    """LoRA rank, dropout, targets, optimizer and checkpointing as recipes/sft_memory_diet.py runs them by default:
    read from its YAML (the file its launcher always loads), so the planner's defaults cannot drift from it.
    `gradient_checkpointing: auto` plans without checkpointing: the recipe turns it on only when that plan does
    not fit its memory budget."""
    if not _RECIPE_DEFAULTS:
        import yaml

        try:
            cfg = yaml.safe_load(RECIPE_CONFIG.read_text()) or {}
        except OSError as e:
            raise PlanError(f"{RECIPE_CONFIG}: the planner takes its defaults from the recipe's config ({e})") from None
        targets = cfg.get("lora_target_modules", "all-linear")
        targets = [targets] if isinstance(targets, str) else list(targets)
        _RECIPE_DEFAULTS.update(
            lora_r=int(cfg["lora_r"]), lora_dropout=float(cfg["lora_dropout"]), optim=str(cfg["optim"]),
            lora_targets="all-linear" if targets == ["all-linear"] else ",".join(targets),
            grad_ckpt=str(cfg.get("gradient_checkpointing")).lower() == "true")
    return dict(_RECIPE_DEFAULTS)


def _recipe(name: str):
    return field(default_factory=lambda: recipe_defaults()[name])


@dataclass
class Settings:
    """One training configuration to plan for (names follow TrainingArguments and the recipes)."""

    method: str = "lora"                  # full | lora | qlora
    lora_r: int = _recipe("lora_r")
    lora_targets: str = _recipe("lora_targets")   # comma-separated Linear names, or all-linear
    lora_dropout: float = _recipe("lora_dropout")
    use_dora: bool = False                # DoRA: one trainable magnitude per output feature of each wrapped Linear
    lora_train_router: bool = False       # MoE: LoRA on the router too (lora_targets may name `experts`)
    seq_len: int = 512
    batch_size: int = 1                   # per-device micro-batch
    gradient_accumulation_steps: int = 1
    optim: str = _recipe("optim")
    dtype: str = "bf16"                   # PRECISIONS: bf16 | mixed | fp16 | fp32 (QLoRA: the compute dtype)
    grad_ckpt: bool = _recipe("grad_ckpt")
    ckpt_every_n: int = 1                 # with grad_ckpt: checkpoint layers 0, n, 2n, ... (transformers' every_n_layers)
    world_size: int = 1
    zero: int = 0                         # DeepSpeed ZeRO stage (0 = plain DDP / single device)
    device: str = "cuda"                  # cuda | cpu
    double_quant: bool = True             # QLoRA: bnb_4bit_use_double_quant
    cpu_heap_retention: float = -1.0      # CPU only; -1 = CPU_HEAP_RETENTION, 0 = the run sets MALLOC_MMAP_THRESHOLD_
    gradient_check: bool = True           # the run does the recipes' one-batch check before step 1
    check_autocast: bool = True           # that check runs like a training step (sft_memory_diet); False: outside autocast
    peft_input_cast: bool = False         # training steps keep peft's cast of adapter inputs to fp32 (a plain Trainer)
    labelled_fraction: float = 1.0        # share of positions whose next token is labelled: the recipes' LM head and
    #                                       loss run only there (1.0 plans every position, the upper bound)

    def check(self) -> None:
        if self.method not in ("full", "lora", "qlora"):
            raise PlanError(f"--method {self.method!r}: choose full, lora or qlora")
        if self.dtype not in PRECISIONS:
            raise PlanError(f"--dtype {self.dtype!r}: choose bf16, mixed, fp16 or fp32")
        if self.dtype == "mixed" and self.method == "qlora":
            raise PlanError("--dtype mixed with --method qlora: the 4-bit base has no fp32 weights; use --dtype bf16 "
                            "(bnb_4bit_compute_dtype)")
        if self.dtype == "mixed" and self.zero:
            raise PlanError("--dtype mixed with --zero: DeepSpeed casts the model to bf16 and keeps its own fp32 "
                            "master copy; use --dtype bf16 with --zero")
        if self.optim not in OPTIMIZERS:
            raise PlanError(f"--optim {self.optim!r} is not modelled; choose one of {sorted(OPTIMIZERS)}")
        if self.zero not in (0, 1, 2, 3):
            raise PlanError(f"--zero {self.zero}: choose 0, 1, 2 or 3")
        if self.device not in ("cuda", "cpu"):
            raise PlanError(f"--device {self.device!r}: choose cuda or cpu")
        if not 0 < self.labelled_fraction <= 1:
            raise PlanError(f"--labelled_fraction {self.labelled_fraction}: a share of the positions, in (0, 1]")
        for name in ("lora_r", "seq_len", "batch_size", "gradient_accumulation_steps", "world_size", "ckpt_every_n"):
            if getattr(self, name) < 1:
                raise PlanError(f"--{name} must be >= 1")


# ---------------------------------------------------------------------------------------------
# Config and exact parameter counts (meta device)
# ---------------------------------------------------------------------------------------------
def load_config(model: str):
    """A transformers config from a model folder, a config.json file, or asset:<name>."""
    from transformers import AutoConfig

    if model.startswith("asset:"):
        from common.assets import resolve_model_path

        model = resolve_model_path(model)
    path = Path(model)
    if path.is_file():
        data = json.loads(path.read_text())
        if "model_type" not in data:
            raise PlanError(f"{path}: no 'model_type' key; is this a transformers config.json?")
        return AutoConfig.for_model(data.pop("model_type"), **data)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PlanError(f"{path} has no config.json")
        return AutoConfig.from_pretrained(path)
    raise PlanError(f"--model {model}: not a folder, a config.json or asset:<name> (the planner never "
                    "downloads; copy the model's config.json here)")


@dataclass
class Architecture:
    """What the byte formulas need, read from the config and the meta-device model."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    checkpoint_dtype_bytes: int           # dtype of the weights on disk (config `dtype`), for CPU loading
    total_params: int = 0
    trainable_params: int = 0
    lora_modules: int = 0
    lora_params: int = 0
    lora_inputs: list = field(default_factory=list)      # [(leaf name, in_features)] for one layer
    quantizable: list = field(default_factory=list)      # numel of every Linear bnb would quantize
    trainable_tensors: list = field(default_factory=list)  # shapes of trainable parameters
    largest_layer_params: int = 0
    moe: dict | None = None                              # MoE models: see inspect_moe
    qk_norm_dims: int = 0                                # OLMoE: RMSNorm over the whole q and k projections

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _targets(spec: str):
    return "all-linear" if spec in ("all-linear", "all_linear") else [t.strip() for t in spec.split(",") if t.strip()]


def inspect_model(config, method: str, lora_r: int = 16, lora_targets: str = "all-linear",
                  lora_dropout: float = 0.0, use_dora: bool = False, train_router: bool = False) -> Architecture:
    """Instantiate the model on the meta device (no memory, no weights), attach LoRA with peft, count."""
    import torch
    from transformers import AutoModelForCausalLM

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    arch = Architecture(
        hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab=text.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        checkpoint_dtype_bytes=CONFIG_DTYPE_BYTES.get(str(getattr(config, "dtype", None) or "float32"), 4))
    quiet = io.StringIO()
    with torch.device("meta"), contextlib.redirect_stderr(quiet):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        output_embedding = model.get_output_embeddings()
        skip = {id(output_embedding)} if output_embedding is not None else set()
        arch.quantizable = [m.weight.numel() for m in model.modules()
                            if isinstance(m, torch.nn.Linear) and id(m) not in skip]
        layer_params = [sum(p.numel() for p in layer.parameters()) for layer in _decoder_layers(model)]
        arch.largest_layer_params = max(layer_params) if layer_params else 0
        arch.moe = inspect_moe(model, text)
        layers = _decoder_layers(model)
        attn = getattr(layers[0], "self_attn", None) if layers else None
        norms = [getattr(attn, n, None) for n in ("q_norm", "k_norm")]
        if all(n is not None and hasattr(n, "weight") for n in norms) and \
                norms[0].weight.numel() == arch.q_dim and norms[1].weight.numel() == arch.kv_dim:
            arch.qk_norm_dims = arch.q_dim + arch.kv_dim
        if method in ("lora", "qlora"):
            from peft import LoraConfig, get_peft_model

            from common.checks import CheckFailed
            from common.moe import apply_lora_targets

            lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=lora_dropout, use_dora=use_dora,
                              target_modules=_targets(lora_targets), bias="none", task_type="CAUSAL_LM")
            try:
                apply_lora_targets(lora, model, _targets(lora_targets), train_router)
                model = get_peft_model(model, lora)
            except (ValueError, CheckFailed) as e:
                raise PlanError(f"--lora_targets {lora_targets}: {e}") from None
    for p in model.parameters():
        arch.total_params += p.numel()
        if method == "full" or p.requires_grad:
            arch.trainable_params += p.numel()
            arch.trainable_tensors.append(tuple(p.shape))
    if method in ("lora", "qlora"):
        wrapped = [(name, m) for name, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0]
        arch.lora_modules = len(wrapped)
        arch.lora_params = arch.trainable_params
        first_layer = _layer_prefix(wrapped[0][0]) if wrapped else None
        # LoRA on a parameter (experts, router) is folded into the weight, not applied to an input: see moe terms
        arch.lora_inputs = [(name.rsplit(".", 1)[-1], m.in_features) for name, m in wrapped
                            if _layer_prefix(name) == first_layer and type(m).__name__ != "ParamWrapper"]
        if arch.moe:
            lora = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]
            arch.moe["expert_lora_params"] = sum(k for n, k in lora if ".experts." in n)
            arch.moe["router_lora_params"] = sum(k for n, k in lora if ".gate.lora_" in n or "shared_expert_gate.lora_" in n)
    if arch.moe:
        moe = arch.moe
        moe["experts_trained"] = method == "full" or moe.get("expert_lora_params", 0) > 0
        skipped = (moe["num_experts"] - moe["experts_per_token"]) / moe["num_experts"]
        moe["active_params_per_token"] = arch.total_params - round(skipped * (moe["expert_params"] + moe.get("expert_lora_params", 0)))
    return arch


def inspect_moe(model, text_config) -> dict | None:
    """Routed experts, router and shared experts of a meta-device MoE model (None for a dense one)."""
    from common.moe import moe_layout

    layout = moe_layout(model)
    if layout is None:
        return None
    modules = dict(model.named_modules())
    experts = [modules[f"{b}.experts"] for b in layout.blocks]
    down = experts[0].down_proj                                # [experts, hidden, expert intermediate]
    return {"num_experts": layout.num_experts, "experts_per_token": layout.top_k, "moe_layers": layout.moe_layers,
            "expert_intermediate": int(down.shape[-1]),
            "shared_intermediate": int(getattr(text_config, "shared_expert_intermediate_size", 0) or 0),
            "normalizes_top_k": bool(getattr(text_config, "norm_topk_prob", True)),
            # Mixtral multiplies by fp32 routing weights; Qwen2-MoE and OLMoE cast them to the router logits' dtype
            "routing_weights_fp32": layout.model_type == "mixtral",
            "expert_params": sum(p.numel() for e in experts for p in e.parameters()),
            "router_params": sum(p.numel() for b in layout.blocks for r in ["gate", *layout.router_linears]
                                 for p in modules[f"{b}.{r}"].parameters()),
            "shared_expert_params": sum(p.numel() for b in layout.blocks if f"{b}.shared_expert" in modules
                                        for p in modules[f"{b}.shared_expert"].parameters()),
            "expert_lora_params": 0, "router_lora_params": 0}


def _decoder_layers(model):
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return list(module)
    return []


def _layer_prefix(name: str) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


# ---------------------------------------------------------------------------------------------
# Bytes per component
# ---------------------------------------------------------------------------------------------
def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of one bitsandbytes 4-bit weight: packed uint8 data + quantization constants."""
    packed = (numel + 1) // 2
    blocks = -(-numel // NF4_BLOCKSIZE)
    if not double_quant:
        return packed + 4 * blocks + NF4_CODE_BYTES
    nested = -(-blocks // NF4_NESTED_BLOCKSIZE)
    return packed + blocks + 4 * nested + 256 * 4 + 4 + NF4_CODE_BYTES


def optimizer_state_bytes(optim: str, shapes: list[tuple], param_bytes: int) -> int:
    """Optimizer state bytes for trainable tensors of these shapes (states per TrainingArguments.optim)."""
    kind, _ = OPTIMIZERS[optim]
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if kind == "adamw":
            total += 2 * n * param_bytes                  # exp_avg, exp_avg_sq like the parameter
        elif kind == "adamw32bit":
            total += 8 * n                                # bnb 32-bit states are fp32
        elif kind == "adamw8bit":
            total += 8 * n if n < BNB8_MIN_SIZE else 2 * n + 2 * 4 * -(-n // BNB8_BLOCKSIZE)
        elif kind == "adafactor":                         # factored second moment, no first moment
            total += (sum(shape[:-1]) + shape[-1]) * param_bytes if len(shape) >= 2 else n * param_bytes
    return total


def _dtypes(s: Settings, autocast: bool) -> dict:
    """Bytes per element of what one pass keeps: w = base weights as loaded, c = what autocast computes in,
    ac = autocast casts anything (bf16/fp16 compute), res = the residual stream and norm outputs (fp32 under
    QLoRA, whose embeddings and norms prepare_model_for_kbit_training upcasts, and under mixed precision),
    lin = the outputs of the projections, attn = what sdpa sees."""
    w, c, _ = PRECISIONS[s.dtype]
    ac = autocast and c < 4
    res = 4 if s.method == "qlora" else w
    lin = res if s.method == "qlora" else (c if ac else w)
    return {"w": w, "c": c, "ac": ac, "res": res, "lin": lin, "attn": c if ac else lin}


def layer_activation_bytes(arch: Architecture, s: Settings, autocast: bool = True,
                           peft_cast: bool = True) -> tuple[float, int]:
    """(bytes per token, bytes per layer independent of tokens) that autograd keeps for one decoder layer.

    Read off the tensors transformers' Llama/Mistral block saves (checked against a saved-tensor hook
    count in tests/unit/test_memory.py). Dtypes from `_dtypes`. Bitsandbytes' Linear4bit returns its input's
    dtype, so QLoRA's projections come out fp32. `peft_cast`: peft casts each adapter's input to the
    adapter's fp32 dtype (then autocast casts that copy back for the matmul); the recipes' Trainer turns it
    off under autocast, so an adapter reads its input as it is, and so does attach_lora's FusedLoraLinear
    (plain LoRA, no DoRA) under any autocast.
      RMSNorm x2:   fp32 copy of its input (4h) + rsqrt (4); full FT also its normalized input
      sdpa:         q, k, v, output + fp32 logsumexp per head (flash-style kernels, CPU and CUDA)
      SwiGLU:       gate, up and silu(gate) outputs
      full FT:      the inputs of q/k/v, gate/up and down (for the weight gradients): one shared tensor per
                    group, or under autocast from fp32 (mixed) one bf16 copy per projection; and autocast's
                    bf16 copy of every fp32 weight (the per-layer constant)
      LoRA module:  dropout mask (bool; on CPU attach_lora's CpuDropout), lora_A's input, lora_A's output; under
                    autocast also a copy of each fp32 adapter weight (the per-layer constant) and, for an
                    fp32 base (mixed), of each base weight.
    """
    h, i, q, kv = arch.hidden, arch.intermediate, arch.q_dim, arch.kv_dim
    d = _dtypes(s, autocast)
    c, ac, res, lin, attn = d["c"], d["ac"], d["res"], d["lin"], d["attn"]
    per_token = 2 * (4 * h + 4) + 2 * attn * q + 2 * attn * kv + 4 * arch.heads + 3 * lin * i
    if arch.qk_norm_dims:                                       # q/k RMSNorms: fp32 copy of their input + rsqrt
        per_token += 4 * arch.qk_norm_dims + 2 * 4
    constant = 0
    layer_linear = sum(arch.quantizable) // arch.layers if arch.layers else 0   # a layer's projection weights
    weight_copies = ac and d["w"] != c and s.method != "qlora"                  # autocast's copies of fp32 weights
    if arch.moe:                                                # MoE layers: router + routed experts instead of SwiGLU
        share = arch.moe["moe_layers"] / arch.layers
        moe_token, moe_constant = moe_layer_bytes(arch, s, d)
        per_token += share * (moe_token - 3 * lin * i - (lin * i if s.method == "full" else 0))
        constant += share * moe_constant
    if s.method == "full":
        per_token += 2 * res * h                                # the normalized inputs (norm weight gradients)
        sharing = (not ac) or res == c                          # one input tensor shared by the group's projections
        per_token += (2 if sharing else 5) * (c if ac else res) * h + lin * i  # q/k/v + gate/up inputs, down's
        if weight_copies:
            constant += c * layer_linear
        return per_token, constant
    if ac and s.method == "lora" and not s.use_dora:
        peft_cast = False  # FusedLoraLinear skips the cast autocast would undo (common/lora_fast.py)
    mask = 1 if s.lora_dropout > 0 else 0  # a bool mask: CUDA's fused dropout, CPU's CpuDropout (common/lora_fast.py)
    arrives = {"attn_in": res, "mlp_in": res, "attn_out": attn, "mlp_out": lin}   # dtype of each group's input
    shared = set()
    for name, dim in arch.lora_inputs:
        group = LLAMA_GROUPS.get(name, "attn_in" if dim == h else "mlp_out")
        x = 4 if peft_cast else arrives[group]                  # what dropout and lora_A get
        copied = x != arrives[group]                            # peft made a per-module fp32 copy
        per_token += mask * dim + (c if ac else 4) * s.lora_r  # dropout mask, lora_A's output
        if s.lora_dropout > 0 or copied or (ac and x != c):
            per_token += (c if ac else x) * dim                 # a per-module tensor: dropout output or a cast
        elif group not in shared and group != "attn_out":       # the input itself, shared by the group;
            shared.add(group)                                   # o_proj's is the sdpa output already kept
            per_token += x * dim
    if ac:
        constant += c * arch.lora_params // arch.layers
    if weight_copies:
        constant += c * layer_linear
    return per_token, constant


def moe_layer_bytes(arch: Architecture, s: Settings, d: dict) -> tuple[float, int]:
    """(bytes per token, bytes per layer) autograd keeps for one MoE block's router and experts (transformers 5's
    grouped_mm experts; checked against a saved-tensor count in tests/unit/test_moe_memory.py).
      router:       fp32 softmax probabilities (E), top-k ids (int64) and weights (fp32), their sum when normalized
      per slot:     (tokens x top-k) sort/unsort indices (3 x int64), routing weight, gate/up output + act output,
                    expert output (for the routing weight's gradient); LoRA on the experts: also the slot's input
                    and act output (the weight gradients)
      per layer:    grouped-mm offsets; LoRA on the experts: peft's W + scale * B @ A of every expert (ParamWrapper
                    folds the factors into the weight the grouped matmul reads), in the compute dtype
      shared expert (Qwen2-MoE): its SwiGLU outputs, output and sigmoid gate"""
    m = arch.moe
    k, e, mi, h = m["experts_per_token"], m["num_experts"], m["expert_intermediate"], arch.hidden
    trained = m["experts_trained"]
    folded = (d["c"] if d["ac"] else d["w"])                    # the materialized expert weights
    ew = folded if trained and s.method != "full" else (4 if s.method == "qlora" else d["w"])
    per_token = 4 * e + 8 * k + 4 * k + (4 if m["normalizes_top_k"] else 0)
    routing = 4 if m["routing_weights_fp32"] else (d["c"] if d["ac"] else d["w"])
    slot = 3 * 8 + routing + 3 * ew * mi + ew * h
    if trained:
        slot += ew * h + ew * mi
    per_token += k * slot
    if m["shared_intermediate"]:
        per_token += 3 * d["lin"] * m["shared_intermediate"] + d["lin"] * h + d["lin"]
    constant = 4 * e
    if trained and s.method != "full":
        constant += folded * m["expert_params"] // m["moe_layers"]
    return per_token, constant


def activation_bytes(arch: Architecture, s: Settings, autocast: bool = True, peft_cast: bool = True,
                     labelled_fraction: float = 1.0) -> dict:
    """Activations kept through the forward pass, the logits peak, and the backward working set.
    `labelled_fraction`: the share of positions the LM head runs on (common.trainer.labelled_logits_inputs)."""
    tokens = s.batch_size * s.seq_len
    logit_positions = math.ceil(labelled_fraction * tokens)
    d = _dtypes(s, autocast)
    b, res = d["c"] if d["ac"] else d["w"], d["res"]
    per_token, constant = layer_activation_bytes(arch, s, autocast, peft_cast)
    one_layer = int(per_token * tokens + constant)
    checkpointed = checkpointed_layers(arch.layers, s)
    kept = checkpointed * res * arch.hidden * tokens + (arch.layers - checkpointed) * one_layer  # a checkpointed
    if checkpointed:                                           # layer keeps only its input
        # autocast caches its copy of every trainable fp32 weight (leaf tensors requiring grad) until the forward
        # ends; the other copies die with the discarded saved tensors
        share = checkpointed / arch.layers
        if d["ac"] and s.method != "full":
            kept += share * d["c"] * arch.lora_params
        elif d["ac"] and d["w"] != d["c"]:
            kept += share * d["c"] * sum(arch.quantizable)
    # after the last layer: final norm (+ lm_head input for full FT), labels, the loss, and rope's cos/sin
    # (kept by the layers themselves unless they are checkpointed)
    rest = (4 * arch.hidden + 4 + 8) * tokens + 4 + (0 if checkpointed == arch.layers else
                                                      2 * s.seq_len * arch.head_dim * res)
    if s.method == "full":
        rest += (res * arch.hidden + b * arch.hidden + 8) * tokens
    if d["ac"] and (s.method == "qlora" or d["w"] != d["c"]):
        rest += d["c"] * arch.vocab * arch.hidden              # autocast's copy of the fp32 lm_head
    logits_saved = 4 * arch.vocab * logit_positions            # fp32 log-softmax output
    logits_peak = 12 * arch.vocab * logit_positions            # + its gradient + the logits' gradient
    # backward of one layer: gradients of its activations (about two hidden- and two MLP-sized fp32 tensors)
    backward_working = 4 * (2 * arch.hidden + 2 * arch.intermediate) * tokens
    traffic = arch.layers * one_layer                          # activation bytes one forward pass allocates
    if s.method == "qlora":                                    # bnb dequantizes each 4-bit weight per matmul
        backward_working += b * max(arch.quantizable)
        traffic += b * sum(arch.quantizable)
    return {"kept": kept + rest, "logits_saved": logits_saved, "logits_peak": logits_peak,
            "recomputed_layer": one_layer if checkpointed else 0, "backward_working": backward_working,
            "forward_traffic": traffic, "per_token_per_layer": per_token}


def checkpointed_layers(layers: int, s: Settings) -> int:
    """How many decoder layers recompute in backward: 0 without checkpointing, else layers 0, n, 2n, ... as
    transformers' `every_n_layers` picks them."""
    return -(-layers // s.ckpt_every_n) if s.grad_ckpt else 0


def describe_checkpointing(layers: int, s: Settings) -> str:
    """'gradient checkpointing' or 'gradient checkpointing on 15 of 30 layers (every 2nd)'."""
    n = s.ckpt_every_n
    if not s.grad_ckpt or n == 1:
        return "gradient checkpointing"
    return f"gradient checkpointing on {checkpointed_layers(layers, s)} of {layers} layers (every {ordinal(n)})"


def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _phases(prefix: str, static: int, act: dict, accumulated: int, gradients: int) -> dict:
    """Candidate peaks: name -> (live tensor bytes, bytes of activations the pass allocated in all)."""
    working = act["recomputed_layer"] + act["backward_working"]
    traffic = act["forward_traffic"]
    return {
        f"{prefix}forward_end": (static + accumulated + act["kept"] + act["logits_peak"], traffic),
        f"{prefix}backward_layer": (static + accumulated + act["kept"] + working, traffic),
        f"{prefix}backward_end": (static + gradients + working, traffic),
    }


PHASES = {
    "forward_end": "forward activations + logits at the end of the forward pass",
    "backward_layer": "backward through a layer (activations still kept + that layer's gradients)",
    "backward_end": "end of the backward pass (all gradients)",
}


def describe_phase(phase: str, s: Settings) -> str:
    """`peak_phase` in words: which pass and what is alive then."""
    if phase == "optimizer_step":
        return "optimizer step (weights + gradients + optimizer states" + \
            (" + foreach temporaries)" if s.device == "cuda" else ")")
    if phase.startswith("check_"):
        how = "like a training step" if s.check_autocast else "outside autocast, peft casting adapter inputs to fp32"
        return f"gradient check (one micro-batch before step 1, {how}): {PHASES[phase[6:]]}"
    return f"training step: {PHASES[phase]}, optimizer states allocated"


def describe_precision(s: Settings) -> str:
    """What --dtype means for this method (the full fine-tuning wording is PRECISIONS')."""
    if s.method == "full":
        return PRECISIONS[s.dtype][2]
    base = {"qlora": "4-bit NF4 base computing in " + ("fp32" if s.dtype == "fp32" else s.dtype),
            "lora": {"mixed": "fp32 base", "fp32": "fp32 base"}.get(s.dtype, f"{s.dtype} base")}[s.method]
    autocast = "no autocast" if PRECISIONS[s.dtype][1] == 4 else f"{'bf16' if s.dtype == 'mixed' else s.dtype} autocast"
    return f"{s.dtype}: {base} (frozen), fp32 adapters with fp32 gradients and optimizer states, {autocast}"


def plan_bytes(arch: Architecture, s: Settings) -> dict:
    """Bytes per component and the predicted peak for one configuration."""
    s.check()
    w, b, _ = PRECISIONS[s.dtype]                              # bytes per base weight, per autocast element
    n, z = s.world_size, s.zero
    base_params = arch.total_params - arch.lora_params
    if s.method == "qlora":
        quantized = sum(arch.quantizable)
        weights = sum(nf4_bytes(k, s.double_quant) for k in arch.quantizable) + 4 * (base_params - quantized)
    else:
        weights = w * base_params
    weights += 4 * arch.lora_params                            # peft keeps adapters in fp32
    param_bytes = w if s.method == "full" else 4              # mixed: the fp32 weights are the master copy
    gradients = param_bytes * arch.trainable_params
    master = 4 * arch.trainable_params if (z >= 1 and param_bytes < 4) else 0
    states_dtype = 4 if z >= 1 else param_bytes                # DeepSpeed steps on fp32 partitions
    optimizer = optimizer_state_bytes(s.optim, arch.trainable_tensors, states_dtype)
    paged = OPTIMIZERS[s.optim][1] and s.device == "cuda"
    if z >= 1:
        optimizer, master = optimizer // n, master // n
    if z >= 2:
        gradients = gradients // n + (4 * arch.trainable_params // n if param_bytes < 4 else 0)
    zero3_gathered = 0
    if z == 3:
        weights = weights // n
        zero3_gathered = 2 * b * arch.largest_layer_params     # a layer being used + the one prefetched
    ddp_buckets = gradients if (n > 1 and z == 0) else 0       # DDP's flat gradient buckets
    train = activation_bytes(arch, s, autocast=True, peft_cast=s.peft_input_cast, labelled_fraction=s.labelled_fraction)
    check = activation_bytes(arch, s, autocast=s.check_autocast,  # outside autocast: the plain check, every position
                             peft_cast=s.peft_input_cast if s.check_autocast else True,
                             labelled_fraction=s.labelled_fraction if s.check_autocast else 1.0)

    static = weights + master + zero3_gathered
    accumulated = gradients if s.gradient_accumulation_steps > 1 else 0
    foreach_adam = s.device == "cuda" and OPTIMIZERS[s.optim][0] == "adamw"
    optimizer_temp = 4 * arch.trainable_params // (n if z else 1) if foreach_adam else 0
    on_device_optimizer = 0 if paged else optimizer
    # the recipes' one-batch gradient check (common.checks.check_gradient_flow) runs before step 1, before the
    # optimizer has states (sft_memory_diet: like a training step; --check_outside_autocast: without autocast,
    # peft's input cast on); then the training steps under autocast
    phases = _phases("check_", static, check, 0, gradients) if s.gradient_check else {}
    phases.update(_phases("", static + on_device_optimizer, train, accumulated, gradients + ddp_buckets))
    phases["optimizer_step"] = (static + on_device_optimizer + gradients + ddp_buckets + optimizer_temp,
                                train["forward_traffic"])
    peak_phase = max(phases, key=lambda k: phases[k][0])
    tensors_peak = phases[peak_phase][0]
    if s.device == "cuda":
        peak = tensors_peak
        overhead = CUDA_CONTEXT_BYTES + int(CUDA_FRAGMENTATION * tensors_peak)
        required = peak + overhead
        measured_as = "torch.cuda.max_memory_allocated (tensors); required_bytes adds the CUDA context and allocator slack"
    else:
        peak, overhead = cpu_rss_peak(arch, s, weights, phases)["peak"], CPU_BASELINE_BYTES
        required = peak
        measured_as = "process peak RSS (VmHWM), including the measured baseline of Python + libraries + data"
    return {
        "weights_bytes": int(weights), "gradients_bytes": int(gradients), "optimizer_bytes": int(optimizer),
        "optimizer_paged": paged, "master_weights_bytes": int(master),
        "activations_bytes": int(train["kept"] + train["logits_saved"]), "logits_bytes": int(train["logits_peak"]),
        "check_activations_bytes": int(check["kept"] + check["logits_saved"]),
        "activation_bytes_per_token_per_layer": round(train["per_token_per_layer"], 1),
        **moe_report(arch, s),
        "ddp_bucket_bytes": int(ddp_buckets), "zero3_gathered_bytes": int(zero3_gathered),
        "overhead_bytes": int(overhead), "tensors_peak_bytes": int(tensors_peak), "peak_phase": peak_phase,
        "peak_phase_description": describe_phase(peak_phase, s), "precision": describe_precision(s),
        "phases": {k: int(v[0]) for k, v in phases.items()},
        "peak_bytes": int(peak), "required_bytes": int(required), "peak_measured_as": measured_as,
    }


def moe_report(arch: Architecture, s: Settings) -> dict:
    """`active_params_per_token` for every model; `moe` (experts, router, LoRA on them, routed activations) for MoE."""
    if not arch.moe:
        return {"active_params_per_token": arch.total_params}
    m = arch.moe
    per_token, constant = moe_layer_bytes(arch, s, _dtypes(s, True))
    tokens = s.batch_size * s.seq_len
    return {"active_params_per_token": m["active_params_per_token"], "moe": {
        **{k: v for k, v in m.items() if k != "active_params_per_token"},
        "routed_slots_per_step": tokens * m["experts_per_token"],
        "moe_activation_bytes": int(m["moe_layers"] * (per_token * tokens + constant)),
        "moe_activation_bytes_per_token_per_layer": round(per_token, 1)}}


def cpu_rss_peak(arch: Architecture, s: Settings, weights: int, phases: dict) -> dict:
    """Peak RSS of a recipe process on CPU: measured baseline + max(loading, training).

    Loading: safetensors files are memory-mapped and the pages read count in RSS. Weights loaded in
    the file's dtype alias those pages (no second copy); converted ones are resident next to them.
    QLoRA keeps the file mapped when its fp32 parameters alias it (an fp32 checkpoint loaded for fp32
    compute: prepare_model_for_kbit_training has nothing to upcast), so the whole file stays resident.
    Training: live tensors + the heap glibc keeps. glibc serves blocks under its mmap threshold (at
    most 32 MiB) from the heap and keeps what is freed there, so RSS grows past the live tensors by a
    roughly constant share (CPU_HEAP_RETENTION) of the activation bytes a forward pass allocates,
    checkpointed or not; blocks above it (the logits) are mmapped and returned exactly. A fixed
    threshold (MALLOC_MMAP_THRESHOLD_=1048576 in the run's environment) stops that: retention 0.
    """
    file_bytes = arch.checkpoint_dtype_bytes * (arch.total_params - arch.lora_params)
    w = PRECISIONS[s.dtype][0]
    # MoE (transformers 5): the loaded weights do not alias the file and its pages stay resident beside them
    # (measured: a 206 MiB fp32 Mixtral adds 572 MiB of RSS on loading, a dense Llama of the same size 140 MiB)
    aliased = arch.checkpoint_dtype_bytes == w and not arch.moe
    loading = file_bytes + (0 if aliased and s.method != "qlora" else weights)
    resident_file = file_bytes if arch.moe else 0
    if s.method == "qlora" and aliased and w == 4:
        unquantized = 4 * (arch.total_params - arch.lora_params - sum(arch.quantizable))
        resident_file = file_bytes - unquantized            # those parameters are counted in the weights
    retention = CPU_HEAP_RETENTION if s.cpu_heap_retention < 0 else s.cpu_heap_retention
    training = resident_file + max(live + retention * traffic for live, traffic in phases.values())
    return {"peak": int(CPU_BASELINE_BYTES + max(loading, training)), "loading": int(loading),
            "training": int(training)}


# ---------------------------------------------------------------------------------------------
# One plan, and the recommendation
# ---------------------------------------------------------------------------------------------
def plan(model: str | None = None, settings: Settings | None = None, config=None, arch: Architecture | None = None,
         **overrides) -> dict:
    """Everything the CLI prints for one configuration. `overrides` are Settings fields."""
    s = replace(settings or Settings(), **overrides)
    s.check()
    if arch is None:
        arch = inspect_model(config if config is not None else load_config(model), s.method, s.lora_r,
                             s.lora_targets, s.lora_dropout, s.use_dora,
                                             s.lora_train_router)
    out = {"model": model, "settings": asdict(s), "total_params": arch.total_params,
           "trainable_params": arch.trainable_params, "lora_modules": arch.lora_modules,
           "trainable_percent": round(100 * arch.trainable_params / arch.total_params, 4)}
    out.update(plan_bytes(arch, s))
    return out


SPEED_LADDER = [
    # (what is added, the settings it changes) in order of what it costs in speed (cheapest first)
    ("nothing", {}),
    ("gradient checkpointing on every 4th layer", {"grad_ckpt": True, "ckpt_every_n": 4}),
    ("gradient checkpointing on every 3rd layer", {"grad_ckpt": True, "ckpt_every_n": 3}),
    ("gradient checkpointing on every 2nd layer", {"grad_ckpt": True, "ckpt_every_n": 2}),
    ("gradient checkpointing", {"grad_ckpt": True}),
    ("8-bit AdamW", {"grad_ckpt": True, "optim": "adamw_bnb_8bit"}),
    ("paged 8-bit AdamW", {"grad_ckpt": True, "optim": "paged_adamw_8bit"}),
    ("QLoRA (4-bit base)", {"grad_ckpt": True, "optim": "paged_adamw_8bit", "method": "qlora"}),
]


def recommend(model: str | None, budget_bytes: int, settings: Settings | None = None, config=None,
              methods: tuple[str, ...] | None = None, pinned: tuple[str, ...] = (), **overrides) -> dict:
    """The fastest configuration that fits in `budget_bytes` (compared with `required_bytes`).

    Keeps the model, sequence length, LoRA targets/rank, precision, world size and the effective batch
    (micro-batch x accumulation); changes, in this order, only what costs speed: first a smaller
    micro-batch with more accumulation, then gradient checkpointing, an 8-bit optimizer, a paged one
    (CUDA), and last QLoRA. `methods` lists the methods it may use, in order (default: the one in
    `settings`); `pinned` names Settings fields the user set, which it never changes ("batch_size",
    "grad_ckpt", "optim", "method"). Returns {"fits": bool, "settings", "plan", "reason", "tried"};
    with fits=False the reason says what the smallest configuration needs.
    """
    base = replace(settings or Settings(), **overrides)
    base.check()
    effective = base.batch_size * base.gradient_accumulation_steps
    if config is None:
        config = load_config(model)
    archs: dict[str, Architecture] = {}
    unknown = set(pinned) - {"batch_size", "grad_ckpt", "optim", "method"}
    if unknown:
        raise PlanError(f"recommend(pinned=...): {sorted(unknown)} are not settings it changes")
    tried, start = [], ((base.method,) if "method" in pinned else (methods or (base.method,)))
    ladder = []
    for method in start:
        for label, change in SPEED_LADDER:
            change = {"method": method, **change}
            for name in ("grad_ckpt", "optim", "method"):
                if name in pinned:
                    change[name] = getattr(base, name)
            if "grad_ckpt" in pinned or base.grad_ckpt:        # checkpointing as asked: on every layer, or off
                change.pop("ckpt_every_n", None)
            if base.grad_ckpt and change.get("grad_ckpt") is not True:
                change["grad_ckpt"] = True                     # asked for already: never taken away
            if change["method"] == "qlora" and method == "full":
                continue
            if change.get("optim", "").startswith("paged_") and base.device == "cpu":
                continue                                       # nothing to page on a CPU
            if "optim" in change and base.optim != "adamw_torch" and OPTIMIZERS[base.optim][0] != "adamw":
                change.pop("optim")                            # keep a non-AdamW optimizer the user chose
            key = tuple(sorted(change.items()))
            if key not in {tuple(sorted(c.items())) for _, c in ladder}:
                ladder.append((label if method == base.method else f"{method} + {label}", change))
    for label, change in ladder:
        micro = base.batch_size if "batch_size" in pinned else effective
        while micro >= 1:
            s = replace(base, **change, batch_size=micro, gradient_accumulation_steps=-(-effective // micro))
            if s.method not in archs:
                archs[s.method] = inspect_model(config, s.method, s.lora_r, s.lora_targets, s.lora_dropout, s.use_dora,
                                             s.lora_train_router)
            layers = archs[s.method].layers
            if s.grad_ckpt and s.ckpt_every_n > 1 and checkpointed_layers(layers, s) in (
                    layers, checkpointed_layers(layers, replace(s, ckpt_every_n=s.ckpt_every_n - 1))):
                break                                          # the same layers as the next entry: try that one
            p = plan(model, s, arch=archs[s.method])
            tried.append({"adds": label, "batch_size": micro, "required_gb": round(p["required_bytes"] / GB, 2)})
            if p["required_bytes"] <= budget_bytes:
                reason = (f"fastest configuration that fits {budget_bytes / GB:.1f} GiB: {s.method}, micro-batch "
                          f"{micro} x {s.gradient_accumulation_steps} accumulation, "
                          f"{describe_checkpointing(archs[s.method].layers, s) + ', ' if s.grad_ckpt else ''}{s.optim}; needs "
                          f"{p['required_bytes'] / GB:.2f} GiB ({p['peak_phase']} is the peak). Adds {label}.")
                cheaper = {}
                for t in tried[:-1]:
                    if t["adds"] != label:
                        cheaper[t["adds"]] = t                  # the last one tried is its smallest micro-batch
                if cheaper:
                    reason += " Cheaper options do not fit: " + "; ".join(
                        f"{'as requested' if k == 'nothing' else 'adding ' + k}, micro-batch {t['batch_size']} "
                        f"needs {t['required_gb']} GiB" for k, t in cheaper.items()) + "."
                return {"fits": True, "settings": asdict(s), "plan": p, "reason": reason, "tried": tried}
            micro = micro // 2 if (micro > 1 and "batch_size" not in pinned) else 0
    smallest = min(tried, key=lambda t: t["required_gb"])
    return {"fits": False, "settings": None, "plan": None, "tried": tried,
            "reason": f"nothing fits {budget_bytes / GB:.1f} GiB: the smallest configuration ({smallest['adds']}, "
                      f"micro-batch {smallest['batch_size']}) needs {smallest['required_gb']} GiB. Shorten "
                      f"--seq_len, use fewer/smaller LoRA targets, more devices with --zero 3, or a bigger device."}


COMPARE_ROWS = [("lora", "lora", "bf16"), ("qlora", "qlora", "bf16"), ("full bf16", "full", "bf16"),
                ("full mixed", "full", "mixed")]


def compare_methods(model: str | None, settings: Settings | None = None, config=None, **overrides) -> list[dict]:
    """The same shapes planned for LoRA, QLoRA, full fine-tuning in pure bf16 and in mixed precision: one row each
    with its peak, the phase that sets it and what the precision means."""
    s = replace(settings or Settings(), **overrides)
    config = config if config is not None else load_config(model)
    rows = []
    for label, method, dtype in COMPARE_ROWS:
        if s.device == "cpu" and method == "qlora" and s.dtype == "fp32":
            dtype = "fp32"
        p = plan(model, replace(s, method=method, dtype=dtype), config=config)
        rows.append({"row": label, "method": method, "dtype": dtype, "precision": p["precision"],
                     "trainable_params": p["trainable_params"], "peak_bytes": p["peak_bytes"],
                     "required_bytes": p["required_bytes"], "peak_phase": p["peak_phase"],
                     "peak_phase_description": p["peak_phase_description"], "phases": p["phases"]})
    return rows


def max_batch_size(model: str | None, budget_bytes: int, settings: Settings | None = None, config=None,
                   limit: int = 4096, **overrides) -> int:
    """The largest micro-batch whose `required_bytes` fits `budget_bytes` with everything else fixed
    (0 if not even 1 fits). Memory grows with the batch, so a binary search over [1, limit] finds it."""
    s = replace(settings or Settings(), **overrides)
    arch = inspect_model(config if config is not None else load_config(model), s.method, s.lora_r, s.lora_targets,
                         s.lora_dropout, s.use_dora,
                                             s.lora_train_router)

    def fits(batch: int) -> bool:
        return plan(model, replace(s, batch_size=batch), arch=arch)["required_bytes"] <= budget_bytes

    low, high = 0, limit
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _fmt(n: int) -> str:
    return f"{n / GB:8.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    d = Settings()
    ap = argparse.ArgumentParser(prog="python -m common.memory", description=__doc__.split("\n\n")[0],
                                 allow_abbrev=False)
    ap.add_argument("--model", required=True, help="model folder, config.json, or asset:tiny / asset:smollm2")
    ap.add_argument("--method", default=d.method, choices=["full", "lora", "qlora"])
    ap.add_argument("--lora_r", type=int, default=d.lora_r)
    ap.add_argument("--lora_targets", default=d.lora_targets,
                    help="comma-separated Linear names, or all-linear; `experts`: an MoE model's routed experts")
    ap.add_argument("--lora_train_router", action="store_true", help="MoE: LoRA on the router too")
    ap.add_argument("--lora_dropout", type=float, default=d.lora_dropout)
    ap.add_argument("--use_dora", action="store_true", help="DoRA: + one magnitude per output feature of each adapted Linear")
    ap.add_argument("--seq_len", type=int, default=d.seq_len, help="tokens per sequence (the recipes' max_length)")
    ap.add_argument("--batch_size", type=int, default=d.batch_size, help="per-device micro-batch")
    ap.add_argument("--gradient_accumulation_steps", type=int, default=d.gradient_accumulation_steps)
    ap.add_argument("--optim", default=d.optim, help=f"one of {', '.join(sorted(OPTIMIZERS))}")
    ap.add_argument("--dtype", default=d.dtype, choices=sorted(PRECISIONS),
                    help="bf16: pure bf16 (model loaded in bf16, no fp32 master copy); mixed: fp32 weights + bf16 "
                         "autocast (TrainingArguments(bf16=True) on an fp32 model); fp16; fp32")
    ap.add_argument("--grad_ckpt", action="store_true", default=d.grad_ckpt,
                    help="gradient checkpointing (non-reentrant)")
    ap.add_argument("--ckpt_every_n", type=int, default=d.ckpt_every_n,
                    help="with --grad_ckpt: checkpoint only layers 0, n, 2n, ... (transformers' every_n_layers)")
    ap.add_argument("--world_size", type=int, default=d.world_size)
    ap.add_argument("--zero", type=int, default=d.zero, choices=[0, 1, 2, 3])
    ap.add_argument("--device", default=d.device, choices=["cuda", "cpu"],
                    help="cuda: predict torch.cuda.max_memory_allocated; cpu: predict the process peak RSS")
    ap.add_argument("--no_double_quant", action="store_true", help="QLoRA without double quantization")
    ap.add_argument("--cpu_heap_retention", type=float, default=d.cpu_heap_retention,
                    help=f"CPU: extra RSS per byte of activations allocated (default {CPU_HEAP_RETENTION}, measured "
                         "with glibc's dynamic mmap threshold; 0 when the run sets MALLOC_MMAP_THRESHOLD_)")
    ap.add_argument("--no_gradient_check", action="store_true",
                    help="the run skips the recipes' one-batch gradient check before step 1")
    ap.add_argument("--check_outside_autocast", action="store_true",
                    help="the gradient check runs outside autocast with peft's fp32 input cast (harnesses/compare.py, "
                         "sft_multigpu_qlora.py); default: like a training step, as recipes/sft_memory_diet.py runs it")
    ap.add_argument("--peft_input_cast", action="store_true",
                    help="training steps keep peft's cast of adapter inputs to fp32 (a plain Trainer; the recipes' "
                         "TokenCountingTrainer turns it off under autocast)")
    ap.add_argument("--labelled_fraction", type=float, default=d.labelled_fraction,
                    help="share of positions whose next token is labelled (assistant-only SFT: often 0.3-0.6); the "
                         "recipes run the LM head only there. Default 1.0: every position (upper bound)")
    ap.add_argument("--compare", action="store_true",
                    help="one row each for lora, qlora, full bf16 and full mixed precision at these shapes")
    ap.add_argument("--budget_gb", type=float, help="memory budget per device in GiB (with --recommend)")
    ap.add_argument("--recommend", action="store_true", help="propose the fastest configuration that fits --budget_gb")
    ap.add_argument("--find_batch_size", action="store_true",
                    help="the largest micro-batch that fits --budget_gb with the other settings as given")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "Failed to load CPU gemm_4bit_forward ..." on import
    s = Settings(method=a.method, lora_r=a.lora_r, lora_targets=a.lora_targets, lora_dropout=a.lora_dropout,
                 use_dora=a.use_dora, lora_train_router=a.lora_train_router, seq_len=a.seq_len, batch_size=a.batch_size, gradient_accumulation_steps=a.gradient_accumulation_steps,
                 optim=a.optim, dtype=a.dtype, grad_ckpt=a.grad_ckpt, ckpt_every_n=a.ckpt_every_n, world_size=a.world_size, zero=a.zero,
                 device=a.device, double_quant=not a.no_double_quant, cpu_heap_retention=a.cpu_heap_retention,
                 gradient_check=not a.no_gradient_check, check_autocast=not a.check_outside_autocast,
                 peft_input_cast=a.peft_input_cast, labelled_fraction=a.labelled_fraction)
    try:
        if (a.recommend or a.find_batch_size) and a.budget_gb is None:
            raise PlanError("--recommend and --find_batch_size need --budget_gb")
        if a.find_batch_size:
            batch = max_batch_size(a.model, int(a.budget_gb * GB), s)
            out = {"model": a.model, "budget_gb": a.budget_gb, "max_batch_size": batch,
                   "plan": plan(a.model, s, batch_size=batch) if batch else None}
            print(json.dumps(out, indent=2) if a.json else f"largest micro-batch that fits {a.budget_gb} GiB: {batch}")
            return 0 if batch else 1
        if a.compare:
            rows = compare_methods(a.model, s)
            if a.json:
                print(json.dumps({"model": a.model, "rows": rows}, indent=2))
                return 0
            print(f"{a.model}: {s.batch_size} x {s.seq_len} tokens, {'' if s.grad_ckpt else 'no '}gradient checkpointing, "
                  f"{s.optim}, LoRA r={s.lora_r} dropout {s.lora_dropout} on {s.lora_targets}, device {s.device}")
            for r in rows:
                print(f"  {r['row']:<18}{_fmt(r['peak_bytes'])} peak  (required {r['required_bytes'] / GB:.2f} GiB)  "
                      f"peak: {r['peak_phase_description']}")
            for r in rows:
                print(f"  {r['row']}: {r['precision']}")
            return 0
        if a.recommend:
            out = recommend(a.model, int(a.budget_gb * GB), s)
            out["model"], out["budget_gb"] = a.model, a.budget_gb
        else:
            out = plan(a.model, s)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(out, indent=2))
        return 0 if (not a.recommend or out["fits"]) else 1
    if a.recommend:
        print(out["reason"])
        for t in out["tried"]:
            print(f"  tried: adds {t['adds']:<28} micro-batch {t['batch_size']:<4} needs {t['required_gb']:7.2f} GiB")
        return 0 if out["fits"] else 1
    print(f"{a.model}: {out['trainable_params']:,} trainable of {out['total_params']:,} parameters "
          f"({out['trainable_percent']}%), {out['lora_modules']} LoRA modules")
    if "moe" in out:
        m = out["moe"]
        print(f"  MoE: {m['num_experts']} experts, top-{m['experts_per_token']}, {m['moe_layers']} MoE layers; "
              f"{out['active_params_per_token']:,} parameters active per token; LoRA on experts "
              f"{m['expert_lora_params']:,}, on the router {m['router_lora_params']:,}")
    for key in ("weights_bytes", "gradients_bytes", "optimizer_bytes", "master_weights_bytes", "activations_bytes",
                "logits_bytes", "overhead_bytes", "peak_bytes", "required_bytes"):
        print(f"  {key[:-6]:<16}{_fmt(out[key])}")
    print(f"  precision: {out['precision']}")
    print(f"  peak: {out['peak_phase_description']} ({out['peak_phase']}); measured as {out['peak_measured_as']}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
