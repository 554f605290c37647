"""Statistics of a run: percentiles, histograms, rates over time, and the summary, from raw samples.

Pure numpy, no network: the unit tests feed these functions arrays and compare with numpy's own percentiles.

A run keeps every request as a raw sample (send time, latency, status code), never a pre-binned histogram, so
samples from several client processes aggregate exactly: concatenate, then compute.
"""
from dataclasses import dataclass, field

import numpy as np

__all__ = ["PERCENTILES", "STATUS_CLIENT_ERROR", "STATUS_NOT_SENT", "STATUS_OK", "Samples", "latency_histogram",
           "percentiles", "rate_over_time", "status_name", "summarize"]

#: The latency percentiles of the summary.
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
#: Status of a successful request; failures carry the gRPC status code number (grpc.StatusCode.X.value[0]).
STATUS_OK = 0
#: Status of a request that failed in the client without a gRPC status (a bug in the harness or the SDK).
STATUS_CLIENT_ERROR = -1
#: Status of an open-loop request whose due time passed but which was never sent before the run ended.
STATUS_NOT_SENT = -2

_GRPC_CODE_NAMES = {
    0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
    6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION", 10: "ABORTED",
    11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS",
    16: "UNAUTHENTICATED", STATUS_CLIENT_ERROR: "CLIENT_ERROR", STATUS_NOT_SENT: "NOT_SENT",
}


def status_name(code):
    """The name of status number ``code`` (``14`` -> ``"UNAVAILABLE"``)."""
    return _GRPC_CODE_NAMES.get(int(code), f"STATUS_{int(code)}")


