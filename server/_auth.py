"""Access control interceptors: a bearer token on every RPC but health, and read-only model repositories.

Both refuse a call before its handler (or its request's compute) runs, with a status and a message the client can
act on. Health (``grpc.health.v1.Health/*``) stays open so that load balancers and Kubernetes probes, which carry no
token, still work.
"""
import hmac
import logging

import grpc

__all__ = ["TokenAuthInterceptor", "ReadOnlyModelsInterceptor", "read_token_file", "EXEMPT_PREFIXES"]

log = logging.getLogger("server")

#: Methods any caller may use without a token.
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
#: RPCs that change the model repository.
MODEL_WRITES = ("/convservice.v1.ConvService/RegisterModel", "/convservice.v1.ConvService/DeleteModel")


def refusing_handler(handler, code, message):
    """A handler of the same kind (unary/streaming) as `handler` whose behaviour aborts with `code`, `message`."""

    def abort(request_or_iterator, context):
        context.abort(code, message)

    def abort_stream(request_or_iterator, context):
        context.abort(code, message)
        yield  # pragma: no cover - never reached: abort raises

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler(abort),
        (False, True): grpc.unary_stream_rpc_method_handler(abort_stream),
        (True, False): grpc.stream_unary_rpc_method_handler(abort),
        (True, True): grpc.stream_stream_rpc_method_handler(abort_stream),
    }
    new = kinds[(handler.request_streaming, handler.response_streaming)]
    # Keep the method's deserializer: the request is read (bounded by the message limit) and dropped.
    return new._replace(request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)


def read_token_file(path):
    """Return the token in `path` (surrounding whitespace stripped); ValueError if unreadable or empty."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--auth-token-file {path!r}: cannot read it: {exc}") from None
    if not token:
        raise ValueError(f"--auth-token-file {path!r} is empty")
    return token


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` metadata on every RPC except health.

    A missing or wrong token gets UNAUTHENTICATED. Tokens are compared with `hmac.compare_digest` (time independent
    of where they differ), as bytes, so a non-ASCII token cannot raise.

    Parameters
    ----------
    token : str
        The shared secret (``--auth-token`` / ``--auth-token-file``); non-empty, no surrounding whitespace.
    """

    def __init__(self, token):
        if not isinstance(token, str) or not token.strip() or token != token.strip():
            raise ValueError("the auth token must be a non-empty string without surrounding whitespace")
        if not all(" " <= ch <= "~" for ch in token):
            # gRPC metadata values are printable ASCII: a client could never send any other token.
            raise ValueError("the auth token must be printable ASCII (gRPC metadata cannot carry anything else)")
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, handler_call_details):
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._expected)
        return False

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(EXEMPT_PREFIXES) or self._authorized(handler_call_details):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: UNIMPLEMENTED, as without auth (it reveals nothing)
        log.info("%s -> UNAUTHENTICATED (missing or wrong token)", method)
        return refusing_handler(handler, grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong token: send 'authorization: Bearer <token>' metadata "
                                "(ConvClient(..., token=...)) with the token the server was started with")


class ReadOnlyModelsInterceptor(grpc.ServerInterceptor):
    """Refuse RegisterModel and DeleteModel with PERMISSION_DENIED (``--read-only-models``).

    PERMISSION_DENIED rather than FAILED_PRECONDITION: no change of the server's state would make the call succeed;
    this deployment does not let clients change models at all (the operator provisions the repository folder).
    """

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method not in MODEL_WRITES:
            return handler
        return refusing_handler(handler, grpc.StatusCode.PERMISSION_DENIED,
                                f"{handler_call_details.method.rsplit('/', 1)[1]} is disabled: this server runs with "
                                f"--read-only-models (models are provisioned by the operator in its model "
                                f"repository folder)")
