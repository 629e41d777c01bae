"""The HTTP door's lower bound never refuses what admission of the real request size accepts."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from ctrflow.errors import QueueFullError
from ctrflow.serving.batcher import AutoBatcher, BatchingOptions


class _GatedCompute:
    def __init__(self, seconds: float) -> None:
        self.seconds, self.gate = seconds, threading.Event()
        self.gate.set()

    def __call__(self, inputs):
        self.gate.wait(30)
        time.sleep(self.seconds)
        return np.zeros(len(inputs["x"]), np.float32)


def test_door_lower_bound_is_not_stricter_than_a_batch_filling_request():
    """A long batch timeout makes a 1-row request wait for it, a request that fills the batch does not:
    the door (size unknown) must not refuse on the 1-row figure what a full-batch request would make."""
    compute = _GatedCompute(0.002)
    options = BatchingOptions(max_batch_size=64, batch_timeout_ms=50, num_batch_threads=1)
    with AutoBatcher(compute, options) as batcher:
        for i in range(6):  # teach the cost model
            batcher.predict({"x": np.full(64, i, np.float32)})
        compute.gate.clear()
        held = batcher.submit({"x": np.zeros(64, np.float32)})  # the only thread is busy
        time.sleep(0.05)
        deadline = time.monotonic() + 0.04
        with pytest.raises(QueueFullError):
            batcher.admit(1, deadline=deadline)  # one row waits for the 50 ms timeout
        batcher.admit(64, deadline=deadline)  # a full batch is computed at once
        batcher.admit(1, deadline=deadline, lower_bound=True)  # the door: never stricter than that
        compute.gate.set()
        held.result(30)
