"""Service benchmark: what the gRPC service adds on top of the engine, and how much load it takes.

    python3 scripts/bench_service.py [--quick] [--output BENCHMARKS.md]

It starts a real server (``python -m server`` on a free loopback port, model repository in a temporary folder) and a
tiny generic gRPC echo server (this file with ``--echo-server``), registers two models, and measures:

1. Latency, for a small (1x16x32x32, 3x3 16->16), medium (1x64x56x56, 3x3 64->64) and large (the medium layer at
   batch 8) layer, all "same" padding, bias and relu: p50/p90 of

   - ``ConvClient.infer`` on the registered model,
   - the same layer in this process: ``plan.run(x, out=buf)`` (what the server runs per call) and ``convcore.conv``,
   - a gRPC echo of the serialized ``InferRequest`` (bytes in, the same bytes back, no protobuf parsing),

   interleaved call by call (rotating order), medians over ``--calls`` calls after a warm-up. The floor is
   echo p50 + compute p50 (``plan.run``), and the target is infer p50 <= 1.3x the floor for the medium layer.
2. Throughput in a closed loop at concurrency 1, 4 and 16 for the small and medium models, with
   ``python -m client.loadtest --model ... --json`` and, at concurrency 1 and 4, with Triton's ``perf_analyzer``
   (``scripts/perf_analyzer.sh``) against the same server and model. Issue 4 wants the two within ~20%.

The results replace everything between ``<!-- service-bench:start -->`` and ``<!-- service-bench:end -->`` in the
output file (the markers are appended if missing); the rest of the file is left as it is.

``--quick`` (the smoke test) takes fewer calls and shorter runs, and skips perf_analyzer when its virtualenv
(``scripts/triton_venv.sh``) has not been created, rather than creating it.
"""
import argparse
import datetime
import json
import os
import platform
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

START, END = "<!-- service-bench:start -->", "<!-- service-bench:end -->"
ECHO_METHOD = "/bench.Echo/Echo"
MESSAGE_LIMIT = 256 << 20  # the server's default --max-message-mb; gRPC's own 4 MiB default is too small for "large"
TARGET_RATIO = 1.3         # issue 4: infer p50 within 1.3x (echo p50 + compute p50) for the medium layer
AGREEMENT = 0.20           # issue 4: loadtest and perf_analyzer within ~20% at concurrency 1 and 4

#: name -> (description, input shape, model to run it on). "large" is the medium model at batch 8: a model takes any
#: batch, so the same registered weights serve both.
LAYERS = {
    "small": ("3x3 16→16, 1×16×32×32", (1, 16, 32, 32), "bench-small"),
    "medium": ("ResNet 3x3 64→64 @56², batch 1", (1, 64, 56, 56), "bench-medium"),
    "large": ("ResNet 3x3 64→64 @56², batch 8", (8, 64, 56, 56), "bench-medium"),
}
MODELS = {"bench-small": 16, "bench-medium": 64}  # name -> channels (3x3, C->C, same, bias, relu)


# ---------------------------------------------------------------------------------------------------- echo server
def echo_server_main(port_file, workers=8):
    """Serve ``/bench.Echo/Echo`` on a free loopback port until SIGTERM, writing the port to `port_file`.

    Parameters
    ----------
    port_file : str
        Written (atomically) with the bound port once serving.
    workers : int
        RPC threads, as many as the real server's default ``--workers``.

    Notes
    -----
    Bytes in, the same bytes back: with no (de)serializers gRPC hands the handler the raw message, so this measures
    the transport alone. It has the same number of RPC threads and message limits as the real server, so the two
    differ only in what the handler does.
    """
    import concurrent.futures

    import grpc

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)})
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=workers),
                         options=[("grpc.max_send_message_length", MESSAGE_LIMIT),
                                  ("grpc.max_receive_message_length", MESSAGE_LIMIT)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(port))
    os.replace(tmp, port_file)  # atomic, so the parent never reads a half-written port
    while not stop:
        time.sleep(0.1)
    server.stop(1).wait(5)


# ---------------------------------------------------------------------------------------------------- processes
class Child:
    """A server-like child process that writes its port to a file once it serves.

    Parameters
    ----------
    name : str
        For messages and the log file name.
    argv : list of str
        The command, with ``{port_file}`` where the port file path goes.
    workdir : str
        Where the log and port file are kept.
    """

    def __init__(self, name, argv, workdir):
        self.name = name
        self.port_file = os.path.join(workdir, f"{name}.port")
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.argv = [a.replace("{port_file}", self.port_file) for a in argv]
        self.proc = None
        self.port = None

    def start(self, timeout=60.0):
        """Start the process and wait (at most `timeout` s) until it has written its port; return self."""
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")  # the source tree, wherever we run from
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.port_file):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start within {timeout:.0f} s:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        with open(self.port_file) as f:
            self.port = int(f.read())
        return self

    @property
    def target(self):
        return f"127.0.0.1:{self.port}"

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def cpu_seconds(self):
        """User + system CPU time the process has used so far (from /proc), or None if unavailable."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def stop(self, timeout=20.0):
        """SIGTERM, a bounded wait, then SIGKILL."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None) is not None:
            self._log.close()


