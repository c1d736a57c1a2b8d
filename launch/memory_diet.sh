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
source "$(dirname "$0")/lib.sh"
help_if_asked recipes/sft_memory_diet.py "$@"
one_process "this recipe is single-device; use launch/multigpu_qlora.sh"
first_gpu_only
run "$PY" recipes/sft_memory_diet.py --config "${CONFIG:-recipes/configs/sft_memory_diet.yaml}" "$@"
