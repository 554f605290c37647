"""Where convolutions run: compute slots counted in CPUs, on the RPC's own thread, with cancellation and buffer reuse.

Why slots: each convcore call runs an OpenMP team with the GIL released. If every gRPC worker thread computed
whenever it liked, W workers x T OpenMP threads would fight over the cores (2 here). So a job first takes as many
CPU units as the OpenMP threads it will use (1 for a small layer, which convcore runs on one thread; the team for a
large one) out of ``usable cores`` (or ``--compute-slots`` x team). When fewer are free it starts with those, on
fewer threads (work-conserving: a busy server runs two one-thread jobs side by side rather than one two-thread job
and a queue); with none free it waits in FIFO order, and units freed while several jobs wait are shared out among
them, one thread each on 2 cores.

Why on the RPC's own thread: handing the job to another thread and back costs two wake-ups and two GIL hand-offs
per call (0.15 ms on a small layer, more under load: measured in BENCHMARKS.md, issue 10). When the units are free
the RPC thread computes at once; the gRPC worker pool (``--workers``) already bounds how many calls are handled at
the same time.

Cancellation: when an RPC ends early (client gone, deadline passed) gRPC calls our callback, which drops the job if
it is still waiting for units and flags it if it is running; a running model checks the flag between layers.
"""
import collections
import ctypes
import logging
import os
import threading
import time

import numpy as np

import convcore

from ._errors import RequestCancelled
from ._limits import blocking

__all__ = ["BufferPool", "CancelToken", "ComputeExecutor", "TeamPlacement", "configure_allocator"]

log = logging.getLogger("server")

#: Intermediate outputs of layer stacks are reused up to this many bytes in total (larger ones are not kept),
#: because a fresh large allocation page-faults all of its memory on every call (PERF-NOTES, "glibc allocation").
_POOL_BYTES = 128 << 20
_POOL_MAX_ARRAY = 32 << 20

_CANCELLED = "the client cancelled the call or its deadline passed"

#: glibc's mallopt parameters (malloc.h) and the values the server sets: the ceiling glibc's own dynamic thresholds
#: would climb to (mmap threshold 32 MiB on 64-bit, trim threshold twice that).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 << 20
_TRIM_THRESHOLD = 64 << 20
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def configure_allocator(environ=os.environ):
    """Keep the memory a call frees for the next call instead of returning it to the kernel (glibc only).

    Why: every call allocates MiB-sized buffers (gRPC's request bytes and its copy of the response, our response
    payload) and frees them when it ends. glibc's thresholds follow the largest single block freed, not what one
    call frees in all, so the freed top of the thread's heap (several of those blocks) is over the trim threshold
    and given back with ``madvise(MADV_DONTNEED)`` after every call; the next call page-faults and zeroes all of it
    again. Measured on medium (0.77 MiB each way, C=1): 259 minor faults and ~1.1 ms of server CPU per request, p50
    5.40 -> 3.69 ms once they stop (BENCHMARKS.md, "Serving path"). The thresholds are set where glibc's own
    dynamic ones would end up after one 32 MiB block (mmap 32 MiB, trim 64 MiB): larger blocks are still mapped
    and unmapped, and a heap keeps at most 64 MiB of free memory at its top.

    An allocator setting in the environment (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TOP_PAD_``, or ``glibc.malloc`` in ``GLIBC_TUNABLES``) wins, and so does a C library without
    ``mallopt``. Returns what is in force, for the log.
    """
    given = [k for k in _MALLOC_ENV if environ.get(k)]
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        given.append("GLIBC_TUNABLES")
    if given:
        return "from the environment (" + ", ".join(given) + ")"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "the C library's defaults (no mallopt)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success. Setting the mmap threshold first: glibc fixes both once either is set.
    if not (mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)):
        return "the C library's defaults (mallopt refused)"
    return f"freed memory kept (mmap threshold {_MMAP_THRESHOLD >> 20} MiB, trim threshold {_TRIM_THRESHOLD >> 20} MiB)"


