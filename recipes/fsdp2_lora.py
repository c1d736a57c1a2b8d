"""FSDP2 (`torch.distributed.fsdp.fully_shard`) + LoRA with a short explicit training loop.

What it is for: sharding where the Trainer cannot. Through the Trainer, FSDP on CPU silently
becomes plain DDP. This loop shards each decoder layer, then the root, with raw `fully_shard`,
so it runs over gloo on CPU as well as over NCCL on GPUs. Frozen base weights and trainable LoRA
weights live in the same shards (FSDP2 shards per parameter). At the end every rank reports the
parameters it held (its shard) and the loss of every step, averaged over the ranks.

Run:  torchrun --nproc_per_node 2 recipes/fsdp2_lora.py --config recipes/configs/fsdp2_lora.yaml
      torchrun --nproc_per_node 2 recipes/fsdp2_lora.py --model_name_or_path asset:smollm2 --output_dir runs/fsdp2

Options: this file's Config (`--help`); the loop saves no checkpoints, so a rerun starts over.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from common import checks  # noqa: E402
from common import distributed as ddp  # noqa: E402
from common.assets import resolve_model_path  # noqa: E402
from common.collator import CausalLMCollator, tokenize_sft  # noqa: E402
from common.data import load_dataset_file, to_messages  # noqa: E402
from common.models import LoraOptions  # noqa: E402
from common.run import Run, RunOptions  # noqa: E402

RECIPE = Path(__file__).stem  # a copy writes runs/<its name> and "recipe": "<its name>"


@dataclass
class Config(RunOptions, LoraOptions):
    model_name_or_path: str = field(default="asset:tiny", metadata={"help": "hub id, local dir, or asset:tiny / asset:smollm2"})
    precision: str = field(default="fp32", metadata={"help": "fp32 | bf16 (autocast over fp32 weights) | auto"})
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={"help": "Linear layer names, or all-linear"})
    dataset_path: str = field(default="data/persona/train.jsonl", metadata={"help": "chat/instruction/completion data"})
    output_dir: str = field(default=f"runs/{RECIPE}", metadata={"help": "run directory (rank 0 writes it)"})
    expected_world_size: int = field(default=0, metadata={"help": "processes the job asked for; 0 = do not check"})
    max_steps: int = field(default=8, metadata={"help": "optimizer steps", "min": 1})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "micro-batch per rank"})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate"})
    max_length: int = field(default=256, metadata={"help": "tokens per example"})
    seed: int = field(default=0, metadata={"help": "random seed (the same batch order on every rank)"})


def validate(cfg: Config, run: Run, rank: ddp.Rank) -> None:
    """Everything that needs no model or data, each with the option to change."""
    if rank.world_size < 2:
        raise checks.CheckFailed("one process: fully_shard needs a process group of 2 or more ranks; run it with "
                                 "torchrun --nproc_per_node 2 recipes/fsdp2_lora.py [--key value ...]")
    if run.precision == "fp16":
        raise checks.CheckFailed("--precision fp16: this loop has no loss scaler; use bf16 or fp32")


def main(cfg: Config) -> dict:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.lora_fast import speed_up_lora

    ddp.check_launcher(cfg.expected_world_size)
    rank = ddp.init_distributed(cfg.device)
    ddp.setup_rank_logging(rank)
    run = Run(RECIPE, cfg, datasets=[cfg.dataset_path], main_process=rank.is_main)
    validate(cfg, run, rank)

    # ---- data: every rank tokenizes the same examples ------------------------------------------------
    path = resolve_model_path(cfg.model_name_or_path) if rank.local_rank == 0 else None
    dist.barrier()  # local rank 0 builds an asset:* model once per node
    path = path or resolve_model_path(cfg.model_name_or_path)
    tok = AutoTokenizer.from_pretrained(path)
    records, fmt = load_dataset_file(cfg.dataset_path)
    features, _ = tokenize_sft([("", to_messages(r.data, fmt), r.data) for r in records], tok, cfg.max_length)
    if cfg.per_device_train_batch_size * rank.world_size > len(features):
        raise checks.CheckFailed(f"--per_device_train_batch_size {cfg.per_device_train_batch_size} x {rank.world_size} "
                                 f"ranks needs more than the {len(features)} examples of {cfg.dataset_path}; lower it")
    ddp.check_same_data_on_all_ranks(features, cfg.dataset_path)
    ddp.open_run(run)

    # ---- model: LoRA, then every decoder layer and the root sharded over the ranks -----------------------
    run.measure_memory()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(rank.device)
    model = get_peft_model(model, cfg.lora_config())
    speed_up_lora(model)  # peft's maths, fewer passes (common/lora_fast.py)
    full_size = sum(p.numel() for p in model.parameters())
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    local = sum(p.to_local().numel() for p in model.parameters())  # parameters are DTensors now
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    run.started()

    # ---- the loop: one micro-batch per rank per step ---------------------------------------------------
    collate = CausalLMCollator(tok.pad_token_id)
    g = torch.Generator().manual_seed(cfg.seed)  # same order on every rank; each takes its own slice
    losses, tokens = [], 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    model.train()
    for _ in range(cfg.max_steps):
        order = torch.randperm(len(features), generator=g).tolist()
        n = cfg.per_device_train_batch_size
        mine = order[rank.rank * n:(rank.rank + 1) * n]
        batch = {k: v.to(rank.device) for k, v in collate([features[i] for i in mine]).items()}
        with torch.autocast(rank.device.type, dtype=torch.bfloat16, enabled=run.precision == "bf16"):
            loss = model(**batch).loss
        loss.backward()  # FSDP2 reduce-scatters the gradients: each rank keeps the mean over ranks for its shard
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().float().clone()
        dist.all_reduce(total)  # SUM: the one reduction every backend (gloo included) has
        losses.append(total.item() / rank.world_size)
        tokens += int(batch["attention_mask"].sum())
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0

    # ---- metrics.json, manifest, loss.png (rank 0) ------------------------------------------------------
    sizes = ddp.gather(local)
    trainer, whole = ddp.loop_summary(model, losses, rank.world_size, seconds, cpu_seconds, sum(ddp.gather(tokens)))
    return run.finish(trainer, whole, {
        "model": path, "losses": losses, "local_param_counts": sizes, "full_param_count": full_size,
        "sharded": all(s < full_size for s in sizes),
    }, f"FSDP2 LoRA x{rank.world_size} on {Path(path).name}", headline=(
        "world_size", "losses", "local_param_counts", "full_param_count", "sharded", "tokens_per_second"))


CONFIGS = Config

if __name__ == "__main__":
    ddp.run_on_every_rank(main, CONFIGS)
