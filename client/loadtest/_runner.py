"""Driving the load: worker threads in one process, or several processes whose raw samples are merged.

Closed loop (no ``--rate``): each of C workers sends its next request as soon as the previous one is answered.

Open loop (``--rate R``): request i is due at ``origin + i / R`` whatever happened before. A free worker takes the
next index, sleeps until it is due and sends it; the latency is measured from the *due* time, so when the server
stalls and every worker is stuck waiting, the requests that should have gone out meanwhile are charged the wait
(no coordinated omission). Requests still unsent when the run ends are recorded as ``NOT_SENT``, with the time they
had waited so far as a lower bound of their latency: a concurrency too low for the rate shows up as errors, not as a
quietly lower rate.

Several processes (``--processes P``) split the concurrency and, in an open loop, the schedule (process p sends the
indices i with i % P == p). Each keeps raw samples; the parent concatenates them.
"""
import itertools
import multiprocessing
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import numpy as np

from client import ConvClient, ConvError

from ._stats import STATUS_CLIENT_ERROR, STATUS_NOT_SENT, STATUS_OK, Samples

__all__ = ["Counters", "RunConfig", "make_input", "run"]
#: How often the live counters are looked at (progress line, publishing to the parent process).
TICK_SECONDS = 0.2
#: Start-up allowance for a client process (interpreter, numpy, grpc imports, channel) before the run gives up on it.
PROCESS_START_TIMEOUT = 60.0


@dataclass(frozen=True)
class RunConfig:
    """What a run does; picklable, so that client processes get it as is.

    Attributes
    ----------
    target : str
        Passed to ``ConvClient`` (``"h1:p1,h2:p2"`` or ``"dns:///name:port"``).
    model : str
        Registered model to call with ``infer``.
    input_shape : tuple of int
    dtype : str
    concurrency : int
        Requests in flight at most, over all processes.
    duration, warmup : float
        Seconds.
    rate : float or None
        Requests per second over all processes (open loop); None: closed loop.
    timeout : float
        Per-request deadline, seconds.
    seed : int
        Of the random input.
    processes : int
    """
    target: str
    model: str
    input_shape: tuple
    dtype: str
    concurrency: int
    duration: float
    warmup: float = 0.0
    rate: float = None
    timeout: float = 30.0
    seed: int = 0
    processes: int = 1

    def threads_of(self, index):
        """How many worker threads process ``index`` runs (the concurrency spread as evenly as possible)."""
        base, extra = divmod(self.concurrency, self.processes)
        return base + (1 if index < extra else 0)


class Counters:
    """Live request and error counts, one slot per worker thread (each slot written by its own thread only)."""

    def __init__(self, slots):
        self.requests = [0] * slots
        self.errors = [0] * slots

    def totals(self):
        """``(requests, errors)`` so far; a racy read of ints, which is fine for a progress line."""
        return sum(self.requests), sum(self.errors)


