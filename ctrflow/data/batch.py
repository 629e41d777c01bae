"""The unit the input pipeline hands to models: one batch of ids, numerics, labels and weights.

`FeatureSpec` is the model-facing view of a schema and its fitted transforms: how many id columns there
are, how many buckets each has, and which numeric fields enter as normalized values instead of ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

__all__ = ["Batch", "FeatureSpec"]


class Batch(NamedTuple):
    """One ready batch. Arrays share their first dimension (rows).

    ids: int32 [B, n_id_fields], per-field local ids in [0, buckets_f), 0 = missing.
    numeric: float32 [B, n_numeric], transformed numeric values, missing as 0.0.
    label: float32 [B], 0/1.
    weight: float32 [B] or None.
    extras: float32 [B, E] or None: carried columns that are never features (e.g. `true_ctr`).
    time: int64 [B] or None: the schema's time column (for slicing and time-ordered work, never a feature).
    """

    ids: np.ndarray
    numeric: np.ndarray
    label: np.ndarray
    weight: np.ndarray | None = None
    extras: np.ndarray | None = None
    time: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return int(self.label.shape[0])


@dataclass(frozen=True)
class FeatureSpec:
    """What a model needs to know about its inputs.

    id_names / id_buckets: one entry per column of `Batch.ids` (categoricals, then discretized numerics,
        then the exact-value ids `<name>#value` of numerics in `mode: both`).
    numeric_names: one entry per column of `Batch.numeric`.
    normalized_numeric: names of numeric fields that enter as (online-normalized) values; these fields'
        id columns are then ignored by the model. The others enter as discretized ids.
    """

    id_names: tuple[str, ...]
    id_buckets: tuple[int, ...]
    numeric_names: tuple[str, ...] = ()
    normalized_numeric: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.id_names) != len(self.id_buckets):
            raise ValueError(
                f"FeatureSpec needs one bucket count per id field: got {len(self.id_names)} names "
                f"and {len(self.id_buckets)} bucket counts."
            )
        unknown = set(self.normalized_numeric) - set(self.numeric_names)
        if unknown:
            raise ValueError(f"normalized_numeric names unknown numeric fields: {sorted(unknown)}")

    @property
    def active_id_columns(self) -> tuple[int, ...]:
        """Indices of the `ids` columns a model looks up (drops numerics that enter normalized)."""
        skip = set(self.normalized_numeric)
        return tuple(i for i, n in enumerate(self.id_names) if n not in skip)

    @property
    def normalized_columns(self) -> tuple[int, ...]:
        """Indices of the `numeric` columns that enter as normalized values."""
        keep = set(self.normalized_numeric)
        return tuple(i for i, n in enumerate(self.numeric_names) if n in keep)

    def to_dict(self) -> dict:
        return {
            "id_names": list(self.id_names),
            "id_buckets": list(self.id_buckets),
            "numeric_names": list(self.numeric_names),
            "normalized_numeric": list(self.normalized_numeric),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        return cls(
            tuple(d["id_names"]),
            tuple(int(b) for b in d["id_buckets"]),
            tuple(d.get("numeric_names", ())),
            tuple(d.get("normalized_numeric", ())),
        )
