"""What plan.run caches to keep its per-call Python small, and that the caches never change an answer.

plan.run resolves its thread count on every call; the cgroup quota files (~50 us to read here) and os.cpu_count()
(~7 us) are read once per process (convcore._threads), and a plan keeps the per-batch-size facts (output shape,
tiling, the kernel's geometry tuple) after a batch size's first call. Nothing here times anything: the tests count
probe calls and compare results.
"""
import numpy as np
import pytest

import convcore
import convcore._threads as threads
from _conv_helpers import assert_conv_close, magnitude
from _reference import reference_conv


@pytest.fixture
def fresh_probes():
    threads.refresh_cpu_info()
    yield
    threads.refresh_cpu_info()


def _counting(value):
    calls = []

    def probe():
        calls.append(1)
        return value
    return probe, calls


def test_cgroup_quota_is_read_once_until_refreshed(monkeypatch, fresh_probes):
    probe, calls = _counting(1)
    monkeypatch.setattr(threads, "_cgroup_cpu_limit", probe)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for _ in range(5):
        assert threads.usable_cpus() == 1
        assert threads.resolve_num_threads(None, flops=10 ** 12) == 1
    assert len(calls) == 1
    threads.refresh_cpu_info()
    assert threads.usable_cpus() == 1
    assert len(calls) == 2


def test_a_swapped_probe_is_seen_at_once(monkeypatch, fresh_probes):
    """Tests (and tools) that fake the quota or the affinity get their fake on the next call, no refresh needed."""
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(threads, "_cgroup_cpu_limit", lambda: 3)
    assert threads.usable_cpus() == 3
    monkeypatch.setattr(threads, "_cgroup_cpu_limit", lambda: None)
    assert threads.usable_cpus() == 16
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    assert threads.usable_cpus() == 2


def test_cpu_count_is_read_once(monkeypatch, fresh_probes):
    probe, calls = _counting(8)
    monkeypatch.setattr(threads.os, "cpu_count", probe)
    for _ in range(4):
        assert threads.max_threads() == 64
        assert threads.resolve_num_threads(3) == (3 if convcore.openmp_enabled() else 1)
    with pytest.raises(ValueError, match=r"num_threads=65 is more than 64 \(4x the 8 cores here\)"):
        threads.resolve_num_threads(65)
    assert len(calls) == 1


