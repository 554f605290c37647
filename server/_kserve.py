"""inference.GRPCInferenceService: the Open Inference Protocol (KServe v2) plus Triton's extensions ModelConfig,
ModelStatistics, RepositoryIndex and system shared memory.

Each registered model appears with one input "input" and one output "output", FP32 or FP64, batching allowed
(max_batch_size > 0) and shapes [-1, C, -1, ...] (channels_first) or [-1, ..., -1, C] (channels_last), so Triton's
clients and `perf_analyzer -b N --shape input:...` work unchanged. Every model has the single version "1".

Shared memory (Triton's parameters): an input carrying ``shared_memory_region`` / ``shared_memory_byte_size`` /
``shared_memory_offset`` is read from that registered region instead of ``raw_input_contents``; a requested output
carrying them is written into that region (and nothing is sent for it in the response but its shape).
"""
import contextlib
import math
import os
import time

import grpc
import numpy as np

from client import wire
from convproto.inference import grpc_service_pb2 as pb, model_config_pb2 as mc

from ._codec import input_array
from ._errors import InvalidArgument, ModelNotFound
from ._servicer import OutputSink, add_service
from ._shm import SharedMemoryError

__all__ = ["KServeServicer", "SERVER_NAME"]

SERVER_NAME = "convcore-service"
VERSION = "1"
INPUT, OUTPUT = "input", "output"
#: Only what is implemented. Not "model_repository": of it only RepositoryIndex is (no load/unload).
EXTENSIONS = ("model_configuration", "statistics")
SHM_EXTENSION = "system_shared_memory"
_SHM_KEYS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_SHM_OFF = "the system shared-memory extension is off on this server (started with --no-shared-memory)"
_CONFIG_TYPE = {"FP32": mc.TYPE_FP32, "FP64": mc.TYPE_FP64}
_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents"}


def _max_batch(model, server_max):
    return model.batching.max_batch_size if model.batching is not None else server_max


def _shm_params(field, parameters):
    """(region, byte_size, offset) from a tensor's parameters, or None when it names no region."""
    if not any(k in parameters for k in _SHM_KEYS):
        return None

    def get(key, kind, required):
        if key not in parameters:
            if required:
                raise InvalidArgument(f"{field}.parameters has {sorted(k for k in _SHM_KEYS if k in parameters)} "
                                      f"but not {key!r}: a shared-memory tensor needs shared_memory_region and "
                                      f"shared_memory_byte_size")
            return 0
        value = parameters[key]
        choice = value.WhichOneof("parameter_choice")
        if kind == "string":
            if choice != "string_param":
                raise InvalidArgument(f"{field}.parameters[{key!r}] must be a string_param, got {choice}")
            return value.string_param
        if choice not in ("int64_param", "uint64_param"):
            raise InvalidArgument(f"{field}.parameters[{key!r}] must be an int64_param, got {choice}")
        number = getattr(value, choice)
        if number < 0:
            raise InvalidArgument(f"{field}.parameters[{key!r}] must be >= 0, got {number}")
        return number

    return (get("shared_memory_region", "string", True), get("shared_memory_byte_size", "int", True),
            get("shared_memory_offset", "int", False))


def _input(call, model, max_batch, shared_memory=None, held=None):
    """The request's single input as an array: a view of raw_input_contents[0] (even at an odd offset, see
    `_codec.INPUT_MISALIGNED`), one copy of typed contents, or a view of a shared-memory region (held open in the
    ExitStack `held` for the rest of the call).

    Raises InvalidArgument naming the field for anything the model cannot take. Returns (array, seconds spent
    getting it out of shared memory, the region's access or None).
    """
    request = call.message
    datatype = wire.kserve_datatype(model.dtype)
    inputs = request.inputs
    if len(inputs) != 1 or inputs[0].name != INPUT:
        raise InvalidArgument(f"inputs must hold exactly one tensor named {INPUT!r} (model {model.name!r}), "
                              f"got {[t.name for t in inputs]}")
    tensor = inputs[0]
    if tensor.datatype != datatype:
        raise InvalidArgument(f"inputs[0].datatype must be {datatype!r} for model {model.name!r}, "
                              f"got {tensor.datatype!r}")
    shape = tuple(tensor.shape)
    if len(shape) != model.nsp + 2:
        raise InvalidArgument(f"inputs[0].shape must have {model.nsp + 2} dims (batch first, then "
                              f"{model.dims(model.in_channels)}), got {list(shape)}")
    if shape[0] > max_batch:
        raise InvalidArgument(f"inputs[0].shape has batch {shape[0]}, over the model's max_batch_size "
                              f"{max_batch}")
    dtype = wire.KSERVE_DTYPES[datatype]
    shm = _shm_params("inputs[0]", tensor.parameters)
    if shm is not None:
        if shared_memory is None:
            raise InvalidArgument(f"inputs[0] names a shared-memory region, but {_SHM_OFF}")
        if call.raw or tensor.HasField("contents"):
            raise InvalidArgument("inputs[0] is in shared memory: raw_input_contents and contents must be empty")
        if any(d < 1 for d in shape):
            raise InvalidArgument(f"inputs[0].shape must hold positive sizes, got {list(shape)}")
        started = time.perf_counter()
        region, byte_size, offset = shm
        access = held.enter_context(shared_memory.use(region))
        x = access.input(offset, byte_size, dtype, shape)  # in place in the mapping (a copy only as a fallback)
        return x, time.perf_counter() - started, access
    if call.raw:
        if len(call.raw) != len(request.inputs):
            raise InvalidArgument(f"raw_input_contents must hold one entry per input ({len(request.inputs)}), "
                                  f"got {len(call.raw)}")
        return input_array("raw_input_contents[0]", dtype, shape, call.raw[0]), 0.0, None
    field = _CONTENTS[datatype]
    values = np.array(getattr(tensor.contents, field), dtype=dtype)  # the one copy typed contents need
    return wire.tensor_array(f"inputs[0].contents.{field}", dtype, shape, values.data), 0.0, None


