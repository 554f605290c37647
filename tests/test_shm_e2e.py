"""Triton's system shared-memory extension end to end: real server processes, regions created by this process and
by separate client processes, bounds, hostile keys, a crashed client holding a region, --no-shared-memory and
--auth-token."""
import asyncio
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import grpc
import numpy as np
import pytest

from _calibrate import require_longer, slow_model
from _reference import reference_conv
from _server import ROOT, ServerProcess, server  # noqa: F401  (fixture)
from client import AsyncConvClient, ConvClient, ConvError
from client._shm import SharedMemoryRegion
from convproto.inference import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc
from server import _shm

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs POSIX shared memory in /dev/shm")

RNG = np.random.default_rng(5)
KERNEL = RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)
LAYERS = [{"kernel": KERNEL, "padding": "same", "activation": "relu"}]
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def client(server):
    with ConvClient(server.target, timeout=30.0) as c:
        c.register_model("shm", LAYERS)
        yield c


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def code_of(fn, *args):
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)
    return info.value.code(), info.value.details()


def shm_infer_request(x, region_name, in_size=None, out_offset=None, out_size=None, in_offset=0):
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=x.shape)
    tensor.parameters["shared_memory_region"].string_param = region_name
    tensor.parameters["shared_memory_byte_size"].int64_param = x.nbytes if in_size is None else in_size
    if in_offset:
        tensor.parameters["shared_memory_offset"].int64_param = in_offset
    request = pb.ModelInferRequest(model_name="shm", inputs=[tensor])
    out = request.outputs.add(name="output")
    out.parameters["shared_memory_region"].string_param = region_name
    out.parameters["shared_memory_byte_size"].int64_param = out_size
    if out_offset:
        out.parameters["shared_memory_offset"].int64_param = out_offset
    return request


def mapped_by(server, region):
    """Whether the server process still maps (or holds a descriptor of) the region's object."""
    pid, name = server.proc.pid, region.key[1:]
    with open(f"/proc/{pid}/maps") as f:
        mapped = name in f.read()
    held = any(name in os.path.realpath(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    return mapped or held


def test_sdk_shared_memory_matches_grpc_and_the_reference(server, client, stub):
    x = RNG.standard_normal((2, 4, 16, 12)).astype(np.float32)
    expected = client.infer("shm", x)
    with client.shared_memory(1 << 16) as region:
        status = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name=region.name))
        assert status.regions[region.name].key == region.key and status.regions[region.name].byte_size == 1 << 16
        for _ in range(3):  # the region is reused call after call
            y = client.infer("shm", x, shared_memory=region)
            np.testing.assert_array_equal(y, expected)
        np.testing.assert_allclose(y, reference_conv(x.astype(np.float64), KERNEL.astype(np.float64),
                                                     padding="same", activation="relu"), rtol=1e-4, atol=1e-4)
    # Both sides cleaned up: unregistered (unmapped, closed) on the server, unlinked here.
    assert region.name not in stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions
    assert not os.path.exists("/dev/shm/" + region.key[1:]) and not mapped_by(server, region)


def test_async_client_shared_memory_callers_batched_together(server, client, stub):
    """AsyncConvClient: concurrent coroutines, each with its own region, on a batching model; the three requests are
    computed as one batch (it goes when full, long before its 10 s delay) and each gets its own unbatched answer."""
    client.register_model("shm-batched", LAYERS, batching={"max_batch_size": 3,
                                                           "max_queue_delay_microseconds": 10_000_000})
    xs = [RNG.standard_normal((1, 4, 16, 12)).astype(np.float32) for _ in range(3)]
    expected = [client.infer("shm", x) for x in xs]

    async def main():
        async with AsyncConvClient(server.target, timeout=60.0) as ac:
            async def one(x):
                async with ac.shared_memory(1 << 16) as region:
                    y = await ac.infer("shm-batched", x, shared_memory=region)
                    return np.array(y), region  # a copy: the region is unmapped on the way out
            return await asyncio.gather(*(one(x) for x in xs))

    results = asyncio.run(main())
    for (y, region), want in zip(results, expected):
        np.testing.assert_array_equal(y, want)
        assert not os.path.exists("/dev/shm/" + region.key[1:]) and not mapped_by(server, region)
        assert region.name not in stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions
    (s,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name="shm-batched")).model_stats
    assert (s.inference_count, s.execution_count) == (3, 1)


