"""harnesses/adapter_vs_full.py (through its launcher) and harnesses/adapters.py on the tiny model.

Tiny Llama: hidden d=64, intermediate 128, 2 layers, 4 heads x 16 (q 64), 2 KV heads (k, v 32), vocab 512,
untied embeddings.
"""
import json
import math

import pytest
import torch

from conftest import REPO, run

LAUNCHER = ["bash", str(REPO / "launch" / "adapter_vs_full.sh")]
D, I, LAYERS, KV, VOCAB = 64, 128, 2, 32, 512
TOTAL = 2 * VOCAB * D + LAYERS * (2 * D * D + 2 * D * KV + 3 * D * I + 2 * D) + D


def lora_params(r):
    """r x (in + out) per adapted Linear: q, k, v, o, gate, up, down on every layer."""
    shapes = [(D, D), (D, KV), (D, KV), (D, D), (D, I), (D, I), (I, D)]
    return LAYERS * sum(r * (i + o) for i, o in shapes)


def dora_magnitudes():
    """DoRA: one magnitude per output feature of every adapted Linear."""
    return LAYERS * (D + KV + KV + D + I + I + D)


METHODS = ["full", "lora", "dora", "rslora", "pissa", "loraplus", "adapter", "qlora"]
LORA_ROWS = ("lora", "dora", "rslora", "pissa", "loraplus")


def adapter_params(size):
    """Two serial adapters per layer: down (d x b + b) and up (b x d + d)."""
    return LAYERS * 2 * (D * size + size + size * D + D)


# --- the bottleneck adapter module, in process ---------------------------------------------------
def test_bottleneck_adapter_starts_as_the_base_model_and_trains_only_itself(tiny_dir):
    from transformers import AutoModelForCausalLM

    from common import checks
    from harnesses.adapters import attach_bottleneck_adapters

    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert attach_bottleneck_adapters(model, size=16) == 2 * LAYERS
    model.eval()
    ids = torch.randint(4, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)  # zero-init up-projection

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == adapter_params(16) == 8_512
    assert all(".attn_adapter." in n or ".mlp_adapter." in n for n in trainable)
    assert set(base.state_dict()) == {k for k in model.state_dict() if "_adapter." not in k}  # base keys unchanged

    # one-batch check: the down-projection's exactly-zero first gradient is recognised as the zero init
    assert checks.check_gradient_flow(model, {"input_ids": ids, "labels": ids}) == len(trainable) == 16
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)  # the adapters are on the path
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(p.abs().sum() > 0 for n, p in trainable.items() if "adapter_up" in n)


