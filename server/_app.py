"""Server construction in one function, `create_server(address, config)`, and the object it returns."""
import concurrent.futures
import functools
import logging
import threading

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

import convcore
from convproto.convservice.v1 import conv_pb2
from convproto.inference import grpc_service_pb2

from ._compute import ComputeExecutor
from ._config import DEFAULT_ADDRESS, MIB, ServerConfig
from ._handlers import MethodWrapper
from ._hardening import hardening_interceptors, request_limit_options
from ._kserve import KServeServicer
from ._limits import AdmissionInterceptor, CountingThreadPool
from ._metrics import ServerMetrics, serve_metrics
from ._repository import ModelRepository
from ._service import InferenceService
from ._shm import SharedMemoryRegistry
from ._servicer import ConvServicer, add_service

__all__ = ["create_server", "ConvServer", "SERVICE_NAMES"]

log = logging.getLogger("server")

try:
    from importlib.metadata import version as _dist_version
    VERSION = _dist_version("convcore-service")
except Exception:  # noqa: BLE001 - running from a source tree that was never installed
    VERSION = getattr(convcore, "__version__", "0")

SERVICE_NAMES = (
    conv_pb2.DESCRIPTOR.services_by_name["ConvService"].full_name,
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
)


class ConvServer:
    """A started-or-not gRPC server with its model repository, compute executor and health state.

    Behaves like the `grpc.Server` it wraps (`start`, `stop`, `wait_for_termination`, ...); `stop` also flips
    health to NOT_SERVING first and shuts the compute executor down once in-flight calls are done.
    """

    def __init__(self, grpc_server, config, repository, executor, health_servicer, metrics):
        self._server = grpc_server
        self.config = config
        self.repository = repository
        self.executor = executor
        self.health = health_servicer
        self.metrics = metrics
        self.metrics_port = None  # the bound HTTP port of /metrics, when served
        self._metrics_httpd = None
        self._stopping = False
        self.shared_memory = None  # the SharedMemoryRegistry, unless --no-shared-memory

    def __getattr__(self, name):
        return getattr(self._server, name)

    @property
    def ready(self):
        return not self._stopping

    def start(self):
        self._server.start()
        return self

    def stop(self, grace=None):
        """Stop accepting calls, let in-flight calls finish within `grace` seconds; returns a threading.Event."""
        self._stopping = True
        self.health.enter_graceful_shutdown()  # probes see NOT_SERVING while in-flight calls drain
        done = self._server.stop(self.config.grace_seconds if grace is None else grace)

        def _release_executor():
            done.wait()
            self.executor.shutdown(wait=False)
            if self.shared_memory is not None:  # every region, also those a crashed client left registered
                self.shared_memory.close()
            if self._metrics_httpd is not None:  # kept up while calls drain, so the drain can be watched
                self._metrics_httpd.shutdown()
                self._metrics_httpd.server_close()

        threading.Thread(target=_release_executor, name="shutdown", daemon=True).start()
        return done


def _bind(server, address, credentials):
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if not port:
        raise RuntimeError(f"could not bind {address!r} (is the port in use?)")
    return port


def create_server(address=DEFAULT_ADDRESS, config=None):
    """Build the server: our ConvService, KServe v2, health and reflection on one port, not yet started.

    Parameters
    ----------
    address : str
        ``host:port`` to bind; port 0 picks a free port (see the returned port).
    config : ServerConfig, optional
        Everything else (repository folder, threads, limits, interceptors, TLS); defaults to ``ServerConfig()``.

    Returns
    -------
    (ConvServer, int)
        The server (call ``start()``) and the port it is bound to.

    Raises
    ------
    RuntimeError
        If the address cannot be bound.
    """
    config = config or ServerConfig()
    repository = ModelRepository(config.model_repository, plan_cache_size=config.plan_cache_size,
                                 max_models=config.max_models, max_layers=config.max_layers,
                                 batching_defaults=config.batching_defaults())
    loaded, skipped = repository.load_all()
    metrics = ServerMetrics()
    metrics.track_models(lambda: len(repository.names()))
    executor = ComputeExecutor(config.omp_threads, config.compute_slots, observe=metrics.observe_job)
    service = InferenceService(repository, executor, config.max_message_bytes,
                               max_output_bytes=config.max_output_mb * MIB, max_layers=config.max_layers,
                               metrics=metrics)
    shared_memory = SharedMemoryRegistry() if config.shared_memory else None

    limit = config.max_message_bytes
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # Not SO_REUSEPORT: two servers silently sharing a port would split traffic between repositories.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ] + request_limit_options(config) + config.connection_age_options + list(config.grpc_options)
    pool = CountingThreadPool(max_workers=config.workers, thread_name_prefix="rpc")
    # Health checks and refusals run here: they take microseconds and must not wait behind calls that compute.
    probe_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="probe")
    wrapper = MethodWrapper(metrics, config.default_deadline, config.auth_token, config.read_only_models,
                            probe_pool=probe_pool)
    grpc_server = grpc.server(
        pool,
        # Only what must run as a call arrives: the caller's own interceptors (outermost, they see the final status
        # since every handler maps its own errors), the token check of streaming RPCs, and --max-in-flight. The
        # rest is in each method's handler, wrapped once (server/_handlers.py).
        interceptors=(list(config.interceptors) + hardening_interceptors(config)
                      + [AdmissionInterceptor(config.max_in_flight, pool, functools.partial(wrapper.refusal,
                                                                                            pool=probe_pool))]),
        options=options,
    )
    health_servicer = health.HealthServicer()
    server = ConvServer(grpc_server, config, repository, executor, health_servicer, metrics)
    server.shared_memory = shared_memory

    ConvServicer(service).add_to_server(grpc_server, wrapper.wrap)
    KServeServicer(service, config.kserve_max_batch_size, VERSION, lambda: server.ready,
                   shared_memory=shared_memory).add_to_server(grpc_server, wrapper.wrap)
    add_service(grpc_server, health_pb2.DESCRIPTOR.services_by_name["Health"], health_servicer, wrap=wrapper.wrap)
    for name in ("",) + SERVICE_NAMES:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(SERVICE_NAMES + (health.SERVICE_NAME, reflection.SERVICE_NAME),
                                        grpc_server)
    try:
        port = _bind(grpc_server, address, config.server_credentials)
        if config.metrics_port is not None:
            server._metrics_httpd, server.metrics_port = serve_metrics(metrics, address.rsplit(":", 1)[0],
                                                                       config.metrics_port)
    except Exception:
        executor.shutdown(wait=False)
        raise

    log.info("listening on %s:%d%s", address.rsplit(":", 1)[0], port, " (TLS)" if config.server_credentials else "")
    log.info("model repository: %s", repository.root)
    log.info("models loaded: %d%s", len(loaded), f" ({', '.join(loaded)})" if loaded else "")
    if skipped:
        log.warning("model files skipped as corrupt: %s", ", ".join(skipped))
    log.info("threads: %d RPC workers (at most %d taking calls at once), %d compute slot(s) "
             "x %d OpenMP thread(s) (OpenMP %s)", config.workers, pool.max_active, executor.slots, executor.team,
             "enabled" if convcore.openmp_enabled() else "not built in")
    log.info("message limit: %d MiB each way", limit // MIB)
    if server.metrics_port is not None:
        log.info("metrics: http://%s:%d/metrics", address.rsplit(":", 1)[0], server.metrics_port)
    return server, port
