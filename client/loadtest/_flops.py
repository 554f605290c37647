"""Shape inference and FLOP counts of conv layers, in plain Python.

The same output-size rules as ``convcore`` (padding ``valid``/``same``/``causal``/ints/pairs, dilation, strides),
repeated here because the client must import without the compiled engine; ``tests/test_loadtest_stats.py`` checks
them against ``convcore.output_shape``.
"""
import math
import numbers

__all__ = ["layer_flops", "layer_output_shape", "model_flops"]

_CHANNELS_LAST = {"channels_last", "NWC", "NHWC", "NDHWC"}
_IO_LAYOUTS = {"WIO", "HWIO", "DHWIO"}


def _per_dim(name, value, nsp):
    if isinstance(value, numbers.Integral):
        return (int(value),) * nsp
    vals = tuple(int(v) for v in value)
    if len(vals) == 1:
        return vals * nsp
    if len(vals) != nsp:
        raise ValueError(f"{name} must be one int or {nsp} ints, got {value!r}")
    return vals


def _pads(padding, spatial, ksize, strides, dilation):
    """One (begin, end) pair per spatial dim, as convcore computes it."""
    nsp = len(spatial)
    if padding is None:
        padding = "valid"
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return [(0, 0)] * nsp
        if mode == "same":
            pads = []
            for n, k, s, d in zip(spatial, ksize, strides, dilation):
                total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
                pads.append((total // 2, total - total // 2))
            return pads
        if mode == "causal":
            if nsp != 1:
                raise ValueError("padding 'causal' is for 1-D layers only")
            return [(dilation[0] * (ksize[0] - 1), 0)]
        raise ValueError(f"unknown padding mode {padding!r}")
    if isinstance(padding, numbers.Integral):
        return [(int(padding), int(padding))] * nsp
    items = list(padding)
    if len(items) != nsp:
        raise ValueError(f"padding must have {nsp} entries, got {padding!r}")
    return [(int(i), int(i)) if isinstance(i, numbers.Integral) else (int(i[0]), int(i[1])) for i in items]


def layer_output_shape(input_shape, kernel_shape, *, strides=1, padding="valid", dilation=1, groups=1,
                       data_format="channels_first", kernel_layout=None):
    """Output shape of one conv layer (``convcore.conv`` semantics).

    Parameters
    ----------
    input_shape : sequence of int
        ``(N, C, *spatial)``, or ``(N, *spatial, C)`` for a channels-last ``data_format``.
    kernel_shape : sequence of int
        OI* (``(COUT, CIN/groups, *k)``) or, for a channels-last layer or an ``*IO`` ``kernel_layout``,
        ``(*k, CIN/groups, COUT)``.
    strides, dilation : int or sequence of int
    padding : str, int or sequence
    groups : int
    data_format, kernel_layout : str

    Returns
    -------
    tuple of int

    Raises
    ------
    ValueError
        If the shapes do not fit together or the output would be empty.
    """
    input_shape, kernel_shape = tuple(map(int, input_shape)), tuple(map(int, kernel_shape))
    nsp = len(input_shape) - 2
    if nsp < 1 or len(kernel_shape) != nsp + 2:
        raise ValueError(f"input shape {input_shape} and kernel shape {kernel_shape} must both have rank 3 to 5")
    channels_last = (data_format or "channels_first") in _CHANNELS_LAST
    kernel_io = (kernel_layout in _IO_LAYOUTS) if kernel_layout else channels_last
    if kernel_io:
        ksize, k_in, cout = kernel_shape[:nsp], kernel_shape[nsp], kernel_shape[nsp + 1]
    else:
        cout, k_in, ksize = kernel_shape[0], kernel_shape[1], kernel_shape[2:]
    c, spatial = (input_shape[-1], input_shape[1:-1]) if channels_last else (input_shape[1], input_shape[2:])
    groups = int(groups or 1)
    if c % groups or k_in * groups != c:
        raise ValueError(f"kernel expects {k_in} input channels per group (groups={groups}), input has {c}")
    strides = _per_dim("strides", strides or 1, nsp)
    dilation = _per_dim("dilation", dilation or 1, nsp)
    out = []
    for n, k, s, d, (pb, pe) in zip(spatial, ksize, strides, dilation, _pads(padding, spatial, ksize, strides,
                                                                            dilation)):
        span = (k - 1) * d + 1
        if n + pb + pe < span:
            raise ValueError(f"kernel size {k} (dilation {d}) is larger than the padded input ({n} + {pb} + {pe}): "
                             f"no output")
        out.append((n + pb + pe - span) // s + 1)
    return (input_shape[0], *out, cout) if channels_last else (input_shape[0], cout, *out)


def layer_flops(input_shape, kernel_shape, **options):
    """FLOPs of one conv layer, ``2 · N · COUT · prod(out) · CIN/groups · prod(k)``, and its output shape.

    Parameters
    ----------
    input_shape, kernel_shape : sequence of int
    **options
        ``strides``, ``padding``, ``dilation``, ``groups``, ``data_format``, ``kernel_layout`` as in
        :func:`layer_output_shape`; other keys (``activation``, ...) are ignored: bias and activation are not counted.

    Returns
    -------
    (int, tuple of int)
        The FLOP count and the output shape.
    """
    keys = ("strides", "padding", "dilation", "groups", "data_format", "kernel_layout")
    out_shape = layer_output_shape(input_shape, kernel_shape, **{k: options[k] for k in keys if k in options})
    nsp = len(input_shape) - 2
    channels_last = (options.get("data_format") or "channels_first") in _CHANNELS_LAST
    out_spatial = out_shape[1:-1] if channels_last else out_shape[2:]
    cout = out_shape[-1] if channels_last else out_shape[1]
    kernel_io = (options.get("kernel_layout") in _IO_LAYOUTS) if options.get("kernel_layout") else channels_last
    ksize = kernel_shape[:nsp] if kernel_io else kernel_shape[2:]
    k_in = kernel_shape[nsp] if kernel_io else kernel_shape[1]
    flops = 2 * int(input_shape[0]) * cout * math.prod(out_spatial) * int(k_in) * math.prod(map(int, ksize))
    return flops, out_shape


def model_flops(input_shape, layers):
    """FLOPs of a stack of conv layers run in order (each output feeding the next), and the final output shape.

    Parameters
    ----------
    input_shape : sequence of int
    layers : sequence of dict
        Each with ``kernel_shape`` and the options of :func:`layer_flops`.

    Returns
    -------
    (int, tuple of int)
    """
    total, shape = 0, tuple(input_shape)
    for layer in layers:
        opts = {k: v for k, v in layer.items() if k != "kernel_shape"}
        flops, shape = layer_flops(shape, layer["kernel_shape"], **opts)
        total += flops
    return total, shape
