"""A/B of our server with different flags or source trees (and the hand-written server), interleaved closed loops.

    flock /tmp/bench.lock python3 scripts/serve_ab.py WORKLOAD C[,C...] ROUNDS 'LABEL=TREE|FLAGS' ...

WORKLOAD is small, medium or batch-8 (benchmarks/service.py's); TREE a source tree to run ``python -m server``
from (its own PYTHONPATH; e.g. a ``git archive`` of another commit with the built extensions copied in), FLAGS
space-separated server flags and NAME=VALUE environment variables of that server. A label starting with ``plain``
starts the hand-written grpcio + torch server instead (FLAGS: its torch threads, then its RPC threads, default 2 and
8), and ``echo`` the gRPC echo of the same bytes (the transport alone; FLAGS ignored). $API = kserve (default) or
infer, for every label of ours; a word ``API=kserve`` / ``API=infer`` in a label's FLAGS picks that label's own (so
the two APIs of one tree can be compared in the same rounds: 'kserve=.|API=kserve' 'infer=.|API=infer'); $SLICE = seconds per slice (0.5); $PAUSE = idle seconds before each slice (0.1). One client process drives
every server the same way (benchmarks.service.closed_loop), order rotated each round; prints req/s (median of
rounds), p50, server CPU and minor page faults per request (/proc), the client's CPU per request (this process),
and the median per-round ratio to the first label with its quartiles, then every pair's. Many short rounds
rather than a few long ones: on a shared machine the load changes within seconds, and a ratio taken inside one
round (the contenders of a round run within ~1-2 s of each other) cancels most of it. Used for the readings in
BENCHMARKS.md ("Serving path (issue 10)", sessions of 2026-12-02).
"""
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._harness import ServerProcess, cpu_seconds  # noqa: E402
from benchmarks.service import (LAYERS, PLAIN_SERVICE, _channel, closed_loop, contender_process,  # noqa: E402
                                contender_requests, make_weights, register_models)


def minor_faults(pid):
    """Minor page faults of process `pid` so far (/proc/PID/stat field 10): fresh pages touched."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def main(argv):
    """Run the A/B described in the module docstring."""
    workload, cs, rounds = argv[0], [int(c) for c in argv[1].split(",")], int(argv[2])
    api = os.environ.get("API", "kserve")
    slice_s, pause = float(os.environ.get("SLICE", "0.5")), float(os.environ.get("PAUSE", "0.1"))
    methods = {"kserve": "/inference.GRPCInferenceService/ModelInfer", "infer": "/convservice.v1.ConvService/Infer"}
    specs = []
    for arg in argv[3:]:
        label, rest = arg.split("=", 1)
        tree, flags = rest.split("|", 1)
        # NAME=VALUE words are environment variables of that server (e.g. GOMP_SPINCOUNT=20000), the rest flags.
        words = flags.split()
        env = dict(w.split("=", 1) for w in words if "=" in w and w.split("=", 1)[0].isupper())
        label_api = env.pop("API", api)
        specs.append((label, tree, [w for w in words if w.split("=", 1)[0] not in env and not w.startswith("API=")],
                      env, label_api))
    weights = make_weights()
    _, shape, model = LAYERS[workload]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    requests = contender_requests(x, model)
    servers, calls, reqs = {}, {}, {}
    tmp = tempfile.mkdtemp(prefix="ab-")
    try:
        for label, tree, flags, env, label_api in specs:
            os.makedirs(os.path.join(tmp, label))
            if label == "echo":
                p = contender_process("echo", os.path.join(tmp, label), 8).start()
                servers[label] = p
                reqs[label] = requests["echo"]
                calls[label] = _channel(p.target).unary_unary("/bench.Echo/Echo")
                closed_loop(calls[label], reqs[label], 2, 1.0)
                continue
            if label.startswith("plain"):
                wpath = os.path.join(tmp, "weights.npz")
                np.savez(wpath, **{f"{m}.{k}": v for m, (w, b) in weights.items() for k, v in (("w", w), ("b", b))})
                threads = int(flags[0]) if flags else 2
                workers = int(flags[1]) if len(flags) > 1 else 8
                p = contender_process("plain", os.path.join(tmp, label), workers, threads, wpath).start()
                servers[label] = p
                reqs[label] = requests["plain"]
                calls[label] = _channel(p.target).unary_unary(f"/{PLAIN_SERVICE}/{model}")
                calls[label](reqs[label], timeout=60)
                closed_loop(calls[label], reqs[label], 2, 1.0)
                continue
            reqs[label] = requests[label_api]
            p = ServerProcess(os.path.join(tmp, label, "models"), *flags, cwd=tree,
                              env={"PYTHONPATH": tree, **env}).start()
            servers[label] = p
            register_models(p.target, weights)
            calls[label] = _channel(p.target).unary_unary(methods[label_api])
            calls[label](reqs[label], timeout=60)
            closed_loop(calls[label], reqs[label], 2, 1.0)
        labels = [s[0] for s in specs]
        for c in cs:
            res = {k: [] for k in labels}
            for r in range(rounds):
                for k in labels[r % len(labels):] + labels[:r % len(labels)]:
                    time.sleep(pause)
                    c0, own0, f0 = cpu_seconds(servers[k].pid), time.process_time(), minor_faults(servers[k].pid)
                    out = closed_loop(calls[k], reqs[k], c, slice_s)
                    n = len(out["latencies"])
                    res[k].append((n / out["wall"], (cpu_seconds(servers[k].pid) - c0) / max(1, n) * 1e3,
                                   statistics.median(out["latencies"]) * 1e3 if n else None, out["errors"],
                                   (time.process_time() - own0) / max(1, n) * 1e3,
                                   (minor_faults(servers[k].pid) - f0) / max(1, n)))
            for k in labels:
                ratios = sorted(a[0] / b[0] for a, b in zip(res[k], res[labels[0]]))
                q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
                print(f"{workload} C={c} {k:14s} req/s {statistics.median(v[0] for v in res[k]):7.1f}  "
                      f"p50 {statistics.median(v[2] for v in res[k]):6.2f} ms  cpu/req server "
                      f"{statistics.median(v[1] for v in res[k]):6.3f} client {statistics.median(v[4] for v in res[k]):6.3f} ms"
                      f"  minflt/req {statistics.median(v[5] for v in res[k]):5.0f}"
                      f"  ÷{labels[0]} {q2:.3f} [{q1:.3f}-{q3:.3f}]  range {min(v[0] for v in res[k]):.0f}-"
                      f"{max(v[0] for v in res[k]):.0f} errors {sum(len(v[3]) for v in res[k])}", flush=True)
            if len(labels) > 2:  # every pair, each a median of per-round ratios
                print(f"{workload} C={c} pairs: " + ", ".join(
                    f"{a}/{b} {statistics.median(x[0] / y[0] for x, y in zip(res[a], res[b])):.3f}"
                    for i, a in enumerate(labels) for b in labels[:i]), flush=True)
    finally:
        for p in servers.values():
            p.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
