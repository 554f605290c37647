"""``python -m client.loadtest`` as a user runs it: a subprocess against a real server process on a loopback port."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from _server import ROOT, server  # noqa: F401  (pytest finds fixtures imported into a module)

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run_loadtest(*args, timeout=120):
    """Run the harness; return the CompletedProcess (text)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "client.loadtest", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _models(target):
    from client import ConvClient

    with ConvClient(target, timeout=30.0) as c:
        return c.list_models()


def test_closed_loop_prints_summary_and_writes_json_and_png(server, tmp_path):  # noqa: F811
    out_json, out_png = tmp_path / "run.json", tmp_path / "run.png"
    args = ["--target", server.target, "--layer", "3x3,8->8,same,relu", "--input", "1x8x16x16",
            "--duration", "2", "--warmup", "0.5", "--concurrency", "2", "--json", str(out_json)]
    if HAVE_MATPLOTLIB:
        args += ["--plot", str(out_png)]
    res = run_loadtest(*args)
    assert res.returncode == 0, res.stderr + res.stdout
    for word in ("requests", "req/s", "GFLOP/s", "min", "p50", "p90", "p99", "p99.9", "max", "errors     none"):
        assert word in res.stdout, (word, res.stdout)
    assert "requests" in res.stderr  # the progress line (stderr is a pipe here: at least the first line)

    doc = json.loads(out_json.read_text())
    summary, params = doc["summary"], doc["parameters"]
    assert summary["requests"] > 0 and summary["errors"] == 0 and summary["ok"] == summary["requests"]
    assert summary["req_per_s"] > 0 and summary["gflops"] > 0
    lat = summary["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert params["concurrency"] == 2 and params["duration_s"] == 2.0 and params["mode"] == "closed"
    assert params["flops_per_request"] == 2 * 1 * 8 * 16 * 16 * 8 * 9
    assert params["layer"] == "3x3,8->8,same,relu" and params["input"] == "1x8x16x16"
    assert summary["gflops"] == pytest.approx(summary["ok"] * params["flops_per_request"] / summary["elapsed_s"] / 1e9)
    assert sum(doc["histogram_ms"]["counts"]) == summary["requests"]
    # The printed numbers are the JSON's numbers.
    assert f"requests   {summary['requests']} " in res.stdout
    assert f"{summary['req_per_s']:.1f} req/s" in res.stdout
    # The model registered for the run is gone afterwards.
    assert params["model"] not in _models(server.target)
    if HAVE_MATPLOTLIB:
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        pytest.skip("matplotlib is not installed: the PNG part was not checked")


def test_open_loop_sends_the_scheduled_number_of_requests(server, tmp_path):  # noqa: F811
    out_json = tmp_path / "open.json"
    res = run_loadtest("--target", server.target, "--layer", "1x1,4->4", "--input", "1x4x8x8", "--rate", "25",
                       "--concurrency", "4", "--duration", "2", "--warmup", "0.4", "--json", str(out_json))
    assert res.returncode == 0, res.stderr + res.stdout
    assert "open loop at 25 req/s" in res.stdout and "send lag" in res.stdout
    doc = json.loads(out_json.read_text())
    summary = doc["summary"]
    # A fixed schedule: exactly rate x duration requests are due in the measured window, sent or not.
    assert summary["requests"] == 50
    assert summary["errors"] == 0, summary["errors_by_code"]
    assert doc["parameters"]["mode"] == "open" and doc["parameters"]["rate"] == 25.0
    assert summary["send_lag_ms"]["p50"] is not None


def test_registered_model_with_two_processes(server, tmp_path):  # noqa: F811
    from client import ConvClient
    from client.loadtest import model_flops

    rng = np.random.default_rng(0)
    layers = [{"kernel": rng.standard_normal((8, 3, 3, 3)).astype(np.float64), "strides": 2, "padding": "same",
               "activation": "relu"},
              {"kernel": rng.standard_normal((4, 8, 1, 1)).astype(np.float64)}]
    with ConvClient(server.target, timeout=30.0) as c:
        c.register_model("lt-two-layers", layers)
    out_json = tmp_path / "model.json"
    # The same server twice: the multi-target path (round_robin over an address list) with two client processes.
    res = run_loadtest("--target", f"{server.target},{server.target}", "--model", "lt-two-layers",
                       "--input", "2x3x16x16", "--concurrency", "2", "--processes", "2", "--duration", "1.5",
                       "--warmup", "0.3", "--json", str(out_json))
    assert res.returncode == 0, res.stderr + res.stdout
    doc = json.loads(out_json.read_text())
    assert doc["parameters"]["dtype"] == "float64"  # the model's dtype, since --dtype was not given
    assert doc["parameters"]["processes"] == 2 and doc["parameters"]["output"] == "2x4x8x8"
    expected, _ = model_flops((2, 3, 16, 16), [{"kernel_shape": (8, 3, 3, 3), "strides": 2, "padding": "same"},
                                               {"kernel_shape": (4, 8, 1, 1)}])
    assert doc["parameters"]["flops_per_request"] == expected
    assert doc["summary"]["requests"] > 0 and doc["summary"]["errors"] == 0
    assert "lt-two-layers" in _models(server.target)  # --model is never deleted


def test_unknown_model_fails_before_the_run(server):  # noqa: F811
    res = run_loadtest("--target", server.target, "--model", "no-such-model", "--input", "1x3x8x8",
                       "--duration", "1")
    assert res.returncode == 1
    assert "NOT_FOUND" in res.stderr and "no-such-model" in res.stderr


def test_bad_command_line_exits_2():
    res = run_loadtest("--target", "127.0.0.1:1", "--layer", "3x3,8->8", "--input", "1x4x8x8")
    assert res.returncode == 2 and "CIN=8" in res.stderr
