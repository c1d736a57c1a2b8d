"""recipes/sft_memory_diet.py end to end on the tiny model, through its launcher."""
import hashlib
import json
import math
import shutil

import pytest
import torch

from conftest import REPO, run

LAUNCHER = ["bash", str(REPO / "launch" / "memory_diet.sh")]


def train(tiny_dir, out, *extra, env=None):
    cmd = LAUNCHER + ["--model_name_or_path", str(tiny_dir), "--output_dir", str(out), "--precision", "fp32",
                      "--max_steps", "8", "--save_steps", "4", "--logging_steps", "1", "--learning_rate", "3e-3",
                      "--sample_generations", "2", "--max_new_tokens", "8", *extra]
    return run(cmd, env=env)


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def lora_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    proc = train(tiny_dir, out, "--report_to", "tensorboard")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_run_directory_follows_the_contract(lora_run):
    out, proc = lora_run
    assert "+ " in proc.stderr and "recipes/sft_memory_diet.py --config" in proc.stderr  # the launcher echoes
    m = json.loads((out / "metrics.json").read_text())
    for key in ("final_train_loss", "eval_loss_before", "eval_loss_after", "trained_tokens", "tokens_per_second",
                "wall_seconds", "peak_memory_bytes", "peak_memory_method", "trainable_params", "total_params",
                "world_size", "device", "estimated_cost_usd", "keyword_accuracy_before", "keyword_accuracy_after"):
        assert m[key] is not None, key
    assert m["world_size"] == 1 and m["device_type"] == "cpu" and m["optimizer_steps"] == 8
    assert m["trained_tokens"] == m["num_input_tokens_seen"]  # counted in training_step, matches the Trainer
    assert 0 < m["trained_labelled_tokens"] < m["trained_tokens"]
    assert m["peak_memory_bytes"] > m["baseline_rss_bytes"] > 0
    assert m["trainable_params"] == 2 * ((16 * 64 + 64 * 16) * 2 + (16 * 64 + 32 * 16) * 2 + (16 * 64 + 128 * 16) * 2
                                         + (16 * 128 + 64 * 16))  # r=16 on all 7 projections, 2 layers
    assert m["lora_modules"] == 14
    assert m["eval_loss_after"] < m["eval_loss_before"]
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "finished" and man["config"]["max_steps"] == 8
    assert set(man["datasets"]) == {"data/persona/train.jsonl", "data/persona/heldout.jsonl"}
    assert man["packages"]["transformers"] and man["ended"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "runs").rglob("events.out.tfevents.*")), "report_to tensorboard wrote no event file"
    for step in (4, 8):
        assert (out / f"checkpoint-{step}" / "checkpoint_ok.json").is_file()
    gens = json.loads((out / "generations.json").read_text())
    assert len(gens["before"]) == len(gens["after"]) == 24


def test_train_loss_falls(lora_run):
    out, _ = lora_run
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05


