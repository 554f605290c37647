"""Command-line parsing for ``python -m client.loadtest``: the flags, the ``--layer`` grammar, the ``--input`` shape.

Everything is checked here, before any connection is made, so a typo costs nothing and names the flag it is in.

The ``--layer`` grammar
-----------------------
::

    LAYER   := KERNEL "," CIN "->" COUT ( "," OPTION )*
    KERNEL  := K | K "x" K | K "x" K "x" K      spatial kernel sizes: a 1-D, 2-D or 3-D convolution
    OPTION  := "valid" | "same" | "causal"     padding (default: valid; causal is 1-D only)
             | "p" N                           explicit padding of N on both sides of every spatial dim
             | ACTIVATION                      relu, relu6, sigmoid, tanh, silu, swish, elu, gelu, softplus, linear
             | "s" N                           strides (default 1)
             | "d" N                           dilation (default 1)
             | "g" N                           groups (default 1; "g64" with 64->64 is depthwise)
             | "nobias"                        no bias (default: a bias per output channel)

Options may come in any order, each at most once. The layer is channels-first (NCW / NCHW / NCDHW), its kernel is
OI* (PyTorch/ONNX), and ``--input`` gives the input shape as ``NxCxHxW`` (rank = kernel dims + 2, C = CIN).
Examples: ``"3x3,64->64,same,relu"``, ``"7x7,3->64,same,s2,relu"``, ``"3x3,144->144,same,g144"``,
``"1x1,256->64"``, ``"3,64->64,causal,d2"``, ``"3x3x3,64->64,same"``.
"""
import argparse
import importlib.util
import math
import re
from dataclasses import dataclass

from .._ops import ACTIVATIONS
from ._flops import layer_output_shape

__all__ = ["ACTIVATIONS", "LayerArg", "build_parser", "parse_args", "parse_layer", "parse_shape"]

# ACTIVATIONS: the SDK's table (client._ops, checked against convcore's by the tests), re-exported here.
_PADDING_MODES = ("valid", "same", "causal")
_NUMBERED = {"p": "padding", "s": "strides", "d": "dilation", "g": "groups"}


@dataclass(frozen=True)
class LayerArg:
    """One conv layer as given by ``--layer``.

    Attributes
    ----------
    kernel_size : tuple of int
        Spatial kernel sizes (1 to 3 of them).
    in_channels, out_channels : int
        CIN and COUT.
    padding : str or int
        ``"valid"``, ``"same"``, ``"causal"`` or a symmetric amount.
    activation : str or None
    strides, dilation, groups : int
    bias : bool
    """
    kernel_size: tuple
    in_channels: int
    out_channels: int
    padding: object = "valid"
    activation: object = None
    strides: int = 1
    dilation: int = 1
    groups: int = 1
    bias: bool = True

    @property
    def kernel_shape(self):
        """The OI* kernel shape: ``(COUT, CIN / groups, *kernel_size)``."""
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def layer_options(self):
        """The keyword options of ``ConvClient.register_model``'s layer dicts (everything but kernel and bias)."""
        return {"strides": self.strides, "padding": self.padding, "dilation": self.dilation,
                "groups": self.groups, "activation": self.activation}

    def describe(self):
        """The layer back in the ``--layer`` grammar, normalized (for the summary and the JSON)."""
        parts = ["x".join(map(str, self.kernel_size)), f"{self.in_channels}->{self.out_channels}",
                 self.padding if isinstance(self.padding, str) else f"p{self.padding}"]
        if self.activation:
            parts.append(self.activation)
        parts += [f"{k}{v}" for k, v in (("s", self.strides), ("d", self.dilation), ("g", self.groups)) if v != 1]
        if not self.bias:
            parts.append("nobias")
        return ",".join(parts)


def _positive_int(text, what):
    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise ValueError(f"{what} must be a positive integer, got {text!r}")
    return int(text)


