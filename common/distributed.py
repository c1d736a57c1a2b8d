"""Launch-time topology checks for data-parallel training, and the process-group lifecycle.

Each check fails before the model loads (or right after, for placement) with the fix in the message:
- the launcher started a different number of processes than the job asked for (including
  `accelerate launch --cpu --num_processes 2`, which silently starts ONE process);
- fewer GPUs visible than processes per node;
- a (quantized) model placed on a device other than its rank's, or spread over several devices
  by `device_map="auto"` (naive model parallelism, which DDP cannot wrap);
- ranks that loaded different data (different files on different nodes).

Glue between a multi-rank recipe and the run scaffold (common/run.py): the entry point that parses the
options before any process group exists, rank-prefixed logging, the checkpoint rank 0 found shared with every
rank, and the figures of a hand-written training loop in the form Run.finish reads.

And the launcher's end: `python -m common.distributed [--report_as NAME] <torchrun arguments>` runs
torchrun in this process and, when ranks fail, ends with ONE line naming the rank that failed first,
its exit code, its error line and its log file, instead of torchrun's ChildFailedError traceback (and
the other ranks' "Connection reset by peer", which only say that a peer died).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from common.checks import CheckFailed

log = logging.getLogger(__name__)


@dataclass
class Rank:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_launcher(expected_world_size: int) -> None:
    """The processes that started are the ones the job asked for."""
    started = int(os.environ.get("WORLD_SIZE", "1"))
    if (os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ
            and "WORLD_SIZE" not in os.environ):
        raise CheckFailed("`accelerate launch --cpu --num_processes N` started ONE process (accelerate's simple "
                          "launcher ignores --num_processes with --cpu; only MASTER_ADDR/PORT were set). Use "
                          "`bash launch/multigpu_qlora.sh` (torchrun, NPROC processes over gloo) or "
                          "`accelerate launch --multi_gpu --num_processes N` with use_cpu=True")
    if expected_world_size and started != expected_world_size:
        raise CheckFailed(f"world size is {started} but {expected_world_size} was requested: the launcher started "
                          f"{started} process(es). Check NPROC x NNODES, that every node joined, and that the job "
                          "landed on the machine type it asked for (seed 000: a 4-GPU job ran on a 1-GPU instance)")


def check_gpus_visible(local_world_size: int, local_rank: int) -> None:
    visible = torch.cuda.device_count()
    if visible < local_world_size or local_rank >= visible:
        raise CheckFailed(f"{local_world_size} processes per node need {local_world_size} GPUs but {visible} are "
                          f"visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). Lower NPROC "
                          "or fix CUDA_VISIBLE_DEVICES / the job's GPU request")


def init_distributed(device_request: str, timeout_minutes: int = 10) -> Rank:
    """Start the process group (NCCL on GPU, gloo on CPU) when launched with several processes."""
    from datetime import timedelta

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    use_cuda = device_request == "cuda" or (device_request == "auto" and torch.cuda.is_available())
    if device_request == "cuda" and not torch.cuda.is_available():
        raise CheckFailed("--device cuda was requested but torch sees no GPU; pass --device cpu or fix the CUDA setup")
    if use_cuda:
        check_gpus_visible(local_world, local_rank)
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(minutes=timeout_minutes),
                                device_id=device if use_cuda else None)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Rank(rank, local_rank, world, local_world, device)


def destroy() -> None:
    """Tear the process group down at exit (without it, gloo/NCCL sometimes abort with SIGABRT)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_on_every_rank(main, classes, argv: list[str] | None = None) -> None:
    """A multi-rank recipe's entry point: parse `classes` (its Config, then any library config), call
    main(*configs), and end the rank through exit_process. A check, data or run-directory error is one `error:`
    line (exit 1); exit_for_requeue keeps its 75; anything else prints its traceback (torchrun then names the
    rank that failed first)."""
    import traceback

    from common.run import RUN_ERRORS

    configs = parse_unlaunched(classes, argv)
    code = 1
    try:
        main(*(configs if isinstance(configs, tuple) else (configs,)))
        code = 0
    except RUN_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
    except SystemExit as e:  # exit_for_requeue (75)
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    exit_process(code)  # destroys the process group (a rank that skips it can hang its peers)


