"""What moved off the event loop's per-request path still behaves: the batcher's screen (ids ranges, checked
per batch on the batch thread) fails only its own request, apredict's shared deadline timer wakes each
caller at its own deadline, and the metrics' per-thread tallies count every request."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from ctrflow.errors import DeadlineExceeded, SchemaError
from ctrflow.serving.batcher import AutoBatcher, BatchingOptions
from ctrflow.serving.metrics import ServingMetrics, parse_metrics

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


def test_apredict_callers_expire_each_at_its_own_deadline_and_answered_ones_never_do():
    gate, started = threading.Event(), threading.Event()

    def compute(inputs: dict[str, np.ndarray]) -> np.ndarray:
        started.set()
        if inputs["ids"][0, 0] == 1000:  # the held call: the others queue behind it
            assert gate.wait(WAIT_S)
        return inputs["ids"][:, 0].astype(np.float64)

    batcher = AutoBatcher(compute, BatchingOptions(max_batch_size=8, batch_timeout_ms=0), name="expiry")
    woke: dict[str, float] = {}

    async def call(label: str, first: int, timeout_ms: float) -> None:
        began = time.monotonic()
        try:
            await batcher.apredict(rows(first, 1), timeout_ms=timeout_ms)
            woke[label] = -(time.monotonic() - began)  # answered: negative
        except DeadlineExceeded:
            woke[label] = time.monotonic() - began

    async def main() -> None:
        answered = asyncio.ensure_future(call("answered", 7, 60_000))  # the earliest entry, then answered
        await asyncio.sleep(0.05)
        held = batcher.submit(rows(1000, 1))
        assert started.wait(WAIT_S)
        await asyncio.gather(answered, call("late", 20, 150), call("soon", 10, 40), call("later", 30, 300))
        gate.set()
        held.result(WAIT_S)

    try:
        asyncio.run(main())
    finally:
        gate.set()
        batcher.close()
    assert woke["answered"] < 0
    assert 0.04 <= woke["soon"] < woke["late"] < woke["later"] < 5.0  # never before its own deadline
    assert woke["late"] >= 0.15 and woke["later"] >= 0.3
    assert not batcher._expiries  # no deadline held: nothing kept for the loop


@pytest.mark.parametrize("failing", [False, True], ids=["scored", "failed"])
def test_answered_callers_with_long_deadlines_are_not_held_until_their_deadline(failing):
    def compute(inputs: dict[str, np.ndarray]) -> np.ndarray:
        if failing:  # answered with an error: held no longer than a scored one
            raise ValueError("this model fails every call")
        return inputs["ids"][:, 0].astype(np.float64)

    batcher = AutoBatcher(compute, BatchingOptions(max_batch_size=64, batch_timeout_ms=0), name="held")
    sizes: list[int] = []

    async def main() -> None:
        for start in range(0, 3000, 100):  # 3,000 answered callers, each with an hour to spare
            await asyncio.gather(*(batcher.apredict(rows(i, 1), timeout_ms=3_600_000) for i in range(start, start + 100)),
                                 return_exceptions=True)
            expiries = batcher._expiries.get(asyncio.get_running_loop())
            sizes.append(len(expiries._heap) if expiries is not None else 0)

    try:
        asyncio.run(main())
    finally:
        batcher.close()
    assert max(sizes) <= 2 * 256 + 100, sizes  # compacted: about the callers still waiting, not all 3,000


def test_the_metrics_tally_counts_every_request_from_several_threads():
    metrics = ServingMetrics()
    n, threads = 5_000, 4

    def observe(k: int) -> None:
        for i in range(n):
            metrics.observe("m", "ids", 200 if i % 5 else "503", 0.0004 * (i % 3), 100 if i % 5 else 0)

    workers = [threading.Thread(target=observe, args=(k,)) for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(30)
    samples = parse_metrics(metrics.render().decode())
    ok, shed = threads * n * 4 // 5, threads * n // 5
    assert samples['ctrflow_requests_total{code="200",model="m",protocol="ids"}'] == ok
    assert samples['ctrflow_requests_total{code="503",model="m",protocol="ids"}'] == shed
    assert samples['ctrflow_predictions_total{model="m"}'] == ok * 100
    assert samples['ctrflow_request_duration_seconds_count{model="m",protocol="ids"}'] == ok + shed
    # i % 3 == 0 -> 0 s, 1 -> 0.4 ms (<= 0.5 ms), 2 -> 0.8 ms (<= 1 ms); the buckets are cumulative
    zero = sum(1 for i in range(n) if i % 3 == 0) * threads
    assert samples['ctrflow_request_duration_seconds_bucket{le="0.00025",model="m",protocol="ids"}'] == zero
    assert samples['ctrflow_request_duration_seconds_bucket{le="0.001",model="m",protocol="ids"}'] == ok + shed
    assert metrics.requests("m") == {("m", "ids", "200"): ok, ("m", "ids", "503"): shed}
