"""metrics.json of a resumed run covers the whole run (every segment) in the DPO, reward-model and multi-GPU
QLoRA recipes, as in sft_memory_diet (tests/recipes/test_run_safety.py): a 4-step run saving every 2 steps, then the
same run interrupted after checkpoint-2 (its later checkpoint and final files deleted) and resumed."""
import json
import socket
import sys

import pytest

from conftest import REPO, run

# both runs in one process (the imports take most of a tiny run's time); between them the run "dies" after
# checkpoint-2: its later checkpoint and final files are deleted
TWICE = """
import json, os, runpy, shutil, sys
from pathlib import Path
import torch.distributed as dist
recipe, out = sys.argv[1], Path(sys.argv[sys.argv.index("--output_dir") + 1])
sys.argv = [recipe] + sys.argv[2:]
ns = runpy.run_path(recipe, run_name="recipe_under_test")
from common.config import parse_config
def once():
    parsed = parse_config(ns.get("CONFIGS", ns["Config"]))
    ns["main"](*(parsed if isinstance(parsed, tuple) else (parsed,)))
once()
if dist.is_initialized():  # under torchrun: rank 0 writes metrics.json after the others returned
    dist.barrier()
if os.environ.get("RANK", "0") == "0":
    (out.parent / "uninterrupted.json").write_text((out / "metrics.json").read_text())
    for name in ("metrics.json", "checkpoint-4", "adapter", "loss.png", "generations.json"):
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
if dist.is_initialized():
    dist.barrier()
once()
"""


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_twice(recipe, tiny_dir, out, *extra, launch=("-c", TWICE)):
    cmd = [sys.executable, *launch, f"recipes/{recipe}.py", "--config", f"recipes/configs/{recipe}.yaml",
           "--model_name_or_path", str(tiny_dir), "--output_dir", str(out), "--precision", "fp32",
           "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", *extra]
    proc = run(cmd, env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resuming from {out / 'checkpoint-2'}" in proc.stderr
    a = json.loads((out.parent / "uninterrupted.json").read_text())
    assert [(s["start_step"], s["end_step"]) for s in a["segments"]] == [(0, 4)]
    b = json.loads((out / "metrics.json").read_text())
    assert [(s["start_step"], s["end_step"]) for s in b["segments"]] == [(0, 2), (2, 4)]
    assert b["segments_complete"] is True and b["optimizer_steps"] == 4
    assert b["trained_tokens"] == a["trained_tokens"] > 0
    assert b["mean_train_loss"] == pytest.approx(a["mean_train_loss"], abs=1e-5)
    assert b["train_seconds"] == pytest.approx(sum(s["train_seconds"] for s in b["segments"]), abs=0.01)
    return a, b


def test_dpo_resumed_metrics_cover_both_segments(tiny_dir, tmp_path):
    a, b = run_twice("dpo", tiny_dir, tmp_path / "dpo", "--learning_rate", "3e-3", "--sample_generations", "0")
    assert 0 < b["segments"][1]["trained_tokens"] < a["trained_tokens"]  # the last segment alone is not it


def test_reward_model_resumed_metrics_cover_both_segments(tiny_dir, tmp_path):
    a, b = run_twice("reward_model", tiny_dir, tmp_path / "rm", "--learning_rate", "3e-3")
    assert 0 < b["segments"][1]["_total_train_tokens"] < a["trained_tokens"]


def test_multigpu_qlora_resumed_metrics_cover_both_segments(tiny_dir, tmp_path):
    """Under torchrun with one process (the recipe's gloo TrainingArguments need a launcher): each rank's counters
    are its own; segments.json and metrics.json carry the sums over ranks."""
    driver = tmp_path / "twice.py"
    driver.write_text(TWICE)
    a, b = run_twice("sft_multigpu_qlora", tiny_dir, tmp_path / "mg", launch=(
        "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", free_port(), str(driver)))
    seg = b["segments"][1]
    assert 0 < seg["trained_tokens"] < a["trained_tokens"]
    assert seg["trained_tokens"] == sum(r["trained_tokens"] for r in b["per_rank"])  # this segment's ranks
    for key in ("trained_labelled_tokens", "trained_positions"):
        assert b[key] == a[key] > 0
