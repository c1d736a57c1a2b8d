"""Nothing lost, nothing silently wrong in a run directory (issue 13, items 1-6 and the disk / read-only part of 13).

Each fault is done for real: bytes corrupted in place at the same size, two processes at once, kill -9 of a lock
holder and of a run in the middle of a save, a diverging learning rate, a save that raises ENOSPC. Unit tests use
transformers' Trainer + a PEFT LoRA on the tiny Llama; the recipe tests run recipes/sft_memory_diet.py (6 steps,
a checkpoint every 2) as a subprocess.
"""
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common import checkpoints as ckpt
from common.checkpoints import (MARKER, CheckpointValidator, DiskFullError, NonFiniteError, NonFiniteGuard,
                                OutputDirError, RunSegments, checkpoint_problems, checkpoints, explain_disk_full,
                                last_valid_checkpoint, lock_output_dir, prepare_output_dir, release_output_dir)
from common.run_files import write_manifest
from conftest import REPO, run

ADAPTER = "adapter_model.safetensors"
CONFIG = {"model_name_or_path": "asset:tiny", "learning_rate": 1e-3, "lora_r": 4, "max_steps": 6, "output_dir": "x",
          "save_steps": 2, "resume": True}


@pytest.fixture(autouse=True)
def release_locks():
    yield
    ckpt._release_all()


