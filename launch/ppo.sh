#!/usr/bin/env bash
# PPO / GRPO (recipes/ppo.py) with TRL: LoRA policy (reference = adapter-disabled policy), one GPU or the CPU.
#
#   bash launch/ppo.sh [--key value ...]      # extra flags go to the recipe and override the config
#   CONFIG=my.yaml bash launch/ppo.sh         # another config file
#   PYTHON=/path/to/python bash launch/ppo.sh # another interpreter (default: .venv/bin/python from
#                                             # launch/setup_env.sh, else python on PATH)
#
# Failure modes it catches before the recipe starts:
#   - more than one process: this recipe is single-device
#   - CUDA_VISIBLE_DEVICES listing several GPUs: only the first is used; it says so
# Exit code: the recipe's (0 ok, 1 a check or data error with its message, 2 a bad option).
source "$(dirname "$0")/lib.sh"
help_if_asked recipes/ppo.py "$@"
one_process "this recipe is single-device"
first_gpu_only
run "$PY" recipes/ppo.py --config "${CONFIG:-recipes/configs/ppo.yaml}" "$@"
