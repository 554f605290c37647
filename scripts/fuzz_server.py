#!/usr/bin/env python3
"""Fuzz a running convolution server over gRPC: arbitrary and mutated requests to every RPC (issue 5).

Starts ``python -m server`` on a free loopback port with a model repository in a temporary folder (or attacks
``--target``), then, for ``--duration`` seconds:

* **named cases** first: each hostile request the issue lists (byte lengths that disagree with the shape, shapes whose
  product overflows int64, negative dims, unknown dtypes, empty tensors, NaN/Inf weights, duplicate model names,
  names with path separators or NUL, ...) must get its documented status with a non-empty message;
* then **random cases** until the time is up, to every RPC of ``convservice.v1.ConvService``,
  ``inference.GRPCInferenceService`` and ``grpc.health.v1.Health``: valid requests with random fields overwritten
  (a generic mutator that walks each message's descriptor), serialized requests with flipped/cut/inserted bytes, and
  plain random bytes sent as the raw payload.

Every call must end with a status within its deadline (no hang), and never with INTERNAL or UNKNOWN (undecodable
bytes get INVALID_ARGUMENT: see server._handlers). At the end the server must be alive (health
SERVING and a correct answer from a known model), its RSS must not have grown beyond a generous bound, and nothing
may have been written outside the model repository (its working directory, the parent folder, and files named after
the hostile model names are checked).

Usage::

    python3 scripts/fuzz_server.py --duration 60              # own server; exit 0 on success, 1 on a finding
    python3 scripts/fuzz_server.py --target 127.0.0.1:50051   # an existing server (RSS/file checks need --pid)

``tests/test_fuzz_server.py`` runs it for a few seconds in CI.
"""
import argparse
import json
import math
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from google.protobuf import descriptor as _descriptor  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from benchmarks._harness import ServerProcess, rss_kb  # noqa: E402
from convproto.convservice.v1 import conv_pb2  # noqa: E402
from convproto.inference import grpc_service_pb2 as kpb  # noqa: E402

__all__ = ["main", "run_fuzz"]

CONV = "/convservice.v1.ConvService/"
KSERVE = "/inference.GRPCInferenceService/"
HEALTH = "/grpc.health.v1.Health/Check"
#: Every unary RPC, with its request and response classes.
METHODS = {
    CONV + "Conv": (conv_pb2.ConvRequest, conv_pb2.ConvResponse),
    CONV + "RegisterModel": (conv_pb2.RegisterModelRequest, conv_pb2.RegisterModelResponse),
    CONV + "Infer": (conv_pb2.InferRequest, conv_pb2.InferResponse),
    CONV + "ListModels": (conv_pb2.ListModelsRequest, conv_pb2.ListModelsResponse),
    CONV + "GetModel": (conv_pb2.GetModelRequest, conv_pb2.GetModelResponse),
    CONV + "DeleteModel": (conv_pb2.DeleteModelRequest, conv_pb2.DeleteModelResponse),
    KSERVE + "ServerLive": (kpb.ServerLiveRequest, kpb.ServerLiveResponse),
    KSERVE + "ServerReady": (kpb.ServerReadyRequest, kpb.ServerReadyResponse),
    KSERVE + "ModelReady": (kpb.ModelReadyRequest, kpb.ModelReadyResponse),
    KSERVE + "ServerMetadata": (kpb.ServerMetadataRequest, kpb.ServerMetadataResponse),
    KSERVE + "ModelMetadata": (kpb.ModelMetadataRequest, kpb.ModelMetadataResponse),
    KSERVE + "ModelInfer": (kpb.ModelInferRequest, kpb.ModelInferResponse),
    KSERVE + "ModelConfig": (kpb.ModelConfigRequest, kpb.ModelConfigResponse),
    KSERVE + "ModelStatistics": (kpb.ModelStatisticsRequest, kpb.ModelStatisticsResponse),
    KSERVE + "RepositoryIndex": (kpb.RepositoryIndexRequest, kpb.RepositoryIndexResponse),
    KSERVE + "SystemSharedMemoryStatus": (kpb.SystemSharedMemoryStatusRequest, kpb.SystemSharedMemoryStatusResponse),
    KSERVE + "SystemSharedMemoryRegister": (kpb.SystemSharedMemoryRegisterRequest,
                                            kpb.SystemSharedMemoryRegisterResponse),
    KSERVE + "SystemSharedMemoryUnregister": (kpb.SystemSharedMemoryUnregisterRequest,
                                              kpb.SystemSharedMemoryUnregisterResponse),
    HEALTH: (health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse),
}
OK, INVALID, NOT_FOUND = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
#: Seconds each call may take. Fuzzed calls are small; a call that needs longer is a hang.
CALL_TIMEOUT = 15.0
BASE_MODEL = "fuzzbase"
#: Registered like BASE_MODEL but never named by the fuzzer (which may delete BASE_MODEL): the final check uses it.
KEEP_MODEL = "fuzzkeep"

