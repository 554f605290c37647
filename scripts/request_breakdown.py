"""Where one request's time goes inside the server: decode, lookup, checks, queue, compute, encode, gRPC's serialize.

    flock /tmp/bench.lock python3 scripts/request_breakdown.py [--calls 60] [--json out.json]

It runs the server of this source tree in this process (``create_server`` with the default configuration, a
temporary model repository), and a client in a child process that sends pre-serialized requests as raw bytes (no
protobuf work on the client side) one at a time, with a pause before each, like requests reaching an idle server.
Before the calls it wraps the server's own functions with timers ("probes", listed per code layout in `PROBES`), so
each step is measured inside the real request path; a probe adds ~1 µs per call. Workloads (issue 10): small =
3x3 16->16 on 1x16x32x32, medium = 3x3 64->64 on 1x64x56x56, batch-8 = the same on 8x64x56x56; same padding, bias,
relu, float32 NCHW, weights registered. APIs: ConvService/Infer, KServe ModelInfer with raw_input_contents,
ModelInfer with typed contents (fp32_contents; small only, as a client would not send MiBs of typed floats), and
ModelInfer with input and output in a system shared-memory region (medium and batch-8).

Reported per (workload, API), medians over the calls in ms: the client's round trip, the server's CPU per request
(process CPU time / calls), gRPC's deserialize and serialize (our (de)serializer functions, timed where gRPC calls
them), the handler (the per-method wrapper of server/_handlers.py, or the interceptors before it, + servicer), and
inside it the steps of the code layout. ``echo`` is the same request bytes sent to a generic bytes-in/bytes-out
handler of a second gRPC server in this process: the transport.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

LIMIT = 256 << 20
WORKLOADS = {"small": ((1, 16, 32, 32), "bd-small"), "medium": ((1, 64, 56, 56), "bd-medium"),
             "batch-8": ((8, 64, 56, 56), "bd-medium")}
MODELS = {"bd-small": 16, "bd-medium": 64}
ECHO = "/bench.Echo/Echo"


# ------------------------------------------------------------------------------------------------------ client side
def client_main(argv):
    """Child process: call `method` on `target` with the request bytes in `request_file`; print latencies (JSON)."""
    import grpc
    target, method, request_file, calls, warmup, pause = argv
    with open(request_file, "rb") as f:
        request = f.read()
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", LIMIT),
                                                     ("grpc.max_receive_message_length", LIMIT)])
    call = channel.unary_unary(method)  # no serializers: bytes in, bytes out
    for _ in range(int(warmup)):
        call(request, timeout=120)
    sys.stdout.write("warm\n")
    sys.stdout.flush()
    sys.stdin.readline()  # the parent resets its counters, then lets us go
    times = []
    for _ in range(int(calls)):
        time.sleep(float(pause))
        t0 = time.perf_counter()
        call(request, timeout=120)
        times.append(time.perf_counter() - t0)
    sys.stdout.write(json.dumps(times) + "\n")
    sys.stdout.flush()
    channel.close()


# ------------------------------------------------------------------------------------------------------ probes
class Recorder:
    """Per-probe lists of durations (seconds), filled by wrapped functions on any thread."""

    def __init__(self):
        self.samples = {}
        self.lock = threading.Lock()
        self.on = False

    def add(self, name, seconds):
        if self.on:
            with self.lock:
                self.samples.setdefault(name, []).append(seconds)

    def reset(self):
        with self.lock:
            self.samples = {}

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - t0)
        timed.__wrapped__ = fn
        return timed

    def patch(self, owner, attr, name):
        setattr(owner, attr, self.wrap(name, getattr(owner, attr)))


REC = Recorder()


def timing_interceptor():
    """Outermost interceptor: times gRPC's deserialize and serialize calls and the whole handler."""
    import grpc

    class Timing(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            handler = continuation(details)
            if handler is None or handler.unary_unary is None:
                return handler
            # A handler registered without a (de)serializer parses the request itself (then it is in "handler").
            return grpc.unary_unary_rpc_method_handler(
                REC.wrap("handler (wrapper + servicer)", handler.unary_unary),
                request_deserializer=(REC.wrap("grpc deserialize", handler.request_deserializer)
                                      if handler.request_deserializer is not None else None),
                response_serializer=(REC.wrap("grpc serialize", handler.response_serializer)
                                     if handler.response_serializer is not None else None))
    return Timing()


def probes_before():
    """Probes for the code layout before issue 10 (server/_engine.Engine, _servicer, _kserve, _compute)."""
    from server import _compute, _engine, _kserve, _model, _repository, _servicer
    REC.patch(_servicer.ConvServicer, "Infer", "servicer")
    REC.patch(_kserve.KServeServicer, "ModelInfer", "servicer")
    REC.patch(_servicer, "_required_tensor", "decode input")
    REC.patch(_kserve.KServeServicer, "_input", "decode input")
    REC.patch(_kserve.KServeServicer, "_model", "lookup")
    REC.patch(_repository.ModelRepository, "get", "lookup")
    REC.patch(_model.Model, "check_input", "checks")
    REC.patch(_engine.Engine, "_check_layer_outputs", "checks")
    REC.patch(_engine.Engine, "check_output_size", "checks")
    REC.patch(_model.Model, "output_shape", "checks")
    REC.patch(_servicer, "encode_tensor", "encode")
    REC.patch(_engine.Engine, "infer", "engine.infer (lookup, checks, queue, compute)")
    REC.patch(_compute.ComputeExecutor, "run", "executor.run (hand-off, compute, hand-back)")
    original_guarded = _compute.ComputeExecutor._guarded

    def guarded(self, token, fn, args, label, submitted):
        REC.add("queue (submit -> job starts)", time.perf_counter() - submitted)
        return original_guarded(self, token, fn, args, label, submitted)
    _compute.ComputeExecutor._guarded = guarded

    def run(self, token, x, num_threads=None):  # Model.run, timed step by step (same code)
        t0 = time.perf_counter()
        plans = self.plans(x.shape, num_threads)
        for i, plan in enumerate(plans):
            token.check()
            out = _compute.thread_buffer((id(self), i), plan.output_shape(x.shape[0]), self.dtype)
            x = plan.run(x, out=out)
        t1 = time.perf_counter()
        data = x.tobytes()
        t2 = time.perf_counter()
        REC.add("compute (plans + plan.run)", t1 - t0)
        REC.add("output tobytes", t2 - t1)
        return data, x.shape
    _model.Model.run = run


def probes_after():
    """Probes for the code layout of issue 10 (server/_service.InferenceService, client/wire, thin servicers)."""
    from client import wire
    from server import _compute, _kserve, _service, _servicer
    REC.patch(wire, "decode_infer_request", "grpc deserialize: wire decode")
    REC.patch(wire, "decode_model_infer_request", "grpc deserialize: wire decode")
    REC.patch(_servicer, "required_tensor", "decode input")
    REC.patch(_kserve, "_input", "decode input")
    REC.patch(_service.InferenceService, "model", "lookup")
    REC.patch(_service.InferenceService, "route", "checks + route cache")
    REC.patch(_service.InferenceService, "infer", "service.infer (checks, slot, compute)")
    REC.patch(_compute.ComputeExecutor, "run", "executor.run (slot, compute)")
    REC.patch(_service.InferenceService, "_infer_job", "job (response buffer + compute)")
    REC.patch(wire, "tensor_response", "encode: response buffer")
    REC.patch(wire, "model_infer_response", "encode: response buffer")
    from server import _model, _shm
    REC.patch(_model.Model, "run", "compute: model.run (plan.run of every layer)")
    REC.patch(_kserve.KServeServicer, "_infer_into_shared_memory", "shm: infer into the region (checks + infer + "
              "response)")
    REC.patch(_shm._Access, "input", "shm: input view (checks, fstat)")
    REC.patch(_shm._Access, "output", "shm: output view (checks, fstat)")
    REC.patch(_shm._Access, "verify", "shm: verify (fstat)")
    REC.patch(_shm.SharedMemoryRegistry, "use", "shm: use (lookup)")
    original_job = _service.InferenceService._timed_job

    last = [None]

    def timed_job(self, token, threads, *args):  # CPU units held: how many threads the job got, and on which thread
        REC.add(f"job threads granted ({threads})", 0.0)
        ident = threading.get_ident()
        # libgomp keeps one pool of OpenMP workers per master thread: a call computed on another RPC thread than
        # the previous one wakes workers that have slept longer (see README, threading model).
        REC.add("job on another RPC thread than the previous job", float(ident != last[0]))
        REC.add("job RPC thread", float(ident))
        last[0] = ident
        return original_job(self, token, threads, *args)
    _service.InferenceService._timed_job = timed_job


PROBES = {"before": probes_before, "after": probes_after}


# ------------------------------------------------------------------------------------------------------ driver
def _usage():
    """(CPU seconds, minor page faults, voluntary, involuntary context switches) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return (r.ru_utime + r.ru_stime, r.ru_minflt, r.ru_nvcsw, r.ru_nivcsw)


def _requests(rng, shape, model, datatype_contents):
    """(Infer bytes, ModelInfer raw bytes, ModelInfer typed bytes or None) for one workload."""
    import numpy as np
    from convproto.convservice.v1 import conv_pb2
    from convproto.inference import grpc_service_pb2 as pb
    x = rng.standard_normal(shape).astype(np.float32)
    infer = conv_pb2.InferRequest(name=model, input=conv_pb2.Tensor(dtype=conv_pb2.DTYPE_FLOAT32, shape=shape,
                                                                     data=x.tobytes()))
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=shape)
    raw = pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[x.tobytes()])
    typed = None
    if datatype_contents:
        t = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=shape)
        t.contents.fp32_contents.extend(x.ravel().tolist())
        typed = pb.ModelInferRequest(model_name=model, inputs=[t])
    return [("Infer", "/convservice.v1.ConvService/Infer", infer.SerializeToString()),
            ("ModelInfer raw", "/inference.GRPCInferenceService/ModelInfer", raw.SerializeToString())] + \
        ([("ModelInfer typed", "/inference.GRPCInferenceService/ModelInfer", typed.SerializeToString())]
         if typed is not None else [])


def _shm_request(target, rng, shape, model, regions):
    """ModelInfer bytes whose input and output are in a system shared-memory region registered with the server
    (Triton's extension, as benchmarks/batching.py's shm rows send it): the input is written there once."""
    import numpy as np
    from client._shm import SharedMemoryRegion, infer_request
    from convproto.inference import grpc_service_pb2 as pb
    x = rng.standard_normal(shape).astype(np.float32)
    region = SharedMemoryRegion(2 * x.nbytes + 4096)
    regions.append(region)
    import grpc
    with grpc.insecure_channel(target) as channel:
        channel.unary_unary("/inference.GRPCInferenceService/SystemSharedMemoryRegister")(
            pb.SystemSharedMemoryRegisterRequest(name=region.name, key=region.key,
                                                 byte_size=region.nbytes).SerializeToString(), timeout=30)
    return infer_request(model, x, region).SerializeToString()


def _drive(target, method, request, calls, warmup, pause, workdir):
    path = os.path.join(workdir, "request.bin")
    with open(path, "wb") as f:
        f.write(request)
    proc = subprocess.Popen([sys.executable, __file__, "--client", target, method, path, str(calls), str(warmup),
                             str(pause)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT})
    line = proc.stdout.readline()
    if line.strip() != "warm":
        proc.kill()
        raise RuntimeError(f"client failed during warm-up: {line!r}")
    REC.reset()
    REC.on = True
    usage0 = _usage()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    times = json.loads(proc.stdout.readline())
    usage = [(b - a) / calls for a, b in zip(usage0, _usage())]
    REC.on = False
    proc.wait(30)
    # The pauses are idle time of this process (grpc's pollers use a little); CPU per request is the whole delta,
    # and so are the page faults and context switches per request (every thread of the process).
    return times, usage


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", choices=sorted(PROBES), default="after", help="which code layout's probes to install")
    p.add_argument("--calls", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--pause", type=float, default=0.01, help="seconds before each call")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra `python -m server` flag (repeat: --server-arg=--omp-threads --server-arg=1)")
    p.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), help="only these workloads")
    p.add_argument("--apis", nargs="+", choices=("Infer", "ModelInfer raw", "ModelInfer typed", "ModelInfer shm"),
                   help="only these APIs")
    args = p.parse_args(argv)
    # As `python -m server` does (server.__main__.configure_openmp), before convcore starts the OpenMP runtime: the
    # server's wait policy, not libgomp's default spin, unless the environment sets one.
    policy = None
    if "--omp-wait" in args.server_arg:
        policy = args.server_arg[args.server_arg.index("--omp-wait") + 1]
    elif any(a.startswith("--omp-wait=") for a in args.server_arg):
        policy = next(a for a in args.server_arg if a.startswith("--omp-wait=")).split("=", 1)[1]
    if policy is not None or not (os.environ.get("OMP_WAIT_POLICY") or os.environ.get("GOMP_SPINCOUNT")):
        os.environ["OMP_WAIT_POLICY"] = policy or "passive"
        os.environ.pop("GOMP_SPINCOUNT", None)
    from server.__main__ import configure_openmp_places
    bind = "spread" if "--omp-bind=spread" in args.server_arg or "spread" in args.server_arg else "off"
    print(f"OpenMP: OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}, placement: {configure_openmp_places(bind)}",
          flush=True)

    import concurrent.futures

    import grpc
    import numpy as np

    from server import create_server
    from server.__main__ import parse_args
    from server._compute import configure_allocator
    from client import ConvClient

    print(f"allocator: {configure_allocator()}", flush=True)  # as `python -m server` does

    workdir = tempfile.mkdtemp(prefix="breakdown-")
    _, config, _, _ = parse_args(["--model-repository", os.path.join(workdir, "models"), *args.server_arg])
    config.metrics_port = None
    config.interceptors = [timing_interceptor()]
    PROBES[args.layout]()  # before the servicers are built: they bind their methods at registration
    server, port = create_server("127.0.0.1:0", config)
    server.start()
    echo = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=config.workers),
                       options=[("grpc.max_send_message_length", LIMIT), ("grpc.max_receive_message_length", LIMIT)])
    echo.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda r, c: r)}),))
    echo_port = echo.add_insecure_port("127.0.0.1:0")
    echo.start()

    rng = np.random.default_rng(0)
    with ConvClient(f"127.0.0.1:{port}", timeout=60) as c:
        for name, ch in MODELS.items():
            c.register_model(name, [{"kernel": rng.standard_normal((ch, ch, 3, 3)).astype(np.float32) * 0.05,
                                     "bias": rng.standard_normal(ch).astype(np.float32), "padding": "same",
                                     "activation": "relu"}])

    results = []
    regions = []  # system shared-memory regions of the "ModelInfer shm" rows, unlinked at the end
    for workload, (shape, model) in WORKLOADS.items():
        if args.workloads and workload not in args.workloads:
            continue
        requests = _requests(rng, shape, model, workload == "small")
        if workload != "small" and (not args.apis or "ModelInfer shm" in args.apis):
            requests.append(("ModelInfer shm", "/inference.GRPCInferenceService/ModelInfer",
                             _shm_request(f"127.0.0.1:{port}", rng, shape, model, regions)))
        for api, method, request in requests:
            if args.apis and api not in args.apis:
                continue
            echo_times, echo_use = _drive(f"127.0.0.1:{echo_port}", ECHO, request, args.calls, args.warmup,
                                          args.pause, workdir)
            times, use = _drive(f"127.0.0.1:{port}", method, request, args.calls, args.warmup, args.pause, workdir)
            row = {"workload": workload, "api": api, "request_mib": len(request) / (1 << 20),
                   "round trip": statistics.median(times) * 1e3, "echo round trip": statistics.median(echo_times) * 1e3,
                   "round trip p90": sorted(times)[9 * len(times) // 10] * 1e3,
                   "server CPU / request": use[0] * 1e3, "echo CPU / request": echo_use[0] * 1e3,
                   "minor faults / request": use[1], "echo minor faults / request": echo_use[1],
                   "context switches / request": use[2] + use[3], "echo context switches / request": echo_use[2] + echo_use[3],
                   "steps": {k: statistics.median(v) * 1e3 for k, v in REC.samples.items()
                             if k not in ("job RPC thread", "job on another RPC thread than the previous job")},
                   "distinct RPC threads computing": len(set(REC.samples.get("job RPC thread", []))),
                   "jobs on another RPC thread than the previous": statistics.mean(
                       REC.samples.get("job on another RPC thread than the previous job", [0.0])),
                   "counts": {k: len(v) for k, v in REC.samples.items()}}
            results.append(row)
            steps = ", ".join(f"{k} {v:.3f}" if not k.startswith("job threads") else f"{k} x{row['counts'][k]}"
                              for k, v in row["steps"].items())
            print(f"{workload:8s} {api:17s} rtt {row['round trip']:.3f} p90 {row['round trip p90']:.3f} "
                  f"(echo {row['echo round trip']:.3f}) cpu/req {row['server CPU / request']:.3f} "
                  f"(echo {row['echo CPU / request']:.3f}) minflt/req {use[1]:.0f} (echo {echo_use[1]:.0f}) "
                  f"csw/req {use[2] + use[3]:.1f} (echo {echo_use[2] + echo_use[3]:.1f}) "
                  f"RPC threads computing {row['distinct RPC threads computing']} (thread changed "
                  f"{row['jobs on another RPC thread than the previous']:.0%} of jobs) | {steps}", flush=True)
    server.stop(1).wait()
    echo.stop(1).wait()
    for region in regions:
        region.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"layout": args.layout, "calls": args.calls, "results": results}, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2:])
    else:
        main()
