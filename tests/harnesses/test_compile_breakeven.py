"""harnesses/compile_breakeven.py: its arithmetic, and (slow) both recipe runs on the tiny model."""
import json
import sys

import pytest

from conftest import REPO, run

sys.path.insert(0, str(REPO))
from harnesses.compile_breakeven import figures  # noqa: E402


def test_figures_compile_seconds_speedup_and_break_even():
    eager = [10.0, 2.0, 2.0, 2.0, 2.0, 2.0]  # 8 s of warm-up in step 1, steady 2 s
    compiled = [58.0, 3.0, 1.5, 1.5, 1.5, 1.5]  # 56.5 + 1.5 s beyond steady 1.5 s; minus the eager warm-up: 50 s
    f = figures(eager, compiled)
    assert f["eager_step_seconds"] == 2.0 and f["compiled_step_seconds"] == 1.5 and f["speedup"] == pytest.approx(1.3333)
    assert f["eager_warmup_seconds"] == 8.0 and f["compile_seconds"] == 50.0
    assert f["break_even_steps"] == 100.0  # 50 s / 0.5 s saved per step
    assert figures(eager, [60.0] + [2.5] * 5)["break_even_steps"] is None  # compiled steps slower: never pays
    busy = figures([2.0, 2.0, 60.0, 2.0, 2.0, 2.0], compiled)  # a slow step later is contention, not warm-up
    assert busy["eager_warmup_seconds"] == 0.0 and busy["compile_seconds"] == 58.0 and busy["outlier_steps"] == {
        "eager": 1, "compiled": 1}
    slow_start = figures([80.0] + [2.0] * 5, compiled)  # the eager run started slower than the compiled one
    assert slow_start["compile_seconds"] == 58.0 and slow_start["compile_seconds_from"].startswith("compiled overhead alone")


@pytest.mark.slow
def test_the_harness_runs_eager_and_compiled_on_the_tiny_model(tiny_dir, tmp_path):
    out = tmp_path / "breakeven.json"
    proc = run([sys.executable, str(REPO / "harnesses" / "compile_breakeven.py"), "--model_name_or_path",
                str(tiny_dir), "--steps", "6", "--output_dir", str(tmp_path / "runs"), "--output", str(out),
                "--recipe_args", "--precision fp32"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["steps"] == 6 and set(result["runs"]) == {"eager", "compiled"}
    for key in ("compile_seconds", "eager_step_seconds", "compiled_step_seconds", "speedup", "cpu", "torch"):
        assert result[key] is not None, key
    assert result["runs"]["compiled"]["final_train_loss"] == pytest.approx(result["runs"]["eager"]["final_train_loss"],
                                                                            rel=1e-4)
    assert all(len(r["step_seconds"]) == 6 for r in result["runs"].values())
