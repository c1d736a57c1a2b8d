"""common/tracking.py: which runs ask for mlflow, where the store is, the checks before anything is written, the
tags of a registered export, and (with mlflow installed) how a run that did not finish is marked and resumed."""
import importlib.util
import json
import sys

import pytest

from common import tracking
from common.checks import CheckFailed
from conftest import REPO, run

HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
needs_mlflow = pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed in this environment "
                                                          "(the tracking extra: bash launch/setup_tracking.sh)")


@pytest.fixture
def clean_mlflow_env(monkeypatch, tmp_path):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE", "FT_TRACKER_DIRS_SET"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("report_to, wanted", [(["mlflow"], True), (["tensorboard", "mlflow"], True),
                                               ("tensorboard,mlflow", True), ("none", False), ([], False),
                                               (None, False), (["tensorboard"], False)])
def test_reports_to_mlflow(report_to, wanted):
    assert tracking.reports_to_mlflow(report_to) is wanted


def test_the_store_is_beside_the_run_directory_sqlite_with_sqlalchemy_else_files(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in ("sqlalchemy", "alembic")
                        else real(name, *a))
    assert tracking.store_uri(tmp_path / "runs" / "sft") == f"sqlite:///{(tmp_path / 'runs').resolve()}/mlflow.db"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else real(name, *a))
    assert tracking.store_uri(tmp_path / "runs" / "sft") == f"file:{(tmp_path / 'runs').resolve()}/mlruns"


def test_without_mlflow_the_options_name_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(CheckFailed, match=r"^--report_to mlflow needs mlflow, which is not installed: "
                                          r"bash launch/setup_tracking.sh \(or: pip install -r requirements-tracking.txt\)$"):
        tracking.require_mlflow("--report_to mlflow")
    with pytest.raises(CheckFailed, match="^--register_model persona needs mlflow"):
        tracking.check_model_name("persona")


@needs_mlflow
@pytest.mark.parametrize("name", ["", " ", "team/persona", "persona:v1", ".hidden"])
def test_a_name_the_registry_refuses_is_one_line_up_front(name):
    with pytest.raises(CheckFailed, match="cannot be empty, contain '/' or ':'"):
        tracking.check_model_name(name)
    tracking.check_model_name("persona-smollm2 v1")


def test_training_tags_come_from_the_run_next_to_the_adapter(tmp_path):
    run_dir = tmp_path / "sft"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter/adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/m/smollm2"}))
    datasets = {"data/persona/train.jsonl": "ab" * 32, "/abs/held out (v2).jsonl": "cd" * 32}
    (run_dir / "manifest.json").write_text(json.dumps({
        "config": {"model_name_or_path": "asset:smollm2", "method": "qlora"}, "git_commit": "abc123+dirty",
        "datasets": datasets, "command": ["python", "recipes/my_sft.py"]}))
    tags = tracking.training_tags(run_dir / "adapter", "/m/smollm2")
    assert tags == {"base_model": "asset:smollm2", "base_model_path": "/m/smollm2", "recipe": "my_sft",
                    "git_commit": "abc123+dirty", "training_run_dir": str(run_dir.resolve()), "method": "qlora",
                    "datasets": json.dumps(datasets), "data.train.jsonl": "ab" * 32,
                    "data.held_out__v2_.jsonl": "cd" * 32}
    (run_dir / "metrics.json").write_text(json.dumps({"recipe": "sft_memory_diet"}))
    (run_dir / "manifest.json").unlink()  # an adapter from elsewhere: what its own folder says
    tags = tracking.training_tags(run_dir / "adapter", "/m/smollm2")
    assert (tags["base_model"], tags["recipe"], tags["git_commit"], tags["datasets"]) == \
        ("/m/smollm2", "sft_memory_diet", "unknown", "{}")


UNFINISHED = r"""
import sys
sys.path.insert(0, {repo!r})
from common import tracking
t = tracking.start_run("unit", {out!r}, {{"knob": 1}}, interrupted=lambda: {interrupted})
print(t.run_id)
sys.exit({code})
"""


@needs_mlflow
@pytest.mark.parametrize("interrupted, code, status", [(True, 75, "KILLED"), (False, 1, "FAILED")])
def test_a_run_that_stops_before_finish_is_marked_and_a_resume_continues_it(interrupted, code, status, tmp_path,
                                                                            clean_mlflow_env):
    from mlflow import MlflowClient

    out = tmp_path / "runs" / "unit"
    proc = run([sys.executable, "-c", UNFINISHED.format(repo=str(REPO), out=str(out), interrupted=interrupted,
                                                         code=code)], cwd=tmp_path)
    assert proc.returncode == code, proc.stderr[-3000:]
    run_id = proc.stdout.strip().splitlines()[-1]
    client = MlflowClient(tracking.store_uri(out))
    assert client.get_run(run_id).info.status == status  # not mlflow's own at-exit FINISHED
    resumed = tracking.start_run("unit", out, {"knob": 1}, resume=True)
    assert resumed.run_id == run_id
    resumed.finish(out, {"final_train_loss": 1.5}, step=4)
    done = client.get_run(run_id)
    assert done.info.status == "FINISHED" and done.data.params == {"knob": "1"}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "final_train_loss")] == [(4, 1.5)]
    fresh = tracking.start_run("unit", out, {"knob": 1}, resume=False)  # a new run directory: a new MLflow run
    assert fresh.run_id != run_id
    fresh.finish(out, {})
    assert list(tmp_path.iterdir()) == [tmp_path / "runs"]


@needs_mlflow
def test_a_store_and_experiment_the_user_set_are_kept_file_store_included(tmp_path, clean_mlflow_env, monkeypatch):
    from mlflow import MlflowClient

    theirs = f"file:{tmp_path / 'their_mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", theirs)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "their experiment")
    out = tmp_path / "runs" / "sft"
    out.mkdir(parents=True)
    (out / "manifest.json").write_text("{}")
    tracked = tracking.start_run("sft_memory_diet", out, {"lora_r": 8})
    tracked.finish(out, {"final_train_loss": 2.0, "device": "cpu", "verified": True})
    client = MlflowClient(theirs)
    (found,) = client.search_runs([client.get_experiment_by_name("their experiment").experiment_id])
    assert found.info.status == "FINISHED" and found.data.tags["recipe"] == "sft_memory_diet"
    assert found.data.metrics == {"final_train_loss": 2.0}  # numbers only
    assert [a.path for a in client.list_artifacts(found.info.run_id)] == ["manifest.json"]
    assert not (tmp_path / "runs" / "mlflow.db").exists()
