"""Shared memory for a client on the server's host: the tensors travel through a POSIX shared-memory object and
only its name goes over gRPC (Triton's system shared-memory extension, spoken for the user).

A `SharedMemoryRegion` is one object this process creates in ``/dev/shm`` (mode 0600) and maps. It is registered
with ``multiprocessing``'s resource tracker, as ``multiprocessing.shared_memory`` does, so the tracker unlinks it even
if this process crashes. (``SharedMemory`` itself is not used: its ``close()`` fails, and warns again at garbage
collection, while a numpy array still views it; a plain ``mmap`` simply stays mapped until the last view goes.) The input is written at offset 0 and the server writes the output right
after it (at the next 64-byte boundary), into the rest of the region. `infer_request` / `read_output` build the
KServe v2 ``ModelInfer`` request with the ``shared_memory_region`` / ``shared_memory_byte_size`` /
``shared_memory_offset`` parameters and read the reply; the client registers the region with
``SystemSharedMemoryRegister`` under `SharedMemoryRegion.name` and unregisters it when done.
"""
import mmap
import os
import uuid
from multiprocessing import resource_tracker

import numpy as np

from convproto.inference import grpc_service_pb2 as kserve

from ._errors import invalid_argument
from ._ops import Op

__all__ = ["SharedMemoryRegion", "SharedMemoryContext", "infer_request", "read_output", "infer_op", "OUTPUT_ALIGNMENT"]

#: The output starts at the first multiple of this after the input (cache-line aligned for the server's copy).
OUTPUT_ALIGNMENT = 64
_SHM_DIR = "/dev/shm"
_DATATYPE = {np.dtype("<f4"): "FP32", np.dtype("<f8"): "FP64"}
_NUMPY = {v: k for k, v in _DATATYPE.items()}


