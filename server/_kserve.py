"""inference.GRPCInferenceService: the Open Inference Protocol (KServe v2) plus Triton's ModelConfig.

Each registered model appears with one input "input" and one output "output", FP32 or FP64, batching allowed
(max_batch_size > 0) and shapes [-1, C, -1, ...] (channels_first) or [-1, ..., -1, C] (channels_last), so Triton's
clients and `perf_analyzer -b N --shape input:...` work unchanged. Every model has the single version "1".
"""
import numpy as np

from client import wire
from convproto.inference import grpc_service_pb2 as pb, model_config_pb2 as mc

from ._errors import InvalidArgument, ModelNotFound
from ._servicer import OutputSink, add_service

__all__ = ["KServeServicer", "SERVER_NAME"]

SERVER_NAME = "convcore-service"
VERSION = "1"
INPUT, OUTPUT = "input", "output"
#: Only what is implemented: "statistics" is not advertised because ModelStatistics is not served.
EXTENSIONS = ("model_configuration",)
_CONFIG_TYPE = {"FP32": mc.TYPE_FP32, "FP64": mc.TYPE_FP64}
_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents"}


def _input(call, model, max_batch):
    """The request's single input as an array: a view of raw_input_contents[0], or one copy of typed contents.

    Raises InvalidArgument naming the field for anything the model cannot take.
    """
    request = call.message
    datatype = wire.kserve_datatype(model.dtype)
    names = [t.name for t in request.inputs]
    if names != [INPUT]:
        raise InvalidArgument(f"inputs must hold exactly one tensor named {INPUT!r} (model {model.name!r}), "
                              f"got {names}")
    tensor = request.inputs[0]
    if tensor.datatype != datatype:
        raise InvalidArgument(f"inputs[0].datatype must be {datatype!r} for model {model.name!r}, "
                              f"got {tensor.datatype!r}")
    if len(tensor.shape) != model.nsp + 2:
        raise InvalidArgument(f"inputs[0].shape must have {model.nsp + 2} dims (batch first, then "
                              f"{model.dims(model.in_channels)}), got {list(tensor.shape)}")
    if tensor.shape[0] > max_batch:
        raise InvalidArgument(f"inputs[0].shape has batch {tensor.shape[0]}, over the model's max_batch_size "
                              f"{max_batch}")
    dtype = wire.KSERVE_DTYPES[datatype]
    if call.raw:
        if len(call.raw) != len(request.inputs):
            raise InvalidArgument(f"raw_input_contents must hold one entry per input ({len(request.inputs)}), "
                                  f"got {len(call.raw)}")
        return wire.tensor_array("raw_input_contents[0]", dtype, tensor.shape, call.raw[0])
    field = _CONTENTS[datatype]
    values = np.array(getattr(tensor.contents, field), dtype=dtype)  # the one copy typed contents need
    return wire.tensor_array(f"inputs[0].contents.{field}", dtype, tensor.shape, values.data)


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
    """

    SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]

    def __init__(self, service, max_batch_size, version, is_ready):
        self._service = service
        self._max_batch = max_batch_size
        self._version = version
        self._is_ready = is_ready

    def add_to_server(self, server):
        add_service(server, self.SERVICE, self, {"ModelInfer": (wire.decode_model_infer_request, None)})

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
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=EXTENSIONS)

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
            name=model.name, platform="convcore", backend="convcore", max_batch_size=self._max_batch,
            input=[mc.ModelInput(name=INPUT, data_type=dtype, format=fmt, dims=model.dims(model.in_channels))],
            output=[mc.ModelOutput(name=OUTPUT, data_type=dtype, dims=model.dims(model.out_channels))],
            instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)])
        return pb.ModelConfigResponse(config=config)

    def ModelInfer(self, call, context):
        request = call.message
        model = self._model(request.model_name, request.model_version)
        x = _input(call, model, self._max_batch)
        for i, out in enumerate(request.outputs):
            if out.name != OUTPUT:
                raise InvalidArgument(f"outputs[{i}].name must be {OUTPUT!r} (model {model.name!r} has one output), "
                                      f"got {out.name!r}")
        # One output whether or not the request named it: with no outputs named, all are returned.
        output = OutputSink(lambda shape, dtype: wire.model_infer_response(model.name, VERSION, request.id, OUTPUT,
                                                                           shape, dtype))
        self._service.infer(context, model, x, output, field=f"inputs[0] ({INPUT!r})")
        return output.finish()
