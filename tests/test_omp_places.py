"""OpenMP thread placement of the server (``--omp-bind``; server.__main__.configure_openmp_places,
server._compute.TeamPlacement): off by default; with ``spread`` the team's worker is bound to a CPU of its own, the RPC thread leading a team is pinned only while it computes, and
every other thread keeps the whole CPU set. Checked on a real server process through /proc and the runtime's own
report (OMP_DISPLAY_ENV), and the answers against the float64 reference."""
import os
import re

import numpy as np
import pytest

import convcore
from _reference import reference_conv
from _server import ServerProcess
from server._compute import TeamPlacement
from server.__main__ import configure_openmp_places

needs_two_cpus = pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                                    reason="needs 2 CPUs and Linux affinity")
needs_openmp = pytest.mark.skipif(not convcore.openmp_enabled(), reason="built without OpenMP")


def test_places_one_per_cpu_only_when_asked_and_unless_the_environment_or_the_quota_decides():
    env = {}
    assert configure_openmp_places("off", env, cpus=[0, 1]) == "left to the scheduler (--omp-bind off)"
    assert env == {}
    assert "spread" in configure_openmp_places("spread", env, cpus=[3, 1], quota=None)
    assert env == {"OMP_PROC_BIND": "spread", "OMP_PLACES": "{1},{3}"}
    for given in ({"OMP_PROC_BIND": "false"}, {"OMP_PLACES": "cores"}, {"GOMP_CPU_AFFINITY": "0-1"}):
        for bind in ("off", "spread"):
            env = dict(given)
            assert configure_openmp_places(bind, env, cpus=[0, 1]).startswith("from the environment")
            assert env == given
    env = {}
    assert configure_openmp_places("spread", env, cpus=[0]) == "not bound (one usable CPU)" and env == {}
    # A container sharing a host's cores: 16 CPUs to run on, a quota of 2 -> not bound.
    assert configure_openmp_places("spread", env, cpus=range(16), quota=2).startswith(
        "not bound (the CPU quota allows 2")
    assert env == {}
    with pytest.raises(ValueError, match="bind must be one of"):
        configure_openmp_places("close", {})


def test_team_placement_only_from_the_placement_the_server_writes():
    placement = TeamPlacement.from_environ({"OMP_PROC_BIND": "spread", "OMP_PLACES": "{2},{5},{7}"})
    assert placement.leader == {2} and placement.cpus == {2, 5, 7}
    for env in ({}, {"OMP_PROC_BIND": "false", "OMP_PLACES": "{0},{1}"}, {"OMP_PROC_BIND": "spread"},
                {"OMP_PROC_BIND": "spread", "OMP_PLACES": "cores"}, {"OMP_PROC_BIND": "spread", "OMP_PLACES": "{0}"},
                {"OMP_PROC_BIND": "spread", "OMP_PLACES": "{0:2}"},
                {"OMP_PROC_BIND": "spread", "OMP_PLACES": "{0},{1}", "GOMP_CPU_AFFINITY": "0 1"}):
        assert TeamPlacement.from_environ(env) is None, env


def _affinities(pid):
    """{tid: (name, CPUs it may run on)} of every thread of process `pid`."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                out[int(tid)] = (f.read().strip(), frozenset(os.sched_getaffinity(int(tid))))
        except OSError:  # the thread ended meanwhile
            pass
    return out


def _serve_medium(tmp_path, flags, env, calls=12):
    """Start a server with `flags` and `env`, run a 2-thread layer `calls` times (also 4 calls at once, which compute one
    thread each), check every answer; return (the server's log, its threads' affinities after the calls)."""
    from concurrent.futures import ThreadPoolExecutor

    from client import ConvClient
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((64, 64, 3, 3)) * 0.05).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    x = rng.standard_normal((1, 64, 56, 56)).astype(np.float32)
    expected = reference_conv(x, w, b, padding="same").astype(np.float32)
    proc = ServerProcess(tmp_path / "models", *flags, env={"OMP_DISPLAY_ENV": "true", **env}).start()
    try:
        with ConvClient(proc.target, timeout=60) as c:
            c.register_model("m", [{"kernel": w, "bias": b, "padding": "same"}])
            for _ in range(calls):
                np.testing.assert_allclose(c.infer("m", x), expected, rtol=1e-4, atol=1e-4)
            with ThreadPoolExecutor(4) as pool:
                for y in pool.map(lambda _: c.infer("m", x), range(8)):
                    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(c.infer("m", x), expected, rtol=1e-4, atol=1e-4)
            threads = _affinities(proc.pid)
    finally:
        assert proc.stop() == 0
    return proc.log(), threads


@needs_two_cpus
@needs_openmp
def test_omp_bind_spread_binds_the_team_worker_and_leaves_every_other_thread_free(tmp_path):
    cpus = frozenset(os.sched_getaffinity(0))
    if not configure_openmp_places("spread", {}, cpus=cpus).startswith("one thread per CPU"):
        pytest.skip("the server would not bind here (a CPU quota below the CPU count)")
    log, threads = _serve_medium(tmp_path, ("--omp-bind", "spread"), {})
    assert "OMP_PROC_BIND = 'SPREAD'" in log, log
    assert "OpenMP thread placement: one thread per CPU" in log, log
    team = int(re.search(r"x (\d+) OpenMP thread", log).group(1))
    assert team == convcore.usable_cpus(), log  # the team still counts every CPU (the loading thread was freed)
    bound = {tid: mask for tid, (_, mask) in threads.items() if mask != cpus}
    # The team's workers (one per RPC thread that led a team) are bound to one CPU each, never the first place
    # (the leader's); nothing else is restricted: not the RPC threads that computed, not gRPC's, not the main one.
    first = min(cpus)
    assert bound, threads
    assert all(len(mask) == 1 and first not in mask for mask in bound.values()), threads
    assert len(bound) < len(threads) // 2, threads


@needs_two_cpus
@needs_openmp
@pytest.mark.parametrize("flags, env, said", [
    ((), {}, "left to the scheduler (--omp-bind off)"),
    (("--omp-bind", "spread"), {"OMP_PROC_BIND": "false"}, "from the environment (OMP_PROC_BIND=false)")])
def test_by_default_or_with_a_placement_in_the_environment_no_thread_is_bound(tmp_path, flags, env, said):
    cpus = frozenset(os.sched_getaffinity(0))
    log, threads = _serve_medium(tmp_path, flags, env, calls=4)
    assert f"OpenMP thread placement: {said}" in log, log
    assert all(mask == cpus for _, mask in threads.values()), threads


def test_a_cpu_that_cannot_be_set_does_not_fail_the_job(caplog):
    placement = TeamPlacement({1 << 20}, {1 << 20, (1 << 20) + 1})  # CPUs that do not exist here
    before = os.sched_getaffinity(0)
    placement.lead()
    placement.release()
    assert os.sched_getaffinity(0) == before
    assert sum("cannot set the CPU affinity" in r.getMessage() for r in caplog.records) == 1
