"""recipes/sft_memory_diet.py on tiny random MoE models (common/moe.py; the repo's tiny tokenizer, no hub): the
frozen-experts trap stops before training with the fix; `experts` trains every routed expert's LoRA while the
router stays frozen, metrics.json reports the router's load-balancing loss and expert load; the adapter merges
and exports with recipes/merge_export.py like a dense one. Router training (--lora_train_router) is -m slow."""
import json

import pytest
import torch

from common import moe
from conftest import REPO, run

LAUNCHER = ["bash", str(REPO / "launch" / "memory_diet.sh")]


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_models")
    return {arch: moe.build_tiny_moe(arch, root / arch) for arch in ("mixtral", "qwen2_moe")}


def train(model_dir, out, *targets, extra=()):
    return run(LAUNCHER + ["--model_name_or_path", str(model_dir), "--output_dir", str(out), "--precision", "fp32",
                           "--max_steps", "3", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                           "--logging_steps", "1", "--learning_rate", "1e-2", "--save_steps", "100",
                           "--sample_generations", "0", "--max_new_tokens", "4", "--eval_dataset_path", "",
                           "--lora_target_modules", *targets, *extra])


def adapter_tensors(out):
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_targets_that_leave_the_experts_frozen_stop_before_training(tiny_moe, tmp_path):
    # the dense default names the MLP projections; on Qwen2-MoE (transformers 5) they match only the shared expert,
    # and peft 0.21 attaches LoRA there and to attention without a word: the routed experts stay frozen (before the
    # check, the run went on: "LoRA attached to 14 modules: down_proj x2, gate_proj x2, ...", "gradient flow OK")
    out = tmp_path / "trap"
    proc = train(tiny_moe["qwen2_moe"], out, "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: LoRA would leave the experts frozen: --lora_target_modules q_proj k_proj v_proj o_proj gate_proj " \
           "up_proj down_proj names gate_proj up_proj down_proj" in proc.stderr
    assert "Fix: add `experts` to --lora_target_modules" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists() and "gradient flow OK" not in proc.stderr


@pytest.fixture(scope="module")
def experts_run(tiny_moe, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_runs") / "qwen2_moe"
    proc = train(tiny_moe["qwen2_moe"], out, "q_proj", "v_proj", "experts")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_experts_train_router_stays_frozen_and_metrics_report_the_router(experts_run):
    out, proc = experts_run
    assert "MoE: experts that got tokens reaching the loss in this batch (per layer, of 4)" in proc.stderr
    tensors = adapter_tensors(out)
    experts = {k: v for k, v in tensors.items() if ".mlp.experts." in k}
    assert len(experts) == 2 * 2 * 2                    # layers x (gate_up_proj, down_proj) x (lora_A, lora_B)
    for key, value in experts.items():
        if "lora_B" in key:                              # zero at init: every expert's columns moved
            assert (value.reshape(value.shape[0], -1, 4).abs().sum(dim=(0, 1)) > 0).all(), key
    assert not [k for k in tensors if ".gate." in k or "shared_expert_gate" in k or "shared_expert." in k]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    m = json.loads((out / "metrics.json").read_text())["moe"]
    assert (m["model_type"], m["num_experts"], m["experts_per_token"], m["moe_layers"]) == ("qwen2_moe", 4, 2, 2)
    assert (m["expert_lora_modules"], m["router_lora_modules"]) == (4, 0)
    assert m["router_aux_loss_mean"] > 0 and m["routed_tokens"] > 0
    for layer in m["layers"].values():
        assert sum(layer["expert_load"]) == pytest.approx(1.0, abs=1e-3) and layer["max_over_mean"] >= 1.0
    assert m["max_over_mean_load"] == max(v["max_over_mean"] for v in m["layers"].values())


def test_moe_adapter_merges_and_exports_like_a_dense_one(experts_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out, _ = experts_run
    export = tmp_path / "export"
    proc = run(["bash", str(REPO / "launch" / "merge_export.sh"), "--adapter_path", str(out / "adapter"),
                "--output_dir", str(export), "--gguf_type", "auto", "--llama_cpp_dir", str(tmp_path / "no-llama.cpp"),
                "--num_samples", "4"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((export / "metrics.json").read_text())
    v = m["merged_vs_adapter"]
    assert m["verified"] and v["passed"] and v["max_abs_logit_diff"] < 1e-4 and v["top1_agreement"] == 1.0
    assert m["lora_layers_merged"] == 8     # q, v and the two nested expert ParamWrappers, in 2 layers
    merged = AutoModelForCausalLM.from_pretrained(export / "merged")
    base = AutoModelForCausalLM.from_pretrained(json.loads((out / "adapter" / "adapter_config.json").read_text())
                                                ["base_model_name_or_path"])
    for name in ("gate_up_proj", "down_proj"):           # the experts' deltas are in the merged weights
        moved = (getattr(merged.model.layers[0].mlp.experts, name) - getattr(base.model.layers[0].mlp.experts, name))
        assert (moved.abs().sum(dim=(1, 2)) > 0).all(), name
    assert torch.equal(merged.model.layers[0].mlp.gate.weight, base.model.layers[0].mlp.gate.weight)


@pytest.mark.slow
def test_train_router_puts_lora_on_the_router_and_the_balancing_loss_in_the_loss(tiny_moe, tmp_path):
    out = tmp_path / "router"
    proc = train(tiny_moe["mixtral"], out, "q_proj", "v_proj", "experts", extra=("--lora_train_router", "true"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [k for k in adapter_tensors(out) if ".mlp.gate." in k]
    m = json.loads((out / "metrics.json").read_text())["moe"]
    assert m["router_lora_modules"] == 2