def metrics_port(server, timeout=10.0):
    """The server's Prometheus port: it logs it at start-up (``--metrics-port 0`` picks a free one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"metrics: http://[^:]+:(\d+)/metrics", server.log())
        if m:
            return int(m.group(1))
        time.sleep(0.05)
    return None


def scrape(port):
    """{(metric name, sorted label items): value} from the server's /metrics, or {} if it cannot be read."""
    if port is None:
        return {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? ([-+0-9.eE]+|NaN|[+-]Inf)$", line)
        if m:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")))
            values[(m.group(1), labels)] = float(m.group(3))
    return values


def histogram_mean_ms(before, after, name, **labels):
    """Mean of histogram `name` over the observations made between two scrapes, in ms (None if none)."""
    def pick(snapshot, suffix):
        return sum(v for (n, lab), v in snapshot.items()
                   if n == name + suffix and all(dict(lab).get(k) == val for k, val in labels.items()))
    count = pick(after, "_count") - pick(before, "_count")
    if count <= 0:
        return None
    return (pick(after, "_sum") - pick(before, "_sum")) / count * 1e3


# ---------------------------------------------------------------------------------------------------- latency
def _quantiles(samples):
    ms = sorted(s * 1e3 for s in samples)
    return {"p50": statistics.median(ms), "p90": ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))],
            "n": len(ms)}


def measure_latency(server, echo, mport, calls, warmup, pause, log):
    """Per layer: interleaved timings of infer, plan.run (server threads and 1 thread), convcore.conv and the echo,
    then plan.run back to back; returns a list of row dicts.

    Why interleaved, with a pause before each call: the machine is shared and other users' bursts last seconds, so
    contenders measured in turn see the same bursts. The pause makes every call start as a request reaching an idle
    server does, with the OpenMP teams of this process and of the server asleep, and keeps one contender's spinning
    threads from slowing down the next. On a loaded machine waking a team costs milliseconds, hence the
    back-to-back and 1-thread columns, which show that cost.
    """
    import grpc
    import numpy as np

    import convcore
    from client import ConvClient
    from convproto.convservice.v1 import conv_pb2

    rng = np.random.default_rng(0)
    weights = {name: (rng.standard_normal((c, c, 3, 3)).astype(np.float32) * (1.0 / (3 * c ** 0.5)),
                      rng.standard_normal(c).astype(np.float32) * 0.1) for name, c in MODELS.items()}
    channel = grpc.insecure_channel(echo.target, options=[("grpc.max_send_message_length", MESSAGE_LIMIT),
                                                          ("grpc.max_receive_message_length", MESSAGE_LIMIT)])
    echo_call = channel.unary_unary(ECHO_METHOD)  # no serializers: bytes in, bytes out
    rows = []
    with ConvClient(server.target, timeout=120.0) as client:
        for name, (w, b) in weights.items():
            client.register_model(name, [{"kernel": w, "bias": b, "padding": "same", "activation": "relu"}])
        for key, (desc, shape, model) in LAYERS.items():
            w, b = weights[model]
            x = rng.standard_normal(shape).astype(np.float32)
            # The server builds its plan for batch 1 and runs it at any batch (server/_model.py); do the same.
            plan = convcore.make_plan((1, *shape[1:]), w, b, padding="same", activation="relu")
            out = np.empty(plan.output_shape(shape[0]), np.float32)
            # One OpenMP thread: no team to wake up (see the "compute 1 thread" column).
            plan1 = convcore.make_plan((1, *shape[1:]), w, b, padding="same", activation="relu", num_threads=1)
            out1 = np.empty_like(out)
            request = conv_pb2.InferRequest(name=model, input=conv_pb2.Tensor(
                dtype=conv_pb2.DTYPE_FLOAT32, shape=shape, data=x.tobytes())).SerializeToString()

            reference = plan.run(x, out=out).copy()
            got = client.infer(model, x)
            if not np.allclose(got, reference, rtol=1e-4, atol=1e-4):
                raise RuntimeError(f"{key}: ConvClient.infer and plan.run disagree (max |diff| "
                                   f"{float(np.max(np.abs(got - reference))):.3g})")
            response_bytes = conv_pb2.InferResponse(output=conv_pb2.Tensor(
                dtype=conv_pb2.DTYPE_FLOAT32, shape=got.shape, data=got.tobytes())).ByteSize()

            contenders = {
                "infer": lambda: client.infer(model, x),
                "compute": lambda: plan.run(x, out=out),
                "conv": lambda: convcore.conv(x, w, b, padding="same", activation="relu"),
                "compute1": lambda: plan1.run(x, out=out1),
                "echo": lambda: echo_call(request, timeout=120.0),
            }
            names = list(contenders)
            for _ in range(warmup):
                for fn in contenders.values():
                    fn()
            before = scrape(mport)
            samples = {n: [] for n in names}
            load_before = os.getloadavg()[0]
            for i in range(calls):
                order = names[i % len(names):] + names[:i % len(names)]  # rotate: nobody always goes first
                for n in order:
                    time.sleep(pause)
                    t0 = time.perf_counter()
                    contenders[n]()
                    samples[n].append(time.perf_counter() - t0)
            after = scrape(mport)
            # The same plan back to back, no pause: its OpenMP team is still awake (spinning) at each call, which
            # the server's team never is when calls arrive one at a time. The gap to "compute" is the team's wake-up.
            for _ in range(calls):
                t0 = time.perf_counter()
                plan.run(x, out=out)
                samples.setdefault("hot", []).append(time.perf_counter() - t0)
            row = {"layer": key, "desc": desc, "shape": shape, "request_bytes": len(request),
                   "response_bytes": response_bytes, "calls": calls,
                   "load": (load_before, os.getloadavg()[0]),
                   "server_handler_ms": histogram_mean_ms(before, after, "convserver_request_duration_seconds",
                                                          grpc_method="Infer", model=model),
                   "server_queue_ms": histogram_mean_ms(before, after, "convserver_queue_duration_seconds",
                                                        model=model),
                   "server_compute_ms": histogram_mean_ms(before, after, "convserver_compute_duration_seconds",
                                                          model=model)}
            for n in samples:
                row[n] = _quantiles(samples[n])
            row["floor"] = row["echo"]["p50"] + row["compute"]["p50"]
            row["ratio"] = row["infer"]["p50"] / row["floor"]
            rows.append(row)
            log(f"latency {key}: infer p50 {row['infer']['p50']:.2f} ms, compute {row['compute']['p50']:.2f}, "
                f"echo {row['echo']['p50']:.2f}, ratio {row['ratio']:.2f}")
    channel.close()
    return rows


