#!/usr/bin/env bash
# Data-parallel QLoRA SFT (recipes/sft_multigpu_qlora.py) on every GPU of every node, or on NPROC CPU
# processes (gloo) when there is no GPU. Uses torchrun, not `accelerate launch --cpu` (that one silently
# starts a single process).
#
#   bash launch/multigpu_qlora.sh [--key value ...]     # extra flags go to the recipe
#   NPROC=4 bash launch/multigpu_qlora.sh                # processes per node (default: visible GPUs, else 2)
#   SHARDING=zero3 bash launch/multigpu_qlora.sh         # ddp (default) | fsdp (GPU) | zero2 | zero3 (CPU offload)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash launch/multigpu_qlora.sh   # node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash launch/multigpu_qlora.sh   # node 1
#   CONFIG=my.yaml PYTHON=/path/to/python               # another config / interpreter (default .venv/bin/python)
#   LAUNCHER=accelerate SHARDING=zero2 bash launch/multigpu_qlora.sh   # GPUs: `accelerate launch` with
#                                        # launch/configs/accelerate_<ddp|fsdp2|zero2|zero3_offload>.yaml
#   ACCELERATE_CONFIG=my_accelerate.yaml bash launch/multigpu_qlora.sh # your own accelerate config (implies
#                                        # LAUNCHER=accelerate; keep SHARDING matching it)
#   DRY_RUN=1 bash launch/multigpu_qlora.sh              # print the command it would run, start nothing
#
# Caught before training (exit 1 with the fix): fewer GPUs visible than NPROC; LAUNCHER=accelerate
# without GPUs; a world size other than NPROC x NNODES; ranks reading different data; a model spread by
# device_map="auto"; bf16 on hardware without it. When a rank fails, torchrun stops the others and the
# script ends with one line naming the rank that failed first, its exit code (the script's own exit code),
# its error and its log file; each rank's stdout.log/stderr.log are kept under LOG_DIR (default
# <output_dir>.logs/node<NODE_RANK>). That report and the logs are the torchrun launcher's, not accelerate's.
# Preemption: SIGTERM/SIGINT to this script reaches every rank (via torchrun); they save a checkpoint
# after the current step and the script exits 75 ("requeue": the SLURM template requeues on it; a
# rerun resumes). SHUTDOWN_TIMEOUT (default 600 s) is how long torchrun waits for that save before
# SIGKILL; keep it below your scheduler's grace time. Exit 2: an unknown LAUNCHER or SHARDING.
source "$(dirname "$0")/lib.sh"
help_if_asked recipes/sft_multigpu_qlora.py "$@"

GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
NPROC=${NPROC:-$([[ "$GPUS" -gt 0 ]] && echo "$GPUS" || echo 2)}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
SHARDING=${SHARDING:-ddp}
CONFIG=${CONFIG:-recipes/configs/sft_multigpu_qlora.yaml}
LAUNCHER=${LAUNCHER:-$([[ -n "${ACCELERATE_CONFIG:-}" ]] && echo accelerate || echo torchrun)}

if [[ "$GPUS" -gt 0 && "$NPROC" -gt "$GPUS" ]]; then
  echo "multigpu_qlora.sh: NPROC=$NPROC but only $GPUS GPU(s) are visible (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset})." >&2
  echo "  Fix: NPROC=$GPUS, or request/expose more GPUs for this job." >&2
  exit 1
fi
DEVICE=$([[ "$GPUS" -gt 0 ]] && echo cuda || echo cpu)
if [[ "$DEVICE" == cpu ]]; then
  # split the cores between the processes instead of oversubscribing them
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi
recipe=(recipes/sft_multigpu_qlora.py --config "$CONFIG" --device "$DEVICE" --sharding "$SHARDING"
        --expected_world_size $(( NPROC * NNODES )) "$@")

