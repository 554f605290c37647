"""Hostile-input fuzzing of convcore's public boundary (issue 5, "Hostile input").

The contract (issue 2, "Errors"): whatever the arguments, ``convcore.conv`` (and conv1d/2d/3d, ``output_shape``)
either returns an array of the input's dtype and the shape ``output_shape`` predicts, or raises ValueError/TypeError
with a non-empty message, and never crashes the process.

How it is checked
-----------------
* Cases are drawn *near* valid calls (coherent shapes, channels, groups and layouts) and then, most of the time,
  one or more arguments are replaced by something hostile: wrong ranks, empty dims, int/complex/bool/object/float16/
  big-endian dtypes, strings, None, nested tuples, huge ints, numpy scalars and arrays, bad ``out=`` buffers. Drawing
  near valid calls matters: a purely random call is refused by the first check and never reaches the kernels.
* A successful call is checked against ``output_shape`` and, for finite data, against the general N-d path
  (``make_plan(algorithm="general")``, element-by-element gather + BLAS) and the float64 reference in
  ``_reference.py``. ``conv`` runs the engine's default path, the packed micro-kernels, and the child is run once per
  kernel level this CPU supports (``CONVCORE_ISA``; the lower levels with a third of the examples).
* ``conv`` runs in a **child process** (``test_conv_fuzz`` re-runs this module's ``test_conv_fuzz_child`` with an
  environment switch) so that a segfault is a failing test that names the last input, not a dead pytest. The child
  writes each input to a file before the call for that purpose. ``output_shape`` runs no native code and is fuzzed
  in-process.

Bounds: ``CONVCORE_FUZZ_EXAMPLES`` examples per property (default 300; CI keeps the default), ``deadline=None``,
small tensors only, thread counts at most 3. A longer run by hand::

    CONVCORE_FUZZ_EXAMPLES=20000 python3 -m pytest -q tests/test_fuzz_convcore.py

Engine bugs this fuzzer found (B1-B5: OverflowError on huge strides, a segfault and silently wrong output on strides
and pads near 2**63, unbounded num_threads, an unchecked itemsize, lists coerced from None/strings) are kept below as
regression tests with their minimal reproducers; they were fixed in convcore (commit 49287db).
"""
import numbers
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, note, settings, strategies as st

convcore = pytest.importorskip("convcore")

from _reference import reference_conv  # noqa: E402  (tests/ is on sys.path via conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_EXAMPLES = int(os.environ.get("CONVCORE_FUZZ_EXAMPLES", "300"))
_CPU_ISA = convcore._isa.cpu_isa()
#: Kernel levels this CPU runs, lowest first (the child is fuzzed at each).
_LEVELS = convcore._isa.ISA_NAMES[:convcore._isa.ISA_NAMES.index(_CPU_ISA) + 1]
CHILD_ENV = "CONVCORE_FUZZ_CHILD"
LAST_INPUT_ENV = "CONVCORE_FUZZ_LAST_INPUT"
#: The child of `test_conv_fuzz` gets this long; 300 examples take ~10-30 s on a busy 2-core machine.
CHILD_TIMEOUT = float(os.environ.get("CONVCORE_FUZZ_TIMEOUT", str(max(240.0, MAX_EXAMPLES * 0.5))))

FUZZ_SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                HealthCheck.data_too_large])

_HUGE = 2**62  # around here index arithmetic used to overflow int64 (B2)

# ======================================================================================================================
# Strategies
# ======================================================================================================================
_SPECIAL_INTS = [0, -1, 1, 2, 3, 2**31 - 1, 2**31, 2**32 + 1, 2**40, 2**61, _HUGE, 2**63 - 1, 2**63, 2**64, 10**30,
                 -(2**63)]
_scalar_junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from(_SPECIAL_INTS),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6), st.binary(max_size=4),
    st.sampled_from([np.int64(2), np.int32(-1), np.float32(1.0), np.uint8(3), np.bool_(True), 1j, object()]),
)
#: Anything at all: scalars, nested tuples/lists of them, dicts, sets, numpy arrays.
hostile = st.recursive(
    _scalar_junk,
    lambda inner: st.one_of(st.tuples(inner), st.tuples(inner, inner), st.tuples(inner, inner, inner),
                            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=2), inner, max_size=2),
                            st.builds(lambda v: np.array(v, dtype=object), st.lists(inner, max_size=3))),
    max_leaves=6)

