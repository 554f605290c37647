"""The domain layer both APIs share: one-off convolutions and registered-model inference, with limits applied.

Servicers decode protobuf into arrays, call these methods and encode the result; nothing here knows protobuf.
"""
import math

import numpy as np

import convcore

from ._compute import thread_buffer
from ._errors import LimitExceeded
from ._config import MIB

__all__ = ["Engine"]

#: Room left in a response for everything that is not the tensor bytes (shape, names, framing).
_RESPONSE_OVERHEAD = 64 << 10


class Engine:
    """Run convolutions on the compute executor for RPCs.

    Parameters
    ----------
    repository : ModelRepository
    executor : ComputeExecutor
    max_message_bytes : int
        A result that cannot fit in one message is refused before computing it.
    """

    def __init__(self, repository, executor, max_message_bytes):
        self.repository = repository
        self.executor = executor
        self.max_message_bytes = max_message_bytes

    def check_output_size(self, shape, dtype):
        """Raise LimitExceeded when an output of `shape`/`dtype` cannot be sent in one message."""
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if nbytes + _RESPONSE_OVERHEAD > self.max_message_bytes:
            raise LimitExceeded(
                f"the output would be {nbytes} bytes (shape {list(shape)}, {np.dtype(dtype).name}), over the "
                f"server's message limit of {self.max_message_bytes // MIB} MiB; send a smaller batch, or start the "
                f"server with a larger --max-message-mb (and raise the client's max_message_mb to match)")

    def conv(self, context, x, kernel, bias, options):
        """One convolution with convcore's semantics; returns (bytes, shape) of the output."""
        shape = convcore.output_shape(x.shape, kernel.shape, **options)  # checks every option, cheaply
        self.check_output_size(shape, x.dtype)
        return self.executor.run(context, self._conv_job, x, kernel, bias, options, shape)

    def _conv_job(self, token, x, kernel, bias, options, shape):
        out = thread_buffer("conv", shape, x.dtype)
        out = convcore.conv(x, kernel, bias, num_threads=self.executor.omp_threads, out=out, **options)
        return out.tobytes(), out.shape

    def model(self, name):
        """The registered model `name` (ModelNotFound if none)."""
        return self.repository.get(name)

    def infer(self, context, name, x, field="input"):
        """Run registered model `name` on `x`; returns (model, bytes, shape) of the output."""
        model = self.repository.get(name)
        model.check_input(x, field)
        self.check_output_size(model.output_shape(x.shape, self.executor.omp_threads), model.dtype)
        data, shape = self.executor.run(context, model.run, x, self.executor.omp_threads, label=model.name)
        return model, data, shape
