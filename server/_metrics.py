"""Prometheus metrics: one registry per server, filled by every RPC's handler wrapper and the compute executor.

What is measured, and where:
- ``convserver_requests_total{grpc_service, grpc_method, grpc_code}``: every unary RPC, with its final status. The
  handler wrapper (`server._handlers`) records it outside the mapping of exceptions, so it sees the code the client
  sees.
- ``convserver_request_duration_seconds{grpc_service, grpc_method, model}``: handler time (decode, queue, compute,
  encode; not the transport).
- ``convserver_queue_duration_seconds{model}`` and ``convserver_compute_duration_seconds{model}``: how long a
  compute job waited for a compute slot, and how long it ran. The executor measures these around the job.
- ``convserver_batch_size{model}`` (rows per computed batch) and ``convserver_batching_queue_duration_seconds{model}``
  (a request's wait for its batch to be dispatched), for models registered with dynamic batching.
- ``convserver_in_flight_requests{grpc_service, grpc_method}``, ``convserver_loaded_models``,
  ``convserver_received_bytes_total`` / ``convserver_sent_bytes_total{grpc_service, grpc_method}`` (serialized
  message sizes, measured in the (de)serializers, so no message is sized twice).

``model`` is the model name of Infer / ModelInfer calls that succeeded, else "" (one-off Conv, failures). Failures
get no series of their own, so a client cannot create series by sending unknown names. A model's series are removed
when the model is deleted, so a server that sees many short-lived models (every load-test run registers one) does
not keep their series forever.
"""
import logging
import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["LATENCY_BUCKETS", "ServerMetrics", "serve_metrics"]

log = logging.getLogger("server")

#: Seconds. From a small call on loopback (~0.5 ms) to a large batch (tens of seconds).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)

#: Rows per batch: powers of two up to the largest --max-batch-size anyone would set.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

#: RPCs whose request names a model: full method -> request field holding the name.
_MODEL_FIELD = {
    "/convservice.v1.ConvService/Infer": "name",
    "/inference.GRPCInferenceService/ModelInfer": "model_name",
}
_DELETE_METHOD = "/convservice.v1.ConvService/DeleteModel"


