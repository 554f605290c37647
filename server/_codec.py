"""protobuf <-> domain for the server: what the servicers and the repository file format use to turn messages into
plain values (arrays, `Layer`, convcore keywords) and domain results back into messages.

The wire details both sides share (dtype tables, LayerSpec <-> keywords, the zero-copy codecs of the hot RPCs) are
in `client.wire`; this module adds what only the server needs. Every refusal names the request field, the value
given and what was expected; convcore then checks the values themselves with messages of its own.
"""
import platform

from client import wire
from convproto.convservice.v1 import conv_pb2

from ._errors import InvalidArgument
from ._model import Layer

__all__ = ["INPUT_MISALIGNED", "decode_batching", "decode_model_file", "decode_registration", "encode_model",
           "input_array", "model_info", "required_tensor", "optional_tensor"]

#: What `wire.tensor_array` does with an input tensor (the array the convolution reads, not weights) whose bytes do
#: not start at a multiple of the item size: a protobuf-built request puts the payload wherever the fields before it
#: end (the benchmark's KServe request at offset 39, its InferRequest at 30; tritonclient's alike), and aligning it
#: cost a copy of the whole input per call (medium 0.10-0.12 ms of a ~3.5 ms call; BENCHMARKS.md, "Serving path").
#: "view" on x86-64: there a misaligned load is architecturally fine for every instruction that does not demand
#: alignment, and convcore's compiled kernels use none that do on the input: a scan of both builds of
#: convcore/_kernels (-march=native and CONVCORE_NO_NATIVE=1) found aligned vector accesses only on the stack, on
#: constants and in the depthwise kernel's non-temporal output stores (which test the address first), every input
#: read being an unaligned-load form; the depthwise NHWC kernel peels for alignment only when the address is a
#: multiple of the item size. scripts/check_misaligned_reads.py repeats that scan, and
#: tests/test_misaligned_inputs.py runs every engine path on inputs at byte offsets 1-7 (an aligned load there
#: would fault at once). Elsewhere "copy", until checked likewise.
INPUT_MISALIGNED = "view" if platform.machine().lower() in ("x86_64", "amd64") else "copy"


def input_array(field, dtype, shape, data):
    """The bytes of a compute input as a read-only array (a view, misaligned or not where `INPUT_MISALIGNED` says
    so); ValueError naming `field` for a shape and byte count that do not match."""
    return wire.tensor_array(field, dtype, shape, data, INPUT_MISALIGNED)


def required_tensor(field, view, misaligned="copy"):
    """A TensorView (or None when the field was unset) as a read-only array; InvalidArgument naming `field`.
    `misaligned` as in `wire.tensor_array` (`INPUT_MISALIGNED` for the tensor a convolution reads)."""
    if view is None:
        raise InvalidArgument(f"{field} is missing: a Tensor with dtype, shape and data is required")
    return wire.decode_tensor(field, view, misaligned)


def optional_tensor(field, view):
    return None if view is None else wire.decode_tensor(field, view)


def decode_batching(request):
    """The `batching` of a RegisterModelRequest as a dict with Triton's names, or None when unset (batching off)."""
    return wire.batching_dict(request.batching) if request.HasField("batching") else None


def decode_registration(request):
    """A RegisterModelRequest message as (name, list of `Layer`); tensors are views of the message's bytes."""
    layers = []
    for i, msg in enumerate(request.layers):
        field = f"layers[{i}]"
        if not msg.HasField("kernel"):
            raise InvalidArgument(f"{field}.kernel is missing: every layer needs a kernel")
        kernel = wire.decode_tensor(f"{field}.kernel", msg.kernel)
        bias = wire.decode_tensor(f"{field}.bias", msg.bias) if msg.HasField("bias") else None
        layers.append(Layer(kernel, bias, wire.spec_kwargs(msg.spec, f"{field}.spec")))
    return request.name, layers


def decode_model_file(payload):
    """The payload of a repository file (a serialized RegisterModelRequest) as (name, list of `Layer`, batching)."""
    request = conv_pb2.RegisterModelRequest.FromString(payload)
    return (*decode_registration(request), decode_batching(request))


def encode_model(model):
    """A model as the deterministic bytes of its RegisterModelRequest: the repository's file payload, and what two
    registrations are compared by (equal bytes = the same model)."""
    return wire.encode_registration(model.name, [(layer.kernel, layer.bias, layer.options) for layer in model.layers],
                                    model.batching_request)


def model_info(model):
    """A model as a `ModelInfo` message (specs and shapes, not weights)."""
    return conv_pb2.ModelInfo(
        name=model.name, dtype=wire.WIRE_DTYPE[model.dtype.newbyteorder("=")], input_channels=model.in_channels,
        output_channels=model.out_channels, spatial_dims=model.nsp, channels_last=model.channels_last,
        layers=[conv_pb2.ModelInfo.LayerInfo(spec=wire.spec_message(**layer.options), kernel_shape=layer.kernel.shape,
                                             has_bias=layer.bias is not None) for layer in model.layers],
        batching=_batching_message(model.batching))


def _batching_message(config):
    """The batching settings in force (a `BatchingConfig`, server defaults filled in) as a message, or None."""
    if config is None:
        return None
    return conv_pb2.DynamicBatching(max_batch_size=config.max_batch_size,
                                    preferred_batch_size=config.preferred_batch_size,
                                    max_queue_delay_microseconds=config.max_queue_delay_microseconds)
