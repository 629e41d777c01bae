"""Feature transforms shared by the converter, the input pipeline and the serving graph.

Hashing and discretizing must give the same ids everywhere a model sees data, so each transform here
has one definition (keyed SipHash via TensorFlow's op; numpy searchsorted == tf Bucketize) and the
fitted state (quantile boundaries) travels with the shards in their manifest.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctrflow.data.batch import FeatureSpec
from ctrflow.schema import Schema

__all__ = [
    "field_hash_key",
    "hash_values",
    "log_transform",
    "value_keys",
    "discretize",
    "QuantileSketch",
    "Transforms",
]


def field_hash_key(hash_seed: int, field_name: str) -> tuple[int, int]:
    """The two 63-bit SipHash key halves of one field: stable across processes, versions, machines."""
    d = hashlib.blake2b(f"{hash_seed}:{field_name}".encode(), digest_size=16).digest()
    mask = (1 << 63) - 1
    return int.from_bytes(d[:8], "little") & mask, int.from_bytes(d[8:], "little") & mask


def hash_values(values: np.ndarray, buckets: int, key: tuple[int, int]) -> np.ndarray:
    """int32 ids in [1, buckets) for byte/str values; empty values → 0 (missing).

    `values`: a numpy array of bytes/str objects (or a fixed-width 'S' array).
    """
    import tensorflow as tf  # lazy: only the converter and exports hash

    if len(values) == 0:
        return np.zeros(0, np.int32)
    t = tf.constant(values)
    ids = tf.strings.to_hash_bucket_strong(t, buckets - 1, key=list(key)) + 1
    ids = tf.where(tf.strings.length(t) > 0, ids, tf.zeros_like(ids))
    return ids.numpy().astype(np.int32)


def value_keys(x: np.ndarray) -> np.ndarray:
    """The exact-value key of each float64 number, as bytes to hash (`mode: both`); NaN (missing) → b"".

    Integral values below 2^53 print as integers ("3", "-7", so 3 and 3.0 agree); any other value is
    keyed by its IEEE-754 bits ("f" + int64 bit pattern). Both forms are exactly reproducible in-graph
    (export's `_raw_transform`), so serving hashes a value to the id the converter wrote.
    """
    x = np.asarray(x, np.float64)
    missing = np.isnan(x)
    integral = ~missing & (np.floor(x) == x) & (np.abs(x) < 2.0**53)
    out = np.full(len(x), b"", dtype=object)
    if integral.any():
        out[integral] = np.char.encode(x[integral].astype(np.int64).astype(str))
    other = ~missing & ~integral
    if other.any():
        out[other] = np.char.encode(np.char.add("f", x[other].view(np.int64).astype(str)))
    return out


def log_transform(x: np.ndarray) -> np.ndarray:
    """sign(x)*log1p(|x|): tames heavy tails, keeps sign and zero, monotone (so quantiles survive)."""
    return np.sign(x) * np.log1p(np.abs(x))


def discretize(x: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """Bin ids 1..len(boundaries)+1 (1 + number of boundaries <= x); NaN (missing) → 0."""
    ids = np.searchsorted(boundaries, x, side="right").astype(np.int32) + 1
    ids[np.isnan(x)] = 0
    return ids


class QuantileSketch:
    """Bounded-memory weighted sample of one numeric field, for quantile boundaries over a whole input.

    Each block adds a uniform subsample with weight (rows seen / rows kept); when the sample outgrows
    `capacity`, it is thinned by half and the survivors' weights doubled, so memory never grows with
    the input and every row keeps an equal expected say.
    """

    def __init__(self, capacity: int = 1_000_000, seed: int = 0) -> None:
        self.capacity = capacity
        self._rng = np.random.default_rng(seed)
        self._values: list[np.ndarray] = []
        self._weights: list[np.ndarray] = []
        self._size = 0

    def add(self, values: np.ndarray, weights: np.ndarray) -> None:
        keep = ~np.isnan(values)
        if keep.any():
            self._values.append(values[keep].astype(np.float64))
            self._weights.append(weights[keep].astype(np.float64))
            self._size += int(keep.sum())
        if self._size > 2 * self.capacity:
            v, w = np.concatenate(self._values), np.concatenate(self._weights)
            pick = self._rng.random(len(v)) < 0.5
            self._values, self._weights, self._size = [v[pick]], [w[pick] * 2.0], int(pick.sum())

    def boundaries(self, bins: int) -> np.ndarray:
        """Up to bins-1 distinct interior cut points at the weighted quantiles (empty if no data)."""
        if not self._values:
            return np.zeros(0, np.float32)
        v, w = np.concatenate(self._values), np.concatenate(self._weights)
        order = np.argsort(v, kind="stable")
        v, w = v[order], w[order]
        cdf = np.cumsum(w) / w.sum()
        qs = np.arange(1, bins) / bins
        idx = np.minimum(np.searchsorted(cdf, qs, side="left"), len(v) - 1)
        lower = np.unique(v[idx])
        # Cut halfway to the next distinct value: values seen in training (integer counts above all)
        # then never sit on a boundary, so a last-bit difference between numpy's and TensorFlow's
        # float32 log1p cannot move a value to another bin at serving time.
        nxt_i = np.searchsorted(v, lower, side="right")
        ok = nxt_i < len(v)
        cuts = (lower[ok] + v[nxt_i[ok]]) / 2.0
        return np.unique(cuts.astype(np.float32))


@dataclass(frozen=True)
class Transforms:
    """The fitted part of a conversion: quantile boundaries per numeric field (float32, ascending)."""

    boundaries: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def boundaries_of(self, name: str) -> np.ndarray:
        return np.asarray(self.boundaries[name], dtype=np.float32)

    def id_buckets(self, schema: Schema) -> tuple[int, ...]:
        """Bucket count of every ids column: hash buckets, then len(boundaries)+2 per numeric, then the
        hash buckets of each `mode: both` numeric's exact-value column."""
        return (tuple(f.hash_buckets for f in schema.categorical)
                + tuple(len(self.boundaries[f.name]) + 2 for f in schema.numeric)
                + tuple(f.hash_buckets for f in schema.both_numeric))

    def feature_spec(self, schema: Schema) -> FeatureSpec:
        return FeatureSpec(
            id_names=schema.id_names,
            id_buckets=self.id_buckets(schema),
            numeric_names=schema.numeric_names,
            normalized_numeric=tuple(f.name for f in schema.numeric if f.mode == "normalize"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"boundaries": {k: [float(x) for x in v] for k, v in self.boundaries.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Transforms":
        return cls({k: tuple(float(x) for x in v) for k, v in d.get("boundaries", {}).items()})