# ---------------------------------------------------------------------------------------------------- throughput
def _children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # counts a child (and its reaped children) once it is waited for
    return r.ru_utime + r.ru_stime


def run_loadtest(server, model, shape, concurrency, processes, duration, warmup, workdir):
    """One ``python -m client.loadtest`` run; returns its summary and CPU use, or an error string."""
    out = os.path.join(workdir, f"lt-{model}-c{concurrency}-p{processes}.json")
    cmd = [sys.executable, "-m", "client.loadtest", "--target", server.target, "--model", model,
           "--input", "x".join(map(str, shape)), "--concurrency", str(concurrency), "--processes", str(processes),
           "--duration", f"{duration:g}", "--warmup", f"{warmup:g}", "--json", out, "--quiet"]
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cpu0, srv0, t0 = _children_cpu(), server.cpu_seconds(), time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=duration + warmup + 90)
    except subprocess.TimeoutExpired:
        return {"error": "timed out", "cmd": cmd}
    wall = time.monotonic() - t0
    if proc.returncode != 0 or not os.path.exists(out):
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}", "cmd": cmd}
    with open(out) as f:
        summary = json.load(f)["summary"]
    return {"req_s": summary["req_per_s"], "p50": summary["latency_ms"]["p50"],
            "p99": summary["latency_ms"]["p99"], "errors": summary["errors"], "requests": summary["requests"],
            # The server only works while load runs (warm-up + measured), not while the client imports its modules.
            "client_cpu": (_children_cpu() - cpu0) / wall,
            "server_cpu": _cpu_rate(server, srv0, min(wall, warmup + duration)), "cmd": cmd}


def _cpu_rate(server, before, wall):
    after = server.cpu_seconds()
    return None if before is None or after is None else (after - before) / wall


