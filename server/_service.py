"""The domain layer both APIs share: one-off convolutions and registered-model inference, with limits applied.

Servicers decode protobuf into plain values (arrays, names, convcore keywords), call one `InferenceService` method
and encode what it returns; nothing here knows protobuf. Where the output goes is the caller's choice: `infer` and
`conv` take ``output(shape, dtype) -> array``, and the servicers pass one that hands out the payload of the response
message itself (`client.wire.MessageBuffer`), so the last layer writes the answer where gRPC will send it from.
"""
import contextlib
import functools
import math
import threading
import time

import numpy as np

import convcore

from ._batcher import DynamicBatcher
from ._errors import LimitExceeded
from ._limits import blocking, check_count
from ._model import _CHANNELS_LAST
from ._statistics import Statistics

__all__ = ["InferenceService", "LIGHT_JOB_FLOPS"]

MIB = 1 << 20
#: Room left in a response for everything that is not the tensor bytes (shape, names, framing).
_RESPONSE_OVERHEAD = 64 << 10
#: A one-thread job of at most this much work (``plan.work_flops``; ~0.1 ms on one core here, less than a call's
#: own Python and gRPC time) is "light": it never waits for a CPU unit (`ComputeExecutor.run`). The small benchmark
#: layer (3x3 16->16 on 32x32) is 4.7 MFLOP.
LIGHT_JOB_FLOPS = 8_000_000
#: ``with`` for a job that keeps its RPC worker's place (a one-thread job: it computes, it does not wait).
_STAY = contextlib.nullcontext()


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
    metrics : ServerMetrics, optional
        Gets the batch sizes and batching queue delays of models with dynamic batching.

    Attributes
    ----------
    statistics : Statistics
        Per-model request and execution counters (KServe ModelStatistics).
    """

    def __init__(self, repository, executor, max_message_bytes, max_output_bytes=None, max_layers=None,
                 metrics=None):
        self.repository = repository
        self.executor = executor
        self.max_message_bytes = max_message_bytes
        self.max_output_bytes = max_output_bytes
        self.max_layers = max_layers
        self.metrics = metrics
        self.statistics = Statistics()
        self._batcher_lock = threading.Lock()
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

    def register(self, name, layers, batching=None):
        """Check and store a model (a list of `Layer`, and a dynamic-batching dict or None); returns the Model (the
        registered one for a repeat)."""
        with blocking():  # writes and syncs the repository's file
            return self.repository.register(name, layers, batching)

    def delete(self, name):
        with blocking():
            self.repository.delete(name)
        self.statistics.drop(name)

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

    def infer(self, context, model, x, output, field="input", *, after=None, input_seconds=0.0):
        """Run `model` on `x` into ``output(shape, dtype)``; returns that array once every layer has run.

        `context` is the RPC's (``is_active``, ``add_callback``, ``time_remaining``): a call that ends early stops
        being worked on. A model registered with dynamic batching computes `x` in a batch with other callers' rows
        (`DynamicBatcher`), then copies its own rows into ``output``. ``after(out)`` runs once the output is
        complete (e.g. writing it to shared memory), and `input_seconds` is what getting `x` cost the caller: both
        count in the model's statistics (compute_output, compute_input).
        """
        started = time.perf_counter()
        timing = {}
        ok = False
        try:
            model.check_input(x, field)
            route = self.route(model, x.shape)
            if model.batching is None:
                # A job on the OpenMP team keeps the cores busy by itself: while it runs, another RPC worker may
                # take a queued call (server._limits.CountingThreadPool); a one-thread job keeps its place.
                with blocking() if route.threads > 1 else _STAY:
                    out = self.executor.run(context, self._timed_job, model, route, x, output, timing,
                                            threads=route.threads, label=model.name,
                                            light=route.threads == 1 and route.flops <= LIGHT_JOB_FLOPS)
                stats = self.statistics.model(model.name)
                stats.execution(x.shape[0], 0.0, timing["infer_seconds"])
                timing["queue_seconds"] = timing.pop("started") - started
            else:
                # The batch's thread copies this caller's rows straight into `output` (the response payload).
                with blocking():  # waits for the batch to fill: other calls must be taken meanwhile to fill it
                    out = self._batcher(model).run(x, deadline=_deadline(context), add_callback=context.add_callback,
                                                   timing=timing, output=output)
                if self.metrics is not None:
                    self.metrics.observe_batching_queue(model.name, timing["queue_seconds"])
            if after is not None:
                after_started = time.perf_counter()
                after(out)
                timing["output_seconds"] = timing.get("output_seconds", 0.0) + time.perf_counter() - after_started
            ok = True
            return out
        finally:
            self.statistics.model(model.name).request(
                ok, x.shape[0] if ok else 0, time.perf_counter() - started, timing.get("queue_seconds", 0.0),
                input_seconds + timing.get("input_seconds", 0.0), timing.get("infer_seconds", 0.0),
                timing.get("output_seconds", 0.0))

    def _timed_job(self, token, threads, model, route, x, output, timing):
        timing["started"] = begun = time.perf_counter()
        out = self._infer_job(token, threads, model, route, x, output)
        timing["infer_seconds"] = time.perf_counter() - begun
        return out

    # ------------------------------------------------------------------ dynamic batching
    def _batcher(self, model):
        """The model's DynamicBatcher, made on first use (it lives and goes with the Model object)."""
        batcher = model.batcher
        if batcher is None:
            with self._batcher_lock:
                if model.batcher is None:
                    model.batcher = DynamicBatcher(
                        functools.partial(self._batch_compute, model), model.batching,
                        max_concurrent=self.executor.slots, name=model.name,
                        on_batch=functools.partial(self._on_batch, model.name),
                        allocate=self.executor.buffers.take, release=self.executor.buffers.give)
                batcher = model.batcher
        return batcher

    def _batch_compute(self, model, x, token):
        """Compute one batch on the compute slots; `token` (the batch's) stands in for an RPC context."""
        route = model.route(x.shape, self.executor.omp_threads, self.max_output_bytes)
        # A batch is never sent as one message: only the output limit applies (a request's own output was checked
        # against both when it joined).
        nbytes = math.prod(route.output_shape) * model.dtype.itemsize
        if self.max_output_bytes is not None and nbytes > self.max_output_bytes:
            raise LimitExceeded(f"a batch of {x.shape[0]} rows would output {nbytes} bytes, over --max-output-mb")
        # From the pool: the batcher gives it back once every caller's rows are copied out.
        return self.executor.run(token, self._infer_job, model, route, x, self.executor.buffers.take,
                                 threads=route.threads, label=model.name)

    def _on_batch(self, name, rows, requests, input_seconds, infer_seconds, output_seconds, ok):
        if ok:
            self.statistics.model(name).execution(rows, input_seconds, infer_seconds, output_seconds)
        if self.metrics is not None:
            self.metrics.observe_batch(name, rows)

    def _infer_job(self, token, threads, model, route, x, output):
        if threads < route.threads:  # fewer CPUs were free: the same layers planned for fewer threads
            route = model.route(x.shape, threads, self.max_output_bytes)
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
        with blocking() if threads > 1 else _STAY:
            return self.executor.run(context, self._conv_job, x, kernel, bias, options, shape, output,
                                     threads=threads, light=threads == 1 and flops <= LIGHT_JOB_FLOPS)

    def _conv_job(self, token, threads, x, kernel, bias, options, shape, output):
        out = output(shape, x.dtype)
        return convcore.conv(x, kernel, bias, num_threads=threads, out=out, **options)


def _deadline(context):
    """The RPC's deadline as a time.monotonic() time, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
