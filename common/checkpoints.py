"""Checkpoint safety (seed 002): validate every checkpoint, resume only from a valid one, never
clobber another run's output directory.

The Trainer writes a checkpoint in place (weights, optimizer, scheduler, RNG, then
trainer_state.json) and rotates old ones right after. `CheckpointValidator` checks each new
checkpoint and only then drops a `checkpoint_ok.json` marker in it; `last_valid_checkpoint`
ignores any checkpoint without the marker, so one half-written when the process was killed is
never picked for resume. The recipes default to save_total_limit=None (keep every checkpoint),
the policy seed 002 arrived at after save_total_limit=3 left it with only its first checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger(__name__)
MARKER = "checkpoint_ok.json"
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "adapter_model.bin")
_STEP = re.compile(r"^checkpoint-(\d+)$")


class OutputDirError(RuntimeError):
    pass


def checkpoint_problems(path: Path, needs_optimizer: bool = True) -> list[str]:
    """Empty list when the checkpoint at `path` is complete and readable."""
    problems = []
    state_file = path / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
        m = _STEP.match(path.name)
        if m and state.get("global_step") != int(m.group(1)):
            problems.append(f"trainer_state.json says step {state.get('global_step')}, folder says {m.group(1)}")
    except (OSError, ValueError) as e:
        problems.append(f"trainer_state.json unreadable ({e.__class__.__name__})")
    weights = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
    if not weights:
        problems.append(f"no weights file (one of {', '.join(WEIGHT_FILES)})")
    for w in weights:
        if w.stat().st_size == 0:
            problems.append(f"{w.name} is empty")
        elif w.suffix == ".safetensors":
            try:
                from safetensors import safe_open

                with safe_open(str(w), framework="pt") as f:
                    if not list(f.keys()):
                        problems.append(f"{w.name} holds no tensors")
            except Exception as e:  # a truncated file raises a library-specific error
                problems.append(f"{w.name} unreadable ({e.__class__.__name__}: {e})")
    if needs_optimizer:
        # DeepSpeed writes one optimizer shard per rank under global_step<N>/ instead of optimizer.pt
        ds_shards = list(path.glob("global_step*/*optim_states.pt"))
        if ds_shards:
            problems += [f"{f.relative_to(path)} is empty" for f in ds_shards if f.stat().st_size == 0]
        for name in ("scheduler.pt",) if ds_shards else ("optimizer.pt", "scheduler.pt"):
            f = path / name
            if not f.is_file() or f.stat().st_size == 0:
                problems.append(f"{name} missing or empty")
    return problems


def checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders, oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and _STEP.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP.match(p.name).group(1)))


def _changed_since_validation(path: Path) -> list[str]:
    """Files whose size differs from what the marker recorded (truncated or rewritten after validation)."""
    try:
        recorded = json.loads((path / MARKER).read_text())["files"]
        recorded = {str(name): int(size) for name, size in recorded.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return [f"{MARKER} unreadable"]
    problems = []
    for name, size in recorded.items():
        if name == MARKER:
            continue
        f = path / name
        now_size = f.stat().st_size if f.is_file() else None
        if now_size != size:
            problems.append(f"{name} is {'missing' if now_size is None else f'{now_size} bytes'}, "
                            f"was {size} bytes when validated")
    return problems


def last_valid_checkpoint(output_dir: Path) -> Path | None:
    for path in reversed(checkpoints(output_dir)):
        if not (path / MARKER).is_file():
            log.warning("skipping %s: it was never validated (probably half-written when the run stopped)", path)
            continue
        problems = checkpoint_problems(path) + _changed_since_validation(path)
        if problems:
            log.warning("skipping %s: %s", path, "; ".join(problems))
            continue
        return path
    return None


class CheckpointValidator(TrainerCallback):
    """After each save: check the new checkpoint, mark it valid, log what it holds; stop on a bad one."""

    def __init__(self, needs_optimizer: bool = True):
        self.needs_optimizer = needs_optimizer

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not path.is_dir():
            return
        (path / MARKER).unlink(missing_ok=True)  # stale: this step was saved before (a resumed run saves it again)
        problems = checkpoint_problems(path, self.needs_optimizer)
        if problems:
            control.should_training_stop = True
            raise RuntimeError(f"checkpoint {path} failed validation: {'; '.join(problems)}. Training stopped so a "
                               "bad checkpoint does not replace good ones; check free disk space and permissions")
        sizes = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file() and p.name != MARKER}
        (path / MARKER).write_text(json.dumps({"step": state.global_step, "files": sizes}, indent=2))
        log.info("checkpoint %s validated (%d files, %.1f MB)", path.name, len(sizes), sum(sizes.values()) / 1e6)


RESUMABLE_KEYS_MAY_CHANGE = {"output_dir", "max_steps", "num_train_epochs", "report_to", "logging_steps",
                             "save_steps", "resume"}


def prepare_output_dir(output_dir: Path, config: dict, resume: bool = True) -> Path | None:
    """Create or reuse `output_dir` safely; return the checkpoint to resume from (or None).

    - missing or empty: created, fresh run.
    - holds a finished run (metrics.json): refused, nothing is touched.
    - holds an unfinished run of the same config: resumed from its last valid checkpoint.
    - holds an unfinished run of another config, or files that are not a run: refused.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"--output_dir {output_dir} is a file, not a directory; choose another --output_dir")
    if not output_dir.exists() or not any(output_dir.iterdir()):
        output_dir.mkdir(parents=True, exist_ok=True)
        return None
    if (output_dir / "metrics.json").is_file():
        raise OutputDirError(f"--output_dir {output_dir} already holds a finished run (metrics.json). Choose a new "
                             "--output_dir; nothing in it was changed")
    manifest_file = output_dir / "manifest.json"
    if not manifest_file.is_file():
        raise OutputDirError(f"--output_dir {output_dir} is not empty and holds no run manifest.json; refusing to "
                             "write into it. Choose a new or empty --output_dir")
    try:
        previous = json.loads(manifest_file.read_text()).get("config", {})
    except ValueError:
        raise OutputDirError(f"{manifest_file} is unreadable; choose a new --output_dir") from None
    changed = sorted(k for k in set(previous) | set(config)
                     if k not in RESUMABLE_KEYS_MAY_CHANGE and previous.get(k) != config.get(k))
    if changed:
        raise OutputDirError(f"--output_dir {output_dir} holds an unfinished run with a different config "
                             f"({', '.join(changed)} differ); resuming would mix two runs. Choose a new "
                             "--output_dir, or rerun with the same options to resume it")
    if not resume:
        raise OutputDirError(f"--output_dir {output_dir} holds an unfinished run and --resume is false; choose a "
                             "new --output_dir")
    found = last_valid_checkpoint(output_dir)
    if found:
        log.info("resuming from %s", found)
    return found


REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped on a signal, checkpoint saved; rerun the same command to resume"


def exit_for_requeue() -> None:
    """Exit with REQUEUE_EXIT_CODE after a signal-triggered save. Under torchrun the recipe's own exit code is
    lost (torchrun reports any failed worker as exit 1), so when the launcher exported FT_EXIT_STATUS_FILE the
    code is also written there; launch/multigpu_qlora.sh reads it and exits 75, which the SLURM template
    turns into a requeue."""
    status_file = os.environ.get("FT_EXIT_STATUS_FILE")
    if status_file:
        try:
            Path(status_file).write_text(f"{REQUEUE_EXIT_CODE}\n")
        except OSError as e:  # the exit code still says it; the launcher then reports torchrun's
            log.warning("could not write %s: %s", status_file, e)
    sys.exit(REQUEUE_EXIT_CODE)


class SaveOnSignal(TrainerCallback):
    """On SIGTERM/SIGINT (spot reclaim notice, SLURM preemption, Ctrl-C): finish the current optimizer
    step, save a checkpoint (validated by CheckpointValidator), and stop. The bound on the time this
    takes is one optimizer step plus one save. The recipe then exits with REQUEUE_EXIT_CODE.
    Under several processes the flag is agreed over the process group each step, so all ranks stop
    at the same step (torchrun forwards the signal to every worker, but not at the same instant)."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.received: int | None = None
        for s in signals:
            signal.signal(s, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.received is None:
            log.warning("received %s: saving a checkpoint after this optimizer step, then stopping",
                        signal.Signals(signum).name)
        self.received = signum

    def _agreed(self) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.received else 0.0])
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag)
        return bool(flag.item() > 0)

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed():
            self.received = self.received or signal.SIGTERM
            control.should_save = True
            control.should_training_stop = True
