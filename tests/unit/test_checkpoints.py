"""common.checkpoints: validate every checkpoint, resume only from a valid one, never clobber a run directory.

Real checkpoints come from transformers' Trainer + a PEFT LoRA on the tiny Llama (4 steps, one save every 2).
"""
import hashlib
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from common import checkpoints as checkpoints_module
from common.checkpoints import (MARKER, RESUMABLE_KEYS_MAY_CHANGE, WEIGHT_FILES, CheckpointValidator,
                                OutputDirError, checkpoint_problems, checkpoints, last_valid_checkpoint,
                                prepare_output_dir, release_output_dir)
from common.run_files import write_manifest

ADAPTER = "adapter_model.safetensors"
CONFIG = {"model_name_or_path": "asset:tiny", "dataset_path": "data/persona/train.jsonl", "learning_rate": 1e-3,
          "lora_r": 4, "lora_target_modules": ["q_proj", "v_proj"], "max_steps": 4, "num_train_epochs": 3.0,
          "output_dir": "runs/x", "save_steps": 2, "logging_steps": 1, "report_to": "none", "resume": True,
          "save_total_limit": None}


def make_trainer(model_dir, output_dir, callbacks, max_steps=4):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(8):
        ids = torch.randint(5, 500, (16,), generator=g)
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    args = TrainingArguments(output_dir=str(output_dir), use_cpu=True, max_steps=max_steps, save_strategy="steps",
                             save_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, report_to="none",
                             logging_steps=1, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    return Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


@pytest.fixture(autouse=True)
def release_locks():
    """prepare_output_dir locks a run directory for the life of the process; a test gives its locks back."""
    yield
    checkpoints_module._release_all()


@pytest.fixture(scope="module")
def trained_run(tiny_dir, tmp_path_factory):
    """A real run directory: checkpoint-2 and checkpoint-4, each validated by CheckpointValidator."""
    out = tmp_path_factory.mktemp("trained") / "run"
    trainer = make_trainer(tiny_dir, out, [CheckpointValidator()])
    trainer.train()
    assert trainer.state.global_step == 4
    return out


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of the real run directory to break."""
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


def truncate_to_half(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def tree_hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---- what a real save leaves behind ----------------------------------------------------------------
def test_real_checkpoints_are_complete_and_validated(trained_run):
    assert [p.name for p in checkpoints(trained_run)] == ["checkpoint-2", "checkpoint-4"]
    for path in checkpoints(trained_run):
        assert checkpoint_problems(path) == []
        marker = json.loads((path / MARKER).read_text())
        step = int(path.name.split("-")[1])
        assert marker["step"] == step
        assert json.loads((path / "trainer_state.json").read_text())["global_step"] == step
        on_disk = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file() and p.name != MARKER}
        assert marker["files"] == on_disk
        assert marker["sha256"] == {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in on_disk}
        for name in (ADAPTER, "optimizer.pt", "scheduler.pt", "trainer_state.json"):
            assert marker["files"][name] > 0
    assert last_valid_checkpoint(trained_run) == trained_run / "checkpoint-4"


# ---- checkpoint_problems ---------------------------------------------------------------------------
def _remove(path, name):
    (path / name).unlink()


def _empty(path, name):
    (path / name).write_bytes(b"")


def _truncate(path, name):
    truncate_to_half(path / name)


@pytest.mark.parametrize("break_it, name, expected", [
    (_remove, "trainer_state.json", ["trainer_state.json unreadable (FileNotFoundError)"]),
    (_truncate, "trainer_state.json", ["trainer_state.json unreadable (JSONDecodeError)"]),
    (_remove, ADAPTER, [f"no weights file (one of {', '.join(WEIGHT_FILES)})"]),
    (_empty, ADAPTER, [f"{ADAPTER} is empty"]),
    (_remove, "optimizer.pt", ["optimizer.pt missing or empty"]),
    (_empty, "optimizer.pt", ["optimizer.pt missing or empty"]),
    (_remove, "scheduler.pt", ["scheduler.pt missing or empty"]),
])
def test_checkpoint_problems_names_each_breakage(run_copy, break_it, name, expected):
    path = run_copy / "checkpoint-4"
    break_it(path, name)
    assert checkpoint_problems(path) == expected


def test_truncated_weights_are_unreadable(run_copy):
    path = run_copy / "checkpoint-4"
    truncate_to_half(path / ADAPTER)
    problems = checkpoint_problems(path)
    assert len(problems) == 1 and problems[0].startswith(f"{ADAPTER} unreadable (")


def test_weights_file_without_tensors(run_copy):
    from safetensors.torch import save_file

    path = run_copy / "checkpoint-4"
    save_file({}, str(path / ADAPTER))
    assert checkpoint_problems(path) == [f"{ADAPTER} holds no tensors"]


def test_step_mismatch_between_folder_and_trainer_state(run_copy):
    moved = run_copy / "checkpoint-6"
    (run_copy / "checkpoint-4").rename(moved)
    assert checkpoint_problems(moved) == ["trainer_state.json says step 4, folder says 6"]


def test_optimizer_is_optional_when_asked(run_copy):
    path = run_copy / "checkpoint-4"
    (path / "optimizer.pt").unlink()
    (path / "scheduler.pt").unlink()
    assert checkpoint_problems(path, needs_optimizer=False) == []
    assert checkpoint_problems(path) == ["optimizer.pt missing or empty", "scheduler.pt missing or empty"]


def test_several_problems_are_all_listed(run_copy):
    path = run_copy / "checkpoint-4"
    (path / "trainer_state.json").unlink()
    _empty(path, ADAPTER)
    (path / "optimizer.pt").unlink()
    assert checkpoint_problems(path) == ["trainer_state.json unreadable (FileNotFoundError)", f"{ADAPTER} is empty",
                                         "optimizer.pt missing or empty"]


# ---- CheckpointValidator ---------------------------------------------------------------------------
def test_validator_stops_training_on_a_broken_save(tiny_dir, tmp_path):
    from transformers import TrainerCallback

    class Corrupt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            truncate_to_half(Path(args.output_dir) / f"checkpoint-{state.global_step}" / ADAPTER)

    out = tmp_path / "run"
    trainer = make_trainer(tiny_dir, out, [Corrupt(), CheckpointValidator()])
    with pytest.raises(RuntimeError, match=rf"checkpoint {out / 'checkpoint-2'} failed validation: {ADAPTER} "
                                           r"unreadable .*Training stopped"):
        trainer.train()
    assert trainer.state.global_step == 2  # stopped at the first save, step 3 never ran
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "checkpoint-2" / MARKER).exists()
    assert last_valid_checkpoint(out) is None


def call_on_save(validator, output_dir, step, world_zero=True):
    from transformers import TrainerControl, TrainerState

    state = TrainerState(global_step=step, is_world_process_zero=world_zero)
    control = TrainerControl()
    validator.on_save(SimpleNamespace(output_dir=str(output_dir)), state, control)
    return control


def test_validator_marks_a_good_checkpoint(run_copy):
    path = run_copy / "checkpoint-4"
    (path / MARKER).write_text("{}")  # stale, from an earlier save of this step
    control = call_on_save(CheckpointValidator(), run_copy, 4)
    assert not control.should_training_stop
    marker = json.loads((path / MARKER).read_text())
    files = [p for p in path.iterdir() if p.name != MARKER]
    assert marker == {"step": 4, "files": {p.name: p.stat().st_size for p in files},
                      "sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}}
    assert last_valid_checkpoint(run_copy) == path


@pytest.mark.parametrize("broken", ["optimizer.pt", ADAPTER, "trainer_state.json"])
def test_validator_raises_and_stops_on_a_bad_checkpoint(run_copy, broken):
    from transformers import TrainerControl, TrainerState

    path = run_copy / "checkpoint-4"
    (path / broken).unlink()  # the marker left from an earlier save of this step must not survive a bad re-save
    control = TrainerControl()
    with pytest.raises(RuntimeError, match="failed validation"):
        CheckpointValidator().on_save(SimpleNamespace(output_dir=str(run_copy)), TrainerState(global_step=4), control)
    assert control.should_training_stop
    assert not (path / MARKER).exists()


def test_validator_without_optimizer_and_on_other_ranks(run_copy):
    path = run_copy / "checkpoint-4"
    (path / MARKER).unlink()
    (path / "optimizer.pt").unlink()
    call_on_save(CheckpointValidator(), run_copy, 4, world_zero=False)  # not rank 0: does nothing
    assert not (path / MARKER).exists()
    call_on_save(CheckpointValidator(needs_optimizer=False), run_copy, 4)  # save_only_model runs
    assert (path / MARKER).is_file()


# ---- last_valid_checkpoint -------------------------------------------------------------------------
def test_checkpoints_sorted_by_step_not_name(tmp_path):
    for name in ("checkpoint-10", "checkpoint-9", "checkpoint-100", "checkpoint-x", "checkpoint-3-tmp"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-11").write_text("a file")
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10", "checkpoint-100"]


def test_last_valid_skips_a_half_written_newer_checkpoint(run_copy, caplog):
    (run_copy / "checkpoint-4" / MARKER).unlink()  # complete files, never validated
    half = run_copy / "checkpoint-6"  # killed mid-save: weights only, no state, no marker
    half.mkdir()
    shutil.copy(run_copy / "checkpoint-4" / ADAPTER, half / ADAPTER)
    with caplog.at_level(logging.WARNING, logger="common.checkpoints"):
        assert last_valid_checkpoint(run_copy) == run_copy / "checkpoint-2"
    assert "checkpoint-6: it was never validated" in caplog.text
    assert "checkpoint-4: it was never validated" in caplog.text


def test_last_valid_skips_a_marked_checkpoint_with_truncated_weights(run_copy, caplog):
    truncate_to_half(run_copy / "checkpoint-4" / ADAPTER)
    with caplog.at_level(logging.WARNING, logger="common.checkpoints"):
        assert last_valid_checkpoint(run_copy) == run_copy / "checkpoint-2"
    assert f"checkpoint-4: {ADAPTER} unreadable" in caplog.text


def test_last_valid_skips_a_marked_checkpoint_whose_files_changed_since(run_copy, caplog):
    """A truncated optimizer.pt is not empty and not parsed, so only the sizes in the marker can tell."""
    optimizer = run_copy / "checkpoint-4" / "optimizer.pt"
    size = optimizer.stat().st_size
    truncate_to_half(optimizer)
    assert checkpoint_problems(run_copy / "checkpoint-4") == []
    with caplog.at_level(logging.WARNING, logger="common.checkpoints"):
        assert last_valid_checkpoint(run_copy) == run_copy / "checkpoint-2"
    assert f"optimizer.pt is {size // 2} bytes, was {size} bytes when validated" in caplog.text


def test_last_valid_skips_an_unreadable_marker(run_copy):
    (run_copy / "checkpoint-4" / MARKER).write_text('{"step": 4, "fil')
    assert last_valid_checkpoint(run_copy) == run_copy / "checkpoint-2"


def test_last_valid_none_when_nothing_is_valid(run_copy, tmp_path):
    (run_copy / "checkpoint-4" / MARKER).unlink()
    truncate_to_half(run_copy / "checkpoint-2" / ADAPTER)
    assert last_valid_checkpoint(run_copy) is None
    assert last_valid_checkpoint(tmp_path / "empty_dir_that_does_not_exist") is None


# ---- prepare_output_dir ----------------------------------------------------------------------------
def unfinished(run_dir: Path, config: dict = CONFIG) -> Path:
    write_manifest(run_dir, config, [], "2026-11-01T00:00:00", "running")
    return run_dir


def test_missing_dir_is_created(tmp_path):
    out = tmp_path / "a" / "b"
    assert prepare_output_dir(out, CONFIG) is None
    assert out.is_dir() and [p.name for p in out.iterdir()] == [".lock"]  # locked by this process
    assert prepare_output_dir(out, CONFIG) is None  # empty but for the lock: still a fresh run
    release_output_dir(out)
    assert not out.exists()  # created here and left empty: a failed start leaves nothing behind


def test_a_file_is_refused(tmp_path):
    path = tmp_path / "out"
    path.write_text("x")
    with pytest.raises(OutputDirError, match="is a file, not a directory"):
        prepare_output_dir(path, CONFIG)
    assert path.read_text() == "x"


def test_finished_run_is_refused_and_untouched(run_copy):
    unfinished(run_copy)
    (run_copy / "metrics.json").write_text('{"final_train_loss": 1.0}')
    before = tree_hashes(run_copy)
    for config, resume in ((CONFIG, True), (CONFIG, False), ({**CONFIG, "learning_rate": 1.0}, True)):
        with pytest.raises(OutputDirError, match=r"already holds a finished run \(metrics.json\).*nothing in it was changed"):
            prepare_output_dir(run_copy, config, resume)
    assert tree_hashes(run_copy) == before


def test_non_empty_dir_without_manifest_is_refused(run_copy, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("my notes")
    for path in (other, run_copy):  # checkpoints without a manifest are not a run of ours either
        before = tree_hashes(path)
        with pytest.raises(OutputDirError, match="is not empty and holds no run manifest.json"):
            prepare_output_dir(path, CONFIG)
        assert tree_hashes(path) == before


def test_unreadable_manifest_is_refused(run_copy):
    (run_copy / "manifest.json").write_text('{"config": {"lr"')
    with pytest.raises(OutputDirError, match="manifest.json is unreadable"):
        prepare_output_dir(run_copy, CONFIG)


def test_unfinished_run_of_another_config_is_refused(run_copy):
    unfinished(run_copy)
    before = tree_hashes(run_copy)
    changed = {**CONFIG, "learning_rate": 2e-4, "lora_target_modules": ["q_proj"], "max_steps": 100}
    del changed["lora_r"]  # an option the old run had and this one does not
    changed["new_option"] = 1  # and the other way round
    with pytest.raises(OutputDirError) as e:
        prepare_output_dir(run_copy, changed)
    assert "(learning_rate, lora_r, lora_target_modules, new_option differ)" in str(e.value)
    assert "max_steps" not in str(e.value)
    assert tree_hashes(run_copy) == before


def test_unfinished_run_of_same_config_resumes_from_last_valid(run_copy):
    unfinished(run_copy)
    assert prepare_output_dir(run_copy, dict(CONFIG)) == run_copy / "checkpoint-4"
    truncate_to_half(run_copy / "checkpoint-4" / ADAPTER)
    assert prepare_output_dir(run_copy, dict(CONFIG)) == run_copy / "checkpoint-2"


@pytest.mark.parametrize("key", sorted(RESUMABLE_KEYS_MAY_CHANGE))
def test_resumable_keys_may_change(run_copy, key):
    unfinished(run_copy)
    config = {**CONFIG, key: ["changed", key]}
    assert prepare_output_dir(run_copy, config) == run_copy / "checkpoint-4"


def test_resumable_keys_are_the_documented_ones():
    assert RESUMABLE_KEYS_MAY_CHANGE == {"output_dir", "max_steps", "num_train_epochs", "report_to", "logging_steps",
                                         "save_steps", "resume"}


def test_unfinished_run_without_valid_checkpoint_starts_over(run_copy):
    unfinished(run_copy)
    for path in checkpoints(run_copy):
        (path / MARKER).unlink()
    assert prepare_output_dir(run_copy, CONFIG) is None


def test_resume_false_on_unfinished_run_is_refused(run_copy):
    unfinished(run_copy)
    before = tree_hashes(run_copy)
    with pytest.raises(OutputDirError, match="holds an unfinished run and --resume is false"):
        prepare_output_dir(run_copy, {**CONFIG, "resume": False}, resume=False)
    assert tree_hashes(run_copy) == before


def test_trainer_resumes_from_the_checkpoint_it_returns(run_copy, tiny_dir):
    """The whole loop: a broken newest checkpoint is skipped, training resumes from the valid one and
    writes a new validated checkpoint over the broken one."""
    unfinished(run_copy)
    truncate_to_half(run_copy / "checkpoint-4" / ADAPTER)
    resume_from = prepare_output_dir(run_copy, CONFIG)
    assert resume_from == run_copy / "checkpoint-2"
    trainer = make_trainer(tiny_dir, run_copy, [CheckpointValidator()])
    trainer.train(resume_from_checkpoint=str(resume_from))
    assert trainer.state.global_step == 4
    assert checkpoint_problems(run_copy / "checkpoint-4") == []
    assert last_valid_checkpoint(run_copy) == run_copy / "checkpoint-4"
