"""Start a real server process for the service tests (``python -m server`` on 127.0.0.1, a free port, a model
repository in a temporary folder) and stop or kill it. No mocked transport anywhere.

The process helper is the one the benchmarks and the fuzzer use (``benchmarks._harness.ServerProcess``): it waits
until the server's health service says SERVING, keeps its log beside the repository folder, and offers ``stop()``
(SIGTERM, must exit), ``kill()`` (SIGKILL) and ``log()``.

Fixtures (import them into a test module to use them)::

    from _server import server, client  # noqa: F401  (pytest finds fixtures imported into a module)
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # pyproject's pytest `pythonpath` does this too; kept for a bare `import _server`
    sys.path.insert(0, ROOT)

from benchmarks._harness import ServerProcess  # noqa: E402

__all__ = ["ROOT", "ServerProcess", "server", "client"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server process per test module, stopped with SIGTERM at the end (it must exit 0)."""
    proc = ServerProcess(tmp_path_factory.mktemp("repo") / "models").start()
    yield proc
    rc = proc.stop()
    assert rc == 0, f"server exited with {rc} on SIGTERM:\n{proc.log()}"


@pytest.fixture(scope="module")
def client(server):
    """A ConvClient connected to the module's server."""
    from client import ConvClient

    with ConvClient(server.target, timeout=30.0) as c:
        yield c
