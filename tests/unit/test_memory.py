"""The memory/parameter planner (common/memory.py): exact counts from configs alone, bytes per component,
the activation model against what autograd really saves, ZeRO sharding, and the recommendation."""
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from common import memory
from common.memory import Settings, inspect_model, load_config, plan, recommend
from conftest import REPO, run

CONFIGS = REPO / "tests" / "fixtures" / "configs"
MISTRAL = str(CONFIGS / "mistral-7b-v0.1.json")
LLAMA31 = str(CONFIGS / "llama-3.1-8b.json")
GIB = 1024**3


# ---------------------------------------------------------------------------------------------
# Exact parameter counts from a config alone (meta device + peft), the seeds' numbers
# ---------------------------------------------------------------------------------------------
def test_mistral_7b_lora_q_v_counts_seed_002():
    arch = inspect_model(load_config(MISTRAL), "lora", lora_r=16, lora_targets="q_proj,v_proj")
    assert arch.trainable_params == 6_815_744          # seed 002's "trainable params: 6,815,744"
    assert arch.total_params == 7_248_547_840          # NOT seed 002's 7,247,986,688 (see CHRONICLES)
    assert arch.lora_modules == 64
    base = arch.total_params - arch.trainable_params
    assert base == 7_241_732_096                       # 2 x 32000 x 4096 + 32 x 218,112,000 + 4096
    assert 7_247_986_688 - 6_815_744 != base


def test_llama_31_8b_lora_all_linear_counts_seed_000():
    arch = inspect_model(load_config(LLAMA31), "lora", lora_r=16, lora_targets="all-linear")
    assert (arch.trainable_params, arch.total_params, arch.lora_modules) == (41_943_040, 8_072_204_288, 224)
    # QLoRA has the same counts: common.checks.count_parameters counts packed 4-bit weights as weights
    q = inspect_model(load_config(LLAMA31), "qlora", lora_r=16, lora_targets="all-linear")
    assert (q.trainable_params, q.total_params) == (41_943_040, 8_072_204_288)
    full = inspect_model(load_config(LLAMA31), "full")
    assert full.trainable_params == full.total_params == 8_030_261_248 and full.lora_modules == 0


