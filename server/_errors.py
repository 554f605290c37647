"""Domain exceptions and the one place that turns exceptions into gRPC status codes.

Servicers never pick a status code themselves: they raise, and every handler's wrapper (`server._handlers`, the
innermost layer of each call) maps what they raised with `status_for`. Anything unexpected becomes INTERNAL with a
fixed message and a reference that points at the traceback in the server log, so internals never leak to clients.
"""
import logging
import uuid

import grpc

__all__ = [
    "InvalidArgument",
    "LimitExceeded",
    "ModelExists",
    "RepositoryError",
    "ModelNotFound",
    "RequestCancelled",
    "status_for",
]

log = logging.getLogger("server")

INTERNAL_MESSAGE = "internal server error"


class InvalidArgument(ValueError):
    """A request field holds a bad value; the message names the field, the value and what was expected."""


class ModelNotFound(LookupError):
    """No model of that name is registered."""

    def __init__(self, name, message=None):
        super().__init__(message or f"model {name!r} is not registered (see ListModels for the registered ones)")
        self.name = name


class ModelExists(Exception):
    """RegisterModel for a name that is already registered (delete it first to replace it)."""


class RepositoryError(Exception):
    """The model repository folder cannot be written (read-only, not a folder, ...): nothing was changed."""


class LimitExceeded(Exception):
    """A request would exceed a configured limit (message size, output size, ...)."""


class RequestCancelled(Exception):
    """The client went away (cancelled, disconnected or past its deadline) before the work was done."""


def status_for(exc):
    """Return the (grpc.StatusCode, message) a client sees for exception `exc`.

    Parameters
    ----------
    exc : BaseException
        What a servicer raised.

    Returns
    -------
    (grpc.StatusCode, str)
        ValueError/TypeError (bad spec or tensor, including convcore's own checks) -> INVALID_ARGUMENT;
        ModelNotFound -> NOT_FOUND; ModelExists -> ALREADY_EXISTS; RepositoryError -> FAILED_PRECONDITION;
        LimitExceeded and MemoryError -> RESOURCE_EXHAUSTED; RequestCancelled ->
        CANCELLED; anything else -> INTERNAL with a fixed message (the traceback is logged with a reference).
    """
    if isinstance(exc, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, ModelExists):
        return grpc.StatusCode.ALREADY_EXISTS, str(exc)
    if isinstance(exc, RepositoryError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, LimitExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the server ran out of memory for this request; send less data"
    if isinstance(exc, RequestCancelled):
        return grpc.StatusCode.CANCELLED, str(exc) or "request cancelled"
    # convcore raises ValueError/TypeError naming the argument, the value and what was expected, before computing.
    if isinstance(exc, (ValueError, TypeError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    ref = uuid.uuid4().hex[:12]
    log.error("internal error (ref %s)", ref, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"{INTERNAL_MESSAGE} (ref {ref}; the traceback is in the server log)"