_INTS = [0, 1, -1, 2, 3, 7, 2**31 - 1, 2**31, -(2**31), 2**32, 2**53, 2**62, 3 << 61, 2**63 - 1, -(2**63)]
_UINTS = [0, 1, 2, 2**32, 2**63, 2**64 - 1]
_FLOATS = [0.0, -0.0, 1.0, -1.5, 1e-45, 3.4e38, 1e308, math.inf, -math.inf, math.nan]


# ======================================================================================================================
# Requests
# ======================================================================================================================
def _tensor(a):
    a = np.ascontiguousarray(a)
    wire = conv_pb2.DTYPE_FLOAT32 if a.dtype == np.float32 else conv_pb2.DTYPE_FLOAT64
    return conv_pb2.Tensor(dtype=wire, shape=a.shape, data=a.astype(a.dtype.newbyteorder("<")).tobytes())


def base_model():
    """The model registered at start and checked at the end: two 1x1 layers (relu, then linear) on 3 channels."""
    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    b1 = rng.standard_normal(4).astype(np.float32)
    w2 = rng.standard_normal((2, 4, 1, 1)).astype(np.float32)
    request = conv_pb2.RegisterModelRequest(name=BASE_MODEL, layers=[
        conv_pb2.Layer(kernel=_tensor(w1), bias=_tensor(b1), spec=conv_pb2.LayerSpec(activation="relu")),
        conv_pb2.Layer(kernel=_tensor(w2))])
    x = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    # 1x1 convolutions are matrix products over the channel axis: an oracle that needs no convcore.
    h = np.maximum(np.einsum("oc,nchw->nohw", w1[:, :, 0, 0], x) + b1[None, :, None, None], 0)
    y = np.einsum("oc,nchw->nohw", w2[:, :, 0, 0], h)
    return request, x, y


def valid_requests(rng):
    """One plausible request per method (the seeds the mutator starts from)."""
    nrng = np.random.default_rng(rng.randrange(2**32))
    x = nrng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    k = nrng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    name = f"fz{rng.randrange(4)}"
    kin = kpb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 3, 6, 6])
    return {
        CONV + "Conv": conv_pb2.ConvRequest(input=_tensor(x), kernel=_tensor(k), bias=_tensor(np.zeros(2, np.float32)),
                                            spec=conv_pb2.LayerSpec(strides=[1], padding=conv_pb2.Padding(mode="same"),
                                                                    activation="relu")),
        CONV + "RegisterModel": conv_pb2.RegisterModelRequest(name=name, layers=[conv_pb2.Layer(kernel=_tensor(k))]),
        CONV + "Infer": conv_pb2.InferRequest(name=rng.choice([BASE_MODEL, name]), input=_tensor(x)),
        CONV + "ListModels": conv_pb2.ListModelsRequest(),
        CONV + "GetModel": conv_pb2.GetModelRequest(name=rng.choice([BASE_MODEL, name])),
        CONV + "DeleteModel": conv_pb2.DeleteModelRequest(name=name),
        KSERVE + "ServerLive": kpb.ServerLiveRequest(),
        KSERVE + "ServerReady": kpb.ServerReadyRequest(),
        KSERVE + "ModelReady": kpb.ModelReadyRequest(name=BASE_MODEL),
        KSERVE + "ServerMetadata": kpb.ServerMetadataRequest(),
        KSERVE + "ModelMetadata": kpb.ModelMetadataRequest(name=BASE_MODEL),
        KSERVE + "ModelInfer": kpb.ModelInferRequest(model_name=BASE_MODEL, id="q", inputs=[kin],
                                                     raw_input_contents=[x.tobytes()]),
        KSERVE + "ModelConfig": kpb.ModelConfigRequest(name=BASE_MODEL),
        KSERVE + "ModelStatistics": kpb.ModelStatisticsRequest(name=rng.choice(["", BASE_MODEL, name])),
        KSERVE + "RepositoryIndex": kpb.RepositoryIndexRequest(ready=rng.random() < 0.5),
        KSERVE + "SystemSharedMemoryStatus": kpb.SystemSharedMemoryStatusRequest(name=rng.choice(["", "fzr"])),
        KSERVE + "SystemSharedMemoryRegister": kpb.SystemSharedMemoryRegisterRequest(
            name="fzr", key=rng.choice(["/fz-none", "fz-none", "/../fz"]), offset=0, byte_size=64),
        KSERVE + "SystemSharedMemoryUnregister": kpb.SystemSharedMemoryUnregisterRequest(name=rng.choice(["", "fzr"])),
        HEALTH: health_pb2.HealthCheckRequest(service=""),
    }


