"""Dynamic batching and system shared memory, measured against the same server without them, in one run.

    python3 -m benchmarks.batching [--quick] [--output BENCHMARKS.md]

One server process (``python -m server``, temporary repository). The small and medium models of
``benchmarks.service`` (3x3 16->16 on 1x16x32x32, 3x3 64->64 on 1x64x56x56; same weights, same padding, bias, relu)
are registered three times each: without batching, with batching at a 0.5 ms queue delay and at 2 ms
(max_batch_size 16). Then:

``batching``
    Closed loops (``benchmarks.service.closed_loop``: one client process, C threads, KServe ``ModelInfer`` bytes) at
    concurrency 1, 4 and 16 on each variant, interleaved: rounds of one time slice per variant, order rotated each
    round. Every variant's answer is checked against the unbatched one first. Reports req/s, p50, p99 (medians over
    rounds), and batched / unbatched throughput.
``shm``
    The medium input at concurrency 1 through ``ModelInfer`` with raw contents (gRPC) and through a registered
    system shared-memory region (input and output in the region, only names on the wire), call by call,
    alternating, with the output checked. Reports p50/p90 and the shm / gRPC p50 ratio.

The results replace what is between ``<!-- batching-bench:start -->`` and ``<!-- batching-bench:end -->`` in the
output file. Run it alone (``flock /tmp/bench.lock ...``).
"""
import argparse
import statistics
import sys
import time

import numpy as np

from benchmarks._harness import ServerProcess, machine_lines, utc_now, write_section
from benchmarks.service import (CONCURRENCY, KSERVE_INFER, MODELS, _channel, _quantiles, closed_loop,
                                contender_requests, decode_response, make_weights)

START, END = "<!-- batching-bench:start -->", "<!-- batching-bench:end -->"
VARIANTS = (("off", None), ("0.5 ms", 500), ("2 ms", 2000))
WORKLOADS = {"small": ("bench-small", (1, 16, 32, 32)), "medium": ("bench-medium", (1, 64, 56, 56))}
MAX_BATCH = 16


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


