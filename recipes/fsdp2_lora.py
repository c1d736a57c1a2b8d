"""FSDP2 (`torch.distributed.fsdp.fully_shard`) + LoRA with a short explicit training loop.

What it is for: sharding where the Trainer cannot. Through the Trainer, FSDP on CPU silently
becomes plain DDP. This loop shards each decoder layer, then the root, with raw `fully_shard`,
so it runs over gloo on CPU as well as over NCCL on GPUs. Frozen base weights and trainable LoRA
weights live in the same shards (FSDP2 shards per parameter). At the end every rank checks that
it held only its shard and that the loss fell.

Run:  torchrun --nproc_per_node 2 recipes/fsdp2_lora.py --model_name_or_path asset:tiny --output_dir runs/fsdp2
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from common import distributed as ddp  # noqa: E402
from common.assets import resolve_model_path  # noqa: E402
from common.collator import CausalLMCollator, tokenize_sft  # noqa: E402
from common.data import load_dataset_file, to_messages  # noqa: E402
from common.run_files import write_json  # noqa: E402


RECIPE = Path(__file__).stem  # the name follows the file: a copy writes runs/<its name> and "recipe": "<its name>"


@dataclass
class Config:
    model_name_or_path: str = field(default="asset:tiny", metadata={"help": "hub id, local dir, or asset:*"})
    dataset_path: str = field(default="data/persona/train.jsonl", metadata={"help": "chat/instruction/completion data"})
    output_dir: str = field(default=f"runs/{RECIPE}", metadata={"help": "where rank 0 writes metrics.json"})
    device: str = field(default="auto", metadata={"help": "auto | cuda | cpu"})
    expected_world_size: int = field(default=0, metadata={"help": "processes the job asked for; 0 = do not check"})
    max_steps: int = field(default=8, metadata={"help": "optimizer steps"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "micro-batch per rank"})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate"})
    max_length: int = field(default=256, metadata={"help": "tokens per example"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    seed: int = field(default=0, metadata={"help": "random seed"})


def main(cfg: Config) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ddp.check_launcher(cfg.expected_world_size)
    rank = ddp.init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    path = resolve_model_path(cfg.model_name_or_path) if rank.local_rank == 0 else None
    dist.barrier()
    path = path or resolve_model_path(cfg.model_name_or_path)
    tok = AutoTokenizer.from_pretrained(path)
    records, fmt = load_dataset_file(cfg.dataset_path)
    features, _ = tokenize_sft([("", to_messages(r.data, fmt), r.data) for r in records], tok, cfg.max_length)
    ddp.check_same_data_on_all_ranks(features, cfg.dataset_path)

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(rank.device)
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    full_sizes = {n: p.numel() for n, p in model.named_parameters()}
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    local = sum(p.to_local().numel() for p in model.parameters())  # parameters are DTensors now
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)

    collate = CausalLMCollator(tok.pad_token_id)
    g = torch.Generator().manual_seed(cfg.seed)  # same order on every rank; each takes its own slice
    losses = []
    model.train()
    for step in range(cfg.max_steps):
        order = torch.randperm(len(features), generator=g).tolist()
        n = cfg.per_device_train_batch_size
        mine = order[rank.rank * n:(rank.rank + 1) * n]
        batch = {k: v.to(rank.device) for k, v in collate([features[i] for i in mine]).items()}
        loss = model(**batch).loss
        loss.backward()  # FSDP2 reduce-scatters the gradients: each rank keeps the mean over ranks for its shard
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)  # SUM: the one reduction every backend (gloo included) has
        losses.append(total.item() / rank.world_size)

    sizes = ddp.gather(local)
    result = {"world_size": rank.world_size, "device": str(rank.device), "losses": losses,
              "local_param_counts": sizes, "full_param_count": sum(full_sizes.values()),
              "sharded": all(s < sum(full_sizes.values()) for s in sizes) if rank.world_size > 1 else False}
    if rank.is_main:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(cfg.output_dir) / "metrics.json", result)
        print(json.dumps(result))


if __name__ == "__main__":
    ddp.run_on_every_rank(main, Config)
