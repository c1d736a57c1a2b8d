"""launch/slurm_sweep.sbatch run as SLURM would run two array tasks (its #SBATCH lines are comments to bash), with
a stub `scontrol`: both workers share one journal study and run each trial once; a time-limit signal (USR1)
stops the running trial with a checkpoint and requeues the task, and the rerun finishes the study."""
import json
import os
import signal
import subprocess
import time

import optuna
import pytest

from conftest import REPO
from harnesses import sweep

STUB_SCONTROL = '#!/usr/bin/env bash\necho "$@" >> "$STUB_LOG/scontrol.txt"\n'
GRID = ["--space", "learning_rate=[1.0e-3, 2.0e-2]", "lora_r=[4, 8]", "lora_alpha=2r"]


def task(tiny_dir, tmp_path, out, index, space=GRID, trial_args=("max_steps=2",)):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(STUB_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(tmp_path), OUTPUT_DIR=str(out),
               SLURM_ARRAY_JOB_ID="4242", SLURM_ARRAY_TASK_ID=str(index), SLURM_JOB_NAME="sweep",
               SLURM_SUBMIT_DIR=str(REPO), OMP_NUM_THREADS="1")
    cmd = ["bash", str(REPO / "launch" / "slurm_sweep.sbatch"), *space, "--trial_args",
           f"model_name_or_path={tiny_dir}", "max_length=64", "per_device_train_batch_size=2",
           "gradient_accumulation_steps=1", "precision=fp32", "max_new_tokens=4", *trial_args]
    log = open(tmp_path / f"task{index}.log", "a")  # a file, not a pipe: a child holding it must not block
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def study_of(out):
    storage = sweep.open_storage(f"journal:{out / 'study.journal'}")
    (summary,) = optuna.get_all_study_summaries(storage=storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


@pytest.mark.slow
def test_two_array_tasks_share_one_journal_study_and_run_each_trial_once(tiny_dir, tmp_path):
    out = tmp_path / "study"
    jobs = [task(tiny_dir, tmp_path, out, i) for i in (0, 1)]
    codes = [j.wait(timeout=900) for j in jobs]
    logs = [(tmp_path / f"task{i}.log").read_text() for i in (0, 1)]
    assert codes == [0, 0], logs
    study = study_of(out)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 4
    assert len({t.user_attrs["trial"] for t in study.trials}) == 4
    rows = json.loads((out / "leaderboard.json").read_text())["trials"]
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows)
    assert not (tmp_path / "scontrol.txt").exists()  # nothing to requeue


@pytest.mark.slow
def test_a_time_limit_signal_checkpoints_the_trial_requeues_the_task_and_the_rerun_finishes(tiny_dir, tmp_path):
    out = tmp_path / "study"
    one = dict(space=["--space", "learning_rate=[1.0e-3]"], trial_args=("max_steps=300", "save_steps=2"))
    job = task(tiny_dir, tmp_path, out, 0, **one)
    try:
        for _ in range(600):  # until the trial has a checkpoint: it is inside its training loop
            if list(out.glob("trials/*/run/checkpoint-*/checkpoint_ok.json")):
                break
            time.sleep(0.5)
        else:
            pytest.fail((tmp_path / "task0.log").read_text()[-4000:])
        job.send_signal(signal.SIGUSR1)  # SLURM's --signal=B:USR1@120 goes to the batch shell
        assert job.wait(timeout=300) == 0, (tmp_path / "task0.log").read_text()[-4000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242_0"]
    assert "requeueing 4242_0" in (tmp_path / "task0.log").read_text()
    (row,) = json.loads((out / "leaderboard.json").read_text())["trials"]
    assert row["status"] == "interrupted" and row["rc"] == 75
    ckpts = sorted((out / "trials" / row["trial"] / "run").glob("checkpoint-*/checkpoint_ok.json"))
    step = max(int(c.parent.name.split("-")[1]) for c in ckpts)
    assert 0 < step < 300
    # the requeued task runs the same command: the trial resumes from its checkpoint and the study finishes
    rerun = task(tiny_dir, tmp_path, out, 0, **one)
    assert rerun.wait(timeout=1800) == 0, (tmp_path / "task0.log").read_text()[-4000:]
    man = json.loads((out / "trials" / row["trial"] / "run" / "manifest.json").read_text())
    assert man["status"] == "finished" and "checkpoint-" in man["resumed_from"]
    (row,) = json.loads((out / "leaderboard.json").read_text())["trials"]
    assert row["status"] == "finished" and row["optimizer_steps"] == 300
    assert [t.state.name for t in study_of(out).trials].count("COMPLETE") == 1
