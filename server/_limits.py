"""Server limits: in-flight requests, a default deadline, and the checks the repository and engine apply.

Every limit is a `ServerConfig` field and a ``python -m server`` flag (see `server._hardening`), documented in the
README with its default. Going over one gets RESOURCE_EXHAUSTED with a message that names the limit and the flag
that raises it.
"""
import collections
import concurrent.futures
import heapq
import itertools
import logging
import threading
import time

import grpc

import convcore

from ._errors import LimitExceeded

__all__ = ["AdmissionInterceptor", "BoundedContext", "CountingThreadPool", "NO_DEADLINE_SECONDS", "blocking",
           "check_count", "default_active_workers"]

log = logging.getLogger("server")

#: grpc reports ~9.2e18 s remaining for a call without a deadline; anything beyond this many seconds is "none".
NO_DEADLINE_SECONDS = 1e8
#: Not counted, not limited: probes must work however busy the server is.
_EXEMPT = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def check_count(what, count, limit, flag):
    """Raise LimitExceeded if `count` is over `limit` (None: no limit)."""
    if limit is not None and count > limit:
        raise LimitExceeded(f"{what}: {count} is over this server's limit of {limit} (python -m server {flag} N "
                            f"raises it)")


#: Per-thread state of the pool's workers (a `_Worker`); absent on every other thread.
_worker = threading.local()


class _Worker:
    """A pool worker's blocking-section depth; the context manager `blocking()` returns on that worker."""

    __slots__ = ("pool", "depth")

    def __init__(self, pool):
        self.pool, self.depth = pool, 0

    def __enter__(self):
        self.depth += 1
        if self.depth == 1:
            self.pool._block()
        return self

    def __exit__(self, *exc):
        self.depth -= 1
        if self.depth == 0:
            self.pool._unblock()
        return False


class _NotAWorker:
    """`blocking()` on a thread that is not a pool worker: nothing to hand over."""

    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NOT_A_WORKER = _NotAWorker()


def blocking():
    """``with blocking(): ...`` around a wait (CPU units, a dynamic batch, file I/O) or a job on the OpenMP team, on
    an RPC worker: while inside, the worker does not count as active, so that a queued call gets a worker of its
    own (`CountingThreadPool`). Nests; a no-op on other threads."""
    return getattr(_worker, "state", _NOT_A_WORKER)


def default_active_workers():
    """Active RPC workers when not given: as many as the usable CPUs (convcore's count: affinity and cgroup quota).

    Why: an active worker either runs Python (one at a time, under the GIL) or computes with the GIL released, so
    one per CPU keeps every CPU busy; more only take turns on the same CPUs, each turn a wake-up and a GIL hand-off.
    Measured on 2 vCPUs, small (light) calls, serve_ab medians of per-round ratios: 2 active ÷ 3 active 1.05-1.15 at
    concurrency 4 in three runs (0.02-0.2 ms less server CPU per call), 0.96-1.05 at 16; 3 ÷ 8 (as before)
    1.13-1.18 (BENCHMARKS.md, session of 2026-12-02 06:30-08:10).
    """
    return convcore.usable_cpus()


