"""The bounded executor that runs convolutions, sized against the OpenMP team, with cancellation and buffer reuse.

Why a separate executor: each convcore call runs an OpenMP team of T threads with the GIL released. If every gRPC
worker thread computed directly, W workers x T OpenMP threads would fight over the cores (2 here). So RPC threads
only decode and encode; convolutions run on `slots = usable cores // T` threads (at least 1) and queue otherwise.

Cancellation: when an RPC ends early (client gone, deadline passed) gRPC calls our callback, which drops the job if
it is still queued and flags it if it is running; a running model checks the flag between layers.
"""
import collections
import concurrent.futures
import logging
import threading
import time

import numpy as np

import convcore

from ._errors import RequestCancelled

__all__ = ["ComputeExecutor", "CancelToken", "thread_buffer"]

log = logging.getLogger("server")

#: Output buffers are reused per compute thread up to this many bytes in total (large ones are not kept), because
#: a fresh large allocation page-faults all of its memory on every call (see PERF-NOTES, "glibc allocation").
_POOL_BYTES = 128 << 20
_POOL_MAX_ARRAY = 32 << 20

_local = threading.local()


def thread_buffer(key, shape, dtype):
    """Return a C-contiguous writable array of `shape`/`dtype` owned by the calling compute thread.

    Safe to reuse because a compute job turns its result into bytes before it returns, and a buffer never leaves
    the thread that owns it. `key` distinguishes buffers that are alive at the same time (e.g. one per layer).
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes > _POOL_MAX_ARRAY:
        return np.empty(shape, dtype)
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = collections.OrderedDict()
    full_key = (key, tuple(shape), dtype.str)
    buf = pool.get(full_key)
    if buf is None:
        buf = np.empty(shape, dtype)
        pool[full_key] = buf
        total = sum(b.nbytes for b in pool.values())
        while total > _POOL_BYTES and len(pool) > 1:
            _, old = pool.popitem(last=False)
            total -= old.nbytes
    else:
        pool.move_to_end(full_key)
    return buf


class CancelToken:
    """Set when the RPC that submitted a job has ended; a job checks it between steps."""

    __slots__ = ("_event",)

    def __init__(self):
        self._event = threading.Event()

    def cancel(self):
        self._event.set()

    @property
    def cancelled(self):
        return self._event.is_set()

    def check(self):
        """Raise RequestCancelled if the RPC has ended."""
        if self._event.is_set():
            raise RequestCancelled("the client cancelled the call or its deadline passed")


class ComputeExecutor:
    """Run compute jobs on a bounded pool sized so that slots x OpenMP threads <= usable cores.

    Parameters
    ----------
    omp_threads : int or None
        OpenMP threads per convolution (None: convcore's choice, i.e. all usable cores).
    slots : int or None
        Jobs running at once (None: usable cores // OpenMP threads, at least 1).
    observe : callable, optional
        ``observe(label, queued_seconds, run_seconds)`` after every job that started (metrics).
    """

    def __init__(self, omp_threads=None, slots=None, observe=None):
        self.omp_threads = omp_threads
        self._observe = observe
        team = convcore.resolve_num_threads(omp_threads)
        # convcore owns the CPU count: affinity capped by the cgroup quota. resolve_num_threads(-1) would be the
        # affinity alone, so a container limited to 2 CPUs on a 16-core host would get 16 // team slots.
        cores = convcore.usable_cpus()
        self.team = team
        self.slots = slots or max(1, cores // team)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="compute")

    def run(self, context, fn, *args, label=""):
        """Run ``fn(token, *args)`` on the pool for the RPC `context`; return its result.

        `label` names the job in the metrics (the model name; "" for a one-off convolution).
        Raises RequestCancelled if the RPC ends before the job completes (the job is dropped if still queued).
        """
        if not context.is_active():
            raise RequestCancelled("the client cancelled the call or its deadline passed")
        token = CancelToken()
        future = self._pool.submit(self._guarded, token, fn, args, label, time.perf_counter())

        def on_rpc_done():
            token.cancel()
            # No effect once running (the token then stops a model between layers) or once done.
            if future.cancel():
                log.info("dropped a queued compute job: its call ended (cancelled or past its deadline)")

        if not context.add_callback(on_rpc_done):
            on_rpc_done()  # the RPC already terminated
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise RequestCancelled("the client cancelled the call or its deadline passed") from None

    def _guarded(self, token, fn, args, label, submitted):
        token.check()
        if self._observe is None:
            return fn(token, *args)
        started = time.perf_counter()
        try:
            return fn(token, *args)
        finally:
            self._observe(label, started - submitted, time.perf_counter() - started)

    def shutdown(self, wait=True):
        self._pool.shutdown(wait=wait, cancel_futures=True)