def make_trainer(model_dir, output_dir, callbacks, max_steps=6, logging_steps=1):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from common.trainer import TokenCountingTrainer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(12):
        ids = torch.randint(5, 500, (8 + i,), generator=g)  # different lengths: token counts differ per step
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    args = TrainingArguments(output_dir=str(output_dir), use_cpu=True, max_steps=max_steps, save_strategy="steps",
                             save_steps=2, per_device_train_batch_size=1, learning_rate=1e-3, report_to="none",
                             logging_steps=logging_steps, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    return TokenCountingTrainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


@pytest.fixture(scope="module")
def trained_run(tiny_dir, tmp_path_factory):
    """checkpoint-2/4/6, validated and checksummed, of a 6-step run, and its segments."""
    out = tmp_path_factory.mktemp("trained") / "run"
    segments = RunSegments(counters=("trained_tokens",))
    trainer = make_trainer(tiny_dir, out, [CheckpointValidator(segments=segments), NonFiniteGuard()])
    segments.bind(trainer)
    result = trainer.train()
    write_manifest(out, CONFIG, [], "2026-12-01T00:00:00", "running")
    return out, segments.finish(result), trainer.state.log_history


@pytest.fixture
def run_copy(trained_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained_run[0], dst)
    return dst


def tree_hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def overwrite_in_place(path: Path, offset: int, data: bytes):
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(offset if offset >= 0 else size + offset)
        f.write(data)
    assert path.stat().st_size == size


# ---- 13.1: checkpoints found, none usable: refuse, list them, change nothing ------------------------------
def test_no_usable_checkpoint_is_refused_with_each_reason_and_the_move_command(run_copy):
    for path in checkpoints(run_copy):
        overwrite_in_place(path / "trainer_state.json", 0, b"\x00garbage")
    before = tree_hashes(run_copy)
    with pytest.raises(OutputDirError) as e:
        prepare_output_dir(run_copy, CONFIG)
    msg = str(e.value)
    assert "holds 3 checkpoint(s) and none can be resumed from" in msg
    for step in (2, 4, 6):
        assert f"checkpoint-{step} (trainer_state.json unreadable (" in msg
    assert "Nothing was changed" in msg and "rerun the same command to start from step 0" in msg
    assert tree_hashes(run_copy) == before and not (run_copy / ".lock").exists()
    mv = msg.split("(`")[1].split("`)")[0]  # the command the message gives works as given
    assert mv.startswith(f"mkdir {run_copy}/unusable-") and f"mv {run_copy}/checkpoint-2 " in mv
    assert subprocess.run(mv, shell=True).returncode == 0
    assert checkpoints(run_copy) == [] and len(list(run_copy.glob("unusable-*/checkpoint-*"))) == 3
    assert prepare_output_dir(run_copy, CONFIG) is None  # nothing left to overwrite: starts over


# ---- 13.3 / 13.4: damage at the same size is found by the checksums; resume falls back ---------------------
def test_same_size_nan_bytes_in_the_adapter_are_detected(run_copy, caplog):
    newest = run_copy / "checkpoint-6"
    overwrite_in_place(newest / ADAPTER, -64, b"\xff" * 64)  # the last tensor's tail becomes NaN
    assert checkpoint_problems(newest) == []  # still a well-formed safetensors file
    with caplog.at_level("WARNING", logger="common.checkpoints"):
        assert prepare_output_dir(run_copy, CONFIG) == run_copy / "checkpoint-4"
    assert f"checkpoint-6: {ADAPTER} content changed since it was saved" in caplog.text


def test_same_size_corrupted_optimizer_falls_back_and_the_resume_trains(run_copy, tiny_dir, caplog):
    overwrite_in_place(run_copy / "checkpoint-6" / "optimizer.pt", 1000, b"\x13" * 256)
    with caplog.at_level("WARNING", logger="common.checkpoints"):
        resume_from = prepare_output_dir(run_copy, CONFIG)
    assert resume_from == run_copy / "checkpoint-4"
    assert "checkpoint-6: optimizer.pt content changed since it was saved" in caplog.text
    trainer = make_trainer(tiny_dir, run_copy, [CheckpointValidator(), NonFiniteGuard()])
    trainer.train(resume_from_checkpoint=str(resume_from))
    assert trainer.state.global_step == 6 and last_valid_checkpoint(run_copy) == run_copy / "checkpoint-6"


def test_checkpoint_without_checksums_still_gets_a_corrupted_optimizer_skipped(run_copy, caplog):
    """Markers written before checksums were recorded: sizes, plus one torch.load of optimizer.pt."""
    for path in checkpoints(run_copy):
        marker = json.loads((path / MARKER).read_text())
        del marker["sha256"]
        (path / MARKER).write_text(json.dumps(marker))
    overwrite_in_place(run_copy / "checkpoint-6" / "optimizer.pt", -200, b"\x00" * 200)  # zip directory gone
    with caplog.at_level("WARNING", logger="common.checkpoints"):
        assert last_valid_checkpoint(run_copy) == run_copy / "checkpoint-4"
    assert "checkpoint-6: optimizer.pt does not load (" in caplog.text


# ---- 13.2: one run per directory ---------------------------------------------------------------------------
HOLDER = """
import sys, time
from pathlib import Path
from common.checkpoints import OutputDirError, lock_output_dir
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.01)
try:
    lock_output_dir(sys.argv[1])
except OutputDirError as e:
    print("refused:", e, flush=True)
    sys.exit(1)
print("locked", flush=True)
time.sleep(float(sys.argv[3]))
"""


def start_holder(out, go, hold_s):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(go), str(hold_s)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def test_two_processes_at_once_one_wins_the_other_is_told_who(tmp_path):
    out, go = tmp_path / "run", tmp_path / "go"
    a, b = start_holder(out, go, 4), start_holder(out, go, 4)
    time.sleep(0.5)
    go.touch()  # both try at the same moment
    results = sorted([(p.wait(timeout=60), p.stdout.read().strip()) for p in (a, b)])
    assert [rc for rc, _ in results] == [0, 1]
    assert results[0][1] == "locked"
    winner = a if a.returncode == 0 else b
    assert results[1][1].startswith(f"refused: --output_dir {out} is in use by another run (pid {winner.pid} on "
                                    f"host {os.uname().nodename}, started 20")
    assert "wait for it to finish or choose another --output_dir" in results[1][1]


def test_a_live_holder_refuses_the_run_and_a_kill_9_holder_does_not_block(run_copy, tmp_path):
    go = tmp_path / "go"
    go.touch()
    holder = start_holder(run_copy, go, 600)
    assert holder.stdout.readline().strip() == "locked"
    before = tree_hashes(run_copy)
    with pytest.raises(OutputDirError, match=rf"is in use by another run \(pid {holder.pid} on host "):
        prepare_output_dir(run_copy, CONFIG)
    assert tree_hashes(run_copy) == before
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (run_copy / ".lock").exists()  # left behind by the killed holder...
    assert prepare_output_dir(run_copy, CONFIG) == run_copy / "checkpoint-6"  # ...and it does not block
    assert json.loads((run_copy / ".lock").read_text())["pid"] == os.getpid()


# ---- 13.3: a diverged run stops before it saves anything of the NaN weights --------------------------------
def test_nan_between_log_steps_is_stopped_before_the_save(tiny_dir, tmp_path):
    from transformers import TrainerCallback

    class PoisonAtStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))

    out = tmp_path / "run"
    trainer = make_trainer(tiny_dir, out, [CheckpointValidator(), NonFiniteGuard(), PoisonAtStep3()],
                           logging_steps=10)
    with pytest.raises(NonFiniteError) as e:
        trainer.train()
    assert str(e.value).startswith("training diverged at step 4: trainable parameter ")
    assert f"Last good checkpoint: {out / 'checkpoint-2'}" in str(e.value)
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2"]  # checkpoint-4 (NaN weights) never written


