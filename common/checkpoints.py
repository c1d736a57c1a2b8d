"""Run-directory safety: validate every checkpoint, resume only from a valid one, never clobber a run
directory, never let two runs share one, never save or report a diverged run.

The Trainer writes a checkpoint in place (weights, optimizer, scheduler, RNG, then
trainer_state.json) and rotates old ones right after. `CheckpointValidator` checks each new
checkpoint and only then drops a `checkpoint_ok.json` marker in it, holding the size and sha256 of
every file; `last_valid_checkpoint` ignores a checkpoint without the marker (half-written when the
process was killed) and one whose files no longer match it (damaged since, even at the same size).
Checkpoints whose marker has no sha256 (written before checksums were recorded) are checked by size,
and their optimizer.pt and scheduler.pt are loaded once (torch.load, weights_only) so a damaged one
is skipped instead of crashing every rerun. The recipes default to save_total_limit=None (keep every
checkpoint): save_total_limit=3 once left a run with only its first checkpoint.

`prepare_output_dir` also takes an exclusive lock on `<output_dir>/.lock` (fcntl.flock, held until
the process exits: the kernel drops it when the process dies, so a lock file left by a kill -9 never
blocks). Under torchrun only rank 0 calls it: the ranks of one launch share the directory, and rank 0
is the one that writes the run files.

`NonFiniteGuard` stops training on a non-finite loss or gradient norm before the step is saved;
`explain_disk_full` turns a save that ran out of disk into one error line; `RunSegments` carries the
figures (steps, tokens, seconds) of each interrupted segment in the checkpoints so that metrics.json
after a resume covers the whole run.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger(__name__)
MARKER = "checkpoint_ok.json"
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "adapter_model.bin")
_STEP = re.compile(r"^checkpoint-(\d+)$")


class RunError(RuntimeError):
    """A run that must stop with one `error:` line and exit 1 (recipes catch it in __main__)."""


class OutputDirError(RunError):
    pass


class NonFiniteError(RunError):
    pass


class DiskFullError(RunError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _checkpoint_files(path: Path) -> list[Path]:
    """Every file of a checkpoint (DeepSpeed shards in global_step*/ included) except the marker."""
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != MARKER)


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
    """Files that differ from what the marker recorded: size first, then sha256 (same-size damage).

    A marker without sha256 (written before checksums were recorded) can only vouch for sizes; for it
    optimizer.pt and scheduler.pt are loaded once, since resuming from a damaged one dies on every rerun."""
    try:
        marker = json.loads((path / MARKER).read_text())
        recorded = {str(name): int(size) for name, size in marker["files"].items()}
        digests = {str(name): str(h) for name, h in (marker.get("sha256") or {}).items()}
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
        elif name in digests and sha256_file(f) != digests[name]:
            problems.append(f"{name} content changed since it was saved (sha256 differs at the same size)")
    if not digests:
        problems += _load_problems(path)
    return problems


def _load_problems(path: Path) -> list[str]:
    import torch

    problems = []
    for name in ("optimizer.pt", "scheduler.pt"):
        f = path / name
        if f.is_file() and f.stat().st_size > 0:
            try:
                torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # damaged zip/pickle: each torch version words it differently
                problems.append(f"{name} does not load ({e.__class__.__name__}: {str(e).splitlines()[0][:120]})")
    return problems


def checkpoint_report(output_dir: Path) -> list[tuple[Path, list[str]]]:
    """(checkpoint, problems) for every checkpoint-N, newest first; no problems = usable for resume."""
    report = []
    for path in reversed(checkpoints(output_dir)):
        if not (path / MARKER).is_file():
            report.append((path, ["never validated (probably half-written when the run stopped)"]))
            continue
        report.append((path, checkpoint_problems(path) + _changed_since_validation(path)))
    return report


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


def _unusable_checkpoints_error(output_dir: Path) -> OutputDirError:
    report = list(reversed(checkpoint_report(output_dir)))
    listed = ", ".join(f"{p.name} ({'; '.join(problems)})" for p, problems in report)
    aside = output_dir / f"unusable-{time.strftime('%Y%m%d-%H%M%S')}"
    mv = (f"mkdir {shlex.quote(str(aside))} && mv " + " ".join(shlex.quote(str(p)) for p, _ in report)
          + f" {shlex.quote(str(aside))}/")
    return OutputDirError(
        f"--output_dir {output_dir} holds {len(report)} checkpoint(s) and none can be resumed from: {listed}. Nothing "
        f"was changed: starting over here would overwrite them. Either repair them, or move them aside and rerun the "
        f"same command to start from step 0 (`{mv}`), or choose a new --output_dir")


class CheckpointValidator(TrainerCallback):
    """After each save: check the new checkpoint, mark it valid, log what it holds; stop on a bad one."""

    def __init__(self, needs_optimizer: bool = True, segments: "RunSegments | None" = None):
        self.needs_optimizer = needs_optimizer
        self.segments = segments

    def on_save(self, args, state, control, **kwargs):
        if self.segments is not None:
            self.segments.sync_counters()  # every rank: a collective when the counters are summed over ranks
        if not state.is_world_process_zero:
            return
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not path.is_dir():
            return
        (path / MARKER).unlink(missing_ok=True)  # stale: this step was saved before (a resumed run saves it again)
        if self.segments is not None:
            self.segments.write(path, state)
        problems = checkpoint_problems(path, self.needs_optimizer)
        if problems:
            control.should_training_stop = True
            raise RuntimeError(f"checkpoint {path} failed validation: {'; '.join(problems)}. Training stopped so a "
                               "bad checkpoint does not replace good ones; check free disk space and permissions")
        files = _checkpoint_files(path)
        sizes = {f.relative_to(path).as_posix(): f.stat().st_size for f in files}
        digests = {f.relative_to(path).as_posix(): sha256_file(f) for f in files}
        tmp = path / (MARKER + ".tmp")  # the marker appears whole or not at all
        tmp.write_text(json.dumps({"step": state.global_step, "files": sizes, "sha256": digests}, indent=2))
        os.replace(tmp, path / MARKER)
        log.info("checkpoint %s validated (%d files, %.1f MB)", path.name, len(sizes), sum(sizes.values()) / 1e6)


RESUMABLE_KEYS_MAY_CHANGE = {"output_dir", "max_steps", "num_train_epochs", "report_to", "logging_steps",
                             "save_steps", "resume"}


LOCK_FILE = ".lock"
_held: dict[Path, tuple[int, bool]] = {}  # resolved output dir -> (lock fd, whether this process created the dir)


def _lock_holder(lock_path: Path) -> str:
    try:
        info = json.loads(lock_path.read_text())
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, TypeError, KeyError):
        return "a process that has not written its details yet"


def lock_output_dir(output_dir: Path) -> None:
    """Take the exclusive lock on `output_dir` (created if missing) for the rest of this process.

    fcntl.flock on `<output_dir>/.lock`, which records pid, host and start time. The kernel releases the lock
    when its process ends however it ends, so a lock file left by a killed run does not block. Taking it again
    in the process that holds it is a no-op. Raises OutputDirError naming the holder when another process has it.
    """
    key = Path(output_dir).resolve()
    if key in _held:
        return
    created = not key.exists()
    try:
        key.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"--output_dir {output_dir} cannot be created ({e.strerror}: {e.filename}); choose an "
                             "--output_dir in a folder you can write to") from None
    lock_path = key / LOCK_FILE
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            _remove_if_created(key, created)
            raise OutputDirError(f"--output_dir {output_dir} is not writable ({e.strerror}); choose an --output_dir "
                                 "you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputDirError(f"--output_dir {output_dir} is in use by another run ({_lock_holder(lock_path)}); "
                                 "wait for it to finish or choose another --output_dir") from None
        try:  # the holder may have removed the file between our open and flock: then lock the new one
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
    _held[key] = (fd, created)


def _remove_if_created(key: Path, created: bool) -> None:
    if created:
        try:
            key.rmdir()  # only when empty: a run that wrote something keeps it
        except OSError:
            pass


def release_output_dir(output_dir: Path) -> None:
    """Drop this process's lock on `output_dir`: the lock file goes, and the directory too when this process
    created it and left nothing in it (a refused or failed start leaves the disk as it found it)."""
    key = Path(output_dir).resolve()
    held = _held.pop(key, None)
    if held is None:
        return
    fd, created = held
    (key / LOCK_FILE).unlink(missing_ok=True)  # while still locked: no other process can hold this file now
    os.close(fd)
    _remove_if_created(key, created)


def _release_all() -> None:
    for key in list(_held):
        release_output_dir(key)


import atexit  # noqa: E402

atexit.register(_release_all)


def prepare_output_dir(output_dir: Path, config: dict, resume: bool = True) -> Path | None:
    """Lock `output_dir`, create or reuse it safely; return the checkpoint to resume from (or None).

    - another process holds its lock: refused, naming that process.
    - missing or empty: created, fresh run.
    - holds a finished run (metrics.json): refused, nothing is touched.
    - holds an unfinished run that never saved a checkpoint: a fresh run (nothing would be mixed or lost,
      whatever its config was: a start that failed before training does not block the corrected rerun).
    - holds an unfinished run of the same config: resumed from its last valid checkpoint; refused, listing
      every checkpoint and why, when it has checkpoints and none is usable (starting over would overwrite them).
    - holds an unfinished run of another config, or files that are not a run: refused.
    On refusal the directory is left as it was (the lock file is removed again).
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"--output_dir {output_dir} is a file, not a directory; choose another --output_dir")
    lock_output_dir(output_dir)
    try:
        return _check_output_dir(output_dir, config, resume)
    except BaseException:
        release_output_dir(output_dir)
        raise


