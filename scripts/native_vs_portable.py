"""Compare this checkout's convcore build with a second build (e.g. ``CONVCORE_NO_NATIVE=1``) row by row, in one process.

Issue 9 asks the ``CONVCORE_NO_NATIVE=1`` build (the Docker image's: no ``-march=native``, the kernels picked at run
time through per-function ``target`` attributes) to run within 5% of the native build on every row of
``benchmarks/engine.py``. Two builds of one package cannot be imported under one name, so the other build's
``convcore`` directory is copied to a temporary ``convcore_other`` package (its modules import each other
relatively) and both are timed on the same arrays, interleaved round by round::

    git archive HEAD | tar -x -C /tmp/nn && (cd /tmp/nn && CONVCORE_NO_NATIVE=1 python3 setup.py build_ext --inplace)
    flock /tmp/bench.lock python3 scripts/native_vs_portable.py /tmp/nn [--rows REGEX] [--repeats 9] [--threads 2]

Prints one markdown table: per row and layout the median time of each build and the median of per-round ratios
``other time / this time`` (1.05 = the other build is 5% slower). Both builds share one OpenMP runtime, so their
calls never fight over the cores.
"""
import argparse
import importlib
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

from benchmarks.engine import SUITE, RowData, row_id  # noqa: E402


def import_other(build_dir):
    """Import `build_dir`/convcore as the package ``convcore_other`` (a copy in a temporary directory)."""
    src = os.path.join(build_dir, "convcore")
    if not os.path.isfile(os.path.join(src, "__init__.py")):
        raise SystemExit(f"{build_dir!r} has no convcore package (expected {src}/__init__.py)")
    tmp = tempfile.mkdtemp(prefix="convcore-other-")
    shutil.copytree(src, os.path.join(tmp, "convcore_other"))
    sys.path.insert(0, tmp)
    return importlib.import_module("convcore_other"), tmp


def _time(fn, calls=3):
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def compare_row(mods, layer, n, channels_last, threads, repeats):
    """Median seconds per build and the median per-round ratio (other / this) for one row and layout."""
    d = RowData(layer, n)
    x, w, out = (d.x_cl, d.w_io, d.out_cl) if channels_last else (d.x_cf, d.w_oi, d.out_cf)
    opts = dict(strides=layer.stride, padding="same", dilation=layer.dilation, groups=layer.groups,
                num_threads=threads, data_format="channels_last" if channels_last else "channels_first")
    plans = [m.make_plan(x.shape, w, **opts) for m in mods]
    outs = [out, np.empty_like(out)]
    for p, o in zip(plans, outs):
        p.run(x, out=o)
    if not np.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4):
        raise AssertionError(f"{row_id(layer, n)}: the two builds disagree")
    times = [[], []]
    for _ in range(repeats):
        for i, (p, o) in enumerate(zip(plans, outs)):
            for _ in range(3):   # settle after the switch (the 2nd OpenMP thread may wake late after idle)
                p.run(x, out=o)
            times[i].append(_time(lambda: p.run(x, out=o)))
    t = np.array(times)
    return float(np.median(t[0])), float(np.median(t[1])), float(np.median(t[1] / t[0]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("other", help="checkout whose convcore/ holds the other build (e.g. a CONVCORE_NO_NATIVE=1 one)")
    ap.add_argument("--rows", help="regex searched in row ids (e.g. 'dw3x3|1x1')")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import convcore
    other, tmp = import_other(args.other)
    try:
        if convcore.kernel_isa() != other.kernel_isa():
            raise SystemExit(f"the builds pick different kernels: {convcore.kernel_isa()} vs {other.kernel_isa()}")
        print(f"this: {os.path.dirname(convcore.__file__)}  other: {args.other}  kernel level {convcore.kernel_isa()}, "
              f"{args.threads} threads, {args.repeats} rounds")
        print("| row | layout | this µs | other µs | other / this |")
        print("|---|---|---:|---:|---:|")
        worst = []
        for layer in SUITE:
            for n in layer.batches:
                rid = row_id(layer, n)
                if args.rows and not re.search(args.rows, rid):
                    continue
                for cl in (False, True):
                    a, b, r = compare_row((convcore, other), layer, n, cl, args.threads, args.repeats)
                    worst.append((r, rid, "NHWC" if cl else "NCHW"))
                    print(f"| {rid} | {'NHWC' if cl else 'NCHW'} | {a * 1e6:.0f} | {b * 1e6:.0f} | {r:.3f} |",
                          flush=True)
        if worst:
            r, rid, lay = max(worst)
            print(f"\nslowest other-build row: {rid} {lay} {r:.3f}x this build's time; "
                  f"{sum(1 for w in worst if w[0] > 1.05)} of {len(worst)} rows above 1.05")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
