#!/usr/bin/env bash
# Multi-host GPU training under SLURM: one process per GPU.
#
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 \
#     launch/slurm.sh --config=configs/imagenet.py --workdir=/shared/runs/r34_r18
#
# srun starts one task per GPU; jax.distributed.initialize() auto-detects the
# coordinator, process count and process id from SLURM's environment, and
# each process drives the GPU SLURM bound to it. The global batch in the
# config is split over all GPUs of all nodes; --workdir must be on a shared
# filesystem (every process writes its checkpoint shards there).
#
# One process per node instead (each driving all of its node's GPUs):
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 launch/slurm.sh ...
# JAX's SLURM detection handles both layouts.
#
# Preemption and time limits: SLURM sends SIGTERM to every task before
# killing it (`--signal=TERM@120`: 120 s before the time limit, enough to
# write a checkpoint); slkd_jax saves a checkpoint at the same step on all
# processes and exits with status 75 (EX_TEMPFAIL,
# slkd_jax.train.PREEMPTED_EXIT_CODE). When srun reports 75 this script runs
# `scontrol requeue "$SLURM_JOB_ID"`: the job goes back to the queue with the
# same arguments and resumes from the checkpoints in --workdir. Any other
# non-zero status (a crash) is passed on without requeueing, so a failing run
# does not loop; status 0 (finished) ends the job.
#
# Caveat: with --kill-on-bad-exit=1 srun stops the other tasks as soon as one
# exits non-zero; if it signals a task that had not yet exited 75 itself,
# srun reports 128 + signal instead of 75 and the job is not requeued
# (rerun it by hand; it still resumes from --workdir).
#SBATCH --job-name=slkd_jax
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -euo pipefail

export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true ${XLA_FLAGS:-}"
# Persistent compilation cache: requeued jobs skip most of the compile.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/slkd_jax_xla}"

readonly PREEMPTED=75  # slkd_jax.train.PREEMPTED_EXIT_CODE

# `|| status=$?` keeps `set -e` from ending the script before the check.
status=0
srun --kill-on-bad-exit=1 python -m slkd_jax.main "$@" || status=$?

if ((status == PREEMPTED)); then
  if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "$0: preempted (status 75) outside a SLURM job: not requeued" >&2
  else
    echo "$0: preempted (status 75): requeueing job $SLURM_JOB_ID" >&2
    # A failed requeue must not hide the preemption status below.
    scontrol requeue "$SLURM_JOB_ID" ||
      echo "$0: scontrol requeue $SLURM_JOB_ID failed" >&2
  fi
fi
exit "$status"