def test_raw_kserve_request_with_offsets_writes_the_output_in_place(client, stub):
    x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
    expected = client.infer("shm", x)
    with SharedMemoryRegion(8192) as region:
        region.write(x, offset=512)
        # The registered region starts 256 bytes into the object.
        stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
            name=region.name, key=region.key, offset=256, byte_size=8192 - 256))
        try:
            reply = stub.ModelInfer(shm_infer_request(x, region.name, in_offset=256, out_offset=2048,
                                                      out_size=expected.nbytes))
            assert list(reply.raw_output_contents) == [b""]  # one (empty) entry per output, as Triton sends
            assert list(reply.outputs[0].shape) == list(expected.shape)
            np.testing.assert_array_equal(region.array(expected.shape, np.float32, 256 + 2048), expected)
        finally:
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=region.name))


def test_input_and_output_in_two_regions(client, stub):
    """The input's region and the output's are held and checked each on its own (one access when they are the
    same region, two here); an unknown output region is refused before anything is computed."""
    x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
    expected = client.infer("shm", x)
    with SharedMemoryRegion(4096) as src, SharedMemoryRegion(4096) as dst:
        src.write(x)
        for region in (src, dst):
            stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(name=region.name, key=region.key,
                                                                                 byte_size=4096))
        try:
            request = shm_infer_request(x, src.name, out_size=expected.nbytes)
            request.outputs[0].parameters["shared_memory_region"].string_param = dst.name
            request.outputs[0].parameters["shared_memory_offset"].int64_param = 512
            reply = stub.ModelInfer(request)
            assert list(reply.outputs[0].shape) == list(expected.shape)
            np.testing.assert_array_equal(dst.array(expected.shape, np.float32, 512), expected)
            np.testing.assert_array_equal(src.array(x.shape, np.float32, 0), x)  # the input left as it was
            request.outputs[0].parameters["shared_memory_region"].string_param = "nope"
            code, details = code_of(stub.ModelInfer, request)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "region 'nope' is not registered" in details
        finally:
            for region in (src, dst):
                stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=region.name))


def test_bounds_and_unknown_regions(client, stub):
    x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)  # 1024 bytes in, 2048 out
    with SharedMemoryRegion(4096) as region:
        stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(name=region.name, key=region.key,
                                                                             byte_size=4096))
        try:
            cases = [
                (shm_infer_request(x, "nope", out_size=2048, out_offset=1024), r"region 'nope' is not registered"),
                (shm_infer_request(x, region.name, in_size=1000, out_size=2048, out_offset=1024),
                 r"input shared_memory_byte_size is 1000, the tensor needs 1024 bytes"),
                (shm_infer_request(x, region.name, in_offset=3500, out_size=2048, out_offset=1024),
                 r"shared_memory_offset 3500 \+ 1024 bytes = 4524 is past the end of region"),
                (shm_infer_request(x, region.name, out_size=1024, out_offset=1024),
                 r"output shared_memory_byte_size is 1024, the tensor needs 2048 bytes"),
                (shm_infer_request(x, region.name, out_size=2048, out_offset=3000),
                 r"output: shared_memory_offset 3000 \+ 2048 bytes = 5048 is past the end"),
                (shm_infer_request(x, region.name, out_size=-5, out_offset=1024), r"shared_memory_byte_size"),
            ]
            for request, pattern in cases:
                code, details = code_of(stub.ModelInfer, request)
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
                assert re.search(pattern, details), details
            # A request carrying both shared memory and raw contents is ambiguous.
            request = shm_infer_request(x, region.name, out_size=2048, out_offset=1024)
            request.raw_input_contents.append(x.tobytes())
            code, details = code_of(stub.ModelInfer, request)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents" in details
        finally:
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=region.name))


