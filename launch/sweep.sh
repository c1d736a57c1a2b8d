#!/usr/bin/env bash
# Hyperparameter sweep (recipes/sweep.py): grid or random search, each trial a run of
# recipes/sft_memory_diet.py in its own process and folder, ranked by held-out loss.
#
#   bash launch/sweep.sh [--key value ...]          # extra flags override the config, e.g.
#   bash launch/sweep.sh --space "learning_rate=[1.0e-4, 3.0e-4]" "lora_r=[8, 16]" --trial_args max_steps=16
#   CONFIG=my.yaml bash launch/sweep.sh             # another config file
#   PYTHON=/path/to/python bash launch/sweep.sh     # another interpreter (default: .venv/bin/python, else python)
#
# Trials run one at a time on one device (two on the same GPU or CPU would skew each other's
# tokens/s and peak memory). SIGTERM/SIGINT reach the running trial, which saves a checkpoint;
# rerun the same command to resume. Exit code: 0 at least one trial finished, 1 none did,
# 2 a bad option, 75 stopped by a signal (rerun to resume).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || command -v python || command -v python3)}
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  echo
  echo "Sweep options (python recipes/sweep.py --help):"
  exec "$PY" recipes/sweep.py --help
fi

CONFIG=${CONFIG:-recipes/configs/sweep.yaml}
if [[ -n "${WORLD_SIZE:-}" && "${WORLD_SIZE}" != "1" ]]; then
  echo "sweep.sh: WORLD_SIZE=${WORLD_SIZE}: run the sweep as one process; each trial is a single-device run" >&2
  exit 2
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}   # never wait on a model hub; asset:* models are built locally
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

cmd=("$PY" recipes/sweep.py --config "$CONFIG" "$@")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
