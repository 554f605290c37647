"""convservice.v1.ConvService: protobuf -> arrays -> Engine -> protobuf, and nothing else.

Errors are raised, never turned into status codes here (see _errors.ErrorMappingInterceptor).
"""
from convproto.convservice.v1 import conv_pb2, conv_pb2_grpc

from ._codec import decode_spec, decode_tensor, encode_tensor
from ._errors import InvalidArgument

__all__ = ["ConvServicer"]


def _required_tensor(request, field):
    if not request.HasField(field):
        raise InvalidArgument(f"{field} is missing: a Tensor with dtype, shape and data is required")
    return decode_tensor(field, getattr(request, field))


class ConvServicer(conv_pb2_grpc.ConvServiceServicer):
    """Our own API: one-off convolutions and registered models."""

    def __init__(self, engine):
        self._engine = engine

    def Conv(self, request, context):
        x = _required_tensor(request, "input")
        kernel = _required_tensor(request, "kernel")
        bias = decode_tensor("bias", request.bias) if request.HasField("bias") else None
        options = decode_spec("spec", request.spec)
        data, shape = self._engine.conv(context, x, kernel, bias, options)
        return conv_pb2.ConvResponse(output=encode_tensor(data=data, shape=shape, dtype=x.dtype))

    def RegisterModel(self, request, context):
        model = self._engine.repository.register(request)
        return conv_pb2.RegisterModelResponse(model=model.info())

    def Infer(self, request, context):
        x = _required_tensor(request, "input")
        model, data, shape = self._engine.infer(context, request.name, x)
        return conv_pb2.InferResponse(output=encode_tensor(data=data, shape=shape, dtype=model.dtype))

    def ListModels(self, request, context):
        return conv_pb2.ListModelsResponse(models=[m.info() for m in self._engine.repository.models()])

    def GetModel(self, request, context):
        return conv_pb2.GetModelResponse(model=self._engine.model(request.name).info())

    def DeleteModel(self, request, context):
        self._engine.repository.delete(request.name)
        return conv_pb2.DeleteModelResponse()
