"""Prometheus metrics: one registry per server, filled by a server interceptor and the compute executor.

What is measured, and where:
- ``convserver_requests_total{grpc_service, grpc_method, grpc_code}``: every unary RPC, with its final status. The
  interceptor sits outside the error-mapping interceptor, so it sees the code the client sees.
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

__all__ = ["LATENCY_BUCKETS", "MetricsInterceptor", "ServerMetrics", "serve_metrics"]

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

    def forget_model(self, name):
        """Drop the series of model ``name`` (it was deleted)."""
        for full_method in _MODEL_FIELD:
            self.duration.remove(*_split(full_method), name)
        self._job_children.pop(name, None)
        self.queue.remove(name)
        self.compute.remove(name)
        self.batch_size.remove(name)
        self.batching_queue.remove(name)


class MetricsInterceptor(grpc.ServerInterceptor):
    """Count and time every unary RPC, and size its messages.

    Put it before (outside) the error-mapping interceptor (``ServerConfig.interceptors`` are outermost) so that
    ``context.code()`` holds the final status when the handler returns or raises.

    Parameters
    ----------
    metrics : ServerMetrics
    """

    def __init__(self, metrics):
        self.metrics = metrics
        self._per_method = {}  # full method -> the label children it always uses (a dict lookup, not .labels())

    def _children(self, full_method):
        children = self._per_method.get(full_method)
        if children is None:
            m, labels = self.metrics, _split(full_method)
            children = (labels, m.in_flight.labels(*labels), m.bytes_in.labels(*labels), m.bytes_out.labels(*labels))
            self._per_method[full_method] = children
        return children

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # streaming (health Watch, reflection): not what these metrics are about
        full_method = handler_call_details.method
        labels, in_flight, bytes_in, bytes_out = self._children(full_method)
        metrics = self.metrics
        behavior = handler.unary_unary
        model_field = _MODEL_FIELD.get(full_method)
        deleting = full_method == _DELETE_METHOD

        def measured(request, context):
            in_flight.inc()
            start = time.perf_counter()
            failed = True
            try:
                response = behavior(request, context)
                failed = False
                return response
            finally:
                elapsed = time.perf_counter() - start
                in_flight.dec()
                code = context.code()
                if code is None:
                    # An exception that no one mapped reaches the client as UNKNOWN; a normal return is OK.
                    code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
                metrics.requests.labels(*labels, code.name).inc()
                ok = code == grpc.StatusCode.OK
                model = getattr(request, model_field) if model_field and ok else ""
                metrics.duration.labels(*labels, model).observe(elapsed)
                if deleting and ok:
                    metrics.forget_model(request.name)

        deserialize, serialize = handler.request_deserializer, handler.response_serializer

        def counted_deserialize(data):
            bytes_in.inc(len(data))
            return deserialize(data) if deserialize is not None else data

        def counted_serialize(message):
            data = serialize(message) if serialize is not None else message
            bytes_out.inc(len(data))
            return data

        return grpc.unary_unary_rpc_method_handler(measured, request_deserializer=counted_deserialize,
                                                   response_serializer=counted_serialize)


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