def make_input(shape, dtype, seed=0):
    """The random input tensor every request sends (standard normal, C-contiguous)."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _status_of(exc):
    """The gRPC status number of a ConvError (its ``code``: a grpc.StatusCode, a number or a method)."""
    code = getattr(exc, "code", None)
    if callable(code):
        code = code()
    value = getattr(code, "value", code)
    if isinstance(value, tuple):
        value = value[0]
    return int(value) if isinstance(value, int) else STATUS_CLIENT_ERROR


class _Schedule:
    """Hands out due times (perf_counter seconds) to the worker threads of one process; None means stop."""

    def __init__(self, cfg, index, origin):
        self.origin = origin
        self.stop = origin + cfg.warmup + cfg.duration
        self.open_loop = cfg.rate is not None
        if self.open_loop:
            self._period = 1.0 / cfg.rate
            self._stride, self._offset = cfg.processes, index
            self._counter = itertools.count()  # next() on it is atomic under the GIL: no lock needed
            # How many of this process's indices fall before the stop: the ones never taken are NOT_SENT.
            n_total = int(np.ceil((cfg.warmup + cfg.duration) * cfg.rate - 1e-9))
            self.scheduled = max(0, -(-(n_total - index) // cfg.processes))

    def offset(self, k):
        """Due time of request k relative to the origin, computed exactly as i / R (no origin round-off)."""
        return (k * self._stride + self._offset) * self._period

    def due(self, k):
        return self.origin + self.offset(k)

    def next(self):
        """``(k, due)`` of the next request, or None when the run is over."""
        now = time.perf_counter()
        if now >= self.stop:
            return None
        if not self.open_loop:
            return -1, now
        k = next(self._counter)
        if k >= self.scheduled:
            return None
        return k, self.due(k)


def _worker(slot, client, model, x, schedule, counters, out, errors_logged):
    start, latency, status, lag, sent_k = [], [], [], [], []
    while True:
        item = schedule.next()
        if item is None:
            break
        k, due = item
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        sent = time.perf_counter()
        code = STATUS_OK
        try:
            client.infer(model, x)
        except ConvError as exc:
            code = _status_of(exc)
        except Exception:  # noqa: BLE001 - a harness/SDK bug must not kill the run, but it must be seen once
            code = STATUS_CLIENT_ERROR
            if not errors_logged.is_set():
                errors_logged.set()
                print("loadtest: a request failed in the client (counted as CLIENT_ERROR):\n"
                      + traceback.format_exc(), file=sys.stderr, flush=True)
        end = time.perf_counter()
        # Relative due time: computed from k, not as due - origin, whose round-off can move a request that is due
        # exactly at the end of the warm-up to just before it.
        start.append(schedule.offset(k) if schedule.open_loop else due - schedule.origin)
        latency.append(end - due)
        status.append(code)
        lag.append(sent - due if schedule.open_loop else 0.0)
        sent_k.append(k)
        counters.requests[slot] += 1
        if code != STATUS_OK:
            counters.errors[slot] += 1
    out[slot] = (start, latency, status, lag, sent_k)


def _connect(client):
    """Open the channel before the clock starts, so connection set-up is not charged to the first requests."""
    try:
        client.health()
    except ConvError:
        pass  # the requests themselves will report what is wrong


def _run_threads(cfg, index, client, origin, on_tick=None):
    """Run this process's share of the load on ``client`` from ``origin`` (perf_counter seconds); return Samples."""
    nthreads = cfg.threads_of(index)
    x = make_input(cfg.input_shape, cfg.dtype, cfg.seed)
    schedule = _Schedule(cfg, index, origin)
    counters = Counters(nthreads)
    out = [None] * nthreads
    logged = threading.Event()
    wait = origin - time.perf_counter()
    if wait > 0:
        time.sleep(wait)
    threads = [threading.Thread(target=_worker, name=f"loadtest-{index}-{i}", daemon=True,
                                args=(i, client, cfg.model, x, schedule, counters, out, logged))
               for i in range(nthreads)]
    for t in threads:
        t.start()
    while True:
        alive = [t for t in threads if t.is_alive()]
        if on_tick is not None:
            on_tick(counters)
        if not alive:
            break
        alive[0].join(TICK_SECONDS)
    parts = [Samples(np.asarray(s, dtype=np.float64), np.asarray(lat, dtype=np.float64),
                     np.asarray(st, dtype=np.int32), np.asarray(lg, dtype=np.float64))
             for s, lat, st, lg, _ in out]
    if schedule.open_loop:
        sent = set(itertools.chain.from_iterable(o[4] for o in out))
        missing = np.array([k for k in range(schedule.scheduled) if k not in sent], dtype=np.int64)
        if missing.size:
            due = np.array([schedule.offset(k) for k in missing])
            waited = schedule.stop - origin - due
            parts.append(Samples(due, waited, np.full(missing.size, STATUS_NOT_SENT, dtype=np.int32),
                                 waited.copy()))
    return Samples.concatenate(parts)


