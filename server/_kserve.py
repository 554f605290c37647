"""inference.GRPCInferenceService: the Open Inference Protocol (KServe v2) plus Triton's ModelConfig.

Each registered model appears with one input "input" and one output "output", FP32 or FP64, batching allowed
(max_batch_size > 0) and shapes [-1, C, -1, ...] (channels_first) or [-1, ..., -1, C] (channels_last), so Triton's
clients and `perf_analyzer -b N --shape input:...` work unchanged. Every model has the single version "1".
"""
import numpy as np

from convproto.inference import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc, model_config_pb2 as mc

from ._codec import tensor_array
from ._errors import InvalidArgument, ModelNotFound

__all__ = ["KServeServicer", "SERVER_NAME"]

SERVER_NAME = "convcore-service"
VERSION = "1"
INPUT, OUTPUT = "input", "output"
#: Only what is implemented: "statistics" is not advertised because ModelStatistics is not served.
EXTENSIONS = ("model_configuration",)
_NUMPY = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
_CONFIG_TYPE = {"FP32": mc.TYPE_FP32, "FP64": mc.TYPE_FP64}


def _dims(model, channels):
    """Per-sample dims (no batch) with the channel count fixed and every spatial size variable (-1)."""
    spatial = [-1] * model.nsp
    return spatial + [channels] if model.channels_last else [channels] + spatial


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """KServe v2 / Triton view of the registered models.

    Parameters
    ----------
    engine : Engine
    max_batch_size : int
        Advertised in ModelConfig and enforced on ModelInfer.
    version : str
        Server version reported by ServerMetadata.
    is_ready : callable
        Returns False once the server is shutting down.
    """

    def __init__(self, engine, max_batch_size, version, is_ready):
        self._engine = engine
        self._max_batch = max_batch_size
        self._version = version
        self._is_ready = is_ready

    def _model(self, name, version):
        model = self._engine.model(name)
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
        return pb.ModelMetadataResponse(
            name=model.name, versions=[VERSION], platform="convcore",
            inputs=[meta(name=INPUT, datatype=model.datatype, shape=[-1] + _dims(model, model.in_channels))],
            outputs=[meta(name=OUTPUT, datatype=model.datatype, shape=[-1] + _dims(model, model.out_channels))])

    def ModelConfig(self, request, context):
        model = self._model(request.name, request.version)
        dtype = _CONFIG_TYPE[model.datatype]
        fmt = mc.ModelInput.FORMAT_NONE
        if model.nsp == 2:
            fmt = mc.ModelInput.FORMAT_NHWC if model.channels_last else mc.ModelInput.FORMAT_NCHW
        config = mc.ModelConfig(
            name=model.name, platform="convcore", backend="convcore", max_batch_size=self._max_batch,
            input=[mc.ModelInput(name=INPUT, data_type=dtype, format=fmt, dims=_dims(model, model.in_channels))],
            output=[mc.ModelOutput(name=OUTPUT, data_type=dtype, dims=_dims(model, model.out_channels))],
            instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)])
        return pb.ModelConfigResponse(config=config)

    def ModelInfer(self, request, context):
        model = self._model(request.model_name, request.model_version)
        x = self._input(request, model)
        for i, out in enumerate(request.outputs):
            if out.name != OUTPUT:
                raise InvalidArgument(f"outputs[{i}].name must be {OUTPUT!r} (model {model.name!r} has one output), "
                                      f"got {out.name!r}")
        _, data, shape = self._engine.infer(context, model.name, x, field=f"inputs[0] ({INPUT!r})")
        # One output whether or not the request named it: with no outputs named, all are returned.
        return pb.ModelInferResponse(
            model_name=model.name, model_version=VERSION, id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(name=OUTPUT, datatype=model.datatype, shape=shape)],
            raw_output_contents=[data])

    def _input(self, request, model):
        """The request's single input as an array (no copy from raw_input_contents)."""
        names = [t.name for t in request.inputs]
        if names != [INPUT]:
            raise InvalidArgument(f"inputs must hold exactly one tensor named {INPUT!r} (model {model.name!r}), "
                                  f"got {names}")
        tensor = request.inputs[0]
        if tensor.datatype != model.datatype:
            raise InvalidArgument(f"inputs[0].datatype must be {model.datatype!r} for model {model.name!r}, "
                                  f"got {tensor.datatype!r}")
        if len(tensor.shape) != model.nsp + 2:
            raise InvalidArgument(f"inputs[0].shape must have {model.nsp + 2} dims (batch first, then "
                                  f"{_dims(model, model.in_channels)}), got {list(tensor.shape)}")
        if tensor.shape[0] > self._max_batch:
            raise InvalidArgument(f"inputs[0].shape has batch {tensor.shape[0]}, over the model's max_batch_size "
                                  f"{self._max_batch}")
        dtype = _NUMPY[model.datatype]
        if request.raw_input_contents:
            if len(request.raw_input_contents) != len(request.inputs):
                raise InvalidArgument(f"raw_input_contents must hold one entry per input ({len(request.inputs)}), "
                                      f"got {len(request.raw_input_contents)}")
            return tensor_array("raw_input_contents[0]", dtype, tensor.shape, request.raw_input_contents[0])
        values = tensor.contents.fp32_contents if model.datatype == "FP32" else tensor.contents.fp64_contents
        data = np.asarray(values, dtype=dtype).tobytes()
        field = "inputs[0].contents." + ("fp32_contents" if model.datatype == "FP32" else "fp64_contents")
        return tensor_array(field, dtype, tensor.shape, data)
