"""What the ONNX and PyTorch importers share: importing the optional extra, folding batch-norm, and the small state
machine that turns a chain of (conv, batch-norm, activation) steps into `register_model` layer dicts.

The server runs a stack of conv layers, each ``conv -> + bias -> activation``. A framework's chain maps onto that when
every convolution is followed by at most one batch-norm (folded into its kernel and bias) and at most one activation
(fused); `LayerChain` enforces that and says, naming the step, why anything else cannot be mapped.
"""
import importlib

import numpy as np

from ._errors import invalid_argument

__all__ = ["LayerChain", "fold_batchnorm", "require", "float_dtype"]

# Two activations in a row that are one activation: f(g(x)) for (first g, then f). relu and relu6 clamp from below at
# 0, so a relu next to a relu6 is the relu6.
_FUSED_PAIRS = {("relu", "relu"): "relu", ("relu", "relu6"): "relu6", ("relu6", "relu"): "relu6",
                ("relu6", "relu6"): "relu6"}


def require(module, extra, what):
    """Import `module` (an optional extra), or raise a ConvError saying which extra installs it.

    Parameters
    ----------
    module : str
        Module to import, e.g. "onnx".
    extra : str
        The setup.py extra that provides it, e.g. "onnx".
    what : str
        The SDK call that needs it, for the message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise invalid_argument(f"{what} needs the '{module}' package, which is not installed ({err}); install the "
                               f"extra: pip install 'convcore-service[{extra}]'") from None


def float_dtype(where, dtype):
    """`dtype` (a numpy dtype) if the service computes in it (float32, float64), else a ConvError naming `where`."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise invalid_argument(f"{where}: weights of dtype {dtype} are not supported; the service computes in float32 "
                               f"or float64 (convert the model first, e.g. module.float())")
    return dtype


def fold_batchnorm(kernel, bias, scale, shift, mean, var, eps):
    """Fold ``y = (conv(x) + bias - mean) / sqrt(var + eps) * scale + shift`` into one conv's kernel and bias.

    Computed in float64, then cast to the kernel's dtype, so a float32 model loses no more than one rounding.

    Parameters
    ----------
    kernel : numpy.ndarray
        (out_channels, in_channels / groups, *kernel_size).
    bias : numpy.ndarray or None
        (out_channels,).
    scale, shift, mean, var : numpy.ndarray
        (out_channels,) each: the batch-norm's gamma, beta, running mean and running variance.
    eps : float

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        The folded kernel and bias, in the kernel's dtype (new arrays; the inputs are not modified).
    """
    dtype = kernel.dtype
    factor = np.asarray(scale, np.float64) / np.sqrt(np.asarray(var, np.float64) + float(eps))
    k = np.asarray(kernel, np.float64) * factor.reshape((-1,) + (1,) * (kernel.ndim - 1))
    b = np.zeros(kernel.shape[0]) if bias is None else np.asarray(bias, np.float64)
    b = (b - np.asarray(mean, np.float64)) * factor + np.asarray(shift, np.float64)
    return k.astype(dtype), b.astype(dtype)


class LayerChain:
    """Collects layer dicts from a chain of steps, each named (`where`) for the error messages.

    Call `conv`, `batchnorm` and `activation` in the chain's order, then `layers()`. A batch-norm must directly
    follow a conv, an activation must follow a conv (or its batch-norm); anything else is a ConvError naming the step.
    """

    def __init__(self, source):
        self._source = source  # "ONNX model" / "module": for messages
        self._layers = []
        self._state = None     # None (nothing yet), "conv", "batchnorm" or "activation": the last step taken
        self._last_where = None
        self._dtype = None

    def conv(self, where, kernel, bias=None, **options):
        """A convolution: `kernel` in OI* layout, `options` as `register_model` takes them."""
        dtype = float_dtype(where, kernel.dtype)
        if self._dtype is not None and dtype != self._dtype:
            raise invalid_argument(f"{where}: weights are {dtype}, earlier layers are {self._dtype}; every layer of "
                                   f"a model has one dtype")
        if bias is not None and bias.shape != (kernel.shape[0],):
            raise invalid_argument(f"{where}: bias has shape {bias.shape}, expected ({kernel.shape[0]},) (one per "
                                   f"output channel)")
        self._dtype = dtype
        layer = {"kernel": kernel, **options}
        if bias is not None:
            layer["bias"] = bias.astype(dtype, copy=False)
        self._layers.append(layer)
        self._state, self._last_where = "conv", where

    def batchnorm(self, where, scale, shift, mean, var, eps):
        """A batch-norm, folded into the conv just before it."""
        if self._state != "conv":
            after = "at the start" if self._state is None else f"after {self._last_where}"
            raise invalid_argument(f"{where}: a batch normalization {after} cannot be folded; it is supported only "
                                   f"directly after a convolution")
        layer = self._layers[-1]
        channels = layer["kernel"].shape[0]
        for label, a in (("scale", scale), ("bias", shift), ("mean", mean), ("variance", var)):
            if np.shape(a) != (channels,):
                raise invalid_argument(f"{where}: {label} has shape {np.shape(a)}, expected ({channels},) (the "
                                       f"output channels of {self._last_where})")
        if np.any(np.asarray(var, np.float64) + float(eps) <= 0):
            raise invalid_argument(f"{where}: variance + epsilon must be positive in every channel")
        layer["kernel"], layer["bias"] = fold_batchnorm(layer["kernel"], layer.get("bias"), scale, shift, mean, var,
                                                        eps)
        self._state, self._last_where = "batchnorm", where

    def activation(self, where, name):
        """An activation (a convcore name), fused into the layer before it."""
        if self._state is None:
            raise invalid_argument(f"{where}: an activation ({name}) before the first convolution cannot be fused; "
                                   f"the service applies activations after a convolution")
        layer = self._layers[-1]
        if self._state == "activation":
            fused = _FUSED_PAIRS.get((layer["activation"], name))
            if fused is None:
                raise invalid_argument(f"{where}: a second activation ({name}) right after {self._last_where} "
                                       f"({layer['activation']}) cannot be fused; a layer has one activation")
            name = fused
        layer["activation"] = name
        self._state, self._last_where = "activation", where

    def layers(self):
        """The layer dicts; a ConvError if the chain had no convolution."""
        if not self._layers:
            raise invalid_argument(f"the {self._source} has no convolution; there is nothing to register")
        return self._layers