def test_adapter_reloads_and_reproduces_the_recorded_eval_loss(lora_run, tiny_dir):
    """Stock PeftModel.from_pretrained on the saved adapter gives the held-out loss the run recorded;
    LoRA weights moved, base weights did not."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.collator import CausalLMCollator, tokenize_sft
    from common.data import load_dataset_file, to_messages
    from common.evaluation import heldout_loss

    out, _ = lora_run
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(out / "adapter")
    records, fmt = load_dataset_file(REPO / "data/persona/heldout.jsonl")
    feats, _ = tokenize_sft([("", to_messages(r.data, fmt), r.data) for r in records], tok, 256)
    recorded = json.loads((out / "metrics.json").read_text())["eval_loss_after"]
    # eval_loss is token-weighted over the whole set (common.evaluation.heldout_loss), not a mean of batch means
    assert heldout_loss(model, feats, tok.pad_token_id) == pytest.approx(recorded, abs=1e-4)
    collate = CausalLMCollator(tok.pad_token_id)
    nll = labelled = 0
    with torch.no_grad():
        for batch in (collate([f]) for f in feats):  # one example at a time: its mean loss x its labelled tokens
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            nll, labelled = nll + model(**batch).loss.item() * tokens, labelled + tokens
    assert nll / labelled == pytest.approx(recorded, abs=1e-4)

    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 14 and all(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero: all trained
    original = load_file(tiny_dir / "model.safetensors")
    for name, p in model.base_model.model.named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, original[key]), key  # frozen base untouched


def test_finished_output_dir_is_refused_untouched(lora_run, tiny_dir):
    out, _ = lora_run
    before = digest(out)
    proc = train(tiny_dir, out)
    assert proc.returncode == 1
    assert "already holds a finished run" in proc.stderr and "Traceback" not in proc.stderr
    assert digest(out) == before


def test_interrupted_run_resumes_from_last_valid_checkpoint(lora_run, tiny_dir, tmp_path):
    """Simulate a kill during the step-8 save: no metrics.json and checkpoint-8 never validated."""
    out, _ = lora_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed, ignore=shutil.ignore_patterns("metrics.json", "adapter", "runs"))
    (resumed / "checkpoint-8" / "checkpoint_ok.json").unlink()
    manifest = json.loads((resumed / "manifest.json").read_text())
    manifest["config"]["output_dir"] = str(resumed)
    (resumed / "manifest.json").write_text(json.dumps(manifest))
    proc = train(tiny_dir, resumed, "--report_to", "tensorboard")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "never validated" in proc.stderr and f"resuming from {resumed / 'checkpoint-4'}" in proc.stderr
    a = json.loads((out / "metrics.json").read_text())
    b = json.loads((resumed / "metrics.json").read_text())
    assert b["optimizer_steps"] == 8
    # same data order, RNG and optimizer state: the resumed run ends where the uninterrupted one did
    assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], abs=1e-5)
    assert b["eval_loss_after"] == pytest.approx(a["eval_loss_after"], abs=1e-5)


@pytest.mark.slow  # tens of seconds on 2 cores: the default suite stays under 15 minutes
def test_qlora_on_cpu_trains_and_skips_eval_before_training(lora_run, tiny_dir, tmp_path):
    proc = train(tiny_dir, tmp_path / "q", "--method", "qlora", "--max_steps", "4", "--optim", "paged_adamw_8bit")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "QLoRA on CPU: no evaluation or generation before training" in proc.stderr
    assert "on CPU paged_adamw_8bit runs as adamw_8bit" in proc.stderr
    m = json.loads((tmp_path / "q" / "metrics.json").read_text())
    assert m["optimizer"] == "adamw_8bit" and m["method"] == "qlora" and m["eval_loss_before"] is None and math.isfinite(m["eval_loss_after"])
    lora = json.loads((lora_run[0] / "metrics.json").read_text())
    # packed 4-bit weights are counted as the weights they hold: same totals as the fp32 LoRA run
    assert (m["trainable_params"], m["total_params"]) == (lora["trainable_params"], lora["total_params"])


def test_qlora_on_cpu_with_periodic_eval_is_refused(tiny_dir, tmp_path):
    proc = train(tiny_dir, tmp_path / "q", "--method", "qlora", "--eval_steps", "2")
    assert proc.returncode == 1
    assert "--eval_steps > 0 with QLoRA on CPU" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "q").exists()


def test_bad_data_fails_before_the_model_loads(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}\n')
    proc = train(tiny_dir, tmp_path / "out", "--dataset_path", str(bad))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{bad}:2:" in proc.stderr and "assistant" in proc.stderr
    assert "LoRA attached" not in proc.stderr and not (tmp_path / "out").exists()


def test_launcher_help_and_world_size_guard(tmp_path):
    proc = run(LAUNCHER + ["--help"])
    assert proc.returncode == 0 and "--gradient_accumulation_steps" in proc.stdout and "--method" in proc.stdout
    proc = run(LAUNCHER, env={"WORLD_SIZE": "2"})
    assert proc.returncode == 2 and "single-device" in proc.stderr


@pytest.mark.slow  # ~20 s; SaveOnSignal's exit 75 + resume stays in the default run via test_multigpu (the sweep's SIGTERM test is -m slow)
def test_sigterm_saves_a_checkpoint_exits_75_and_the_rerun_finishes(tiny_dir, tmp_path):
    """Preemption: SIGTERM mid-run -> checkpoint after the current step, exit 75; the same command resumes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "preempt"
    cmd = LAUNCHER + ["--model_name_or_path", str(tiny_dir), "--output_dir", str(out), "--precision", "fp32",
                      "--max_steps", "60", "--save_steps", "1000", "--logging_steps", "1",
                      "--sample_generations", "0", "--max_new_tokens", "2"]
    env = dict(os.environ, PYTHON=sys.executable)
    log = open(tmp_path / "run.log", "w")
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while "'loss'" not in (tmp_path / "run.log").read_text() and time.time() < deadline and job.poll() is None:
        time.sleep(0.2)
    sent = time.time()
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=60) == 75
    log.close()
    assert time.time() - sent < 60  # bounded: one optimizer step plus one save
    text = (tmp_path / "run.log").read_text()
    assert "received SIGTERM: saving a checkpoint after this optimizer step" in text
    saved = sorted(out.glob("checkpoint-*"))
    assert len(saved) == 1 and (saved[0] / "checkpoint_ok.json").is_file()
    step = int(saved[0].name.split("-")[1])
    assert 0 < step < 60 and not (out / "metrics.json").exists()

    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {saved[0]}" in proc.stderr
    assert json.loads((out / "metrics.json").read_text())["optimizer_steps"] == 60