class CountingThreadPool(concurrent.futures.Executor):
    """gRPC's worker pool: at most `max_workers` threads, of which at most `max_active` take calls at once, the most
    recently idle one taking the next call, counting the calls handed to it and not yet finished (queued or running).

    The count is the number of calls in flight that ``--max-in-flight`` bounds. It counts a call from its
    submission to its end, and every call ends (also when its request never arrives, or at shutdown), so the count
    cannot leak. Health checks and refusals run on another pool (``experimental_thread_pool``), so they do not count.

    Why not `concurrent.futures.ThreadPoolExecutor`: its idle threads all wait on one queue, so each call wakes
    whichever thread the OS picks, typically one that has slept longest (cold stack and caches), and all
    `max_workers` threads keep taking turns. Here idle threads wait on a stack: under C concurrent calls only ~C
    threads ever run, and the one that just finished a call takes the next without sleeping.

    Why `max_active`: a call that arrives while `max_active` workers are busy is not given a sleeping thread; it
    waits in the queue for the first busy worker to finish, which takes it without going to sleep. On this VM every
    wake-up of a sleeping thread costs (idle vCPUs halt at once), and small calls spend more time in wake-ups and
    GIL hand-offs between threads than computing, so fewer threads taking turns do more calls per second. A worker
    that is about to wait rather than run (for CPU units, for a dynamic batch, on file I/O) or that runs a job on
    the whole OpenMP team says so with `blocking()`; while it does it is not active, and a queued call gets another
    worker. So large and batched calls are served by as many workers as before; only short calls are capped.

    Parameters
    ----------
    max_workers : int
        Threads at most (``--workers``); started on demand, never stopped before `shutdown`.
    thread_name_prefix : str
    max_active : int, optional
        Workers taking calls at once, not counting those inside `blocking()` (default `default_active_workers()`,
        the usable CPUs; at most `max_workers`).
    """

    def __init__(self, max_workers, thread_name_prefix="rpc", max_active=None):
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        if max_active is not None and max_active < 1:
            raise ValueError(f"max_active must be >= 1, got {max_active}")
        self._max_workers = max_workers
        self._max_active = min(max_workers, max_active or default_active_workers())
        self._prefix = thread_name_prefix
        self._lock = threading.Lock()
        self._tasks = collections.deque()  # (future, fn, args, kwargs) not yet taken
        self._idle = []  # wake-up locks of idle threads, most recently idle last
        self._threads = 0
        self._active = 0  # threads woken or started for calls, or running one outside blocking()
        self._shutdown = False
        self.in_flight = 0

    @property
    def max_active(self):
        return self._max_active

    def _grow(self):
        """Under the lock: when calls are queued and fewer than max_active workers are active, the wake-up lock of
        an idle thread to release, or the name of a thread to start (counted active from now); else None."""
        if not self._tasks or self._active >= self._max_active:
            return None
        if self._idle:
            self._active += 1
            return self._idle.pop()
        if self._threads < self._max_workers:
            self._active += 1
            self._threads += 1
            return f"{self._prefix}_{self._threads - 1}"
        return None

    def _start(self, grown):
        if grown is None:
            return
        if isinstance(grown, str):
            threading.Thread(target=self._work, name=grown, daemon=True).start()
        else:
            grown.release()

    def submit(self, fn, /, *args, **kwargs):
        future = concurrent.futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self.in_flight += 1
            self._tasks.append((future, fn, args, kwargs))
            grown = self._grow()
        self._start(grown)
        return future

    def _block(self):
        with self._lock:
            self._active -= 1
            grown = self._grow()
        self._start(grown)

    def _unblock(self):
        with self._lock:
            self._active += 1  # may exceed max_active for a while: the worker then idles after its call

    def _work(self):
        _worker.state = _Worker(self)
        wake = threading.Lock()
        wake.acquire()
        while True:
            with self._lock:
                if self._tasks and (self._active <= self._max_active or self._shutdown):
                    task = self._tasks.popleft()
                elif self._shutdown:
                    self._threads -= 1
                    self._active -= 1
                    return
                else:
                    task = None
                    self._active -= 1
                    self._idle.append(wake)
            if task is None:
                wake.acquire()  # released by whoever popped this lock off the stack, who counted us active
                continue
            future, fn, args, kwargs = task
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        result = fn(*args, **kwargs)
                    except BaseException as exc:  # noqa: BLE001 - handed to the future, as ThreadPoolExecutor does
                        future.set_exception(exc)
                    else:
                        future.set_result(result)
            finally:
                del future, fn, args, kwargs, task  # nothing of the call stays alive while this thread idles
                with self._lock:
                    self.in_flight -= 1

    def shutdown(self, wait=True, *, cancel_futures=False):
        with self._lock:
            self._shutdown = True
            idle, self._idle = self._idle, []
            self._active += len(idle)
            cancelled = []
            if cancel_futures:
                cancelled, self._tasks = list(self._tasks), collections.deque()
        for wake in idle:
            wake.release()
        for future, *_ in cancelled:
            future.cancel()
            with self._lock:
                self.in_flight -= 1
        if wait:
            while True:
                with self._lock:
                    if not self._threads:
                        return
                time.sleep(0.01)


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Refuse a call with RESOURCE_EXHAUSTED as it arrives when `limit` calls are already in flight
    (``--max-in-flight``), before any worker thread or queue slot is spent on it.

    Why not gRPC's own ``maximum_concurrent_rpcs``: it counts health probes too, so a server busy with `limit`
    slow calls would fail its liveness probe and be restarted for being busy. Here probes (and reflection) are
    neither counted nor refused. Runs on gRPC's polling thread, which also hands every call to `pool`, so the count
    it reads is exact.

    Parameters
    ----------
    limit : int
    pool : CountingThreadPool
        gRPC's worker pool: its ``in_flight`` is the count.
    refusal : callable
        ``refusal(full_method, code, message)`` -> the handler that refuses the call (wrapped like every handler,
        so the refusal is counted in the metrics, and run off the worker pool).
    """

    def __init__(self, limit, pool, refusal):
        self.limit, self._pool, self._refusal = limit, pool, refusal
        self._message = (f"the server is serving its limit of {limit} requests at once; retry later, or start it "
                         f"with a larger --max-in-flight")
        self._refusals = {}  # full method -> its refusing handler, made once
        self._streams = {}  # full method -> (its handler, that handler stepping aside), made once

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return handler
        if handler.unary_unary is None:
            # Streaming RPCs (health Watch, reflection) are exempt like probes: none of them computes anything. They
            # live as long as their clients keep them open, so they run outside the active workers.
            return self._aside(handler_call_details.method, handler)
        if self._pool.in_flight < self.limit:
            return handler
        method = handler_call_details.method
        if method.startswith(_EXEMPT):
            return handler
        refusal = self._refusals.get(method)
        if refusal is None:
            refusal = self._refusals[method] = self._refusal(method, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                             self._message)
        return refusal

    def _aside(self, method, handler):
        cached = self._streams.get(method)
        if cached is None or cached[0] is not handler:
            behavior = handler.unary_stream or handler.stream_stream or handler.stream_unary
            # Not those that hold no worker while open (health's Watch sends from a callback) or run elsewhere.
            keep = (getattr(behavior, "experimental_non_blocking", False)
                    or getattr(behavior, "experimental_thread_pool", None) is not None)
            cached = self._streams[method] = (handler, handler if keep else _stepping_aside(handler))
        return cached[1]


def _stepping_aside(handler):
    """A streaming `handler` whose behavior runs inside `blocking()`: a stream held open for minutes (a reflection
    session) must not hold one of the few active RPC workers' places, or a few of them would stall every unary
    call. Response streams are iterated by the worker after the behavior returns, so the iteration is
    wrapped too."""
    def stream_out(behavior):
        def run(request, context):
            with blocking():
                yield from behavior(request, context)
        return run

    def unary_out(behavior):
        def run(request_iterator, context):
            with blocking():
                return behavior(request_iterator, context)
        return run

    codecs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream_out(handler.unary_stream), **codecs)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(stream_out(handler.stream_stream), **codecs)
    return grpc.stream_unary_rpc_method_handler(unary_out(handler.stream_unary), **codecs)


class _Watchdog:
    """One daemon thread that expires bounded contexts when their time is up.

    One thread for all calls, rather than a `threading.Timer` per call: clients such as perf_analyzer set no deadline,
    and starting a thread per call would cost more than a small convolution.
    """

    def __init__(self):
        self._heap = []
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._thread = None
        self._finished = 0  # entries whose call ended before its deadline, still in the heap

    def finished_one(self):
        with self._cond:
            self._finished += 1

    def watch(self, when, context):
        with self._cond:
            if self._finished > 1024 and self._finished > len(self._heap) // 2:
                # Most entries belong to calls that ended long ago: drop them, so a busy server's heap stays small.
                self._heap = [e for e in self._heap if not e[2].finished]
                heapq.heapify(self._heap)
                self._finished = 0
            entry = (when, next(self._ids), context)
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="default-deadline", daemon=True)
                self._thread.start()
            elif self._heap[0] is entry:
                # Only a new earliest deadline changes when the thread must wake. With one default deadline every
                # new entry is the latest, so calls do not wake the thread (a wake-up, with the GIL held, per call).
                self._cond.notify()

    def _run(self):
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                when, _, context = self._heap[0]
                now = time.monotonic()
                if when > now:
                    self._cond.wait(when - now)
                    continue
                heapq.heappop(self._heap)
                if context.finished:
                    self._finished = max(0, self._finished - 1)
                    continue
            context.expire()


_watchdog = _Watchdog()


class BoundedContext:
    """A ServicerContext that behaves as if the client had set a deadline `seconds` from now.

    When it expires, the callbacks registered with `add_callback` run (the compute executor's: they drop a queued
    job and stop a model between layers), `is_active()` turns False, and an abort with CANCELLED becomes
    DEADLINE_EXCEEDED, so the client learns which limit it hit.
    """

    def __init__(self, context, seconds):
        self._context = context
        self._seconds = seconds
        self._deadline = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._callbacks = []
        self.expired = False
        self.finished = False
        _watchdog.watch(self._deadline, self)

    def __getattr__(self, name):
        return getattr(self._context, name)

    def time_remaining(self):
        return max(0.0, self._deadline - time.monotonic())

    def is_active(self):
        return not self.expired and self._context.is_active()

    def add_callback(self, callback):
        with self._lock:
            if self.expired:
                return False
            self._callbacks.append(callback)
        return self._context.add_callback(callback)  # also when the RPC really ends (callbacks are idempotent)

    def expire(self):
        with self._lock:
            if self.finished:
                return
            self.expired = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001 - a failing callback must not stop the others
                log.exception("deadline callback failed")

    def message(self):
        return (f"the call took longer than the server's default deadline of {self._seconds:g} s (the client set "
                f"none; set a timeout on the call, or start the server with a larger --default-deadline)")

    def abort(self, code, details):
        if self.expired and code == grpc.StatusCode.CANCELLED:
            code, details = grpc.StatusCode.DEADLINE_EXCEEDED, self.message()
        self._context.abort(code, details)

    def done(self):
        """The call ended: never expire it, and let go of the call's objects (the watchdog may hold this a while)."""
        with self._lock:
            self.finished = True
            self._callbacks = []
        _watchdog.finished_one()
