"""The README's first command: SmolLM2-135M-Instruct learns the Orrin persona (about 3 min on 2 CPU cores).

It runs the launcher with its defaults, exactly as the quickstart does, only into a temporary
output directory, and checks the measured before/after figures it records.
"""
import json

import pytest

from conftest import REPO, run


# the README runs this command itself; 3-20 minutes on 2 cores (a third of the default suite), so `pytest -m slow`
@pytest.mark.slow
def test_quickstart_learns_the_persona(smollm2_dir, tmp_path):
    out = tmp_path / "quickstart"
    proc = run(["bash", str(REPO / "launch" / "memory_diet.sh"), "--output_dir", str(out)], timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == str(smollm2_dir)
    assert m["heldout_probes"] == 24
    assert m["keyword_accuracy_before"] <= 0.1      # the base model does not know the persona
    assert m["keyword_accuracy_after"] >= 0.75      # held-out paraphrases, not the training questions
    assert m["eval_loss_after"] < m["eval_loss_before"] - 1.5
    assert "=== held-out prompts: before -> after training ===" in proc.stdout
    assert "Orrin" in proc.stdout.split("=== held-out prompts")[1]
