"""client._shm in-process and across processes: the region a client creates, the ModelInfer request it builds,
read by the server's registry exactly as the KServe servicer reads it, and the output read back without a copy."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from _server import ROOT
from client import ConvError
from client._shm import OUTPUT_ALIGNMENT, SharedMemoryRegion, infer_request, read_output
from convproto.inference import grpc_service_pb2 as kserve
from server._shm import SHM_DIR, SharedMemoryError, SharedMemoryRegistry

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="needs POSIX shared memory in /dev/shm")


def params(p):
    return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in p.items()}


def test_request_layout_and_round_trip_through_the_registry():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)  # 840 bytes: the output starts at 896
    with SharedMemoryRegion(4096) as region:
        assert region.key.startswith("/") and os.path.exists(os.path.join(SHM_DIR, region.key[1:]))
        request = infer_request("m", x, region)
        assert request.model_name == "m"
        (tensor,) = request.inputs
        assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("input", "FP32", [2, 3, 5, 7])
        assert params(tensor.parameters) == {"shared_memory_region": region.name, "shared_memory_byte_size": 840}
        (out,) = request.outputs
        assert params(out.parameters) == {"shared_memory_region": region.name, "shared_memory_byte_size": 4096 - 896,
                                          "shared_memory_offset": 896}
        assert 896 % OUTPUT_ALIGNMENT == 0 and not request.raw_input_contents
        # The server side, as the servicer does it.
        registry = SharedMemoryRegistry()
        try:
            registry.register(region.name, region.key, 0, region.nbytes)
            got = registry.read(region.name, 0, 840, np.float32, (2, 3, 5, 7))
            np.testing.assert_array_equal(got, x)
            y = (got * 2).astype(np.float32)
            registry.write(region.name, 896, 4096 - 896, y)
        finally:
            registry.close()
        reply = kserve.ModelInferResponse(outputs=[kserve.ModelInferResponse.InferOutputTensor(
            name="output", datatype="FP32", shape=y.shape)])
        result = read_output(reply, region, x.nbytes)
        np.testing.assert_array_equal(result, x * 2)
        assert not result.flags.writeable and np.shares_memory(result, region.array((4096,), np.uint8))
    assert not os.path.exists(os.path.join(SHM_DIR, region.key[1:]))  # unlinked on exit
    region.close()  # idempotent


def test_an_input_built_in_the_region_is_not_copied_and_any_other_is():
    with SharedMemoryRegion(4096) as region:
        x = region.array((2, 3, 4, 4), np.float32)
        x[...] = np.arange(x.size, dtype=np.float32).reshape(x.shape)
        before = region.array((x.size,), np.float32).copy()
        infer_request("m", x, region)  # x is the region's own array at offset 0: nothing to copy
        np.testing.assert_array_equal(region.array((x.size,), np.float32), before)
        other = np.full((2, 3, 4, 4), 7.0, np.float32)
        infer_request("m", other, region)  # an array elsewhere is copied in
        np.testing.assert_array_equal(region.array(other.shape, np.float32), other)
        # A view of the region that is not at offset 0 is copied to offset 0, where the request says it is.
        shifted = region.array((2, 3, 4, 4), np.float32, offset=1024)
        shifted[...] = 3.0
        infer_request("m", shifted, region)
        np.testing.assert_array_equal(region.array((2, 3, 4, 4), np.float32), shifted)


def test_client_side_errors():
    with pytest.raises(ConvError, match=r"nbytes must be a positive int, got 0"):
        SharedMemoryRegion(0)
    with SharedMemoryRegion(64) as region:
        with pytest.raises(ConvError, match=r"leaves no room for the output; make the region larger"):
            infer_request("m", np.zeros(8), region)
        with pytest.raises(ConvError, match=r"x must be float32 or float64, got dtype int64"):
            infer_request("m", np.zeros(2, np.int64), region)
        with pytest.raises(ConvError, match=r"128 bytes at offset 0 do not fit in shared-memory region"):
            region.array((16,), np.float64)
    with pytest.raises(ConvError, match=r"is closed"):
        region.array((1,), np.uint8)


def test_a_region_of_another_process_and_its_crash():
    """A separate client process creates and fills a region, the registry reads it; then that process is killed
    while holding it: its resource tracker unlinks the object, and the server's next access says so clearly."""
    code = textwrap.dedent("""
        import sys, time, numpy as np
        from client._shm import SharedMemoryRegion
        region = SharedMemoryRegion(1024)
        region.write(np.arange(16, dtype=np.float64))
        print(region.key, flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": ROOT}, text=True)
    registry = SharedMemoryRegistry()
    try:
        key = proc.stdout.readline().strip()
        assert key.startswith("/"), proc.stderr.read()
        registry.register("theirs", key, 0, 1024)
        np.testing.assert_array_equal(registry.read("theirs", 0, 128, np.float64, (16,)), np.arange(16))
        proc.kill()
        proc.wait(30)
        # The tracker process notices its parent is gone and unlinks the object (give it time, bounded).
        path = os.path.join(SHM_DIR, key[1:])
        for _ in range(200):
            if not os.path.exists(path):
                break
            subprocess.run(["sleep", "0.05"])
        assert not os.path.exists(path), "the crashed client's resource tracker did not unlink its region"
        with pytest.raises(SharedMemoryError, match=r"was unlinked; unregister the region"):
            registry.read("theirs", 0, 128, np.float64, (16,))
        assert registry.status() == [("theirs", key, 0, 1024)]
    finally:
        if proc.poll() is None:
            proc.kill()
        registry.close()
    assert registry.names() == []