def measure_batching(target, rounds, slice_s, pause, log):
    """{(workload, concurrency, variant): {req_s, p50, p99, errors}} medians over rounds."""
    rng = np.random.default_rng(1)
    rows = {}
    with _channel(target) as channel:
        call = channel.unary_unary(KSERVE_INFER)
        for workload, (model, shape) in WORKLOADS.items():
            x = rng.standard_normal(shape).astype(np.float32)
            requests = {v: contender_requests(x, _name(model, d))["kserve"] for v, d in VARIANTS}
            reference = decode_response("kserve", call(requests["off"], timeout=60), None)
            for variant, request in requests.items():
                got = decode_response("kserve", call(request, timeout=60), None)
                np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)
            for concurrency in CONCURRENCY:
                samples = {v: [] for v, _ in VARIANTS}
                order = [v for v, _ in VARIANTS]
                for r in range(rounds):
                    for variant in order[r % len(order):] + order[:r % len(order)]:
                        out = closed_loop(call, requests[variant], concurrency, slice_s)
                        lat = sorted(out["latencies"])
                        samples[variant].append({
                            "req_s": len(lat) / out["wall"], "errors": len(out["errors"]),
                            "p50": 1e3 * lat[len(lat) // 2] if lat else float("nan"),
                            "p99": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")})
                        time.sleep(pause)
                for variant, runs in samples.items():
                    row = {k: statistics.median(run[k] for run in runs) for k in ("req_s", "p50", "p99")}
                    row["errors"] = sum(run["errors"] for run in runs)
                    rows[(workload, concurrency, variant)] = row
                    log(f"{workload} C={concurrency} batching {variant}: {row['req_s']:.0f} req/s, "
                        f"p50 {row['p50']:.2f} ms, p99 {row['p99']:.2f} ms")
    return rows


def measure_shm(target, calls, log):
    """p50/p90 of the medium input at concurrency 1: raw contents over gRPC vs a shared-memory region."""
    from client._shm import SharedMemoryRegion, infer_request
    from convproto.inference import grpc_service_pb2 as kpb, grpc_service_pb2_grpc as kpb_grpc

    model, shape = WORKLOADS["medium"]
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    times = {"grpc": [], "shm": []}
    with _channel(target) as channel, SharedMemoryRegion(2 * x.nbytes + 4096) as region:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        stub.SystemSharedMemoryRegister(kpb.SystemSharedMemoryRegisterRequest(
            name=region.name, key=region.key, byte_size=region.nbytes))
        try:
            raw = channel.unary_unary(KSERVE_INFER)
            grpc_request = contender_requests(x, model)["kserve"]
            shm_request = infer_request(model, x, region).SerializeToString()
            out_offset = region.output_offset(x.nbytes)
            expected = decode_response("kserve", raw(grpc_request, timeout=60), None)

            def via_grpc():
                return decode_response("kserve", raw(grpc_request, timeout=60), None)

            def via_shm():
                reply = kpb.ModelInferResponse.FromString(raw(shm_request, timeout=60))
                # What a caller does: its input is already in the region; it reads the output there (no copy).
                return region.array(tuple(reply.outputs[0].shape), np.float32, out_offset)

            for fn in (via_grpc, via_shm):
                np.testing.assert_array_equal(fn(), expected)
            for i in range(calls):
                for key, fn in ((("grpc", via_grpc), ("shm", via_shm)) if i % 2 else
                                (("shm", via_shm), ("grpc", via_grpc))):
                    t0 = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - t0)
        finally:
            stub.SystemSharedMemoryUnregister(kpb.SystemSharedMemoryUnregisterRequest(name=region.name))
    result = {k: _quantiles(v) for k, v in times.items()}
    result["ratio"] = result["shm"]["p50"] / result["grpc"]["p50"]
    log(f"medium C=1: gRPC p50 {result['grpc']['p50']:.2f} ms, shm p50 {result['shm']['p50']:.2f} ms "
        f"(shm/gRPC {result['ratio']:.2f})")
    return result


def render(rows, shm, args):
    lines = [START, "## Dynamic batching and shared memory (`python -m benchmarks.batching`)", "",
             f"Run {utc_now()}, `{' '.join(sys.argv[1:]) or '(defaults)'}`; {args.rounds} rounds x "
             f"{args.slice:g} s slices per variant, interleaved. Machine:", ""] + machine_lines() + [
             "", "KServe `ModelInfer`, one client process, C threads in closed loops; batching with max_batch_size "
             f"{MAX_BATCH}. Throughput ratio = batching on / off, same workload and concurrency.", "",
             "| workload | C | batching | req/s | p50 ms | p99 ms | × off | errors |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for workload in WORKLOADS:
        for c in CONCURRENCY:
            off = rows[(workload, c, "off")]["req_s"]
            for variant, _ in VARIANTS:
                r = rows[(workload, c, variant)]
                lines.append(f"| {workload} | {c} | {variant} | {r['req_s']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} "
                             f"| {r['req_s'] / off:.2f} | {r['errors']} |")
    lines += ["", f"System shared memory, medium (1×64×56×56 in and out, 0.77 MiB each), concurrency 1, "
                  f"{shm['grpc']['n']} calls each, alternating:", "",
              "| path | p50 ms | p90 ms |", "|---|---:|---:|",
              f"| gRPC raw contents | {shm['grpc']['p50']:.2f} | {shm['grpc']['p90']:.2f} |",
              f"| shared memory | {shm['shm']['p50']:.2f} | {shm['shm']['p90']:.2f} |", "",
              f"shm p50 / gRPC p50 = **{shm['ratio']:.2f}** (issue 11 target: ≤ 0.6).", END]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one short round (smoke test)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--slice", type=float, default=3.0, help="seconds per variant per round")
    p.add_argument("--shm-calls", type=int, default=300)
    p.add_argument("--output", default=None, help="Markdown file to write the section into (default: print)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.slice, args.shm_calls = 1, 0.5, 20
    server = ServerProcess.temporary("--workers", "24", prefix="batchbench-").start()
    try:
        register(server.target, make_weights())
        rows = measure_batching(server.target, args.rounds, args.slice, 0.2, print)
        shm = measure_shm(server.target, args.shm_calls, print)
    finally:
        server.stop(30)
        server.cleanup()
    text = render(rows, shm, args)
    if args.output:
        write_section(args.output, text, START, END)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
