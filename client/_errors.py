"""ConvError, and the one place where a grpc.RpcError becomes one."""
import re

import grpc

__all__ = ["ConvError", "from_rpc_error", "invalid_argument"]

_SIZE_RE = re.compile(r"(Sent|Received) message larger than max \((\d+) vs\. (\d+)\)", re.IGNORECASE)


class ConvError(Exception):
    """A call failed: `code` is the gRPC status (grpc.StatusCode), `details` the server's message.

    Inputs the SDK can refuse before sending (a wrong dtype, an unknown layer key) raise ConvError too, with
    ``code == grpc.StatusCode.INVALID_ARGUMENT``, so callers handle one exception type.
    """

    def __init__(self, code, details):
        self.code = code
        self.details = details
        super().__init__(f"{code.name}: {details}")


def invalid_argument(message):
    """A ConvError for input refused before sending."""
    return ConvError(grpc.StatusCode.INVALID_ARGUMENT, message)


def from_rpc_error(err, method, client_limit_mb):
    """Turn `err` (a grpc.RpcError, sync or aio) into a ConvError; message-size failures get a how-to-fix hint."""
    try:
        code, details = err.code(), err.details() or ""
    except Exception:  # noqa: BLE001 - a non-call RpcError carries neither
        code, details = grpc.StatusCode.UNKNOWN, str(err)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        match = _SIZE_RE.search(details)
        if match:
            size, limit = int(match.group(2)), int(match.group(3))
            details = (f"{method}: a message of {size} bytes is over a {limit}-byte limit ({details}). The client "
                       f"allows {client_limit_mb} MiB (ConvClient(..., max_message_mb=N)); the server allows what "
                       f"it was started with (python -m server --max-message-mb N, default 256). Raise both, or "
                       f"send a smaller batch.")
    elif code == grpc.StatusCode.UNAVAILABLE:
        details = f"{details} (server unreachable at the moment; calls were retried)"
    return ConvError(code, details)
