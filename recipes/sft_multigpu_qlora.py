"""Multi-GPU (and multi-node) QLoRA SFT with data parallelism done right.

What it is for: the same SFT as recipes/sft_memory_diet.py, on N processes. Each rank loads its
own full 4-bit copy of the base on its own device (`device_map={"": local_rank}`), never
`device_map="auto"`, which spreads one copy over every GPU (naive model parallelism, which DDP
cannot wrap; CHRONICLES). Sharding: DDP (default), FSDP2 (GPU), DeepSpeed ZeRO-2 / ZeRO-3 with
offload. Launch checks fail before the model loads: world size vs requested (incl. the
`accelerate launch --cpu` trap), GPUs visible vs processes, precision the hardware lacks,
ranks with different data; after loading: every parameter on its rank's device. At the end the
ranks compare their final loss and a checksum of the trainable weights.

Run:  bash launch/multigpu_qlora.sh                      # NPROC processes (GPUs, or 2 CPU processes)
      NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 bash launch/multigpu_qlora.sh   # on each node
      SHARDING=zero3 bash launch/multigpu_qlora.sh       # ddp | fsdp | zero2 | zero3
Measured here: see the "Multi-GPU QLoRA" section of docs/multigpu.md.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402,F401  (first: its logging filter must precede transformers' bitsandbytes import)
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer, TrainingArguments, set_seed  # noqa: E402

from common import checks  # noqa: E402
from common import distributed as ddp  # noqa: E402
from common.assets import resolve_model_path  # noqa: E402
from common.checkpoints import (REQUEUE_EXIT_CODE, CheckpointValidator, NonFiniteGuard,  # noqa: E402
                                RunSegments, SaveOnSignal, exit_for_requeue, explain_disk_full, prepare_output_dir)
from common.collator import CausalLMCollator, tokenize_sft  # noqa: E402
from common.data import check_control_tokens, load_sft_data, sft_items  # noqa: E402
from common.models import DTYPES, attach_lora, load_base_model, pick_attn_implementation, resolve_precision  # noqa: E402
from common.run_files import PeakMemory, device_name, estimated_cost, now, plot_loss, write_json, write_manifest  # noqa: E402
from common.trainer import TokenCountingTrainer, keep_tracking_in_run_dir  # noqa: E402

RECIPE = Path(__file__).stem  # the name follows the file: a copy writes runs/<its name> and "recipe": "<its name>"
log = logging.getLogger(RECIPE)
LAUNCH_CONFIGS = Path(__file__).resolve().parent.parent / "launch" / "configs"
SHARDING = {"ddp": {}, "fsdp": {"fsdp": "full_shard auto_wrap", "fsdp_config": str(LAUNCH_CONFIGS / "fsdp2.json")},
            "zero2": {"deepspeed": str(LAUNCH_CONFIGS / "ds_zero2.json")},
            "zero3": {"deepspeed": str(LAUNCH_CONFIGS / "ds_zero3_offload.json")}}
@dataclass
class Config:
    model_name_or_path: str = field(default="asset:smollm2", metadata={"help": "hub id, local dir, or asset:tiny / asset:smollm2"})
    dataset_path: str = field(default="data/persona/train.jsonl", metadata={"help": "training data (chat, instruction or completion format)"})
    eval_dataset_path: str | None = field(default="data/persona/heldout.jsonl", metadata={"help": "held-out data for eval loss before/after"})
    dataset_format: str = field(default="auto", metadata={"help": "auto | chat | instruction | completion: the training file's format (the eval file's is detected on its own)"})
    eval_split: float = field(default=0.0, metadata={"help": "0 < x < 1: hold out this fraction of the training file (seeded by --seed, the same on every rank) as the evaluation set instead of --eval_dataset_path; 0 = no split"})
    output_dir: str = field(default=f"runs/{RECIPE}", metadata={"help": "run directory"})
    method: str = field(default="qlora", metadata={"help": "qlora (NF4 base) | lora"})
    sharding: str = field(default="ddp", metadata={"help": "ddp | fsdp (FSDP2, GPU) | zero2 | zero3 (DeepSpeed, ZeRO-3 with CPU offload)"})
    expected_world_size: int = field(default=0, metadata={"help": "processes the job asked for (the launcher sets it); 0 = do not check"})
    device: str = field(default="auto", metadata={"help": "auto | cuda | cpu"})
    precision: str = field(default="auto", metadata={"help": "auto | bf16 | fp16 | fp32"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto | sdpa | eager | flash_attention_2"})
    max_length: int = field(default=256, metadata={"help": "tokens per example"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "micro-batch per process"})
    gradient_accumulation_steps: int = field(default=2, metadata={"help": "ignored when global_batch_size > 0"})
    global_batch_size: int = field(default=0, metadata={"help": "sequences per optimizer step over all ranks; > 0 keeps it constant when the world size changes (sets accumulation)"})
    num_train_epochs: float = field(default=4.0, metadata={"help": "epochs (ignored when max_steps > 0)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1 = use num_train_epochs"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name"})
    warmup_steps: float = field(default=0.05, metadata={"help": "steps (>= 1) or ratio (< 1)"})
    optim: str = field(default="adamw_torch", metadata={"help": "adamw_torch | adamw_bnb_8bit | paged_adamw_8bit ..."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "non-reentrant activation checkpointing"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={"help": "Linear layer names, or all-linear"})
    seed: int = field(default=42, metadata={"help": "random seed (same on every rank)"})
    logging_steps: int = field(default=2, metadata={"help": "log every N optimizer steps"})
    save_steps: int = field(default=50, metadata={"help": "checkpoint every N optimizer steps"})
    resume: bool = field(default=True, metadata={"help": "resume an unfinished run in output_dir"})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard | wandb"})
    hourly_price_usd: float = field(default=1.41, metadata={"help": "price per device-hour for the cost estimate"})


def main(cfg: Config) -> dict | None:
    wall_start, started = time.time(), now()
    transformers.logging.set_verbosity_warning()

    # ---- topology checks: before anything heavy --------------------------------------------------
    ddp.check_launcher(cfg.expected_world_size)
    rank = ddp.init_distributed(cfg.device)
    logging.basicConfig(level=logging.INFO if rank.is_main else logging.WARNING,
                        format=f"%(asctime)s rank{rank.rank} %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    precision = resolve_precision(cfg.precision, rank.device)
    if cfg.method not in ("lora", "qlora") or cfg.sharding not in SHARDING:
        raise checks.CheckFailed(f"--method {cfg.method!r} / --sharding {cfg.sharding!r}: choose lora|qlora and "
                                 f"one of {sorted(SHARDING)}")
    on_cpu = rank.device.type == "cpu"
    if cfg.sharding == "fsdp" and on_cpu:
        raise checks.CheckFailed("--sharding fsdp on CPU: the Trainer silently falls back to plain DDP there. Use "
                                 "ddp, zero2 or zero3 on CPU; FSDP2 runs on GPUs (tests/recipes/test_multigpu.py shows raw "
                                 "fully_shard over gloo)")
    if cfg.method == "qlora" and cfg.sharding == "zero3" and on_cpu:
        raise checks.CheckFailed("--method qlora with --sharding zero3 needs GPUs (ZeRO-3 partitions the 4-bit "
                                 "weights; bitsandbytes supports that only with CUDA). Use --method lora on CPU")
    accumulation = cfg.gradient_accumulation_steps
    if cfg.global_batch_size:
        per_step = cfg.per_device_train_batch_size * rank.world_size
        if cfg.global_batch_size % per_step:
            raise checks.CheckFailed(f"--global_batch_size {cfg.global_batch_size} is not a multiple of "
                                     f"per_device_train_batch_size x world size = {per_step}")
        accumulation = cfg.global_batch_size // per_step
    set_seed(cfg.seed)

    # ---- data: every rank loads and tokenizes; all must agree --------------------------------------
    records, fmt, eval_records, eval_fmt = load_sft_data(cfg.dataset_path, cfg.eval_dataset_path, cfg.dataset_format,
                                                         cfg.eval_split, cfg.seed)
    model_path = resolve_model_path(cfg.model_name_or_path) if rank.local_rank == 0 else None
    if rank.world_size > 1:
        torch.distributed.barrier()  # local rank 0 builds an asset:* model once per node
    model_path = model_path or resolve_model_path(cfg.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    checks.check_chat_template(tokenizer, source=model_path)
    check_control_tokens(records, fmt, tokenizer, source=model_path)  # text that would become control tokens
    check_control_tokens(eval_records, eval_fmt, tokenizer, source=model_path)
    features, truncation = tokenize_sft(sft_items(records, fmt), tokenizer, cfg.max_length)
    if rank.is_main:
        truncation.log(cfg.max_length)
    eval_features = tokenize_sft(sft_items(eval_records, eval_fmt), tokenizer, cfg.max_length)[0] if eval_records else []
    ddp.check_same_data_on_all_ranks(features, cfg.dataset_path)
    output_dir = Path(cfg.output_dir)
    resume_from = None
    if rank.is_main:
        resume_from = prepare_output_dir(output_dir, asdict(cfg), cfg.resume)
        write_manifest(output_dir, cfg, [cfg.dataset_path], started, "running")
    resume_from = ddp.gather(str(resume_from) if resume_from else None)[0]

    # ---- model: a full (quantized) copy per rank, on this rank's device -----------------------------
    memory = PeakMemory(rank.device)
    quant_storage = DTYPES[precision] if cfg.sharding in ("fsdp", "zero3") else torch.uint8
    model = load_base_model(model_path, rank.device, precision, cfg.method == "qlora",
                            pick_attn_implementation(cfg.attn_implementation, rank.device), quant_storage=quant_storage)
    ddp.check_rank_placement(model, rank.device)
    model = attach_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                        "all-linear" if cfg.lora_target_modules == ["all-linear"] else cfg.lora_target_modules,
                        quantized=cfg.method == "qlora", gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.sharding in ("fsdp", "zero3"):
        # one dtype per sharded unit: LoRA (fp32 by default) and upcast norms go to the compute dtype
        ddp.cast_for_sharding(model, DTYPES[precision])
        ddp.check_uniform_dtype(model)
    lora_modules = checks.check_lora_targets(model, "all-linear" if cfg.lora_target_modules == ["all-linear"]
                                             else cfg.lora_target_modules)
    trainable, total = checks.log_parameter_counts(model)
    guard = checks.Cpu4bitEvalGuard(model) if cfg.method == "qlora" and on_cpu else None
    collator = CausalLMCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)
    first = collator(features[:cfg.per_device_train_batch_size])
    checks.check_labels(first, tokenizer.eos_token_id, tokenizer.pad_token_id)
    checks.check_gradient_flow(model, first)

    # ---- trainer ------------------------------------------------------------------------------------
    args = TrainingArguments(
        output_dir=str(output_dir), seed=cfg.seed, use_cpu=on_cpu, bf16=precision == "bf16", fp16=precision == "fp16",
        ddp_backend="gloo" if on_cpu else "nccl", ddp_find_unused_parameters=False,
        per_device_train_batch_size=cfg.per_device_train_batch_size, per_device_eval_batch_size=8,
        gradient_accumulation_steps=accumulation, num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_steps,
        optim=cfg.optim.replace("paged_", "", 1) if on_cpu else cfg.optim,
        logging_steps=cfg.logging_steps, logging_first_step=True, report_to=cfg.report_to, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=None, remove_unused_columns=False, dataloader_num_workers=0,
        prediction_loss_only=True, include_num_input_tokens_seen="non_padding", **SHARDING[cfg.sharding])
    effective = cfg.per_device_train_batch_size * accumulation * rank.world_size
    log.info("effective batch = %d per device x %d accumulation x %d ranks = %d sequences per optimizer step",
             cfg.per_device_train_batch_size, accumulation, rank.world_size, effective)
    preempted = SaveOnSignal()  # SIGTERM/SIGINT: save after this step, stop, exit 75 (rerun resumes)
    keep_tracking_in_run_dir(output_dir, cfg.report_to)  # tensorboard/mlflow/trackio files inside the run
    # figures of the segments before a resume travel in the checkpoints: metrics.json covers the whole run,
    # its token counts summed over the ranks
    segments = RunSegments(resume_from, counters=("trained_tokens", "trained_labelled_tokens", "trained_positions"),
                           across_ranks=True)
    trainer = TokenCountingTrainer(model=model, args=args, train_dataset=features, eval_dataset=eval_features or None,
                                   data_collator=collator, processing_class=tokenizer,
                                   callbacks=[CheckpointValidator(segments=segments), preempted, NonFiniteGuard()])
    segments.bind(trainer)
    # eval_loss: token-weighted NLL of the whole eval set over all ranks (common.evaluation.heldout_loss)
    before = trainer.evaluate()["eval_loss"] if eval_features and not guard else None
    with explain_disk_full(output_dir, trainer):
        result = trainer.train(resume_from_checkpoint=resume_from)
    if preempted.received:
        log.warning("stopped by a signal at step %d; checkpoint saved; rerun to resume (exit code %d)",
                    trainer.state.global_step, REQUEUE_EXIT_CODE)
        exit_for_requeue()  # SystemExit(75): the finally below destroys the process group
    if guard:
        guard.remove()
        checks.check_4bit_weights_unpacked(model)
    after = trainer.evaluate()["eval_loss"] if eval_features else None
    whole = segments.finish(result)  # every segment of the run, every rank (a collective)

    # ---- replicas agree? --------------------------------------------------------------------------------
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    per_rank = ddp.gather({"rank": rank.rank, "final_train_loss": losses[-1] if losses else None,
                           "trainable_checksum": ddp.trainable_checksum(model),
                           "trained_tokens": trainer.trained_tokens, "device": str(rank.device)})
    in_sync = len({(r["final_train_loss"], r["trainable_checksum"]) for r in per_rank}) == 1
    if not in_sync:
        raise checks.CheckFailed(f"data-parallel replicas diverged: {per_rank}")
    trainer.save_model(str(output_dir / "adapter"))  # every rank: under ZeRO-3 saving gathers the shards
    if not rank.is_main:
        return None

    # ---- rank 0 writes the run ----------------------------------------------------------------------
    train_seconds = whole["train_seconds"]
    trained_tokens = whole["trained_tokens"]  # all ranks, all segments
    metrics = {
        "recipe": RECIPE, "method": cfg.method, "sharding": cfg.sharding, "model": model_path,
        "device": device_name(rank.device), "device_type": rank.device.type, "world_size": rank.world_size,
        "precision": precision, "effective_batch_size": effective, "gradient_accumulation_steps": accumulation,
        "final_train_loss": losses[-1] if losses else None, "mean_train_loss": whole["mean_train_loss"],
        "eval_loss_before": before, "eval_loss_after": after,
        "optimizer_steps": trainer.state.global_step, "trained_tokens": trained_tokens,
        "trained_labelled_tokens": whole["trained_labelled_tokens"],
        "trained_positions": whole["trained_positions"],
        "num_input_tokens_seen": trainer.state.num_input_tokens_seen,
        "tokens_per_second": round(trained_tokens / train_seconds, 2), "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(time.time() - wall_start, 2), "trainable_params": trainable, "total_params": total,
        "lora_modules": lora_modules, "replicas_in_sync": in_sync, "per_rank": per_rank,
        "segments": whole["segments"], "segments_complete": whole["segments_complete"],
        "truncation": truncation.as_dict(), **memory.report(),
        **estimated_cost(time.time() - wall_start, cfg.hourly_price_usd, rank.world_size),
    }
    if before is not None and after is not None:
        metrics["eval_perplexity_before"], metrics["eval_perplexity_after"] = math.exp(before), math.exp(after)
    plot_loss(trainer.state.log_history, output_dir / "loss.png", f"{cfg.method} x{rank.world_size} {cfg.sharding}")
    write_json(output_dir / "metrics.json", metrics)
    write_manifest(output_dir, cfg, [cfg.dataset_path], started, "finished")
    log.info("done: %s", json.dumps({k: metrics[k] for k in ("world_size", "final_train_loss", "eval_loss_before",
                                                              "eval_loss_after", "tokens_per_second", "replicas_in_sync")}))
    return metrics


if __name__ == "__main__":
    ddp.run_on_every_rank(main, Config)
