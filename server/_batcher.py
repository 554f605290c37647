"""Dynamic batching of concurrent requests for one model, with the semantics of Triton's ``dynamic_batching``.

Requests with the same non-batch shape and dtype (their *key*) queue together. A batch is the longest prefix of a
key's queue (in arrival order) that fits in ``max_batch_size`` rows. It is dispatched

- at once when that prefix can grow no more (it is full, or the next request does not fit), or when a prefix adds up
  to one of the ``preferred_batch_size`` values (then the largest such prefix goes), as Triton's scheduler does;
- else when its oldest request has waited ``max_queue_delay_microseconds`` (0: at once);
- earlier if a member's deadline is near: a request waits for others at most until its deadline less the compute
  time of this key's last batch, and at most half of the time it had left on arrival; it is never held for
  batching past its deadline (if no compute slot frees in time it fails with BatchDeadlineExceeded);

and only while fewer than ``max_concurrent`` batches are computing: a batch keeps growing while the compute slots are
busy, which is where batching pays (Triton's "dispatch when an instance is free").

There is no scheduler thread: the batch is concatenated, computed and split by one of its own members' threads (the
first one to see it ready), and the others wait on a condition. So a request that arrives alone at an idle model
pays no thread hop, and no thread ever works for a request it does not belong to (its own caller's deadline and
cancellation stay meaningful).

Failure isolation: every check on a request (dtype, rank, channels, batch size) happens before it joins, in the
caller and in `DynamicBatcher.run`. A member that is cancelled or whose deadline passes leaves: out of the queue if
not yet dispatched, or abandoning its rows if the batch is running (the compute is told to stop only when every
member has gone). If the batched compute raises, each member is computed alone, so an error that only the batch
provokes (e.g. a size limit) fails nobody, and an error of one member's own fails only that member.

Exact results: each caller gets exactly its own rows of the batch output. They are bit-identical to running the
request alone only if the compute's result for a row does not depend on the batch it is in. convcore's default dense
path (packed GEMM) guarantees it; its BLAS path (``algorithm="blas"``) does not, since OpenBLAS's result for an
element depends on the GEMM's shape.
"""
import collections
import dataclasses
import logging
import math
import threading
import time

import numpy as np

from ._errors import InvalidArgument, RequestCancelled

__all__ = ["BatchingConfig", "DynamicBatcher", "BatchDeadlineExceeded", "MAX_QUEUE_DELAY_MICROSECONDS",
           "resolve_batching"]

log = logging.getLogger("server")

#: Longest queue delay accepted (10 s): a longer one is a typo, and would hold every request that long.
MAX_QUEUE_DELAY_MICROSECONDS = 10_000_000
#: Triton's names, the only keys a batching dict may hold.
_KEYS = ("max_batch_size", "preferred_batch_size", "max_queue_delay_microseconds")


class BatchDeadlineExceeded(RequestCancelled):
    """The request's deadline passed while it waited to be batched or computed."""


