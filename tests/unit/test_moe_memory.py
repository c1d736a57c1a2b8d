"""The planner on MoE models (common/memory.py): exact counts of Mixtral-8x7B, Qwen1.5-MoE-A2.7B and OLMoE-1B-7B from
their config.json alone (total, active per token, experts, router, shared expert, LoRA on the experts), worked out by
hand below, and the MoE activation model against what autograd saves on tiny random models of all three."""
import json
import sys

import pytest
import torch

from common import memory, moe
from common.memory import Settings, inspect_model, load_config, plan
from conftest import REPO, run
from test_memory import _saved_bytes  # the autograd saved-tensor count the dense model is checked with

CONFIGS = REPO / "tests" / "fixtures" / "configs"
MIXTRAL = str(CONFIGS / "mixtral-8x7b-v0.1.json")
QWEN_MOE = str(CONFIGS / "qwen1.5-moe-a2.7b.json")
OLMOE = str(CONFIGS / "olmoe-1b-7b-0924.json")
LLAMA31 = str(CONFIGS / "llama-3.1-8b.json")


def test_mixtral_8x7b_total_active_experts_router_by_hand():
    h, i, e, layers, vocab = 4096, 14336, 8, 32, 32000
    expert = 3 * h * i                                       # w1/w3 fused in gate_up_proj [e, 2i, h] + w2 down_proj
    attention = 2 * h * h + 2 * h * 1024                     # q, o 4096x4096; k, v 4096x1024 (8 kv heads x 128)
    router = e * h
    per_layer = attention + e * expert + router + 2 * h
    total = layers * per_layer + 2 * vocab * h + h
    assert total == 46_702_792_704                           # "46.7B"
    active = total - layers * (e - 2) * expert               # top-2: 6 of 8 experts idle per token
    assert active == 12_879_925_248                          # "12.9B active"
    p = plan(MIXTRAL, Settings(method="full"))
    assert (p["total_params"], p["active_params_per_token"]) == (total, active)
    m = p["moe"]
    assert (m["num_experts"], m["experts_per_token"], m["moe_layers"]) == (8, 2, 32)
    assert (m["expert_params"], m["router_params"], m["shared_expert_params"]) == (layers * e * expert, layers * router, 0)


def test_mixtral_lora_on_attention_and_experts_by_hand():
    h, i, e, r, layers = 4096, 14336, 8, 16, 32
    attention = r * (h + h) * 2 + r * (h + 1024) * 2         # q, o and k, v
    # peft's ParamWrapper: lora_A [e*r, in], lora_B [out, e*r] per fused parameter (rank r per expert)
    experts = (e * r * h + 2 * i * e * r) + (e * r * i + h * e * r)
    p = plan(MIXTRAL, Settings(method="lora", lora_r=r, lora_targets="q_proj,k_proj,v_proj,o_proj,experts"))
    assert p["trainable_params"] == layers * (attention + experts) == 223_346_688
    assert p["lora_modules"] == layers * (4 + 2)
    assert p["moe"]["expert_lora_params"] == layers * experts == 209_715_200 and p["moe"]["router_lora_params"] == 0
    assert p["active_params_per_token"] == 12_879_925_248 + layers * attention + layers * experts * 2 // 8
    # q_proj,v_proj only: the experts stay frozen (as asked) and LoRA is the seed-002 figure of Mistral-7B
    qv = plan(MIXTRAL, Settings(method="lora", lora_r=r, lora_targets="q_proj,v_proj"))
    assert qv["trainable_params"] == 6_815_744 and qv["moe"]["experts_trained"] is False
    router = plan(MIXTRAL, Settings(method="lora", lora_r=r, lora_targets="q_proj,v_proj", lora_train_router=True))
    assert router["moe"]["router_lora_params"] == layers * r * (h + e)   # gate.weight [8, 4096] as a 2D ParamWrapper


