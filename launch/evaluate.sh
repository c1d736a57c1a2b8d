#!/usr/bin/env bash
# Evaluate a model, a base + adapter, or a merged export (recipes/evaluate.py): perplexity, ROUGE, BLEU,
# chrF, exact match / accuracy, keyword accuracy, and the forgetting check against a baseline.
#
#   bash launch/evaluate.sh [--key value ...]      # e.g. --adapter_path runs/my_run/adapter --output_dir runs/my_eval
#   CONFIG=my.yaml bash launch/evaluate.sh         # another config file
#   PYTHON=/path/to/python bash launch/evaluate.sh # another interpreter (default: .venv/bin/python, else python)
#
# Started under torchrun (WORLD_SIZE above 1) it refuses: exit 2.
# Exit code: the recipe's (0 ok, 1 a check or data error with its message, 2 a bad option).
source "$(dirname "$0")/lib.sh"
help_if_asked recipes/evaluate.py "$@"
one_process "evaluation runs in one process"
run "$PY" recipes/evaluate.py --config "${CONFIG:-recipes/configs/evaluate.yaml}" "$@"
