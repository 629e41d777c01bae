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

The first two are also asked at the door (`door_for`): the HTTP transport asks once a request's head is
read, before its body is buffered and decoded, so under overload a refusal costs parsing a head, not
a request (the body is still read and dropped: the connection stays usable, framing intact). A request
the door lets in carries the door's lease of the model version and its deadline to the route (`DoorPass`):
one lease per request, taken at the head and returned once, by the route or by the transport if the
request never reaches one (a body that times out, is too large, or a client gone before it is answered).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from ctrflow.errors import CtrflowError, DeadlineExceeded, QueueFullError

__all__ = ["DoorPass", "admit", "batcher_for", "door_for", "left_ms"]

# The verbs asked at the door, and the signature whose batcher answers them. Context bodies and JSON
# `:predict` (which may name any signature) are left to their routes.
_DOOR_VERBS = {"predict_columnar": ("serving_default", "columnar"), "predict_ids": ("predict_ids", "ids")}
_CONTEXT_TYPE = b"application/x-ctrflow-context"


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


class DoorPass:
    """What the door learnt of a request it let in: the model version it leased for it and its deadline.

    Exactly one owner returns the lease: the route that takes it (`take`, then its own release), else
    whoever drops the request (`release`: idempotent, so a request dropped twice returns it once). The
    version stays open while its request is read and queued, as it does while the request is computed
    (a retired version closes after its last lease, or after `drain_grace_s`)."""

    __slots__ = ("_manager", "_loaded", "name", "deadline", "budget_ms")

    def __init__(self, manager: Any, loaded: Any, name: str, deadline: float, budget_ms: float) -> None:
        self._manager = manager
        self._loaded = loaded
        self.name = name  # the model leased (newest version: the path named no version or label)
        self.deadline = deadline  # time.monotonic() deadline: arrival + budget_ms
        self.budget_ms = budget_ms  # X-Deadline-Ms, else the server's default_timeout_ms

    def take(self, name: str) -> Any:
        """The leased `ServedVersion` of `name`, now the caller's to release; None if it is not that
        model's, was taken or released already, or was retired while the request was read or queued (the
        lease is returned and the route leases the version served now: a retired version may be closed
        after `drain_grace_s` even with this lease out, and a removed model is then the route's 404)."""
        loaded = self._loaded
        if loaded is None or name != self.name:
            return None
        self._loaded = None
        if loaded.retired:
            self._manager.release(loaded)
            return None
        return loaded

    def release(self) -> None:
        """Return the lease unless it was taken or returned already."""
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            self._manager.release(loaded)


Door = Callable[[str, list[tuple[bytes, bytes]], float], "tuple[int, str] | DoorPass | None"]


def door_for(routes: Any) -> Door | None:
    """`door(path, headers, arrived) -> (status, message) | DoorPass | None` for the REST routes
    `routes`: the load refusal (503/504) `admit` would give, decided from its head alone; else the
    request is let in, with its lease and deadline (`DoorPass`, for the route to take) or without (None:
    the door did not decide; the route leases itself). A request the route would answer 400/415 may get
    the 503 instead under overload.

    It asks the batcher about one row without the partial batch's timeout (`admit(lower_bound=True)`),
    less than any request can cost, so it never refuses what `admit` would accept once the rows are
    known (a full batch skips that wait): it only turns away what no request could make (a queue or a
    loop already past the budget, or a deadline already passed). Anything it cannot tell from the head
    (an unknown model, a version or label in the path, a rollout, a bad X-Deadline-Ms) is let in, for
    the route to answer as it always has."""
    manager = getattr(routes, "manager", None)
    if manager is None:
        return None

    def door(path: str, headers: list[tuple[bytes, bytes]], arrived: float) -> tuple[int, str] | DoorPass | None:
        if not path.startswith("/v1/models/"):
            return None
        name, _, verb = path[11:].rpartition(":")
        entry = _DOOR_VERBS.get(verb)
        if entry is None or not name or "/" in name:
            return None
        signature, protocol = entry
        budget_ms = getattr(routes, "default_timeout_ms", None)
        for key, value in headers:
            if key == b"x-deadline-ms":
                try:
                    budget_ms = float(value)
                except ValueError:
                    return None
            elif key == b"content-type":
                media = value.lower()
                if b"context" in media and media.split(b";")[0].strip() == _CONTEXT_TYPE:
                    return None
        if budget_ms is None or not math.isfinite(budget_ms) or budget_ms <= 0:
            return None
        try:
            if manager.rollouts.get(name) is not None:
                return None
            loaded = manager.acquire(name)
        except (CtrflowError, LookupError):
            return None
        deadline = arrived + budget_ms / 1e3
        try:
            batcher = batcher_for(loaded.predictor, signature)
            left_ms(deadline, budget_ms)
            if batcher is not None and hasattr(batcher, "admit"):
                batcher.admit(1, deadline=deadline, lower_bound=True)
        except DeadlineExceeded as e:
            refusal = 504, str(e)
        except QueueFullError as e:
            refusal = 503, str(e)
        except BaseException:
            manager.release(loaded)
            raise
        else:
            return DoorPass(manager, loaded, name, deadline, budget_ms)
        manager.release(loaded)
        metrics = getattr(routes, "metrics", None)
        if metrics is not None:  # counted with the routes' answers (ctrflow_requests_total by code)
            metrics.observe(name, protocol, refusal[0], max(0.0, time.monotonic() - arrived), 0)
        return refusal

    return door