def test_mixtral_moe_activation_bytes_by_hand():
    s = Settings(method="lora", lora_r=16, lora_targets="q_proj,k_proj,v_proj,o_proj,experts", seq_len=512, batch_size=1,
                 dtype="bf16", device="cuda")
    m = plan(MIXTRAL, s)["moe"]
    h, i, e, k, tokens = 4096, 14336, 8, 2, 512
    router = 4 * e + 8 * k + 4 * k + 4                       # fp32 probs, top-k ids, weights, their sum (per token)
    slot = 3 * 8 + 4 + 3 * 2 * i + 2 * h + (2 * h + 2 * i)   # indices, weight, gate/up + act, output; LoRA: input, act
    assert m["moe_activation_bytes_per_token_per_layer"] == router + k * slot == 262_260
    assert m["routed_slots_per_step"] == tokens * k
    # peft folds B @ A into every expert's weight for the grouped matmul and autograd keeps that bf16 copy: per layer
    # 2 bytes x 8 x 3 x 4096 x 14336 = 2.6 GiB, 84 GiB over 32 layers, whatever the sequence length
    folded = 2 * e * 3 * h * i
    assert m["moe_activation_bytes"] == 32 * ((router + k * slot) * tokens + 4 * e + folded) == 94_491_182_080
    ckpt = plan(MIXTRAL, s, grad_ckpt=True)
    assert ckpt["activations_bytes"] < plan(MIXTRAL, s)["activations_bytes"] / 20   # one layer's copy at a time


def test_qwen15_moe_a27b_by_hand():
    h, mi, si, e, layers, vocab = 2048, 1408, 5632, 60, 24, 151936
    expert, shared = 3 * h * mi, 3 * h * si
    router = e * h + h                                       # top-k gate + the shared expert's sigmoid gate
    per_layer = 4 * h * h + 3 * h + e * expert + shared + router + 2 * h   # q/k/v with bias
    total = layers * per_layer + 2 * vocab * h + h
    assert total == 14_315_784_192                           # "14.3B"
    active = total - layers * (e - 4) * expert               # top-4 of 60 routed; the shared expert always runs
    assert active == 2_689_173_504                           # "2.7B activated"
    p = plan(QWEN_MOE, Settings(method="full"))
    assert (p["total_params"], p["active_params_per_token"]) == (total, active)
    assert (p["moe"]["router_params"], p["moe"]["shared_expert_params"]) == (layers * router, layers * shared)


def test_olmoe_1b_7b_by_hand():
    h, i, e, layers, vocab = 2048, 1024, 64, 16, 50304
    expert = 3 * h * i
    per_layer = 4 * h * h + 2 * h + e * expert + e * h + 2 * h   # + q_norm/k_norm over the whole projections
    total = layers * per_layer + 2 * vocab * h + h
    assert total == 6_919_161_856                            # "6.9B"
    active = total - layers * (e - 8) * expert
    assert active == 1_282_017_280                           # "1.3B active"
    p = plan(OLMOE, Settings(method="full"))
    assert (p["total_params"], p["active_params_per_token"]) == (total, active)
    assert p["moe"]["experts_per_token"] == 8