def hostile_names(token):
    """Model names that must never become files outside the repository. `token` makes any stray file findable."""
    return [f"../{token}", f"../../{token}", f"/tmp/{token}", f"{token}/../../x", f"a\x00{token}", f"{token}\x00",
            f"..\\{token}", f".{token}", "..", ".", "", f"{token}/", f"{token}\n", " " + token, token * 20,
            f"C:\\{token}", f"{token}.convmodel/../x", f"\u2024\u2024/{token}", f"%2e%2e%2f{token}"]


def _random_string(rng, token):
    choices = [lambda: "", lambda: BASE_MODEL, lambda: rng.choice(hostile_names(token)),
               lambda: rng.choice(["input", "output", "FP32", "FP64", "FP16", "INT8", "BYTES", "1", "2", "same",
                                   "valid", "causal", "relu", "NHWC", "NCHW", "channels_last", "HWIO", "OIHW"]),
               lambda: "".join(chr(rng.randrange(0, 0x2FFF)) for _ in range(rng.randrange(1, 12))),
               lambda: "x" * rng.choice([1, 127, 128, 129, 4096])]
    return rng.choice(choices)()


def _random_value(field, rng, token):
    t = field.type
    FD = _descriptor.FieldDescriptor
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return rng.choice(_INTS) if rng.random() < 0.6 else rng.randrange(-(2**63), 2**63)
    if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return rng.choice([0, 1, -1, 2**31 - 1, -(2**31), rng.randrange(-(2**31), 2**31)])
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return rng.choice(_UINTS)
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return rng.choice([0, 1, 2**32 - 1])
    if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        v = rng.choice(_FLOATS)
        return max(min(v, 3.4e38), -3.4e38) if t == FD.TYPE_FLOAT and math.isfinite(v) else v
    if t == FD.TYPE_BOOL:
        return rng.random() < 0.5
    if t == FD.TYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values] + [-1, 3, 99, 2**31 - 1])
    if t == FD.TYPE_STRING:
        return _random_string(rng, token)
    if t == FD.TYPE_BYTES:
        n = rng.choice([0, 1, 3, 4, 8, 12, 36, 108, 144, 432, 4096])
        return bytes(rng.getrandbits(8) for _ in range(min(n, 512))) + bytes(max(0, n - 512))
    raise AssertionError(f"unhandled field type {t}")


def mutate(msg, rng, token, depth=0):
    """Overwrite random fields of `msg` in place (recursively), by type, with edge and random values."""
    fields = list(msg.DESCRIPTOR.fields)
    for field in rng.sample(fields, k=min(len(fields), rng.randrange(1, 4))):
        if field.type == _descriptor.FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                target = getattr(msg, field.name)
                for _ in range(rng.randrange(0, 3)):
                    key = _random_string(rng, token)
                    value_field = field.message_type.fields_by_name["value"]
                    if value_field.type == _descriptor.FieldDescriptor.TYPE_MESSAGE:
                        if depth < 4:
                            mutate(target[key], rng, token, depth + 1)
                    else:
                        target[key] = _random_value(value_field, rng, token)
            elif field.is_repeated:
                target = getattr(msg, field.name)
                if rng.random() < 0.3:
                    del target[:]
                for _ in range(rng.randrange(0, 3)):
                    item = target.add()
                    if depth < 4:
                        mutate(item, rng, token, depth + 1)
                if len(target) and depth < 4 and rng.random() < 0.5:
                    mutate(target[rng.randrange(len(target))], rng, token, depth + 1)
            elif depth < 4:
                if rng.random() < 0.15:
                    msg.ClearField(field.name)
                else:
                    mutate(getattr(msg, field.name), rng, token, depth + 1)
        elif field.is_repeated:
            target = getattr(msg, field.name)
            if rng.random() < 0.5:
                del target[:]
            for _ in range(rng.choice([0, 1, 2, 3, 4, 5, 6, 9])):
                target.append(_random_value(field, rng, token))
        else:
            setattr(msg, field.name, _random_value(field, rng, token))
    return msg


