"""A registered model: a stack of conv layers checked once at registration, with convcore plans cached per shape."""
import collections
import re
import threading

import numpy as np

import convcore
from convproto.convservice.v1 import conv_pb2

from ._codec import DTYPES, decode_spec, decode_tensor
from ._compute import thread_buffer
from ._errors import InvalidArgument

__all__ = ["Model", "check_model_name", "MODEL_NAME_PATTERN"]

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


class _Layer:
    __slots__ = ("kernel", "bias", "options", "spec")

    def __init__(self, kernel, bias, options, spec):
        self.kernel, self.bias, self.options, self.spec = kernel, bias, options, spec


class Model:
    """A checked stack of conv layers (each output feeds the next), ready to run.

    Build it with `Model.from_request`; every check happens there, so a Model that exists can run any input whose
    channels, dtype and rank match (spatial sizes are checked per call, by convcore).
    """

    def __init__(self, name, layers, dtype, in_channels, out_channels, nsp, channels_last, request,
                 plan_cache_size=8):
        self.name = name
        self.layers = layers
        self.dtype = dtype
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.nsp = nsp
        self.channels_last = channels_last
        self.request = request  # the RegisterModelRequest it came from: what the repository stores
        self._plans = collections.OrderedDict()
        self._plan_cache_size = plan_cache_size
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ building
    @classmethod
    def from_request(cls, request, *, plan_cache_size=8):
        """Check a RegisterModelRequest and build the Model.

        Raises
        ------
        InvalidArgument, ValueError, TypeError
            With a message naming the field (``layers[1].kernel`` ...), the value and what was expected.
        """
        name = check_model_name(request.name)
        if not request.layers:
            raise InvalidArgument("layers must hold at least one layer, got none")
        layers = []
        dtype = nsp = channels_last = None
        in_channels = channels = None
        for i, msg in enumerate(request.layers):
            field = f"layers[{i}]"
            if not msg.HasField("kernel"):
                raise InvalidArgument(f"{field}.kernel is missing: every layer needs a kernel")
            kernel = decode_tensor(f"{field}.kernel", msg.kernel)
            bias = decode_tensor(f"{field}.bias", msg.bias) if msg.HasField("bias") else None
            _check_finite(f"{field}.kernel", kernel)
            if bias is not None:
                _check_finite(f"{field}.bias", bias)
            options = decode_spec(f"{field}.spec", msg.spec)
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
            layers.append(_Layer(kernel, bias, options, msg.spec))
        return cls(name, layers, dtype, in_channels, channels, nsp, channels_last, request, plan_cache_size)

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
    @property
    def datatype(self):
        """The KServe v2 datatype name of the model's tensors."""
        return "FP32" if self.dtype == np.float32 else "FP64"

    @property
    def wire_dtype(self):
        return next(k for k, v in DTYPES.items() if v == self.dtype)

    def info(self):
        """The model as a `ModelInfo` message (specs and shapes, not weights)."""
        return conv_pb2.ModelInfo(
            name=self.name, dtype=self.wire_dtype, input_channels=self.in_channels,
            output_channels=self.out_channels, spatial_dims=self.nsp, channels_last=self.channels_last,
            layers=[conv_pb2.ModelInfo.LayerInfo(spec=layer.spec, kernel_shape=layer.kernel.shape,
                                                 has_bias=layer.bias is not None) for layer in self.layers])

    # ------------------------------------------------------------------ running
    def check_input(self, x, field="input"):
        """Refuse an input of the wrong dtype, rank or channel count, naming `field` and the model."""
        if x.dtype != self.dtype:
            raise InvalidArgument(f"{field} has dtype {x.dtype.name}, model {self.name!r} takes {self.dtype.name}")
        if x.ndim != self.nsp + 2:
            raise InvalidArgument(f"{field} has shape {list(x.shape)}, model {self.name!r} takes rank-{self.nsp + 2} "
                                  f"inputs ({self._layout_name()})")
        channels = x.shape[-1] if self.channels_last else x.shape[1]
        if channels != self.in_channels:
            raise InvalidArgument(f"{field} has {channels} channels (shape {list(x.shape)}, {self._layout_name()}), "
                                  f"model {self.name!r} takes {self.in_channels}")
        if x.shape[0] < 1:
            raise InvalidArgument(f"{field} has an empty batch dimension, shape {list(x.shape)}")

    def _layout_name(self):
        return ("N" + "DHW"[3 - self.nsp:] + "C") if self.channels_last else ("NC" + "DHW"[3 - self.nsp:])

    def plans(self, x_shape, num_threads=None):
        """The convcore plans of every layer for inputs shaped like `x_shape` (any batch), built once and cached."""
        key = tuple(x_shape[1:])
        with self._lock:
            plans = self._plans.get(key)
            if plans is not None:
                self._plans.move_to_end(key)
                return plans
        plans = []
        shape = (1, *key)
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

    def output_shape(self, x_shape, num_threads=None):
        """Shape of the model's output for an input of `x_shape` (also builds and caches the plans)."""
        return tuple(self.plans(x_shape, num_threads)[-1].output_shape(x_shape[0]))

    def run(self, token, x, num_threads=None):
        """Run every layer in order on compute-thread buffers; return the output as (bytes, shape).

        `token` is checked between layers so that a call whose client has gone stops being worked on.
        """
        plans = self.plans(x.shape, num_threads)
        for i, plan in enumerate(plans):
            token.check()
            out = thread_buffer((id(self), i), plan.output_shape(x.shape[0]), self.dtype)
            x = plan.run(x, out=out)
        return x.tobytes(), x.shape
