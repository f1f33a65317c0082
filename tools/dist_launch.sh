#!/usr/bin/env bash
# torchrun for one of our tools with mmdet's launcher, shared by
# dist_train.sh and dist_test.sh:
#   bash tools/dist_launch.sh TOOL.py GPUS [tool arguments]
# Several nodes: set NNODES, NODE_RANK, MASTER_ADDR and PORT on each.
set -euo pipefail
TOOL=$1
GPUS=$2
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}" \
exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}" \
    --nproc_per_node="$GPUS" \
    "$HERE/$TOOL" "${@:3}" --launcher pytorch
