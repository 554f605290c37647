"""Prototype: grpc.aio against the sync gRPC server, per call, on an echo and on the small layer (issue 10).

    flock /tmp/bench.lock python3 scripts/aio_prototype.py KIND[,KIND...] [ROUNDS] [C]

KIND: sync-echo, aio-echo, sync-conv (compute on the RPC thread), aio-conv-inline (compute on the event loop),
aio-conv-pool (compute off the loop, in a 2-thread executor), aio-conv-sync (a sync handler in an aio server, run
in gRPC's migration pool). Raw-bytes handlers, the small layer (3x3 16->16 on 1x16x32x32) with convcore's one-thread
plan, each server in its own process; interleaved closed loops; req/s and CPU per request (/proc). Not our server:
it measures what the server architecture alone costs. Readings in BENCHMARKS.md ("Serving path (issue 10)").
"""
import asyncio
import concurrent.futures
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHAPE = (1, 16, 32, 32)


def make_conv():
    import convcore
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 16, 3, 3)) * 0.1).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    plan = convcore.make_plan(SHAPE, w, b, padding="same", activation="relu", num_threads=1)
    return plan


def serve(kind, port_file):
    import grpc
    plan = make_conv() if "conv" in kind else None
    if kind.startswith("sync"):
        def handler(request, context):
            if plan is None:
                return request
            x = np.frombuffer(request, np.float32).reshape(SHAPE)
            return plan.run(x).tobytes()
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=8))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "b.S", {"M": grpc.unary_unary_rpc_method_handler(handler)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        open(port_file, "w").write(str(port))
        server.wait_for_termination()
        return

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)

    async def main():
        if kind == "aio-echo":
            async def handler(request, context):
                return request
        elif kind == "aio-conv-inline":
            async def handler(request, context):
                x = np.frombuffer(request, np.float32).reshape(SHAPE)
                return plan.run(x).tobytes()
        elif kind == "aio-conv-sync":  # a sync def handler in an aio server: run in the migration thread pool
            def handler(request, context):
                x = np.frombuffer(request, np.float32).reshape(SHAPE)
                return plan.run(x).tobytes()
        else:
            loop = asyncio.get_running_loop()

            def job(request):
                x = np.frombuffer(request, np.float32).reshape(SHAPE)
                return plan.run(x).tobytes()

            async def handler(request, context):
                return await loop.run_in_executor(pool, job, request)
        server = grpc.aio.server(migration_thread_pool=concurrent.futures.ThreadPoolExecutor(max_workers=8))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "b.S", {"M": grpc.unary_unary_rpc_method_handler(handler)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        open(port_file, "w").write(str(port))
        await server.wait_for_termination()

    asyncio.run(main())


def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def closed_loop(call, request, c, seconds):
    counts = [0] * c
    end = time.perf_counter() + seconds

    def worker(i):
        while time.perf_counter() < end:
            call(request, timeout=30)
            counts[i] += 1
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(c)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts), time.perf_counter() - t0


def main():
    import grpc
    kinds = sys.argv[1].split(",")
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    c = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    procs, calls, chans = {}, {}, []
    for k in kinds:
        pf = os.path.join(tempfile.gettempdir(), f"aio-prototype-{os.getpid()}-{k}")
        if os.path.exists(pf):
            os.remove(pf)
        procs[k] = subprocess.Popen([sys.executable, __file__, "--serve", k, pf], env={**os.environ,
                                    "PYTHONPATH": ROOT, "OMP_WAIT_POLICY": "passive"})
        while not os.path.exists(pf) or not open(pf).read():
            time.sleep(0.05)
        ch = grpc.insecure_channel(f"127.0.0.1:{open(pf).read()}")
        chans.append(ch)
        calls[k] = ch.unary_unary("/b.S/M")
    request = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32).tobytes()
    for k in kinds:
        closed_loop(calls[k], request, 2, 1.0)
    res = {k: [] for k in kinds}
    for r in range(rounds):
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
        for k in order:
            time.sleep(0.2)
            c0 = cpu(procs[k].pid)
            n, wall = closed_loop(calls[k], request, c, 2.0)
            res[k].append((n / wall, (cpu(procs[k].pid) - c0) / n * 1e3))
    base = kinds[0]
    for k in kinds:
        ratios = [a[0] / b[0] for a, b in zip(res[k], res[base])]
        print(f"{k:18s} req/s {statistics.median(x[0] for x in res[k]):7.0f}  cpu/req "
              f"{statistics.median(x[1] for x in res[k]):.3f} ms  / {base} {statistics.median(ratios):.2f} "
              f" rounds {[round(x[0]) for x in res[k]]}")
    for p in procs.values():
        p.terminate()
    for p in procs.values():
        p.wait()


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3])
    else:
        main()
