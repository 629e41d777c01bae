"""The batcher's screen: inputs that would fail a batch are found per batch on the batch thread, and only
their own request fails (the ids path's range check moved there off the event loop)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from ctrflow.errors import SchemaError
from ctrflow.serving.batcher import AutoBatcher, BatchingOptions

WAIT_S = 5.0


def rows(first: int, n: int, bad_at: int | None = None) -> dict[str, np.ndarray]:
    ids = np.arange(first, first + n, dtype=np.int32)[:, None]
    if bad_at is not None:
        ids = ids.copy()
        ids[bad_at, 0] = -1
    return {"ids": ids}


def test_a_screened_request_fails_alone_and_its_batch_mates_share_one_call():
    calls: list[np.ndarray] = []
    screened: list[int] = []
    started, gate = threading.Event(), threading.Event()

    def compute(inputs: dict[str, np.ndarray]) -> np.ndarray:
        ids = inputs["ids"][:, 0]
        calls.append(ids.copy())
        started.set()
        if len(calls) == 1:
            assert gate.wait(WAIT_S)
        assert (ids >= 0).all(), "a screened row reached compute"
        return ids.astype(np.float64) * 2.0

    def screen(inputs: dict[str, np.ndarray]) -> Exception | None:
        ids = inputs["ids"]
        screened.append(len(ids))
        bad = np.flatnonzero(ids[:, 0] < 0)
        return SchemaError(f"row {int(bad[0])} is negative") if bad.size else None

    batcher = AutoBatcher(compute, BatchingOptions(max_batch_size=8, batch_timeout_ms=0), name="screen", screen=screen)
    try:
        held = batcher.submit(rows(1000, 1))  # holds the batch thread, so the next three share one batch
        assert started.wait(WAIT_S)
        good_a, bad, good_b = batcher.submit(rows(10, 3)), batcher.submit(rows(20, 2, bad_at=1)), batcher.submit(rows(30, 3))
        gate.set()
        np.testing.assert_array_equal(good_a.result(WAIT_S), [20, 22, 24])
        np.testing.assert_array_equal(good_b.result(WAIT_S), [60, 62, 64])
        with pytest.raises(SchemaError, match="row 1 is negative"):  # its own row number, not the batch's
            bad.result(WAIT_S)
        held.result(WAIT_S)
    finally:
        batcher.close()
    # one call for the held request, one for both good ones together: no per-request re-runs of compute
    assert [c.tolist() for c in calls] == [[1000], [10, 11, 12, 30, 31, 32]]
    assert screened == [1, 8, 3, 2, 3]  # each batch, then each request of the one that held a bad row
    stats = batcher.stats()
    assert (stats.requests, stats.completed, stats.errors, stats.invalid, stats.compute_calls) == (4, 3, 1, 1, 2)
    assert stats.rows_submitted == stats.predictions + stats.rows_dropped and stats.rows_dropped == 2
