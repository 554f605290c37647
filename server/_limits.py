"""Server limits: in-flight requests, a default deadline, and the checks the repository and engine apply.

Every limit is a `ServerConfig` field and a ``python -m server`` flag (see `server._hardening`), documented in the
README with its default. Going over one gets RESOURCE_EXHAUSTED with a message that names the limit and the flag
that raises it.
"""
import heapq
import itertools
import logging
import threading
import time

import grpc

from ._errors import LimitExceeded, RequestCancelled

__all__ = ["DefaultDeadlineInterceptor", "InFlightCounter", "NO_DEADLINE_SECONDS", "check_count"]

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


class InFlightCounter(grpc.ServerInterceptor):
    """Count the unary RPCs whose handler is running (for tests and logs: it must return to 0 when calls end).

    The *limit* on in-flight requests is gRPC's own ``maximum_concurrent_rpcs`` (set from the same
    ``--max-in-flight``): it counts a call from its arrival to its end, rejects the one over the limit with
    RESOURCE_EXHAUSTED before any thread or queue slot is spent on it, and cannot leak a slot when a call dies before
    its handler runs (a counter in an interceptor can: gRPC skips the handler when the request never arrives).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._count = 0

    @property
    def in_flight(self):
        return self._count

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler_call_details.method.startswith(_EXEMPT):
            return handler
        behavior = handler.unary_unary

        def counted(request, context):
            with self._lock:
                self._count += 1
            try:
                return behavior(request, context)
            finally:
                with self._lock:
                    self._count -= 1

        return handler._replace(unary_unary=counted)


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


class _BoundedContext:
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


class DefaultDeadlineInterceptor(grpc.ServerInterceptor):
    """Give every unary call that arrives without a deadline one of `seconds` (``--default-deadline``).

    Without it, a client that sets no timeout can hold a compute slot forever with a huge request; with it, the work
    is dropped (queued) or stopped between layers (running) and the client gets DEADLINE_EXCEEDED.

    Parameters
    ----------
    seconds : float
        > 0.
    """

    def __init__(self, seconds):
        if not seconds > 0:
            raise ValueError(f"the default deadline must be > 0 seconds, got {seconds!r}")
        self.seconds = float(seconds)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler_call_details.method.startswith(_EXEMPT):
            return handler
        behavior = handler.unary_unary
        seconds = self.seconds

        def bounded(request, context):
            remaining = context.time_remaining()
            if remaining is not None and remaining < NO_DEADLINE_SECONDS:
                return behavior(request, context)  # the client's own deadline rules
            bounded_context = _BoundedContext(context, seconds)
            try:
                response = behavior(request, bounded_context)
            except RequestCancelled:
                if bounded_context.expired:
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, bounded_context.message())
                raise
            finally:
                bounded_context.done()
            if bounded_context.expired:
                # Finished, but too late: the answer is dropped, as gRPC drops it when a client deadline passes.
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, bounded_context.message())
            return response

        return handler._replace(unary_unary=bounded)


class _Undecodable:
    """Stands in for a request whose bytes did not parse, so the handler can refuse it with a proper status."""

    __slots__ = ("error",)

    def __init__(self, error):
        self.error = error


class UndecodableRequestInterceptor(grpc.ServerInterceptor):
    """Answer request bytes that are not a valid message with INVALID_ARGUMENT, quietly.

    Without it gRPC answers INTERNAL ("Exception deserializing request!") and logs a traceback at ERROR for every
    such request, so a client sending garbage could fill the log (and the disk under it) at line rate.
    """

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        deserialize, behavior = handler.request_deserializer, handler.unary_unary
        method = handler_call_details.method

        def tolerant_deserialize(data):
            try:
                return deserialize(data)
            except Exception as exc:  # noqa: BLE001 - DecodeError, or anything else a parser raises on garbage
                return _Undecodable(exc)

        def checked(request, context):
            if isinstance(request, _Undecodable):
                log.debug("%s: undecodable request: %s", method, request.error)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"the request is not a valid {method.rsplit('/', 1)[-1]} request message "
                              f"({type(request.error).__name__}: {str(request.error)[:200]})")
            return behavior(request, context)

        return handler._replace(request_deserializer=tolerant_deserialize, unary_unary=checked)
