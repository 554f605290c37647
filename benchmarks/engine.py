"""Benchmark convcore against PyTorch, ONNX Runtime and the GEMM limit on the layer suite of issue 2.

Run as::

    python -m benchmarks.engine [--quick] [--rows PATTERN] [--repeats N] [--threads T] [--output BENCHMARKS.md]

Every contender is timed in this one process, on the same arrays, in interleaved rounds (one sample of each contender
per round), and reported as medians. Ratios are only meaningful within one run: the machine is shared and its speed
changes from minute to minute (see ``PERF-NOTES.md``).

Contenders per layer (row):

``cc NCHW`` / ``cc NHWC``
    ``convcore.make_plan(...)`` built once, then ``plan.run(x, out=preallocated)``: what a server does.
``cc conv()``
    ``convcore.conv(x, w, ...)`` per call (NCHW): plan building and output allocation included.
``torch NCHW`` / ``torch CL``
    ``torch.nn.functional.conv{1,2,3}d`` under ``torch.no_grad()`` on contiguous and channels_last tensors (for
    Conv1D, "channels last" is an NWC array passed as a permuted view).
``ORT``
    onnxruntime on a one-node ``Conv`` model built with ``onnx.helper`` (explicit ``pads``), with inputs and outputs
    bound once through IOBinding so it, too, reuses its output buffer.
``GEMM limit``
    ``numpy.matmul`` of the GEMM that im2col + GEMM performs, ``W[Cout/g, C/g*k] @ col[C/g*k, P]`` for every
    batch item and group, on a column matrix built beforehand: the speed convcore would have if im2col were free and
    its GEMM ran at OpenBLAS's (numpy's copy, its own 2 threads) speed.

torch and onnxruntime are optional: their columns show "—" when they are not installed. ``python -m convcore.bench``
still runs this file.
"""
import argparse
import gc
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from benchmarks._harness import (ROOT, gemm_peak, load_average, machine_info, machine_lines, pin_malloc,
                                 set_numpy_blas_threads, source_env, utc_now, write_section)

__all__ = ["Layer", "SUITE", "main", "run_benchmark"]

MARK_START = "<!-- convcore-bench:start -->"
MARK_END = "<!-- convcore-bench:end -->"

#: Cells of contenders that could not run (library missing, or the layout has no such variant).
NA = "—"

#: Relative error (max |a - ref| / max |ref|) above which an output is reported as wrong: float32 sums of up to
#: 1728 products stay near 1e-6 here; 1e-3 only catches real bugs (wrong padding, wrong layout).
CHECK_RTOL = 1e-3


