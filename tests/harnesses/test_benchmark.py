"""harnesses/benchmark.py on the tiny model: both contestants on the same examples, exact FLOP counts.

Nothing here is timed: throughput and MFU are the benchmark's output (docs/performance.md, "Performance benchmark"),
not something a test on a shared machine could assert. What is asserted: both contestants trained on
exactly the same tokens, the labelled-token relation between them, the FLOP formulas against a hand
count for the tiny config, and the report files.
"""
import importlib.util
import json
import math
import sys

import pytest
import torch

from conftest import REPO, run

LAUNCHER = ["bash", str(REPO / "launch" / "benchmark.sh")]
SMALL = ["--num_examples", "8", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
         "--max_length", "128", "--matmul_size", "128", "--matmul_repeats", "2"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_benchmark_module():
    spec = importlib.util.spec_from_file_location("harnesses_benchmark", REPO / "harnesses" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its Config dataclass looks the module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny"
    proc = run(LAUNCHER + ["--model_name_or_path", str(tiny_dir), "--output_dir", str(out), *SMALL,
                           "--contestants", "recipe", "trl_baseline", "trl_tuned", "recipe_at_peer_memory"], env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "benchmark.json").read_text())


def test_both_contestants_train_on_the_same_examples(bench, tiny_tokenizer):
    out, b = bench
    assert set(b["contestants"]) == {"recipe", "trl_baseline", "trl_tuned_unpacked", "trl_tuned_packed",
                                     "recipe_at_peer_memory"}
    r, t = b["contestants"]["recipe"], b["contestants"]["trl_baseline"]

    # the examples file both were given: 8 chats of varying length, recounted here with the tiny tokenizer
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(rows) == b["data"]["examples"] == 8
    lengths, assistant = [], 0
    for row in rows:
        enc = tiny_tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
        lengths.append(len(enc["input_ids"]))
        assistant += sum(enc["assistant_masks"])
    assert b["data"]["tokens"] == sum(lengths) and b["data"]["assistant_tokens"] == assistant
    assert b["data"]["min_tokens"] == min(lengths) < b["data"]["max_tokens"] == max(lengths) <= 128
    assert b["data"]["sum_len_sq"] == sum(n * (n + 1) for n in lengths)

    # one epoch of the same examples: identical non-pad tokens; 8 examples / (2 x 2) = 2 optimizer steps each
    assert r["trained_tokens"] == t["trained_tokens"] == sum(lengths)
    assert r["optimizer_steps"] == t["optimizer_steps"] == 2
    # the recipe's loss is on assistant tokens only; TRL's default (assistant_only_loss=False, a "messages"
    # dataset) puts it on every non-pad token, prompts and template included
    assert r["trained_labelled_tokens"] == assistant < t["trained_labelled_tokens"] == sum(lengths)
    assert r["assistant_tokens"] == t["assistant_tokens"] == assistant
    assert r["trainable_params"] == t["trainable_params"] == b["flop_counts"]["lora_params"] == 32768
    assert t["gradient_checkpointing"] is True and t["precision"] == "fp32 weights, bf16 autocast"  # TRL defaults
    for m in (r, t):
        assert m["heldout_loss"] < b["data"]["heldout_loss_base"]  # both learned something on the same held-out set
        assert m["peak_memory_bytes"] > 0 and m["peak_memory_method"].startswith("process peak resident set size")


def test_tuned_trl_runs_packed_and_unpacked_and_the_faster_one_counts(bench):
    from common.models import cpu_has_bf16

    out, b = bench
    r = b["contestants"]["recipe"]
    unpacked, packed = b["contestants"]["trl_tuned_unpacked"], b["contestants"]["trl_tuned_packed"]
    for m in (unpacked, packed):
        # the same tokens as the recipe, the loss on the same assistant tokens, no recompute, bf16 weights here
        assert m["trained_tokens"] == r["trained_tokens"] and m["trained_labelled_tokens"] == r["trained_labelled_tokens"]
        assert m["assistant_only_loss"] is True and m["gradient_checkpointing"] is False
        assert m["precision"].startswith("bf16 weights" if cpu_has_bf16() else "fp32 weights")
        assert m["hardware_flops"] == m["model_flops"] and m["heldout_loss"] < b["data"]["heldout_loss_base"]
    assert unpacked["packing"] is False and unpacked["optimizer_steps"] == 2 and unpacked["micro_batches"] == 4
    # BFD packs the 8 chats into at most as many 128-token rows, padding-free: the same tokens, no pad
    assert packed["packing"] is True and packed["padding_free"] is True
    assert 1 <= packed["micro_batches"] <= unpacked["micro_batches"]
    goal = b["goals"]["speedup_vs_tuned"]
    best = max((unpacked, packed), key=lambda m: m["assistant_tokens_per_second"])
    assert goal["against"] == best["contestant"] and goal["goal"] == 3.5
    # goals record the ratio rounded to 3 decimals (tokens/s to 2): equal up to that rounding
    assert goal["measured"] == pytest.approx(r["assistant_tokens_per_second"] / best["assistant_tokens_per_second"],
                                             abs=5e-4, rel=1e-4)
    assert any(v.startswith(f"speed-up recipe / the tuned TRL run ({best['contestant']}") for v in b["verdicts"])


def test_recipe_at_the_peers_peak_gets_that_budget_and_is_judged_against_it(bench):
    out, b = bench
    m, peer = b["contestants"]["recipe_at_peer_memory"], b["contestants"]["trl_baseline"]
    budget = round(peer["peak_memory_bytes"] / 2**30, 3)
    assert m["memory_budget_gb"] == budget and m["recipe_config"]["memory_budget_gb"] == pytest.approx(budget, abs=1e-3)
    goal = b["goals"]["at_peer_memory"]
    assert goal["fits"] == (m["peak_memory_bytes"] <= budget * 2**30) and goal["goal"] == 2.0
    assert goal["met"] == (goal["fits"] and goal["measured"] >= 2.0 and goal["equal_loss"])
    assert m["trained_tokens"] == b["contestants"]["recipe"]["trained_tokens"]
    proc = run(LAUNCHER + ["--contestants", "recipe_at_peer_memory", "trl_baseline", "--output_dir",
                           str(out.parent / "order")])
    assert proc.returncode == 1 and "list trl_baseline before it" in proc.stderr
    assert not (out.parent / "order").exists()


def test_mfu_and_speedup_follow_from_the_recorded_numbers(bench):
    out, b = bench
    assert b["peak_flops"]["bf16"] > 0 and b["peak_flops"]["fp32"] > 0
    assert b["peak_flops"]["bf16"] == max(p["bf16"] for p in b["peak_probes"]) and len(b["peak_probes"]) == 2
    per_token = 4 * 106496 + 6 * 32768  # hand count below; the LM head (32768 weights) only at loss positions
    for name, m in b["contestants"].items():
        assert m["model_flops"] == ((per_token - 4 * 32768) * m["trained_tokens"] + 4 * 32768 * m["trained_labelled_tokens"]
                                    + 768 * b["data"]["sum_len_sq"]), name
        assert m["mfu"] == pytest.approx(m["model_flops"] / m["train_seconds"] / b["peak_flops"]["bf16"])
        assert 0 < m["mfu"] < 1.5
        assert m["assistant_tokens_per_second"] == pytest.approx(m["assistant_tokens"] / m["train_seconds"], rel=1e-3)
    t = b["contestants"]["trl_baseline"]
    assert t["hardware_flops"] > t["model_flops"]  # its gradient checkpointing recomputes the forward
    speedup = b["goals"]["speedup"]
    assert speedup["measured"] == pytest.approx(b["contestants"]["recipe"]["assistant_tokens_per_second"]
                                                / t["assistant_tokens_per_second"], abs=5e-4, rel=1e-4)  # 3 decimals
    assert speedup["goal"] == 1.5 and b["goals"]["mfu"]["goal"] == 0.5
    table = (out / "benchmark.md").read_text()
    assert "| recipe | " in table and "| trl_baseline | " in table and b["machine"] in table
    assert "cpu (" in b["machine"] and b["device_type"] == "cpu"


def test_mfu_against_the_models_own_matmul_shapes(bench, tiny_dir):
    """The shape ceiling times exactly the matmuls the FLOP count credits per micro-batch (forward, input gradient,
    LoRA A/B and their gradients; the LM head at the labelled rows), and each MFU against it follows."""
    from transformers import AutoConfig

    out, b = bench
    bench_module = load_benchmark_module()
    ceiling = b["shape_ceiling"]
    rows = b["config"]["per_device_train_batch_size"]
    assert ceiling["tokens"] == round(rows * b["data"]["tokens"] / b["data"]["examples"])
    assert ceiling["head_tokens"] == round(rows * b["data"]["assistant_tokens"] / b["data"]["examples"])
    counts = bench_module.model_flop_counts(AutoConfig.from_pretrained(tiny_dir), "lora", 16, TARGETS)
    linear = bench_module.training_flops(counts, ceiling["tokens"], 0, "lora", head_tokens=ceiling["head_tokens"])
    assert ceiling["flops"] == linear["linear_flops"]
    assert ceiling["flops_per_second"] == pytest.approx(ceiling["flops"] / ceiling["seconds"])
    for name, m in b["contestants"].items():
        assert m["mfu_vs_shape_ceiling"] == pytest.approx(m["achieved_flops_per_second"] / ceiling["flops_per_second"])
    goal = b["goals"]["mfu_vs_shape_ceiling"]
    assert goal["goal"] == 0.8 and goal["measured"] == pytest.approx(b["contestants"]["recipe"]["mfu_vs_shape_ceiling"],
                                                                      abs=1e-4)
    assert "of shape ceiling" in (out / "benchmark.md").read_text()


def test_flop_counts_match_a_hand_count_for_the_tiny_config(tiny_dir):
    from transformers import AutoConfig

    bm = load_benchmark_module()
    counts = bm.model_flop_counts(AutoConfig.from_pretrained(tiny_dir), "lora", 16, TARGETS)
    # tiny Llama: hidden 64, 4 heads x 16, 2 KV heads, MLP 128, 2 layers, vocab 512, lm_head untied
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128          # q, k, v, o, gate, up, down
    lora_per_layer = 16 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)   # r x (in + out) per projection
    assert per_layer == 36864 and lora_per_layer == 16384
    assert counts == {"matmul_params": 2 * 36864 + 64 * 512, "lora_params": 2 * 16384, "lm_head_params": 32768,
                      "attention_width": 64, "layers": 2}
    assert counts["matmul_params"] == 106496  # embedding lookup excluded, lm_head included

    # one sequence of 100 tokens: sum of L(L+1) = 10100
    f = bm.training_flops(counts, tokens=100, sum_len_sq=10100, method="lora")
    assert f["flops_per_token_linear"] == 4 * 106496 + 6 * 32768 == 622592
    assert f["attention_flops"] == 3 * 2 * 2 * 64 * 10100 == 7756800  # 3 x (2 layers x 2d x L(L+1))
    assert f["model_flops"] == f["hardware_flops"] == 62259200 + 7756800
    ckpt = bm.training_flops(counts, tokens=100, sum_len_sq=10100, method="lora", recompute=True)
    assert ckpt["model_flops"] == f["model_flops"]  # MFU never counts the recompute
    assert ckpt["hardware_flops"] == f["model_flops"] + 2 * (106496 - 32768 + 32768) * 100 + 2 * 2 * 64 * 10100
    # the LM head (32768 weights, 4 FLOPs each per position with LoRA) only where the loss is taken: 40 of 100
    head = bm.training_flops(counts, tokens=100, sum_len_sq=10100, method="lora", head_tokens=40)
    assert head["model_flops"] == f["model_flops"] - 4 * 32768 * 60 and head["loss_positions"] == 40
    assert head["linear_flops"] == (622592 - 4 * 32768) * 100 + 4 * 32768 * 40
    full = bm.training_flops(bm.model_flop_counts(AutoConfig.from_pretrained(tiny_dir), "full", 16, TARGETS),
                             tokens=100, sum_len_sq=10100, method="full")
    assert full["flops_per_token_linear"] == 6 * 106496 == 638976


