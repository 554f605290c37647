"""An independent float64 reference convolution for the tests (numpy only).

It is written straight from the engine contract (issue 2), shares no code with ``convcore`` and favours obviousness over
speed: the input is zero-padded with ``np.pad``, then for every kernel position the strided slice of the padded input is
contracted with that kernel tap by ``np.einsum``, one group at a time, all in float64. ``test_conv_matrix.py`` checks
it against ``torch.nn.functional.conv{1,2,3}d`` and ONNX Runtime when those are installed.

The service tests import it too (``tests/conftest.py`` puts ``tests/`` on ``sys.path``)::

    from _reference import reference_conv, reference_output_shape
"""
import itertools
import math

import numpy as np

__all__ = [
    "ACTIVATIONS",
    "apply_activation",
    "canonical_data_format",
    "canonical_kernel_layout",
    "reference_conv",
    "reference_output_shape",
    "resolve_padding",
]

_FIRST_ALIASES = {1: "NCW", 2: "NCHW", 3: "NCDHW"}
_LAST_ALIASES = {1: "NWC", 2: "NHWC", 3: "NDHWC"}
_OI_LAYOUTS = {1: "OIW", 2: "OIHW", 3: "OIDHW"}
_IO_LAYOUTS = {1: "WIO", 2: "HWIO", 3: "DHWIO"}


def _sigmoid(z):
    # Split by sign so that neither branch overflows; NaN goes to the second branch and stays NaN.
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(-np.abs(z))
        return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _gelu(z):
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))


def _softplus(z):
    with np.errstate(over="ignore", invalid="ignore"):
        return np.maximum(z, 0.0) + np.log1p(np.exp(-np.abs(z)))


def _elu(z):
    with np.errstate(over="ignore", invalid="ignore"):
        return np.where(z > 0, z, np.expm1(np.minimum(z, 0.0)))


# name -> function on float64 arrays. The first six are required by the contract; the others are the usual Keras/PyTorch
# definitions (gelu exact/erf, elu with alpha=1), used only if the engine lists them in convcore.ACTIVATIONS.
ACTIVATIONS = {
    None: lambda z: z,
    "linear": lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),  # np.maximum propagates NaN
    "relu6": lambda z: np.minimum(np.maximum(z, 0.0), 6.0),
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "silu": lambda z: z * _sigmoid(z),
    "swish": lambda z: z * _sigmoid(z),
    "elu": _elu,
    "gelu": _gelu,
    "softplus": _softplus,
}