def _split(full_method):
    """``"/pkg.Service/Method"`` -> ``("pkg.Service", "Method")``."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


class ServerMetrics:
    """The server's metrics, in their own registry (several servers in one process do not mix their numbers).

    Parameters
    ----------
    registry : prometheus_client.CollectorRegistry, optional
        Where to register; a new one by default.
    """

    def __init__(self, registry=None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("convserver_requests", "RPCs finished, by method and gRPC status code",
                                ["grpc_service", "grpc_method", "grpc_code"], registry=r)
        self.duration = Histogram("convserver_request_duration_seconds",
                                  "Time in the RPC handler: decode, queue, compute and encode",
                                  ["grpc_service", "grpc_method", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("convserver_queue_duration_seconds", "Time a compute job waited for a compute slot",
                               ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute = Histogram("convserver_compute_duration_seconds", "Time a compute job ran",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("convserver_in_flight_requests", "RPCs being handled",
                               ["grpc_service", "grpc_method"], registry=r)
        self.loaded_models = Gauge("convserver_loaded_models", "Registered models loaded in memory", registry=r)
        self.bytes_in = Counter("convserver_received_bytes", "Serialized request bytes received",
                                ["grpc_service", "grpc_method"], registry=r)
        self.bytes_out = Counter("convserver_sent_bytes", "Serialized response bytes sent",
                                 ["grpc_service", "grpc_method"], registry=r)
        self.batch_size = Histogram("convserver_batch_size", "Rows per computed batch (models with dynamic batching)",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.batching_queue = Histogram("convserver_batching_queue_duration_seconds",
                                        "Time a request waited for its dynamic batch to be dispatched",
                                        ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self._job_children = {}  # model -> (queue, compute) label children
        self._methods = {}  # full method -> _MethodRecord

    def track_models(self, count):
        """Report ``count()`` (a callable) as the number of loaded models, read at every scrape."""
        self.loaded_models.set_function(count)

    def observe_job(self, model, queued, ran):
        """Record one compute job: seconds waiting for a slot, seconds running (the executor calls this)."""
        children = self._job_children.get(model)
        if children is None:  # .labels() takes a lock and builds a key: once per model, not per call
            children = self._job_children[model] = (self.queue.labels(model), self.compute.labels(model))
        if queued is not None:
            children[0].observe(queued)
        children[1].observe(ran)

    def observe_batch(self, model, rows):
        """Record one batch of `rows` computed for `model` (the dynamic batcher calls this)."""
        self.batch_size.labels(model).observe(rows)

    def observe_batching_queue(self, model, seconds):
        """Record how long one request waited for its batch."""
        self.batching_queue.labels(model).observe(seconds)

    def method(self, full_method):
        """The `_MethodRecord` of one RPC method (``"/pkg.Service/Method"``), made once."""
        record = self._methods.get(full_method)
        if record is None:
            record = self._methods[full_method] = _MethodRecord(self, full_method)
        return record

    def forget_model(self, name):
        """Drop the series of model ``name`` (it was deleted)."""
        for full_method in _MODEL_FIELD:
            if full_method in self._methods:
                self._methods[full_method].forget(name)
            self.duration.remove(*_split(full_method), name)
        self._job_children.pop(name, None)
        self.queue.remove(name)
        self.compute.remove(name)
        self.batch_size.remove(name)
        self.batching_queue.remove(name)


class _MethodRecord:
    """The metrics of one RPC method, with the label children it always uses looked up once (``.labels()`` takes a
    lock and builds a key: once per method, model and status code, not per call)."""

    __slots__ = ("metrics", "labels", "in_flight", "bytes_in", "bytes_out", "model_field", "deleting", "_codes",
                 "_durations")

    def __init__(self, metrics, full_method):
        labels = _split(full_method)
        self.metrics, self.labels = metrics, labels
        self.in_flight = metrics.in_flight.labels(*labels)
        self.bytes_in, self.bytes_out = metrics.bytes_in.labels(*labels), metrics.bytes_out.labels(*labels)
        self.model_field = _MODEL_FIELD.get(full_method)
        self.deleting = full_method == _DELETE_METHOD
        self._codes = {}      # grpc.StatusCode -> requests counter child
        self._durations = {}  # model label -> duration histogram child

    def start(self):
        """A call began: count it in flight; returns its start time."""
        self.in_flight.inc()
        return time.perf_counter()

    def finish(self, started, context, failed, request):
        """A call ended (its status is ``context.code()``; `failed`: the handler raised)."""
        elapsed = time.perf_counter() - started
        self.in_flight.dec()
        code = context.code()
        if code is None:
            # An exception that no one mapped reaches the client as UNKNOWN; a normal return is OK.
            code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
        counter = self._codes.get(code)
        if counter is None:
            counter = self._codes[code] = self.metrics.requests.labels(*self.labels, code.name)
        counter.inc()
        ok = code == grpc.StatusCode.OK
        model = getattr(request, self.model_field) if self.model_field and ok else ""
        duration = self._durations.get(model)
        if duration is None:
            duration = self._durations[model] = self.metrics.duration.labels(*self.labels, model)
        duration.observe(elapsed)
        if self.deleting and ok:
            self.metrics.forget_model(request.name)

    def forget(self, model):
        self._durations.pop(model, None)


def serve_metrics(metrics, host, port):
    """Serve ``metrics`` at ``http://host:port/metrics`` on a daemon thread.

    Parameters
    ----------
    metrics : ServerMetrics
    host : str
        Interface (``"0.0.0.0"``, ``"127.0.0.1"``, ``"[::]"``).
    port : int
        0 picks a free port.

    Returns
    -------
    (http server, int)
        Call ``shutdown()`` and ``server_close()`` on the first to stop it; the second is the bound port.

    Raises
    ------
    RuntimeError
        If the port cannot be bound.
    """
    try:
        httpd, _thread = start_http_server(port, addr=host.strip("[]"), registry=metrics.registry)
    except OSError as exc:
        raise RuntimeError(f"could not serve metrics on {host}:{port} ({exc.strerror or exc}); pass another "
                           f"--metrics-port (0 picks a free one)") from None
    return httpd, httpd.server_port
