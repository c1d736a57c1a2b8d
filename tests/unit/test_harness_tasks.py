"""The local lm-eval tasks (data/lm_eval_tasks) and common/harness_eval.py's pieces that need no lm-eval.

The tasks must score the same files the same way recipes/evaluate.py does: same prompts, same keyword rule,
same labels. Their run under lm-eval is tests/recipes/test_harness_eval.py (skipped without the extra).
"""
import ast
import importlib.util
import json

import jinja2
import pytest

from common import harness_eval
from common.data import load_dataset_file
from conftest import REPO

TASKS = {"persona_keywords": ("domain", "chat"), "general_keywords": ("general", "chat"),
         "intent_classification": ("general", "classification")}


def utils_module():
    spec = importlib.util.spec_from_file_location("_lm_eval_task_utils", harness_eval.TASKS_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def records_of(cfg):
    path = REPO / cfg["dataset_kwargs"]["data_files"][cfg["test_split"]]
    return load_dataset_file(str(path))


def test_the_local_tasks_parse_and_read_files_that_exist():
    assert set(harness_eval.local_tasks()) == set(TASKS)
    defined = {n.name for n in ast.parse((harness_eval.TASKS_DIR / "utils.py").read_text()).body
               if isinstance(n, ast.FunctionDef)}
    for name, path in harness_eval.local_tasks().items():
        cfg = harness_eval.read_task_yaml(path)
        role, fmt = TASKS[name]
        assert cfg["metadata"]["role"] == role and cfg["dataset_path"] in ("json", "csv")
        assert set(cfg["dataset_kwargs"]["data_files"]) == {cfg["test_split"]} == {"test"}  # local files, no hub split
        records, detected = records_of(cfg)
        assert detected == fmt and len(records) >= 12
        functions = [v for k, v in cfg.items() if k.startswith(("doc_to_", "process_")) and str(v).startswith("utils.")]
        assert all(f.split(".", 1)[1] in defined for f in functions), functions
        assert path.read_text().startswith("# ") and "--include_path data/lm_eval_tasks" in path.read_text()


def test_metric_names_are_the_recipes_and_every_metric_is_declared():
    utils = utils_module()
    for name, path in harness_eval.local_tasks().items():
        cfg = harness_eval.read_task_yaml(path)
        declared = {m["metric"] for m in cfg["metric_list"]}
        assert all(m["aggregation"] == "mean" and m["higher_is_better"] is True for m in cfg["metric_list"])
        if cfg["output_type"] == "generate_until":
            doc = records_of(cfg)[0][0].data
            assert set(utils.keyword_results(doc, ["x"])) == declared == {"keyword_accuracy", "exact_match"}
            assert cfg["generation_kwargs"]["do_sample"] is False
            assert cfg["generation_kwargs"]["until"] == []  # else lm-eval also cuts at "\n\n": not the recipe's replies
        else:
            assert cfg["output_type"] == "multiple_choice" and declared == {"acc", "acc_norm"}
    assert harness_eval.RENAMED == {"acc": "accuracy"}  # lands in the recipe's accuracy row


def test_keyword_tasks_prompt_and_score_as_the_recipe_does():
    from common.config import load_recipe
    from common.evaluation import keyword_accuracy, normalize_answer

    recipe, utils = load_recipe(REPO / "recipes" / "evaluate.py"), utils_module()
    for name in ("persona_keywords", "general_keywords"):
        cfg = harness_eval.read_task_yaml(harness_eval.local_tasks()[name])
        records, fmt = records_of(cfg)
        items = recipe.build_items(records, fmt, "reply")
        for r, prompt, reference, keywords in zip(records, items["prompts"], items["references"], items["keywords"]):
            assert utils.last_user_message(r.data) == prompt[-1]["content"] and prompt[-1]["role"] == "user"
            assert utils.reference_reply(r.data) == reference
            for reply in (reference, reference.upper(), "no idea", reference.replace(keywords[0], "")):
                assert utils.keyword_results(r.data, [reply])["keyword_accuracy"] == keyword_accuracy([reply], [keywords])
                assert utils.keyword_results(r.data, [reply])["exact_match"] == float(
                    normalize_answer(reply) == normalize_answer(reference))
    for text in ("  The  Paris!", "card_arrival", "An apple, a day.", "Orrin"):
        assert utils.normalize_answer(text) == normalize_answer(text)  # the task's copy is the recipe's rule


def test_intent_task_has_the_files_labels_and_the_recipes_prompt():
    from common.config import load_recipe

    recipe = load_recipe(REPO / "recipes" / "evaluate.py")
    cfg = harness_eval.read_task_yaml(harness_eval.local_tasks()["intent_classification"])
    records, _ = records_of(cfg)
    labels = sorted({str(r.data["label"]) for r in records})
    assert cfg["doc_to_choice"] == labels and cfg["doc_to_target"] == "label"
    template = jinja2.Template(cfg["doc_to_text"])
    for r in records:
        assert template.render(**r.data) == recipe.classification_prompt(r.data["text"], labels)[0]["content"]


def test_task_names_data_files_and_three_model_forms(tiny_dir, tmp_path):
    assert harness_eval.split_tasks(["a,b", " c ", "a"]) == ["a", "b", "c"] and harness_eval.split_tasks([]) == []
    assert harness_eval.data_files(["persona_keywords", "hellaswag"]) == ["data/persona/heldout.jsonl"]  # cwd: the repo
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_dir)}))
    (adapter / "tokenizer_config.json").write_text("{}")
    base = {"pretrained": str(tiny_dir.resolve()), "dtype": "float32"}
    import torch

    assert harness_eval.model_args(str(tiny_dir), None, torch.float32) == base  # a model folder or a merged export
    with_adapter = {**base, "tokenizer": str(adapter), "peft": str(adapter)}
    assert harness_eval.model_args(str(tiny_dir), str(adapter), torch.float32) == with_adapter
    assert harness_eval.model_args(str(adapter), None, torch.float32) == with_adapter  # an adapter folder as the model
    assert harness_eval.model_args(str(adapter), None, torch.float32, with_adapter=False) == {**base, "tokenizer": str(adapter)}
    assert harness_eval.model_args(str(tiny_dir), None, torch.bfloat16)["dtype"] == "bfloat16"


