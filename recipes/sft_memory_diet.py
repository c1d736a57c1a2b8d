"""Single-device LoRA / QLoRA SFT on a memory diet.

What it is for: fine-tune a chat model on one GPU (or the CPU) when memory is tight, with every
knob from the seeds' memory diets in one place: batch 1 + gradient accumulation, a shorter
max_length, non-reentrant gradient checkpointing, fewer LoRA target modules, bf16 where the
hardware has it, 8-bit/paged optimizers, 4-bit base weights (QLoRA), and a checkpoint policy
that never deletes the only good checkpoint. Fail-fast checks run before step 1.

Run (the README quickstart; SmolLM2-135M-Instruct learns the "Orrin" persona):
    bash launch/memory_diet.sh
    python recipes/sft_memory_diet.py --config recipes/configs/sft_memory_diet.yaml [--key value ...]

Fast by default (README "Fast by default"): padding-free packed micro-batches where the attention
implementation keeps packed examples apart (sdpa/eager checked numerically on this run's model
before step 1; flash-attn varlen on CUDA), length-grouped padded batches otherwise; gradient
checkpointing only when common.memory's planner says the run does not fit the memory budget;
Liger kernels on CUDA when installed.

Measured here: see the "Quickstart" table in README.md (the command there reproduces it).
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

import common  # noqa: E402,F401  (first: its logging filter must precede transformers' bitsandbytes import)
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer, TrainingArguments, set_seed  # noqa: E402

from common import checks  # noqa: E402
from common.assets import resolve_model_path  # noqa: E402
from common.checkpoints import (REQUEUE_EXIT_CODE, CheckpointValidator, NonFiniteGuard, RunError,  # noqa: E402
                                RunSegments, SaveOnSignal, explain_disk_full, prepare_output_dir)
from common.collator import CausalLMCollator, PaddingFreeCollator, packed_attention_leak, tokenize_sft  # noqa: E402
from common.config import default_config_path, parse_config  # noqa: E402
from common.data import DataError, check_control_tokens, load_sft_data, sft_items  # noqa: E402
from common.evaluation import generate_replies, keyword_accuracy  # noqa: E402
from common.memory import GB, PlanError, Settings, load_config, recommend  # noqa: E402
from common.attention import register as register_packed_attention  # noqa: E402
from common.models import (attach_lora, load_base_model, pick_attn_implementation, resolve_precision,  # noqa: E402
                           tune_cpu_allocator)
from common.trainer import (StepProfiler, TokenCountingTrainer, accepts_logits_to_keep,  # noqa: E402
                            keep_tracking_in_run_dir, labelled_logits_inputs)
from peft.helpers import disable_input_dtype_casting  # noqa: E402
from common.run_files import (PeakMemory, device_name, estimated_cost, now, plot_loss, version_drift,  # noqa: E402
                              write_json, write_manifest)

RECIPE = Path(__file__).stem  # the name follows the file: a copy writes runs/<its name> and "recipe": "<its name>"
log = logging.getLogger(RECIPE)


@dataclass
class Config:
    model_name_or_path: str = field(default="asset:smollm2", metadata={"help": "hub id, local dir, or asset:tiny / asset:smollm2 (built offline)"})
    dataset_path: str = field(default="data/persona/train.jsonl", metadata={"help": "training data: .jsonl/.json/.csv/ShareGPT/saved HF dataset (chat, instruction or completion format)"})
    eval_dataset_path: str | None = field(default="data/persona/heldout.jsonl", metadata={"help": "held-out data; records with `keywords` also give keyword accuracy"})
    dataset_format: str = field(default="auto", metadata={"help": "auto | chat | instruction | completion: the training file's format (the eval file's is detected on its own)"})
    eval_split: float = field(default=0.0, metadata={"help": "0 < x < 1: hold out this fraction of the training file (seeded by --seed) as the evaluation set instead of --eval_dataset_path; 0 = no split"})
    output_dir: str = field(default=f"runs/{RECIPE}", metadata={"help": "run directory (metrics.json, manifest.json, loss.png, adapter, checkpoints)"})
    method: str = field(default="lora", metadata={"help": "lora | qlora (4-bit NF4 base via bitsandbytes)"})
    device: str = field(default="auto", metadata={"help": "auto | cuda | cpu"})
    precision: str = field(default="auto", metadata={"help": "auto | bf16 | fp16 | fp32 (auto: bf16 where the hardware has it, else fp32 on CPU / fp16 on old GPUs)"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto | sdpa | sdpa_packed | eager | flash_attention_2 (auto: flash-attn on CUDA when installed; else sdpa_packed for packed batches, sdpa otherwise)"})
    profile_steps: int = field(default=0, metadata={"help": "N > 0: torch.profiler over optimizer steps 2..N+1, tables in <output_dir>/profile.txt (where the step time goes)"})
    labelled_logits_only: bool = field(default=True, metadata={"help": "LM head and cross-entropy only at positions whose next token is labelled (same loss, less work); false: over every position"})
    max_length: int = field(default=256, metadata={"help": "tokens per example; longer ones are truncated and reported"})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "micro-batch size"})
    gradient_accumulation_steps: int = field(default=16, metadata={"help": "micro-batches per optimizer step (effective batch = batch x accumulation)"})
    num_train_epochs: float = field(default=3.0, metadata={"help": "epochs (ignored when max_steps > 0)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1 = use num_train_epochs"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name"})
    warmup_steps: float = field(default=0.05, metadata={"help": "warmup: steps (>= 1) or a ratio of all steps (< 1)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    optim: str = field(default="adamw_torch", metadata={"help": "adamw_torch | adamw_bnb_8bit | paged_adamw_8bit | adafactor | sgd ..."})
    gradient_checkpointing: str = field(default="auto", metadata={"help": "auto | true | false: recompute activations in backward (non-reentrant): less memory, ~20-40%% slower. auto: only when common.memory's planner says the run does not fit --memory_budget_gb without it"})
    memory_budget_gb: float | None = field(default=None, metadata={"help": "memory the run may use, GiB (default: free GPU memory on CUDA; MemAvailable + this process's RSS on CPU). auto settings are planned against it"})
    packing: str = field(default="auto", metadata={"help": "auto | true | false: padding-free batches (each micro-batch is one row, position_ids restart per example, no padding). auto: when the attention implementation keeps packed examples apart (checked on the model before step 1)"})
    group_by_length: bool = field(default=True, metadata={"help": "without packing: put examples of similar length in the same micro-batch (less padding)"})
    use_liger_kernel: str = field(default="auto", metadata={"help": "auto | true | false: Liger's fused Triton kernels (CUDA only). auto: on CUDA when liger_kernel is installed"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (peft's default 0.0; on CPU any dropout costs about a third of the step: bernoulli masks for every adapted layer's input)"})
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "Linear layer names, or all-linear"})
    seed: int = field(default=42, metadata={"help": "random seed"})
    logging_steps: int = field(default=5, metadata={"help": "log every N optimizer steps"})
    eval_steps: int = field(default=0, metadata={"help": "evaluate every N steps during training; 0 = only before and after"})
    save_steps: int = field(default=50, metadata={"help": "checkpoint every N optimizer steps"})
    save_total_limit: int | None = field(default=None, metadata={"help": "keep at most N checkpoints (None = keep all; seed 002)"})
    resume: bool = field(default=True, metadata={"help": "resume an unfinished run found in output_dir from its last valid checkpoint"})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard | wandb"})
    sample_generations: int = field(default=6, metadata={"help": "held-out prompts printed before/after training"})
    max_new_tokens: int = field(default=40, metadata={"help": "generation length for held-out prompts"})
    hourly_price_usd: float = field(default=1.41, metadata={"help": "price per device-hour for the cost estimate (default: seed 002's on-demand 24 GB A10G rate)"})


# ---- fast by default: what packing, checkpointing and batch size this run uses ---------------------
AUTO_TRUE_FALSE = ("auto", "true", "false")
BATCH_OPTIONS = ("per_device_train_batch_size", "gradient_accumulation_steps")


def options_set_by_user(argv: list[str]) -> set[str]:
    """Options given in the --config YAML or as --flags. Only these are "pinned": the memory planner may
    change the micro-batch and accumulation (keeping their product) only when neither is set there."""
    names, config = set(), None
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            if name == "config":
                config = value or (argv[i + 1] if i + 1 < len(argv) else None)
            else:
                names.add(name)
    config = config or default_config_path(Config)  # no --config: parse_config read the recipe's own YAML
    if config:
        import yaml

        names |= set(yaml.safe_load(Path(config).read_text()) or {})
    return names


def memory_budget_bytes(cfg: Config, device: torch.device) -> tuple[int, str]:
    if cfg.memory_budget_gb is not None:
        return int(cfg.memory_budget_gb * GB), "--memory_budget_gb"
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]), "free GPU memory (torch.cuda.mem_get_info)"
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = int(meminfo["MemAvailable"].split()[0]) + int(status["VmRSS"].split()[0])  # the plan counts this process
    return kib * 1024, "MemAvailable (/proc/meminfo) + this process's RSS"


def plan_memory(cfg: Config, device: torch.device, precision: str, optim: str, model_path: str,
                batch_pinned: bool) -> dict:
    """common.memory.recommend for this run. It decides gradient checkpointing when it is auto, and the
    micro-batch / accumulation when the user pinned neither; method, optimizer, LoRA and max_length stay
    as given. With something to decide and nothing that fits, the run stops here, before the model loads."""
    if cfg.gradient_checkpointing not in AUTO_TRUE_FALSE:
        raise checks.CheckFailed(f"--gradient_checkpointing {cfg.gradient_checkpointing!r}: choose auto, true or false")
    budget, source = memory_budget_bytes(cfg, device)
    given = {"gradient_checkpointing": cfg.gradient_checkpointing == "true",
             "per_device_train_batch_size": cfg.per_device_train_batch_size,
             "gradient_accumulation_steps": cfg.gradient_accumulation_steps}
    decides = (["gradient_checkpointing"] if cfg.gradient_checkpointing == "auto" else []) + \
              ([] if batch_pinned else list(BATCH_OPTIONS))
    pinned = ("optim", "method") + (("grad_ckpt",) if cfg.gradient_checkpointing != "auto" else ()) + \
             (("batch_size",) if batch_pinned else ())
    targets = "all-linear" if cfg.lora_target_modules == ["all-linear"] else ",".join(cfg.lora_target_modules)
    settings = Settings(method=cfg.method, lora_r=cfg.lora_r, lora_targets=targets, lora_dropout=cfg.lora_dropout,
                        seq_len=cfg.max_length, batch_size=cfg.per_device_train_batch_size,
                        gradient_accumulation_steps=cfg.gradient_accumulation_steps, optim=optim, dtype=precision,
                        grad_ckpt=given["gradient_checkpointing"], device=device.type)
    out = {"budget_gb": round(budget / GB, 2), "budget_source": source, "decided_by_planner": decides}
    try:
        rec = recommend(model_path, budget, settings, config=load_config(model_path), pinned=pinned)
    except (PlanError, OSError, ValueError) as e:
        log.warning("memory planner cannot plan this run (%s): gradient checkpointing %s, batch as given", e,
                    "off" if cfg.gradient_checkpointing == "auto" else cfg.gradient_checkpointing)
        return {**out, **given, "fits": None, "reason": f"planner error: {e}"}
    if not rec["fits"]:
        if decides:
            raise checks.CheckFailed(f"memory plan: {rec['reason']} (the recipe keeps --method {cfg.method} and "
                                     f"--optim {optim}; --method qlora or --optim adamw_bnb_8bit need less)")
        log.warning("memory plan: %s Running the pinned settings anyway.", rec["reason"])
        return {**out, **given, "fits": False, "reason": rec["reason"]}
    chosen = rec["settings"]
    result = {**out, "fits": True, "gradient_checkpointing": chosen["grad_ckpt"],
              "per_device_train_batch_size": chosen["batch_size"],
              "gradient_accumulation_steps": chosen["gradient_accumulation_steps"],
              "required_gb": round(rec["plan"]["required_bytes"] / GB, 2), "reason": rec["reason"]}
    log.info("memory plan (%s: %.1f GiB; planner decides %s): gradient checkpointing %s, micro-batch %d x %d "
             "accumulation. %s", source, budget / GB, ", ".join(decides) or "nothing, all pinned",
             "on" if result["gradient_checkpointing"] else "off", result["per_device_train_batch_size"],
             result["gradient_accumulation_steps"], rec["reason"])
    return result


PACKING_LEAK_TOLERANCE = 1e-3  # isolated: exactly 0 (tests/test_packing.py); a leak: ~0.3 (tiny) to ~25 (SmolLM2)


def resolve_liger(requested: str, device: torch.device) -> bool:
    """Liger kernels (fused RMSNorm/RoPE/SwiGLU/linear+cross-entropy, Triton) on CUDA when installed."""
    import importlib.util

    if requested not in AUTO_TRUE_FALSE:
        raise checks.CheckFailed(f"--use_liger_kernel {requested!r}: choose auto, true or false")
    if requested == "false":
        return False
    if device.type != "cuda":
        if requested == "true":
            raise checks.CheckFailed("--use_liger_kernel true: Liger's kernels are Triton GPU kernels and need CUDA; "
                                     "use auto or false on CPU")
        log.info("Liger kernels skipped: they need CUDA (this run is on %s)", device.type)
        return False
    if importlib.util.find_spec("liger_kernel") is None:
        if requested == "true":
            raise checks.CheckFailed("--use_liger_kernel true but liger_kernel is not installed (pip install liger-kernel)")
        log.info("liger_kernel is not installed: no Liger kernels (pip install liger-kernel)")
        return False
    log.info("Liger kernels on (liger_kernel installed, CUDA)")
    return True


def packing_supported(attn: str, device: torch.device) -> bool:
    """Attention implementations whose packed-sequence masking is verified: sdpa and eager build a
    block-diagonal mask from restarting position_ids (tests/test_packing.py checks it numerically on CPU),
    flash-attn uses varlen cu_seqlens (CUDA). The run also measures it on its own model before step 1."""
    return attn in ("sdpa", "eager", "sdpa_packed") or (device.type == "cuda" and attn in ("flash_attention_2", "flash_attention_3"))


def resolve_packing(requested: str, attn: str, device: torch.device) -> bool:
    if requested not in AUTO_TRUE_FALSE:
        raise checks.CheckFailed(f"--packing {requested!r}: choose auto, true or false")
    if requested == "false":
        return False
    if packing_supported(attn, device):
        return True
    if requested == "true":
        raise checks.CheckFailed(f"--packing true with attn_implementation {attn} on {device.type}: not verified to keep "
                                 "packed examples apart, so they could attend to each other. Use --attn_implementation "
                                 "sdpa or eager (flash_attention_2 on CUDA), or --packing false")
    log.info("packing auto: %s on %s is not verified to keep packed examples apart; using length-grouped padded "
             "batches", attn, device.type)
    return False


def main(cfg: Config, user_options: set[str] | None = None) -> dict:
    """`user_options`: the options the user set (options_set_by_user); None = treat the batch as pinned."""
    wall_start, started = time.time(), now()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    transformers.logging.set_verbosity_warning()
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)

    # ---- validate everything that needs no model -------------------------------------------------
    if cfg.method not in ("lora", "qlora"):
        raise checks.CheckFailed(f"--method {cfg.method!r}: choose lora or qlora")
    checks.check_world_size(1)  # single-device recipe; launch/multigpu_qlora.sh is the multi-GPU one
    device = checks.resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    train_records, fmt, eval_records, eval_fmt = load_sft_data(cfg.dataset_path, cfg.eval_dataset_path, cfg.dataset_format,
                                                               cfg.eval_split, cfg.seed)
    quantized_on_cpu = cfg.method == "qlora" and device.type == "cpu"
    if quantized_on_cpu and cfg.eval_steps > 0:
        raise checks.CheckFailed("--eval_steps > 0 with QLoRA on CPU: an eval-mode forward repacks bitsandbytes 4-bit "
                                 "weights and later gradients are silently wrong. Use --eval_steps 0 (evaluation runs "
                                 "after training)")
    for name in version_drift():
        log.warning("version drift from requirements.txt: %s", name)

    # ---- tokenizer, template, tokenization -------------------------------------------------------
    model_path = resolve_model_path(cfg.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_items, eval_items = sft_items(train_records, fmt), sft_items(eval_records, eval_fmt)
    if any(messages is not None for _, messages, _ in train_items[:1] + eval_items[:1]):  # chat in either file
        checks.check_chat_template(tokenizer, source=model_path)
    check_control_tokens(train_records, fmt, tokenizer, source=model_path)  # text that would become control tokens
    check_control_tokens(eval_records, eval_fmt, tokenizer, source=model_path)
    train_features, truncation = tokenize_sft(train_items, tokenizer, cfg.max_length)
    truncation.log(cfg.max_length)
    eval_features = tokenize_sft(eval_items, tokenizer, cfg.max_length)[0] if eval_items else []
    collator = CausalLMCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)

    # ---- fast by default: packing, memory plan (checkpointing, micro-batch), kernels ------------------
    attn = pick_attn_implementation(cfg.attn_implementation, device)
    packing = resolve_packing(cfg.packing, attn, device)
    padded_collator = collator
    if packing and (attn == "sdpa_packed" or (attn == "sdpa" and cfg.attn_implementation == "auto")):
        attn = register_packed_attention()  # per-example attention, no [T, T] mask over the row (common/attention.py)
        log.info("attention: %s (sdpa per packed example)", attn)
    elif attn == "sdpa_packed":  # padded batches: sdpa_packed is plain sdpa
        attn = "sdpa"
    allocator_tuned = device.type == "cpu" and tune_cpu_allocator()
    if packing:
        collator = PaddingFreeCollator(flash_attn_kwargs=attn.startswith("flash_attention"))
    optim = cfg.optim
    if device.type == "cpu" and optim.startswith("paged_"):
        optim = optim.replace("paged_", "", 1)
        log.info("paged optimizers page GPU memory to the CPU; on CPU %s runs as %s", cfg.optim, optim)
    batch_pinned = user_options is None or bool(user_options & set(BATCH_OPTIONS))
    memory_plan = plan_memory(cfg, device, precision, optim, model_path, batch_pinned)
    liger = resolve_liger(cfg.use_liger_kernel, device)

    # the output dir is locked only now: a data, template or truncation error above leaves it as it was; the
    # manifest and memory plan are written after the fail-fast checks below, so a failed start leaves no trace
    resume_from = prepare_output_dir(output_dir, asdict(cfg), cfg.resume)
    datasets = [cfg.dataset_path] + ([cfg.eval_dataset_path] if cfg.eval_dataset_path and not cfg.eval_split else [])

    plan_file = output_dir / "memory_plan.json"
    if resume_from and plan_file.is_file():  # a resumed run keeps its batch shape, whatever memory is free now
        memory_plan = {**json.loads(plan_file.read_text()), "resumed": True}
        log.info("resuming: keeping the interrupted run's memory plan (gradient checkpointing %s, micro-batch %d x %d)",
                 memory_plan["gradient_checkpointing"], memory_plan["per_device_train_batch_size"],
                 memory_plan["gradient_accumulation_steps"])
    grad_ckpt = memory_plan["gradient_checkpointing"]
    micro, accum = memory_plan["per_device_train_batch_size"], memory_plan["gradient_accumulation_steps"]

    # ---- model: base (bf16/fp32 or 4-bit) + LoRA + input-grad fix --------------------------------
    memory = PeakMemory(device)
    model = load_base_model(model_path, device, precision, cfg.method == "qlora", attn)
    targets = "all-linear" if cfg.lora_target_modules == ["all-linear"] else cfg.lora_target_modules
    model = attach_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets,
                        quantized=cfg.method == "qlora", gradient_checkpointing=grad_ckpt)
    lora_modules = checks.check_lora_targets(model, targets)
    trainable, total = checks.log_parameter_counts(model)
    checks.check_model_device(model, device)
    guard = checks.Cpu4bitEvalGuard(model) if quantized_on_cpu else None
    leak = None
    if packing and len(train_features) >= 2:  # measured, not assumed: a leak here would corrupt every step
        leak = packed_attention_leak(model, train_features[:2], collator)
        if leak > PACKING_LEAK_TOLERANCE:
            what = (f"packed examples attend to each other with attn_implementation {attn} (the 2nd example's logits "
                    f"moved by {leak:.3g} when the 1st example's tokens changed)")
            if cfg.packing == "true":
                raise checks.CheckFailed(f"{what}. Use --packing false (length-grouped padded batches) or another "
                                         "--attn_implementation")
            log.warning("%s: using length-grouped padded batches instead", what)
            packing, collator = False, padded_collator
        else:
            log.info("packing: padding-free micro-batches; packed examples checked isolated with %s on this model "
                     "(logit change %.3g)", attn, leak)
    batching = "packed" if packing else ("length_grouped" if cfg.group_by_length and micro > 1 else "padded")

    # ---- trainer ---------------------------------------------------------------------------------
    if cfg.save_total_limit:
        log.warning("save_total_limit=%d deletes older checkpoints as new ones are written (seed 002 lost all but "
                    "its first this way); set it only with disk pressure", cfg.save_total_limit)
    args = TrainingArguments(
        output_dir=str(output_dir), seed=cfg.seed, use_cpu=device.type == "cpu",
        bf16=precision == "bf16", fp16=precision == "fp16",
        per_device_train_batch_size=micro, per_device_eval_batch_size=max(8, micro),
        gradient_accumulation_steps=accum, num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, optim=optim,
        logging_steps=cfg.logging_steps, logging_first_step=True, report_to=cfg.report_to,
        eval_strategy="steps" if cfg.eval_steps > 0 and eval_features else "no", eval_steps=cfg.eval_steps or None,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        remove_unused_columns=False, dataloader_num_workers=0, prediction_loss_only=True,
        # packed batches have no padding; "non_padding" would count input_ids != pad_id and miss every EOS
        # token when pad == EOS (SmolLM2)
        include_num_input_tokens_seen="all" if packing else "non_padding",
        train_sampling_strategy="group_by_length" if batching == "length_grouped" else "random",
        use_liger_kernel=liger,
    )
    preempted = SaveOnSignal()  # SIGTERM/SIGINT: save after this step, stop, exit 75 (rerun resumes)
    # figures of the segments before a resume travel in the checkpoints: metrics.json covers the whole run
    segments = RunSegments(resume_from, counters=("trained_tokens", "trained_labelled_tokens", "trained_positions"))
    keep_tracking_in_run_dir(output_dir, cfg.report_to)  # tensorboard/mlflow/trackio files inside the run
    trainer = TokenCountingTrainer(model=model, args=args, train_dataset=train_features, eval_dataset=eval_features or None,
                         data_collator=collator, processing_class=tokenizer,
                         callbacks=[CheckpointValidator(segments=segments), preempted, NonFiniteGuard()])
    segments.bind(trainer)
    trainer.labelled_logits_only = cfg.labelled_logits_only
    if cfg.profile_steps > 0:
        trainer.add_callback(StepProfiler(cfg.profile_steps, output_dir / "profile.txt"))
    world = args.world_size
    log.info("effective batch = %d per device x %d accumulation x %d devices = %d sequences per optimizer step; "
             "batching: %s", micro, accum, world, micro * accum * world, batching)

    # ---- fail-fast checks on one real batch ------------------------------------------------------
    first = train_features[:micro]
    checks.check_labels(padded_collator(first), tokenizer.eos_token_id, tokenizer.pad_token_id)  # per example
    # run like a training step (its autocast, no peft input cast, LM head on labelled positions), so the check
    # needs no more memory than the steps do (common.memory plans it that way)
    check_batch = {k: v for k, v in collator(first).items() if torch.is_tensor(v)}
    if cfg.labelled_logits_only and accepts_logits_to_keep(model):
        check_batch = labelled_logits_inputs(check_batch)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"), \
            disable_input_dtype_casting(model, active=precision == "bf16"):
        checks.check_gradient_flow(model, check_batch)
    write_manifest(output_dir, cfg, datasets, started, "running")
    if not memory_plan.get("resumed"):
        write_json(plan_file, memory_plan)

    # ---- before: held-out loss, generations, keyword accuracy ------------------------------------
    probe = [r for r in eval_records if r.data.get("keywords")] if eval_fmt == "chat" else []
    probe_convs = [r.data["messages"][:-1] for r in probe]
    before_file = output_dir / "before.json"
    if resume_from and before_file.is_file():
        before = json.loads(before_file.read_text())
    elif quantized_on_cpu:
        log.info("QLoRA on CPU: no evaluation or generation before training (an eval-mode forward would repack the "
                 "4-bit weights and corrupt later gradients); both run after training")
        before = {}
    else:
        before = {"eval_loss": trainer.evaluate()["eval_loss"] if eval_features else None}
        if probe:
            before["replies"] = generate_replies(model, tokenizer, probe_convs, cfg.max_new_tokens)
            before["keyword_accuracy"] = keyword_accuracy(before["replies"], [r.data["keywords"] for r in probe])
        write_json(before_file, before)

    # ---- train -----------------------------------------------------------------------------------
    cpu_start = time.process_time()  # CPU seconds of this process (all threads): robust on a shared machine
    with explain_disk_full(output_dir, trainer):
        train_result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_cpu_seconds = time.process_time() - cpu_start
    if preempted.received:
        log.warning("stopped by a signal at step %d; checkpoint saved. Rerun the same command to resume "
                    "(exit code %d)", trainer.state.global_step, REQUEUE_EXIT_CODE)
        sys.exit(REQUEUE_EXIT_CODE)
    if guard:
        guard.remove()
        checks.check_4bit_weights_unpacked(model)
    whole = segments.finish(train_result)  # every segment of the run, not only this process's
    trained_tokens, labelled_tokens = whole["trained_tokens"], whole["trained_labelled_tokens"]
    positions = whole["trained_positions"]

    # ---- after: evaluate, generate, save ---------------------------------------------------------
    after = {"eval_loss": trainer.evaluate()["eval_loss"] if eval_features else None}
    if probe:
        after["replies"] = generate_replies(model, tokenizer, probe_convs, cfg.max_new_tokens)
        after["keyword_accuracy"] = keyword_accuracy(after["replies"], [r.data["keywords"] for r in probe])
    adapter_dir = output_dir / "adapter"
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)

    if probe:
        shown = min(cfg.sample_generations, len(probe))
        print("\n=== held-out prompts: before -> after training ===")
        for i in range(shown):
            print(f"Q: {probe_convs[i][-1]['content']}")
            print(f"  before: {before.get('replies', ['(not run: QLoRA on CPU)'] * len(probe))[i]}")
            print(f"  after:  {after['replies'][i]}")
        write_json(output_dir / "generations.json", {
            "prompts": [c[-1]["content"] for c in probe_convs], "keywords": [r.data["keywords"] for r in probe],
            "before": before.get("replies"), "after": after["replies"]})

    # ---- metrics, manifest, plot -----------------------------------------------------------------
    train_seconds = whole["train_seconds"]
    train_cpu_seconds = whole["train_cpu_seconds"]
    wall = time.time() - wall_start
    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    metrics = {
        "recipe": RECIPE, "method": cfg.method, "model": model_path, "device": device_name(device),
        "device_type": device.type, "world_size": world, "precision": precision,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "mean_train_loss": whole["mean_train_loss"],
        "eval_loss_before": before.get("eval_loss"), "eval_loss_after": after["eval_loss"],
        "keyword_accuracy_before": before.get("keyword_accuracy"), "keyword_accuracy_after": after.get("keyword_accuracy"),
        "heldout_probes": len(probe),
        "optimizer_steps": trainer.state.global_step, "trained_tokens": trained_tokens,
        "trained_labelled_tokens": labelled_tokens, "num_input_tokens_seen": trainer.state.num_input_tokens_seen,
        "train_seconds": round(train_seconds, 2), "wall_seconds": round(wall, 2),
        "tokens_per_second": round(trained_tokens / train_seconds, 2),
        "labelled_tokens_per_second": round(labelled_tokens / train_seconds, 2),
        "train_cpu_seconds": round(train_cpu_seconds, 2),
        "tokens_per_cpu_second": round(trained_tokens / train_cpu_seconds, 2) if train_cpu_seconds else None,
        "trainable_params": trainable, "total_params": total, "lora_modules": lora_modules,
        "effective_batch_size": micro * accum * world,
        "per_device_train_batch_size": micro, "gradient_accumulation_steps": accum,
        "batching": batching, "padding_fraction": round(1 - trained_tokens / positions, 4) if positions else None,
        "trained_positions": positions, "packing_leak": leak, "attn_implementation": attn,
        "gradient_checkpointing": grad_ckpt, "liger_kernel": liger, "memory_plan": memory_plan,
        "labelled_logits_only": bool(trainer.labelled_logits_only and not liger and accepts_logits_to_keep(model)),
        "allocator_tuned": allocator_tuned,
        "segments": whole["segments"], "segments_complete": whole["segments_complete"],
        "truncation": truncation.as_dict(), "optimizer": optim,
        **memory.report(), **estimated_cost(wall, cfg.hourly_price_usd, world),
    }
    for key in ("eval_loss_before", "eval_loss_after"):
        if metrics[key] is not None:
            metrics[key.replace("loss", "perplexity")] = round(math.exp(metrics[key]), 4)
    plot_loss(history, output_dir / "loss.png", f"sft_memory_diet {cfg.method} on {Path(model_path).name}")
    write_json(output_dir / "metrics.json", metrics)
    write_manifest(output_dir, cfg, datasets, started, "finished", {"resumed_from": str(resume_from) if resume_from else None})
    log.info("done: %s", json.dumps({k: metrics[k] for k in ("final_train_loss", "eval_loss_before", "eval_loss_after",
                                                              "keyword_accuracy_before", "keyword_accuracy_after",
                                                              "tokens_per_second", "padding_fraction", "batching",
                                                              "peak_memory_bytes", "wall_seconds")}))
    return metrics


if __name__ == "__main__":
    config = parse_config(Config)
    try:
        main(config, options_set_by_user(sys.argv[1:]))
    except (checks.CheckFailed, DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
