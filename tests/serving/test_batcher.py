"""Tests for ctrflow/serving/batcher.py: real threads, a recording compute, gates instead of sleeps."""
from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import numpy as np
import pytest

from ctrflow.errors import ConfigError, CtrflowError, DeadlineExceeded, QueueFullError, SchemaError
from ctrflow.serving.batcher import AutoBatcher, BatcherStats, BatchingOptions

WAIT_S = 2.0  # upper bound for anything we wait on; a hang fails the test instead of the run


class Recorder:
    """A compute function that records each batch and can be held shut until the test opens it.

    Score of a row = 2 * ids[:, 0], so each caller can check it got exactly its own rows back.
    """

    def __init__(self, *, hold_first: bool = False, fail_on: int | None = None) -> None:
        self.batches: list[np.ndarray] = []  # ids[:, 0] of every batch computed
        self.started = threading.Event()
        self.gate = threading.Event()
        self._hold_first = hold_first
        self._fail_on = fail_on  # an id value that makes the batch containing it raise
        self._lock = threading.Lock()

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        ids = inputs["ids"][:, 0]
        with self._lock:
            first = not self.batches
            self.batches.append(ids.copy())
        self.started.set()
        if first and self._hold_first:
            assert self.gate.wait(WAIT_S), "test never opened the gate"
        if self._fail_on is not None and (ids == self._fail_on).any():
            raise ValueError(f"bad row {self._fail_on} in batch")
        return ids.astype(np.float64) * 2.0 + inputs["numeric"][:, 0]

    @property
    def rows_seen(self) -> np.ndarray:
        return np.concatenate(self.batches) if self.batches else np.empty(0, np.int32)


def rows(first_id: int, count: int) -> dict[str, np.ndarray]:
    """`count` rows whose ids[:, 0] run first_id, first_id + 1, …; numeric is zero."""
    ids = np.zeros((count, 3), np.int32)
    ids[:, 0] = np.arange(first_id, first_id + count)
    return {"ids": ids, "numeric": np.zeros((count, 2), np.float32)}


def expected(first_id: int, count: int) -> np.ndarray:
    return np.arange(first_id, first_id + count, dtype=np.float64) * 2.0


@pytest.fixture
def make_batcher() -> Iterator[Callable[..., AutoBatcher]]:
    """Builds batchers and always closes them, opening any gate first so teardown never hangs."""
    made: list[tuple[AutoBatcher, Recorder]] = []

    def make(compute: Callable[[dict[str, np.ndarray]], np.ndarray], **options: object) -> AutoBatcher:
        batcher = AutoBatcher(compute, BatchingOptions(**options), name="test")
        made.append((batcher, compute))
        return batcher

    yield make
    for batcher, compute in made:
        if isinstance(compute, Recorder):
            compute.gate.set()
        batcher.close(drain=False)


def hold_worker(batcher: AutoBatcher, compute: Recorder, first_id: int = 10_000) -> Future[np.ndarray]:
    """Occupies the (single) batch thread with a one-row request blocked in compute; returns its future."""
    future = batcher.submit(rows(first_id, 1))
    assert compute.started.wait(WAIT_S)
    return future


def assert_counters_add_up(stats: BatcherStats) -> None:
    assert stats.rows_enqueued == 0
    assert stats.requests == stats.completed + stats.timeouts + stats.errors + stats.cancelled
    assert stats.rows_submitted == stats.predictions + stats.rows_dropped
    assert sum(stats.batch_size_counts) == stats.compute_calls


# ---- merging, splitting, flushing ----------------------------------------------------------------


def test_concurrent_submits_merge_into_one_call_and_each_caller_gets_its_own_rows(make_batcher):
    compute = Recorder(hold_first=True)
    batcher = make_batcher(compute, batch_timeout_ms=0, max_batch_size=1024)
    first = hold_worker(batcher, compute)

    futures: dict[int, Future[np.ndarray]] = {}

    def client(k: int) -> None:
        futures[k] = batcher.submit(rows(100 * k, 1 + k % 7))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    compute.gate.set()

    for k, future in futures.items():
        np.testing.assert_array_equal(future.result(WAIT_S), expected(100 * k, 1 + k % 7))
    first.result(WAIT_S)
    # All 40 requests queued while the thread was busy, so they leave in one call.
    assert len(compute.batches) == 2
    assert batcher.stats().compute_calls == 2


