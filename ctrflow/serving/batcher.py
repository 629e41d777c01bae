"""The in-process autobatcher: joins many concurrent prediction requests into few large compute calls.

Pure scheduling over numpy arrays and a plain callable (no TensorFlow import), so the predictor wraps
it and tests drive it with real threads.

Behaviour
---------
Callers submit a dict of arrays that share their first dimension (one row per candidate ad). Rows wait
in one *open* batch; a batch thread flushes it to `compute` when it holds `max_batch_size` rows or when
its first row has waited `batch_timeout_ms`, whichever comes first. A request larger than the room left
in the open batch is split across consecutive batches; its future resolves when every piece is scored,
with the scores reassembled in the caller's row order.

Submitting never blocks. `submit` raises at once for anything it can tell up front:
- `QueueFullError` (retryable) when the rows would push the queue past `max_enqueued`, or when the
  request has a deadline that the queue cannot meet: the batcher learns what a compute call costs
  (an exponentially weighted fit of seconds = fixed + per-row x rows over recent calls) and refuses a
  request whose estimated queue wait + compute would take more than `shed_budget_fraction` of the
  time left to its deadline ("shed": computing it would likely answer late, and take capacity from
  requests that can still make theirs); the estimate adds what asyncio callers recently waited beyond
  it (resumed by a busy event loop after their scores were ready: `_Unseen`); an idle batcher
  refuses nothing,
- `DeadlineExceeded` when the deadline has already passed,
- `SchemaError` when the arrays do not match the batcher's inputs (fixed by its first request),
- `CtrflowError` once the batcher is closed.
Everything later arrives through the future: `DeadlineExceeded` for a request whose deadline passed
while it queued (its rows are dropped when its batch is formed, never computed: "expired"), or the
exception `compute` raised, or the `screen`'s error for inputs that must not reach a batch (checked per
batch on the batch thread; the requests it refuses fail alone, the rest are computed). A failed call
over several requests is re-run once per request, so one poison request fails alone, with its own
error, and its batch-mates are still scored.

Recommended use
---------------
One batcher per served model version, created by the predictor and closed with it::

    with AutoBatcher(model_fn, BatchingOptions(max_batch_size=2048, batch_timeout_ms=1.0)) as batcher:
        scores = batcher.predict({"ids": ids, "numeric": numeric}, timeout_ms=20)   # one thread
        future = batcher.submit(inputs, deadline=time.monotonic() + 0.02)           # fan-out
        scores = await batcher.apredict(inputs, timeout_ms=20)                      # asyncio

Tuning: pick the largest `max_batch_size` the model scores in well under your latency budget, then the
smallest `batch_timeout_ms` that still fills batches at your request rate. `num_batch_threads` above 1
only helps when `compute` releases the GIL (TensorFlow, numpy on big arrays) and the device has room.
Keep `max_enqueued` near `num_batch_threads * max_batch_size * (a few)`: a longer queue only turns
overload into timeouts instead of fast, retryable rejects. Give requests deadlines: with one, overload
is shed at the door (the queue never holds more than the deadline allows) and what is accepted is
answered in time; without one only `max_enqueued` bounds the queue.

Implementation details follow: a `_Task` is a slice of one `_Request` and only knows its size; a
`_Batch` is open, then closed once; the queue is a deque of closed batches plus the open one, guarded
by one condition variable that the batch threads wait on (never a busy wait).
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, InvalidStateError
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ctrflow.errors import ConfigError, CtrflowError, DeadlineExceeded, QueueFullError, SchemaError
from ctrflow.validation import Float, Int, check_fields

__all__ = ["AutoBatcher", "BatcherStats", "BatchingOptions", "ComputeFn", "TF_ALIGN_BYTES"]

ComputeFn = Callable[[dict[str, np.ndarray]], np.ndarray]
"""Scores one batch: gets the merged inputs, returns an array whose first dimension is the batch rows."""


@dataclass(frozen=True)
class BatchingOptions:
    """How the autobatcher trades latency for throughput; every field is checked at construction."""

    # Most rows in one compute call, >= 1. Larger requests are split across batches; 1 means every
    # row is its own call (no merging). Default 4096.
    max_batch_size: int = 4096
    # Milliseconds the first row of an open batch may wait for more rows before the batch is flushed,
    # >= 0. 0 flushes as soon as a batch thread is free; rows still merge while all threads are busy.
    # Default 2.0.
    batch_timeout_ms: float = 2.0
    # Threads calling `compute` concurrently, >= 1. Default 1.
    num_batch_threads: int = 1
    # Most rows accepted but not yet taken by a batch thread, >= max_batch_size. Past it `submit`
    # raises QueueFullError at once instead of queueing. Default 200_000.
    max_enqueued: int = 200_000
    # Refuse at once (QueueFullError: 503 / UNAVAILABLE, retryable) a request with a deadline that the
    # estimated queue wait + compute time would miss. False: queue it anyway (it may expire queued).
    # Default True. Requests without a deadline are never refused this way.
    shed_by_deadline: bool = True
    # The share of a request's remaining budget that the estimated queue wait + compute may take for
    # it to be admitted, in (0, 1]. The rest absorbs what the estimate cannot see: CPU taken by other
    # work (parsing the very requests being shed), preparing the features, the answer's way back. 1.0
    # admits whatever the estimate says will just make it. Default 0.5: under overload the queue still
    # holds half a budget of work, enough to keep the batch threads busy.
    shed_budget_fraction: float = 0.5

    def __post_init__(self) -> None:
        check_fields(self, {"max_batch_size": Int(1), "batch_timeout_ms": Float(0.0), "num_batch_threads": Int(1),
                            "max_enqueued": Int(1), "shed_budget_fraction": Float(0.0, 1.0, low_open=True)})
        if not isinstance(self.shed_by_deadline, bool):
            raise ConfigError(f"The 'shed_by_deadline' parameter of BatchingOptions must be a bool. "
                              f"Got {self.shed_by_deadline!r} instead.")
        if self.max_enqueued < self.max_batch_size:
            raise ConfigError(
                "The 'max_enqueued' parameter of BatchingOptions must be >= max_batch_size "
                f"({self.max_batch_size}) so that one full batch fits in the queue. "
                f"Got {self.max_enqueued!r} instead."
            )


@dataclass(frozen=True)
class BatcherStats:
    """A consistent snapshot of one batcher's counters (taken under its lock).

    After `close()`, `requests == completed + timeouts + errors + cancelled` and
    `rows_submitted == predictions + rows_dropped`.
    """

    name: str
    requests: int  # requests accepted; refused ones count in `rejects` only
    rows_submitted: int  # rows in accepted requests
    predictions: int  # rows scored by a successful compute call
    compute_calls: int  # calls to `compute`, failed ones included
    completed: int  # requests whose future received scores
    timeouts: int  # requests failed with DeadlineExceeded (at submit, in the queue, or while waited on)
    rejects: int  # submits refused because the queue was full or the batcher closed
    errors: int  # requests failed by a compute exception or by close(drain=False)
    compute_errors: int  # compute calls that raised or returned the wrong number of rows
    cancelled: int  # requests whose caller cancelled the future before they were computed
    rows_dropped: int  # accepted rows never scored: expired, cancelled, failed or closed
    rows_enqueued: int  # rows waiting for a batch thread at snapshot time (a gauge)
    queue_wait_ms_sum: float  # submit → taken by a batch thread, summed over request pieces
    queue_wait_count: int  # pieces measured (a request split over k batches counts k times)
    queue_wait_ms_max: float
    batch_size_bounds: tuple[int, ...]  # histogram bucket upper bounds in rows: 1, 2, 4, … max_batch_size
    batch_size_counts: tuple[int, ...]  # compute calls with bounds[i-1] < rows <= bounds[i]
    shed: int = 0  # submits refused because the estimated queue wait + compute would miss their deadline
    expired: int = 0  # accepted requests dropped when their batch formed: deadline passed while queued
    estimated_call_ms: float = 0.0  # the cost model's fixed cost per compute call (0: not learnt yet)
    estimated_row_us: float = 0.0  # ... and its cost per row
    estimated_unseen_ms: float = 0.0  # added to that estimate when admitting: what asyncio callers took beyond it
    invalid: int = 0  # of `errors`: requests the batcher's screen refused (inputs that would fail a batch)

    @property
    def mean_queue_wait_ms(self) -> float:
        return self.queue_wait_ms_sum / self.queue_wait_count if self.queue_wait_count else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; the histogram becomes {"<=bound": calls}."""
        out = asdict(self)
        del out["batch_size_bounds"], out["batch_size_counts"]
        out["batch_size_histogram"] = {
            f"<={bound}": count for bound, count in zip(self.batch_size_bounds, self.batch_size_counts)
        }
        out["mean_queue_wait_ms"] = self.mean_queue_wait_ms
        return out


