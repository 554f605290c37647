"""convcore's engine machinery: threads, tiles, algorithms (fast paths vs the general path), plans, ``out=`` buffers,
NaN/Inf, the GIL, and the small helper API (openmp_enabled, resolve_num_threads, max_output_bytes, output_shape).

Every result is still checked against the float64 reference, so agreeing with each other is never enough to pass.
"""
import inspect
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings, strategies as st

# Tiny layers would otherwise run on one thread (see convcore._threads.SMALL_WORK_FLOPS).
pytestmark = pytest.mark.usefixtures("threads_for_any_size")

from _conv_helpers import REFERENCE_ACTIVATIONS, assert_conv_close, check_conv, conv_configs, magnitude, make_arrays
from _reference import reference_conv, reference_output_shape

convcore = pytest.importorskip("convcore")

ALGORITHMS = ("packed_gemm", "gemm_direct", "im2col_gemm", "depthwise")
_PLAN_KEYWORDS = set(inspect.signature(convcore.make_plan).parameters)
needs_algorithm = pytest.mark.skipif("algorithm" not in _PLAN_KEYWORDS,
                                     reason="convcore.make_plan has no algorithm= keyword (optional in this API)")
needs_tile_size = pytest.mark.skipif("tile_size" not in _PLAN_KEYWORDS,
                                     reason="convcore.make_plan has no tile_size= keyword (optional in this API)")
FORMATS = ("channels_first", "channels_last")

# Layers big enough that num_threads=None picks more than one thread and that there are many tiles.
# name -> (rank, batch, cin, cout, groups, spatial, ksize, conv keywords)
LAYERS = {
    "3x3": (2, 2, 16, 32, 1, (24, 24), (3, 3), dict(padding="same", activation="relu")),
    "3x3_s2_dil": (2, 2, 8, 16, 1, (25, 24), (3, 3), dict(strides=2, dilation=(1, 2), padding=((1, 2), (0, 1)))),
    "1x1": (2, 2, 32, 48, 1, (20, 20), (1, 1), dict()),
    "1x1_s2": (2, 2, 32, 48, 1, (21, 20), (1, 1), dict(strides=2)),
    "grouped": (2, 2, 16, 24, 4, (20, 20), (3, 3), dict(padding=1, activation="tanh")),
    "depthwise": (2, 2, 24, 24, 24, (28, 28), (3, 3), dict(padding="same", activation="relu6")),
    "depthwise_x2": (2, 2, 12, 24, 12, (27, 26), (3, 3), dict(strides=2, padding="same")),
    "conv1d": (1, 2, 16, 32, 1, (300,), (5,), dict(dilation=2, padding="causal")),
    "conv3d": (3, 1, 8, 16, 1, (8, 10, 10), (3, 3, 3), dict(padding="same")),
    "depthwise3d": (3, 1, 8, 8, 8, (6, 9, 9), (3, 3, 3), dict(padding=1)),
}


def _layer(name, data_format="channels_first", dtype=np.float32, seed=0):
    rank, batch, cin, cout, groups, spatial, ksize, kw = LAYERS[name]
    x, w, b = make_arrays(np.random.default_rng(seed), rank=rank, batch=batch, cin=cin, cout=cout, groups=groups,
                          spatial=spatial, ksize=ksize, data_format=data_format, kernel_layout=None, dtype=dtype)
    return x, w, b, dict(kw, groups=groups, data_format=data_format)


def _plan_output_shape(plan, batch=None):
    """ConvPlan.output_shape is a method taking an optional batch (an attribute in older drafts of the API)."""
    shape = plan.output_shape
    if callable(shape):
        return tuple(shape() if batch is None else shape(batch))
    return tuple(shape) if batch is None else (batch,) + tuple(shape)[1:]


def _check_against_reference(y, x, w, b, kw, what):
    """Compare with the reference only (cheaper than check_conv, used when one layer is run many ways)."""
    assert y.dtype == x.dtype
    assert_conv_close(y, reference_conv(x, w, b, **kw), magnitude(x, w, b, **{k: v for k, v in kw.items()
                                                                              if k != "activation"}), x.dtype, what)


# ======================================================================================================================
# Helper API
# ======================================================================================================================
def test_openmp_enabled_is_a_bool():
    assert type(convcore.openmp_enabled()) is bool


def test_resolve_num_threads():
    n_all = convcore.resolve_num_threads(None)
    assert isinstance(n_all, int) and n_all >= 1
    n_minus1 = convcore.resolve_num_threads(-1)
    assert isinstance(n_minus1, int) and n_minus1 >= 1
    assert convcore.resolve_num_threads(1) == 1
    if not convcore.openmp_enabled():
        assert n_all == 1  # without OpenMP everything is sequential