@dataclass(frozen=True)
class Layer:
    """One layer of the suite; each batch size in `batches` makes one row.

    Attributes
    ----------
    key : str
        Short ASCII id used in row ids (``key/b8``) and matched by ``--rows``.
    label : str
        Human-readable description for the table.
    c_in, c_out : int
        Input and output channels.
    spatial : tuple of int
        Input spatial size (W,), (H, W) or (D, H, W).
    kernel : tuple of int
        Kernel spatial size, one per spatial dim.
    stride, dilation, groups : int
        The same stride and dilation in every spatial dim; "same" padding (TF/Keras) always.
    batches : tuple of int
    quick : bool
        Part of the ``--quick`` smoke subset (batch 1 only there).
    """

    key: str
    label: str
    c_in: int
    c_out: int
    spatial: tuple
    kernel: tuple
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    batches: tuple = (1, 8)
    quick: bool = False

    @property
    def nsp(self):
        return len(self.spatial)

    @property
    def pads(self):
        """TF/Keras "same" padding per dim: ((begin, end), ...), the odd pixel at the end."""
        res = []
        for n, k in zip(self.spatial, self.kernel):
            out = -(-n // self.stride)
            total = max((out - 1) * self.stride + (k - 1) * self.dilation + 1 - n, 0)
            res.append((total // 2, total - total // 2))
        return tuple(res)

    @property
    def out_spatial(self):
        return tuple(-(-n // self.stride) for n in self.spatial)

    @property
    def gemm_k(self):
        """Rows of the column matrix per group: C/g * prod(kernel)."""
        return self.c_in // self.groups * math.prod(self.kernel)

    def flops(self, n):
        """2 * N * Cout * prod(out) * Cin/g * prod(k): multiply-adds of the layer counted as two FLOPs."""
        return 2 * n * self.c_out * math.prod(self.out_spatial) * self.gemm_k

    def data_bytes(self, n):
        """float32 bytes of input + output + weights: the yardstick of the memory target."""
        return 4 * (n * self.c_in * math.prod(self.spatial) + n * self.c_out * math.prod(self.out_spatial)
                    + self.c_out * self.gemm_k)

    @property
    def is_1x1(self):
        return all(k == 1 for k in self.kernel)

    @property
    def is_depthwise(self):
        return self.groups > 1 and self.groups == self.c_in


SUITE = (
    Layer("resnet_conv1", "ResNet-50 conv1 7x7 s2 3→64 @224²", 3, 64, (224, 224), (7, 7), stride=2),
    Layer("3x3_c64", "3x3 64→64 @56²", 64, 64, (56, 56), (3, 3)),
    Layer("3x3_c128", "3x3 128→128 @28²", 128, 128, (28, 28), (3, 3)),
    Layer("3x3_c256", "3x3 256→256 @14²", 256, 256, (14, 14), (3, 3), quick=True),
    Layer("3x3_c512", "3x3 512→512 @7²", 512, 512, (7, 7), (3, 3)),
    Layer("1x1_256to64", "1x1 256→64 @56²", 256, 64, (56, 56), (1, 1), quick=True),
    Layer("1x1s2_1024to2048", "1x1 s2 1024→2048 @14²", 1024, 2048, (14, 14), (1, 1), stride=2),
    Layer("dw3x3_c144", "MobileNetV2 depthwise 3x3 C=144 @56²", 144, 144, (56, 56), (3, 3), groups=144, quick=True),
    Layer("1x1_144to24", "MobileNetV2 1x1 144→24 @56²", 144, 24, (56, 56), (1, 1)),
    Layer("vgg_3x3_c64", "VGG 3x3 64→64 @224²", 64, 64, (224, 224), (3, 3), batches=(1,)),
    Layer("conv1d_k3d2", "Conv1D 64→64 k3 d2 L16000", 64, 64, (16000,), (3,), dilation=2, batches=(1,),
          quick=True),
    Layer("conv3d_3x3x3", "Conv3D 64→64 3x3x3 8x28x28", 64, 64, (8, 28, 28), (3, 3, 3), batches=(1,)),
)

# Contender names, in table order, with the thread pool each one runs on: switching pools costs a pause.
CONTENDERS = (
    ("cc NCHW", "convcore"),
    ("cc NHWC", "convcore"),
    ("cc blas NCHW", "convcore"),
    ("cc blas NHWC", "convcore"),
    ("cc conv()", "convcore"),
    ("torch NCHW", "torch"),
    ("torch CL", "torch"),
    ("ORT", "ort"),
    ("GEMM limit", "numpy"),
)
_POOL = dict(CONTENDERS)


def select_rows(pattern=None, quick=False):
    """Return the (layer, batch) rows to run.

    Parameters
    ----------
    pattern : str, optional
        A regular expression searched (case-insensitively) in the row id (``"3x3_c64/b8"``) and the layer label.
    quick : bool
        Only the layers marked `quick`, at batch 1.

    Returns
    -------
    list of tuple (Layer, int)
    """
    rx = re.compile(pattern, re.IGNORECASE) if pattern else None
    rows = []
    for layer in SUITE:
        if quick and not layer.quick:
            continue
        for n in ((1,) if quick else layer.batches):
            rid = row_id(layer, n)
            if rx is None or rx.search(rid) or rx.search(layer.label):
                rows.append((layer, n))
    return rows


def row_id(layer, n):
    return f"{layer.key}/b{n}"


# --------------------------------------------------------------------------------------------------------------------
# Optional libraries (glibc pinning and the machine description are in benchmarks/_harness.py)
# --------------------------------------------------------------------------------------------------------------------

def _try_import(name):
    try:
        return __import__(name)
    except Exception:  # an optional contender: any import failure just removes its columns
        return None


# --------------------------------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------------------------------

class RowData:
    """The arrays of one row, shared by every contender: input in both layouts, weights, preallocated outputs."""

    def __init__(self, layer, n, seed=0, dtype=np.float32):
        rng = np.random.default_rng(seed)
        self.layer, self.n = layer, n
        nsp = layer.nsp
        self.x_cf = rng.standard_normal((n, layer.c_in) + layer.spatial, dtype=dtype)
        self.x_cl = np.ascontiguousarray(np.moveaxis(self.x_cf, 1, -1))
        w = rng.standard_normal((layer.c_out, layer.c_in // layer.groups) + layer.kernel, dtype=dtype)
        self.w_oi = w * w.dtype.type(1.0 / math.sqrt(layer.gemm_k))
        # HWIO (Keras) for the NHWC plan: the layout a channels_last user hands in.
        self.w_io = np.ascontiguousarray(np.transpose(self.w_oi, tuple(range(2, 2 + nsp)) + (1, 0)))
        self.out_cf = np.zeros((n, layer.c_out) + layer.out_spatial, dtype=dtype)
        self.out_cl = np.zeros((n,) + layer.out_spatial + (layer.c_out,), dtype=dtype)


@dataclass
class Contender:
    name: str
    fn: object        # callable(): runs the layer once, returns its output (any array-like)
    as_ncx: object    # callable(result) -> numpy array in N, C, spatial order, for the correctness check


def convcore_contenders(d, threads, per_call=True):
    """convcore via cached plans (NCHW and NHWC, outputs reused) and, optionally, ``convcore.conv`` per call."""
    import convcore

    ly = d.layer
    opts = dict(strides=ly.stride, padding="same", dilation=ly.dilation, groups=ly.groups, num_threads=threads)
    plan_cf = convcore.make_plan(d.x_cf.shape, d.w_oi, data_format="channels_first", **opts)
    plan_cl = convcore.make_plan(d.x_cl.shape, d.w_io, data_format="channels_last", **opts)
    # The im2col + BLAS implementation the packed kernels replaced (algorithm="blas"), on the same buffers.
    blas_cf = convcore.make_plan(d.x_cf.shape, d.w_oi, data_format="channels_first", algorithm="blas", **opts)
    blas_cl = convcore.make_plan(d.x_cl.shape, d.w_io, data_format="channels_last", algorithm="blas", **opts)
    res = [
        Contender("cc NCHW", lambda: plan_cf.run(d.x_cf, out=d.out_cf), lambda r: r),
        Contender("cc NHWC", lambda: plan_cl.run(d.x_cl, out=d.out_cl), lambda r: np.moveaxis(r, -1, 1)),
        Contender("cc blas NCHW", lambda: blas_cf.run(d.x_cf, out=d.out_cf), lambda r: r),
        Contender("cc blas NHWC", lambda: blas_cl.run(d.x_cl, out=d.out_cl), lambda r: np.moveaxis(r, -1, 1)),
    ]
    if per_call:
        res.append(Contender("cc conv()", lambda: convcore.conv(d.x_cf, d.w_oi, **opts), lambda r: r))
    algo = f"{plan_cf.algorithm}/{plan_cl.algorithm}" if plan_cf.algorithm != plan_cl.algorithm \
        else plan_cf.algorithm
    return res, algo


def _torch_padding(layer):
    """Symmetric padding for torch giving the same output size as "same", or None if only asymmetric pads can.

    TF's "same" puts an odd extra pixel at the end (ResNet conv1: (2, 3)); torch only pads symmetrically. With
    stride > 1 the symmetric pad of the larger side gives the same output size and the same FLOPs (it is what torch's
    own ResNet uses: padding=3), so the timing compares like with like; the correctness check uses the exact pads.
    """
    pads = []
    for (b, e), n, k in zip(layer.pads, layer.spatial, layer.kernel):
        p = max(b, e)
        eff = (k - 1) * layer.dilation + 1
        if (n + 2 * p - eff) // layer.stride + 1 != -(-n // layer.stride):
            return None
        pads.append(p)
    return tuple(pads)


def torch_contenders(d):
    """torch.nn.functional.conv*d in NCHW and channels_last (NWC for Conv1D)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    import torch.nn.functional as F

    ly = d.layer
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[ly.nsp]
    pad = _torch_padding(ly)
    flat_pads = [p for pair in reversed(ly.pads) for p in pair]  # F.pad wants the last dim first

    def make(x, w):
        if pad is not None:
            return lambda: conv(x, w, None, ly.stride, pad, ly.dilation, ly.groups)
        # Even kernels with stride 1 need asymmetric pads: torch pays for the F.pad copy, as a user would.
        return lambda: conv(F.pad(x, flat_pads), w, None, ly.stride, 0, ly.dilation, ly.groups)

    x_cf = torch.from_numpy(d.x_cf)
    w = torch.from_numpy(d.w_oi)
    # With a symmetric stand-in for asymmetric pads the values are shifted by a pixel: only check exact ones.
    exact = pad is None or all(b == e for b, e in ly.pads)
    res = [Contender("torch NCHW", make(x_cf, w), (lambda r: r.numpy()) if exact else None)]
    if ly.nsp == 1:
        # No channels_last memory format for 3-D tensors: NWC data as a permuted (N, C, W) view, as a user holding
        # NWC data would call it.
        x_cl, w_cl = torch.from_numpy(d.x_cl).permute(0, 2, 1), w
    else:
        fmt = torch.channels_last if ly.nsp == 2 else torch.channels_last_3d
        x_cl, w_cl = x_cf.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
    res.append(Contender("torch CL", make(x_cl, w_cl), (lambda r: r.contiguous().numpy()) if exact else None))
    return res


def reference(d):
    """float64 torch output with the exact (possibly asymmetric) "same" pads, or None without torch."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    import torch.nn.functional as F

    ly = d.layer
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[ly.nsp]
    flat_pads = [p for pair in reversed(ly.pads) for p in pair]
    x = F.pad(torch.from_numpy(d.x_cf).double(), flat_pads)
    return conv(x, torch.from_numpy(d.w_oi).double(), None, ly.stride, 0, ly.dilation, ly.groups).numpy()


def ort_contenders(d, threads):
    """onnxruntime on a one-node Conv model with explicit pads, input and output bound once (IOBinding)."""
    ort = sys.modules.get("onnxruntime")
    onnx = sys.modules.get("onnx")
    if ort is None or onnx is None or d.x_cf.dtype != np.float32:
        return []  # (the float64 run compares convcore with torch only)
    from onnx import TensorProto, helper, numpy_helper

    ly = d.layer
    pads = [b for b, _ in ly.pads] + [e for _, e in ly.pads]  # ONNX: all begins, then all ends
    node = helper.make_node("Conv", ["X", "W"], ["Y"], kernel_shape=list(ly.kernel), strides=[ly.stride] * ly.nsp,
                            dilations=[ly.dilation] * ly.nsp, group=ly.groups, pads=pads)
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(d.x_cf.shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, list(d.out_cf.shape))],
        initializer=[numpy_helper.from_array(d.w_oi, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime of the last years, whatever onnx wrote by default
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = np.zeros_like(d.out_cf)
    binding = sess.io_binding()
    binding.bind_cpu_input("X", d.x_cf)
    binding.bind_ortvalue_output("Y", ort.OrtValue.ortvalue_from_numpy(out))

    def run():
        sess.run_with_iobinding(binding)
        return out

    return [Contender("ORT", run, lambda r: r)]


def gemm_contender(d):
    """numpy matmul of the im2col GEMM shape: one (Cout/g x K) @ (K x P) product per batch item and group."""
    ly = d.layer
    g, k, p = ly.groups, ly.gemm_k, math.prod(ly.out_spatial)
    rng = np.random.default_rng(2)
    w = d.w_oi.reshape(g, ly.c_out // g, k)
    col = rng.standard_normal((d.n, g, k, p), dtype=d.x_cf.dtype)
    out = np.empty((d.n, g, ly.c_out // g, p), dtype=d.x_cf.dtype)
    return Contender("GEMM limit", lambda: np.matmul(w, col, out=out), None)


# --------------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------------

#: After a switch of thread pool, untimed calls continue until one runs within this factor of the contender's best
#: call so far (a woken team needs one to three calls here: COMMON.md's wake-up figures) ...
SETTLE_FACTOR = 1.3
#: ... but at most this many untimed calls, or this many seconds of them, after the first.
SETTLE_MAX_CALLS = 6
SETTLE_MAX_S = 0.05
#: Timed calls per contender per round (each one a sample), fewer once they took TIMED_MAX_S (long rows need fewer
#: samples and would make the suite twice as long).
TIMED_PER_ROUND = 3
TIMED_MAX_S = 0.03


def time_contenders(contenders, repeats, pause, warmup_s=0.2, timed=TIMED_PER_ROUND):
    """Time contenders in interleaved rounds and return the samples (seconds) of each.

    Every round runs each contender `timed` times; the order of thread pools rotates from round to round so that no
    contender always follows the same one. Switching to another thread pool (convcore's OpenMP, torch's OpenMP,
    ORT's pool, numpy's OpenBLAS) is preceded by `pause` seconds of sleep: a pool that just finished keeps spinning
    for ~0.1 s and would slow the next one 5-20x (PERF-NOTES). After the pause the pool's threads are asleep, and on
    this VM the first one to three calls of a 2-thread team run 2-5x slower (the team's end barrier waits for a
    vCPU that wakes late); so untimed calls follow until one runs within SETTLE_FACTOR of the contender's best call
    so far (at most SETTLE_MAX_CALLS of them, SETTLE_MAX_S seconds), and only then are `timed` calls timed. Every
    contender of a pool gets this, not only the first after the switch (which used to absorb the wake-up alone).

    Parameters
    ----------
    contenders : list of Contender
    repeats : int
        Rounds.
    pause : float
        Seconds of sleep when the thread pool changes.
    warmup_s : float
        Warm-up per contender: at least 2 calls, more until this many seconds passed (at most 20 calls).
    timed : int
        Timed calls per contender per round (fewer once they took TIMED_MAX_S seconds).

    Returns
    -------
    dict
        name -> list of float seconds.
    """
    last_pool = [None]
    best = {c.name: math.inf for c in contenders}

    def switch(c):
        if _POOL[c.name] != last_pool[0]:
            time.sleep(pause)
            last_pool[0] = _POOL[c.name]

    def call(c):
        t0 = time.perf_counter()
        c.fn()
        dt = time.perf_counter() - t0
        best[c.name] = min(best[c.name], dt)
        return dt

    for c in contenders:
        switch(c)
        t0 = time.perf_counter()
        calls = 0
        while calls < 2 or (calls < 20 and time.perf_counter() - t0 < warmup_s):
            call(c)
            calls += 1
    pools = []
    for c in contenders:
        if _POOL[c.name] not in pools:
            pools.append(_POOL[c.name])
    samples = {c.name: [] for c in contenders}
    for r in range(repeats):
        order = pools[r % len(pools):] + pools[:r % len(pools)]
        for pool in order:
            for c in (c for c in contenders if _POOL[c.name] == pool):
                switch(c)
                t0 = time.perf_counter()
                dt = call(c)
                extra = 0
                while dt > SETTLE_FACTOR * best[c.name] and extra < SETTLE_MAX_CALLS \
                        and time.perf_counter() - t0 < SETTLE_MAX_S:
                    dt = call(c)
                    extra += 1
                t0 = time.perf_counter()
                for k in range(timed):
                    if k and time.perf_counter() - t0 > TIMED_MAX_S:
                        break
                    samples[c.name].append(call(c))
    return samples


def summarize(ts):
    """(median, relative interquartile range) of a list of seconds."""
    q1, med, q3 = np.percentile(ts, [25, 50, 75])
    return float(med), float((q3 - q1) / med) if med > 0 else 0.0


def check_outputs(d, contenders):
    """Compare every contender's output with a float64 reference; return a list of failing names (or None)."""
    ref = reference(d)
    if ref is None:
        return None
    scale = float(np.max(np.abs(ref))) or 1.0
    bad = []
    for c in contenders:
        if c.as_ncx is None:
            continue
        got = np.asarray(c.as_ncx(c.fn()), dtype=np.float64)
        if got.shape != ref.shape or not np.all(np.isfinite(got)) or \
                float(np.max(np.abs(got - ref))) / scale > CHECK_RTOL:
            bad.append(c.name)
    return bad


def bench_row(layer, n, args):
    """Run every available contender on one row; return a dict with medians, spreads and the check result."""
    d = RowData(layer, n, dtype=np.dtype(args.dtype))
    cc, algo = convcore_contenders(d, args.threads, per_call=not args.no_per_call)
    contenders = cc + torch_contenders(d) + ort_contenders(d, args.threads) + [gemm_contender(d)]
    bad = check_outputs(d, contenders)
    samples = time_contenders(contenders, args.repeats, args.pause, warmup_s=0.05 if args.quick else 0.2)
    flops = layer.flops(n)
    res = {"id": row_id(layer, n), "layer": layer, "n": n, "algo": algo, "flops": flops, "bad": bad,
           "gflops": {}, "seconds": {}, "spread": {}}
    res["best"] = {}
    for name, ts in samples.items():
        med, spread = summarize(ts)
        res["best"][name] = min(ts)
        res["seconds"][name] = med
        res["gflops"][name] = flops / med / 1e9
        res["spread"][name] = spread
    g = res["gflops"]
    res["ratio"] = {
        "NCHW": g["cc NCHW"] / g["torch NCHW"] if "torch NCHW" in g else None,
        "NHWC": g["cc NHWC"] / g["torch CL"] if "torch CL" in g else None,
    }
    del d, contenders, cc
    gc.collect()
    return res


# --------------------------------------------------------------------------------------------------------------------
# Peak memory, one subprocess per probe
# --------------------------------------------------------------------------------------------------------------------

def _proc_status():
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":")
                vals[key] = int(val.split()[0]) * 1024
    return vals


def memory_probe(rid, contender, threads):
    """Run in a fresh process: the peak RSS of one contender's first two calls on one row, as a JSON dict.

    The row's input, weights and (for plans) output are allocated and touched first, directly in their final
    layout so that no freed temporary leaves resident pages the call could reuse unseen. Then the peak-RSS counter is
    reset (``/proc/self/clear_refs``, Linux >= 4.0) and the plan is built and run twice (or torch called twice); the
    peak minus the resident size before is what the layer needed beyond its data. glibc's allocation thresholds are
    left at their defaults here (freed memory is returned, so it cannot hide in the heap).
    """
    layer, n = next((ly, b) for ly in SUITE for b in ly.batches if row_id(ly, b) == rid)
    rng = np.random.default_rng(0)
    cl = contender in ("cc NHWC", "torch CL")
    nsp, k_sp = layer.nsp, layer.kernel
    cig = layer.c_in // layer.groups
    # Data generated straight in its physical layout (no temporaries, no hidden copies): channels last means
    # N,*spatial,C for the input and *k,I,O (HWIO) for convcore's kernel, O,*k,I for torch's channels_last kernel.
    x = rng.standard_normal((n,) + layer.spatial + (layer.c_in,) if cl else (n, layer.c_in) + layer.spatial,
                            dtype=np.float32)
    opts = dict(strides=layer.stride, padding="same", dilation=layer.dilation, groups=layer.groups)
    if contender.startswith("cc"):
        import convcore

        w = rng.standard_normal(k_sp + (cig, layer.c_out) if cl else (layer.c_out, cig) + k_sp, dtype=np.float32)
        out_shape = (n,) + layer.out_spatial + (layer.c_out,) if cl else (n, layer.c_out) + layer.out_spatial
        out = np.empty(out_shape, dtype=np.float32)
        out.fill(0.0)  # touch it: np.zeros would calloc untouched pages and the call would fault them in
        data = x.nbytes + w.nbytes + out.nbytes

        def run():
            plan = convcore.make_plan(x.shape, w, data_format="channels_last" if cl else "channels_first",
                                      num_threads=threads, **opts)
            plan.run(x, out=out)
            plan.run(x, out=out)
    else:
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(threads)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nsp]
        pad = _torch_padding(layer)
        to_ncx = (0, nsp + 1) + tuple(range(1, nsp + 1))  # N,*sp,C -> N,C,*sp as a view
        xt = torch.from_numpy(x).permute(to_ncx) if cl else torch.from_numpy(x)
        if cl and nsp > 1:
            w = rng.standard_normal((layer.c_out,) + k_sp + (cig,), dtype=np.float32)
            wt = torch.from_numpy(w).permute(to_ncx)
        else:
            w = rng.standard_normal((layer.c_out, cig) + k_sp, dtype=np.float32)
            wt = torch.from_numpy(w)
        data = x.nbytes + w.nbytes

        def run():
            with torch.no_grad():
                for _ in range(2):
                    y = conv(xt, wt, None, layer.stride, pad, layer.dilation, layer.groups)
                    del y

    def window(fn):
        """Peak RSS growth while `fn` runs (bytes), and how it was measured."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            how = "VmHWM after /proc/self/clear_refs reset"
        except OSError:
            how = "VmHWM without reset (earlier peaks may hide the call's)"
        before = _proc_status()
        fn()
        return max(0, _proc_status()["VmHWM"] - before["VmRSS"]), how

    # The runtime's one-time costs (OpenMP team stacks, OpenBLAS's packing buffers, oneDNN's kernels) are paid once
    # per process, not per layer: pay them on a tiny layer of the same kind first and report them apart.
    init, _ = window(lambda: _tiny_run(layer, contender, threads))
    extra, method = window(run)
    return {"row": rid, "contender": contender, "data": data, "extra": extra, "init": init, "method": method,
            "yardstick": layer.data_bytes(n), "ratio": (data + extra) / layer.data_bytes(n)}


def _tiny_run(layer, contender, threads):
    """Run a tiny layer of the same rank, kind (depthwise / 1x1 / kxk) and contender, to initialize its runtime."""
    c = min(layer.c_in, 8)
    co = c if layer.is_depthwise else min(layer.c_out, 8)
    g = c if layer.is_depthwise else 1
    sp = (16,) * layer.nsp
    x = np.ones((1, c) + sp, dtype=np.float32)
    w = np.ones((co, c // g) + layer.kernel, dtype=np.float32)
    if contender.startswith("cc"):
        import convcore

        xx = np.ascontiguousarray(np.moveaxis(x, 1, -1)) if contender == "cc NHWC" else x
        convcore.conv(xx, w, strides=layer.stride, padding="same", dilation=layer.dilation, groups=g,
                      data_format="channels_last" if contender == "cc NHWC" else "channels_first",
                      kernel_layout={1: "OIW", 2: "OIHW", 3: "OIDHW"}[layer.nsp], num_threads=threads)
    else:
        import torch
        import torch.nn.functional as F

        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[layer.nsp]
        with torch.no_grad():
            conv(torch.from_numpy(x), torch.from_numpy(w), None, layer.stride, "same" if layer.stride == 1 else 0,
                 layer.dilation, g)


def probe_memory(rid, contender, threads, timeout=120):
    """Run :func:`memory_probe` in a subprocess; return its dict, or None (with the error in 'error')."""
    cmd = [sys.executable, "-m", "benchmarks.engine", "--memprobe", f"{rid}|{contender}", "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=source_env())
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------

def _fmt(v, digits=0):
    return NA if v is None else f"{v:.{digits}f}"


def _geomean(vals):
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def _row_spread(r):
    """Largest relative interquartile range among the convcore and torch samples of a row."""
    return max(r["spread"][k] for k in ("cc NCHW", "cc NHWC", "torch NCHW", "torch CL") if k in r["spread"])


def peak_gflops(peak):
    """The measured GEMM peak (best of numpy's and torch's square sgemm), GFLOP/s, or None."""
    vals = [v["best"] for k, v in (peak or {}).items() if k in ("numpy", "torch") and isinstance(v, dict)]
    return max(vals) if vals else None


def _pct(g, top):
    return NA if g is None or not top else f"{100 * g / top:.0f}"


def format_table(results, mem, peak=None):
    """The Markdown results table: GFLOP/s per contender, ratios, % of the GEMM peak, spread, memory, check."""
    top = peak_gflops(peak)
    head = ["row", "layer", "algo", "MFLOP"] + [c for c, _ in CONTENDERS] + \
        ["NCHW ratio", "NHWC ratio", "% peak NCHW/NHWC", "spread %", "mem× NCHW/NHWC", "check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 4) + ["---"]) + "|"]
    for r in results:
        g = r["gflops"]
        m = mem.get(r["id"], {})
        mem_cell = "/".join(_fmt(m.get(k, {}).get("ratio"), 2) for k in ("cc NCHW", "cc NHWC")) if m else NA
        check = NA if r["bad"] is None else ("ok" if not r["bad"] else "WRONG: " + ", ".join(r["bad"]))
        cells = [r["id"], r["layer"].label, r["algo"], f"{r['flops'] / 1e6:.0f}"]
        cells += [_fmt(g.get(c), 1) for c, _ in CONTENDERS]
        spread = f"{100 * _row_spread(r):.0f}" + (" (2nd run)" if r.get("rerun") else "")
        pct = f"{_pct(g.get('cc NCHW'), top)}/{_pct(g.get('cc NHWC'), top)}"
        cells += [_fmt(r["ratio"]["NCHW"], 2), _fmt(r["ratio"]["NHWC"], 2), pct, spread, mem_cell, check]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_targets(results, mem, largest):
    """The summary lines and the Targets of issue 2, each marked met / missed / n/a.

    Returns
    -------
    (list of str, list of dict)
        Summary lines, and the targets as dicts with ``name``, ``status``, ``text`` and the offending ``rows``
        ((row result, layout) pairs) for the "why" section.
    """
    ratios = [(r, lay, v) for r in results for lay, v in r["ratio"].items() if v is not None]
    lines, targets = [], []
    if not ratios:
        lines.append("No ratios: torch is not installed, so the targets (relative to PyTorch) cannot be evaluated.")
    else:
        gm = _geomean([v for _, _, v in ratios])
        rmin = min(ratios, key=lambda t: t[2])
        lines.append(f"Geometric mean of convcore/torch over {len(ratios)} ratios (rows × layouts): **{gm:.2f}×**")
        lines.append(f"Lowest ratio: **{rmin[2]:.2f}×** on {rmin[0]['id']} {rmin[1]}")
        pairs = {"NCHW": ("cc NCHW", "torch NCHW"), "NHWC": ("cc NHWC", "torch CL")}
        best = [r["best"][pairs[lay][1]] / r["best"][pairs[lay][0]] for r, lay, _ in ratios]
        lines.append(f"Cross-check on best samples instead of medians (less sensitive to other users' bursts): "
                     f"geometric mean {_geomean(best):.2f}×, lowest {min(best):.2f}×")
        below = [(r, lay) for r, lay, v in ratios if v < 0.8]
        targets.append({"name": "geomean ≥ 0.8× torch", "status": "met" if gm >= 0.8 else "missed",
                        "text": f"{gm:.2f}×" + ("" if gm >= 0.8 else f", short by {100 * (1 - gm / 0.8):.0f}%"),
                        "rows": below})

    def ahead(name, pick):
        sel = [(r, lay, v) for r, lay, v in ratios if pick(r["layer"], lay)]
        if not sel:
            targets.append({"name": name, "status": "n/a", "text": "rows not in this run", "rows": []})
            return
        behind = [(r, lay) for r, lay, v in sel if v <= 1.0]
        text = ", ".join(f"{r['id']} {lay} {v:.2f}×" for r, lay, v in sel)
        targets.append({"name": name, "status": "missed" if behind else "met", "text": text, "rows": behind})

    if ratios:
        _issue9_targets(ratios, targets)
        ahead("ahead of torch on Conv3D (both layouts)", lambda ly, lay: ly.nsp == 3)
        ahead("ahead of torch on NWC Conv1D", lambda ly, lay: ly.nsp == 1 and lay == "NHWC")
        ahead("ahead of torch on NCHW depthwise", lambda ly, lay: ly.is_depthwise and lay == "NCHW")
        ahead("ahead of torch on the NCHW 1x1 rows", lambda ly, lay: ly.is_1x1 and lay == "NCHW")
        low = [(r, lay, v) for r, lay, v in ratios if v < 0.5]
        targets.append({"name": "no row below 0.5× torch", "status": "missed" if low else "met",
                        "text": ", ".join(f"{r['id']} {lay} {v:.2f}×" for r, lay, v in low) or "none below",
                        "rows": [(r, lay) for r, lay, _ in low]})
    m = mem.get(largest, {})
    cc = [m[k] for k in ("cc NCHW", "cc NHWC") if k in m and "ratio" in m[k]]
    if cc:
        worst = max(v["ratio"] for v in cc)
        others = ", ".join(f"{k} {v['ratio']:.2f}×" for k, v in m.items() if "ratio" in v)
        targets.append({"name": "peak memory of the largest row ≤ 1.5× input+output+weights",
                        "status": "met" if worst <= 1.5 else "missed",
                        "text": f"{largest}: {others} (yardstick {cc[0]['yardstick'] / 2 ** 20:.1f} MiB)",
                        "rows": []})
    else:
        targets.append({"name": "peak memory of the largest row ≤ 1.5× input+output+weights", "status": "n/a",
                        "text": "not measured" + (f" ({m})" if m else ""), "rows": []})
    return lines, targets


def _is_dense(layer):
    """The dense 3x3 / 7x7 rows issue 9 holds to the GEMM peak (resnet_conv1, 3x3_c64..c512, vgg)."""
    return layer.groups == 1 and not layer.is_1x1 and layer.nsp == 2


def _issue9_targets(ratios, targets):
    """Issue 9's targets: geomean >= 1.0x torch, dense rows >= 0.9x torch (and >= 75% of peak), none below 0.7x."""
    gm = _geomean([v for _, _, v in ratios])
    targets.append({"name": "issue 9: geomean ≥ 1.0× torch", "status": "met" if gm >= 1.0 else "missed",
                    "text": f"{gm:.2f}×" + ("" if gm >= 1.0 else f", short by {100 * (1 - gm):.0f}%"),
                    "rows": [(r, lay) for r, lay, v in ratios if v < 1.0]})
    dense = [(r, lay, v) for r, lay, v in ratios if _is_dense(r["layer"])]
    behind = [(r, lay, v) for r, lay, v in dense if v < 0.9]
    targets.append({"name": "issue 9: dense 3x3/7x7 rows ≥ 0.9× torch", "status": "missed" if behind else "met",
                    "text": ", ".join(f"{r['id']} {lay} {v:.2f}×" for r, lay, v in behind) or "all at or above",
                    "rows": [(r, lay) for r, lay, _ in behind]})
    low = [(r, lay, v) for r, lay, v in ratios if v < 0.7]
    targets.append({"name": "issue 9: no row below 0.7× torch", "status": "missed" if low else "met",
                    "text": ", ".join(f"{r['id']} {lay} {v:.2f}×" for r, lay, v in low) or "none below",
                    "rows": [(r, lay) for r, lay, _ in low]})


#: What the extra lower-level run sets, per level, so that torch runs at the same level as convcore: oneDNN's ISA
#: cap and ATen's kernel dispatch level (both read once, at torch start-up: hence a subprocess), and the same cap for
#: the BLAS libraries of its GEMM peak (torch's MKL, numpy's OpenBLAS).
ISA_CAPS = {
    "avx2": {"CONVCORE_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OPENBLAS_CORETYPE": "Haswell"},
}
#: Prefix of the one line of JSON the ISA child prints (the other lines are its progress, passed on).
_ISA_RESULT = "ISA-RERUN-RESULT "


def _onednn_verbose(fn):
    """Run ``fn()`` once with oneDNN's verbose mode on; return the ``onednn_verbose`` lines it printed.

    oneDNN prints with C stdio to file descriptor 1, so fd 1 is pointed at a temporary file for the call (Python's and
    C's buffers flushed on both sides of the switch).
    """
    import ctypes
    import tempfile

    torch = sys.modules["torch"]
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
            libc.fflush(None)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    return [line for line in text.splitlines() if line.startswith("onednn_verbose")]


def _conv_impls(lines):
    """The oneDNN convolution implementations (``jit:avx2``, ``brg_conv_fwd:avx2``, ...) named in verbose lines."""
    impls = []
    for line in lines:
        f = line.split(",")
        if len(f) > 6 and f[2:4] == ["primitive", "exec"] and f[5] == "convolution" and f[6] not in impls:
            impls.append(f[6])
    return impls


def torch_isa_report():
    """What torch itself says about its level: ATen's CPU capability and oneDNN's ISA line (from a probe conv)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    import torch.nn.functional as F

    x = torch.ones(1, 64, 56, 56)  # big enough for torch to pick oneDNN (a tiny conv takes ATen's own path)
    w = torch.ones(64, 64, 3, 3)
    lines = _onednn_verbose(lambda: F.conv2d(x, w, padding=1))
    isa = next((ln.split("isa:", 1)[1] for ln in lines if ",info,cpu,isa:" in ln), None)
    return {"aten": torch.backends.cpu.get_cpu_capability(), "onednn": isa, "probe_impls": _conv_impls(lines)}


def bench_row_isa(layer, n, args):
    """The default plans (cc NCHW/NHWC) and torch on one row, at whatever level this process runs; GFLOP/s medians,
    and the oneDNN convolution implementations torch ran (one verbose call per torch contender, after the timing)."""
    d = RowData(layer, n, dtype=np.dtype(args.dtype))
    cc, _ = convcore_contenders(d, args.threads, per_call=False)
    th = torch_contenders(d)
    contenders = [c for c in cc if c.name in ("cc NCHW", "cc NHWC")] + th
    samples = time_contenders(contenders, args.repeats, args.pause, warmup_s=0.05 if args.quick else 0.2)
    impls = {c.name: _conv_impls(_onednn_verbose(c.fn)) for c in th}
    g = {name: layer.flops(n) / summarize(ts)[0] / 1e9 for name, ts in samples.items()}
    del d, contenders, cc, th
    gc.collect()
    return {"id": row_id(layer, n), "gflops": g, "impls": impls,
            "ratio": {"NCHW": g["cc NCHW"] / g["torch NCHW"] if "torch NCHW" in g else None,
                      "NHWC": g["cc NHWC"] / g["torch CL"] if "torch CL" in g else None}}


def isa_child(args):
    """``--isa-child ISA``: the rows at the level the parent's environment (ISA_CAPS) set; one JSON result line."""
    pin_malloc()
    _try_import("torch")
    import convcore

    _set_threads(args.threads)
    torch = sys.modules.get("torch")
    out = {"isa": args.isa_child, "kernel_isa": convcore.kernel_isa(), "torch": torch_isa_report(),
           "env": {k: os.environ.get(k) for k in ISA_CAPS.get(args.isa_child, {})}}
    out["peak"] = gemm_peak(args.threads, size=1024 if args.quick else None)
    ctx = torch.no_grad() if torch is not None else None
    if ctx is not None:
        ctx.__enter__()
    rows = []
    try:
        for layer, n in select_rows(args.rows, args.quick):
            r = bench_row_isa(layer, n, args)
            rows.append(r)
            print(f"{r['id']:<22} {args.isa_child} " + "  ".join(f"{c}={v:.1f}" for c, v in r["gflops"].items())
                  + f"  ratio NCHW={_fmt(r['ratio']['NCHW'], 2)} NHWC={_fmt(r['ratio']['NHWC'], 2)}"
                  + f"  torch ran {'/'.join(','.join(v) or 'ATen' for v in r['impls'].values())}", flush=True)
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    out["rows"] = rows
    print(_ISA_RESULT + json.dumps(out), flush=True)


def run_isa_rerun(rows, args, isa="avx2"):
    """Run `rows` again in a subprocess with convcore AND torch capped at `isa` (ISA_CAPS); return its result dict.

    The cap has to be set before torch starts, so it cannot be done in this process; the child measures its own GEMM
    peak at that level and reports what torch says it runs (ATen capability, oneDNN ISA and implementations).
    """
    ids = "|".join(re.escape(row_id(ly, n)) for ly, n in rows)
    cmd = [sys.executable, "-m", "benchmarks.engine", "--isa-child", isa, "--rows", f"^(?:{ids})$",
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--pause", str(args.pause),
           "--dtype", args.dtype] + (["--quick"] if args.quick else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=source_env(ISA_CAPS[isa]))
    result = None
    for line in proc.stdout:
        if line.startswith(_ISA_RESULT):
            result = json.loads(line[len(_ISA_RESULT):])
        else:
            print(line, end="", flush=True)
    if proc.wait() != 0 or result is None:
        raise RuntimeError(f"the {isa} rerun failed (exit status {proc.returncode}): {shlex.join(cmd)}")
    return result


def _torch_level_note(res):
    """One line saying at which level torch really ran in the rerun, from torch's own reports; warns on a mismatch."""
    th = res.get("torch") or {}
    if not th:
        return "torch is not installed: no ratios."
    isa = res["isa"]
    impls = sorted({i for r in res["rows"] for v in r["impls"].values() for i in v} | set(th.get("probe_impls", [])))
    above = [i for i in impls if "avx512" in i or "amx" in i] + \
        ([f"ATen {th['aten']}"] if th.get("aten", "").lower() != isa else []) + \
        ([f"oneDNN {th['onednn']}"] if isa.upper() not in (th.get("onednn") or "").upper().replace("-", "") else [])
    note = (f"torch reported ATen CPU capability `{th.get('aten')}`, oneDNN ISA `{th.get('onednn')}`; oneDNN "
            f"convolution implementations seen: {', '.join(f'`{i}`' for i in impls) or 'none'} (rows with none ran "
            f"ATen's own kernels, at its capability).")
    if above:
        note += f" **Not capped to {isa}: {', '.join(above)}** — these ratios are not like for like."
    return note


def isa_rerun_lines(rerun):
    """The report section of the extra run at a lower level (convcore and torch both capped; empty without one)."""
    if not rerun:
        return []
    isa = rerun["isa"]
    env = ", ".join(f"`{k}={v}`" for k, v in rerun["env"].items())
    top = peak_gflops(rerun.get("peak"))
    lines = [f"### The same rows at the {isa.upper()} level: convcore and torch both capped (subprocess)", "",
             f"Both contenders run at {isa} on this machine, in a child process started with {env}: convcore's "
             f"{rerun['kernel_isa']} kernels against torch's own {isa} code paths, i.e. what a CPU of this speed "
             f"with {isa} only would show. " + _torch_level_note(rerun), ""]
    if rerun.get("peak"):
        lines += [f"GEMM peak at this level: {rerun['peak']['text']}; `% peak` below is against it.", ""]
    lines += ["| row | cc NCHW | cc NHWC | torch NCHW | torch CL | NCHW ratio | NHWC ratio | % peak NCHW/NHWC "
              "| torch conv NCHW / CL |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rerun["rows"]:
        g = r["gflops"]
        impl = " / ".join(",".join(r["impls"].get(c, [])) or "ATen" for c in ("torch NCHW", "torch CL")
                          if c in r["impls"]) or NA
        lines.append(f"| {r['id']} | " + " | ".join(_fmt(g.get(c), 1) for c in ("cc NCHW", "cc NHWC", "torch NCHW",
                                                                                "torch CL"))
                     + f" | {_fmt(r['ratio']['NCHW'], 2)} | {_fmt(r['ratio']['NHWC'], 2)} | "
                     f"{_pct(g.get('cc NCHW'), top)}/{_pct(g.get('cc NHWC'), top)} | {impl} |")
    ratios = [v for r in rerun["rows"] for v in r["ratio"].values() if v is not None]
    if ratios:
        lines += ["", f"Geometric mean of convcore/torch at {isa}: **{_geomean(ratios):.2f}×**, lowest "
                      f"{min(ratios):.2f}×."]
    return lines + [""]


def explain(results, targets):
    """Generate the "why" lines for missed targets from this run's numbers (GEMM limit vs torch vs convcore)."""
    seen, lines = set(), []
    for t in targets:
        if t["status"] != "missed":
            continue
        for r, lay in t["rows"]:
            if (r["id"], lay) in seen:
                continue
            seen.add((r["id"], lay))
            g, s = r["gflops"], r["seconds"]
            cc_name, th_name = ("cc NCHW", "torch NCHW") if lay == "NCHW" else ("cc NHWC", "torch CL")
            msg = (f"- {r['id']} {lay} ({r['algo']}): convcore {g[cc_name]:.1f} vs torch {g[th_name]:.1f} GFLOP/s "
                   f"= {g[cc_name] / g[th_name]:.2f}×.")
            if r["layer"].is_depthwise:
                nbytes = r["layer"].data_bytes(r["n"])
                msg += (f" Direct depthwise kernel, no GEMM (9 multiply-adds per output value, so memory-bound): "
                        f"{1e3 * s[cc_name]:.2f} ms per call = {nbytes / s[cc_name] / 1e9:.1f} GB/s of input + "
                        f"output + weights, torch {nbytes / s[th_name] / 1e9:.1f} GB/s.")
            elif "GEMM limit" in g:
                gl = g["GEMM limit"]
                rest = s[cc_name] - s["GEMM limit"]
                msg += f" OpenBLAS sgemm on this GEMM shape alone (numpy) runs at {gl:.1f} GFLOP/s"
                if rest > 0:
                    msg += (f" ({gl / g[th_name]:.2f}× torch), so even with a free im2col convcore would reach at most "
                            f"~{gl / g[th_name]:.2f}×; convcore reaches {100 * g[cc_name] / gl:.0f}% of that GEMM: of "
                            f"its {1e3 * s[cc_name]:.2f} ms, ~{1e3 * s['GEMM limit']:.2f} ms would be the GEMM at "
                            f"numpy's speed and ~{1e3 * rest:.2f} ms im2col, packing and threading overhead.")
                else:
                    msg += (f", slower than convcore itself: the GEMM kernel, not im2col, is the gap (numpy's "
                            f"batched matmul may also have been hit by other users' load; re-run the row).")
            lines.append(msg)
    return lines


def render_section(args, info, peak, malloc_note, results, mem, largest, summary, targets, why, elapsed):
    """The BENCHMARKS.md section between the markers."""
    cmd = "python -m benchmarks.engine" + (" " + shlex.join(args.argv) if args.argv else "")
    out = [MARK_START, "## convcore layer benchmark", "",
           "Generated by `python -m benchmarks.engine` (benchmarks/engine.py); re-run to refresh. Everything between "
           "the markers is rewritten.", "",
           f"- Command: `{cmd}` (took {elapsed:.0f} s)",
           f"- Date: {utc_now()}; load average before / after the run: {args.load_before} / {args.load_after}",
           *machine_lines(info, peak),
           f"- Threads: {args.threads} for every contender (convcore `num_threads`, `torch.set_num_threads`, ORT "
           f"`intra_op_num_threads`, numpy's OpenBLAS via threadpoolctl).",
           f"- Method: one process; {args.dtype}; \"same\" padding; no bias. Per row a warm-up, then {args.repeats} "
           f"interleaved rounds (every contender {TIMED_PER_ROUND} timed calls per round, fewer once they took "
           f"{1e3 * TIMED_MAX_S:.0f} ms; pool order rotated); "
           f"{args.pause:.2f} s pause before each switch of thread pool, then untimed calls until one runs within "
           f"{SETTLE_FACTOR:g}x of the contender's best (at most {SETTLE_MAX_CALLS} more, {1e3 * SETTLE_MAX_S:.0f} ms), "
           f"so that no sample includes waking the pool's threads. GFLOP/s = "
           f"2·N·Cout·prod(out)·Cin/g·prod(k) / median seconds. glibc: {malloc_note}. Outputs checked against a "
           f"float64 torch reference (max error / max |ref| < {CHECK_RTOL:g}).",
           "- Memory: for each probed row, a fresh subprocess allocates and touches input, weights and output, "
           "runs a tiny layer of the same kind (one-time runtime init, reported apart), resets the peak-RSS counter "
           "(`/proc/self/clear_refs`), builds the plan and runs it twice; "
           "mem× = (data + (VmHWM − RSS before)) / (input + output + weights). Torch (no `out=`) allocates its "
           "output inside the measured window.",
           "- The machine is shared: absolute numbers move with other users' load; compare ratios within one run "
           "and look at `spread %` (largest interquartile range / median of the convcore and torch samples); a row "
           "whose spread exceeded the `--rerun-spread` limit was measured a second time and the steadier run kept "
           "(marked \"2nd run\").",
           "", "### Results (GFLOP/s, medians)", "", format_table(results, mem, peak), "",
           "Ratios are convcore / torch in the same layout (cc NCHW / torch NCHW, cc NHWC / torch CL). "
           "`cc NCHW`/`cc NHWC` are the default plans (`algorithm=\"auto\"`: the packed micro-kernels, direct "
           "depthwise); `cc blas` the im2col + BLAS implementation (`algorithm=\"blas\"`). `% peak` is cc / the "
           "measured GEMM peak above. `cc conv()` is the per-call API (plan + output allocation every call). ORT "
           "runs NCHW only.", "",
           *isa_rerun_lines(getattr(args, "isa_rerun", None)),
           "### Summary and targets (issue 2)", ""]
    out += [f"- {s}" for s in summary]
    for t in targets:
        out.append(f"- {t['name']}: **{t['status']}** — {t['text']}")
    if largest in mem:
        extra = [f"{k}: {v['extra'] / 2 ** 20:.1f} MiB beyond its data (+ {v['init'] / 2 ** 20:.1f} MiB one-time "
                 f"runtime init)" for k, v in mem[largest].items() if "extra" in v]
        out.append(f"- Largest row {largest} ({mem_method(mem)}): " + "; ".join(extra))
    out += ["", "### Why targets are missed (generated from this run)", ""]
    out += why or ["- All targets met in this run."]
    out += ["", MARK_END]
    return "\n".join(out) + "\n"


def mem_method(mem):
    for m in mem.values():
        for v in m.values():
            if "method" in v:
                return v["method"]
    return "not measured"


# --------------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few small rows, 3 repeats (smoke test, < 30 s)")
    p.add_argument("--rows", metavar="PATTERN", help="regex searched in row ids (e.g. '3x3_c64/b8') and labels")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds per row (default 9, quick 3)")
    p.add_argument("--threads", type=int, default=2, help="threads for every contender (default 2)")
    p.add_argument("--pause", type=float, default=None,
                   help="seconds of sleep when switching thread pools (default 0.2, quick 0.05)")
    p.add_argument("--output", default=None,
                   help="Markdown file whose marked section is (re)written (default BENCHMARKS.md at the repo root)")
    p.add_argument("--no-per-call", action="store_true", help="skip the convcore.conv() per-call column")
    p.add_argument("--mem", choices=("all", "largest", "none"), default=None,
                   help="memory probes: every row, the largest row only, or none (default: all; quick: largest)")
    p.add_argument("--rerun-spread", type=float, default=None,
                   help="re-run a row once (keeping the steadier run) when its spread exceeds this fraction "
                        "(default 0.5; quick: 0 = never)")
    p.add_argument("--no-isa-rerun", action="store_true",
                   help="skip the extra run at the AVX2 level (convcore and torch capped, in a subprocess) on an "
                        "AVX-512 machine (--quick skips it too)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="element type of every contender (default float32; float64 runs without ORT and memory "
                        "probes, and needs --output: the GEMM peak stays the float32 one)")
    p.add_argument("--memprobe", help=argparse.SUPPRESS)
    p.add_argument("--isa-child", choices=tuple(ISA_CAPS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.repeats is None:
        args.repeats = 3 if args.quick else 9
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.pause is None:
        args.pause = 0.05 if args.quick else 0.2
    if args.rerun_spread is None:
        args.rerun_spread = 0.0 if args.quick else 0.5
    if args.mem is None:
        args.mem = "largest" if args.quick else "all"
    if args.dtype != "float32" and not args.isa_child:
        if args.output is None:
            p.error("--dtype float64 needs --output (BENCHMARKS.md's generated section is the float32 run)")
        args.mem = "none"
    if args.output is None:
        args.output = os.path.join(ROOT, "BENCHMARKS.md")
    args.argv = list(argv)
    return args


def _set_threads(threads):
    """Give every library the same thread count; scipy's BLAS stays at 1 (convcore calls it inside its own team)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    set_numpy_blas_threads(threads)


def run_benchmark(args):
    """Run the selected rows, print the table and targets, write the report. Returns the results."""
    t_start = time.perf_counter()
    rows = select_rows(args.rows, args.quick)
    if not rows:
        raise SystemExit(f"no row matches {args.rows!r}; rows are: "
                         + ", ".join(row_id(ly, n) for ly in SUITE for n in ly.batches))
    malloc_note = pin_malloc()
    args.load_before = load_average()
    for name in ("torch", "onnx", "onnxruntime"):
        _try_import(name)
    import convcore

    convcore.make_plan  # noqa: B018  (fail early if the engine is not importable)
    _set_threads(args.threads)
    info = machine_info()
    torch = sys.modules.get("torch")
    ctx = torch.no_grad() if torch is not None else None
    if ctx is not None:
        ctx.__enter__()
    try:
        # The quick smoke run takes a small square; a full run the largest that fits ~1.5 s a call (4096³ mostly).
        peak = gemm_peak(args.threads, size=1024 if args.quick else None)
        print("\n".join("# " + line[2:] for line in machine_lines(info, peak)), flush=True)
        print(f"# glibc: {malloc_note}; load average {args.load_before}", flush=True)
        results = []
        for layer, n in rows:
            t0 = time.perf_counter()
            r = bench_row(layer, n, args)
            if args.rerun_spread and _row_spread(r) > args.rerun_spread:
                # A burst of other users' load hit this row: measure it again and keep the steadier run.
                print(f"{r['id']:<22} spread {100 * _row_spread(r):.0f}%: re-running", flush=True)
                r2 = bench_row(layer, n, args)
                r = min((r, r2), key=_row_spread)
                r["rerun"] = True
            results.append(r)
            g = r["gflops"]
            print(f"{r['id']:<22} " + "  ".join(f"{c}={g[c]:.1f}" for c, _ in CONTENDERS if c in g)
                  + f"  ratio NCHW={_fmt(r['ratio']['NCHW'], 2)} NHWC={_fmt(r['ratio']['NHWC'], 2)}"
                  + (f"  WRONG: {r['bad']}" if r["bad"] else "") + f"  ({time.perf_counter() - t0:.1f} s)",
                  flush=True)
        args.isa_rerun = None
        if not (args.no_isa_rerun or args.quick) and info.get("kernel_isa") == "avx512":
            # The AVX2 level on the same machine, convcore and torch both capped: what an AVX2-only CPU would show.
            print("# extra run at the AVX2 level (convcore and torch capped, in a subprocess)", flush=True)
            args.isa_rerun = run_isa_rerun(rows, args, "avx2")
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    largest = max(results, key=lambda r: r["layer"].data_bytes(r["n"]))["id"]
    mem = {}
    if args.mem != "none":
        probe_ids = [r["id"] for r in results] if args.mem == "all" else [largest]
        for rid in probe_ids:
            names = ["cc NCHW", "cc NHWC"]
            if rid == largest and torch is not None and not args.quick:
                names += ["torch NCHW", "torch CL"]
            mem[rid] = {name: probe_memory(rid, name, args.threads) for name in names}
    summary, targets = evaluate_targets(results, mem, largest)
    why = explain(results, targets)
    elapsed = time.perf_counter() - t_start
    args.load_after = load_average()
    section = render_section(args, info, peak, malloc_note, results, mem, largest, summary, targets, why, elapsed)
    print()
    print(section)
    write_section(args.output, section, MARK_START, MARK_END)
    print(f"wrote {args.output} ({elapsed:.0f} s)")
    return results


def main(argv=None):
    """Entry point of ``python -m benchmarks.engine`` (and ``python -m convcore.bench``)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.memprobe:
        rid, contender = args.memprobe.split("|")
        print(json.dumps(memory_probe(rid, contender, args.threads)))
        return 0
    if args.isa_child:
        isa_child(args)
        return 0
    run_benchmark(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
