"""The system shared-memory region registry of Triton's extension: co-located clients pass tensors through POSIX
shared memory and send only the region's name over gRPC.

Safety, because a client controls both the name and the object:

- Only POSIX shared-memory objects are opened: a key is a bare name under ``/dev/shm`` (Triton's leading ``/``
  allowed), with no other ``/``, no ``..``, no NUL; it is opened with ``O_NOFOLLOW`` (no symlink), must be a regular
  file on the ``/dev/shm`` filesystem itself (``st_dev``), and is never created by the server.
- Every access is checked against the region (``offset + size <= byte_size``) and against the object's real size
  (``fstat`` before each read or write), and refuses an object that was unlinked (``st_nlink == 0``).
- No copies: each region is mapped once, at registration, and a request computes on its input where it lies in the
  mapping and writes its output straight into the mapping (`_Access.input`, `_Access.output`). A mapped file that
  another process truncates raises SIGBUS on the next access past its new end, which would kill the server (no
  Python handler can resume a faulting copy, least of all inside convcore's OpenMP loops). So every mapping is
  registered with ``server._shmguard``, whose SIGBUS handler maps zero pages over a mapping that faults and flags
  it; the request checks the flag after its access (`_Access.verify`) and fails with a clear error. Without the
  built guard (or for a tensor not aligned to its item size) data moves with ``preadv``/``pwritev`` on the region's
  file descriptor instead, one copy each way, which a truncation turns into a short read, never a fault.
- The mapping and the descriptor stay while any request uses the region: unregistering a region in use only marks
  it, and the last user unmaps and closes it. A request that finds its region unregistered, shrunk or unlinked
  during its accesses gets an error naming it. A region that faulted stays unusable until registered again.
- `close` (server stop) closes every region, including those a crashed client left registered.
"""
import logging
import math
import mmap
import os
import re
import stat
import threading

import numpy as np

from ._errors import InvalidArgument, LimitExceeded, ModelExists, ModelNotFound

try:
    from . import _shmguard
except ImportError:  # not built (a source checkout without build_ext): copies through preadv/pwritev
    _shmguard = None

log = logging.getLogger("server")

#: Regions whose mapping could not be unmapped yet because an array still viewed it (kept guarded; `_reap` retries).
_LINGERING = []
_LINGERING_LOCK = threading.Lock()


def _reap():
    """Unmap the lingering mappings no array views any more."""
    with _LINGERING_LOCK:
        _LINGERING[:] = [r for r in _LINGERING if not r.unmap()]

__all__ = ["SharedMemoryRegistry", "SharedMemoryError", "RegionExists", "RegionNotFound", "SHM_DIR", "MAX_REGIONS"]

SHM_DIR = "/dev/shm"
#: Regions registered at once (each holds a file descriptor).
MAX_REGIONS = 256
_KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
_NAME_MAX = 256


class SharedMemoryError(InvalidArgument):
    """A region or an access to it is not usable (unknown, out of bounds, shrunk, unlinked); INVALID_ARGUMENT."""


class RegionNotFound(ModelNotFound):
    """SystemSharedMemoryStatus for a name that is not registered; NOT_FOUND."""


class RegionExists(ModelExists):
    """SystemSharedMemoryRegister for a name already registered (unregister it first); ALREADY_EXISTS."""


def _check_name(name):
    if not isinstance(name, str) or not 1 <= len(name) <= _NAME_MAX or not name.isprintable():
        raise SharedMemoryError(f"shared-memory region name must be 1 to {_NAME_MAX} printable characters, got "
                                f"{name!r}")
    return name


def shm_path(key):
    """The ``/dev/shm`` path of a POSIX shared-memory key (``"/name"`` or ``"name"``), or SharedMemoryError."""
    bare = key[1:] if isinstance(key, str) and key.startswith("/") else key
    if not isinstance(bare, str) or not _KEY_RE.fullmatch(bare):
        raise SharedMemoryError(f"shared-memory key must name a POSIX shared-memory object (shm_open's \"/name\": "
                                f"letters, digits, '.', '_', '-', at most 255, no other '/' and no leading '.'), "
                                f"got {key!r}")
    return os.path.join(SHM_DIR, bare)


