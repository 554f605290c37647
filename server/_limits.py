"""Server limits: in-flight requests, a default deadline, and the checks the repository and engine apply.

Every limit is a `ServerConfig` field and a ``python -m server`` flag (see `server._hardening`), documented in the
README with its default. Going over one gets RESOURCE_EXHAUSTED with a message that names the limit and the flag
that raises it.
"""
import concurrent.futures
import heapq
import itertools
import logging
import threading
import time

import grpc

from ._errors import LimitExceeded

__all__ = ["AdmissionInterceptor", "BoundedContext", "CountingThreadPool", "NO_DEADLINE_SECONDS", "check_count"]

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


class CountingThreadPool(concurrent.futures.ThreadPoolExecutor):
    """gRPC's worker pool, counting the calls handed to it and not yet finished (queued or running).

    That is the number of calls in flight that ``--max-in-flight`` bounds. It counts a future from its submission to
    its end, and every future ends (also when its request never arrives, or at shutdown), so the count cannot leak.
    Health checks and refusals run on another pool (``experimental_thread_pool``), so they do not count.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._count_lock = threading.Lock()
        self.in_flight = 0

    def submit(self, fn, /, *args, **kwargs):
        with self._count_lock:
            self.in_flight += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._done(None)
            raise
        future.add_done_callback(self._done)
        return future

    def _done(self, _future):
        with self._count_lock:
            self.in_flight -= 1


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

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or self._pool.in_flight < self.limit:
            return handler
        method = handler_call_details.method
        if method.startswith(_EXEMPT) or handler.unary_unary is None:
            # Streaming RPCs (health Watch, reflection) are exempt like probes: none of them computes anything.
            return handler
        refusal = self._refusals.get(method)
        if refusal is None:
            refusal = self._refusals[method] = self._refusal(method, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                             self._message)
        return refusal


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
            heapq.heappush(self._heap, (when, next(self._ids), context))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="default-deadline", daemon=True)
                self._thread.start()
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
