"""Cross-process timeline of single calls: where a medium call's time goes between client and server.

    flock /tmp/bench.lock python3 scripts/call_timeline.py [--workload medium] [--calls 60] [--pause 0.002]
                                                            [--contenders ours,plain,echo] [--perf OUT]

Each contender (ours = ``python -m server`` of this tree with KServe ModelInfer raw contents, or ``infer`` for
ConvService/Infer (``infer-sdk``: the request as the SDK encodes it, payload aligned), or ``bound`` for ours
with ``--omp-bind spread``, ``shm`` for ours with KServe ModelInfer through a system shared-memory region (input and
output in the region, as benchmarks/batching.py's shm rows); plain = benchmarks/service.py's hand-written grpcio + torch server; echo = the gRPC echo of the
same bytes) runs in its own child process, with stamps taken from CLOCK_MONOTONIC (``time.monotonic_ns``, the same
clock in every process of one machine) at: handler entry (the first Python line of the gRPC handler), compute start
and end (``Model.run`` / ``F.conv2d``), handler return (the bytes handed back to gRPC). This process is the client:
it stamps just before the call and just after it returns, one call at a time with `pause` seconds before each, the
contenders interleaved in rounds. Reported per contender, medians over calls (ms):

    send -> entry      client send, transport, server polling thread, hand-off to an RPC thread, its wake-up
    entry -> compute   Python in the handler before the compute (decode, lookup, checks, compute slot)
    compute            the convolution
    compute -> return  Python after the compute (response framing, statistics)
    return -> recv     gRPC sends, transport, the client's wake-up and its Python

With ``--perf OUT`` it also records the scheduler (``perf record -k mono -a``: sched_switch / sched_wakeup /
cpu_idle, same clock) while the calls run, for a per-call look at which thread wakes when (``perf script -i OUT``).
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

STAMPS = []  # (event, monotonic ns) in the server process
OURS = ("ours", "infer", "infer-sdk", "bound", "shm")  # contenders that are our server


def _stamp(event):
    STAMPS.append((event, time.monotonic_ns()))


def _stamped(fn):
    def handler(request, context):
        _stamp("entry")
        try:
            return fn(request, context)
        finally:
            _stamp("return")
    return handler


def _bracketed(name, fn):
    def stamped(*args, **kwargs):
        _stamp(name + " >")
        try:
            return fn(*args, **kwargs)
        finally:
            _stamp(name + " <")
    return stamped


def _dump_on_term(path):
    def on_term(*_):
        with open(path, "w") as f:
            json.dump(STAMPS, f)
        os._exit(0)
    signal.signal(signal.SIGTERM, on_term)


def serve(kind, port_file, stamps_path, weights_path, workers):
    """Child process: one contender with stamps; writes its port to `port_file`, its stamps on SIGTERM."""
    import grpc
    if kind in OURS:
        from server.__main__ import configure_openmp, configure_openmp_places, parse_args
        configure_openmp(None)
        configure_openmp_places("spread" if kind == "bound" else "off")  # as python -m server [--omp-bind spread]
        from server import _handlers, _model, create_server
        from server._compute import configure_allocator
        configure_allocator()
        original_wrap = _handlers.MethodWrapper.wrap

        def wrap(self, full_method, handler):  # the wrapped handler of the two infer methods, stamped outermost
            wrapped = original_wrap(self, full_method, handler)
            if full_method.endswith(("/ModelInfer", "/Infer")):
                wrapped = grpc.unary_unary_rpc_method_handler(_stamped(wrapped.unary_unary),
                                                              response_serializer=wrapped.response_serializer)
            return wrapped
        _handlers.MethodWrapper.wrap = wrap
        if os.environ.get("TIMELINE_DETAIL"):  # stamps at the steps between handler entry and compute start/return
            from client import wire
            from server import _compute, _kserve, _service, _servicer
            for owner, attr in ((wire, "decode_model_infer_request"), (wire, "decode_infer_request"),
                                (wire, "tensor_array"), (_kserve, "_input"), (_servicer, "required_tensor"),
                                (_service.InferenceService, "model"), (_service.InferenceService, "route"),
                                (_compute.ComputeExecutor, "run"), (_service.InferenceService, "_timed_job"),
                                (wire, "model_infer_response"), (wire, "tensor_response"),
                                (_servicer.OutputSink, "finish"), (_service.InferenceService, "infer")):
                setattr(owner, attr, _bracketed(attr, getattr(owner, attr)))
        original_run = _model.Model.run

        def run(self, *args):
            _stamp("compute start")
            try:
                return original_run(self, *args)
            finally:
                _stamp("compute end")
        _model.Model.run = run
        repo = tempfile.mkdtemp(prefix="timeline-")
        _, config, _, _ = parse_args(["--model-repository", repo, "--workers", str(workers)])
        config.metrics_port = None
        server, port = create_server("127.0.0.1:0", config)
    else:
        import concurrent.futures

        from benchmarks import service
        if kind == "plain":
            import torch.nn.functional as F
            conv2d = F.conv2d

            def stamped_conv2d(*args, **kwargs):
                _stamp("compute start")
                try:
                    return conv2d(*args, **kwargs)
                finally:
                    _stamp("compute end")
            F.conv2d = stamped_conv2d
            generic = service._plain_handlers(weights_path, 2)
        else:
            generic = None
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=workers),
                             options=[("grpc.max_send_message_length", service.PLAIN_LIMIT),
                                      ("grpc.max_receive_message_length", service.PLAIN_LIMIT)])
        if kind == "plain":
            # Re-wrap every method's handler with stamps (the generic handler keeps them in a dict by method).
            methods = generic._method_handlers
            for key, h in list(methods.items()):
                methods[key] = grpc.unary_unary_rpc_method_handler(_stamped(h.unary_unary))
            server.add_generic_rpc_handlers((generic,))
        else:
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
                "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_stamped(lambda r, c: r))}),))
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    _dump_on_term(stamps_path)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.replace(port_file + ".tmp", port_file)
    threading.Event().wait()


def _start(kind, workdir, weights_path, workers):
    port_file = os.path.join(workdir, f"{kind}.port")
    stamps = os.path.join(workdir, f"{kind}.stamps.json")
    log = open(os.path.join(workdir, f"{kind}.log"), "w")
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, port_file, stamps, weights_path,
                             str(workers)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": ROOT})
    deadline = time.monotonic() + 60
    while not os.path.exists(port_file):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{kind} server did not start; see {log.name}")
        time.sleep(0.05)
    with open(port_file) as f:
        return proc, f"127.0.0.1:{f.read().strip()}", stamps


def _segments(server_events, client):
    """Per call: the segments of the module docstring (ms) from the server's stamps and the client's (send, recv)."""
    calls, current = [], None
    for event, t in server_events:
        if event == "entry":
            current = {"entry": t}
            calls.append(current)
        elif current is not None:
            current.setdefault(event, t)
    if len(calls) != len(client):
        raise RuntimeError(f"{len(calls)} server calls stamped, {len(client)} client calls")
    rows = []
    for (send, recv), s in zip(client, calls):
        row = {"send -> entry": s["entry"] - send}
        if "compute start" in s:
            row["entry -> compute"] = s["compute start"] - s["entry"]
            row["compute"] = s["compute end"] - s["compute start"]
            row["compute -> return"] = s["return"] - s["compute end"]
        else:
            row["handler"] = s["return"] - s["entry"]
        row["return -> recv"] = recv - s["return"]
        row["total"] = recv - send
        rows.append({k: v / 1e6 for k, v in row.items()})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="medium", choices=("small", "medium", "batch-8"))
    p.add_argument("--calls", type=int, default=60, help="calls per contender (after warm-up)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--pause", type=float, default=0.002, help="seconds before each call")
    p.add_argument("--rounds", type=int, default=6, help="the calls are split into this many interleaved rounds")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--contenders", default="ours,plain,echo")
    p.add_argument("--perf", help="also record the scheduler into this perf.data file")
    p.add_argument("--perf-events", default="sched:sched_switch,sched:sched_wakeup,power:cpu_idle",
                   help="what --perf records (comma-separated perf events)")
    p.add_argument("--json", help="write per-call segments here")
    args = p.parse_args(argv)

    import grpc
    import numpy as np

    from benchmarks.service import (CONV_INFER, KSERVE_INFER, LAYERS, PLAIN_SERVICE, _channel, contender_requests,
                                    make_weights, register_models)
    workdir = tempfile.mkdtemp(prefix="timeline-")
    weights = make_weights()
    wpath = os.path.join(workdir, "weights.npz")
    np.savez(wpath, **{f"{m}.{k}": v for m, (w, b) in weights.items() for k, v in (("w", w), ("b", b))})
    _, shape, model = LAYERS[args.workload]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    requests = contender_requests(x, model)
    kinds = args.contenders.split(",")
    procs, calls, reqs, stamps, regions = {}, {}, {}, {}, []
    try:
        for kind in kinds:
            procs[kind], target, stamps[kind] = _start(kind, workdir, wpath, args.workers)
            if kind in OURS:
                register_models(target, weights)
            method = {"ours": KSERVE_INFER, "bound": KSERVE_INFER, "shm": KSERVE_INFER, "infer": CONV_INFER,
                      "infer-sdk": CONV_INFER, "plain": f"/{PLAIN_SERVICE}/{model}", "echo": "/bench.Echo/Echo"}[kind]
            calls[kind] = _channel(target).unary_unary(method)
            if kind == "infer-sdk":  # the SDK's encoding: the payload aligned in the message (no copy on arrival)
                from client import wire
                reqs[kind] = wire.infer_request(model, x)
            elif kind == "shm":  # input written into the region once; the server writes the output there
                from client._shm import SharedMemoryRegion, infer_request
                from convproto.inference import grpc_service_pb2 as kpb
                region = SharedMemoryRegion(2 * x.nbytes + 4096)
                regions.append(region)
                _channel(target).unary_unary("/inference.GRPCInferenceService/SystemSharedMemoryRegister")(
                    kpb.SystemSharedMemoryRegisterRequest(name=region.name, key=region.key,
                                                          byte_size=region.nbytes).SerializeToString(), timeout=30)
                reqs[kind] = infer_request(model, x, region).SerializeToString()
            else:
                reqs[kind] = requests[{"ours": "kserve", "bound": "kserve", "infer": "infer"}.get(kind, kind)]
            for _ in range(args.warmup):
                calls[kind](reqs[kind], timeout=60)
        perf = None
        if args.perf:
            perf = subprocess.Popen(["perf", "record", "-q", "-k", "mono", "-a", "-o", args.perf, "-e",
                                     args.perf_events],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        client = {k: [] for k in kinds}
        per_round = max(1, args.calls // args.rounds)
        t_begin = time.monotonic_ns()
        for r in range(args.rounds):
            for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                call, req = calls[kind], reqs[kind]
                for _ in range(per_round):
                    time.sleep(args.pause)
                    t0 = time.monotonic_ns()
                    call(req, timeout=60)
                    client[kind].append((t0, time.monotonic_ns()))
        t_end = time.monotonic_ns()
        if perf is not None:
            perf.send_signal(signal.SIGINT)
            perf.wait(60)
    finally:
        for kind, proc in procs.items():
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        for region in regions:
            region.close()
    out = {"pids": {k: p.pid for k, p in procs.items()}, "client_pid": os.getpid(),
           "window_ns": [t_begin, t_end], "load": open("/proc/loadavg").read().strip(), "contenders": {}}
    print(f"{args.workload}, {per_round * args.rounds} calls per contender, pause {args.pause * 1e3:g} ms, "
          f"load {out['load']}")
    for kind in kinds:
        with open(stamps[kind]) as f:
            events = json.load(f)
        # Skip the warm-up calls (and, for ours, nothing else is stamped: registration is not an infer method).
        entries = [i for i, (e, _) in enumerate(events) if e == "entry"]
        events = events[entries[args.warmup]:]
        rows = _segments(events, client[kind])
        out["contenders"][kind] = {"rows": rows, "client": client[kind], "server": events}
        keys = list(rows[0])
        med = {k: statistics.median(r[k] for r in rows) for k in keys}
        p90 = sorted(r["total"] for r in rows)[9 * len(rows) // 10]
        mean = statistics.mean(r["total"] for r in rows)
        print(f"  {kind:6s} " + "  ".join(f"{k} {v:.3f}" for k, v in med.items())
              + f"  (total p90 {p90:.3f}, mean {mean:.3f})")
        if os.environ.get("TIMELINE_DETAIL"):  # every stamp's median offset from the handler entry (first of each)
            offsets, current = {}, None
            for event, t in events:
                if event == "entry":
                    current, seen = t, set()
                elif current is not None and event not in seen:
                    seen.add(event)
                    offsets.setdefault(event, []).append((t - current) / 1e6)
            order = sorted(offsets, key=lambda e: statistics.median(offsets[e]))
            print("    " + ", ".join(f"{e} {statistics.median(offsets[e]):.3f}" for e in order))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
    else:
        main()
