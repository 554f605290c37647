"""The compute slots (server._compute.ComputeExecutor): jobs run on the calling thread once they hold CPU units,
one-thread jobs side by side, a wide job narrower rather than queued, FIFO waits that a cancelled call leaves.

The RPC context is a small stand-in with the two methods the executor uses (is_active, add_callback); every job
waits on events the test controls, so nothing depends on the machine's speed."""
import threading

import numpy as np
import pytest

import convcore
from server._compute import ComputeExecutor
from server._errors import RequestCancelled

needs_openmp = pytest.mark.skipif(not convcore.openmp_enabled(), reason="built without OpenMP: one thread per call")
WAIT = 30  # generous: a loaded 2-core machine stalls for seconds


class Context:
    def __init__(self):
        self.callbacks = []
        self.active = True

    def is_active(self):
        return self.active

    def add_callback(self, callback):
        self.callbacks.append(callback)
        return True

    def end(self):  # what gRPC does when the client cancels or the deadline passes
        self.active = False
        for callback in self.callbacks:
            callback()


def _start(ex, fn, threads, ctx=None):
    out = {}

    def target():
        try:
            out["result"] = ex.run(ctx or Context(), fn, threads=threads)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            out["error"] = exc
    t = threading.Thread(target=target)
    t.start()
    return t, out


def test_jobs_run_on_the_calling_thread():
    ex = ComputeExecutor(1, 1)
    assert ex.run(Context(), lambda token, granted: (threading.current_thread(), granted), threads=1) == \
        (threading.current_thread(), 1)


def test_two_one_thread_jobs_run_side_by_side():
    ex = ComputeExecutor(1, 2)
    both = threading.Barrier(2, timeout=WAIT)  # breaks (and the test fails) if the second job waits for the first
    jobs = [_start(ex, lambda token, granted: both.wait(), threads=1) for _ in range(2)]
    for t, out in jobs:
        t.join(WAIT)
        assert "error" not in out, out


@needs_openmp
def test_a_wide_job_starts_narrower_when_a_cpu_is_taken():
    ex = ComputeExecutor(2, 1)
    assert ex.units == 2
    release = threading.Event()
    t, out = _start(ex, lambda token, granted: release.wait(WAIT), threads=1)  # holds one of the two CPUs
    try:
        assert ex.run(Context(), lambda token, granted: granted, threads=2) == 1
    finally:
        release.set()
        t.join(WAIT)
    assert ex.run(Context(), lambda token, granted: granted, threads=2) == 2  # both free again: the whole team


@needs_openmp
def test_units_freed_while_several_jobs_wait_are_shared_out():
    """A two-thread job holds both CPUs while two more wait: when it ends they run side by side on one thread each
    (not one on two threads and the other still queued); a job that waits alone gets the whole team."""
    ex = ComputeExecutor(2, 1)
    release = threading.Event()
    holder, held = _start(ex, lambda token, granted: (release.wait(WAIT), granted)[1], threads=2)
    _wait_for(lambda: ex._free == 0)
    both = threading.Barrier(3)
    waiting = [_start(ex, lambda token, granted: (both.wait(WAIT), granted)[1], threads=2) for _ in range(2)]
    _wait_for(lambda: len(ex._waiters) == 2)
    release.set()
    both.wait(WAIT)  # both waiters are running at once: only possible on one unit each
    for t, _ in [(holder, held)] + waiting:
        t.join(WAIT)
    assert held["result"] == 2
    assert [out["result"] for _, out in waiting] == [1, 1]
    assert ex._free == ex.units
    # Alone in the queue: the whole team.
    release.clear()
    holder, _ = _start(ex, lambda token, granted: release.wait(WAIT), threads=2)
    _wait_for(lambda: ex._free == 0)
    alone = _start(ex, lambda token, granted: granted, threads=2)
    _wait_for(lambda: len(ex._waiters) == 1)
    release.set()
    for t in (holder, alone[0]):
        t.join(WAIT)
    assert alone[1]["result"] == 2


