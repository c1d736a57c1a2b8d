"""harnesses/sweep.py: Optuna grid/random/TPE/QMC search over recipes/sft_memory_diet.py, trials as subprocesses,
on the tiny model through launch/sweep.sh. Each trial process costs seconds (interpreter + torch import), so
the default tests run 7 trials in all: a 2x2 grid, a rerun (nothing runs), one bad value, and a 2-trial grid
with median pruning. The slow ones: SIGTERM and resume, kill -9 of a worker and a rerun, two workers."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from conftest import REPO, run

LAUNCHER = ["bash", str(REPO / "launch" / "sweep.sh")]
ENV = {"OMP_NUM_THREADS": "1"}  # trials share 2 cores with the test run


from harnesses import sweep  # noqa: E402


def sweep_cmd(tiny_dir, out, *extra):
    return LAUNCHER + ["--output_dir", str(out), "--trial_args", f"model_name_or_path={tiny_dir}", "max_steps=2",
                       "max_length=64", "per_device_train_batch_size=2", "gradient_accumulation_steps=1",
                       "precision=fp32", "max_new_tokens=4", *extra]


GRID = ["--space", "learning_rate=[1.0e-3, 2.0e-2]", "lora_r=[4, 8]", "lora_alpha=2r"]


@pytest.fixture(scope="module")
def grid(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "grid"
    proc = run(sweep_cmd(tiny_dir, out, *GRID), env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def board(out):
    return json.loads((out / "leaderboard.json").read_text())["trials"]


def test_grid_runs_every_combination_and_ranks_by_eval_loss(grid):
    out, proc = grid
    rows = board(out)
    assert len(rows) == 4 and all(r["status"] == "finished" and not r["reused"] for r in rows)
    assert {(r["learning_rate"], r["lora_r"], r["lora_alpha"]) for r in rows} == {
        (1e-3, 4, 8), (1e-3, 8, 16), (2e-2, 4, 8), (2e-2, 8, 16)}              # lora_alpha: 2r -> 2 x rank
    losses = [r["eval_loss_after"] for r in rows]
    assert losses == sorted(losses) and len(set(losses)) == 4
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    for r in rows:                                    # every row is its own trial's metrics.json
        m = json.loads((out / "trials" / r["trial"] / "run" / "metrics.json").read_text())
        assert m["eval_loss_after"] == r["eval_loss_after"] and m["optimizer_steps"] == 2
        assert r["final_train_loss"] == m["final_train_loss"] and r["tokens_per_second"] == m["tokens_per_second"]
        assert r["peak_memory_bytes"] == m["peak_memory_bytes"] > 0 and r["wall_seconds"] > 0
        man = json.loads((out / "trials" / r["trial"] / "run" / "manifest.json").read_text())
        assert man["status"] == "finished"
        assert (man["config"]["learning_rate"], man["config"]["lora_r"], man["config"]["lora_alpha"]) == \
               (r["learning_rate"], r["lora_r"], r["lora_alpha"])
        assert man["config"]["max_length"] == 64 and man["config"]["model_name_or_path"].endswith("tiny")
    # the larger learning rate moves the held-out loss further in 2 steps
    assert {r["learning_rate"] for r in rows[:2]} == {2e-2}
    assert rows[0]["eval_loss_after"] < rows[0]["eval_loss_before"]
    md = (out / "leaderboard.md").read_text().splitlines()
    assert md[0].startswith("| rank | trial | learning_rate | lora_r | lora_alpha | eval_loss_after |")
    assert [line.split(" | ")[1] for line in md[2:6]] == [r["trial"] for r in rows]
    csv_lines = (out / "leaderboard.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[1].startswith(f"1,{rows[0]['trial']},")
    m = json.loads((out / "metrics.json").read_text())
    assert (m["trials"], m["finished"], m["failed"], m["skipped"], m["ran"]) == (4, 4, 0, 0, 4)
    assert m["best_trial"]["trial"] == rows[0]["trial"] and m["best_trial"]["eval_loss_after"] == losses[0]
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"
    assert "=== leaderboard" in proc.stdout and rows[0]["trial"] in proc.stdout


def test_rerun_skips_finished_trials(grid, tiny_dir):
    out, _ = grid
    files = sorted((out / "trials").glob("*/run/metrics.json"))
    before = {f: f.stat().st_mtime_ns for f in files}
    proc = run(sweep_cmd(tiny_dir, out, *GRID), env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {f: f.stat().st_mtime_ns for f in files} == before and len(files) == 4
    assert proc.stderr.count("skipped, finished in an earlier run") == 4
    m = json.loads((out / "metrics.json").read_text())
    assert (m["finished"], m["skipped"], m["ran"]) == (4, 4, 0)
    assert all(r["reused"] for r in board(out))


@pytest.mark.slow  # tens of seconds on 2 cores: the default suite stays under 15 minutes
def test_failed_trial_is_recorded_and_the_others_finish(grid, tiny_dir):
    """A new space sharing one trial with the grid: that one is reused, the bad value fails with its
    exit code and error line, the sweep still exits 0 and ranks the finished trial first."""
    out, _ = grid
    proc = run(sweep_cmd(tiny_dir, out, "--space", "learning_rate=[fast, 1.0e-3]", "lora_r=[4]", "lora_alpha=2r"),
               env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = board(out)
    assert [(r["learning_rate"], r["status"], r["rank"]) for r in rows] == [(1e-3, "finished", 1), ("fast", "failed", None)]
    assert rows[0]["reused"]
    bad = rows[1]
    assert bad["rc"] == 2 and bad["error"].endswith("error: --learning_rate fast: not a float")
    assert bad["eval_loss_after"] is None
    record = json.loads((out / "trials" / bad["trial"] / "trial.json").read_text())
    assert record["status"] == "failed" and record["attempts"][-1]["rc"] == 2
    assert "error: --learning_rate fast: not a float" in (out / "trials" / bad["trial"] / "stderr.log").read_text()
    assert "failed (exit 2): " in (out / "leaderboard.md").read_text()
    m = json.loads((out / "metrics.json").read_text())
    assert (m["finished"], m["failed"], m["ran"]) == (1, 1, 1)
    # only failed trials, kept as failed (not retried): the sweep exits 1
    proc = run(sweep_cmd(tiny_dir, out, "--space", "learning_rate=[fast]", "lora_r=[4]", "lora_alpha=2r",
                         "--retry_failed", "false"), env=ENV)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "skipped, failed in an earlier run" in proc.stderr
    assert json.loads((out / "metrics.json").read_text())["best_trial"] is None


def test_random_search_is_reproducible_and_respects_bounds():
    space = {"learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}, "lora_r": {"low": 4, "high": 64, "log": True},
             "lora_dropout": {"low": 0.0, "high": 0.1}, "per_device_train_batch_size": [1, 2, 4], "seed": 7}
    a = sweep.random_trials(space, 400, seed=3)
    assert a == sweep.random_trials(space, 400, seed=3) and a != sweep.random_trials(space, 400, seed=4)
    assert sweep.random_trials(space, 5, seed=3) == a[:5]            # a larger N extends the same sweep
    lrs = [t["learning_rate"] for t in a]
    assert all(1e-5 <= x <= 1e-3 and isinstance(x, float) for x in lrs)
    assert 0.4 < sum(x < 1e-4 for x in lrs) / len(lrs) < 0.6          # log-uniform: median ~ sqrt(low x high)
    assert all(isinstance(t["lora_r"], int) and 4 <= t["lora_r"] <= 64 for t in a)
    assert all(0.0 <= t["lora_dropout"] <= 0.1 for t in a)
    assert {t["per_device_train_batch_size"] for t in a} == {1, 2, 4} and {t["seed"] for t in a} == {7}
    assert len({json.dumps(t, sort_keys=True) for t in a}) == 400     # distinct trials
    # only 3 distinct choices: 3 trials, not 10
    assert len(sweep.random_trials({"lora_r": [4, 8, 16]}, 10, seed=0)) == 3


@pytest.mark.slow  # tens of seconds on 2 cores: the default suite stays under 15 minutes
def test_random_search_from_the_command_line_is_reproducible(tmp_path):
    cmd = LAUNCHER + ["--output_dir", str(tmp_path / "r"), "--search", "random", "--num_trials", "4", "--seed", "11",
                      "--dry_run", "true", "--space", "learning_rate={low: 1e-5, high: 1e-3, log: true}",
                      "lora_r=[4, 8, 16]", "lora_alpha=2r"]
    first, second = run(cmd, env=ENV), run(cmd, env=ENV)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout == second.stdout
    lines = [line for line in first.stdout.splitlines() if line.startswith("trial ")]
    assert len(lines) == 4
    for line in lines:
        values = json.loads(line.split(": ", 1)[1])
        assert 1e-5 <= values["learning_rate"] <= 1e-3 and values["lora_r"] in (4, 8, 16)
    commands = [line for line in first.stdout.splitlines() if line.startswith("  ")]
    assert all(f"--lora_alpha {2 * json.loads(t.split(': ', 1)[1])['lora_r']} " in c for t, c in zip(lines, commands))
    assert not (tmp_path / "r").exists()                              # a dry run writes nothing


def test_trial_identity_follows_every_setting():
    def ids(space, trial_args=None, search="grid"):
        cfg = sweep.Config(space=sweep.normalize(space), trial_args=sweep.normalize(trial_args or {"max_steps": 8}),
                           search=search)
        return [t["id"] for t in sweep.plan_trials(cfg)[0]]

    base = ids({"learning_rate": [1e-4, 3e-4], "lora_r": [8, 16]})
    assert base == ids({"learning_rate": ["1e-4", "3e-4"], "lora_r": [8, 16]})        # YAML's 1e-4 text = 1.0e-4
    assert len(set(base)) == 4 and base[0].startswith("lr0.0001_r8-")
    extended = ids({"learning_rate": [1e-4, 3e-4, 1e-3], "lora_r": [8, 16]})
    assert set(base) < set(extended)                              # a grown space reuses the trials it shares
    assert not set(base) & set(ids({"learning_rate": [1e-4, 3e-4], "lora_r": [8, 16]}, {"max_steps": 9}))
    # alpha tied to rank vs a fixed alpha that happens to be equal: same settings, same folder
    assert ids({"lora_r": [8], "lora_alpha": "2r"}) == ids({"lora_r": [8], "lora_alpha": 16}) == ["r8_alpha16-" + ids({"lora_r": [8], "lora_alpha": 16})[0][-8:]]
    assert sweep.cli_flags({"lora_target_modules": ["q_proj", "v_proj"], "eval_dataset_path": None, "resume": False,
                            "learning_rate": 3e-4, "lora_r": 8}) == [
        "--lora_target_modules", "q_proj", "v_proj", "--eval_dataset_path", "null", "--resume", "false",
        "--learning_rate", "0.0003", "--lora_r", "8"]
    assert sweep.range_points("lr", {"low": 1e-4, "high": 1e-2, "log": True, "num": 3}) == [1e-4, 1e-3, 1e-2]
    # a finished folder is reused only if the run recorded the options this trial passes
    trial = {"args": {"learning_rate": 3e-4, "lora_target_modules": "all-linear", "resume": True, "num_train_epochs": 8}}
    ran = {"learning_rate": 3e-4, "lora_target_modules": ["all-linear"], "resume": True, "num_train_epochs": 8.0}
    assert sweep.settings_conflicts(trial, ran) == []
    assert sweep.settings_conflicts(trial, {**ran, "learning_rate": 1e-3}) == ["learning_rate (run: 0.001, sweep: 0.0003)"]


@pytest.mark.parametrize("space, trial_args, message", [
    ({"lora_rank": [4, 8]}, {}, "space: 'lora_rank' is not an option of recipes/sft_memory_diet.py (did you mean 'lora_r'?)"),
    ({"learning_rate": {"low": 1e-5, "high": 1e-3}}, {}, "is a range for --search random; for grid search give a list"),
    ({"learning_rate": {"low": 0.0, "high": 1e-3, "log": True}}, {}, "a log range needs low > 0"),
    ({"lora_r": []}, {}, "space: lora_r: an empty list of choices"),
    ({}, {}, "the search space is empty"),
    ({"lora_r": [8]}, {"output_dir": "x"}, "trial_args: 'output_dir' is set by the sweep for each trial"),
])
def test_bad_space_fails_fast_with_what_to_change(space, trial_args, message):
    with pytest.raises(sweep.SweepError) as e:
        sweep.plan_trials(sweep.Config(space=space, trial_args=trial_args))
    assert message in str(e.value)


def test_bad_space_on_the_command_line_is_an_error_line_not_a_traceback(tmp_path):
    proc = run(LAUNCHER + ["--output_dir", str(tmp_path / "s"), "--space", "lora_rank=[4, 8]"], env=ENV)
    assert proc.returncode == 1 and not (tmp_path / "s").exists()
    assert proc.stderr.strip().splitlines()[-1] == \
        "error: space: 'lora_rank' is not an option of recipes/sft_memory_diet.py (did you mean 'lora_r'?); " \
        "`python recipes/sft_memory_diet.py --help` lists them"
    with pytest.raises(sweep.SweepError, match="expected key=value"):
        sweep.split_mapping_flags(["--space", "lora_r"])
    argv, found = sweep.split_mapping_flags(["--seed", "3", "--space=lora_r=[4, 8]", "lora_alpha=2r", "--trial_args",
                                             "max_steps=2", "eval_dataset_path=null", "--trial_args", "{seed: 5}"])
    assert argv == ["--seed", "3"]
    assert found == {"space": {"lora_r": [4, 8], "lora_alpha": "2r"},
                     "trial_args": {"max_steps": 2, "eval_dataset_path": None, "seed": 5}}


@pytest.mark.slow
def test_sigterm_stops_the_running_trial_and_a_rerun_resumes_it(tiny_dir, tmp_path):
    out = tmp_path / "sig"
    cmd = sweep_cmd(tiny_dir, out, "--space", "learning_rate=[1.0e-3]", "--trial_args", "max_steps=400",
                    "save_steps=1000")
    env = dict(os.environ, PYTHON=sys.executable, **ENV)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(out.glob("trials/*/run/before.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    time.sleep(2)                                   # inside the training loop
    proc.send_signal(signal.SIGTERM)                # the launcher execs python: this is the sweep
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr[-3000:]
    (row,) = board(out)
    assert row["status"] == "interrupted" and row["rc"] == 75
    ckpts = sorted((out / "trials" / row["trial"] / "run").glob("checkpoint-*/checkpoint_ok.json"))
    assert len(ckpts) == 1
    step = int(ckpts[0].parent.name.split("-")[1])
    assert 0 < step < 400
    done = run(cmd, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming its unfinished run" in done.stderr
    man = json.loads((out / "trials" / row["trial"] / "run" / "manifest.json").read_text())
    assert man["resumed_from"].endswith(f"checkpoint-{step}")
    (row,) = board(out)
    assert row["status"] == "finished" and row["optimizer_steps"] == 400 and math.isfinite(row["eval_loss_after"])


# ---- Optuna: samplers, pruning, the study, workers ------------------------------------------------
def study_of(out):
    """The sweep's study, as the sweep left it in <out>/study.db."""
    (summary,) = optuna.get_all_study_summaries(storage=f"sqlite:///{out / 'study.db'}")
    return optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{out / 'study.db'}")


