"""Access control: a bearer token on every RPC but health, and read-only model repositories.

Both refuse a call before its servicer (or its request's compute) runs, with a status and a message the client can
act on. Health (``grpc.health.v1.Health/*``) stays open so that load balancers and Kubernetes probes, which carry no
token, still work. Unary RPCs are checked by their handler wrapper (`server._handlers`, made once per method);
`TokenAuthInterceptor` checks the rest (the streaming reflection RPCs).
"""
import hmac
import logging

import grpc

__all__ = ["TokenAuthInterceptor", "read_token_file", "read_only_message", "check_token", "EXEMPT_PREFIXES",
           "MODEL_WRITES", "TOKEN_MESSAGE", "WRAPPED", "authorized"]

log = logging.getLogger("server")

#: Methods any caller may use without a token.
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
#: RPCs that change the model repository.
MODEL_WRITES = ("/convservice.v1.ConvService/RegisterModel", "/convservice.v1.ConvService/DeleteModel")
#: What a caller without the right token is told.
TOKEN_MESSAGE = ("missing or wrong token: send 'authorization: Bearer <token>' metadata (ConvClient(..., token=...)) "
                 "with the token the server was started with")


#: Set on a behaviour by `server._handlers`: it checks the token itself (TokenAuthInterceptor leaves it alone).
WRAPPED = "_convserver_wrapped"


def authorized(metadata, expected):
    """Whether call `metadata` carries ``authorization`` equal to `expected` (bytes; compared in constant time)."""
    for key, value in metadata or ():
        if key == "authorization":
            given = value.encode() if isinstance(value, str) else bytes(value)
            return hmac.compare_digest(given, expected)
    return False


def read_only_message(full_method):
    """Why `full_method` (one of MODEL_WRITES) is refused on a --read-only-models server."""
    return (f"{full_method.rsplit('/', 1)[1]} is disabled: this server runs with --read-only-models (models are "
            f"provisioned by the operator in its model repository folder)")


def check_token(token):
    """Return `token` if it can be a bearer token; ValueError otherwise."""
    if not isinstance(token, str) or not token.strip() or token != token.strip():
        raise ValueError("the auth token must be a non-empty string without surrounding whitespace")
    if not all(" " <= ch <= "~" for ch in token):
        # gRPC metadata values are printable ASCII: a client could never send any other token.
        raise ValueError("the auth token must be printable ASCII (gRPC metadata cannot carry anything else)")
    return token


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
        self._expected = f"Bearer {check_token(token)}".encode()

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: UNIMPLEMENTED, as without auth (it reveals nothing)
        if (method.startswith(EXEMPT_PREFIXES) or getattr(handler.unary_unary, WRAPPED, False)
                or authorized(handler_call_details.invocation_metadata, self._expected)):
            return handler  # a wrapped unary handler checks the token itself, and counts the refusal
        log.info("%s -> UNAUTHENTICATED (missing or wrong token)", method)
        return refusing_handler(handler, grpc.StatusCode.UNAUTHENTICATED, TOKEN_MESSAGE)
