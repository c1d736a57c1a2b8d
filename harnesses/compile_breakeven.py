"""When does `--torch_compile` pay? recipes/sft_memory_diet.py eager, then compiled, on the same steps.

What it is for: the figures behind common/compile.py's BREAK_EVEN (the constants `--torch_compile auto` decides
from). Each run is its own process with its own empty inductor cache (a user's first compile, not a warm cache):

  eager     --torch_compile false
  compiled  --torch_compile true (every decoder layer, from optimizer step 1)

Both run the recipe's default YAML (SmolLM2-135M-Instruct, packed micro-batches 4 x 4 accumulation) for --steps
optimizer steps, without evaluation or generations. From the step times the recipe records (metrics.json
"torch_compile": "step_seconds"):

  steady step      the median of the second half of a run's steps
  overhead         the time beyond the steady step of the run's first steps, up to the first step that takes
                   under 1.5 x steady (later slow steps are the machine's, not the compile's: `outlier_steps`
                   counts those over 3 x steady, a sign of CPU contention from other processes)
  compile_seconds  the compiled run's overhead minus the eager run's (its warm-up); the compiled overhead alone
                   when the eager run started slower still (a machine effect: `compile_seconds_from` says which)
  speedup          eager steady / compiled steady
  break_even_steps compile_seconds / (eager steady - compiled steady); null when compiled steps are not faster

Run (>= 10 minutes for the published figures; the machine's load is recorded next to them):
    python harnesses/compile_breakeven.py --steps 80 --output runs/compile_breakeven/breakeven.json
"""
from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

from common.config import parse_config  # noqa: E402
from common.run_files import cpu_model  # noqa: E402

RECIPE = Path(__file__).stem
REPO = Path(__file__).resolve().parent.parent
SFT = REPO / "recipes" / "sft_memory_diet.py"
MODES = {"eager": "false", "compiled": "true"}


@dataclass
class Config:
    model_name_or_path: str = field(default="asset:smollm2", metadata={"help": "the model both runs train"})
    steps: int = field(default=80, metadata={"help": "optimizer steps per run", "min": 4})
    output_dir: str = field(default=f"runs/{RECIPE}", metadata={"help": "the two recipe runs go to <output_dir>/<mode>"})
    output: str = field(default=f"runs/{RECIPE}/breakeven.json", metadata={"help": "the JSON figures"})
    recipe_args: str = field(default="", metadata={"help": "extra recipe flags for both runs, one string: \"--precision fp32\""})


def steady(seconds: list[float]) -> float:
    return statistics.median(seconds[len(seconds) // 2:])


def overhead(seconds: list[float], steady_seconds: float) -> float:
    total = 0.0
    for s in seconds:
        if s < 1.5 * steady_seconds:
            break
        total += s - steady_seconds
    return total


def figures(eager: list[float], compiled: list[float]) -> dict:
    """Compile seconds, steady step times, speed-up and break-even steps from the two runs' step times."""
    n = min(len(eager), len(compiled))
    eager, compiled = eager[:n], compiled[:n]
    e, c = steady(eager), steady(compiled)
    warmup_eager, compiled_overhead = overhead(eager, e), overhead(compiled, c)
    compile_seconds = compiled_overhead - warmup_eager
    source = "compiled overhead - eager warm-up"
    if compile_seconds <= 0:
        compile_seconds, source = compiled_overhead, "compiled overhead alone (the eager warm-up was longer)"
    saving = e - c
    return {"steps": n, "eager_step_seconds": round(e, 4), "compiled_step_seconds": round(c, 4),
            "speedup": round(e / c, 4), "compile_seconds": round(compile_seconds, 2),
            "eager_warmup_seconds": round(warmup_eager, 2), "compiled_overhead_seconds": round(compiled_overhead, 2),
            "compile_seconds_from": source,
            "break_even_steps": round(compile_seconds / saving, 1) if saving > 0 else None,
            "outlier_steps": {"eager": sum(s > 3 * e for s in eager), "compiled": sum(s > 3 * c for s in compiled)}}


def run_recipe(cfg: Config, mode: str) -> dict:
    out = Path(cfg.output_dir) / mode
    cmd = [sys.executable, str(SFT), "--model_name_or_path", cfg.model_name_or_path, "--output_dir", str(out),
           "--torch_compile", MODES[mode], "--max_steps", str(cfg.steps), "--save_steps", str(cfg.steps),
           "--eval_dataset_path", "null", "--sample_generations", "0", "--resume", "false", *shlex.split(cfg.recipe_args)]
    with tempfile.TemporaryDirectory(prefix="inductor_") as cache:  # a cold compile, as a user's first run
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        start, load = time.time(), os.getloadavg()
        print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the {mode} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"command": " ".join(cmd), "wall_seconds": round(time.time() - start, 1),
            "load_average_before": [round(x, 2) for x in load], "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "train_seconds": metrics["train_seconds"], "final_train_loss": metrics["final_train_loss"],
            "precision": metrics["precision"], "batching": metrics["batching"],
            "step_seconds": metrics["torch_compile"]["step_seconds"]}


def refigure(path: str) -> dict:
    """The figures again from the step times in a JSON this harness wrote (after a change to `figures`)."""
    result = json.loads(Path(path).read_text())
    result.update(figures(result["runs"]["eager"]["step_seconds"], result["runs"]["compiled"]["step_seconds"]))
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(cfg: Config) -> dict:
    import torch

    runs = {mode: run_recipe(cfg, mode) for mode in MODES}
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    result = {**figures(runs["eager"]["step_seconds"], runs["compiled"]["step_seconds"]),
              "model": cfg.model_name_or_path, "cpu": cpu_model(), "cores": os.cpu_count(),
              "avx512_bf16": "avx512_bf16" in flags, "torch": torch.__version__,
              "total_wall_seconds": round(sum(r["wall_seconds"] for r in runs.values()), 1), "runs": runs}
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    return result


if __name__ == "__main__":
    main(parse_config(Config))