case "$LAUNCHER" in
  torchrun)
    # Per-rank logs: torchrun writes each rank's stdout/stderr to LOG_DIR and tees them here ([rankN]: prefix);
    # common.distributed runs torchrun and, if ranks fail, prints the one line naming the first.
    OUTPUT_DIR=""
    prev=""
    for arg in "$@"; do
      [[ "$prev" == --output_dir || "$prev" == --output-dir ]] && OUTPUT_DIR=$arg
      case "$arg" in --output_dir=*|--output-dir=*) OUTPUT_DIR=${arg#*=} ;; esac
      prev=$arg
    done
    if [[ -z "$OUTPUT_DIR" && -f "$CONFIG" ]]; then
      OUTPUT_DIR=$(sed -n 's/^output_dir:[[:space:]]*\([^#[:space:]]*\).*/\1/p' "$CONFIG" | tail -n 1)
    fi
    OUTPUT_DIR=${OUTPUT_DIR:-runs/sft_multigpu_qlora}
    LOG_DIR=${LOG_DIR:-${OUTPUT_DIR%/}.logs/node$NODE_RANK}
    export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}   # rank output reaches its log file (and this console) as printed
    export TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE=${TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE:-'[rank${rank}]:'}
    cmd=("$PY" -m common.distributed --report_as multigpu_qlora.sh
         --nnodes "$NNODES" --nproc_per_node "$NPROC" --node_rank "$NODE_RANK"
         --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --shutdown_timeout "${SHUTDOWN_TIMEOUT:-600}"
         --log_dir "$LOG_DIR" --redirects 3 --tee 3 "${recipe[@]}") ;;
  accelerate)
    case "$SHARDING" in
      ddp|zero2) yaml=accelerate_$SHARDING.yaml ;;
      fsdp) yaml=accelerate_fsdp2.yaml ;;
      zero3) yaml=accelerate_zero3_offload.yaml ;;
      *) echo "multigpu_qlora.sh: SHARDING=$SHARDING: use ddp, fsdp, zero2 or zero3" >&2; exit 2 ;;
    esac
    # the YAMLs say 8 processes on one machine; the topology here overrides them
    cmd=("$PY" -m accelerate.commands.launch --config_file "${ACCELERATE_CONFIG:-launch/configs/$yaml}"
         --num_machines "$NNODES" --num_processes $(( NPROC * NNODES )) --machine_rank "$NODE_RANK"
         --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" "${recipe[@]}") ;;
  *) echo "multigpu_qlora.sh: LAUNCHER=$LAUNCHER: use torchrun (the default) or accelerate" >&2; exit 2 ;;
esac
announce "${cmd[@]}"
if [[ "$LAUNCHER" == accelerate && "$DEVICE" == cpu ]]; then
  echo "multigpu_qlora.sh: LAUNCHER=accelerate is for GPUs (its configs set bf16 and GPU backends) and none is visible." >&2
  echo "  Fix: leave LAUNCHER and ACCELERATE_CONFIG unset; torchrun starts NPROC CPU processes (gloo)." >&2
  exit 1
fi

# torchrun reports any failed worker as exit 1, so the ranks' "saved, requeue me" (75) comes back through
# a file (common.checkpoints.exit_for_requeue). Signals are forwarded to the launcher, which passes them on.
FT_EXIT_STATUS_FILE=$(mktemp "${TMPDIR:-/tmp}/ft-exit-status.XXXXXX")
export FT_EXIT_STATUS_FILE
trap 'rm -f "$FT_EXIT_STATUS_FILE"' EXIT
"${cmd[@]}" &
pid=$!
trap 'echo "multigpu_qlora.sh: signal received: ranks save a checkpoint after this step, then exit 75" >&2
      kill -TERM "$pid" 2>/dev/null || true' TERM INT
wait_through_signals "$pid"
if grep -qx 75 "$FT_EXIT_STATUS_FILE" 2>/dev/null; then
  echo "multigpu_qlora.sh: stopped by a signal after a validated checkpoint; exit 75 (requeue; rerun to resume)" >&2
  exit 75
fi
exit "$RC"
