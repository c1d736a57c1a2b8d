# What every launcher in this folder shares; sourced (`source "$(dirname "$0")/lib.sh"`), never run.
#
# After it: the working directory is the repository root, PY is the interpreter (PYTHON, else the
# .venv that launch/setup_env.sh builds, else python or python3 on PATH), the hub is offline unless the
# caller says otherwise, and these functions exist:
#   help_if_asked SCRIPT "$@"   -h/--help: the launcher's header comment, then `SCRIPT --help`; exit 0
#   one_process REASON          WORLD_SIZE set above 1 (started under torchrun): REASON on stderr, exit 2
#   first_gpu_only              CUDA_VISIBLE_DEVICES lists several GPUs: say that only the first is used
#   announce CMD...             echo `+ CMD` on stderr; with DRY_RUN=1 stop there (exit 0)
#   run CMD...                  announce CMD, then exec it
#   wait_through_signals PID    wait for PID even when trapped signals interrupt `wait`; its exit code in RC
set -euo pipefail
LAUNCHER_PATH=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")   # absolute: the header is read after the cd
LAUNCHER_NAME=$(basename "$0")
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
else
  PY=$(command -v python || command -v python3 || echo python3)
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}   # never wait on a model hub; asset:* models are built locally
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}   # no fork warning from each DataLoader worker

help_if_asked() {
  local script=$1
  shift
  [[ "${1:-}" == -h || "${1:-}" == --help ]] || return 0
  awk 'NR > 1 && !/^#/ {exit} NR > 1' "$LAUNCHER_PATH" | sed 's/^# \{0,1\}//'
  echo
  echo "Options of $script (python $script --help):"
  exec "$PY" "$script" --help
}

one_process() {
  if [[ -n "${WORLD_SIZE:-}" && "$WORLD_SIZE" != 1 ]]; then
    echo "$LAUNCHER_NAME: WORLD_SIZE=$WORLD_SIZE: $1" >&2
    exit 2
  fi
}

first_gpu_only() {
  if [[ "${CUDA_VISIBLE_DEVICES:-}" == *,* ]]; then
    echo "$LAUNCHER_NAME: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES lists several GPUs; this recipe uses only the first" >&2
  fi
}

announce() {
  echo "+ $*" >&2
  [[ "${DRY_RUN:-0}" == 0 ]] || exit 0
}

run() {
  announce "$@"
  exec "$@"
}

wait_through_signals() {
  RC=0
  wait "$1" || RC=$?
  while kill -0 "$1" 2>/dev/null; do   # `wait` returned early because a trapped signal arrived
    RC=0
    wait "$1" || RC=$?
  done
}
