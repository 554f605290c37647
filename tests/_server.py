"""Start a real server process for the service tests (``python -m server`` on 127.0.0.1, a free port, a model
repository in a temporary folder) and stop or kill it. No mocked transport anywhere.

Fixtures (import them into a test module to use them)::

    from _server import server, client  # noqa: F401  (pytest finds fixtures imported into a module)
"""
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

__all__ = ["ServerProcess", "server", "client"]


class ServerProcess:
    """``python -m server`` as a child process.

    Parameters
    ----------
    repository : path
        The model repository folder.
    *args : str
        Extra command-line flags (``"--max-message-mb", "1"``).
    env : dict, optional
        Extra environment variables.
    """

    def __init__(self, repository, *args, env=None):
        self.repository = str(repository)
        self.args = list(args)
        self.env = env or {}
        self.proc = None
        self.port = None
        self._log_path = os.path.join(os.path.dirname(self.repository.rstrip("/")) or ".",
                                      f"server-{os.path.basename(self.repository)}-{id(self)}.log")

    @property
    def target(self):
        return f"127.0.0.1:{self.port}"

    def start(self, timeout=30.0):
        """Start and wait until the server has bound its port and is serving; return self."""
        port_file = self._log_path + ".port"
        if os.path.exists(port_file):
            os.unlink(port_file)
        env = {**os.environ, **self.env}
        # The server must import the package from the source tree even when pytest runs from elsewhere.
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self._log = open(self._log_path, "ab")
        self.proc = subprocess.Popen(
            # --metrics-port 0: a free port, never the default 8002 another server on this machine may hold.
            [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0", "--port-file", port_file,
             "--metrics-port", "0",
             "--model-repository", self.repository, *self.args],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not os.path.exists(port_file):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before serving:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server did not start within {timeout} s:\n{self.log()}")
            time.sleep(0.05)
        with open(port_file) as f:
            self.port = int(f.read())
        return self

    def log(self):
        """Everything the server has logged so far."""
        with open(self._log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self, timeout=20.0):
        """SIGTERM, wait for a graceful exit; return the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self._log.close()

    def kill(self):
        """SIGKILL (like `kill -9`), no chance to clean up; return the exit code."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
            self._log.close()
        return self.proc.returncode if self.proc is not None else None


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
