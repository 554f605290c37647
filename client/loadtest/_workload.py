"""What a run sends: the model (registered for the run from ``--layer``, or an existing one), its FLOPs, a probe call.

Registration fans out: with several replicas behind one target (a list, or a ``dns:///`` name resolving to several
addresses), a ``round_robin`` channel would send ``RegisterModel`` to just one of them, and the other replicas would
answer ``NOT_FOUND`` until they pick the model up from a shared repository, if they share one at all. So the harness
registers (and later deletes) the model on every address it can resolve, which is correct either way: registering
replaces a model of the same name.
"""
import socket
import sys
import uuid
from dataclasses import dataclass

import grpc
import numpy as np

from client import ConvClient, ConvError

from ._flops import model_flops

__all__ = ["Workload", "cleanup", "expand_targets", "prepare"]


@dataclass
class Workload:
    """The model a run calls and what one call costs.

    Attributes
    ----------
    model : str
    dtype : str
    input_shape, output_shape : tuple of int
    flops : int or None
        Per request (None if the model's layers could not be read).
    layers : list of dict
        The model's layers as ``{kernel_shape, strides, padding, ...}``, for the report.
    created_on : list of str
        Addresses the harness registered the model on (to delete it there afterwards); empty for ``--model``.
    """
    model: str
    dtype: str
    input_shape: tuple
    output_shape: tuple
    flops: object
    layers: list
    created_on: list


def expand_targets(target):
    """Every server address behind ``target``, for calls that must reach each replica.

    ``HOST:PORT`` entries are kept as they are; a ``dns:///NAME:PORT`` entry becomes one ``IP:PORT`` per address
    ``NAME`` resolves to (the same set gRPC's DNS resolver balances over); other URIs are kept as they are.

    Parameters
    ----------
    target : str
        ``--target``, comma-separated.

    Returns
    -------
    list of str

    Raises
    ------
    ConvError
        UNAVAILABLE if a ``dns:`` name does not resolve.
    """
    out = []
    for entry in (t.strip() for t in target.split(",")):
        if entry.startswith("dns:"):
            hostport = entry[4:].lstrip("/")
            if "/" in hostport:  # dns://AUTHORITY/NAME:PORT: the authority names a DNS server we do not use
                hostport = hostport.split("/", 1)[1]
            host, _, port = hostport.rpartition(":")
            host = host.strip("[]")
            try:
                infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise ConvError(grpc.StatusCode.UNAVAILABLE, f"target {entry!r}: cannot resolve {host!r} ({exc})") \
                    from None
            addrs = sorted({info[4][0] for info in infos})
            out += [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addrs]
        else:
            out.append(entry)
    return list(dict.fromkeys(out))


def _layer_dicts(layer, dtype, seed):
    """``register_model`` layer dicts for a ``--layer`` (He-scaled random weights, so activations stay finite)."""
    rng = np.random.default_rng(seed + 1)
    fan_in = (layer.in_channels // layer.groups) * int(np.prod(layer.kernel_size))
    kernel = (rng.standard_normal(layer.kernel_shape) * np.sqrt(2.0 / fan_in)).astype(dtype)
    entry = {"kernel": kernel, **layer.layer_options()}
    if layer.bias:
        entry["bias"] = (0.01 * rng.standard_normal(layer.out_channels)).astype(dtype)
    return [entry]


_LAYER_OPTIONS = ("strides", "padding", "dilation", "groups", "data_format", "kernel_layout")


def model_layers(info):
    """The layers of a ``ConvClient.get_model`` answer, as dicts for :func:`~client.loadtest._flops.model_flops`.

    Parameters
    ----------
    info : dict
        ``get_model``'s dict: ``layers`` holds, per layer, ``kernel_shape`` and the convcore options.

    Returns
    -------
    list of dict
        ``kernel_shape`` (tuple) and the geometry options (activation and bias do not change the FLOP count).
    """
    return [{"kernel_shape": tuple(int(k) for k in layer["kernel_shape"]),
             **{k: layer[k] for k in _LAYER_OPTIONS if layer.get(k) is not None}}
            for layer in info.get("layers", [])]


def prepare(args, log=sys.stderr):
    """Get the run's model ready: register ``--layer`` on every replica, read the model, probe it once.

    Parameters
    ----------
    args : argparse.Namespace
        From :func:`~client.loadtest._args.parse_args`.
    log : file
        Where to say what is being done.

    Returns
    -------
    Workload

    Raises
    ------
    ConvError
        If registering, reading or probing the model fails (for example NOT_FOUND for an unknown ``--model``).
    """
    created_on = []
    if args.layer is not None:
        name = f"loadtest-{uuid.uuid4().hex[:10]}"
        layers = _layer_dicts(args.layer, args.dtype, args.seed)
        addresses = expand_targets(args.target)
        unreachable = []
        for address in addresses:
            try:
                with ConvClient(address, timeout=max(args.timeout, 30.0)) as c:
                    c.register_model(name, layers)
            except ConvError as exc:
                # An address nobody listens on (say ::1 of "localhost" for a server on 127.0.0.1) gets no calls
                # from round_robin either; any other failure is the server refusing the layer: stop there.
                if exc.code != grpc.StatusCode.UNAVAILABLE or (address == addresses[-1] and not created_on):
                    cleanup(Workload(name, args.dtype, args.input, None, None, [], created_on), log=log)
                    raise
                unreachable.append(address)
                continue
            created_on.append(address)
        print(f"loadtest: registered model {name!r} ({args.layer.describe()}) on {len(created_on)} server(s)"
              + (f"; unreachable, skipped: {', '.join(unreachable)}" if unreachable else ""), file=log)
    else:
        name = args.model
    try:
        with ConvClient(args.target, timeout=max(args.timeout, 30.0)) as c:
            info = c.get_model(name)
            dtype = args.dtype or info.get("dtype") or "float32"
            layers = model_layers(info)
            try:
                flops, out_shape = model_flops(args.input, layers) if layers else (None, None)
            except (ValueError, TypeError, KeyError) as exc:
                print(f"loadtest: cannot count the model's FLOPs ({exc}); GFLOP/s will not be reported", file=log)
                flops, out_shape = None, None
            # One call before the clock starts: a wrong input shape or dtype fails here with the server's message,
            # not as a run of 100% errors.
            x = np.random.default_rng(args.seed).standard_normal(args.input).astype(dtype)
            y = c.infer(name, x)
    except BaseException:
        cleanup(Workload(name, args.dtype, args.input, None, None, [], created_on), log=log)
        raise
    if out_shape is not None and tuple(y.shape) != tuple(out_shape):
        print(f"loadtest: warning: the server returned shape {tuple(y.shape)}, the model's specs give "
              f"{tuple(out_shape)}; GFLOP/s may be wrong", file=log)
    return Workload(model=name, dtype=dtype, input_shape=tuple(args.input), output_shape=tuple(y.shape),
                    flops=flops, layers=layers, created_on=created_on)


def cleanup(workload, log=sys.stderr):
    """Delete a model the harness registered, on every server it registered it on (NOT_FOUND is fine there:
    replicas sharing one repository may have deleted it already)."""
    for address in workload.created_on:
        try:
            with ConvClient(address, timeout=10.0) as c:
                c.delete_model(workload.model)
        except ConvError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                print(f"loadtest: could not delete model {workload.model!r} on {address}: {exc}", file=log)