_LAUNCHER_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE")


def parse_unlaunched(classes, argv: list[str] | None = None):
    """parse_config with the launcher's rank variables hidden. Building TrainingArguments starts accelerate's
    process group when they are set, over gloo since parse_config builds it for the CPU; init_distributed must
    start it instead (NCCL on GPUs, its own timeout). The recipe's library_args builds them again, launched."""
    from common.config import parse_config

    saved = {k: os.environ.pop(k) for k in _LAUNCHER_VARIABLES if k in os.environ}
    try:
        return parse_config(classes, argv)
    finally:
        os.environ.update(saved)


def setup_rank_logging(rank: Rank) -> None:
    """Rank 0 logs INFO, the other ranks WARNING and above; every line names its rank."""
    logging.basicConfig(level=logging.INFO if rank.is_main else logging.WARNING,
                        format=f"%(asctime)s rank{rank.rank} %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def open_run(run) -> Path | None:
    """Run.open (rank 0 locks and checks the run directory and finds the checkpoint); every rank then resumes
    from that checkpoint: its segments and trainer.train need it."""
    found = gather(str(run.open() or "") if run.main_process else "")[0]
    run.resume_from = Path(found) if found else None
    return run.resume_from


def loop_summary(model, losses: list[float], world_size: int, seconds: float, cpu_seconds: float, tokens: int):
    """(trainer, whole) for Run.finish from a hand-written training loop, one loss per optimizer step: what
    Run.finish reads of a Trainer (state, model, world size) and the one segment Run.train would return."""
    from types import SimpleNamespace

    from transformers import TrainerState

    steps = len(losses)
    state = TrainerState(global_step=steps, log_history=[{"step": i + 1, "loss": x} for i, x in enumerate(losses)])
    trainer = SimpleNamespace(state=state, model=model, args=SimpleNamespace(world_size=world_size))
    segment = {"start_step": 0, "end_step": steps, "train_seconds": round(seconds, 3),
               "train_cpu_seconds": round(cpu_seconds, 3), "loss_sum": sum(losses), "trained_tokens": tokens}
    whole = {"segments": [segment], "segments_complete": True, "optimizer_steps_trained": steps,
             "train_seconds": seconds, "train_cpu_seconds": cpu_seconds, "trained_tokens": tokens,
             "mean_train_loss": sum(losses) / steps if steps else None}
    return trainer, whole


DESTROY_TIMEOUT = 20  # seconds exit_process waits for the process-group teardown


def exit_process(code: int) -> None:
    """End a rank: destroy the process group, flush logs and stdio, and leave with `os._exit(code)`.

    Even after destroy_process_group, a finished rank now and then dies at interpreter shutdown with
    `terminate called without an active exception` (SIGABRT, exit -6): a C++ thread of the store/gloo
    is still joinable when static destructors run, and torchrun reports the whole job as failed
    after it succeeded. Skipping interpreter finalization once every file is written avoids that.
    The teardown gets DESTROY_TIMEOUT seconds: once (1 of about 8 suite runs, under load) a rank that had saved
    and logged its exit never left, and torchrun waited for it; os._exit follows either way."""
    import threading

    try:
        teardown = threading.Thread(target=destroy, name="destroy_process_group", daemon=True)
        teardown.start()
        teardown.join(DESTROY_TIMEOUT)
        if teardown.is_alive():
            logging.getLogger(__name__).warning("destroy_process_group did not return in %d s; exiting with %d anyway",
                                                DESTROY_TIMEOUT, code)
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def check_rank_placement(model, device: torch.device) -> None:
    """Every parameter sits on this rank's device; nothing is spread by device_map='auto'."""
    device_map = getattr(model, "hf_device_map", None) or {}
    spread = {str(d) for d in device_map.values() if str(d) not in ("cpu", "disk")}
    if len(spread) > 1:
        raise CheckFailed(f"the model is spread over {sorted(spread)} (device_map='auto' is naive model parallelism). "
                          "Under data parallelism each rank must hold its own full copy: load with "
                          "device_map={'': local_rank}. DDP would fail with 'DistributedDataParallel device_ids and "
                          "output_device arguments only work with single-device/multiple-device GPU modules'")
    wrong = {str(p.device) for p in model.parameters() if p.device != device and p.device.type != "meta"}
    if wrong:
        raise CheckFailed(f"parameters on {sorted(wrong)} but this rank trains on {device}: a quantized model cannot "
                          "be moved after loading, so load it with device_map={'': local_rank}")


def gather(value):
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def data_fingerprint(features: list[dict]) -> dict:
    h = hashlib.sha256()
    for f in features:
        h.update(json.dumps(f["input_ids"]).encode())
    return {"examples": len(features), "sha256": h.hexdigest()[:16]}


def check_same_data_on_all_ranks(features: list[dict], source: str) -> dict:
    """Every rank tokenized the same examples (else ranks take different numbers of steps and hang)."""
    mine = data_fingerprint(features)
    everyone = gather(mine)
    if any(f != everyone[0] for f in everyone):
        table = ", ".join(f"rank {r}: {f['examples']} examples ({f['sha256']})" for r, f in enumerate(everyone))
        raise CheckFailed(f"ranks loaded different training data from {source}: {table}. Every node must read the "
                          "same file (a shared filesystem, or the same copy on every node); with different sizes the "
                          "ranks run different numbers of steps and the job hangs at the next collective")
    return mine


def trainable_checksum(model) -> float:
    """A cheap fingerprint of the trainable weights, to show data-parallel replicas stayed in sync.
    Collective under DeepSpeed ZeRO-3 (the partitioned weights are gathered first): call it on every rank."""
    params = [p for p in model.parameters() if p.requires_grad]

    def checksum() -> float:
        with torch.no_grad():
            return float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(params)))

    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return checksum()
    return checksum()


