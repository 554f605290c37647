"""The server sizes its compute pool from the CPUs it may use (convcore.usable_cpus: affinity capped by the cgroup
quota), so slots x OpenMP threads never exceeds them. The quota and the affinity are faked in-process."""
import os

import pytest

import convcore
import convcore._threads
from server._compute import ComputeExecutor

needs_openmp = pytest.mark.skipif(not convcore.openmp_enabled(), reason="built without OpenMP: one thread per call")


@pytest.fixture
def machine(monkeypatch):
    """Fake a host of `cores` CPUs (affinity) under a cgroup quota of `quota` CPUs (None: unlimited)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def fake(cores, quota):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
        monkeypatch.setattr(convcore._threads, "_cgroup_cpu_limit", lambda: quota)
    return fake


def _executor(*args):
    ex = ComputeExecutor(*args)
    ex.shutdown()
    return ex


@needs_openmp
@pytest.mark.parametrize("omp_threads, team, slots", [(None, 2, 1), (1, 1, 2), (2, 2, 1)])
def test_a_2_cpu_quota_on_a_16_core_host_gets_2_busy_threads(machine, omp_threads, team, slots):
    machine(16, 2)
    assert convcore.usable_cpus() == 2
    ex = _executor(omp_threads)
    assert (ex.team, ex.slots) == (team, slots)
    assert ex.team * ex.slots <= 2


@needs_openmp
@pytest.mark.parametrize("omp_threads, team, slots", [(None, 16, 1), (1, 1, 16), (4, 4, 4)])
def test_without_a_quota_the_affinity_counts(machine, omp_threads, team, slots):
    machine(16, None)
    ex = _executor(omp_threads)
    assert (ex.team, ex.slots) == (team, slots)


@needs_openmp
def test_affinity_below_the_quota_counts(machine):
    machine(3, 8)
    ex = _executor(1)
    assert (ex.team, ex.slots) == (1, 3)


def test_explicit_slots_are_kept(machine):
    machine(16, 2)
    assert _executor(1, 5).slots == 5


def test_at_least_one_slot(machine):
    machine(16, 1)
    ex = _executor(4)  # more OpenMP threads than CPUs: still one slot, never zero
    assert ex.slots == 1
