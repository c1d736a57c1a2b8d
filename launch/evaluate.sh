#!/usr/bin/env bash
# Evaluate a model, a base + adapter, or a merged export (recipes/evaluate.py): perplexity, ROUGE, BLEU,
# chrF, exact match / accuracy, keyword accuracy, and the forgetting check against a baseline.
#
#   bash launch/evaluate.sh [--key value ...]      # e.g. --adapter_path runs/my_run/adapter --output_dir runs/my_eval
#   CONFIG=my.yaml bash launch/evaluate.sh         # another config file
#   PYTHON=/path/to/python bash launch/evaluate.sh # another interpreter (default: .venv/bin/python, else python)
#
# Exit code: the recipe's (0 ok, 1 a check or data error with its message, 2 a bad option).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || command -v python || command -v python3)}
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  echo
  echo "Recipe options (python recipes/evaluate.py --help):"
  exec "$PY" recipes/evaluate.py --help
fi

CONFIG=${CONFIG:-recipes/configs/evaluate.yaml}
if [[ -n "${WORLD_SIZE:-}" && "${WORLD_SIZE}" != "1" ]]; then
  echo "evaluate.sh: WORLD_SIZE=${WORLD_SIZE} but evaluation runs in one process" >&2
  exit 2
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}   # never wait on a model hub; asset:* models are built locally
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

cmd=("$PY" recipes/evaluate.py --config "$CONFIG" "$@")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