def cast_for_sharding(model, dtype: torch.dtype) -> None:
    """FSDP (and ZeRO-3) need one dtype per sharded unit: cast every floating-point parameter, LoRA and
    the norms prepare_model_for_kbit_training upcast to fp32 included, to the compute dtype. 4-bit weights
    are stored in that dtype already when loaded with bnb_4bit_quant_storage=dtype."""
    for p in model.parameters():
        if p.dtype.is_floating_point and p.dtype != dtype:
            p.data = p.data.to(dtype)


def check_uniform_dtype(model) -> None:
    dtypes = {str(p.dtype) for p in model.parameters()}
    if len(dtypes) > 1:
        raise CheckFailed(f"parameters mix dtypes {sorted(dtypes)}; FSDP shards need one dtype per unit and fail with "
                          "'FSDP expects uniform original parameter dtype'. Load QLoRA with bnb_4bit_quant_storage equal "
                          "to the compute dtype and cast LoRA weights to it (common.distributed.cast_for_sharding)")


# ---- the launcher's failure line -----------------------------------------------------------------
REQUEUE_EXIT_CODE = 75  # common.checkpoints' "saved after a signal, rerun to resume": not a failure
_EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]: ?)?([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Failed|Exit)\b.*)")


@dataclass
class RankFailure:
    rank: int
    local_rank: int
    exitcode: int
    log_file: Path | None  # the rank's stderr.log from torchrun --log_dir/--redirects


def _rank_log_dir(run_dir: Path | None, local_rank: int) -> Path | None:
    if run_dir is None:
        return None
    attempts = sorted(run_dir.glob("attempt_*"), key=lambda p: int(p.name.split("_")[1]))
    return attempts[-1] / str(local_rank) if attempts else None


def _last_write_ns(failure: RankFailure) -> int:
    if failure.log_file is None:
        return 0
    files = [f for f in (failure.log_file, failure.log_file.with_name("stdout.log")) if f.is_file()]
    return max((f.stat().st_mtime_ns for f in files), default=0)


