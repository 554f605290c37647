"""server._batcher.DynamicBatcher in-process: batches formed and split, preferred sizes, delays, deadlines,
cancellation, failure isolation, and rows against convcore run alone.

Timing is long by construction: anything that must happen "at once" is checked against a 10 s queue delay (a
result well before it proves the batch did not wait the delay out); anything that must wait is checked as a lower
bound. Blocking computes are controlled by events, never by sleeps that a slow machine could outlast.
"""
import threading
import time

import numpy as np
import pytest

import convcore
from _reference import reference_conv
from server._batcher import BatchDeadlineExceeded, BatchingConfig, DynamicBatcher
from server._errors import InvalidArgument, RequestCancelled

LONG = 10_000_000  # microseconds: a queue delay no test waits out


class Recorder:
    """A compute that records each batch's row count and returns x * 3 + 1 (float64 exact for small ints)."""

    def __init__(self, gate=None, fail=None):
        self.batches = []
        self.tokens = []
        self.threads = []  # the thread that computed each batch
        self.gate = gate
        self.fail = fail
        self.started = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, x, token):
        with self.lock:
            self.batches.append(x.shape[0])
            self.tokens.append(token)
            self.threads.append(threading.current_thread())
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(30), "test gate never opened"
        if self.fail is not None:
            self.fail(x)
        return x * 3 + 1