def triton_venv_ready():
    """(ready, why not): is perf_analyzer usable without creating its virtualenv or apt-installing libb64?

    Reads the stamp file name from scripts/triton_venv.sh, because that script rebuilds the venv whenever its
    stamp is missing, and a smoke test must not start a pip install.
    """
    with open(os.path.join(HERE, "triton_venv.sh")) as f:
        m = re.search(r'STAMP="\$VENV/([^"]+)"', f.read())
    venv = os.environ.get("TRITON_VENV", os.path.join(ROOT, ".venv-triton"))
    if m is None or not os.path.exists(os.path.join(venv, m.group(1))):
        return False, f"{venv} is missing or incomplete (create it with scripts/triton_venv.sh)"
    try:
        libs = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        libs = ""
    if "libb64.so.0d" not in libs:
        return False, "libb64-0d is not installed (scripts/triton_venv.sh installs it)"
    return True, ""


def perf_analyzer_command(target, model, shape, concurrency, interval_ms, csv_path):
    """The perf_analyzer invocation. --stability-percentage 100: windows on a shared machine seldom agree to 10%."""
    return [os.path.join(HERE, "perf_analyzer.sh"), "-m", model, "-u", target, "-i", "grpc",
            "--concurrency-range", str(concurrency), "--shape", "input:" + ",".join(map(str, shape[1:])),
            "-b", str(shape[0]), "--measurement-interval", str(interval_ms), "--stability-percentage", "100",
            "--max-trials", "8", "-f", csv_path]


def run_perf_analyzer(server, model, shape, concurrency, interval_ms, workdir):
    """One perf_analyzer run; returns req/s (= infer/s / batch), p50 latency and CPU use, or an error string."""
    csv_path = os.path.join(workdir, f"pa-{model}-c{concurrency}.csv")
    cmd = perf_analyzer_command(server.target, model, shape, concurrency, interval_ms, csv_path)
    cpu0, srv0, t0 = _children_cpu(), server.cpu_seconds(), time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=8 * interval_ms / 1e3 + 90)
    except subprocess.TimeoutExpired:
        return {"error": "timed out", "cmd": cmd}
    wall = time.monotonic() - t0
    text = proc.stdout + proc.stderr
    rows = []
    if proc.returncode == 0 and os.path.exists(csv_path):
        with open(csv_path) as f:
            lines = [line.strip().split(",") for line in f if line.strip()]
        if len(lines) >= 2:
            rows = [dict(zip(lines[0], r)) for r in lines[1:]]
    if not rows:
        return {"error": f"exit {proc.returncode}: {text.strip()[-300:]}", "cmd": cmd}
    row = rows[0]
    return {"req_s": float(row["Inferences/Second"]) / shape[0], "p50": float(row["p50 latency"]) / 1e3,
            "p99": float(row["p99 latency"]) / 1e3, "client_cpu": (_children_cpu() - cpu0) / wall,
            "server_cpu": _cpu_rate(server, srv0, wall), "cmd": cmd}


def _with_server_means(mport, model, method, run):
    """Call `run()` and add the server's mean handler and compute time (ms) over its calls to the result."""
    before = scrape(mport)
    result = run()
    after = scrape(mport)
    result["server_handler_ms"] = histogram_mean_ms(before, after, "convserver_request_duration_seconds",
                                                    grpc_method=method, model=model)
    result["server_compute_ms"] = histogram_mean_ms(before, after, "convserver_compute_duration_seconds",
                                                    model=model)
    return result


def _combine(results):
    """One result from the runs of one tool: the mean of each number, and every run's req/s in ``runs``."""
    for r in results:
        if "error" in r:
            return r
    out = {"runs": [r["req_s"] for r in results], "cmd": results[0]["cmd"]}
    for key in results[0]:
        values = [r.get(key) for r in results]
        if key != "cmd" and all(isinstance(v, (int, float)) for v in values):
            out[key] = statistics.fmean(values)
        elif key != "cmd":
            out[key] = None
    return out


