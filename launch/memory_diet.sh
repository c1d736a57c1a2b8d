#!/usr/bin/env bash
# Single-device LoRA/QLoRA SFT (recipes/sft_memory_diet.py) on one GPU, or on the CPU when there is none.
#
#   bash launch/memory_diet.sh [--key value ...]      # extra flags go to the recipe and override the config
#   CONFIG=my.yaml bash launch/memory_diet.sh         # another config file
#   PYTHON=/path/to/python bash launch/memory_diet.sh # another interpreter (default: .venv/bin/python from
#                                                     # launch/setup_env.sh, else python on PATH)
#
# Failure modes it catches before the recipe starts:
#   - more than one process: this recipe is single-device (use launch/multigpu_qlora.sh for several GPUs)
#   - CUDA_VISIBLE_DEVICES listing several GPUs: only the first is used; it says so
# Exit code: the recipe's (0 ok, 1 a check or data error with its message, 2 a bad option,
# 75 stopped by SIGTERM/SIGINT after saving a checkpoint: rerun the same command to resume).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  echo
  echo "Recipe options (python recipes/sft_memory_diet.py --help):"
  PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || command -v python || command -v python3)}
  exec "$PY" recipes/sft_memory_diet.py --help
fi

PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || command -v python || command -v python3)}
CONFIG=${CONFIG:-recipes/configs/sft_memory_diet.yaml}
if [[ -n "${WORLD_SIZE:-}" && "${WORLD_SIZE}" != "1" ]]; then
  echo "memory_diet.sh: WORLD_SIZE=${WORLD_SIZE} but this recipe is single-device; use launch/multigpu_qlora.sh" >&2
  exit 2
fi
if [[ "${CUDA_VISIBLE_DEVICES:-}" == *,* ]]; then
  echo "memory_diet.sh: CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES} lists several GPUs; this recipe uses only the first" >&2
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}   # never wait on a model hub; asset:* models are built locally
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

cmd=("$PY" recipes/sft_memory_diet.py --config "$CONFIG" "$@")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
