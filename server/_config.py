"""Server configuration: one object that `create_server` takes, so new features add a field, not a parameter."""
import os
from dataclasses import dataclass, field

__all__ = ["ServerConfig", "DEFAULT_ADDRESS", "DEFAULT_MODEL_REPOSITORY", "MIB"]

MIB = 1 << 20
DEFAULT_ADDRESS = "0.0.0.0:50051"
#: Where registered models are kept unless --model-repository / $CONVSERVICE_MODEL_REPOSITORY says otherwise:
#: ./models under the directory the server is started from (ignored by git).
DEFAULT_MODEL_REPOSITORY = "models"


def _default_repository():
    return os.environ.get("CONVSERVICE_MODEL_REPOSITORY", DEFAULT_MODEL_REPOSITORY)


@dataclass
class ServerConfig:
    """Everything `create_server` needs besides the address.

    Attributes
    ----------
    model_repository : str
        Folder holding the registered models (created if missing).
    workers : int
        Threads serving RPCs: each call is decoded, computed and encoded on one of them. A call computes once it
        holds CPU units (see ``compute_slots``), so these threads never multiply with the OpenMP team.
    max_message_mb : int
        Largest message accepted or sent, in MiB (gRPC's own default is 4 MiB).
    omp_threads : int or None
        OpenMP threads per convolution; None lets convcore choose (all usable cores, fewer for small work).
    compute_slots : int or None
        Convolutions of a full OpenMP team running at once; None: usable cores // OpenMP threads (at least 1). The
        CPU units are compute_slots x team, so as many one-thread convolutions run at once, and concurrent calls
        never oversubscribe the cores.
    grace_seconds : float
        On SIGTERM/SIGINT, how long in-flight calls may take to finish before they are cancelled.
    kserve_max_batch_size : int
        ``max_batch_size`` advertised (and enforced) in the KServe v2 / Triton API; must be > 0.
    plan_cache_size : int
        convcore plans kept per registered model (one per distinct input shape, least recently used dropped).
    interceptors : list of grpc.ServerInterceptor
        Extra interceptors (metrics, authentication, limits), outermost first. The error-mapping interceptor is
        always added after them, innermost, so they observe the final status of every call.
    server_credentials : grpc.ServerCredentials or None
        TLS credentials for the port; None serves plaintext.
    grpc_options : list of (str, value)
        Extra gRPC server channel arguments, applied after the defaults (so they can override them).
    metrics_port : int or None
        Serve Prometheus metrics over HTTP at ``/metrics`` on this port, on the gRPC address's host (0 picks a free
        port); None serves none (the metrics are still collected, see ``ConvServer.metrics``). ``python -m server``
        defaults to 8002.
    max_request_mb : int or None
        Largest request accepted, MiB; None: ``max_message_mb``.
    max_output_mb : int
        Largest output one call may compute (checked with convcore.output_shape before allocating), MiB.
    max_layers, max_models : int
        Layers per registered model; registered models.
    max_in_flight : int
        RPCs being served at once (queued for a worker thread or running); one more gets RESOURCE_EXHAUSTED as it
        arrives. Health checks and reflection are not counted (`server._limits.AdmissionInterceptor`).
    default_deadline : float or None
        Seconds a call may take when its client set no deadline; None: unlimited.
    auth_token : str or None
        Require ``authorization: Bearer <token>`` on every RPC but health.
    read_only_models : bool
        Refuse RegisterModel/DeleteModel with PERMISSION_DENIED.
    max_connection_age : float or None
        Seconds after which the server ends each client connection (gRPC's ``grpc.max_connection_age_ms``, which
        adds +-10% jitter; a GOAWAY), so long-lived clients reconnect, re-resolve DNS and reach new replicas. Calls in
        flight on it may finish within ``default_deadline`` (the grace); None: connections live forever.
    batch_max_queue_delay_microseconds, batch_preferred_batch_size : int, tuple of int
        Defaults of a model registered with dynamic batching (its max_batch_size defaults to
        ``kserve_max_batch_size``, which also caps it); models without batching compute each request alone.
    shared_memory : bool
        Serve Triton's system shared-memory extension.
    """

    model_repository: str = field(default_factory=_default_repository)
    workers: int = 8
    max_message_mb: int = 256
    omp_threads: int | None = None
    compute_slots: int | None = None
    grace_seconds: float = 10.0
    kserve_max_batch_size: int = 64
    plan_cache_size: int = 8
    interceptors: list = field(default_factory=list)
    server_credentials: object = None
    grpc_options: list = field(default_factory=list)
    metrics_port: int | None = None
    max_request_mb: int | None = None
    max_output_mb: int = 1024
    max_layers: int = 64
    max_models: int = 1000
    max_in_flight: int = 64
    default_deadline: float | None = 300.0
    auth_token: str | None = None
    read_only_models: bool = False
    max_connection_age: float | None = None
    batch_max_queue_delay_microseconds: int = 500
    batch_preferred_batch_size: tuple = ()
    shared_memory: bool = True

    def batching_defaults(self):
        """The BatchingConfig a model registered with an empty ``batching`` gets (ValueError if the flags are bad)."""
        from ._batcher import BatchingConfig
        return BatchingConfig(self.kserve_max_batch_size, tuple(self.batch_preferred_batch_size),
                              self.batch_max_queue_delay_microseconds)

    def __post_init__(self):
        for name in ("max_output_mb", "max_layers", "max_models", "max_in_flight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerConfig.{name} must be a positive int, got {value!r}")
        if self.max_request_mb is not None and (isinstance(self.max_request_mb, bool)
                                                or not isinstance(self.max_request_mb, int)
                                                or not 1 <= self.max_request_mb <= 2047):
            raise ValueError(f"ServerConfig.max_request_mb must be an int from 1 to 2047 or None, got "
                             f"{self.max_request_mb!r}")
        if self.default_deadline is not None and not self.default_deadline > 0:
            raise ValueError(f"ServerConfig.default_deadline must be > 0 seconds or None, got "
                             f"{self.default_deadline!r}")
        for name in ("workers", "max_message_mb", "kserve_max_batch_size", "plan_cache_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerConfig.{name} must be a positive int, got {value!r}")
        for name in ("omp_threads", "compute_slots"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"ServerConfig.{name} must be a positive int or None, got {value!r}")
        if self.metrics_port is not None and (isinstance(self.metrics_port, bool)
                                              or not isinstance(self.metrics_port, int)
                                              or not 0 <= self.metrics_port < 65536):
            raise ValueError(f"ServerConfig.metrics_port must be a port number (0: any free one) or None, got "
                             f"{self.metrics_port!r}")
        if self.max_message_mb > 2047:
            raise ValueError(f"ServerConfig.max_message_mb must be at most 2047 (gRPC's 2 GiB message limit), "
                             f"got {self.max_message_mb}")
        if self.max_connection_age is not None and (isinstance(self.max_connection_age, bool)
                                                    or not isinstance(self.max_connection_age, (int, float))
                                                    or not 0 < self.max_connection_age < float("inf")):
            raise ValueError(f"ServerConfig.max_connection_age must be a finite number > 0 of seconds or None, got "
                             f"{self.max_connection_age!r}")
        if not self.grace_seconds >= 0:
            raise ValueError(f"ServerConfig.grace_seconds must be >= 0, got {self.grace_seconds!r}")

    @property
    def max_message_bytes(self):
        return self.max_message_mb * MIB

    @property
    def connection_age_options(self):
        """gRPC server options for ``max_connection_age`` (none when it is None)."""
        if self.max_connection_age is None:
            return []
        # The grace bounds calls in flight when the GOAWAY is sent; a call cannot outlive the default deadline anyway
        # (unless its client set a longer one), so that is the grace. No default deadline: gRPC's, unlimited.
        def ms(seconds):  # gRPC takes a C int of milliseconds; 2**31-1 ms (24.8 days) is as good as never
            return int(min(max(1, round(seconds * 1000)), 2**31 - 1))

        grace = [] if self.default_deadline is None else [("grpc.max_connection_age_grace_ms",
                                                            ms(self.default_deadline))]
        return [("grpc.max_connection_age_ms", ms(self.max_connection_age))] + grace