def test_cli_reports_moe_and_keeps_the_dense_contract(capsys):
    r = run([sys.executable, "-m", "common.memory", "--model", MIXTRAL, "--lora_targets", "q_proj,v_proj,experts",
             "--seq_len", "256", "--json"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("total_params", "trainable_params", "lora_modules", "weights_bytes", "peak_bytes", "active_params_per_token"):
        assert key in out, key
    assert out["moe"]["expert_lora_params"] > 0 and out["moe"]["moe_activation_bytes"] > 0
    dense = plan(LLAMA31, Settings(method="lora", lora_targets="q_proj,v_proj"))
    assert dense["active_params_per_token"] == dense["total_params"] and "moe" not in dense
    assert memory.main(["--model", LLAMA31, "--lora_targets", "q_proj,experts", "--json"]) == 2
    assert "llama has no routed experts" in capsys.readouterr().err
    assert memory.main(["--model", MIXTRAL, "--lora_targets", "experts", "--lora_dropout", "0.1", "--json"]) == 2
    assert "use --lora_dropout 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The MoE activation model against the tensors autograd saves (tiny random models, 2 x 32 tokens)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {arch: str(moe.build_tiny_moe(arch, root / arch)) for arch in ("mixtral", "qwen2_moe", "olmoe")}


@pytest.mark.parametrize("arch,targets,dtype", [
    ("mixtral", "q_proj,v_proj", "bf16"),               # experts frozen
    ("mixtral", "q_proj,v_proj,experts", "bf16"),       # + slot inputs, act outputs, the folded expert weights
    ("mixtral", "q_proj,v_proj,experts", "fp32"),
    ("qwen2_moe", "all-linear", "bf16"),                # shared expert + its gate, bf16 routing weights
    ("olmoe", "q_proj,v_proj,experts", "bf16"),         # q/k RMSNorms over the whole projections
])
def test_moe_activation_model_matches_saved_tensors(tiny_moe, arch, targets, dtype):
    from peft.helpers import disable_input_dtype_casting

    from common.models import LoraOptions, attach_lora, load_base_model

    path = tiny_moe[arch]
    model = load_base_model(path, torch.device("cpu"), dtype, False, "sdpa")
    model = attach_lora(model, LoraOptions(lora_r=8, lora_alpha=16, lora_target_modules=targets.split(",")))
    model.train()
    ids = torch.randint(5, 500, (2, 32))
    autocast = dtype == "bf16"
    with disable_input_dtype_casting(model):
        measured = _saved_bytes(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, autocast)
    s = Settings(method="lora", lora_r=8, lora_targets=targets, lora_dropout=0.0, seq_len=32, batch_size=2, dtype=dtype,
                 device="cpu")
    arch_ = inspect_model(load_config(path), "lora", 8, targets, 0.0)
    act = memory.activation_bytes(arch_, s, autocast=autocast, peft_cast=False)
    assert act["kept"] + act["logits_saved"] == measured


def test_validation_harness_builds_moe_models_and_plans_their_rows(tmp_path):
    from harnesses import memory_validation as mv

    spec = mv.parse_spec("name=m model=moe:mixtral method=lora batch=2 seq=64 targets=q_proj,v_proj,experts")
    model = mv.moe_model(spec["model"], tmp_path)
    assert model == str(tmp_path / "models" / "mixtral") and mv.moe_model(spec["model"], tmp_path) == model  # once
    cmd = mv.recipe_command(spec, model, tmp_path / "run", tmp_path / "data.jsonl", mv.Config())
    assert cmd[cmd.index("--lora_target_modules") + 1:][:3] == ["q_proj", "v_proj", "experts"]
    p = mv.predict(spec, model, "cpu")
    r, e = memory.recipe_defaults()["lora_r"], 4              # 2 layers; gate_up_proj [4, 64, 64], down_proj [4, 64, 32]
    assert p["moe"]["expert_lora_params"] == 2 * ((e * r * 64 + 64 * e * r) + (e * r * 32 + 64 * e * r)) == 28_672


def test_cpu_peak_keeps_an_moe_checkpoint_resident_beside_its_weights(tiny_moe):
    from dataclasses import replace

    s = Settings(method="lora", lora_targets="q_proj,v_proj", device="cpu", dtype="fp32", seq_len=32)
    arch = inspect_model(load_config(tiny_moe["mixtral"]), "lora", 16, "q_proj,v_proj")
    phases = {"step": (10**6, 0)}
    moe_peak, dense_peak = memory.cpu_rss_peak(arch, s, 0, phases), memory.cpu_rss_peak(replace(arch, moe=None), s, 0, phases)
    file_bytes = 4 * (arch.total_params - arch.lora_params)             # an fp32 checkpoint
    assert moe_peak["training"] - dense_peak["training"] == file_bytes