class TeamPlacement:
    """Where the RPC thread that leads an OpenMP team runs while it computes, when the team's threads are bound.

    ``--omp-bind spread`` (`server.__main__.configure_openmp_places`) sets ``OMP_PROC_BIND=spread`` with one
    place per CPU, so that the team's worker runs on a CPU of its own (the scheduler otherwise packs it onto the
    leader's CPU after an idle gap, and the two halves of the convolution run one after the other). The OpenMP
    runtime binds a team's leader once, to the first place, at its first parallel region, and binds the thread
    that loaded it (the one that imported convcore) at start-up; left so, every RPC thread that ever computed, and every thread started
    from the importing one, would share one CPU. So the leader is pinned to the first place only while it runs a
    job of two or more threads (its worker is on another place), and every thread gets the whole CPU set back
    after its job. Built from the environment the runtime read: `from_environ` returns None (nothing done) unless
    the placement is the one the server writes (``{a},{b},...``, one CPU each).
    """

    __slots__ = ("leader", "cpus", "_warned")

    def __init__(self, leader, cpus):
        self.leader, self.cpus = frozenset(leader), frozenset(cpus)
        self._warned = False

    @classmethod
    def from_environ(cls, environ=os.environ):
        if environ.get("OMP_PROC_BIND") != "spread" or environ.get("GOMP_CPU_AFFINITY"):
            return None
        places = environ.get("OMP_PLACES", "").split(",")
        cpus = []
        for place in places:
            if not (place.startswith("{") and place.endswith("}") and place[1:-1].isdigit()):
                return None
            cpus.append(int(place[1:-1]))
        return cls({cpus[0]}, cpus) if len(cpus) >= 2 else None

    def lead(self):
        """Pin the calling thread to the first place (it is about to lead a team)."""
        self._set(self.leader)

    def release(self):
        """Give the calling thread every CPU of the placement again."""
        self._set(self.cpus)

    def _set(self, cpus):
        # A CPU taken offline (or a cgroup cpuset shrunk) since start-up: compute anyway, where the thread may run.
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot set the CPU affinity of a compute thread to %s (%s); computing without it",
                            sorted(cpus), exc)


class BufferPool:
    """Arrays reused between jobs, shared by every thread (a job takes them, and gives them back when it ends)."""

    def __init__(self, max_bytes=_POOL_BYTES, max_array=_POOL_MAX_ARRAY):
        self._free = collections.defaultdict(list)  # (shape, dtype.str) -> arrays not in use
        self._bytes = 0
        self._max_bytes, self._max_array = max_bytes, max_array
        self._lock = threading.Lock()

    def take(self, shape, dtype):
        """A C-contiguous writable array of `shape`/`dtype`, from the pool when one is free."""
        dtype = np.dtype(dtype)
        with self._lock:
            free = self._free.get((tuple(shape), dtype.str))
            if free:
                array = free.pop()
                self._bytes -= array.nbytes
                return array
        return np.empty(shape, dtype)

    def give(self, arrays):
        """Return arrays taken with `take`; kept while the pool is under its size limits."""
        with self._lock:
            for array in arrays:
                if array.nbytes <= self._max_array and self._bytes + array.nbytes <= self._max_bytes:
                    self._free[(array.shape, array.dtype.str)].append(array)
                    self._bytes += array.nbytes


class CancelToken:
    """Set when the RPC that submitted a job has ended; a job checks it between steps.

    A plain attribute, not a threading.Event: it is only polled, never waited on, and one is made per call.
    """

    __slots__ = ("cancelled",)

    def __init__(self):
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    def check(self):
        """Raise RequestCancelled if the RPC has ended."""
        if self.cancelled:
            raise RequestCancelled(_CANCELLED)


class _Waiter:
    __slots__ = ("units", "event", "granted")

    def __init__(self, units):
        self.units, self.event, self.granted = units, threading.Event(), 0