RAW = {  # the shape lm_eval.simple_evaluate returns, cut down
    "results": {"persona_keywords": {"alias": "persona_keywords", "keyword_accuracy,none": 0.5,
                                     "keyword_accuracy_stderr,none": 0.25, "exact_match,none": 0.0},
                "intent_classification": {"acc,none": 0.75, "acc_stderr,none": "N/A", "acc_norm,none": 0.5},
                "gsm8k": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.5}},
    "n-samples": {"persona_keywords": {"original": 24, "effective": 4}, "intent_classification": {"effective": 4},
                  "gsm8k": {"effective": 4}},
    "configs": {"persona_keywords": {"metadata": {"role": "domain"}}, "intent_classification": {"metadata": {}},
                "gsm8k": {}},
    "samples": {"intent_classification": [{"arguments": [["ctx", "a"], ["ctx", "b"]], "filtered_resps": [[-3.0, False], [-1.0, True]],
                                           "target": "b", "filter": "none"}],
                "persona_keywords": [{"arguments": [["<prompt>", {"until": []}]], "filtered_resps": [" Orrin."],
                                      "target": "Orrin.", "filter": "none"}]},
}


def test_lm_eval_results_become_recipe_sets_and_forgetting_leaves_out_the_domain():
    sets, rows, roles = harness_eval.to_sets(RAW)
    assert sets["lm-eval:persona_keywords"] == {"examples": 4, "task": "persona_keywords", "keyword_accuracy": 0.5,
                                                "keyword_accuracy_stderr": 0.25, "exact_match": 0.0}
    assert sets["lm-eval:intent_classification"] == {"examples": 4, "task": "intent_classification", "accuracy": 0.75,
                                                     "acc_norm": 0.5}  # "N/A" stderr dropped
    assert sets["lm-eval:gsm8k (strict-match)"]["exact_match"] == 0.25 and sets["lm-eval:gsm8k (flexible-extract)"]["exact_match"] == 0.5
    assert rows["lm-eval:intent_classification"] == [{"prompt": "ctx", "reference": "b", "reply": "b"}]
    assert rows["lm-eval:persona_keywords"] == [{"prompt": "<prompt>", "reference": "Orrin.", "reply": " Orrin."}]
    assert roles == {"lm-eval:persona_keywords": "domain", "lm-eval:intent_classification": "general",
                     "lm-eval:gsm8k (strict-match)": "general", "lm-eval:gsm8k (flexible-extract)": "general"}
    scores = harness_eval.Scores(sets, None, roles=roles)
    delta = {"lm-eval:persona_keywords": {"keyword_accuracy": 0.5}, "lm-eval:intent_classification": {"accuracy": -0.25},
             "general": {"keyword_accuracy": -0.5}}
    assert harness_eval.forgetting(delta, scores) == {"lm-eval:intent_classification/accuracy": 0.25}
    results, baseline, generations = {"general": {}}, {"general": {}}, {"model": {}, "baseline": {}}
    harness_eval.fold(harness_eval.Scores(sets, dict(sets), {"model": rows, "baseline": rows}), results, baseline, generations)
    assert list(results)[0] == "general" and set(results) == set(baseline) == {"general", *sets}
    assert set(generations["baseline"]) == set(rows)


def test_without_lm_eval_the_check_names_the_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(harness_eval.checks.CheckFailed, match=r"^--harness_tasks needs lm-eval, an optional extra; "
                       r"install it with bash launch/setup_eval.sh \(or: pip install -r requirements-eval.txt\)$"):
        harness_eval.check_tasks(["persona_keywords"])
    assert (REPO / "requirements-eval.txt").read_text().count("lm-eval[hf]==0.4.13") == 1
    assert "requirements-eval.txt" in (REPO / "launch" / "setup_eval.sh").read_text()
