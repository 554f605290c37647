"""Every unary RPC handler wrapped once, when it is registered: metrics, undecodable requests, the bearer token,
read-only models, the default deadline and the mapping of exceptions to status codes, in one closure per method.

Why not interceptors: gRPC Python runs a server's interceptors for every call as it arrives, on the one polling
thread that every call's events go through, and each interceptor builds a new handler for the call. Our five cost a
pipeline, five handler constructions and five nested closures per call (BENCHMARKS.md, "Serving path (issue 10)").
Here that work is done once per method at start-up, and a call runs one function. What must be decided when a call
arrives, before a worker thread is spent on it (the ``--max-in-flight`` admission), stays an interceptor
(`server._limits.AdmissionInterceptor`); so do streaming RPCs' token checks (`server._auth.TokenAuthInterceptor`,
which leaves the handlers wrapped here alone).

Requests are parsed in the handler, on the worker thread, not by gRPC: gRPC Python runs a method's request
deserializer on the polling thread (in the callback that receives the message), so parsing there makes every other
call's events wait behind it; the handler gets the raw bytes and parses them itself (py-spy, small ModelInfer at
C=4: the parse was 12% of the GIL-held time, all of it on the polling thread).

Order inside a call, outermost first: metrics (so they see the final status), undecodable request ->
INVALID_ARGUMENT, token -> UNAUTHENTICATED, read-only -> PERMISSION_DENIED, the default deadline, the servicer;
whatever the servicer raises is mapped by `server._errors.status_for`, the one table of exceptions to codes.
"""
import logging

import grpc

from ._auth import EXEMPT_PREFIXES, MODEL_WRITES, TOKEN_MESSAGE, WRAPPED, authorized, check_token, read_only_message
from ._errors import RequestCancelled, status_for
from ._limits import NO_DEADLINE_SECONDS, BoundedContext

__all__ = ["MethodWrapper"]

log = logging.getLogger("server")

_INVALID, _UNAUTHENTICATED, _DENIED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                                       grpc.StatusCode.PERMISSION_DENIED)
_DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED


class MethodWrapper:
    """Wraps unary-unary handlers for one server (see the module docstring).

    Parameters
    ----------
    metrics : ServerMetrics
    default_deadline : float or None
        Seconds a call whose client set no deadline may take (``--default-deadline``); None: unlimited.
    auth_token : str or None
        Require ``authorization: Bearer <token>`` on every method but health.
    read_only_models : bool
        Refuse RegisterModel/DeleteModel with PERMISSION_DENIED.
    probe_pool : concurrent.futures.ThreadPoolExecutor, optional
        Where health checks run (gRPC's ``experimental_thread_pool``), so that probes never wait behind calls that
        are computing, and do not count as in flight.
    """

    def __init__(self, metrics, default_deadline=None, auth_token=None, read_only_models=False, probe_pool=None):
        if default_deadline is not None and not default_deadline > 0:
            raise ValueError(f"the default deadline must be > 0 seconds, got {default_deadline!r}")
        self.metrics = metrics
        self.default_deadline = None if default_deadline is None else float(default_deadline)
        self._expected = f"Bearer {check_token(auth_token)}".encode() if auth_token else None
        self.read_only_models = read_only_models
        self.probe_pool = probe_pool

    def wrap(self, full_method, handler):
        """`handler` (a grpc.RpcMethodHandler) with every per-call concern of the module docstring; handlers that
        are not unary-unary are returned as they are."""
        if handler is None or handler.unary_unary is None:
            return handler
        behavior = handler.unary_unary
        exempt = full_method.startswith(EXEMPT_PREFIXES)
        if self.read_only_models and full_method in MODEL_WRITES:
            message = read_only_message(full_method)

            def behavior(request, context):  # noqa: F811 - the method is refused whatever the request
                context.abort(_DENIED, message)
        record = self.metrics.method(full_method)
        deserialize, serialize = handler.request_deserializer, handler.response_serializer
        bytes_in, bytes_out = record.bytes_in, record.bytes_out
        expected = None if exempt else self._expected
        seconds = None if exempt else self.default_deadline
        name = full_method.rsplit("/", 1)[-1]

        def counted_serialize(message):
            data = serialize(message) if serialize is not None else message
            bytes_out.inc(len(data))
            return data

        def handle(data, context):
            started = record.start()
            failed = True
            request = None
            try:
                bytes_in.inc(len(data))
                if deserialize is None:
                    request = data
                else:
                    try:
                        request = deserialize(data)
                    except Exception as exc:  # noqa: BLE001 - DecodeError, or anything a parser raises on garbage
                        # Not gRPC's INTERNAL + a traceback at ERROR per request: a client sending garbage could
                        # fill the log (and the disk under it) at line rate.
                        log.debug("%s: undecodable request: %s", full_method, exc)
                        context.abort(_INVALID, f"the request is not a valid {name} request message "
                                                f"({type(exc).__name__}: {str(exc)[:200]})")
                if expected is not None and not authorized(context.invocation_metadata(), expected):
                    log.info("%s -> UNAUTHENTICATED (missing or wrong token)", full_method)
                    context.abort(_UNAUTHENTICATED, TOKEN_MESSAGE)
                response = _call(full_method, behavior, request, context, seconds)
                failed = False
                return response
            finally:
                record.finish(started, context, failed, request)

        setattr(handle, WRAPPED, True)
        if exempt and self.probe_pool is not None:
            handle.experimental_thread_pool = self.probe_pool
        return grpc.unary_unary_rpc_method_handler(handle, response_serializer=counted_serialize)

    def refusal(self, full_method, code, message, pool=None):
        """A wrapped unary handler for `full_method` that refuses every call with `code` and `message` (counted in
        the metrics like any call; the request is not parsed), running on `pool` if given."""
        def refuse(request, context):
            context.abort(code, message)

        wrapped = self.wrap(full_method, grpc.unary_unary_rpc_method_handler(refuse))
        if pool is not None:
            wrapped.unary_unary.experimental_thread_pool = pool
        return wrapped


def _call(full_method, behavior, request, context, seconds):
    """Run the servicer under the default deadline (when the client set none) and map what it raises."""
    bounded = None
    if seconds is not None:
        remaining = context.time_remaining()
        if remaining is None or remaining >= NO_DEADLINE_SECONDS:
            bounded = BoundedContext(context, seconds)
    try:
        response = behavior(request, context if bounded is None else bounded)
    except Exception as exc:  # noqa: BLE001 - this is the one place that maps everything
        if context.code() is not None:
            raise  # the handler already aborted with its own status (context.abort raises)
        code, message = status_for(exc)
        if bounded is not None and bounded.expired and isinstance(exc, RequestCancelled):
            code, message = _DEADLINE, bounded.message()  # the client learns which limit it hit
        if code != grpc.StatusCode.INTERNAL:  # INTERNAL was logged with its traceback already
            log.info("%s -> %s: %s", full_method, code.name, message)
        context.abort(code, message)
    finally:
        if bounded is not None:
            bounded.done()
    if bounded is not None and bounded.expired:
        # Finished, but too late: the answer is dropped, as gRPC drops it when a client deadline passes.
        context.abort(_DEADLINE, bounded.message())
    return response
