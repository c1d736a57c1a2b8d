"""What every run leaves in its --output_dir: manifest.json, metrics.json, loss.png.

manifest.json: resolved config, command line, package versions, git commit, dataset file hashes,
               start/end time, host. Written at start (status "running") and rewritten at the end.
metrics.json:  the numbers: losses, tokens and tokens/s, wall time, peak memory and how it was
               measured, parameter counts, world size, device, estimated cost.
loss.png:      train (and eval) loss against optimizer step, from the Trainer's log history.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "tokenizers",
            "safetensors", "deepspeed", "evaluate", "rouge-score", "sacrebleu", "flash-attn", "liger-kernel"]


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def package_versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def pinned_versions(requirements: Path = REPO_ROOT / "requirements.txt") -> dict[str, str]:
    pins = {}
    if requirements.is_file():
        for line in requirements.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                pins[name.strip().lower()] = version.strip()
    return pins


def version_drift(requirements: Path = REPO_ROOT / "requirements.txt") -> list[str]:
    """Installed packages whose version differs from requirements.txt."""
    drift = []
    for name, want in pinned_versions(requirements).items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            drift.append(f"{name} not installed (pinned {want})")
            continue
        if have.split("+")[0] != want:
            drift.append(f"{name} {have} (pinned {want})")
    return drift


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain"], capture_output=True,
                               text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, data: dict) -> None:
    """Write atomically: a crash mid-write never leaves a half file where a good one was."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_manifest(output_dir: Path, config, datasets: list[str], started: str, status: str,
                   extra: dict | None = None) -> dict:
    manifest = {
        "status": status,
        "command": [sys.executable] + sys.argv,
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config),
        "packages": package_versions(),
        "version_drift": version_drift(),
        "git_commit": git_commit(),
        "datasets": {p: file_sha256(p) for p in datasets if p and Path(p).exists()},
        "host": socket.gethostname(),
        "started": started,
        "ended": now() if status != "running" else None,
    }
    manifest.update(extra or {})
    write_json(output_dir / "manifest.json", manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of the run, measured the way the device allows.

    CUDA: torch.cuda.max_memory_allocated (tensors) and max_memory_reserved (allocator cache), reset
    at start. CPU: the process's peak resident set size, VmHWM from /proc/self/status. It includes
    the Python interpreter, libraries and data; `baseline_rss_bytes` is the peak before the model
    loaded. Not getrusage's ru_maxrss: Linux carries that across fork+exec, so a recipe started by
    a big parent (a notebook, a sweep driver, pytest holding a model) reports the parent's peak.
    """

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.baseline_bytes = self.rss_peak()[0]

    @staticmethod
    def rss_peak() -> tuple[int, str]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024, "VmHWM (/proc/self/status)"
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "getrusage ru_maxrss"

    def report(self) -> dict:
        if self.device.type == "cuda":
            return {"peak_memory_bytes": torch.cuda.max_memory_allocated(self.device),
                    "peak_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
                    "peak_memory_method": "torch.cuda.max_memory_allocated (reserved: max_memory_reserved)"}
        peak, source = self.rss_peak()
        return {"peak_memory_bytes": peak, "baseline_rss_bytes": self.baseline_bytes,
                "peak_memory_method": f"process peak resident set size, {source}; includes Python, libraries "
                                      "and data; baseline_rss_bytes is the peak before the model was loaded"}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for the machine line of a measured figure."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, " \
           f"{torch.get_num_threads()} torch threads)"


def estimated_cost(wall_seconds: float, hourly_price_usd: float, world_size: int = 1) -> dict:
    hours = wall_seconds / 3600 * world_size
    return {"device_hours": round(hours, 5), "hourly_price_usd": hourly_price_usd,
            "estimated_cost_usd": round(hours * hourly_price_usd, 5)}


# ---------------------------------------------------------------------------------------------
# loss.png
# ---------------------------------------------------------------------------------------------
def plot_loss(log_history: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
