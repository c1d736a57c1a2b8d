"""--report_to: every tracker writes inside the run directory (common.trainer.keep_tracking_in_run_dir), and
mlflow into the one store beside it (common.tracking: runs/mlflow.db for runs/<name>).

transformers' TensorBoardCallback creates its writer at the first log; an evaluate() before train() made it
open `./runs/<date>_<host>` of the working directory, and every training scalar went there (CHRONICLES).
The mlflow tests skip where mlflow is not installed (the default .venv; install: bash launch/setup_tracking.sh).
"""
import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

import pytest

from conftest import REPO, run

def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


TRACKER_VARIABLES = ("TENSORBOARD_LOGGING_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "TRACKIO_DIR",
                     "FT_TRACKER_DIRS_SET", "MLFLOW_EXPERIMENT_NAME")
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
needs_mlflow = pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed in this environment "
                                                          "(the tracking extra: bash launch/setup_tracking.sh)")


@pytest.fixture
def clean_tracking_env(monkeypatch, tmp_path):
    """No tracker variable from outside, restored afterwards; the working directory is an empty folder."""
    for var in TRACKER_VARIABLES:  # setenv first: monkeypatch then restores (deletes) what the test sets
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def scalars(folder, tag):
    """(step, value) of every point of `tag` in every event file under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = []
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            points += [(e.step, e.value) for e in acc.Scalars(tag)]
    return sorted(points)


def tiny_trainer(tiny_dir, out, report_to, keep_in_run_dir=True):
    """A TokenCountingTrainer on the tiny model: 3 steps, a log every step, an eval set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from common.collator import CausalLMCollator, tokenize_sft
    from common.data import load_dataset_file, to_messages
    from common.trainer import TokenCountingTrainer, keep_tracking_in_run_dir

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    records, fmt = load_dataset_file(REPO / "data/samples/chat.jsonl")
    feats = tokenize_sft([("", to_messages(r.data, fmt), r.data) for r in records], tok, 128)[0]
    if keep_in_run_dir:
        keep_tracking_in_run_dir(out, report_to)
    args = TrainingArguments(output_dir=str(out), use_cpu=True, max_steps=3, logging_steps=1, report_to=report_to,
                             per_device_train_batch_size=4, learning_rate=1e-3, save_strategy="no",
                             remove_unused_columns=False, disable_tqdm=True)
    return TokenCountingTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir), args=args, train_dataset=feats,
                                eval_dataset=feats, data_collator=CausalLMCollator(tok.pad_token_id),
                                processing_class=tok)


def evaluate_train_evaluate(trainer):
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    return before, trainer.evaluate()["eval_loss"]


def test_tensorboard_events_all_land_in_the_run_directory(tiny_dir, tmp_path, clean_tracking_env):
    out = tmp_path / "run"
    before, after = evaluate_train_evaluate(tiny_trainer(tiny_dir, out, "tensorboard"))
    assert not (clean_tracking_env / "runs").exists()  # nothing in the working directory
    assert list((out / "runs").glob("events.out.tfevents.*"))
    losses = scalars(out / "runs", "train/loss")
    assert [step for step, _ in losses] == [1, 2, 3]  # one point per logging step
    evals = scalars(out / "runs", "eval/loss")
    assert [step for step, _ in evals] == [0, 3]
    assert [v for _, v in evals] == pytest.approx([before, after], abs=1e-5)


def test_without_it_the_pre_training_evaluate_sends_training_scalars_to_the_cwd(tiny_dir, tmp_path,
                                                                               clean_tracking_env):
    """The failure mode itself, with transformers' TensorBoardCallback as it ships."""
    out = tmp_path / "run"
    evaluate_train_evaluate(tiny_trainer(tiny_dir, out, "tensorboard", keep_in_run_dir=False))
    assert [s for s, _ in scalars(clean_tracking_env / "runs", "train/loss")] == [1, 2, 3]
    assert scalars(out, "train/loss") == []  # only the final eval landed under output_dir