def mutate_bytes(data, rng):
    """Byte-level damage to a serialized message: flips, cuts, insertions, varint-looking garbage."""
    b = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(5)
        if op == 0 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            del b[rng.randrange(len(b)):]
        elif op == 2:
            i = rng.randrange(len(b) + 1)
            b[i:i] = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 16)))
        elif op == 3:
            i = rng.randrange(len(b) + 1)
            b[i:i] = b"\xff" * rng.randrange(1, 11)  # over-long varints / lengths
        elif b:
            i = rng.randrange(len(b))
            b[i] = rng.choice([0x0A, 0x12, 0x1A, 0x22, 0x08, 0x10, 0x7F, 0x80])
    return bytes(b)


# ======================================================================================================================
# Named cases (issue 5): (name, method, request, accepted status codes)
# ======================================================================================================================
def named_cases(token):
    f32 = conv_pb2.DTYPE_FLOAT32
    x = np.ones((1, 3, 4, 4), np.float32)
    k = np.ones((2, 3, 1, 1), np.float32)

    def conv(inp=None, kernel=None, bias=None, spec=None):
        return conv_pb2.ConvRequest(input=inp if inp is not None else _tensor(x),
                                    kernel=kernel if kernel is not None else _tensor(k), bias=bias, spec=spec)

    def register(name, kernel=None, bias=None):
        return conv_pb2.RegisterModelRequest(name=name, layers=[conv_pb2.Layer(
            kernel=kernel if kernel is not None else _tensor(k), bias=bias)])

    nan_k = k.copy()
    nan_k[0, 0, 0, 0] = np.nan
    inf_k = k.copy()
    inf_k[1, 2, 0, 0] = -np.inf
    kin = kpb.ModelInferRequest.InferInputTensor
    cases = [
        ("bytes shorter than shape", CONV + "Conv",
         conv(inp=conv_pb2.Tensor(dtype=f32, shape=[1, 3, 4, 4], data=b"\0" * 191)), {INVALID}),
        ("bytes longer than shape", CONV + "Conv",
         conv(inp=conv_pb2.Tensor(dtype=f32, shape=[1, 3, 4, 4], data=b"\0" * 196)), {INVALID}),
        ("kernel bytes disagree", CONV + "Conv", conv(kernel=conv_pb2.Tensor(dtype=f32, shape=[2, 3, 1, 1],
                                                                             data=b"\0" * 4)), {INVALID}),
        ("shape product overflows int64", CONV + "Conv",
         conv(inp=conv_pb2.Tensor(dtype=f32, shape=[2**62, 2**62, 4, 4], data=b"\0" * 64)), {INVALID}),
        ("shape product wraps to 0 in int64", CONV + "Conv",
         conv(inp=conv_pb2.Tensor(dtype=f32, shape=[2**32, 2**32, 1, 1], data=b"")), {INVALID}),
        ("zero dim with huge dims", CONV + "Conv",
         conv(inp=conv_pb2.Tensor(dtype=f32, shape=[0, 2**62, 2**62, 1], data=b"")), {INVALID}),
        ("negative dim", CONV + "Conv", conv(inp=conv_pb2.Tensor(dtype=f32, shape=[1, 3, -4, -4], data=b"\0" * 192)),
         {INVALID}),
        ("unknown dtype enum", CONV + "Conv", conv(inp=conv_pb2.Tensor(dtype=7, shape=[1, 3, 4, 4],
                                                                       data=b"\0" * 192)), {INVALID}),
        ("unspecified dtype", CONV + "Conv", conv(inp=conv_pb2.Tensor(shape=[1, 3, 4, 4], data=b"\0" * 192)),
         {INVALID}),
        ("empty tensor (zero dim)", CONV + "Conv", conv(inp=conv_pb2.Tensor(dtype=f32, shape=[1, 3, 0, 4])),
         {INVALID}),
        ("empty tensor (no shape)", CONV + "Conv", conv(inp=conv_pb2.Tensor(dtype=f32)), {INVALID}),
        ("missing input", CONV + "Conv", conv_pb2.ConvRequest(kernel=_tensor(k)), {INVALID}),
        ("scalar kernel", CONV + "Conv", conv(kernel=conv_pb2.Tensor(dtype=f32, shape=[], data=b"\0" * 4)),
         {INVALID}),
        ("huge strides and padding (engine bug B2)", CONV + "Conv",
         conv(spec=conv_pb2.LayerSpec(strides=[3 << 61], padding=conv_pb2.Padding(uniform=3 << 61))), {INVALID}),
        ("int64-max strides and padding (engine bug B2)", CONV + "Conv",
         conv(spec=conv_pb2.LayerSpec(strides=[2**63 - 1], padding=conv_pb2.Padding(uniform=2**63 - 1))),
         {INVALID}),
        ("padding over the output limit", CONV + "Conv",
         conv(spec=conv_pb2.LayerSpec(padding=conv_pb2.Padding(uniform=10**6))),
         {grpc.StatusCode.RESOURCE_EXHAUSTED, INVALID}),
        ("negative groups", CONV + "Conv", conv(spec=conv_pb2.LayerSpec(groups=-3)), {INVALID}),
        ("NaN/Inf weights in Conv are data", CONV + "Conv", conv(kernel=_tensor(nan_k)), {OK}),
        ("Inf bias in Conv is data", CONV + "Conv", conv(bias=_tensor(np.array([np.inf, 1], np.float32))), {OK}),
        ("NaN weights refused by RegisterModel", CONV + "RegisterModel", register("fznan", kernel=_tensor(nan_k)),
         {INVALID}),
        ("Inf weights refused by RegisterModel", CONV + "RegisterModel", register("fzinf", kernel=_tensor(inf_k)),
         {INVALID}),
        ("NaN bias refused by RegisterModel", CONV + "RegisterModel",
         register("fznanb", bias=_tensor(np.array([np.nan, 0], np.float32))), {INVALID}),
        ("duplicate model name", CONV + "RegisterModel", register(BASE_MODEL), {grpc.StatusCode.ALREADY_EXISTS}),
        ("model with no layers", CONV + "RegisterModel", conv_pb2.RegisterModelRequest(name="fzempty"), {INVALID}),
        ("KServe unknown datatype", KSERVE + "ModelInfer", kpb.ModelInferRequest(
            model_name=BASE_MODEL, inputs=[kin(name="input", datatype="FP17", shape=[1, 3, 2, 2])],
            raw_input_contents=[b"\0" * 48]), {INVALID}),
        ("KServe bytes disagree with shape", KSERVE + "ModelInfer", kpb.ModelInferRequest(
            model_name=BASE_MODEL, inputs=[kin(name="input", datatype="FP32", shape=[1, 3, 2, 2])],
            raw_input_contents=[b"\0" * 47]), {INVALID}),
        ("KServe negative dims", KSERVE + "ModelInfer", kpb.ModelInferRequest(
            model_name=BASE_MODEL, inputs=[kin(name="input", datatype="FP32", shape=[1, 3, -2, -2])],
            raw_input_contents=[b"\0" * 48]), {INVALID}),
        ("KServe overflowing shape", KSERVE + "ModelInfer", kpb.ModelInferRequest(
            model_name=BASE_MODEL, inputs=[kin(name="input", datatype="FP32", shape=[1, 3, 2**62, 2**62])],
            raw_input_contents=[b"\0" * 48]), {INVALID}),
        ("KServe empty input", KSERVE + "ModelInfer", kpb.ModelInferRequest(
            model_name=BASE_MODEL, inputs=[kin(name="input", datatype="FP32", shape=[1, 3, 0, 2])],
            raw_input_contents=[b""]), {INVALID}),
        ("KServe two raw contents for one input", KSERVE + "ModelInfer", kpb.ModelInferRequest(
            model_name=BASE_MODEL, inputs=[kin(name="input", datatype="FP32", shape=[1, 3, 1, 1])],
            raw_input_contents=[b"\0" * 12, b"\0" * 12]), {INVALID}),
    ]
    def shm_input(params):
        tensor = kin(name="input", datatype="FP32", shape=[1, 3, 2, 2])
        for key, value in params.items():
            setattr(tensor.parameters[key], "string_param" if isinstance(value, str) else "int64_param", value)
        return kpb.ModelInferRequest(model_name=BASE_MODEL, inputs=[tensor])

    def batching(**kw):
        request = register("fzbatch")
        request.batching.CopyFrom(conv_pb2.DynamicBatching(**kw))
        return request

    shm_register = kpb.SystemSharedMemoryRegisterRequest
    cases += [
        ("shm register: absolute path key", KSERVE + "SystemSharedMemoryRegister",
         shm_register(name="fz", key="/etc/passwd", byte_size=8), {INVALID}),
        ("shm register: '..' key", KSERVE + "SystemSharedMemoryRegister",
         shm_register(name="fz", key=f"../../tmp/{token}", byte_size=8), {INVALID}),
        ("shm register: NUL in key", KSERVE + "SystemSharedMemoryRegister",
         shm_register(name="fz", key=f"/{token}\x00", byte_size=8), {INVALID}),
        ("shm register: missing object", KSERVE + "SystemSharedMemoryRegister",
         shm_register(name="fz", key=f"/{token}", byte_size=8), {INVALID}),
        ("shm register: uint64-max offset and size", KSERVE + "SystemSharedMemoryRegister",
         shm_register(name="fz", key=f"/{token}", offset=2**64 - 1, byte_size=2**64 - 1), {INVALID}),
        ("shm register: empty name", KSERVE + "SystemSharedMemoryRegister", shm_register(key="/x", byte_size=8),
         {INVALID}),
        ("shm status: unknown region", KSERVE + "SystemSharedMemoryStatus",
         kpb.SystemSharedMemoryStatusRequest(name="fz-unknown"), {NOT_FOUND}),
        ("shm unregister: unknown region is a no-op", KSERVE + "SystemSharedMemoryUnregister",
         kpb.SystemSharedMemoryUnregisterRequest(name="fz-unknown"), {OK}),
        ("ModelInfer: unknown shm region", KSERVE + "ModelInfer",
         shm_input({"shared_memory_region": "fz-unknown", "shared_memory_byte_size": 48}), {INVALID}),
        ("ModelInfer: shm byte size of the wrong type", KSERVE + "ModelInfer",
         shm_input({"shared_memory_region": "fz-unknown", "shared_memory_byte_size": "48"}), {INVALID}),
        ("ModelInfer: shm size without a region", KSERVE + "ModelInfer",
         shm_input({"shared_memory_byte_size": 48}), {INVALID}),
        ("ModelInfer: negative shm offset", KSERVE + "ModelInfer",
         shm_input({"shared_memory_region": "fz-unknown", "shared_memory_byte_size": 48,
                    "shared_memory_offset": -(2**63)}), {INVALID}),
        ("ModelStatistics: unknown model", KSERVE + "ModelStatistics", kpb.ModelStatisticsRequest(name="fz-nope"),
         {NOT_FOUND}),
        ("ModelStatistics: unknown version", KSERVE + "ModelStatistics",
         kpb.ModelStatisticsRequest(name=BASE_MODEL, version="9"), {NOT_FOUND}),
        ("RepositoryIndex: unknown repository", KSERVE + "RepositoryIndex",
         kpb.RepositoryIndexRequest(repository_name="fz-nope"), {NOT_FOUND}),
        ("RegisterModel: negative batch size", CONV + "RegisterModel", batching(max_batch_size=-1), {INVALID}),
        ("RegisterModel: int64-max batch size", CONV + "RegisterModel", batching(max_batch_size=2**63 - 1),
         {INVALID}),
        ("RegisterModel: preferred over max", CONV + "RegisterModel",
         batching(max_batch_size=2, preferred_batch_size=[3]), {INVALID}),
        ("RegisterModel: hour-long queue delay", CONV + "RegisterModel",
         batching(max_queue_delay_microseconds=3_600_000_000), {INVALID}),
        ("RegisterModel: negative queue delay", CONV + "RegisterModel",
         batching(max_queue_delay_microseconds=-(2**63)), {INVALID}),
    ]
    for name in hostile_names(token):
        cases.append((f"RegisterModel name {name!r}", CONV + "RegisterModel", register(name), {INVALID}))
    for name in hostile_names(token)[:6]:
        # Lookups of a name that cannot exist: refused as invalid or simply not found, never a file access.
        for method, req in [(CONV + "GetModel", conv_pb2.GetModelRequest(name=name)),
                            (CONV + "DeleteModel", conv_pb2.DeleteModelRequest(name=name)),
                            (CONV + "Infer", conv_pb2.InferRequest(name=name, input=_tensor(x))),
                            (KSERVE + "ModelMetadata", kpb.ModelMetadataRequest(name=name))]:
            cases.append((f"{method.rsplit('/', 1)[1]} name {name!r}", method, req, {INVALID, NOT_FOUND}))
    return cases


