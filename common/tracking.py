"""MLflow, optional: every run in one local store beside the run directories, and exports as model versions.

    --report_to mlflow                   a training recipe's run: params, the Trainer's curves (evaluations before
                                         and after training included), metrics.json, manifest.json and loss.png
    merge_export --register_model NAME   merged/ and adapter/ as versions of NAME-merged and NAME-adapter, tagged
                                         with the base model, the training data's sha256, the recipe and git commit
    mlflow ui --backend-store-uri sqlite:///runs/mlflow.db

The store is `<output_dir>/../mlflow.db` (SQLite; `file:<output_dir>/../mlruns` where SQLAlchemy is missing), so
the default run directories runs/<recipe> share runs/mlflow.db and one `mlflow ui` lists them all. A
MLFLOW_TRACKING_URI or MLFLOW_EXPERIMENT_NAME the user set is kept. Without mlflow installed both options fail
with one `error:` line naming INSTALL before anything is written; nothing else needs it.
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import re
from pathlib import Path

from common.checks import CheckFailed
from common.run_files import file_sha256, git_commit, write_json

INSTALL = "bash launch/setup_tracking.sh (or: pip install -r requirements-tracking.txt)"
RUN_FILES = ("manifest.json", "metrics.json", "loss.png", "gguf_check.json")  # logged as artifacts where present


def reports_to_mlflow(report_to) -> bool:
    """`--report_to` names mlflow (TrainingArguments has already turned "all" into the installed trackers)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return "mlflow" in {n.strip() for part in names for n in str(part).split(",")}


def require_mlflow(option: str) -> None:
    if importlib.util.find_spec("mlflow") is None:
        raise CheckFailed(f"{option} needs mlflow, which is not installed: {INSTALL}")


def check_model_name(name: str) -> None:
    """--register_model NAME: mlflow installed and a name the registry takes, before anything is written."""
    require_mlflow(f"--register_model {name}")
    if not name.strip() or re.search(r"[/:]", name) or name.startswith("."):
        raise CheckFailed(f"--register_model {name!r}: a registered model name cannot be empty, contain '/' or ':', "
                          "or start with '.'; e.g. --register_model persona")


def store_uri(output_dir) -> str:
    """The store shared by every run directory beside `output_dir`: SQLite where SQLAlchemy and alembic are
    installed (full mlflow), else mlflow's file store (mlflow-skinny)."""
    parent = Path(output_dir).resolve().parent
    if importlib.util.find_spec("sqlalchemy") and importlib.util.find_spec("alembic"):
        return f"sqlite:///{parent / 'mlflow.db'}"
    return f"file:{parent / 'mlruns'}"


def _client(output_dir):
    import mlflow
    from common.trainer import keep_tracking_in_run_dir

    uri = keep_tracking_in_run_dir(output_dir, ["mlflow"])["mlflow"]  # the user's URI where they set one
    mlflow.set_tracking_uri(uri)  # also for the Trainer's MLflowCallback, which keeps a URI already set
    return mlflow, mlflow.MlflowClient(uri), uri


def _experiment(mlflow, client, uri: str, name: str) -> str:
    """The experiment's id, created on first use; a SQLite store keeps artifacts beside it (mlflow's default is
    ./mlruns of the working directory)."""
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or name
    found = client.get_experiment_by_name(name)
    if found is None:
        where = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri() if uri.startswith("sqlite:///") else None
        try:
            return client.create_experiment(name, artifact_location=where)
        except mlflow.exceptions.MlflowException:  # another process created it meanwhile
            found = client.get_experiment_by_name(name)
    if found.lifecycle_stage == "deleted":
        client.restore_experiment(found.experiment_id)
    return found.experiment_id


def _params(config: dict) -> dict[str, str]:
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    return {k: (v if isinstance(v, str) else json.dumps(v, default=str))[:MAX_PARAM_VAL_LENGTH] for k, v in config.items()}


