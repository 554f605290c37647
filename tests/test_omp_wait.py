"""`python -m server --omp-wait`: the OpenMP wait policy reaches the OpenMP runtime, because it is set before
convcore (which loads the runtime) is imported. Checked with the runtime's own report (OMP_DISPLAY_ENV)."""
import os
import subprocess
import sys

import pytest

import convcore
from _server import ROOT, ServerProcess

needs_openmp = pytest.mark.skipif(not convcore.openmp_enabled(), reason="built without OpenMP")


def _python(code):
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_importing_the_server_package_does_not_start_the_openmp_runtime():
    assert _python("import sys, server, server.__main__; print('convcore' in sys.modules)") == "False"
    assert _python("import sys, server; server.create_server; print('convcore' in sys.modules)") == "True"


def test_configure_openmp_explicit_wins_the_environment_is_kept_otherwise():
    code = ("from server.__main__ import configure_openmp as c\n"
            "e = {'GOMP_SPINCOUNT': '5'}; print(c('active', e), sorted(e.items()))\n"
            "e = {'OMP_WAIT_POLICY': 'active'}; print(c(None, e), sorted(e.items()))\n"
            "e = {}; print(c(None, e), sorted(e.items()))\n")
    assert _python(code).splitlines() == [
        "active [('OMP_WAIT_POLICY', 'active')]",
        "from the environment (OMP_WAIT_POLICY=active) [('OMP_WAIT_POLICY', 'active')]",
        "passive [('OMP_WAIT_POLICY', 'passive')]",
    ]


def test_configure_openmp_refuses_once_the_runtime_has_started():
    from server.__main__ import configure_openmp
    assert "convcore" in sys.modules  # this test process has imported it
    with pytest.raises(RuntimeError, match="before convcore is imported"):
        configure_openmp("passive", {})


@needs_openmp
@pytest.mark.parametrize("flag, env, policy", [((), {}, "PASSIVE"), (("--omp-wait", "active"), {}, "ACTIVE"),
                                                ((), {"OMP_WAIT_POLICY": "active"}, "ACTIVE"),
                                                (("--omp-wait", "passive"), {"OMP_WAIT_POLICY": "active"},
                                                 "PASSIVE")])
def test_the_runtime_of_the_server_process_runs_with_the_policy(tmp_path, flag, env, policy):
    proc = ServerProcess(tmp_path / "models", *flag, env={"OMP_DISPLAY_ENV": "true", **env}).start()
    try:
        log = proc.log()
    finally:
        assert proc.stop() == 0
    assert f"OMP_WAIT_POLICY = '{policy}'" in log, log
    assert "OpenMP wait policy:" in log