# ---- 13.5: metrics cover every segment -------------------------------------------------------------------
def test_interrupted_and_resumed_segments_add_up_to_the_uninterrupted_run(trained_run, tiny_dir, tmp_path):
    from transformers import TrainerCallback

    _, whole, history = trained_run

    class CrashAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt  # step 3 is lost: the rerun repeats it from checkpoint-2

    out = tmp_path / "run"
    segments = RunSegments(counters=("trained_tokens",))
    trainer = make_trainer(tiny_dir, out, [CheckpointValidator(segments=segments), CrashAtStep3()])
    segments.bind(trainer)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    resume_from = last_valid_checkpoint(out)
    assert resume_from == out / "checkpoint-2"
    segments = RunSegments(resume_from, counters=("trained_tokens",))
    trainer = make_trainer(tiny_dir, out, [CheckpointValidator(segments=segments)])
    segments.bind(trainer)
    resumed = segments.finish(trainer.train(resume_from_checkpoint=str(resume_from)))
    assert [(s["start_step"], s["end_step"]) for s in resumed["segments"]] == [(0, 2), (2, 6)]
    assert resumed["trained_tokens"] == whole["trained_tokens"] and resumed["optimizer_steps_trained"] == 6
    assert resumed["segments"][1]["trained_tokens"] < whole["trained_tokens"]  # the last segment alone is not it
    assert resumed["mean_train_loss"] == pytest.approx(whole["mean_train_loss"], abs=1e-5)
    assert resumed["mean_train_loss"] == pytest.approx(sum(h["loss"] for h in history if "loss" in h) / 6, abs=1e-3)


# ---- 13.6: building an asset does not reseed the caller --------------------------------------------------
def test_building_an_asset_keeps_the_callers_rng(tmp_path):
    from common.assets import build

    torch.manual_seed(42)
    expected = torch.rand(4)
    torch.manual_seed(42)
    build("tiny", tmp_path / "tiny")
    assert torch.equal(torch.rand(4), expected)


