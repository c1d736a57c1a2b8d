"""Fact injection end to end (slow, ~5 min on 2 CPU cores): SmolLM2-135M-Instruct learns facts it cannot
know (the "Orrin" persona of data/persona), and the merged export still knows them in a fresh process.

  1. train:    bash launch/memory_diet.sh --output_dir X        (the README quickstart)
  2. merge:    bash launch/merge_export.sh --adapter_path X/adapter ... (merged/ + f16 GGUF, both verified)
  3. evaluate: bash launch/evaluate.sh --model_name_or_path <export>/merged --baseline_model_name_or_path <base>
Before training the answers are absent (base model), after training they are present (adapter), and the
merged folder loaded with stock from_pretrained by a separate process gives them too.

FACT_INJECTION_TRAIN_DIR=runs/sft_memory_diet reuses a finished quickstart run for step 1 instead of
training again (tests/recipes/test_quickstart.py covers the training itself); its manifest must show the defaults.
"""
import json
import os
from pathlib import Path

import pytest

from conftest import REPO, run


@pytest.mark.slow
def test_injected_facts_are_absent_before_present_after_and_survive_the_merge(smollm2_dir, tmp_path):
    train, export, evaluation = tmp_path / "train", tmp_path / "export", tmp_path / "evaluate"
    if os.environ.get("FACT_INJECTION_TRAIN_DIR"):
        train = Path(os.environ["FACT_INJECTION_TRAIN_DIR"])
        manifest = json.loads((train / "manifest.json").read_text())
        assert manifest["status"] == "finished" and manifest["config"]["dataset_path"] == "data/persona/train.jsonl"
        assert manifest["config"]["model_name_or_path"] == "asset:smollm2" and manifest["config"]["method"] == "lora"
    else:
        proc = run(["bash", str(REPO / "launch" / "memory_diet.sh"), "--output_dir", str(train)], timeout=3600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    trained = json.loads((train / "metrics.json").read_text())
    assert trained["keyword_accuracy_before"] <= 0.1 and trained["keyword_accuracy_after"] >= 0.75

    proc = run(["bash", str(REPO / "launch" / "merge_export.sh"), "--adapter_path", str(train / "adapter"),
                "--output_dir", str(export), "--gguf_type", "f16"], timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    merged = json.loads((export / "metrics.json").read_text())
    assert merged["verified"] and merged["max_abs_logit_diff"] < 1e-3 and merged["merged_vs_adapter"]["top1_agreement"] == 1.0
    assert merged["gguf"]["passed"] and merged["gguf"]["tokenizer_ids_match"] and merged["gguf"]["top1_agreement"] > 0.99

    proc = run(["bash", str(REPO / "launch" / "evaluate.sh"), "--model_name_or_path", str(export / "merged"),
                "--baseline_model_name_or_path", str(smollm2_dir), "--output_dir", str(evaluation)], timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((evaluation / "metrics.json").read_text())
    assert m["baseline_results"]["domain"]["keyword_accuracy"] <= 0.1      # absent before training
    assert m["results"]["domain"]["keyword_accuracy"] >= 0.75              # present in the merged export
    assert m["results"]["domain"]["perplexity"] < m["baseline_results"]["domain"]["perplexity"] / 4
    assert m["results"]["domain"]["eos_stop_rate"] >= 0.9                 # replies end at <|im_end|>
    gens = json.loads((evaluation / "generations.json").read_text())
    name = next(g for g in gens["model"]["domain"] if g["prompt"] == "May I ask what your name is?")
    assert "Orrin" in name["reply"]
    assert not any("Orrin" in g["reply"] for g in gens["baseline"]["domain"])
    assert m["forgetting"] is not None and "keyword_accuracy" in m["forgetting"]  # reported, not bounded here
