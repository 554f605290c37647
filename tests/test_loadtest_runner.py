"""The harness's scheduling, on a stand-in client whose latency is known, so the expected numbers are exact.

This tests the scheduling logic (closed loop, open loop, coordinated omission), not the transport. The real
transport is covered end to end in test_loadtest_e2e.py.
"""
import threading
import time

import grpc
import numpy as np

from client import ConvError
from client.loadtest import RunConfig, summarize
from client.loadtest._runner import _run_threads
from client.loadtest._stats import STATUS_NOT_SENT, STATUS_OK


class SleepyClient:
    """``infer`` sleeps ``latency`` seconds; during [stall_from, stall_until) (seconds from creation) every call
    instead lasts until stall_until, as a server that stops answering for a while would."""

    def __init__(self, latency, stall_from=None, stall_until=None, fail_every=None):
        self.latency, self.stall_from, self.stall_until = latency, stall_from, stall_until
        self.fail_every = fail_every
        self.t0 = time.perf_counter()
        self.calls = 0
        self._lock = threading.Lock()

    def infer(self, name, x):
        with self._lock:
            self.calls += 1
            n = self.calls
        now = time.perf_counter() - self.t0
        if self.stall_from is not None and self.stall_from <= now < self.stall_until:
            time.sleep(self.stall_until - now)
        else:
            time.sleep(self.latency)
        if self.fail_every and n % self.fail_every == 0:
            raise ConvError(grpc.StatusCode.UNAVAILABLE, "replica went away")
        return x


def _cfg(**kw):
    base = dict(target="unused:1", model="m", input_shape=(1, 1, 2, 2), dtype="float32", concurrency=1,
                duration=1.0, warmup=0.0, rate=None)
    base.update(kw)
    return RunConfig(**base)


def test_closed_loop_keeps_concurrency_requests_in_flight():
    client = SleepyClient(latency=0.02, fail_every=10)
    origin = time.perf_counter()
    samples = _run_threads(_cfg(concurrency=3, duration=1.0), 0, client, origin)
    # 3 workers x about 1 s / 20 ms each (sleep overshoots a little, and the machine is shared)
    assert 60 <= len(samples) <= 153, len(samples)
    assert np.all(samples.latency >= 0.019)
    assert np.all(samples.send_lag == 0)
    s = summarize(samples, warmup=0.0, duration=1.0)
    assert s["errors_by_code"] == {"UNAVAILABLE": len(samples) // 10}


def test_open_loop_charges_a_stall_to_every_request_due_during_it():
    # 100 req/s, one worker, 2 ms per answer, but from 0.3 s to 0.6 s the "server" does not answer.
    client = SleepyClient(latency=0.002, stall_from=0.3, stall_until=0.6)
    origin = client.t0
    samples = _run_threads(_cfg(rate=100.0, duration=1.0, concurrency=1), 0, client, origin)
    assert len(samples) == 100  # the schedule, exactly: every due request is accounted for
    assert np.all(samples.status == STATUS_OK)
    due = samples.start
    # A closed-loop view would show one slow request; measured from the intended send time, every request due during
    # the stall waited for it: the one due at 0.40 s was answered at about 0.60 s.
    during = (due >= 0.31) & (due < 0.59)
    expected = 0.6 - due[during]
    assert np.all(samples.latency[during] >= expected - 0.005)
    assert np.all(samples.send_lag[during] >= expected - 0.01)
    s = summarize(samples, warmup=0.0, duration=1.0)
    assert s["latency_ms"]["p90"] > 100 and s["latency_ms"]["p50"] < 50
    # Outside the stall the schedule is kept.
    before = due < 0.29
    assert np.median(samples.latency[before]) < 0.05


def test_open_loop_reports_requests_never_sent():
    # 200 req/s against 20 ms answers with 2 workers: at most 100 req/s get out; the rest are NOT_SENT, not dropped.
    client = SleepyClient(latency=0.02)
    samples = _run_threads(_cfg(rate=200.0, duration=1.0, concurrency=2), 0, client, client.t0)
    assert len(samples) == 200
    not_sent = samples.status == STATUS_NOT_SENT
    assert 95 <= np.count_nonzero(not_sent) <= 170, np.count_nonzero(not_sent)
    assert np.count_nonzero(~not_sent) == client.calls
    # Their recorded latency is what they had waited by the end of the run: a lower bound, never negative.
    assert np.all(samples.latency[not_sent] > 0)
    np.testing.assert_allclose(samples.latency[not_sent], 1.0 - samples.start[not_sent], atol=1e-9)
