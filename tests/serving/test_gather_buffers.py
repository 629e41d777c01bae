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


def test_string_columns_merge_at_their_widths_and_one_wide_request_goes_as_objects():
    """'S' columns of different widths merge without cutting a value; when one request's width would pad
    the whole merged column past the limit, the column goes as objects instead (values unchanged)."""
    from ctrflow.serving import batcher as batcher_module

    seen: list[np.dtype] = []
    gate = threading.Event()

    def compute(inputs):
        gate.wait(5)
        seen.append(inputs["s"].dtype)
        return np.array([[len(v)] for v in inputs["s"].tolist()], np.float32)

    with AutoBatcher(compute, BatchingOptions(max_batch_size=10_000, batch_timeout_ms=50.0)) as batcher:
        for wide_width in (9, batcher_module._PAD_LIMIT // 1000 + 100):  # 1,000 merged rows
            gate.clear()
            columns = [np.array([b"ab"] * 500, dtype="S2"), np.array([b"x" * wide_width] + [b"c"] * 499, dtype=f"S{wide_width}")]
            futures = [batcher.submit({"s": c}) for c in columns]
            gate.set()
            wait(futures, timeout=10)
            assert futures[0].result()[:, 0].tolist() == [2.0] * 500
            assert futures[1].result()[:, 0].tolist() == [float(wide_width)] + [1.0] * 499
    merged = [d for d in seen]
    assert merged[0] == np.dtype("S9") and merged[-1] == np.dtype(object), merged