def measure_throughput(server, mport, plan, duration, warmup, pa_interval_ms, use_pa, workdir, log,
                       abba=True):
    """Run the loadtest (and perf_analyzer where planned) for every row of `plan`; return a list of row dicts.

    Parameters
    ----------
    server : Child
        The running server.
    mport : int or None
        Its metrics port (None: no server-side means).
    plan : list of (layer, concurrency, loadtest processes, compare with perf_analyzer)
    duration, warmup : float
        Seconds measured and warmed up per loadtest run.
    pa_interval_ms : int
        perf_analyzer's measurement window.
    use_pa : bool
        Run perf_analyzer at all.
    workdir : str
        Where JSON and CSV outputs go.
    log : callable
        Progress messages.
    abba : bool
        Run each tool twice per compared row (False: once each, alternating which goes first; for --quick).

    Notes
    -----
    A compared row runs the two tools twice each in ABBA order (loadtest, perf_analyzer, perf_analyzer, loadtest,
    and BAAB on the next compared row) and reports the means: other users' load drifts over tens of seconds, and
    a single back-to-back pair was seen to swing from 0.7 to 1.6 between two repeats. ABBA cancels a linear drift.
    """
    rows = []
    n_compared = 0
    for layer, concurrency, processes, compare in plan:
        _, shape, model = LAYERS[layer]
        row = {"layer": layer, "model": model, "shape": shape, "concurrency": concurrency, "processes": processes,
               "load": os.getloadavg()[0]}

        def lt_run():
            return _with_server_means(mport, model, "Infer", lambda: run_loadtest(
                server, model, shape, concurrency, processes, duration, warmup, workdir))

        def pa_run():
            return _with_server_means(mport, model, "ModelInfer", lambda: run_perf_analyzer(
                server, model, shape, concurrency, pa_interval_ms, workdir))

        if compare and use_pa:
            first = n_compared % 2 == 0
            order = ("ABBA" if first else "BAAB") if abba else ("AB" if first else "BA")
            n_compared += 1
            results = {"A": [], "B": []}
            for tool in order:
                results[tool].append((lt_run if tool == "A" else pa_run)())
            row["lt"], row["pa"] = _combine(results["A"]), _combine(results["B"])
            row["order"] = order.replace("A", "L").replace("B", "P")
        else:
            row["lt"] = lt_run()
        lt, pa = row["lt"], row.get("pa")
        if pa is not None and "error" not in pa and "error" not in lt:
            row["agreement"] = lt["req_s"] / pa["req_s"]
        log(f"throughput {model} C={concurrency} P={processes}: loadtest {lt.get('runs', lt.get('req_s'))} req/s"
            + (f", perf_analyzer {pa.get('runs', pa.get('error'))}" if pa else "") + f" {lt.get('error', '')}")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------- report
def _f(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f}"


def _srv(result):
    """"handler / compute" mean ms of a throughput run."""
    return f"{_f(result.get('server_handler_ms'), 1)} / {_f(result.get('server_compute_ms'), 1)}"


def _self_spread_note(row):
    """A warning when a tool disagrees with itself (its two runs of one row) more than the tools disagree."""
    spreads = {}
    for key, name in (("lt", "loadtest"), ("pa", "perf_analyzer")):
        runs = row[key].get("runs") or []
        if len(runs) >= 2 and min(runs) > 0:
            spreads[name] = max(runs) / min(runs)
    if not spreads:
        return ""
    name, worst = max(spreads.items(), key=lambda kv: kv[1])
    gap = max(row["agreement"], 1 / row["agreement"])
    if worst - 1 <= AGREEMENT or worst < gap:
        return ""
    return (f" The two {name} runs of this row differ by {worst:.2f}×, more than the tools do ({gap:.2f}×): here "
            f"the row measures other users' load on the machine, not a difference between the tools.")


def _runs(row):
    """Each run's req/s of a compared row, in the order they ran (``L 74.1, P 70.2, P 69.0, L 75.3``)."""
    if "order" not in row or "runs" not in row["lt"] or "runs" not in row["pa"]:
        return "—"
    queues = {"L": list(row["lt"]["runs"]), "P": list(row["pa"]["runs"])}
    return ", ".join(f"{tool} {queues[tool].pop(0):.1f}" for tool in row["order"])


def _mib(n):
    return f"{n / (1 << 20):.2f}"


def _machine():
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable)"


def _versions():
    import grpc
    import numpy

    import convcore
    return (f"python {platform.python_version()}, grpcio {grpc.__version__}, numpy {numpy.__version__}, convcore "
            f"{getattr(convcore, '__version__', '?')} (openmp_enabled={convcore.openmp_enabled()})")