# ---- 13.13: disk full while saving, read-only parent, a start that never trained ----------------------------
@pytest.mark.parametrize("failure", ["torch.save", "safetensors"])
def test_disk_full_during_a_save_says_so_and_keeps_the_previous_checkpoints(tiny_dir, tmp_path, monkeypatch, failure):
    import peft.peft_model

    out = tmp_path / "run"
    if failure == "torch.save":
        real = torch.save

        def save(obj, f, *a, **k):
            if "checkpoint-4" in str(f):
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4374")
            return real(obj, f, *a, **k)

        monkeypatch.setattr(torch, "save", save)
    else:
        real = peft.peft_model.safe_save_file

        def save(tensors, filename, *a, **k):
            if "checkpoint-4" in str(filename):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(tensors, filename, *a, **k)

        monkeypatch.setattr(peft.peft_model, "safe_save_file", save)
    trainer = make_trainer(tiny_dir, out, [CheckpointValidator()])
    with pytest.raises(DiskFullError) as e:
        with explain_disk_full(out, trainer):
            trainer.train()
    msg = str(e.value)
    size = sum(f.stat().st_size for f in (out / "checkpoint-2").rglob("*") if f.is_file())
    assert msg.startswith(f"the disk holding --output_dir {out} is full: a write failed (")
    assert f"one checkpoint takes {size / 2**20:.1f} MiB (checkpoint-2)" in msg and "Free now: " in msg
    assert "the half-written checkpoint-4 was removed" in msg and "last valid: checkpoint-2" in msg
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2"] and last_valid_checkpoint(out) == out / "checkpoint-2"


def test_other_save_errors_are_not_called_disk_full(tmp_path):
    with pytest.raises(ValueError, match="something else"):
        with explain_disk_full(tmp_path):
            raise ValueError("something else")


def test_unwritable_parent_is_one_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match=r"--output_dir .*a_file/run cannot be created \(Not a directory"):
        prepare_output_dir(blocker / "run", CONFIG)

    def refuse(self, *a, **k):  # a read-only parent (chmod does not stop root, so the refusal is simulated)
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(OutputDirError, match=r"cannot be created \(Permission denied: .*ro/run\); choose an "
                                             "--output_dir in a folder you can write to"):
        prepare_output_dir(tmp_path / "ro" / "run", CONFIG)


