#!/usr/bin/env bash
# eejax on a SLURM cluster: one process per GPU (the default) or one per node, the same command on each.
#
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 launch/slurm.sh \
#       --config configs/cifar10.py --workdir /shared/runs/cifar10
#   EEJAX_TASK=node sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 launch/slurm.sh \
#       --config configs/cifar10.py --workdir /shared/runs/cifar10
#
# JAX finds the job in SLURM's variables (--config.distributed=True): the coordinator is the first node of the
# step, on a port derived from the job id (JAX_COORDINATOR_PORT overrides it). One process per GPU: every task
# must see all GPUs of its node (--gpus-per-node, not --gpus-per-task); JAX gives task SLURM_LOCALID its GPU.
# One process per node: JAX_LOCAL_DEVICE_IDS lists every GPU of the node. The workdir must be on a file system
# every node shares. train.batch_size is the global batch, whatever the number of processes.
# Submitting the same command again resumes from the last checkpoint; srun ends every task when one fails.
# PYTHON (default .venv/bin/python) is the interpreter with eejax installed.
#SBATCH --job-name=eejax
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON="${PYTHON:-.venv/bin/python}"
case "${EEJAX_TASK:-gpu}" in
  gpu) ;;
  node)
    gpus="${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
    [ "$gpus" -ge 1 ] || { echo "slurm.sh: EEJAX_TASK=node found no GPU on this node (SLURM_GPUS_ON_NODE)" >&2; exit 2; }
    export JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((gpus - 1)))" ;;
  *) echo "slurm.sh: EEJAX_TASK must be gpu (one process per GPU) or node (one per node)" >&2; exit 2 ;;
esac
exec srun --kill-on-bad-exit=1 "$PYTHON" -m eejax.main "$@" --config.distributed=True