def test_cli_json_has_the_contract_keys():
    r = run([sys.executable, "-m", "common.memory", "--model", LLAMA31, "--method", "qlora", "--lora_r", "16",
             "--lora_targets", "all-linear", "--seq_len", "1024", "--batch_size", "1", "--optim", "paged_adamw_8bit",
             "--dtype", "bf16", "--grad_ckpt", "--world_size", "1", "--zero", "0", "--json"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("total_params", "trainable_params", "lora_modules", "weights_bytes", "gradients_bytes",
                "optimizer_bytes", "activations_bytes", "peak_bytes"):
        assert key in out, key
    assert (out["trainable_params"], out["total_params"], out["lora_modules"]) == (41_943_040, 8_072_204_288, 224)
    assert out["optimizer_paged"] is True
    # 4-bit base: ~0.5 byte per quantized weight + fp32 embeddings/lm_head (prepare_model_for_kbit_training)
    assert 5.3 * GIB < out["weights_bytes"] < 7.6 * GIB


def test_cli_errors_name_the_fix(capsys, tmp_path):
    assert memory.main(["--model", MISTRAL, "--optim", "lion", "--json"]) == 2
    assert "error: --optim 'lion' is not modelled; choose one of" in capsys.readouterr().err
    assert memory.main(["--model", "mistralai/Mistral-7B-v0.1", "--json"]) == 2
    assert "the planner never downloads" in capsys.readouterr().err
    assert memory.main(["--model", MISTRAL, "--lora_targets", "query_key_value", "--json"]) == 2
    assert "--lora_targets query_key_value" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Bytes: a case small enough to check by hand, and the libraries' own storage
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("cfg") / "config.json"
    LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, tie_word_embeddings=False).to_json_file(path)
    return str(path)


def test_hand_checkable_tiny_case(tiny_config):
    s = Settings(method="lora", lora_r=8, lora_targets="q_proj,v_proj", lora_dropout=0.05, seq_len=32, batch_size=2,
                 optim="adamw_torch", dtype="bf16", device="cuda")
    p = plan(tiny_config, s)
    # parameters: embeddings 512x64 twice; per layer q 64x64, k 64x32, v 64x32, o 64x64, gate/up/down
    # 64x128 each, 2 norms of 64; final norm 64. LoRA r=8: q 8x(64+64), v 8x(64+32) per layer.
    per_layer = 4096 + 2048 + 2048 + 4096 + 3 * 8192 + 2 * 64
    base = 2 * 512 * 64 + 2 * per_layer + 64
    lora = 2 * (8 * (64 + 64) + 8 * (64 + 32))
    assert (base, lora) == (139_584, 3_584)
    assert (p["total_params"], p["trainable_params"], p["lora_modules"]) == (base + lora, lora, 4)
    assert p["weights_bytes"] == 2 * base + 4 * lora               # bf16 base + fp32 adapters
    assert p["gradients_bytes"] == 4 * lora
    assert p["optimizer_bytes"] == 8 * lora                        # AdamW: exp_avg + exp_avg_sq in fp32
    # activations per token per layer (CUDA, bf16 autocast):
    #   2 RMSNorms: 2 x (4 x 64 + 4) = 520; sdpa: q, out 2 x 2 x 64 + k, v 2 x 2 x 32 + lse 4 x 4 heads = 400
    #   SwiGLU: 3 x 2 x 128 = 768; LoRA q and v: bool mask 64 + bf16 input 2 x 64 + lora_A out 2 x 8 = 208 each
    assert p["activation_bytes_per_token_per_layer"] == 520 + 400 + 768 + 2 * 208 == 2104
    tokens = 2 * 32
    layer = 2104 * tokens + 2 * (lora // 2)                        # + autocast's bf16 copy of the layer's adapters
    rest = (4 * 64 + 4 + 8) * tokens + 2 * 32 * 16 * 2 + 4        # final norm, labels, rope cos/sin, loss
    assert p["activations_bytes"] == 2 * layer + rest + 4 * 512 * tokens == 426_756
    assert p["logits_bytes"] == 12 * 512 * tokens                  # fp32 log-softmax out + 2 gradients
    # the recipes' LM head runs only where the next token is labelled: half the positions, half the logits
    half = plan(tiny_config, s, labelled_fraction=0.5)
    assert half["logits_bytes"] == 12 * 512 * tokens // 2 and half["activations_bytes"] == p["activations_bytes"] - 4 * 512 * 32
    with pytest.raises(memory.PlanError, match="labelled_fraction 0"):
        plan(tiny_config, s, labelled_fraction=0)
    assert plan(tiny_config, s, optim="sgd")["optimizer_bytes"] == 0
    # Adafactor: factored second moment, rows + columns: A (8,64) -> 72, B_q (64,8) -> 72, B_v (32,8) -> 40
    assert plan(tiny_config, s, optim="adafactor")["optimizer_bytes"] == 4 * 2 * (72 + 72 + 72 + 40)
    # full fine-tune in bf16: weights, gradients and AdamW states all in bf16
    f = plan(tiny_config, s, method="full")
    assert (f["weights_bytes"], f["gradients_bytes"], f["optimizer_bytes"]) == (2 * base, 2 * base, 4 * base)
    # gradient checkpointing keeps one hidden state per layer (+ recomputes one layer in backward); autocast's
    # cache holds the bf16 copies of the fp32 adapters until the forward pass ends
    ck = plan(tiny_config, s, grad_ckpt=True)
    assert ck["activations_bytes"] == 2 * (2 * 64 * tokens) + rest - 2 * 32 * 16 * 2 + 4 * 512 * tokens + 2 * lora


def test_nf4_bytes_match_bitsandbytes():
    import bitsandbytes.functional as F

    weight = torch.randn(96, 352, dtype=torch.bfloat16)
    for double_quant in (True, False):
        packed, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        nbytes = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size() \
            + state.code.numel() * state.code.element_size()
        if double_quant:
            nbytes += state.state2.absmax.numel() * 4 + state.state2.code.numel() * 4 + 4  # + fp32 offset
        assert memory.nf4_bytes(weight.numel(), double_quant) == nbytes
    assert memory.nf4_bytes(4096, True) == 2048 + 64 + 4 + 1024 + 4 + 64     # 3,208 bytes for 4,096 weights


def test_8bit_adamw_bytes_match_bitsandbytes():
    import bitsandbytes as bnb

    params = [torch.nn.Parameter(torch.randn(64, 100)), torch.nn.Parameter(torch.randn(16, 64))]  # 6400, 1024
    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for st in opt.state.values()
                      for k, t in st.items() if k in ("state1", "state2", "absmax1", "absmax2"))
    assert memory.optimizer_state_bytes("adamw_bnb_8bit", [(64, 100), (16, 64)], 4) == state_bytes
    assert state_bytes == 2 * 6400 + 2 * 4 * 25 + 8 * 1024                  # small tensors stay 32-bit


# ---------------------------------------------------------------------------------------------
# The activation model against the tensors autograd actually saves (guards library drift)
# ---------------------------------------------------------------------------------------------
def _saved_bytes(model, batch, autocast):
    params = {p.data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in params:
            storage = t.untyped_storage()
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**batch)
    return sum(seen.values())


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    """A random Llama whose q/kv/MLP widths all differ, saved so it loads like the recipes load it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("small") / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=48,
                                 tie_word_embeddings=False)).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("method,targets,dropout,dtype,autocast,peft_cast,grad_ckpt", [
    ("lora", "all-linear", 0.0, "bf16", True, False, False),   # the recipes' training steps (TokenCountingTrainer)
    ("lora", "all-linear", 0.05, "bf16", True, True, False),   # a plain Trainer: peft's fp32 input cast kept
    ("lora", "all-linear", 0.05, "bf16", False, True, False),  # a gradient check outside autocast
    ("lora", "q_proj,v_proj", 0.0, "bf16", True, True, False),
    ("lora", "q_proj,v_proj", 0.0, "bf16", False, True, True),
    ("lora", "all-linear", 0.0, "bf16", False, True, 2),         # layer 0 recomputes, layer 1 keeps its activations
    ("lora", "q_proj,v_proj", 0.05, "bf16", False, True, 2),
    ("lora", "all-linear", 0.0, "mixed", True, False, False),  # fp32 base under bf16 autocast
    ("qlora", "all-linear", 0.05, "bf16", True, True, False),
    ("qlora", "q_proj,v_proj", 0.0, "bf16", False, True, False),
    ("qlora", "q_proj,v_proj", 0.0, "bf16", False, True, True),  # attach_lora's checkpointing after kbit prep
    ("full", None, 0.0, "bf16", True, False, False),           # pure bf16
    ("full", None, 0.0, "mixed", True, False, False),          # fp32 master weights + bf16 autocast
    ("full", None, 0.0, "fp32", False, False, False),
])
def test_activation_model_matches_saved_tensors(small_model_dir, method, targets, dropout, dtype, autocast, peft_cast,
                                                grad_ckpt):
    from peft.helpers import disable_input_dtype_casting

    from common.models import attach_lora, load_base_model

    every_n = grad_ckpt if type(grad_ckpt) is int else 1  # an int: checkpoint every n-th layer only
    grad_ckpt = bool(grad_ckpt)
    model = load_base_model(small_model_dir, torch.device("cpu"), "fp32" if dtype == "mixed" else dtype,
                            method == "qlora", "sdpa")
    if method == "full" and grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif method != "full":
        model = attach_lora(model, 16, 32, dropout, "all-linear" if targets == "all-linear" else targets.split(","),
                            quantized=method == "qlora", gradient_checkpointing=grad_ckpt,
                            checkpoint_every_n_layers=every_n)
    model.train()
    layers = model.get_base_model().model.layers if method != "full" else model.model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [grad_ckpt, grad_ckpt and every_n == 1]
    ids = torch.randint(0, 1000, (2, 64))
    with disable_input_dtype_casting(model, active=method != "full" and not peft_cast):
        measured = _saved_bytes(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids},
                                autocast)
    s = Settings(method=method, lora_r=16, lora_targets=targets or "all-linear", lora_dropout=dropout, seq_len=64,
                 batch_size=2, dtype=dtype, grad_ckpt=grad_ckpt, ckpt_every_n=every_n, device="cpu")
    arch = inspect_model(load_config(small_model_dir), method, 16, s.lora_targets, dropout)
    act = memory.activation_bytes(arch, s, autocast=autocast, peft_cast=peft_cast)
    assert act["kept"] + act["logits_saved"] == measured


# ---------------------------------------------------------------------------------------------
# ZeRO, DDP, paged optimizers
# ---------------------------------------------------------------------------------------------
def test_zero_stages_shard_what_they_should():
    arch = inspect_model(load_config(LLAMA31), "full")
    n = arch.total_params
    p = {z: plan(LLAMA31, Settings(method="full", world_size=4, zero=z, seq_len=512), arch=arch) for z in range(4)}
    # stage 0 (DDP): everything replicated + DDP gradient buckets; bf16 AdamW states, no master copy
    assert (p[0]["weights_bytes"], p[0]["gradients_bytes"], p[0]["optimizer_bytes"]) == (2 * n, 2 * n, 4 * n)
    assert p[0]["ddp_bucket_bytes"] == 2 * n and p[0]["master_weights_bytes"] == 0
    # stage 1: fp32 master weights and fp32 AdamW states, both divided by the world size
    assert p[1]["optimizer_bytes"] == 8 * n // 4 and p[1]["master_weights_bytes"] == 4 * n // 4
    assert (p[1]["weights_bytes"], p[1]["gradients_bytes"]) == (2 * n, 2 * n)
    # stage 2: + gradients (bf16 + the fp32 partition they are reduced into)
    assert p[2]["gradients_bytes"] == 2 * n // 4 + 4 * n // 4 and p[2]["weights_bytes"] == 2 * n
    # stage 3: + the weights themselves
    assert p[3]["weights_bytes"] == 2 * n // 4 and p[3]["zero3_gathered_bytes"] > 0
    peaks = [p[z]["peak_bytes"] for z in range(4)]
    assert peaks == sorted(peaks, reverse=True)


def test_paged_optimizer_is_left_out_of_the_cuda_peak_but_not_the_cpu_one(tiny_config):
    s = Settings(method="full", seq_len=32, batch_size=1)
    plain, paged = plan(tiny_config, s, optim="adamw_bnb_8bit"), plan(tiny_config, s, optim="paged_adamw_8bit")
    assert plain["optimizer_bytes"] == paged["optimizer_bytes"] and paged["optimizer_paged"]
    assert plain["tensors_peak_bytes"] - paged["tensors_peak_bytes"] == plain["optimizer_bytes"]
    cpu = plan(tiny_config, s, optim="paged_adamw_8bit", device="cpu")
    assert not cpu["optimizer_paged"]


# ---------------------------------------------------------------------------------------------
# Recommendation
# ---------------------------------------------------------------------------------------------
def test_recommend_picks_the_fastest_fitting_config_and_refuses_when_nothing_fits():
    base = Settings(method="lora", lora_targets="all-linear", seq_len=1024, batch_size=4, gradient_accumulation_steps=4)
    rec = recommend(LLAMA31, 24 * GIB, base)
    assert rec["fits"], rec["reason"]
    chosen = Settings(**rec["settings"])
    again = plan(LLAMA31, chosen)
    assert again["required_bytes"] <= 24 * GIB == 24 * GIB
    assert chosen.batch_size * chosen.gradient_accumulation_steps == 16          # effective batch kept
    assert chosen.seq_len == 1024 and chosen.lora_targets == "all-linear"
    # everything tried before it did not fit: it is the first fitting one in speed order
    assert all(t["required_gb"] > 24 for t in rec["tried"][:-1])
    assert rec["tried"][0] == {"adds": "nothing", "batch_size": 16, "required_gb": rec["tried"][0]["required_gb"]}
    # seed 000's OOM: Llama-3.1-8B LoRA at 4 x 1024 without checkpointing does not fit 24 GB
    assert plan(LLAMA31, base)["required_bytes"] > 24 * GIB
    # a budget nothing fits: refused, with the smallest need in the reason
    no = recommend(LLAMA31, 2 * GIB, base)
    assert not no["fits"] and no["settings"] is None and "nothing fits 2.0 GiB" in no["reason"]
    # a budget everything fits: nothing added, the requested micro-batch of 16 kept whole
    big = recommend(LLAMA31, 1000 * GIB, base)
    assert big["fits"] and big["settings"]["batch_size"] == 16 and not big["settings"]["grad_ckpt"]
    # settings the user pinned are never changed: with the micro-batch pinned at 4 it must add more
    pinned = recommend(LLAMA31, 24 * GIB, base, pinned=("batch_size",))
    assert pinned["fits"] and pinned["settings"]["batch_size"] == 4 and pinned["settings"]["method"] == "qlora"
    assert not recommend(LLAMA31, 24 * GIB, base, pinned=("batch_size", "method"))["fits"]


def test_recommend_checkpoints_only_as_many_layers_as_the_budget_needs():
    """Between 'nothing' and full checkpointing: every 4th, 3rd, 2nd layer (transformers' every_n_layers)."""
    base = Settings(method="lora", lora_targets="all-linear", seq_len=1024, batch_size=4, gradient_accumulation_steps=1,
                    device="cpu", dtype="bf16")
    need = {n: plan(LLAMA31, replace(base, grad_ckpt=n > 0, ckpt_every_n=max(n, 1)))["required_bytes"]
            for n in (0, 4, 3, 2, 1)}
    assert need[0] > need[4] > need[3] > need[2] > need[1]  # each step recomputes more layers and keeps less
    arch = inspect_model(load_config(LLAMA31), "lora")
    assert [memory.checkpointed_layers(32, replace(base, grad_ckpt=True, ckpt_every_n=n)) for n in (1, 2, 3, 4)] == \
        [32, 16, 11, 8] and arch.layers == 32
    for n in (4, 3, 2):  # a budget just above every-n-th's need picks exactly that, keeping the micro-batch of 4
        rec = recommend(LLAMA31, need[n] + 1, base, pinned=("batch_size",))
        assert rec["fits"] and rec["settings"]["grad_ckpt"] and rec["settings"]["ckpt_every_n"] == n, rec["reason"]
        suffix = {2: "nd", 3: "rd", 4: "th"}[n]
        assert f"gradient checkpointing on {-(-32 // n)} of 32 layers (every {n}{suffix})" in rec["reason"]
    full = recommend(LLAMA31, need[1] + 1, base, pinned=("batch_size",))
    assert full["settings"]["ckpt_every_n"] == 1 and "Adds gradient checkpointing." in full["reason"]
    # checkpointing the user asked for (pinned, or already on) is all layers, never a partial one
    asked = recommend(LLAMA31, need[4] + 1, replace(base, grad_ckpt=True), pinned=("batch_size", "grad_ckpt"))
    assert asked["settings"]["grad_ckpt"] and asked["settings"]["ckpt_every_n"] == 1
    on = recommend(LLAMA31, need[4] + 1, replace(base, grad_ckpt=True), pinned=("batch_size",))
    assert on["settings"]["ckpt_every_n"] == 1


def test_recommend_cli(capsys):
    # in-process (the subprocess form of the CLI is covered by test_cli_json_has_the_contract_keys)
    rc = memory.main(["--model", MISTRAL, "--method", "lora", "--lora_targets", "q_proj,v_proj", "--seq_len", "256",
                      "--batch_size", "2", "--budget_gb", "24", "--recommend", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["fits"] and out["plan"]["required_bytes"] <= 24 * GIB and out["reason"]
    assert memory.main(["--model", MISTRAL, "--budget_gb", "4", "--recommend"]) == 1
    assert "nothing fits" in capsys.readouterr().out
    assert memory.main(["--model", MISTRAL, "--recommend"]) == 2
    assert "need --budget_gb" in capsys.readouterr().err


def test_batch_size_finder_returns_the_largest_that_fits():
    s = Settings(method="lora", lora_targets="q_proj,v_proj", seq_len=512, dtype="bf16")
    config = load_config(MISTRAL)
    batch = memory.max_batch_size(MISTRAL, 24 * GIB, s, config=config)
    assert batch >= 1
    arch = inspect_model(config, "lora", 16, "q_proj,v_proj")
    assert plan(MISTRAL, s, arch=arch, batch_size=batch)["required_bytes"] <= 24 * GIB
    assert plan(MISTRAL, s, arch=arch, batch_size=batch + 1)["required_bytes"] > 24 * GIB
    assert memory.max_batch_size(MISTRAL, 10 * GIB, s, config=config) == 0      # bf16 weights alone are 13.5 GiB


# ---------------------------------------------------------------------------------------------
# The validation recipe's plumbing (the runs themselves take minutes: see docs/memory.md, "Memory planner")
# ---------------------------------------------------------------------------------------------
def test_validation_recipe_specs_and_help():
    from harnesses import memory_validation as mv

    spec = mv.parse_spec("name=a method=qlora batch=2 seq=128 ckpt=true targets=q_proj,v_proj")
    assert spec["targets"] == "q_proj,v_proj" and spec["optim"] == "adamw_torch" and spec["precision"] == "bf16"
    with pytest.raises(SystemExit):
        mv.parse_spec("name=a method=lora batch=2 seq=128 bogus=1")
    cmd = mv.recipe_command(spec, "M", Path("D"), Path("data.jsonl"), mv.Config())
    assert cmd[:2] == ["bash", "launch/memory_diet.sh"] and cmd[cmd.index("--lora_target_modules") + 1:][:2] == ["q_proj", "v_proj"]
    # full fine-tuning runs through the repo's full-FT path, whose gradient check runs outside autocast
    full = mv.parse_spec("name=f method=full batch=2 seq=64")
    cmd = mv.recipe_command(full, "M", Path("D"), Path("data.jsonl"), mv.Config())
    assert cmd[:4] == ["bash", "launch/adapter_vs_full.sh", "--methods", "full"]
    assert mv.metrics_path(full, Path("D")) == Path("D/runs/full/metrics.json")
    assert mv.metrics_path(spec, Path("D")) == Path("D/metrics.json")
    p = mv.predict(full, LLAMA31, "cuda", fraction=0.5)
    assert p["settings"]["check_autocast"] is False and p["settings"]["labelled_fraction"] == 0.5
    assert mv.predict(spec, LLAMA31, "cuda")["settings"]["lora_dropout"] == memory.recipe_defaults()["lora_dropout"]
    with pytest.raises(SystemExit) as e:
        mv.parse_config(mv.Config, ["--help"])
    assert e.value.code == 0


# ---------------------------------------------------------------------------------------------
# The plan matches what the recipe runs (issue 14): its defaults, both full-FT precisions, the peak phase
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen_config(tmp_path_factory):
    """Qwen2.5-0.5B's config.json, written from its published values (no download)."""
    path = tmp_path_factory.mktemp("qwen") / "config.json"
    path.write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
        "tie_word_embeddings": True, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "hidden_act": "silu", "dtype": "bfloat16", "use_sliding_window": False}))
    return str(path)


def test_defaults_are_the_recipes_config(tmp_path, monkeypatch):
    import yaml

    recipe = yaml.safe_load((REPO / "recipes/configs/sft_memory_diet.yaml").read_text())
    s = Settings()
    assert s.lora_dropout == recipe["lora_dropout"] == 0.0
    assert s.lora_targets == ",".join(recipe["lora_target_modules"]) and s.lora_r == recipe["lora_r"]
    assert s.optim == recipe["optim"] and s.grad_ckpt is (str(recipe["gradient_checkpointing"]) == "true")
    # read from the file, not declared twice: another YAML gives other defaults
    other = tmp_path / "sft_memory_diet.yaml"
    other.write_text(yaml.safe_dump({**recipe, "lora_dropout": 0.1, "lora_r": 8, "lora_target_modules": ["all-linear"],
                                     "gradient_checkpointing": True, "optim": "adamw_bnb_8bit"}))
    monkeypatch.setattr(memory, "RECIPE_CONFIG", other)
    monkeypatch.setattr(memory, "_RECIPE_DEFAULTS", {})
    s = Settings()
    assert (s.lora_dropout, s.lora_r, s.lora_targets, s.grad_ckpt, s.optim) == (0.1, 8, "all-linear", True, "adamw_bnb_8bit")


def test_qwen_05b_lora_needs_less_than_full_fine_tuning_in_both_precisions(qwen_config):
    config = load_config(qwen_config)
    shapes = dict(seq_len=2048, batch_size=4)
    lora = plan(qwen_config, Settings(method="lora", **shapes), config=config)
    full = {dtype: plan(qwen_config, Settings(method="full", dtype=dtype, **shapes), config=config)
            for dtype in ("bf16", "mixed")}
    n = full["bf16"]["total_params"]
    assert n == 494_032_768 and lora["trainable_params"] == 8_798_208 and lora["lora_modules"] == 168
    assert lora["settings"]["lora_dropout"] == 0.0                     # the recipe's, not peft's old 0.05
    assert lora["peak_bytes"] < full["bf16"]["peak_bytes"] < full["mixed"]["peak_bytes"]
    for p in (lora, *full.values()):                                   # the steps peak, not the gradient check
        assert p["peak_phase"] == "forward_end" and p["peak_phase"] in p["phases"]
        assert p["peak_phase_description"].startswith("training step: forward activations + logits")
        assert p["phases"]["check_forward_end"] < p["phases"]["forward_end"]
    # mixed precision: fp32 master weights, fp32 gradients, fp32 AdamW states; pure bf16 has none of them
    bf16, mixed = full["bf16"], full["mixed"]
    assert (bf16["weights_bytes"], bf16["gradients_bytes"], bf16["optimizer_bytes"]) == (2 * n, 2 * n, 4 * n)
    assert (mixed["weights_bytes"], mixed["gradients_bytes"], mixed["optimizer_bytes"]) == (4 * n, 4 * n, 8 * n)
    assert bf16["master_weights_bytes"] == mixed["master_weights_bytes"] == 0   # no copy beside the weights
    assert "no fp32 master copy" in bf16["precision"] and "fp32 master weights" in mixed["precision"]
    # at the optimizer step the difference is exactly the master copy (4 B) + fp32 gradients (4 B) per parameter
    # (pure bf16's 2 + 2 + 4 B against mixed's 4 + 4 + 8 B); at the peak autocast's bf16 weight copies and the
    # fp32 residual stream come on top
    assert mixed["phases"]["optimizer_step"] - bf16["phases"]["optimizer_step"] == 8 * n
    assert 8 * n < mixed["peak_bytes"] - bf16["peak_bytes"] < 8 * n + 2 * n + (
        mixed["activations_bytes"] - bf16["activations_bytes"])


def test_a_check_outside_autocast_is_the_lora_peak_and_says_so(qwen_config, capsys):
    """The check as harnesses/compare.py runs it (no autocast: peft keeps an fp32 copy of every adapter input):
    at 4 x 2048 without checkpointing it is LoRA's peak, above full bf16; the plan names that phase."""
    config = load_config(qwen_config)
    shapes = dict(seq_len=2048, batch_size=4)
    plain = plan(qwen_config, Settings(method="lora", check_autocast=False, **shapes), config=config)
    full = plan(qwen_config, Settings(method="full", check_autocast=False, **shapes), config=config)
    assert plain["peak_phase"] == "check_forward_end" and plain["peak_bytes"] > full["peak_bytes"]
    assert plain["peak_phase_description"].startswith("gradient check (one micro-batch before step 1, outside autocast")
    args = ["--model", qwen_config, "--seq_len", "2048", "--batch_size", "4"]
    assert memory.main(args + ["--check_outside_autocast"]) == 0
    assert "peak: gradient check (one micro-batch before step 1, outside autocast" in capsys.readouterr().out
    assert memory.main(args + ["--method", "full", "--dtype", "mixed"]) == 0
    out = capsys.readouterr().out
    assert "precision: mixed precision: fp32 master weights" in out and "peak: training step: forward" in out
    assert memory.main(args + ["--compare", "--json"]) == 0
    rows = {r["row"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert list(rows) == ["lora", "qlora", "full bf16", "full mixed"]
    assert rows["lora"]["peak_bytes"] < rows["full bf16"]["peak_bytes"] < rows["full mixed"]["peak_bytes"]
    assert rows["full mixed"]["dtype"] == "mixed" and rows["lora"]["peak_phase"] == "forward_end"
    assert memory.main(args + ["--method", "qlora", "--dtype", "mixed"]) == 2
    assert "error: --dtype mixed with --method qlora" in capsys.readouterr().err