def _check_uint(field, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise SharedMemoryError(f"{field} must be an int >= 0, got {value!r}")
    return int(value)


class _Region:
    __slots__ = ("name", "key", "offset", "byte_size", "fd", "users", "closed", "lock", "mapping", "bytes", "slot")

    def __init__(self, name, key, offset, byte_size, fd):
        self.name, self.key, self.offset, self.byte_size, self.fd = name, key, offset, byte_size, fd
        self.users = 0
        self.closed = False
        self.lock = threading.Lock()
        self.mapping = self.bytes = self.slot = None
        if _shmguard is not None:
            self._map()

    def _map(self):
        """Map the region once (from the page holding its first byte) under the SIGBUS guard."""
        start = self.offset - self.offset % mmap.ALLOCATIONGRANULARITY
        length = self.offset + self.byte_size - start
        try:
            self.mapping = mmap.mmap(self.fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                     offset=start)
        except ValueError:  # Python's own size check: the object shrank since register() looked at it
            raise SharedMemoryError(f"shared-memory region {self.name!r}: the object {self.key!r} shrank below "
                                    f"offset {self.offset} + byte_size {self.byte_size} while it was being "
                                    f"registered") from None
        except OSError as exc:  # e.g. no address space left: this region copies instead
            log.warning("cannot map shared-memory region %r (%s); it is read and written with copies", self.name,
                        exc.strerror)
            return
        whole = np.frombuffer(self.mapping, np.uint8)
        try:
            self.slot = _shmguard.protect(whole.ctypes.data, length)
        except RuntimeError:  # every guard slot taken (mappings still viewed): never map without the guard
            del whole
            self.mapping.close()
            self.mapping = None
            log.warning("no SIGBUS guard slot left for shared-memory region %r; it is read and written with copies",
                        self.name)
            return
        self.bytes = whole[self.offset - start:]  # the region's bytes, [0, byte_size)

    def faulted(self):
        return self.slot is not None and _shmguard.faulted(self.slot)

    def unmap(self):
        """Unmap if no array views the mapping any more (True when done); it stays guarded until then."""
        if self.mapping is None:
            return True
        self.bytes = None
        try:
            self.mapping.close()
        except BufferError:
            return False
        # After the unmap: a fault in between can only be this mapping's, and the guard still answers it.
        _shmguard.unprotect(self.slot)
        self.mapping = self.slot = None
        return True

    def close(self):
        """Unmap and close (the last user, or unregister with no user); lock held."""
        if not self.unmap():
            with _LINGERING_LOCK:
                _LINGERING.append(self)  # a request's array outlives its request: unmapped later, by `_reap`
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SharedMemoryRegistry:
    """The registered system shared-memory regions of one server.

    Parameters
    ----------
    max_regions : int
        Regions registered at once; one more is RESOURCE_EXHAUSTED.
    shm_dir : str
        Where POSIX shared-memory objects live (``/dev/shm`` on Linux; tests may point elsewhere).
    """

    def __init__(self, max_regions=MAX_REGIONS, shm_dir=SHM_DIR):
        self.max_regions = max_regions
        self._dir = shm_dir
        self._dev = os.stat(shm_dir).st_dev
        self._regions = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ registering
    def register(self, name, key, offset, byte_size):
        """Register ``[offset, offset + byte_size)`` of POSIX shared-memory object `key` under `name`.

        Raises
        ------
        SharedMemoryError
            Bad name, key, offset or size; no such object; not a shared-memory object; smaller than the region.
        RegionExists
            `name` is registered already.
        LimitExceeded
            `max_regions` are registered.
        """
        _check_name(name)
        offset = _check_uint("offset", offset)
        byte_size = _check_uint("byte_size", byte_size)
        if byte_size == 0:
            raise SharedMemoryError(f"byte_size of shared-memory region {name!r} must be > 0, got 0")
        path = os.path.join(self._dir, os.path.basename(shm_path(key)))
        _reap()
        with self._lock:  # checked before opening, again after, so a refused name never costs an open
            self._check_free(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise SharedMemoryError(f"shared-memory key {key!r} names no object (no {path}); create it with "
                                    f"shm_open first") from None
        except OSError as exc:
            raise SharedMemoryError(f"cannot open shared-memory key {key!r} ({path}): {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_dev != self._dev:
                raise SharedMemoryError(f"shared-memory key {key!r} is not a POSIX shared-memory object in "
                                        f"{self._dir}")
            if offset + byte_size > st.st_size:
                raise SharedMemoryError(f"shared-memory region {name!r}: offset {offset} + byte_size {byte_size} "
                                        f"= {offset + byte_size} is past the end of {key!r} ({st.st_size} bytes)")
            with self._lock:
                self._check_free(name)
                self._regions[name] = _Region(name, key, offset, byte_size, fd)
        except BaseException:
            os.close(fd)
            raise

    def _check_free(self, name):
        if name in self._regions:
            raise RegionExists(f"shared-memory region {name!r} is registered already; unregister it first")
        if len(self._regions) >= self.max_regions:
            raise LimitExceeded(f"{len(self._regions)} shared-memory regions are registered, the server's limit; "
                                f"unregister some")

    def status(self, name=""):
        """``[(name, key, offset, byte_size)]`` of region `name`, or of every region when `name` is empty.

        Raises RegionNotFound for an unknown `name`.
        """
        with self._lock:
            if name:
                region = self._regions.get(name)
                if region is None:
                    raise RegionNotFound(name, f"shared-memory region {name!r} is not registered")
                regions = [region]
            else:
                regions = sorted(self._regions.values(), key=lambda r: r.name)
            return [(r.name, r.key, r.offset, r.byte_size) for r in regions]

    def unregister(self, name=""):
        """Unregister region `name` (every region when empty); an unknown name is a no-op, as in Triton.

        A region in use is closed when its last request is done with it; that request's next access fails.
        """
        with self._lock:
            if name:
                region = self._regions.pop(name, None)
                regions = [region] if region is not None else []
            else:
                regions = list(self._regions.values())
                self._regions.clear()
        for region in regions:
            self._retire(region)
        _reap()

    def close(self):
        """Unregister everything (server stop); regions in use close when their requests finish."""
        self.unregister("")

    def names(self):
        with self._lock:
            return sorted(self._regions)

    @staticmethod
    def _retire(region):
        with region.lock:
            region.closed = True
            if region.users == 0:
                region.close()

    # ------------------------------------------------------------------ using
    def use(self, name):
        """A context manager holding region `name` open for one request: ``with registry.use(n) as access: ...``.

        Raises SharedMemoryError if `name` is not registered.
        """
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                raise SharedMemoryError(f"shared-memory region {name!r} is not registered (see "
                                        f"SystemSharedMemoryRegister)")
            with region.lock:
                region.users += 1
        return _Access(region)

    def read(self, name, offset, byte_size, dtype, shape, out=None):
        """Copy a tensor out of region `name` (one-shot `use` + `_Access.read`)."""
        with self.use(name) as access:
            return access.read(offset, byte_size, dtype, shape, out)

    def write(self, name, offset, byte_size, array):
        """Copy `array` into region `name` (one-shot `use` + `_Access.write`)."""
        with self.use(name) as access:
            access.write(offset, byte_size, array)


class _Access:
    """One request's hold on a region: bounds-checked, size-checked reads and writes, then release.

    A request whose input and output are in the same region (what Triton's clients and our SDK send) uses one
    access for both: the object's size is read once for the two checks before the compute (`_check`; the SIGBUS
    guard covers a shrink after it), and `verify` once after it.
    """

    __slots__ = ("_region", "_stat")

    def __init__(self, region):
        self._region = region
        self._stat = None  # the object's fstat, taken by the first check of this access

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def release(self):
        region, self._region = self._region, None
        if region is None:
            return
        with region.lock:
            region.users -= 1
            if region.closed and region.users == 0:
                region.close()

    @property
    def byte_size(self):
        return self._region.byte_size

    @property
    def name(self):
        """The region's registered name."""
        return self._region.name

    def _check(self, what, offset, nbytes, byte_size):
        """Bounds within the region, then the live object: returns the absolute file offset."""
        r = self._region
        offset = _check_uint(f"{what} shared_memory_offset", offset)
        if byte_size is not None and byte_size != nbytes and what == "input":
            raise SharedMemoryError(f"input shared_memory_byte_size is {byte_size}, the tensor needs {nbytes} bytes")
        if byte_size is not None and byte_size < nbytes:
            raise SharedMemoryError(f"{what} shared_memory_byte_size is {byte_size}, the tensor needs {nbytes} "
                                    f"bytes")
        span = nbytes if byte_size is None else byte_size
        if offset + span > r.byte_size:
            raise SharedMemoryError(f"{what}: shared_memory_offset {offset} + {span} bytes = {offset + span} is past "
                                    f"the end of region {r.name!r} ({r.byte_size} bytes)")
        if r.closed:
            raise SharedMemoryError(f"shared-memory region {r.name!r} was unregistered while this request used it")
        self._check_fault()
        st = self._stat
        if st is None or self._region.bytes is None:  # copies (no guard) re-read the size before each access
            st = self._stat = os.fstat(r.fd)
        if st.st_nlink == 0:
            raise SharedMemoryError(f"the shared-memory object {r.key!r} of region {r.name!r} was unlinked; "
                                    f"unregister the region")
        end = r.offset + offset + nbytes
        if end > st.st_size:
            raise SharedMemoryError(f"the shared-memory object {r.key!r} of region {r.name!r} shrank to "
                                    f"{st.st_size} bytes; this {what} needs bytes up to {end}")
        return r.offset + offset

    def _check_fault(self):
        if self._region.faulted():
            raise SharedMemoryError(f"the shared-memory object {self._region.key!r} of region {self._region.name!r} "
                                    f"shrank while a request used it; unregister the region and register it again")

    def _view(self, what, offset, byte_size, dtype, shape):
        """The region's bytes of a tensor as an array (no copy), or None when there is no guarded mapping or the
        tensor is not aligned to its item size (then `read`/`write` copy)."""
        dtype = np.dtype(dtype)
        if any(d < 0 for d in shape):
            raise SharedMemoryError(f"{what} shape {list(shape)} has a negative dimension")
        nbytes = math.prod(shape) * dtype.itemsize
        start = self._check(what, offset, nbytes, byte_size) - self._region.offset
        if self._region.bytes is None:
            return None
        view = self._region.bytes[start:start + nbytes].view(dtype).reshape(shape)
        return view if view.flags.aligned else None

    def input(self, offset, byte_size, dtype, shape):
        """The input tensor at `offset` where it lies in the mapping (read-only), or a copy (see `_view`). Call
        `verify` once it has been read."""
        view = self._view("input", offset, byte_size, dtype, shape)
        if view is None:
            return self.read(offset, byte_size, dtype, shape)
        view.flags.writeable = False
        return view

    def output(self, offset, byte_size, shape, dtype):
        """A writable array in the mapping for an output tensor at `offset`, or None (then compute elsewhere and
        `write` it). Call `verify` once it has been written."""
        return self._view("output", offset, byte_size, dtype, shape)

    def verify(self, what):
        """After reading or writing through the mapping: raise if the object shrank (SIGBUS guard), was unlinked, or
        the region was unregistered meanwhile."""
        self._check_fault()
        if self._region.closed or os.fstat(self._region.fd).st_nlink == 0:
            raise SharedMemoryError(f"shared-memory region {self._region.name!r} was unregistered or unlinked "
                                    f"while its {what} was used")

    def read(self, offset, byte_size, dtype, shape, out=None):
        """Copy ``prod(shape)`` items of `dtype` at `offset` in the region into `out` (or a new array).

        `byte_size` (the request's shared_memory_byte_size, or None) must equal the tensor's size.
        """
        dtype = np.dtype(dtype)
        if any(d < 0 for d in shape):
            raise SharedMemoryError(f"input shape {list(shape)} has a negative dimension")
        nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no int64 overflow to a small number
        pos = self._check("input", offset, nbytes, byte_size)
        if out is None:
            out = np.empty(shape, dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        got = 0
        while got < nbytes:  # preadv may return short on a huge read
            n = os.preadv(self._region.fd, [buf[got:]], pos + got)
            if n == 0:
                raise SharedMemoryError(f"the shared-memory object of region {self._region.name!r} shrank while "
                                        f"it was read ({got} of {nbytes} bytes)")
            got += n
        return out

    def write(self, offset, byte_size, array):
        """Copy `array` (C-contiguous) to `offset` in the region; `byte_size` (or None) must hold it."""
        array = np.ascontiguousarray(array)
        nbytes = array.nbytes
        self._stat = None  # after a compute: the object's size now, not the one checked before it
        pos = self._check("output", offset, nbytes, byte_size)
        buf = memoryview(array.reshape(-1).view(np.uint8))
        done = 0
        while done < nbytes:
            done += os.pwritev(self._region.fd, [buf[done:]], pos + done)
        # A truncation between the size check and the write extends the object back instead of faulting; tell.
        if os.fstat(self._region.fd).st_nlink == 0 or self._region.closed:
            raise SharedMemoryError(f"shared-memory region {self._region.name!r} was unregistered or unlinked "
                                    f"while the output was written")
