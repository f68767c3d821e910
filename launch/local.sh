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
#
# Failures: a process that dies leaves the others blocked in a collective
# forever, so on the first non-zero exit the script stops the rest (SIGTERM to
# each process group, SIGKILL after SLKD_KILL_GRACE seconds, default 10) and
# exits with that first status. Exit 75 (EX_TEMPFAIL, a preempted run that
# saved its checkpoint) is expected from every process at about the same time,
# so the others get SLKD_KILL_GRACE seconds to exit on their own first; the
# script then exits 75 and rerunning the same command resumes.
#
# PYTHON (default: python) is the interpreter that runs slkd_jax.main.
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
grace=${SLKD_KILL_GRACE:-10}
readonly PREEMPTED=75  # slkd_jax.train.PREEMPTED_EXIT_CODE

# Job control puts every background process in its own process group (pgid =
# its pid), so stopping one also stops whatever it started.
set -m

pids=()
forward() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap forward TERM INT

# signal_groups SIGNAL PID...: send SIGNAL to the process group of each PID.
signal_groups() {
  local sig=$1 pid
  shift
  for pid in "$@"; do kill "-$sig" -- "-$pid" 2>/dev/null || true; done
}

for ((i = 0; i < num_processes; i++)); do
  SLKD_COORDINATOR="localhost:${port}" SLKD_NUM_PROCESSES="$num_processes" \
  SLKD_PROCESS_ID="$i" JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=${devices} ${XLA_FLAGS:-}" \
    "$python" -m slkd_jax.main "$@" &
  pids+=($!)
done

# Poll rather than `wait`: `wait` returns early on every trapped signal and
# cannot tell which child ended, and the loop must also enforce a deadline.
status=0
deadline=  # set at the first failure: when the survivors get SIGKILL
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  alive=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then alive+=("$pid"); continue; fi
    code=0
    wait "$pid" || code=$?
    if ((code != 0 && status == 0)); then
      status=$code
      deadline=$((SECONDS + grace))
      if ((code != PREEMPTED)); then
        echo "$0: process $pid exited with status $code; stopping the" \
             "others" >&2
        signal_groups TERM "${pids[@]}"
      fi
    fi
  done
  running=(${alive[@]+"${alive[@]}"})
  ((${#running[@]} > 0)) || break
  if [[ -n "$deadline" ]] && ((SECONDS >= deadline)); then
    echo "$0: processes ${running[*]} still running ${grace}s after the" \
         "first failure; killing them" >&2
    signal_groups KILL "${running[@]}"
    deadline=$((SECONDS + grace))  # reap them; repeat the kill if need be
  fi
  sleep 0.2
done
exit "$status"
