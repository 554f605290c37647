"""The convolution gRPC server: our ConvService, the Open Inference Protocol (KServe v2), health and reflection.

Run it with ``python -m server [--host 0.0.0.0] [--port 50051] [--model-repository DIR] [--workers N]
[--max-message-mb 256]``, or build one in-process with `create_server`.
"""
from ._config import DEFAULT_ADDRESS, ServerConfig
from ._errors import InvalidArgument, LimitExceeded, ModelNotFound, RequestCancelled, status_for


def __getattr__(name):
    # The server module (and convcore, which loads the OpenMP runtime) is imported on first use, so that
    # `python -m server` can set the OpenMP wait policy before the runtime reads it (see __main__, --omp-wait).
    if name in ("ConvServer", "create_server"):
        from . import _app
        return getattr(_app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ConvServer",
    "DEFAULT_ADDRESS",
    "InvalidArgument",
    "LimitExceeded",
    "ModelNotFound",
    "RequestCancelled",
    "ServerConfig",
    "create_server",
    "status_for",
]