def test_resolve_num_threads_respects_omp_num_threads():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", "import convcore; print(convcore.resolve_num_threads(None))"],
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "1", out


def test_max_output_bytes_roundtrip_and_default():
    old = convcore.get_max_output_bytes()
    assert old >= 2**30, "the default should be a few GiB"
    try:
        convcore.set_max_output_bytes(12345)
        assert convcore.get_max_output_bytes() == 12345
        x = np.ones((1, 1, 64, 64), np.float32)
        w = np.ones((1, 1, 1, 1), np.float32)
        with pytest.raises(ValueError, match=r"bytes"):
            convcore.conv(x, w)  # 16 KiB of output > 12345 bytes
        assert convcore.conv(x[:, :, :32, :32], w).shape == (1, 1, 32, 32)  # 4 KiB is fine
    finally:
        convcore.set_max_output_bytes(old)
    assert convcore.get_max_output_bytes() == old
    assert convcore.conv(np.ones((1, 1, 64, 64), np.float32), np.ones((1, 1, 1, 1), np.float32)).shape == (1, 1, 64, 64)


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("data_format", FORMATS)
def test_output_shape_matches_actual_outputs(name, data_format):
    x, w, b, kw = _layer(name, data_format)
    y = convcore.conv(x, w, b, **kw)
    shape_kw = {k: v for k, v in kw.items() if k != "activation"}
    assert tuple(convcore.output_shape(x.shape, w.shape, **shape_kw)) == y.shape
    assert tuple(convcore.output_shape(x.shape, w.shape, **kw)) == y.shape  # activation accepted and irrelevant
    assert y.shape == reference_output_shape(x.shape, w.shape, **kw)
    plan = convcore.make_plan(x.shape, w, b, **kw)
    assert _plan_output_shape(plan) == y.shape
    assert _plan_output_shape(plan, 5) == (5,) + y.shape[1:]


# ======================================================================================================================
# Threads and tiles
# ======================================================================================================================
@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("data_format", FORMATS)
def test_results_independent_of_num_threads(name, data_format):
    x, w, b, kw = _layer(name, data_format)
    results = {}
    for n in (1, 2, -1, None):
        results[n] = y = convcore.conv(x, w, b, num_threads=n, **kw)
        _check_against_reference(y, x, w, b, kw, f"num_threads={n}")
    mag = magnitude(x, w, b, **{k: v for k, v in kw.items() if k != "activation"})
    for n in (2, -1, None):
        assert_conv_close(results[n], results[1].astype(np.float64), mag, x.dtype, f"num_threads={n} vs 1")


@needs_algorithm
@needs_tile_size
@pytest.mark.parametrize("name", ["3x3", "1x1", "depthwise", "conv1d", "conv3d"])
@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("algorithm", ["auto", "packed", "blas", "im2col", "general"])
def test_fixed_tiling_is_bitwise_independent_of_num_threads(name, data_format, algorithm):
    """With the tiling fixed, the thread count only decides who computes which tile: any difference is a race."""
    x, w, b, kw = _layer(name, data_format)
    ys = [convcore.make_plan(x.shape, w, b, algorithm=algorithm, tile_size=37, num_threads=n, **kw).run(x)
          for n in (1, 2, 2, -1)]
    _check_against_reference(ys[0], x, w, b, kw, f"{algorithm}, tile_size=37")
    for y in ys[1:]:
        np.testing.assert_array_equal(y, ys[0])


@needs_algorithm
@needs_tile_size
@pytest.mark.parametrize("name", ["3x3", "3x3_s2_dil", "1x1_s2", "grouped", "depthwise_x2", "conv1d", "conv3d",
                                  "depthwise3d"])
@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("algorithm", ["auto", "packed", "blas", "im2col", "general"])
def test_results_independent_of_tile_size(name, data_format, algorithm):
    x, w, b, kw = _layer(name, data_format, dtype=np.float64)
    n_pixels = int(np.prod(reference_output_shape(x.shape, w.shape, **kw))) // w.shape[0 if data_format ==
                                                                                       "channels_first" else -1]
    for tile in (3, 7, 64, 1000, n_pixels, 10 * n_pixels, None):  # tile_size=1: see the memory-safety tests
        plan = convcore.make_plan(x.shape, w, b, algorithm=algorithm, tile_size=tile, num_threads=2, **kw)
        _check_against_reference(plan.run(x), x, w, b, kw, f"{algorithm}, tile_size={tile}")


@needs_algorithm
@needs_tile_size
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=conv_configs([a for a in convcore.ACTIVATIONS if a in REFERENCE_ACTIVATIONS]),
       algorithm=st.sampled_from(["auto", "packed", "blas", "im2col", "general"]), tile=st.one_of(st.none(), st.integers(1, 40)),
       num_threads=st.sampled_from([1, 2, None]), batch_at_run=st.integers(1, 3))
