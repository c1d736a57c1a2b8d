"""recipes/dpo.py on the tiny model through its launcher: DPO with LoRA (reference = adapter disabled),
and the flags: precomputed reference log-probs + another loss type, full fine-tuning with a reference
copy, ORPO and KTO."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny matmuls: OpenMP sync costs more than a 2nd thread gains
LAUNCHER = ["bash", str(REPO / "launch" / "dpo.sh")]
LORA_PARAMS = 2 * ((16 * 64 + 64 * 16) * 2 + (16 * 64 + 32 * 16) * 2 + (16 * 64 + 128 * 16) * 2 + (16 * 128 + 64 * 16))


def train(tiny_dir, out, *extra):
    return run(LAUNCHER + ["--model_name_or_path", str(tiny_dir), "--output_dir", str(out), "--precision", "fp32",
                           "--max_steps", "4", "--learning_rate", "3e-3", "--logging_steps", "1",
                           "--sample_generations", "2", "--max_new_tokens", "8", *extra], env=ONE_THREAD)


@pytest.fixture(scope="module")
def lora_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "lora"
    proc = train(tiny_dir, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_run_directory_follows_the_contract(lora_run):
    out, proc = lora_run
    assert "recipes/dpo.py --config recipes/configs/dpo.yaml" in proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    for key in ("final_train_loss", "heldout_reward_accuracy_before", "heldout_reward_accuracy_after",
                "heldout_reward_margin_before", "heldout_reward_margin_after", "heldout_logp_accuracy_before",
                "heldout_logp_accuracy_after", "trained_tokens", "tokens_per_second", "wall_seconds",
                "peak_memory_bytes", "peak_memory_method", "trainable_params", "total_params", "world_size", "device",
                "estimated_cost_usd"):
        assert m[key] is not None, key
    assert (m["algorithm"], m["method"], m["optimizer_steps"], m["heldout_pairs"]) == ("dpo", "lora", 4, 24)
    assert m["reference"] == "adapter disabled (no copy)"
    assert m["trainable_params"] == LORA_PARAMS and m["lora_modules"] == 14
    # before training the policy *is* the reference: every implicit reward is 0, so accuracy 0 and margin 0
    assert (m["heldout_reward_accuracy_before"], m["heldout_reward_margin_before"]) == (0.0, 0.0)
    assert m["heldout_reward_accuracy_after"] > 0.5 and m["heldout_reward_margin_after"] > 0
    assert m["reference_logps_max_abs_change"] == 0.0  # adapter disabled after training == the start model
    assert [s["step"] for s in m["train_log"]] == [1, 2, 3, 4]
    gens = json.loads((out / "generations.json").read_text())
    assert len(gens["before"]) == len(gens["after"]) == 2
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"


def test_lora_trained_base_and_reference_untouched_and_margin_reproduces(lora_run, tiny_dir):
    """Every LoRA B moved; every base weight (which, adapter disabled, is the reference) is bit-identical to
    the file it came from; the saved adapter reproduces the recorded held-out margin against the saved
    reference log-probs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.preference import load_preference
    from common.preference import completion_logps, preference_figures, tokenize_pairs

    out, _ = lora_run
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 14 and all(v.abs().sum() > 0 for v in lora_b)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out / "adapter")
    original = load_file(tiny_dir / "model.safetensors")
    for name, p in model.base_model.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, original[name.replace(".base_layer", "")]), name
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    pairs = tokenize_pairs(tokenizer, load_preference(REPO / "data/preference/heldout.jsonl"))
    reference = {k: torch.tensor(v) for k, v in json.loads((out / "before.json").read_text())["logps"].items()}
    figures = preference_figures(completion_logps(model, pairs, tokenizer.pad_token_id, False), reference, 0.1)
    m = json.loads((out / "metrics.json").read_text())
    assert figures["reward_margin"] == pytest.approx(m["heldout_reward_margin_after"], abs=1e-4)
    assert figures["reward_accuracy"] == pytest.approx(m["heldout_reward_accuracy_after"])


