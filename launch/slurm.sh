#!/usr/bin/env bash
# slkd_jax under SLURM: one process per GPU. Submit from the repository root
# (the job runs in the submission directory).
#
# One GPU, one CIFAR-100 run (the log: slurm-<jobid>.out, or --output):
#   sbatch --gpus=1 launch/slurm.sh --config=configs/cifar100.py \
#     --workdir=/shared/runs/r32x4_r8x4
#
# Multi-host (ImageNet):
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 \
#     launch/slurm.sh --config=configs/imagenet.py --workdir=/shared/runs/r34_r18
#
# A paper table split over a job array, one GPU per job (SLKD_MODULE picks
# the command; in an array each job gets --shard=<task - first task>/<tasks>
# unless the arguments give --shard; use a contiguous --array such as 0-3):
#   SLKD_MODULE=slkd_jax.table sbatch --array=0-3 --gpus=1 launch/slurm.sh \
#     --config=configs/tables/slkd_table1.py --workdir=/shared/runs/table1
# then, once every job has ended, gather table.md (a dry run trains nothing):
#   python -m slkd_jax.table --config=configs/tables/slkd_table1.py \
#     --workdir=/shared/runs/table1 --dry_run --nomeasure
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
# same arguments and resumes from the checkpoints in --workdir; the log is
# appended to (`--open-mode=append`), not truncated, by the requeued job. Any
# other non-zero status (a crash) is passed on without requeueing, so a
# failing run does not loop; status 0 (finished) ends the job.
#
# Caveat: with --kill-on-bad-exit=1 srun stops the other tasks as soon as one
# exits non-zero; if it signals a task that had not yet exited 75 itself,
# srun reports 128 + signal instead of 75 and the job is not requeued
# (rerun it by hand; it still resumes from --workdir).
#
# Site settings: remove one '#' of a '##SBATCH' line below to make it a
# directive, with your values (or give them to sbatch on the command line).
#SBATCH --job-name=slkd_jax
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
##SBATCH --partition=PARTITION
##SBATCH --time=HH:MM:SS
##SBATCH --output=LOGDIR/%x-%j.out
set -euo pipefail

# >>> Environment: the virtualenv at $SLKD_VENV (default .venv), if there
# is one; otherwise the python on PATH. Replace with your site's setup
# (module load ..., conda activate ...) if it differs.
venv="${SLKD_VENV:-.venv}"
if [[ -f "$venv/bin/activate" ]]; then
  set +u  # activate scripts may read unset variables
  # shellcheck disable=SC1091
  source "$venv/bin/activate"
  set -u
fi
# <<< Environment

export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true ${XLA_FLAGS:-}"
# Persistent compilation cache: requeued jobs skip most of the compile.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/slkd_jax_xla}"

readonly PREEMPTED=75  # slkd_jax.train.PREEMPTED_EXIT_CODE
module="${SLKD_MODULE:-slkd_jax.main}"

args=("$@")
if [[ "$module" == slkd_jax.table && -n "${SLURM_ARRAY_TASK_ID:-}" ]] &&
   ! [[ " $* " =~ " --shard" ]]; then
  first="${SLURM_ARRAY_TASK_MIN:-0}"
  args+=("--shard=$((SLURM_ARRAY_TASK_ID - first))/${SLURM_ARRAY_TASK_COUNT:?}")
fi

# `|| status=$?` keeps `set -e` from ending the script before the check.
status=0
srun --kill-on-bad-exit=1 python -m "$module" ${args[@]+"${args[@]}"} || status=$?

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
