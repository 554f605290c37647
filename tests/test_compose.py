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
import subprocess
import sys
import urllib.request

import pytest

from _deploy import (check_server_args, dockerfile_stages, exec_form, flag, free_port, local_server_command,
                     module_args, replace_flag, server_env, wait_for_port_file)
from _server import ROOT

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse docker-compose.yml (test extra)")

COMPOSE = os.path.join(ROOT, "docker-compose.yml")


@pytest.fixture(scope="module")
def compose():
    with open(COMPOSE) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def dockerfile():
    """The Dockerfile as (instruction, argument) pairs, continuation lines joined, per stage."""
    return dockerfile_stages()


def _container_ports(service):
    ports = {str(p) for p in service.get("expose", [])}
    for spec in service.get("ports", []):
        ports.add(str(spec).rsplit(":", 1)[-1].split("/")[0])
    return ports


def test_server_service_agrees_with_the_server(compose, dockerfile):
    server = compose["services"]["server"]
    args = module_args(server["command"], "server")
    check_server_args(args)  # the server's own parser takes them, --help documents them, host 0.0.0.0
    port = flag(args, "--port")

    metrics_port = flag(args, "--metrics-port")
    assert _container_ports(server) == {port, metrics_port}, "exposed/published ports must be the ones served"
    assert server["deploy"]["replicas"] >= 2
    for published in map(str, server["ports"]):
        low, high = re.search(r":(\d+)-(\d+):", published).groups()
        assert int(high) - int(low) + 1 >= server["deploy"]["replicas"], f"{published}: one host port per replica"

    volume, mount = server["volumes"][0].split(":")[:2]
    assert mount == flag(args, "--model-repository")
    assert volume in compose["volumes"], "the model repository must be a named volume shared by the replicas"

    test = server["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert flag(module_args(test[1:], "server.healthcheck"), "--port") == port

    # The image runs the same thing when started without compose.
    runtime = dict(dockerfile[-1][1])  # the last stage; the last of each instruction wins, as in Docker
    assert exec_form(runtime["CMD"]) == server["command"]
    assert exec_form(runtime["HEALTHCHECK"].split("CMD", 1)[1].strip()) == test[1:]
    assert set(runtime["EXPOSE"].split()) == {port, metrics_port}
    assert mount in runtime["VOLUME"]


def test_loadtest_service_agrees_with_the_harness(compose):
    from client.loadtest import parse_args

    server, loadtest = compose["services"]["server"], compose["services"]["loadtest"]
    args = parse_args(module_args(loadtest["command"], "client.loadtest"))
    port = flag(server["command"], "--port")
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
    metrics_port = free_port()
    server_cmd = local_server_command(server_svc["command"], tmp_path / "models", port_file, metrics_port)
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(server_cmd, cwd=ROOT, env=server_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        port = wait_for_port_file(proc, port_file, tmp_path / "server.log")

        health = replace_flag(server_svc["healthcheck"]["test"][1:], "--port", port)
        res = subprocess.run([sys.executable] + health[1:], cwd=ROOT, env=server_env(), capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0 and "SERVING" in res.stdout, res.stdout + res.stderr

        # The compose target is dns:///server:PORT; here the "server" service is this process on 127.0.0.1.
        load = list(loadtest_svc["command"])
        load = replace_flag(load, "--target",
                            flag(load, "--target").replace("server", "127.0.0.1").rsplit(":", 1)[0] + f":{port}")
        load = replace_flag(replace_flag(replace_flag(load, "--duration", "2"), "--warmup", "0.5"), "--json",
                            str(tmp_path / "loadtest.json"))
        res = subprocess.run([sys.executable] + load[1:], cwd=ROOT, env=server_env(), capture_output=True, text=True,
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
    res = subprocess.run([sys.executable] + health[1:] + ["--timeout", "1"], cwd=ROOT, env=server_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
