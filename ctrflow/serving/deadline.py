"""A request's deadline on the serving path: counted from its first byte, checked before every costly step.

The front ends turn a request's budget (REST `X-Deadline-Ms`, gRPC's own deadline, else the server's
`default_timeout_ms`) into an absolute `time.monotonic()` deadline counted from when the request
arrived (REST: its first byte, stamped by the HTTP protocol; gRPC: the handler's entry), so reading,
parsing and waiting for the event loop are spent from the budget rather than added to it. Then:

- already past it → `DeadlineExceeded` (504 / DEADLINE_EXCEEDED) before any work (`left_ms`);
- the batcher's queue cannot meet it → `QueueFullError` (503 + Retry-After / UNAVAILABLE) at once,
  before the features are prepared (`admit`, see `AutoBatcher.admit`). "Cannot meet" covers the whole
  remaining path: the cost model's queue wait + compute, plus what admitted requests recently waited
  beyond that estimate (mostly the answer's way back through a busy event loop, learnt per request);
- it passes while queued → the rows are dropped when their batch forms, never computed (the batcher).
"""
from __future__ import annotations

import time
from typing import Any

from ctrflow.errors import DeadlineExceeded

__all__ = ["admit", "batcher_for", "left_ms"]


def left_ms(deadline: float | None, budget_ms: float | None = None) -> float | None:
    """Milliseconds left until `deadline` (None: no deadline); DeadlineExceeded when none are."""
    if deadline is None:
        return None
    left = (deadline - time.monotonic()) * 1e3
    if left <= 0.0:
        said = f"its deadline of {budget_ms:g} ms" if budget_ms is not None else "its deadline"
        raise DeadlineExceeded(f"The request passed {said} ({-left:.1f} ms ago, counted from its arrival) "
                               "before it could be computed; not computed. Allow more time or add capacity.")
    return left


def batcher_for(predictor: Any, signature: str = "serving_default") -> Any:
    """The batcher a signature's calls queue in (None: that signature's calls are not batched)."""
    if signature == "serving_default":
        return getattr(predictor, "batcher", None)
    if signature == "predict_ids":
        return getattr(predictor, "ids_batcher", None)
    if signature == "serving_context":
        return getattr(getattr(predictor, "context", None), "batcher", None)
    return None


def admit(predictor: Any, rows: int, deadline: float | None, signature: str = "serving_default") -> float | None:
    """Refuse at once what the batcher of `signature` cannot answer in time (before preparing features);
    returns the ms left of the request's budget, for the call that scores it."""
    left_ms(deadline)
    batcher = batcher_for(predictor, signature)
    if batcher is not None and hasattr(batcher, "admit"):
        batcher.admit(rows, deadline=deadline)
    return left_ms(deadline)