def test_plans_hypothesis(cfg, algorithm, tile, num_threads, batch_at_run):
    """Random layers through make_plan with a random algorithm, tile size and thread count, run at another batch."""
    note(repr(cfg))
    kw = dict(cfg.pop("kw"), groups=cfg["groups"], data_format=cfg["data_format"])
    if cfg["kernel_layout"] is not None:
        kw["kernel_layout"] = cfg["kernel_layout"]
    rng = np.random.default_rng(cfg.pop("seed"))
    x, w, b = make_arrays(rng, **{k: v for k, v in cfg.items() if k not in ("batch",)}, batch=batch_at_run)
    plan = convcore.make_plan((cfg["batch"],) + x.shape[1:], w, b, algorithm=algorithm, tile_size=tile,
                              num_threads=num_threads, **kw)
    assert plan.algorithm in ALGORITHMS
    y = plan.run(x)
    _check_against_reference(y, x, w, b, kw, f"plan({algorithm}, tile_size={tile}, num_threads={num_threads})")


# ======================================================================================================================
# Algorithms: fast paths vs the general path
# ======================================================================================================================
@needs_algorithm
@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_general_path_agrees_with_fast_paths(name, data_format, dtype):
    x, w, b, kw = _layer(name, data_format, dtype)
    mag = magnitude(x, w, b, **{k: v for k, v in kw.items() if k != "activation"})
    results = {}
    for algorithm in ("auto", "packed", "blas", "im2col", "general"):
        plan = convcore.make_plan(x.shape, w, b, algorithm=algorithm, **kw)
        assert plan.algorithm in ALGORITHMS, plan.algorithm
        results[algorithm] = y = plan.run(x)
        _check_against_reference(y, x, w, b, kw, f"algorithm={algorithm} ({plan.algorithm})")
    for algorithm in ("auto", "packed", "blas", "im2col"):
        assert_conv_close(results[algorithm], results["general"].astype(np.float64), 2 * mag, dtype,
                          f"{algorithm} vs general")


@needs_algorithm
@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("name, auto, blas", [
    ("1x1", "packed_gemm", "gemm_direct"),
    ("3x3", "packed_gemm", "im2col_gemm"),
    ("3x3_s2_dil", "packed_gemm", "im2col_gemm"),
    ("grouped", "packed_gemm", "im2col_gemm"),
    ("depthwise", "depthwise", "depthwise"),
    ("depthwise_x2", "depthwise", "depthwise"),
])
def test_auto_picks_the_documented_algorithm(data_format, name, auto, blas):
    x, w, b, kw = _layer(name, data_format)
    assert convcore.make_plan(x.shape, w, b, **kw).algorithm == auto
    assert convcore.make_plan(x.shape, w, b, algorithm="blas", **kw).algorithm == blas
    assert convcore.make_plan(x.shape, w, b, algorithm="packed", **kw).algorithm == "packed_gemm"
    assert convcore.make_plan(x.shape, w, b, algorithm="im2col", **kw).algorithm == "im2col_gemm"


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("kw", [dict(strides=2), dict(strides=(1, 2)), dict(padding=1), dict(padding=((0, 1), (0, 0)))],
                         ids=["s2", "s1x2", "pad1", "pad_asym"])
def test_1x1_with_stride_or_padding_is_not_plain_gemm(data_format, kw):
    """The STYLE trap: a 1x1 fast path taken without checking stride and padding."""
    rng = np.random.default_rng(1)
    x, w, b = make_arrays(rng, rank=2, batch=2, cin=6, cout=5, groups=1, spatial=(7, 8), ksize=(1, 1),
                          data_format=data_format, kernel_layout=None, dtype=np.float64)
    kw = dict(kw, data_format=data_format)
    assert convcore.make_plan(x.shape, w, b, algorithm="blas", **kw).algorithm != "gemm_direct"
    check_conv(convcore.conv, x, w, b, **kw)


