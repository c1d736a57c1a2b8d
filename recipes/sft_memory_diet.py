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
from peft.helpers import disable_input_dtype_casting  # noqa: E402
from transformers import AutoTokenizer, TrainingArguments  # noqa: E402

from common import checks  # noqa: E402
from common.assets import resolve_model_path  # noqa: E402
from common.attention import register as register_packed_attention  # noqa: E402
from common.collator import CausalLMCollator, PaddingFreeCollator, packed_attention_leak, tokenize_sft  # noqa: E402
from common.config import options_set_by_user, parse_config  # noqa: E402
from common.data import check_control_tokens, load_sft_data, sft_items  # noqa: E402
from common.evaluation import generate_replies, keyword_accuracy  # noqa: E402
from common.fast_path import (BATCH_OPTIONS, PACKING_LEAK_TOLERANCE, plan_memory, resolve_liger,  # noqa: E402
                              resolve_packing)
from common.models import LoraOptions, attach_lora, load_base_model, pick_attn_implementation, tune_cpu_allocator  # noqa: E402
from common.run import RUN_ERRORS, Run, RunOptions  # noqa: E402
from common.run_files import write_json  # noqa: E402
from common.trainer import StepProfiler, TokenCountingTrainer, accepts_logits_to_keep, labelled_logits_inputs  # noqa: E402

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
    labelled_logits_only: bool = field(default=True, metadata={"help": "LM head and loss only where a label follows (same loss, less work)"})
    profile_steps: int = field(default=0, metadata={"help": "N > 0: torch.profiler over optimizer steps 2..N+1 into <output_dir>/profile.txt"})
    sample_generations: int = field(default=6, metadata={"help": "held-out prompts printed before/after training"})
    max_new_tokens: int = field(default=40, metadata={"help": "generation length for held-out prompts"})


