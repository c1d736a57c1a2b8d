"""recipes/reward_model.py on the tiny model through its launcher; preference data validation; the
guards in common/preference.py (score head trainable, pad token distinct from EOS)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny matmuls: OpenMP sync costs more than a 2nd thread gains
LAUNCHER = ["bash", str(REPO / "launch" / "reward_model.sh")]


def train(tiny_dir, out, *extra):
    return run(LAUNCHER + ["--model_name_or_path", str(tiny_dir), "--output_dir", str(out), "--precision", "fp32",
                           "--max_steps", "6", "--learning_rate", "3e-3", "--logging_steps", "1", *extra], env=ONE_THREAD)


@pytest.fixture(scope="module")
def lora_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "lora"
    proc = train(tiny_dir, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_run_directory_follows_the_contract(lora_run):
    out, proc = lora_run
    assert "recipes/reward_model.py --config recipes/configs/reward_model.yaml" in proc.stderr  # the launcher echoes
    m = json.loads((out / "metrics.json").read_text())
    for key in ("final_train_loss", "eval_loss_before", "eval_loss_after", "heldout_accuracy_before",
                "heldout_accuracy_after", "heldout_margin_before", "heldout_margin_after", "trained_tokens",
                "tokens_per_second", "wall_seconds", "peak_memory_bytes", "peak_memory_method", "trainable_params",
                "total_params", "world_size", "device", "estimated_cost_usd"):
        assert m[key] is not None, key
    assert m["optimizer_steps"] == 6 and m["world_size"] == 1 and m["heldout_pairs"] == 24
    lora = 2 * ((16 * 64 + 64 * 16) * 2 + (16 * 64 + 32 * 16) * 2 + (16 * 64 + 128 * 16) * 2 + (16 * 128 + 64 * 16))
    assert m["trainable_params"] == lora + 64  # + the score head (64 -> 1), trained in full
    assert m["heldout_accuracy_after"] > m["heldout_accuracy_before"]
    assert m["eval_loss_after"] < m["eval_loss_before"]
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_adapter_and_score_trained_base_frozen_and_figures_reproduce(lora_run, tiny_dir):
    """The saved adapter (LoRA + score head) loads on the untouched base and reproduces the recorded accuracy."""
    from common.preference import load_preference, load_reward_model, pairwise_eval

    out, _ = lora_run
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 14 and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: every one trained
    assert any(k.startswith("base_model.model.score") for k in adapter)  # the head is saved in full
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1)
    peft_model = PeftModel.from_pretrained(base, out / "adapter")
    original = load_file(tiny_dir / "model.safetensors")
    for name, p in peft_model.base_model.model.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, original["model." + name.replace(".base_layer", "")]), name
    model, tokenizer = load_reward_model(str(out / "adapter"))
    figures = pairwise_eval(model, tokenizer, load_preference(REPO / "data/preference/heldout.jsonl"))
    recorded = json.loads((out / "metrics.json").read_text())
    assert figures["accuracy"] == pytest.approx(recorded["heldout_accuracy_after"])
    assert figures["margin"] == pytest.approx(recorded["heldout_margin_after"], abs=1e-4)


@pytest.mark.slow
def test_full_fine_tune_changes_every_weight(tiny_dir, tmp_path):
    out = tmp_path / "full"
    proc = train(tiny_dir, out, "--method", "full", "--max_steps", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = load_file(out / "model" / "model.safetensors")
    original = load_file(tiny_dir / "model.safetensors")
    for name, tensor in saved.items():
        if name != "score.weight":
            assert not torch.equal(tensor, original[name]), f"{name} did not change"
    assert json.loads((out / "metrics.json").read_text())["trainable_params"] == sum(t.numel() for t in saved.values())


# ---------------------------------------------------------------- preference data (item 5)

def test_preference_data_validates():
    """data/preference: conversational prompt/chosen/rejected, 94 train + 24 held-out, no prompt shared."""
    from common.data import load_dataset_file

    train, fmt = load_dataset_file(REPO / "data/preference/train.jsonl", "preference")
    heldout, _ = load_dataset_file(REPO / "data/preference/heldout.jsonl", "preference")
    assert fmt == "preference" and (len(train), len(heldout)) == (94, 24)
    prompts = {r.data["prompt"][-1]["content"] for r in train}
    assert not prompts & {r.data["prompt"][-1]["content"] for r in heldout}
    rejected_train = {r.data["rejected"][0]["content"] for r in train}
    assert not rejected_train & {r.data["rejected"][0]["content"] for r in heldout}  # held-out styles are new


PLANTED = {
    "identical.jsonl": ('{"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": '
                        '"Hello."}], "rejected": [{"role": "assistant", "content": "Hello. "}]}\n',
                        "`chosen` is identical to `rejected`, so the pair carries no preference signal; drop it or "
                        "fix the rejected response"),
    "empty_response.jsonl": ('{"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", '
                             '"content": "Hello."}], "rejected": [{"role": "assistant", "content": "  "}]}\n',
                             "rejected[0] (assistant) content is empty or whitespace only; write the assistant text or "
                             "drop the turn"),
    "empty_plain.jsonl": ('{"prompt": "Hi?", "chosen": "", "rejected": "Go away."}\n',
                          "`chosen` is empty or whitespace only; write the text or drop the record"),
    "user_in_response.jsonl": ('{"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "user", '
                               '"content": "Hello."}], "rejected": [{"role": "assistant", "content": "No."}]}\n',
                               "chosen[0] is user; `chosen` must hold only assistant messages - put earlier turns in "
                               "`prompt`"),
}


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_bad_preference_pair_is_reported_with_its_line(tmp_path, name):
    text, message = PLANTED[name]
    bad = tmp_path / name
    bad.write_text(text)
    validate = run(["python", "-m", "common.data", "validate", str(bad), "--format", "preference"])
    assert (validate.returncode, validate.stderr) == (1, f"{bad}:1: {message}\n")


def test_bad_preference_pair_stops_the_recipe_before_the_model_loads(tmp_path):
    text, message = PLANTED["identical.jsonl"]
    bad = tmp_path / "identical.jsonl"
    bad.write_text(text)
    proc = run(LAUNCHER + ["--dataset_path", str(bad), "--output_dir", str(tmp_path / "out"), "--model_name_or_path",
                           "/nonexistent-never-loaded"])
    assert proc.returncode == 1 and f"error: {bad}:1: {message}" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- guards

def test_pairs_longer_than_max_length_are_an_error_not_silently_dropped(tiny_dir, tmp_path):
    """TRL's RewardTrainer filters out pairs longer than max_length without a word; the recipe refuses them,
    naming file:line, before it writes anything."""
    from common.checks import CheckFailed
    from common.config import parse_config
    from recipes.reward_model import CONFIGS, main

    cfg, args = parse_config(CONFIGS, ["--model_name_or_path", str(tiny_dir), "--max_length", "40",
                                       "--output_dir", str(tmp_path / "never")])
    with pytest.raises(CheckFailed, match=r"pairs are longer than --max_length 40 \(TRL's RewardTrainer would drop "
                                          r"them without a word\): data/preference/train.jsonl:1 \("):
        main(cfg, args)
    assert not (tmp_path / "never").exists()

def test_score_head_left_frozen_by_a_lora_config_without_task_type_is_caught(tiny_dir):
    """peft's task_type decides whether the new `score` head trains. A LoraConfig without task_type (as in
    most LoRA snippets) freezes it: the reward model would be a random projection of a LoRA-tuned backbone.
    (task_type CAUSAL_LM on a sequence classifier fails outright in peft 0.21.)"""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from common.checks import CheckFailed
    from common.preference import check_score_head_trainable

    def model(task_type):
        base = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1)
        return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type=task_type))

    frozen = model(None)
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if "score" in n)
    with pytest.raises(CheckFailed, match="score head is frozen"):
        check_score_head_trainable(frozen)
    check_score_head_trainable(model("SEQ_CLS"))