def test_a_tracker_folder_the_user_chose_is_kept(tmp_path, clean_tracking_env, monkeypatch):
    from common.tracking import store_uri
    from common.trainer import keep_tracking_in_run_dir

    where = keep_tracking_in_run_dir(tmp_path / "a", "tensorboard,mlflow")
    assert where == {"tensorboard": str((tmp_path / "a" / "runs").resolve()), "mlflow": store_uri(tmp_path / "a")}
    # mlflow: one store beside the run directories (SQLite with SQLAlchemy, else a file store), for every run there
    assert where["mlflow"] in (f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}", f"file:{tmp_path.resolve() / 'mlruns'}")
    # a second run in the same process moves them along; a folder the user set stays
    monkeypatch.setenv("TRACKIO_DIR", "/somewhere/of/theirs")
    where = keep_tracking_in_run_dir(tmp_path / "b", ["all"])
    assert where["tensorboard"] == str((tmp_path / "b" / "runs").resolve()) == os.environ["TENSORBOARD_LOGGING_DIR"]
    assert where["mlflow"] == store_uri(tmp_path / "a") == os.environ["MLFLOW_TRACKING_URI"]
    assert where["trackio"] == "/somewhere/of/theirs"
    assert keep_tracking_in_run_dir(tmp_path / "c", "none") == {}
    # a child process (a sweep's trial, a torchrun rank) inherits the variables and still moves them along
    child = run([sys.executable, "-c", "from common.trainer import keep_tracking_in_run_dir as k; "
                 f"print(k({str(tmp_path / 'd')!r}, 'tensorboard')['tensorboard'])"], cwd=REPO)
    assert child.stdout.strip() == str((tmp_path / "d" / "runs").resolve()), child.stderr[-2000:]
    # a tracking server the user set is kept too
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert keep_tracking_in_run_dir(tmp_path / "e", "mlflow") == {"mlflow": "http://127.0.0.1:5000"}


def history(client, run_id, metric):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))