# ======================================================================================================================
# Plans
# ======================================================================================================================
@pytest.mark.parametrize("name", ["3x3", "1x1", "depthwise", "conv1d", "conv3d"])
@pytest.mark.parametrize("data_format", FORMATS)
def test_plan_reused_across_inputs_and_batch_sizes(name, data_format):
    x, w, b, kw = _layer(name, data_format)
    plan = convcore.make_plan(x.shape, w, b, **kw)
    assert plan.algorithm in ALGORITHMS
    rng = np.random.default_rng(5)
    inputs = [x] + [rng.standard_normal((n,) + x.shape[1:]).astype(x.dtype) for n in (1, 3, x.shape[0])]
    first = [plan.run(xi) for xi in inputs]
    for xi, y in zip(inputs, first):
        assert y.shape == _plan_output_shape(plan, xi.shape[0])
        _check_against_reference(y, xi, w, b, kw, f"plan.run batch {xi.shape[0]}")
    # running again, interleaved, gives the same bits: no state leaks from one run into the next
    for xi, y in zip(reversed(inputs), reversed(first)):
        np.testing.assert_array_equal(plan.run(xi), y)
    # a plan and a one-shot conv agree
    assert_conv_close(first[0], convcore.conv(x, w, b, **kw).astype(np.float64),
                      magnitude(x, w, b, **{k: v for k, v in kw.items() if k != "activation"}), x.dtype,
                      "plan.run vs conv")


def test_two_live_plans_do_not_share_workspace():
    xa, wa, ba, kwa = _layer("3x3", "channels_last")
    xb, wb, bb, kwb = _layer("conv3d", "channels_first", seed=1)
    pa, pb = convcore.make_plan(xa.shape, wa, ba, **kwa), convcore.make_plan(xb.shape, wb, bb, **kwb)
    ya1, yb1 = pa.run(xa), pb.run(xb)
    ya2, yb2 = pa.run(xa), pb.run(xb)
    np.testing.assert_array_equal(ya1, ya2)
    np.testing.assert_array_equal(yb1, yb2)
    _check_against_reference(ya2, xa, wa, ba, kwa, "plan a")
    _check_against_reference(yb2, xb, wb, bb, kwb, "plan b")


@pytest.mark.parametrize("name", ["3x3", "depthwise", "1x1"])
def test_one_cached_plan_used_from_two_threads(name):
    """What a server does with a cached plan: concurrent requests run the same plan at once."""
    x, w, b, kw = _layer(name, "channels_last")
    plan = convcore.make_plan(x.shape, w, b, num_threads=1, **kw)
    rng = np.random.default_rng(11)
    inputs = [rng.standard_normal(x.shape).astype(x.dtype) for _ in range(4)]
    expected = [plan.run(xi) for xi in inputs]
    errors = []

    def worker(order):
        try:
            for _ in range(3):
                for i in order:
                    np.testing.assert_array_equal(plan.run(inputs[i]), expected[i])
        except Exception as exc:  # reported from the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(order,)) for order in ([0, 1, 2, 3], [3, 2, 1, 0])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[0]
    _check_against_reference(expected[0], inputs[0], w, b, kw, "cached plan")


# ======================================================================================================================
# out= buffers
# ======================================================================================================================
@pytest.mark.parametrize("name", ["3x3", "1x1", "depthwise", "conv1d", "conv3d"])
@pytest.mark.parametrize("data_format", FORMATS)
def test_out_buffer_is_filled_and_returned(name, data_format):
    x, w, b, kw = _layer(name, data_format)
    shape = reference_output_shape(x.shape, w.shape, **kw)
    out = np.full(shape, np.nan, dtype=x.dtype)  # every element must be overwritten
    y = convcore.conv(x, w, b, out=out, **kw)
    assert np.shares_memory(y, out) and y.shape == shape
    _check_against_reference(out, x, w, b, kw, "conv(out=)")
    # reuse the same buffer for a different input
    x2 = (x * -0.5).astype(x.dtype)
    convcore.conv(x2, w, b, out=out, **kw)
    _check_against_reference(out, x2, w, b, kw, "conv(out=) reused")
    # through a plan
    plan = convcore.make_plan(x.shape, w, b, **kw)
    out[...] = np.nan
    y = plan.run(x, out=out)
    assert np.shares_memory(y, out)
    _check_against_reference(out, x, w, b, kw, "plan.run(out=)")


@pytest.mark.parametrize("data_format", FORMATS)
def test_non_contiguous_out_is_written_correctly_or_refused(data_format):
    x, w, b, kw = _layer("3x3", data_format)
    shape = reference_output_shape(x.shape, w.shape, **kw)
    big = np.full(shape[:-1] + (2 * shape[-1],), -7.0, dtype=x.dtype)
    out = big[..., ::2]
    try:
        y = convcore.conv(x, w, b, out=out, **kw)
    except ValueError as exc:
        assert "out" in str(exc), f"refusal of a strided out= does not name out: {exc}"
        return
    assert np.shares_memory(y, big)
    _check_against_reference(out, x, w, b, kw, "strided out=")
    assert (big[..., 1::2] == -7.0).all(), "writing a strided out= touched the elements between"


