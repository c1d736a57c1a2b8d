"""Memory planner validation: predicted vs measured peak memory over real training runs.

What it is for: checking `common.memory` (the planner) against what the training recipes actually
use on this machine. Each LoRA/QLoRA configuration runs `launch/memory_diet.sh` (recipes/sft_memory_diet.py),
each full fine-tuning one (method=full) `launch/adapter_vs_full.sh --methods full` (harnesses/compare.py,
the repo's full fine-tuning path: the model loaded in `precision`, so bf16 is pure bf16), as a subprocess
for a few optimizer steps on sequences that are all exactly `seq` tokens long; it reads
`peak_memory_bytes` from the run's metrics.json and compares it with the planner's `peak_bytes` for the
same settings (LoRA rank, dropout and alpha as the recipe's YAML has them, as the runs use them). Peak memory is what the recipe measures: on CUDA torch.cuda.max_memory_allocated, on
CPU the process's peak resident set size (VmHWM), which includes the Python interpreter, libraries
and data; the planner models that part as a measured constant baseline (memory.CPU_BASELINE_BYTES).

Run:
    python harnesses/memory_validation.py --config harnesses/configs/memory_validation.yaml
    python harnesses/memory_validation.py --config harnesses/configs/memory_validation.yaml --only lora_b4_s256 qlora_b4_s256
    python harnesses/memory_validation.py --output_dir runs/lora_vs_full \
        --configurations "name=lora_b2_s512 method=lora batch=2 seq=512" "name=full_b2_s512 method=full batch=2 seq=512"

Writes to --output_dir: memory_validation.json and .md (the table: predicted, measured, error %),
predicted_vs_measured.png, metrics.json (summary), manifest.json, and runs/<name>/ (each recipe run,
its output in runs/<name>.log). A configuration whose run already finished in runs/<name> is not run
again (its measurement is re-read and re-predicted); delete that folder to measure again. One that did
not finish (a timeout, a failure, a signal) is measured again from the start, never resumed.
SIGTERM/SIGINT stop the running configuration and exit 75 (common.child); rerun the same command.

MoE rows (`model=moe:<arch>[_small]`: a random MoE model of common/moe.py, built once into <output_dir>/models/):
    python harnesses/memory_validation.py --output_dir runs/memory_validation_moe --configurations \
        "name=moe_mixtral_small_experts_b2_s256 model=moe:mixtral_small method=lora batch=2 seq=256 targets=q_proj,v_proj,experts precision=fp32"

The MoE table: docs/moe.md, "Memory planner".

Measured here: the table in docs/memory.md, "Memory planner" (2-core CPU VM, no GPU): about 5 minutes per
configuration on the shared, loaded VM, an hour for the 12 in the config.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

from common import child, memory  # noqa: E402
from common.assets import resolve_model_path  # noqa: E402
from common.config import parse_config  # noqa: E402
from common.run_files import now, write_json, write_manifest  # noqa: E402

RECIPE = Path(__file__).stem  # the name follows the file: a copy writes runs/<its name> and "recipe": "<its name>"
log = logging.getLogger(RECIPE)
REPO = Path(__file__).resolve().parent.parent
SPEC_KEYS = {"name", "model", "method", "batch", "seq", "ckpt", "optim", "precision", "targets", "r", "mmap_threshold"}


@dataclass
class Config:
    output_dir: str = field(default=f"runs/{RECIPE}", metadata={"help": "where the table, the JSON and each run's folder go"})
    model_name_or_path: str = field(default="asset:smollm2", metadata={"help": "model for configurations that name none (local dir or asset:tiny / asset:smollm2)"})
    configurations: list[str] = field(default_factory=lambda: ["name=lora_b4_s256 method=lora batch=4 seq=256"], metadata={"help": "one spec per configuration: name=... [model=] method=lora|qlora|full batch=N seq=N [ckpt=true] [optim=] [precision=bf16|fp32] [targets=all-linear|q_proj,v_proj] [r=16] [mmap_threshold=BYTES: run with MALLOC_MMAP_THRESHOLD_]"})
    only: list[str] = field(default_factory=list, metadata={"help": "run only these configuration names"})
    max_steps: int = field(default=2, metadata={"help": "optimizer steps per run (the peak is reached in the first two)"})
    timeout: int = field(default=1800, metadata={"help": "seconds before a run is abandoned"})
    seed: int = field(default=42, metadata={"help": "seed for the synthetic data and the runs"})


def parse_spec(spec: str) -> dict:
    out = {"ckpt": "false", "optim": "adamw_torch", "precision": "bf16", "targets": "all-linear", "r": "16"}
    for item in spec.split():
        key, _, value = item.partition("=")
        if key not in SPEC_KEYS or not value:
            raise SystemExit(f"error: configuration {spec!r}: {item!r} is not key=value with a key in {sorted(SPEC_KEYS)}")
        out[key] = value
    for key in ("name", "method", "batch", "seq"):
        if key not in out:
            raise SystemExit(f"error: configuration {spec!r} needs {key}=")
    return out


def write_long_conversations(path: Path, count: int, seed: int) -> None:
    """Chat data whose every example is longer than any seq: a short first turn (so EOS is a label,
    which the recipe checks) and a long second one that truncation cuts at exactly max_length."""
    rng = random.Random(seed)
    words = ("the hive is quiet in the morning and loud by noon bees carry pollen from borage and clover a "
             "keeper checks the frames for brood honey and mites before the summer flow starts").split()
    with open(path, "w") as f:
        for k in range(count):
            long = " ".join(rng.choice(words) for _ in range(1500))
            messages = [{"role": "user", "content": f"Say {k}."}, {"role": "assistant", "content": f"{k}."},
                        {"role": "user", "content": "Tell me about the hive. " + long},
                        {"role": "assistant", "content": long}]
            f.write(json.dumps({"messages": messages}) + "\n")


def recipe_command(spec: dict, model: str, run_dir: Path, data: Path, cfg: Config) -> list[str]:
    if spec["method"] == "full":  # the repo's full fine-tuning path (harnesses/compare.py); metrics in runs/full/
        return ["bash", "launch/adapter_vs_full.sh", "--methods", "full", "--model_name_or_path", model,
                "--output_dir", str(run_dir), "--dataset_path", str(data), "--eval_dataset_path", "",
                "--eval_before", "false", "--max_steps", str(cfg.max_steps),
                "--per_device_train_batch_size", spec["batch"], "--gradient_accumulation_steps", "1",
                "--max_length", spec["seq"], "--gradient_checkpointing", spec["ckpt"], "--optim", spec["optim"],
                "--precision", spec["precision"], "--seed", str(cfg.seed)]
    targets = ["all-linear"] if spec["targets"] == "all-linear" else spec["targets"].split(",")
    return ["bash", "launch/memory_diet.sh", "--model_name_or_path", model, "--output_dir", str(run_dir),
            "--dataset_path", str(data), "--eval_dataset_path", "", "--method", spec["method"],
            "--max_steps", str(cfg.max_steps), "--per_device_train_batch_size", spec["batch"],
            "--gradient_accumulation_steps", "1", "--max_length", spec["seq"],
            "--gradient_checkpointing", spec["ckpt"], "--optim", spec["optim"], "--precision", spec["precision"],
            "--lora_r", spec["r"], "--lora_alpha", str(2 * int(spec["r"])), "--lora_target_modules", *targets,
            "--save_steps", "100000", "--logging_steps", "1", "--sample_generations", "0", "--seed", str(cfg.seed)]


def moe_model(name: str, out: Path) -> str:
    """`moe:mixtral`, `moe:qwen2_moe_small`, ...: a random MoE model (common/moe.py) built once under <out>/models."""
    from common.moe import build_tiny_moe

    arch = name[len("moe:"):]
    folder = out / "models" / arch
    if not (folder / "config.json").is_file():
        build_tiny_moe(arch.removesuffix("_small"), folder, "small" if arch.endswith("_small") else "tiny")
    return str(folder)


def metrics_path(spec: dict, run_dir: Path) -> Path:
    return run_dir / "runs" / "full" / "metrics.json" if spec["method"] == "full" else run_dir / "metrics.json"


def labelled_fraction(model_dir: str, data: Path, seq: int, count: int) -> float:
    """Share of the first `count` training sequences' positions whose next token is labelled: where both recipes
    run the LM head (common.trainer.labelled_logits_inputs). Tokenized as the recipes tokenize."""
    from transformers import AutoTokenizer

    from common.collator import tokenize_sft
    from common.data import load_dataset_file, to_messages

    records, fmt = load_dataset_file(str(data))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    features, _ = tokenize_sft([(f"{r.path}:{r.line}", to_messages(r.data, fmt), r.data) for r in records[:count]],
                               tokenizer, seq)
    return sum(sum(f["loss_mask"]) for f in features) / sum(len(f["input_ids"]) for f in features)


def predict(spec: dict, model_dir: str, device: str, fraction: float = 1.0) -> dict:
    """The planner for the run recipe_command starts: dropout from the recipe's YAML (memory.recipe_defaults);
    harnesses/compare.py runs its gradient check outside autocast, sft_memory_diet.py like a training step.
    `fraction`: labelled positions, where both recipes' training steps run the LM head."""
    s = memory.Settings(method=spec["method"], lora_r=int(spec["r"]), lora_targets=spec["targets"],
                        seq_len=int(spec["seq"]), batch_size=int(spec["batch"]),
                        optim=spec["optim"], dtype=spec["precision"], grad_ckpt=spec["ckpt"] == "true", device=device,
                        cpu_heap_retention=0.0 if spec.get("mmap_threshold") else -1.0,
                        check_autocast=spec["method"] != "full", labelled_fraction=fraction)
    return memory.plan(model_dir, s)


