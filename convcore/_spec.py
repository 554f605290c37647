"""Checking and normalizing layer options, once, at the Python boundary.

Everything a kernel needs is turned into plain ints here, and every bad value is refused with a message that names
the argument, the value given and what was expected. After this nothing can go out of bounds in the nogil code.
"""
import math
import numbers
from dataclasses import dataclass

import numpy as np

__all__ = ["ACTIVATIONS", "LayerGeometry", "check_dtype", "normalize", "DEFAULT_MAX_OUTPUT_BYTES"]

#: Activation name -> code used by the kernels (fused after the bias).
ACTIVATIONS = {
    None: 0, "linear": 0, "relu": 1, "relu6": 2, "sigmoid": 3, "tanh": 4,
    "silu": 5, "swish": 5, "elu": 6, "gelu": 7, "softplus": 8,
}

DEFAULT_MAX_OUTPUT_BYTES = 4 << 30

_FORMATS = {
    "channels_first": (None, False), "channels_last": (None, True),
    "NCW": (1, False), "NCHW": (2, False), "NCDHW": (3, False),
    "NWC": (1, True), "NHWC": (2, True), "NDHWC": (3, True),
}
_LAYOUTS = {
    "OIW": (1, False), "OIHW": (2, False), "OIDHW": (3, False),
    "WIO": (1, True), "HWIO": (2, True), "DHWIO": (3, True),
}
_OI_NAME = {1: "OIW", 2: "OIHW", 3: "OIDHW"}
_IO_NAME = {1: "WIO", 2: "HWIO", 3: "DHWIO"}
_INT32_MAX = 2**31 - 1
#: Largest size, stride, dilation or pad accepted: keeps every index product of the kernels far from int64 overflow.
MAX_DIM = _INT32_MAX


def check_dtype(name, dtype):
    """Return numpy dtype `dtype` if it is float32/float64, else raise TypeError naming `name`."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be float32 or float64, got dtype {dtype}")
    return dtype


def _int_tuple(name, value, nsp, *, minimum):
    """An int or one int per spatial dim -> tuple of nsp ints, each >= minimum."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        vals = (int(value),) * nsp
    else:
        try:
            vals = tuple(value)
        except TypeError:
            raise TypeError(f"{name} must be an int or a sequence of {nsp} ints, got {value!r}") from None
        if len(vals) != nsp or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in vals):
            raise ValueError(f"{name} must be an int or {nsp} ints (one per spatial dim), got {value!r}")
        vals = tuple(int(v) for v in vals)
    if any(v < minimum for v in vals):
        what = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if any(v > MAX_DIM for v in vals):
        raise ValueError(f"{name} must be at most {MAX_DIM}, got {value!r}")
    return vals