def render(ctx, lat_rows, tp_rows):
    """The Markdown section (markers included)."""
    L = [START, "## Service overhead and throughput (gRPC)", "",
         "Generated by `scripts/bench_service.py`; re-run to refresh. Everything between the markers is rewritten.",
         "",
         f"- Command: `{ctx['command']}` (took {ctx['took']:.0f} s)",
         f"- Date: {ctx['date']}",
         f"- Machine: {_machine()}; loopback only. Load average (1/5/15 min) before: "
         f"{' '.join(f'{v:.2f}' for v in ctx['load_before'])}; after: "
         f"{' '.join(f'{v:.2f}' for v in ctx['load_after'])}. The machine is shared: other users' jobs ran "
         f"during the measurement, so compare ratios taken in one run, not absolute numbers across runs.",
         f"- Versions: {_versions()}",
         f"- Server: `python -m server --host 127.0.0.1 --port 0 --metrics-port 0 --model-repository <tmp>` "
         f"(defaults: {ctx['server_threads']}). Echo server: `grpc.method_handlers_generic_handler` with bytes in "
         f"and out, 8 RPC threads, 256 MiB limits, in its own process.",
         f"- Models: 3x3 C→C, same padding, bias, relu, float32, NCHW (`bench-small` C=16, `bench-medium` C=64; "
         f"\"large\" is `bench-medium` at batch 8).",
         "",
         "### Latency: `ConvClient.infer` vs in-process compute vs gRPC echo (ms)",
         "",
         f"Method: one client process; per layer {ctx['warmup']} warm-up rounds, then {ctx['calls']} rounds of "
         f"every contender once (order rotated each round, {ctx['pause'] * 1e3:.0f} ms pause before each call, so "
         f"that every call starts like a request reaching an idle server: OpenMP teams asleep in both processes, "
         f"and no contender running into the previous one's spinning threads); p50 = median. `compute` is "
         f"`plan.run(x, out=buf)` in this process with the server's thread count (the work the server does per "
         f"call, GIL released), "
         f"`conv()` is `convcore.conv` (plan and output allocated per call), `compute 1 thread` the plan with "
         f"`num_threads=1` (interleaved like the others), `compute back-to-back` the server-thread plan called "
         f"{ctx['calls']} times in a row with no pause (its OpenMP team still awake), `echo` sends the serialized "
         f"`InferRequest` and gets the same bytes back. floor = echo p50 + compute p50. Server columns are means "
         f"from its Prometheus histograms over the timed infer calls: handler = decode + queue + compute + encode.",
         "",
         "| layer | request / response MiB | infer p50 | infer p90 | compute p50 | compute p90 | conv() p50 | "
         "compute 1 thread p50 | compute back-to-back p50 | echo p50 | echo p90 | floor | infer / floor | "
         "server handler | server compute | load avg |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in lat_rows:
        L.append(f"| {r['layer']} ({r['desc']}) | {_mib(r['request_bytes'])} / {_mib(r['response_bytes'])} | "
                 f"{_f(r['infer']['p50'])} | {_f(r['infer']['p90'])} | {_f(r['compute']['p50'])} | "
                 f"{_f(r['compute']['p90'])} | {_f(r['conv']['p50'])} | {_f(r['compute1']['p50'])} | "
                 f"{_f(r['hot']['p50'])} | {_f(r['echo']['p50'])} | "
                 f"{_f(r['echo']['p90'])} | {_f(r['floor'])} | {_f(r['ratio'])} | {_f(r['server_handler_ms'])} | "
                 f"{_f(r['server_compute_ms'])} | {r['load'][0]:.1f}–{r['load'][1]:.1f} |")
    medium = next((r for r in lat_rows if r["layer"] == "medium"), None)
    L += ["", "Target (issue 4): medium layer, infer p50 ≤ 1.3 × (echo p50 + compute p50): " + (
        f"**{'met' if medium['ratio'] <= TARGET_RATIO else 'missed'}** — {medium['ratio']:.2f}×"
        if medium else "not measured"), "", "Where the time goes (from the table):", ""]
    for r in lat_rows:
        infer = r["infer"]["p50"]
        parts = [f"- {r['layer']}: infer {infer:.2f} ms = floor {r['floor']:.2f} ms + {infer - r['floor']:.2f} ms "
                 f"service overhead ({100 * (infer - r['floor']) / infer:.0f}% of the call); compute is "
                 f"{100 * r['compute']['p50'] / infer:.0f}% of infer, the echo (transport of the same bytes) "
                 f"{100 * r['echo']['p50'] / infer:.0f}%; compute p50 with the server's 2 OpenMP threads "
                 f"{r['compute']['p50']:.2f} ms after a pause, {r['hot']['p50']:.2f} ms back to back, with 1 thread "
                 f"{r['compute1']['p50']:.2f} ms"
                 + (" (1 thread is faster: a 2-thread call needs both threads on a core at once, to wake up and at "
                    "every barrier, and other users' jobs hold one of the 2 cores much of the time)"
                    if r["compute1"]["p50"] < r["compute"]["p50"] else "")]
        if r["server_handler_ms"] is not None and r["server_compute_ms"] is not None:
            parts.append(f"; on the server the handler took {r['server_handler_ms']:.2f} ms on average, of which "
                         f"{r['server_compute_ms']:.2f} ms compute"
                         + (f" and {r['server_queue_ms']:.2f} ms queue" if r["server_queue_ms"] is not None else "")
                         + f", leaving {max(0.0, infer - r['server_handler_ms']):.2f} ms (p50 − mean) to the client "
                           f"and the transport")
        L.append("".join(parts) + ".")

    L += ["", "### Throughput: closed loop, `python -m client.loadtest` vs `perf_analyzer`", "",
          f"Method: per row `python -m client.loadtest --target 127.0.0.1:PORT --model MODEL --input SHAPE "
          f"--concurrency C --processes P --duration {ctx['duration']:g} --warmup {ctx['lt_warmup']:g} --json F`; "
          f"at concurrency 1 and 4 also `scripts/perf_analyzer.sh -m MODEL -u 127.0.0.1:PORT -i grpc "
          f"--concurrency-range C --shape input:C,H,W -b 1 --measurement-interval {ctx['pa_interval']} "
          f"--stability-percentage 100 --max-trials 8 -f out.csv`. " + (
          "Compared rows run each tool twice, in ABBA order (LPPL, then PLLP on the next compared row), and show "
          "the means, each run's req/s in `runs`, so that a drift of other users' load does not favour one tool."
          if ctx["abba"] else "Compared rows run each tool once, alternating which goes first (--quick).")
          + " LT = loadtest, PA = perf_analyzer. The loadtest calls `ConvService/Infer` through the "
          f"SDK, perf_analyzer calls KServe v2 `ModelInfer` on the same server and model. CPU columns: cores busy "
          f"on average (client: the tool's "
          f"processes over their whole run, Python start-up included; server: the server process while the load "
          f"ran); 2 cores in all. srv ms: the server's mean handler time / mean compute time over the run's calls "
          f"(Prometheus histograms; warm-up calls included).", ""]
    if ctx["pa_note"]:
        L += [f"perf_analyzer: **skipped** — {ctx['pa_note']}", ""]
    L += ["| model | C | LT processes | LT req/s | LT p50 ms | LT p99 ms | LT client CPU | LT server CPU | LT srv ms | "
          "PA req/s | PA p50 ms | PA p99 ms | PA client CPU | PA server CPU | PA srv ms | LT / PA | runs (req/s) | "
          "load avg |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in tp_rows:
        lt, pa = r["lt"], r.get("pa") or {}
        if "error" in lt:
            lt_cells = ["error"] + ["—"] * 5
        else:
            lt_cells = [_f(lt["req_s"], 1), _f(lt["p50"]), _f(lt["p99"]), _f(lt["client_cpu"]),
                        _f(lt["server_cpu"]), _srv(lt)]
        if not pa:
            pa_cells = ["—"] * 6
        elif "error" in pa:
            pa_cells = ["error"] + ["—"] * 5
        else:
            pa_cells = [_f(pa["req_s"], 1), _f(pa["p50"]), _f(pa["p99"]), _f(pa["client_cpu"]),
                        _f(pa["server_cpu"]), _srv(pa)]
        L.append(f"| {r['model']} ({'×'.join(map(str, r['shape']))}) | "
                 f"{r['concurrency']} | {r['processes']} | "
                 + " | ".join(lt_cells) + " | " + " | ".join(pa_cells)
                 + f" | {_f(r.get('agreement'))} | {_runs(r)} | {r['load']:.1f} |")
    errors = [(r, k) for r in tp_rows for k in ("lt", "pa") if r.get(k) and "error" in r[k]]
    for r, k in errors:
        L.append(f"\n- {r['model']} C={r['concurrency']} {'loadtest' if k == 'lt' else 'perf_analyzer'} failed: "
                 f"{r[k]['error']}")
    compared = [r for r in tp_rows if r.get("agreement") is not None]
    if compared:
        L += ["", f"Agreement (issue 4: within ~{AGREEMENT:.0%} at concurrency 1 and 4):", ""]
        for r in compared:
            a = r["agreement"]
            ok = abs(a - 1) <= AGREEMENT
            L.append(f"- {r['model']} C={r['concurrency']} (loadtest "
                     f"{r['processes']} process(es)): {a:.2f} — "
                     + ("**within**" if ok else f"**outside**, by {100 * (abs(a - 1) - AGREEMENT):.0f} points "
                        f"beyond the {AGREEMENT:.0%}")
                     + f"; client CPU {_f(r['lt']['client_cpu'])} (loadtest) vs {_f(r['pa']['client_cpu'])} "
                       f"(perf_analyzer) of the 2 cores the server also needs; server CPU {_f(r['lt']['server_cpu'])} "
                       f"vs {_f(r['pa']['server_cpu'])}; server mean handler / compute ms {_srv(r['lt'])} vs "
                       f"{_srv(r['pa'])}."
                     + _self_spread_note(r))
    L.append(END)
    return "\n".join(L) + "\n"


def write_section(path, section):
    """Replace the marked section of `path` (append it, with the markers, when they are missing)."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    if START in text and END in text and text.index(START) < text.index(END):
        text = text[:text.index(START)] + section.rstrip("\n") + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None):
    """Run the benchmark (or, with the internal ``--echo-server``, the echo server) and write the section.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success; a failure to start a server or a wrong result raises.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few calls and short runs (smoke test, < 60 s)")
    p.add_argument("--output", default=os.path.join(ROOT, "BENCHMARKS.md"), help="Markdown file to update")
    p.add_argument("--calls", type=int, default=None, help="timed calls per contender (default 40; --quick 6)")
    p.add_argument("--duration", type=float, default=None, help="loadtest seconds per row (default 10; --quick 1)")
    p.add_argument("--no-perf-analyzer", action="store_true", help="skip the perf_analyzer comparison")
    p.add_argument("--echo-server", metavar="PORT_FILE", help=argparse.SUPPRESS)  # internal: the echo process
    args = p.parse_args(argv)
    if args.echo_server:
        echo_server_main(args.echo_server)
        return 0

    t_start = time.monotonic()
    calls = args.calls or (6 if args.quick else 40)
    warmup = 2 if args.quick else 5
    duration = args.duration or (1.0 if args.quick else 10.0)
    lt_warmup = 0.3 if args.quick else 2.0
    pa_interval = 500 if args.quick else 3000
    pause = 0.01
    # (layer, concurrency, loadtest processes, compare with perf_analyzer). Small requests cost the Python client
    # about as much CPU as the server, so one client process saturates first: use two from concurrency 4 on, and
    # keep a 1-process row at C=4 to show the difference.
    plan = [("small", 1, 1, True), ("small", 4, 2, True), ("small", 4, 1, False), ("small", 16, 2, False),
            ("medium", 1, 1, True), ("medium", 4, 1, True), ("medium", 16, 2, False)]
    if args.quick:
        plan = [row for row in plan if not (row[0] == "small" and row[1] == 4 and row[2] == 1)]

    pa_note = ""
    use_pa = not args.no_perf_analyzer
    if args.no_perf_analyzer:
        pa_note = "--no-perf-analyzer was given"
    elif args.quick:
        ready, why = triton_venv_ready()
        if not ready:
            use_pa, pa_note = False, f"--quick does not create the Triton virtualenv: {why}"
    if pa_note:
        print(f"bench_service: perf_analyzer skipped: {pa_note}", flush=True)

    def log(msg):
        print(f"bench_service [{time.monotonic() - t_start:5.1f} s, load {os.getloadavg()[0]:.2f}] {msg}",
              flush=True)

    load_before = os.getloadavg()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        server = Child("server", [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0",
                                  "--port-file", "{port_file}", "--metrics-port", "0",
                                  "--model-repository", os.path.join(tmp, "models")], tmp)
        echo = Child("echo", [sys.executable, os.path.abspath(__file__), "--echo-server", "{port_file}"], tmp)
        try:
            server.start()
            echo.start()
            mport = metrics_port(server)
            m = re.search(r"threads: (.*?) \(OpenMP", server.log())
            server_threads = m.group(1) if m else "see server log"
            log(f"server {server.target} (metrics port {mport}), echo {echo.target}")
            lat_rows = measure_latency(server, echo, mport, calls, warmup, pause, log)
            echo.stop()  # idle, but one process fewer on a 2-core machine during the throughput runs
            tp_rows = measure_throughput(server, mport, plan, duration, lt_warmup, pa_interval, use_pa, tmp, log,
                                         abba=not args.quick)
        finally:
            echo.stop()
            server.stop()
    command = "python3 scripts/bench_service.py" + (" --quick" if args.quick else "") + "".join(
        f" {flag} {shlex.quote(str(v))}" for flag, v in (("--calls", args.calls), ("--duration", args.duration))
        if v is not None) + (" --no-perf-analyzer" if args.no_perf_analyzer else "") + (
        f" --output {shlex.quote(os.path.relpath(args.output, ROOT))}"
        if os.path.abspath(args.output) != os.path.join(ROOT, "BENCHMARKS.md") else "")
    ctx = {"command": command, "took": time.monotonic() - t_start, "date": date, "load_before": load_before,
           "load_after": os.getloadavg(), "server_threads": server_threads, "calls": calls, "warmup": warmup,
           "pause": pause, "duration": duration, "lt_warmup": lt_warmup, "pa_interval": pa_interval,
           "pa_note": pa_note, "abba": not args.quick}
    section = render(ctx, lat_rows, tp_rows)
    write_section(args.output, section)
    print(section)
    print(f"bench_service: wrote {args.output} in {ctx['took']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
