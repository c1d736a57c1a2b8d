"""recipes/evaluate.py and the metric functions in common/evaluation.py.

Metrics are checked on hand-computed inputs; the recipe runs on the tiny model in its three forms
(base + adapter, merged export, base alone) and must give the same numbers for the same weights.
"""
import json
import math

import pytest
import torch

from conftest import REPO, run
from test_merge_export import load_recipe, make_adapter

LAUNCHER = ["bash", str(REPO / "launch" / "evaluate.sh")]


# ---------------------------------------------------------------------------------------------
# metrics on hand-checked inputs
# ---------------------------------------------------------------------------------------------
def test_text_metrics_on_hand_checked_inputs():
    from common.evaluation import normalize_answer, text_metrics

    same = ["the cat sat on the mat", "Paris is the capital of France."]
    m = text_metrics(same, same)
    assert m["rouge1"] == m["rouge2"] == m["rougeL"] == 1.0 and m["exact_match"] == 1.0
    assert m["bleu"] == pytest.approx(100.0) and m["chrf"] == pytest.approx(100.0)
    m = text_metrics(["xyz qqq"], ["the cat sat on the mat"])
    assert m["rouge1"] == m["rougeL"] == m["bleu"] == m["exact_match"] == 0.0
    # "the cat sat" against "the cat sat on the mat": unigram P = 3/3, R = 3/6 -> F1 = 2/3; bigrams P 2/2, R 2/5
    m = text_metrics(["the cat sat"], ["the cat sat on the mat"])
    assert m["rouge1"] == pytest.approx(2 / 3) and m["rougeL"] == pytest.approx(2 / 3)
    assert m["rouge2"] == pytest.approx(2 * 1 * 0.4 / 1.4)
    # corpus BLEU needs 4-grams: identical one-word replies score 0, ROUGE-2 too (no bigram)
    m = text_metrics(["Orrin."], ["Orrin."])
    assert m["bleu"] == 0.0 and m["rouge2"] == 0.0 and m["rouge1"] == 1.0 and m["exact_match"] == 1.0
    assert normalize_answer("  The  Paris!") == "paris" and normalize_answer("card_arrival") == "card arrival"


def test_label_parsing_for_classification():
    from common.evaluation import parse_label

    labels = ["card_arrival", "pin_blocked", "lost_or_stolen_card"]
    assert parse_label("card_arrival", labels) == "card_arrival"
    assert parse_label("Card arrival.", labels) == "card_arrival"
    assert parse_label("The intent is pin_blocked", labels) == "pin_blocked"
    assert parse_label("pin_blocked or card_arrival", labels) is None  # two labels: not an answer
    assert parse_label("I am not sure", labels) is None