@pytest.fixture(scope="module")
def pruned(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "pruned"
    proc = run(sweep_cmd(tiny_dir, out, "--space", "learning_rate=[1.0e-3, 2.0e-2]", "lora_r=[4]", "lora_alpha=2r",
                         "--pruner", "median", "--pruner_startup_trials", "1",
                         "--trial_args", "max_steps=4", "eval_steps=1"), env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_median_pruner_stops_the_worse_trial_during_training(pruned):
    """Grid order (seed 0): lr 2e-2 first, unpruned (the pruner's startup trial); lr 1e-3 trails it at step 2
    and stops there: fewer optimizer steps, run/pruned.json, PRUNED in the study, a metrics.json all the same."""
    out, proc = pruned
    rows = board(out)
    assert [(r["learning_rate"], r["status"], r["rank"]) for r in rows] == [(2e-2, "finished", 1), (1e-3, "pruned", None)]
    best, cut = rows
    marker = json.loads((out / "trials" / cut["trial"] / "run" / "pruned.json").read_text())
    assert marker["step"] == cut["pruned_at_step"] and 0 < marker["step"] < 4 == marker["max_steps"]
    assert best["optimizer_steps"] == 4 and cut["optimizer_steps"] == marker["step"]
    assert not (out / "trials" / best["trial"] / "run" / "pruned.json").exists()
    study = study_of(out)
    states = {t.user_attrs["trial"]: t for t in study.trials}
    assert states[best["trial"]].state == optuna.trial.TrialState.COMPLETE
    assert states[best["trial"]].value == best["eval_loss_after"]
    assert states[cut["trial"]].state == optuna.trial.TrialState.PRUNED
    # every evaluation during training was reported, step by step; the pruned one's stop where it was pruned
    assert sorted(states[best["trial"]].intermediate_values) == [0, 1, 2, 3, 4]
    assert max(states[cut["trial"]].intermediate_values) == marker["step"]
    step = marker["step"]
    assert states[cut["trial"]].intermediate_values[step] > states[best["trial"]].intermediate_values[step]
    m = json.loads((out / "metrics.json").read_text())
    assert (m["finished"], m["pruned"], m["ran"], m["optimizer_steps_total"]) == (1, 1, 2, 4 + step)
    assert f"pruned at step {step}" in (out / "leaderboard.md").read_text()
    assert "pruned by the sweep's median pruner" in (out / "trials" / cut["trial"] / "stderr.log").read_text()
    for name in ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values"):
        assert (out / f"{name}.png").stat().st_size > 1000, name
    assert sorted(m["plots"]) == sorted(f"{n}.png" for n in sweep.PLOTS)


def test_a_pruned_trial_is_not_run_again(pruned, tiny_dir):
    out, _ = pruned
    proc = run(sweep_cmd(tiny_dir, out, "--space", "learning_rate=[1.0e-3, 2.0e-2]", "lora_r=[4]", "lora_alpha=2r",
                         "--pruner", "median", "--pruner_startup_trials", "1",
                         "--trial_args", "max_steps=4", "eval_steps=1"), env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("skipped, finished in an earlier run") == 2
    assert [r["status"] for r in board(out)] == ["finished", "pruned"] and all(r["reused"] for r in board(out))


@pytest.mark.parametrize("search", ["random", "tpe", "qmc"])
def test_every_sampler_is_seeded_and_stays_inside_the_space(search):
    space = {"learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}, "lora_r": [4, 8, 16], "lora_alpha": "2r"}
    cfg = sweep.Config(search=search, space=space, trial_args={"max_steps": 2}, num_trials=6, seed=5)
    a, b = sweep.plan_trials(cfg)[0], sweep.plan_trials(cfg)[0]
    assert [t["id"] for t in a] == [t["id"] for t in b] and len(a) == (4 if search == "tpe" else 6)  # tpe: its startup
    assert all(1e-5 <= t["values"]["learning_rate"] <= 1e-3 and t["args"]["lora_alpha"] == 2 * t["args"]["lora_r"]
               for t in a)
    other = sweep.plan_trials(sweep.Config(search=search, space=space, trial_args={"max_steps": 2}, num_trials=6, seed=6))[0]
    assert [t["id"] for t in other] != [t["id"] for t in a]


@pytest.mark.parametrize("cfg, message", [
    (dict(pruner="median"), "--pruner median: the trials evaluate only before and after training (eval_steps 0), so "
                            "there is nothing to prune on; add --trial_args eval_steps=N"),
    (dict(pruner="asha", trial_args={"eval_steps": 2}), "--pruner 'asha': choose none, median or successive_halving"),
    (dict(search="bayes"), "--search 'bayes': choose grid, random, tpe or qmc"),
    (dict(search="tpe", num_trials=0), "--num_trials 0: draw at least one trial"),
])
def test_bad_search_or_pruner_fails_fast_with_what_to_change(cfg, message):
    cfg = {"space": {"lora_r": [4, 8]}, **cfg}
    with pytest.raises(sweep.SweepError) as e:
        sweep.plan_trials(sweep.Config(**cfg))
    assert message in str(e.value)


def test_pruning_qlora_on_cpu_is_refused_before_anything_runs(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(sweep.SweepError, match="--pruner median with method qlora on a CPU: the recipe refuses "
                                               "evaluations during QLoRA training on CPU"):
        sweep.plan_trials(sweep.Config(space={"lora_r": [4]}, pruner="median",
                                       trial_args={"method": "qlora", "eval_steps": 2}))
    with pytest.raises(sweep.SweepError, match="--storage 'mysql': choose sqlite, journal, an RDB URL"):
        sweep.storage_url(sweep.Config(storage="mysql"), sweep.Path("x"))


def test_a_duplicate_proposal_is_told_the_earlier_outcome_not_run_again(tmp_path):
    """Random search over 2 choices asked for 4 trials: the study ends after the 2 distinct ones, the repeats
    carry the earlier value and `duplicate_of`, and a dead worker's RUNNING trial is failed and enqueued again."""
    cfg = sweep.Config(search="random", space={"lora_r": [4, 8]}, trial_args={"max_steps": 2}, num_trials=4, seed=0)
    base = sweep.plan_trials(cfg)[1]
    storage = sweep.open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(study_name="s", storage=storage, sampler=sweep.make_sampler(cfg, cfg.space))
    seen = []
    while (job := sweep.next_trial(study, cfg, base, None)) is not None:
        ot, trial = job
        seen.append(trial["id"])
        study.tell(ot, float(trial["args"]["lora_r"]))
    assert len(seen) == len(set(seen)) == 2
    dups = [t for t in study.trials if "duplicate_of" in t.user_attrs]
    assert all(t.value == study.trials[t.user_attrs["duplicate_of"]].value for t in dups)
    assert set(sweep.latest_by_id(study)) == set(seen)
    # a RUNNING trial whose worker on this host is gone (a reaped pid)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ot = study.ask()
    for k, v in (("trial", "x-1"), ("worker", {"host": sweep.HOST, "pid": dead.pid}), ("heartbeat", time.time())):
        ot.set_user_attr(k, v)
    sweep.recover_stale(study, storage, cfg)
    failed = study.trials[ot.number]
    assert failed.state == optuna.trial.TrialState.FAIL and failed.user_attrs["status"] == "interrupted"
    assert f"its worker (pid {dead.pid}) is gone" in failed.user_attrs["error"]
    (waiting,) = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert waiting.user_attrs == {"trial": "x-1", "retry_of": ot.number}


@pytest.mark.slow
def test_kill_9_of_a_worker_mid_trial_and_a_rerun_finishes_the_study(tiny_dir, tmp_path):
    """kill -9 leaves the trial RUNNING in the study and its recipe process orphaned; the orphan sees its worker
    gone and saves a checkpoint (exit 75), the rerun finds the dead worker's trial, runs it again from that
    checkpoint, and the study completes."""
    out = tmp_path / "kill"
    cmd = sweep_cmd(tiny_dir, out, "--space", "learning_rate=[1.0e-3]", "lora_r=[4]", "--trial_args", "max_steps=300",
                    "save_steps=1000")
    env = dict(os.environ, PYTHON=sys.executable, **ENV)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(out.glob("trials/*/run/before.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    time.sleep(3)                                   # inside the training loop
    proc.kill()                                     # the launcher execs python: this is the worker
    proc.communicate(timeout=60)
    study = study_of(out)
    (t,) = study.trials
    assert t.state == optuna.trial.TrialState.RUNNING  # what a killed worker leaves behind
    run_dir = out / "trials" / t.user_attrs["trial"] / "run"
    deadline = time.time() + 120                      # the orphaned recipe stops itself at its next step
    while sweep.lock_held(run_dir / ".lock") and time.time() < deadline:
        time.sleep(0.5)
    assert not sweep.lock_held(run_dir / ".lock")
    assert "the sweep worker (pid %d) that started this trial is gone" % proc.pid in \
        (run_dir.parent / "stderr.log").read_text()
    assert len(list(run_dir.glob("checkpoint-*/checkpoint_ok.json"))) == 1
    done = run(cmd, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"its worker (pid {proc.pid}) is gone; running it again" in done.stderr
    assert "resuming its unfinished run" in done.stderr
    man = json.loads((run_dir / "manifest.json").read_text())
    assert "checkpoint-" in (man.get("resumed_from") or "")
    study = study_of(out)
    assert [s.state.name for s in study.trials] == ["FAIL", "COMPLETE"]
    assert study.trials[1].user_attrs["retry_of"] == 0 and study.trials[0].user_attrs["status"] == "interrupted"
    (row,) = board(out)
    assert row["status"] == "finished" and row["optimizer_steps"] == 300 and math.isfinite(row["eval_loss_after"])


@pytest.mark.slow
def test_two_workers_share_one_journal_study_and_run_each_trial_once(tiny_dir, tmp_path):
    out = tmp_path / "two"
    proc = run(sweep_cmd(tiny_dir, out, *GRID, "--storage", "journal"), env={**ENV, "NWORKERS": "2"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "+ NWORKERS=2 " in proc.stderr
    storage = sweep.open_storage(f"journal:{out / 'study.journal'}")
    (summary,) = optuna.get_all_study_summaries(storage=storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 4
    assert len({t.user_attrs["trial"] for t in study.trials}) == 4
    assert len({json.dumps(t.user_attrs["worker"], sort_keys=True) for t in study.trials}) == 2  # both worked
    for tdir in (out / "trials").iterdir():
        assert len(json.loads((tdir / "trial.json").read_text())["attempts"]) == 1
    rows = board(out)
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows)
    assert json.loads((out / "metrics.json").read_text())["workers"] == 2


def test_the_trial_process_builds_the_sweeps_pruner():
    """The study stores no pruner (optuna.load_study makes a MedianPruner(n_startup_trials=5)): both sides build it."""
    from harnesses.pruning import make_pruner

    median = make_pruner("median", startup_trials=1, warmup_steps=3)
    assert isinstance(median, optuna.pruners.MedianPruner)
    assert (median._n_startup_trials, median._n_warmup_steps) == (1, 3)
    halving = make_pruner("successive_halving", warmup_steps=4)
    assert isinstance(halving, optuna.pruners.SuccessiveHalvingPruner) and halving._min_resource == 4
    assert isinstance(make_pruner("none"), optuna.pruners.NopPruner)