def run_threads(batcher, inputs, delays=None, per_call=None, **kwargs):
    """Submit each input from its own thread (after its delay, with its own `per_call` keywords on top of
    `kwargs`); return (results, errors) lists."""
    results, errors = [None] * len(inputs), [None] * len(inputs)

    def one(i):
        if delays:
            time.sleep(delays[i])
        try:
            results[i] = batcher.run(inputs[i], **kwargs, **(per_call[i] if per_call else {}))
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            errors[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a request never returned"
    return results, errors


def rows(n, value, shape=(2, 3), dtype=np.float64):
    """n rows, each filled with a distinct value (value, value+1, ...), so any mix-up of rows shows."""
    return (np.arange(n, dtype=dtype).reshape(n, *([1] * len(shape))) + value) * np.ones((n, *shape), dtype)


def wait_pending(batcher, n, timeout=30):
    deadline = time.monotonic() + timeout
    while batcher.pending() < n:
        assert time.monotonic() < deadline, f"only {batcher.pending()} of {n} requests queued"
        time.sleep(0.002)


# ---------------------------------------------------------------------------------------------- config
def test_config_from_dict_merges_defaults_and_sorts_preferred():
    defaults = BatchingConfig(max_batch_size=32, max_queue_delay_microseconds=500)
    cfg = BatchingConfig.from_dict({"preferred_batch_size": [8, 4]}, defaults)
    assert cfg == BatchingConfig(32, (4, 8), 500)
    assert cfg.max_queue_delay == pytest.approx(0.0005)
    # proto3 zeros mean "not given": the defaults stay
    assert BatchingConfig.from_dict({"max_batch_size": 0, "max_queue_delay_microseconds": 0}, defaults) == defaults
    assert BatchingConfig.from_dict({"max_batch_size": 4}) == BatchingConfig(4)


@pytest.mark.parametrize("settings, match", [
    ({"max_batch": 4}, r"unknown key\(s\) \['max_batch'\]"),
    ({"max_batch_size": -1}, r"batching.max_batch_size must be a positive int, got -1"),
    ({"max_batch_size": True}, r"batching.max_batch_size must be a positive int, got True"),
    ({"max_batch_size": 4, "preferred_batch_size": [2, 8]}, r"preferred_batch_size\[1\] must be at most 4, got 8"),
    ({"max_batch_size": 4, "preferred_batch_size": [2, 2]}, r"holds a value twice, got \[2, 2\]"),
    ({"max_batch_size": 4, "preferred_batch_size": "4"}, r"must be a list of ints, got '4'"),
    ({"max_batch_size": 4, "max_queue_delay_microseconds": 10_000_001}, r"from 0 to 10000000 \(10 s\)"),
    ({"max_batch_size": 4, "max_queue_delay_microseconds": 0.5}, r"must be an int from 0"),
    ({"preferred_batch_size": [1]}, r"batching.max_batch_size is required"),
])
def test_config_errors_name_the_field(settings, match):
    with pytest.raises(InvalidArgument, match=match):
        BatchingConfig.from_dict(settings)


def test_config_must_be_a_dict():
    with pytest.raises(InvalidArgument, match=r"batching must be a dict .* got list"):
        BatchingConfig.from_dict([("max_batch_size", 4)])


# ---------------------------------------------------------------------------------------------- forming batches
def test_requests_within_the_delay_form_one_batch_and_get_their_own_rows():
    compute = Recorder()
    batcher = DynamicBatcher(compute, BatchingConfig(max_batch_size=6, max_queue_delay_microseconds=LONG))
    inputs = [rows(1, 0), rows(2, 10), rows(1, 20), rows(2, 30)]  # 6 rows: full, so it goes before the delay
    t0 = time.monotonic()
    results, errors = run_threads(batcher, inputs, delays=[0, 0.02, 0.04, 0.06])
    assert errors == [None] * 4
    assert time.monotonic() - t0 < 5, "a full batch waited for the queue delay"
    assert compute.batches == [6]
    for x, y in zip(inputs, results):
        np.testing.assert_array_equal(y, x * 3 + 1)


def test_delay_zero_dispatches_at_once_and_batches_form_while_the_slot_is_busy():
    gate = threading.Event()
    compute = Recorder(gate=gate)
    batcher = DynamicBatcher(compute, BatchingConfig(max_batch_size=8, max_queue_delay_microseconds=0))
    first = threading.Thread(target=batcher.run, args=(rows(1, 0),))
    first.start()
    assert compute.started.wait(30)
    # The only slot is busy: these queue together (Triton dispatches when an instance is free).
    later = [rows(1, 10 * i) for i in range(1, 6)]
    box = {}
    t = threading.Thread(target=lambda: box.update(out=run_threads(batcher, later)))
    t.start()
    wait_pending(batcher, 5)
    gate.set()
    t.join(60)
    first.join(60)
    results, errors = box["out"]
    assert errors == [None] * 5
    assert compute.batches == [1, 5]
    for x, y in zip(later, results):
        np.testing.assert_array_equal(y, x * 3 + 1)


def test_a_lone_request_waits_the_queue_delay():
    compute = Recorder()
    batcher = DynamicBatcher(compute, BatchingConfig(max_batch_size=8, max_queue_delay_microseconds=300_000))
    t0 = time.monotonic()
    y = batcher.run(rows(1, 5))
    assert time.monotonic() - t0 >= 0.3
    np.testing.assert_array_equal(y, rows(1, 5) * 3 + 1)
    assert compute.batches == [1]


def test_preferred_batch_size_goes_at_once():
    compute = Recorder()
    batcher = DynamicBatcher(compute, BatchingConfig(max_batch_size=16, preferred_batch_size=(3,),
                                                     max_queue_delay_microseconds=LONG))
    t0 = time.monotonic()
    results, errors = run_threads(batcher, [rows(1, 0), rows(2, 10)])
    assert errors == [None, None]
    assert time.monotonic() - t0 < 5, "a preferred-size batch waited for the queue delay"
    assert compute.batches == [3]


def test_max_batch_size_splits_the_queue_in_arrival_order():
    gate = threading.Event()
    compute = Recorder(gate=gate)
    batcher = DynamicBatcher(compute, BatchingConfig(max_batch_size=4, max_queue_delay_microseconds=0))
    blocker = threading.Thread(target=batcher.run, args=(rows(1, 0),))
    blocker.start()
    assert compute.started.wait(30)
    inputs = [rows(3, 10), rows(2, 20), rows(2, 30), rows(1, 40)]
    box = {}

    def submit():
        box["out"] = run_threads(batcher, inputs, delays=[0, 0.05, 0.1, 0.15])

    t = threading.Thread(target=submit)
    t.start()
    wait_pending(batcher, 4)
    gate.set()
    t.join(60)
    blocker.join(60)
    results, errors = box["out"]
    assert errors == [None] * 4
    # 3 rows (the next 2 do not fit), then 2 + 2, then 1: never more than 4, in arrival order
    assert compute.batches == [1, 3, 4, 1]
    for x, y in zip(inputs, results):
        np.testing.assert_array_equal(y, x * 3 + 1)


def test_shapes_and_dtypes_batch_separately():
    compute = Recorder()
    batcher = DynamicBatcher(compute, BatchingConfig(max_batch_size=2, max_queue_delay_microseconds=LONG))
    inputs = [rows(1, 0, (2, 3)), rows(1, 10, (3, 2)), rows(1, 20, (2, 3), np.float32),
              rows(1, 30, (2, 3)), rows(1, 40, (3, 2)), rows(1, 50, (2, 3), np.float32)]
    t0 = time.monotonic()
    results, errors = run_threads(batcher, inputs, delays=[0, 0, 0, 0.05, 0.05, 0.05])
    assert errors == [None] * 6
    assert time.monotonic() - t0 < 5  # every key's batch filled up
    assert sorted(compute.batches) == [2, 2, 2]
    for x, y in zip(inputs, results):
        assert y.dtype == x.dtype and y.shape == x.shape
        np.testing.assert_array_equal(y, x * 3 + 1)


def test_timing_is_reported():
    batcher = DynamicBatcher(Recorder(), BatchingConfig(max_batch_size=2, max_queue_delay_microseconds=LONG))
    timings = [{}, {}]
    results = [None, None]

    def one(i):
        results[i] = batcher.run(rows(1, i), timing=timings[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for t in timings:
        assert t["batch_rows"] == 2 and t["batch_requests"] == 2
        assert t["queue_seconds"] >= 0 and t["infer_seconds"] >= 0 and t["input_seconds"] >= 0


# ---------------------------------------------------------------------------------------------- bad requests
def test_too_many_rows_are_refused_before_joining():
    compute = Recorder()
    batcher = DynamicBatcher(compute, BatchingConfig(max_batch_size=4), name="m")
    with pytest.raises(InvalidArgument, match=r"input has batch 5 \(shape \[5, 2, 3\]\), model 'm' takes 1 to 4"):
        batcher.run(rows(5, 0))
    with pytest.raises(InvalidArgument, match=r"must be an array with a batch axis, got list"):
        batcher.run([1.0])
    with pytest.raises(InvalidArgument, match=r"input has batch 0"):
        batcher.run(np.zeros((0, 2)))
    assert compute.batches == [] and batcher.pending() == 0


def test_a_request_that_fails_alone_does_not_fail_the_batch():
    def fail(x):
        if np.isnan(x).any():
            raise ValueError("input holds NaN")

    compute = Recorder(fail=fail)
    batcher = DynamicBatcher(compute, BatchingConfig(max_batch_size=3, max_queue_delay_microseconds=LONG))
    bad = rows(1, 10)
    bad[0, 0, 0] = np.nan
    inputs = [rows(1, 0), bad, rows(1, 20)]
    results, errors = run_threads(batcher, inputs)
    assert isinstance(errors[1], ValueError) and "NaN" in str(errors[1])
    assert errors[0] is None and errors[2] is None
    np.testing.assert_array_equal(results[0], inputs[0] * 3 + 1)
    np.testing.assert_array_equal(results[2], inputs[2] * 3 + 1)
    assert compute.batches[0] == 3 and sorted(compute.batches[1:]) == [1, 1, 1]


def test_an_error_only_the_batch_provokes_fails_nobody():
    def fail(x):
        if x.shape[0] > 1:
            raise MemoryError("batch too large")

    batcher = DynamicBatcher(Recorder(fail=fail), BatchingConfig(max_batch_size=2, max_queue_delay_microseconds=LONG))
    inputs = [rows(1, 0), rows(1, 10)]
    results, errors = run_threads(batcher, inputs)
    assert errors == [None, None]
    for x, y in zip(inputs, results):
        np.testing.assert_array_equal(y, x * 3 + 1)


def test_a_compute_that_returns_the_wrong_rows_is_an_error():
    batcher = DynamicBatcher(lambda x, token: x[:1], BatchingConfig(max_batch_size=2,
                                                                    max_queue_delay_microseconds=LONG), name="m")
    results, errors = run_threads(batcher, [rows(1, 0), rows(1, 10)])
    # the batch is refused, then each member computed alone returns its one row correctly
    assert errors == [None, None]
    np.testing.assert_array_equal(results[1], rows(1, 10))
    with pytest.raises(RuntimeError, match=r"compute of model 'm' returned \(1, 2, 3\) for a batch of 2 rows"):
        DynamicBatcher(lambda x, token: x[:1], BatchingConfig(max_batch_size=2), name="m").run(rows(2, 0))


def test_rows_are_copied_into_each_callers_output_and_the_batch_buffers_go_back_to_the_pool():
    """With ``output``, the batch's thread fills each caller's own array (what the server's response payload is);
    the gathered input and the batch output are handed to ``release`` once nobody reads them."""
    allocated, released = [], []

    def allocate(shape, dtype):
        allocated.append(np.full(shape, np.nan, dtype))  # NaN: a row not gathered would show in the output
        return allocated[-1]

    compute = Recorder()
    batcher = DynamicBatcher(compute, BatchingConfig(max_batch_size=4, max_queue_delay_microseconds=LONG),
                             allocate=allocate, release=released.extend)
    inputs = [rows(1, 0), rows(2, 10), rows(1, 20)]
    outputs = [np.zeros((n, 2, 3)) for n in (1, 2, 1)]
    timings = [{} for _ in inputs]

    def output_of(i):
        def output(shape, dtype):
            assert shape == outputs[i].shape, f"output asked for {shape}"
            return outputs[i]
        return output

    results, errors = run_threads(batcher, inputs, per_call=[{"timing": timings[i], "output": output_of(i)}
                                                             for i in range(3)])
    assert errors == [None] * 3 and compute.batches == [4]
    for x, out, y, timing in zip(inputs, outputs, results, timings):
        assert y is out  # the caller gets its own array back, filled
        np.testing.assert_array_equal(out, x * 3 + 1)
        assert timing["batch_rows"] == 4 and timing["output_seconds"] >= 0
    assert len(allocated) == 1 and allocated[0].shape == (4, 2, 3)
    assert len(released) == 2 and released[0] is allocated[0] and released[1].shape == (4, 2, 3)


def test_a_callers_output_that_fails_fails_that_caller_only():
    def output_of(i):
        def output(shape, dtype):
            if i == 1:
                raise MemoryError("no room for the response")
            return np.empty(shape, dtype)
        return output

    compute = Recorder()
    batcher = DynamicBatcher(compute, BatchingConfig(max_batch_size=3, max_queue_delay_microseconds=LONG))
    results, errors = run_threads(batcher, [rows(1, 10 * i) for i in range(3)],
                                  per_call=[{"output": output_of(i)} for i in range(3)])
    assert isinstance(errors[1], MemoryError) and errors[0] is None and errors[2] is None
    assert compute.batches == [3]  # computed once: the output error is not the batch's
    for i in (0, 2):
        np.testing.assert_array_equal(results[i], rows(1, 10 * i) * 3 + 1)


def test_one_thread_computes_a_batch_and_the_others_only_wake_to_return():
    """The head of the queue leads: of 8 callers in one batch, exactly one thread runs the compute."""
    compute = Recorder()
    batcher = DynamicBatcher(compute, BatchingConfig(max_batch_size=8, max_queue_delay_microseconds=LONG))
    inputs = [rows(1, 10 * i) for i in range(8)]
    results, errors = run_threads(batcher, inputs)
    assert errors == [None] * 8 and compute.batches == [8] and len(set(compute.threads)) == 1
    for x, y in zip(inputs, results):
        np.testing.assert_array_equal(y, x * 3 + 1)


def test_the_next_batch_computes_while_the_last_one_is_copied_out():
    """The compute slot is given back when the compute ends, not after the split: a caller whose output is slow to
    fill does not hold up the next batch (one batch at a time, max_concurrent=1)."""
    calls, second = [], threading.Event()

    def compute(x, token):
        calls.append(x.shape[0])
        if len(calls) == 2:
            second.set()
        return x * 3 + 1

    def slow_output(shape, dtype):
        assert second.wait(30), "the second batch waited for the first one's copy-out"
        return np.empty(shape, dtype)

    batcher = DynamicBatcher(compute, BatchingConfig(max_batch_size=1), max_concurrent=1)
    results = {}
    first = threading.Thread(target=lambda: results.setdefault(0, batcher.run(rows(1, 0), output=slow_output)))
    first.start()
    deadline = time.monotonic() + 30
    while not calls:
        assert time.monotonic() < deadline and first.is_alive()
        time.sleep(0.002)
    results[1] = batcher.run(rows(1, 10))  # computes while the first caller's copy-out is still blocked
    first.join(30)
    assert calls == [1, 1] and not first.is_alive()
    for i in (0, 1):
        np.testing.assert_array_equal(results[i], rows(1, 10 * i) * 3 + 1)


# ---------------------------------------------------------------------------------------------- deadlines, cancel
def test_a_deadline_shortens_the_wait_and_is_never_passed():
    compute = Recorder()
    batcher = DynamicBatcher(compute, BatchingConfig(max_batch_size=8, max_queue_delay_microseconds=LONG))
    t0 = time.monotonic()
    y = batcher.run(rows(1, 0), deadline=t0 + 2.0)
    elapsed = time.monotonic() - t0
    np.testing.assert_array_equal(y, rows(1, 0) * 3 + 1)
    assert 0.9 <= elapsed < 2.0  # held at most half of its 2 s, not the 10 s delay


def test_a_deadline_that_passes_in_the_queue_fails_that_request_only():
    gate = threading.Event()
    compute = Recorder(gate=gate)
    batcher = DynamicBatcher(compute, BatchingConfig(max_batch_size=8, max_queue_delay_microseconds=0))
    blocker_out = {}
    blocker = threading.Thread(target=lambda: blocker_out.update(y=batcher.run(rows(1, 0))))
    blocker.start()
    assert compute.started.wait(30)
    t0 = time.monotonic()
    with pytest.raises(BatchDeadlineExceeded, match="deadline passed while it waited"):
        batcher.run(rows(1, 10), deadline=t0 + 0.3)
    assert time.monotonic() - t0 >= 0.3
    assert batcher.pending() == 0
    gate.set()
    blocker.join(60)
    np.testing.assert_array_equal(blocker_out["y"], rows(1, 0) * 3 + 1)
    assert compute.batches == [1]  # the expired request was never computed


def test_a_cancelled_request_leaves_a_forming_batch():
    compute = Recorder()
    batcher = DynamicBatcher(compute, BatchingConfig(max_batch_size=3, max_queue_delay_microseconds=LONG))
    callbacks = []
    out = {}

    def cancellable():
        try:
            batcher.run(rows(1, 99), add_callback=lambda fn: callbacks.append(fn) or True)
        except RequestCancelled as exc:
            out["cancelled"] = exc

    t = threading.Thread(target=cancellable)
    t.start()
    wait_pending(batcher, 1)
    callbacks[0]()  # the client went away
    t.join(30)
    assert "cancelled" in out and batcher.pending() == 0
    inputs = [rows(1, 0), rows(2, 10)]
    results, errors = run_threads(batcher, inputs)
    assert errors == [None, None] and compute.batches == [3]  # the cancelled row is not in the batch
    for x, y in zip(inputs, results):
        np.testing.assert_array_equal(y, x * 3 + 1)


def test_a_cancelled_member_of_a_running_batch_returns_at_once_and_the_others_get_their_rows():
    gate = threading.Event()
    compute = Recorder(gate=gate)
    batcher = DynamicBatcher(compute, BatchingConfig(max_batch_size=2, max_queue_delay_microseconds=LONG))
    callbacks = {}
    results, errors = [None, None], [None, None]

    def one(i):
        try:
            results[i] = batcher.run(rows(1, 10 * i), add_callback=lambda fn: callbacks.setdefault(i, fn) or True)
        except Exception as exc:  # noqa: BLE001
            errors[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    assert compute.started.wait(30)  # the batch of 2 is computing (held by the gate)
    # Cancel the member that is not computing the batch (the dispatching thread is busy in compute).
    (victim,) = [i for i in range(2) if threads[i] is not compute.threads[0]]
    callbacks[victim]()
    threads[victim].join(5)
    assert not threads[victim].is_alive()  # it returned at once, while the batch is still computing
    assert isinstance(errors[victim], RequestCancelled)
    assert not compute.tokens[0].cancelled  # one member still wants its rows
    gate.set()
    for t in threads:
        t.join(30)
    other = 1 - victim
    assert errors[other] is None
    np.testing.assert_array_equal(results[other], rows(1, 10 * other) * 3 + 1)


def test_the_compute_is_told_to_stop_when_every_member_has_gone():
    gate = threading.Event()
    compute = Recorder(gate=gate)
    batcher = DynamicBatcher(compute, BatchingConfig(max_batch_size=1))
    callbacks = []
    t = threading.Thread(target=lambda: pytest.raises(
        RequestCancelled, batcher.run, rows(1, 0), add_callback=lambda fn: callbacks.append(fn) or True))
    t.start()
    assert compute.started.wait(30)
    callbacks[0]()
    assert compute.tokens[0].cancelled
    with pytest.raises(RequestCancelled, match="every caller of this batch"):
        compute.tokens[0].check()
    gate.set()
    t.join(30)
    assert not t.is_alive()


def test_a_call_that_has_already_ended_never_joins():
    compute = Recorder()
    batcher = DynamicBatcher(compute, BatchingConfig(max_batch_size=4, max_queue_delay_microseconds=LONG))
    with pytest.raises(RequestCancelled):
        batcher.run(rows(1, 0), add_callback=lambda fn: False)
    assert batcher.pending() == 0 and compute.batches == []


def test_closed_batcher_refuses_new_requests():
    batcher = DynamicBatcher(Recorder(), BatchingConfig(max_batch_size=4))
    batcher.close()
    with pytest.raises(RequestCancelled, match="shutting down"):
        batcher.run(rows(1, 0))


# ---------------------------------------------------------------------------------------------- real convcore
def _model_compute(plans):
    def compute(x, token):
        for plan in plans:
            token.check()
            x = plan.run(x)
        return x
    return compute


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c_in, c_out, size", [(16, 16, 32), (64, 64, 56)], ids=["small", "medium"])
def test_batched_rows_equal_each_request_computed_alone(dtype, c_in, c_out, size):
    """Bit-identical to running alone (the service's small and medium workloads), and close to the reference.

    convcore's default dense path computes a sample independently of the batch (its packed GEMM's K order comes from
    the layer, not the batch); the older BLAS path did not, so this test needs that engine."""
    rng = np.random.default_rng(7)
    kernel = rng.standard_normal((c_out, c_in, 3, 3)).astype(dtype)
    bias = rng.standard_normal(c_out).astype(dtype)
    plans = [convcore.make_plan((1, c_in, size, size), kernel, bias, padding="same", activation="relu")]
    compute = _model_compute(plans)
    batcher = DynamicBatcher(compute, BatchingConfig(max_batch_size=8, max_queue_delay_microseconds=LONG))
    inputs = [rng.standard_normal((n, c_in, size, size)).astype(dtype) for n in (1, 3, 1, 2, 1)]
    results, errors = run_threads(batcher, inputs)  # 8 rows: one full batch
    assert errors == [None] * 5
    for x, y in zip(inputs, results):
        alone = compute(x, _NoCancel())
        np.testing.assert_array_equal(y, alone)
        ref = reference_conv(x.astype(np.float64), kernel.astype(np.float64), bias.astype(np.float64),
                             padding="same", activation="relu")
        np.testing.assert_allclose(y, ref, rtol=1e-4 if dtype == np.float32 else 1e-10,
                                   atol=1e-3 if dtype == np.float32 else 1e-10)


class _NoCancel:
    cancelled = False

    def check(self):
        pass

