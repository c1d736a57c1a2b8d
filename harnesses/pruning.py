"""A sweep trial's side of Optuna: the recipe reports its held-out loss to its trial and stops when pruned.

harnesses/sweep.py runs each trial as its own recipe process and tells it which Optuna trial it is through
one environment variable, SWEEP_TRIAL (JSON: storage, study, trial_id, pruner, worker_pid). The recipe adds
`report_to_sweep_trial(trainer)`, a no-op without that variable (optuna is imported only with it). Then:
- every evaluation during training (`--eval_steps N`) is `trial.report(eval_loss, global_step)`;
- when `trial.should_prune()` says so, training stops after that step and `<output_dir>/pruned.json`
  records where; the recipe still evaluates, saves and writes metrics.json, exits 0, and the sweep reads
  the marker and marks the trial PRUNED;
- when the sweep worker that started the trial is gone (kill -9, a lost node), the trial stops itself as
  on SIGTERM: a checkpoint, exit 75, so that a rerun resumes it instead of two processes sharing its folder.

The pruner is built here from the same settings in both processes: the study loaded in the trial
process needs it, Optuna does not store it.
"""
from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger(__name__)
ENV = "SWEEP_TRIAL"
MARKER = "pruned.json"
PRUNERS = ("none", "median", "successive_halving")


def make_pruner(name: str, startup_trials: int = 2, warmup_steps: int = 0):
    """median: stop a trial whose best loss so far is worse than the median of earlier trials at that step.
    successive_halving: keep the best 1/3 at each rung (min_resource = warmup_steps, at least 1)."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_steps)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, warmup_steps), reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_storage(spec: str):
    """An RDB URL (sqlite:///study.db: one machine), or `journal:<path>` (Optuna's journal file: several
    processes or nodes on one shared file system)."""
    import optuna

    if spec.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        # its default lock (a symlink next to the file) works on NFSv2 and later
        return optuna.storages.JournalStorage(JournalFileBackend(spec.removeprefix("journal:")))
    # SQLite's default 5 s busy timeout is shorter than a burst of reports from several trial processes
    kwargs = {"connect_args": {"timeout": 60}} if spec.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(spec, engine_kwargs=kwargs)


class ReportToTrial(TrainerCallback):
    """eval_loss at each evaluation during training -> the Optuna trial; stop when it should be pruned."""

    def __init__(self, spec: dict):
        import optuna

        self.spec, self.training, self.pruned, self.detached, self.reported = spec, False, False, False, set()
        study = optuna.load_study(study_name=spec["study"], storage=open_storage(spec["storage"]),
                                  pruner=make_pruner(**spec["pruner"]))
        self.trial = optuna.trial.Trial(study, spec["trial_id"])

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_step_end(self, args, state, control, **kwargs):
        if os.getppid() != self.spec["worker_pid"]:  # the sweep worker died: save and exit 75 (SaveOnSignal)
            log.warning("the sweep worker (pid %s) that started this trial is gone: stopping with a checkpoint",
                        self.spec["worker_pid"])
            os.kill(os.getpid(), signal.SIGTERM)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value, step = (metrics or {}).get("eval_loss"), state.global_step
        if value is None or step in self.reported or self.pruned or self.detached:
            return
        self.reported.add(step)
        import optuna

        try:
            self.trial.report(float(value), step)
        except optuna.exceptions.UpdateFinishedTrialError:  # a worker took this trial for dead: train on, unreported
            log.warning("the sweep's trial %s is no longer running; eval_loss not reported", self.spec["trial_id"])
            self.detached = True
            return
        # only inside training and before its last step: stopping there saves nothing
        if self.training and step < state.max_steps and self.trial.should_prune():
            self.pruned = True
            log.warning("pruned by the sweep's %s pruner at step %d (eval_loss %.4f): stopping training",
                        self.spec["pruner"]["name"], step, value)
            Path(args.output_dir, MARKER).write_text(json.dumps({"step": step, "eval_loss": float(value),
                                                                 "max_steps": state.max_steps}) + "\n")
            control.should_training_stop = True


def report_to_sweep_trial(trainer) -> None:
    """Add ReportToTrial when harnesses/sweep.py started this run (SWEEP_TRIAL set); otherwise nothing."""
    spec = os.environ.get(ENV)
    if spec:
        trainer.add_callback(ReportToTrial(json.loads(spec)))
