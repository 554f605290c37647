"""convservice.v1.ConvService: decode into plain values, call `InferenceService`, encode its result; nothing else.

Infer and Conv use `client.wire`'s codecs instead of the generated classes: the request's tensor bytes reach the
engine as views of what gRPC received, and the answer is computed into the response message's own bytes, which
the handler returns as they are (no response serializer). The other RPCs use the generated messages.

Errors are raised, never turned into status codes here (see server._handlers, which maps them with
_errors.status_for).
"""
import grpc
from google.protobuf import message_factory

from client import wire
from convproto.convservice.v1 import conv_pb2

from ._codec import INPUT_MISALIGNED, decode_batching, decode_registration, model_info, optional_tensor, required_tensor

__all__ = ["ConvServicer", "OutputSink", "add_service"]


class OutputSink:
    """``output(shape, dtype)`` for `InferenceService`: hands out the payload of a response message built by
    `make(shape, dtype)` (a `client.wire.MessageBuffer` factory); `finish()` is the message bytes."""

    __slots__ = ("_make", "_buffer")

    def __init__(self, make):
        self._make = make
        self._buffer = None

    def __call__(self, shape, dtype):
        self._buffer = self._make(shape, dtype)
        return self._buffer.array

    def finish(self):
        return self._buffer.finish()


_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_service(server, service, servicer, codecs=None, wrap=None):
    """Register `servicer`'s methods for the protobuf `service` descriptor on `server`.

    `codecs` maps a method name to its (request deserializer, response serializer); the others use the generated
    message classes. ``wrap(full_method, handler)`` (`server._handlers.MethodWrapper.wrap`) adds the per-call
    concerns to each handler, once. Same handlers as the generated ``add_*Servicer_to_server``, with these swapped in.
    """
    codecs = codecs or {}
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        deserialize, serialize = codecs.get(method.name, (request_class.FromString, response_class.SerializeToString))
        kind = _KINDS[(method.client_streaming, method.server_streaming)]
        handler = kind(getattr(servicer, method.name), request_deserializer=deserialize,
                       response_serializer=serialize)
        handlers[method.name] = wrap(f"/{service.full_name}/{method.name}", handler) if wrap else handler
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


class ConvServicer:
    """Our own API: one-off convolutions and registered models.

    Parameters
    ----------
    service : InferenceService
    """

    SERVICE = conv_pb2.DESCRIPTOR.services_by_name["ConvService"]

    def __init__(self, service):
        self._service = service

    def add_to_server(self, server, wrap=None):
        # Looked up now, not at import, so that scripts/request_breakdown.py can time them.
        add_service(server, self.SERVICE, self, {"Infer": (wire.decode_infer_request, None),
                                                 "Conv": (wire.decode_conv_request, None)}, wrap)

    def Conv(self, call, context):
        x = required_tensor("input", call.input, INPUT_MISALIGNED)
        kernel = required_tensor("kernel", call.kernel)
        bias = optional_tensor("bias", call.bias)
        options = wire.spec_kwargs(call.spec, "spec")
        output = OutputSink(wire.tensor_response)
        self._service.conv(context, x, kernel, bias, options, output)
        return output.finish()

    def Infer(self, call, context):
        x = required_tensor("input", call.input, INPUT_MISALIGNED)
        output = OutputSink(wire.tensor_response)
        self._service.infer(context, self._service.model(call.name), x, output)
        return output.finish()

    def RegisterModel(self, request, context):
        self._service.check_layer_count(len(request.layers))
        model = self._service.register(*decode_registration(request), decode_batching(request))
        return conv_pb2.RegisterModelResponse(model=model_info(model))

    def ListModels(self, request, context):
        return conv_pb2.ListModelsResponse(models=[model_info(m) for m in self._service.models()])

    def GetModel(self, request, context):
        return conv_pb2.GetModelResponse(model=model_info(self._service.model(request.name)))

    def DeleteModel(self, request, context):
        self._service.delete(request.name)
        return conv_pb2.DeleteModelResponse()