@dataclass
class Samples:
    """Raw samples of a run, one entry per request, times in seconds.

    Attributes
    ----------
    start : ndarray of float64
        When the request was due to be sent, from the start of the run (warm-up included). Closed loop: when it was
        sent. Open loop: its *intended* send time on the schedule, even if it went out later.
    latency : ndarray of float64
        From ``start`` to the response (or the error).
    status : ndarray of int32
        :data:`STATUS_OK`, a gRPC status number, or :data:`STATUS_CLIENT_ERROR`.
    send_lag : ndarray of float64
        Open loop: how late the request actually went out after ``start`` (all workers busy, or the client slow);
        zeros in a closed loop.
    """
    start: np.ndarray = field(default_factory=lambda: np.empty(0))
    latency: np.ndarray = field(default_factory=lambda: np.empty(0))
    status: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int32))
    send_lag: np.ndarray = field(default_factory=lambda: np.empty(0))

    def __len__(self):
        return len(self.start)

    @classmethod
    def concatenate(cls, parts):
        """One :class:`Samples` of all of ``parts`` (from threads or processes), sorted by ``start``."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls()
        start = np.concatenate([p.start for p in parts])
        order = np.argsort(start, kind="stable")
        return cls(start=start[order],
                   latency=np.concatenate([p.latency for p in parts])[order],
                   status=np.concatenate([p.status for p in parts]).astype(np.int32)[order],
                   send_lag=np.concatenate([p.send_lag for p in parts])[order])

    def select(self, mask):
        """The samples where boolean array ``mask`` is true."""
        return Samples(self.start[mask], self.latency[mask], self.status[mask], self.send_lag[mask])


def percentiles(values, qs=PERCENTILES):
    """Percentiles of ``values`` with linear interpolation between order statistics (numpy's default method).

    One sort serves every ``q`` (numpy's ``percentile`` partitions again for each call), and the empty case gives
    NaNs instead of raising, since a run in which every request failed still gets a summary.

    Parameters
    ----------
    values : array_like of float
    qs : sequence of float
        Percentiles in [0, 100].

    Returns
    -------
    ndarray of float64
        One value per ``q``.

    Raises
    ------
    ValueError
        If a ``q`` is outside [0, 100].
    """
    qs = np.asarray(qs, dtype=np.float64)
    if np.any((qs < 0) | (qs > 100)) or np.any(np.isnan(qs)):
        raise ValueError(f"percentiles must be in [0, 100], got {qs.tolist()}")
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v.size == 0:
        return np.full(qs.shape, np.nan)
    pos = qs / 100.0 * (v.size - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, v.size - 1)
    frac = pos - lo
    return v[lo] + (v[hi] - v[lo]) * frac


def latency_histogram(latencies, bins=50, log=True):
    """Histogram of latencies, log-spaced by default (latency distributions have long right tails).

    Parameters
    ----------
    latencies : array_like of float
        Positive values (seconds or milliseconds: the edges come back in the same unit).
    bins : int
        Number of bins.
    log : bool
        Log-spaced edges from min to max; else linear.

    Returns
    -------
    (ndarray, ndarray)
        ``edges`` (``bins + 1`` floats) and ``counts`` (``bins`` ints, summing to the number of values). Empty input
        gives empty arrays.
    """
    v = np.asarray(latencies, dtype=np.float64).ravel()
    if v.size == 0:
        return np.empty(0), np.empty(0, dtype=np.int64)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo * (1 + 1e-9) + 1e-12  # one distinct value: a single narrow bin around it
    if log and lo > 0:
        edges = np.geomspace(lo, hi, bins + 1)
    else:
        edges = np.linspace(lo, hi, bins + 1)
    # np.histogram closes the last bin on the right, so max lands in it despite float rounding of the edges
    edges[0], edges[-1] = lo, hi
    counts, _ = np.histogram(v, bins=edges)
    return edges, counts.astype(np.int64)


def rate_over_time(times, window=1.0, t0=0.0, t1=None):
    """Events per second in consecutive windows.

    Parameters
    ----------
    times : array_like of float
        Event times in seconds.
    window : float
        Window length in seconds.
    t0, t1 : float
        Span to cover (``t1`` default: the last event).

    Returns
    -------
    (ndarray, ndarray)
        Window centres and rates (events / window).
    """
    t = np.asarray(times, dtype=np.float64)
    if t1 is None:
        t1 = float(t.max()) if t.size else t0
    n = max(1, int(np.ceil((t1 - t0) / window - 1e-9)))
    edges = t0 + window * np.arange(n + 1)
    counts, _ = np.histogram(t, bins=edges)
    return (edges[:-1] + edges[1:]) / 2, counts / window


def summarize(samples, *, warmup, duration, flops_per_request=None):
    """The numbers of a run's summary, from its raw samples.

    Requests due before ``warmup`` are dropped. Throughput is the measured requests over the time from the end of
    the warm-up to the last response (at least ``duration``), so requests still in flight when the clock ran out
    are neither lost nor credited with time they did not take.

    Latency percentiles cover every measured request, failed ones included: a request that timed out was a slow
    answer, and dropping it would hide the stall that caused it.

    Parameters
    ----------
    samples : Samples
        The whole run, warm-up included.
    warmup, duration : float
        Seconds.
    flops_per_request : int, optional
        For ``gflops`` (counted over successful requests only).

    Returns
    -------
    dict
        ``requests``, ``sent_total`` (warm-up included, NOT_SENT excluded), ``ok``, ``errors``, ``errors_by_code``
        ({name: count}), ``elapsed_s``, ``req_per_s``,
        ``ok_per_s``, ``gflops`` (or None), ``latency_ms`` ({min, mean, stdev, p50, p90, p99, p99.9, max}),
        ``send_lag_ms`` ({p50, p99, max}).
    """
    measured = samples.select(samples.start >= warmup)
    n = len(measured)
    ok = int(np.count_nonzero(measured.status == STATUS_OK))
    codes, counts = np.unique(measured.status[measured.status != STATUS_OK], return_counts=True)
    errors_by_code = {status_name(c): int(k) for c, k in sorted(zip(codes, counts), key=lambda ck: -ck[1])}
    if n:
        last_end = float(np.max(measured.start + measured.latency))
        elapsed = max(float(duration), last_end - warmup)
    else:
        elapsed = float(duration)
    lat_ms = measured.latency * 1e3
    pct = percentiles(lat_ms)
    lag = percentiles(measured.send_lag * 1e3, (50.0, 99.0))

    def num(x):
        return None if x is None or not np.isfinite(x) else float(x)

    latency = {"min": num(lat_ms.min()) if n else None, "mean": num(lat_ms.mean()) if n else None,
               "stdev": num(lat_ms.std()) if n else None}
    latency.update({f"p{q:g}": num(v) for q, v in zip(PERCENTILES, pct)})
    latency["max"] = num(lat_ms.max()) if n else None
    return {
        "requests": n,
        # Every request that went out during the whole run, warm-up included: what a server-side counter saw.
        "sent_total": int(np.count_nonzero(samples.status != STATUS_NOT_SENT)),
        "ok": ok,
        "errors": n - ok,
        "errors_by_code": errors_by_code,
        "elapsed_s": elapsed,
        "req_per_s": n / elapsed,
        "ok_per_s": ok / elapsed,
        "gflops": None if flops_per_request is None else ok * flops_per_request / elapsed / 1e9,
        "latency_ms": latency,
        "send_lag_ms": {"p50": num(lag[0]), "p99": num(lag[1]),
                        "max": num(measured.send_lag.max() * 1e3) if n else None},
    }