class KServeServicer:
    """KServe v2 / Triton view of the registered models.

    Parameters
    ----------
    service : InferenceService
    max_batch_size : int
        Advertised in ModelConfig and enforced on ModelInfer.
    version : str
        Server version reported by ServerMetadata.
    is_ready : callable
        Returns False once the server is shutting down.
    shared_memory : SharedMemoryRegistry or None
        The registered system shared-memory regions; None when the extension is off.
    """

    SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]

    def __init__(self, service, max_batch_size, version, is_ready, shared_memory=None):
        self._service = service
        self._max_batch = max_batch_size
        self._version = version
        self._is_ready = is_ready
        self._shm = shared_memory
        self._extensions = EXTENSIONS + ((SHM_EXTENSION,) if shared_memory is not None else ())

    def add_to_server(self, server, wrap=None):
        add_service(server, self.SERVICE, self, {"ModelInfer": (wire.decode_model_infer_request, None)}, wrap)

    def _model(self, name, version):
        model = self._service.model(name)
        if version not in ("", VERSION):
            raise ModelNotFound(name, f"model {name!r} has no version {version!r} (the only version is {VERSION!r})")
        return model

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=bool(self._is_ready()))

    def ModelReady(self, request, context):
        try:
            self._model(request.name, request.version)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=bool(self._is_ready()))

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=self._extensions)

    def ModelMetadata(self, request, context):
        model = self._model(request.name, request.version)
        meta = pb.ModelMetadataResponse.TensorMetadata
        datatype = wire.kserve_datatype(model.dtype)
        return pb.ModelMetadataResponse(
            name=model.name, versions=[VERSION], platform="convcore",
            inputs=[meta(name=INPUT, datatype=datatype, shape=[-1] + model.dims(model.in_channels))],
            outputs=[meta(name=OUTPUT, datatype=datatype, shape=[-1] + model.dims(model.out_channels))])

    def ModelConfig(self, request, context):
        model = self._model(request.name, request.version)
        dtype = _CONFIG_TYPE[wire.kserve_datatype(model.dtype)]
        fmt = mc.ModelInput.FORMAT_NONE
        if model.nsp == 2:
            fmt = mc.ModelInput.FORMAT_NHWC if model.channels_last else mc.ModelInput.FORMAT_NCHW
        config = mc.ModelConfig(
            name=model.name, platform="convcore", backend="convcore",
            max_batch_size=_max_batch(model, self._max_batch),
            input=[mc.ModelInput(name=INPUT, data_type=dtype, format=fmt, dims=model.dims(model.in_channels))],
            output=[mc.ModelOutput(name=OUTPUT, data_type=dtype, dims=model.dims(model.out_channels))],
            instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)])
        if model.batching is not None:
            config.dynamic_batching.preferred_batch_size.extend(model.batching.preferred_batch_size)
            config.dynamic_batching.max_queue_delay_microseconds = model.batching.max_queue_delay_microseconds
        return pb.ModelConfigResponse(config=config)

    def ModelInfer(self, call, context):
        request = call.message
        model = self._model(request.model_name, request.model_version)
        # Shared-memory regions the call uses stay open (and mapped) until it returns.
        with contextlib.ExitStack() as held:
            x, read_seconds, in_access = _input(call, model, _max_batch(model, self._max_batch), self._shm, held)
            try:
                shm_out = None
                for i, out in enumerate(request.outputs):
                    if out.name != OUTPUT:
                        raise InvalidArgument(f"outputs[{i}].name must be {OUTPUT!r} (model {model.name!r} has one "
                                              f"output), got {out.name!r}")
                    shm_out = _shm_params(f"outputs[{i}]", out.parameters)
                if shm_out is not None:
                    return self._infer_into_shared_memory(context, model, x, request, shm_out, read_seconds, held,
                                                          in_access)
                # One output whether or not the request named it: with no outputs named, all are returned.
                output = OutputSink(lambda shape, dtype: wire.model_infer_response(model.name, VERSION, request.id,
                                                                                   OUTPUT, shape, dtype))
                self._service.infer(context, model, x, output, field=f"inputs[0] ({INPUT!r})",
                                    input_seconds=read_seconds,
                                    after=None if in_access is None else lambda y: in_access.verify("input"))
                return output.finish()
            finally:
                del x  # a view of a mapping must be gone before the region may be unmapped

    def _infer_into_shared_memory(self, context, model, x, request, shm_out, read_seconds, held, in_access):
        """Compute straight into the caller's region (size and bounds checked there), or into a pooled buffer then
        written there when the region cannot be viewed in place."""
        if self._shm is None:
            raise InvalidArgument(f"outputs[0] names a shared-memory region, but {_SHM_OFF}")
        region, byte_size, offset = shm_out
        model.check_input(x, f"inputs[0] ({INPUT!r})")
        shape = self._service.route(model, x.shape).output_shape
        nbytes = math.prod(shape) * model.dtype.itemsize
        if nbytes > byte_size:  # refused before computing, not after
            raise SharedMemoryError(f"output shared_memory_byte_size is {byte_size}, the tensor needs {nbytes} bytes")
        # Held across the call: a region unregistered meanwhile stays open until the call ends (which then fails).
        # The input's access when both are in one region (one size check, one verify).
        same = in_access is not None and in_access.name == region
        access = in_access if same else held.enter_context(self._shm.use(region))
        taken, in_place = [], []

        def output(shape, dtype):
            view = access.output(offset, byte_size, shape, dtype)
            if view is None:
                view = self._service.executor.buffers.take(shape, dtype)
                taken.append(view)
            else:
                in_place.append(view)
            return view

        def after(y):
            if not in_place:
                access.write(offset, byte_size, y)
            if in_access is not None and not same:
                in_access.verify("input")
            access.verify("input and output" if same else "output")

        try:
            out = self._service.infer(context, model, x, output, field=f"inputs[0] ({INPUT!r})", after=after,
                                      input_seconds=read_seconds)
            shape = out.shape
            del out
        finally:
            in_place.clear()
            self._service.executor.buffers.give(taken)
        response = pb.ModelInferResponse(model_name=model.name, model_version=VERSION, id=request.id)
        response.outputs.add(name=OUTPUT, datatype=wire.kserve_datatype(model.dtype), shape=shape)
        # Triton keeps one raw_output_contents entry per output, empty for one in shared memory; its C++ client
        # (perf_analyzer) indexes them by output and crashes without it.
        response.raw_output_contents.append(b"")
        return response.SerializeToString()

    # ------------------------------------------------------------------ statistics, repository index
    def ModelStatistics(self, request, context):
        if request.name:
            names = [self._model(request.name, request.version).name]
        else:
            if request.version not in ("", VERSION):
                raise ModelNotFound("", f"no model has version {request.version!r} (the only version is "
                                        f"{VERSION!r})")
            names = [m.name for m in self._service.models()]
        response = pb.ModelStatisticsResponse()
        for name, snap in self._service.statistics.snapshot(names):
            stats = response.model_stats.add(name=name, version=VERSION, last_inference=snap["last_inference"],
                                              inference_count=snap["inference_count"],
                                              execution_count=snap["execution_count"])
            for field, (count, ns) in snap["inference_stats"].items():
                getattr(stats.inference_stats, field).count = count
                getattr(stats.inference_stats, field).ns = ns
            for size, durations in snap["batch_stats"]:
                batch = stats.batch_stats.add(batch_size=size)
                for field, (count, ns) in durations.items():
                    getattr(batch, field).count = count
                    getattr(batch, field).ns = ns
        return response

    def RepositoryIndex(self, request, context):
        own = os.path.basename(self._service.repository.root)
        if request.repository_name not in ("", own):
            raise ModelNotFound(request.repository_name,
                                f"no model repository {request.repository_name!r}: this server has one, {own!r} "
                                f"(or leave repository_name empty)")
        index = pb.RepositoryIndexResponse()
        ready = bool(self._is_ready())
        for model in self._service.models():
            if ready or not request.ready:
                index.models.add(name=model.name, version=VERSION, state="READY" if ready else "UNAVAILABLE",
                                 reason="" if ready else "the server is shutting down")
        return index

    # ------------------------------------------------------------------ system shared memory
    def _registry(self, context):
        if self._shm is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, _SHM_OFF)
        return self._shm

    def SystemSharedMemoryStatus(self, request, context):
        response = pb.SystemSharedMemoryStatusResponse()
        for name, key, offset, byte_size in self._registry(context).status(request.name):
            response.regions[name].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=name, key=key, offset=offset, byte_size=byte_size))
        return response

    def SystemSharedMemoryRegister(self, request, context):
        self._registry(context).register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    def SystemSharedMemoryUnregister(self, request, context):
        self._registry(context).unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()