# ======================================================================================================================
# NaN and Inf
# ======================================================================================================================
@needs_algorithm
@pytest.mark.parametrize("name", ["3x3", "1x1", "depthwise", "conv1d", "conv3d", "grouped"])
@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("algorithm", ["auto", "packed", "blas", "im2col", "general"])
@pytest.mark.parametrize("activation", [None, "relu", "sigmoid"])
def test_nan_and_inf_propagate(name, data_format, algorithm, activation):
    x, w, b, kw = _layer(name, data_format, dtype=np.float64)
    kw["activation"] = activation
    x = x.copy()
    flat = x.reshape(-1)  # a view: x is contiguous
    n = flat.size
    flat[n // 7], flat[n // 2], flat[(5 * n) // 6] = np.nan, np.inf, -np.inf
    y = convcore.make_plan(x.shape, w, b, algorithm=algorithm, **kw).run(x)
    expected = reference_conv(x, w, b, **kw)
    assert np.isnan(expected).any() and np.isinf(expected).any() or activation is not None
    _check_against_reference(y, x, w, b, kw, f"NaN/Inf, {algorithm}")


@pytest.mark.parametrize("data_format", FORMATS)
def test_nan_in_kernel_and_bias_propagate(data_format):
    x, w, b, kw = _layer("3x3", data_format, dtype=np.float32)
    w, b = w.copy(), b.copy()
    w.reshape(-1)[3] = np.nan
    b[-1] = np.inf
    _check_against_reference(convcore.conv(x, w, b, **kw), x, w, b, kw, "NaN kernel / Inf bias")


# ======================================================================================================================
# The GIL
# ======================================================================================================================
@pytest.mark.parametrize("name", ["3x3", "depthwise", "conv3d"])
def test_concurrent_python_threads_get_correct_results(name):
    xs, expected = [], []
    for seed in range(4):
        x, w, b, kw = _layer(name, "channels_last" if seed % 2 else "channels_first", seed=seed)
        xs.append((x, w, b, kw))
        expected.append(convcore.conv(x, w, b, num_threads=1, **kw))
    results, errors = {}, []

    def worker(i):
        try:
            x, w, b, kw = xs[i]
            for r in range(3):
                results[(i, r)] = convcore.conv(x, w, b, num_threads=1, **kw)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[0]
    for (i, r), y in results.items():
        np.testing.assert_array_equal(y, expected[i])
    for i, (x, w, b, kw) in enumerate(xs):
        _check_against_reference(expected[i], x, w, b, kw, f"thread input {i}")


def test_gil_is_released_during_compute():
    """While one thread runs a long conv, the main thread keeps running Python code.

    If the GIL were held, the main thread would be stopped for the whole call (max gap ~ the call's duration).
    """
    rng = np.random.default_rng(0)
    # many flops per byte: a long call with little memory
    w = (rng.standard_normal((256, 256, 5, 5)) * 0.01).astype(np.float32)
    x = rng.standard_normal((2, 256, 16, 16)).astype(np.float32)
    plan = convcore.make_plan(x.shape, w, padding="same", num_threads=1)
    plan.run(x)  # warm up
    t0 = time.perf_counter()
    plan.run(x)
    per_item = (time.perf_counter() - t0) / 2
    batch = int(min(64, max(2, np.ceil(0.3 / per_item))))  # aim at a call of ~0.3 s
    x = rng.standard_normal((batch, 256, 16, 16)).astype(np.float32)
    t0 = time.perf_counter()
    plan.run(x)
    duration = time.perf_counter() - t0

    # While the worker is inside the kernel, the main thread must keep running Python code. If the kernel held the
    # GIL the main thread could not run a single iteration until it returned (the switch interval does not apply
    # to C code holding the GIL). Count iterations that happen strictly between "kernel entered" and "returned":
    # a busy machine slows the count, but only a held GIL makes it zero.
    started = threading.Event()
    done = threading.Event()

    def work():
        started.set()
        plan.run(x)
        done.set()

    worker = threading.Thread(target=work)
    worker.start()
    started.wait()
    time.sleep(0.02)  # let the worker get into the kernel
    spins = 0
    while not done.is_set():
        spins += 1
    worker.join()
    assert spins > 100, f"main thread ran {spins} iterations during a {duration:.3f} s conv: GIL held?"


# ======================================================================================================================
# dtype
# ======================================================================================================================
@needs_algorithm
@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_output_dtype_is_input_dtype_on_every_path(name, dtype):
    x, w, b, kw = _layer(name, "channels_last", dtype)
    for algorithm in ("auto", "im2col", "general"):
        assert convcore.make_plan(x.shape, w, b, algorithm=algorithm, **kw).run(x).dtype == dtype
    assert convcore.conv(x, w, b, **kw).dtype == dtype


# ======================================================================================================================
# Memory safety (in a subprocess)
# ======================================================================================================================
# A write past a workspace does not give wrong numbers: glibc aborts later, in whatever code frees memory next, killing
# the whole pytest run without saying which call was at fault. So these run in a child process with glibc's heap checks
# on (MALLOC_CHECK_=3, MALLOC_PERTURB_), which prints each case before running it: a crash names the case.
_CHILD = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import convcore
from _reference import reference_conv
for i, case in enumerate(json.loads(sys.stdin.read())):
    print("case", i, json.dumps(case), flush=True)
    x = np.random.default_rng(i).standard_normal(case["x"]).astype(case["dtype"])
    w = np.random.default_rng(i + 1).standard_normal(case["w"]).astype(case["dtype"])
    kw = {k: (tuple(map(tuple, v)) if k == "padding" and isinstance(v, list) else
              tuple(v) if isinstance(v, list) else v) for k, v in case["kw"].items()}
    plan_kw = {k: kw.pop(k) for k in ("algorithm", "tile_size") if k in kw}
    for _ in range(3):
        y = convcore.make_plan(x.shape, w, **plan_kw, num_threads=2, **kw).run(x)
    err = float(np.abs(y - reference_conv(x, w, **kw)).max())
    if not err <= 1e-3 * max(1.0, float(np.abs(y).max())):
        print("WRONG", err, flush=True)
        sys.exit(3)
print("ALL OK", flush=True)
"""


def _run_child(cases):
    env = dict(os.environ, MALLOC_CHECK_="3", MALLOC_PERTURB_="165", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", _CHILD, os.path.dirname(os.path.abspath(__file__))],
                          input=json.dumps(cases), env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or lines[-1] != "ALL OK":
        last = next((ln for ln in reversed(lines) if ln.startswith("case ")), "(none)")
        kind = "WRONG result" if proc.returncode == 3 else "crash"
        raise AssertionError(f"child exited with {proc.returncode} ({kind}) at {last}\n"
                             f"stderr tail: {proc.stderr[-400:]}")


def _mk(rank, fmt, cin, cout, groups, spatial, ksize, dtype="float64", **kw):
    if fmt == "channels_first":
        x, w = [1, cin] + list(spatial), [cout, cin // groups] + list(ksize)
    else:
        x, w = [1] + list(spatial) + [cin], list(ksize) + [cin // groups, cout]
    return dict(x=x, w=w, dtype=dtype, kw=dict(kw, data_format=fmt, groups=groups))


def test_memory_safety_default_tiling_with_wide_left_padding():
    """Many default-sized tiles ending mid-row while the row's left padding is wider than the tile's last segment."""
    cases = []
    for fmt in FORMATS:
        cases.append(_mk(2, fmt, 1, 1, 1, (1000, 20), (3, 1), padding=[[1, 1], [30, 0]]))
        cases.append(_mk(2, fmt, 2, 3, 1, (700, 9), (3, 2), padding=[[0, 0], [40, 3]], strides=[1, 2]))
        cases.append(_mk(1, fmt, 1, 2, 1, (5000,), (3,), padding=[[900, 0]]))
        cases.append(_mk(3, fmt, 1, 2, 1, (40, 30, 5), (2, 2, 1), padding=[[0, 0], [0, 0], [25, 0]]))
    _run_child(cases)


@needs_algorithm
@needs_tile_size
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("data_format", FORMATS)
def test_memory_safety_tiny_tiles_and_large_padding(rank, data_format):
    """tile_size 1..3 with padding wider than the dilated kernel, on every algorithm."""
    size = {1: 30, 2: 7, 3: 4}[rank]
    cases = []
    for algorithm in ("auto", "im2col", "general"):
        for tile in (1, 2, 3):
            for groups, cin, cout, k, d, pad in ((1, 2, 3, 5, 2, 8), (1, 1, 1, 3, 1, 5), (2, 2, 2, 2, 1, 4),
                                                 (3, 3, 6, 3, 1, 6)):
                cases.append(_mk(rank, data_format, cin, cout, groups, (size,) * rank, (k,) * rank,
                                 padding=[[pad, pad // 2]] * rank, dilation=d, algorithm=algorithm, tile_size=tile))
    _run_child(cases)


def test_small_work_runs_on_one_thread():
    """Below the cut-off a call runs on one thread whatever was asked; above it the count is honoured."""
    from convcore._threads import SMALL_WORK_FLOPS, resolve_num_threads

    assert resolve_num_threads(2, flops=SMALL_WORK_FLOPS - 1) == 1
    expected = 2 if convcore.openmp_enabled() else 1
    assert resolve_num_threads(2, flops=SMALL_WORK_FLOPS) == expected
    assert resolve_num_threads(2) == expected


# ======================================================================================================================
# The packed micro-kernels: every CPU level, edge tiles, channel splits, blocking, bit-exact batching
# ======================================================================================================================
from convcore._isa import ISA_NAMES, cpu_isa  # noqa: E402

#: Kernel levels this CPU runs (CONVCORE_ISA can force each), lowest first.
LEVELS = ISA_NAMES[:ISA_NAMES.index(cpu_isa()) + 1]


@pytest.fixture(params=LEVELS)
def level(request, monkeypatch):
    monkeypatch.setenv("CONVCORE_ISA", request.param)
    return request.param


def _small(rng, *, rank=2, batch=1, cin=3, cout=4, spatial=(5, 6), ksize=(3, 3), groups=1, data_format, dtype):
    return make_arrays(rng, rank=rank, batch=batch, cin=cin, cout=cout, groups=groups, spatial=spatial, ksize=ksize,
                       data_format=data_format, kernel_layout=None, dtype=dtype)


def test_kernel_isa_names_the_level_and_honours_convcore_isa(monkeypatch):
    monkeypatch.delenv("CONVCORE_ISA", raising=False)
    assert convcore.kernel_isa() == cpu_isa()
    x, w, b = _small(np.random.default_rng(0), data_format="channels_first", dtype=np.float32)
    assert convcore.make_plan(x.shape, w, b).isa == cpu_isa()
    for name in LEVELS:
        monkeypatch.setenv("CONVCORE_ISA", name.upper())
        assert convcore.kernel_isa() == name
        assert convcore.make_plan(x.shape, w, b).isa == name
    monkeypatch.setenv("CONVCORE_ISA", "sse9")
    with pytest.raises(ValueError, match=r"CONVCORE_ISA must be one of portable, avx2, avx512, got 'sse9'"):
        convcore.make_plan(x.shape, w, b)
    if cpu_isa() != "avx512":
        monkeypatch.setenv("CONVCORE_ISA", "avx512")
        with pytest.raises(ValueError, match=r"CONVCORE_ISA=avx512 asks for a kernel level this CPU lacks"):
            convcore.kernel_isa()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("data_format", FORMATS)
def test_every_tile_remainder(level, dtype, data_format):
    """Every remainder of the micro-kernel tile in both directions, for both NCHW kernel widths: pixel counts 1 ..
    2*NR+1 (one output row of a 1-D layer) and channel counts 1 .. 2*panel+1, with K = 1, K inside one block and K
    over several blocks (a forced tiny K block), few and many channels per group, each against the reference."""
    rng = np.random.default_rng(1)
    probe = convcore.make_plan((1, 2, 400), np.ones((3, 2, 1), dtype), data_format="NCW")
    nr_wide = probe._nr
    probe = convcore.make_plan((1, 400, 2), np.ones((1, 2, 3), dtype), data_format="NWC")
    mr_nhwc, nr_nhwc = probe._mr, probe._nr
    pixel_counts = range(1, 2 * max(nr_wide, mr_nhwc) + 2)
    channel_counts = range(1, 2 * max(nr_nhwc, 8) + 2)
    cases = [dict(pixels=p, cout=5) for p in pixel_counts] + [dict(pixels=7, cout=c) for c in channel_counts]
    fmt = "NCW" if data_format == "channels_first" else "NWC"
    for i, case in enumerate(cases):
        # K = 1; K in one block; several K blocks of whole taps; and (NHWC, 17-20 channels: the pointer kernel
        # rather than the few-channel A panels) one block and channel ranges of a tap longer than the K block.
        cin, k, kblock = [(1, 1, None), (3, 3, None), (5, 3, 4), (17, 2, None), (20, 3, 8)][i % 5]
        x, w, b = _small(rng, rank=1, cin=cin, cout=case["cout"], spatial=(case["pixels"] + k - 1,), ksize=(k,),
                         data_format=data_format, dtype=dtype)
        plan = convcore.ConvPlan(x.shape, w, b, data_format=fmt, _k_block=kblock)
        assert plan.algorithm == "packed_gemm" and plan.isa == level
        _check_against_reference(plan.run(x), x, w, b, dict(data_format=fmt),
                                 f"{level} {case} K={cin * k} k_block={kblock}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("cout", [33, 50, 63])
@pytest.mark.parametrize("algorithm", ["auto", "blas"])
def test_uneven_channel_splits(level, dtype, data_format, cout, algorithm):
    """Output-channel chunks that do not divide Cout (the last chunk shorter), forced with channel_tile, at batch 1
    on a small image: a last chunk one channel short, or one too long, fails against the reference."""
    rng = np.random.default_rng(cout)
    x, w, b = _small(rng, cin=6, cout=cout, spatial=(6, 7), data_format=data_format, dtype=dtype)
    kw = dict(padding="same", data_format=data_format, activation="relu")
    for channel_tile in (1, 8, 16, 32):
        plan = convcore.make_plan(x.shape, w, b, algorithm=algorithm, channel_tile=channel_tile, num_threads=2, **kw)
        t = plan.tiling()
        assert t["channel_chunks"] == -(-cout // t["channel_chunk"]) and t["channel_chunks"] > 1, t
        assert cout % t["channel_chunk"] != 0 or t["channel_chunk"] == 1, t
        assert t["channel_chunk"] >= channel_tile, t
        _check_against_reference(plan.run(x), x, w, b, kw, f"{algorithm} channel_tile={channel_tile} {t}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("data_format", FORMATS)
def test_unaligned_and_strided_inputs(level, dtype, data_format):
    """Input, weights and bias starting one element past an aligned address, and a strided input view."""
    rng = np.random.default_rng(2)
    x, w, b = _small(rng, batch=2, cin=5, cout=19, spatial=(9, 11), data_format=data_format, dtype=dtype)

    def unaligned(a):
        buf = np.empty(a.size + 1, dtype)[1:]
        buf[:] = a.reshape(-1)
        assert buf.ctypes.data % 16 != 0
        return buf.reshape(a.shape)

    kw = dict(padding=1, strides=(1, 2), data_format=data_format)
    xu, wu, bu = unaligned(x), unaligned(w), unaligned(b)
    _check_against_reference(convcore.conv(xu, wu, bu, **kw), x, w, b, kw, "unaligned")
    big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype)
    big[..., ::2] = x
    _check_against_reference(convcore.conv(big[..., ::2], w, b, **kw), x, w, b, kw, "strided view")


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("activation", [None, "relu", "tanh"])
def test_nan_and_inf_every_level(level, data_format, activation):
    x, w, b, kw = _layer("3x3", data_format, dtype=np.float32)
    x = x.copy()
    flat = x.reshape(-1)
    flat[5], flat[flat.size // 2], flat[-3] = np.nan, np.inf, -np.inf
    kw["activation"] = activation
    _check_against_reference(convcore.conv(x, w, b, **kw), x, w, b, kw, f"NaN/Inf {level}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["3x3", "3x3_s2_dil", "1x1", "grouped", "conv1d", "conv3d"])
@pytest.mark.parametrize("data_format", FORMATS)
def test_packed_results_bitwise_independent_of_batch_threads_and_tiles(dtype, name, data_format):
    """One sample's output does not depend, in a single bit, on the batch it is run in, the thread count, the pixel
    tile or the channel split: the K order of every output is fixed by the plan (issue 11 batches requests on it).
    The K block changes the summation order, so different K blocks are only checked against the reference."""
    x, w, b, kw = _layer(name, data_format, dtype)
    rng = np.random.default_rng(3)
    xs = rng.standard_normal((8,) + x.shape[1:]).astype(dtype)
    plan = convcore.make_plan(xs.shape, w, b, **kw)
    assert plan.algorithm == "packed_gemm"
    alone = [convcore.make_plan(xs[:1].shape, w, b, num_threads=1, **kw).run(xs[i:i + 1])[0] for i in range(8)]
    for batch in (1, 2, 3, 8):
        for threads in (1, 2):
            y = convcore.make_plan(xs.shape, w, b, num_threads=threads, **kw).run(xs[:batch])
            for i in range(batch):
                assert np.array_equal(y[i], alone[i]), f"sample {i} of batch {batch} on {threads} threads"
    for tile, chunk in ((1, None), (7, 8), (None, 1), (33, 40)):
        y = convcore.make_plan(xs.shape, w, b, num_threads=2, tile_size=tile, channel_tile=chunk, **kw).run(xs[:3])
        assert all(np.array_equal(y[i], alone[i]) for i in range(3)), f"tile_size={tile} channel_tile={chunk}"
    _check_against_reference(y, xs[:3], w, b, kw, "packed")
    for kblock in (1, 5, 64):
        y = convcore.ConvPlan(xs.shape, w, b, _k_block=kblock, **kw).run(xs[:2])
        _check_against_reference(y, xs[:2], w, b, kw, f"k_block={kblock}")


def test_packed_weights_are_the_plans_only_weights():
    """A plan keeps its weights once, packed in the kernel's panels (the memory target counts them as weights)."""
    x, w, b, kw = _layer("3x3", "channels_first")
    plan = convcore.make_plan(x.shape, w, b, **kw)
    panel = plan._mr
    assert plan._w.size == -(-w.shape[0] // panel) * panel * w[0].size
    blas = convcore.make_plan(x.shape, w, b, algorithm="blas", **kw)
    assert blas._w.size == w.size
