"""recipes/evaluate.py --harness_tasks: lm-evaluation-harness on the tiny model, beside the recipe's own metrics.

Needs the eval extra (bash launch/setup_eval.sh); the whole module is skipped without it. Each run scores
N examples per task with short replies, so the module takes well under a minute on 2 cores. lm-eval must
give the recipe's own replies for the same prompts, score the model in its three forms (base + adapter
through `peft=`, merged folder, base alone) as the recipe does, and never open a network connection.
"""
import importlib.util
import json
import socket

import pytest
import torch

from conftest import REPO, run
from test_merge_export import load_recipe, make_adapter

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                reason="lm-eval is not installed: it is the optional eval extra (bash launch/setup_eval.sh)")

LAUNCHER = ["bash", str(REPO / "launch" / "evaluate.sh")]
TASKS = ["persona_keywords", "general_keywords", "intent_classification"]
N = 4


def short(**extra):
    return {"max_new_tokens": 8, "max_examples": N, "domain_dataset_path": str(REPO / "data/persona/heldout.jsonl"),
            "general_dataset_path": str(REPO / "data/eval/general.jsonl"), **extra}


def replies(generations, which, name, strip=False):
    return [g["reply"].strip() if strip else g["reply"] for g in generations[which][name]]


@pytest.fixture(scope="module")
def harness_run(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    adapter = make_adapter(tiny_dir, root / "run")
    out = root / "adapter_eval"
    args = [x for k, v in short().items() for x in (f"--{k}", str(v))]
    proc = run(LAUNCHER + ["--model_name_or_path", str(tiny_dir), "--adapter_path", str(adapter), "--output_dir", str(out),
                           "--harness_tasks", "persona_keywords,general_keywords", "intent_classification", *args])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, adapter, out, proc


def test_harness_sets_join_the_recipes_table_deltas_and_forgetting_check(harness_run):
    _, adapter, out, proc = harness_run
    m = json.loads((out / "metrics.json").read_text())
    names = [f"lm-eval:{t}" for t in TASKS]
    assert list(m["results"]) == ["domain", "general", *names] == list(m["baseline_results"])
    for results in (m["results"], m["baseline_results"]):
        for name in names[:2]:
            assert results[name]["examples"] == N and 0 <= results[name]["keyword_accuracy"] <= 1
            assert 0 <= results[name]["exact_match"] <= 1 and "keyword_accuracy_stderr" in results[name]
        assert 0 <= results[names[2]]["accuracy"] <= 1 and "acc_norm" in results[names[2]]
    d = m["deltas"]
    assert d[names[2]]["accuracy"] == pytest.approx(m["results"][names[2]]["accuracy"] - m["baseline_results"][names[2]]["accuracy"])
    f = m["forgetting"]
    assert f["keyword_accuracy"] == pytest.approx(-d["general"]["keyword_accuracy"])  # the recipe's own, unchanged
    assert f["lm-eval:general_keywords/keyword_accuracy"] == pytest.approx(-d[names[1]]["keyword_accuracy"])
    assert f["lm-eval:intent_classification/accuracy"] == pytest.approx(-d[names[2]]["accuracy"])
    assert not any(k.startswith("lm-eval:persona_keywords") for k in f)  # the fine-tuning domain is no forgetting
    h = m["harness"]
    assert h["lm_eval_version"] == "0.4.13" and h["tasks"] == TASKS and h["limit"] == N and h["apply_chat_template"]
    assert h["model_args"]["peft"] == str(adapter) and "peft" not in h["baseline_model_args"]
    assert h["model_args"]["pretrained"] == h["baseline_model_args"]["pretrained"]
    table = (out / "results.md").read_text()
    assert f"| lm-eval:persona_keywords (n={N}) | keyword_accuracy (0-1) |" in table
    assert f"| lm-eval:intent_classification (n={N}) | accuracy (0-1) |" in table
    assert table.split("\n\n", 2)[-1].strip() in proc.stdout
    assert "data/samples/classification.csv" in json.loads((out / "manifest.json").read_text())["datasets"]
    assert "Traceback" not in proc.stderr


def test_lm_eval_replies_are_the_recipes_replies(harness_run):
    """Same greedy replies for the same prompts (lm-eval keeps the leading space the recipe strips), so the keyword
    figures are the same number; the adapter is on in the model's run and off in the baseline's."""
    _, _, out, _ = harness_run
    g = json.loads((out / "generations.json").read_text())
    m = json.loads((out / "metrics.json").read_text())
    for which, results in (("model", m["results"]), ("baseline", m["baseline_results"])):
        for own, task in (("domain", "lm-eval:persona_keywords"), ("general", "lm-eval:general_keywords")):
            assert replies(g, which, task, strip=True) == replies(g, which, own)
            assert results[task]["keyword_accuracy"] == pytest.approx(results[own]["keyword_accuracy"])
            assert [r["prompt"] for r in g[which][task]][0].endswith("<|im_start|>assistant\n")  # the chat template
    assert replies(g, "model", "lm-eval:persona_keywords") != replies(g, "baseline", "lm-eval:persona_keywords")


def test_intent_reply_is_the_most_likely_label_under_the_adapter(harness_run, tiny_dir):
    """multiple_choice: lm-eval's choice is the label with the highest summed log-probability after the templated
    prompt (its own split: the template's trailing newline belongs to the continuation)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common import harness_eval

    _, adapter, out, _ = harness_run
    g = json.loads((out / "generations.json").read_text())["model"]["lm-eval:intent_classification"]
    labels = harness_eval.read_task_yaml(harness_eval.local_tasks()["intent_classification"])["doc_to_choice"]
    tok = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), adapter).eval()
    for row in g:
        context = row["prompt"].rstrip()
        scores = []
        for label in labels:
            whole, ctx = tok.encode(context + "\n" + label), tok.encode(context)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
        assert row["reply"] == labels[max(range(len(labels)), key=scores.__getitem__)]
    accuracy = sum(r["reply"] == r["reference"] for r in g) / len(g)
    assert json.loads((out / "metrics.json").read_text())["results"]["lm-eval:intent_classification"]["accuracy"] == accuracy


def test_merged_folder_and_base_alone_score_what_adapter_and_baseline_did(harness_run, tiny_dir, tmp_path, monkeypatch):
    """The merged export (pretrained=merged) scores what base + adapter (peft=) did; a named baseline folder what the
    adapter-disabled baseline did. Run from another directory, with every network connection refused."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, adapter, out, _ = harness_run
    merged_dir = root / "merged_h"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), adapter).merge_and_unload().save_pretrained(merged_dir)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(merged_dir)

    attempts = []  # recorded, not only raised: lm-eval swallows the errors of its own model-info lookup

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError(f"network connection to {address} refused by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("evaluate")
    m = recipe.main(recipe.Config(model_name_or_path=str(merged_dir), baseline_model_name_or_path=str(tiny_dir),
                                  output_dir=str(tmp_path / "merged_eval"), harness_tasks=TASKS, **short()))
    ref = json.loads((out / "metrics.json").read_text())
    g, ref_g = json.loads((tmp_path / "merged_eval" / "generations.json").read_text()), json.loads((out / "generations.json").read_text())
    assert m["harness"]["model_args"] == {"pretrained": str(merged_dir), "dtype": "float32"}
    for task in (f"lm-eval:{t}" for t in TASKS):
        for key in ("keyword_accuracy", "exact_match", "accuracy", "acc_norm"):
            if key in ref["results"][task]:
                assert m["results"][task][key] == pytest.approx(ref["results"][task][key]), (task, key)
                assert m["baseline_results"][task][key] == pytest.approx(ref["baseline_results"][task][key]), (task, key)
        assert replies(g, "model", task) == replies(ref_g, "model", task)
        assert replies(g, "baseline", task) == replies(ref_g, "baseline", task)
    assert attempts == []


def test_an_unknown_task_is_refused_before_anything_loads(tmp_path, no_model_loads):
    recipe = load_recipe("evaluate")
    with pytest.raises(recipe.checks.CheckFailed, match=r"--harness_tasks persona_keyword: no such lm-eval task; did you "
                                                        r"mean persona_keywords\? Local tasks: general_keywords, "
                                                        r"intent_classification, persona_keywords \(data/lm_eval_tasks\)"):
        recipe.main(recipe.Config(harness_tasks=["persona_keyword"], output_dir=str(tmp_path / "e"), **short()))
    assert not (tmp_path / "e").exists()
