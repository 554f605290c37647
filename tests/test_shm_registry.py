"""server._shm.SharedMemoryRegistry in-process: register / status / unregister, bounds against the region and the
object's real size, hostile keys, and objects shrunk, unlinked or unregistered while a request uses them."""
import os
import re
import subprocess
import sys
import textwrap
import threading
import uuid

import numpy as np
import pytest

from _server import ROOT
from server import _shm
from server._errors import LimitExceeded
from server._shm import SHM_DIR, RegionExists, RegionNotFound, SharedMemoryError, SharedMemoryRegistry, shm_path

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="needs POSIX shared memory in /dev/shm")


@pytest.fixture
def shm_object():
    """Factory: a fresh POSIX shared-memory object of `size` bytes (its key, with Triton's leading '/')."""
    made = []

    def make(size, data=None):
        name = f"test_shm_{uuid.uuid4().hex[:12]}"
        fd = os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            if data is not None:
                os.pwrite(fd, data, 0)
        finally:
            os.close(fd)
        made.append(name)
        return "/" + name

    yield make
    for name in made:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass


@pytest.fixture
def registry():
    reg = SharedMemoryRegistry()
    yield reg
    reg.close()


def open_fds():
    return len(os.listdir("/proc/self/fd"))


#: Descriptors a registered region holds: its own, plus the one Python's mmap keeps when it is mapped (guard built).
FDS_PER_REGION = 2 if _shm._shmguard is not None else 1


def test_register_read_write_status_unregister(registry, shm_object):
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    key = shm_object(4096, x.tobytes())
    fds = open_fds()
    registry.register("in", key, 0, 96)
    registry.register("out", key, 1024, 2048)
    assert open_fds() == fds + 2 * FDS_PER_REGION
    assert registry.status() == [("in", key, 0, 96), ("out", key, 1024, 2048)]
    assert registry.status("out") == [("out", key, 1024, 2048)]
    got = registry.read("in", 0, 96, np.float32, (2, 3, 4))
    np.testing.assert_array_equal(got, x)
    assert got.flags.writeable and not np.shares_memory(got, x)
    y = (x * 2).astype(np.float64)
    registry.write("out", 8, 2040, y)
    with open(os.path.join(SHM_DIR, key[1:]), "rb") as f:
        f.seek(1024 + 8)
        assert f.read(y.nbytes) == y.tobytes()
    registry.unregister("in")
    assert registry.names() == ["out"]
    registry.unregister("never-registered")  # a no-op, as Triton's
    registry.unregister()
    assert registry.names() == [] and open_fds() == fds


def test_a_key_without_the_leading_slash_and_out_param_reuse(registry, shm_object):
    x = np.linspace(0, 1, 10)
    key = shm_object(x.nbytes, x.tobytes())
    registry.register("r", key[1:], 0, x.nbytes)
    out = np.empty(10)
    assert registry.read("r", 0, None, np.float64, (10,), out=out) is out
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("key", ["/etc/passwd", "../etc/passwd", "/../etc/passwd", "a/b", "..", ".", ".hidden",
                                 "", "/", "x\x00y", "//x", "a" * 256, 7, None])
def test_hostile_keys_are_refused(registry, key):
    with pytest.raises(SharedMemoryError, match=r"shared-memory key must name a POSIX shared-memory object"):
        registry.register("r", key, 0, 8)
    assert registry.names() == []


def test_symlinks_directories_fifos_and_missing_objects_are_refused(registry, shm_object, tmp_path):
    target = tmp_path / "secret"
    target.write_bytes(b"x" * 64)
    base = f"test_shm_{uuid.uuid4().hex[:8]}"
    link, inner_link, directory, fifo = (os.path.join(SHM_DIR, base + s) for s in ("_ln", "_ln2", "_dir", "_fifo"))
    os.symlink(target, link)
    os.symlink(os.path.join(SHM_DIR, shm_object(64)[1:]), inner_link)  # even to another shm object
    os.mkdir(directory)
    os.mkfifo(fifo)
    try:
        for path in (link, inner_link):
            with pytest.raises(SharedMemoryError, match=r"cannot open shared-memory key .*: Too many levels"):
                registry.register("r", "/" + os.path.basename(path), 0, 8)
        with pytest.raises(SharedMemoryError, match=r"cannot open .*Is a directory"):
            registry.register("r", "/" + os.path.basename(directory), 0, 8)
        with pytest.raises(SharedMemoryError, match=r"is not a POSIX shared-memory object"):
            registry.register("r", "/" + os.path.basename(fifo), 0, 8)
        with pytest.raises(SharedMemoryError, match=r"names no object \(no /dev/shm/nope_"):
            registry.register("r", "/nope_" + uuid.uuid4().hex, 0, 8)
    finally:
        for path in (link, inner_link, fifo):
            os.unlink(path)
        os.rmdir(directory)
    assert registry.names() == []


