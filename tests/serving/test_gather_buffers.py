"""Merged batches are gathered into 64-byte-aligned buffers (so TensorFlow can share them without a copy),
reused per batch thread with `reuse_buffers=True`; every caller still gets its own rows' scores."""
from __future__ import annotations

import threading
from concurrent.futures import wait

import numpy as np
import pytest

from ctrflow.serving.batcher import AutoBatcher, BatchingOptions


@pytest.mark.parametrize("reuse", [False, True])
def test_merged_batches_are_aligned_and_each_caller_gets_its_rows(reuse):
    seen: list[tuple[int, int, bool]] = []  # (rows, data address, aligned) of each compute call
    gate = threading.Event()

    def compute(inputs):
        gate.wait(5)
        ids = inputs["ids"]
        seen.append((len(ids), ids.ctypes.data, ids.ctypes.data % 64 == 0 and inputs["numeric"].ctypes.data % 64 == 0))
        return ids[:, :1].astype(np.float32) + inputs["numeric"][:, :1]  # a copy: nothing of the inputs is kept

    opts = BatchingOptions(max_batch_size=64, batch_timeout_ms=1.0)
    with AutoBatcher(compute, opts, reuse_buffers=reuse) as batcher:
        futures, expected = [], []
        for round_ in range(3):
            gate.clear()
            for i in range(12):  # 12 requests of 5-7 rows: several merged batches per round
                rows = 5 + i % 3
                base = 1000 * round_ + 10 * i
                ids = np.arange(base, base + rows, dtype=np.int32)[:, None].repeat(3, axis=1)
                numeric = np.full((rows, 2), 0.5, np.float32)
                futures.append(batcher.submit({"ids": ids, "numeric": numeric}))
                expected.append(ids[:, 0] + 0.5)
            gate.set()
            wait(futures[-12:], timeout=10)
        for future, want in zip(futures, expected):
            np.testing.assert_array_equal(future.result(timeout=10)[:, 0], want)
    merged = [s for s in seen if s[0] > 7]
    assert merged and all(aligned for _, _, aligned in merged)
    if reuse:  # one thread, one buffer: every merged batch starts at the same address
        assert len({address for _, address, _ in merged}) == 1
