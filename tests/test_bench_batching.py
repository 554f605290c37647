"""benchmarks/batching.py without servers: the upper bound it derives from measured CPU, and the section it writes."""
import pytest

from benchmarks import batching
from benchmarks._harness import markdown_tables
from benchmarks.service import CONCURRENCY


def _rows(server_ms, client_ms, req_s):
    """Every (workload, C, contender) row, with the given CPU per request and throughput for every contender."""
    return {(w, c, k): {"req_s": req_s[k], "p50": 1.0, "p99": 2.0, "server_ms": server_ms, "client_ms": client_ms,
                        "batch": 2.0 if k in ("0.5 ms", "2 ms") else None, "errors": 0, "rounds": [req_s[k]]}
            for w in batching.WORKLOADS for c in CONCURRENCY for k in batching.LABELS}


REQ_S = {"off": 1000.0, "0.5 ms": 1050.0, "2 ms": 900.0, "plain": 1200.0, "echo": 2000.0}


def test_the_bound_is_the_cpu_per_request_without_the_compute_difference():
    rows = _rows(server_ms=1.0, client_ms=0.5, req_s=REQ_S)
    # batch 1: 0.3 ms of compute per call; batch 16: 1.6 ms, i.e. 0.1 ms per row -> 0.2 ms saved of 1.5 ms
    compute = {w: {"cpu1": 0.3, "cpuB": 1.6, "wall1": 0.3, "wallB": 1.0} for w in batching.WORKLOADS}
    bounds = batching.bound_rows(rows, compute)
    for b in bounds.values():
        assert b["total"] == pytest.approx(1.5) and b["cpuB_row"] == pytest.approx(0.1)
        assert b["bound"] == pytest.approx(1.5 / 1.3)
        assert b["measured"] == {"0.5 ms": pytest.approx(1.05), "2 ms": pytest.approx(0.9)}


def test_the_section_holds_every_row_between_its_markers():
    rows = _rows(server_ms=1.0, client_ms=0.5, req_s=REQ_S)
    compute = {w: {"cpu1": 0.3, "cpuB": 1.6} for w in batching.WORKLOADS}
    q = {"p50": 5.0, "p90": 6.0, "n": 10}
    shm = {w: {"grpc": q, "shm": {"p50": 3.0, "p90": 4.0, "n": 10}, "echo_grpc": {"p50": 2.0, "p90": 2.5, "n": 10},
               "echo_shm": {"p50": 0.5, "p90": 0.6, "n": 10}, "ratio": 0.6, "best": 0.7, "shape": shape}
           for w, (_, shape) in batching.SHM_WORKLOADS.items()}
    ctx = {"command": "python3 -m benchmarks.batching", "took": 1.0, "date": "now", "load_before": "0",
           "load_after": "0", "threads": "1 slot", "rounds": 3, "slice": 2.0}
    text = batching.render(ctx, rows, compute, shm)
    assert text.startswith(batching.START) and text.rstrip().endswith(batching.END)
    tables = markdown_tables(text)
    throughput, bound, shared = tables[-3:]
    assert len(throughput[1]) == len(batching.WORKLOADS) * len(CONCURRENCY) * len(batching.LABELS)
    assert {r[2] for r in throughput[1]} == set(batching.LABELS.values())
    assert [r[8] for r in bound[1]] == ["**1.15**"] * len(batching.WORKLOADS)
    assert [r[-2] for r in shared[1]] == ["**0.60**"] * len(batching.SHM_WORKLOADS)
