#!/usr/bin/env bash
# Train and report a jointly trained multi-exit ResNet on CIFAR-10.
#
#   bash launch/cifar10.sh [PRESET] [DATA] [WORKDIR] [extra --config.x=y ...]
#
# PRESET: '' (ResNet-18, for a GPU), cpu (ResNet-8, a 2-core CPU) or smoke.
# DATA:   a config data.source, default folder:../shared/data/cifar10.
# Rerunning the same command resumes from the workdir's latest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-}
source=${2:-folder:../shared/data/cifar10}
workdir=${3:-workdirs/cifar10${preset:+_$preset}}
shift $(( $# < 3 ? $# : 3 ))
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$python" -m eejax.main --config "configs/cifar10.py${preset:+:$preset}" \
  --config.data.source="$source" --workdir "$workdir" "$@"
echo "report: $workdir/report.md, plot: $workdir/curve.png"
