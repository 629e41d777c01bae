"""The one exception tree of ctrflow: every error a user can act on derives from `CtrflowError`.

Lower-layer errors (TensorFlow, I/O, parsing) are mapped to these types at the edge of each layer, so
callers catch one family and every message says what went wrong and where (file, line, field, request).
"""
from __future__ import annotations

__all__ = [
    "CtrflowError",
    "SchemaError",
    "InputError",
    "TooManyRejectsError",
    "ShardCorruptError",
    "ConfigError",
    "InsufficientMemoryError",
    "TrainingError",
    "CheckpointError",
    "DeadlineExceeded",
    "QueueFullError",
    "ModelNotFoundError",
]


class CtrflowError(Exception):
    """Base of every error ctrflow raises on purpose."""


class ConfigError(CtrflowError, ValueError):
    """A setting was out of range or settings conflict; the message names the value received."""


class InsufficientMemoryError(ConfigError):
    """The training state a config asks for would not fit in the memory available; nothing was allocated."""


class SchemaError(CtrflowError, ValueError):
    """A schema is unknown, malformed, or does not match the data it is applied to."""


class InputError(CtrflowError):
    """Raw input cannot be read at all (empty file, truncated gzip, unsupported format)."""


class TooManyRejectsError(InputError):
    """More malformed rows than `--max-errors` allows; the rejects file says which and why."""


class ShardCorruptError(CtrflowError):
    """A binary shard or stream is damaged: bad magic, checksum mismatch, truncated record."""


class TrainingError(CtrflowError):
    """Training cannot go on (NaN loss, mismatched warm start); the last good checkpoint is kept."""


class CheckpointError(TrainingError):
    """A checkpoint's files are missing, truncated or unreadable (a file deleted or cut short on disk); the
    message names the checkpoint and the file. Nothing was restored from it."""


class DeadlineExceeded(CtrflowError, TimeoutError):
    """A request's deadline passed before it could be computed; it was dropped, not computed late."""


class QueueFullError(CtrflowError):
    """The batcher's queue is full: the request was rejected at once. Retryable ("unavailable")."""


class ModelNotFoundError(CtrflowError, LookupError):
    """No such model or version is being served."""
