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
      torchrun --nproc_per_node N recipes/sft_multigpu_qlora.py --config recipes/configs/sft_multigpu_qlora.yaml

Options: this file's Config plus transformers' TrainingArguments (`--help` lists both); figures: the
"Multi-GPU QLoRA" section of docs/multigpu.md.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

import common  # noqa: E402,F401  (first: its logging filter must precede transformers' bitsandbytes import)
import torch  # noqa: E402
from transformers import AutoTokenizer, TrainingArguments  # noqa: E402

from common import checks  # noqa: E402
from common import distributed as ddp  # noqa: E402
from common.assets import resolve_model_path  # noqa: E402
from common.collator import CausalLMCollator, tokenize_sft  # noqa: E402
from common.data import check_control_tokens, load_sft_data, sft_items  # noqa: E402
from common.models import DTYPES, LoraOptions, attach_lora, load_base_model, pick_attn_implementation  # noqa: E402
from common.run import Run, RunOptions  # noqa: E402
from common.trainer import TokenCountingTrainer  # noqa: E402

RECIPE = Path(__file__).stem  # a copy writes runs/<its name> and "recipe": "<its name>"
LAUNCH_CONFIGS = Path(__file__).resolve().parent.parent / "launch" / "configs"
SHARDING = {"ddp": {}, "fsdp": {"fsdp": "full_shard auto_wrap", "fsdp_config": str(LAUNCH_CONFIGS / "fsdp2.json")},
            "zero2": {"deepspeed": str(LAUNCH_CONFIGS / "ds_zero2.json")},
            "zero3": {"deepspeed": str(LAUNCH_CONFIGS / "ds_zero3_offload.json")}}
COUNTERS = ("trained_tokens", "trained_labelled_tokens", "trained_positions")  # summed over ranks and segments


