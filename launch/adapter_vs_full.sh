#!/usr/bin/env bash
# Full fine-tuning vs LoRA vs bottleneck adapters vs QLoRA (harnesses/adapter_vs_full.py), one process per method.
#
#   bash launch/adapter_vs_full.sh [--key value ...]      # extra flags go to the harness and override the config
#   CONFIG=my.yaml bash launch/adapter_vs_full.sh         # another config file
#   PYTHON=/path/to/python bash launch/adapter_vs_full.sh # another interpreter (default: .venv/bin/python from
#                                                         # launch/setup_env.sh, else python on PATH)
#
# Single device: every method runs on the first GPU, or on the CPU when there is none.
# Started under torchrun (WORLD_SIZE above 1) it refuses: exit 2.
# Exit code: 0 when every method finished, 1 when one failed (the table is written anyway, with its
# error) or a check failed, 2 for a bad option, 75 stopped by SIGTERM/SIGINT (passed on to the running method;
# rerun the same command: finished methods are reused).
source "$(dirname "$0")/lib.sh"
help_if_asked harnesses/adapter_vs_full.py "$@"
one_process "this harness is single-device"
first_gpu_only
run "$PY" harnesses/adapter_vs_full.py --config "${CONFIG:-harnesses/configs/adapter_vs_full.yaml}" "$@"