def test_a_waiting_job_leaves_the_queue_when_its_call_ends_and_the_next_one_runs():
    ex = ComputeExecutor(1, 1)
    release, ran = threading.Event(), []
    holder, _ = _start(ex, lambda token, granted: release.wait(WAIT), threads=1)
    _wait_for(lambda: ex._free == 0)
    gone = Context()
    t1, out1 = _start(ex, lambda token, granted: ran.append("gone"), threads=1, ctx=gone)
    t2, out2 = _start(ex, lambda token, granted: ran.append("next"), threads=1)
    _wait_for(lambda: len(ex._waiters) == 2)
    gone.end()
    t1.join(WAIT)
    assert isinstance(out1.get("error"), RequestCancelled)
    assert len(ex._waiters) == 1
    release.set()
    for t in (holder, t2):
        t.join(WAIT)
    assert ran == ["next"] and "error" not in out2
    assert ex._free == ex.units


def test_a_call_that_ended_before_its_job_started_is_not_worked_on():
    ex = ComputeExecutor(1, 1)
    ctx = Context()
    ctx.active = False
    with pytest.raises(RequestCancelled, match="cancelled the call or its deadline passed"):
        ex.run(ctx, lambda token, granted: pytest.fail("ran"), threads=1)


def _wait_for(predicate):
    done = threading.Event()
    for _ in range(WAIT * 100):
        if predicate():
            return
        done.wait(0.01)
    raise AssertionError("timed out")


def test_a_light_job_runs_at_once_without_a_unit_when_none_is_free():
    ex = ComputeExecutor(1, 1)
    release = threading.Event()
    holder, _ = _start(ex, lambda token, granted: release.wait(WAIT), threads=1)
    _wait_for(lambda: ex._free == 0)
    try:
        # On this thread, while the only unit is held: would block (and time out the holder) if it waited.
        assert ex.run(Context(), lambda token, granted: (granted, ex._free), threads=1, light=True) == (1, 0)
    finally:
        release.set()
        holder.join(WAIT)
    assert ex._free == ex.units  # it took and gave back nothing


def test_a_light_job_never_takes_the_unit_a_waiting_job_is_owed():
    """With a job waiting, a light job runs beside it without a unit; the waiter gets the unit that frees up."""
    ex = ComputeExecutor(1, 1)
    release, order = threading.Event(), []
    holder, _ = _start(ex, lambda token, granted: release.wait(WAIT), threads=1)
    _wait_for(lambda: ex._free == 0)
    waiter, out = _start(ex, lambda token, granted: order.append(("waiter", granted, ex._free)), threads=1)
    _wait_for(lambda: len(ex._waiters) == 1)
    release.set()
    holder.join(WAIT)
    waiter.join(WAIT)
    ex.run(Context(), lambda token, granted: order.append(("light", granted)), threads=1, light=True)
    assert order == [("waiter", 1, 0), ("light", 1)] and "error" not in out
    assert ex._free == ex.units


def test_a_light_job_still_honours_cancellation():
    ex = ComputeExecutor(1, 1)
    ctx = Context()
    ctx.active = False
    with pytest.raises(RequestCancelled):
        ex.run(ctx, lambda token, granted: pytest.fail("ran"), threads=1, light=True)


def test_the_tests_quick_call_is_not_a_light_job():
    """tests/_calibrate.py's QUICK call must wait for a busy slot, or the tests that use it to see whether the
    slot is free would pass whatever the server did."""
    from _calibrate import QUICK_K, QUICK_X
    from server._service import LIGHT_JOB_FLOPS

    out = convcore.output_shape(QUICK_X.shape, QUICK_K.shape)
    flops = 2 * int(np.prod(out)) * int(np.prod(QUICK_K.shape[1:]))
    assert flops > LIGHT_JOB_FLOPS and convcore.resolve_num_threads(1, flops=flops) == 1