# --- the recipe: eight methods, each in its own process --------------------------------------------
@pytest.fixture(scope="module")
def compared(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("avf") / "run"
    proc = run(LAUNCHER + ["--model_name_or_path", str(tiny_dir), "--output_dir", str(out), "--max_steps", "2",
                           "--warmup_steps", "0", "--full_learning_rate", "1e-3", "--lora_r", "8",
                           "--adapter_size", "16"], env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def rows(out):
    return {r["name"]: r for r in json.loads((out / "adapter_vs_full.json").read_text())["rows"]}


def test_every_method_ran_on_the_same_batches_with_exact_parameter_counts(compared):
    out, _ = compared
    r = rows(out)
    assert list(r) == METHODS and all(x["status"] == "ok" for x in r.values())
    assert r["full"]["trainable_params"] == r["full"]["total_params"] == TOTAL == 139_584
    assert r["lora"]["trainable_params"] == r["qlora"]["trainable_params"] == lora_params(8) == 16_384
    assert r["lora"]["lora_modules"] == r["qlora"]["lora_modules"] == 7 * LAYERS
    for name in ("rslora", "pissa", "loraplus"):  # same parameters as LoRA: scale, init and learning rates differ
        assert r[name]["trainable_params"] == lora_params(8) and r[name]["lora_modules"] == 7 * LAYERS, name
    assert r["dora"]["trainable_params"] == lora_params(8) + dora_magnitudes() == 17_408
    assert r["dora"]["total_params"] == TOTAL + lora_params(8) + dora_magnitudes()
    assert r["adapter"]["trainable_params"] == adapter_params(16) and r["adapter"]["adapters"] == 2 * LAYERS
    assert r["adapter"]["total_params"] == TOTAL + adapter_params(16)
    assert r["qlora"]["total_params"] == r["lora"]["total_params"] == TOTAL + lora_params(8)  # 4-bit counted as weights
    assert len({x["trained_tokens"] for x in r.values()}) == 1  # same data, same batches, same steps
    for x in r.values():
        assert x["optimizer_steps"] == 2 and x["peak_memory_bytes"] > x["baseline_rss_bytes"] > 0
        assert x["tokens_per_second"] > 0 and x["train_seconds"] > 0 and len(x["train_losses"]) == 2


def test_frozen_weights_stay_frozen_and_the_trained_ones_move(compared):
    r = rows(compared[0])
    full = r["full"]["parameters_changed"]
    assert full["frozen_tensors"] == 0 and full["trainable_changed"] == full["trainable_tensors"] > 0
    for name in (*LORA_ROWS, "adapter", "qlora"):
        c = r[name]["parameters_changed"]
        assert c["frozen_tensors"] > 0 and c["frozen_changed"] == 0, name
        assert c["trainable_changed"] == c["trainable_tensors"] > 0, name


def test_eval_loss_falls_and_qlora_is_evaluated_only_after_training(compared):
    r = rows(compared[0])
    for name in ("full", *LORA_ROWS, "adapter"):
        assert r[name]["eval_loss_after"] < r[name]["eval_loss_before"] - 0.005, name
    assert len({r[n]["eval_loss_before"] for n in ("full", "lora", "adapter")}) == 1  # all start from the base
    for name in ("dora", "rslora", "pissa", "loraplus"):  # PiSSA: base minus its principal part, plus that part
        assert r[name]["eval_loss_before"] == pytest.approx(r["lora"]["eval_loss_before"], abs=1e-4), name
    assert r["qlora"]["eval_loss_before"] is None and math.isfinite(r["qlora"]["eval_loss_after"])


def test_table_planner_column_and_run_files(compared):
    out, proc = compared
    r = rows(out)
    assert r["adapter"]["planner"]["bytes"] is None and "not modelled" in r["adapter"]["planner"]["note"]
    for name in ("full", *LORA_ROWS, "qlora"):
        assert r[name]["planner"]["bytes"] > 0
    md = (out / "adapter_vs_full.md").read_text()
    assert sum(line.startswith("| ") for line in md.splitlines()) == 9  # header + 8 rows
    assert "| adapter: bottleneck adapters (Houlsby) | 8,512 |" in md
    assert "| n/a |" in md and md.splitlines()[-1] in proc.stdout
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"
    m = json.loads((out / "metrics.json").read_text())
    assert m["failed"] == [] and set(m["per_method"]) == set(METHODS)
    for name in r:
        assert (out / "runs" / name / "log.txt").is_file()


def test_a_rerun_reuses_finished_methods(compared, tiny_dir):
    out, _ = compared
    before = (out / "runs" / "full" / "metrics.json").read_text()
    proc = run(LAUNCHER + ["--model_name_or_path", str(tiny_dir), "--output_dir", str(out), "--max_steps", "2",
                           "--warmup_steps", "0", "--full_learning_rate", "1e-3", "--lora_r", "8",
                           "--adapter_size", "16", "--methods", "full", "lora"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("reusing the finished run") == 2 and "--run_one" not in proc.stderr
    assert (out / "runs" / "full" / "metrics.json").read_text() == before


def test_unknown_method_is_refused(tiny_dir, tmp_path):
    proc = run(LAUNCHER + ["--model_name_or_path", str(tiny_dir), "--output_dir", str(tmp_path / "x"),
                           "--methods", "full", "ia3"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert ("--methods full ia3: list each of full, lora, qlora, adapter, dora, rslora, pissa, loraplus at most once"
            in proc.stderr)
    assert not (tmp_path / "x").exists()