class AutoBatcher:
    """Merges concurrent `submit`/`predict`/`apredict` calls into batched calls of `compute`.

    Args:
        compute: scores one batch (see `ComputeFn`); called from the batch threads, at most
            `num_batch_threads` at a time. It must not keep or modify the arrays it is given.
        options: `BatchingOptions`; the defaults suit a CPU model at a few thousand requests/s.
        name: names the threads and appears in every error message (e.g. the model name).
        reuse_buffers: `compute` promises to keep no reference to its inputs (nor views of them) once it
            returns, so a merged batch is gathered into buffers each batch thread reuses from call to call:
            no fresh pages to fault in per call (~0.15 ms of a 1,500-row ids batch, measured served).
            Default False: a fresh buffer per merged batch.
        screen: checks inputs that would fail `compute` for everyone (e.g. ids outside their table):
            `screen(inputs) -> Exception | None`, called on the batch thread with each merged batch before
            it is computed. When it objects, each request of the batch is screened alone (its whole
            inputs, so the error names its own rows), those it objects to fail with their own error
            (counted in `errors` and `invalid`) and the others are computed together in one call. A
            per-batch check instead of a per-request one before `submit`: one vectorized pass over a
            few thousand rows on a batch thread, not one small one per request on the caller's (an event
            loop's) thread, where numpy's loops over 500+ elements give the GIL away to the batch thread.
    """

    def __init__(
        self, compute: ComputeFn, options: BatchingOptions = BatchingOptions(), *, name: str = "default",
        reuse_buffers: bool = False, screen: Callable[[Mapping[str, np.ndarray]], BaseException | None] | None = None,
    ) -> None:
        if not callable(compute):
            raise ConfigError(
                f"The 'compute' parameter of AutoBatcher must be callable. Got {compute!r} instead."
            )
        if not isinstance(options, BatchingOptions):
            raise ConfigError(
                f"The 'options' parameter of AutoBatcher must be a BatchingOptions. Got {options!r} instead."
            )
        self._compute = compute
        self._screen = screen
        self._options = options
        self._name = name
        self._max_batch = int(options.max_batch_size)
        self._max_enqueued = int(options.max_enqueued)
        self._timeout_s = float(options.batch_timeout_ms) / 1000.0
        # Fixed by the first request: {key: (dtype, shape after the row axis)}. Checking every request
        # against it keeps one malformed request from failing everyone else's batch in np.concatenate.
        self._signature: dict[str, tuple[np.dtype, tuple[int, ...]]] | None = None
        # reuse_buffers: per batch thread, {key: an aligned [max_batch_size, ...] array} (see `_gather`).
        self._buffers = threading.local() if reuse_buffers else None

        # Everything below is guarded by _lock; _cond (over the same lock) is what the batch threads wait
        # on. `with self._lock` where nothing waits or is notified: a C-level enter, not Condition's Python one.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._ready: deque[_Batch] = deque()  # closed batches, oldest first
        self._open = _Batch()
        self._rows_enqueued = 0
        self._closing = False
        self._counts = _Counters(self._max_batch)
        self._shed = bool(options.shed_by_deadline)
        self._budget_share = float(options.shed_budget_fraction)
        self._threads_n = int(options.num_batch_threads)
        self._cost = _CostModel()  # what a compute call costs, learnt from the calls made
        self._unseen = _Unseen()  # what admitted asyncio requests took beyond the cost model's estimate
        self._busy_until: dict[int, float] = {}  # batch thread → when its current call should end
        # Per event loop, the deadlines of its `apredict` callers (touched only on that loop's thread).
        self._expiries: dict[asyncio.AbstractEventLoop, _Expiries] = {}

        self._threads = [
            threading.Thread(target=self._work, name=f"ctrflow-batcher-{name}-{i}", daemon=True)
            for i in range(options.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def name(self) -> str:
        return self._name

    @property
    def options(self) -> BatchingOptions:
        return self._options

    def __repr__(self) -> str:
        return f"AutoBatcher(name={self._name!r}, options={self._options!r})"

    # ---- submitting -------------------------------------------------------------------------------

    def submit(
        self, inputs: Mapping[str, np.ndarray], *, deadline: float | None = None
    ) -> Future[np.ndarray]:
        """Queue `inputs` for scoring and return at once; the future resolves to one score row per input row.

        Args:
            inputs: arrays sharing their first dimension (rows), e.g. {"ids": int32[rows, F],
                "numeric": float32[rows, N]}; same keys, dtypes and row shapes on every call. They
                are read later, on a batch thread: do not modify them until the future resolves.
            deadline: absolute `time.monotonic()` seconds; rows still queued after it are dropped and
                the future fails with DeadlineExceeded. None waits as long as it takes.

        Raises at once (never blocks): QueueFullError, DeadlineExceeded, SchemaError, CtrflowError
        (closed) — see the module docstring. A zero-row request resolves at once to an empty float32
        array.
        """
        return self._enqueue(inputs, deadline).future

    def predict(
        self, inputs: Mapping[str, np.ndarray], *, timeout_ms: float | None = None, deadline: float | None = None
    ) -> np.ndarray:
        """Submit and wait: scores for `inputs`, or DeadlineExceeded after `timeout_ms` (None: no limit).

        `deadline` (absolute `time.monotonic()` seconds, e.g. a request's arrival + its budget) may be
        given instead of or beside `timeout_ms`; the earlier one counts.
        """
        if deadline is not None:  # the message then says what was left of the budget at submit
            deadline = _earliest(deadline, timeout_ms)
            timeout_ms = _budget_ms(deadline)
        elif timeout_ms is not None:
            deadline = time.monotonic() + timeout_ms / 1000.0
        request = self._enqueue(inputs, deadline)
        future = request.future
        try:
            return future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            if future.done():  # DeadlineExceeded is a TimeoutError too: that one came from the queue
                raise
        error = self._give_up(request, timeout_ms)
        if error is None:  # it finished in the meantime
            return future.result()
        raise error

    async def apredict(
        self, inputs: Mapping[str, np.ndarray], *, timeout_ms: float | None = None, deadline: float | None = None
    ) -> np.ndarray:
        """The asyncio twin of `predict`; cancelling the awaiting task drops the rows if not yet computed."""
        if deadline is not None:  # the message then says what was left of the budget at submit
            deadline = _earliest(deadline, timeout_ms)
            timeout_ms = _budget_ms(deadline)
        elif timeout_ms is not None:
            deadline = time.monotonic() + timeout_ms / 1000.0
        # One loop future, woken from the batch thread and by one timer: the caller resumes one loop
        # iteration after its scores are ready (wrap_future + asyncio.wait take two more, which on a
        # saturated loop is two more lags per request). The batch thread wakes every waiter of one
        # batch on one loop with ONE call_soon_threadsafe (one self-pipe write, one loop wake-up per
        # batch instead of one per request).
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        request = self._enqueue(inputs, deadline, (loop, waiter))
        if not request.rows:  # a zero-row request: answered at submit
            _relay(waiter, request)
        if deadline is not None:  # woken with _EXPIRED at its deadline if its scores are not there by then
            expiries = self._expiries.get(loop)
            if expiries is None:
                expiries = self._expiries[loop] = _Expiries(loop, self._expiries)
            expiries.add(deadline, waiter)
        else:
            expiries = None
        try:
            outcome = await waiter
        except asyncio.CancelledError:
            request.future.cancel()  # not computed yet: its rows are dropped
            raise
        finally:
            # Entries the timer popped (_EXPIRED) are gone already; an answered or cancelled one is still held.
            if expiries is not None and not _expired(waiter):
                expiries.settle()
        if outcome is not _EXPIRED:
            self._learn_unseen(request)
            return outcome
        error = self._give_up(request, timeout_ms)
        if error is None:  # it finished in the meantime
            return await asyncio.wrap_future(request.future)
        raise error

    def _enqueue(self, inputs: Mapping[str, np.ndarray], deadline: float | None,
                 waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]] | None = None) -> _Request:
        rows = self._check_inputs(inputs)
        request = _Request(inputs, rows, deadline, waiter)
        max_batch = self._max_batch
        with self._lock:
            counts = self._counts
            if self._closing:
                counts.rejects += 1
                raise CtrflowError(
                    f"Batcher '{self._name}' is closed and accepts no new requests; "
                    "submit to the batcher of the model version now being served."
                )
            if deadline is not None and request.submitted_at >= deadline:
                counts.requests += 1
                counts.rows_submitted += rows
                counts.rows_dropped += rows
                counts.timeouts += 1
                raise DeadlineExceeded(
                    f"Request of {rows} rows to batcher '{self._name}' arrived "
                    f"{(request.submitted_at - deadline) * 1e3:.1f} ms after its deadline; not queued."
                )
            if deadline is not None and self._shed and rows:
                wait_s = self._estimate_s(rows, request.submitted_at)
                request.expected_s = self._expected_s(rows, wait_s)
                if wait_s is not None:
                    wait_s += self._unseen.margin_s()
                    if wait_s > self._budget_share * (deadline - request.submitted_at):
                        counts.shed += 1
                        raise self._shed_error(rows, wait_s, deadline - request.submitted_at)
            if self._rows_enqueued + rows > self._max_enqueued:
                if rows > self._max_enqueued:
                    raise ConfigError(
                        f"A request of {rows} rows can never fit batcher '{self._name}': its 'max_enqueued' "
                        f"option is {self._max_enqueued} rows. Split the request or raise max_enqueued."
                    )
                counts.rejects += 1
                raise QueueFullError(
                    f"Batcher '{self._name}' is full: {self._rows_enqueued} rows queued + {rows} requested "
                    f"> max_enqueued={self._max_enqueued}. Retry later; if this persists, add capacity "
                    "(num_batch_threads, max_batch_size) or shed load upstream."
                )
            counts.requests += 1
            counts.rows_submitted += rows
            if rows == 0:
                request.pieces_expected(0)
                counts.completed += 1
                request.outcome = np.empty((0,), dtype=np.float32)
                request.future.set_result(request.outcome)
                return request

            batch = self._open
            was_idle = not batch.tasks
            room = max_batch - batch.size  # >= 1: a full batch is closed the moment it fills
            request.pieces_expected(1 if rows <= room else 1 + -(-(rows - room) // max_batch))
            start = index = newly_closed = 0
            while start < rows:
                size = min(rows - start, max_batch - batch.size)
                batch.add(_Task(request, index, start, size), request.submitted_at)
                start += size
                index += 1
                if batch.size == max_batch:
                    batch.close()
                    self._ready.append(batch)
                    batch = _Batch()
                    newly_closed += 1
            self._open = batch
            self._rows_enqueued += rows
            if newly_closed:
                self._cond.notify(newly_closed)
            elif was_idle:
                self._cond.notify()  # someone must start the open batch's timer
        return request

    def admit(self, rows: int, *, deadline: float | None = None, lower_bound: bool = False) -> None:
        """Raise now what `submit` of `rows` rows would raise for load (QueueFullError, DeadlineExceeded).

        Lets a front end refuse an overload request before it pays for decoding and preparing it;
        `submit` checks again (the queue may have moved meanwhile). Counts a refusal like `submit`.
        `lower_bound`: the size is not known yet (HTTP's door, before the body): refuse only what no
        request could make — `rows` rows without the wait for a partial batch's timeout, which a
        request that fills the batch does not pay — so it is never stricter than the later check.
        """
        now = time.monotonic()
        with self._lock:
            if deadline is not None and now >= deadline:  # not counted here: nothing was accepted
                raise DeadlineExceeded(
                    f"Request of {rows} rows to batcher '{self._name}' arrived "
                    f"{(now - deadline) * 1e3:.1f} ms after its deadline; not queued."
                )
            if deadline is not None and self._shed and rows:
                wait_s = self._estimate_s(rows, now, lower_bound=lower_bound)
                if wait_s is not None:
                    wait_s += self._unseen.margin_s()
                    if wait_s > self._budget_share * (deadline - now):
                        self._counts.shed += 1
                        raise self._shed_error(rows, wait_s, deadline - now)
            if self._rows_enqueued + rows > self._max_enqueued and rows <= self._max_enqueued:
                self._counts.rejects += 1
                raise QueueFullError(
                    f"Batcher '{self._name}' is full: {self._rows_enqueued} rows queued + {rows} requested "
                    f"> max_enqueued={self._max_enqueued}. Retry later; if this persists, add capacity "
                    "(num_batch_threads, max_batch_size) or shed load upstream."
                )

    def estimated_wait_ms(self, rows: int) -> float | None:
        """Estimated ms from now until `rows` more rows would be scored (queue + compute); None while
        the batcher is idle (nothing queued, a thread free) or before its first calls taught it."""
        with self._lock:
            wait_s = self._estimate_s(rows, time.monotonic())
        return None if wait_s is None else wait_s * 1e3

    def _estimate_s(self, rows: int, now: float, *, lower_bound: bool = False) -> float | None:
        """Queue wait + compute for `rows` new rows behind what is queued now (call under the lock).

        The batch threads first finish their current calls (when all are busy), then score the queued
        rows and these in ceil(rows / max_batch_size) calls shared among the threads; a batch that
        would not be full also waits for its timeout.
        """
        fixed_s, row_s = self._cost.fit()
        if fixed_s is None:
            return None
        busy = self._busy_until
        if not self._rows_enqueued and len(busy) < self._threads_n:
            # Idle: the request is computed right away. Never refused, so the cost model keeps learning
            # (refusing on a stale, too-high estimate with no call to correct it would refuse forever).
            return None
        total = self._rows_enqueued + rows
        calls = -(-total // self._max_batch)
        work_s = (calls * fixed_s + total * row_s) / self._threads_n
        thread_wait_s = max(0.0, min(busy.values()) - now) if len(busy) >= self._threads_n else 0.0
        if total < self._max_batch and not lower_bound:  # (a larger request could fill the batch: no wait)
            thread_wait_s = max(thread_wait_s, self._timeout_s)
        return thread_wait_s + work_s

    def _expected_s(self, rows: int, wait_s: float | None) -> float | None:
        """What the cost model expects `rows` rows to take from submit to scored: its queue estimate, or
        (idle) one call plus the batch timeout; None before it learnt anything (call under the lock)."""
        if wait_s is not None:
            return wait_s
        fixed_s, row_s = self._cost.fit()
        if fixed_s is None:
            return None
        calls = -(-rows // self._max_batch)  # a request over max_batch_size rows takes several calls
        work_s = (calls * fixed_s + rows * row_s) / min(calls, self._threads_n)
        return work_s + (self._timeout_s if rows < self._max_batch else 0.0)

    def _learn_unseen(self, request: _Request) -> None:
        """An asyncio caller resumed with its scores: teach the admission what the cost model did not see
        (the way back through a busy event loop, threads descheduled by other work, its own error)."""
        if request.expected_s is not None:
            seen_s = time.monotonic() - request.submitted_at
            with self._lock:
                self._unseen.learn(seen_s - request.expected_s)

    def _shed_error(self, rows: int, wait_s: float, left_s: float) -> QueueFullError:
        return QueueFullError(
            f"Batcher '{self._name}' cannot score a request of {rows} rows within its deadline: queue wait + "
            f"compute is estimated at {wait_s * 1e3:.1f} ms ({self._rows_enqueued} rows queued), "
            f"{max(left_s, 0.0) * 1e3:.1f} ms are left (admitted up to {self._budget_share:g} of it). Refused at once rather than answered late; retry "
            "later, allow more time, or add capacity."
        )

    def _check_inputs(self, inputs: Mapping[str, np.ndarray]) -> int:
        """Rows in `inputs`, after checking they match the signature fixed by the first request."""
        signature = self._signature
        if signature is None:
            signature = self._fix_signature(inputs)
        if (type(inputs) is not dict and not isinstance(inputs, Mapping)) or len(inputs) != len(signature):  # (an ABC check: ~1 µs)
            raise SchemaError(
                f"Inputs to batcher '{self._name}' must be a dict with keys {sorted(signature)}. "
                f"Got {_describe(inputs)} instead."
            )
        rows = -1
        for key, (dtype, row_shape) in signature.items():
            array = inputs.get(key)
            shape = getattr(array, "shape", None)
            if (
                not isinstance(array, np.ndarray)
                or (array.dtype != dtype and not (array.dtype.kind in "SO" and dtype.kind in "SO"))
                or len(shape) != len(row_shape) + 1
                or shape[1:] != row_shape
            ):
                raise SchemaError(
                    f"Input '{key}' to batcher '{self._name}' must be a {dtype} array of shape "
                    f"(rows, *{row_shape}) like the batcher's first request. Got {_describe(array)} instead. "
                    "Cast with np.asarray(x, dtype=...) before submitting."
                )
            if rows < 0:
                rows = shape[0]
            elif shape[0] != rows:
                raise SchemaError(
                    f"Inputs to batcher '{self._name}' must share their first dimension (rows). "
                    f"Got {_describe(inputs)} instead."
                )
        return rows

    def _fix_signature(self, inputs: Mapping[str, np.ndarray]) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        if (
            not isinstance(inputs, Mapping)
            or not inputs
            or not all(isinstance(a, np.ndarray) and a.ndim >= 1 for a in inputs.values())
        ):
            raise SchemaError(
                f"Inputs to batcher '{self._name}' must be a non-empty dict of numpy arrays with a row "
                f"dimension first. Got {_describe(inputs)} instead."
            )
        signature = {k: (a.dtype, a.shape[1:]) for k, a in inputs.items()}
        with self._lock:
            if self._signature is None:
                self._signature = signature
            return self._signature

    def _give_up(self, request: _Request, timeout_ms: float | None) -> DeadlineExceeded | None:
        """Fail a request its waiter stopped waiting for; None if it finished first."""
        error = DeadlineExceeded(
            f"Request of {request.rows} rows to batcher '{self._name}' was not computed within its "
            f"{timeout_ms} ms timeout; its queued rows are dropped. Allow more time or add capacity "
            "(num_batch_threads, max_batch_size)."
        )
        if not request.fail(error):
            return None
        with self._lock:
            self._counts.timeouts += 1
        return error

    # ---- batch threads ----------------------------------------------------------------------------

    def _work(self) -> None:
        while (batch := self._take_batch()) is not None:
            try:
                self._run(batch)
            except BaseException as error:  # a bug here must not strand callers or kill the thread
                for task in batch.tasks:
                    task.request.fail(error)
                if not isinstance(error, Exception):
                    raise

    def _take_batch(self) -> _Batch | None:
        """Block until a batch is due (full, timed out, or closing); None once closed and empty."""
        with self._lock:
            while True:
                if self._ready:
                    batch = self._ready.popleft()
                    break
                batch = self._open
                if batch.tasks:
                    wait_s = batch.opened_at + self._timeout_s - time.monotonic()
                    if wait_s <= 0.0 or self._closing:
                        batch.close()
                        self._open = _Batch()
                        break
                    self._cond.wait(wait_s)
                elif self._closing:
                    return None
                else:
                    self._cond.wait()
            self._rows_enqueued -= batch.size
            if self._ready or self._open.tasks:
                self._cond.notify()  # more work: pass the baton to an idle thread
            return batch

    def _run(self, batch: _Batch) -> None:
        """Drop expired/cancelled pieces, compute the rest in one call, hand each caller its rows."""
        now = time.monotonic()
        live: list[_Task] = []
        wait_sum = wait_max = 0.0
        dropped = timeouts = cancelled = 0
        wakes: list[_Request] = []  # asyncio callers finished by this batch, woken together at the end
        for task in batch.tasks:
            request = task.request
            wait = now - request.submitted_at
            wait_sum += wait
            wait_max = max(wait_max, wait)
            if request.done:
                dropped += task.size
            elif request.future.cancelled():
                cancelled += request.fail(None)
                dropped += task.size
            elif request.deadline is not None and now > request.deadline:
                timeouts += request.fail(
                    DeadlineExceeded(
                        f"Request of {request.rows} rows to batcher '{self._name}' passed its deadline "
                        f"while queued ({wait * 1e3:.1f} ms waited, {(now - request.deadline) * 1e3:.1f} ms "
                        "late); dropped before compute. Allow more time or add capacity "
                        "(num_batch_threads, max_batch_size)."
                    ),
                    wakes,
                )
                dropped += task.size
            else:
                live.append(task)

        if wakes:  # the expired ones hear at once, not after the call
            _wake_all(wakes)
            wakes = []
        completed = errors = 0
        calls: list[tuple[int, bool]] = []  # (rows, failed) of each compute call
        invalid = 0
        inputs = None
        if live and self._screen is not None:
            inputs = _gather(live, self._max_batch, self._buffers)
            try:
                objection = self._screen(inputs)
            except Exception as error:  # noqa: BLE001 - then each request is screened alone
                objection = error
            if objection is not None:  # some request holds rows no call may see: find it
                live, refused, invalid = self._screened(live, wakes)
                dropped += sum(t.size for t in refused)
                inputs = None
                if wakes:
                    _wake_all(wakes)
                    wakes = []
        if live:
            me = threading.get_ident()
            live_rows = sum(t.size for t in live)
            with self._lock:
                fixed_s, row_s = self._cost.fit()
                self._busy_until[me] = now + (fixed_s + row_s * live_rows if fixed_s is not None else 0.0)
            began = time.monotonic()
            outcome = self._score(live, inputs)
            spent = time.monotonic() - began
            with self._lock:
                self._busy_until.pop(me, None)
                if not isinstance(outcome, Exception):
                    self._cost.learn(live_rows, spent)
            if isinstance(outcome, Exception) and len({id(t.request) for t in live}) > 1:
                # One poison request must not fail its batch-mates: re-run each request on its own,
                # so the good ones are scored and only the bad one fails, with its own error.
                calls.append((sum(t.size for t in live), True))
                by_request: dict[int, list[_Task]] = {}
                for task in live:
                    by_request.setdefault(id(task.request), []).append(task)
                for group in by_request.values():
                    alone = self._score(group)
                    done, failed = self._finish(group, alone, wakes)
                    completed, errors = completed + done, errors + failed
                    calls.append((sum(t.size for t in group), isinstance(alone, Exception)))
                    if wakes:  # each re-run's caller hears as soon as its own call is done
                        _wake_all(wakes)
                        wakes = []
            else:
                done, failed = self._finish(live, outcome, wakes)
                completed, errors = completed + done, errors + failed
                calls.append((sum(t.size for t in live), isinstance(outcome, Exception)))
        if wakes:
            _wake_all(wakes)

        with self._lock:
            counts = self._counts
            counts.completed += completed
            counts.timeouts += timeouts
            counts.expired += timeouts
            counts.cancelled += cancelled
            counts.errors += errors + invalid
            counts.invalid += invalid
            counts.queue_wait_s_sum += wait_sum
            counts.queue_wait_count += len(batch.tasks)
            counts.queue_wait_s_max = max(counts.queue_wait_s_max, wait_max)
            for call_rows, call_failed in calls:
                counts.compute_calls += 1
                counts.batch_size_counts[(call_rows - 1).bit_length()] += 1
                if call_failed:
                    counts.compute_errors += 1
                else:
                    counts.predictions += call_rows
            # Live rows that no call scored are dropped (after a re-run, only the failed requests' rows).
            scored = sum(r for r, f in calls if not f)
            counts.rows_dropped += dropped + (sum(t.size for t in live) - scored)

    def _screened(self, live: list[_Task], wakes: list[_Request]) -> tuple[list[_Task], list[_Task], int]:
        """Screen each request of `live` alone (its whole inputs): fail those the screen objects to, with
        its error for them; (the tasks still to compute, the tasks of requests so failed, requests this
        call failed)."""
        verdicts: dict[int, BaseException | None] = {}
        keep: list[_Task] = []
        refused: list[_Task] = []
        failed = 0
        for task in live:
            request = task.request
            key = id(request)
            if key not in verdicts:
                try:
                    verdicts[key] = self._screen(request.inputs)
                except Exception as error:  # a screen that breaks on one request fails that request only
                    verdicts[key] = error
                if verdicts[key] is not None:
                    failed += request.fail(verdicts[key], wakes)
            (keep if verdicts[key] is None else refused).append(task)
        return keep, refused, failed

    def _score(self, tasks: list[_Task], inputs: dict[str, np.ndarray] | None = None) -> np.ndarray | Exception:
        """One compute call over the tasks' rows (`inputs`: already gathered): the scores, or the
        exception that fails them."""
        rows = sum(t.size for t in tasks)
        try:
            scores = self._compute(inputs if inputs is not None else _gather(tasks, self._max_batch, self._buffers))
            if not isinstance(scores, np.ndarray):
                scores = np.asarray(scores)
            if scores.ndim == 0 or scores.shape[0] != rows:
                raise CtrflowError(
                    f"The compute function of batcher '{self._name}' returned shape {scores.shape} "
                    f"for a batch of {rows} rows; it must return one row of scores per input row."
                )
        except Exception as error:  # fails these tasks' requests only; the thread goes on
            return error
        return scores

    @staticmethod
    def _finish(tasks: list[_Task], outcome: np.ndarray | Exception, wakes: list[_Request]) -> tuple[int, int]:
        """Hand each task its rows of `outcome` (or fail its request): (requests completed, failed).
        Asyncio callers finished here are appended to `wakes` (the caller wakes them together)."""
        completed = errors = 0
        if isinstance(outcome, Exception):
            for task in tasks:
                errors += task.request.fail(outcome, wakes)
            return 0, errors
        offset = 0
        for task in tasks:
            end = offset + task.size
            completed += task.request.deliver(task.index, outcome[offset:end], wakes)
            offset = end
        return completed, 0

    # ---- observing and closing --------------------------------------------------------------------

    def stats(self) -> BatcherStats:
        """A snapshot of the counters; cheap enough to scrape every second."""
        with self._lock:
            c = self._counts
            fixed_s, row_s = self._cost.fit()
            return BatcherStats(
                name=self._name,
                requests=c.requests,
                rows_submitted=c.rows_submitted,
                predictions=c.predictions,
                compute_calls=c.compute_calls,
                completed=c.completed,
                timeouts=c.timeouts,
                rejects=c.rejects,
                errors=c.errors,
                compute_errors=c.compute_errors,
                cancelled=c.cancelled,
                rows_dropped=c.rows_dropped,
                rows_enqueued=self._rows_enqueued,
                queue_wait_ms_sum=c.queue_wait_s_sum * 1e3,
                queue_wait_count=c.queue_wait_count,
                queue_wait_ms_max=c.queue_wait_s_max * 1e3,
                batch_size_bounds=c.batch_size_bounds,
                batch_size_counts=tuple(c.batch_size_counts),
                shed=c.shed,
                expired=c.expired,
                invalid=c.invalid,
                estimated_call_ms=(fixed_s or 0.0) * 1e3,
                estimated_row_us=(row_s or 0.0) * 1e6,
                estimated_unseen_ms=self._unseen.margin_s() * 1e3,
            )

    def close(self, *, drain: bool = True) -> None:
        """Stop accepting requests, then finish and join the batch threads. Idempotent.

        drain=True computes every queued request first (open batches flush without waiting for their
        timeout); drain=False fails queued requests at once with CtrflowError. Batches already in
        `compute` always finish. Blocks until the threads exit, so a hung `compute` hangs close too.
        """
        orphans: list[_Task] = []
        with self._lock:
            self._closing = True
            if not drain:
                for batch in self._ready:
                    orphans.extend(batch.tasks)
                orphans.extend(self._open.tasks)
                self._ready.clear()
                self._open = _Batch()
                self._rows_enqueued = 0
            self._cond.notify_all()
        if orphans:
            error = CtrflowError(
                f"Batcher '{self._name}' was closed before this request was computed; resubmit it to "
                "the batcher now serving."
            )
            failed = sum(task.request.fail(error) for task in orphans)
            with self._lock:
                self._counts.errors += failed
                self._counts.rows_dropped += sum(task.size for task in orphans)
        current = threading.current_thread()
        for thread in self._threads:
            if thread is not current:  # close() called from inside compute must not join itself
                thread.join()

    async def aclose(self, *, drain: bool = True) -> None:
        """The asyncio twin of `close`: runs it on a worker thread so the event loop keeps serving."""
        await asyncio.to_thread(self.close, drain=drain)

    def __enter__(self) -> AutoBatcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> AutoBatcher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _Request:
    """One caller's rows and future: resolves when its last piece is scored, or fails exactly once."""

    __slots__ = (
        "inputs", "rows", "deadline", "submitted_at", "future", "waiter", "done", "_pieces", "_remaining", "_lock",
        "expected_s", "outcome",
    )

    def __init__(self, inputs: Mapping[str, np.ndarray], rows: int, deadline: float | None,
                 waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]] | None = None) -> None:
        self.inputs = inputs
        self.rows = rows
        self.deadline = deadline
        self.submitted_at = time.monotonic()
        self.future: Future[np.ndarray] = Future()
        # An asyncio caller's (loop, loop future): woken on its loop once `future` is settled.
        self.waiter = waiter
        self.done = False  # set once, under _lock, by whoever finishes the request
        self._pieces: list[np.ndarray | None] = []
        self._remaining = 0
        self._lock = threading.Lock()  # pieces may finish on different batch threads
        self.expected_s: float | None = None  # the cost model's queue wait + compute at submit (admission)
        # The scores or the error, once settled: what an asyncio caller's waiter is handed (`_relay`), read
        # here rather than through `future` (each of its accessors enters a Python-level Condition).
        self.outcome: np.ndarray | BaseException | None = None

    def pieces_expected(self, count: int) -> None:
        self._pieces = [None] * count
        self._remaining = count

    def deliver(self, index: int, scores: np.ndarray, wakes: list[_Request] | None = None) -> bool:
        """Store one piece's scores; the last piece resolves the future. True if this call did.

        An asyncio caller is then appended to `wakes` (woken by whoever passed it), else woken now."""
        with self._lock:
            if self.done:
                return False
            self._pieces[index] = scores
            self._remaining -= 1
            if self._remaining:
                return False
            self.done = True
            pieces, self._pieces = self._pieces, []
        self.outcome = scores = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        _settle(self.future.set_result, scores)
        self._woken(wakes)
        return True

    def fail(self, error: BaseException | None, wakes: list[_Request] | None = None) -> bool:
        """Finish without scores (None: the caller cancelled). True if this call finished it."""
        with self._lock:
            if self.done:
                return False
            self.done = True
            self._pieces = []
        if error is not None:
            self.outcome = error
            _settle(self.future.set_exception, error)
            self._woken(wakes)
        return True

    def _woken(self, wakes: list[_Request] | None) -> None:
        if self.waiter is None:
            return
        if wakes is not None:
            wakes.append(self)
        else:
            _wake_all([self])


class _Task:
    """A contiguous slice of one request's rows; a batch only needs its size."""

    __slots__ = ("request", "index", "start", "size")

    def __init__(self, request: _Request, index: int, start: int, size: int) -> None:
        self.request = request
        self.index = index  # position of this piece in the request's reassembled result
        self.start = start
        self.size = size


class _Batch:
    """Tasks for one compute call: open while rows are added, closed once when full or due."""

    __slots__ = ("tasks", "size", "opened_at", "closed")

    def __init__(self) -> None:
        self.tasks: list[_Task] = []
        self.size = 0
        self.opened_at = 0.0  # when the first task arrived: the timeout counts from here
        self.closed = False

    def add(self, task: _Task, now: float) -> None:
        if not self.tasks:
            self.opened_at = now
        self.tasks.append(task)
        self.size += task.size

    def close(self) -> None:
        self.closed = True


class _Counters:
    """Mutable totals behind `BatcherStats`; guarded by the batcher's lock."""

    def __init__(self, max_batch_size: int) -> None:
        self.requests = self.rows_submitted = self.predictions = self.compute_calls = 0
        self.completed = self.timeouts = self.rejects = self.errors = self.compute_errors = 0
        self.cancelled = self.rows_dropped = self.queue_wait_count = 0
        self.shed = self.expired = self.invalid = 0
        self.queue_wait_s_sum = self.queue_wait_s_max = 0.0
        # Bucket i holds batches of 2**(i-1) < rows <= 2**i, so the index is (rows - 1).bit_length().
        buckets = (max_batch_size - 1).bit_length() + 1
        self.batch_size_bounds = tuple(min(1 << i, max_batch_size) for i in range(buckets))
        self.batch_size_counts = [0] * buckets


def _gather(tasks: list[_Task], max_rows: int = 0, buffers: threading.local | None = None) -> dict[str, np.ndarray]:
    """Merge the tasks' rows into one input dict: one np.concatenate per key into a 64-byte-aligned
    buffer (this thread's reused one when `buffers` is given, else a fresh one), none for a lone task."""
    if len(tasks) == 1:
        task = tasks[0]
        stop = task.start + task.size
        return {key: array[task.start : stop] for key, array in task.request.inputs.items()}
    rows = sum(t.size for t in tasks)
    out = {}
    for key, first in tasks[0].request.inputs.items():
        pieces = [t.request.inputs[key][t.start : t.start + t.size] for t in tasks]
        if first.dtype.hasobject or first.dtype.kind == "S":
            # Strings: numpy picks the widest 'S' width (or object when a JSON request's objects join
            # binary ones' bytes); a buffer of the first piece's width would cut longer values. One wide
            # request must not pad everyone's column to its width: then the column goes as objects.
            widths = [p.dtype.itemsize for p in pieces if p.dtype.kind == "S"]
            if widths and max(widths) * rows > _PAD_LIMIT and max(widths) > 2 * min(widths):
                pieces = [p.astype(object) if p.dtype.kind == "S" else p for p in pieces]
            out[key] = np.concatenate(pieces)
            continue
        # Aligned, so a compute (TensorFlow) may share it without a copy.
        shape = (rows, *first.shape[1:])
        if buffers is None or rows > max_rows:
            target = _aligned_empty(shape, first.dtype)
        else:
            kept = buffers.__dict__.get(key)
            if kept is None or kept.dtype != first.dtype or kept.shape[1:] != shape[1:]:
                kept = buffers.__dict__[key] = _aligned_empty((max_rows, *shape[1:]), first.dtype)
            target = kept[:rows]
        out[key] = np.concatenate(pieces, out=target)
    return out


TF_ALIGN_BYTES = 64  # TensorFlow's kernels abort the process on a tensor buffer aligned less (EIGEN_MAX_ALIGN_BYTES)
_PAD_LIMIT = 1 << 20  # bytes of one merged string column padded to its widest request's width


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """np.empty(shape, dtype) whose data starts on a `TF_ALIGN_BYTES`-byte boundary."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + TF_ALIGN_BYTES, np.uint8)
    skip = -raw.ctypes.data % TF_ALIGN_BYTES
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)


def _settle(setter: Callable[[Any], None], value: Any) -> None:
    try:
        setter(value)
    except InvalidStateError:  # the caller cancelled the future while it was being computed
        pass


def _describe(value: object) -> str:
    """Short, array-free description of a rejected input, for error messages."""
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in value.items()) + "}"
    return type(value).__name__


class _CostModel:
    """Seconds per compute call as fixed + per_row x rows: an exponentially weighted least-squares fit.

    Each successful call adds (rows, seconds) with weight ALPHA, older calls fade, so the fit follows
    the machine (a noisy neighbour, a warmer cache) within a few dozen calls. When recent calls all had
    about the same size the slope is unknowable: their cost is then split half fixed, half per row.
    Guarded by the batcher's lock.
    """

    ALPHA = 0.1
    MIN_CALLS = 3  # no estimate before this many calls (the first ones carry one-time costs)

    __slots__ = ("calls", "mx", "my", "mxx", "mxy", "_fit")

    def __init__(self) -> None:
        self.calls = 0
        self.mx = self.my = self.mxx = self.mxy = 0.0
        self._fit: tuple[float | None, float] | None = None  # fit() since the last learn (asked per request)

    def learn(self, rows: int, seconds: float) -> None:
        x, y = float(rows), max(0.0, float(seconds))
        if self.calls == 0:
            self.mx, self.my, self.mxx, self.mxy = x, y, x * x, x * y
        else:
            a = self.ALPHA
            self.mx += a * (x - self.mx)
            self.my += a * (y - self.my)
            self.mxx += a * (x * x - self.mxx)
            self.mxy += a * (x * y - self.mxy)
        self.calls += 1
        self._fit = None

    def fit(self) -> tuple[float | None, float]:
        """(fixed seconds per call, seconds per row); (None, 0.0) until MIN_CALLS calls were seen."""
        fit = self._fit
        if fit is None:
            fit = self._fit = self._solve()
        return fit

    def _solve(self) -> tuple[float | None, float]:
        if self.calls < self.MIN_CALLS or self.mx <= 0.0:
            return None, 0.0
        var = self.mxx - self.mx * self.mx
        if var > (0.1 * self.mx) ** 2:  # sizes spread enough to tell fixed from per-row cost
            slope = (self.mxy - self.mx * self.my) / var
            fixed = self.my - slope * self.mx
            if slope > 0.0 and fixed >= 0.0:
                return fixed, slope
            if slope > 0.0:  # negative intercept: noise; all per row
                return 0.0, self.my / self.mx
            return self.my, 0.0  # bigger calls were not slower: all fixed
        # Calls all of about one size: split their cost half fixed, half per row (a guess between the
        # two ends: all per row would make every queued row look as dear as in a small batch, so a
        # server admitting only small batches would keep estimating high and keep refusing).
        return 0.5 * self.my, 0.5 * self.my / self.mx


class _Unseen:
    """What admitted requests took beyond the cost model's estimate, smoothed over recent requests.

    The cost model sees only the batch threads' calls. An asyncio caller also waits for its event loop
    to resume it after the scores are ready — on a loop busy reading the very requests being shed that
    is the loop's whole lag, tens of ms — and for threads descheduled by other work. Measured per
    request (resumed − submitted − estimate) and smoothed with weight ALPHA; the admission adds mean +
    one mean absolute deviation (a tail allowance), never less than 0. It only learns from requests it
    admitted, so it cannot lock the door: an idle batcher admits everything and keeps teaching it.
    Guarded by the batcher's lock.
    """

    ALPHA = 0.05

    __slots__ = ("mean", "dev")

    def __init__(self) -> None:
        self.mean = self.dev = 0.0

    def learn(self, extra_s: float) -> None:
        a = self.ALPHA
        self.dev += a * (abs(extra_s - self.mean) - self.dev)
        self.mean += a * (extra_s - self.mean)

    def margin_s(self) -> float:
        return max(0.0, self.mean + self.dev)


_EXPIRED = object()  # what `apredict`'s timer puts in its waiter


def _expired(waiter: asyncio.Future[Any]) -> bool:
    """Whether the timer woke `waiter` (its entry popped), not an outcome, an error or a cancellation."""
    return waiter.done() and not waiter.cancelled() and waiter.exception() is None and waiter.result() is _EXPIRED


def _relay(waiter: asyncio.Future[Any], request: _Request) -> None:
    """On the loop: hand a finished request's outcome to its waiter (unless it timed out or was cancelled:
    the waiter is done then)."""
    if waiter.done():
        return
    outcome = request.outcome
    if isinstance(outcome, BaseException):
        waiter.set_exception(outcome)
    else:
        waiter.set_result(outcome)


def _relay_all(requests: list[_Request]) -> None:
    """On the loop: hand each finished request's outcome to its waiter."""
    for request in requests:
        _relay(request.waiter[1], request)


def _wake_all(requests: list[_Request]) -> None:
    """On whichever thread finished the requests: one `_relay_all` per event loop they wait on."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Request]] = {}
    for request in requests:
        by_loop.setdefault(request.waiter[0], []).append(request)
    for loop, group in by_loop.items():
        try:
            loop.call_soon_threadsafe(_relay_all, group)
        except RuntimeError:  # that loop is closed: nobody waits any more
            pass


class _Expiries:
    """The deadlines of one event loop's `apredict` callers, woken with `_EXPIRED` by one loop timer.

    A TimerHandle armed and cancelled per request cost ~6 µs of the loop's time; here a request costs
    one heap push, and the timer is armed for the earliest deadline of a caller still waiting: when it
    fires, the expired callers are woken and the answered ones at the head dropped unseen, so it fires
    about once per deadline's length while requests are answered in time (not once per request).
    Callers answered before their deadline say so (`settle`); once they are most of the heap it is
    compacted, so the heap holds about the callers still waiting, not rate x deadline answered ones
    (with their scores) until the timer reaches them: a 60 s deadline at 5k req/s would otherwise
    hold 300k entries and pop them in one 0.5 s loop stall (found in review).
    Lives only while some deadline is held; used only on its loop's thread."""

    __slots__ = ("_loop", "_owner", "_heap", "_seq", "_handle", "_armed_at", "_settled")

    _COMPACT_MIN = 256  # answered entries before a compaction is considered (amortised O(1) per request)

    def __init__(self, loop: asyncio.AbstractEventLoop, owner: dict[asyncio.AbstractEventLoop, _Expiries]) -> None:
        self._loop = loop
        self._owner = owner  # the batcher's {loop: _Expiries}: left once no deadline is held
        self._heap: list[tuple[float, int, asyncio.Future[Any]]] = []
        self._seq = itertools.count()  # ties in deadline never compare the futures
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = math.inf
        self._settled = 0  # callers answered since the last compaction whose entries may still be held

    def settle(self) -> None:
        """A caller's wait ended before its entry was popped; compact when such entries are most of the heap."""
        self._settled += 1
        heap = self._heap
        if self._settled > self._COMPACT_MIN and 2 * self._settled > len(heap):
            heap[:] = [entry for entry in heap if not entry[2].done()]
            heapq.heapify(heap)
            self._settled = 0
            if not heap:
                if self._handle is not None:
                    self._handle.cancel()
                self._handle, self._armed_at = None, math.inf
                if self._owner.get(self._loop) is self:
                    del self._owner[self._loop]

    def add(self, deadline: float, waiter: asyncio.Future[Any]) -> None:
        heapq.heappush(self._heap, (deadline, next(self._seq), waiter))
        if deadline < self._armed_at:
            self._arm(deadline)

    def _arm(self, deadline: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_at = deadline
        loop = self._loop
        self._handle = loop.call_at(loop.time() + (deadline - time.monotonic()), self._fire)  # (deadlines: time.monotonic())

    def _fire(self) -> None:
        self._handle, self._armed_at = None, math.inf
        heap = self._heap
        now = time.monotonic()
        while heap and (heap[0][0] <= now or heap[0][2].done()):
            waiter = heapq.heappop(heap)[2]
            if not waiter.done():
                waiter.set_result(_EXPIRED)
        if heap:
            self._arm(heap[0][0])
        elif self._owner.get(self._loop) is self:
            del self._owner[self._loop]


def _earliest(deadline: float | None, timeout_ms: float | None) -> float | None:
    """The earlier of an absolute deadline and now + timeout_ms (None: neither given)."""
    if timeout_ms is None:
        return deadline
    relative = time.monotonic() + timeout_ms / 1000.0
    return relative if deadline is None else min(deadline, relative)


def _budget_ms(deadline: float | None) -> float | None:
    """Milliseconds left until `deadline`, for messages (None: no deadline)."""
    return None if deadline is None else round(max(0.0, deadline - time.monotonic()) * 1e3, 1)
