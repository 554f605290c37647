"""CI run of ``python -m benchmarks.soak`` (issue 5, "Soak"): the load harness at concurrency 16, zero errors, flat RSS.

``CONVSERVICE_SOAK_SECONDS`` (default 15) sets the measured time; the 60 s figures in BENCHMARKS.md come from
``python3 -m benchmarks.soak --duration 60 --write-benchmarks``.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECONDS = float(os.environ.get("CONVSERVICE_SOAK_SECONDS", "15"))


def test_soak(tmp_path):
    out = tmp_path / "soak.json"
    # From another folder, as a user would run it: the package, not the working directory, finds the source tree.
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.soak", "--duration", str(SECONDS), "--json", str(out)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=SECONDS + 300)
    print(proc.stdout[-3000:])  # shown with -s or on failure: the RSS figures
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())
    assert report["errors"] == 0 and report["requests"] > 100, report
    assert report["rss_end_kb"] - report["rss_start_kb"] < 100 * 1024, report
