"""Single-device LoRA / QLoRA SFT on a memory diet.

What it is for: fine-tune a chat model on one GPU (or the CPU) when memory is tight: micro-batch +
gradient accumulation, a shorter max_length, non-reentrant gradient checkpointing, fewer LoRA targets,
bf16 where the hardware has it, 8-bit/paged optimizers, 4-bit base weights (QLoRA), and checkpoints that
are validated and never deleted by default. Fast by default: padding-free packed batches where attention
keeps examples apart (checked on this model before step 1), checkpointing only when the memory planner
says the run does not fit, Liger kernels on CUDA when installed (common/fast_path.py).

Run (the quickstart: SmolLM2-135M-Instruct learns the "Orrin" persona):
    bash launch/memory_diet.sh
    python recipes/sft_memory_diet.py --config recipes/configs/sft_memory_diet.yaml [--key value ...]

Options: this file's Config plus transformers' TrainingArguments (`--help` lists both); figures: docs/quickstart.md.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

import common  # noqa: E402,F401  (first: its logging filter must precede transformers' bitsandbytes import)
import torch  # noqa: E402
from transformers import AutoTokenizer, TrainingArguments  # noqa: E402

from common import checks  # noqa: E402
from common.assets import resolve_model_path  # noqa: E402
from common.collator import tokenize_sft  # noqa: E402
from common.compile import plan_compile  # noqa: E402
from common.data import check_control_tokens, load_sft_data, sft_items  # noqa: E402
from common.fast_path import BATCH_OPTIONS, choose_fast_path  # noqa: E402
from common.models import LoraOptions, attach_lora, load_base_model, save_adapter  # noqa: E402
from common.moe import RouterRecorder  # noqa: E402
from common.probes import KeywordProbe  # noqa: E402
from common.run import Run, RunOptions, run_recipe  # noqa: E402
from common.run_files import write_json  # noqa: E402
from common.trainer import StepProfiler, TokenCountingTrainer, accepts_logits_to_keep  # noqa: E402
from harnesses.pruning import report_to_sweep_trial  # noqa: E402  (optuna is imported only in a sweep trial)

RECIPE = Path(__file__).stem  # a copy writes runs/<its name> and "recipe": "<its name>"
log = logging.getLogger(RECIPE)


@dataclass
class Config(RunOptions, LoraOptions):
    dataset_path: str = field(default="data/persona/train.jsonl", metadata={"help": "training data: .jsonl/.json/.csv/.parquet/ShareGPT/saved HF dataset (chat, instruction or completion format)"})
    eval_dataset_path: str | None = field(default="data/persona/heldout.jsonl", metadata={"help": "held-out data; records with `keywords` also give keyword accuracy"})
    dataset_format: str = field(default="auto", metadata={"help": "auto | chat | instruction | completion: the training file's format (the eval file's is detected on its own)"})
    eval_split: float = field(default=0.0, metadata={"help": "0 < x < 1: hold out this fraction of the training file (seeded by --seed) instead of --eval_dataset_path; 0 = no split"})
    method: str = field(default="lora", metadata={"help": "lora | qlora (4-bit NF4 base via bitsandbytes)"})
    max_length: int = field(default=256, metadata={"help": "tokens per example; longer ones are truncated and reported"})
    gradient_checkpointing: str = field(default="auto", metadata={"help": "auto | true | false: recompute activations in backward (non-reentrant; ~20-40%% slower). auto: only when the planner says the run does not fit --memory_budget_gb"})
    memory_budget_gb: float | None = field(default=None, metadata={"help": "memory the run may use, GiB (default: free GPU memory on CUDA; MemAvailable + this process on CPU)"})
    packing: str = field(default="auto", metadata={"help": "auto | true | false: padding-free batches (position_ids restart per example). auto: where attention keeps packed examples apart"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto | sdpa | sdpa_packed | eager | flash_attention_2"})
    use_liger_kernel: str = field(default="auto", metadata={"help": "auto | true | false: Liger's fused Triton kernels (CUDA only)"})
    torch_compile: str = field(default="auto", metadata={"help": "auto | true | false: inductor on each decoder layer. auto: when the planned steps pay for the compile (common/compile.py)"})
    labelled_logits_only: bool = field(default=True, metadata={"help": "LM head and loss only where a label follows (same loss, less work)"})
    profile_steps: int = field(default=0, metadata={"help": "N > 0: torch.profiler over optimizer steps 2..N+1 into <output_dir>/profile.txt"})
    sample_generations: int = field(default=6, metadata={"help": "held-out prompts printed before/after training"})
    max_new_tokens: int = field(default=40, metadata={"help": "generation length for held-out prompts"})


def validate(cfg: Config, args: TrainingArguments, device: torch.device) -> None:
    """Everything that needs no model, each with the option to change."""
    if cfg.method not in ("lora", "qlora"):
        raise checks.CheckFailed(f"--method {cfg.method!r}: choose lora or qlora")
    cfg.check_lora_variants(quantized=cfg.method == "qlora")  # DoRA, rsLoRA, PiSSA/OLoRA init, LoRA+
    checks.check_world_size(1)  # single-device recipe; launch/multigpu_qlora.sh is the multi-GPU one
    if cfg.method == "qlora" and device.type == "cpu" and args.eval_strategy != "no":
        raise checks.CheckFailed("--eval_steps > 0 with QLoRA on CPU: an eval-mode forward repacks bitsandbytes 4-bit "
                                 "weights and later gradients are silently wrong. Use --eval_steps 0 (evaluation runs "
                                 "after training)")
    if args.save_total_limit:
        log.warning("save_total_limit=%d deletes older checkpoints as new ones are written; set it only under "
                        "disk pressure", args.save_total_limit)


def main(cfg: Config, args: TrainingArguments, user_options: set[str] | None = None) -> dict:
    """`user_options`: the options the user set (options_set_by_user); None = treat the batch as pinned."""
    if args.eval_steps and args.eval_strategy == "no":  # --eval_steps N alone means "evaluate every N steps"
        args = dataclasses.replace(args, eval_strategy="steps")
    run = Run(RECIPE, cfg, args, datasets=[cfg.dataset_path] + ([cfg.eval_dataset_path] if not cfg.eval_split else []))
    validate(cfg, args, run.device)
    device, precision = run.device, run.precision
    train_records, fmt, eval_records, eval_fmt = load_sft_data(cfg.dataset_path, cfg.eval_dataset_path,
                                                               cfg.dataset_format, cfg.eval_split, args.seed)
    quantized_on_cpu = cfg.method == "qlora" and device.type == "cpu"

    # ---- tokenizer, template, tokenization -----------------------------------------------------------
    model_path = resolve_model_path(cfg.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_items, eval_items = sft_items(train_records, fmt), sft_items(eval_records, eval_fmt)
    if any(messages is not None for _, messages, _ in train_items[:1] + eval_items[:1]):
        checks.check_chat_template(tokenizer, source=model_path)
    check_control_tokens(train_records, fmt, tokenizer, source=model_path)
    check_control_tokens(eval_records, eval_fmt, tokenizer, source=model_path)
    train_features, truncation = tokenize_sft(train_items, tokenizer, cfg.max_length)
    truncation.log(cfg.max_length)
    eval_features = tokenize_sft(eval_items, tokenizer, cfg.max_length)[0] if eval_items else []

    # ---- fast by default: packing, memory plan (checkpointing, micro-batch), kernels ----------------
    batch_pinned = user_options is None or bool(user_options & set(BATCH_OPTIONS))
    fast = choose_fast_path(cfg, args, device, precision, model_path, tokenizer.pad_token_id, batch_pinned)
    compiler = plan_compile(cfg.torch_compile, args, device, cfg.method == "qlora", model_path)  # decided in training

    # the run directory is locked only now: a data, template or plan error above leaves it as it was
    resume_from = run.open()
    plan_file = run.output_dir / "memory_plan.json"
    fast.keep_plan_on_resume(plan_file, resume_from)

    # ---- model: base (bf16/fp32 or 4-bit) + LoRA + input-grad fix ----------------------------------
    run.measure_memory()
    model = load_base_model(model_path, device, precision, cfg.method == "qlora", fast.attn)
    model = attach_lora(model, cfg, quantized=cfg.method == "qlora", gradient_checkpointing=fast.gradient_checkpointing,
                        checkpoint_every_n_layers=fast.checkpoint_every_n_layers)
    lora_modules = checks.check_lora_targets(model, cfg.lora_targets, cfg.lora_train_router)  # MoE: experts, router
    trainable, total = checks.log_parameter_counts(model)
    checks.check_model_device(model, device)
    guard = checks.Cpu4bitEvalGuard(model) if quantized_on_cpu else None
    fast.check_packing(model, train_features, cfg.packing)
    micro, accum, batching = fast.micro_batch, fast.accumulation, fast.batching(args.train_sampling_strategy)

    # ---- trainer -----------------------------------------------------------------------------------
    args = run.library_args(
        args, per_device_train_batch_size=micro, gradient_accumulation_steps=accum, optim=fast.optim,
        use_liger_kernel=fast.liger, remove_unused_columns=False, prediction_loss_only=True, **compiler.library_args,
        per_device_eval_batch_size=max(args.per_device_eval_batch_size, micro),
        eval_strategy=args.eval_strategy if eval_features else "no",
        # packed batches have no padding; "non_padding" would miss every EOS when pad == EOS (SmolLM2)
        include_num_input_tokens_seen="all" if fast.packing else "non_padding",
        train_sampling_strategy="group_by_length" if batching == "length_grouped" else "random")
    trainer = TokenCountingTrainer(model=model, args=args, train_dataset=train_features,
                                   eval_dataset=eval_features or None, data_collator=fast.collator,
                                   processing_class=tokenizer, callbacks=[compiler, *run.callbacks(
                                       ("trained_tokens", "trained_labelled_tokens", "trained_positions"))])
    run.bind(trainer)
    report_to_sweep_trial(trainer)  # a trial of harnesses/sweep.py: eval_loss to its Optuna trial, stop if pruned
    trainer.labelled_logits_only = cfg.labelled_logits_only
    trainer.loraplus_lr_ratio = cfg.loraplus_lr_ratio  # > 0: LoRA+ optimizer (lora_B at ratio x lr) of --optim's class
    if cfg.profile_steps > 0:
        trainer.add_callback(StepProfiler(cfg.profile_steps, run.output_dir / "profile.txt"))
    run.log.info("effective batch = %d per device x %d accumulation = %d sequences per optimizer step; batching: %s",
                 micro, accum, micro * accum, batching)

    # ---- fail-fast checks on one real batch, run like a training step ------------------------------
    checks.check_first_batch(model, train_features[:micro], fast.collator, fast.padded_collator, tokenizer, device,
                             precision, cfg.labelled_logits_only)
    router = RouterRecorder(model)  # MoE: router aux loss and expert load over the training passes
    run.started()
    if not fast.plan.get("resumed"):
        write_json(plan_file, fast.plan)

    # ---- before: held-out loss, generations, keyword accuracy --------------------------------------
    probe = KeywordProbe(eval_records, eval_fmt, cfg.max_new_tokens)

    def scores() -> dict:
        return {"eval_loss": trainer.evaluate()["eval_loss"] if eval_features else None, **probe.score(model, tokenizer)}

    before_file = run.output_dir / "before.json"
    if resume_from and before_file.is_file():
        before = json.loads(before_file.read_text())
    elif quantized_on_cpu:
        run.log.info("QLoRA on CPU: no evaluation or generation before training (an eval-mode forward would repack "
                     "the 4-bit weights and corrupt later gradients); both run after training")
        before = {}
    else:
        before = scores()
        write_json(before_file, before)

    # ---- train ---------------------------------------------------------------------------------------
    whole = run.train(trainer)
    router.remove()
    if guard:
        guard.remove()
        checks.check_4bit_weights_unpacked(model)

    # ---- after: evaluate, generate, save -------------------------------------------------------------
    after = scores()
    save_adapter(model, run.output_dir / "adapter")  # PiSSA/OLoRA: as the plain LoRA that works on the stock base
    tokenizer.save_pretrained(run.output_dir / "adapter")
    probe.report(before, after, cfg.sample_generations, run.output_dir / "generations.json")

    # ---- metrics.json, manifest, loss.png ------------------------------------------------------------
    tokens, labelled, positions = (whole[k] for k in ("trained_tokens", "trained_labelled_tokens", "trained_positions"))
    seconds, cpu_seconds = whole["train_seconds"], whole["train_cpu_seconds"]
    metrics = {
        "method": cfg.method, "model": model_path,
        "eval_loss_before": before.get("eval_loss"), "eval_loss_after": after["eval_loss"],
        "keyword_accuracy_before": before.get("keyword_accuracy"), "keyword_accuracy_after": after.get("keyword_accuracy"),
        "heldout_probes": len(probe), "trained_labelled_tokens": labelled,
        "num_input_tokens_seen": trainer.state.num_input_tokens_seen,
        "labelled_tokens_per_second": round(labelled / seconds, 2),
        "tokens_per_cpu_second": round(tokens / cpu_seconds, 2) if cpu_seconds else None,
        "trainable_params": trainable, "total_params": total, "lora_modules": lora_modules,
        "effective_batch_size": micro * accum, "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": accum, "batching": batching, "trained_positions": positions,
        "padding_fraction": round(1 - tokens / positions, 4) if positions else None,
        "packing_leak": fast.leak, "attn_implementation": fast.attn,
        "gradient_checkpointing": fast.gradient_checkpointing, "liger_kernel": fast.liger,
        "memory_plan": fast.plan, "allocator_tuned": fast.allocator_tuned, "truncation": truncation.as_dict(),
        "optimizer": fast.optim, **({"moe": router.metrics()} if router.layout else {}),
        "torch_compile": compiler.report(), "lora_fast": getattr(model, "lora_fast", None),
        "labelled_logits_only": bool(trainer.labelled_logits_only and not fast.liger and accepts_logits_to_keep(model)),
    }
    for key in ("eval_loss_before", "eval_loss_after"):
        if metrics[key] is not None:
            metrics[key.replace("loss", "perplexity")] = round(math.exp(metrics[key]), 4)
    return run.finish(trainer, whole, metrics, f"{RECIPE} {cfg.method} on {Path(model_path).name}", headline=(
        "final_train_loss", "eval_loss_before", "eval_loss_after", "keyword_accuracy_before", "keyword_accuracy_after",
        "tokens_per_second", "padding_fraction", "batching", "peak_memory_bytes", "wall_seconds"))


CONFIGS = (Config, TrainingArguments)

if __name__ == "__main__":
    run_recipe(main, CONFIGS)