def parse_layer(text):
    """Parse a ``--layer`` string (grammar in this module's docstring) into a :class:`LayerArg`.

    Parameters
    ----------
    text : str
        For example ``"3x3,64->64,same,relu"``.

    Returns
    -------
    LayerArg

    Raises
    ------
    ValueError
        With a message naming the part of ``text`` that is wrong and what was expected.
    """
    parts = [p.strip() for p in text.split(",")]
    if len(parts) < 2:
        raise ValueError(f"layer {text!r} must start with KERNEL,CIN->COUT (e.g. '3x3,64->64,same,relu')")
    ksize = tuple(_positive_int(k, f"kernel size in {parts[0]!r}") for k in parts[0].lower().split("x"))
    if len(ksize) > 3:
        raise ValueError(f"kernel {parts[0]!r} has {len(ksize)} dims; 1 to 3 are supported (K, KxK or KxKxK)")
    chan = re.fullmatch(r"([0-9]+)\s*->\s*([0-9]+)", parts[1])
    if chan is None:
        raise ValueError(f"channels {parts[1]!r} must be CIN->COUT, e.g. '64->64'")
    cin, cout = (_positive_int(c, f"channel count in {parts[1]!r}") for c in chan.groups())

    opts = {}
    for opt in parts[2:]:
        low = opt.lower()
        if low in _PADDING_MODES:
            key, value = "padding", low
        elif low in ACTIVATIONS:
            key, value = "activation", low
        elif low == "nobias":
            key, value = "bias", False
        elif low[:1] in _NUMBERED and low[1:].isdigit():
            key = _NUMBERED[low[0]]
            value = int(low[1:])
            if value < (0 if key == "padding" else 1):
                raise ValueError(f"option {opt!r}: {key} must be {'>= 0' if key == 'padding' else '>= 1'}")
        else:
            raise ValueError(f"unknown layer option {opt!r}: expected a padding (valid, same, causal, pN), an "
                             f"activation ({', '.join(ACTIVATIONS)}), sN (strides), dN (dilation), gN (groups) "
                             f"or nobias")
        if key in opts:
            raise ValueError(f"layer {text!r} sets {key} twice")
        opts[key] = value

    layer = LayerArg(kernel_size=ksize, in_channels=cin, out_channels=cout, **opts)
    if cin % layer.groups or cout % layer.groups:
        raise ValueError(f"groups={layer.groups} must divide both CIN={cin} and COUT={cout}")
    if layer.padding == "causal" and len(ksize) != 1:
        raise ValueError(f"causal padding is for 1-D layers only, kernel {parts[0]!r} is {len(ksize)}-D")
    return layer


def parse_shape(text):
    """Parse ``"1x64x56x56"`` into ``(1, 64, 56, 56)``.

    Raises
    ------
    ValueError
        If a dimension is not a positive integer or the rank is not 3 to 5.
    """
    dims = tuple(_positive_int(d, f"dimension in shape {text!r}") for d in text.lower().split("x"))
    if not 3 <= len(dims) <= 5:
        raise ValueError(f"shape {text!r} must have rank 3 to 5 (NxCxW, NxCxHxW or NxCxDxHxW), got rank {len(dims)}")
    return dims


def _check_targets(text):
    """Check each comma-separated target is HOST:PORT or a gRPC URI (``dns:///name:port``, ``ipv4:...``)."""
    entries = [t.strip() for t in text.split(",")]
    for entry in entries:
        if re.match(r"^[a-z][a-z0-9+.-]*:", entry) and not re.fullmatch(r".*:[0-9]+", entry):
            continue  # a URI scheme without a trailing port (unix:/path, ...): gRPC checks it
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"target {entry!r} must be HOST:PORT (or a gRPC URI such as dns:///server:50051)")
    return ",".join(entries)


def _positive(kind):
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return convert


