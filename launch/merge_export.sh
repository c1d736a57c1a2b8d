#!/usr/bin/env bash
# Merge a LoRA/QLoRA adapter into its base and export it (recipes/merge_export.py): a merged HF folder
# (vLLM/TGI/lm-eval), the adapter alone, and with the export extra (bash launch/setup_export.sh) GGUF files
# from llama.cpp's own converter and quantizer plus an Ollama Modelfile, each checked in llama.cpp.
#
#   bash launch/merge_export.sh [--key value ...]      # e.g. --adapter_path runs/my_run/adapter --output_dir runs/my_export
#   CONFIG=my.yaml bash launch/merge_export.sh         # another config file
#   PYTHON=/path/to/python bash launch/merge_export.sh # another interpreter (default: .venv/bin/python, else python)
#
# Started under torchrun (WORLD_SIZE above 1) it refuses: exit 2.
# Exit code: the recipe's (0 exported and verified, 1 a refusal, a data error or a verification beyond
# tolerance, with its message; 2 a bad option).
source "$(dirname "$0")/lib.sh"
help_if_asked recipes/merge_export.py "$@"
one_process "merging runs in one process"
run "$PY" recipes/merge_export.py --config "${CONFIG:-recipes/configs/merge_export.yaml}" "$@"
