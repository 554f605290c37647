"""Per-model inference statistics as Triton's ModelStatistics defines them (no protobuf here: the servicer encodes).

Per request (``InferStatistics``): ``success`` / ``fail`` count the requests and their time in the server, arrival to
response; ``queue`` is the time waiting (for a batch and for a compute slot); ``compute_input`` preparing the input
(decode, shared-memory read, batch concatenation); ``compute_infer`` running the model; ``compute_output`` getting the
output out (batch split, encode or shared-memory write). The last four count successful requests only, and a request
computed in a dynamic batch gets that batch's compute times, as in Triton.

Per execution: ``execution_count`` counts model runs (a batch of 8 requests is one); ``inference_count`` counts the
rows of successful requests (a request of batch 8 counts 8); ``batch_stats`` holds, per batch size run, the count and
compute durations of those executions.
"""
import threading
import time

__all__ = ["Statistics", "ModelStatistics", "DURATIONS"]

#: InferStatistics fields that are (count, ns) pairs, in Triton's order.
DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
_BATCH_DURATIONS = ("compute_input", "compute_infer", "compute_output")


def _ns(seconds):
    return max(0, round(seconds * 1e9))


class ModelStatistics:
    """The counters of one model; every method is thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._durations = {name: [0, 0] for name in DURATIONS}
        self._batches = {}
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference = 0

    def request(self, ok, rows, total, queue=0.0, compute_input=0.0, compute_infer=0.0, compute_output=0.0):
        """One request ended (`ok` or failed) after `total` seconds in the server; the rest are its step times."""
        with self._lock:
            self.last_inference = int(time.time() * 1000)
            d = self._durations["success" if ok else "fail"]
            d[0] += 1
            d[1] += _ns(total)
            if not ok:
                return
            self.inference_count += rows
            for name, seconds in (("queue", queue), ("compute_input", compute_input),
                                  ("compute_infer", compute_infer), ("compute_output", compute_output)):
                d = self._durations[name]
                d[0] += 1
                d[1] += _ns(seconds)

    def execution(self, batch_size, compute_input=0.0, compute_infer=0.0, compute_output=0.0):
        """One successful model run on `batch_size` rows."""
        with self._lock:
            self.execution_count += 1
            b = self._batches.get(batch_size)
            if b is None:
                b = self._batches[batch_size] = {name: [0, 0] for name in _BATCH_DURATIONS}
            for name, seconds in (("compute_input", compute_input), ("compute_infer", compute_infer),
                                  ("compute_output", compute_output)):
                b[name][0] += 1
                b[name][1] += _ns(seconds)

    def snapshot(self):
        """A plain copy: ``{"inference_stats": {field: (count, ns)}, "batch_stats": [(size, {field: (count, ns)})],
        "inference_count", "execution_count", "last_inference"}``."""
        with self._lock:
            return {
                "inference_stats": {k: tuple(v) for k, v in self._durations.items()},
                "batch_stats": [(size, {k: tuple(v) for k, v in b.items()}) for size, b in sorted(self._batches.items())],
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "last_inference": self.last_inference,
            }


class Statistics:
    """The statistics of every model of one server, created on first use and dropped with the model."""

    def __init__(self):
        self._lock = threading.Lock()
        self._models = {}

    def model(self, name):
        """The ModelStatistics of `name` (created empty on first use)."""
        with self._lock:
            stats = self._models.get(name)
            if stats is None:
                stats = self._models[name] = ModelStatistics()
            return stats

    def drop(self, name):
        """Forget model `name` (deleted): a model registered again under that name starts from zero."""
        with self._lock:
            self._models.pop(name, None)

    def snapshot(self, names):
        """``[(name, snapshot)]`` for each of `names` (zeros for a model that has served nothing yet)."""
        with self._lock:
            stats = [(name, self._models.get(name)) for name in names]
        return [(name, (s or ModelStatistics()).snapshot()) for name, s in stats]