def test_request_larger_than_max_batch_size_is_split_and_reassembled_in_order(make_batcher):
    compute = Recorder()
    batcher = make_batcher(compute, batch_timeout_ms=0, max_batch_size=8)

    scores = batcher.predict(rows(0, 30), timeout_ms=WAIT_S * 1000)

    np.testing.assert_array_equal(scores, expected(0, 30))
    assert [len(b) for b in compute.batches] == [8, 8, 8, 6]
    np.testing.assert_array_equal(compute.rows_seen, np.arange(30))


def test_request_fills_the_open_batch_then_spills_into_the_next(make_batcher):
    compute = Recorder(hold_first=True)
    batcher = make_batcher(compute, batch_timeout_ms=0, max_batch_size=10)
    hold_worker(batcher, compute)
    small = batcher.submit(rows(0, 4))
    large = batcher.submit(rows(100, 15))  # 6 rows top up the open batch, 9 open the next
    compute.gate.set()

    np.testing.assert_array_equal(small.result(WAIT_S), expected(0, 4))
    np.testing.assert_array_equal(large.result(WAIT_S), expected(100, 15))
    assert [len(b) for b in compute.batches[1:]] == [10, 9]


def test_batches_never_exceed_max_batch_size_under_concurrent_load(make_batcher):
    compute = Recorder()
    batcher = make_batcher(compute, batch_timeout_ms=1, max_batch_size=16, num_batch_threads=3)
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 40, size=120)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    results: dict[int, np.ndarray] = {}

    def client(k: int) -> None:
        results[k] = batcher.predict(rows(int(starts[k]), int(sizes[k])), timeout_ms=WAIT_S * 1000)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(sizes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert max(len(b) for b in compute.batches) <= 16
    for k in range(len(sizes)):
        np.testing.assert_array_equal(results[k], expected(int(starts[k]), int(sizes[k])))
    assert sorted(compute.rows_seen.tolist()) == list(range(int(sizes.sum())))


def test_lone_request_is_flushed_after_batch_timeout_not_held_for_a_full_batch(make_batcher):
    compute = Recorder()
    batcher = make_batcher(compute, batch_timeout_ms=30, max_batch_size=4096)

    started = time.monotonic()
    scores = batcher.predict(rows(0, 1), timeout_ms=WAIT_S * 1000)
    elapsed = time.monotonic() - started

    np.testing.assert_array_equal(scores, expected(0, 1))
    assert 0.025 <= elapsed < 1.0


def test_full_batch_is_computed_without_waiting_for_the_timeout(make_batcher):
    compute = Recorder()
    batcher = make_batcher(compute, batch_timeout_ms=60_000, max_batch_size=4)

    scores = batcher.predict(rows(0, 4), timeout_ms=WAIT_S * 1000)

    np.testing.assert_array_equal(scores, expected(0, 4))


def test_max_batch_size_one_computes_every_row_on_its_own(make_batcher):
    compute = Recorder()
    batcher = make_batcher(compute, batch_timeout_ms=0, max_batch_size=1, max_enqueued=10)

    scores = batcher.predict(rows(0, 5))

    np.testing.assert_array_equal(scores, expected(0, 5))
    assert [len(b) for b in compute.batches] == [1] * 5


def test_zero_row_request_resolves_at_once_without_compute(make_batcher):
    compute = Recorder()
    batcher = make_batcher(compute)

    scores = batcher.predict(rows(0, 0))

    assert scores.shape == (0,)
    assert compute.batches == []


# ---- the bounded queue and deadlines -------------------------------------------------------------


def test_full_queue_rejects_at_once_with_queue_full_error(make_batcher):
    compute = Recorder(hold_first=True)
    batcher = make_batcher(compute, batch_timeout_ms=0, max_batch_size=4, max_enqueued=8)
    hold_worker(batcher, compute)
    queued = batcher.submit(rows(0, 8))  # exactly fills the queue

    started = time.monotonic()
    with pytest.raises(QueueFullError, match="8 rows queued \\+ 1 requested > max_enqueued=8"):
        batcher.submit(rows(100, 1))
    assert time.monotonic() - started < 0.1

    compute.gate.set()
    np.testing.assert_array_equal(queued.result(WAIT_S), expected(0, 8))
    assert batcher.stats().rejects == 1
    assert 100 not in compute.rows_seen


def test_request_larger_than_the_whole_queue_is_refused_as_config_error(make_batcher):
    batcher = make_batcher(Recorder(), max_batch_size=4, max_enqueued=8)

    with pytest.raises(ConfigError, match="can never fit"):
        batcher.submit(rows(0, 9))


def test_request_whose_deadline_passes_in_the_queue_is_dropped_before_compute(make_batcher):
    compute = Recorder(hold_first=True)
    batcher = make_batcher(compute, batch_timeout_ms=0)
    hold_worker(batcher, compute)
    deadline = time.monotonic() + 0.02
    doomed = batcher.submit(rows(0, 3), deadline=deadline)
    on_time = batcher.submit(rows(100, 2))
    while time.monotonic() <= deadline:  # let the deadline pass while the thread is busy
        time.sleep(0.005)
    compute.gate.set()

    with pytest.raises(DeadlineExceeded, match="passed its deadline while queued"):
        doomed.result(WAIT_S)
    np.testing.assert_array_equal(on_time.result(WAIT_S), expected(100, 2))
    assert not set(range(3)) & set(compute.rows_seen.tolist())
    assert batcher.stats().timeouts == 1


def test_request_already_past_its_deadline_is_refused_at_submit(make_batcher):
    compute = Recorder()
    batcher = make_batcher(compute)

    with pytest.raises(DeadlineExceeded, match="after its deadline"):
        batcher.submit(rows(0, 2), deadline=time.monotonic() - 0.001)
    assert compute.batches == []


def test_predict_timeout_raises_deadline_exceeded_and_its_rows_are_never_computed(make_batcher):
    compute = Recorder(hold_first=True)
    batcher = make_batcher(compute, batch_timeout_ms=0)
    hold_worker(batcher, compute)

    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="within its 30 ms timeout"):
        batcher.predict(rows(0, 2), timeout_ms=30)
    assert time.monotonic() - started < 1.0
    compute.gate.set()
    batcher.close()

    assert not {0, 1} & set(compute.rows_seen.tolist())
    stats = batcher.stats()
    assert stats.timeouts == 1 and stats.rows_dropped == 2
    assert_counters_add_up(stats)