@pytest.mark.parametrize("key, pattern", [
    ("/etc/passwd", r"must name a POSIX shared-memory object"),
    ("../../etc/passwd", r"must name a POSIX shared-memory object"),
    ("..", r"must name a POSIX shared-memory object"),
    ("", r"must name a POSIX shared-memory object"),
    ("/nope-" + uuid.uuid4().hex, r"names no object"),
])
def test_hostile_keys(stub, key, pattern):
    code, details = code_of(stub.SystemSharedMemoryRegister,
                            pb.SystemSharedMemoryRegisterRequest(name="evil", key=key, byte_size=8))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and re.search(pattern, details), details
    assert "evil" not in stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions


def test_symlink_out_of_dev_shm_and_register_errors(stub, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * 4096)
    link = f"test_link_{uuid.uuid4().hex[:8]}"
    os.symlink(secret, "/dev/shm/" + link)
    try:
        code, details = code_of(stub.SystemSharedMemoryRegister,
                                pb.SystemSharedMemoryRegisterRequest(name="evil", key="/" + link, byte_size=8))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "Too many levels of symbolic links" in details
    finally:
        os.unlink("/dev/shm/" + link)
    with SharedMemoryRegion(64) as region:
        request = pb.SystemSharedMemoryRegisterRequest(name="dup", key=region.key, byte_size=64)
        stub.SystemSharedMemoryRegister(request)
        try:
            code, details = code_of(stub.SystemSharedMemoryRegister, request)
            assert code == grpc.StatusCode.ALREADY_EXISTS and "registered already" in details
            code, details = code_of(stub.SystemSharedMemoryRegister, pb.SystemSharedMemoryRegisterRequest(
                name="big", key=region.key, byte_size=65))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "past the end" in details
            code, _ = code_of(stub.SystemSharedMemoryStatus, pb.SystemSharedMemoryStatusRequest(name="nope"))
            assert code == grpc.StatusCode.NOT_FOUND
        finally:
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="dup"))


_CLIENT = textwrap.dedent("""
    import sys, numpy as np
    from client import ConvClient
    target, seed, crash = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "crash"
    x = np.random.default_rng(seed).standard_normal((1, 4, 20, 20)).astype(np.float32)
    with ConvClient(target, timeout=30) as c:
        expected = c.infer("shm", x)
        shm = c.shared_memory(1 << 16)
        region = shm.__enter__()
        for _ in range(5):
            y = c.infer("shm", x, shared_memory=region)
            assert np.array_equal(y, expected)
        print(region.name, flush=True)
        if crash:
            import time
            time.sleep(120)  # killed here, still holding the region
        shm.__exit__(None, None, None)
    print("ok", flush=True)
""")


def test_regions_from_separate_client_processes(server, stub):
    procs = [subprocess.Popen([sys.executable, "-c", _CLIENT, server.target, str(i), "run"], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip().endswith("ok"), err[-3000:]
    # Each client unregistered its region on the way out.
    assert not [n for n in stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions
                if n.startswith("convclient-")]


def test_a_crashed_client_holding_a_region(server, stub, client):
    p = subprocess.Popen([sys.executable, "-c", _CLIENT, server.target, "9", "crash"], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        name = p.stdout.readline().strip()
        assert name.startswith("convclient-"), p.stderr.read()[-3000:]
        regions = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions
        key = regions[name].key
    finally:
        p.kill()
        p.wait(30)
    # Its resource tracker unlinks the object; the server, still holding it, reports that clearly, never crashes.
    for _ in range(200):
        if not os.path.exists("/dev/shm/" + key[1:]):
            break
        subprocess.run(["sleep", "0.05"])
    x = np.zeros((1, 4, 20, 20), np.float32)
    code, details = code_of(stub.ModelInfer, shm_infer_request(x, name, out_size=6400, out_offset=6400))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "was unlinked; unregister the region" in details
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=name))
    assert name not in stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions
    assert client.health()


def test_server_stop_releases_every_region(tmp_path):
    proc = ServerProcess(tmp_path / "models").start()
    try:
        with grpc.insecure_channel(proc.target) as channel, SharedMemoryRegion(4096) as region:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(name="left", key=region.key,
                                                                                 byte_size=4096))
            fds = os.listdir(f"/proc/{proc.proc.pid}/fd")
            held = [f for f in fds if os.path.realpath(f"/proc/{proc.proc.pid}/fd/{f}") ==
                    "/dev/shm/" + region.key[1:]]
            assert len(held) == (2 if _shm._shmguard is not None else 1)  # + the mapping's, when mapped
    finally:
        assert proc.stop() == 0, proc.log()