class SharedMemoryRegion:
    """A POSIX shared-memory object created by this process, to register with a server on the same host.

    Parameters
    ----------
    nbytes : int
        Size of the object: it must hold the input and the output (plus up to 63 bytes of alignment).
    name : str, optional
        The region's name on the server (default: a fresh ``convclient-<hex>``).

    Attributes
    ----------
    name : str
        Region name (what ModelInfer refers to).
    key : str
        The object's shm_open name, ``"/convclient_..."`` (what SystemSharedMemoryRegister takes).
    nbytes : int
    """

    def __init__(self, nbytes, name=None):
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes < 1:
            raise invalid_argument(f"nbytes must be a positive int, got {nbytes!r}")
        self.nbytes = int(nbytes)
        self.name = name or f"convclient-{uuid.uuid4().hex[:16]}"
        self.key = f"/convclient_{uuid.uuid4().hex[:16]}"
        self._path = os.path.join(_SHM_DIR, self.key[1:])
        fd = os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self.nbytes)
            self._map = mmap.mmap(fd, self.nbytes)
        except BaseException:
            os.unlink(self._path)
            raise
        finally:
            os.close(fd)  # the mapping keeps the object
        resource_tracker.register(self.key, "shared_memory")
        self._closed = False

    def __repr__(self):
        return f"SharedMemoryRegion(name={self.name!r}, key={self.key!r}, nbytes={self.nbytes})"

    def _check_open(self):
        if self._closed:
            raise invalid_argument(f"shared-memory region {self.name!r} is closed")

    def array(self, shape, dtype, offset=0):
        """A writable array of `shape`/`dtype` viewing the region at `offset` (no copy)."""
        self._check_open()
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if offset < 0 or offset + count * dtype.itemsize > self.nbytes:
            raise invalid_argument(f"{count * dtype.itemsize} bytes at offset {offset} do not fit in shared-memory "
                                   f"region {self.name!r} ({self.nbytes} bytes)")
        return np.frombuffer(self._map, dtype, count, offset).reshape(shape)

    def write(self, x, offset=0):
        """Copy `x` into the region at `offset` (one copy, none if `x` is already that array: see `array`);
        return the number of bytes written."""
        x = np.asarray(x)
        target = self.array(x.shape, x.dtype, offset)
        if not (x.flags.c_contiguous and x.ctypes.data == target.ctypes.data):
            target[...] = x
        return x.nbytes

    def output_offset(self, input_nbytes):
        """Where the output goes when the input takes `input_nbytes` at offset 0."""
        return -(-input_nbytes // OUTPUT_ALIGNMENT) * OUTPUT_ALIGNMENT

    def close(self):
        """Unmap and unlink the object (idempotent). Arrays viewing it keep the mapping alive until dropped."""
        if self._closed:
            return
        self._closed = True
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass  # unlinked by someone else already
        resource_tracker.unregister(self.key, "shared_memory")
        try:
            self._map.close()
        except BufferError:
            pass  # an array still views it: the mapping goes with the last one (never a dangling pointer)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _shm_params(params, region, byte_size, offset):
    params["shared_memory_region"].string_param = region.name
    params["shared_memory_byte_size"].int64_param = byte_size
    if offset:
        params["shared_memory_offset"].int64_param = offset


def infer_request(model_name, x, region, input_name="input", output_name="output"):
    """Write `x` into `region` and build the ModelInfer request that points the server at it.

    A caller that builds its input in place, ``x = region.array(shape, dtype)`` and fills it, pays no copy here.

    Returns
    -------
    inference.ModelInferRequest
        Input at offset 0 of the region; output requested into the rest of it, from `output_offset`.

    Raises
    ------
    ConvError
        INVALID_ARGUMENT if `x` is not float32/float64 or does not leave room for an output in `region`.
    """
    x = np.asarray(x)
    if x.dtype.kind != "f" or x.dtype.itemsize not in (4, 8):
        raise invalid_argument(f"x must be float32 or float64, got dtype {x.dtype}")
    x = x.astype(x.dtype.newbyteorder("<"), copy=False)
    out_offset = region.output_offset(x.nbytes)
    if out_offset >= region.nbytes:
        raise invalid_argument(f"shared-memory region {region.name!r} has {region.nbytes} bytes: the input takes "
                               f"{x.nbytes} and leaves no room for the output; make the region larger")
    region.write(x)
    request = kserve.ModelInferRequest(model_name=model_name)
    tensor = request.inputs.add(name=input_name, datatype=_DATATYPE[x.dtype], shape=x.shape)
    _shm_params(tensor.parameters, region, x.nbytes, 0)
    out = request.outputs.add(name=output_name)
    _shm_params(out.parameters, region, region.nbytes - out_offset, out_offset)
    return request


def read_output(reply, region, input_nbytes):
    """The output of a shared-memory ModelInfer `reply`: a read-only array viewing `region` (no copy).

    It stays valid until the region is written again or closed.
    """
    out = reply.outputs[0]
    array = region.array(tuple(out.shape), _NUMPY[out.datatype], region.output_offset(input_nbytes))
    array.flags.writeable = False
    return array


def infer_op(name, x, region):
    """The `Op` of ``client.infer(name, x, shared_memory=region)``."""
    x = np.asarray(x)
    nbytes = x.nbytes
    return Op("kserve", "ModelInfer", infer_request(name, x, region), lambda reply: read_output(reply, region, nbytes))


class SharedMemoryContext:
    """What ``client.shared_memory(nbytes)`` returns: ``with`` (or ``async with`` on AsyncConvClient) gives a
    `SharedMemoryRegion` registered with the server, and unregisters and unlinks it on the way out, also on error."""

    def __init__(self, client, nbytes):
        self._client = client
        self._nbytes = nbytes
        self.region = None

    def _register(self):
        self.region = SharedMemoryRegion(self._nbytes)
        request = kserve.SystemSharedMemoryRegisterRequest(name=self.region.name, key=self.region.key, offset=0,
                                                           byte_size=self.region.nbytes)
        return Op("kserve", "SystemSharedMemoryRegister", request, lambda reply: self.region)

    def _unregister(self):
        return Op("kserve", "SystemSharedMemoryUnregister",
                  kserve.SystemSharedMemoryUnregisterRequest(name=self.region.name), lambda reply: None)

    def __enter__(self):
        op = self._register()
        try:
            return self._client._call(op)
        except BaseException:
            self.region.close()
            raise

    def __exit__(self, *exc):
        try:
            self._client._call(self._unregister())
        finally:
            self.region.close()

    async def __aenter__(self):
        op = self._register()
        try:
            return await self._client._call(op)
        except BaseException:
            self.region.close()
            raise

    async def __aexit__(self, *exc):
        try:
            await self._client._call(self._unregister())
        finally:
            self.region.close()
