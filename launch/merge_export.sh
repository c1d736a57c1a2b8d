#!/usr/bin/env bash
# Merge a LoRA/QLoRA adapter into its base and export it (recipes/merge_export.py): a merged HF folder
# (vLLM/TGI/lm-eval), the adapter alone, and with the export extra (bash launch/setup_export.sh) GGUF files
# from llama.cpp's own converter and quantizer plus an Ollama Modelfile, each checked in llama.cpp.
#
#   bash launch/merge_export.sh [--key value ...]      # e.g. --adapter_path runs/my_run/adapter --output_dir runs/my_export
#   CONFIG=my.yaml bash launch/merge_export.sh         # another config file
#   PYTHON=/path/to/python bash launch/merge_export.sh # another interpreter (default: .venv/bin/python, else python)
#
# Exit code: the recipe's (0 exported and verified, 1 a refusal, a data error or a verification beyond
# tolerance, with its message; 2 a bad option).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || command -v python || command -v python3)}
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  echo
  echo "Recipe options (python recipes/merge_export.py --help):"
  exec "$PY" recipes/merge_export.py --help
fi

CONFIG=${CONFIG:-recipes/configs/merge_export.yaml}
if [[ -n "${WORLD_SIZE:-}" && "${WORLD_SIZE}" != "1" ]]; then
  echo "merge_export.sh: WORLD_SIZE=${WORLD_SIZE} but merging runs in one process" >&2
  exit 2
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}   # never wait on a model hub; asset:* models are built locally
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

cmd=("$PY" recipes/merge_export.py --config "$CONFIG" "$@")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
