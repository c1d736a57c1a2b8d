#!/usr/bin/env bash
# The memory ladder (harnesses/memory_ladder.py): one memory technique added per rung, one process per rung.
#
#   bash launch/memory_ladder.sh [--key value ...]      # extra flags go to the harness and override the config
#   CONFIG=my.yaml bash launch/memory_ladder.sh         # another config file
#   PYTHON=/path/to/python bash launch/memory_ladder.sh # another interpreter (default: .venv/bin/python from
#                                                       # launch/setup_env.sh, else python on PATH)
#
# Single device: every rung runs on the first GPU, or on the CPU when there is none.
# Started under torchrun (WORLD_SIZE above 1) it refuses: exit 2.
# Exit code: 0 when every rung finished or was skipped, 1 when one failed (the table is written anyway, with its
# error) or a check failed, 2 for a bad option, 75 stopped by SIGTERM/SIGINT (passed on to the running rung;
# rerun the same command: finished rungs are reused).
source "$(dirname "$0")/lib.sh"
help_if_asked harnesses/memory_ladder.py "$@"
one_process "this harness is single-device"
first_gpu_only
run "$PY" harnesses/memory_ladder.py --config "${CONFIG:-harnesses/configs/memory_ladder.yaml}" "$@"
