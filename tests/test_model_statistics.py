"""server._statistics: Triton's ModelStatistics counters (in-process; the RPC is tested end to end elsewhere)."""
import threading

from server._statistics import DURATIONS, ModelStatistics, Statistics


def test_requests_and_executions_are_counted_as_triton_defines_them():
    s = ModelStatistics()
    # A dynamic batch of two requests (1 and 3 rows): one execution of 4 rows; each request gets the batch's times.
    s.execution(4, compute_input=0.001, compute_infer=0.010, compute_output=0.0005)
    s.request(True, 1, total=0.020, queue=0.002, compute_input=0.001, compute_infer=0.010, compute_output=0.0005)
    s.request(True, 3, total=0.018, queue=0.001, compute_input=0.001, compute_infer=0.010, compute_output=0.0005)
    s.request(False, 2, total=0.003)  # failed: counted in fail only, no rows
    snap = s.snapshot()
    st = snap["inference_stats"]
    assert set(st) == set(DURATIONS)
    assert st["success"] == (2, 38_000_000)
    assert st["fail"] == (1, 3_000_000)
    assert st["queue"] == (2, 3_000_000)
    assert st["compute_input"] == (2, 2_000_000)
    assert st["compute_infer"] == (2, 20_000_000)
    assert st["compute_output"] == (2, 1_000_000)
    assert snap["inference_count"] == 4 and snap["execution_count"] == 1
    assert snap["batch_stats"] == [(4, {"compute_input": (1, 1_000_000), "compute_infer": (1, 10_000_000),
                                        "compute_output": (1, 500_000)})]
    assert snap["last_inference"] > 1_600_000_000_000  # ms since the epoch


def test_batch_sizes_are_kept_apart_and_sorted():
    s = ModelStatistics()
    for size in (8, 1, 8, 2):
        s.execution(size, compute_infer=0.001)
    assert [(size, b["compute_infer"][0]) for size, b in s.snapshot()["batch_stats"]] == [(1, 1), (2, 1), (8, 2)]


def test_registry_creates_drops_and_reports_zeros():
    stats = Statistics()
    stats.model("a").request(True, 2, total=0.001)
    (name, a), (_, b) = stats.snapshot(["a", "b"])
    assert name == "a" and a["inference_count"] == 2
    assert b["inference_count"] == 0 and b["inference_stats"]["success"] == (0, 0)
    stats.drop("a")
    assert stats.snapshot(["a"])[0][1]["inference_count"] == 0


def test_counters_are_thread_safe():
    s = ModelStatistics()

    def work():
        for _ in range(2000):
            s.request(True, 1, total=1e-6, queue=1e-6)
            s.execution(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = s.snapshot()
    assert snap["inference_count"] == 8000 and snap["execution_count"] == 8000
    assert snap["inference_stats"]["queue"] == (8000, 8000 * 1000)