def apply_activation(z, activation):
    """Apply ``activation`` (a key of `ACTIVATIONS`) to a float64 array."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"reference: unknown activation {activation!r}")
    return ACTIVATIONS[activation](np.asarray(z, dtype=np.float64))


def canonical_data_format(data_format, rank):
    """Return "channels_first" or "channels_last" for a data_format name (aliases of the given rank accepted)."""
    if data_format in ("channels_first", _FIRST_ALIASES[rank]):
        return "channels_first"
    if data_format in ("channels_last", _LAST_ALIASES[rank]):
        return "channels_last"
    raise ValueError(f"reference: data_format {data_format!r} is not valid for {rank} spatial dims")


def canonical_kernel_layout(kernel_layout, data_format, rank):
    """Return "OI" (out, in/groups, *spatial) or "IO" (*spatial, in/groups, out)."""
    if kernel_layout is None:
        return "OI" if canonical_data_format(data_format, rank) == "channels_first" else "IO"
    if kernel_layout == _OI_LAYOUTS[rank]:
        return "OI"
    if kernel_layout == _IO_LAYOUTS[rank]:
        return "IO"
    raise ValueError(f"reference: kernel_layout {kernel_layout!r} is not valid for {rank} spatial dims")


def _per_dim(value, rank, name):
    if isinstance(value, (int, np.integer)):
        return (int(value),) * rank
    value = tuple(int(v) for v in value)
    if len(value) != rank:
        raise ValueError(f"reference: {name} needs {rank} values, got {value}")
    return value


def resolve_padding(spatial, ksize, strides, dilation, padding, rank=None):
    """Return one (begin, end) pair per spatial dim for any padding form of the contract."""
    rank = len(spatial) if rank is None else rank
    strides = _per_dim(strides, rank, "strides")
    dilation = _per_dim(dilation, rank, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * rank
        if padding == "same":
            pairs = []
            for n, k, s, d in zip(spatial, ksize, strides, dilation):
                out = -(-n // s)
                total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
                pairs.append((total // 2, total - total // 2))
            return pairs
        if padding == "causal":
            if rank != 1:
                raise ValueError("reference: causal padding is 1-D only")
            return [(dilation[0] * (ksize[0] - 1), 0)]
        raise ValueError(f"reference: unknown padding {padding!r}")
    if isinstance(padding, (int, np.integer)):
        return [(int(padding), int(padding))] * rank
    padding = list(padding)
    if len(padding) != rank:
        raise ValueError(f"reference: padding needs {rank} entries, got {padding}")
    if all(isinstance(p, (int, np.integer)) for p in padding):
        return [(int(p), int(p)) for p in padding]
    return [(int(b), int(e)) for b, e in padding]


def _geometry(x_shape, kernel_shape, strides, padding, dilation, groups, data_format, kernel_layout):
    rank = len(x_shape) - 2
    if rank not in (1, 2, 3) or len(kernel_shape) != rank + 2:
        raise ValueError(f"reference: bad ranks x{tuple(x_shape)} kernel{tuple(kernel_shape)}")
    fmt = canonical_data_format(data_format, rank)
    lay = canonical_kernel_layout(kernel_layout, data_format, rank)
    if fmt == "channels_first":
        n, c_in, spatial = x_shape[0], x_shape[1], tuple(x_shape[2:])
    else:
        n, c_in, spatial = x_shape[0], x_shape[-1], tuple(x_shape[1:-1])
    if lay == "OI":
        c_out, c_per_group, ksize = kernel_shape[0], kernel_shape[1], tuple(kernel_shape[2:])
    else:
        c_out, c_per_group, ksize = kernel_shape[-1], kernel_shape[-2], tuple(kernel_shape[:-2])
    if c_in % groups or c_out % groups or c_per_group * groups != c_in:
        raise ValueError(f"reference: channels x={c_in} kernel={kernel_shape} groups={groups} do not fit")
    strides = _per_dim(strides, rank, "strides")
    dilation = _per_dim(dilation, rank, "dilation")
    pads = resolve_padding(spatial, ksize, strides, dilation, padding, rank)
    out_spatial = tuple(
        (n_ + b + e - (k - 1) * d - 1) // s + 1
        for n_, k, s, d, (b, e) in zip(spatial, ksize, strides, dilation, pads)
    )
    if min(out_spatial) <= 0:
        raise ValueError(f"reference: non-positive output size {out_spatial}")
    return dict(rank=rank, fmt=fmt, lay=lay, n=n, c_in=c_in, c_out=c_out, spatial=spatial, ksize=ksize,
                strides=strides, dilation=dilation, pads=pads, out_spatial=out_spatial)


def reference_output_shape(x_shape, kernel_shape, *, strides=1, padding="valid", dilation=1, groups=1,
                           data_format="channels_first", kernel_layout=None, **_ignored):
    """Output shape of `reference_conv` for these shapes and options (extra keywords such as activation are ignored)."""
    g = _geometry(tuple(x_shape), tuple(kernel_shape), strides, padding, dilation, groups, data_format, kernel_layout)
    if g["fmt"] == "channels_first":
        return (g["n"], g["c_out"]) + g["out_spatial"]
    return (g["n"],) + g["out_spatial"] + (g["c_out"],)


def reference_conv(x, kernel, bias=None, *, strides=1, padding="valid", dilation=1, groups=1,
                   data_format="channels_first", kernel_layout=None, activation=None):
    """Convolution (cross-correlation, as in every framework) computed in float64.

    Parameters
    ----------
    x : array_like, rank 3/4/5
        Batch, channels and 1-3 spatial dims in ``data_format`` order.
    kernel : array_like
        OI* (out, in/groups, *spatial) or *IO (*spatial, in/groups, out), chosen by ``kernel_layout``; ``None`` means
        OI* for channels_first and *IO for channels_last.
    bias : array_like of shape (C_out,), optional
    strides, padding, dilation, groups, data_format, kernel_layout, activation
        As in ``convcore.conv``.

    Returns
    -------
    numpy.ndarray
        float64, in ``data_format`` order.
    """
    x = np.asarray(x, dtype=np.float64)
    kernel = np.asarray(kernel, dtype=np.float64)
    g = _geometry(x.shape, kernel.shape, strides, padding, dilation, groups, data_format, kernel_layout)
    rank = g["rank"]
    if g["fmt"] == "channels_last":
        x = np.moveaxis(x, -1, 1)  # -> N, C, *spatial
    if g["lay"] == "IO":
        kernel = np.moveaxis(kernel, (-1, -2), (0, 1))  # -> O, I/g, *spatial
    xp = np.pad(x, [(0, 0), (0, 0)] + list(g["pads"]))
    c_out, c_in = g["c_out"], g["c_in"]
    cig, cog = c_in // groups, c_out // groups
    out = np.zeros((g["n"], c_out) + g["out_spatial"], dtype=np.float64)
    spatial_letters = "xyz"[:rank]
    subscripts = f"nc{spatial_letters},oc->no{spatial_letters}"
    for pos in itertools.product(*(range(k) for k in g["ksize"])):
        window = tuple(
            slice(p * d, p * d + (o - 1) * s + 1, s)
            for p, d, s, o in zip(pos, g["dilation"], g["strides"], g["out_spatial"])
        )
        patch = xp[(slice(None), slice(None)) + window]
        for grp in range(groups):
            w = kernel[(slice(grp * cog, (grp + 1) * cog), slice(None)) + pos]  # (cog, cig)
            out[:, grp * cog:(grp + 1) * cog] += np.einsum(subscripts, patch[:, grp * cig:(grp + 1) * cig], w)
    if bias is not None:
        bias = np.asarray(bias, dtype=np.float64)
        if bias.shape != (c_out,):
            raise ValueError(f"reference: bias shape {bias.shape} != ({c_out},)")
        out += bias.reshape((1, c_out) + (1,) * rank)
    out = apply_activation(out, activation)
    if g["fmt"] == "channels_last":
        out = np.moveaxis(out, 1, -1)
    return np.ascontiguousarray(out)
