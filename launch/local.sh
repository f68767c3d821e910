#!/usr/bin/env bash
# Start N slkd_jax processes on this machine, joined by jax.distributed on
# localhost: the multi-host code path without a cluster (tests, debugging).
#
#   launch/local.sh N [python -m slkd_jax.main flags...]
#   e.g. SLKD_LOCAL_DEVICES=2 launch/local.sh 2 \
#          --config=configs/quickstart.py --workdir=/tmp/slkd_2proc
#
# Each process gets SLKD_LOCAL_DEVICES fake CPU devices (default 1), so the
# global mesh has N × SLKD_LOCAL_DEVICES devices. SIGTERM/SIGINT are forwarded
# to every process (each saves a checkpoint and stops at the same step).
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: $0 NUM_PROCESSES [slkd_jax.main flags...]" >&2
  exit 2
fi
num_processes=$1
shift
devices=${SLKD_LOCAL_DEVICES:-1}
port=${SLKD_PORT:-$((20000 + RANDOM % 20000))}
python=${PYTHON:-python}

pids=()
forward() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap forward TERM INT

for ((i = 0; i < num_processes; i++)); do
  SLKD_COORDINATOR="localhost:${port}" SLKD_NUM_PROCESSES="$num_processes" \
  SLKD_PROCESS_ID="$i" JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=${devices} ${XLA_FLAGS:-}" \
    "$python" -m slkd_jax.main "$@" &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  # `wait` returns early when a trapped signal arrives: wait again.
  while true; do
    if wait "$pid"; then break; fi
    code=$?
    if kill -0 "$pid" 2>/dev/null; then continue; fi
    status=$code
    break
  done
done
exit "$status"
