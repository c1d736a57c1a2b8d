"""Hyperparameter sweep on Optuna: grid, random, TPE or QMC search over the SFT recipe's options, pruning on
the held-out loss, and a study that any number of workers share and a rerun resumes. One process per trial.

What it is for: finding a learning rate, LoRA rank/alpha, batch size (or any other option of
recipes/sft_memory_diet.py) that gives the lowest held-out loss. Each trial runs the SFT recipe as its own
process (`python recipes/sft_memory_diet.py --config <base_config> --key value ... --output_dir
<sweep>/trials/<id>/run`), so a crash or an out-of-memory kill ends only that trial. A worker runs one trial at
a time (two on one device would skew each other's tokens/s and peak memory); more devices, more workers.

Run (4 trials of SmolLM2-135M-Instruct on the persona data, 8 optimizer steps each):
    bash launch/sweep.sh
    python harnesses/sweep.py --config harnesses/configs/sweep.yaml [--key value ...]
    bash launch/sweep.sh --search tpe --num_trials 8 --pruner median --trial_args eval_steps=2 \
        --space "learning_rate={low: 1.0e-4, high: 3.0e-3, log: true}" "lora_r=[4, 8, 16, 32]" lora_alpha=2r
    NWORKERS=2 bash launch/sweep.sh ...                  # two workers on one study (one machine)
    sbatch --array=0-3 launch/slurm_sweep.sbatch ...     # four workers on a cluster (shared file system)

- search: grid (GridSampler) | random | tpe | qmc, seeded by `seed`. The space: a list is a set of choices,
  `{low, high, log}` a range (`num: N`: N grid points), a single value is fixed, `lora_alpha: 2r` ties alpha
  to each trial's rank. `--space k=v ...` replaces the YAML space, `--trial_args k=v ...` updates the
  YAML trial_args key by key (v is YAML).
- pruner: none | median | successive_halving, on the held-out loss each trial reports at its evaluations
  during training (trial_args `eval_steps`; harnesses/pruning.py). A pruned trial stops training, still
  writes its metrics.json, exits 0 with run/pruned.json and is marked PRUNED.
- storage: sqlite (<output_dir>/study.db, one machine) | journal (<output_dir>/study.journal, workers on a
  shared file system) | a URL. The study's name follows the settings, so reruns and workers find it; a lock
  file in the sweep dir keeps two workers from picking one trial; a trial whose worker died (heartbeat) is
  run again from its checkpoint.
- Trial ids: the swept values plus a hash of every option the sweep gives the trial, so the same values
  map to the same folder in any study: finished trials are not run again, interrupted ones resume,
  failed ones are retried (--retry_failed false keeps them failed).

Writes to --output_dir: leaderboard.json/.md/.csv, metrics.json, manifest.json, Optuna's plots (*.png),
the study, and trials/<id>/ (trial.json, stdout.log, stderr.log, run/ = the recipe's output dir).
SIGTERM/SIGINT: forwarded to the running trial (checkpoint, exit 75); the worker then exits 75; rerun to
resume. Exit codes: 0 at least one trial of the study finished, 1 none did (or a bad space), 2 a bad
option, 75 stopped by a signal. Details and the figures measured here: docs/sweep.md.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

import optuna  # noqa: E402
import yaml  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from common import child  # noqa: E402
from common.config import closest_option, load_recipe, option_defaults, parse_config  # noqa: E402
from harnesses.pruning import ENV as TRIAL_ENV, MARKER as PRUNED_MARKER, PRUNERS, open_storage  # noqa: E402

NAME = Path(__file__).stem  # a copy writes runs/<its name> and "recipe": "<its name>"
log = logging.getLogger(NAME)
REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "sft_memory_diet.py"
METRIC = "eval_loss_after"          # lower is better; the objective and the leaderboard's sort key
SEARCHES = ("grid", "random", "tpe", "qmc")
SWEEP_MANAGED = {"output_dir", "config"}
HOST = socket.gethostname()
SHORT = {"learning_rate": "lr", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "drop",
         "per_device_train_batch_size": "bs", "gradient_accumulation_steps": "ga", "weight_decay": "wd",
         "max_length": "len", "warmup_steps": "warm", "lr_scheduler_type": "sched", "lora_target_modules": "tgt"}
optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep logs each trial itself
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # the matplotlib plots


@dataclass
class Config:
    output_dir: str = field(default=f"runs/{NAME}", metadata={"help": "sweep directory: leaderboard.*, metrics.json, manifest.json, plots, the study, trials/<id>/"})
    base_config: str = field(default="recipes/configs/sft_memory_diet.yaml", metadata={"help": "the SFT recipe's YAML every trial starts from (trial_args and the swept values override it)"})
    search: str = field(default="grid", metadata={"help": "grid (every combination of the lists) | random | tpe | qmc (num_trials trials)"})
    space: dict = field(default_factory=dict, metadata={"help": "recipe option -> list of choices, {low, high, log[, num]} range, or a fixed value. CLI: key=YAML items, replacing the YAML space, e.g. --space learning_rate=[1.0e-4,3.0e-4] lora_r=[8,16] lora_alpha=2r"})
    trial_args: dict = field(default_factory=dict, metadata={"help": "recipe options every trial gets. CLI: key=YAML items, updating the YAML trial_args, e.g. --trial_args max_steps=2 max_length=64"})
    num_trials: int = field(default=8, metadata={"help": "random/tpe/qmc: trials with an outcome before the study is done (a larger N extends it)"})
    seed: int = field(default=0, metadata={"help": "the sampler's seed (the trials' own seed is the recipe option `seed`)"})
    tpe_startup_trials: int = field(default=4, metadata={"help": "tpe: random trials before it models the results"})
    pruner: str = field(default="none", metadata={"help": "none | median | successive_halving: stop hopeless trials at an evaluation during training (needs trial_args eval_steps)"})
    pruner_startup_trials: int = field(default=2, metadata={"help": "median: trials that finish unpruned before it prunes"})
    pruner_warmup_steps: int = field(default=0, metadata={"help": "median: optimizer steps before a trial can be pruned; successive_halving: its first rung"})
    storage: str = field(default="sqlite", metadata={"help": "sqlite (<output_dir>/study.db) | journal (<output_dir>/study.journal, for workers on a shared file system) | a URL: sqlite:///x.db, postgresql://..., journal:<path>"})
    study_name: str = field(default="", metadata={"help": "the Optuna study; empty: sweep-<hash of the search, space, trial_args, base config, seed, pruner>"})
    retry_failed: bool = field(default=True, metadata={"help": "rerun trials that failed in an earlier invocation; false keeps them as failed"})
    trial_timeout: int = field(default=0, metadata={"help": "seconds before a trial is stopped (SIGTERM, then SIGKILL) and marked failed; 0 = no limit"})
    stale_after: int = field(default=120, metadata={"help": "seconds without a heartbeat before another host's running trial counts as dead and is run again"})
    dry_run: bool = field(default=False, metadata={"help": "print the trials (id, values, command) and exit; runs and writes nothing"})


class SweepError(RuntimeError):
    """A problem with the sweep's own settings; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# Options: --space / --trial_args take key=value items (argparse cannot type a mapping)