@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
@pytest.mark.parametrize("groups", [1, 6])
def test_cached_call_facts_follow_the_batch_size(data_format, groups, threads_for_any_size):
    """Batch sizes in any order, the same plan, 1 and 2 threads: every result is the reference's."""
    rng = np.random.default_rng(7)
    shape = (1, 6, 9, 11) if data_format == "channels_first" else (1, 9, 11, 6)
    w = rng.standard_normal((12, 6 // groups, 3, 3)).astype(np.float32)
    b = rng.standard_normal(12).astype(np.float32)
    kw = dict(padding="same", groups=groups, data_format=data_format, kernel_layout="OIHW", activation="relu")
    plans = [convcore.make_plan(shape, w, b, num_threads=t, **kw) for t in (1, 2)]
    for n in (1, 3, 1, 2, 3, 5):
        x = rng.standard_normal((n,) + shape[1:]).astype(np.float32)
        expected = reference_conv(x, w, b, **kw)
        mag = magnitude(x, w, b, **{k: v for k, v in kw.items() if k != "activation"})
        for plan in plans:
            assert_conv_close(plan.run(x), expected, mag, np.float32, f"batch {n}")
            out = np.full(expected.shape, np.nan, np.float32)
            assert plan.run(x, out=out) is out
            assert_conv_close(out, expected, mag, np.float32, f"batch {n}, out=")


def test_many_batch_sizes_stay_bounded():
    x1 = np.ones((1, 2, 4, 4), np.float32)
    plan = convcore.make_plan(x1.shape, np.ones((3, 2, 1, 1), np.float32))
    for n in range(1, 3 * convcore.ConvPlan._FACTS_MAX):
        y = plan.run(np.ones((n, 2, 4, 4), np.float32))
        assert y.shape == (n, 3, 4, 4) and (y == 2).all()
    assert len(plan._per_batch) <= convcore.ConvPlan._FACTS_MAX
    assert len(plan._per_call) <= convcore.ConvPlan._FACTS_MAX


def test_output_guard_is_checked_on_every_call():
    """The output size is cached per batch size, the max_output_bytes guard is not: lowering it takes effect."""
    x = np.ones((2, 3, 8, 8), np.float32)
    plan = convcore.make_plan(x.shape, np.ones((4, 3, 3, 3), np.float32))
    plan.run(x)
    old = convcore.set_max_output_bytes(1000)
    try:
        with pytest.raises(ValueError, match=r"output would be 1152 bytes \(shape \(2, 4, 6, 6\)\), over "
                                             r"max_output_bytes=1000"):
            plan.run(x)
    finally:
        convcore.set_max_output_bytes(old)
    assert plan.run(x).shape == (2, 4, 6, 6)


def test_fast_input_check_keeps_the_messages():
    plan = convcore.make_plan((1, 3, 8, 8), np.ones((4, 3, 3, 3), np.float32))
    with pytest.raises(TypeError, match=r"x must be float32 or float64, got dtype int64"):
        plan.run(np.ones((1, 3, 8, 8), np.int64))
    with pytest.raises(TypeError, match=r"x has dtype float64, the kernel has float32"):
        plan.run(np.ones((1, 3, 8, 8)))
    with pytest.raises(ValueError, match=r"x has shape \(1, 3, 8, 9\), this plan expects \('N', 3, 8, 8\)"):
        plan.run(np.ones((1, 3, 8, 9), np.float32))
    with pytest.raises(ValueError, match=r"x has an empty batch dimension"):
        plan.run(np.ones((0, 3, 8, 8), np.float32))
    with pytest.raises(TypeError, match=r"x must be a numpy array, got str"):
        plan.run("x")

    class Sub(np.ndarray):
        pass
    # ndarray subclasses take the full conversion path and give the same answer
    x = np.arange(192, dtype=np.float32).reshape(1, 3, 8, 8)
    assert np.array_equal(plan.run(x.view(Sub)), plan.run(x))


@pytest.mark.skipif(not convcore.openmp_enabled(), reason="built without OpenMP: one thread per call")
def test_depthwise_work_counts_more_toward_the_thread_cut_off(monkeypatch, fresh_probes):
    """A depthwise layer of 8 MFLOP (MobileNet's dw3x3 C=144 @56²) runs on the team, a dense one of the same FLOPs
    on one thread; the plan says so through num_threads(), which the server can use to reserve CPUs."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "_cgroup_cpu_limit", lambda: None)
    dw = convcore.make_plan((1, 56, 56, 144), np.ones((3, 3, 1, 144), np.float32), groups=144, padding="same",
                            data_format="channels_last")
    dense = convcore.make_plan((1, 56, 56, 16), np.ones((3, 3, 16, 9), np.float32), padding="same",
                               data_format="channels_last")
    assert dw.geometry.flops(1) == 2 * 144 * 56 * 56 * 9
    assert abs(dense.geometry.flops(1) - dw.geometry.flops(1)) < 0.01 * dw.geometry.flops(1)
    assert dw.work_flops(1) == threads.DEPTHWISE_FLOP_WEIGHT * dw.geometry.flops(1)
    assert dense.work_flops(1) == dense.geometry.flops(1)
    assert (dw.num_threads(), dense.num_threads()) == (4, 1)
    assert dw.num_threads(num_threads=2) == 2 and dense.num_threads(64) == 4
    small = convcore.make_plan((1, 14, 14, 144), np.ones((3, 3, 1, 144), np.float32), groups=144, padding="same",
                               data_format="channels_last")
    assert small.num_threads() == 1   # 0.5 MFLOP: one thread even weighted
