"""Python SDK of the convolution service. It needs grpcio, numpy and the generated stubs, not the compiled engine.

>>> from client import ConvClient, AsyncConvClient, ConvError
>>> with ConvClient("localhost:50051", timeout=30.0) as c:      # doctest: +SKIP
...     y = c.conv(x, kernel, padding="same", activation="relu")
"""
from ._channel import DEFAULT_MAX_MESSAGE_MB, DEFAULT_RETRY_ATTEMPTS
from ._client import AsyncConvClient, ConvClient
from ._errors import ConvError
from ._import_onnx import onnx_layers
from ._import_torch import torch_layers

__all__ = ["AsyncConvClient", "ConvClient", "ConvError", "DEFAULT_MAX_MESSAGE_MB", "DEFAULT_RETRY_ATTEMPTS",
           "onnx_layers", "torch_layers"]
