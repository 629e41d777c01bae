"""The in-process predictor: an exported version folder → probabilities, optionally through the autobatcher.

This is the path the reference bidder ran inside its own process: requests with hundreds of candidate
ads each are joined into one compute call by `AutoBatcher`, so many small requests cost few large calls.

    predictor = Predictor.load("models/ctr/3", batching=BatchingOptions(max_batch_size=4096, batch_timeout_ms=2))
    p = predictor.predict({"C1": ["68fd1e64", ""], "I1": [3, None], ...})   # float32 [2]

Inputs are columnar: every schema field is required (values may be missing: None/"" for categoricals,
None/NaN for numerics); extra or missing keys, ragged columns and non-numeric numerics raise
`SchemaError` naming the field (and row). The backend is the SavedModel's restored `tf.function` called
with a dict of tensors — measured faster than the signature's concrete function (BENCHMARKS.md).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ctrflow.errors import ModelNotFoundError, SchemaError
from ctrflow.export import EXPORT_INFO, find_versions
from ctrflow.schema import Schema
from ctrflow.serving.batcher import AutoBatcher, BatchingOptions

__all__ = ["Predictor", "find_versions", "columns_from_rows"]


def columns_from_rows(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, list[Any]]:
    """Row format (`instances`: one dict per candidate) → columnar, checking every row has the same keys."""
    want = set(names)
    cols: dict[str, list[Any]] = {n: [] for n in names}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise SchemaError(f"instance {i} is {type(row).__name__}, expected an object of named features.")
        keys = set(row)
        if keys != want:
            missing, extra = sorted(want - keys), sorted(keys - want)
            raise SchemaError(f"instance {i}: " + "; ".join(
                x for x in (f"missing features {missing}" if missing else "", f"unknown features {extra}" if extra else "") if x))
        for n in names:
            cols[n].append(row[n])
    return cols


def _categorical(name: str, values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.dtype.kind in "SU":
        return values.astype(object)
    if all(type(v) is str for v in values):  # the common case, ~10x cheaper than converting one by one
        return np.array(values, dtype=object)
    return np.array([_token(name, i, v) for i, v in enumerate(values)], dtype=object)


def _token(name: str, i: int, v: Any) -> str | bytes:
    if v is None:
        return ""
    if isinstance(v, (str, bytes)):
        return v
    if isinstance(v, bool):
        raise SchemaError(f"feature {name!r} row {i}: got a boolean, expected a string token.")
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return str(int(v)) if v.is_integer() else repr(v)
    raise SchemaError(f"feature {name!r} row {i}: got {type(v).__name__}, expected a string token.")


def _numeric(name: str, values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiu":
        return values.astype(np.float64, copy=False)
    if all(type(v) in (int, float) or v is None for v in values):  # common case: numpy maps None to NaN
        return np.array(values, dtype=np.float64)
    out = np.empty(len(values), np.float64)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, str) and not v):
            out[i] = np.nan
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[i] = v
        else:
            try:
                out[i] = float(v) if isinstance(v, str) else float("x")
            except ValueError:
                raise SchemaError(f"feature {name!r} row {i}: {v!r} is not a number.") from None
    return out


class Predictor:
    """One loaded model version. Thread-safe; `close()` stops its batcher (draining queued requests)."""

    def __init__(self, path: Path, loaded: Any, info: dict[str, Any], *, name: str, batching: BatchingOptions | None) -> None:
        self.path = path
        self.version = int(info.get("version", path.name if path.name.isdigit() else 0))
        self.name = name
        self.info = info
        self.schema = Schema.from_dict(info["schema"])
        self.categorical_names = self.schema.categorical_names
        self.numeric_names = self.schema.numeric_names
        self.feature_names = self.categorical_names + self.numeric_names
        self._inputs = info.get("inputs") or {n: n for n in self.feature_names}
        self._loaded = loaded
        self._serve = loaded.serve_raw
        self._serve_ids = loaded.serve_ids
        self.batcher = AutoBatcher(self._compute, batching, name=f"{name}/{self.version}") if batching else None

    @classmethod
    def load(cls, path: str | os.PathLike, *, batching: BatchingOptions | None = None, name: str | None = None) -> "Predictor":
        """Load a version folder, or the newest complete version of a base path."""
        import tensorflow as tf

        p = Path(path)
        if not (p / EXPORT_INFO).exists():
            versions = find_versions(p)
            if not versions:
                raise ModelNotFoundError(f"{p}: no complete model version (expected <version>/saved_model.pb and {EXPORT_INFO}).")
            p = p / str(versions[-1])
        try:
            info = json.loads((p / EXPORT_INFO).read_text())
            loaded = tf.saved_model.load(str(p))
        except (OSError, ValueError, tf.errors.OpError) as e:
            raise ModelNotFoundError(f"{p}: cannot load the model ({str(e).strip()[:300]}).") from None
        return cls(p, loaded, info, name=name or p.parent.name, batching=batching)

    # --- compute ---------------------------------------------------------------------------------
    def _compute(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        import tensorflow as tf

        feats = {self._inputs[n]: tf.constant(inputs[n]) for n in self.feature_names}
        return self._serve(feats)["probabilities"].numpy()

    def prepare(self, features: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validate and convert columnar raw features into the arrays the model takes."""
        if not isinstance(features, Mapping):
            raise SchemaError(f"features must be an object of named columns, got {type(features).__name__}.")
        keys, want = set(features), set(self.feature_names)
        if keys != want:
            missing, extra = sorted(want - keys), sorted(keys - want)
            raise SchemaError("; ".join(x for x in (f"missing features {missing}" if missing else "",
                                                    f"unknown features {extra}" if extra else "") if x))
        out: dict[str, np.ndarray] = {}
        n = None
        for name in self.feature_names:
            col = features[name]
            if isinstance(col, (str, bytes)) or not hasattr(col, "__len__"):
                raise SchemaError(f"feature {name!r} must be a list of values (one per candidate), got {type(col).__name__}.")
            if n is None:
                n = len(col)
            elif len(col) != n:
                raise SchemaError(f"feature {name!r} has {len(col)} values, others have {n}: every column needs one value per candidate.")
            out[name] = _categorical(name, col) if name in self.categorical_names else _numeric(name, col)
        if not n:
            raise SchemaError("no candidates to score (empty feature columns).")
        return out

    def predict(self, features: Mapping[str, Any], *, timeout_ms: float | None = None) -> np.ndarray:
        """Probabilities (float32 [n]) for columnar raw features."""
        inputs = self.prepare(features)
        if self.batcher is None:
            return self._compute(inputs)
        return self.batcher.predict(inputs, timeout_ms=timeout_ms)

    async def apredict(self, features: Mapping[str, Any], *, timeout_ms: float | None = None) -> np.ndarray:
        inputs = self.prepare(features)
        if self.batcher is None:
            return self._compute(inputs)
        return await self.batcher.apredict(inputs, timeout_ms=timeout_ms)

    def predict_ids(self, ids: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        """Probabilities for pre-hashed inputs in the shard layout (no batching: callers batch already)."""
        import tensorflow as tf

        return self._serve_ids(tf.constant(ids, tf.int32), tf.constant(numeric, tf.float32))["probabilities"].numpy()

    def transform(self, features: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """The ids and numerics the serving graph computes from raw features (for parity checks)."""
        import tensorflow as tf

        inputs = self.prepare(features)
        out = self._loaded.signatures["transform"](**{self._inputs[n]: tf.constant(inputs[n]) for n in self.feature_names})
        return out["ids"].numpy(), out["numeric"].numpy()

    def warmup(self, rows: int = 64) -> None:
        """Run the graph once on blank rows so the first real request pays no one-time cost."""
        feats = {n: [""] * rows if n in self.categorical_names else [None] * rows for n in self.feature_names}
        self._compute(self.prepare(feats))

    def stats(self) -> dict[str, Any]:
        return self.batcher.stats().to_dict() if self.batcher else {}

    def close(self, *, drain: bool = True) -> None:
        if self.batcher is not None:
            self.batcher.close(drain=drain)

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
