#!/usr/bin/env bash
# GPU throughput measurement (issue 13): the three modes of `stainbridge bench throughput` on one
# GPU with the reference CycleGAN generator at 256 px (preset "full": ngf 64, 9 blocks) and a
# ResNet-18 at 256 px, bf16 autocast and channels_last (what models/inference.py does on CUDA),
# torch.compile for the in-process pipeline (eager when compiling fails; the JSON's "compile" says
# which). Prints the JSON at the end.
#
#   models/bench/gpu_throughput.sh [IMAGES] [OUT.json]
#
# Environment: SB (the stainbridge command, default .venv/bin/stainbridge), DEVICE (cuda),
# PRESET (full), BATCH (64), MODES (naive,pipeline,service), COMPILE (1; 0 for eager only).
# On a CPU, for a smoke test: DEVICE=cpu PRESET=tiny BATCH=4 models/bench/gpu_throughput.sh 4 /tmp/t.json
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGES=${1:-1000}
OUT=${2:-runs/gpu-throughput.json}
SB=${SB:-.venv/bin/stainbridge}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-full}
BATCH=${BATCH:-64}
MODES=${MODES:-naive,pipeline,service}
COMPILE=${COMPILE:-1}

if [ "$DEVICE" = cuda ]; then
    if ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; then
        echo "gpu_throughput.sh: nvidia-smi failed; is there a GPU? (DEVICE=cpu runs the smoke test)" >&2
        exit 2
    fi
fi
compile_flag=()
[ "$COMPILE" = 1 ] && compile_flag=(--compile)
mkdir -p "$(dirname "$OUT")"
"$SB" bench throughput --device "$DEVICE" --preset "$PRESET" --images "$IMAGES" --batch-size "$BATCH" \
    --modes "$MODES" "${compile_flag[@]}" --json "$OUT"
cat "$OUT"
