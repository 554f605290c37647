"""Helpers shared by the deployment tests (tests/test_compose.py, tests/test_kubernetes.py): read the Dockerfile and
container commands, and check a server command line against ``python -m server`` itself.
"""
import functools
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time

from _server import ROOT

__all__ = ["DOCKERFILE", "server_env", "dockerfile_stages", "dockerfile_user", "exec_form", "flag", "replace_flag",
           "module_args", "free_port", "server_help", "check_server_args", "local_server_command", "wait_for_port_file"]

DOCKERFILE = os.path.join(ROOT, "Dockerfile")


def server_env():
    """The environment for a ``python -m ...`` child that must import this source tree."""
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def dockerfile_stages(path=DOCKERFILE):
    """The Dockerfile as a list of (FROM argument, [(instruction, argument), ...]) per stage, continuations joined."""
    with open(path) as f:
        text = re.sub(r"\\\n", " ", f.read())
    stages, instructions = [], []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            instructions = []
            stages.append((rest.strip(), instructions))
        instructions.append((word.upper(), rest.strip()))
    return stages


def dockerfile_user(stages):
    """(name, uid, gid) of the last ``USER`` of the runtime (last) stage, from the ``useradd``/``groupadd`` making it.

    The uid and gid must be given as numbers there (``--uid N``, ``--gid N``): Kubernetes' ``runAsUser`` needs them,
    and a user created without them gets whatever uid the base image's next free one is.
    """
    runtime = stages[-1][1]
    users = [arg for ins, arg in runtime if ins == "USER"]
    assert users, "the runtime stage has no USER"
    name = users[-1].split(":")[0]
    uid = group = None
    gids = {}
    for command in re.split(r"&&|;", ";".join(arg for ins, arg in runtime if ins == "RUN")):
        words = shlex.split(command)
        if words[:1] == ["groupadd"] and "--gid" in words:
            gids[words[-1]] = int(flag(words, "--gid"))
        if words[:1] == ["useradd"] and words[-1] == name:
            uid, group = int(flag(words, "--uid")), flag(words, "--gid")
    assert uid is not None, f"no useradd --uid N --gid G {name} in the runtime stage"
    gid = int(group) if group.isdigit() else gids.get(group)
    assert gid is not None, f"group {group} of user {name} has no groupadd --gid N in the runtime stage"
    return name, uid, gid


def exec_form(argument):
    """A Dockerfile exec-form argument (a JSON list) as a list."""
    return json.loads(argument)


def flag(argv, name):
    """The value after flag ``name`` in ``argv``."""
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def replace_flag(argv, name, value):
    """A copy of ``argv`` with the value after flag ``name`` replaced."""
    argv = list(argv)
    argv[argv.index(name) + 1] = value
    return argv


def module_args(command, module):
    """The arguments of a ``python -m MODULE ...`` command (asserting that it is one)."""
    assert command[:3] == ["python", "-m", module], command
    return command[3:]


def free_port():
    """A TCP port free on 127.0.0.1 just now (for servers whose port cannot be 0 because the test must know it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@functools.lru_cache(maxsize=1)
def server_help():
    """What ``python -m server --help`` prints (run once per test session)."""
    res = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT, env=server_env(), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def check_server_args(args):
    """Check a container's ``python -m server`` arguments against the server; return its parsed configuration.

    Every flag must be one the server takes, with a value it accepts (its own parser, else SystemExit), and be
    documented in ``python -m server --help``; inside a container the server must listen on all interfaces.

    Returns
    -------
    (str, ServerConfig, str or None, str)
        What ``server.__main__.parse_args`` returns for ``args``.
    """
    from server.__main__ import parse_args

    parsed = parse_args(list(args))
    for name in (a for a in args if a.startswith("--")):
        assert name in server_help(), f"{name} is not in python -m server --help"
    assert flag(args, "--host") == "0.0.0.0", "inside a container the server must listen on all interfaces"
    return parsed


def local_server_command(command, repository, port_file, metrics_port):
    """A container's ``python -m server ...`` command, made to run here: this interpreter, 127.0.0.1, a free port
    written to ``port_file``, the model repository and metrics port given (the container's values replaced)."""
    command = replace_flag(replace_flag(command, "--host", "127.0.0.1"), "--port", "0")
    command = replace_flag(replace_flag(command, "--model-repository", str(repository)), "--metrics-port",
                           str(metrics_port))
    module_args(command, "server")  # asserts it is one
    return [sys.executable] + command[1:] + ["--port-file", str(port_file)]


def wait_for_port_file(proc, port_file, log_path, timeout=30.0):
    """Wait until the server process ``proc`` has written its port to ``port_file``; return the port as a string."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(port_file):
        assert proc.poll() is None, open(log_path, errors="replace").read()
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    with open(port_file) as f:
        return f.read().strip()
