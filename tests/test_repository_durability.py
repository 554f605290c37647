"""The repository makes a registration durable before it reports success: the temporary file is fsync'ed with all
its bytes before it is linked into place, and the folder is fsync'ed after the link (and after a delete).

No end-to-end test can see a missing fsync (`kill -9` keeps the page cache; only a power cut loses it), so this one
runs the repository in-process and records the system calls it makes, in order."""
import os

import numpy as np
import pytest

from convproto.convservice.v1 import conv_pb2
from server._codec import decode_registration
from server._repository import MODEL_SUFFIX, ModelRepository


def _layers():
    """The layers of a RegisterModelRequest, decoded as the server decodes them."""
    kernel = np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3)
    tensor = conv_pb2.Tensor(dtype=conv_pb2.DTYPE_FLOAT32, shape=kernel.shape, data=kernel.tobytes())
    return decode_registration(conv_pb2.RegisterModelRequest(name="x", layers=[conv_pb2.Layer(kernel=tensor)]))[1]


@pytest.fixture
def calls(monkeypatch):
    """Record fsync (what the descriptor is, and how many bytes it holds then), link, rename, replace and unlink."""
    log = []
    real = {name: getattr(os, name) for name in ("fsync", "link", "rename", "replace", "unlink")}

    def fsync(fd):
        st = os.fstat(fd)
        path = os.readlink(f"/proc/self/fd/{fd}")
        log.append(("fsync", path, "dir" if os.path.isdir(path) else st.st_size))
        return real["fsync"](fd)

    def recorder(name):
        def call(*args, **kwargs):
            log.append((name, *[os.fspath(a) for a in args[:2]]))
            return real[name](*args, **kwargs)
        return call

    monkeypatch.setattr(os, "fsync", fsync)
    for name in ("link", "rename", "replace", "unlink"):
        monkeypatch.setattr(os, name, recorder(name))
    return log


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to tell what an fd is")
def test_register_syncs_the_file_before_linking_it_and_the_folder_after(tmp_path, calls):
    repo = ModelRepository(str(tmp_path))
    repo.register("durable", _layers())
    final = str(tmp_path / ("durable" + MODEL_SUFFIX))
    size = os.path.getsize(final)
    publish = [i for i, c in enumerate(calls) if c[0] in ("link", "rename", "replace") and c[-1] == final]
    assert len(publish) == 1, calls
    tmp = calls[publish[0]][1]
    assert os.path.dirname(tmp) == str(tmp_path)  # same folder, so the link is atomic
    file_syncs = [i for i, c in enumerate(calls) if c == ("fsync", tmp, size)]
    dir_syncs = [i for i, c in enumerate(calls) if c == ("fsync", str(tmp_path), "dir")]
    assert file_syncs and file_syncs[0] < publish[0], f"temp file not synced (with all its bytes) before the link: " \
                                                      f"{calls}"
    assert any(i > publish[0] for i in dir_syncs), f"folder not synced after the link: {calls}"
    assert ModelRepository(str(tmp_path)).load_all() == (["durable"], [])


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to tell what an fd is")
def test_delete_syncs_the_folder_after_the_unlink(tmp_path, calls):
    repo = ModelRepository(str(tmp_path))
    repo.register("gone", _layers())
    del calls[:]
    repo.delete("gone")
    final = str(tmp_path / ("gone" + MODEL_SUFFIX))
    unlink = [i for i, c in enumerate(calls) if c == ("unlink", final)]
    assert len(unlink) == 1, calls
    assert any(c == ("fsync", str(tmp_path), "dir") for c in calls[unlink[0] + 1:]), calls
    assert ModelRepository(str(tmp_path)).load_all() == ([], [])
