"""harnesses/memory_ladder.py (through its launcher) on the tiny model: rows, skips, failures."""
import json

import pytest

from conftest import REPO, run

LAUNCHER = ["bash", str(REPO / "launch" / "memory_ladder.sh")]
ALL_RUNGS = ["baseline", "grad_ckpt", "grad_accum", "bf16", "adamw_8bit", "paged_adamw_8bit", "adafactor", "lora",
             "qlora", "zero2_offload", "zero3_offload"]


def ladder(tiny_dir, out, *extra, env=None):
    return run(LAUNCHER + ["--model_name_or_path", str(tiny_dir), "--output_dir", str(out), "--max_steps", "2",
                           "--per_device_train_batch_size", "4", *extra], env={"OMP_NUM_THREADS": "1", **(env or {})})


def rows(out):
    return {r["name"]: r for r in json.loads((out / "memory_ladder.json").read_text())["rows"]}


@pytest.mark.slow  # ~20-30 s on 2 cores; the default suite keeps under 15 minutes
def test_a_failing_rung_is_a_row_with_its_error_and_the_ladder_goes_on(tiny_dir, tmp_path):
    """DeepSpeed hidden from the rung processes (sys.modules['deepspeed'] = None at interpreter start, so
    transformers/accelerate see it as not installed): the ZeRO rung fails with a clear error, the rungs
    around it still run, the paged rung is skipped on CPU, and the exit code says something failed."""
    hide = tmp_path / "hide_deepspeed"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['deepspeed'] = None\n")
    out = tmp_path / "ladder"
    proc = ladder(tiny_dir, out, "--rungs", "baseline", "grad_accum", "paged_adamw_8bit", "lora", "zero2_offload",
                  env={"PYTHONPATH": str(hide)})
    assert proc.returncode == 1
    assert "error: 1 of 5 rungs failed" in proc.stderr and "Traceback" not in proc.stderr.split("error: 1 of 5")[1]
    r = rows(out)
    assert list(r) == ["baseline", "grad_accum", "paged_adamw_8bit", "lora", "zero2_offload"]
    assert r["zero2_offload"]["status"] == "failed" and r["zero2_offload"]["rc"] == 1
    assert r["zero2_offload"]["error"].startswith("DeepSpeed is not importable") and "pip install" in r["zero2_offload"]["error"]
    assert r["paged_adamw_8bit"]["status"] == "skipped" and "GPU only" in r["paged_adamw_8bit"]["note"]
    for name in ("baseline", "grad_accum", "lora"):
        assert r[name]["status"] == "ok" and r[name]["peak_memory_bytes"] > 0 and r[name]["tokens_per_second"] > 0
        assert r[name]["planner"]["bytes"] > 0 and r[name]["optimizer_steps"] == 2
    assert (r["baseline"]["spec"]["batch"], r["baseline"]["spec"]["accumulation"]) == (4, 1)
    assert (r["grad_accum"]["spec"]["batch"], r["grad_accum"]["spec"]["accumulation"]) == (1, 4)
    assert r["grad_accum"]["spec"]["gradient_checkpointing"] and r["lora"]["spec"]["optim"] == "adamw_bnb_8bit"
    # the same sequences whatever the micro-batch: every rung trains the same tokens
    assert r["baseline"]["trained_tokens"] == r["grad_accum"]["trained_tokens"] == r["lora"]["trained_tokens"]
    assert r["baseline"]["trainable_params"] == r["baseline"]["total_params"] > r["lora"]["trainable_params"] > 0
    assert r["baseline"]["eval_loss_before"] is None  # the ladder evaluates after training only

    md = (out / "memory_ladder.md").read_text()
    assert "| zero2_offload |" in md and "failed: DeepSpeed is not importable" in md
    assert "| paged_adamw_8bit |" in md and "skipped: GPU only" in md
    baseline_line = next(line for line in md.splitlines() if line.startswith("| baseline |"))
    assert "| +0% |" in baseline_line
    m = json.loads((out / "metrics.json").read_text())
    assert m["failed"] == ["zero2_offload"] and m["skipped"] == ["paged_adamw_8bit"]
    assert m["per_rung"]["lora"]["planner_peak_bytes"] > 0


def test_unknown_rung_is_refused(tiny_dir, tmp_path):
    proc = ladder(tiny_dir, tmp_path / "x", "--rungs", "baseline", "fp8")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--rungs: unknown ['fp8']" in proc.stderr and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_every_rung_runs_on_cpu(tiny_dir, tmp_path):
    """All eleven rungs, DeepSpeed ZeRO-2/3 with offload included (~5 min on the 2-core VM)."""
    out = tmp_path / "ladder"
    proc = ladder(tiny_dir, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = rows(out)
    assert list(r) == ALL_RUNGS
    assert r.pop("paged_adamw_8bit")["status"] == "skipped"
    for name, row in r.items():
        assert row["status"] == "ok" and row["peak_memory_bytes"] > 0 and row["optimizer_steps"] == 2, name
    assert r["zero2_offload"]["optimizer"] == "deepspeed.DeepSpeedCPUAdam"
    assert r["zero2_offload"]["trainable_params"] == r["baseline"]["trainable_params"]
    assert r["zero3_offload"]["parameters_changed"] is None  # partitioned: not compared
    assert len({row["trained_tokens"] for row in r.values()}) == 1