@pytest.mark.parametrize("name, offset, size, match", [
    ("", 0, 8, r"region name must be 1 to 256 printable characters, got ''"),
    ("a\nb", 0, 8, r"printable characters, got 'a\\nb'"),
    ("r", -1, 8, r"offset must be an int >= 0, got -1"),
    ("r", 0, 0, r"byte_size of shared-memory region 'r' must be > 0, got 0"),
    ("r", 0, 2.5, r"byte_size must be an int >= 0, got 2.5"),
    ("r", 60, 8, r"offset 60 \+ byte_size 8 = 68 is past the end of '/test_shm_\w+' \(64 bytes\)"),
    ("r", 2**64 - 1, 2, r"is past the end"),
])
def test_bad_register_arguments(registry, shm_object, name, offset, size, match):
    key = shm_object(64)
    with pytest.raises(SharedMemoryError, match=match):
        registry.register(name, key, offset, size)


def test_duplicate_names_and_the_region_limit(shm_object):
    registry = SharedMemoryRegistry(max_regions=2)
    key = shm_object(64)
    registry.register("a", key, 0, 8)
    with pytest.raises(RegionExists, match=r"region 'a' is registered already; unregister it first"):
        registry.register("a", key, 8, 8)
    registry.register("b", key, 8, 8)
    with pytest.raises(LimitExceeded, match=r"2 shared-memory regions are registered, the server's limit"):
        registry.register("c", key, 16, 8)
    registry.close()
    assert registry.names() == []


def test_accesses_are_checked_against_the_region(registry, shm_object):
    key = shm_object(256)
    registry.register("r", key, 128, 64)
    with pytest.raises(SharedMemoryError, match=r"region 'nope' is not registered"):
        registry.read("nope", 0, 8, np.float32, (2,))
    with pytest.raises(SharedMemoryError, match=r"input shared_memory_byte_size is 12, the tensor needs 8 bytes"):
        registry.read("r", 0, 12, np.float32, (2,))
    with pytest.raises(SharedMemoryError, match=r"input: shared_memory_offset 60 \+ 8 bytes = 68 is past the end of "
                                                r"region 'r' \(64 bytes\)"):
        registry.read("r", 60, 8, np.float32, (2,))
    with pytest.raises(SharedMemoryError, match=r"output shared_memory_byte_size is 8, the tensor needs 16 bytes"):
        registry.write("r", 0, 8, np.zeros(2))
    with pytest.raises(SharedMemoryError, match=r"output: shared_memory_offset 56 \+ 16 bytes = 72 is past the end"):
        registry.write("r", 56, None, np.zeros(2))
    with pytest.raises(SharedMemoryError, match=r"shared_memory_offset must be an int >= 0, got -8"):
        registry.write("r", -8, None, np.zeros(1))
    with pytest.raises(RegionNotFound, match=r"region 'nope' is not registered"):
        registry.status("nope")
    with pytest.raises(SharedMemoryError, match=r"input shape \[2, -1\] has a negative dimension"):
        registry.read("r", 0, 8, np.float32, (2, -1))
    with pytest.raises(SharedMemoryError, match=r"past the end of region 'r'"):
        registry.read("r", 0, None, np.float32, (2**62, 2**62))  # would wrap to 0 bytes in int64


