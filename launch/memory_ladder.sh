#!/usr/bin/env bash
# The memory ladder (recipes/memory_ladder.py): one memory technique added per rung, one process per rung.
#
#   bash launch/memory_ladder.sh [--key value ...]      # extra flags go to the recipe and override the config
#   CONFIG=my.yaml bash launch/memory_ladder.sh         # another config file
#   PYTHON=/path/to/python bash launch/memory_ladder.sh # another interpreter (default: .venv/bin/python from
#                                                       # launch/setup_env.sh, else python on PATH)
#
# Single device: every rung runs on the first GPU, or on the CPU when there is none.
# Exit code: 0 when every rung finished or was skipped, 1 when one failed (the table is written anyway, with its
# error) or a check failed, 2 for a bad option.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || command -v python || command -v python3)}
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  echo
  echo "Recipe options (python recipes/memory_ladder.py --help):"
  exec "$PY" recipes/memory_ladder.py --help
fi
if [[ -n "${WORLD_SIZE:-}" && "${WORLD_SIZE}" != "1" ]]; then
  echo "memory_ladder.sh: WORLD_SIZE=${WORLD_SIZE} but this recipe is single-device" >&2
  exit 2
fi
if [[ "${CUDA_VISIBLE_DEVICES:-}" == *,* ]]; then
  echo "memory_ladder.sh: CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES} lists several GPUs; this recipe uses only the first" >&2
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}   # never wait on a model hub; asset:* models are built locally
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

CONFIG=${CONFIG:-recipes/configs/memory_ladder.yaml}
cmd=("$PY" recipes/memory_ladder.py --config "$CONFIG" "$@")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