def test_cancelled_future_is_not_computed(make_batcher):
    compute = Recorder(hold_first=True)
    batcher = make_batcher(compute, batch_timeout_ms=0)
    hold_worker(batcher, compute)
    future = batcher.submit(rows(0, 2))

    assert future.cancel()
    compute.gate.set()
    batcher.close()

    assert not {0, 1} & set(compute.rows_seen.tolist())
    assert batcher.stats().cancelled == 1


# ---- errors --------------------------------------------------------------------------------------


def test_compute_error_fails_only_the_poison_request_and_the_batcher_keeps_running(make_batcher):
    compute = Recorder(hold_first=True, fail_on=-1)
    batcher = make_batcher(compute, batch_timeout_ms=0, max_batch_size=4)
    held = hold_worker(batcher, compute)
    bad_inputs = rows(0, 2)
    bad_inputs["ids"][1, 0] = -1
    bad = batcher.submit(bad_inputs)
    neighbour = batcher.submit(rows(10, 2))  # same batch as `bad`: fills it to 4
    next_batch = batcher.submit(rows(20, 2))
    compute.gate.set()

    np.testing.assert_array_equal(held.result(WAIT_S), expected(10_000, 1))
    with pytest.raises(ValueError, match="bad row -1"):
        bad.result(WAIT_S)
    np.testing.assert_array_equal(neighbour.result(WAIT_S), expected(10, 2))  # re-run on its own
    np.testing.assert_array_equal(next_batch.result(WAIT_S), expected(20, 2))
    np.testing.assert_array_equal(batcher.predict(rows(30, 3)), expected(30, 3))
    stats = batcher.stats()
    assert (stats.errors, stats.compute_errors) == (1, 2)


def test_compute_returning_the_wrong_number_of_rows_fails_that_batch(make_batcher):
    batcher = make_batcher(lambda inputs: np.zeros(1), batch_timeout_ms=0)

    with pytest.raises(CtrflowError, match="returned shape \\(1,\\) for a batch of 3 rows"):
        batcher.predict(rows(0, 3))