def test_matmul_peak_probe_returns_flops_per_second():
    bm = load_benchmark_module()
    for dtype in (torch.bfloat16, torch.float32):
        assert bm.matmul_peak(dtype, 64, 2, torch.device("cpu")) > 0


@pytest.mark.slow  # ~20-30 s on 2 cores; the default suite keeps under 15 minutes
def test_random_init_model_from_a_config_with_qlora(tiny_dir, tmp_path):
    """The GPU path (--model_config: random weights, nothing downloaded) exercised on CPU with the tiny config."""
    out = tmp_path / "from_config"
    proc = run(LAUNCHER + ["--model_config", str(tiny_dir / "config.json"), "--tokenizer_name_or_path", str(tiny_dir),
                           "--output_dir", str(out), "--contestants", "recipe_qlora", *SMALL],
               env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    b = json.loads((out / "benchmark.json").read_text())
    m = b["contestants"]["recipe_qlora"]
    assert list(b["contestants"]) == ["recipe_qlora"] and m["method"] == "qlora"
    assert m["trained_tokens"] == b["data"]["tokens"] and 0 < m["mfu"] < 1.5
    assert abs(b["data"]["heldout_loss_base"] - math.log(512)) < 0.5  # random weights: about ln(vocab)
    assert "speedup" not in b["goals"] and "mfu" not in b["goals"]
    assert not (out / "model").exists()  # random weights are deleted after the run


def test_bad_options_fail_with_a_message(tmp_path):
    proc = run(LAUNCHER + ["--contestants", "recipe", "axolotl", "--output_dir", str(tmp_path / "x")])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: --contestants recipe axolotl: choose distinct names from recipe, recipe_qlora" in proc.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "benchmark.json").write_text("{}")
    proc = run(LAUNCHER + ["--output_dir", str(busy)])
    assert proc.returncode == 1 and "is not empty; choose a new --output_dir" in proc.stderr
    assert (busy / "benchmark.json").read_text() == "{}"


def test_recipe_args_carry_several_flags_to_the_recipe(tmp_path):
    """--recipe_args is one string split like a shell: every flag in it reaches the recipe and overrides the
    benchmark's own (as a list option only the last item survived, so an ablation silently ran the defaults)."""
    from common.config import parse_config

    bm = load_benchmark_module()
    cfg = parse_config(bm.Config, ["--recipe_args=--attn_implementation sdpa --lora_dropout 0.05"])
    cmd = bm.recipe_command(cfg, "recipe", "asset:tiny", tmp_path / "t.jsonl", tmp_path / "e.jsonl", tmp_path / "r")
    assert cmd[-4:] == ["--attn_implementation", "sdpa", "--lora_dropout", "0.05"]
    from common.config import load_recipe

    parsed, _ = parse_config(load_recipe(REPO / "recipes" / "sft_memory_diet.py").CONFIGS, cmd[2:])
    assert parsed.attn_implementation == "sdpa" and parsed.lora_dropout == 0.05  # after the benchmark's 0.0


def test_recipe_at_peer_memory_runs_the_recipe_yamls_batch_split(tmp_path):
    """At the peer's footprint the recipe runs its YAML's micro-batch (4 x 4; the benchmark's 8 x 2 did not fit):
    the command passes neither option, and that split trains the same effective batch (16 sequences)."""
    import yaml

    from common.config import parse_config

    bm = load_benchmark_module()
    cfg = parse_config(bm.Config, ["--config", str(REPO / "harnesses" / "configs" / "benchmark.yaml")])
    args = ("recipe_at_peer_memory", "asset:tiny", tmp_path / "t.jsonl", tmp_path / "e.jsonl", tmp_path / "r")
    pinned, free = bm.recipe_command(cfg, *args), bm.recipe_command(cfg, *args, pin_batch=False)
    assert "--per_device_train_batch_size" in pinned and "--gradient_accumulation_steps" in pinned
    assert "--per_device_train_batch_size" not in free and "--gradient_accumulation_steps" not in free
    recipe_yaml = yaml.safe_load((REPO / "recipes" / "configs" / "sft_memory_diet.yaml").read_text())
    assert (recipe_yaml["per_device_train_batch_size"] * recipe_yaml["gradient_accumulation_steps"]
            == cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps)


def test_a_contestants_reason_is_its_last_error_line(tmp_path):
    bm = load_benchmark_module()
    log_file = tmp_path / "c.log"
    log_file.write_text("INFO loading\nerror: memory plan: nothing fits 3.6 GiB\nINFO exit\n")
    assert bm.last_error(log_file) == "error: memory plan: nothing fits 3.6 GiB"
    assert bm.last_error(tmp_path / "missing.log") == ""