@dataclass
class Config(RunOptions, LoraOptions):
    dataset_path: str = field(default="data/persona/train.jsonl", metadata={"help": "training data (chat, instruction or completion format)"})
    eval_dataset_path: str | None = field(default="data/persona/heldout.jsonl", metadata={"help": "held-out data for eval loss before/after"})
    dataset_format: str = field(default="auto", metadata={"help": "auto | chat | instruction | completion: the training file's format (the eval file's is detected on its own)"})
    eval_split: float = field(default=0.0, metadata={"help": "0 < x < 1: hold out this fraction of the training file (seeded by --seed, the same on every rank) as the evaluation set instead of --eval_dataset_path; 0 = no split"})
    method: str = field(default="qlora", metadata={"help": "qlora (NF4 base) | lora"})
    sharding: str = field(default="ddp", metadata={"help": "ddp | fsdp (FSDP2, GPU) | zero2 | zero3 (DeepSpeed, ZeRO-3 with CPU offload)"})
    expected_world_size: int = field(default=0, metadata={"help": "processes the job asked for (the launcher sets it); 0 = do not check"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto | sdpa | eager | flash_attention_2"})
    max_length: int = field(default=256, metadata={"help": "tokens per example"})
    global_batch_size: int = field(default=16, metadata={"help": "sequences per optimizer step over all ranks; > 0 keeps it constant when the world size changes (sets accumulation); 0 = use gradient_accumulation_steps", "min": 0})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "non-reentrant activation checkpointing"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={"help": "Linear layer names, or all-linear"})


def validate(cfg: Config, args: TrainingArguments, rank: ddp.Rank) -> None:
    """Everything that needs no model, each with the option to change."""
    if cfg.method not in ("lora", "qlora") or cfg.sharding not in SHARDING:
        raise checks.CheckFailed(f"--method {cfg.method!r} / --sharding {cfg.sharding!r}: choose lora|qlora and "
                                 f"one of {sorted(SHARDING)}")
    if args.deepspeed or args.fsdp:
        raise checks.CheckFailed("--deepspeed / --fsdp: this recipe sets them from --sharding (zero2, zero3 or fsdp, "
                                 "with the configs in launch/configs); pass --sharding instead")
    cfg.check_lora_variants(quantized=cfg.method == "qlora")
    if cfg.lora_init not in ("default", "gaussian") or cfg.loraplus_lr_ratio:
        raise checks.CheckFailed(f"--lora_init {cfg.lora_init} / --loraplus_lr_ratio {cfg.loraplus_lr_ratio}: PiSSA/"
                                 "OLoRA init and LoRA+ run in recipes/sft_memory_diet.py only; here use --lora_init "
                                 "default and --loraplus_lr_ratio 0 (DoRA and rsLoRA work)")
    on_cpu = rank.device.type == "cpu"
    if cfg.sharding == "fsdp" and on_cpu:
        raise checks.CheckFailed("--sharding fsdp on CPU: the Trainer silently falls back to plain DDP there. Use "
                                 "ddp, zero2 or zero3 on CPU; FSDP2 runs on GPUs (tests/recipes/test_multigpu.py shows raw "
                                 "fully_shard over gloo)")
    if cfg.method == "qlora" and cfg.sharding == "zero3" and on_cpu:
        raise checks.CheckFailed("--method qlora with --sharding zero3 needs GPUs (ZeRO-3 partitions the 4-bit "
                                 "weights; bitsandbytes supports that only with CUDA). Use --method lora on CPU")
    if cfg.method == "qlora" and on_cpu and args.eval_strategy != "no":
        raise checks.CheckFailed("--eval_strategy with QLoRA on CPU: an eval-mode forward repacks bitsandbytes 4-bit "
                                 "weights and later gradients are silently wrong. Leave --eval_strategy no (evaluation "
                                 "runs after training)")
    per_step = args.per_device_train_batch_size * rank.world_size
    if cfg.global_batch_size % per_step:
        raise checks.CheckFailed(f"--global_batch_size {cfg.global_batch_size} is not a multiple of "
                                 f"per_device_train_batch_size x world size = {per_step}")


def main(cfg: Config, args: TrainingArguments) -> dict:
    ddp.check_launcher(cfg.expected_world_size)  # before anything heavy, the process group included
    rank = ddp.init_distributed(cfg.device)
    ddp.setup_rank_logging(rank)
    run = Run(RECIPE, cfg, args, datasets=[cfg.dataset_path] + ([cfg.eval_dataset_path] if not cfg.eval_split else []),
              main_process=rank.is_main)
    validate(cfg, args, rank)
    on_cpu, precision = rank.device.type == "cpu", run.precision
    per_step = args.per_device_train_batch_size * rank.world_size
    accumulation = cfg.global_batch_size // per_step if cfg.global_batch_size else args.gradient_accumulation_steps

    # ---- data: every rank loads and tokenizes; all must agree --------------------------------------
    records, fmt, eval_records, eval_fmt = load_sft_data(cfg.dataset_path, cfg.eval_dataset_path, cfg.dataset_format,
                                                         cfg.eval_split, args.seed)
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
    ddp.open_run(run)  # rank 0 locks the run directory; every rank resumes from the checkpoint it found

    # ---- model: a full (quantized) copy per rank, on this rank's device -----------------------------
    run.measure_memory()
    quant_storage = DTYPES[precision] if cfg.sharding in ("fsdp", "zero3") else torch.uint8
    model = load_base_model(model_path, rank.device, precision, cfg.method == "qlora",
                            pick_attn_implementation(cfg.attn_implementation, rank.device), quant_storage=quant_storage)
    ddp.check_rank_placement(model, rank.device)
    model = attach_lora(model, cfg, quantized=cfg.method == "qlora", gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.sharding in ("fsdp", "zero3"):
        # one dtype per sharded unit: LoRA (fp32 by default) and upcast norms go to the compute dtype
        ddp.cast_for_sharding(model, DTYPES[precision])
        ddp.check_uniform_dtype(model)
    lora_modules = checks.check_lora_targets(model, cfg.lora_targets)
    trainable, total = checks.log_parameter_counts(model)  # before ZeRO-3 partitions the weights
    guard = checks.Cpu4bitEvalGuard(model) if cfg.method == "qlora" and on_cpu else None
    collator = CausalLMCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)
    first = collator(features[:args.per_device_train_batch_size])
    checks.check_labels(first, tokenizer.eos_token_id, tokenizer.pad_token_id)
    checks.check_gradient_flow(model, first)

    # ---- trainer ------------------------------------------------------------------------------------
    optim = str(getattr(args.optim, "value", args.optim))
    args = run.library_args(
        args, gradient_accumulation_steps=accumulation, optim=optim.replace("paged_", "", 1) if on_cpu else optim,
        ddp_backend="gloo" if on_cpu else "nccl", ddp_find_unused_parameters=False, remove_unused_columns=False,
        prediction_loss_only=True, include_num_input_tokens_seen="non_padding", **SHARDING[cfg.sharding])
    effective = args.per_device_train_batch_size * accumulation * rank.world_size
    run.log.info("effective batch = %d per device x %d accumulation x %d ranks = %d sequences per optimizer step",
                 args.per_device_train_batch_size, accumulation, rank.world_size, effective)
    trainer = TokenCountingTrainer(model=model, args=args, train_dataset=features, eval_dataset=eval_features or None,
                                   data_collator=collator, processing_class=tokenizer,
                                   callbacks=run.callbacks(counters=COUNTERS, across_ranks=True))
    run.bind(trainer)
    run.started()
    # eval_loss: token-weighted NLL of the whole eval set over all ranks (common.evaluation.heldout_loss)
    before = trainer.evaluate()["eval_loss"] if eval_features and not guard else None
    whole = run.train(trainer)  # a signal: every rank saves, then exits 75
    if guard:
        guard.remove()
        checks.check_4bit_weights_unpacked(model)
    after = trainer.evaluate()["eval_loss"] if eval_features else None

    # ---- replicas agree? --------------------------------------------------------------------------------
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    per_rank = ddp.gather({"rank": rank.rank, "final_train_loss": losses[-1] if losses else None,
                           "trainable_checksum": ddp.trainable_checksum(model),
                           "trained_tokens": trainer.trained_tokens, "device": str(rank.device)})
    in_sync = len({(r["final_train_loss"], r["trainable_checksum"]) for r in per_rank}) == 1
    if not in_sync:
        raise checks.CheckFailed(f"data-parallel replicas diverged: {per_rank}")
    trainer.save_model(str(run.output_dir / "adapter"))  # every rank: under ZeRO-3 saving gathers the shards

    # ---- metrics.json, manifest, loss.png (rank 0) ------------------------------------------------------
    metrics = {
        "method": cfg.method, "sharding": cfg.sharding, "model": model_path,
        "effective_batch_size": effective, "gradient_accumulation_steps": accumulation,
        "eval_loss_before": before, "eval_loss_after": after,
        "trained_labelled_tokens": whole["trained_labelled_tokens"], "trained_positions": whole["trained_positions"],
        "num_input_tokens_seen": trainer.state.num_input_tokens_seen,
        "trainable_params": trainable, "total_params": total, "lora_modules": lora_modules,
        "replicas_in_sync": in_sync, "per_rank": per_rank, "truncation": truncation.as_dict(),
    }
    if before is not None and after is not None:
        metrics["eval_perplexity_before"], metrics["eval_perplexity_after"] = math.exp(before), math.exp(after)
    return run.finish(trainer, whole, metrics, f"{cfg.method} x{rank.world_size} {cfg.sharding}", headline=(
        "world_size", "final_train_loss", "eval_loss_before", "eval_loss_after", "tokens_per_second", "replicas_in_sync"))


CONFIGS = (Config, TrainingArguments)

if __name__ == "__main__":
    ddp.run_on_every_rank(main, CONFIGS)