def test_inputs_that_do_not_match_the_first_request_are_refused_before_queueing(make_batcher):
    compute = Recorder()
    batcher = make_batcher(compute, batch_timeout_ms=0)
    batcher.predict(rows(0, 2))

    wrong_dtype = rows(0, 2)
    wrong_dtype["numeric"] = wrong_dtype["numeric"].astype(np.float64)
    with pytest.raises(SchemaError, match="'numeric' .* must be a float32 array .* Got float64"):
        batcher.submit(wrong_dtype)
    ragged = rows(0, 2)
    ragged["numeric"] = np.zeros((3, 2), np.float32)
    with pytest.raises(SchemaError, match="share their first dimension"):
        batcher.submit(ragged)
    with pytest.raises(SchemaError, match="keys \\['ids', 'numeric'\\]"):
        batcher.submit({"ids": rows(0, 2)["ids"]})
    assert len(compute.batches) == 1


# ---- asyncio -------------------------------------------------------------------------------------


def test_apredict_serves_many_concurrent_coroutines(make_batcher):
    compute = Recorder()
    batcher = make_batcher(compute, batch_timeout_ms=2, max_batch_size=64)

    async def main() -> list[np.ndarray]:
        calls = (batcher.apredict(rows(100 * k, 5), timeout_ms=WAIT_S * 1000) for k in range(50))
        return await asyncio.gather(*calls)

    results = asyncio.run(main())

    for k, scores in enumerate(results):
        np.testing.assert_array_equal(scores, expected(100 * k, 5))
    assert len(compute.batches) < 50


