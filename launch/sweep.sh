#!/usr/bin/env bash
# Hyperparameter sweep (harnesses/sweep.py): grid or random search, each trial a run of
# recipes/sft_memory_diet.py in its own process and folder, ranked by held-out loss.
#
#   bash launch/sweep.sh [--key value ...]          # extra flags override the config, e.g.
#   bash launch/sweep.sh --space "learning_rate=[1.0e-4, 3.0e-4]" "lora_r=[8, 16]" --trial_args max_steps=16
#   CONFIG=my.yaml bash launch/sweep.sh             # another config file
#   PYTHON=/path/to/python bash launch/sweep.sh     # another interpreter (default: .venv/bin/python, else python)
#
# Started under torchrun (WORLD_SIZE above 1) it refuses: exit 2.
# Trials run one at a time on one device (two on the same GPU or CPU would skew each other's
# tokens/s and peak memory). SIGTERM/SIGINT reach the running trial, which saves a checkpoint;
# rerun the same command to resume. Exit code: 0 at least one trial finished, 1 none did,
# 2 a bad option, 75 stopped by a signal (rerun to resume).
source "$(dirname "$0")/lib.sh"
help_if_asked harnesses/sweep.py "$@"
one_process "run the sweep as one process; each trial is a single-device run"
run "$PY" harnesses/sweep.py --config "${CONFIG:-harnesses/configs/sweep.yaml}" "$@"
