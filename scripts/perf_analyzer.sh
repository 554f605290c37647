#!/usr/bin/env bash
# Run Triton's perf_analyzer (the binary shipped in the tritonclient 2.41.0 wheel) with the shared libraries it needs:
# libcudart.so.12 from the venv's nvidia-cuda-runtime-cu12 and libb64.so.0d from Debian's libb64-0d. All arguments go
# to perf_analyzer, e.g.
#   scripts/perf_analyzer.sh -m edge -u 127.0.0.1:50051 -i grpc --concurrency-range 2 --shape input:3,64,64
set -euo pipefail
VENV="$("$(dirname "$0")/triton_venv.sh" | tail -n 1)"
CUDART_DIR="$(echo "$VENV"/lib/python3*/site-packages/nvidia/cuda_runtime/lib)"
export LD_LIBRARY_PATH="$CUDART_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$VENV/bin/perf_analyzer" "$@"
