"""Dynamic batching and system shared memory, measured against the same server without them, in one run.

    python3 -m benchmarks.batching [--quick] [--sections batching,bound,shm] [--output BENCHMARKS.md] [--json F]

Three server processes: ours (``python -m server --workers 24``, temporary repository), the hand-written grpcio +
torch server of ``benchmarks.service`` and its gRPC echo (imported from there, same RPC threads). The small and
medium models of ``benchmarks.service`` (3x3 16->16 on 1x16x32x32, 3x3 64->64 on 1x64x56x56; same weights, same
padding, bias, relu) are registered in ours three times each: without batching, with batching at a 0.5 ms queue
delay and at 2 ms (max_batch_size 16). Then:

``batching``
    Closed loops (``benchmarks.service.closed_loop``: one client process, C threads, request bytes serialized once)
    at concurrency 1, 4 and 16 on each of: ours batching off / 0.5 ms / 2 ms (KServe ``ModelInfer``), the
    hand-written server and the echo, interleaved (rounds of one time slice each, order rotated each round). Every
    contender's answer is checked first. Per row: req/s (median over rounds), p50/p99 (over every call), the CPU
    per request of the server process and of this client process, and for batching the mean batch (rows per model
    execution, from ModelStatistics).
``bound``
    What batching can remove at most: with 2 cores saturated, throughput = 2 / (client + server CPU per request).
    Batching leaves every per-request cost (transport, decode, encode, the handler) and replaces only the compute
    of one row alone by a 1/B share of a batch of B. The compute's CPU per call is measured in this process (the
    server's plan and thread count, batch 1 and batch 16); the bound on batched / unbatched throughput is
    ``total_off / (total_off - compute(1) + compute(16) / 16)``, with ``total_off`` the client + server CPU per
    request measured at concurrency 16 with batching off.
``shm``
    The medium input and the same at batch 8 (6.1 MiB each way), concurrency 1, through ``ModelInfer`` with raw
    contents (gRPC) and through a registered system shared-memory region (input and output in the region, only
    names on the wire), call by call, alternating, beside the echo of the gRPC request's bytes and of the shm
    request's bytes (transport alone). ``transport estimate`` is the ratio if shared memory removed exactly the
    difference of the two echoes, ``(gRPC - (echo gRPC - echo shm)) / gRPC``: shared memory can beat it, because
    it also skips what our server does per byte beyond the echo (the response payload's allocation, its page
    faults, the input's alignment copy).

The results replace what is between ``<!-- batching-bench:start -->`` and ``<!-- batching-bench:end -->`` in the
output file. Run it alone (``flock /tmp/bench.lock ...``).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from benchmarks._harness import (ServerProcess, cpu_seconds, load_average, machine_lines, utc_now,
                                 write_section)
from benchmarks.service import (CONCURRENCY, ECHO_METHOD, KSERVE_INFER, PLAIN_SERVICE, _channel, _quantiles,
                                closed_loop, contender_process, contender_requests, decode_response, make_weights,
                                server_threads)

START, END = "<!-- batching-bench:start -->", "<!-- batching-bench:end -->"
VARIANTS = (("off", None), ("0.5 ms", 500), ("2 ms", 2000))
WORKLOADS = {"small": ("bench-small", (1, 16, 32, 32)), "medium": ("bench-medium", (1, 64, 56, 56))}
SHM_WORKLOADS = {"medium": ("bench-medium", (1, 64, 56, 56)), "batch-8": ("bench-medium", (8, 64, 56, 56))}
MAX_BATCH = 16
WORKERS = 24  # RPC threads: more than the highest concurrency, so a batch can hold every caller
SECTIONS = ("batching", "bound", "shm")
#: Contender key -> label in the tables.
LABELS = {"off": "ours, batching off", "0.5 ms": "ours, batching 0.5 ms", "2 ms": "ours, batching 2 ms",
          "plain": "hand-written grpcio + torch", "echo": "gRPC echo (transport alone)"}
STATISTICS = "/inference.GRPCInferenceService/ModelStatistics"


def _name(model, delay):
    return model if delay is None else f"{model}-b{delay}"


def register(target, weights):
    from client import ConvClient

    with ConvClient(target, timeout=120.0) as client:
        for model, (w, b) in weights.items():
            layers = [{"kernel": w, "bias": b, "padding": "same", "activation": "relu"}]
            for _, delay in VARIANTS:
                batching = None if delay is None else {"max_batch_size": MAX_BATCH,
                                                       "max_queue_delay_microseconds": delay}
                client.register_model(_name(model, delay), layers, batching=batching)


def _executions(stats_call, name):
    """(inference_count, execution_count) of model `name` from ModelStatistics."""
    from convproto.inference import grpc_service_pb2 as kpb

    reply = kpb.ModelStatisticsResponse.FromString(
        stats_call(kpb.ModelStatisticsRequest(name=name).SerializeToString(), timeout=30))
    s = reply.model_stats[0]
    return s.inference_count, s.execution_count


def measure_batching(procs, weights, rounds, slice_s, pause, log, concurrencies=CONCURRENCY):
    """{(workload, concurrency, contender): {req_s, p50, p99, server_ms, client_ms, batch, errors, rounds}}."""
    import convcore

    rng = np.random.default_rng(1)
    rows = {}
    keys = [v for v, _ in VARIANTS] + ["plain", "echo"]
    channels = {name: _channel(p.target) for name, p in procs.items()}
    try:
        stats_call = channels["ours"].unary_unary(STATISTICS)
        for workload, (model, shape) in WORKLOADS.items():
            x = rng.standard_normal(shape).astype(np.float32)
            w, b = weights[model]
            ref = convcore.conv(x, w, b, padding="same", activation="relu")
            calls, requests, proc_of = {}, {}, {}
            for variant, delay in VARIANTS:
                calls[variant] = channels["ours"].unary_unary(KSERVE_INFER)
                requests[variant] = contender_requests(x, _name(model, delay))["kserve"]
                proc_of[variant] = "ours"
            calls["plain"] = channels["plain"].unary_unary(f"/{PLAIN_SERVICE}/{model}")
            calls["echo"] = channels["echo"].unary_unary(ECHO_METHOD)
            requests["plain"] = requests["echo"] = x.tobytes()
            proc_of["plain"], proc_of["echo"] = "plain", "echo"
            for key in keys:
                kind = "kserve" if proc_of[key] == "ours" else key
                got = decode_response(kind, calls[key](requests[key], timeout=120), ref.shape)
                want = x.reshape(-1) if key == "echo" else ref
                if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-4):
                    raise RuntimeError(f"{workload}: {LABELS[key]} gave a wrong answer")
                closed_loop(calls[key], requests[key], 2, min(slice_s, 0.5))  # warm up
            for c in concurrencies:
                slices = {k: [] for k in keys}
                for r in range(rounds):
                    for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                        pid = procs[proc_of[key]].pid
                        time.sleep(pause)
                        variant_model = _name(model, dict(VARIANTS).get(key)) if proc_of[key] == "ours" else None
                        before = _executions(stats_call, variant_model) if variant_model else None
                        cpu0, own0 = cpu_seconds(pid), time.process_time()
                        res = closed_loop(calls[key], requests[key], c, slice_s)
                        res["cpu"], res["own"] = cpu_seconds(pid) - cpu0, time.process_time() - own0
                        if before is not None:
                            after = _executions(stats_call, variant_model)
                            res["rows"], res["runs"] = after[0] - before[0], after[1] - before[1]
                        slices[key].append(res)
                for key in keys:
                    lat = sorted(v for res in slices[key] for v in res["latencies"])
                    n = len(lat)
                    runs = sum(res.get("runs", 0) for res in slices[key])
                    rows[(workload, c, key)] = {
                        "req_s": statistics.median(len(res["latencies"]) / res["wall"] for res in slices[key]),
                        "rounds": [len(res["latencies"]) / res["wall"] for res in slices[key]],
                        "p50": 1e3 * lat[n // 2] if n else float("nan"),
                        "p99": 1e3 * lat[min(n - 1, int(0.99 * n))] if n else float("nan"),
                        "server_ms": 1e3 * sum(res["cpu"] for res in slices[key]) / n if n else float("nan"),
                        "client_ms": 1e3 * sum(res["own"] for res in slices[key]) / n if n else float("nan"),
                        "batch": sum(res.get("rows", 0) for res in slices[key]) / runs if runs else None,
                        "errors": sum(len(res["errors"]) for res in slices[key])}
                log(f"{workload} C={c}: " + ", ".join(
                    f"{k} {rows[(workload, c, k)]['req_s']:.0f} req/s" for k in keys))
    finally:
        for ch in channels.values():
            ch.close()
    return rows


def _cpu_per_call(fn, block_s):
    """(CPU ms, wall ms) per call of `fn` over a block of back-to-back calls (the process's CPU: OpenMP included)."""
    fn()
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < block_s or n < 5:
        fn()
        n += 1
    return 1e3 * (time.process_time() - c0) / n, 1e3 * (time.perf_counter() - t0) / n


def measure_bound(weights, omp, rounds, block_s=0.4, pause=0.2):
    """{workload: {threads, cpu1, wall1, cpuB, wallB}}: in-process compute per call at batch 1 and MAX_BATCH with
    the thread count the server's plan uses for that batch (convcore's cut-off on small work), medians over rounds."""
    import convcore

    out = {}
    for workload, (model, shape) in WORKLOADS.items():
        w, b = weights[model]
        res = {}
        for tag, batch in (("1", 1), ("B", MAX_BATCH)):
            x = np.random.default_rng(3).standard_normal((batch, *shape[1:])).astype(np.float32)
            # As the server does: one plan per non-batch shape, run on any batch (convcore picks the threads).
            plan = convcore.make_plan((1, *shape[1:]), w, b, padding="same", activation="relu", num_threads=omp)
            y = np.empty(plan.output_shape(batch), np.float32)
            samples = []
            for _ in range(rounds):
                time.sleep(pause)
                samples.append(_cpu_per_call(lambda: plan.run(x, out=y), block_s))
            res[f"cpu{tag}"] = statistics.median(s[0] for s in samples)
            res[f"wall{tag}"] = statistics.median(s[1] for s in samples)
            res[f"threads{tag}"] = convcore.resolve_num_threads(omp, flops=plan.geometry.flops(batch))
        out[workload] = res
    return out


def bound_rows(rows, compute):
    """Per workload at the highest concurrency: CPU per request off, the compute's share, the bound and the measured."""
    c = max(CONCURRENCY)
    out = {}
    for workload in WORKLOADS:
        off, echo = rows.get((workload, c, "off")), rows.get((workload, c, "echo"))
        if off is None or workload not in compute:
            continue
        comp = compute[workload]
        total = off["server_ms"] + off["client_ms"]
        saved = comp["cpu1"] - comp["cpuB"] / MAX_BATCH
        best = {v: rows[(workload, c, v)]["req_s"] / off["req_s"] for v, d in VARIANTS if d is not None}
        out[workload] = {"c": c, "server": off["server_ms"], "client": off["client_ms"], "total": total,
                         "echo_total": echo["server_ms"] + echo["client_ms"] if echo else None,
                         "cpu1": comp["cpu1"], "cpuB_row": comp["cpuB"] / MAX_BATCH,
                         "bound": total / max(total - saved, 1e-9), "measured": best}
    return out


def measure_shm(procs, calls, log, pause=0.002):
    """{workload: {grpc, shm, echo_grpc, echo_shm: quantiles}}: concurrency 1, call by call, rotating order."""
    from client._shm import SharedMemoryRegion, infer_request
    from convproto.inference import grpc_service_pb2 as kpb

    result = {}
    with _channel(procs["ours"].target) as channel, _channel(procs["echo"].target) as echo_channel:
        raw = channel.unary_unary(KSERVE_INFER)
        echo = echo_channel.unary_unary(ECHO_METHOD)
        register = channel.unary_unary("/inference.GRPCInferenceService/SystemSharedMemoryRegister")
        unregister = channel.unary_unary("/inference.GRPCInferenceService/SystemSharedMemoryUnregister")
        for workload, (model, shape) in SHM_WORKLOADS.items():
            x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
            times = {"grpc": [], "shm": [], "echo_grpc": [], "echo_shm": []}
            with SharedMemoryRegion(2 * x.nbytes + 4096) as region:
                register(kpb.SystemSharedMemoryRegisterRequest(name=region.name, key=region.key,
                                                               byte_size=region.nbytes).SerializeToString(),
                         timeout=30)
                try:
                    grpc_request = contender_requests(x, model)["kserve"]
                    shm_request = infer_request(model, x, region).SerializeToString()
                    out_offset = region.output_offset(x.nbytes)
                    expected = decode_response("kserve", raw(grpc_request, timeout=60), None)

                    def via_shm():
                        reply = kpb.ModelInferResponse.FromString(raw(shm_request, timeout=60))
                        # What a caller does: its input is already in the region; it reads the output there.
                        return region.array(tuple(reply.outputs[0].shape), np.float32, out_offset)

                    fns = {"grpc": lambda: decode_response("kserve", raw(grpc_request, timeout=60), None),
                           "shm": via_shm,
                           "echo_grpc": lambda: echo(grpc_request, timeout=60),
                           "echo_shm": lambda: echo(shm_request, timeout=60)}
                    for key in ("grpc", "shm"):
                        np.testing.assert_array_equal(fns[key](), expected)
                    order = list(fns)
                    for i in range(calls):
                        for key in order[i % 4:] + order[:i % 4]:
                            time.sleep(pause)
                            t0 = time.perf_counter()
                            fns[key]()
                            times[key].append(time.perf_counter() - t0)
                finally:
                    unregister(kpb.SystemSharedMemoryUnregisterRequest(name=region.name).SerializeToString(),
                               timeout=30)
            q = {k: _quantiles(v) for k, v in times.items()}
            q["ratio"] = q["shm"]["p50"] / q["grpc"]["p50"]
            # The shm path saves at most the transport difference; compute etc. are the same in both.
            q["best"] = (q["grpc"]["p50"] - (q["echo_grpc"]["p50"] - q["echo_shm"]["p50"])) / q["grpc"]["p50"]
            q["request_bytes"] = (len(grpc_request), len(shm_request))
            q["shape"] = shape
            result[workload] = q
            log(f"shm {workload}: gRPC p50 {q['grpc']['p50']:.2f} ms, shm {q['shm']['p50']:.2f} ms (ratio "
                f"{q['ratio']:.2f}, transport estimate {q['best']:.2f}); echo {q['echo_grpc']['p50']:.2f} / "
                f"{q['echo_shm']['p50']:.2f} ms")
    return result


def _f(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f}"


def render(ctx, rows, compute, shm):
    lines = [START, "## Dynamic batching and shared memory (`python -m benchmarks.batching`)", "",
             "Generated by `python -m benchmarks.batching` (benchmarks/batching.py); everything between the markers "
             "is rewritten.", "",
             f"- Command: `{ctx['command']}` (took {ctx['took']:.0f} s)",
             f"- Date: {ctx['date']}. Load average (1/5/15 min) before: {ctx['load_before']}; after: "
             f"{ctx['load_after']}. Compare ratios taken in one run, not absolute numbers across runs."]
    lines += machine_lines() + [
        f"- Our server: `python -m server --workers {WORKERS}` ({ctx['threads']}); hand-written grpcio + torch "
        f"server and echo from benchmarks/service.py with {WORKERS} RPC threads. Batching variants: max_batch_size "
        f"{MAX_BATCH}, max_queue_delay_microseconds 500 / 2000.", ""]
    if rows:
        lines += [
            f"### Throughput and latency (closed loops, {ctx['rounds']} rounds x {ctx['slice']:g} s slices per "
            f"contender, interleaved)", "",
            "KServe `ModelInfer` with raw contents for ours, raw bytes for the hand-written server and the echo. "
            "× off = req/s over ours with batching off (median of the rounds); CPU = CPU ms per request of the "
            "server process and of the client process (2 cores in all); batch = mean rows per model execution "
            "(ModelStatistics).", "",
            "| workload | C | contender | req/s | × off | p50 ms | p99 ms | server CPU ms/req | client CPU ms/req "
            "| batch | errors |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for workload in WORKLOADS:
            for c in CONCURRENCY:
                off = rows.get((workload, c, "off"))
                if off is None:
                    continue
                for key in LABELS:
                    r = rows[(workload, c, key)]
                    lines.append(f"| {workload} | {c} | {LABELS[key]} | {r['req_s']:.0f} | "
                                 f"{r['req_s'] / off['req_s']:.2f} | {r['p50']:.2f} | {r['p99']:.2f} | "
                                 f"{r['server_ms']:.2f} | {r['client_ms']:.2f} | {_f(r['batch'], 1)} | "
                                 f"{r['errors']} |")
        lines.append("")
    bounds = bound_rows(rows, compute) if rows and compute else {}
    if bounds:
        lines += [
            "### The most batching can give here (CPU per request at the highest concurrency, batching off)", "",
            f"In-process compute (the server's plan and threads): CPU ms per call at batch 1 and per row of a batch "
            f"of {MAX_BATCH}. bound = total / (total − compute at batch 1 + compute per row at batch "
            f"{MAX_BATCH}): the throughput ratio if batching removed the whole compute difference and cost nothing.",
            "", "| workload | C | server CPU | client CPU | total | echo total | compute batch 1 | compute per row, "
            f"batch {MAX_BATCH} | bound × off | measured 0.5 ms / 2 ms × off |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for workload, b in bounds.items():
            lines.append(f"| {workload} | {b['c']} | {b['server']:.2f} | {b['client']:.2f} | {b['total']:.2f} | "
                         f"{_f(b['echo_total'])} | {b['cpu1']:.3f} | {b['cpuB_row']:.3f} | **{b['bound']:.2f}** | "
                         f"{b['measured']['0.5 ms']:.2f} / {b['measured']['2 ms']:.2f} |")
        lines.append("")
    if shm:
        lines += ["### System shared memory against gRPC (concurrency 1, call by call, alternating)", "",
                  "transport estimate = (gRPC p50 − (echo of the gRPC request − echo of the shm request)) / gRPC "
                  "p50: the ratio if shared memory removed exactly the transport difference; it can do better, since "
                  "it also skips our server's own per-byte work (the response payload). The server computes on the "
                  "input where it lies in the mapping and into the caller's region (no copy).", "",
                  "| workload | MiB each way | gRPC p50 | gRPC p90 | shm p50 | shm p90 | echo gRPC request p50 | "
                  "echo shm request p50 | shm / gRPC p50 | transport estimate |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for workload, q in shm.items():
            mib = np.prod(q["shape"]) * 4 / (1 << 20)
            lines.append(f"| {workload} ({'×'.join(map(str, q['shape']))}) | {mib:.2f} | {q['grpc']['p50']:.2f} | "
                         f"{q['grpc']['p90']:.2f} | {q['shm']['p50']:.2f} | {q['shm']['p90']:.2f} | "
                         f"{q['echo_grpc']['p50']:.2f} | {q['echo_shm']['p50']:.2f} | **{q['ratio']:.2f}** | "
                         f"{q['best']:.2f} |")
        lines.append("")
    lines += ["Issue 11 targets: small at concurrency 16, batching ≥ 2× off; medium at concurrency 1, shm p50 ≤ 0.6× "
              "gRPC p50.", END]
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one short round (smoke test)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (bound needs batching)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--slice", type=float, default=2.0, help="seconds per contender per round")
    p.add_argument("--shm-calls", type=int, default=100, help="calls per path and workload")
    p.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="comma-separated")
    p.add_argument("--output", default=None, help="Markdown file to write the section into (default: print)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    args = p.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    bad = sorted(set(sections) - set(SECTIONS))
    if bad:
        p.error(f"--sections: unknown {bad}; choose from {list(SECTIONS)}")
    if args.quick:
        args.rounds, args.slice, args.shm_calls = 1, 0.5, 10
    concurrencies = tuple(int(c) for c in args.concurrency.split(","))
    # The in-process compute (bound) runs as the server's does: idle OpenMP threads sleep rather than spin, so the
    # CPU per call counts the work, not the spinning (read by the OpenMP runtime when convcore is first imported).
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    t_start = time.monotonic()

    def log(msg):
        print(f"benchmarks.batching [{time.monotonic() - t_start:5.1f} s, load {os.getloadavg()[0]:.2f}] {msg}",
              flush=True)

    ctx = {"command": "python3 -m benchmarks.batching " + " ".join(argv), "date": utc_now(),
           "load_before": load_average(), "rounds": args.rounds, "slice": args.slice}
    rows = compute = shm = None
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp:
        weights = make_weights()
        weights_path = os.path.join(tmp, "weights.npz")
        np.savez(weights_path, **{f"{m}.{k}": a for m, (w, b) in weights.items() for k, a in (("w", w), ("b", b))})
        procs = {"ours": ServerProcess(os.path.join(tmp, "models"), "--workers", str(WORKERS))}
        try:
            procs["ours"].start()
            _, omp, ctx["threads"] = server_threads(procs["ours"])
            register(procs["ours"].target, weights)
            procs["echo"] = contender_process("echo", tmp, WORKERS).start()
            if "batching" in sections:
                procs["plain"] = contender_process("plain", tmp, WORKERS, omp, weights_path).start()
                rows = measure_batching(procs, weights, args.rounds, args.slice, 0.2, log, concurrencies)
                procs.pop("plain").stop()
            if "bound" in sections:
                compute = measure_bound(weights, omp, max(3, args.rounds))
                log("compute: " + "; ".join(f"{w} {c['cpu1']:.3f} ms/call at batch 1, {c['cpuB'] / MAX_BATCH:.3f} "
                                            f"ms/row at {MAX_BATCH}" for w, c in compute.items()))
            if "shm" in sections:
                shm = measure_shm(procs, args.shm_calls, log)
        finally:
            for proc in procs.values():
                if proc.proc is not None and proc.proc.poll() is None:
                    proc.stop(30)
    ctx["took"], ctx["load_after"] = time.monotonic() - t_start, load_average()
    text = render(ctx, rows, compute, shm)
    if args.output:
        write_section(args.output, text, START, END)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"context": ctx, "rows": {"/".join(map(str, k)): v for k, v in (rows or {}).items()},
                       "compute": compute, "bound": bound_rows(rows, compute) if rows and compute else None,
                       "shm": shm}, f, indent=2, default=str)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