def _padding(padding, nsp, spatial, ksize, strides, dilation):
    """Normalize `padding` to one (begin, end) pair per spatial dim."""
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return ((0, 0),) * nsp
        if mode == "same":
            pads = []
            for n, k, s, d in zip(spatial, ksize, strides, dilation):
                out = -(-n // s)
                total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
                pads.append((total // 2, total - total // 2))  # TF/Keras: the extra one at the end
            return tuple(pads)
        if mode == "causal":
            if nsp != 1:
                raise ValueError(f"padding='causal' is only for 1-D convolutions, x has {nsp} spatial dims")
            return ((dilation[0] * (ksize[0] - 1), 0),)
        raise ValueError(f"padding must be 'valid', 'same', 'causal', an int, {nsp} ints or {nsp} (begin, end) "
                         f"pairs, got {padding!r}")
    if isinstance(padding, numbers.Integral) and not isinstance(padding, bool):
        p = int(padding)
        if p < 0:
            raise ValueError(f"padding must be non-negative, got {padding!r}")
        if p > MAX_DIM:
            raise ValueError(f"padding must be at most {MAX_DIM}, got {padding!r}")
        return ((p, p),) * nsp
    try:
        items = tuple(padding)
    except TypeError:
        raise TypeError(f"padding must be a string, an int or a sequence, got {padding!r}") from None
    if len(items) != nsp:
        raise ValueError(f"padding must have {nsp} entries (one int or (begin, end) pair per spatial dim), "
                         f"got {padding!r}")
    pads = []
    for item in items:
        if isinstance(item, numbers.Integral) and not isinstance(item, bool):
            pair = (int(item), int(item))
        else:
            try:
                pair = tuple(item)
            except TypeError:
                raise TypeError(f"padding entries must be ints or (begin, end) pairs, got {padding!r}") from None
            if len(pair) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in pair):
                raise ValueError(f"padding entries must be ints or (begin, end) pairs of ints, got {padding!r}")
            pair = (int(pair[0]), int(pair[1]))
        if pair[0] < 0 or pair[1] < 0:
            raise ValueError(f"padding must be non-negative, got {padding!r}")
        if pair[0] > MAX_DIM or pair[1] > MAX_DIM:
            raise ValueError(f"padding must be at most {MAX_DIM}, got {padding!r}")
        pads.append(pair)
    return tuple(pads)


@dataclass(frozen=True)
class LayerGeometry:
    """A checked layer: everything the kernels need, as ints, in the canonical 3-D form (1-D/2-D get unit dims)."""
    nsp: int                 # spatial rank of the layer (1, 2 or 3)
    channels_last: bool
    kernel_io: bool          # the kernel as given is *IO (Keras/TF); else OI* (PyTorch/ONNX)
    C: int
    Cout: int
    groups: int
    spatial: tuple           # input spatial sizes, as given (nsp entries)
    ksize: tuple             # kernel spatial sizes (nsp)
    strides: tuple
    dilation: tuple
    pads: tuple              # (begin, end) per spatial dim
    out_spatial: tuple       # output spatial sizes (nsp)
    act: int

    def output_shape(self, batch):
        if self.channels_last:
            return (batch, *self.out_spatial, self.Cout)
        return (batch, self.Cout, *self.out_spatial)

    def canonical(self):
        """(D, H, W, KD, KH, KW, SD, SH, SW, DD, DH, DW, PD, PH, PW, OD, OH, OW) with unit leading dims."""
        pad = 3 - self.nsp
        one = (1,) * pad
        zero = (0,) * pad
        return (one + self.spatial + one + self.ksize + one + self.strides + one + self.dilation
                + zero + tuple(b for b, _ in self.pads) + one + self.out_spatial)

    def flops(self, batch):
        """2 · N · Cout · prod(out) · Cin/groups · prod(k): the multiply-adds of the layer, counted twice."""
        return 2 * batch * self.Cout * math.prod(self.out_spatial) * (self.C // self.groups) * math.prod(self.ksize)


def _data_format(data_format, rank):
    if not isinstance(data_format, str) or data_format not in _FORMATS:
        raise ValueError(f"data_format must be 'channels_first', 'channels_last' or one of "
                         f"{', '.join(repr(k) for k in _FORMATS if k.startswith('N'))}, got {data_format!r}")
    fmt_nsp, channels_last = _FORMATS[data_format]
    if fmt_nsp is not None and fmt_nsp != rank - 2:
        raise ValueError(f"data_format={data_format!r} is for rank-{fmt_nsp + 2} inputs, x has rank {rank}")
    return channels_last


def _kernel_layout(kernel_layout, nsp, channels_last):
    if kernel_layout is None:
        return channels_last
    if not isinstance(kernel_layout, str) or kernel_layout not in _LAYOUTS:
        raise ValueError(f"kernel_layout must be None, {_OI_NAME[nsp]!r} or {_IO_NAME[nsp]!r} for a "
                         f"{nsp}-D convolution, got {kernel_layout!r}")
    lay_nsp, io = _LAYOUTS[kernel_layout]
    if lay_nsp != nsp:
        raise ValueError(f"kernel_layout={kernel_layout!r} is for {lay_nsp}-D convolutions, this one is {nsp}-D "
                         f"(use {_OI_NAME[nsp]!r} or {_IO_NAME[nsp]!r})")
    return io


def normalize(x_shape, kernel_shape, bias_shape=None, *, strides=1, padding="valid", dilation=1, groups=1,
              data_format="channels_first", kernel_layout=None, activation=None, expect_rank=None,
              max_output_bytes=None, itemsize=4):
    """Check every option against the shapes and return a LayerGeometry (see convcore.conv for the options)."""
    try:
        x_shape = tuple(int(operator_index(s)) for s in x_shape)
        kernel_shape = tuple(int(operator_index(s)) for s in kernel_shape)
    except TypeError:
        raise TypeError(f"shapes must be sequences of ints, got x shape {x_shape!r}, kernel shape "
                        f"{kernel_shape!r}") from None
    rank = len(x_shape)
    if expect_rank is not None and rank != expect_rank:
        raise ValueError(f"conv{expect_rank - 2}d expects x of rank {expect_rank} (batch, channels and "
                         f"{expect_rank - 2} spatial dims), got rank {rank} with shape {x_shape}")
    if rank not in (3, 4, 5):
        raise ValueError(f"x must have rank 3, 4 or 5 (batch, channels, 1 to 3 spatial dims), got rank {rank} "
                         f"with shape {x_shape}")
    if any(s > MAX_DIM for s in x_shape + kernel_shape):
        raise ValueError(f"dimensions must be at most {MAX_DIM}: x shape {x_shape}, kernel shape {kernel_shape}")
    if any(s <= 0 for s in x_shape):
        raise ValueError(f"x has an empty dimension, shape {x_shape}: every dimension must be at least 1")
    nsp = rank - 2
    channels_last = _data_format(data_format, rank)
    kernel_io = _kernel_layout(kernel_layout, nsp, channels_last)
    layout_name = (_IO_NAME if kernel_io else _OI_NAME)[nsp]
    if len(kernel_shape) != rank:
        raise ValueError(f"kernel must have rank {rank} ({layout_name}) for a rank-{rank} x, got rank "
                         f"{len(kernel_shape)} with shape {kernel_shape}")
    if any(s <= 0 for s in kernel_shape):
        raise ValueError(f"kernel has an empty dimension, shape {kernel_shape}: every dimension must be at least 1")
    if kernel_io:
        ksize, k_in, Cout = kernel_shape[:nsp], kernel_shape[nsp], kernel_shape[nsp + 1]
    else:
        Cout, k_in, ksize = kernel_shape[0], kernel_shape[1], kernel_shape[2:]
    if channels_last:
        C, spatial = x_shape[-1], x_shape[1:-1]
    else:
        C, spatial = x_shape[1], x_shape[2:]

    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"groups must be a positive int, got {groups!r}")
    groups = int(groups)
    if groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups}")
    if C % groups:
        raise ValueError(f"groups={groups} does not divide the {C} input channels of x")
    if Cout % groups:
        raise ValueError(f"groups={groups} does not divide the {Cout} output channels (filters) of the kernel")
    if k_in != C // groups:
        raise ValueError(f"kernel expects {k_in} input channels per group ({layout_name} shape {kernel_shape}, "
                         f"groups={groups}), x has {C} channels, i.e. {C // groups} per group")
    if bias_shape is not None and tuple(bias_shape) != (Cout,):
        raise ValueError(f"bias must have shape ({Cout},) (one value per output channel), got shape "
                         f"{tuple(bias_shape)}")

    strides = _int_tuple("strides", strides, nsp, minimum=1)
    dilation = _int_tuple("dilation", dilation, nsp, minimum=1)
    pads = _padding(padding, nsp, spatial, ksize, strides, dilation)

    out_spatial = []
    for i, (n, k, s, d, (pb, pe)) in enumerate(zip(spatial, ksize, strides, dilation, pads)):
        eff = (k - 1) * d + 1
        o = (n + pb + pe - eff) // s + 1
        if n + pb + pe < eff:
            raise ValueError(f"kernel size {k} (dilation {d}: spans {eff}) is larger than the padded input along "
                             f"spatial dim {i} ({n} + padding {pb} + {pe} = {n + pb + pe}): no output")
        out_spatial.append(o)
    out_spatial = tuple(out_spatial)

    try:
        act = ACTIVATIONS[activation.lower() if isinstance(activation, str) else activation]
    except (KeyError, TypeError):
        raise ValueError(f"activation must be one of {sorted(k for k in ACTIVATIONS if k)} or None, "
                         f"got {activation!r}") from None

    geo = LayerGeometry(nsp=nsp, channels_last=channels_last, kernel_io=kernel_io, C=C, Cout=Cout, groups=groups,
                        spatial=tuple(spatial), ksize=tuple(ksize), strides=strides, dilation=dilation, pads=pads,
                        out_spatial=out_spatial, act=act)
    out_shape = geo.output_shape(x_shape[0])
    if max_output_bytes is not None:
        nbytes = math.prod(out_shape) * itemsize
        if nbytes > max_output_bytes:
            raise ValueError(f"output would be {nbytes} bytes (shape {out_shape}), over max_output_bytes="
                             f"{max_output_bytes}; check padding/strides, or raise the limit with "
                             f"convcore.set_max_output_bytes()")
    # BLAS takes 32-bit ints: refuse sizes it cannot express rather than let them wrap.
    ck = (C // groups) * math.prod(ksize)
    if max(math.prod(out_spatial), ck, C * math.prod(spatial) // max(1, min(spatial)), Cout) > _INT32_MAX:
        raise ValueError(f"layer too large for 32-bit BLAS indices: x shape {x_shape}, kernel shape {kernel_shape}, "
                         f"padding {pads} give output spatial size {out_spatial}")
    return geo


def operator_index(v):
    if isinstance(v, bool):
        raise TypeError
    import operator
    return operator.index(v)
