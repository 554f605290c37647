"""CI check: Triton's perf_analyzer runs against our server at concurrency 2 for a few seconds with no errors.

    python3 scripts/check_perf_analyzer.py                          # starts its own server on a free port
    python3 scripts/check_perf_analyzer.py --target 127.0.0.1:50051  # or uses a running one

It registers a small model (3 -> 8 channels, 3x3, same padding, relu) with ConvClient, then runs

    scripts/perf_analyzer.sh -m MODEL -u TARGET -i grpc --concurrency-range 2 --shape input:3,32,32 -b 2
        --measurement-interval 1000 --stability-percentage 100 --max-trials 8

and fails (exit 1) if perf_analyzer exits non-zero, reports an error, or completes no request. tests/ runs this script
(test_kserve_interop.py); scripts/triton_venv.sh provides perf_analyzer and its libraries.
"""
import argparse
import os
import re
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmarks._harness import ServerProcess  # noqa: E402
from client import ConvClient  # noqa: E402


def perf_analyzer_command(target, model, shape="3,32,32", batch=2, interval_ms=1000, shared_memory=False):
    """The exact perf_analyzer invocation (also shown in README).

    The machine is shared, so throughput between windows can swing a lot: a loose stability criterion
    (--stability-percentage 100) and a few more trials make the check about errors, not about a quiet machine.
    """
    return [os.path.join(HERE, "perf_analyzer.sh"), "-m", model, "-u", target, "-i", "grpc",
            "--concurrency-range", "2", "--shape", f"input:{shape}", "-b", str(batch),
            "--measurement-interval", str(interval_ms), "--stability-percentage", "100", "--max-trials", "8"] + (
        ["--shared-memory", "system"] if shared_memory else [])


def check(target, model="perf-edge", timeout=120, shared_memory=False):
    """Register `model` on `target`, run perf_analyzer (through system shared memory if asked); return (ok, output).

    With shared memory, the server must also have no region left registered afterwards (perf_analyzer unregisters
    its own)."""
    rng = np.random.default_rng(0)
    with ConvClient(target, timeout=30) as c:
        c.register_model(model, [{"kernel": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
                                  "bias": np.zeros(8, np.float32), "padding": "same", "activation": "relu"}])
    cmd = perf_analyzer_command(target, model, shared_memory=shared_memory)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    text = out.stdout + out.stderr
    count = re.search(r"Request count: (\d+)", text)
    ok = (out.returncode == 0 and count is not None and int(count.group(1)) > 0
          and not re.search(r"error|failed", text, re.IGNORECASE))
    return ok, "$ " + " ".join(cmd) + "\n" + text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", help="HOST:PORT of a running server (default: start one)")
    p.add_argument("--model", default="perf-edge")
    p.add_argument("--shared-memory", action="store_true", help="run perf_analyzer with --shared-memory system")
    args = p.parse_args(argv)
    server = None
    if args.target is None:
        server = ServerProcess.temporary(prefix="perfcheck-").start()
    target = args.target or server.target
    ok, text = False, ""
    try:
        ok, text = check(target, args.model, shared_memory=args.shared_memory)
    finally:
        if server is not None:
            server.stop(30)
            if not ok:
                text += "\n---- server log (tail) ----\n" + server.log()[-3000:]
            server.cleanup()
    print(text)
    print("perf_analyzer check:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