class TrackedRun:
    """The MLflow run of one recipe run: opened by start_run, ended by finish (or at exit as FAILED / KILLED)."""

    def __init__(self, mlflow, client, run_id: str, interrupted=lambda: False):
        self.mlflow, self.client, self.run_id, self.interrupted = mlflow, client, run_id, interrupted
        atexit.register(self._end_unfinished)  # after mlflow's own handler, so it runs first: not marked FINISHED

    def _end_unfinished(self) -> None:
        active = self.mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            self.mlflow.end_run("KILLED" if self.interrupted() else "FAILED")

    def finish(self, output_dir, metrics: dict, step: int = 0) -> None:
        """The run's figures (numbers of metrics.json) at `step`, its run files as artifacts, then FINISHED."""
        mlflow = self.mlflow
        mlflow.flush_async_logging()  # the Trainer's callback logs asynchronously
        numbers = {re.sub(r"[^0-9A-Za-z_\-. :/]", "_", k): float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            mlflow.log_metrics(numbers, step=step, run_id=self.run_id)
        for name in RUN_FILES:
            if (Path(output_dir) / name).is_file():
                self.client.log_artifact(self.run_id, str(Path(output_dir) / name))
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run("FINISHED")
        else:
            self.client.set_terminated(self.run_id, "FINISHED")
        atexit.unregister(self._end_unfinished)


def start_run(recipe: str, output_dir, params: dict, resume: bool = False, interrupted=lambda: False,
              tags: dict | None = None) -> TrackedRun:
    """Open the MLflow run of this recipe run and make it the active one, so the Trainer's MLflowCallback logs
    into it instead of opening its own (it ends its own at train end, and the evaluation after training then
    lands in a second, nameless run). A resumed run directory continues the MLflow run it started."""
    mlflow, client, uri = _client(output_dir)
    experiment_id = _experiment(mlflow, client, uri, recipe)
    run_dir = str(Path(output_dir).resolve())
    earlier = [r for r in client.search_runs([experiment_id], f"tags.run_dir = {json.dumps(run_dir)}",
                                             order_by=["attributes.start_time DESC"], max_results=5)
               if r.info.status != "FINISHED"] if resume else []
    if mlflow.active_run() is not None:
        mlflow.end_run()
    if earlier:
        run = mlflow.start_run(run_id=earlier[0].info.run_id)
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=Path(run_dir).name, tags={
            "recipe": recipe, "run_dir": run_dir, "git_commit": git_commit() or "unknown", **(tags or {})})
    logged = run.data.params
    items = [(k, v) for k, v in _params(params).items() if k not in logged]
    for i in range(0, len(items), 100):  # mlflow takes at most 100 params per call
        mlflow.log_params(dict(items[i:i + 100]))
    return TrackedRun(mlflow, client, run.info.run_id, interrupted)


# ---- merge_export: the exported folders as registered model versions ------------------------------------
def training_tags(adapter_dir, base_model: str) -> dict[str, str]:
    """What the run that trained the adapter recorded (its manifest.json and metrics.json next to the adapter):
    base model, data hashes (`datasets` as JSON, one `data.<file name>` tag each), recipe and git commit."""
    run_dir = Path(adapter_dir).resolve().parent
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").is_file() else {}
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    adapter_config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    config = manifest.get("config", {})
    command = manifest.get("command") or []
    recipe = metrics.get("recipe") or (Path(command[1]).stem if len(command) > 1 else "unknown")
    datasets = manifest.get("datasets", {})
    tags = {"base_model": str(config.get("model_name_or_path") or adapter_config.get("base_model_name_or_path")),
            "base_model_path": base_model, "recipe": recipe, "git_commit": manifest.get("git_commit") or "unknown",
            "training_run_dir": str(run_dir), "method": str(config.get("method", "unknown")),
            "datasets": json.dumps(datasets)}
    for path, sha in datasets.items():
        tags[f"data.{re.sub(r'[^0-9A-Za-z_.-]', '_', Path(path).name)}"] = sha
    return tags


def register_export(name: str, run, metrics: dict, forms: dict, adapter_dir, base_model: str) -> dict:
    """Log this export run (`run`: common.run.Run; params, figures, run files) and register each folder of `forms`
    ({"merged": dir, "adapter": dir}) as a new version of `<name>-<form>` that points at it, tagged with
    training_tags, its form, its sha256, the export's commit and the other form's version. Returns `metrics`
    with `registered_model_versions` ({registered model: version}), also rewritten to metrics.json."""
    from mlflow.exceptions import MlflowException

    tags = training_tags(adapter_dir, base_model)
    tracked = start_run(run.recipe, run.output_dir, run.config, tags={"registered_model": name})
    client = tracked.client
    try:
        trained = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                     f"tags.run_dir = {json.dumps(tags['training_run_dir'])}", max_results=1,
                                     order_by=["attributes.start_time DESC"])
        if trained:  # the training run was tracked too (--report_to mlflow): link its MLflow run
            tags["training_mlflow_run_id"] = trained[0].info.run_id
        versions = {}
        for form, folder in forms.items():
            model = f"{name}-{form}"
            try:
                client.create_registered_model(model, description=f"{form} exports by recipes/merge_export.py")
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            version = client.create_model_version(model, source=Path(folder).resolve().as_uri(), run_id=tracked.run_id,
                                                  tags={**tags, "form": form, "sha256": file_sha256(folder),
                                                        "export_git_commit": git_commit() or "unknown"})
            versions[model] = int(version.version)
        for model, version in versions.items():
            for form, other in zip(forms, versions):
                if other != model:
                    client.set_model_version_tag(model, str(version), f"{form}_version", str(versions[other]))
        metrics = {**metrics, "registered_model_versions": versions}
        write_json(Path(run.output_dir) / "metrics.json", metrics)
        tracked.finish(run.output_dir, metrics)
        return metrics
    except MlflowException as e:
        raise CheckFailed(f"--register_model {name}: {str(e).splitlines()[0]} (the export itself is verified; "
                          f"its files are kept in {run.output_dir})") from e
