#!/usr/bin/env bash
# Performance benchmark (harnesses/benchmark.py): the SFT recipe against a plain TRL SFTTrainer script, and MFU.
#
#   bash launch/benchmark.sh [--key value ...]       # extra flags go to the benchmark and override the config
#   CONFIG=harnesses/configs/benchmark_llama8b_gpu.yaml bash launch/benchmark.sh   # on an H100/H200
#   PYTHON=/path/to/python bash launch/benchmark.sh  # another interpreter (default: .venv/bin/python from
#                                                    # launch/setup_env.sh, else python on PATH)
#
# Timings are only comparable within one run: run it on an otherwise idle machine, and set
# OMP_NUM_THREADS to pin the thread count (the matmul probe and both contestants inherit it).
# Started under torchrun (WORLD_SIZE above 1) it refuses: exit 2.
# Exit code: 0 ok, 1 a check failed or a contestant failed (its log is in the output dir), 2 a bad option,
# 75 stopped by SIGTERM/SIGINT (passed on to the running contestant; rerun with a new --output_dir).
source "$(dirname "$0")/lib.sh"
help_if_asked harnesses/benchmark.py "$@"
one_process "the benchmark is single-device; start it without torchrun"
run "$PY" harnesses/benchmark.py --config "${CONFIG:-harnesses/configs/benchmark.yaml}" "$@"