def test_a_shrunk_object_gives_an_error_not_a_crash(registry, shm_object):
    key = shm_object(4096, np.ones(512).tobytes())
    registry.register("r", key, 0, 4096)
    os.truncate(os.path.join(SHM_DIR, key[1:]), 100)
    with pytest.raises(SharedMemoryError, match=r"object '/test_shm_\w+' of region 'r' shrank to 100 bytes; this "
                                                r"input needs bytes up to 4096"):
        registry.read("r", 0, 4096, np.float64, (512,))
    with pytest.raises(SharedMemoryError, match=r"shrank to 100 bytes; this output needs bytes up to 800"):
        registry.write("r", 0, None, np.zeros(100))
    np.testing.assert_array_equal(registry.read("r", 0, 96, np.float64, (12,)), np.ones(12))  # what is left


def test_an_unlinked_object_gives_an_error(registry, shm_object):
    key = shm_object(64)
    registry.register("r", key, 0, 64)
    os.unlink(os.path.join(SHM_DIR, key[1:]))
    with pytest.raises(SharedMemoryError, match=r"object '/test_shm_\w+' of region 'r' was unlinked; unregister"):
        registry.read("r", 0, 64, np.uint8, (64,))
    registry.unregister("r")


def test_unregistered_while_in_use_fails_the_next_access_and_closes_after(registry, shm_object):
    key = shm_object(64, bytes(range(64)))
    fds = open_fds()
    registry.register("r", key, 0, 64)
    with registry.use("r") as access:
        np.testing.assert_array_equal(access.read(0, 16, np.uint8, (16,)), np.arange(16))
        registry.unregister("r")
        assert open_fds() == fds + FDS_PER_REGION  # still open: this request holds it
        with pytest.raises(SharedMemoryError, match=r"region 'r' was unregistered while this request used it"):
            access.write(0, None, np.zeros(4))
    assert open_fds() == fds
    with pytest.raises(SharedMemoryError, match=r"region 'r' is not registered"):
        registry.read("r", 0, 16, np.uint8, (16,))


def test_close_releases_what_a_crashed_client_left(shm_object):
    fds = open_fds()
    registry = SharedMemoryRegistry()
    for i in range(5):
        registry.register(f"r{i}", shm_object(64), 0, 64)
    assert open_fds() == fds + 5 * FDS_PER_REGION
    registry.close()
    assert open_fds() == fds and registry.names() == []