def _check_output_dir(output_dir: Path, config: dict, resume: bool) -> Path | None:
    if not any(p.name != LOCK_FILE for p in output_dir.iterdir()):
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
    if not checkpoints(output_dir):
        log.info("%s holds an unfinished run that never saved a checkpoint: starting over", output_dir)
        return None
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
    if any((p / MARKER).is_file() for p in checkpoints(output_dir)):
        raise _unusable_checkpoints_error(output_dir)
    log.info("%s holds only checkpoints that were never validated (half-written saves): starting over", output_dir)
    return None


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


# ---------------------------------------------------------------------------------------------
# A diverged run stops before it saves, and says where the last good checkpoint is
# ---------------------------------------------------------------------------------------------
class NonFiniteGuard(TrainerCallback):
    """Stop the run (NonFiniteError, exit 1 from the recipe) on a non-finite loss or gradient norm.

    Checked at every log (`loss`, `grad_norm`), and on the trainable parameters before every save and at the
    end of training, so a NaN that appeared between two logging steps is never written as a checkpoint, an
    adapter or metrics.json. The exception leaves trainer.train() before the Trainer acts on should_save
    (on_log and on_step_end both run before the save of their step)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(float(value)):
                extra = {k: (logs or {}).get(k) for k in ("loss", "grad_norm") if k != key and k in (logs or {})}
                self._stop(args, state, f"{key} is {float(value)}" +
                           "".join(f" ({k} {float(v)})" for k, v in extra.items() if v is not None))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save:
            self._check_weights(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._check_weights(args, state, model)

    def _check_weights(self, args, state, model):
        if model is None:
            return
        import torch

        for name, p in model.named_parameters():
            if p.requires_grad and p.is_floating_point() and not bool(torch.isfinite(p.detach()).all()):
                self._stop(args, state, f"trainable parameter {name} holds non-finite values")

    @staticmethod
    def _stop(args, state, what: str):
        last = last_valid_checkpoint(Path(args.output_dir))
        raise NonFiniteError(
            f"training diverged at step {state.global_step}: {what}. Stopped before saving: no checkpoint, adapter "
            f"or metrics.json was written for it and the run is not marked finished. Last good checkpoint: "
            f"{last or 'none'}; rerunning the same command resumes from {'it' if last else 'step 0'} and will "
            "likely diverge at the same step again, so change something first: lower --learning_rate, check "
            "--max_grad_norm, or look at the batches near that step")


# ---------------------------------------------------------------------------------------------
# A save that runs out of disk: one line saying so, with the numbers
# ---------------------------------------------------------------------------------------------
DISK_FULL_TEXT = ("no space left on device", "unexpected pos", "file write failed", "storagefull", "os error 28",
                  "errno 28", "disk quota exceeded")


def is_disk_full(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(e).lower() for t in DISK_FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _mb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@contextmanager
def explain_disk_full(output_dir: Path, trainer=None):
    """Around trainer.train(): a write that fails for lack of space (torch.save: `[enforce fail at
    inline_container.cc:...] unexpected pos`, safetensors: `No space left on device`) becomes DiskFullError
    saying how much is free and how much a checkpoint takes. The half-written checkpoint (no marker) is
    removed to give the space back; every validated checkpoint is kept, so the rerun resumes."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        output_dir = Path(output_dir)
        partial = output_dir / f"checkpoint-{trainer.state.global_step}" if trainer is not None else None
        removed = ""
        if partial is not None and partial.is_dir() and not (partial / MARKER).exists():
            shutil.rmtree(partial, ignore_errors=True)
            removed = f"; the half-written {partial.name} was removed"
        last = last_valid_checkpoint(output_dir)
        if last is not None:
            size = f"one checkpoint takes {_mb(_folder_bytes(last))} ({last.name})"
        elif trainer is not None:
            trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            size = (f"one checkpoint takes about {_mb(trainable * 12)} (trainable parameters x 12 bytes: fp32 "
                    "weights and two Adam moments; a full fine-tune also saves the whole model)")
        else:
            size = "no checkpoint was saved yet to measure one"
        free = shutil.disk_usage(output_dir if output_dir.exists() else output_dir.parent).free
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else e.__class__.__name__
        raise DiskFullError(
            f"the disk holding --output_dir {output_dir} is full: a write failed ({first}). Free now: {_mb(free)}; "
            f"{size}{removed}. Earlier checkpoints are kept (last valid: {last.name if last else 'none'}); free "
            "some space (or point --output_dir at a bigger disk, or raise --save_steps) and rerun the same command "
            "to resume") from None


