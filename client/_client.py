"""ConvClient (blocking) and AsyncConvClient (grpc.aio): one set of methods, two ways to make the call."""
import functools

import grpc
from grpc_health.v1 import health_pb2_grpc

from convproto.convservice.v1 import conv_pb2_grpc
from convproto.inference import grpc_service_pb2_grpc

from . import _ops, _shm, wire
from ._channel import DEFAULT_MAX_MESSAGE_MB, DEFAULT_RETRY_ATTEMPTS, ChannelSettings
from ._errors import from_rpc_error

__all__ = ["ConvClient", "AsyncConvClient"]


class _ClientMethods:
    """The public methods, written once. Each builds an `_ops.Op` and hands it to `self._call`, which the blocking
    client runs to a value and the async client turns into an awaitable."""

    def conv(self, x, kernel, bias=None, *, strides=1, padding="valid", dilation=1, groups=1,
             data_format="channels_first", kernel_layout=None, activation=None):
        """Convolve on the server, with the semantics of ``convcore.conv``.

        Parameters
        ----------
        x : numpy.ndarray
            float32 or float64, rank 3/4/5 (batch, channels, spatial dims in `data_format` order). Any strides.
        kernel : numpy.ndarray
            Same dtype as `x`, in `kernel_layout` (default OI* for channels_first, *IO for channels_last).
        bias : numpy.ndarray, optional
            One value per output channel.
        strides, dilation : int or sequence of int
        padding : str, int, sequence of int or sequence of (begin, end) pairs
            "valid", "same", "causal" (1-D), symmetric amounts, or explicit pairs.
        groups : int
        data_format : str
            "channels_first"/"channels_last" or "NCW", "NCHW", "NCDHW", "NWC", "NHWC", "NDHWC".
        kernel_layout : str, optional
            "OIW"/"OIHW"/"OIDHW" or "WIO"/"HWIO"/"DHWIO".
        activation : str, optional
            None/"linear", "relu", "relu6", "sigmoid", "tanh", ...

        Returns
        -------
        numpy.ndarray
            The output, with the dtype of `x`: a read-only view of the received bytes (``.copy()`` to modify it).

        Raises
        ------
        ConvError
            With ``.code`` INVALID_ARGUMENT for a bad option or tensor (the message names it), RESOURCE_EXHAUSTED
            over a message limit, DEADLINE_EXCEEDED past the timeout, UNAVAILABLE if no server answers.
        """
        options = dict(strides=strides, padding=padding, dilation=dilation, groups=groups, data_format=data_format,
                       kernel_layout=kernel_layout, activation=activation)
        return self._call(_ops.conv(x, kernel, bias, options))

    def _conv_rank(self, rank, x, kernel, bias, options):
        return self._call(_ops.conv(x, kernel, bias, options, rank=rank))

    def conv1d(self, x, kernel, bias=None, *, strides=1, padding="valid", dilation=1, groups=1,
               data_format="channels_first", kernel_layout=None, activation=None):
        """`conv` for rank-3 inputs (batch, channels, width); a ConvError if `x` has another rank."""
        return self._conv_rank(3, x, kernel, bias, dict(
            strides=strides, padding=padding, dilation=dilation, groups=groups, data_format=data_format,
            kernel_layout=kernel_layout, activation=activation))

    def conv2d(self, x, kernel, bias=None, *, strides=1, padding="valid", dilation=1, groups=1,
               data_format="channels_first", kernel_layout=None, activation=None):
        """`conv` for rank-4 inputs (NCHW or NHWC); a ConvError if `x` has another rank."""
        return self._conv_rank(4, x, kernel, bias, dict(
            strides=strides, padding=padding, dilation=dilation, groups=groups, data_format=data_format,
            kernel_layout=kernel_layout, activation=activation))

    def conv3d(self, x, kernel, bias=None, *, strides=1, padding="valid", dilation=1, groups=1,
               data_format="channels_first", kernel_layout=None, activation=None):
        """`conv` for rank-5 inputs (NCDHW or NDHWC); a ConvError if `x` has another rank."""
        return self._conv_rank(5, x, kernel, bias, dict(
            strides=strides, padding=padding, dilation=dilation, groups=groups, data_format=data_format,
            kernel_layout=kernel_layout, activation=activation))

    def register_model(self, name, layers, batching=None):
        """Store a model on the server: a stack of conv layers run in order, each output feeding the next.

        Parameters
        ----------
        name : str
            Letters, digits, '.', '_', '-' (at most 128, not starting with '.'). A taken name is ALREADY_EXISTS
            unless the model is identical (a no-op); delete the model first to replace it.
        layers : list of dict
            Each with "kernel" and optionally "bias", "strides", "padding", "dilation", "groups", "data_format",
            "kernel_layout", "activation" (as in `conv`). All layers share one dtype, rank and channel axis.
        batching : dict, optional
            Turn on dynamic batching for this model, with Triton's names: ``max_batch_size``,
            ``preferred_batch_size`` (list), ``max_queue_delay_microseconds``; a key left out takes the server's
            default (``{}``: all defaults). Concurrent requests with the same non-batch shape are then computed as
            one batch and each caller gets its own rows. None (default): every request is computed alone.

        Returns
        -------
        dict
            The model as the server sees it (see `get_model`).

        Raises
        ------
        ConvError
            INVALID_ARGUMENT naming the layer and field for a bad layer or channels that do not chain.
        """
        return self._call(_ops.register_model(name, layers, batching))

    def infer(self, name, x, shared_memory=None):
        """Run registered model `name` on `x`: every layer on the server, only `x` and the output on the wire.

        Parameters
        ----------
        name : str
        x : numpy.ndarray
            The model's dtype, rank and input channels; any batch and spatial size the layers accept; any strides.
        shared_memory : SharedMemoryRegion, optional
            A region from `shared_memory` (same host as the server): `x` is written into it and the server writes
            the output right after it, so neither tensor travels over gRPC (Triton's system shared memory).

        Returns
        -------
        numpy.ndarray
            The last layer's output: a read-only view of the received bytes, or of the region (valid until the
            region is used again or closed; ``.copy()`` to keep it).

        Raises
        ------
        ConvError
            NOT_FOUND for an unknown model, INVALID_ARGUMENT for an input the model cannot take (or that leaves no
            room for the output in the region).
        """
        if shared_memory is not None:
            return self._call(_shm.infer_op(name, x, shared_memory))
        return self._call(_ops.infer(name, x))

    def shared_memory(self, nbytes):
        """A POSIX shared-memory region for `infer` with a server on this host, registered for the ``with`` block.

        ``with client.shared_memory(nbytes) as region: y = client.infer(name, x, shared_memory=region)``
        (``async with`` on AsyncConvClient). The region must hold the input and the output (plus 64 bytes);
        it is unregistered on the server and unlinked here when the block ends.

        Parameters
        ----------
        nbytes : int

        Returns
        -------
        SharedMemoryContext
            Its ``with`` value is the `client._shm.SharedMemoryRegion`.

        Raises
        ------
        ConvError
            UNIMPLEMENTED from a server started with --no-shared-memory; INVALID_ARGUMENT if the server cannot
            open the region (it is not on this host).
        """
        return _shm.SharedMemoryContext(self, nbytes)

    def list_models(self):
        """The registered models.

        Returns
        -------
        list of str
            Their names, sorted.
        """
        return self._call(_ops.list_models())

    def get_model(self, name):
        """Describe a registered model (its specs and shapes, not its weights).

        Parameters
        ----------
        name : str

        Returns
        -------
        dict
            ``name``, ``dtype``, ``input_channels``, ``output_channels``, ``spatial_dims``, ``data_format`` and
            ``layers``: per layer ``kernel_shape``, ``bias`` (bool) and its `conv` options; ``batching``: the
            dynamic-batching settings in force (``max_batch_size``, ``preferred_batch_size``,
            ``max_queue_delay_microseconds``, the server's defaults filled in), or None.

        Raises
        ------
        ConvError
            NOT_FOUND for an unknown model.
        """
        return self._call(_ops.get_model(name))

    def delete_model(self, name):
        """Remove model `name` from the server, from memory and from its repository on disk.

        Parameters
        ----------
        name : str

        Raises
        ------
        ConvError
            NOT_FOUND if there is no such model.
        """
        return self._call(_ops.delete_model(name))

    def health(self):
        """Ask the standard gRPC health service (``grpc.health.v1``) about the server as a whole.

        Returns
        -------
        bool
            True if it reports SERVING.

        Raises
        ------
        ConvError
            UNAVAILABLE (after retries) if no server answers.
        """
        return self._call(_ops.health())

    def register_onnx(self, name, model):
        """Register an ONNX model that is a chain of convolutions (see `onnx_layers` for what maps).

        Parameters
        ----------
        name : str
            As in `register_model`.
        model : str, os.PathLike, bytes or onnx.ModelProto
            A ``.onnx`` file, its bytes, or a loaded model (read, never changed). Needs the ``[onnx]`` extra.

        Returns
        -------
        dict
            The model as the server sees it (see `get_model`).

        Raises
        ------
        ConvError
            INVALID_ARGUMENT, before anything is sent, naming the node that cannot be mapped (or the extra to
            install); then as `register_model`.
        """
        from ._import_onnx import onnx_layers  # imports onnx only now: an optional extra

        return self.register_model(name, onnx_layers(model))

    def register_torch(self, name, module, example_input=None):
        """Register an ``nn.Sequential``-style PyTorch module of convolutions (see `torch_layers` for what maps).

        Parameters
        ----------
        name : str
            As in `register_model`.
        module : torch.nn.Module
            Read with inference semantics, never changed. Needs the ``[torch]`` extra.
        example_input : torch.Tensor or numpy.ndarray, optional
            If given, the module's forward on it is checked against the mapped layers before sending.

        Returns
        -------
        dict
            The model as the server sees it (see `get_model`).

        Raises
        ------
        ConvError
            INVALID_ARGUMENT, before anything is sent, naming the submodule that cannot be mapped (or the extra to
            install); then as `register_model`.
        """
        from ._import_torch import torch_layers  # imports torch only now: an optional extra

        return self.register_model(name, torch_layers(module, example_input))