def table(rows: list[dict]) -> str:
    gib = 1024**3
    lines = ["| configuration | model | method | batch x seq | ckpt | optim | precision | predicted GiB | predicted peak phase | "
             "measured GiB | error | measured above baseline GiB | error above baseline |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["spec"]
        if r.get("measured_bytes") is None:
            lines.append(f"| {s['name']} | {Path(r['model']).name} | {s['method']} | {s['batch']} x {s['seq']} | {s['ckpt']} | "
                         f"{s['optim']} | {s['precision']} | {r['predicted_bytes'] / gib:.2f} | {r['prediction']['peak_phase']} | "
                         f"failed (rc {r.get('rc')}) | | | |")
            continue
        lines.append(
            f"| {s['name']} | {Path(r['model']).name} | {s['method']} | {s['batch']} x {s['seq']} | {s['ckpt']} | {s['optim']} | "
            f"{s['precision']} | {r['predicted_bytes'] / gib:.2f} | {r['prediction']['peak_phase']} | {r['measured_bytes'] / gib:.2f} | "
            f"{r['error_percent']:+.1f}% | {r['measured_above_baseline'] / gib:.2f} | {r['error_above_baseline_percent']:+.1f}% |")
    ok = [r for r in rows if r.get("error_percent") is not None]
    if ok:
        worst = max(abs(r["error_percent"]) for r in ok)
        mean = sum(abs(r["error_percent"]) for r in ok) / len(ok)
        lines.append(f"\n{len(ok)} configurations; mean |error| {mean:.1f}%, worst {worst:.1f}% "
                     f"({sum(abs(r['error_percent']) <= 10 for r in ok)} within 10%).")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("measured_bytes")]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    meas = [r["measured_bytes"] / 1024**3 for r in ok]
    pred = [r["predicted_bytes"] / 1024**3 for r in ok]
    ax.scatter(meas, pred)
    for r, x, y in zip(ok, meas, pred):
        ax.annotate(r["spec"]["name"], (x, y), fontsize=6)
    top = max(meas + pred) * 1.1
    ax.plot([0, top], [0, top], "k--", lw=0.8)
    ax.fill_between([0, top], [0, 0.9 * top], [0, 1.1 * top], alpha=0.1, label="within 10%")
    ax.set_xlabel("measured peak (GiB)")
    ax.set_ylabel("predicted peak (GiB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(cfg: Config) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    started = now()
    out = Path(cfg.output_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    specs = [parse_spec(s) for s in cfg.configurations]
    if cfg.only:
        unknown = set(cfg.only) - {s["name"] for s in specs}
        if unknown:
            raise SystemExit(f"error: --only {sorted(unknown)}: no such configuration in {[s['name'] for s in specs]}")
        specs = [s for s in specs if s["name"] in cfg.only]
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = out / "long_conversations.jsonl"
    write_long_conversations(data, max(int(s["batch"]) for s in specs) * (cfg.max_steps + 1) + 8, cfg.seed)
    write_manifest(out, cfg, [str(data)], started, "running")

    rows = []
    for spec in specs:
        model = moe_model(spec["model"], out) if spec.get("model", "").startswith("moe:") else \
            resolve_model_path(spec.get("model", cfg.model_name_or_path))
        run_dir = out / "runs" / spec["name"]
        row = {"spec": spec, "model": model, "device": device}
        fraction = labelled_fraction(model, data, int(spec["seq"]), int(spec["batch"]) * (cfg.max_steps + 1))
        prediction = predict(spec, model, device, fraction)
        row.update(predicted_bytes=prediction["peak_bytes"], prediction=prediction, labelled_fraction=round(fraction, 4))
        metrics_file = metrics_path(spec, run_dir)
        if not metrics_file.is_file():
            cmd = recipe_command(spec, model, run_dir, data, cfg)
            log.info("%s: %s", spec["name"], " ".join(c if c else '""' for c in cmd))
            env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1")
            if spec.get("mmap_threshold"):                     # a fixed glibc mmap threshold (see CHRONICLES)
                env["MALLOC_MMAP_THRESHOLD_"] = spec["mmap_threshold"]
            shutil.rmtree(run_dir, ignore_errors=True)  # a stopped earlier attempt: resuming it would measure a part
            result = child.run(cmd, out / "runs" / f"{spec['name']}.log", cwd=REPO, env=env, timeout=cfg.timeout)
            if result.interrupted:
                child.exit_stopped(f"{spec['name']} did not finish; rerun the same command: the measured "
                                   "configurations are reused")
            rc = "timeout" if result.timed_out else result.returncode
            row["run_seconds"] = round(result.seconds, 1)
            if rc != 0:
                log.error("%s failed (rc %s); last output in %s", spec["name"], rc, out / "runs" / f"{spec['name']}.log")
                row["rc"] = rc
                rows.append(row)
                continue
        m = json.loads(metrics_file.read_text())
        expected_tokens = cfg.max_steps * int(spec["batch"]) * int(spec["seq"])
        baseline = m.get("baseline_rss_bytes") or 0
        row.update(
            measured_bytes=m["peak_memory_bytes"], measured_method=m.get("peak_memory_method"),
            measured_baseline_bytes=baseline, trained_tokens=m.get("trained_tokens"),
            full_length_sequences=m.get("trained_tokens") == expected_tokens,
            error_percent=round(100 * (prediction["peak_bytes"] - m["peak_memory_bytes"]) / m["peak_memory_bytes"], 1))
        above_pred = prediction["peak_bytes"] - (memory.CPU_BASELINE_BYTES if device == "cpu" else 0)
        above_meas = m["peak_memory_bytes"] - (baseline if device == "cpu" else 0)
        row.update(measured_above_baseline=above_meas,
                   error_above_baseline_percent=round(100 * (above_pred - above_meas) / above_meas, 1))
        if not row["full_length_sequences"]:
            log.warning("%s: trained %s tokens, expected %d: not every sequence was %s tokens long",
                        spec["name"], m.get("trained_tokens"), expected_tokens, spec["seq"])
        log.info("%s: predicted %.2f GiB (peak: %s), measured %.2f GiB (%+.1f%%)", spec["name"],
                 prediction["peak_bytes"] / 1024**3, prediction["peak_phase_description"],
                 m["peak_memory_bytes"] / 1024**3, row["error_percent"])
        rows.append(row)

    md = table(rows)
    header = (f"Predicted (`python -m common.memory ... --device {device}`) vs measured peak memory "
              f"(`peak_memory_bytes` in each run's metrics.json: "
              f"{'torch.cuda.max_memory_allocated' if device == 'cuda' else 'process peak RSS, VmHWM'}), "
              f"{cfg.max_steps} optimizer steps per run, every sequence exactly `seq` tokens.\n\n")
    (out / "memory_validation.md").write_text(header + md + "\n")
    write_json(out / "memory_validation.json", {"device": device, "rows": rows})
    plot(rows, out / "predicted_vs_measured.png")
    ok = [r for r in rows if r.get("error_percent") is not None]
    summary = {"recipe": RECIPE, "device": device, "configurations": len(rows), "measured": len(ok),
               "mean_abs_error_percent": round(sum(abs(r["error_percent"]) for r in ok) / len(ok), 2) if ok else None,
               "max_abs_error_percent": max((abs(r["error_percent"]) for r in ok), default=None),
               "within_10_percent": sum(abs(r["error_percent"]) <= 10 for r in ok)}
    write_json(out / "metrics.json", summary)
    write_manifest(out, cfg, [str(data)], started, "finished")
    print(md)
    return summary


if __name__ == "__main__":
    config = parse_config(Config)
    main(config)
