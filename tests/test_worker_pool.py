"""The RPC worker pool (server._limits.CountingThreadPool): at most `max_active` workers take calls at once, a worker
that waits or computes on the team inside `blocking()` hands its place to a queued call, and the in-flight count
and shutdown stay exact; and, on a real server, a light call that never waits for a CPU unit.

Every wait is on an event the test controls (bounded by WAIT), and "has not started" is read from the pool's own
queue, so nothing depends on the machine's speed. (Dynamic batches gathering more rows than `max_active`, through
`blocking()`, are tests/test_batching_e2e.py's.)"""
import threading
import time

import grpc
import numpy as np
import pytest

from _calibrate import queued_behind, slow_model, time_call
from _server import ServerProcess
from client import ConvClient
from server._limits import CountingThreadPool, blocking, default_active_workers

WAIT = 30  # generous: a loaded 2-core machine stalls for seconds


def _holder(started, release, record=None):
    """A task that says it started (and on which thread), then waits for `release`."""
    def task():
        if record is not None:
            record.append(threading.current_thread())
        started.set()
        assert release.wait(WAIT)
        return "held"
    return task


def test_a_call_queues_for_the_busy_worker_when_max_active_are_busy():
    pool = CountingThreadPool(4, max_active=1)
    started, release, threads = threading.Event(), threading.Event(), []
    first = pool.submit(_holder(started, release, threads))
    assert started.wait(WAIT)
    second = pool.submit(lambda: threads.append(threading.current_thread()))
    # No sleeping thread was woken nor started for it: it waits for the only active worker.
    assert pool.in_flight == 2 and len(pool._tasks) == 1 and pool._threads == 1
    release.set()
    assert first.result(WAIT) == "held"
    second.result(WAIT)
    assert threads[0] is threads[1]  # the worker that finished took the queued call itself
    pool.shutdown()
    assert pool.in_flight == 0


def test_a_worker_inside_blocking_hands_its_place_to_a_queued_call():
    pool = CountingThreadPool(4, max_active=1)
    second_ran = threading.Event()

    def waits_for_the_second():
        with blocking():  # e.g. waiting for a dynamic batch that the second call must join
            return second_ran.wait(WAIT)  # False (and the test fails) if the second call never got a worker

    first = pool.submit(waits_for_the_second)
    second = pool.submit(second_ran.set)
    assert first.result(WAIT + 5) is True
    second.result(WAIT)
    pool.shutdown()
    assert pool.in_flight == 0 and pool._active == 0


def test_blocking_nests_and_gives_the_place_back():
    pool = CountingThreadPool(2, max_active=1)
    seen = []

    def task():
        seen.append(pool._active)
        with blocking():
            seen.append(pool._active)
            with blocking():
                seen.append(pool._active)
            seen.append(pool._active)
        seen.append(pool._active)

    pool.submit(task).result(WAIT)
    assert seen == [1, 0, 0, 0, 1]
    pool.shutdown()


def test_more_workers_than_max_active_run_while_the_others_block():
    pool = CountingThreadPool(8, max_active=2)
    inside = threading.Barrier(5, timeout=WAIT)  # breaks (and the test fails) unless all five are inside at once

    def task():
        with blocking():
            inside.wait()

    futures = [pool.submit(task) for _ in range(5)]
    for f in futures:
        f.result(WAIT + 5)
    pool.shutdown()
    assert pool.in_flight == 0


def test_shutdown_runs_the_queued_calls_and_every_thread_exits():
    pool = CountingThreadPool(4, max_active=1)
    started, release = threading.Event(), threading.Event()
    first = pool.submit(_holder(started, release))
    assert started.wait(WAIT)
    queued = [pool.submit(lambda i=i: i) for i in range(3)]
    pool.shutdown(wait=False)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(lambda: None)
    release.set()
    assert first.result(WAIT) == "held" and [f.result(WAIT) for f in queued] == [0, 1, 2]
    pool.shutdown(wait=True)
    assert pool._threads == 0 and pool.in_flight == 0


def test_blocking_is_a_no_op_off_the_pool():
    with blocking():
        with blocking():
            pass


def test_max_active_is_bounded_by_the_workers_and_checked():
    assert CountingThreadPool(2).max_active == min(2, default_active_workers())
    assert CountingThreadPool(64).max_active == default_active_workers() >= 1
    assert CountingThreadPool(8, max_active=3).max_active == 3
    with pytest.raises(ValueError, match="max_active must be >= 1, got 0"):
        CountingThreadPool(8, max_active=0)


def test_a_light_call_is_answered_while_a_slow_call_holds_the_only_compute_slot(tmp_path):
    """One compute slot, held by the slow model: a call of a light model (one thread, far under
    LIGHT_JOB_FLOPS) is answered before the slow call ends, while a quick call that needs the slot is queued."""
    slow = slow_model()
    proc = ServerProcess(tmp_path / "models", "--compute-slots", "1", *slow.server_args()).start()
    try:
        with ConvClient(proc.target, timeout=60 + 20 * slow.seconds) as c:
            c.register_model("slow", slow.layers())
            x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
            c.register_model("light", [{"kernel": np.full((1, 1, 1, 1), 2.0, np.float32)}])
            result = {}

            def slow_call():
                result["y"] = c.infer("slow", slow.input)
                result["done"] = time.monotonic()

            t = threading.Thread(target=slow_call)
            t.start()
            held = queued_behind(proc, t, slow)  # the slow call holds the slot
            (y, took), start = time_call(c.infer, "light", x), time.monotonic()
            t.join(60 + 20 * slow.seconds)
        assert held, f"no quick call was ever queued behind the slow one: {slow} too short?\n{proc.log()}"
        # Had it waited for the slot, it would have taken what was left of the slow call (its answer may even
        # arrive a moment before the slow call's own): half of that is far more than a light call ever needs.
        left = result["done"] - (start - took)
        assert took < left / 2, f"the light call took {took:.3f} s of the slow call's last {left:.3f} s ({slow})"
        np.testing.assert_array_equal(y, 2 * x)
        np.testing.assert_array_equal(result["y"], slow.input)
    finally:
        assert proc.stop() == 0, proc.log()


def test_open_streams_do_not_hold_the_active_workers_places(tmp_path):
    """As many reflection streams held open as RPC workers may take calls at once (each blocks a worker reading its
    client's next request): unary calls are still served. Were the streams counted as active, every unary call
    would queue until a stream ended, and time out."""
    import re

    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    proc = ServerProcess(tmp_path / "models", "--workers", "8").start()
    done = threading.Event()

    def requests():  # one request, then the stream stays open until the test ends
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        done.wait(120)

    try:
        active = int(re.search(r"at most (\d+) taking calls at once", proc.log()).group(1))
        assert active < 8, proc.log()  # room left in the pool for the unary calls
        with grpc.insecure_channel(proc.target) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            streams = [stub.ServerReflectionInfo(requests(), timeout=120) for _ in range(active)]
            try:
                for stream in streams:  # each stream was taken by a worker, which now waits for its next request
                    assert next(stream).HasField("list_services_response")
                with ConvClient(proc.target, timeout=60) as c:
                    x = np.ones((1, 1, 4, 4), np.float32)
                    for _ in range(3):
                        np.testing.assert_array_equal(c.conv(x, np.full((1, 1, 1, 1), 3.0, np.float32)), 3 * x)
            finally:
                done.set()
                for stream in streams:
                    stream.cancel()
    finally:
        assert proc.stop() == 0, proc.log()
