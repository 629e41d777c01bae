"""Checks that keep one bad request from failing a batch: run on the request's own arrays, before batching.

A batched compute call scores many requests at once, so anything in one request that makes the call
raise would fail all of them. What we know can do that is refused here, with 400 / INVALID_ARGUMENT
naming the feature and row, before the request reaches the batcher:

- a string TensorFlow cannot encode: a lone UTF-16 surrogate (`"\\ud800"` in JSON, or a body that
  encodes one directly) makes `tf.constant` raise "Unable to convert element to UTF-8";
- an id outside its field's bucket range on the `predict_ids` path: past the end of the shared table
  the lookup raises; inside it, the id silently reads another field's rows (a wrong answer, no error).
  The predictor checks those itself, knowing the tables: per merged batch on the ids batcher's thread
  (its screen; a batch holding a bad row screens each request alone, so only that one fails 400), and
  per request (`Predictor.check_ids`) where nothing batches.

Whatever still fails a batch is handled by the batcher itself: it re-runs the batch's requests one by
one, so the good ones are scored and only the culprit fails (`ctrflow.serving.batcher`).

Cost: a JSON body is scanned once for a backslash, an 0xED byte (UTF-8 of a surrogate, which Python's
json accepts) or a non-UTF-8 encoding (json also reads UTF-16/32); only such bodies, rare in practice,
get the per-column check. Ids cost one vectorised comparison per batch.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ctrflow.errors import SchemaError

__all__ = ["PoisonInput", "check_strings", "may_hold_surrogates"]


class PoisonInput(SchemaError):
    """An input that would fail any batch it shares (400 / INVALID_ARGUMENT): refused before batching."""


def may_hold_surrogates(body: bytes | bytearray | memoryview) -> bool:
    """False when a JSON body cannot decode to a string with a lone surrogate (the common case)."""
    head = bytes(body[:4])
    return b"\\" in body or b"\xed" in body or b"\x00" in head


def check_strings(features: Mapping[str, Any], names: Sequence[str]) -> None:
    """Raise PoisonInput if a categorical column of `features` holds a string UTF-8 cannot encode."""
    for name in names:
        column = features.get(name)
        if column is None:
            continue
        values = column.tolist() if isinstance(column, np.ndarray) else column
        strings = [v for v in values if isinstance(v, str)]
        if not strings:
            continue
        try:
            "".join(strings).encode("utf-8")
        except UnicodeEncodeError:
            row = next(i for i, v in enumerate(values) if isinstance(v, str) and not _encodable(v))
            bad = values[row]
            raise PoisonInput(
                f"Feature {name!r} row {row}: the string {bad[:40]!r} holds a lone UTF-16 surrogate and cannot be "
                "encoded as UTF-8; send valid Unicode (a surrogate pair, or the character itself)."
            ) from None


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
