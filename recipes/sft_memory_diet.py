"""Single-device LoRA / QLoRA SFT on a memory diet.

What it is for: fine-tune a chat model on one GPU (or the CPU) when memory is tight, with every
knob from the seeds' memory diets in one place: batch 1 + gradient accumulation, a shorter
max_length, non-reentrant gradient checkpointing, fewer LoRA target modules, bf16 where the
hardware has it, 8-bit/paged optimizers, 4-bit base weights (QLoRA), and a checkpoint policy
that never deletes the only good checkpoint. Fail-fast checks run before step 1.

Run (the README quickstart; SmolLM2-135M-Instruct learns the "Orrin" persona):
    bash launch/memory_diet.sh
    python recipes/sft_memory_diet.py --config recipes/configs/sft_memory_diet.yaml [--key value ...]

Measured here: see the "Quickstart" table in README.md (the command there reproduces it).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer, TrainingArguments, set_seed  # noqa: E402

from common import checks  # noqa: E402
from common.assets import resolve_model_path  # noqa: E402
from common.checkpoints import (REQUEUE_EXIT_CODE, CheckpointValidator, OutputDirError, SaveOnSignal,  # noqa: E402
                                prepare_output_dir)
from common.collator import CausalLMCollator, tokenize_sft  # noqa: E402
from common.config import parse_config  # noqa: E402
from common.data import DataError, load_dataset_file, to_messages  # noqa: E402
from common.evaluation import generate_replies, keyword_accuracy  # noqa: E402
from common.models import attach_lora, load_base_model, pick_attn_implementation, resolve_precision  # noqa: E402
from common.trainer import TokenCountingTrainer  # noqa: E402
from common.run_files import (PeakMemory, device_name, estimated_cost, now, plot_loss, version_drift,  # noqa: E402
                              write_json, write_manifest)

log = logging.getLogger("sft_memory_diet")


@dataclass
class Config:
    model_name_or_path: str = field(default="asset:smollm2", metadata={"help": "hub id, local dir, or asset:tiny / asset:smollm2 (built offline)"})
    dataset_path: str = field(default="data/persona/train.jsonl", metadata={"help": "training data: .jsonl/.json/.csv/ShareGPT/saved HF dataset (chat, instruction or completion format)"})
    eval_dataset_path: str | None = field(default="data/persona/heldout.jsonl", metadata={"help": "held-out data; records with `keywords` also give keyword accuracy"})
    dataset_format: str = field(default="auto", metadata={"help": "auto | chat | instruction | completion"})
    output_dir: str = field(default="runs/sft_memory_diet", metadata={"help": "run directory (metrics.json, manifest.json, loss.png, adapter, checkpoints)"})
    method: str = field(default="lora", metadata={"help": "lora | qlora (4-bit NF4 base via bitsandbytes)"})
    device: str = field(default="auto", metadata={"help": "auto | cuda | cpu"})
    precision: str = field(default="auto", metadata={"help": "auto | bf16 | fp16 | fp32 (auto: bf16 where the hardware has it, else fp32 on CPU / fp16 on old GPUs)"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto | sdpa | eager | flash_attention_2 (auto: flash-attn on CUDA when installed)"})
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
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations in backward (non-reentrant): less memory, ~20-40%% slower"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
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


def sft_items(records, fmt):
    return [(f"{r.path}:{r.line}", to_messages(r.data, fmt), r.data) for r in records]


def main(cfg: Config) -> dict:
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
    train_records, fmt = load_dataset_file(cfg.dataset_path, cfg.dataset_format)
    eval_records = load_dataset_file(cfg.eval_dataset_path, cfg.dataset_format)[0] if cfg.eval_dataset_path else []
    if fmt not in ("chat", "instruction", "completion"):
        raise checks.CheckFailed(f"{cfg.dataset_path}: format {fmt!r} is not SFT data; use chat, instruction or completion")
    quantized_on_cpu = cfg.method == "qlora" and device.type == "cpu"
    if quantized_on_cpu and cfg.eval_steps > 0:
        raise checks.CheckFailed("--eval_steps > 0 with QLoRA on CPU: an eval-mode forward repacks bitsandbytes 4-bit "
                                 "weights and later gradients are silently wrong. Use --eval_steps 0 (evaluation runs "
                                 "after training)")
    for name in version_drift():
        log.warning("version drift from requirements.txt: %s", name)
    resume_from = prepare_output_dir(output_dir, asdict(cfg), cfg.resume)
    datasets = [cfg.dataset_path] + ([cfg.eval_dataset_path] if cfg.eval_dataset_path else [])
    write_manifest(output_dir, cfg, datasets, started, "running")

    # ---- tokenizer, template, tokenization -------------------------------------------------------
    model_path = resolve_model_path(cfg.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if fmt != "completion" or to_messages(train_records[0].data, fmt) is not None:
        checks.check_chat_template(tokenizer, source=model_path)
    train_features, truncation = tokenize_sft(sft_items(train_records, fmt), tokenizer, cfg.max_length)
    truncation.log(cfg.max_length)
    eval_features = tokenize_sft(sft_items(eval_records, fmt), tokenizer, cfg.max_length)[0] if eval_records else []
    collator = CausalLMCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)

    # ---- model: base (bf16/fp32 or 4-bit) + LoRA + input-grad fix --------------------------------
    memory = PeakMemory(device)
    model = load_base_model(model_path, device, precision, cfg.method == "qlora",
                            pick_attn_implementation(cfg.attn_implementation, device))
    targets = "all-linear" if cfg.lora_target_modules == ["all-linear"] else cfg.lora_target_modules
    model = attach_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets,
                        quantized=cfg.method == "qlora", gradient_checkpointing=cfg.gradient_checkpointing)
    lora_modules = checks.check_lora_targets(model, targets)
    trainable, total = checks.log_parameter_counts(model)
    checks.check_model_device(model, device)
    guard = checks.Cpu4bitEvalGuard(model) if quantized_on_cpu else None

    # ---- trainer ---------------------------------------------------------------------------------
    optim = cfg.optim
    if device.type == "cpu" and optim.startswith("paged_"):
        optim = optim.replace("paged_", "", 1)
        log.info("paged optimizers page GPU memory to the CPU; on CPU %s runs as %s", cfg.optim, optim)
    if cfg.save_total_limit:
        log.warning("save_total_limit=%d deletes older checkpoints as new ones are written (seed 002 lost all but "
                    "its first this way); set it only with disk pressure", cfg.save_total_limit)
    args = TrainingArguments(
        output_dir=str(output_dir), seed=cfg.seed, use_cpu=device.type == "cpu",
        bf16=precision == "bf16", fp16=precision == "fp16",
        per_device_train_batch_size=cfg.per_device_train_batch_size, per_device_eval_batch_size=max(8, cfg.per_device_train_batch_size),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, optim=optim,
        logging_steps=cfg.logging_steps, logging_first_step=True, report_to=cfg.report_to,
        eval_strategy="steps" if cfg.eval_steps > 0 and eval_features else "no", eval_steps=cfg.eval_steps or None,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        remove_unused_columns=False, dataloader_num_workers=0, prediction_loss_only=True,
        include_num_input_tokens_seen="non_padding",
    )
    preempted = SaveOnSignal()  # SIGTERM/SIGINT: save after this step, stop, exit 75 (rerun resumes)
    trainer = TokenCountingTrainer(model=model, args=args, train_dataset=train_features, eval_dataset=eval_features or None,
                         data_collator=collator, processing_class=tokenizer,
                         callbacks=[CheckpointValidator(), preempted])
    world = args.world_size
    log.info("effective batch = %d per device x %d accumulation x %d devices = %d sequences per optimizer step",
             cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, world,
             cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world)

    # ---- fail-fast checks on one real batch ------------------------------------------------------
    first = collator(train_features[:cfg.per_device_train_batch_size])
    checks.check_labels(first, tokenizer.eos_token_id, tokenizer.pad_token_id)
    checks.check_gradient_flow(model, first)

    # ---- before: held-out loss, generations, keyword accuracy ------------------------------------
    probe = [r for r in eval_records if r.data.get("keywords")] if fmt == "chat" else []
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
    train_result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if preempted.received:
        log.warning("stopped by a signal at step %d; checkpoint saved. Rerun the same command to resume "
                    "(exit code %d)", trainer.state.global_step, REQUEUE_EXIT_CODE)
        sys.exit(REQUEUE_EXIT_CODE)
    if guard:
        guard.remove()
        checks.check_4bit_weights_unpacked(model)
    trained_tokens, labelled_tokens = trainer.trained_tokens, trainer.trained_labelled_tokens

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
    train_seconds = train_result.metrics["train_runtime"]
    wall = time.time() - wall_start
    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    metrics = {
        "recipe": "sft_memory_diet", "method": cfg.method, "model": model_path, "device": device_name(device),
        "device_type": device.type, "world_size": world, "precision": precision,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "mean_train_loss": train_result.training_loss,
        "eval_loss_before": before.get("eval_loss"), "eval_loss_after": after["eval_loss"],
        "keyword_accuracy_before": before.get("keyword_accuracy"), "keyword_accuracy_after": after.get("keyword_accuracy"),
        "heldout_probes": len(probe),
        "optimizer_steps": trainer.state.global_step, "trained_tokens": trained_tokens,
        "trained_labelled_tokens": labelled_tokens, "num_input_tokens_seen": trainer.state.num_input_tokens_seen,
        "train_seconds": round(train_seconds, 2), "wall_seconds": round(wall, 2),
        "tokens_per_second": round(trained_tokens / train_seconds, 2),
        "labelled_tokens_per_second": round(labelled_tokens / train_seconds, 2),
        "trainable_params": trainable, "total_params": total, "lora_modules": lora_modules,
        "effective_batch_size": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world,
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
                                                              "tokens_per_second", "peak_memory_bytes", "wall_seconds")}))
    return metrics


if __name__ == "__main__":
    config = parse_config(Config)
    try:
        main(config)
    except (checks.CheckFailed, DataError, OutputDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