@needs_mlflow
def test_mlflow_writes_into_the_store_beside_the_run_directory_in_one_run(tiny_dir, tmp_path, clean_tracking_env):
    """The evaluations before and after training and the training curve land in the run common.tracking opened."""
    from mlflow import MlflowClient

    from common.run_files import write_json
    from common.tracking import start_run, store_uri

    out = tmp_path / "run"
    trainer = tiny_trainer(tiny_dir, out, "mlflow")
    tracked = start_run("tiny_recipe", out, {"scenario_knob": 3, "targets": ["q_proj", "v_proj"]})
    before, after = evaluate_train_evaluate(trainer)
    write_json(out / "metrics.json", {"eval_loss_after": after})
    tracked.finish(out, {"eval_loss_after": after, "device": "cpu"}, step=3)
    assert not (clean_tracking_env / "mlruns").exists()
    assert list(clean_tracking_env.iterdir()) == []  # nothing in the working directory: no mlruns/, no mlartifacts/
    client = MlflowClient(store_uri(out))
    (run,) = client.search_runs([client.get_experiment_by_name("tiny_recipe").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["run_dir"] == str(out.resolve())
    assert run.data.params["scenario_knob"] == "3" and run.data.params["learning_rate"] == "0.001"
    assert [s for s, _ in history(client, run.info.run_id, "loss")] == [1, 2, 3]  # one point per logging step
    evals = history(client, run.info.run_id, "eval_loss")
    assert [s for s, _ in evals] == [0, 3]
    assert [v for _, v in evals] == pytest.approx([before, after], abs=1e-5)
    assert history(client, run.info.run_id, "eval_loss_after") == [(3, pytest.approx(after))]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["metrics.json"]
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").resolve().as_uri()) or \
        run.info.artifact_uri.startswith(f"file:{tmp_path.resolve() / 'mlruns'}")


@needs_mlflow
def test_without_its_own_run_the_evaluation_after_training_lands_in_a_second_mlflow_run(tiny_dir, tmp_path,
                                                                                      clean_tracking_env):
    """The failure mode itself, with transformers' MLflowCallback as it ships: it ends the run it opened at train
    end, and the next log (the evaluation after training) makes mlflow open another, nameless one."""
    import mlflow

    out = tmp_path / "run"
    trainer = tiny_trainer(tiny_dir, out, "mlflow")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # an earlier test in this process set another
    try:
        evaluate_train_evaluate(trainer)
        mlflow.flush_async_logging()
    finally:
        mlflow.end_run()
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(["0"])
    assert len(runs) == 2
    by_evals = sorted(([s for s, _ in history(client, r.info.run_id, "eval_loss")],
                       [s for s, _ in history(client, r.info.run_id, "loss")]) for r in runs)
    assert by_evals == [([0], [1, 2, 3]), ([3], [])]


@pytest.mark.skipif(importlib.util.find_spec("trackio") is None, reason="trackio is not installed in this environment")
def test_trackio_writes_inside_the_run_directory(tiny_dir, tmp_path, clean_tracking_env):
    out = tmp_path / "run"
    evaluate_train_evaluate(tiny_trainer(tiny_dir, out, "trackio"))
    assert list((out / "trackio").rglob("*")), "trackio wrote nothing under the run directory"


# ---------------------------------------------------------------------------------------------
# the recipes: run from another working directory, everything under --output_dir
# ---------------------------------------------------------------------------------------------
def recipe_run(name, tiny_dir, out, cwd, *extra):
    # the multi-GPU recipe always runs under torchrun (its launcher: NPROC processes, here 1)
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", free_port()] \
        if name == "sft_multigpu_qlora" else []
    cmd = [sys.executable, *launcher, str(REPO / "recipes" / f"{name}.py"), "--config", str(REPO / f"recipes/configs/{name}.yaml"),
           "--model_name_or_path", str(tiny_dir), "--output_dir", str(out), "--report_to", "tensorboard",
           "--precision", "fp32", *extra]
    return run(cmd, cwd=cwd, env={"OMP_NUM_THREADS": "1"})


def test_sft_recipe_with_tensorboard_writes_only_under_its_run_directory(tiny_dir, tmp_path):
    cwd, out = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    proc = recipe_run("sft_memory_diet", tiny_dir, out, cwd, "--max_steps", "3", "--logging_steps", "1",
                      "--dataset_path", str(REPO / "data/samples/chat.jsonl"),
                      "--eval_dataset_path", str(REPO / "data/persona/heldout.jsonl"),
                      "--sample_generations", "0", "--max_new_tokens", "1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert list(cwd.iterdir()) == []
    assert [s for s, _ in scalars(out / "runs", "train/loss")] == [1, 2, 3]
    m = json.loads((out / "metrics.json").read_text())
    assert [v for _, v in scalars(out / "runs", "eval/loss")] == pytest.approx(
        [m["eval_loss_before"], m["eval_loss_after"]], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sft_multigpu_qlora", "dpo", "reward_model", "ppo"])
def test_every_recipe_with_report_to_keeps_tensorboard_in_its_run_directory(name, tiny_dir, tmp_path):
    cwd, out = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    data = {"sft_multigpu_qlora": ["--method", "lora", "--dataset_path", str(REPO / "data/samples/chat.jsonl"),
                                   "--eval_dataset_path", str(REPO / "data/persona/heldout.jsonl"), "--device", "cpu"],
            "dpo": ["--dataset_path", str(REPO / "data/samples/preference_chat.jsonl"),
                    "--eval_dataset_path", str(REPO / "data/samples/preference_chat.jsonl"), "--sample_generations", "0"],
            "reward_model": ["--dataset_path", str(REPO / "data/samples/preference_chat.jsonl"),
                             "--eval_dataset_path", str(REPO / "data/samples/preference_chat.jsonl")],
            "ppo": ["--algorithm", "grpo", "--reward", "concise", "--response_length", "8",
                    "--dataset_path", str(REPO / "data/samples/preference_chat.jsonl"),
                    "--eval_dataset_path", str(REPO / "data/samples/preference_chat.jsonl")]}[name]
    logging = [] if name == "ppo" else ["--logging_steps", "1"]  # ppo logs every update
    proc = recipe_run(name, tiny_dir, out, cwd, "--max_steps", "2", *logging, *data)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert list(cwd.iterdir()) == []
    assert [s for s, _ in scalars(out / "runs", "train/loss")] == [1, 2]


# ---------------------------------------------------------------------------------------------
# mlflow through the recipes: training runs and registered exports, read back in a fresh process
# ---------------------------------------------------------------------------------------------
READ_STORE = r"""
import json, sys, mlflow
mlflow.set_tracking_uri(sys.argv[1])  # what `mlflow ui --backend-store-uri` reads
client = mlflow.MlflowClient()
out = {"runs": [], "models": {}}
for e in client.search_experiments():
    for r in client.search_runs([e.experiment_id]):
        out["runs"].append({
            "experiment": e.name, "status": r.info.status, "run_id": r.info.run_id, "tags": r.data.tags,
            "params": r.data.params, "metrics": r.data.metrics,
            "history": {m: sorted([x.step, x.value] for x in client.get_metric_history(r.info.run_id, m))
                        for m in ("loss", "eval_loss")},
            "artifacts": sorted(a.path for a in client.list_artifacts(r.info.run_id)),
            "manifest": json.load(open(mlflow.artifacts.download_artifacts(
                run_id=r.info.run_id, artifact_path="manifest.json", dst_path=sys.argv[2] + "/" + r.info.run_id)))})
for m in mlflow.search_registered_models():
    out["models"][m.name] = sorted(({"version": int(v.version), "source": v.source, "run_id": v.run_id, "tags": v.tags}
                                    for v in client.search_model_versions(f"name = '{m.name}'")), key=lambda v: v["version"])
out["downloaded"] = mlflow.artifacts.download_artifacts("models:/persona-merged/1", dst_path=sys.argv[2] + "/merged")
print(json.dumps(out))
"""


def merge_export_run(adapter, out, cwd, *extra):
    cmd = [sys.executable, str(REPO / "recipes/merge_export.py"), "--config", str(REPO / "recipes/configs/merge_export.yaml"),
           "--adapter_path", str(adapter), "--output_dir", str(out), "--gguf_type", "none", "--num_samples", "2",
           "--sample_dataset_path", str(REPO / "data/persona/heldout.jsonl"), *extra]
    return run(cmd, cwd=cwd, env={"OMP_NUM_THREADS": "1"})


@needs_mlflow
def test_recipes_track_runs_and_register_exports_in_one_mlflow_store(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from common.run_files import file_sha256

    cwd, runs = tmp_path / "cwd", tmp_path / "runs"
    cwd.mkdir()
    train = recipe_run("sft_memory_diet", tiny_dir, runs / "sft", cwd, "--report_to", "mlflow", "--max_steps", "3",
                       "--logging_steps", "1", "--dataset_path", str(REPO / "data/samples/chat.jsonl"),
                       "--eval_dataset_path", str(REPO / "data/persona/heldout.jsonl"),
                       "--sample_generations", "0", "--max_new_tokens", "1")
    assert train.returncode == 0, train.stderr[-4000:]
    first = merge_export_run(runs / "sft/adapter", runs / "merge_1", cwd, "--register_model", "persona")
    assert first.returncode == 0, first.stderr[-4000:]
    second = merge_export_run(runs / "sft/adapter", runs / "merge_2", cwd, "--register_model", "persona",
                              "--copy_adapter", "false")
    assert second.returncode == 0, second.stderr[-4000:]
    assert list(cwd.iterdir()) == []

    read = run([sys.executable, "-c", READ_STORE, f"sqlite:///{runs.resolve() / 'mlflow.db'}", str(tmp_path / "dl")],
               cwd=tmp_path)
    assert read.returncode == 0, read.stderr[-4000:]
    store = json.loads(read.stdout.strip().splitlines()[-1])
    manifest = json.loads((runs / "sft/manifest.json").read_text())
    metrics = json.loads((runs / "sft/metrics.json").read_text())
    (trained,) = [r for r in store["runs"] if r["experiment"] == "sft_memory_diet"]
    assert trained["status"] == "FINISHED" and trained["tags"]["recipe"] == "sft_memory_diet"
    assert trained["params"]["lora_r"] == str(manifest["config"]["lora_r"]) and "learning_rate" in trained["params"]
    # a recipe option named like a library one ("auto") is left to the callback, which logs the value that ran;
    # logged first, it made the callback's whole batch of params fail ("Changing param values is not allowed")
    assert trained["params"]["gradient_checkpointing"] in ("True", "False")
    assert trained["params"]["use_liger_kernel"] in ("True", "False")
    assert [s for s, _ in trained["history"]["loss"]] == [1, 2, 3]
    assert [s for s, _ in trained["history"]["eval_loss"]] == [0, 3]
    assert [v for _, v in trained["history"]["eval_loss"]] == pytest.approx(
        [metrics["eval_loss_before"], metrics["eval_loss_after"]], abs=1e-5)
    assert trained["metrics"]["final_train_loss"] == pytest.approx(metrics["final_train_loss"])
    assert trained["artifacts"] == ["loss.png", "manifest.json", "metrics.json"]
    assert trained["manifest"] == manifest
    exports = sorted((r for r in store["runs"] if r["experiment"] == "merge_export"), key=lambda r: r["tags"]["run_dir"])
    assert [r["status"] for r in exports] == ["FINISHED", "FINISHED"]

    assert sorted(store["models"]) == ["persona-adapter", "persona-merged"]
    for model, versions in store["models"].items():
        form = model.rsplit("-", 1)[1]
        assert [v["version"] for v in versions] == [1, 2]
        assert [v["run_id"] for v in versions] == [r["run_id"] for r in exports]
        for v in versions:
            tags = v["tags"]
            assert tags["form"] == form and tags["recipe"] == "sft_memory_diet"
            assert tags["base_model"] == str(tiny_dir) and tags["git_commit"] == manifest["git_commit"]
            assert json.loads(tags["datasets"]) == manifest["datasets"]
            assert {k: tags[f"data.{Path(k).name}"] for k in manifest["datasets"]} == manifest["datasets"]
            assert tags["training_mlflow_run_id"] == trained["run_id"]
            assert tags["sha256"] == file_sha256(Path(v["source"][len("file://"):]))
    merged, adapter = store["models"]["persona-merged"], store["models"]["persona-adapter"]
    assert [v["source"] for v in merged] == [(runs / f"merge_{i}/merged").resolve().as_uri() for i in (1, 2)]
    assert [v["source"] for v in adapter] == [(runs / "merge_1/adapter").resolve().as_uri(),
                                               (runs / "sft/adapter").resolve().as_uri()]
    assert merged[0]["tags"]["adapter_version"] == "1" and adapter[1]["tags"]["merged_version"] == "2"
    registered = json.loads((runs / "merge_1/metrics.json").read_text())["registered_model_versions"]
    assert registered == {"persona-merged": 1, "persona-adapter": 1}
    # the registered version loads with stock from_pretrained and is the merged folder
    loaded = AutoModelForCausalLM.from_pretrained(store["downloaded"]).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(runs / "merge_1/merged").state_dict()
    assert loaded.keys() == reference.keys() and all((loaded[k] == reference[k]).all() for k in loaded)


@pytest.mark.skipif(HAS_MLFLOW, reason="mlflow is installed in this environment; this checks the error without it "
                                       "(as in the default .venv)")
def test_without_mlflow_report_to_and_register_model_fail_with_one_line_before_anything_is_written(tiny_dir, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    train = recipe_run("sft_memory_diet", tiny_dir, tmp_path / "sft", cwd, "--report_to", "mlflow", "--max_steps", "1")
    export = merge_export_run(tmp_path / "no_adapter_needed", tmp_path / "merge", cwd, "--register_model", "persona")
    for proc, option in ((train, "--report_to mlflow"), (export, "--register_model persona")):
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 1 and errors == [
            f"error: {option} needs mlflow, which is not installed: bash launch/setup_tracking.sh "
            "(or: pip install -r requirements-tracking.txt)"], proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd"] and list(cwd.iterdir()) == []