def test_truncation_racing_with_reads_and_writes_never_crashes(registry, shm_object):
    """A client shrinking and regrowing its object as fast as it can while requests copy: errors, never SIGBUS.

    Bounded in count, not time. With a memory mapping this test would kill the interpreter.
    """
    size = 1 << 20
    key = shm_object(size)
    path = os.path.join(SHM_DIR, key[1:])
    registry.register("r", key, 0, size)
    stop = threading.Event()

    def churn():
        fd = os.open(path, os.O_RDWR)
        try:
            while not stop.is_set():
                os.ftruncate(fd, 4096)
                os.ftruncate(fd, size)
        finally:
            os.close(fd)

    t = threading.Thread(target=churn)
    t.start()
    outcomes = {"ok": 0, "error": 0}
    data = np.ones(size // 8)
    try:
        for _ in range(300):
            try:
                registry.read("r", 0, size, np.float64, (size // 8,))
                registry.write("r", 0, None, data)
                outcomes["ok"] += 1
            except SharedMemoryError as exc:
                assert "shrank" in str(exc)
                outcomes["error"] += 1
    finally:
        stop.set()
        t.join(30)
    assert sum(outcomes.values()) == 300


def test_shm_path():
    assert shm_path("/abc") == "/dev/shm/abc" and shm_path("abc.1_x-y") == "/dev/shm/abc.1_x-y"


_GUARD_CHILD = textwrap.dedent("""
    import os, sys, threading
    import numpy as np
    from server._shm import SHM_DIR, SharedMemoryError, SharedMemoryRegistry, _shmguard
    assert _shmguard is not None, "server._shmguard is not built"
    name = f"test_shm_guard_{os.getpid()}"
    path, size = os.path.join(SHM_DIR, name), 1 << 20
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, size)
    os.pwrite(fd, np.full(size // 4, 2.0, np.float32).tobytes(), 0)
    registry = SharedMemoryRegistry()
    try:
        # 1. Deterministic: the object shrinks under a request that reads and writes through the mapping.
        registry.register("r", "/" + name, 0, size)
        with registry.use("r") as access:
            x = access.input(0, size, np.float32, (size // 4,))
            out = access.output(0, size, (size // 4,), np.float32)
            assert x.base is not None and out is not None and not x.flags.writeable  # views, not copies
            assert float(x[:1024].sum()) == 2048.0
            os.ftruncate(fd, 4096)  # the client shrinks its object
            x.sum()                 # reads past the new end: SIGBUS without the guard
            out[...] = 1.0          # and writes
            try:
                access.verify("input")
                print("no error")
            except SharedMemoryError as exc:
                print("error:", exc)
            del x, out
        try:
            registry.read("r", 0, 16, np.uint8, (16,))
            print("usable")
        except SharedMemoryError as exc:
            print("after:", exc)
        registry.unregister("r")
        # 2. Racing: a thread shrinks and regrows the object while requests compute through the mapping.
        os.ftruncate(fd, size)
        stop = threading.Event()
        def churn():
            while not stop.is_set():
                os.ftruncate(fd, 4096)
                os.ftruncate(fd, size)
        t = threading.Thread(target=churn)
        t.start()
        outcomes = {"ok": 0, "error": 0}
        try:
            for i in range(200):
                try:
                    registry.register("r", "/" + name, 0, size)
                except SharedMemoryError:
                    outcomes["error"] += 1  # registered while shrunk: refused, also fine
                    continue
                try:
                    with registry.use("r") as access:
                        x = access.input(0, size, np.float32, (size // 4,))
                        out = access.output(0, size, (size // 4,), np.float32)
                        np.multiply(x, 2.0, out=out)
                        access.verify("output")
                        outcomes["ok"] += 1
                except SharedMemoryError:
                    outcomes["error"] += 1
                finally:
                    x = out = None
                    registry.unregister("r")
        finally:
            stop.set()
            t.join(30)
        print("race:", outcomes["ok"] + outcomes["error"])
    finally:
        registry.close()
        os.close(fd)
        os.unlink(path)
""")


@pytest.mark.skipif(_shm._shmguard is None, reason="server._shmguard is not built")
def test_an_object_that_shrinks_under_the_mapping_gives_an_error_never_sigbus():
    """Zero-copy accesses go through the region's mapping: a client that truncates its object makes the next access
    past the end fault. The guard turns that into zero pages and an error for the request, once deterministically
    and then racing 200 requests; in a child process, so that a failure is a dead child, not a dead test run."""
    proc = subprocess.run([sys.executable, "-c", _GUARD_CHILD], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the child died (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    assert re.match(r"error: the shared-memory object '/test_shm_guard_\d+' of region 'r' shrank while a request "
                    r"used it; unregister the region and register it again", lines[0]), proc.stdout
    assert lines[1].startswith("after: the shared-memory object") and "shrank" in lines[1], proc.stdout
    assert lines[2] == "race: 200", proc.stdout


@pytest.mark.skipif(_shm._shmguard is None, reason="server._shmguard is not built")
def test_a_fault_outside_every_guarded_mapping_still_ends_the_process():
    """The guard answers only faults inside the mappings it was given; any other SIGBUS kills the process as it
    would have (here: a mapping of the child's own, truncated, then read past its end)."""
    code = textwrap.dedent("""
        import mmap, os
        import numpy as np
        from server import _shmguard
        guarded = mmap.mmap(-1, 1 << 16)
        _shmguard.protect(np.frombuffer(guarded, np.uint8).ctypes.data, 1 << 16)  # installs the handler
        path = f"/dev/shm/test_shm_foreign_{os.getpid()}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.unlink(path)
        os.ftruncate(fd, 1 << 16)
        other = np.frombuffer(mmap.mmap(fd, 1 << 16), np.uint8)
        os.ftruncate(fd, 0)
        print("before", flush=True)
        print(int(other[8192]), flush=True)  # SIGBUS, not ours
        print("survived", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines() == ["before"] and proc.returncode == -7, (proc.returncode, proc.stdout,
                                                                              proc.stderr)