def _positive_int(field, value, upper=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidArgument(f"{field} must be a positive int, got {value!r}")
    if upper is not None and value > upper:
        raise InvalidArgument(f"{field} must be at most {upper}, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    """One model's dynamic-batching settings, with Triton's names.

    Attributes
    ----------
    max_batch_size : int
        Most rows in one batch (and in one request).
    preferred_batch_size : tuple of int
        Batch sizes dispatched as soon as they can be formed; each in ``1..max_batch_size``.
    max_queue_delay_microseconds : int
        How long the oldest request of a forming batch may wait for more (0: dispatch what is there at once).
    """

    max_batch_size: int
    preferred_batch_size: tuple = ()
    max_queue_delay_microseconds: int = 0

    def __post_init__(self):
        _positive_int("batching.max_batch_size", self.max_batch_size)
        prefs = self.preferred_batch_size
        if isinstance(prefs, (str, bytes)) or not hasattr(prefs, "__iter__"):
            raise InvalidArgument(f"batching.preferred_batch_size must be a list of ints, got {prefs!r}")
        prefs = tuple(_positive_int(f"batching.preferred_batch_size[{i}]", p, self.max_batch_size)
                      for i, p in enumerate(prefs))
        if len(set(prefs)) != len(prefs):
            raise InvalidArgument(f"batching.preferred_batch_size holds a value twice, got {list(prefs)}")
        object.__setattr__(self, "preferred_batch_size", tuple(sorted(prefs)))
        delay = self.max_queue_delay_microseconds
        if isinstance(delay, bool) or not isinstance(delay, (int, np.integer)) or not \
                0 <= delay <= MAX_QUEUE_DELAY_MICROSECONDS:
            raise InvalidArgument(f"batching.max_queue_delay_microseconds must be an int from 0 to "
                                  f"{MAX_QUEUE_DELAY_MICROSECONDS} (10 s), got {delay!r}")
        object.__setattr__(self, "max_queue_delay_microseconds", int(delay))

    @classmethod
    def from_dict(cls, settings, defaults=None):
        """Build from a dict with Triton's names; missing (or 0 / empty) entries come from `defaults`.

        Parameters
        ----------
        settings : dict
            Any of ``max_batch_size``, ``preferred_batch_size``, ``max_queue_delay_microseconds``.
        defaults : BatchingConfig, optional
            The server's defaults (``--batch-*`` flags).

        Raises
        ------
        InvalidArgument
            For an unknown key or a bad value, naming it.
        """
        if not isinstance(settings, dict):
            raise InvalidArgument(f"batching must be a dict with keys {list(_KEYS)}, got {type(settings).__name__}")
        unknown = sorted(set(settings) - set(_KEYS))
        if unknown:
            raise InvalidArgument(f"batching has unknown key(s) {unknown}; the keys are {list(_KEYS)} (Triton's "
                                  f"dynamic_batching names)")
        merged = dataclasses.asdict(defaults) if defaults is not None else {"max_batch_size": None}
        for key, value in settings.items():
            if value or key not in merged:  # proto3 gives 0 / [] for unset fields: keep the default then
                merged[key] = value
        if merged.get("max_batch_size") is None:
            raise InvalidArgument("batching.max_batch_size is required (no server default was given)")
        return cls(**merged)

    @property
    def max_queue_delay(self):
        """The queue delay in seconds."""
        return self.max_queue_delay_microseconds / 1e6


def resolve_batching(settings, defaults):
    """A model's BatchingConfig from its registered `settings` dict and the server's `defaults`, which also cap it.

    Raises InvalidArgument naming the field, also when max_batch_size is over the server's (``--max-batch-size``).
    """
    config = BatchingConfig.from_dict(settings, defaults)
    if defaults is not None and config.max_batch_size > defaults.max_batch_size:
        raise InvalidArgument(f"batching.max_batch_size must be at most {defaults.max_batch_size} (the server's "
                              f"--max-batch-size), got {config.max_batch_size}")
    return config


class _Token:
    """Cancel token of one batch: set when every member has left.

    It also looks like an RPC context to the compute executor (``is_active``, ``add_callback``), so a batch's compute
    is dropped or stopped between layers exactly as one RPC's is.
    """

    __slots__ = ("cancelled", "_callbacks")

    def __init__(self):
        self.cancelled = False
        self._callbacks = []

    def cancel(self):
        self.cancelled = True
        for fn in self._callbacks:
            fn()

    def is_active(self):
        return not self.cancelled

    def add_callback(self, fn):
        if self.cancelled:
            return False
        self._callbacks.append(fn)
        return True

    def check(self):
        if self.cancelled:
            raise RequestCancelled("every caller of this batch cancelled or passed its deadline")


# Entry states
_QUEUED, _RUNNING, _DONE, _LEFT = range(4)


class _Entry:
    """One request. Its thread sleeps on `wake`, a lock held from the start and released by whoever has news for
    this entry only (the batcher's lock held): one wake-up per event and per thread concerned, never a broadcast."""

    __slots__ = ("x", "rows", "queue", "arrival", "deadline", "state", "result", "error", "batch", "dispatched",
                 "timing", "output", "wake", "sleeping")

    def __init__(self, x, deadline, timing, output):
        self.x = x
        self.rows = x.shape[0]
        self.queue = None
        self.arrival = time.monotonic()
        self.deadline = deadline
        self.state = _QUEUED
        self.result = self.error = self.batch = None
        self.dispatched = None
        self.timing = timing
        self.output = output
        self.wake = threading.Lock()
        self.wake.acquire()
        self.sleeping = False


class _Batch:
    __slots__ = ("members", "inputs", "alive", "token")

    def __init__(self, members):
        self.members = members
        self.inputs = [e.x for e in members]  # taken now: a member that leaves drops its own reference
        self.alive = len(members)
        self.token = _Token()


class _Queue:
    """The requests of one key, waiting in arrival order. Its head is the leader: the only thread that plans and
    times the batch (the others sleep until they are done, gone, or become the head)."""

    __slots__ = ("key", "entries", "rows", "estimate", "leader_wake")

    def __init__(self, key):
        self.key = key
        self.entries = collections.deque()
        self.rows = 0              # rows of every queued entry
        self.estimate = 0.0        # seconds the last batch of this key took to compute
        self.leader_wake = math.inf  # when the head plans to look again (inf: when woken)


def _wake(entry):
    """Wake `entry`'s thread if it sleeps (call with the batcher's lock held)."""
    if entry.sleeping:
        entry.sleeping = False
        entry.wake.release()


class DynamicBatcher:
    """Merge concurrent requests of one model into batches (see the module docstring for the rules).

    Parameters
    ----------
    compute : callable
        ``compute(x, token) -> y``: run the model on `x` (a batch, rows along axis 0) and return an array whose
        axis 0 has one entry per input row. `token` has ``cancelled`` and ``check()`` (raises RequestCancelled),
        set when every member of the batch has left.
    config : BatchingConfig
    max_concurrent : int
        Batches computing at once (the compute slots this model may use).
    on_batch : callable, optional
        ``on_batch(rows, requests, input_seconds, infer_seconds, output_seconds, ok)`` after every batch (metrics,
        statistics); ``input_seconds`` is gathering the rows into one array, ``infer_seconds`` the compute,
        ``output_seconds`` the split into the callers' outputs.
    allocate, release : callable, optional
        ``allocate(shape, dtype) -> array`` gives the batch's input array, ``release(arrays)`` takes back arrays
        no longer used (the batch input, and the batch output once every member's rows were copied out): a pool,
        so that a large batch does not page-fault fresh memory on every call.
    name : str
        The model's name, for messages.
    """

    def __init__(self, compute, config, *, max_concurrent=1, on_batch=None, allocate=None, release=None, name=""):
        self.config = config
        self.name = name
        self._compute = compute
        self._max_concurrent = _positive_int("max_concurrent", max_concurrent)
        self._on_batch = on_batch
        self._allocate = allocate or np.empty
        self._release = release
        self._lock = threading.Lock()
        self._queues = {}
        self._running = 0
        self._closed = False

    # ------------------------------------------------------------------ the caller's side
    def run(self, x, *, deadline=None, add_callback=None, timing=None, output=None):
        """Compute `x` as part of a batch; return its own rows of the batch output.

        Parameters
        ----------
        x : numpy.ndarray
            The request's input, already checked against the model; rows along axis 0.
        deadline : float, optional
            ``time.monotonic()`` time after which the caller no longer wants the answer.
        add_callback : callable, optional
            ``add_callback(fn) -> bool`` as gRPC's ``context.add_callback``: `fn` is called when the RPC ends
            (cancelled, past its deadline, or done); False means it has ended already.
        timing : dict, optional
            Filled with ``queue_seconds`` (arrival to dispatch), ``input_seconds``, ``infer_seconds``,
            ``output_seconds``, ``batch_rows`` and ``batch_requests`` of the batch this request was computed in.
        output : callable, optional
            ``output(shape, dtype) -> array`` where this request's rows go (e.g. the payload of its response). The
            thread that computed the batch copies them there, so a caller wakes up with its answer complete.

        Returns
        -------
        numpy.ndarray
            The array `output` gave, filled; without `output`, a view of this request's rows of the batch output.

        Raises
        ------
        InvalidArgument
            `x` is not an array with 1..max_batch_size rows (checked before it joins).
        BatchDeadlineExceeded, RequestCancelled
            The deadline passed, or the caller went away, before its rows were computed.
        Exception
            Whatever the compute (or `output`) raised for this request computed alone.
        """
        if not isinstance(x, np.ndarray) or x.ndim < 1:
            raise InvalidArgument(f"input must be an array with a batch axis, got "
                                  f"{type(x).__name__ if not isinstance(x, np.ndarray) else x.shape}")
        if not 1 <= x.shape[0] <= self.config.max_batch_size:
            raise InvalidArgument(f"input has batch {x.shape[0]} (shape {list(x.shape)}), model {self.name!r} takes "
                                  f"1 to {self.config.max_batch_size} rows per request (its max_batch_size)")
        entry = _Entry(x, deadline, timing, output)
        key = (x.shape[1:], x.dtype.str)
        with self._lock:
            if self._closed:
                raise RequestCancelled("the server is shutting down")
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = _Queue(key)
            entry.queue = queue
            queue.entries.append(entry)
            queue.rows += entry.rows
            head = queue.entries[0]
            if head is not entry and self._news_for_leader(queue, entry):
                _wake(head)
        if add_callback is not None and not add_callback(lambda: self._leave(entry, cancelled=True)):
            self._leave(entry, cancelled=True)
        batch = self._wait(entry, queue)
        if batch is not None:
            self._dispatch(batch, queue)
        error, result = entry.error, entry.result
        # Entry and batch refer to each other: drop what they hold now rather than at the next garbage collection
        # (the input may view a shared-memory mapping that is to be unmapped when this request is done).
        entry.x = entry.output = entry.result = entry.batch = None
        if error is not None:
            raise error
        return result

    def _news_for_leader(self, queue, entry):
        """Whether `entry`'s arrival can make the head's batch go before the head's own timer says."""
        if self._running >= self._max_concurrent:
            return False  # no batch can go until one finishes, and the finishing one wakes every head
        cfg = self.config
        if queue.rows >= cfg.max_batch_size or queue.rows in cfg.preferred_batch_size:
            return True
        return entry.deadline is not None and self._earliest(queue, entry) < queue.leader_wake

    @staticmethod
    def _earliest(queue, e):
        # Leave the compute time of this key's last batch, and never spend more than half of what was left of a
        # request's time on waiting for others (the first batch has no estimate yet).
        return e.deadline - max(queue.estimate, (e.deadline - e.arrival) / 2)

    def _sleep(self, entry, timeout):
        """Release the batcher's lock and sleep until woken or `timeout` seconds (None: no limit); relock."""
        entry.sleeping = True
        self._lock.release()
        try:
            entry.wake.acquire(timeout=-1 if timeout is None else max(timeout, 0.0))
        finally:
            self._lock.acquire()
            # Timed out (or woken just after timing out: the lock is then free and the next sleep returns at once,
            # a spurious wake-up the loop absorbs).
            entry.sleeping = False

    def _wait(self, entry, queue):
        """Wait until `entry` is done or gone, or it heads the queue and its batch should go (returned, taken)."""
        with self._lock:
            while True:
                if entry.state in (_DONE, _LEFT):
                    return None
                now = time.monotonic()
                if entry.deadline is not None and now >= entry.deadline:
                    self._leave_locked(entry, cancelled=False)
                    return None
                wake = entry.deadline if entry.deadline is not None else math.inf
                if entry.state == _QUEUED and queue.entries[0] is entry:
                    members, ready_at = self._plan(queue, now)
                    if members is not None:
                        return self._take(members, queue, now)
                    queue.leader_wake = ready_at
                    wake = min(wake, ready_at)
                self._sleep(entry, None if wake == math.inf else wake - now)

    def _plan(self, queue, now):
        """(members, None) if the head batch of `queue` should go now, else (None, time it becomes ready)."""
        if self._running >= self._max_concurrent:
            return None, math.inf  # woken when a batch finishes
        cfg = self.config
        entries = queue.entries
        members, rows, preferred = [], 0, 0
        earliest = math.inf
        for e in entries:
            if rows + e.rows > cfg.max_batch_size:
                break
            members.append(e)
            rows += e.rows
            if rows in cfg.preferred_batch_size:
                preferred = len(members)
            if e.deadline is not None:
                earliest = min(earliest, self._earliest(queue, e))
        ready_at = min(members[0].arrival + cfg.max_queue_delay, earliest)
        if now >= ready_at or rows == cfg.max_batch_size or len(members) < len(entries):
            return members, None
        if preferred:
            return members[:preferred], None
        return None, ready_at

    def _take(self, members, queue, now):
        batch = _Batch(members)
        for e in members:
            queue.entries.popleft()  # members are the head of the queue, in order
            queue.rows -= e.rows
            e.state, e.batch, e.dispatched = _RUNNING, batch, now
        self._running += 1
        queue.leader_wake = math.inf
        if queue.entries:
            _wake(queue.entries[0])  # the new head leads the next batch (it is computed when a slot frees)
        else:
            self._drop_if_empty(queue)
        return batch

    def _drop_if_empty(self, queue):
        # One queue per distinct input shape: forget it once empty, so varied shapes do not pile up. Threads still
        # holding it through their entries do not need it in the dict.
        if not queue.entries and self._queues.get(queue.key) is queue:
            del self._queues[queue.key]

    def _leave(self, entry, cancelled):
        with self._lock:
            self._leave_locked(entry, cancelled)

    def _leave_locked(self, entry, cancelled):
        queue = entry.queue
        if entry.state == _QUEUED:
            was_head = queue.entries[0] is entry
            queue.entries.remove(entry)
            queue.rows -= entry.rows
            if queue.entries:
                # The head leads with one entry less (a new head, or a batch that now has a preferred size).
                if was_head:
                    queue.leader_wake = math.inf
                _wake(queue.entries[0])
            else:
                self._drop_if_empty(queue)
        elif entry.state == _RUNNING:
            entry.batch.alive -= 1
            if entry.batch.alive == 0:
                entry.batch.token.cancel()  # nobody wants these rows any more: stop between layers
        else:
            return  # done already (gRPC also calls back when a call completes normally) or gone
        entry.state = _LEFT
        entry.error = (RequestCancelled("the client cancelled the call or its deadline passed") if cancelled else
                       BatchDeadlineExceeded(f"the request's deadline passed while it waited for a batch of model "
                                             f"{self.name!r}"))
        _wake(entry)  # the cancel callback runs on another thread: the caller returns now

    # ------------------------------------------------------------------ computing a batch
    def _deliver(self, e, rows):
        """The caller's answer: `rows` copied into its own output (when it gave one), else `rows` itself."""
        if e.output is None:
            return rows
        out = e.output(rows.shape, rows.dtype)
        out[...] = rows
        return out

    def _dispatch(self, batch, queue):
        """Gather, compute, split into each member's output (on the calling member's thread); on a batch error
        compute each member alone."""
        members = batch.members
        rows = sum(e.rows for e in members)
        t0 = time.perf_counter()
        results, errors = {}, {}
        input_s = infer_s = output_s = 0.0
        pooled = []
        slot_held = True
        try:
            if len(members) == 1:
                x = batch.inputs[0]
            else:
                first = batch.inputs[0]
                x = self._allocate((rows, *first.shape[1:]), first.dtype)
                pooled.append(x)
                np.concatenate(batch.inputs, out=x)
            t1 = time.perf_counter()
            input_s = t1 - t0
            y = self._compute(x, batch.token)
            t2 = time.perf_counter()
            infer_s = t2 - t1
            if not isinstance(y, np.ndarray) or y.ndim < 1 or y.shape[0] != rows:
                raise RuntimeError(f"the compute of model {self.name!r} returned "
                                   f"{getattr(y, 'shape', type(y).__name__)} for a batch of {rows} rows")
            # The compute is over: the next batch may go while this thread copies the rows out (on a large
            # model that copy is a millisecond the compute slot would otherwise sit idle).
            self._free_slot(queue, infer_s + input_s)
            slot_held = False
            start = 0
            for e in members:
                if e.state == _RUNNING:  # read without the lock: at worst one needless copy for a leaver
                    try:
                        results[e] = self._deliver(e, y[start:start + e.rows])
                    except Exception as exc:  # noqa: BLE001 - this member's output failed: its own error
                        errors[e] = exc
                start += e.rows
            if all(e.output is not None for e in members):
                pooled.append(y)  # every answer was copied out: the batch output can be reused
            output_s = time.perf_counter() - t2
        except RequestCancelled as exc:
            errors = dict.fromkeys(members, exc)
        except Exception as exc:  # noqa: BLE001 - isolate: compute each member alone, each gets its own outcome
            if len(members) > 1:
                log.warning("a batch of %d requests (%d rows) of model %r failed (%s: %s); computing them one by "
                            "one", len(members), rows, self.name, type(exc).__name__, exc)
            results.clear()
            errors.clear()
            t1 = time.perf_counter()
            for e, one_x in zip(members, batch.inputs):
                if len(members) == 1:
                    errors[e] = exc
                    break
                if e.state != _RUNNING:
                    continue  # left meanwhile
                try:
                    results[e] = self._deliver(e, self._compute(one_x, batch.token))
                except Exception as one:  # noqa: BLE001 - this member's own error, raised in its thread
                    errors[e] = one
            infer_s += time.perf_counter() - t1
        finally:
            if slot_held:
                self._free_slot(queue, infer_s + input_s)
            with self._lock:
                for e in members:
                    if e.state != _RUNNING:
                        continue  # left already; its rows are dropped
                    e.state = _DONE
                    e.result, e.error = results.get(e), errors.get(e)
                    if e.result is None and e.error is None:
                        e.error = RuntimeError(f"batch of model {self.name!r} ended without a result")
                    if e.timing is not None:
                        e.timing.update(queue_seconds=e.dispatched - e.arrival, input_seconds=input_s,
                                        infer_seconds=infer_s, output_seconds=output_s, batch_rows=rows,
                                        batch_requests=len(members))
                    _wake(e)
            batch.inputs = None  # views of the callers' inputs: not kept past the batch
            if pooled and self._release is not None:
                self._release(pooled)
        if self._on_batch is not None:
            self._on_batch(rows, len(members), input_s, infer_s, output_s, not errors)

    def _free_slot(self, queue, seconds):
        """One batch fewer computing (it took `seconds`): every key's forming batch may go now (only heads plan)."""
        with self._lock:
            self._running -= 1
            queue.estimate = seconds if not queue.estimate else 0.5 * (queue.estimate + seconds)
            for q in self._queues.values():
                if q.entries:
                    _wake(q.entries[0])

    # ------------------------------------------------------------------ lifecycle
    def pending(self):
        """Requests waiting to be dispatched (all keys)."""
        with self._lock:
            return sum(len(q.entries) for q in self._queues.values())

    def close(self):
        """Refuse new requests; queued ones are still dispatched and computed."""
        with self._lock:
            self._closed = True