def test_a_start_that_never_saved_a_checkpoint_does_not_block_a_corrected_rerun(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    write_manifest(out, {**CONFIG, "learning_rate": -1.0}, [], "2026-12-01T00:00:00", "running")
    (out / "memory_plan.json").write_text("{}")
    assert prepare_output_dir(out, CONFIG) is None


def test_lock_is_reentrant_in_its_own_process_and_released(tmp_path):
    out = tmp_path / "run"
    lock_output_dir(out)
    lock_output_dir(out)
    (out / "keep.txt").write_text("x")
    release_output_dir(out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # something was written: the folder stays


# ---- the recipe: divergence, refusal, a failed start, and a kill -9 in the middle of a save ------------------
RECIPE = """
import os, runpy, sys, time
mode = os.environ.get("SAFETY_MODE", "")
if mode == "pause_save":  # pause inside the step-N save (adapter written, optimizer not yet), for a kill -9
    import transformers
    real = transformers.Trainer._save_optimizer_and_scheduler
    def paused(self, output_dir):
        if self.state.global_step == int(os.environ["PAUSE_AT_STEP"]):
            open(os.environ["PAUSED_FILE"], "w").close()
            time.sleep(600)
        return real(self, output_dir)
    transformers.Trainer._save_optimizer_and_scheduler = paused
if mode == "fail_model_load":
    import common.checks, common.models
    def fail(*a, **k):
        raise common.checks.CheckFailed("simulated failure while loading the model")
    common.models.load_base_model = fail
sys.argv = ["recipes/sft_memory_diet.py"] + sys.argv[1:]
runpy.run_path("recipes/sft_memory_diet.py", run_name="__main__")
"""


def error_lines(stderr: str) -> list[str]:
    # the Trainer's progress bar leaves its last line open: the error may follow it on the same line
    return re.findall(r"(?:^|\r|\])(error: [^\r\n]*)", stderr, re.M)


def recipe_cmd(out, *extra):
    return [sys.executable, "-c", RECIPE, "--config", "recipes/configs/sft_memory_diet.yaml",
            "--model_name_or_path", "asset:tiny", "--output_dir", str(out), "--precision", "fp32", "--max_steps", "6",
            "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "3e-3", "--sample_generations", "0",
            "--max_new_tokens", "2", "--eval_dataset_path", "", *extra]


@pytest.fixture(scope="module")
def assets_env(tmp_path_factory):
    """A fresh assets folder: the first recipe run builds asset:tiny in-process, later ones find it built."""
    return {"FT_ASSETS_DIR": str(tmp_path_factory.mktemp("assets")), "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def uninterrupted(assets_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "uninterrupted"
    proc = run(recipe_cmd(out), env=assets_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "built asset tiny" in proc.stderr  # this run built the model in-process
    return out, json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_recipe_killed_during_a_save_resumes_to_the_uninterrupted_result(uninterrupted, assets_env, tmp_path):
    """kill -9 while checkpoint-4 is being written; the same command resumes from checkpoint-2 and ends where the
    uninterrupted run ended (same loss, same trained tokens over both segments). The uninterrupted run built
    asset:tiny in-process and this one found it built: equal losses also show the build does not reseed."""
    out, paused = tmp_path / "killed", tmp_path / "paused"
    env = dict(os.environ, **assets_env, SAFETY_MODE="pause_save", PAUSE_AT_STEP="4", PAUSED_FILE=str(paused))
    job = subprocess.Popen(recipe_cmd(out), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not paused.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert paused.exists(), "the run never reached the step-4 save"
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=30)
    assert (out / "checkpoint-4" / ADAPTER).is_file() and not (out / "checkpoint-4" / MARKER).exists()
    assert not (out / "metrics.json").exists() and (out / ".lock").exists()  # the killed run's lock file is left

    proc = run(recipe_cmd(out), env=assets_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint-4: it was never validated" in proc.stderr and f"resuming from {out / 'checkpoint-2'}" in proc.stderr
    a, b = uninterrupted[1], json.loads((out / "metrics.json").read_text())
    assert b["optimizer_steps"] == 6 and b["final_train_loss"] == pytest.approx(a["final_train_loss"], abs=1e-6)
    assert [(s["start_step"], s["end_step"]) for s in b["segments"]] == [(0, 2), (2, 6)]
    assert (b["trained_tokens"], b["trained_labelled_tokens"]) == (a["trained_tokens"], a["trained_labelled_tokens"])
    assert b["segments"][1]["trained_tokens"] < a["trained_tokens"]
    assert b["mean_train_loss"] == pytest.approx(a["mean_train_loss"], abs=1e-5)
    assert not (out / ".lock").exists()


@pytest.mark.slow
def test_recipe_refuses_a_run_whose_checkpoints_are_all_unusable(uninterrupted, assets_env, tmp_path):
    out = tmp_path / "broken"
    shutil.copytree(uninterrupted[0], out, ignore=shutil.ignore_patterns("metrics.json", "adapter"))
    for path in checkpoints(out):
        overwrite_in_place(path / "trainer_state.json", 0, b"{{{{")
    before = tree_hashes(out)
    proc = run(recipe_cmd(out), env=assets_env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "holds 3 checkpoint(s) and none can be resumed from: checkpoint-2 (" in errors[0]
    assert "LoRA attached" not in proc.stderr and tree_hashes(out) == before


def test_recipe_stops_a_diverging_run_with_exit_1_and_no_metrics(assets_env, tmp_path):
    out = tmp_path / "diverged"
    proc = run(recipe_cmd(out, "--learning_rate", "1e30"), env=assets_env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and errors[0].startswith("error: training diverged at step ")
    step = int(errors[0].split("at step ")[1].split(":")[0])
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    saved = checkpoints(out)
    assert all(int(p.name.split("-")[1]) < step and (p / MARKER).is_file() for p in saved)
    assert f"Last good checkpoint: {saved[-1] if saved else 'none'}" in errors[0]


def test_recipe_start_that_fails_after_the_lock_leaves_nothing(assets_env, tmp_path):
    out = tmp_path / "failed"
    proc = run(recipe_cmd(out), env=dict(assets_env, SAFETY_MODE="fail_model_load"))
    assert proc.returncode == 1 and "error: simulated failure while loading the model" in proc.stderr
    assert not out.exists()  # no manifest, no memory plan, no lock file, no folder