def validate(cfg: Config, args: TrainingArguments, device: torch.device) -> None:
    """Everything that needs no model, each with the option to change."""
    if cfg.method not in ("lora", "qlora"):
        raise checks.CheckFailed(f"--method {cfg.method!r}: choose lora or qlora")
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
    attn = pick_attn_implementation(cfg.attn_implementation, device)
    packing = resolve_packing(cfg.packing, attn, device)
    padded_collator = collator = CausalLMCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)
    if packing and (attn == "sdpa_packed" or (attn == "sdpa" and cfg.attn_implementation == "auto")):
        attn = register_packed_attention()  # per-example attention, no [T, T] mask over the row
    elif attn == "sdpa_packed":
        attn = "sdpa"
    allocator_tuned = device.type == "cpu" and tune_cpu_allocator()
    if packing:
        collator = PaddingFreeCollator(flash_attn_kwargs=attn.startswith("flash_attention"))
    optim = requested_optim = str(getattr(args.optim, "value", args.optim))
    if device.type == "cpu" and optim.startswith("paged_"):
        optim = optim.replace("paged_", "", 1)
        run.log.info("paged optimizers page GPU memory to the CPU; on CPU %s runs as %s", requested_optim, optim)
    batch_pinned = user_options is None or bool(user_options & set(BATCH_OPTIONS))
    plan = plan_memory(cfg, device, precision, optim, model_path, batch_pinned,
                       args.per_device_train_batch_size, args.gradient_accumulation_steps)
    liger = resolve_liger(cfg.use_liger_kernel, device)

    # the run directory is locked only now: a data, template or plan error above leaves it as it was
    resume_from = run.open()
    plan_file = run.output_dir / "memory_plan.json"
    if resume_from and plan_file.is_file():  # a resumed run keeps its batch shape, whatever memory is free now
        plan = {**json.loads(plan_file.read_text()), "resumed": True}
        run.log.info("resuming with the interrupted run's memory plan (micro-batch %d x %d)",
                     plan["per_device_train_batch_size"], plan["gradient_accumulation_steps"])
    grad_ckpt, micro, accum = (plan[k] for k in ("gradient_checkpointing", "per_device_train_batch_size",
                                                 "gradient_accumulation_steps"))

    # ---- model: base (bf16/fp32 or 4-bit) + LoRA + input-grad fix ----------------------------------
    run.measure_memory()
    model = load_base_model(model_path, device, precision, cfg.method == "qlora", attn)
    model = attach_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets,
                        quantized=cfg.method == "qlora", gradient_checkpointing=grad_ckpt)
    lora_modules = checks.check_lora_targets(model, cfg.lora_targets)
    trainable, total = checks.log_parameter_counts(model)
    checks.check_model_device(model, device)
    guard = checks.Cpu4bitEvalGuard(model) if quantized_on_cpu else None
    leak = None
    if packing and len(train_features) >= 2:  # measured, not assumed: a leak would corrupt every step
        leak = packed_attention_leak(model, train_features[:2], collator)
        if leak > PACKING_LEAK_TOLERANCE:
            what = (f"packed examples attend to each other with attn_implementation {attn} (the 2nd example's logits "
                    f"moved by {leak:.3g} when the 1st example's tokens changed)")
            if cfg.packing == "true":
                raise checks.CheckFailed(f"{what}. Use --packing false (length-grouped padded batches) or another "
                                         "--attn_implementation")
            run.log.warning("%s: using length-grouped padded batches instead", what)
            packing, collator = False, padded_collator
        else:
            run.log.info("packing: padding-free micro-batches, checked isolated with %s (logit change %.3g)", attn, leak)
    grouped = args.train_sampling_strategy == "group_by_length" and micro > 1
    batching = "packed" if packing else ("length_grouped" if grouped else "padded")

    # ---- trainer -----------------------------------------------------------------------------------
    args = run.library_args(
        args, per_device_train_batch_size=micro, gradient_accumulation_steps=accum, optim=optim,
        use_liger_kernel=liger, remove_unused_columns=False, prediction_loss_only=True,
        per_device_eval_batch_size=max(args.per_device_eval_batch_size, micro),
        eval_strategy=args.eval_strategy if eval_features else "no",
        # packed batches have no padding; "non_padding" would miss every EOS when pad == EOS (SmolLM2)
        include_num_input_tokens_seen="all" if packing else "non_padding",
        train_sampling_strategy="group_by_length" if batching == "length_grouped" else "random")
    trainer = TokenCountingTrainer(model=model, args=args, train_dataset=train_features,
                                   eval_dataset=eval_features or None, data_collator=collator, processing_class=tokenizer,
                                   callbacks=run.callbacks(("trained_tokens", "trained_labelled_tokens", "trained_positions")))
    run.bind(trainer)
    trainer.labelled_logits_only = cfg.labelled_logits_only
    if cfg.profile_steps > 0:
        trainer.add_callback(StepProfiler(cfg.profile_steps, run.output_dir / "profile.txt"))
    run.log.info("effective batch = %d per device x %d accumulation = %d sequences per optimizer step; batching: %s",
                 micro, accum, micro * accum, batching)

    # ---- fail-fast checks on one real batch, run like a training step ------------------------------
    first = train_features[:micro]
    checks.check_labels(padded_collator(first), tokenizer.eos_token_id, tokenizer.pad_token_id)
    check_batch = {k: v for k, v in collator(first).items() if torch.is_tensor(v)}
    if cfg.labelled_logits_only and accepts_logits_to_keep(model):
        check_batch = labelled_logits_inputs(check_batch)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"), \
            disable_input_dtype_casting(model, active=precision == "bf16"):
        checks.check_gradient_flow(model, check_batch)
    run.started()
    if not plan.get("resumed"):
        write_json(plan_file, plan)

    # ---- before: held-out loss, generations, keyword accuracy --------------------------------------
    probe = [r for r in eval_records if r.data.get("keywords")] if eval_fmt == "chat" else []
    probe_convs, probe_keywords = [r.data["messages"][:-1] for r in probe], [r.data["keywords"] for r in probe]

    def scores() -> dict:
        out = {"eval_loss": trainer.evaluate()["eval_loss"] if eval_features else None}
        if probe:
            out["replies"] = generate_replies(model, tokenizer, probe_convs, cfg.max_new_tokens)
            out["keyword_accuracy"] = keyword_accuracy(out["replies"], probe_keywords)
        return out

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
    if guard:
        guard.remove()
        checks.check_4bit_weights_unpacked(model)

    # ---- after: evaluate, generate, save -------------------------------------------------------------
    after = scores()
    model.save_pretrained(run.output_dir / "adapter")
    tokenizer.save_pretrained(run.output_dir / "adapter")
    if probe:
        print("\n=== held-out prompts: before -> after training ===")
        for i in range(min(cfg.sample_generations, len(probe))):
            print(f"Q: {probe_convs[i][-1]['content']}")
            print(f"  before: {before.get('replies', ['(not run: QLoRA on CPU)'] * len(probe))[i]}")
            print(f"  after:  {after['replies'][i]}")
        write_json(run.output_dir / "generations.json", {
            "prompts": [c[-1]["content"] for c in probe_convs], "keywords": probe_keywords,
            "before": before.get("replies"), "after": after["replies"]})

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
        "packing_leak": leak, "attn_implementation": attn, "gradient_checkpointing": grad_ckpt, "liger_kernel": liger,
        "memory_plan": plan, "allocator_tuned": allocator_tuned, "truncation": truncation.as_dict(), "optimizer": optim,
        "labelled_logits_only": bool(trainer.labelled_logits_only and not liger and accepts_logits_to_keep(model)),
    }
    for key in ("eval_loss_before", "eval_loss_after"):
        if metrics[key] is not None:
            metrics[key.replace("loss", "perplexity")] = round(math.exp(metrics[key]), 4)
    return run.finish(trainer, whole, metrics, f"{RECIPE} {cfg.method} on {Path(model_path).name}", headline=(
        "final_train_loss", "eval_loss_before", "eval_loss_after", "keyword_accuracy_before", "keyword_accuracy_after",
        "tokens_per_second", "padding_fraction", "batching", "peak_memory_bytes", "wall_seconds"))


CONFIGS = (Config, TrainingArguments)

if __name__ == "__main__":
    cfg, args = parse_config(CONFIGS)
    try:
        main(cfg, args, options_set_by_user(CONFIGS))
    except RUN_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
