#!/usr/bin/env bash
# Hyperparameter sweep (harnesses/sweep.py): grid, random, TPE or QMC search on an Optuna study, each trial
# a run of recipes/sft_memory_diet.py in its own process and folder, ranked by held-out loss.
#
#   bash launch/sweep.sh [--key value ...]          # extra flags override the config, e.g.
#   bash launch/sweep.sh --space "learning_rate=[1.0e-4, 3.0e-4]" "lora_r=[8, 16]" --trial_args max_steps=16
#   NWORKERS=2 bash launch/sweep.sh ...             # N workers on one study (same flags), one trial each at a time
#   WORKER_GPUS=0,1 NWORKERS=2 bash launch/sweep.sh # worker i sees only GPU i of the list
#   CONFIG=my.yaml bash launch/sweep.sh             # another config file
#   PYTHON=/path/to/python bash launch/sweep.sh     # another interpreter (default: .venv/bin/python, else python)
#
# Started under torchrun (WORLD_SIZE above 1) it refuses: exit 2.
# A worker runs one trial at a time (two on the same GPU or CPU would skew each other's tokens/s and peak
# memory): give each worker its own device. Workers on several nodes: launch/slurm_sweep.sbatch.
# SIGTERM/SIGINT reach every worker and its running trial, which saves a checkpoint; rerun the same
# command to resume. Exit code: 0 at least one trial finished, 1 none did, 2 a bad option, 75 stopped
# by a signal (rerun to resume); with NWORKERS, 75 if any worker stopped, else the first failure.
source "$(dirname "$0")/lib.sh"
help_if_asked harnesses/sweep.py "$@"
one_process "run the sweep as one process; each trial is a single-device run"
NWORKERS=${NWORKERS:-1}
if [[ ! "$NWORKERS" =~ ^[1-9][0-9]*$ ]]; then
  echo "$LAUNCHER_NAME: NWORKERS=$NWORKERS: give a number of workers, 1 or more" >&2
  exit 2
fi
cmd=("$PY" harnesses/sweep.py --config "${CONFIG:-harnesses/configs/sweep.yaml}" "$@")
if [[ "$NWORKERS" == 1 ]]; then
  run "${cmd[@]}"
fi

announce "NWORKERS=$NWORKERS" "${cmd[@]}"
IFS=, read -r -a gpus <<< "${WORKER_GPUS:-}"
pids=()
stop_workers() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap stop_workers TERM INT
for ((i = 0; i < NWORKERS; i++)); do
  if [[ ${#gpus[@]} -gt 0 ]]; then
    CUDA_VISIBLE_DEVICES=${gpus[i % ${#gpus[@]}]} "${cmd[@]}" &
  else
    "${cmd[@]}" &
  fi
  pids+=($!)
  sleep 1   # the first worker creates the study; the others find it
done
final=0
for pid in "${pids[@]}"; do
  wait_through_signals "$pid"
  if [[ "$RC" == 75 ]]; then final=75; elif [[ "$final" == 0 ]]; then final=$RC; fi
done
exit "$final"