# ======================================================================================================================
# Running
# ======================================================================================================================
def _tree(path, skip=()):
    """Set of relative paths under `path` (files and folders), not descending into `skip` (absolute paths)."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skip]
        for n in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, n), path))
    return found


def _files_named(token, roots):
    hits = []
    for root in roots:
        try:
            for dirpath, dirnames, filenames in os.walk(root):
                if dirpath.count(os.sep) - root.count(os.sep) >= 2:
                    dirnames[:] = []
                hits += [os.path.join(dirpath, n) for n in dirnames + filenames if token in n]
        except OSError:
            pass
    return hits


def _call(channel, method, payload, timeout=CALL_TIMEOUT):
    """Send `payload` (a message or raw bytes) to `method`; return (code, details, response bytes or None)."""
    if isinstance(payload, (bytes, bytearray)):
        rpc = channel.unary_unary(method)  # no serializers: bytes in, bytes out
        data = bytes(payload)
    else:
        rpc = channel.unary_unary(method, request_serializer=lambda m: m.SerializeToString(),
                                  response_deserializer=None)
        data = payload
    try:
        return OK, "", rpc(data, timeout=timeout)
    except grpc.RpcError as err:
        return err.code(), err.details() or "", None


def run_fuzz(target, duration, seed, pid=None, check_paths=None, log=print):
    """Run the named cases, then random cases until `duration` seconds have passed; return a report dict.

    Parameters
    ----------
    target : str
        ``host:port``.
    duration : float
        Seconds of random cases (the named cases and final checks come on top).
    seed : int
        For the random generator (printed, so a finding can be replayed).
    pid : int, optional
        The server's process id, for the RSS check.
    check_paths : (str, str, str), optional
        (base folder, repository, token roots) for the no-writes-outside-the-repository check; only with our own
        server.
    log : callable
        Progress lines.
    """
    rng = random.Random(seed)
    token = f"fuzzpwn{seed}"
    failures = []
    counts = {}
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 512 << 20)]
    channel = grpc.insecure_channel(target, options=options)
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        request, x, expected = base_model()
        for name in (BASE_MODEL, KEEP_MODEL):
            _call(channel, CONV + "DeleteModel", conv_pb2.DeleteModelRequest(name=name))
            request.name = name
            code, details, _ = _call(channel, CONV + "RegisterModel", request)
            if code != OK:
                raise RuntimeError(f"could not register model {name!r}: {code} {details}")
        rss_start = rss_kb(pid) if pid else None
        base_tree = _tree(check_paths[0], skip={check_paths[1]}) if check_paths else None

        def record(kind, method, code, details, expect=None):
            counts[code.name] = counts.get(code.name, 0) + 1
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                failures.append(f"{kind} {method}: no answer within {CALL_TIMEOUT} s (hang)")
            elif code == grpc.StatusCode.UNAVAILABLE:
                failures.append(f"{kind} {method}: UNAVAILABLE ({details}): did the server die?")
            elif code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                failures.append(f"{kind} {method}: {code.name}: {details}")
            elif expect is not None and code not in expect:
                failures.append(f"{kind}: expected {sorted(c.name for c in expect)}, got {code.name}: {details}")
            elif expect is not None and code != OK and not details.strip():
                failures.append(f"{kind}: {code.name} without a message")

        # ---- named cases
        for name, method, req, expect in named_cases(token):
            code, details, _ = _call(channel, method, req)
            record(f"[named] {name}", method, code, details, expect)
            if code not in expect:
                log(f"named case {name!r}: got {code.name}: {details[:200]}")
            if code == grpc.StatusCode.UNAVAILABLE:
                break
        named_done = len(named_cases(token))

        # ---- random cases
        calls = 0
        end = time.monotonic() + duration
        methods = sorted(METHODS)
        while time.monotonic() < end and calls < 1_000_000:
            method = rng.choice(methods)
            seeds = valid_requests(rng)
            kind = rng.random()
            if kind < 0.55:
                payload = mutate(seeds[method], rng, token)
                what = "mutated"
            elif kind < 0.8:
                payload = mutate_bytes(seeds[method].SerializeToString(), rng)
                what = "damaged bytes"
            else:
                payload = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 2, 5, 17, 64, 300])))
                what = "random bytes"
            code, details, _ = _call(channel, method, payload)
            calls += 1
            record(f"[{what}]", method, code, details)
            if code == grpc.StatusCode.UNAVAILABLE:
                # Say what killed it: the payload is the finding.
                failures.append(f"last payload before UNAVAILABLE: {payload!r:.2000}")
                break
        log(f"{calls} random calls in {duration:.0f} s; status counts: {json.dumps(counts, sort_keys=True)}")

        # ---- the server must still be alive and right
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        if health.status != health_pb2.HealthCheckResponse.SERVING:
            failures.append(f"health is {health.status} after fuzzing, not SERVING")
        code, details, data = _call(channel, CONV + "Infer", conv_pb2.InferRequest(name=KEEP_MODEL, input=_tensor(x)))
        if code != OK:
            failures.append(f"the known model no longer answers: {code.name}: {details}")
        else:
            out = conv_pb2.InferResponse.FromString(data).output
            y = np.frombuffer(out.data, np.float32).reshape(tuple(out.shape))
            if not np.allclose(y, expected, rtol=1e-4, atol=1e-4):
                failures.append("the known model gives a wrong answer after fuzzing")
        rss_end = rss_kb(pid) if pid else None
        if pid:
            # Generous: allocator caches, plan caches and per-thread buffers grow a little; a leak grows per call.
            bound = max(3 * rss_start, rss_start + 400_000)
            if rss_end > bound:
                failures.append(f"RSS grew from {rss_start} kB to {rss_end} kB (bound {bound} kB)")
            log(f"server RSS: {rss_start} kB at start, {rss_end} kB at end")
        if check_paths:
            base, repository, _ = check_paths
            new = _tree(base, skip={repository}) - base_tree
            if new:
                failures.append(f"files appeared outside the model repository: {sorted(new)}")
            stray = [p for p in _files_named(token, [base, os.path.dirname(base), ROOT])
                     if not p.startswith(repository + os.sep)]  # valid names made of the token are fine there
            stray += [os.path.join(d, n) for d in ("/", "/tmp", os.getcwd()) for n in os.listdir(d) if token in n]
            if stray:
                failures.append(f"files named after hostile model names exist: {stray}")
            for entry in os.listdir(repository):
                if not (entry.endswith(".convmodel") or entry.startswith(".tmp-")):
                    failures.append(f"unexpected entry in the model repository: {entry!r}")
        return {"seed": seed, "named_cases": named_done, "random_calls": calls, "status_counts": counts,
                "rss_start_kb": rss_start, "rss_end_kb": rss_end, "failures": failures}
    finally:
        channel.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of random cases (default 60)")
    p.add_argument("--target", help="fuzz this server (host:port) instead of starting one")
    p.add_argument("--pid", type=int, help="with --target: the server's pid, for the RSS check")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: time-based, printed)")
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for the server we start")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time() * 1000) % 2**31
    print(f"fuzz_server: seed {seed}, {args.duration:.0f} s", flush=True)
    server = None
    try:
        if args.target:
            report = run_fuzz(args.target, args.duration, seed, pid=args.pid)
        else:
            # <tmp>/work is its cwd, <tmp>/models its repository: the fuzzer checks nothing else is written there.
            server = ServerProcess.temporary("--log-level", "WARNING", *args.server_arg, prefix="fuzzsrv-").start()
            report = run_fuzz(server.target, args.duration, seed, pid=server.proc.pid,
                              check_paths=(server.base, server.repository, None))
            if server.proc.poll() is not None:
                report["failures"].append(f"server exited with {server.proc.returncode}")
            rc = server.stop()
            if rc != 0:
                report["failures"].append(f"server exited with {rc} on SIGTERM")
    except Exception as exc:  # noqa: BLE001 - report, with the server log, rather than a bare traceback
        report = {"seed": seed, "failures": [f"fuzzing stopped: {type(exc).__name__}: {exc}"]}
    finally:
        if server is not None:
            server.stop()
            if report.get("failures"):
                print("---- server log (tail) ----\n" + server.log()[-6000:], flush=True)
            server.cleanup()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    for failure in report["failures"]:
        print("FAIL:", failure, flush=True)
    print("fuzz_server:", "FAILED" if report["failures"] else "passed", f"(seed {seed})", flush=True)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