# ---------------------------------------------------------------------------------------------
MAPPING_FLAGS = {"--space": "space", "--trial_args": "trial_args", "--trial-args": "trial_args"}


def split_mapping_flags(argv: list[str]) -> tuple[list[str], dict[str, dict]]:
    """Take `--space k=v ...` and `--trial_args k=v ...` out of argv; parse each value as YAML."""
    rest, found = [], {}
    i = 0
    while i < len(argv):
        flag, _, inline = argv[i].partition("=")
        if flag not in MAPPING_FLAGS:
            rest.append(argv[i])
            i += 1
            continue
        name, items = MAPPING_FLAGS[flag], [inline] if inline else []
        i += 1
        while i < len(argv) and not argv[i].startswith("--"):
            items.append(argv[i])
            i += 1
        mapping = found.setdefault(name, {})
        for item in items:
            if item.lstrip().startswith("{"):
                value = yaml.safe_load(item)
                if not isinstance(value, dict):
                    raise SweepError(f"{flag} {item!r}: not a YAML mapping")
                mapping.update(value)
                continue
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise SweepError(f"{flag} {item!r}: expected key=value, e.g. {flag} learning_rate=[1.0e-4,3.0e-4]")
            mapping[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return rest, found


_SCI = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def normalize(value):
    """PyYAML reads `1e-4` (no dot) as text; treat it as the number the user meant."""
    if isinstance(value, str) and _SCI.match(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [normalize(v) for v in value]
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items()}
    return value


@functools.lru_cache(maxsize=1)
def recipe_fields() -> dict[str, object]:
    """The SFT recipe's options (its CONFIGS: its Config and TrainingArguments) and their defaults."""
    return option_defaults(load_recipe(RECIPE).CONFIGS)


def check_keys(where: str, keys, fields: dict) -> None:
    for key in keys:
        if key in SWEEP_MANAGED:
            raise SweepError(f"{where}: {key!r} is set by the sweep for each trial; remove it")
        if key not in fields:
            close = closest_option(key, fields)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise SweepError(f"{where}: {key!r} is not an option of {RECIPE.relative_to(REPO)}{hint}; "
                             f"`python {RECIPE.relative_to(REPO)} --help` lists them")


# ---------------------------------------------------------------------------------------------
# The search space: lists, ranges, fixed values
# ---------------------------------------------------------------------------------------------
def is_range(spec) -> bool:
    return isinstance(spec, dict) and "low" in spec and "high" in spec


def check_range(key: str, spec: dict) -> None:
    unknown = set(spec) - {"low", "high", "log", "num"}
    if unknown:
        raise SweepError(f"space: {key}: unknown range key(s) {sorted(unknown)}; a range is {{low, high, log, num}}")
    low, high = spec["low"], spec["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
        raise SweepError(f"space: {key}: low and high must be numbers with low <= high, got {low!r}, {high!r}")
    if spec.get("log") and low <= 0:
        raise SweepError(f"space: {key}: a log range needs low > 0, got {low!r}")


def range_points(key: str, spec: dict) -> list:
    """`num` evenly spaced grid points of a range (log-spaced with log: true)."""
    num = spec.get("num")
    if not isinstance(num, int) or num < 1:
        raise SweepError(f"space: {key}: {{low, high}} is a range for --search random; for grid search give a list "
                         f"of values, or add num: N for N evenly spaced points (tpe and qmc take ranges too)")
    low, high, as_int = spec["low"], spec["high"], isinstance(spec["low"], int) and isinstance(spec["high"], int)
    if num == 1:
        pts = [low]
    elif spec.get("log"):
        pts = [math.exp(math.log(low) + i * (math.log(high) - math.log(low)) / (num - 1)) for i in range(num)]
    else:
        pts = [low + i * (high - low) / (num - 1) for i in range(num)]
    pts = [round(p) if as_int else float(f"{p:.3g}") for p in pts]
    return list(dict.fromkeys(pts))


def check_space(space: dict) -> None:
    if not isinstance(space, dict) or not space:
        raise SweepError("the search space is empty: set `space:` in the YAML or --space key=[v1,v2] ...")
    for key, spec in space.items():
        if isinstance(spec, list) and not spec:
            raise SweepError(f"space: {key}: an empty list of choices")
        if isinstance(spec, dict) and not is_range(spec):
            raise SweepError(f"space: {key}: {spec!r} is neither a list of choices nor a {{low, high}} range")
        if is_range(spec):
            check_range(key, spec)




def grid_trials(space: dict) -> list[dict]:
    """Every combination, in order (the dry run's list; workers take them in the sampler's seeded order)."""
    axes = [(k, range_points(k, s) if is_range(s) else s if isinstance(s, list) else [s]) for k, s in space.items()]
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


# ---------------------------------------------------------------------------------------------
# Optuna: the sampler and one trial's values
# ---------------------------------------------------------------------------------------------
def _choices(spec: list) -> list:
    """Optuna's choices are None/bool/int/float/str: a list value (target modules) travels as JSON text."""
    return [json.dumps(v) if isinstance(v, (list, dict)) else v for v in spec]


class AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler whose last tell does not raise: its after_trial calls study.stop(), an error outside
    optimize(). The workers decide themselves when the grid is done."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_sampler(cfg: Config, space: dict):
    if cfg.search == "grid":
        grid = {k: range_points(k, s) if is_range(s) else _choices(s) for k, s in space.items() if isinstance(s, list) or is_range(s)}
        return AskTellGridSampler(grid, seed=cfg.seed)
    if cfg.search == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    if cfg.search == "tpe":
        return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.tpe_startup_trials)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.QMCSampler(seed=cfg.seed, warn_independent_sampling=False)


def suggest(trial, space: dict, grid: bool) -> dict:
    """The swept values of one Optuna trial (fixed values and `2r` as they are)."""
    values = {}
    for key, spec in space.items():
        if isinstance(spec, list) or (grid and is_range(spec)):
            spec = spec if isinstance(spec, list) else range_points(key, spec)
            choices = _choices(spec)
            values[key] = spec[choices.index(trial.suggest_categorical(key, choices))]
        elif is_range(spec):
            low, high, log_scale = spec["low"], spec["high"], bool(spec.get("log"))
            if isinstance(low, int) and isinstance(high, int):
                values[key] = trial.suggest_int(key, low, high, log=log_scale)
            else:  # 3 significant digits: readable, and still inside the bounds
                values[key] = min(max(float(f"{trial.suggest_float(key, low, high, log=log_scale):.3g}"), low), high)
        else:
            values[key] = spec
    return values


def draw(cfg: Config, space: dict, n: int) -> list[dict]:
    """The first n distinct trials the sampler proposes before any result is in (an in-memory study)."""
    study = optuna.create_study(sampler=make_sampler(cfg, space))
    trials, seen = [], set()
    for _ in range(n * 100):
        trial = study.ask()
        values = suggest(trial, space, cfg.search == "grid")
        study.tell(trial, 0.0)
        key = json.dumps(values, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            trials.append(values)
            if len(trials) == n:
                break
    if len(trials) < n:
        log.warning("the space has only %d distinct trials; running those, not %d", len(trials), n)
    return trials


def random_trials(space: dict, num_trials: int, seed: int) -> list[dict]:
    """num_trials distinct random draws; draw i is the same for any num_trials > i (growing N extends a sweep)."""
    if num_trials < 1:
        raise SweepError(f"--num_trials {num_trials}: draw at least one trial")
    return draw(Config(search="random", seed=seed), space, num_trials)


# ---------------------------------------------------------------------------------------------
# Trials: resolved options, id, command line
# ---------------------------------------------------------------------------------------------
_TIED = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*r\s*$")


def resolve(values: dict, trial_args: dict, base: dict, defaults: dict) -> dict:
    """The options a trial passes to the recipe: trial_args, then its swept values; `lora_alpha: 2r` -> 2 x lora_r."""
    args = {**trial_args, **values}
    alpha = args.get("lora_alpha")
    if isinstance(alpha, str) and _TIED.match(alpha):
        r = args.get("lora_r", base.get("lora_r", defaults.get("lora_r")))
        if isinstance(r, int) and not isinstance(r, bool):
            args["lora_alpha"] = round(float(_TIED.match(alpha).group(1)) * r)
    return args


def trial_id(values: dict, settings: dict) -> str:
    """Readable swept values (resolved) + a hash of every option the trial runs with (base config, trial_args, values)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        if isinstance(v, list):
            return "+".join(fmt(x) for x in v)
        return str(v)

    name = "_".join(f"{SHORT.get(k, k)}{fmt(v)}" for k, v in values.items())
    name = re.sub(r"[^A-Za-z0-9.+=-]+", "_", name)[:80].strip("_")
    return f"{name}-{digest}" if name else digest


def cli_flags(args: dict) -> list[str]:
    """Recipe options as flags that common.config.parse_config reads back to the same values."""
    flags = []
    for key, value in args.items():
        if isinstance(value, list):
            if not value:
                raise SweepError(f"{key}: an empty list cannot be passed on the command line")
            items = [str(v) for v in value]
        elif value is None:
            items = ["null"]
        elif isinstance(value, bool):
            items = ["true" if value else "false"]
        elif isinstance(value, float):
            items = [repr(value)]
        elif isinstance(value, dict):
            raise SweepError(f"{key}: a mapping {value!r} is not a recipe option value (a range belongs in `space`)")
        else:
            items = [str(value)]
        flags += [f"--{key}", *items]
    return flags


def make_trial(values: dict, trial_args: dict, base: dict, fields: dict) -> dict:
    args = resolve(values, trial_args, base, fields)
    settings = {k: v for k, v in {**base, **args}.items() if k not in SWEEP_MANAGED}
    return {"id": trial_id({k: args[k] for k in values}, settings), "values": values, "args": args, "settings": settings}


def check_pruning(cfg: Config, base: dict, fields: dict) -> None:
    if cfg.pruner not in PRUNERS:
        raise SweepError(f"--pruner {cfg.pruner!r}: choose none, median or successive_halving")
    if cfg.pruner == "none":
        return
    options = {**fields, **base, **cfg.trial_args}
    if not options.get("eval_steps") and "eval_steps" not in cfg.space:
        raise SweepError(f"--pruner {cfg.pruner}: the trials evaluate only before and after training (eval_steps "
                         f"{options.get('eval_steps')}), so there is nothing to prune on; add --trial_args eval_steps=N "
                         "(an evaluation every N optimizer steps)")
    methods = cfg.space.get("method", options.get("method"))
    if "qlora" in (methods if isinstance(methods, list) else [methods]):
        import torch

        if not torch.cuda.is_available():
            raise SweepError(f"--pruner {cfg.pruner} with method qlora on a CPU: the recipe refuses evaluations during "
                             "QLoRA training on CPU (an eval-mode forward repacks the 4-bit weights and corrupts later "
                             "gradients), so there is nothing to prune on; use --pruner none, or method lora")


def plan_trials(cfg: Config) -> tuple[list[dict], dict]:
    """Check every setting; the trials the sweep starts with (grid: all; tpe: its random startup trials)."""
    fields = recipe_fields()
    base_path = Path(cfg.base_config)
    if not base_path.is_file():
        raise SweepError(f"--base_config {cfg.base_config}: no such file")
    base = normalize(yaml.safe_load(base_path.read_text()) or {})
    if not isinstance(base, dict):
        raise SweepError(f"--base_config {cfg.base_config}: must be a mapping of option: value")
    check_keys(f"--base_config {cfg.base_config}", [k for k in base if k != "output_dir"], fields)
    space, trial_args = normalize(cfg.space), normalize(cfg.trial_args)
    check_space(space)
    check_keys("space", space, fields)
    check_keys("trial_args", trial_args, fields)
    if cfg.search not in SEARCHES:
        raise SweepError(f"--search {cfg.search!r}: choose grid, random, tpe or qmc")
    if cfg.search != "grid" and cfg.num_trials < 1:
        raise SweepError(f"--num_trials {cfg.num_trials}: draw at least one trial")
    check_pruning(cfg, base, fields)
    if cfg.search == "grid":
        drawn = grid_trials(space)
    else:
        drawn = draw(cfg, space, min(cfg.num_trials, cfg.tpe_startup_trials) if cfg.search == "tpe" else cfg.num_trials)
    trials, seen = [], set()
    for values in drawn:
        trial = make_trial(values, trial_args, base, fields)
        if trial["id"] in seen:
            log.warning("trial %s appears twice in the space; running it once", trial["id"])
            continue
        seen.add(trial["id"])
        trials.append(trial)
    return trials, base


def command(cfg: Config, trial: dict, run_dir: Path) -> list[str]:
    return [sys.executable, str(RECIPE), "--config", cfg.base_config, *cli_flags(trial["args"]),
            "--output_dir", str(run_dir)]


# ---------------------------------------------------------------------------------------------
# Running one trial
# ---------------------------------------------------------------------------------------------
def finished_metrics(run_dir: Path) -> dict | None:
    """The trial's metrics.json if its manifest says the run finished, else None."""
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        if manifest.get("status") == "finished":
            return {"metrics": json.loads((run_dir / "metrics.json").read_text()), "config": manifest.get("config", {})}
    except (OSError, ValueError):
        pass
    return None


def same_value(ran, value) -> bool:
    """A recipe option as the run recorded it (manifest config) vs as the sweep passed it."""
    if isinstance(ran, list) and not isinstance(value, list):
        value = [value]                                     # --lora_target_modules all-linear -> ["all-linear"]
    if isinstance(ran, list):
        return len(ran) == len(value) and all(same_value(a, b) for a, b in zip(ran, value))
    return ran == value or str(ran).lower() == str(value).lower()


def settings_conflicts(trial: dict, run_config: dict) -> list[str]:
    """Options this trial sets that the finished run in its folder did not run with."""
    return [f"{key} (run: {run_config.get(key)!r}, sweep: {value!r})" for key, value in trial["args"].items()
            if not same_value(run_config.get(key), value)]


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        pass
    return True


def lock_held(lock: Path) -> bool:
    """Whether a process holds a run directory's lock (common.checkpoints.lock_output_dir's flock)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False  # closing the fd drops this test lock
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def stop_orphan(run_dir: Path, wait: float) -> None:
    """A trial process left by a killed worker still holds its run dir: SIGTERM it (it saves a checkpoint and
    exits 75) and wait, so the rerun resumes from that checkpoint instead of being refused the folder."""
    lock = run_dir / ".lock"
    if not lock_held(lock):
        return
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        holder = {}
    pid = holder.get("pid")
    if holder.get("host") == HOST and pid_alive(pid):
        log.warning("%s is still held by trial process %s of an earlier worker: stopping it (it saves a checkpoint)",
                    run_dir, pid)
        os.kill(int(pid), signal.SIGTERM)
    else:
        log.warning("%s is held by %s on %s: waiting for it (a trial whose worker is gone stops itself at its next "
                    "optimizer step)", run_dir, pid, holder.get("host"))
    deadline = time.monotonic() + wait
    while lock_held(lock) and time.monotonic() < deadline:
        time.sleep(1)


class Heartbeat:
    """While a trial runs: its Optuna trial's `heartbeat` user attribute, every `every` seconds."""

    def __init__(self, storage, trial_id: int, every: float):
        self.storage, self.trial_id, self.every, self.stopped = storage, trial_id, every, threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stopped.wait(self.every):
            try:
                self.storage.set_trial_user_attr(self.trial_id, "heartbeat", time.time())
            except Exception as e:  # a busy database: the next beat tries again
                log.warning("heartbeat of trial %s not recorded: %s", self.trial_id, e)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()


def run_trial(cfg: Config, trial: dict, tdir: Path, signals: child.ForwardSignals, spec: dict) -> dict:
    from common.run_files import write_json  # imports torch, so not at the top (a --dry_run never needs it)

    run_dir = tdir / "run"
    cmd = command(cfg, trial, run_dir)
    record_file = tdir / "trial.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    record.update(id=trial["id"], values=trial["values"], args=trial["args"], settings=trial["settings"],
                  command=cmd, status="running", optuna_trial=spec["number"])
    attempts = record.setdefault("attempts", [])
    tdir.mkdir(parents=True, exist_ok=True)
    write_json(record_file, record)
    stop_orphan(run_dir, child.GRACE_SECONDS)
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env[TRIAL_ENV] = json.dumps({k: v for k, v in spec.items() if k != "number"})
    result = child.run(cmd, tdir / "stdout.log", stderr_log=tdir / "stderr.log", env=env,
                       timeout=cfg.trial_timeout, signals=signals)
    rc, seconds, timed_out = result.returncode, result.seconds, result.timed_out
    done = finished_metrics(run_dir) if rc == 0 else None
    if done:
        status, error = ("pruned" if (run_dir / PRUNED_MARKER).is_file() else "finished"), None
    elif timed_out:
        status, error = "failed", f"timed out after {cfg.trial_timeout} s (exit {rc}); a rerun resumes from its checkpoint"
    elif rc == child.REQUEUE_EXIT_CODE or (result.interrupted and rc < 0):
        status, error = "interrupted", "stopped by a signal; a rerun resumes it (from its checkpoint if it saved one)"
    else:
        status, error = "failed", result.error
        if rc == 0:
            error = f"exit 0 but no finished run in {run_dir} (metrics.json / manifest status)"
    attempts.append({"rc": rc, "status": status, "error": error, "seconds": seconds, "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    record.update(status=status, rc=rc, error=error, seconds=round(sum(a["seconds"] for a in attempts), 2))
    write_json(record_file, record)
    return record


# ---------------------------------------------------------------------------------------------
# The study: which trial next, dead workers, retries
# ---------------------------------------------------------------------------------------------
def storage_url(cfg: Config, out: Path) -> str:
    if cfg.storage == "sqlite":
        return f"sqlite:///{(out / 'study.db').resolve()}"
    if cfg.storage == "journal":
        return f"journal:{(out / 'study.journal').resolve()}"
    if cfg.storage.startswith("journal:") or "://" in cfg.storage:
        return cfg.storage
    raise SweepError(f"--storage {cfg.storage!r}: choose sqlite, journal, an RDB URL (sqlite:///path.db, "
                     "postgresql://...) or journal:<path>")


def default_study_name(cfg: Config, base: dict) -> str:
    what = {"search": cfg.search, "space": cfg.space, "trial_args": cfg.trial_args, "base": base, "seed": cfg.seed,
            "tpe_startup_trials": cfg.tpe_startup_trials if cfg.search == "tpe" else None,
            "pruner": [cfg.pruner, cfg.pruner_startup_trials, cfg.pruner_warmup_steps] if cfg.pruner != "none" else None}
    return "sweep-" + hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:8]


@contextlib.contextmanager
def sweep_lock(out: Path):
    """One worker at a time picks a trial or writes the sweep's files (flock on <output_dir>/.sweep.lock)."""
    with open(out / ".sweep.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def latest_by_id(study) -> dict:
    """Sweep trial id -> its latest Optuna trial (a retry supersedes the attempt it repeats; duplicates left out)."""
    latest = {}
    for t in study.get_trials(deepcopy=False):
        if "trial" in t.user_attrs and "duplicate_of" not in t.user_attrs:
            latest[t.user_attrs["trial"]] = t
    return latest


def requeue(study, storage, cfg: Config) -> None:
    """Interrupted trials (and failed ones, with retry_failed) are enqueued again: same values, same folder."""
    for tid, t in latest_by_id(study).items():
        if t.state == TrialState.FAIL and (t.user_attrs.get("status") == "interrupted" or cfg.retry_failed):
            study.enqueue_trial(t.params, user_attrs={"trial": tid, "retry_of": t.number, **{
                k: t.user_attrs[k] for k in ("values", "args") if k in t.user_attrs}})


def recover_stale(study, storage, cfg: Config) -> None:
    """A RUNNING trial whose worker is gone: failed (status interrupted) and enqueued again."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker, beat = t.user_attrs.get("worker") or {}, t.user_attrs.get("heartbeat", 0)
        if worker == {"host": HOST, "pid": os.getpid()}:
            continue
        dead = worker.get("host") == HOST and not pid_alive(worker.get("pid"))
        if not dead and time.time() - beat < cfg.stale_after:
            continue
        why = (f"its worker (pid {worker.get('pid')}) is gone" if dead else
               f"no heartbeat for {time.time() - beat:.0f} s from its worker on {worker.get('host')}")
        storage.set_trial_user_attr(t._trial_id, "status", "interrupted")
        storage.set_trial_user_attr(t._trial_id, "error", f"worker lost: {why}")
        try:
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it finished (or another worker failed it) meanwhile
        log.warning("trial #%d %s: %s; running it again", t.number, t.user_attrs.get("trial"), why)
        study.enqueue_trial(t.params, user_attrs={"trial": t.user_attrs.get("trial"), "retry_of": t.number})


def next_trial(study, cfg: Config, base: dict, grid_ids: set | None):
    """The next Optuna trial to run and the sweep's trial for it, or None when the study needs no more."""
    fields, space, grid = recipe_fields(), cfg.space, cfg.search == "grid"
    latest = latest_by_id(study)
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    if not waiting and (not (grid_ids - set(latest)) if grid else len(latest) >= cfg.num_trials):
        return None
    for _ in range(100 + len(study.trials)):
        ot = study.ask()
        trial = make_trial(suggest(ot, space, grid), cfg.trial_args, base, fields)
        ot.set_user_attr("trial", trial["id"])
        earlier = latest.get(trial["id"])
        if earlier is not None and "retry_of" not in ot.user_attrs:
            # the sampler proposed values already tried: the same outcome, not a second run
            ot.set_user_attr("duplicate_of", earlier.number)
            if earlier.state == TrialState.COMPLETE:
                study.tell(ot, earlier.value)
            else:
                study.tell(ot, state=TrialState.PRUNED if earlier.state == TrialState.PRUNED else TrialState.FAIL)
            continue
        for key, value in (("values", trial["values"]), ("args", trial["args"]), ("heartbeat", time.time()),
                           ("worker", {"host": HOST, "pid": os.getpid()})):
            ot.set_user_attr(key, value)
        return ot, trial
    log.warning("the space has only %d distinct trials; the study ends there", len(latest))
    return None


def tell(study, ot, record: dict, metrics: dict | None) -> None:
    for key in ("status", "rc", "error"):
        ot.set_user_attr(key, record.get(key))
    if record["status"] == "finished" and metrics and metrics.get(METRIC) is not None:
        study.tell(ot, metrics[METRIC])
    elif record["status"] == "pruned":
        study.tell(ot, state=TrialState.PRUNED)
    else:
        if record["status"] == "finished":
            ot.set_user_attr("error", f"no {METRIC} in its metrics.json: give the trials an eval_dataset_path")
        study.tell(ot, state=TrialState.FAIL)


# ---------------------------------------------------------------------------------------------
# Leaderboard and plots
# ---------------------------------------------------------------------------------------------
STATUS = {TrialState.COMPLETE: "finished", TrialState.PRUNED: "pruned", TrialState.RUNNING: "running",
          TrialState.WAITING: "not run"}


def leaderboard_row(ot, run_dir: Path, reused: bool) -> dict:
    """One trial of the study: its values, its outcome, and its recipe run's metrics.json."""
    record_file = run_dir.parent / "trial.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    status = STATUS.get(ot.state) or ot.user_attrs.get("status") or "failed"
    values, args = ot.user_attrs.get("values", {}), ot.user_attrs.get("args", {})
    row = {"trial": ot.user_attrs["trial"], **{k: args.get(k, v) for k, v in values.items()}, "status": status,
           "reused": reused, "rc": ot.user_attrs.get("rc", record.get("rc")),
           "error": ot.user_attrs.get("error", record.get("error")), "wall_seconds": record.get("seconds"),
           "optuna_trial": ot.number, "dir": str(run_dir)}
    done = finished_metrics(run_dir) if status in ("finished", "pruned") else None
    m = done["metrics"] if done else {}
    marker = run_dir / PRUNED_MARKER
    row["pruned_at_step"] = json.loads(marker.read_text())["step"] if status == "pruned" and marker.is_file() else None
    row.update({"eval_loss_after": m.get("eval_loss_after"), "eval_loss_before": m.get("eval_loss_before"),
                "final_train_loss": m.get("final_train_loss"), "keyword_accuracy_after": m.get("keyword_accuracy_after"),
                "tokens_per_second": m.get("tokens_per_second"), "peak_memory_bytes": m.get("peak_memory_bytes"),
                "peak_memory_method": m.get("peak_memory_method"), "optimizer_steps": m.get("optimizer_steps"),
                "recipe_wall_seconds": m.get("wall_seconds")})
    return row


def rank(rows: list[dict]) -> list[dict]:
    order = {"finished": 0, "pruned": 1}

    def key(r):
        loss = r[METRIC] if r[METRIC] is not None else math.inf
        train = r["final_train_loss"] if r["final_train_loss"] is not None else math.inf
        group = order.get(r["status"], 2)
        return (group, loss if group < 2 else 0, train if group < 2 else 0)

    rows = sorted(rows, key=key)  # stable: failed trials keep the study's order
    n = 0
    for r in rows:
        r["rank"] = (n := n + 1) if r["status"] == "finished" else None
    return rows


def _num(v, fmt):
    return "" if v is None else format(v, fmt)


def table_rows(rows: list[dict], keys: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["rank", "trial", *keys, "eval_loss_after", "final_train_loss", "keyword_acc", "tokens/s",
              "peak_mem_GiB", "wall_s", "status"]
    body = []
    for r in rows:
        if r["status"] == "finished":
            status = "finished (earlier run)" if r["reused"] else "finished"
        elif r["status"] == "pruned":
            status = f"pruned at step {r['pruned_at_step']}" + (" (earlier run)" if r["reused"] else "")
        elif r["status"] == "failed":
            status = f"failed (exit {r['rc']}): {r['error']}"
        else:
            status = r["status"] + (f" (exit {r['rc']})" if r.get("rc") is not None else "")
        body.append([str(r["rank"] or "-"), r["trial"], *[json.dumps(r.get(k)) if isinstance(r.get(k), (list, dict))
                                                          else str(r.get(k)) for k in keys],
                     _num(r["eval_loss_after"], ".4f"), _num(r["final_train_loss"], ".4f"),
                     _num(r["keyword_accuracy_after"], ".2f"), _num(r["tokens_per_second"], ".0f"),
                     _num(r["peak_memory_bytes"] and r["peak_memory_bytes"] / 1024**3, ".2f"),
                     _num(r["wall_seconds"], ".0f"), status])
    return header, body


def markdown(rows: list[dict], keys: list[str]) -> str:
    header, body = table_rows(rows, keys)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


PLOTS = {"optimization_history": "plot_optimization_history", "param_importances": "plot_param_importances",
         "parallel_coordinate": "plot_parallel_coordinate", "intermediate_values": "plot_intermediate_values"}


def write_plots(study, out: Path) -> list[str]:
    """Optuna's matplotlib plots of the study's own trials (duplicates left out). Parameter importances use
    Optuna 5's default PED-ANOVA evaluator (numpy only; fANOVA would need scikit-learn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    view = optuna.create_study(direction="minimize")
    view.add_trials([t for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
                     if "duplicate_of" not in t.user_attrs])
    written = []
    for name, fn in PLOTS.items():
        try:
            with warnings.catch_warnings():  # "too few trials", "identical ylims": the plot is still right
                warnings.simplefilter("ignore")
                ax = getattr(plots, fn)(view)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.savefig(out / f"{name}.png", dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append(f"{name}.png")
        except Exception as e:  # too few trials for it (importances need two finished ones); the others still come
            (out / f"{name}.png").unlink(missing_ok=True)
            log.info("no %s.png: %s", name, str(e).splitlines()[0] if str(e) else type(e).__name__)
            plt.close("all")
    return written


# ---------------------------------------------------------------------------------------------
# main: one worker
# ---------------------------------------------------------------------------------------------
def label(ot, trial: dict) -> str:
    return f"trial #{ot.number} {trial['id']} ({', '.join(f'{k}={v}' for k, v in trial['values'].items())})"


def report(study, cfg: Config, out: Path, ran: set, counts: dict, wall_start: float, extra: dict) -> dict | None:
    """leaderboard.*, plots and metrics.json of the whole study (any worker's trials) as it is now."""
    from common.run_files import write_json

    rows = rank([leaderboard_row(t, out / "trials" / tid / "run", tid not in ran) for tid, t in latest_by_id(study).items()])
    keys = list(cfg.space)
    table = markdown(rows, keys)
    method = next((r["peak_memory_method"] for r in rows if r["peak_memory_method"]), None)
    note = (f"\nRanked by {METRIC} (held-out loss after training, lower is better); pruned trials follow, by the loss "
            f"they stopped at. Peak memory: {method}. Wall seconds: the trial's process from start to exit (summed "
            "over attempts when it was resumed)." if method else "")
    (out / "leaderboard.md").write_text(table + "\n" + note + "\n")
    header, body = table_rows(rows, keys)
    with open(out / "leaderboard.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *body])
    write_json(out / "leaderboard.json", {"metric": METRIC, "search": cfg.search, "space": cfg.space,
                                          "trial_args": cfg.trial_args, "base_config": cfg.base_config, **extra,
                                          "trials": rows})
    plots = write_plots(study, out)
    best = next((r for r in rows if r["rank"] == 1), None)
    by_status = {s: sum(r["status"] == s for r in rows) for s in ("finished", "pruned", "failed", "interrupted",
                                                                 "running", "not run")}
    workers = {json.dumps(t.user_attrs["worker"], sort_keys=True) for t in study.trials if "worker" in t.user_attrs}
    metrics = {"recipe": NAME, "search": cfg.search, "metric": METRIC, **extra, "trials": len(rows), **by_status,
               **counts, "best_trial": best and {k: best[k] for k in ("trial", *keys, METRIC, "final_train_loss", "dir")},
               "optimizer_steps_total": sum(r["optimizer_steps"] or 0 for r in rows),
               "wall_seconds": round(time.time() - wall_start, 2),
               "trial_seconds_this_run": round(sum(r["wall_seconds"] or 0 for r in rows if not r["reused"]), 2),
               "workers": len(workers), "plots": plots}
    write_json(out / "metrics.json", metrics)
    print(f"\n=== leaderboard ({out / 'leaderboard.md'}) ===\n{table}\n{note}")
    print(f"\n{by_status['finished']} finished ({sum(r['reused'] for r in rows if r['status'] == 'finished')} of them "
          f"in earlier runs or by other workers), {by_status['pruned']} pruned, {by_status['failed']} failed, "
          f"{by_status['interrupted']} interrupted, {by_status['running']} running elsewhere; best: "
          f"{best['trial'] + f' ({METRIC} {best[METRIC]})' if best else 'none'}")
    return best


def main(cfg: Config) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    wall_start = time.time()
    cfg.space, cfg.trial_args = normalize(cfg.space), normalize(cfg.trial_args)
    trials, base = plan_trials(cfg)
    out = Path(cfg.output_dir)
    url = storage_url(cfg, out)
    name = cfg.study_name or default_study_name(cfg, base)
    log.info("%s search, pruner %s: %s over %s; study %s in %s", cfg.search, cfg.pruner,
             f"{len(trials)} trials" if cfg.search == "grid" else f"{cfg.num_trials} trials",
             ", ".join(cfg.space), name, url)
    if cfg.dry_run:
        if cfg.search == "tpe" and cfg.num_trials > len(trials):
            print(f"(tpe: the first {len(trials)} trials are random; the later ones follow from the results)")
        for i, t in enumerate(trials, 1):
            print(f"trial {i}/{len(trials)} {t['id']}: {json.dumps(t['values'])}")
            print("  " + " ".join(command(cfg, t, out / "trials" / t["id"] / "run")))
        return 0

    from common.run_files import now, write_manifest  # imports torch, so not at the top

    started = now()
    out.mkdir(parents=True, exist_ok=True)
    first = {**base, **trials[0]["args"]}
    datasets = [p for p in (first.get("dataset_path"), first.get("eval_dataset_path")) if isinstance(p, str) and p]
    storage = open_storage(url)
    ran, counts = set(), {"skipped": 0, "ran": 0}
    extra = {"study": name, "storage": url, "pruner": cfg.pruner}
    with sweep_lock(out):
        study = optuna.create_study(study_name=name, storage=storage, sampler=make_sampler(cfg, cfg.space),
                                    direction="minimize", load_if_exists=True)
        write_manifest(out, cfg, datasets, started, "running", extra)
        for tid, t in latest_by_id(study).items():
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                log.info("trial #%d %s: skipped, finished in an earlier run (%s %s)", t.number, tid,
                         METRIC if t.state == TrialState.COMPLETE else "pruned", t.value)
                counts["skipped"] += 1
        requeue(study, storage, cfg)
    grid_ids = {t["id"] for t in trials} if cfg.search == "grid" else None
    pruner = {"name": cfg.pruner, "startup_trials": cfg.pruner_startup_trials, "warmup_steps": cfg.pruner_warmup_steps}
    signals = child.ForwardSignals("stopping the running trial (it saves a checkpoint) and this worker; rerun the "
                                   "same command to resume").install()
    while not signals.received:
        with sweep_lock(out):
            recover_stale(study, storage, cfg)
            job = next_trial(study, cfg, base, grid_ids)
        if job is None:
            break
        ot, trial = job
        tdir = out / "trials" / trial["id"]
        run_dir = tdir / "run"
        record = json.loads((tdir / "trial.json").read_text()) if (tdir / "trial.json").is_file() else {}
        done = finished_metrics(run_dir)
        conflicts = settings_conflicts(trial, done["config"]) if done else []
        if done and not conflicts:
            record = {**record, "status": "pruned" if (run_dir / PRUNED_MARKER).is_file() else "finished"}
            counts["skipped"] += 1
            log.info("%s: skipped, finished in an earlier run (%s %.4f)", label(ot, trial), METRIC,
                     done["metrics"].get(METRIC) or float("nan"))
        elif conflicts:
            record = {**record, "status": "failed", "rc": None,
                      "error": f"{run_dir} holds a finished run with other settings: {'; '.join(conflicts)}. "
                               "Delete that folder to run this trial"}
            log.error("%s: %s", label(ot, trial), record["error"])
        elif record.get("status") == "failed" and not cfg.retry_failed:
            counts["skipped"] += 1
            log.info("%s: skipped, failed in an earlier run (--retry_failed false): %s", label(ot, trial),
                     record.get("error"))
        else:
            resuming = (run_dir / "manifest.json").is_file()
            log.info("%s: %s", label(ot, trial), "resuming its unfinished run" if resuming else "running")
            spec = {"storage": url, "study": name, "trial_id": ot._trial_id, "number": ot.number, "pruner": pruner,
                    "worker_pid": os.getpid()}
            with Heartbeat(storage, ot._trial_id, max(1.0, cfg.stale_after / 4)):
                record = run_trial(cfg, trial, tdir, signals, spec)
            ran.add(trial["id"])
            counts["ran"] += 1
            done = finished_metrics(run_dir) if record["status"] in ("finished", "pruned") else None
            if done:
                m = done["metrics"]
                log.info("%s: %s in %.0f s: %s %s, final train loss %s", label(ot, trial), record["status"],
                         record["seconds"], METRIC, m.get(METRIC), m.get("final_train_loss"))
            else:
                log.error("%s: %s (exit %s) after %.0f s: %s; log: %s", label(ot, trial), record["status"], record["rc"],
                          record["seconds"], record["error"], tdir / "stderr.log")
        with sweep_lock(out):
            try:
                tell(study, ot, record, done and done["metrics"])
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker took it for dead meanwhile
                log.warning("%s: already marked failed by another worker (raise --stale_after)", label(ot, trial))

    # ---- leaderboard, plots, metrics, manifest (the whole study, as this worker leaves it) ---------------
    with sweep_lock(out):
        best = report(study, cfg, out, ran, counts, wall_start, extra)
        status = "stopped" if signals.received else "finished" if best else "failed"
        write_manifest(out, cfg, datasets, started, status, extra)
    if signals.received:
        print(f"stopped by {signal.Signals(signals.received).name}: rerun the same command to resume", file=sys.stderr)
        return child.REQUEUE_EXIT_CODE
    return 0 if best else 1


if __name__ == "__main__":
    try:
        argv, mappings = split_mapping_flags(sys.argv[1:])
        config = parse_config(Config, argv)
        if "space" in mappings:
            config.space = mappings["space"]
        config.trial_args = {**config.trial_args, **mappings.get("trial_args", {})}
        sys.exit(main(config))
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