class _RawStub:
    """Infer and Conv with `wire`'s codecs: the request is encoded with one copy of the input, and the reply's
    tensor is a view of the received bytes (the generated classes would copy each 2-3 times)."""

    def __init__(self, channel):
        for method in ("Infer", "Conv"):
            setattr(self, method, channel.unary_unary(f"/convservice.v1.ConvService/{method}",
                                                      response_deserializer=wire.decode_tensor_response))


def _stubs(channel):
    return {"conv": conv_pb2_grpc.ConvServiceStub(channel), "health": health_pb2_grpc.HealthStub(channel),
            "raw": _RawStub(channel), "kserve": grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)}


class ConvClient(_ClientMethods):
    """Blocking client of the convolution service.

    Parameters
    ----------
    target : str
        ``"host:port"``, a gRPC URI (``"dns:///host:port"``, ``"ipv4:a:p,b:p"``, ``"unix:path"``) or a comma list
        ``"h1:p1,h2:p2"`` (calls are spread round-robin).
    timeout : float or None
        Deadline of each call, in seconds (None: no deadline).
    max_message_mb : int
        Largest message sent or received (gRPC's default is 4 MiB); the server has its own --max-message-mb.
    root_certificates : bytes or path, optional
        PEM root certificates: connect with TLS, trusting these.
    tls : bool, optional
        Connect with TLS using the system's root certificates (implied by `root_certificates`).
    token : str, optional
        Sent as ``authorization: Bearer <token>`` metadata on every call (a server started with --auth-token
        answers UNAUTHENTICATED without it).
    client_certificate, client_key : bytes or path, optional
        PEM certificate chain and private key presented to a server that requires mutual TLS (--tls-client-ca).
        Both or neither; they imply TLS.
    options : sequence of (str, value), optional
        Extra gRPC channel arguments; they override the defaults (message limits, service config, keepalive).
    retries : int
        Attempts per call while the server is UNAVAILABLE (1: no retry), done by gRPC's retry policy.

    Examples
    --------
    >>> with ConvClient("localhost:50051") as c:          # doctest: +SKIP
    ...     y = c.conv(x, k, padding="same", activation="relu")
    """

    def __init__(self, target, timeout=30.0, *, max_message_mb=DEFAULT_MAX_MESSAGE_MB, root_certificates=None,
                 tls=None, token=None, options=None, retries=DEFAULT_RETRY_ATTEMPTS, client_certificate=None,
                 client_key=None):
        self._settings = ChannelSettings(target, timeout, max_message_mb, root_certificates, tls, token, options,
                                         retries, client_certificate=client_certificate, client_key=client_key)
        self._channel = self._settings.channel()
        self._stubs = _stubs(self._channel)

    @property
    def target(self):
        """The gRPC target the channel connects to."""
        return self._settings.target

    def _call(self, op):
        rpc = getattr(self._stubs[op.stub], op.method)
        try:
            reply = rpc(op.request, timeout=self._settings.timeout, metadata=self._settings.metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err, op.method, self._settings.max_message_mb) from None
        return op.parse(reply)

    def close(self):
        """Close the channel (idempotent)."""
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncConvClient(_ClientMethods):
    """The same client for asyncio (grpc.aio): every method of `ConvClient` is a coroutine here.

    Create it inside a running event loop; close it with ``await client.close()`` or ``async with``.
    Parameters are those of `ConvClient`.
    """

    def __init__(self, target, timeout=30.0, *, max_message_mb=DEFAULT_MAX_MESSAGE_MB, root_certificates=None,
                 tls=None, token=None, options=None, retries=DEFAULT_RETRY_ATTEMPTS, client_certificate=None,
                 client_key=None):
        self._settings = ChannelSettings(target, timeout, max_message_mb, root_certificates, tls, token, options,
                                         retries, client_certificate=client_certificate, client_key=client_key)
        self._channel = self._settings.aio_channel()
        self._stubs = _stubs(self._channel)

    target = ConvClient.target

    async def _call(self, op):
        rpc = getattr(self._stubs[op.stub], op.method)
        try:
            reply = await rpc(op.request, timeout=self._settings.timeout, metadata=self._settings.metadata)
        except grpc.RpcError as err:  # grpc.aio.AioRpcError is one
            raise from_rpc_error(err, op.method, self._settings.max_message_mb) from None
        return op.parse(reply)

    async def close(self):
        """Close the channel (idempotent)."""
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


def _as_coroutine(name):
    method = getattr(_ClientMethods, name)

    @functools.wraps(method)
    async def coroutine(self, *args, **kwargs):
        return await method(self, *args, **kwargs)  # method(...) returns self._call(...), an awaitable here

    coroutine.__doc__ = f"Coroutine version of `ConvClient.{name}`.\n\n" + (method.__doc__ or "")
    return coroutine


# Real coroutine functions (inspect.iscoroutinefunction is True) with the blocking methods' signatures and docs.
for _name in ("conv", "conv1d", "conv2d", "conv3d", "register_model", "infer", "list_models", "get_model",
              "delete_model", "health"):
    setattr(AsyncConvClient, _name, _as_coroutine(_name))
del _name
# The importers (issue 12) map the model on the client, then call register_model: coroutines in the async client too.
for _name in ("register_onnx", "register_torch"):
    setattr(AsyncConvClient, _name, _as_coroutine(_name))
del _name