def _process_main(cfg, index, messages, go, start_at, shared):
    """Entry point of client process ``index``: wait for the common start, run, send the samples back."""
    def publish(counters):
        shared[2 * index], shared[2 * index + 1] = counters.totals()

    try:
        with ConvClient(cfg.target, timeout=cfg.timeout) as client:
            _connect(client)
            messages.put(("ready", index, None))
            if not go.wait(PROCESS_START_TIMEOUT) or start_at.value == 0.0:
                return  # the parent gave up before the start
            # The parent picked one wall-clock start for all processes; turn it into this process's perf_counter.
            origin = time.perf_counter() + (start_at.value - time.time())
            samples = _run_threads(cfg, index, client, origin, on_tick=publish)
        messages.put(("result", index, samples))
    except BaseException:  # noqa: BLE001 - report anything to the parent rather than die silently
        messages.put(("error", index, traceback.format_exc()))


def run(cfg, progress=None):
    """Run the load described by ``cfg``; return the merged raw samples of the whole run (warm-up included).

    Parameters
    ----------
    cfg : RunConfig
    progress : callable, optional
        Called about every 0.2 s as ``progress(elapsed_s, requests, errors)``.

    Returns
    -------
    Samples

    Raises
    ------
    RuntimeError
        If a client process fails to start or dies.
    """
    if cfg.processes == 1:
        with ConvClient(cfg.target, timeout=cfg.timeout) as client:
            _connect(client)
            origin = time.perf_counter() + 0.01

            def tick(counters):
                if progress is not None:
                    progress(time.perf_counter() - origin, *counters.totals())

            return _run_threads(cfg, 0, client, origin, on_tick=tick)
    return _run_processes(cfg, progress)


def _run_processes(cfg, progress):
    # spawn, not fork: a forked copy of a process that already holds gRPC's threads can deadlock.
    ctx = multiprocessing.get_context("spawn")
    messages = ctx.Queue()
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0, lock=False)
    shared = ctx.Array("q", 2 * cfg.processes, lock=False)
    procs = [ctx.Process(target=_process_main, name=f"loadtest-{i}", daemon=True,
                         args=(cfg, i, messages, go, start_at, shared)) for i in range(cfg.processes)]
    for p in procs:
        p.start()
    finished = False
    try:
        ready, results = set(), {}
        deadline = time.monotonic() + PROCESS_START_TIMEOUT
        while len(ready) < cfg.processes:
            kind, index, payload = _get(messages, deadline, procs, "start")
            if kind == "error":
                raise RuntimeError(f"client process {index} failed:\n{payload}")
            ready.add(index)
        start_at.value = time.time() + 0.2
        go.set()
        origin = time.perf_counter() + 0.2
        # Results come back after the run, at most one timeout after its end (requests in flight then).
        deadline = time.monotonic() + 0.2 + cfg.warmup + cfg.duration + cfg.timeout + PROCESS_START_TIMEOUT
        while len(results) < cfg.processes:
            try:
                kind, index, payload = messages.get(timeout=TICK_SECONDS)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise RuntimeError("client processes did not report their results in time") from None
                dead = [p.name for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    raise RuntimeError(f"client process(es) {', '.join(dead)} died") from None
                if progress is not None:
                    progress(time.perf_counter() - origin, sum(shared[0::2]), sum(shared[1::2]))
                continue
            if kind == "error":
                raise RuntimeError(f"client process {index} failed:\n{payload}")
            results[index] = payload
        if progress is not None:
            progress(time.perf_counter() - origin, sum(shared[0::2]), sum(shared[1::2]))
        finished = True
        return Samples.concatenate([results[i] for i in range(cfg.processes)])
    finally:
        go.set()  # after a failure start_at is still 0: a process still waiting for the start returns at once
        for p in procs:
            p.join(5.0 if finished else 0.5)
            if p.is_alive():
                p.terminate()
                p.join(1.0)


def _get(messages, deadline, procs, phase):
    while True:
        try:
            return messages.get(timeout=TICK_SECONDS)
        except queue.Empty:
            if time.monotonic() > deadline:
                raise RuntimeError(f"client processes did not {phase} within {PROCESS_START_TIMEOUT:.0f} s") from None
            dead = [p.name for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
            if dead:
                raise RuntimeError(f"client process(es) {', '.join(dead)} died during {phase}") from None