def test_perplexity_is_token_weighted_and_matches_a_manual_computation(tiny_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from common.collator import tokenize_sft
    from common.evaluation import perplexity, token_weighted_nll

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A spider has eight legs."}],
             [{"role": "user", "content": "What is the capital of France? Tell me."}, {"role": "assistant", "content": "Paris."}],
             [{"role": "user", "content": "Translate good morning."}, {"role": "assistant", "content": "Buenos dias, my friend, buenos dias."}]]
    feats, _ = tokenize_sft([("", c, {}) for c in convs], tiny_tokenizer, 256)
    total, count = 0.0, 0  # by hand: one unpadded sequence at a time, NLL of each labelled next token
    per_example = []
    with torch.no_grad():
        for f in feats:
            ids = torch.tensor([f["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            nll = [-logp[i - 1, f["input_ids"][i]].item() for i in range(1, len(f["input_ids"])) if f["loss_mask"][i]]
            total, count = total + sum(nll), count + len(nll)
            per_example.append(sum(nll) / len(nll))
    assert count == sum(sum(f["loss_mask"]) for f in feats)  # every labelled token (EOS included; none is first)
    nll_sum, n = token_weighted_nll(model, feats, tiny_tokenizer.pad_token_id, batch_size=2)  # padded batches
    assert n == count and nll_sum == pytest.approx(total, rel=1e-5)
    assert perplexity(nll_sum, n) == pytest.approx(math.exp(total / count), rel=1e-5)
    mean_of_means = sum(per_example) / len(per_example)
    assert abs(mean_of_means - total / count) > 1e-3  # the unweighted mean is a different number


def test_batched_generation_left_pads_and_matches_one_at_a_time(tiny_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from common.evaluation import generate_batched

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    prompts = [tiny_tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
               for c in ["hi", "What is the capital of France? Tell me please in one sentence.", "My card has not arrived yet."]]
    batched = generate_batched(model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=3)
    alone = [generate_batched(model, tiny_tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert [g.text for g in batched] == [g.text for g in alone]
    assert tiny_tokenizer.padding_side == "right"  # restored
    # the failure the left padding avoids: a right-padded batch continues the short prompt after its pads
    tiny_tokenizer.padding_side = "right"
    enc = tiny_tokenizer(prompts[:2], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    right = tiny_tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert right != alone[0].text


class ScriptedModel(torch.nn.Module):
    """generate() returns the prompt followed by fixed tokens: checks how replies are cut, not a model."""

    def __init__(self, continuations):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuations = continuations

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.kwargs = kwargs
        rows = [c[:max_new_tokens] + [3] * (max_new_tokens - len(c[:max_new_tokens])) for c in self.continuations]
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_replies_are_cut_at_the_first_stop_token(tiny_tokenizer):
    from common.evaluation import generate_batched, stop_token_ids

    tok = tiny_tokenizer
    a, b = tok("Paris", add_special_tokens=False)["input_ids"], tok(" is big", add_special_tokens=False)["input_ids"]
    model = ScriptedModel([a + [2] + b, a + b])  # 2 = <|im_end|>: row 0 stops, row 1 runs to max_new_tokens
    n = len(a + b) + 1
    gens = generate_batched(model, tok, ["x", "y"], max_new_tokens=n)
    assert gens[0].text == "Paris" and gens[0].stopped_at_eos and gens[0].new_tokens == len(a)
    assert gens[1].text == "Paris is big" and not gens[1].stopped_at_eos and gens[1].new_tokens == n
    assert model.kwargs["eos_token_id"] == [2] == stop_token_ids(tok) and model.kwargs["pad_token_id"] == 3


def test_results_table_and_deltas_on_hand_checked_figures():
    from common.evaluation import deltas, results_table

    model = {"general": {"examples": 6, "loss": 1.5, "perplexity": 4.4817, "keyword_accuracy": 0.5, "labels": ["a"]}}
    baseline = {"general": {"examples": 6, "loss": 2.0, "perplexity": 7.389, "keyword_accuracy": 0.75}}
    assert deltas(model, baseline) == {"general": {"loss": -0.5, "perplexity": pytest.approx(-2.9073),
                                                   "keyword_accuracy": -0.25}}
    table = results_table(model, baseline).splitlines()
    assert table[0] == "| set | metric | baseline | model | delta (model - baseline) |"
    assert table[2] == "| general (n=6) | perplexity (exp(token-weighted NLL)) | 7.389 | 4.482 | -2.907 |"
    assert table[3] == "| general (n=6) | loss (token-weighted NLL, nats) | 2 | 1.5 | -0.5 |"
    assert table[4] == "| general (n=6) | keyword_accuracy (0-1) | 0.75 | 0.5 | -0.25 |" and len(table) == 5
    alone = results_table(model, None).splitlines()
    assert alone[0] == "| set | metric | model |" and alone[3] == "| general (n=6) | loss (token-weighted NLL, nats) | 1.5 |"


def test_the_model_under_test_must_be_a_model_or_an_adapter_folder(tmp_path, tiny_dir, no_model_loads):
    from common.checks import CheckFailed
    from common.evaluation import load_model_under_test

    cpu = torch.device("cpu")
    with pytest.raises(CheckFailed, match="the folder holds no config.json; pass the folder save_pretrained wrote"):
        load_model_under_test(str(tmp_path), None, cpu, torch.float32)
    with pytest.raises(CheckFailed, match=f"--adapter_path {tmp_path}: no adapter_config.json there"):
        load_model_under_test(str(tiny_dir), str(tmp_path), cpu, torch.float32)


# ---------------------------------------------------------------------------------------------
# the recipe in its three forms
# ---------------------------------------------------------------------------------------------
def short(**extra):
    return {"max_new_tokens": 8, "classification_max_new_tokens": 6, "max_examples": 6,
            "domain_dataset_path": str(REPO / "data/persona/heldout.jsonl"),
            "general_dataset_path": str(REPO / "data/eval/general.jsonl"), **extra}


@pytest.fixture(scope="module")
def adapter_eval(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    adapter = make_adapter(tiny_dir, root / "run")
    out = root / "adapter_eval"
    args = [x for k, v in short().items() for x in (f"--{k}", str(v))]
    proc = run(LAUNCHER + ["--model_name_or_path", str(tiny_dir), "--adapter_path", str(adapter), "--output_dir",
                           str(out), "--classification_dataset_path", "data/samples/classification.csv", *args])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, adapter, out, proc


def test_base_plus_adapter_against_the_base_writes_every_metric(adapter_eval):
    _, adapter, out, proc = adapter_eval
    assert "recipes/evaluate.py --config" in proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"].endswith(f"+ adapter {adapter}") and m["baseline"].endswith("(adapter disabled)")
    for results in (m["results"], m["baseline_results"]):
        assert set(results) == {"domain", "general", "classification"}
        for name in ("domain", "general"):
            r = results[name]
            for key in ("perplexity", "loss", "rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact_match",
                        "keyword_accuracy", "eos_stop_rate", "mean_new_tokens", "labelled_tokens"):
                assert r[key] is not None and math.isfinite(r[key]), (name, key)
            assert r["perplexity"] == pytest.approx(math.exp(r["loss"])) and r["examples"] == 6
        c = results["classification"]
        assert c["chance_accuracy"] == 1 / 8 and len(c["labels"]) == 8 and 0 <= c["accuracy"] <= 1
    d = m["deltas"]["general"]
    assert d["loss"] == pytest.approx(m["results"]["general"]["loss"] - m["baseline_results"]["general"]["loss"])
    assert m["results"]["domain"]["loss"] != m["baseline_results"]["domain"]["loss"]  # the adapter is on
    assert m["forgetting"]["keyword_accuracy"] == pytest.approx(-d["keyword_accuracy"])
    table = (out / "results.md").read_text()
    assert "| set | metric | baseline | model | delta (model - baseline) |" in table and "| general (n=6) | perplexity" in table
    assert table.split("\n\n", 2)[-1].strip() in proc.stdout
    gens = json.loads((out / "generations.json").read_text())
    assert len(gens["model"]["domain"]) == len(gens["baseline"]["general"]) == 6
    assert {"prompt", "reference", "reply", "stopped_at_eos"} <= set(gens["model"]["domain"][0])
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merged_export_and_base_alone_give_the_same_numbers(adapter_eval, tiny_dir):
    """The merged weights score what base + adapter scored; the base alone scores what the baseline did."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, adapter, out, _ = adapter_eval
    merged_dir = root / "merged"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), adapter).merge_and_unload().save_pretrained(merged_dir)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(merged_dir)
    recipe = load_recipe("evaluate")
    merged = recipe.main(recipe.Config(model_name_or_path=str(merged_dir), baseline_model_name_or_path=str(tiny_dir),
                                       output_dir=str(root / "merged_eval"),
                                       classification_dataset_path=str(REPO / "data/samples/classification.csv"), **short()))
    base = recipe.main(recipe.Config(model_name_or_path=str(tiny_dir), output_dir=str(root / "base_eval"), **short()))
    ref = json.loads((out / "metrics.json").read_text())
    ref_gens = json.loads((out / "generations.json").read_text())
    merged_gens = json.loads((root / "merged_eval" / "generations.json").read_text())
    for name in ("domain", "general", "classification"):
        assert merged["results"][name]["loss"] == pytest.approx(ref["results"][name]["loss"], abs=1e-4)
        assert merged["baseline_results"][name]["loss"] == pytest.approx(ref["baseline_results"][name]["loss"], abs=1e-6)
        assert [g["reply"] for g in merged_gens["model"][name]] == [g["reply"] for g in ref_gens["model"][name]]
    for name in ("domain", "general"):
        assert base["results"][name]["loss"] == pytest.approx(ref["baseline_results"][name]["loss"], abs=1e-6)
    assert base["baseline_results"] is None and base["deltas"] is None  # no adapter, no baseline named
    assert "classification" not in base["results"]


def test_an_adapter_folder_passed_as_the_model_is_read_as_base_plus_adapter(adapter_eval, tmp_path):
    recipe = load_recipe("evaluate")
    _, adapter, _, _ = adapter_eval
    m = recipe.main(recipe.Config(model_name_or_path=str(adapter), output_dir=str(tmp_path / "e"), compare_baseline=False,
                                  **short(max_examples=2, general_dataset_path="")))
    assert m["model"].endswith(f"+ adapter {adapter}") and set(m["results"]) == {"domain"}


def test_unscorable_data_is_refused_before_loading(tmp_path):
    recipe = load_recipe("evaluate")
    with pytest.raises(recipe.checks.CheckFailed, match="format 'preference' cannot be scored"):
        recipe.main(recipe.Config(domain_dataset_path=str(REPO / "data/samples/preference.jsonl"),
                                  output_dir=str(tmp_path / "e")))
    assert not (tmp_path / "e").exists()


def test_harness_tasks_without_lm_eval_is_one_error_line(tmp_path):
    """lm-eval is an optional extra: without it --harness_tasks stops before anything loads, naming the install."""
    import sys

    out = tmp_path / "e"
    code = ("import runpy, sys; sys.modules['lm_eval'] = None; "  # as if not installed, whether it is or not
            f"sys.argv = ['recipes/evaluate.py', '--harness_tasks', 'persona_keywords', '--output_dir', {str(out)!r}]; "
            "runpy.run_path('recipes/evaluate.py', run_name='__main__')")
    proc = run([sys.executable, "-c", code])
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == ("error: --harness_tasks needs lm-eval, an optional extra; install it "
                                                    "with bash launch/setup_eval.sh (or: pip install -r requirements-eval.txt)")
    assert "Traceback" not in proc.stderr and not out.exists()
