"""The memory ladder: seed 001's memory experiments as one table, each rung adding one technique.

What it is for: seeing what each memory technique buys (peak memory) and costs (tokens/s) on your
model and data, measured, not assumed. Every rung trains in its own process for the same number of
optimizer steps on the same sequences (effective batch B throughout), so its peak is its own.

    rung              what it adds (cumulative unless it says "instead")
    baseline          full fine-tuning, fp32 weights, AdamW (torch), micro-batch B
    grad_ckpt         + gradient checkpointing (non-reentrant)
    grad_accum        + gradient accumulation: micro-batch 1 x B accumulation steps
    bf16              + bf16: the model is loaded in bf16, so weights, gradients and AdamW states are bf16
                        (torchtune's dtype=bf16), under bf16 autocast
    adamw_8bit        + 8-bit AdamW (bitsandbytes adamw_bnb_8bit)
    paged_adamw_8bit  paged 8-bit AdamW instead (GPU only: paging moves optimizer states between GPU and
                        host memory; on a CPU there is nothing to page, so the rung is skipped with a note)
    adafactor         Adafactor instead of 8-bit AdamW (factored second moment, no first moment)
    lora              + LoRA (on the adamw_8bit rung: frozen bf16 base, fp32 adapters)
    qlora             + QLoRA (the base in 4-bit NF4)
    zero2_offload     DeepSpeed ZeRO-2 + optimizer offload to the host, on the bf16 rung (full fine-tuning;
                        DeepSpeed's CPU Adam steps fp32 master weights and states in host memory)
    zero3_offload     DeepSpeed ZeRO-3 + parameter and optimizer offload
On a CPU, offloading to "the host" moves nothing off the device: the ZeRO rungs show what DeepSpeed
itself costs there (fp32 master weights, buffers), not a saving. The planner column is common.memory's
prediction for the rung (n/a where it does not model it; ZeRO is modelled without offload).

Run:
    bash launch/memory_ladder.sh
    python harnesses/memory_ladder.py --config harnesses/configs/memory_ladder.yaml [--rungs baseline bf16 lora ...]

Writes to --output_dir: memory_ladder.json and .md (the table), loss.png, metrics.json, manifest.json,
runs/<rung>/ (each rung's metrics.json and log.txt). A rung that fails (e.g. DeepSpeed not installed)
is a table row with its error; the exit code is then 1.

Measured here: docs/memory.md, "Memory ladder" (SmolLM2-135M, 2-core CPU VM).
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

from common import checks
from harnesses import compare  # noqa: E402
from harnesses.compare import RunSpec, fmt_loss, gib  # noqa: E402
from common.config import parse_config  # noqa: E402

RECIPE = Path(__file__).stem  # the name follows the file: a copy writes runs/<its name> and "recipe": "<its name>"
log = logging.getLogger(RECIPE)


@dataclass
class Config(compare.CompareConfig):
    output_dir: str = field(default=f"runs/{RECIPE}", metadata={"help": "table, loss.png, metrics.json, manifest.json, runs/<rung>/"})
    rungs: list[str] = field(default_factory=lambda: ["all"], metadata={"help": "rungs to run, in ladder order, or all"})
    full_learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate, full fine-tuning rungs"})
    lora_learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate, LoRA and QLoRA rungs"})


def ladder(cfg: Config) -> list[RunSpec]:
    """The rungs, each built from the one it extends."""
    B = cfg.per_device_train_batch_size
    base = RunSpec(name="baseline", adds=f"full fine-tuning, fp32, AdamW, micro-batch {B}", method="full",
                   precision="fp32", batch=B, accumulation=1, optim="adamw_torch", learning_rate=cfg.full_learning_rate)
    ckpt = replace(base, name="grad_ckpt", adds="+ gradient checkpointing", gradient_checkpointing=True)
    accum = replace(ckpt, name="grad_accum", adds=f"+ gradient accumulation (1 x {B})", batch=1, accumulation=B)
    bf16 = replace(accum, name="bf16", adds="+ bf16 weights, gradients, optimizer states", precision="bf16")
    adam8 = replace(bf16, name="adamw_8bit", adds="+ 8-bit AdamW (bitsandbytes)", optim="adamw_bnb_8bit")
    paged = replace(adam8, name="paged_adamw_8bit", adds="paged 8-bit AdamW instead", optim="paged_adamw_8bit",
                    skip_on_cpu="GPU only: paging moves optimizer states between GPU and host memory; on a CPU "
                                "paged_adamw_8bit is adamw_8bit (the row above)")
    adafactor = replace(adam8, name="adafactor", adds="Adafactor instead of 8-bit AdamW", optim="adafactor")
    lora = replace(adam8, name="lora", adds="+ LoRA (frozen bf16 base)", method="lora",
                   learning_rate=cfg.lora_learning_rate)
    qlora = replace(lora, name="qlora", adds="+ QLoRA (4-bit NF4 base)", method="qlora")
    zero2 = replace(bf16, name="zero2_offload", adds="ZeRO-2 + optimizer offload (full, on the bf16 rung)",
                    zero_stage=2, offload="optimizer")
    zero3 = replace(zero2, name="zero3_offload", adds="ZeRO-3 + parameter and optimizer offload", zero_stage=3,
                    offload="optimizer+params")
    rungs = [base, ckpt, accum, bf16, adam8, paged, adafactor, lora, qlora, zero2, zero3]
    if cfg.rungs == ["all"]:
        return rungs
    names = [r.name for r in rungs]
    unknown = [r for r in cfg.rungs if r not in names]
    if unknown:
        raise checks.CheckFailed(f"--rungs: unknown {unknown}; choose from {', '.join(names)} or all")
    return [r for r in rungs if r.name in cfg.rungs]


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["name"] == "baseline" and r["status"] == "ok"), None)

    def versus(value, ref):
        return f"{round(100 * (value / ref - 1)):+d}%" if base and ref else ""

    lines = ["| rung | adds | method | precision | micro-batch x accum | ckpt | optimizer | trainable params | "
             "peak GiB | vs baseline | planner GiB | tokens/s | vs baseline | final train loss | eval loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["spec"]
        head = (f"| {r['name']} | {s['adds']} | {s['method']} | {s['precision']} | {s['batch']} x {s['accumulation']} | "
                f"{'yes' if s['gradient_checkpointing'] else 'no'} | "
                f"{s['optim'] if not s['zero_stage'] else 'DeepSpeed CPU Adam'} |")
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']}: {r.get('error') or r.get('note')} |  |  |  |  |  |  |  |")
            continue
        planner = gib(r["planner"]["bytes"]) + ("*" if r["planner"].get("note") and r["planner"]["bytes"] else "")
        lines.append(
            f"{head} {r['trainable_params']:,} | {gib(r['peak_memory_bytes'])} | "
            f"{versus(r['peak_memory_bytes'], base and base['peak_memory_bytes'])} | {planner} | "
            f"{r['tokens_per_second']:.0f} | {versus(r['tokens_per_second'], base and base['tokens_per_second'])} | "
            f"{fmt_loss(r['final_train_loss'])} | {fmt_loss(r['eval_loss_after'])} |")
    notes = sorted({r["planner"]["note"] for r in rows if r.get("status") == "ok" and r["planner"].get("note")
                    and r["planner"]["bytes"]})
    return "\n".join(lines + ([""] + [f"\\* {n}" for n in notes] if notes else []))


def main(cfg: Config) -> int:
    rungs = ladder(cfg)
    report = compare.Report(RECIPE, cfg)
    rows = compare.run_all(cfg, rungs, __file__)
    first = compare.first_ok(rows)
    header = (f"Model {first.get('model', cfg.model_name_or_path)}, {cfg.max_steps} optimizer steps of "
              f"{cfg.per_device_train_batch_size} sequences per rung, max_length {cfg.max_length}; device: "
              f"{first.get('device', '?')}. Peak memory: {first.get('peak_memory_method', '?')}. Planner: "
              "common.memory's peak_bytes. Tokens/s: non-pad tokens trained per second of training.")
    return report.finish(rows, header, table(rows), {
        "rungs": len(rows), "skipped": [r["name"] for r in rows if r["status"] == "skipped"],
        "per_rung": {r["name"]: {k: r.get(k) for k in (
            "status", "error", "note", "trainable_params", "total_params", "wall_seconds", "train_seconds",
            "trained_tokens", "tokens_per_second", "peak_memory_bytes", "peak_memory_method", "final_train_loss",
            "eval_loss_after")} | {"planner_peak_bytes": (r.get("planner") or {}).get("bytes")} for r in rows}}, "rungs")


if __name__ == "__main__":
    config = parse_config(Config)
    try:
        if config.run_one:
            sys.exit(compare.worker_main(config, ladder(replace(config, rungs=["all"])), eval_before=False))
        sys.exit(main(config))
    except checks.CheckFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
