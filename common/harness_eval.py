"""lm-evaluation-harness beside recipes/evaluate.py's own metrics: the same model under test and baseline, the
scores folded into the same before/after table, deltas and forgetting check.

    harness = check_tasks(["persona_keywords"])              # before any model loads: lm-eval installed, names known
    scores = evaluate(harness, model_name_or_path, adapter_path, baseline, dtype, device, batch_size, limit, max_new_tokens)
    fold(scores, results, baseline_results, generations)     # "lm-eval:<task>" sets beside the recipe's own

lm-eval is an optional extra (requirements-eval.txt; `bash launch/setup_eval.sh`); nothing here imports it at
module level, so the recipe runs as before without it. Its Python API is called (model "hf", `peft=` for a base +
adapter), not its command line, so the models resolve exactly as the recipe's do. Local tasks for the data in
data/ live in data/lm_eval_tasks/ (TaskManager include_path) and read local files only; with HF_HUB_OFFLINE=1,
which the launchers set, nothing reaches the hub (lm-eval's own model-info lookup fails fast and is skipped).
"""
from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common import checks

REPO = Path(__file__).resolve().parent.parent
TASKS_DIR = REPO / "data" / "lm_eval_tasks"
INSTALL = "bash launch/setup_eval.sh (or: pip install -r requirements-eval.txt)"
PREFIX = "lm-eval:"             # set names in the results table: lm-eval:persona_keywords
RENAMED = {"acc": "accuracy"}   # lm-eval's name -> the recipe's, so both land in the same table row
FORGETTING = ("keyword_accuracy", "exact_match", "accuracy", "rougeL", "chrf")
log = logging.getLogger(__name__)


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task YAML without lm-eval: `!function utils.x` stays the string "utils.x"."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def read_task_yaml(path: Path) -> dict:
    return yaml.load(Path(path).read_text(), Loader=_TaskYamlLoader)


def local_tasks() -> dict[str, Path]:
    """The tasks data/lm_eval_tasks/ defines, by name."""
    out = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        name = read_task_yaml(path).get("task")
        if isinstance(name, str):
            out[name] = path
    return out


def split_tasks(values: list[str] | str | None) -> list[str]:
    """`--harness_tasks a b` or `--harness_tasks a,b` (lm-eval's own --tasks form), in order, once each."""
    values = [values] if isinstance(values, str) else values or []
    names = [n.strip() for v in values for n in str(v).split(",")]
    return list(dict.fromkeys(n for n in names if n))


def data_files(tasks: list[str]) -> list[str]:
    """The local files the named local tasks read (for the manifest's dataset hashes)."""
    known, out = local_tasks(), []
    for name in split_tasks(tasks):
        if name in known:
            files = read_task_yaml(known[name]).get("dataset_kwargs", {}).get("data_files", {})
            out += [os.path.relpath(REPO / f) for f in (files.values() if isinstance(files, dict) else [files])]
    return out


@dataclass
class Harness:
    tasks: list[str]
    task_manager: object   # lm_eval.tasks.TaskManager


def check_tasks(tasks: list[str]) -> Harness:
    """lm-eval importable and every task name known (a local one, or one lm-eval ships), else one line with the fix."""
    tasks = split_tasks(tasks)
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:  # not installed, or installed without a dependency of its own (then say which)
        detail = "" if (e.name or "").split(".")[0] == "lm_eval" else f" ({e})"
        raise checks.CheckFailed(f"--harness_tasks needs lm-eval, an optional extra{detail}; install it with {INSTALL}") from None

    local = local_tasks()
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not set(tasks) <= set(local))
    for name in tasks:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, list(local) + manager.all_tasks, n=1)
            raise checks.CheckFailed(f"--harness_tasks {name}: no such lm-eval task"
                                     + (f"; did you mean {close[0]}?" if close else "")
                                     + f" Local tasks: {', '.join(local)} (data/lm_eval_tasks); `lm_eval ls tasks` "
                                     "lists lm-eval's own (most need the hub for their data)")
    return Harness(tasks, manager)


def model_args(name_or_path: str, adapter_path: str | None, dtype, with_adapter: bool = True) -> dict:
    """lm-eval's model_args for the model as recipes/evaluate.py loads it: a model folder (base or merged export),
    an asset:... name, or a base + adapter (`peft=`; an adapter folder passed as the model is its base + it).
    with_adapter=False: the same base and tokenizer without the adapter (the baseline with the adapter disabled)."""
    from common.assets import resolve_model_path

    def absolute(p: str) -> str:  # a local folder, absolute (lm-eval runs in the repository root); a hub id as is
        return str(Path(p).resolve()) if Path(p).exists() else p

    path = Path(absolute(resolve_model_path(name_or_path)))
    if adapter_path is None and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        adapter_path, path = str(path), Path(absolute(resolve_model_path(base)))
    adapter = Path(adapter_path).resolve() if adapter_path else None
    out = {"pretrained": str(path), "dtype": str(dtype).removeprefix("torch.")}
    if adapter is not None and (adapter / "tokenizer_config.json").is_file():
        out["tokenizer"] = str(adapter)  # the tokenizer the adapter was trained with, as the recipe loads it
    if adapter is not None and with_adapter:
        out["peft"] = str(adapter)
    return out