# ---------------------------------------------------------------------------------------------
# metrics.json covers the whole run, not only the segment after the last resume
# ---------------------------------------------------------------------------------------------
SEGMENTS_FILE = "segments.json"


class RunSegments(TrainerCallback):
    """Per-segment figures of a run that was interrupted and resumed, carried in its checkpoints.

    A segment is one trainer.train() call: from the step it started at (0, or the checkpoint it resumed) to
    the step it ended at. Each save writes `<checkpoint>/segments.json` (validated and checksummed with the rest
    of the checkpoint): the earlier segments plus this one up to the saved step. A rerun that resumes from that
    checkpoint reads them back, so work done after the last checkpoint, which the rerun repeats, is not counted
    twice. `counters` are attributes of the trainer summed per segment (e.g. TokenCountingTrainer's
    trained_tokens); the Trainer's own state resets them on every train() call.

        segments = RunSegments(resume_from, counters=("trained_tokens",))
        trainer = Trainer(..., callbacks=[CheckpointValidator(segments=segments), ...])
        segments.bind(trainer)
        result = trainer.train(resume_from_checkpoint=resume_from)
        whole = segments.finish(result)   # {"segments": [...], "optimizer_steps", "train_seconds", ...}
    """

    def __init__(self, resume_from: Path | str | None = None, counters: tuple[str, ...] = (),
                 across_ranks: bool = False):
        self.counters = tuple(counters)
        self.across_ranks = across_ranks  # counters are per rank: segments carry their sums over all ranks
        self.counts: dict[str, int] = {}
        self.previous: list[dict] = []
        self.complete = True  # False when resumed from a checkpoint that carries no segments
        if resume_from:
            f = Path(resume_from) / SEGMENTS_FILE
            try:
                self.previous = json.loads(f.read_text())["segments"]
            except (OSError, ValueError, KeyError, TypeError):
                self.complete = False
        self.trainer = None
        self.start_step, self.t0, self.cpu0 = 0, None, None

    def bind(self, trainer) -> None:
        self.trainer = trainer
        trainer.add_callback(self)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step, self.t0, self.cpu0 = state.global_step, time.time(), time.process_time()

    def _current(self, end_step: int, seconds: float, loss_sum: float) -> dict:
        seg = {"start_step": self.start_step, "end_step": end_step, "train_seconds": round(seconds, 3),
               "train_cpu_seconds": round(time.process_time() - self.cpu0, 3), "loss_sum": loss_sum}
        seg.update(self.counts if self.across_ranks else self._local_counts())
        return seg

    def _local_counts(self) -> dict[str, int]:
        return {name: int(getattr(self.trainer, name, 0) or 0) for name in self.counters}

    def sync_counters(self) -> None:
        """With across_ranks, sum the counters over all ranks; every rank must call it (CheckpointValidator.on_save
        and finish() do)."""
        if self.across_ranks and self.trainer is not None:
            from common.distributed import gather

            per_rank = gather(self._local_counts())
            self.counts = {name: sum(r[name] for r in per_rank) for name in self.counters}

    def write(self, path: Path, state) -> None:
        """Called by CheckpointValidator.on_save before it hashes the checkpoint."""
        if self.trainer is None or self.t0 is None:
            return
        t = self.trainer
        tr_loss = getattr(t, "_tr_loss", None)
        loss_sum = float(getattr(t, "_total_loss_scalar", 0.0)) + (float(tr_loss.item()) if tr_loss is not None else 0.0)
        seg = self._current(state.global_step, time.time() - self.t0, loss_sum)
        (path / SEGMENTS_FILE).write_text(json.dumps({"segments": self.previous + [seg]}, indent=2))

    def finish(self, train_result) -> dict:
        """Totals over all segments, after trainer.train() returned (on every rank when across_ranks)."""
        self.sync_counters()
        steps_now = self.trainer.state.global_step - self.start_step
        last = self._current(self.trainer.state.global_step, train_result.metrics["train_runtime"],
                             train_result.training_loss * steps_now)
        segments = self.previous + [last]
        steps = sum(s["end_step"] - s["start_step"] for s in segments)
        out = {"segments": segments, "segments_complete": self.complete, "optimizer_steps_trained": steps,
               "train_seconds": sum(s["train_seconds"] for s in segments),
               "train_cpu_seconds": sum(s["train_cpu_seconds"] for s in segments),
               "mean_train_loss": sum(s["loss_sum"] for s in segments) / steps if steps else None}
        for name in self.counters:
            out[name] = sum(s.get(name, 0) for s in segments)
        return out
