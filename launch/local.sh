#!/usr/bin/env bash
# Runs N lowlight processes on this machine as one multi-host JAX job (each process gets
# CPU devices; on a multi-GPU box set CUDA_VISIBLE_DEVICES per process instead). Useful to test
# multi-host code paths (per-process data slices, process-0-only logging) without a cluster:
#   launch/local.sh 2 configs/vit_magface.py:smoke /tmp/mp_run
set -euo pipefail
N=${1:?usage: local.sh NUM_PROCESSES CONFIG WORKDIR [flags...]}
CONFIG=${2:?config}
WORKDIR=${3:?workdir}
shift 3
PORT=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < N; i++)); do
  JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i \
    python -m lowlight.main --config="$CONFIG" --workdir="$WORKDIR" --distributed=on "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
