#!/bin/bash
# One training run as a SLURM batch job that survives pre-emption and its time limit:
#
#   sbatch scripts/sbatch_train.sh [train overrides...]
#   sbatch --time=24:00:00 --partition=gpu --gpus-per-node=1 --cpus-per-task=8 scripts/sbatch_train.sh model=unet
#   sbatch --ntasks-per-node=4 --gpus-per-node=4 scripts/sbatch_train.sh trainer=ddp trainer.devices=4   # DDP
#
# The run dir is outputs/slurm/<job id> (relative to the folder you submit from), the log slurm-<job id>.out.
# 120 s before the time limit SLURM sends USR1: the run saves last.ckpt at the next step and requeues the job.
# Pre-emption (or `scontrol requeue <job id>`) sends SIGTERM: the run saves last.ckpt and SLURM requeues it.
# Either way the requeued job resumes from outputs/slurm/<job id>/checkpoints/last.ckpt by itself.
# Set GLINT_PYTHON to the python of your environment if `python` is not it.
#SBATCH --job-name=glint-train
#SBATCH --ntasks-per-node=1
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail
# srun: every task gets SLURM's variables (Lightning's SLURM environment: ranks, DDP) and the USR1 signal.
srun "${GLINT_PYTHON:-python}" -m glint_lightning.train "$@"