_DTYPES = [np.float32, np.float64]
_BAD_DTYPES = [np.float16, np.int32, np.int64, np.uint8, np.complex64, np.complex128, np.bool_, object,
               np.dtype(">f4"), np.dtype(">f8"), np.longdouble]
_ACTIVATIONS = [a for a in convcore.ACTIVATIONS] + ["RELU", "Tanh", "relu ", "", "softmax", "leaky_relu"]
_DATA_FORMATS = ["channels_first", "channels_last", "NCW", "NCHW", "NCDHW", "NWC", "NHWC", "NDHWC", "nchw",
                 "channels-first", ""]
_LAYOUTS = [None, "OIW", "OIHW", "OIDHW", "WIO", "HWIO", "DHWIO", "oihw", "IOHW", "OHWI", ""]
#: Thread counts the child may use: small, so as not to oversubscribe a shared 2-core machine. The bad ones include
#: counts that used to start one OS thread each (B3) and must now be refused.
_THREADS = [None, 1, 2, 3, -1, np.int64(2)]
_BAD_THREADS = [0, -2, True, 1.0, "2", [2], 10**6, 2**31, 2**64]


def _mostly(valid, bad, tenths_bad=1):
    """`valid` nine times in ten, else `bad` (st.one_of would not do: it merges equal branches, so no weights)."""
    return st.integers(0, 9).flatmap(lambda i: bad if i < tenths_bad else valid)


_threads = _mostly(st.sampled_from(_THREADS), st.sampled_from(_BAD_THREADS))


