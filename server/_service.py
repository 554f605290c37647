"""The domain layer both APIs share: one-off convolutions and registered-model inference, with limits applied.

Servicers decode protobuf into plain values (arrays, names, convcore keywords), call one `InferenceService` method
and encode what it returns; nothing here knows protobuf. Where the output goes is the caller's choice: `infer` and
`conv` take ``output(shape, dtype) -> array``, and the servicers pass one that hands out the payload of the response
message itself (`client.wire.MessageBuffer`), so the last layer writes the answer where gRPC will send it from.
"""
import math

import numpy as np

import convcore

from ._errors import LimitExceeded
from ._limits import check_count
from ._model import _CHANNELS_LAST

__all__ = ["InferenceService", "install_probes"]

MIB = 1 << 20
#: Room left in a response for everything that is not the tensor bytes (shape, names, framing).
_RESPONSE_OVERHEAD = 64 << 10


class InferenceService:
    """Models and convolutions for RPCs: lookups, checks and limits, then compute on the compute slots.

    Parameters
    ----------
    repository : ModelRepository
    executor : ComputeExecutor
        Runs compute jobs (on the calling thread when a slot is free) and owns cancellation.
    max_message_bytes : int
        A result that cannot fit in one message is refused before computing it.
    max_output_bytes : int, optional
        Largest output one call may compute (``--max-output-mb``), checked before allocating. It also becomes
        convcore's process-wide guard, so that the intermediate outputs of a layer stack are bounded too.
    max_layers : int, optional
        Layers per registered model (``--max-layers``).
    """

    def __init__(self, repository, executor, max_message_bytes, max_output_bytes=None, max_layers=None):
        self.repository = repository
        self.executor = executor
        self.max_message_bytes = max_message_bytes
        self.max_output_bytes = max_output_bytes
        self.max_layers = max_layers
        if max_output_bytes is not None:
            convcore.set_max_output_bytes(max_output_bytes)

    # ------------------------------------------------------------------ models
    def model(self, name):
        """The registered model `name` (ModelNotFound if none)."""
        return self.repository.get(name)

    def models(self):
        """Every registered model, sorted by name."""
        return self.repository.models()

    def check_layer_count(self, count):
        """Refuse (LimitExceeded) a registration of `count` layers over ``--max-layers``, before decoding them."""
        check_count("layers in the model", count, self.max_layers, "--max-layers")

    def register(self, name, layers):
        """Check and store a model (a list of `Layer`); returns the Model (the registered one for a repeat)."""
        return self.repository.register(name, layers)

    def delete(self, name):
        self.repository.delete(name)

    # ------------------------------------------------------------------ compute
    def check_output_size(self, shape, dtype):
        """Raise LimitExceeded when an output of `shape`/`dtype` is over the output or the message limit."""
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

    def route(self, model, shape):
        """The model's cached `Route` for inputs of `shape`, its output size checked against the limits once."""
        route = model.route(shape, self.executor.omp_threads, self.max_output_bytes)
        if not route.checked:
            self.check_output_size(route.output_shape, model.dtype)
            route.checked = True
        return route

    def infer(self, context, model, x, output, field="input"):
        """Run `model` on `x` into ``output(shape, dtype)``; returns that array once every layer has run.

        `context` is the RPC's (``is_active``, ``add_callback``): a call that ends early stops being worked on.
        """
        model.check_input(x, field)
        route = self.route(model, x.shape)
        return self.executor.run(context, self._infer_job, model, route, x, output, threads=route.threads,
                                 label=model.name)

    def _infer_job(self, token, model, route, x, output):
        out = output(route.output_shape, model.dtype)
        if len(route.plans) == 1:
            return model.run(token, route, x, out, None)
        taken = []

        def buffer(key, shape, dtype):  # intermediate outputs of a layer stack, reused between calls
            taken.append(self.executor.buffers.take(shape, dtype))
            return taken[-1]
        try:
            return model.run(token, route, x, out, buffer)
        finally:
            self.executor.buffers.give(taken)

    def conv(self, context, x, kernel, bias, options, output):
        """One convolution with convcore's semantics into ``output(shape, dtype)``; returns that array."""
        shape = convcore.output_shape(x.shape, kernel.shape, **options)  # checks every option, cheaply
        self.check_output_size(shape, x.dtype)
        cout = shape[-1] if options.get("data_format") in _CHANNELS_LAST else shape[1]
        flops = 2 * math.prod(shape) * math.prod(kernel.shape) // max(1, cout)  # as convcore counts a layer
        threads = convcore.resolve_num_threads(self.executor.omp_threads, flops=flops)
        return self.executor.run(context, self._conv_job, x, kernel, bias, options, shape, output, threads=threads)

    def _conv_job(self, token, x, kernel, bias, options, shape, output):
        out = output(shape, x.dtype)
        return convcore.conv(x, kernel, bias, num_threads=self.executor.omp_threads, out=out, **options)


def install_probes(recorder):
    """Wrap this layout's request steps with `recorder`'s timers (scripts/request_breakdown.py, issue 10)."""
    from . import _kserve, _servicer
    from client import wire
    recorder.patch(wire, "decode_infer_request", "grpc deserialize: wire decode")
    recorder.patch(wire, "decode_model_infer_request", "grpc deserialize: wire decode")
    recorder.patch(_servicer, "required_tensor", "decode input")
    recorder.patch(_kserve, "_input", "decode input")
    recorder.patch(InferenceService, "model", "lookup")
    recorder.patch(InferenceService, "route", "checks + route cache")
    recorder.patch(InferenceService, "infer", "service.infer (checks, slot, compute)")
    import server._compute as compute
    recorder.patch(compute.ComputeExecutor, "run", "executor.run (slot, compute)")
    recorder.patch(InferenceService, "_infer_job", "job (response buffer + compute)")
    recorder.patch(wire, "tensor_response", "encode: response buffer")
    recorder.patch(wire, "model_infer_response", "encode: response buffer")
