"""Interop with Triton's own, unmodified tools: tritonclient[grpc]==2.41.0 and perf_analyzer, run in a subprocess
from the virtualenv that scripts/triton_venv.sh creates (once, then cached in .venv-triton/): tritonclient brings
its own `inference.*` protobuf messages, which cannot share a process with ours.

The first run installs that environment (pip, and Debian's libb64-0d through apt-get), which needs the network."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from _server import ROOT, client, server  # noqa: F401  (fixtures)

SCRIPTS = os.path.join(ROOT, "scripts")


@pytest.fixture(scope="module")
def triton_python():
    """The Triton virtualenv's interpreter (created on first use)."""
    out = subprocess.run([os.path.join(SCRIPTS, "triton_venv.sh")], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"scripts/triton_venv.sh failed:\n{out.stderr[-4000:]}"
    return os.path.join(out.stdout.strip().splitlines()[-1], "bin", "python")


def test_protos_match_tritonclient(triton_python):
    """Every message, field number, type, enum value and RPC we define is exactly Triton's (names and numbers as
    published; tritonclient 2.41.0 predates four newer fields and one message we carry: they are the only ones it
    may lack)."""
    script = os.path.join(SCRIPTS, "proto_descriptors.py")
    ours = json.loads(subprocess.run([sys.executable, script, "ours"], capture_output=True, text=True, cwd=ROOT,
                                     timeout=60, check=True).stdout)
    theirs = json.loads(subprocess.run([triton_python, script, "tritonclient"], capture_output=True, text=True,
                                       timeout=60, check=True).stdout)
    newer = {("inference.ModelInput", "is_non_linear_format_io"), ("inference.ModelOutput", "is_non_linear_format_io"),
             ("inference.ModelConfig", "runtime"), ("inference.ModelStatistics", "response_stats")}
    newer_messages = {"inference.InferResponseStatistics", "inference.ModelStatistics.ResponseStatsEntry"}
    assert len(ours) > 30
    for name, members in ours.items():
        if name in newer_messages and name not in theirs:
            continue
        assert name in theirs, f"{name} is not in Triton's protos"
        for member, spec in members.items():
            if (name, member) in newer and member not in theirs[name]:
                continue
            assert theirs[name].get(member) == spec, (name, member, spec, theirs[name].get(member))


def test_tritonclient_infer_matches_conv_client(server, client, triton_python, tmp_path):
    rng = np.random.default_rng(0)
    layers = [{"kernel": rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "padding": "same",
               "activation": "relu"},
              {"kernel": rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "bias": np.ones(4, np.float32)}]
    client.register_model("tri", layers)
    x = rng.standard_normal((2, 3, 12, 10)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = subprocess.run([triton_python, os.path.join(SCRIPTS, "triton_interop.py"), server.target, "tri",
                          str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["live"] and report["ready"] and report["model_ready"]
    assert sorted(report["server_metadata"]["extensions"]) == ["model_configuration", "statistics",
                                                               "system_shared_memory"]
    assert report["metadata"]["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "3", "-1", "-1"]}]
    assert report["metadata"]["outputs"] == [{"name": "output", "datatype": "FP32", "shape": ["-1", "4", "-1", "-1"]}]
    assert int(report["config"]["config"]["max_batch_size"]) > 0
    assert report["response_id"] == "req-42" and report["all_outputs_equal"]
    assert report["unknown_model_error"] == "StatusCode.NOT_FOUND"
    y = np.load(tmp_path / "y.npy")
    assert y.dtype == np.float32 and y.shape == (2, 4, 12, 10)
    np.testing.assert_array_equal(y, client.infer("tri", x))


def test_perf_analyzer_runs_without_errors(server, triton_python):
    """The CI check script, against this module's server: concurrency 2, a few seconds, no errors."""
    out = subprocess.run([sys.executable, os.path.join(SCRIPTS, "check_perf_analyzer.py"), "--target",
                          server.target], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "perf_analyzer check: OK" in out.stdout


def test_tritonclient_shared_memory_matches_conv_client(server, client, triton_python, tmp_path):
    """tritonclient.utils.shared_memory regions for input and output, registered and used by tritonclient.grpc."""
    rng = np.random.default_rng(4)
    client.register_model("tri-shm", [{"kernel": rng.standard_normal((6, 3, 3, 3)).astype(np.float32),
                                       "padding": "same"}])
    x = rng.standard_normal((2, 3, 10, 12)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = subprocess.run([triton_python, os.path.join(SCRIPTS, "triton_shm_interop.py"), server.target, "tri-shm",
                          str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    regions = report["status"]["regions"]
    assert regions["in_data"]["key"] == "/triton_in_test" and int(regions["in_data"]["byte_size"]) == x.nbytes
    assert "regions" not in report["after"] or not report["after"]["regions"]
    assert report["shape"] == [2, 6, 10, 12]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), client.infer("tri-shm", x))
    (stats,) = report["statistics"]["model_stats"]
    assert stats["name"] == "tri-shm" and int(stats["inference_count"]) == 2
    assert int(stats["inference_stats"]["success"]["count"]) == 1


def test_perf_analyzer_runs_through_shared_memory(server, triton_python):
    out = subprocess.run([sys.executable, os.path.join(SCRIPTS, "check_perf_analyzer.py"), "--target",
                          server.target, "--shared-memory", "--model", "perf-shm"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "--shared-memory system" in out.stdout and "perf_analyzer check: OK" in out.stdout
