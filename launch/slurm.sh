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
# Preemption: SLURM sends SIGTERM to every task before killing it; slkd_jax
# saves a checkpoint at the same step on all processes and exits. Requeue
# the job (`--requeue`, or `scontrol requeue`) and it resumes from the
# workdir. Ask for the signal early enough: `#SBATCH --signal=TERM@120`.
#SBATCH --job-name=slkd_jax
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -euo pipefail

export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true ${XLA_FLAGS:-}"
# Persistent compilation cache: requeued jobs skip most of the compile.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/slkd_jax_xla}"

srun --kill-on-bad-exit=1 python -m slkd_jax.main "$@"
