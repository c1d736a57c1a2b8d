"""One way for a harness to run a recipe as a child process, and what came of it.

    result = child.run([sys.executable, "recipes/x.py", "--config", config, "--output_dir", str(run_dir)],
                       run_dir / "log.txt", timeout=1800, metrics=run_dir / "metrics.json")
    result.returncode, result.seconds, result.timed_out, result.interrupted, result.metrics, result.error

- The child runs in its own process group (its own session), with stdout and stderr in a log file
  (stderr in a second file with `stderr_log`).
- A timeout sends SIGTERM to the whole group, then SIGKILL after `grace` seconds. A recipe answers
  SIGTERM by saving a checkpoint and exiting 75.
- SIGTERM/SIGINT to the harness while a child runs are passed on the same way: the child is in its own
  session, so a Ctrl-C in the terminal reaches only the harness. `result.interrupted` says it happened; the
  harness then stops too (`exit_stopped`: exit 75). A harness that must know about signals between children
  (the sweep) installs `ForwardSignals` for its whole run and passes it to every `run`.
- Once the child has exited, whatever it left running in its group is killed, so that nothing of one
  run spills into the next one's measurements.

Standard library only: the sweep imports it at the top, and its --dry_run never needs torch.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

log = logging.getLogger(__name__)
REQUEUE_EXIT_CODE = 75  # common.checkpoints.REQUEUE_EXIT_CODE (not imported: it pulls in torch and bitsandbytes)
GRACE_SECONDS = 300     # a recipe's checkpoint of a large model after SIGTERM can take minutes
POLL_SECONDS = 0.1
_ERROR = re.compile(r"^(error:|[\w.]*(Error|Exception)\b)|: error: |out of memory", re.IGNORECASE)


@dataclass
class Result:
    command: list[str]
    returncode: int            # negative: killed by that signal
    seconds: float             # start to exit, wall clock
    timed_out: bool            # stopped because it ran past the timeout
    interrupted: bool          # stopped because the harness received SIGTERM/SIGINT
    log: Path                  # stdout (and stderr unless stderr_log was given)
    metrics: dict | None       # the `metrics` file it was given, where the child wrote one
    error: str                 # the log's last error line, else its last line; the kill signal if there was one


def error_line(text: str, returncode: int) -> str:
    """The line that says what went wrong: the last `error: ` line a check printed, else the last line that looks
    like an exception or an out-of-memory report, else the last line; with the signal that killed the process."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = next((ln for ln in reversed(lines) if ln.startswith("error: ")), None) \
        or next((ln for ln in reversed(lines) if _ERROR.search(ln)), lines[-1] if lines else "")
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ \
            else f"signal {-returncode}"
        killed = f"killed by {name}" + (" (out of memory? the kernel's OOM killer sends SIGKILL)"
                                        if -returncode == signal.SIGKILL else "")
        line = f"{killed}; last line: {line}" if line else killed
    return line[:500]


def _tail(path: Path, size: int = 1 << 20) -> str:
    """The last `size` bytes of a log (a long run's log can be large; its error is at the end)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _read_metrics(path: Path | str | None) -> dict | None:
    """The metrics file as the child left it; None where it wrote none (or half of one)."""
    try:
        return json.loads(Path(path).read_text()) if path is not None else None
    except (OSError, ValueError):
        return None


class _Child:
    """A started child's process group: stop it (SIGTERM, SIGKILL after the grace) and clean up after it."""

    def __init__(self, proc: subprocess.Popen, grace: float):
        self.proc, self.grace, self.kill_at = proc, grace, None

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self) -> None:
        if self.kill_at is None:
            self.signal_group(signal.SIGTERM)
            self.kill_at = time.monotonic() + self.grace

    def exited(self) -> bool:
        """Whether the leader exited; not reaped yet, so its group id cannot be taken by a new process."""
        if not hasattr(os, "waitid"):  # macOS: reaped here, so the group kill after it is best effort
            return self.proc.poll() is not None
        return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


class ForwardSignals:
    """While installed (a `with` block, or install() for the rest of the process): SIGTERM/SIGINT to this
    process stop the running child instead (SIGTERM to its group, then SIGKILL after the grace) and are
    remembered in `received`; a child started after one came is stopped at once."""

    def __init__(self, message: str = "stopping the running child process (a recipe saves a checkpoint and exits 75)"):
        self.message, self.received, self.child = message, None, None
        self._previous: dict[int, object] = {}

    def install(self) -> ForwardSignals:
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __enter__(self) -> ForwardSignals:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            log.warning("received %s: %s", signal.Signals(signum).name, self.message)
        self.received = signum
        if self.child is not None:
            self.child.stop()


def run(cmd: list[str], log_file: Path | str, *, cwd: Path | str | None = None, env: dict | None = None,
        timeout: float | None = None, grace: float = GRACE_SECONDS, stderr_log: Path | str | None = None,
        metrics: Path | str | None = None, signals: ForwardSignals | None = None) -> Result:
    """Run `cmd` to its end (or its timeout, or a signal to this process) and return what came of it.
    timeout None or 0: no limit. Without `signals`, SIGTERM/SIGINT are forwarded for as long as the child runs."""
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    forward = signals or ForwardSignals()
    with ExitStack() as stack:
        out = stack.enter_context(open(log_file, "w"))
        err = stack.enter_context(open(stderr_log, "w")) if stderr_log else subprocess.STDOUT
        if signals is None and threading.current_thread() is threading.main_thread():
            stack.enter_context(forward)  # handlers can only be set in the main thread
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True)
        child = _Child(proc, grace)
        forward.child = child
        timed_out = False
        try:
            if forward.received:
                child.stop()
            while not child.exited():
                now = time.monotonic()
                if timeout and not timed_out and now - start >= timeout:
                    timed_out = True
                    child.stop()
                if child.kill_at is not None and now >= child.kill_at:
                    child.signal_group(signal.SIGKILL)
                time.sleep(POLL_SECONDS)
        finally:
            forward.child = None
            child.signal_group(signal.SIGKILL)  # what it left running; and the child itself on an exception here
            returncode = proc.wait()
        seconds = round(time.monotonic() - start, 2)
    text = _tail(Path(stderr_log) if stderr_log else log_file)
    return Result(command=list(cmd), returncode=returncode, seconds=seconds, timed_out=timed_out,
                  interrupted=forward.received is not None, log=log_file, metrics=_read_metrics(metrics),
                  error=error_line(text, returncode))


def exit_stopped(message: str) -> NoReturn:
    """After an interrupted child: say so in one line and exit 75 (the harness's run files stay as they are)."""
    print(f"stopped by a signal: {message}", file=sys.stderr)
    raise SystemExit(REQUEUE_EXIT_CODE)
