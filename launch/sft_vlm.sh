#!/usr/bin/env bash
# LoRA/QLoRA SFT of a vision-language model (recipes/sft_vlm.py) on one GPU, or on the CPU when there is none.
#
#   bash launch/sft_vlm.sh [--key value ...]      # extra flags go to the recipe and override the config
#   CONFIG=my.yaml bash launch/sft_vlm.sh         # another config file
#   PYTHON=/path/to/python bash launch/sft_vlm.sh # another interpreter (default: .venv/bin/python from
#                                                 # launch/setup_env.sh, else python on PATH)
#
# Default: asset:smollm2_vlm (built offline) learns the generated shapes set; held-out accuracy before and
# after in runs/sft_vlm/metrics.json. Failure modes it catches before the recipe starts:
#   - more than one process: this recipe is single-device
#   - CUDA_VISIBLE_DEVICES listing several GPUs: only the first is used; it says so
# Exit code: the recipe's (0 ok, 1 a check or data error with its message, 2 a bad option,
# 75 stopped by SIGTERM/SIGINT after saving a checkpoint: rerun the same command to resume).
source "$(dirname "$0")/lib.sh"
help_if_asked recipes/sft_vlm.py "$@"
one_process "this recipe is single-device"
first_gpu_only
run "$PY" recipes/sft_vlm.py --config "${CONFIG:-recipes/configs/sft_vlm.yaml}" "$@"