@pytest.mark.slow
def test_precomputed_reference_and_ipo_loss(tiny_dir, tmp_path):
    proc = train(tiny_dir, tmp_path / "ipo", "--precompute_ref_log_probs", "true", "--loss_type", "ipo", "--beta", "0.5",
                 "--max_steps", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((tmp_path / "ipo" / "metrics.json").read_text())
    assert (m["loss_type"], m["beta"], m["precompute_ref_log_probs"]) == (["ipo"], 0.5, True)
    assert m["reference_logps_max_abs_change"] == 0.0 and m["heldout_reward_margin_after"] != 0.0


@pytest.mark.slow
def test_full_fine_tune_holds_a_frozen_reference_copy(tiny_dir, tmp_path):
    out = tmp_path / "full"
    proc = train(tiny_dir, out, "--method", "full", "--max_steps", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["reference"] == "frozen full copy" and m["reference_logps_max_abs_change"] == 0.0
    saved = load_file(out / "model" / "model.safetensors")
    original = load_file(tiny_dir / "model.safetensors")
    assert set(saved) == set(original)
    for name in saved:
        assert not torch.equal(saved[name], original[name]), f"{name} did not change"


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["orpo", "kto"])
def test_orpo_and_kto_behind_the_algorithm_flag(tiny_dir, tmp_path, algorithm):
    out = tmp_path / algorithm
    proc = train(tiny_dir, out, "--algorithm", algorithm, "--max_steps", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["algorithm"] == algorithm and m["optimizer_steps"] == 2 and m["final_train_loss"] is not None
    assert m["reference"] == ("none (ORPO is reference-free)" if algorithm == "orpo" else "adapter disabled (no copy)")
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)


def test_orpo_with_precomputed_reference_is_refused(tmp_path):
    from common.checks import CheckFailed
    from common.config import parse_config
    from recipes.dpo import CONFIGS, main

    cfg, args = parse_config(CONFIGS, ["--algorithm", "orpo", "--precompute_ref_log_probs", "true",
                                       "--output_dir", str(tmp_path / "never")])
    with pytest.raises(CheckFailed, match="ORPO has no reference model"):
        main(cfg, args)
    assert not (tmp_path / "never").exists()


def test_trl_configs_default_to_bf16_and_need_use_cpu():
    """TRL's configs set bf16=True unless fp16 is set. Without a GPU, TrainingArguments refuses that unless
    use_cpu=True - and with use_cpu=True the run is bf16 whether or not you asked. The recipes pass use_cpu and
    bf16 explicitly (common.models.resolve_precision)."""
    from trl import DPOConfig, RewardConfig

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="Your setup doesn't support bf16/gpu. You need to assign use_cpu"):
            DPOConfig(output_dir="/tmp/never-written")
    assert DPOConfig(output_dir="/tmp/never-written", use_cpu=True).bf16 is True
    assert RewardConfig(output_dir="/tmp/never-written", use_cpu=True, bf16=False).bf16 is False
    assert DPOConfig(output_dir="/tmp/never-written", use_cpu=True).gradient_checkpointing is True  # also a TRL default


@pytest.mark.parametrize("launcher,options", [("dpo.sh", ["--beta", "--loss_type", "--precompute_ref_log_probs",
                                                          "--algorithm"]),
                                               ("reward_model.sh", ["--method", "--center_rewards_coefficient"]),
                                               ("ppo.sh", ["--reward_model_path", "--kl_coef", "--algorithm"])])
def test_launchers_help_and_single_device_guard(launcher, options):
    proc = run(["bash", str(REPO / "launch" / launcher), "--help"])
    assert proc.returncode == 0 and all(o in proc.stdout for o in options), proc.stdout[-2000:]
    proc = run(["bash", str(REPO / "launch" / launcher)], env={"WORLD_SIZE": "2"})
    assert proc.returncode == 2 and "single-device" in proc.stderr