class ComputeExecutor:
    """Run compute jobs on the calling thread once they hold their CPU units; slots x OpenMP threads <= usable cores.

    Parameters
    ----------
    omp_threads : int or None
        OpenMP threads per convolution (None: convcore's choice, i.e. all usable cores).
    slots : int or None
        Jobs of a full team running at once (None: usable cores // OpenMP threads, at least 1). The CPU units are
        ``slots x team``: as many one-thread jobs can run at once.
    observe : callable, optional
        ``observe(label, queued_seconds, run_seconds)`` after every job that started (metrics).
    """

    def __init__(self, omp_threads=None, slots=None, observe=None):
        self.omp_threads = omp_threads
        self._observe = observe
        # Bound OpenMP threads (see TeamPlacement): the thread that loaded the runtime was pinned to one CPU, and
        # convcore counts the calling thread's CPUs.
        self.placement = TeamPlacement.from_environ() if convcore.openmp_enabled() else None
        if self.placement is not None:
            self.placement.release()
        team = convcore.resolve_num_threads(omp_threads)
        # convcore owns the CPU count: affinity capped by the cgroup quota. resolve_num_threads(-1) would be the
        # affinity alone, so a container limited to 2 CPUs on a 16-core host would get 16 // team slots.
        cores = convcore.usable_cpus()
        self.team = team
        self.slots = slots or max(1, cores // team)
        self.units = self.slots * team
        self.buffers = BufferPool()
        self._free = self.units
        self._waiters = collections.deque()
        self._lock = threading.Lock()
        self._closed = False

    def run(self, context, fn, *args, threads=None, label="", light=False):
        """Run ``fn(token, granted, *args)`` for the RPC `context` on this thread once it holds CPU units.

        `threads` is the OpenMP threads the job would like (None: the team). It gets that many units when they are
        free; when fewer are free it starts at once with those (`granted`, at least 1, is how many threads it may
        use), because on a busy server two narrower jobs side by side keep the cores busier than one wide job and a
        queue. With none free it waits in FIFO order. `label` names the job in the metrics (the model name; "" for
        a one-off convolution). Raises RequestCancelled if the RPC ends before the job completes (the job is
        dropped if it is still waiting).

        `light` (a one-thread job shorter than the call's own Python, see `server._service.LIGHT_JOB_FLOPS`): when
        no unit is free, or jobs wait, it runs at once on one thread without a unit rather than wait. Waiting
        would cost two thread wake-ups and GIL hand-offs, more than the job; running over the units oversubscribes
        the cores by at most the RPC workers that take calls at once (`server._limits.CountingThreadPool`: as many
        as the usable CPUs), for ~0.1 ms each. It never takes a unit from a waiting job, so waiting jobs are not
        starved.
        """
        if not context.is_active():
            raise RequestCancelled(_CANCELLED)
        units = min(max(1, threads or self.team), self.units)
        token = CancelToken()
        submitted = time.perf_counter()
        with self._lock:
            if self._closed:
                raise RequestCancelled("the server is shutting down")
            waiter = None
            if self._free >= 1 and not self._waiters:
                held = min(units, self._free)
                self._free -= held
            elif light:
                held = 0  # runs without a unit (see above)
            else:
                waiter = _Waiter(units)
                self._waiters.append(waiter)
        if waiter is None:
            if not context.add_callback(token.cancel):
                token.cancel()  # the RPC already terminated
        else:
            with blocking():  # this RPC worker sleeps: let another one take queued calls meanwhile
                held = self._wait(context, token, waiter)
        started = time.perf_counter()
        placement = self.placement
        try:
            token.check()
            if placement is not None and held >= 2:
                placement.lead()
            return fn(token, held or 1, *args)
        finally:
            if placement is not None:
                placement.release()  # also after a one-thread job: its first region pinned this thread
            if held:
                self._release(held)
            if self._observe is not None:
                self._observe(label, started - submitted, time.perf_counter() - started)

    def _wait(self, context, token, waiter):
        def on_rpc_done():
            token.cancel()
            waiter.event.set()

        if not context.add_callback(on_rpc_done):
            on_rpc_done()
        waiter.event.wait()
        with self._lock:
            if waiter.granted:
                return waiter.granted  # a cancel that raced the grant is seen by token.check(), which gives back
            if waiter in self._waiters:  # not when shutdown() emptied the queue
                self._waiters.remove(waiter)
        log.info("dropped a queued compute job: its call ended (cancelled or past its deadline)")
        raise RequestCancelled(_CANCELLED)

    def _release(self, units):
        with self._lock:
            self._free += units
            # FIFO: the longest waiter goes first, with at least one unit and at most what it asked. With several
            # waiting, the free units are shared out rather than all given to the first: two one-thread jobs side
            # by side need no OpenMP team to wake up (2-5x slower after idle on this VM) or synchronize, and keep
            # both cores busy while a request is decoded. Measured neutral on medium at C=4 under load (same CPU per
            # request, req/s within noise: BENCHMARKS.md, issue 10). One waiter alone gets the team.
            while self._waiters and self._free >= 1 and not self._closed:
                waiter = self._waiters.popleft()
                share = max(1, self._free // (len(self._waiters) + 1))
                waiter.granted = min(waiter.units, share)
                self._free -= waiter.granted
                waiter.event.set()

    def shutdown(self, wait=True):
        """Refuse new jobs and drop the waiting ones (running jobs finish; their calls are drained by gRPC)."""
        with self._lock:
            self._closed = True
            waiters, self._waiters = list(self._waiters), collections.deque()
        for waiter in waiters:
            waiter.event.set()
