"""Soak test (issue 5): the load harness at concurrency 16 for a while; zero errors and flat server RSS.

Starts ``python -m server`` on a free loopback port with a temporary model repository (or uses ``--target`` with
``--pid``), samples the server's RSS (``/proc/PID/status`` VmRSS) after the warm-up and at the end, and runs
``python -m client.loadtest`` against it with a small conv layer. Exit 0 when the run had zero errors and the RSS
growth stayed under ``--max-rss-growth-mb``.

    python3 -m benchmarks.soak --duration 60 --write-benchmarks   # by hand; updates the "Soak" section of BENCHMARKS.md
    python3 -m benchmarks.soak --duration 15                      # what CI runs (tests/test_soak.py)
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks._harness import ROOT, ServerProcess, machine_info, rss_kb, source_env, write_section

START, END = "<!-- soak:start -->", "<!-- soak:end -->"

LAYER = "3x3,16->16,same,relu"
INPUT = "1x16x32x32"


def run_soak(duration, concurrency=16, target=None, pid=None, warmup=2.0, server_args=()):
    """Run the soak; return a report dict (RSS in kB, the loadtest summary, errors)."""
    server = None
    if target is None:
        server = ServerProcess.temporary("--log-level", "WARNING", *server_args, prefix="soak-").start()
        target, pid = server.target, server.proc.pid
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "run.json")
            cmd = [sys.executable, "-m", "client.loadtest", "--target", target, "--layer", LAYER, "--input", INPUT,
                   "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", str(warmup),
                   "--json", out, "--quiet"]
            env = source_env()
            samples = []

            def sample_rss():
                # Every second, so the report shows the trend, not two points.
                t0 = time.monotonic()
                while not done.is_set():
                    try:
                        samples.append((round(time.monotonic() - t0, 1), rss_kb(pid)))
                    except OSError:
                        return
                    done.wait(1.0)

            done = threading.Event()
            sampler = threading.Thread(target=sample_rss, daemon=True)
            sampler.start()
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=duration + warmup + 180)
            done.set()
            sampler.join(5)
            if proc.returncode != 0 or not os.path.exists(out):
                raise RuntimeError(f"loadtest failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                   f"{proc.stderr[-3000:]}")
            with open(out) as f:
                doc = json.load(f)
        summary = doc["summary"]
        after_warmup = [kb for t, kb in samples if t >= warmup] or [kb for _, kb in samples]
        report = {"duration_s": duration, "concurrency": concurrency, "layer": LAYER, "input": INPUT,
                  "requests": summary["requests"], "errors": summary["errors"],
                  "errors_by_code": summary.get("errors_by_code", {}), "req_per_s": summary["req_per_s"],
                  "latency_ms": summary["latency_ms"], "rss_start_kb": after_warmup[0],
                  "rss_end_kb": after_warmup[-1], "rss_max_kb": max(after_warmup), "rss_samples": samples,
                  "stdout": proc.stdout}
        if server is not None and server.proc.poll() is not None:
            report["errors"] += 1
            report["errors_by_code"]["SERVER_EXITED"] = server.proc.returncode
        return report
    finally:
        if server is not None:
            server.stop()
            server.cleanup()


def benchmarks_section(report):
    """The "## Soak" section of BENCHMARKS.md for `report` (markers included)."""
    lat = report["latency_ms"]
    info = machine_info()
    return "\n".join([
        START,
        "## Soak",
        "",
        f"`python3 -m benchmarks.soak --duration {report['duration_s']:g} --write-benchmarks` "
        f"({datetime.date.today().isoformat()}, {info['cpus']} cores, {info['model']}, "
        f"{info['versions'].split(', ')[0]}; a shared machine). It runs `python -m client.loadtest` at concurrency "
        f"{report['concurrency']} against a fresh server (layer `{report['layer']}`, input {report['input']}) and "
        f"samples the server's VmRSS every second after the warm-up. CI runs the same for 15 s "
        f"(`tests/test_soak.py`).",
        "",
        "| requests | errors | req/s | p50 ms | p99 ms | max ms | RSS start | RSS end | RSS max |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {report['requests']} | {report['errors']} | {report['req_per_s']:.0f} | {lat['p50']:.1f} | "
        f"{lat['p99']:.1f} | {lat['max']:.1f} | {report['rss_start_kb'] / 1024:.1f} MiB | "
        f"{report['rss_end_kb'] / 1024:.1f} MiB | {report['rss_max_kb'] / 1024:.1f} MiB |",
        END,
    ])


def write_benchmarks(report, path=os.path.join(ROOT, "BENCHMARKS.md")):
    """Replace (or append) the marked Soak section of BENCHMARKS.md, leaving every other section as it is."""
    write_section(path, benchmarks_section(report), START, END)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="measured seconds (default 60)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--target", help="an existing server (host:port); needs --pid for the RSS check")
    p.add_argument("--pid", type=int)
    p.add_argument("--max-rss-growth-mb", type=float, default=100.0,
                   help="fail if RSS grows more than this from the end of warm-up to the end (default 100)")
    p.add_argument("--write-benchmarks", action="store_true", help="update the Soak section of BENCHMARKS.md")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    if args.target and not args.pid:
        p.error("--target needs --pid (the server's process id) for the RSS check")
    report = run_soak(args.duration, args.concurrency, args.target, args.pid)
    print(report.pop("stdout"))
    growth_mb = (report["rss_end_kb"] - report["rss_start_kb"]) / 1024
    print(f"soak: {report['requests']} requests, {report['errors']} errors; server RSS "
          f"{report['rss_start_kb'] / 1024:.1f} MiB after warm-up -> {report['rss_end_kb'] / 1024:.1f} MiB at the end "
          f"(max {report['rss_max_kb'] / 1024:.1f} MiB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.write_benchmarks:
        write_benchmarks(report)
    ok = report["errors"] == 0 and report["requests"] > 0 and growth_mb <= args.max_rss_growth_mb
    if not ok:
        print(f"soak: FAILED (errors {report['errors_by_code'] or 0}, RSS growth {growth_mb:.1f} MiB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
