#!/usr/bin/env bash
# Create (once, then reuse) the virtualenv that holds Triton's Python client and perf_analyzer for the interop checks.
#
# Why a separate environment: tritonclient[grpc]==2.41.0 ships its own generated `inference.*` protobuf modules and needs
# protobuf<5; our package registers the same `inference.*` names with a newer protobuf, and protobuf refuses two
# definitions of one name in a process. So Triton's tools live here and tests drive them in a subprocess.
#
# perf_analyzer (a binary inside the 2.41.0 wheel) needs libb64.so.0d (Debian: libb64-0d) and libcudart.so.12
# (PyPI: nvidia-cuda-runtime-cu12) at run time, even for a CPU-only gRPC run; scripts/perf_analyzer.sh sets the path.
#
# Usage: scripts/triton_venv.sh        prints the venv path on its last line; TRITON_VENV=DIR overrides the location.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${TRITON_VENV:-$ROOT/.venv-triton}"
STAMP="$VENV/.ready-tritonclient-2.41.0-v2"  # bump the suffix when the package list changes

if [ ! -f "$STAMP" ]; then
    echo "triton_venv: creating $VENV" >&2
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    # tritonclient 2.41.0 does not declare its protobuf dependency; its generated modules need protobuf 4.x (<5).
    # numpy<2: it predates numpy 2 and uses aliases numpy 2 removed.
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "tritonclient[grpc]==2.41.0" "protobuf>=4.21,<5" "numpy<2" "nvidia-cuda-runtime-cu12" >&2
    touch "$STAMP"
fi

# libb64 is a system library; install it with apt when it is missing (CI runs as root on a fresh image).
if ! ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then
    echo "triton_venv: installing Debian package libb64-0d for perf_analyzer" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libb64-0d >&2
fi
echo "$VENV"
