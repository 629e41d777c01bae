"""How an error raised while answering maps to an HTTP status and a gRPC code — written once for both fronts.

The order matters: the most specific type first; any other `CtrflowError` (e.g. a batcher closed under a
request) is retryable ("unavailable"); anything else is a bug, answered 500 / INTERNAL without details.

Overload is `QueueFullError`: a full queue, or a request the queue cannot answer within its deadline
(shed at once). It is 503 (the REST routes add `Retry-After`) and UNAVAILABLE, as TF Serving's batch
scheduler answers a full queue: retryable, on this replica or another; RESOURCE_EXHAUSTED would say
"out of quota" and well-behaved gRPC clients do not retry it. A poison input (`PoisonInput`, a
`SchemaError`) is 400 / INVALID_ARGUMENT: it would fail every batch it joined.
"""
from __future__ import annotations

from ctrflow.errors import ConfigError, CtrflowError, DeadlineExceeded, ModelNotFoundError, QueueFullError, SchemaError
from ctrflow.serving.models import ModelNotReadyError

__all__ = ["classify"]

_TABLE: tuple[tuple[tuple[type[BaseException], ...], int, str], ...] = (
    ((ModelNotFoundError,), 404, "NOT_FOUND"),
    ((ModelNotReadyError, QueueFullError), 503, "UNAVAILABLE"),
    ((DeadlineExceeded,), 504, "DEADLINE_EXCEEDED"),
    ((SchemaError, ConfigError), 400, "INVALID_ARGUMENT"),
    ((CtrflowError,), 503, "UNAVAILABLE"),
)


def classify(error: BaseException) -> tuple[int, str]:
    """(HTTP status, gRPC status code name) for `error`; (500, "INTERNAL") for an unexpected one."""
    for types, http, grpc_code in _TABLE:
        if isinstance(error, types):
            return http, grpc_code
    return 500, "INTERNAL"
