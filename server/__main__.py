"""``python -m server``: serve until SIGTERM/SIGINT, then drain in-flight calls and exit 0."""
import argparse
import logging
import os
import signal
import sys
import threading

from ._config import ServerConfig, _default_repository
from ._hardening import add_arguments, apply_arguments

log = logging.getLogger("server")


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _finite_seconds(text):
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return value


def _nonnegative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _port(text):
    value = int(text)
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text}")
    return value


def parse_args(argv=None):
    """Parse the command line into (address, ServerConfig, port_file, log_level)."""
    return _parse(argv)[0]


def _parse(argv):
    """((address, ServerConfig, port_file, log_level), the parsed flags)."""
    defaults = ServerConfig.__dataclass_fields__
    p = argparse.ArgumentParser(prog="python -m server", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="0.0.0.0", help="interface to listen on")
    p.add_argument("--port", type=int, default=50051, help="port (0: pick a free one; see --port-file)")
    p.add_argument("--model-repository", default=_default_repository(), metavar="DIR",
                   help="folder of registered models ($CONVSERVICE_MODEL_REPOSITORY overrides the default)")
    p.add_argument("--workers", type=_positive_int, default=defaults["workers"].default, metavar="N",
                   help="threads serving RPCs (each call is decoded, computed and encoded on one)")
    p.add_argument("--max-message-mb", type=_positive_int, default=defaults["max_message_mb"].default, metavar="MB",
                   help="largest request/response message, MiB")
    p.add_argument("--omp-threads", type=_positive_int, default=None, metavar="N",
                   help="OpenMP threads per convolution; %(default)s = convcore's choice (all usable cores)")
    p.add_argument("--compute-slots", type=_positive_int, default=None, metavar="N",
                   help="convolutions at once; %(default)s = usable cores // OpenMP threads")
    p.add_argument("--omp-wait", choices=OMP_WAIT_CHOICES, default=None,
                   help="what idle OpenMP threads do between convolutions: passive (sleep at once, the default "
                        "unless $OMP_WAIT_POLICY or $GOMP_SPINCOUNT is set) leaves the cores to gRPC's threads; "
                        "active spins (lowest latency for back-to-back large calls, burns a core)")
    p.add_argument("--omp-bind", choices=OMP_BIND_CHOICES, default="off",
                   help="OpenMP thread placement: spread binds the team one thread per CPU (calls after an idle "
                        "pause compute on both CPUs; a bound thread waits when another process holds its CPU), off "
                        "leaves placement to the scheduler; a placement in the environment (OMP_PROC_BIND, "
                        "OMP_PLACES, GOMP_CPU_AFFINITY) wins over both")
    p.add_argument("--grace", type=float, default=defaults["grace_seconds"].default, metavar="SECONDS",
                   help="seconds in-flight calls may take to finish on shutdown")
    p.add_argument("--max-batch-size", type=_positive_int, default=defaults["kserve_max_batch_size"].default,
                   metavar="N",
                   help="max_batch_size of every model in the KServe v2 / Triton API")
    p.add_argument("--max-queue-delay-microseconds", type=_nonnegative_int,
                   default=defaults["batch_max_queue_delay_microseconds"].default, metavar="US",
                   help="dynamic batching: default max_queue_delay_microseconds of models registered with batching "
                        "(their max_batch_size defaults to --max-batch-size)")
    p.add_argument("--preferred-batch-size", type=_positive_int, nargs="+", default=[], metavar="N",
                   help="dynamic batching: default preferred_batch_size of models registered with batching")
    p.add_argument("--no-shared-memory", action="store_true",
                   help="turn off Triton's system shared-memory extension (its RPCs answer UNIMPLEMENTED)")
    p.add_argument("--metrics-port", type=_port, default=8002, metavar="PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (0: pick a free one)")
    p.add_argument("--max-connection-age", type=_finite_seconds, default=None, metavar="SECONDS",
                   help="end each client connection after this age (GOAWAY), so clients reconnect and reach new "
                        "replicas (unset: never)")
    p.add_argument("--port-file", default=None, metavar="PATH",
                   help="write the bound port to PATH once serving (useful with --port 0)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_arguments(p, defaults)  # limits, TLS, auth, read-only models
    args = p.parse_args(argv)
    try:
        hardening = apply_arguments(args, {})
    except ValueError as exc:
        p.error(str(exc))  # exit 2 with the message, like any other bad flag
    host = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host
    config = ServerConfig(model_repository=args.model_repository, workers=args.workers,
                          max_message_mb=args.max_message_mb, omp_threads=args.omp_threads,
                          compute_slots=args.compute_slots, grace_seconds=args.grace,
                          kserve_max_batch_size=args.max_batch_size, metrics_port=args.metrics_port,
                          max_connection_age=args.max_connection_age,
                          batch_max_queue_delay_microseconds=args.max_queue_delay_microseconds,
                          batch_preferred_batch_size=tuple(args.preferred_batch_size),
                          shared_memory=not args.no_shared_memory, **hardening)
    try:
        config.batching_defaults()
    except ValueError as exc:
        p.error(str(exc))
    return (f"{host}:{args.port}", config, args.port_file, args.log_level), args


#: --omp-wait values; each is an OMP_WAIT_POLICY, which every OpenMP runtime reads once, when it starts.
OMP_WAIT_CHOICES = ("passive", "active")


def configure_openmp(policy, environ=os.environ):
    """Set the OpenMP wait policy for this process; must run before convcore (the OpenMP runtime) is imported.

    Why passive by default: a server's OpenMP workers that spin after each call (libgomp spins ~300k iterations,
    milliseconds) take the cores that gRPC's threads need to receive the next request and send this answer; with
    2 cores, the issue-10 measurements showed up to 3x the CPU per request for the same calls. An explicit
    ``policy`` wins over the environment; without one, an OMP_WAIT_POLICY or GOMP_SPINCOUNT already set is kept.
    Returns the policy in force (or a description of the environment's).
    """
    if "convcore" in sys.modules:
        raise RuntimeError("configure_openmp must run before convcore is imported (the OpenMP runtime reads the "
                           "wait policy once, when it starts)")
    if policy is None:
        if environ.get("OMP_WAIT_POLICY") or environ.get("GOMP_SPINCOUNT"):
            return "from the environment (" + ", ".join(f"{k}={environ[k]}" for k in ("OMP_WAIT_POLICY",
                                                                                     "GOMP_SPINCOUNT")
                                                        if environ.get(k)) + ")"
        policy = "passive"
    environ["OMP_WAIT_POLICY"] = policy
    environ.pop("GOMP_SPINCOUNT", None)  # libgomp lets it override the policy
    return policy


#: --omp-bind values.
OMP_BIND_CHOICES = ("off", "spread")
#: Set by the user, any of these decides OpenMP thread placement instead of `configure_openmp_places`.
_PLACEMENT_ENV = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY")


def _cpu_quota():
    """CPUs the cgroup's CPU quota allows (v2 ``cpu.max``, v1 ``cfs_quota_us``), or None: no quota. (convcore has
    the same reader, but importing convcore starts the OpenMP runtime, which must not have started yet.)"""
    for path, split in (("/sys/fs/cgroup/cpu.max", None), ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "period")):
        try:
            with open(path) as f:
                words = f.read().split()
            if split:
                with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
                    words.append(f.read().strip())
            if words[0] not in ("max", "-1"):
                return max(1, int(words[0]) // int(words[1]))
            return None
        except (OSError, ValueError, IndexError):
            continue
    return None


def configure_openmp_places(bind, environ=os.environ, cpus=None, quota=None):
    """With `bind` ``"spread"`` (``--omp-bind spread``; the default is ``"off"``), bind the OpenMP team's threads
    one per CPU (``OMP_PROC_BIND=spread``, one place per usable CPU) when this process has its CPUs to itself; must
    run before convcore is imported. Returns what is in force, for the log.

    Why: on this kind of VM the scheduler packs a woken thread onto the CPU of the thread that woke it when the
    machine has been idle for a few ms, so a call arriving after a pause ran its 2-thread convolution with both
    threads on one CPU, one after the other (medium: 2.7-2.9 ms instead of 1.5-1.8; BENCHMARKS.md, issue 10,
    session of 2026-12-02 06:30). Bound, the team's worker runs on its own CPU. The RPC thread that leads the team is
    pinned to the first place only while it computes (`server._compute.TeamPlacement`), so every other thread keeps
    the whole CPU set.

    Why off by default: a bound thread cannot move. When another process (the client, a sidecar, another job)
    holds the CPU the worker is bound to, the worker waits for it where an unbound one would run elsewhere; on a
    loaded machine that lengthened the tail (p90 8.4 against 6.5 ms at a 2 ms pause, and closed loops at C=1
    1.0-1.4x slower; BENCHMARKS.md). Not bound either: with fewer than 2 CPUs; when a cgroup quota allows fewer
    CPUs than the process may run on (a container sharing a host's cores); and when the environment already has a
    placement.
    """
    if bind not in OMP_BIND_CHOICES:
        raise ValueError(f"bind must be one of {OMP_BIND_CHOICES}, got {bind!r}")
    given = [k for k in _PLACEMENT_ENV if environ.get(k)]
    if given:
        return "from the environment (" + ", ".join(f"{k}={environ[k]}" for k in given) + ")"
    if bind == "off":
        return "left to the scheduler (--omp-bind off)"
    cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    if len(cpus) < 2:
        return "not bound (one usable CPU)"
    quota = _cpu_quota() if quota is None else quota
    if quota is not None and quota < len(cpus):
        return f"not bound (the CPU quota allows {quota} of the {len(cpus)} CPUs this process may run on)"
    environ["OMP_PROC_BIND"] = "spread"
    environ["OMP_PLACES"] = ",".join(f"{{{c}}}" for c in cpus)
    return f"one thread per CPU (OMP_PROC_BIND=spread, OMP_PLACES={environ['OMP_PLACES']})"


def _write_port_file(path, port):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)  # readers never see a half-written number


def main(argv=None):
    """Run the server; return the process exit code."""
    (address, config, port_file, log_level), args = _parse(argv)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    omp_wait = configure_openmp(args.omp_wait)
    omp_places = configure_openmp_places(args.omp_bind)
    from ._app import create_server  # imports convcore, which starts the OpenMP runtime: after configure_openmp
    from ._compute import configure_allocator
    log.info("OpenMP wait policy: %s", omp_wait)
    log.info("OpenMP thread placement: %s", omp_places)
    log.info("allocator: %s", configure_allocator())
    stop = threading.Event()
    received = []

    def on_signal(signum, frame):
        received.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server, port = create_server(address, config)
    except (RuntimeError, ValueError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    server.start()
    if port_file:
        _write_port_file(port_file, port)
    log.info("serving; SIGTERM or SIGINT stops")
    while not stop.wait(0.5):  # a timed wait keeps the main thread responsive to signals
        pass
    log.info("%s received: stopping (grace %.1f s for in-flight calls)", received[0], config.grace_seconds)
    server.stop(config.grace_seconds).wait()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