def _stopped_by_the_agent(failure: RankFailure) -> bool:
    """torchrun SIGTERMs the ranks still running once one has failed; they exit -15, or 75 after saving."""
    return failure.exitcode in (-signal.SIGTERM, REQUEUE_EXIT_CODE)


def first_failure(failures: list[RankFailure]) -> RankFailure:
    """The rank whose failure came first. Not one torchrun stopped because another had failed. Ranks a
    dead peer takes down ("Connection reset by peer") write their traceback after the first one died, so
    among the rest the rank whose log was written last earliest is the root cause; a rank killed by a
    signal (kill -9, the OOM killer) writes nothing when it dies, so it sorts first too."""
    return min(failures, key=lambda f: (_stopped_by_the_agent(f), _last_write_ns(f), f.rank))


def _error_line(failure: RankFailure) -> str:
    """What went wrong, in the rank's own words: its last `error:` line, else its last exception line."""
    if failure.exitcode < 0:
        try:
            name = signal.Signals(-failure.exitcode).name
        except ValueError:
            name = f"signal {-failure.exitcode}"
        why = ": kill -9 or the kernel's out-of-memory killer, see dmesg" if name == "SIGKILL" else ""
        return f"killed by {name}{why}"
    lines = []
    if failure.log_file is not None and failure.log_file.is_file():
        lines = failure.log_file.read_text(errors="replace").splitlines()
    for line in reversed(lines):
        text = re.sub(r"^\[rank\d+\]: ?", "", line).strip()
        if text.startswith("error:"):
            return text
    for line in reversed(lines):
        m = _EXCEPTION_LINE.match(line.strip())
        if m:
            return m.group(1)
    return "no error message in its log"


def failure_line(failures: list[RankFailure], name: str) -> str:
    """`<name>: rank 1 failed first (exit 1): error: ...; full log: <its stderr.log>`."""
    first = first_failure(failures)
    what = f"({_error_line(first)})" if first.exitcode < 0 else f"(exit {first.exitcode}): {_error_line(first)}"
    others = sum(1 for f in failures if f is not first and not _stopped_by_the_agent(f))
    after = f"; {others} other rank{'s' if others > 1 else ''} failed after it" if others else ""
    log_text = f"; full log: {_display(first.log_file)}" if first.log_file else ""
    return f"{name}: rank {first.rank} failed first {what}{after}{log_text}"


def _display(path: Path) -> str:
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def launch(argv: list[str]) -> int:
    """torchrun (torch.distributed.run) with `argv`; on a rank failure, print failure_line and return the
    first failed rank's exit code (128 + N for signal N) instead of torchrun's traceback and exit 1."""
    name = "torchrun"
    if argv[:1] == ["--report_as"]:
        name, argv = argv[1], argv[2:]
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    log_root = Path(args.log_dir) if args.log_dir else None
    before = set(log_root.iterdir()) if log_root and log_root.is_dir() else set()
    try:
        run(args)
        return 0
    except SignalException as e:  # SIGTERM/SIGINT to the launcher: ranks were told to checkpoint and stop
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        new = sorted(set(log_root.iterdir()) - before) if log_root and log_root.is_dir() else []
        run_dir = new[-1] if len(new) == 1 else None
        failures = []
        for rank, f in e.failures.items():
            rank_dir = _rank_log_dir(run_dir, f.local_rank)
            failures.append(RankFailure(rank, f.local_rank, f.exitcode, rank_dir / "stderr.log" if rank_dir else None))
        if all(f.exitcode == REQUEUE_EXIT_CODE for f in failures):
            return REQUEUE_EXIT_CODE  # every rank saved and asked to be requeued: the launcher says so
        print(failure_line(failures, name), file=sys.stderr, flush=True)
        first = first_failure(failures)
        return first.exitcode if 0 < first.exitcode < 256 else 128 - first.exitcode if first.exitcode < 0 else 1


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
