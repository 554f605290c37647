"""CI run of ``scripts/fuzz_server.py`` (issue 5, "Hostile input"): a real server, every RPC of both services.

The script starts its own server on a free loopback port with a model repository in a temporary folder, sends the
named hostile cases and then random/mutated requests for ``CONVSERVICE_FUZZ_SECONDS`` (default 20) seconds, and
checks the server is alive and right at the end, that its RSS stayed bounded and that nothing was written outside
the repository. For a longer run: ``python3 scripts/fuzz_server.py --duration 600``.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECONDS = float(os.environ.get("CONVSERVICE_FUZZ_SECONDS", "20"))


def test_fuzz_server(tmp_path):
    report_path = tmp_path / "report.json"
    seed = os.environ.get("CONVSERVICE_FUZZ_SEED", "")
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "fuzz_server.py"), "--duration", str(SECONDS),
           "--json", str(report_path)] + (["--seed", seed] if seed else [])
    proc = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=SECONDS + 240)
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    assert proc.returncode == 0, f"{proc.stdout[-12000:]}\n{proc.stderr[-4000:]}"
    assert not report.get("failures"), report
    assert report["named_cases"] >= 40 and report["random_calls"] > 50, report
    # The script ran in tmp_path: it must not have left anything here but its report.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
