"""What a user sees on the command line: no stray bitsandbytes warning, one-line option errors, and the
multi-process launcher's last line naming the rank that failed first (its exit code, error and log)."""
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from common import _OptionalKernelMissing
from common import distributed as ddp
from conftest import REPO

KERNELS_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


# ---- bitsandbytes' optional-kernel warning ---------------------------------------------------------
def record(msg, *args):
    return logging.LogRecord("bitsandbytes.backends.cpu.ops", logging.WARNING, "ops.py", 253, msg, args, None)


def test_only_the_missing_kernels_package_warning_is_filtered():
    missing = ModuleNotFoundError("No module named 'kernels'", name="kernels")
    text = KERNELS_WARNING + ": %s. Please make sure you already `pip install kernels` and the kernels >= 0.11.1"
    f = _OptionalKernelMissing()
    assert not f.filter(record(text, missing))
    assert f.filter(record(text, RuntimeError("hub download failed")))  # kernels installed but failing: shown
    assert f.filter(record(text, ModuleNotFoundError("No module named 'x'", name="x")))
    assert f.filter(record("some other bitsandbytes warning %s", missing))
    assert _OptionalKernelMissing in {type(x) for x in logging.getLogger("bitsandbytes.backends.cpu.ops").filters}


@pytest.fixture(scope="module")
def bad_float_run():
    """`python recipes/dpo.py --learning_rate abc` as a real process (dpo imports transformers, which imports
    bitsandbytes, before its own common imports: the filter must already be in place)."""
    return subprocess.run([sys.executable, str(REPO / "recipes" / "dpo.py"), "--learning_rate", "abc"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_bad_option_value_is_one_short_line(bad_float_run):
    assert bad_float_run.returncode == 2
    lines = bad_float_run.stderr.splitlines()
    assert len(lines) <= 3, bad_float_run.stderr  # argparse printed 38 lines of usage first
    assert lines[-1] == "error: --learning_rate abc: not a float"
    assert "usage:" not in bad_float_run.stderr and "Traceback" not in bad_float_run.stderr


def test_recipe_prints_no_kernels_warning(bad_float_run):
    assert KERNELS_WARNING not in bad_float_run.stderr


# ---- the launcher's line for a failed rank ---------------------------------------------------------
def rank_log(tmp_path, local_rank, text, age_s):
    """<run dir>/attempt_0/<local_rank>/stderr.log as torchrun --log_dir --redirects 3 leaves it, last written
    `age_s` seconds ago."""
    folder = tmp_path / "none_abc" / "attempt_0" / str(local_rank)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stdout.log").write_text("")
    (folder / "stderr.log").write_text(text)
    when = time.time() - age_s
    for name in ("stdout.log", "stderr.log"):
        os.utime(folder / name, (when, when))
    return folder / "stderr.log"


def test_the_rank_that_died_first_is_named_not_the_peers_it_took_down(tmp_path):
    killed = rank_log(tmp_path, 1, "{'loss': 6.2}\n", age_s=5)  # kill -9: nothing written when it died
    reset = rank_log(tmp_path, 0, "Traceback (most recent call last):\n  ...\nRuntimeError: [gloo] Connection "
                                  "reset by peer\n", age_s=1)
    failures = [ddp.RankFailure(0, 0, 1, reset), ddp.RankFailure(1, 1, -9, killed)]
    assert ddp.failure_line(failures, "multigpu_qlora.sh") == (
        "multigpu_qlora.sh: rank 1 failed first (killed by SIGKILL: kill -9 or the kernel's out-of-memory killer, "
        f"see dmesg); 1 other rank failed after it; full log: {killed}")


def test_the_ranks_own_error_line_is_quoted_and_stopped_ranks_do_not_count(tmp_path):
    failed = rank_log(tmp_path, 1, "loading\nerror: data/x.jsonl:3: two user turns in a row; merge them\n", 3)
    stopped = rank_log(tmp_path, 0, "loading\n", 9)  # torchrun SIGTERMed it after rank 1 failed
    line = ddp.failure_line([ddp.RankFailure(0, 0, -15, stopped), ddp.RankFailure(1, 1, 1, failed)], "x.sh")
    assert line == f"x.sh: rank 1 failed first (exit 1): error: data/x.jsonl:3: two user turns in a row; merge " \
                   f"them; full log: {failed}"
    tb = rank_log(tmp_path, 0, "Traceback (most recent call last):\n  File \"x.py\"\nValueError: bad shape\n", 1)
    assert ddp.failure_line([ddp.RankFailure(4, 0, 1, tb)], "x.sh").startswith(
        "x.sh: rank 4 failed first (exit 1): ValueError: bad shape; full log:")


WORKER = """
import os, sys, time
rank = int(os.environ["RANK"])
print(f"rank {rank} started", flush=True)
if rank == 1:
    print("error: only rank 1 sees this input; fix it", file=sys.stderr, flush=True)
    sys.exit(3)
time.sleep(30)
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_torchrun_wrapper_ends_with_the_failed_rank(tmp_path):
    """python -m common.distributed (torchrun in-process) with workers that import nothing heavy: rank 1 exits
    3, rank 0 is stopped; the last line names rank 1, its exit code is the wrapper's, its log holds its error."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run([sys.executable, "-m", "common.distributed", "--report_as", "t.sh", "--nproc_per_node", "2",
                           "--master_port", free_port(), "--log_dir", str(tmp_path / "logs"), "--redirects", "3",
                           "--tee", "3", str(script)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    prefix = "t.sh: rank 1 failed first (exit 3): error: only rank 1 sees this input; fix it; full log: "
    assert last.startswith(prefix), proc.stderr[-3000:]
    log = last[len(prefix):]
    assert log.endswith("/attempt_0/1/stderr.log") and "only rank 1 sees" in open(log).read()
    assert "ChildFailedError" not in proc.stderr and "Traceback" not in proc.stderr


def rank_pid(tag, rank):
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if f"FT_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env and b"sft_multigpu" in cmdline:
            return int(pid)
    return None


@pytest.mark.slow
def test_launcher_names_the_rank_killed_during_training(tiny_dir, tmp_path):
    """NPROC=2 through launch/multigpu_qlora.sh on CPU; rank 1 gets kill -9 mid-training. Rank 0 then dies of
    gloo's "Connection reset by peer"; the launcher's last line names rank 1, SIGKILL, and rank 1's log."""
    tag = uuid.uuid4().hex
    out = tmp_path / "run"
    env = dict(os.environ, PYTHON=sys.executable, MASTER_PORT=free_port(), FT_TEST_TAG=tag, NPROC="2")
    cmd = ["bash", str(REPO / "launch" / "multigpu_qlora.sh"), "--model_name_or_path", str(tiny_dir), "--output_dir",
           str(out), "--precision", "fp32", "--max_steps", "200", "--logging_steps", "1", "--save_steps", "1000"]
    console = tmp_path / "console.log"
    with open(console, "w") as log:
        job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while "'loss'" not in console.read_text() and time.time() < deadline and job.poll() is None:
            time.sleep(0.2)
        pid = rank_pid(tag, 1)
        assert pid, console.read_text()[-3000:]
        os.kill(pid, signal.SIGKILL)
        code = job.wait(timeout=300)
    text = console.read_text()
    assert code == 128 + signal.SIGKILL, text[-3000:]
    last = text.strip().splitlines()[-1]
    prefix = "multigpu_qlora.sh: rank 1 failed first (killed by SIGKILL"
    assert last.startswith(prefix) and "; full log: " in last, text[-3000:]
    log = last.split("; full log: ")[1]
    assert log.startswith(f"{out}.logs/node0/") and log.endswith("/1/stderr.log")
    assert "Loading weights" in open(log).read()  # rank 1's own output, kept after it died
