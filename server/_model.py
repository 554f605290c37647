"""A registered model: a stack of conv layers checked once at registration, and what it needs per input shape
(plans, output shapes, size checks, thread count) computed once per (model, shape) and cached.

Plain values only: arrays, dicts of convcore keywords, tuples. The servicers' codecs turn protobuf into these and
back; nothing here knows the wire format.
"""
import collections
import math
import re
import threading

import numpy as np

import convcore

from ._errors import InvalidArgument, LimitExceeded

__all__ = ["Layer", "Model", "Route", "check_model_name", "MODEL_NAME_PATTERN"]

MIB = 1 << 20

#: Names become file names in the repository: no separators, no leading dot, so nothing can escape the folder.
MODEL_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_NAME_RE = re.compile(MODEL_NAME_PATTERN)

_IO_LAYOUTS = {"WIO", "HWIO", "DHWIO"}
_CHANNELS_LAST = {"channels_last", "NWC", "NHWC", "NDHWC"}


def check_model_name(name, field="name"):
    """Return `name` if it is a valid model name, else raise InvalidArgument naming `field`."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidArgument(f"{field} must match {MODEL_NAME_PATTERN} (letters, digits, '.', '_', '-'; at most "
                              f"128 characters, not starting with '.'), got {name!r}")
    return name


def _check_finite(field, weights):
    """Refuse NaN/Inf weights at registration (INVALID_ARGUMENT).

    In a one-off Conv, NaN and Inf are data and propagate, as in convcore. A registered model is different: it is
    checked once and then serves every caller, and a non-finite weight (a diverged training run, a broken export)
    would silently turn every answer into NaN, so it is refused where it enters.
    """
    if weights.size and not np.isfinite(weights).all():
        bad = int(weights.size - np.count_nonzero(np.isfinite(weights)))
        raise InvalidArgument(f"{field} holds {bad} NaN/Inf value(s) of {weights.size}: a registered model's weights "
                              f"must be finite (a one-off Conv accepts them as data)")


class Layer:
    """One conv layer of a model: `kernel` and `bias` (arrays, bias may be None) and convcore keyword `options`."""

    __slots__ = ("kernel", "bias", "options")

    def __init__(self, kernel, bias, options):
        self.kernel, self.bias, self.options = kernel, bias, options


class Route:
    """What running a model on one input shape takes, worked out once: the plans, every layer's output shape, the
    final shape and size, the OpenMP threads the largest layer uses (the compute slots it occupies) and the work of
    all layers (`flops`, as convcore's thread cut-off counts it: ``plan.work_flops``)."""

    __slots__ = ("plans", "shapes", "output_shape", "threads", "flops", "checked")

    def __init__(self, plans, shapes, threads, flops=0):
        self.plans, self.shapes, self.threads, self.flops = plans, shapes, threads, flops
        self.output_shape = shapes[-1]
        self.checked = False  # set once the service has checked the output against its limits


class Model:
    """A checked stack of conv layers (each output feeds the next), ready to run.

    Build it with `Model.build`; every check happens there, so a Model that exists can run any input whose
    channels, dtype and rank match (spatial sizes are checked once per input shape, in `route`).
    """

    def __init__(self, name, layers, dtype, in_channels, out_channels, nsp, channels_last, plan_cache_size=8):
        self.name = name
        self.layers = layers
        self.dtype = dtype
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.nsp = nsp
        self.channels_last = channels_last
        self.batching = None  # a BatchingConfig when registered with dynamic batching (set by the repository)
        self.batching_request = None  # the batching dict as registered (zeros = server defaults), what is stored
        self.batcher = None  # its DynamicBatcher, made by the service on first use
        self._plans = collections.OrderedDict()   # (input shape without batch, threads) -> plans (any batch)
        self._routes = collections.OrderedDict()  # (full input shape, threads) -> Route
        self._plan_cache_size = plan_cache_size
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, name, layers, *, plan_cache_size=8):
        """Check a model (`name`, a list of `Layer`) and build it.

        Raises
        ------
        InvalidArgument, ValueError, TypeError
            With a message naming the field (``layers[1].kernel`` ...), the value and what was expected.
        """
        name = check_model_name(name)
        if not layers:
            raise InvalidArgument("layers must hold at least one layer, got none")
        dtype = nsp = channels_last = None
        in_channels = channels = None
        for i, layer in enumerate(layers):
            field = f"layers[{i}]"
            kernel, bias, options = layer.kernel, layer.bias, layer.options
            _check_finite(f"{field}.kernel", kernel)
            if bias is not None:
                _check_finite(f"{field}.bias", bias)
            if dtype is None:
                dtype = kernel.dtype
            if kernel.dtype != dtype or (bias is not None and bias.dtype != dtype):
                raise InvalidArgument(f"{field}: kernel and bias must all have the model's dtype {dtype.name} "
                                      f"(from layers[0].kernel), got kernel {kernel.dtype.name}"
                                      + (f", bias {bias.dtype.name}" if bias is not None else ""))
            if kernel.ndim not in (3, 4, 5):
                raise InvalidArgument(f"{field}.kernel must have rank 3, 4 or 5 (Conv1D/2D/3D), got shape "
                                      f"{list(kernel.shape)}")
            layer_nsp = kernel.ndim - 2
            layer_last = options["data_format"] in _CHANNELS_LAST
            if nsp is None:
                nsp, channels_last = layer_nsp, layer_last
            if layer_nsp != nsp:
                raise InvalidArgument(f"{field}.kernel is {layer_nsp}-D (shape {list(kernel.shape)}) but layers[0] "
                                      f"is {nsp}-D: all layers of a model must have the same spatial rank")
            if layer_last != channels_last:
                raise InvalidArgument(f"{field}.spec.data_format={options['data_format']!r} puts channels on a "
                                      f"different axis than layers[0] "
                                      f"({'channels_last' if channels_last else 'channels_first'}): each layer's "
                                      f"output is the next one's input, so all must agree")
            channels = cls._check_layer(field, kernel, bias, options, nsp, channels_last, channels)
            if in_channels is None:
                in_channels = cls._input_channels(kernel, options, channels_last)
        return cls(name, list(layers), dtype, in_channels, channels, nsp, channels_last, plan_cache_size)

    @staticmethod
    def _input_channels(kernel, options, channels_last):
        layout = options["kernel_layout"]
        io = layout in _IO_LAYOUTS if layout is not None else channels_last
        k_in = kernel.shape[-2] if io else kernel.shape[1]
        groups = options["groups"] if isinstance(options["groups"], int) and options["groups"] > 0 else 1
        return k_in * groups

    @classmethod
    def _check_layer(cls, field, kernel, bias, options, nsp, channels_last, prev_channels):
        """Check one layer against the previous layer's output channels; return this layer's output channels."""
        expected = cls._input_channels(kernel, options, channels_last)
        if prev_channels is not None and expected != prev_channels:
            raise InvalidArgument(f"{field}.kernel takes {expected} input channels (shape {list(kernel.shape)}, "
                                  f"groups={options['groups']}) but the previous layer outputs {prev_channels}")
        # Let convcore check every option on a small input of this many channels that any kernel fits.
        ksize = kernel.shape[:nsp] if (options["kernel_layout"] in _IO_LAYOUTS
                                       or (options["kernel_layout"] is None and channels_last)) else kernel.shape[2:]
        dil = options["dilation"]
        dil = (dil,) * nsp if isinstance(dil, int) else tuple(dil)
        if len(dil) != nsp or any(d < 1 for d in dil):
            dil = (1,) * nsp  # convcore reports the bad dilation itself below
        spatial = tuple((k - 1) * d + 1 for k, d in zip(ksize, dil))
        x_shape = (1, *spatial, expected) if channels_last else (1, expected, *spatial)
        try:
            out = convcore.output_shape(x_shape, kernel.shape, **options)
            if bias is not None and bias.shape != (out[-1] if channels_last else out[1],):
                raise ValueError(f"bias must have shape ({out[-1] if channels_last else out[1]},) (one value per "
                                 f"output channel), got shape {tuple(bias.shape)}")
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"{field}: {exc}") from None
        return out[-1] if channels_last else out[1]

    # ------------------------------------------------------------------ describing
    def layout_name(self):
        """``NCHW``, ``NHWC``, ``NCW``, ... for this model's rank and channel axis."""
        return ("N" + "DHW"[3 - self.nsp:] + "C") if self.channels_last else ("NC" + "DHW"[3 - self.nsp:])

    def dims(self, channels):
        """Per-sample dims (no batch) with the channel count fixed and every spatial size variable (-1)."""
        spatial = [-1] * self.nsp
        return spatial + [channels] if self.channels_last else [channels] + spatial

    # ------------------------------------------------------------------ running
    def check_input(self, x, field="input"):
        """Refuse an input of the wrong dtype, rank or channel count, naming `field` and the model."""
        if x.dtype != self.dtype:
            raise InvalidArgument(f"{field} has dtype {x.dtype.name}, model {self.name!r} takes {self.dtype.name}")
        if x.ndim != self.nsp + 2:
            raise InvalidArgument(f"{field} has shape {list(x.shape)}, model {self.name!r} takes rank-{self.nsp + 2} "
                                  f"inputs ({self.layout_name()})")
        channels = x.shape[-1] if self.channels_last else x.shape[1]
        if channels != self.in_channels:
            raise InvalidArgument(f"{field} has {channels} channels (shape {list(x.shape)}, {self.layout_name()}), "
                                  f"model {self.name!r} takes {self.in_channels}")
        if x.shape[0] < 1:
            raise InvalidArgument(f"{field} has an empty batch dimension, shape {list(x.shape)}")

    def plans(self, x_shape, num_threads=None):
        """The convcore plans of every layer for inputs shaped like `x_shape` (any batch), built once and cached."""
        key = (tuple(x_shape[1:]), num_threads)
        with self._lock:
            plans = self._plans.get(key)
            if plans is not None:
                self._plans.move_to_end(key)
                return plans
        plans = []
        shape = (1, *key[0])
        for i, layer in enumerate(self.layers):
            try:
                plan = convcore.make_plan(shape, layer.kernel, layer.bias, num_threads=num_threads,
                                          **layer.options)
            except (ValueError, TypeError) as exc:
                raise InvalidArgument(f"input shape {list(x_shape)} does not fit model {self.name!r} at "
                                      f"layers[{i}]: {exc}") from None
            plans.append(plan)
            shape = plan.output_shape(1)
        with self._lock:
            self._plans[key] = plans
            while len(self._plans) > self._plan_cache_size:
                self._plans.popitem(last=False)
        return plans

    def route(self, x_shape, num_threads=None, max_output_bytes=None):
        """The `Route` for an input of `x_shape` (checked with `check_input` first), built once per shape.

        Raises LimitExceeded before any plan is built when a layer's output would exceed `max_output_bytes` (every
        layer's output is allocated, not only the last one's), and InvalidArgument for a shape the layers refuse.
        """
        key = (tuple(x_shape), num_threads, max_output_bytes)
        route = self._routes.get(key)  # a dict read is atomic; misses are built twice at worst
        if route is not None:
            return route
        if max_output_bytes is not None:
            self._check_layer_outputs(x_shape, max_output_bytes)
        # An explicit count, not None: a plan made with None counts the CPUs of the thread that runs it, per call,
        # and the thread leading a team runs pinned to one CPU (server._compute.TeamPlacement).
        plans = self.plans(x_shape, convcore.resolve_num_threads(num_threads))
        n = x_shape[0]
        shapes = tuple(tuple(plan.output_shape(n)) for plan in plans)
        # Ask the plans: convcore weighs depthwise and packed NHWC work differently from their FLOPs when it picks a
        # thread count, and the CPU units reserved must be the threads the plans will really use.
        threads = max(plan.num_threads(n, num_threads) for plan in plans)
        route = Route(plans, shapes, threads, sum(plan.work_flops(n) for plan in plans))
        with self._lock:
            self._routes[key] = route
            while len(self._routes) > 4 * self._plan_cache_size:
                self._routes.popitem(last=False)
        return route

    def _check_layer_outputs(self, x_shape, max_output_bytes):
        shape = tuple(x_shape)
        for i, layer in enumerate(self.layers):
            try:
                shape = convcore.output_shape(shape, layer.kernel.shape, **layer.options)
            except (ValueError, TypeError):
                return  # left to the plans, which name the layer
            nbytes = math.prod(shape) * self.dtype.itemsize
            if nbytes > max_output_bytes:
                raise LimitExceeded(
                    f"layers[{i}] of model {self.name!r} would output {nbytes} bytes (shape {list(shape)}) for an "
                    f"input of shape {list(x_shape)}, over the server's output limit of "
                    f"{max_output_bytes / MIB:g} MiB; send a smaller input, or start the server with a larger "
                    f"--max-output-mb")

    def run(self, token, route, x, out, buffers):
        """Run every layer of `route` in order, the last one into `out`; `buffers(key, shape, dtype)` gives the
        intermediate outputs. `token` is checked between layers, so that a call whose client has gone stops."""
        last = len(route.plans) - 1
        for i, plan in enumerate(route.plans):
            token.check()
            x = plan.run(x, out=out if i == last else buffers((id(self), i), route.shapes[i], self.dtype))
        return out