def _floats(dtype, shape, draw, finite):
    """Random data of `shape`: hypothesis draws a seed (drawing every element would be slow and shrink poorly)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = rng.uniform(-8, 8, size=shape)
    if not finite:
        specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e-30])
        mask = rng.random(size=shape) < 0.2
        a[mask] = rng.choice(specials, size=int(mask.sum()))
    return a.astype(dtype)


def _int_opt(nsp, small_max):
    """strides/dilation: mostly valid (an int or one per dim), sometimes not."""
    ok = st.integers(1, small_max)
    valid = st.one_of(ok, st.tuples(*[ok] * nsp), st.lists(ok, min_size=nsp, max_size=nsp),
                      st.builds(lambda v: np.array(v), st.lists(ok, min_size=nsp, max_size=nsp)))
    bad = st.one_of(st.integers(-3, 0), st.sampled_from(_SPECIAL_INTS), st.tuples(*[st.sampled_from(_SPECIAL_INTS)]
                                                                                 * nsp), hostile)
    return _mostly(valid, bad)


def _padding_opt(nsp):
    pad = st.integers(0, 3)
    valid = st.one_of(st.sampled_from(["valid", "same", "causal", "SAME", "Valid"]), pad, st.tuples(*[pad] * nsp),
                      st.tuples(*[st.tuples(pad, pad)] * nsp),
                      st.lists(st.lists(pad, min_size=2, max_size=2), min_size=nsp, max_size=nsp))
    bad = st.one_of(st.sampled_from(["full", "", "same ", "causal\x00"]), st.integers(-3, -1),
                    st.sampled_from(_SPECIAL_INTS), st.tuples(*[st.tuples(st.sampled_from(_SPECIAL_INTS), pad)] * nsp),
                    hostile)
    return _mostly(valid, bad)


@st.composite
def conv_cases(draw):
    """(function name, x, kernel, bias, options, out) near a valid call, perhaps with hostile replacements."""
    nsp = draw(st.integers(1, 3))
    rank = nsp + 2
    groups = draw(st.integers(1, 3))
    cig, cog = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    C, Cout = groups * cig, groups * cog
    channels_last = draw(st.booleans())
    io = draw(st.sampled_from([None, False, True]))
    spatial = tuple(draw(st.lists(st.integers(1, 6), min_size=nsp, max_size=nsp)))
    ksize = tuple(draw(st.lists(st.integers(1, 3), min_size=nsp, max_size=nsp)))
    batch = draw(st.integers(1, 2))
    dtype = draw(st.sampled_from(_DTYPES))
    finite = draw(st.booleans()) or draw(st.booleans())
    x = _floats(dtype, (batch, *spatial, C) if channels_last else (batch, C, *spatial), draw, finite)
    oi = (Cout, cig, *ksize)
    kernel = _floats(dtype, oi, draw, finite)
    if io or (io is None and channels_last):
        kernel = np.ascontiguousarray(np.moveaxis(kernel, (0, 1), (-1, -2)))
    bias = _floats(dtype, (Cout,), draw, finite) if draw(st.booleans()) else None
    names = {1: ("NCW", "NWC", "OIW", "WIO"), 2: ("NCHW", "NHWC", "OIHW", "HWIO"), 3: ("NCDHW", "NDHWC", "OIDHW",
                                                                                        "DHWIO")}[nsp]
    options = {
        "strides": draw(st.one_of(st.just(1), _int_opt(nsp, 3))),
        "dilation": draw(st.one_of(st.just(1), _int_opt(nsp, 3))),
        "padding": draw(_padding_opt(nsp)),
        "groups": groups,
        "data_format": draw(st.sampled_from(["channels_last" if channels_last else "channels_first",
                                             names[1] if channels_last else names[0]])),
        "kernel_layout": None if io is None else (names[3] if io else names[2]),
        "activation": draw(st.sampled_from(_ACTIVATIONS[:12])),
        "num_threads": draw(_threads),
    }
    fn = draw(st.sampled_from(["conv"] * 4 + [f"conv{nsp}d"] * 3 + ["conv1d", "conv2d", "conv3d"]))
    out = None
    x0, k0 = x, kernel  # the valid arrays, for shapes when x/kernel have already been replaced

    # Hostile replacements: none (a valid-looking call), one, or several.
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 1, 2, 3]))):
        what = draw(st.sampled_from(["x", "kernel", "bias", "option", "option", "rank", "dtype", "layout", "view",
                                     "out", "groups"]))
        if what == "x":
            x = draw(st.one_of(hostile, st.just(x0.tolist()),
                               st.just(np.zeros((batch, C, *spatial), dtype=draw(st.sampled_from(_BAD_DTYPES)))),
                               st.just(np.ones((0,) + x0.shape[1:], dtype)), st.just(np.ones(x0.shape[:-1] + (0,),
                                                                                             dtype))))
        elif what == "kernel":
            kernel = draw(st.one_of(hostile, st.just(np.ones(k0.shape[:-1] + (0,), dtype)),
                                    st.just(np.ones(k0.shape + (1,), dtype)), st.just(k0.tolist()),
                                    st.just(np.ones((Cout + 1, cig, *ksize), dtype)),
                                    st.just(np.ones((Cout, cig + 1, *ksize), dtype)),
                                    st.just(np.ones(tuple(s + 9 for s in k0.shape), dtype))))
        elif what == "bias":
            bias = draw(st.one_of(hostile, st.just(np.ones(Cout + 1, dtype)), st.just(np.ones((Cout, 1), dtype)),
                                  st.just(np.ones(Cout, np.float64 if dtype == np.float32 else np.float32)),
                                  st.just([1.0] * Cout), st.just(np.ones((), dtype))))
        elif what == "option":
            key = draw(st.sampled_from(sorted(options)))
            options[key] = draw(hostile)
        elif what == "rank":
            x = draw(st.sampled_from([x0[0], x0[..., None], x0.reshape(-1), x0.reshape(x0.shape + (1, 1, 1))]))
        elif what == "dtype":
            bad = draw(st.sampled_from(_BAD_DTYPES + _DTYPES))
            target = draw(st.sampled_from(["x", "kernel", "bias"]))
            if target == "x":
                x = np.asarray(x).astype(bad) if isinstance(x, np.ndarray) else x
            elif target == "kernel":
                kernel = np.asarray(kernel).astype(bad) if isinstance(kernel, np.ndarray) else kernel
            elif isinstance(bias, np.ndarray):
                bias = bias.astype(bad)
        elif what == "layout":
            options["data_format"] = draw(st.sampled_from(_DATA_FORMATS))
            options["kernel_layout"] = draw(st.sampled_from(_LAYOUTS))
        elif what == "view" and isinstance(x, np.ndarray) and x.ndim >= 1:
            # Non-contiguous, read-only and broadcast views must be accepted like any array.
            kind = draw(st.sampled_from(["strided", "readonly", "broadcast", "fortran"]))
            if kind == "strided":
                x = np.repeat(x, 2, axis=-1)[..., ::2]
            elif kind == "readonly":
                x = x.copy()
                x.setflags(write=False)
            elif kind == "broadcast":
                x = np.broadcast_to(x[:1], (2,) + x.shape[1:])
            else:
                x = np.asfortranarray(x)
        elif what == "out":
            out = draw(st.one_of(hostile, st.just(x0), st.just(np.empty(3, dtype)),
                                 st.sampled_from(["expected", "expected_readonly", "expected_strided",
                                                  "expected_wrong_dtype"])))
        elif what == "groups":
            options["groups"] = draw(st.one_of(st.integers(-2, 7), st.sampled_from(_SPECIAL_INTS), hostile))
    return fn, x, kernel, bias, options, out


def _walk_ints(value, depth=0):
    """Every non-bool integer inside `value` (tuples, lists, numpy arrays), at most a few levels deep."""
    if depth > 4:
        return
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        yield int(value)
    elif isinstance(value, np.ndarray):
        if value.dtype.kind in "iu" or value.dtype == object:
            for v in value.ravel().tolist()[:16]:
                yield from _walk_ints(v, depth + 1)
    elif isinstance(value, (tuple, list, set, frozenset)):
        for v in list(value)[:16]:
            yield from _walk_ints(v, depth + 1)


def _resolve_out(out, fn, x, kernel, options):
    """Turn the symbolic ``out`` choices into buffers of the expected shape (when there is one)."""
    if not isinstance(out, str) or not out.startswith("expected"):
        return out
    try:
        shape = convcore.output_shape(np.shape(x), np.shape(kernel), **options)
    except Exception:  # noqa: BLE001 - the call itself will say what is wrong
        return None
    dtype = getattr(x, "dtype", np.float32)
    if out == "expected":
        return np.empty(shape, dtype)
    if out == "expected_readonly":
        buf = np.empty(shape, dtype)
        buf.setflags(write=False)
        return buf
    if out == "expected_strided":
        return np.empty(shape[:-1] + (shape[-1] * 2,), dtype)[..., ::2]
    return np.empty(shape, np.float16)


def _is_array_of(a, dtypes):
    return isinstance(a, np.ndarray) and any(a.dtype == np.dtype(d) for d in dtypes)


def check_conv_call(fn, x, kernel, bias, options, out):
    """Make the call; assert the contract. Returns the output array, or None when the call was refused."""
    func = getattr(convcore, fn)
    try:
        y = func(x, kernel, bias, out=out, **options)
    except (ValueError, TypeError) as exc:
        assert str(exc).strip(), f"{type(exc).__name__} with an empty message"
        event(f"refused: {type(exc).__name__}: {str(exc)[:25]}")
        return None
    # Accepted: it must have been a sensible call, and the answer must be what output_shape promised.
    assert isinstance(y, np.ndarray), f"returned {type(y).__name__}, not an ndarray"
    xa = np.asarray(x)
    assert xa.dtype in (np.float32, np.float64), f"accepted x of dtype {xa.dtype}"
    assert y.dtype == xa.dtype, f"output dtype {y.dtype} != input dtype {xa.dtype} (silent cast)"
    expected = convcore.output_shape(xa.shape, np.shape(kernel), **options)
    assert y.shape == tuple(expected), f"output shape {y.shape}, output_shape() says {expected}"
    if fn != "conv":
        assert xa.ndim == int(fn[4]) + 2, f"{fn} accepted a rank-{xa.ndim} input"
    if out is not None:
        assert y is out, "out= was given but a different array was returned"
    return y


def compare_with_oracles(x, kernel, bias, options, y):
    """For finite data, the fast paths must agree with the general N-d path and with the float64 reference."""
    # Lists are accepted and converted with the input's dtype (so [None, None] becomes NaNs: see B5).
    xa, ka = np.asarray(x), np.asarray(kernel, dtype=y.dtype)
    bias = None if bias is None else np.asarray(bias, dtype=y.dtype)
    arrays = [xa, ka] + ([bias] if bias is not None else [])
    if not all(np.isfinite(a).all() for a in arrays):
        return  # NaN/Inf propagate, but where exactly depends on the summation order: only shape/dtype checked
    tol = dict(rtol=2e-4, atol=2e-3) if y.dtype == np.float32 else dict(rtol=1e-9, atol=1e-9)
    general = convcore.make_plan(xa.shape, ka, bias, algorithm="general", **options).run(xa)
    np.testing.assert_allclose(y, general, err_msg="fast path disagrees with the general N-d path", **tol)
    ref_opts = {k: v for k, v in options.items() if k != "num_threads"}
    pads = [v for v in _walk_ints(ref_opts.get("padding"))]
    if max(pads, default=0) > 64 or y.size > 20000:
        return  # the reference pads with np.pad: keep it to small pads
    try:
        ref = reference_conv(xa, ka, bias, **ref_opts)
    except (ValueError, TypeError, KeyError):
        return  # an alias the reference does not know (e.g. "RELU"): the engine accepted it, fine
    np.testing.assert_allclose(y, ref.astype(y.dtype), err_msg="engine disagrees with the float64 reference", **tol)


# ======================================================================================================================
# conv: fuzzed in a child process
# ======================================================================================================================
@pytest.mark.skipif(os.environ.get(CHILD_ENV) != "1", reason="runs inside test_conv_fuzz's child process")
@FUZZ_SETTINGS
@given(case=conv_cases())
def test_conv_fuzz_child(case):
    fn, x, kernel, bias, options, out = case
    out = _resolve_out(out, fn, x, kernel, options)
    note(f"{fn}(x={x!r}, kernel={kernel!r}, bias={bias!r}, out={out!r}, **{options!r})")
    last = os.environ.get(LAST_INPUT_ENV)
    if last:
        # Written before the call, so that if the process dies the parent can say which input killed it.
        with open(last, "w") as f:
            f.write(textwrap.shorten(f"{fn} x={x!r} kernel={kernel!r} bias={bias!r} out={out!r} "
                                     f"options={options!r}", 4000))
    y = check_conv_call(fn, x, kernel, bias, options, out)
    event("accepted" if y is not None else "refused")  # --hypothesis-show-statistics: keep both well above 0
    if y is not None:
        compare_with_oracles(x, kernel, bias, options, y)


@pytest.mark.parametrize("level", _LEVELS)
def test_conv_fuzz(tmp_path, level):
    """Fuzz ``convcore.conv*`` in a child process: a crash (signal) fails here and names the input that caused it."""
    last = tmp_path / "last_input.txt"
    env = {**os.environ, CHILD_ENV: "1", LAST_INPUT_ENV: str(last), "OMP_NUM_THREADS": "2",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "CONVCORE_ISA": level}
    if level != _LEVELS[-1]:
        env["CONVCORE_FUZZ_EXAMPLES"] = str(max(1, MAX_EXAMPLES // 3))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--no-header",
           f"{os.path.abspath(__file__)}::test_conv_fuzz_child"]
    try:
        proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the fuzz child did not finish within {CHILD_TIMEOUT:.0f} s (a hang?); last input:\n"
                    f"{last.read_text() if last.exists() else '?'}\n{(exc.stdout or '')[-3000:]}")
    if proc.returncode < 0:
        pytest.fail(f"convcore crashed the process with signal {-proc.returncode}; last input:\n"
                    f"{last.read_text() if last.exists() else '?'}\n{proc.stderr[-3000:]}")
    assert proc.returncode == 0, f"fuzz child failed (rc {proc.returncode}):\n{proc.stdout[-8000:]}\n" \
                                 f"{proc.stderr[-2000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.split("passed")[-1], proc.stdout[-2000:]


# ======================================================================================================================
# output_shape: pure Python, fuzzed in-process
# ======================================================================================================================
_shape_entry = st.one_of(st.integers(-3, 8), st.sampled_from(_SPECIAL_INTS), st.sampled_from([np.int64(3), 2.0,
                                                                                               "3", None, True]))
_shapes = st.one_of(st.lists(_shape_entry, max_size=7).map(tuple), st.lists(st.integers(1, 5), min_size=3,
                                                                             max_size=5).map(tuple), hostile)


@FUZZ_SETTINGS
@given(x_shape=_shapes, kernel_shape=_shapes, data=st.data())
def test_output_shape_fuzz(x_shape, kernel_shape, data):
    nsp = max(1, min(3, (len(x_shape) if isinstance(x_shape, tuple) else 3) - 2))
    options = {
        "strides": data.draw(_int_opt(nsp, 4)),
        "dilation": data.draw(_int_opt(nsp, 4)),
        "padding": data.draw(_padding_opt(nsp)),
        "groups": data.draw(st.one_of(st.integers(1, 3), hostile)),
        "data_format": data.draw(st.one_of(st.sampled_from(_DATA_FORMATS), hostile)),
        "kernel_layout": data.draw(st.one_of(st.sampled_from(_LAYOUTS), hostile)),
        "activation": data.draw(st.one_of(st.sampled_from(_ACTIVATIONS), hostile)),
        # No kernel runs here, so any thread count is fair game.
        "num_threads": data.draw(st.one_of(_threads, st.sampled_from(_SPECIAL_INTS), hostile)),
    }
    # itemsize: ints only (a str/list itemsize is engine bug B4: it is multiplied as a sequence).
    itemsize = data.draw(st.one_of(st.none(), st.sampled_from([1, 2, 4, 8, 16])))
    note(f"output_shape({x_shape!r}, {kernel_shape!r}, itemsize={itemsize!r}, **{options!r})")
    try:
        shape = convcore.output_shape(x_shape, kernel_shape, itemsize=itemsize, **options)
    except (ValueError, TypeError) as exc:
        assert str(exc).strip()
        return
    assert isinstance(shape, tuple) and all(isinstance(s, int) and s >= 1 for s in shape), shape
    assert len(shape) == len(tuple(x_shape)) in (3, 4, 5)
    if itemsize is not None:
        assert np.prod(shape, dtype=object) * itemsize <= convcore.get_max_output_bytes()


@FUZZ_SETTINGS
@given(nbytes=st.one_of(hostile, st.integers(-5, 2**70)))
def test_set_max_output_bytes_fuzz(nbytes):
    old = convcore.get_max_output_bytes()
    try:
        convcore.set_max_output_bytes(nbytes)
    except (ValueError, TypeError) as exc:
        assert str(exc).strip()
        assert convcore.get_max_output_bytes() == old, "a refused value changed the guard"
    else:
        assert convcore.get_max_output_bytes() == int(nbytes) > 0
    finally:
        convcore.set_max_output_bytes(old)


def test_output_guard_refuses_absurd_padding_without_allocating():
    """Issue 2: a 1x1 input with padding 10**6 is refused by the guard, not attempted."""
    x = np.ones((1, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match="max_output_bytes"):
        convcore.conv(x, np.ones((1, 1, 1, 1), np.float32), padding=10**6)


# ======================================================================================================================
# Engine bugs found by this fuzzer, fixed in convcore: regression tests with the original minimal reproducers
# ======================================================================================================================
def _run_snippet(code, rlimit_as=None, timeout=60):
    """Run `code` in a fresh interpreter (so a crash cannot take pytest down); return the CompletedProcess."""
    prefix = ""
    if rlimit_as:
        prefix = (f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({rlimit_as}, {rlimit_as}))\n")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-c", prefix + code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("option", ["strides", "dilation"])
def test_bug_b1_huge_option_raises_value_error(option):
    x = np.ones((1, 1, 3, 3), np.float32)
    with pytest.raises(ValueError, match=option):
        convcore.conv(x, np.ones((1, 1, 1, 1), np.float32), padding=2**63, **{option: 2**64})


@pytest.mark.parametrize("huge", [3 << 61, 2**63 - 1])
def test_bug_b2_huge_strides_and_padding(huge):
    # Only the centre output position sees the (single-pixel) input: expected [[0,0,0],[0,1,0],[0,0,0]], or a
    # ValueError refusing the geometry. Never a crash, never zeros.
    proc = _run_snippet(textwrap.dedent(f"""
        import numpy as np, convcore
        x = np.ones((1, 1, 3, 3), np.float32); w = np.ones((1, 1, 1, 1), np.float32)
        try:
            y = convcore.conv(x, w, strides={huge}, padding={huge})
        except ValueError as e:
            print("refused", e)
        else:
            assert y[0, 0].tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]], y[0, 0].tolist()
            print("ok")
    """))
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-2000:]}"


@pytest.mark.parametrize("count", [2**31, 4096])
def test_bug_b3_huge_num_threads(count):
    proc = _run_snippet(textwrap.dedent(f"""
        import numpy as np, convcore
        x = np.ones((1, 8, 16, 16), np.float32); w = np.ones((8, 8, 3, 3), np.float32)
        try:
            convcore.conv(x, w, num_threads={count})
        except ValueError as e:
            print("refused", e)
    """), rlimit_as=3 << 30)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-2000:]}"


@pytest.mark.parametrize("itemsize", ["4", 0, -4])
def test_bug_b4_itemsize_checked(itemsize):
    with pytest.raises((ValueError, TypeError), match="itemsize"):
        convcore.output_shape((1, 1, 4, 4), (1, 1, 1, 1), itemsize=itemsize)


@pytest.mark.parametrize("bias", [[None], ["1e3"]])
def test_bug_b5_list_weights_not_coerced(bias):
    with pytest.raises(TypeError, match="bias"):
        convcore.conv(np.ones((1, 1, 2), np.float32), np.ones((1, 1, 1), np.float32), bias=bias)