@dataclass
class Scores:
    model: dict                      # {set name: metrics}, the recipe's metric names where they mean the same
    baseline: dict | None
    samples: dict = field(default_factory=dict)    # {"model"|"baseline": {set name: [rows]}}
    roles: dict = field(default_factory=dict)      # {set name: "domain" | "general"} (task metadata `role`)
    summary: dict = field(default_factory=dict)    # metrics.json "harness": version, model_args, raw results


@contextlib.contextmanager
def _in_repo_root():
    """The local tasks name their files relative to the repository root; lm-eval reads them from the working
    directory."""
    before = os.getcwd()
    os.chdir(REPO)
    try:
        yield
    finally:
        os.chdir(before)


def run_tasks(harness: Harness, args: dict, device, batch_size: int, limit: int, max_new_tokens: int) -> dict:
    """lm_eval.simple_evaluate of one model on every task: greedy, zero-shot, the model's chat template."""
    import lm_eval

    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-task INFO lines drown the recipe's log
    with _in_repo_root():
        return lm_eval.simple_evaluate(
            model="hf", model_args=args, tasks=harness.tasks, task_manager=harness.task_manager, device=str(device),
            batch_size=batch_size, limit=limit or None, apply_chat_template=True,
            gen_kwargs={"max_gen_toks": max_new_tokens, "do_sample": False}, bootstrap_iters=1000, log_samples=True)


def to_sets(raw: dict) -> tuple[dict, dict, dict]:
    """lm-eval's results as recipe sets: ({set: metrics}, {set: sample rows}, {set: role}). One set per task and
    filter ("lm-eval:gsm8k (strict-match)"); metric names as the recipe's where they mean the same (acc -> accuracy)."""
    sets, rows, roles = {}, {}, {}
    for task, figures in raw["results"].items():
        examples = raw.get("n-samples", {}).get(task, {}).get("effective")
        role = ((raw.get("configs", {}).get(task) or {}).get("metadata") or {}).get("role", "general")
        for key, value in figures.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            name = PREFIX + task + ("" if filt == "none" else f" ({filt})")
            sets.setdefault(name, {"examples": examples, "task": task})
            sets[name][RENAMED.get(metric, metric) if not metric.endswith("_stderr") else
                       RENAMED.get(metric[:-7], metric[:-7]) + "_stderr"] = float(value)
            roles[name] = role
            if name not in rows and task in raw.get("samples", {}):
                rows[name] = [sample_row(s, filt) for s in raw["samples"][task] if s.get("filter", filt) == filt]
    return sets, rows, roles


def sample_row(sample: dict, filt: str) -> dict:
    """One example as generations.json shows the recipe's: prompt (as templated), reference, reply."""
    args = sample["arguments"]
    resp = sample["filtered_resps"]
    if len(args) > 1:  # multiple choice: the reply is the most likely choice
        lls = [r[0] if isinstance(r, (list, tuple)) else r for r in resp]
        reply = args[max(range(len(lls)), key=lambda i: lls[i])][1]
    else:
        reply = resp[0] if isinstance(resp, list) else resp
    return {"prompt": args[0][0], "reference": sample.get("target"), "reply": reply}


def evaluate(harness: Harness, model_name_or_path: str, adapter_path: str | None, baseline: str | bool | None,
             dtype, device, batch_size: int, limit: int, max_new_tokens: int) -> Scores:
    """Every task on the model under test and on its baseline: `baseline` a model folder, True (the same base with
    the adapter disabled, i.e. without it) or None (no baseline). lm-eval loads its own copy of each."""
    import lm_eval

    under_test = model_args(model_name_or_path, adapter_path, dtype)
    before = (None if not baseline else model_args(model_name_or_path, adapter_path, dtype, with_adapter=False)
              if baseline is True else model_args(baseline, None, dtype))
    summary = {"lm_eval_version": lm_eval.__version__, "tasks": harness.tasks, "limit": limit or None,
               "apply_chat_template": True, "model_args": under_test, "baseline_model_args": before}
    scores = Scores({}, None, summary=summary)
    for which, args in (("model", under_test), ("baseline", before)):
        if args is None:
            continue
        log.info("lm-eval on the %s: %s", which, json.dumps(args))
        raw = run_tasks(harness, args, device, batch_size, limit, max_new_tokens)
        sets, rows, scores.roles = to_sets(raw)
        setattr(scores, which, sets)
        scores.samples[which] = rows
        summary[f"{which}_results"] = raw["results"]
        summary[f"{which}_n_samples"] = raw.get("n-samples")
    return scores


def fold(scores: Scores, results: dict, baseline: dict | None, generations: dict) -> None:
    """The harness sets into the recipe's results, baseline results and generations (in place)."""
    results.update(scores.model)
    generations.setdefault("model", {}).update(scores.samples.get("model", {}))
    if baseline is not None and scores.baseline:
        baseline.update(scores.baseline)
        generations.setdefault("baseline", {}).update(scores.samples.get("baseline", {}))


def forgetting(delta: dict, scores: Scores) -> dict:
    """baseline - model of every harness set that is not the fine-tuning domain: "<set>/<metric>" -> drop."""
    return {f"{name}/{k}": -v for name, d in delta.items() if name in scores.roles and scores.roles[name] != "domain"
            for k, v in d.items() if k in FORGETTING}
