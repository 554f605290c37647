"""The one place that picks a thread count, and the one place that tames scipy's BLAS thread pool.

The engine runs one level of threads: an OpenMP `prange` over tiles, each tile calling a *single-threaded* GEMM.
scipy's OpenBLAS must therefore stay at one thread; if it spun up its own pool inside our OpenMP team the two would
fight over the 2 cores (see PERF-NOTES: 5-20x slow-downs).
"""
import numbers
import os
import threading

from ._openmp_helpers import openmp_enabled, openmp_max_threads

__all__ = ["openmp_enabled", "resolve_num_threads", "usable_cpus", "limit_scipy_blas", "refresh_cpu_info",
           "SMALL_WORK_FLOPS"]

#: Below this many FLOPs (about 1 ms on one core here) a call runs on one thread, whatever count was asked for: waking
#: the OpenMP team costs more than it saves. Measured on this 2-vCPU VM: after an idle gap a 2-thread call of ~0.5 ms
#: took 0.6 to 9 ms (waking the sleeping second vCPU), the same call on one thread a steady 0.8 ms (BENCHMARKS.md).
SMALL_WORK_FLOPS = 50_000_000
#: Depthwise FLOPs count this many times toward that cut-off: a depthwise FLOP takes ~2.5x the time of a dense one
#: (40 vs 100-110 GFLOP/s per core, Zen 4) and the direct kernels are bound by loads, not by the team's wake-up, so
#: MobileNet's dw3x3 C=144 @56² (8 MFLOP, ~0.2 ms on one core) ran 304 -> 165 us on 2 threads (measured,
#: steady state); torch runs it on 2 threads in ~0.14 ms.
DEPTHWISE_FLOP_WEIGHT = 8


def _cgroup_cpu_limit():
    """CPUs allowed by the cgroup CPU quota (v2 `cpu.max` or v1 `cfs_quota_us`), or None when unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return max(1, int(int(quota) // int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        if quota > 0 and period > 0:
            return max(1, quota // period)
    except (OSError, ValueError):
        pass
    return None


# Answers of the slow probes, kept per probe function: reading the cgroup files costs ~50 us and os.cpu_count()
# ~7 us here (measured), and every plan.run resolves its thread count. Keyed on the function object, so a test that
# monkeypatches `_cgroup_cpu_limit` or `os.cpu_count` gets its fake at once; refresh_cpu_info() drops the answers.
_probe_cache = {}


def _probe(fn):
    hit = _probe_cache.get(fn, _probe_cache)
    if hit is _probe_cache:
        if len(_probe_cache) > 16:  # only tests swap probes; do not keep every fake alive
            _probe_cache.clear()
        hit = _probe_cache[fn] = fn()
    return hit


def refresh_cpu_info():
    """Forget the cached cgroup CPU quota and core count, so the next call reads them again.

    Both are read once per process (a quota change needs this call to be seen); the CPU affinity is asked for on
    every call, as it is cheap.
    """
    _probe_cache.clear()


def _cpu_count():
    return _probe(os.cpu_count) or 1


def usable_cpus():
    """Cores this process may use: its CPU affinity, capped by the cgroup quota (read once; see refresh_cpu_info)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = _cpu_count()
    limit = _probe(_cgroup_cpu_limit)
    return min(n, limit) if limit else n


def max_threads():
    """The largest thread count accepted: 4x the machine's cores, at least 64."""
    return max(64, 4 * _cpu_count())


def resolve_num_threads(num_threads=None, flops=None):
    """Return the number of OpenMP threads a kernel call will use.

    Parameters
    ----------
    num_threads : int or None
        None: all usable cores (CPU affinity and cgroup quota respected, and ``OMP_NUM_THREADS`` when set);
        -1: every core the process may run on, ignoring ``OMP_NUM_THREADS``; a positive int: at most that many.
    flops : int, optional
        The work of the call; below ``SMALL_WORK_FLOPS`` the answer is 1.

    Returns
    -------
    int
        At least 1; always 1 when the extension was built without OpenMP.

    Raises
    ------
    TypeError
        If num_threads is not an int or None.
    ValueError
        If num_threads is 0 or below -1.
    """
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral):
            raise TypeError(f"num_threads must be an int or None, got {num_threads!r}")
        num_threads = int(num_threads)
        if num_threads == 0:
            raise ValueError("num_threads=0 is not allowed: use None for all usable cores, -1 for all cores, "
                             "or a positive count")
        if num_threads < -1:
            raise ValueError(f"num_threads must be None, -1 or a positive int, got {num_threads}")
        if num_threads > max_threads():
            raise ValueError(f"num_threads={num_threads} is more than {max_threads()} (4x the {_cpu_count()} "
                             f"cores here): each thread costs an OS thread and a workspace")
    if not openmp_enabled():
        return 1
    if flops is not None and flops < SMALL_WORK_FLOPS:
        return 1
    if num_threads is None:
        n = usable_cpus()
        if os.environ.get("OMP_NUM_THREADS", "").strip():
            n = min(n, openmp_max_threads())
        return max(1, n)
    if num_threads == -1:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:
            return _cpu_count()
    return num_threads


_blas_lock = threading.Lock()
_blas_limited = False


def limit_scipy_blas():
    """Pin scipy's BLAS (the one `scipy.linalg.cython_blas` calls) to one thread, once per process.

    Only scipy's own copy is touched when it can be told apart (wheels bundle it in ``scipy.libs``), so numpy's
    BLAS keeps its threads for the rest of the user's program.
    """
    global _blas_limited
    if _blas_limited:
        return
    with _blas_lock:
        if _blas_limited:
            return
        import scipy.linalg.cython_blas  # noqa: F401  (loads scipy's BLAS so threadpoolctl can see it)
        from threadpoolctl import ThreadpoolController

        controller = ThreadpoolController()
        blas = [lib for lib in controller.lib_controllers if lib.user_api == "blas"]
        scipy_only = [lib for lib in blas if "scipy.libs" in lib.filepath or os.sep + "scipy" + os.sep in lib.filepath]
        for lib in scipy_only or blas:
            lib.set_num_threads(1)
        _blas_limited = True
