"""Full fine-tuning vs LoRA (and its peft variants) vs a bottleneck adapter vs QLoRA: same model, data, steps and batch.

What it is for: seed 001's comparison (full fine-tuning against adapters, ~355M vs ~6M trainable
parameters) on your model and data, with LoRA and QLoRA beside them. Each method trains in its own
process (so its peak memory is its own) for the same number of optimizer steps on the same batches;
the table gives trainable parameters, wall and training time, tokens/s, peak memory (and the memory
planner's prediction where it models the method), train loss and held-out loss before and after.

Methods (`--methods`):
  full     every parameter trains (AdamW states for all of them)
  lora     peft LoRA on --lora_target_modules, rank --lora_r
  dora     LoRA + DoRA's trainable magnitude per output feature (use_dora)
  rslora   LoRA scaled alpha / sqrt(r) instead of alpha / r (use_rslora)
  pissa    LoRA initialised from each weight's principal singular part, the base keeps the rest (lora_init pissa)
  loraplus LoRA with lora_B at --loraplus_lr_ratio x the learning rate (LoRA+)
  adapter  serial bottleneck adapters after attention and after the MLP (Houlsby; harnesses/adapters.py),
           width --adapter_size, up-projection zero-initialized so training starts from the base model
  qlora    LoRA on a 4-bit NF4 base (bitsandbytes). On CPU no eval-mode forward runs before training
           (it would repack the 4-bit weights and corrupt the gradients): held-out loss after training only
Learning rates differ per method (full fine-tuning takes smaller steps); they are not tuned here.

Run:
    bash launch/adapter_vs_full.sh
    python harnesses/adapter_vs_full.py --config harnesses/configs/adapter_vs_full.yaml [--key value ...]

Writes to --output_dir: adapter_vs_full.json and .md (the table), loss.png (train loss of every
method), metrics.json, manifest.json, runs/<method>/ (each method's metrics.json and log.txt).
It writes numbers, not models: use recipes/sft_memory_diet.py to produce an adapter.

Measured here: docs/memory.md, "Adapter vs full fine-tuning" (SmolLM2-135M, 2-core CPU VM).
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

from common import checks
from harnesses import compare  # noqa: E402
from harnesses.compare import RunSpec, fmt_loss, gib  # noqa: E402
from common.config import parse_config  # noqa: E402

RECIPE = Path(__file__).stem  # the name follows the file: a copy writes runs/<its name> and "recipe": "<its name>"
log = logging.getLogger(RECIPE)

WHAT = {"full": "full fine-tuning", "lora": "LoRA (peft)", "dora": "DoRA (LoRA + magnitudes)",
        "rslora": "rsLoRA (alpha / sqrt(r))", "pissa": "PiSSA init (principal singular part)",
        "loraplus": "LoRA+ (lora_B at a higher lr)", "adapter": "bottleneck adapters (Houlsby)",
        "qlora": "QLoRA (LoRA on a 4-bit NF4 base)"}
LORA_VARIANTS = {"dora": {"use_dora": True}, "rslora": {"use_rslora": True}, "pissa": {"lora_init": "pissa"},
                 "loraplus": {}}  # loraplus: the ratio comes from --loraplus_lr_ratio


@dataclass
class Config(compare.CompareConfig):
    output_dir: str = field(default=f"runs/{RECIPE}", metadata={"help": "table, loss.png, metrics.json, manifest.json, runs/<method>/"})
    methods: list[str] = field(default_factory=lambda: ["full", "lora", "dora", "rslora", "pissa", "loraplus", "adapter", "qlora"], metadata={"help": "which methods to compare, in table order: full lora dora rslora pissa loraplus adapter qlora"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step (every method)"})
    precision: str = field(default="fp32", metadata={"help": "fp32 | bf16 for every method (the model is loaded in it; QLoRA: compute dtype)"})
    optim: str = field(default="adamw_torch", metadata={"help": "optimizer for every method (TrainingArguments.optim)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "non-reentrant gradient checkpointing for every method"})
    full_learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate, full fine-tuning"})
    lora_learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate, LoRA and QLoRA"})
    adapter_learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate, bottleneck adapters"})
    loraplus_lr_ratio: float = field(default=16.0, metadata={"help": "loraplus row: lora_B's learning rate over lora_learning_rate"})
    eval_before: bool = field(default=True, metadata={"help": "held-out loss before training too (not for QLoRA on CPU)"})


def specs(cfg: Config) -> list[RunSpec]:
    rates = {"full": cfg.full_learning_rate, "lora": cfg.lora_learning_rate, "qlora": cfg.lora_learning_rate,
             "adapter": cfg.adapter_learning_rate, **{v: cfg.lora_learning_rate for v in LORA_VARIANTS}}
    unknown = [m for m in cfg.methods if m not in rates]
    if unknown or not cfg.methods or len(set(cfg.methods)) != len(cfg.methods):
        raise checks.CheckFailed(f"--methods {' '.join(cfg.methods)}: list each of {', '.join(rates)} at most once")
    variant = {**LORA_VARIANTS, "loraplus": {"loraplus_lr_ratio": cfg.loraplus_lr_ratio}}
    return [RunSpec(name=m, adds=WHAT[m], method="lora" if m in LORA_VARIANTS else m, precision=cfg.precision,
                    batch=cfg.per_device_train_batch_size, accumulation=cfg.gradient_accumulation_steps,
                    gradient_checkpointing=cfg.gradient_checkpointing, optim=cfg.optim, learning_rate=rates[m],
                    lora_variant=variant.get(m, {})) for m in cfg.methods]


def table(rows: list[dict]) -> str:
    lines = ["| method | trainable params | % of total | wall s | train s | tokens/s | peak GiB | planner GiB | "
             "final train loss | eval loss before | eval loss after |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        what = f"{r['name']}: {r['spec']['adds']}"
        if r["status"] != "ok":
            lines.append(f"| {what} | {r['status']}: {r.get('error') or r.get('note')} |  |  |  |  |  |  |  |  |  |")
            continue
        lines.append(
            f"| {what} | {r['trainable_params']:,} | {r['trainable_percent']:.2f} | {r['wall_seconds']:.0f} | "
            f"{r['train_seconds']:.0f} | {r['tokens_per_second']:.0f} | {gib(r['peak_memory_bytes'])} | "
            f"{gib(r['planner']['bytes'])} | {fmt_loss(r['final_train_loss'])} | {fmt_loss(r['eval_loss_before'])} | "
            f"{fmt_loss(r['eval_loss_after'])} |")
    return "\n".join(lines)


def main(cfg: Config) -> int:
    runs = specs(cfg)
    report = compare.Report(RECIPE, cfg)
    rows = compare.run_all(cfg, runs, __file__)
    first = compare.first_ok(rows)
    header = (f"Model {first.get('model', cfg.model_name_or_path)}, {cfg.max_steps} optimizer steps of "
              f"{cfg.per_device_train_batch_size} x {cfg.gradient_accumulation_steps} sequences, precision "
              f"{cfg.precision}, optimizer {cfg.optim}, max_length {cfg.max_length}; device: {first.get('device', '?')}. "
              "Peak memory: " + (first.get("peak_memory_method", "?")) + ". Planner: common.memory's peak_bytes.")
    return report.finish(rows, header, table(rows), {
        "configurations": len(rows),
        "per_method": {r["name"]: {k: r.get(k) for k in (
            "status", "error", "trainable_params", "total_params", "wall_seconds", "train_seconds", "trained_tokens",
            "tokens_per_second", "peak_memory_bytes", "peak_memory_method", "final_train_loss", "eval_loss_before",
            "eval_loss_after")} for r in rows}}, "methods")


if __name__ == "__main__":
    config = parse_config(Config)
    if config.run_one:
        try:
            all_specs = specs(config)
        except checks.CheckFailed as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        sys.exit(compare.worker_main(config, all_specs, eval_before=config.eval_before))
    try:
        sys.exit(main(config))
    except checks.CheckFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
