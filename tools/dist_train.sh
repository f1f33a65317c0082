#!/usr/bin/env bash
# Multi-GPU training with torchrun, like mmdet's tools/dist_train.sh:
#   bash tools/dist_train.sh CONFIG GPUS [tools/train.py options]
# Several nodes: set NNODES, NODE_RANK, MASTER_ADDR and PORT on each.
# Without CUDA the ranks are CPU processes over gloo (used by the tests).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bash tools/dist_train.sh CONFIG GPUS [train.py options]" >&2
    exit 2
fi
exec bash "$(dirname "$0")/dist_launch.sh" train.py "$2" "$1" "${@:3}"
