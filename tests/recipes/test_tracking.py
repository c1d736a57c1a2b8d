"""--report_to: every tracker writes inside the run directory (common.trainer.keep_tracking_in_run_dir).

transformers' TensorBoardCallback creates its writer at the first log; an evaluate() before train() made it
open `./runs/<date>_<host>` of the working directory, and every training scalar went there (CHRONICLES).
"""
import importlib.util
import json
import os
import socket
import sys

import pytest

from conftest import REPO, run

def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


TRACKER_VARIABLES = ("TENSORBOARD_LOGGING_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "TRACKIO_DIR",
                     "FT_TRACKER_DIRS_SET")


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
    from common.trainer import keep_tracking_in_run_dir

    where = keep_tracking_in_run_dir(tmp_path / "a", "tensorboard,mlflow")
    assert where == {"tensorboard": str((tmp_path / "a" / "runs").resolve()),
                     "mlflow": f"file:{(tmp_path / 'a' / 'mlruns').resolve()}"}
    # a second run in the same process moves them along; a folder the user set stays
    monkeypatch.setenv("TRACKIO_DIR", "/somewhere/of/theirs")
    where = keep_tracking_in_run_dir(tmp_path / "b", ["all"])
    assert where["tensorboard"] == str((tmp_path / "b" / "runs").resolve()) == os.environ["TENSORBOARD_LOGGING_DIR"]
    assert where["trackio"] == "/somewhere/of/theirs"
    assert keep_tracking_in_run_dir(tmp_path / "c", "none") == {}
    # a child process (a sweep's trial, a torchrun rank) inherits the variables and still moves them along
    child = run([sys.executable, "-c", "from common.trainer import keep_tracking_in_run_dir as k; "
                 f"print(k({str(tmp_path / 'd')!r}, 'tensorboard')['tensorboard'])"], cwd=REPO)
    assert child.stdout.strip() == str((tmp_path / "d" / "runs").resolve()), child.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed in this environment")
def test_mlflow_writes_inside_the_run_directory(tiny_dir, tmp_path, clean_tracking_env):
    out = tmp_path / "run"
    evaluate_train_evaluate(tiny_trainer(tiny_dir, out, "mlflow"))
    assert not (clean_tracking_env / "mlruns").exists()
    assert [p for p in (out / "mlruns").rglob("*") if p.parent.name == "metrics" and p.name == "loss"]


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
