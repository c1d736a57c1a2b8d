"""Hyperparameter sweep: grid or random search over the SFT recipe's options, one subprocess per trial.

What it is for: finding a learning rate, LoRA rank/alpha, batch size (or any other option of
recipes/sft_memory_diet.py) that gives the lowest held-out loss. Each trial runs the SFT recipe as
its own process (`python recipes/sft_memory_diet.py --config <base_config> --key value ...
--output_dir <sweep>/trials/<id>/run`), so a trial that crashes or runs out of memory cannot take
the sweep or the next trial with it. Trials run one after another: this is for one device, and two
trials sharing it would only slow each other down and spoil the tokens/s and peak-memory columns.

Run (4 trials of SmolLM2-135M-Instruct on the persona data, 8 optimizer steps each):
    bash launch/sweep.sh
    python harnesses/sweep.py --config harnesses/configs/sweep.yaml [--key value ...]
    python harnesses/sweep.py --config harnesses/configs/sweep.yaml --search random --num_trials 6 --seed 1 \
        --space "learning_rate={low: 1.0e-4, high: 3.0e-3, log: true}" "lora_r=[4, 8, 16, 32]" lora_alpha=2r

The search space (`space`, a mapping in the YAML): a list is a set of choices (grid: every
combination; random: one drawn per trial), `{low, high, log}` is a range for random search
(log-uniform with `log: true`; integers when both bounds are integers; `num: N` turns it into N grid
points), a single value is fixed. `lora_alpha: 2r` ties alpha to each trial's rank. `trial_args` are
options every trial gets (model, data, max_steps ...). On the command line `--space k=v ...` replaces
the YAML space, `--trial_args k=v ...` updates the YAML trial_args key by key (v is YAML: 3.0e-4,
[8, 16], null, true).

Writes to --output_dir: leaderboard.json/.md/.csv (finished trials ranked by eval_loss_after, then
failed ones with their exit code and last error line), metrics.json (best trial, counts, wall time),
manifest.json, and trials/<id>/ (trial.json, stdout.log, stderr.log, run/ = the recipe's output dir).
A trial's id is its swept values plus a hash of every option the sweep gives it (base config values,
trial_args, swept values; not the recipe's code defaults), so rerunning the same
sweep maps to the same folders: finished trials are not run again, interrupted ones resume from
their checkpoint, failed ones are retried (--retry_failed false keeps them failed). A different
space or trial_args gives different ids and never reuses a folder run with other settings.

SIGTERM/SIGINT: forwarded to the running trial, which saves a checkpoint and exits 75; the sweep
then stops and exits 75 too. Rerun the same command to resume. Exit codes: 0 when at least one
trial finished, 1 when none did (or a bad space), 2 a bad option, 75 stopped by a signal.

Measured here: docs/sweep.md, "Hyperparameter sweep" (2-core CPU VM shared with other jobs): one SmolLM2
trial of the default sweep took 33 min under load 8-10; a 4-trial grid on the tiny model took 5 min.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

import yaml  # noqa: E402

from common import child  # noqa: E402
from common.config import closest_option, load_recipe, option_defaults, parse_config  # noqa: E402

RECIPE = Path(__file__).stem  # the name follows the file: a copy writes runs/<its name> and "recipe": "<its name>"
log = logging.getLogger(RECIPE)
REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "sft_memory_diet.py"
METRIC = "eval_loss_after"          # lower is better; the leaderboard's sort key
SWEEP_MANAGED = {"output_dir", "config"}
SHORT = {"learning_rate": "lr", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "drop",
         "per_device_train_batch_size": "bs", "gradient_accumulation_steps": "ga", "weight_decay": "wd",
         "max_length": "len", "warmup_steps": "warm", "lr_scheduler_type": "sched", "lora_target_modules": "tgt"}


@dataclass
class Config:
    output_dir: str = field(default=f"runs/{RECIPE}", metadata={"help": "sweep directory: leaderboard.*, metrics.json, manifest.json, trials/<id>/"})
    base_config: str = field(default="recipes/configs/sft_memory_diet.yaml", metadata={"help": "the SFT recipe's YAML every trial starts from (trial_args and the swept values override it)"})
    search: str = field(default="grid", metadata={"help": "grid (every combination of the lists) | random (num_trials draws)"})
    space: dict = field(default_factory=dict, metadata={"help": "recipe option -> list of choices, {low, high, log[, num]} range, or a fixed value. CLI: key=YAML items, replacing the YAML space, e.g. --space learning_rate=[1.0e-4,3.0e-4] lora_r=[8,16] lora_alpha=2r"})
    trial_args: dict = field(default_factory=dict, metadata={"help": "recipe options every trial gets. CLI: key=YAML items, updating the YAML trial_args, e.g. --trial_args max_steps=2 max_length=64"})
    num_trials: int = field(default=8, metadata={"help": "random search: trials to draw (the first N of a seed are the same for any larger N)"})
    seed: int = field(default=0, metadata={"help": "random search: sampling seed (the trials' own seed is the recipe option `seed`)"})
    retry_failed: bool = field(default=True, metadata={"help": "rerun trials that failed in an earlier invocation; false keeps them as failed"})
    trial_timeout: int = field(default=0, metadata={"help": "seconds before a trial is stopped (SIGTERM, then SIGKILL) and marked failed; 0 = no limit"})
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
# The search space: grid and random
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
                         f"of values, or add num: N for N evenly spaced points")
    low, high, as_int = spec["low"], spec["high"], isinstance(spec["low"], int) and isinstance(spec["high"], int)
    if num == 1:
        pts = [low]
    elif spec.get("log"):
        pts = [math.exp(math.log(low) + i * (math.log(high) - math.log(low)) / (num - 1)) for i in range(num)]
    else:
        pts = [low + i * (high - low) / (num - 1) for i in range(num)]
    pts = [round(p) if as_int else float(f"{p:.3g}") for p in pts]
    return list(dict.fromkeys(pts))


def sample(key: str, spec, rng: random.Random):
    if isinstance(spec, list):
        return rng.choice(spec)
    if not is_range(spec):
        return spec
    low, high = spec["low"], spec["high"]
    x = math.exp(rng.uniform(math.log(low), math.log(high))) if spec.get("log") else rng.uniform(low, high)
    if isinstance(low, int) and isinstance(high, int):
        return min(max(round(x), low), high)
    return min(max(float(f"{x:.3g}"), low), high)  # 3 significant digits: readable, and still inside the bounds


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
    axes = [(k, range_points(k, s) if is_range(s) else s if isinstance(s, list) else [s]) for k, s in space.items()]
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def random_trials(space: dict, num_trials: int, seed: int) -> list[dict]:
    """num_trials distinct draws; draw i is the same for any num_trials > i (growing N extends a sweep)."""
    if num_trials < 1:
        raise SweepError(f"--num_trials {num_trials}: draw at least one trial")
    rng, trials, seen = random.Random(seed), [], set()
    for _ in range(num_trials * 100):
        values = {k: sample(k, s, rng) for k, s in space.items()}
        key = json.dumps(values, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            trials.append(values)
            if len(trials) == num_trials:
                break
    if len(trials) < num_trials:
        log.warning("the space has only %d distinct trials; running those, not %d", len(trials), num_trials)
    return trials


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


def plan_trials(cfg: Config) -> tuple[list[dict], dict]:
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
    if cfg.search == "grid":
        drawn = grid_trials(space)
    elif cfg.search == "random":
        drawn = random_trials(space, cfg.num_trials, cfg.seed)
    else:
        raise SweepError(f"--search {cfg.search!r}: choose grid or random")
    trials, seen = [], set()
    for values in drawn:
        args = resolve(values, trial_args, base, fields)
        settings = {k: v for k, v in {**base, **args}.items() if k not in SWEEP_MANAGED}
        tid = trial_id({k: args[k] for k in values}, settings)
        if tid in seen:
            log.warning("trial %s appears twice in the space; running it once", tid)
            continue
        seen.add(tid)
        trials.append({"id": tid, "values": values, "args": args, "settings": settings})
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


def run_trial(cfg: Config, trial: dict, tdir: Path, signals: child.ForwardSignals) -> dict:
    from common.run_files import write_json  # imports torch, so not at the top (a --dry_run never needs it)

    run_dir = tdir / "run"
    cmd = command(cfg, trial, run_dir)
    record_file = tdir / "trial.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    record.update(id=trial["id"], values=trial["values"], args=trial["args"], settings=trial["settings"],
                  command=cmd, status="running")
    attempts = record.setdefault("attempts", [])
    tdir.mkdir(parents=True, exist_ok=True)
    write_json(record_file, record)
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = child.run(cmd, tdir / "stdout.log", stderr_log=tdir / "stderr.log", env=env,
                       timeout=cfg.trial_timeout, signals=signals)
    rc, seconds, timed_out = result.returncode, result.seconds, result.timed_out
    done = finished_metrics(run_dir) if rc == 0 else None
    if done:
        status, error = "finished", None
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
# Leaderboard
# ---------------------------------------------------------------------------------------------
def leaderboard_row(trial: dict, record: dict, run_dir: Path, reused: bool) -> dict:
    row = {"trial": trial["id"], **{k: trial["args"][k] for k in trial["values"]}, "status": record.get("status", "not run"),
           "reused": reused, "rc": record.get("rc"), "error": record.get("error"), "wall_seconds": record.get("seconds"),
           "dir": str(run_dir)}
    done = finished_metrics(run_dir) if row["status"] == "finished" else None
    m = done["metrics"] if done else {}
    row.update({"eval_loss_after": m.get("eval_loss_after"), "eval_loss_before": m.get("eval_loss_before"),
                "final_train_loss": m.get("final_train_loss"), "keyword_accuracy_after": m.get("keyword_accuracy_after"),
                "tokens_per_second": m.get("tokens_per_second"), "peak_memory_bytes": m.get("peak_memory_bytes"),
                "peak_memory_method": m.get("peak_memory_method"), "optimizer_steps": m.get("optimizer_steps"),
                "recipe_wall_seconds": m.get("wall_seconds")})
    return row


def rank(rows: list[dict]) -> list[dict]:
    def key(r):
        finished = r["status"] == "finished"
        loss = r[METRIC] if r[METRIC] is not None else math.inf
        train = r["final_train_loss"] if r["final_train_loss"] is not None else math.inf
        return (not finished, loss if finished else 0, train if finished else 0)

    rows = sorted(rows, key=key)  # stable: failed trials keep the sweep's order
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


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def main(cfg: Config) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    wall_start = time.time()
    cfg.space, cfg.trial_args = normalize(cfg.space), normalize(cfg.trial_args)
    trials, base = plan_trials(cfg)
    out = Path(cfg.output_dir)
    log.info("%s search: %d trials over %s", cfg.search, len(trials), ", ".join(cfg.space))
    if cfg.dry_run:
        for i, t in enumerate(trials, 1):
            print(f"trial {i}/{len(trials)} {t['id']}: {json.dumps(t['values'])}")
            print("  " + " ".join(command(cfg, t, out / "trials" / t["id"] / "run")))
        return 0

    from common.run_files import now, write_json, write_manifest  # imports torch, so not at the top

    started = now()
    out.mkdir(parents=True, exist_ok=True)
    first = {**base, **trials[0]["args"]}
    datasets = [p for p in (first.get("dataset_path"), first.get("eval_dataset_path")) if isinstance(p, str) and p]
    write_manifest(out, cfg, datasets, started, "running", {"trials": [t["id"] for t in trials]})
    signals = child.ForwardSignals("stopping the running trial (it saves a checkpoint) and the sweep; rerun the "
                                   "same command to resume").install()
    rows, counts = [], {"finished": 0, "failed": 0, "interrupted": 0, "not run": 0, "skipped": 0, "ran": 0}
    for i, trial in enumerate(trials, 1):
        tdir = out / "trials" / trial["id"]
        run_dir = tdir / "run"
        record_file = tdir / "trial.json"
        record = json.loads(record_file.read_text()) if record_file.is_file() else {}
        label = f"trial {i}/{len(trials)} {trial['id']} ({', '.join(f'{k}={v}' for k, v in trial['values'].items())})"
        done = finished_metrics(run_dir)
        reused = False
        if done:
            conflicts = settings_conflicts(trial, done["config"])
            if conflicts:
                record = {**record, "status": "failed", "rc": None,
                          "error": f"{run_dir} holds a finished run with other settings: {'; '.join(conflicts)}. "
                                   "Delete that folder to run this trial"}
                log.error("%s: %s", label, record["error"])
            else:
                record, reused = {**record, "status": "finished"}, True
                counts["skipped"] += 1
                log.info("%s: skipped, finished in an earlier run (%s %.4f)", label, METRIC,
                         done["metrics"].get(METRIC) or float("nan"))
        elif record.get("status") == "failed" and not cfg.retry_failed:
            counts["skipped"] += 1
            log.info("%s: skipped, failed in an earlier run (--retry_failed false): %s", label, record.get("error"))
        elif signals.received:
            record = {"status": "not run"}
        else:
            resuming = (run_dir / "manifest.json").is_file()
            log.info("%s: %s", label, "resuming its unfinished run" if resuming else "running")
            record = run_trial(cfg, trial, tdir, signals)
            counts["ran"] += 1
            if record["status"] == "finished":
                m = finished_metrics(run_dir)["metrics"]
                log.info("%s: finished in %.0f s: %s %s, final train loss %s", label, record["seconds"], METRIC,
                         m.get(METRIC), m.get("final_train_loss"))
            else:
                log.error("%s: %s (exit %s) after %.0f s: %s; log: %s", label, record["status"], record["rc"],
                          record["seconds"], record["error"], tdir / "stderr.log")
        counts[record["status"]] = counts.get(record["status"], 0) + 1
        rows.append(leaderboard_row(trial, record, run_dir, reused))

    # ---- leaderboard, metrics, manifest -----------------------------------------------------------
    rows = rank(rows)
    keys = list(cfg.space)
    table = markdown(rows, keys)
    method = next((r["peak_memory_method"] for r in rows if r["peak_memory_method"]), None)
    note = (f"\nRanked by {METRIC} (held-out loss after training, lower is better). Peak memory: {method}. "
            "Wall seconds: the trial's process from start to exit (summed over attempts when it was resumed)." if method else "")
    (out / "leaderboard.md").write_text(table + "\n" + note + "\n")
    header, body = table_rows(rows, keys)
    with open(out / "leaderboard.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *body])
    write_json(out / "leaderboard.json", {"metric": METRIC, "search": cfg.search, "space": cfg.space,
                                          "trial_args": cfg.trial_args, "base_config": cfg.base_config, "trials": rows})
    best = next((r for r in rows if r["rank"] == 1), None)
    status = "stopped" if signals.received else "finished" if best else "failed"
    metrics = {"recipe": RECIPE, "search": cfg.search, "metric": METRIC, "trials": len(trials), **counts,
               "best_trial": best and {k: best[k] for k in ("trial", *keys, METRIC, "final_train_loss", "dir")},
               "wall_seconds": round(time.time() - wall_start, 2),
               "trial_seconds_this_run": round(sum(r["wall_seconds"] or 0 for r in rows if not r["reused"]
                                                   and r["status"] != "not run"), 2),
               "parallel_trials": 1}
    write_json(out / "metrics.json", metrics)
    write_manifest(out, cfg, datasets, started, status, {"trials": [t["id"] for t in trials]})
    print(f"\n=== leaderboard ({out / 'leaderboard.md'}) ===\n{table}\n{note}")
    print(f"\n{counts['finished']} finished ({sum(r['reused'] for r in rows)} of them in earlier runs), {counts['failed']} failed, "
          f"{counts['interrupted']} interrupted, {counts['not run']} not run; best: "
          f"{best['trial'] + f' ({METRIC} {best[METRIC]})' if best else 'none'}")
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
