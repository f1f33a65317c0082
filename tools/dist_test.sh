#!/usr/bin/env bash
# Multi-GPU evaluation with torchrun, like mmdet's tools/dist_test.sh:
#   bash tools/dist_test.sh CONFIG CHECKPOINT GPUS [tools/test.py options]
# CHECKPOINT may be a packed stage-2 checkpoint (quantized_w4a4.pth).
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: bash tools/dist_test.sh CONFIG CHECKPOINT GPUS" \
        "[test.py options]" >&2
    exit 2
fi
exec bash "$(dirname "$0")/dist_launch.sh" test.py "$3" "$1" "$2" "${@:4}"
