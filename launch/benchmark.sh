#!/usr/bin/env bash
# Performance benchmark (recipes/benchmark.py): the SFT recipe against a plain TRL SFTTrainer script, and MFU.
#
#   bash launch/benchmark.sh [--key value ...]       # extra flags go to the benchmark and override the config
#   CONFIG=recipes/configs/benchmark_llama8b_gpu.yaml bash launch/benchmark.sh   # on an H100/H200
#   PYTHON=/path/to/python bash launch/benchmark.sh  # another interpreter (default: .venv/bin/python from
#                                                    # launch/setup_env.sh, else python on PATH)
#
# Timings are only comparable within one run: run it on an otherwise idle machine, and set
# OMP_NUM_THREADS to pin the thread count (the matmul probe and both contestants inherit it).
# Exit code: 0 ok, 1 a check failed or a contestant failed (its log is in the output dir), 2 a bad option.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || command -v python || command -v python3)}
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  echo
  echo "Benchmark options (python recipes/benchmark.py --help):"
  exec "$PY" recipes/benchmark.py --help
fi
if [[ -n "${WORLD_SIZE:-}" && "${WORLD_SIZE}" != "1" ]]; then
  echo "benchmark.sh: WORLD_SIZE=${WORLD_SIZE}: the benchmark is single-device; start it without torchrun" >&2
  exit 2
fi
CONFIG=${CONFIG:-recipes/configs/benchmark.yaml}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}   # never wait on a model hub; asset:* models are built locally
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

cmd=("$PY" recipes/benchmark.py --config "$CONFIG" "$@")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
