"""Shared fixtures: offline environment, the tiny model, and (built once) SmolLM2-135M-Instruct."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# No hub at test time, ever; caches in places the test run owns.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", str(REPO / ".cache" / "huggingface"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("FT_ASSETS_DIR", str(REPO / ".assets"))  # shared with the quickstart: SmolLM2 is built once
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("MPLBACKEND", "Agg")


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# pytest -n 2 (the default, pytest.ini): two workers share the cores, so each process uses one thread
# instead of four threads fighting over two (OpenMP spin-waits make oversubscription slower than serial).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Launchers default to port 29500; each pytest-xdist worker gets its own so two torchrun tests never collide.
os.environ.setdefault("MASTER_PORT", free_port())


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from common.assets import build

    return build("tiny", tmp_path_factory.mktemp("assets") / "tiny")


@pytest.fixture(scope="session")
def smollm2_dir():
    from common.assets import resolve_model_path

    return Path(resolve_model_path("asset:smollm2"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Model loading raises: a recipe check that ran after the model load fails the test."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("model loaded: the check ran after the model load")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


def run(cmd, cwd=REPO, env=None, timeout=600):
    """Run a command, return CompletedProcess with text output (never raises on non-zero)."""
    full_env = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    full_env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + full_env.get("PATH", "")
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