def _non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _wrap(func):
    def convert(text):
        try:
            return func(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = func.__name__
    return convert


_EPILOG = """\
--layer grammar:
  KxK[xK],CIN->COUT[,OPTION...]   kernel sizes (K, KxK or KxKxK), channels, then options in any order:
    valid | same | causal | pN    padding (default valid; causal is 1-D only; pN: N on both sides)
    relu, relu6, sigmoid, tanh, silu, swish, elu, gelu, softplus, linear   fused activation (default none)
    sN | dN | gN                  strides, dilation, groups (default 1)
    nobias                        no bias (default: one per output channel)
  The layer is channels-first; --input is NxCxHxW (rank = kernel dims + 2, C = CIN).

examples:
  python -m client.loadtest --target 127.0.0.1:50051 --layer "3x3,64->64,same,relu" --input 1x64x56x56 \\
      --concurrency 4 --duration 10 --json run.json --plot run.png
  python -m client.loadtest --target h1:50051,h2:50051 --model edge --input 8x3x224x224 --rate 200 \\
      --concurrency 16 --processes 2
"""


def build_parser():
    """Return the ``argparse`` parser of ``python -m client.loadtest`` (use :func:`parse_args` to also cross-check)."""
    p = argparse.ArgumentParser(
        prog="python -m client.loadtest",
        description="Load-test a convcore server: closed loop (--concurrency) or open loop (--rate), then a summary "
                    "of throughput, GFLOP/s, latency percentiles and errors.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    p.add_argument("--target", type=_wrap(_check_targets), default="localhost:50051",
                   help="HOST:PORT[,HOST:PORT...] or dns:///NAME:PORT; several are spread with round_robin "
                        "(default: %(default)s)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="name of an already registered model")
    what.add_argument("--layer", type=_wrap(parse_layer),
                      help="a layer to register under a generated name for the run (grammar below)")
    p.add_argument("--input", type=_wrap(parse_shape), required=True, metavar="SHAPE",
                   help="input shape, e.g. 1x64x56x56 (channels-first for --layer)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="tensor dtype (default: float32 for --layer, the model's dtype for --model)")
    p.add_argument("--concurrency", type=_positive(int), default=1, metavar="C",
                   help="requests in flight at most (closed loop: exactly C) (default: %(default)s)")
    p.add_argument("--duration", type=_positive(float), default=10.0, metavar="S",
                   help="measured seconds, after the warm-up (default: %(default)s)")
    p.add_argument("--warmup", type=_non_negative_float, default=1.0, metavar="S",
                   help="seconds of load before measuring; not counted (default: %(default)s)")
    p.add_argument("--rate", type=_positive(float), default=None, metavar="R",
                   help="open loop: send R requests/s on a fixed schedule, latency measured from each request's "
                        "intended send time (default: closed loop)")
    p.add_argument("--processes", type=_positive(int), default=1, metavar="P",
                   help="client processes sharing the load, for when one Python process saturates "
                        "(default: %(default)s)")
    p.add_argument("--timeout", type=_positive(float), default=30.0, metavar="S",
                   help="deadline of each request in seconds (default: %(default)s)")
    p.add_argument("--json", metavar="FILE", help="write the summary and the run's parameters as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write latency over time and a histogram (needs matplotlib)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input and weights (default: 0)")
    p.add_argument("--keep-model", action="store_true",
                   help="with --layer: leave the generated model registered after the run")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def parse_args(argv=None):
    """Parse and cross-check the command line (``argv`` without the program name; None: ``sys.argv[1:]``).

    Returns
    -------
    argparse.Namespace
        As :func:`build_parser` defines, with ``dtype`` resolved for ``--layer``.

    Raises
    ------
    SystemExit
        With status 2 and a usage message, as argparse does, for any bad or inconsistent flag.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.layer is not None:
        layer = args.layer
        if len(args.input) != len(layer.kernel_size) + 2:
            parser.error(f"--input {'x'.join(map(str, args.input))} has rank {len(args.input)}, the "
                         f"{len(layer.kernel_size)}-D layer needs rank {len(layer.kernel_size) + 2}")
        if args.input[1] != layer.in_channels:
            parser.error(f"--input has {args.input[1]} channels (dim 1), the layer expects CIN={layer.in_channels}")
        try:
            layer_output_shape(args.input, layer.kernel_shape, **{k: v for k, v in layer.layer_options().items()
                                                                   if k != "activation"})
        except ValueError as exc:
            parser.error(f"--layer {layer.describe()!r} on --input {'x'.join(map(str, args.input))}: {exc}")
        if args.dtype is None:
            args.dtype = "float32"
    if args.processes > args.concurrency:
        parser.error(f"--processes {args.processes} is more than --concurrency {args.concurrency}: every process "
                     f"needs at least one request in flight")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib, which is not installed: python3 -m pip install matplotlib "
                     "(or the package's [plot] extra)")
    return args
