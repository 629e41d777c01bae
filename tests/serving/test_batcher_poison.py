"""A poison request fails only itself: a failed batch is re-run request by request (issue 11, item 6)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from ctrflow.serving.batcher import AutoBatcher, BatchingOptions

WAIT_S = 5.0
POISON = -1


class Compute:
    """Scores 2 * ids[:, 0]; raises if a row's id is POISON; the first call waits for the test's gate."""

    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []
        self.started, self.gate = threading.Event(), threading.Event()
        self._lock = threading.Lock()

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        ids = inputs["ids"][:, 0]
        with self._lock:
            first = not self.calls
            self.calls.append(ids.copy())
        self.started.set()
        if first:
            assert self.gate.wait(WAIT_S)
        bad = np.flatnonzero(ids == POISON)
        if bad.size:
            raise ValueError(f"poison row at batch position {int(bad[0])}")
        return ids.astype(np.float64) * 2.0


def rows(first: int, n: int, poison_at: int | None = None) -> dict[str, np.ndarray]:
    ids = np.zeros((n, 2), np.int32)
    ids[:, 0] = np.arange(first, first + n)
    if poison_at is not None:
        ids[poison_at, 0] = POISON
    return {"ids": ids, "numeric": np.zeros((n, 1), np.float32)}


@pytest.fixture
def batcher_and_compute():
    compute = Compute()
    batcher = AutoBatcher(compute, BatchingOptions(max_batch_size=8, batch_timeout_ms=0), name="poison")
    held = batcher.submit(rows(1000, 1))  # occupies the batch thread so the next requests share a batch
    assert compute.started.wait(WAIT_S)
    yield batcher, compute, held
    compute.gate.set()
    batcher.close(drain=False)


def test_good_requests_in_a_poisoned_batch_succeed_and_the_poison_fails_alone(batcher_and_compute):
    batcher, compute, held = batcher_and_compute
    good_a = batcher.submit(rows(10, 3))
    bad = batcher.submit(rows(20, 2, poison_at=1))
    good_b = batcher.submit(rows(30, 3))  # 3 + 2 + 3 = 8 rows: one full batch
    compute.gate.set()

    np.testing.assert_array_equal(held.result(WAIT_S), [2000.0])
    np.testing.assert_array_equal(good_a.result(WAIT_S), [20.0, 22.0, 24.0])
    np.testing.assert_array_equal(good_b.result(WAIT_S), [60.0, 62.0, 64.0])
    with pytest.raises(ValueError, match="poison row at batch position 1$"):  # its own error, alone
        bad.result(WAIT_S)
    # The shared call failed, then each request was computed on its own.
    assert [c.tolist() for c in compute.calls[1:]] == [[10, 11, 12, 20, -1, 30, 31, 32], [10, 11, 12], [20, -1], [30, 31, 32]]
    stats = batcher.stats()
    assert (stats.completed, stats.errors, stats.compute_calls, stats.compute_errors) == (3, 1, 5, 2)
    assert stats.predictions == 7 and stats.rows_dropped == 2
    assert stats.rows_submitted == stats.predictions + stats.rows_dropped
    assert sum(stats.batch_size_counts) == stats.compute_calls
    np.testing.assert_array_equal(batcher.predict(rows(40, 2)), [80.0, 82.0])  # the batcher goes on


def test_a_lone_failing_request_is_not_re_run(batcher_and_compute):
    batcher, compute, held = batcher_and_compute
    bad = batcher.submit(rows(0, 3, poison_at=0))
    compute.gate.set()
    held.result(WAIT_S)
    with pytest.raises(ValueError, match="position 0"):
        bad.result(WAIT_S)
    assert len(compute.calls) == 2  # held + one failed call, no re-run of a batch of one request
    assert batcher.stats().compute_errors == 1


def test_a_request_split_across_batches_is_re_run_piece_by_piece(batcher_and_compute):
    batcher, compute, held = batcher_and_compute
    big = batcher.submit(rows(100, 12))  # 8 rows in the first batch, 4 spill into the next
    bad = batcher.submit(rows(200, 2, poison_at=0))  # shares the second batch with big's tail
    compute.gate.set()
    held.result(WAIT_S)
    np.testing.assert_array_equal(big.result(WAIT_S), np.arange(100, 112) * 2.0)
    with pytest.raises(ValueError, match="poison"):
        bad.result(WAIT_S)
    stats = batcher.stats()
    assert stats.completed == 2 and stats.errors == 1
    assert stats.rows_submitted == stats.predictions + stats.rows_dropped