def test_apredict_callers_on_two_event_loops_sharing_batches_each_get_their_rows(make_batcher):
    """One batch's asyncio callers are woken together, per loop: callers of two loops (two threads)
    that share batches each get their own rows, a zero-row call answers at once, a poison one fails alone."""
    compute = Recorder(fail_on=7_777)
    batcher = make_batcher(compute, batch_timeout_ms=20, max_batch_size=4096)
    out: dict[int, object] = {}

    async def loop_main(base: int) -> None:
        calls = [batcher.apredict(rows(base + 100 * k, 3), timeout_ms=WAIT_S * 1000) for k in range(10)]
        calls.append(batcher.apredict(rows(base, 0), timeout_ms=WAIT_S * 1000))
        if base == 0:
            calls.append(batcher.apredict(rows(7_777, 2), timeout_ms=WAIT_S * 1000))
        for k, result in enumerate(await asyncio.gather(*calls, return_exceptions=True)):
            out[base + k] = result

    threads = [threading.Thread(target=asyncio.run, args=(loop_main(base),)) for base in (0, 50_000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 2)
    for base in (0, 50_000):
        for k in range(10):
            np.testing.assert_array_equal(out[base + k], expected(base + 100 * k, 3))
        assert out[base + 10].shape == (0,)
    assert isinstance(out[11], Exception) and "bad row" in str(out[11])


def test_apredict_timeout_raises_deadline_exceeded(make_batcher):
    compute = Recorder(hold_first=True)
    batcher = make_batcher(compute, batch_timeout_ms=0)
    hold_worker(batcher, compute)

    async def main() -> None:
        with pytest.raises(DeadlineExceeded):
            await batcher.apredict(rows(0, 2), timeout_ms=20)

    asyncio.run(main())
    compute.gate.set()
    batcher.close()
    assert batcher.stats().timeouts == 1
    assert not {0, 1} & set(compute.rows_seen.tolist())


# ---- closing -------------------------------------------------------------------------------------


def test_close_with_drain_computes_pending_requests_at_once_then_refuses_new_ones(make_batcher):
    compute = Recorder()
    batcher = make_batcher(compute, batch_timeout_ms=60_000, max_batch_size=100)
    pending = [batcher.submit(rows(10 * k, 3)) for k in range(5)]  # would wait a minute for the timeout

    started = time.monotonic()
    batcher.close()

    assert time.monotonic() - started < 1.0
    for k, future in enumerate(pending):
        np.testing.assert_array_equal(future.result(0), expected(10 * k, 3))
    assert len(compute.batches) == 1
    with pytest.raises(CtrflowError, match="is closed"):
        batcher.submit(rows(0, 1))
    assert_counters_add_up(batcher.stats())


def test_close_without_drain_fails_pending_requests_and_lets_the_running_batch_finish(make_batcher):
    compute = Recorder(hold_first=True)
    batcher = make_batcher(compute, batch_timeout_ms=0)
    held = hold_worker(batcher, compute)
    pending = [batcher.submit(rows(10 * k, 3)) for k in range(3)]

    closer = threading.Thread(target=batcher.close, kwargs={"drain": False})
    closer.start()
    for future in pending:  # failed at once, while compute is still held
        with pytest.raises(CtrflowError, match="was closed before this request was computed"):
            future.result(WAIT_S)
    compute.gate.set()
    closer.join(WAIT_S)

    assert not closer.is_alive()
    np.testing.assert_array_equal(held.result(0), expected(10_000, 1))
    assert len(compute.batches) == 1
    assert_counters_add_up(batcher.stats())


def test_context_manager_closes_and_joins_threads():
    compute = Recorder()
    with AutoBatcher(compute, BatchingOptions(batch_timeout_ms=0)) as batcher:
        np.testing.assert_array_equal(batcher.predict(rows(0, 2)), expected(0, 2))
    threads = [t for t in threading.enumerate() if t.name.startswith("ctrflow-batcher-default")]
    assert not threads
    with pytest.raises(CtrflowError, match="is closed"):
        batcher.submit(rows(0, 1))


# ---- options and counters ------------------------------------------------------------------------


INT_MESSAGE = "The '{}' parameter of BatchingOptions must be an int >= 1. Got {} instead."
TIMEOUT_MESSAGE = (
    "The 'batch_timeout_ms' parameter of BatchingOptions must be a number >= 0. Got {} instead."
)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_batch_size": 0}, INT_MESSAGE.format("max_batch_size", 0)),
        ({"max_batch_size": 2.5}, INT_MESSAGE.format("max_batch_size", 2.5)),
        ({"max_batch_size": True}, INT_MESSAGE.format("max_batch_size", True)),
        ({"batch_timeout_ms": -1}, TIMEOUT_MESSAGE.format(-1)),
        ({"batch_timeout_ms": float("inf")}, TIMEOUT_MESSAGE.format("inf")),
        ({"batch_timeout_ms": "2"}, TIMEOUT_MESSAGE.format("'2'")),
        ({"num_batch_threads": 0}, INT_MESSAGE.format("num_batch_threads", 0)),
        ({"max_enqueued": 0}, INT_MESSAGE.format("max_enqueued", 0)),
        (
            {"max_batch_size": 64, "max_enqueued": 32},
            "The 'max_enqueued' parameter of BatchingOptions must be >= max_batch_size (64) so that one full "
            "batch fits in the queue. Got 32 instead.",
        ),
    ],
)
def test_invalid_options_are_rejected_with_the_value_received(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        BatchingOptions(**options)


def test_autobatcher_rejects_a_compute_that_is_not_callable():
    message = "The 'compute' parameter of AutoBatcher must be callable. Got 3 instead."
    with pytest.raises(ConfigError, match=re.escape(message)):
        AutoBatcher(3)  # type: ignore[arg-type]


def test_counters_add_up_after_a_mixed_workload(make_batcher):
    compute = Recorder(fail_on=-1)
    batcher = make_batcher(compute, batch_timeout_ms=1, max_batch_size=32, num_batch_threads=2)
    sizes = [1 + (k * 7) % 50 for k in range(60)]
    futures = [batcher.submit(rows(1000 * k, n)) for k, n in enumerate(sizes)]
    for future in futures:
        future.result(WAIT_S)
    batcher.close()

    stats = batcher.stats()
    assert stats.requests == stats.completed == 60
    assert stats.predictions == stats.rows_submitted == sum(sizes)
    assert sum(len(b) for b in compute.batches) == stats.predictions
    assert stats.compute_calls == len(compute.batches)
    assert stats.queue_wait_count >= 60 and stats.queue_wait_ms_max >= stats.mean_queue_wait_ms >= 0
    assert_counters_add_up(stats)
    histogram = stats.to_dict()["batch_size_histogram"]
    assert list(histogram) == ["<=1", "<=2", "<=4", "<=8", "<=16", "<=32"]
    assert sum(histogram.values()) == stats.compute_calls
