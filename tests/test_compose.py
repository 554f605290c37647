"""docker-compose.yml and the Dockerfile agree with the code, and their commands run (no Docker engine needed).

No Docker engine runs on the development and CI machines, so instead of `docker compose up` this test:
- parses both files and checks each service's command, ports, volumes and health check against the code (the
  server's and the harness's own argument parsers, `python -m server --help`);
- runs the same commands locally: the server command (host and port remapped to a free loopback port, the model
  repository to a temporary folder), the health check command against it, and the load-test command against it
  for about two seconds.
"""
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from _server import ROOT

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse docker-compose.yml (test extra)")

COMPOSE = os.path.join(ROOT, "docker-compose.yml")
DOCKERFILE = os.path.join(ROOT, "Dockerfile")


def _env():
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def compose():
    with open(COMPOSE) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def dockerfile():
    """The Dockerfile as (instruction, argument) pairs, continuation lines joined, per stage."""
    with open(DOCKERFILE) as f:
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


def _flag(argv, name):
    """The value after flag ``name`` in ``argv``."""
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def _replace(argv, name, value):
    argv = list(argv)
    argv[argv.index(name) + 1] = value
    return argv


def _module_args(command, module):
    assert command[:3] == ["python", "-m", module], command
    return command[3:]


def _container_ports(service):
    ports = {str(p) for p in service.get("expose", [])}
    for spec in service.get("ports", []):
        ports.add(str(spec).rsplit(":", 1)[-1].split("/")[0])
    return ports


def _free_port():
    """A TCP port free on 127.0.0.1 just now (for servers whose port cannot be 0 because the test must know it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _exec_form(argument):
    """A Dockerfile exec-form argument (a JSON list) as a list."""
    return json.loads(argument)


def test_server_service_agrees_with_the_server(compose, dockerfile):
    from server.__main__ import parse_args as server_parse_args

    server = compose["services"]["server"]
    args = _module_args(server["command"], "server")
    server_parse_args(args)  # every flag is one the server takes, with a value it accepts (else SystemExit)
    port = _flag(args, "--port")
    assert _flag(args, "--host") == "0.0.0.0", "inside a container the server must listen on all interfaces"
    help_text = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT, env=_env(), capture_output=True,
                               text=True, timeout=60).stdout
    for flag in (a for a in args if a.startswith("--")):
        assert flag in help_text, f"{flag} is not in python -m server --help"

    metrics_port = _flag(args, "--metrics-port")
    assert _container_ports(server) == {port, metrics_port}, "exposed/published ports must be the ones served"
    assert server["deploy"]["replicas"] >= 2
    for published in map(str, server["ports"]):
        low, high = re.search(r":(\d+)-(\d+):", published).groups()
        assert int(high) - int(low) + 1 >= server["deploy"]["replicas"], f"{published}: one host port per replica"

    volume, mount = server["volumes"][0].split(":")[:2]
    assert mount == _flag(args, "--model-repository")
    assert volume in compose["volumes"], "the model repository must be a named volume shared by the replicas"

    test = server["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert _flag(_module_args(test[1:], "server.healthcheck"), "--port") == port

    # The image runs the same thing when started without compose.
    runtime = dict(dockerfile[-1][1])  # the last stage; the last of each instruction wins, as in Docker
    assert _exec_form(runtime["CMD"]) == server["command"]
    assert _exec_form(runtime["HEALTHCHECK"].split("CMD", 1)[1].strip()) == test[1:]
    assert set(runtime["EXPOSE"].split()) == {port, metrics_port}
    assert mount in runtime["VOLUME"]


def test_loadtest_service_agrees_with_the_harness(compose):
    from client.loadtest import parse_args

    server, loadtest = compose["services"]["server"], compose["services"]["loadtest"]
    args = parse_args(_module_args(loadtest["command"], "client.loadtest"))
    port = _flag(server["command"], "--port")
    # Client-side round_robin over every replica: gRPC's DNS resolver returns one address per container.
    assert args.target == f"dns:///server:{port}"
    assert loadtest["depends_on"]["server"]["condition"] == "service_healthy"
    mounts = [v.split(":")[1] for v in loadtest.get("volumes", [])]
    assert any(args.json.startswith(m + "/") for m in mounts), "--json must be written to a mounted volume"
    assert loadtest["image"] == server["image"] and loadtest["build"] == server["build"]


def test_dockerfile_is_multi_stage_portable_and_non_root(dockerfile):
    names = [stage for stage, _ in dockerfile]
    assert len(names) >= 2 and names[0].endswith("AS builder")
    builder = dict(dockerfile[0][1])
    assert "CONVCORE_NO_NATIVE=1" in builder["ENV"], "the builder must not compile with -march=native"
    runtime = dockerfile[-1][1]
    users = [arg for ins, arg in runtime if ins == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert not any(ins == "RUN" and "build-essential" in arg for ins, arg in runtime), "no compiler at run time"
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        ignored = f.read().split()
    assert ".git" in ignored and "**/*.so" in ignored


@pytest.mark.slow
def test_compose_commands_run_locally(compose, tmp_path):
    """The server, health check and load-test commands of docker-compose.yml, run here with ports remapped."""
    server_svc, loadtest_svc = compose["services"]["server"], compose["services"]["loadtest"]
    port_file = tmp_path / "port"
    metrics_port = _free_port()
    server_cmd = _replace(_replace(_replace(server_svc["command"], "--host", "127.0.0.1"), "--port", "0"),
                          "--model-repository", str(tmp_path / "models"))
    server_cmd = _replace(server_cmd, "--metrics-port", str(metrics_port))
    server_cmd = [sys.executable] + server_cmd[1:] + ["--port-file", str(port_file)]
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(server_cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        port = port_file.read_text().strip()

        health = _replace(server_svc["healthcheck"]["test"][1:], "--port", port)
        res = subprocess.run([sys.executable] + health[1:], cwd=ROOT, env=_env(), capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0 and "SERVING" in res.stdout, res.stdout + res.stderr

        # The compose target is dns:///server:PORT; here the "server" service is this process on 127.0.0.1.
        load = list(loadtest_svc["command"])
        load = _replace(load, "--target", _flag(load, "--target").replace("server", "127.0.0.1").rsplit(":", 1)[0]
                        + f":{port}")
        load = _replace(_replace(_replace(load, "--duration", "2"), "--warmup", "0.5"), "--json",
                        str(tmp_path / "loadtest.json"))
        res = subprocess.run([sys.executable] + load[1:], cwd=ROOT, env=_env(), capture_output=True, text=True,
                             timeout=180)
        assert res.returncode == 0, shlex.join(load) + "\n" + res.stdout + res.stderr
        doc = json.loads((tmp_path / "loadtest.json").read_text())
        assert doc["summary"]["requests"] > 0 and doc["summary"]["errors"] == 0, doc["summary"]
        assert doc["parameters"]["target"] == f"dns:///127.0.0.1:{port}"
        # What Prometheus would scrape from the container's metrics port.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        assert 'convserver_requests_total{grpc_code="OK",grpc_method="Infer"' in text
    finally:
        proc.terminate()
        rc = proc.wait(30)
        log.close()
    assert rc == 0, (tmp_path / "server.log").read_text()

    # And the health check reports failure once the server is gone (Docker would mark the container unhealthy).
    res = subprocess.run([sys.executable] + health[1:] + ["--timeout", "1"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
