"""common.child: the one way the harnesses run a recipe as a child process. Tiny `python -c` children
(milliseconds each, no torch): exit codes, the log, metrics read back, a timeout that stops the whole
process group, and a signal to the harness passed on to the child."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from common import child
from conftest import REPO

PY = sys.executable


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def wait_for(path, seconds=20):
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared"


def test_exit_code_log_and_error_line(tmp_path):
    code = "import sys; print('step 1'); print('error: --lora_r 0: must be at least 1', file=sys.stderr); sys.exit(3)"
    r = child.run([PY, "-c", code], tmp_path / "a" / "log.txt")
    assert (r.returncode, r.timed_out, r.interrupted, r.metrics) == (3, False, False, None)
    assert r.error == "error: --lora_r 0: must be at least 1" and r.log == tmp_path / "a" / "log.txt"
    assert r.log.read_text().splitlines() == ["step 1", "error: --lora_r 0: must be at least 1"]  # both streams
    assert r.command == [PY, "-c", code] and r.seconds > 0

    ok = child.run([PY, "-c", "print('fine')"], tmp_path / "ok.log", stderr_log=tmp_path / "ok.err")
    assert ok.returncode == 0 and ok.log.read_text() == "fine\n" and (tmp_path / "ok.err").read_text() == ""


def test_stderr_in_its_own_file_is_where_the_error_is_read(tmp_path):
    code = "import sys; print('Error: in stdout'); print('ValueError: bad r', file=sys.stderr); sys.exit(1)"
    r = child.run([PY, "-c", code], tmp_path / "out.log", stderr_log=tmp_path / "err.log")
    assert r.error == "ValueError: bad r" and r.log.read_text() == "Error: in stdout\n"


def test_cwd_env_and_metrics_read_back(tmp_path):
    code = "import json, os; json.dump({'final_train_loss': 1.5, 'who': os.environ['WHO']}, open('run/metrics.json', 'w'))"
    (tmp_path / "run").mkdir()
    r = child.run([PY, "-c", code], tmp_path / "log.txt", cwd=tmp_path, env={**os.environ, "WHO": "child"},
                  metrics=tmp_path / "run" / "metrics.json")
    assert r.returncode == 0 and r.metrics == {"final_train_loss": 1.5, "who": "child"}
    (tmp_path / "run" / "metrics.json").write_text("{not json")
    assert child.run([PY, "-c", "pass"], tmp_path / "log.txt", metrics=tmp_path / "run" / "metrics.json").metrics is None


def test_timeout_stops_the_whole_group_grandchild_included(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    code = textwrap.dedent(f"""
        import subprocess, time
        p = subprocess.Popen(["sleep", "60"])
        open({str(pid_file)!r}, "w").write(str(p.pid))
        print("started", flush=True)
        time.sleep(60)
    """)
    start = time.time()
    r = child.run([PY, "-c", code], tmp_path / "log.txt", timeout=1, grace=5)
    assert time.time() - start < 10
    assert r.timed_out and not r.interrupted and r.returncode == -signal.SIGTERM
    assert r.error == "killed by SIGTERM; last line: started"
    assert not alive(int(pid_file.read_text()))


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    r = child.run([PY, "-c", code], tmp_path / "log.txt", timeout=1, grace=1)
    assert r.timed_out and r.returncode == -signal.SIGKILL and 2 <= r.seconds < 10
    assert r.error.startswith("killed by SIGKILL (out of memory?")


def test_what_the_child_leaves_running_is_killed_when_it_exits(tmp_path):
    pid_file = tmp_path / "orphan.pid"
    code = f"import subprocess; open({str(pid_file)!r}, 'w').write(str(subprocess.Popen(['sleep', '60']).pid))"
    r = child.run([PY, "-c", code], tmp_path / "log.txt")
    assert r.returncode == 0 and not r.timed_out
    deadline = time.time() + 5
    while alive(int(pid_file.read_text())) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(int(pid_file.read_text()))


HARNESS = """
import json, sys
sys.path.insert(0, {repo!r})
from common import child
r = child.run([sys.executable, "-c", {code!r}], {log!r}, grace=20)
print(json.dumps({{"rc": r.returncode, "interrupted": r.interrupted, "timed_out": r.timed_out}}))
if r.interrupted:
    child.exit_stopped("the child saved its checkpoint")
"""

# a recipe's answer to SIGTERM: save, then exit 75
RECIPE = """
import signal, sys, time
def stop(signum, frame):
    open({got!r}, "w").write(signal.Signals(signum).name)
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
open({ready!r}, "w").write("ready")
time.sleep(60)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_harness_reaches_the_child_as_sigterm(tmp_path, signum):
    got, ready = tmp_path / "got", tmp_path / "ready"
    code = RECIPE.format(got=str(got), ready=str(ready))
    harness = subprocess.Popen([PY, "-c", HARNESS.format(repo=str(REPO), code=code, log=str(tmp_path / "log.txt"))],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(ready)
    harness.send_signal(signum)
    stdout, stderr = harness.communicate(timeout=30)
    assert got.read_text() == "SIGTERM"                       # whatever the harness got, the child gets SIGTERM
    assert json.loads(stdout) == {"rc": 75, "interrupted": True, "timed_out": False}
    assert harness.returncode == 75 and stderr.strip().splitlines()[-1] == \
        "stopped by a signal: the child saved its checkpoint"
    assert f"received {signal.Signals(signum).name}: stopping the running child process" in stderr


def test_handlers_are_put_back_after_the_child(tmp_path):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    child.run([PY, "-c", "pass"], tmp_path / "log.txt")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_child_started_after_a_signal_is_stopped_at_once(tmp_path):
    with child.ForwardSignals() as signals:
        signals.received = signal.SIGTERM                     # as if one came between two children
        r = child.run([PY, "-c", "import time; time.sleep(60)"], tmp_path / "log.txt", signals=signals, grace=5)
    assert r.interrupted and r.returncode == -signal.SIGTERM and r.seconds < 10


def test_error_line_is_the_exception_or_the_kill_signal():
    traceback = ("12:00:01 INFO x: loading\nTraceback (most recent call last):\n  File \"a.py\", line 1\n"
                 "    raise ValueError(f\"`r` should be...\")\n"
                 "ValueError: `r` should be a positive integer value but the value passed is 0\n")
    assert child.error_line(traceback, 1) == "ValueError: `r` should be a positive integer value but the value passed is 0"
    assert child.error_line("a\nerror: --method 'x': choose lora or qlora\n", 1) == "error: --method 'x': choose lora or qlora"
    assert child.error_line("step 3\n", -9).startswith("killed by SIGKILL (out of memory?")
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n  0%|  | 0/8\n"
    assert child.error_line(oom, 1).startswith("torch.OutOfMemoryError: CUDA out of memory")
    # the line a check printed wins over what the interpreter says on its way out
    assert child.error_line("error: DeepSpeed is not importable\nException ignored in: <function>\n", 1) == \
        "error: DeepSpeed is not importable"
    assert child.error_line("", 1) == "" and child.error_line("", -15) == "killed by SIGTERM"


def test_without_waitid_it_polls(tmp_path, monkeypatch):
    """macOS has no os.waitid: the same results through Popen.poll."""
    monkeypatch.delattr(os, "waitid")
    assert child.run([PY, "-c", "import sys; sys.exit(4)"], tmp_path / "log.txt").returncode == 4
    r = child.run([PY, "-c", "import time; time.sleep(60)"], tmp_path / "log.txt", timeout=1, grace=5)
    assert r.timed_out and r.returncode == -signal.SIGTERM
