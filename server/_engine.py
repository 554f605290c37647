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
    max_output_bytes : int, optional
        Largest output one call may compute (``--max-output-mb``), checked before allocating. It also becomes
        convcore's process-wide guard, so that the intermediate outputs of a layer stack are bounded too.
    """

    def __init__(self, repository, executor, max_message_bytes, max_output_bytes=None):
        self.repository = repository
        self.executor = executor
        self.max_message_bytes = max_message_bytes
        self.max_output_bytes = max_output_bytes
        if max_output_bytes is not None:
            convcore.set_max_output_bytes(max_output_bytes)

    def check_output_size(self, shape, dtype):
        """Raise LimitExceeded when an output of `shape`/`dtype` cannot be sent in one message."""
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if self.max_output_bytes is not None and nbytes > self.max_output_bytes:
            raise LimitExceeded(
                f"the output would be {nbytes} bytes (shape {list(shape)}, {np.dtype(dtype).name}), over the "
                f"server's output limit of {self.max_output_bytes / MIB:g} MiB; send a smaller input, or start the "
                f"server with a larger --max-output-mb")
        if nbytes + _RESPONSE_OVERHEAD > self.max_message_bytes:
            raise LimitExceeded(
                f"the output would be {nbytes} bytes (shape {list(shape)}, {np.dtype(dtype).name}), over the "
                f"server's message limit of {self.max_message_bytes // MIB} MiB; send a smaller batch, or start the "
                f"server with a larger --max-message-mb (and raise the client's max_message_mb to match)")

    def _check_layer_outputs(self, model, x_shape):
        """Refuse (LimitExceeded) an input for which any layer's output would exceed --max-output-mb.

        Each layer's output is allocated, not only the last one's, so each is checked, before any plan is built.
        Shapes that do not fit a layer are left to the plans, which name the layer.
        """
        if self.max_output_bytes is None:
            return
        shape = tuple(x_shape)
        for i, layer in enumerate(model.layers):
            try:
                shape = convcore.output_shape(shape, layer.kernel.shape, **layer.options)
            except (ValueError, TypeError):
                return
            nbytes = math.prod(shape) * model.dtype.itemsize
            if nbytes > self.max_output_bytes:
                raise LimitExceeded(
                    f"layers[{i}] of model {model.name!r} would output {nbytes} bytes (shape {list(shape)}) for an "
                    f"input of shape {list(x_shape)}, over the server's output limit of "
                    f"{self.max_output_bytes / MIB:g} MiB; send a smaller input, or start the server with a larger "
                    f"--max-output-mb")

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
        self._check_layer_outputs(model, x.shape)
        self.check_output_size(model.output_shape(x.shape, self.executor.omp_threads), model.dtype)
        data, shape = self.executor.run(context, model.run, x, self.executor.omp_threads, label=model.name)
        return model, data, shape