def test_no_shared_memory_and_auth_token(tmp_path):
    off = ServerProcess(tmp_path / "off", "--no-shared-memory").start()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    auth = ServerProcess(tmp_path / "auth", "--auth-token-file", str(token_file)).start()
    try:
        with grpc.insecure_channel(off.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert "system_shared_memory" not in stub.ServerMetadata(pb.ServerMetadataRequest()).extensions
            code, details = code_of(stub.SystemSharedMemoryRegister,
                                    pb.SystemSharedMemoryRegisterRequest(name="r", key="/x", byte_size=8))
            assert code == grpc.StatusCode.UNIMPLEMENTED and "--no-shared-memory" in details
            with ConvClient(off.target) as c:
                c.register_model("shm", LAYERS)
                with pytest.raises(ConvError, match="--no-shared-memory") as info:
                    with c.shared_memory(4096):
                        pass
                assert info.value.code == grpc.StatusCode.UNIMPLEMENTED
        with grpc.insecure_channel(auth.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for rpc, request in ((stub.SystemSharedMemoryStatus, pb.SystemSharedMemoryStatusRequest()),
                                 (stub.SystemSharedMemoryRegister, pb.SystemSharedMemoryRegisterRequest()),
                                 (stub.SystemSharedMemoryUnregister, pb.SystemSharedMemoryUnregisterRequest()),
                                 (stub.ModelStatistics, pb.ModelStatisticsRequest()),
                                 (stub.RepositoryIndex, pb.RepositoryIndexRequest())):
                assert code_of(rpc, request)[0] == grpc.StatusCode.UNAUTHENTICATED
            meta = stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=[("authorization", f"Bearer {TOKEN}")])
            assert "system_shared_memory" in meta.extensions
    finally:
        assert off.stop() == 0
        assert auth.stop() == 0


def test_a_client_that_shrinks_its_region_mid_call_gets_an_error_and_the_server_lives(tmp_path):
    """The server computes on the input where it lies in the mapping and into the output's place there; a client
    that truncates its object while the (calibrated, slow) call runs gets INVALID_ARGUMENT, not a dead server (the
    SIGBUS guard of server/_shmguard.c, or the size check if the call had not started yet)."""
    slow = slow_model()
    proc = ServerProcess(tmp_path / "models", *slow.server_args()).start()
    try:
        with ConvClient(proc.target, timeout=120.0) as c:
            c.register_model("slow", slow.layers())
            x = slow.input
            with c.shared_memory(2 * x.nbytes + 64) as region:
                delay = 0.3 * slow.seconds
                timer = threading.Timer(delay, os.truncate, ("/dev/shm/" + region.key[1:], 4096))
                started = time.monotonic()
                timer.start()
                try:
                    with pytest.raises(ConvError, match=r"shrank") as info:
                        c.infer("slow", x, shared_memory=region)
                finally:
                    timer.join(60)
                require_longer("the shared-memory call", time.monotonic() - started, delay)
                assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
            np.testing.assert_array_equal(c.infer("slow", x), x)  # alive, and the model is the identity
    finally:
        assert proc.stop() == 0, proc.log()
