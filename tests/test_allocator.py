"""The server keeps the memory a call frees for the next call (server._compute.configure_allocator): a stream of
MiB-sized calls must not page-fault its buffers in again on every call. Counted with the kernel's minor-fault
counter of a real server process, which does not depend on the machine's speed."""
import os
import subprocess
import sys

import numpy as np
import pytest

from _server import ROOT, ServerProcess

needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc (Linux)")
#: 3x3 64->64 on 1x64x56x56 (issue 10's "medium"): 0.77 MiB in and out, i.e. 196 pages per fresh output buffer.
SHAPE = (1, 64, 56, 56)
PAGES = int(np.prod(SHAPE)) * 4 // 4096


def _minor_faults(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def _faults_per_call(tmp_path, env, batches=4, calls=8):
    """Minor faults per call of a server started with `env`: the fewest over `batches` batches of `calls` calls
    (other work of the process — a gRPC poller, Python's own arenas — adds a few faults now and then, and a loaded
    machine more; a buffer faulted in again on every call is in every batch)."""
    from client import ConvClient
    rng = np.random.default_rng(0)
    tmp_path.mkdir()
    proc = ServerProcess(tmp_path / "models", env=env).start()
    try:
        with ConvClient(proc.target, timeout=60) as c:
            c.register_model("m", [{"kernel": rng.standard_normal((64, 64, 3, 3)).astype(np.float32) * 0.05,
                                    "padding": "same"}])
            x = rng.standard_normal(SHAPE).astype(np.float32)
            for _ in range(5):  # plans built, heaps grown
                y = c.infer("m", x)
            per_batch = []
            for _ in range(batches):
                before = _minor_faults(proc.pid)
                for _ in range(calls):
                    y = c.infer("m", x)
                per_batch.append((_minor_faults(proc.pid) - before) / calls)
            faults = min(per_batch)
        log = proc.log()
    finally:
        assert proc.stop() == 0
    assert y.shape == SHAPE
    return faults, log


@needs_proc
def test_repeated_large_calls_do_not_page_fault_their_buffers_again(tmp_path):
    kept, log = _faults_per_call(tmp_path / "kept", {})
    assert "allocator: freed memory kept" in log, log
    # The same calls with glibc's own thresholds (an allocator variable in the environment turns ours off): this
    # is what the setting is for, so it must show here, or the check below proves nothing.
    default, log = _faults_per_call(tmp_path / "default", {"MALLOC_TOP_PAD_": str(128 << 10)})
    assert "allocator: from the environment (MALLOC_TOP_PAD_)" in log, log
    if default < PAGES:
        pytest.skip(f"this C library does not give freed heap memory back after every call ({default:.0f} minor "
                    f"faults per call without the setting)")
    # Fewer faults per call than one fresh output buffer has pages (measured: ~0-70 kept, 800-900 without).
    assert kept < PAGES < default, (kept, default)


def test_configure_allocator_leaves_an_environment_setting_alone():
    code = ("from server._compute import configure_allocator as c\n"
            "print(c({'MALLOC_TRIM_THRESHOLD_': '1'}))\n"
            "print(c({'GLIBC_TUNABLES': 'glibc.malloc.trim_threshold=1'}))\n"
            "print(c({'GLIBC_TUNABLES': 'glibc.rtld.x=1'}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "from the environment (MALLOC_TRIM_THRESHOLD_)"
    assert lines[1] == "from the environment (GLIBC_TUNABLES)"
    assert lines[2].startswith("freed memory kept (mmap threshold 32 MiB, trim threshold 64 MiB)") or \
        lines[2].startswith("the C library's defaults"), lines[2]
