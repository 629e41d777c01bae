"""The in-process predictor: an exported version folder → probabilities, optionally through the autobatcher.

This is the path the reference bidder ran inside its own process: requests with hundreds of candidate
ads each are joined into one compute call by `AutoBatcher`, so many small requests cost few large calls.

    predictor = Predictor.load("models/ctr/3", batching=BatchingOptions(max_batch_size=4096, batch_timeout_ms=2))
    p = predictor.predict({"C1": ["68fd1e64", ""], "I1": [3, None], ...})   # float32 [2]

Inputs are columnar: every schema field is required (values may be missing: None/"" for categoricals,
None/NaN for numerics); extra or missing keys, ragged columns and non-numeric numerics raise
`SchemaError` naming the field (and row). The batchers compute through the export's `serving_packed`
and `predict_ids` signatures, called flat (`_flat_caller`: no Python argument binding) with ids and
numerics handed over without a copy when aligned (`_tensor`); older exports through the restored
`tf.function` with one tensor per field (BENCHMARKS.md).

Every signature of the export is callable by its key (`run`/`arun`: TF Serving's Predict), with the
true signature read from `saved_model.pb` (`signatures`, `signature_defs`); `serving_default` goes
through the batcher and its compute call returns every output (probabilities and logits), so one
batch answers both. A SavedModel without `ctrflow.json` is served by `SavedModelPredictor`, through
its own signatures only. `warmup()` replays the version's `assets.extra/tf_serving_warmup_requests`
(TF Serving's convention: PredictionLog records) when the export holds one.

The one-tensor fast path: `predict_ids(ids, numeric)` (and `apredict_ids`, `run("predict_ids", ...)`)
takes pre-hashed rows — int32 ids [n, F], float32 numerics [n, N], as `ctrflow.client.hashing`
computes them — through a second batcher of their own (`ids_batcher`). Ids outside a field's table
and non-finite numerics are refused with `InvalidArgument` naming the row and field, so such a
request fails alone: batched, by the batcher's screen (`_ids_error` over each merged batch on its
batch thread, then per request only when a batch holds a bad row); unbatched, by `check_ids`.
`compute_ids` is one direct call, the model's own cost.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ctrflow.errors import ModelNotFoundError, SchemaError
from ctrflow.export import EXPORT_INFO, PACKED_SIGNATURE, find_versions
from ctrflow.schema import Schema
from ctrflow.serving.batcher import TF_ALIGN_BYTES, AutoBatcher, BatchingOptions
from ctrflow.serving.strings import columns_tensor, fixed_width
from ctrflow.serving.tfserving import (
    WARMUP_FILE,
    InvalidArgument,
    Signature,
    read_signature_defs,
    select_outputs,
    signatures_from_defs,
    tensor_to_ndarray,
)

__all__ = ["Predictor", "SavedModelPredictor", "find_versions", "columns_from_rows", "load_predictor", "replay_warmup"]

log = logging.getLogger("ctrflow.serving")
# TF Serving replays at most this many warmup records (model_warmup_util.cc: kMaxNumRecords).
MAX_WARMUP_RECORDS = 1000


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


def _id_limits(info: Mapping[str, Any], schema: Schema) -> np.ndarray:
    """int64 [F]: each id column's table size (ids must lie in [0, size)), from the export's feature spec."""
    buckets = info.get("feature_spec", {}).get("id_buckets")
    if not buckets:  # older exports: the schema's buckets, numerics' discretized bins
        bounds = info.get("transforms", {}).get("boundaries", {})
        buckets = [f.hash_buckets for f in schema.categorical] + [len(bounds.get(f.name, ())) + 2 for f in schema.numeric]
    return np.asarray(buckets, np.int64)


def _sum_stats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two batchers' `BatcherStats.to_dict()` as one: counts summed, maxima maxed, histograms added."""
    out = dict(a)
    for k, v in b.items():
        if k == "name":
            continue
        if k.endswith("_max"):
            out[k] = max(a.get(k, 0), v)
        elif isinstance(v, dict):  # the batch-size histogram {"<=bound": calls}
            out[k] = {key: a.get(k, {}).get(key, 0) + v.get(key, 0) for key in {**a.get(k, {}), **v}}
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = a.get(k, 0) + v
    if out.get("queue_wait_count"):
        out["mean_queue_wait_ms"] = out["queue_wait_ms_sum"] / out["queue_wait_count"]
    return out


def _one_dim(name: str, values: np.ndarray) -> None:
    if values.ndim != 1:  # a (n, 1) column would fix the batcher's row shape and fail every request after it
        raise SchemaError(f"feature {name!r} must be one value per candidate (a 1-D column); got shape {values.shape}.")


def _categorical(name: str, values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray):
        _one_dim(name, values)
        if values.dtype.kind == "S":  # binary columnar: fixed-width bytes, kept (`packed_tensors`)
            return values
        if values.dtype.kind == "U":
            return values.astype(object)
        if values.dtype == object and set(map(type, values)) <= _TOKEN_TYPES:
            return values
    elif set(map(type, values)) == _STR:  # the common case: a C-level type scan, no Python per value
        return np.array(values, dtype=object)
    return np.array([_token(name, i, v) for i, v in enumerate(values)], dtype=object)


_STR = {str}
_TOKEN_TYPES = frozenset((str, bytes))
_NUMBER_TYPES = frozenset((int, float, type(None)))


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
    if isinstance(values, np.ndarray):
        _one_dim(name, values)
        if values.dtype.kind in "fiu":
            return values.astype(np.float64, copy=False)
    if set(map(type, values)) <= _NUMBER_TYPES:  # common case (C-level type scan): numpy maps None to NaN
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
        self._ids_signature = loaded.signatures.get("predict_ids") if hasattr(loaded, "signatures") else None
        self._packed_signature = loaded.signatures.get(PACKED_SIGNATURE) if hasattr(loaded, "signatures") else None
        # The batchers' two signatures, called below their Python argument binding (`_flat_caller`).
        self._flat = {id(s): _flat_caller(s) for s in (self._ids_signature, self._packed_signature) if s is not None}
        self.signature_defs = read_signature_defs(path)
        self.signatures: dict[str, Signature] = signatures_from_defs(self.signature_defs)
        default = self.signatures.get("serving_default")
        if default is None:
            raise ModelNotFoundError(f"{path}: the export has no 'serving_default' signature.")
        # One compute call answers every output of serving_default, stacked as columns in this order.
        self._outputs = default.output_names
        self._p_index = self._outputs.index("probabilities") if "probabilities" in self._outputs else 0
        self._field_of = {alias: field for field, alias in self._inputs.items()}
        # Both computes copy or drop their inputs before returning, so the batchers may reuse gather buffers.
        self.batcher = AutoBatcher(self._compute, batching, name=f"{name}/{self.version}", reuse_buffers=True) if batching else None
        # The one-tensor fast path (`predict_ids`): its own batcher, since a batcher's inputs have one
        # fixed signature ({"ids": int32 [n, F], "numeric": float32 [n, N]} here).
        # Ranges and finiteness are screened per merged batch on its batch thread (`_screen_ids`), not per
        # request on the caller's thread (`check_ids`): numpy gives the GIL away in loops over 500+
        # elements, so a per-request check on the event loop cost 37-100 µs of its time under load.
        self.ids_batcher = (AutoBatcher(self._compute_ids, batching, name=f"{name}/{self.version}/ids", reuse_buffers=True,
                                        screen=self._screen_ids) if batching else None)
        self.id_names = tuple(info.get("feature_spec", {}).get("id_names") or self.schema.id_names)
        self._id_limits = _id_limits(info, self.schema)
        self._tiled_limits: np.ndarray | None = None  # _id_limits repeated per row, for `_ids_in_range`
        self._limits_u32 = bool(self._id_limits.size) and int(self._id_limits.max()) <= 2**31 and int(self._id_limits.min()) >= 0
        self._cat_set = frozenset(self.categorical_names)
        self.context = None  # context + candidates requests (ctrflow.serving.context), when exported with them
        if info.get("context") and "serving_context" in self.signatures:
            from ctrflow.serving.context import ContextScorer

            self.context = ContextScorer(self, batching)

    kind = "ctrflow"
    huge_pages: Any = None  # ctrflow.serving.hugepages.HugePages, set by `load`

    @classmethod
    def load(cls, path: str | os.PathLike, *, batching: BatchingOptions | None = None, name: str | None = None,
             huge_pages: str = "auto") -> "Predictor":
        """Load a version folder, or the newest complete version of a base path.

        huge_pages: "auto" puts the large variables (the embedding tables) on transparent huge pages
        where the kernel allows (`ctrflow.serving.hugepages`: cheaper gathers, same scores); "off" leaves
        them as TensorFlow allocated them. What happened is `predictor.huge_pages`."""
        import tensorflow as tf

        from ctrflow.serving.hugepages import HugePages, advise_variables

        HugePages(mode=huge_pages)  # a bad option fails before the load

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
        pages = advise_variables(loaded, huge_pages, what=str(p))  # before the batchers start: no compute runs
        predictor = cls(p, loaded, info, name=name or p.parent.name, batching=batching)
        predictor.huge_pages = pages
        return predictor

    # --- compute ---------------------------------------------------------------------------------
    def _compute(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """[n, outputs]: every serving_default output as a column (`self._outputs` order)."""
        import tensorflow as tf

        packed = self._packed_signature
        if packed is not None:
            # Two field-major tensors instead of one per field: the call's per-input cost is most of the
            # model's CPU at serving batch sizes (~45% less per 100-row call on the demo's 39 fields).
            strings, numbers = packed_tensors([inputs[k] for k in self.categorical_names],
                                              [inputs[k] for k in self.numeric_names], len(inputs[self.feature_names[0]]))
            out = self._flat.get(id(packed), packed)(strings=strings, numbers=numbers)
        else:  # exports from before serving_packed
            out = self._serve({self._inputs[n]: tf.constant(inputs[n]) for n in self.feature_names})
        if len(self._outputs) == 1:
            return out[self._outputs[0]].numpy()[:, None]
        return np.stack([out[k].numpy() for k in self._outputs], axis=1)

    def _compute_ids(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """[n, outputs] of predict_ids (same output columns as `_compute`)."""
        import tensorflow as tf

        # The signature's concrete function: measured 0.3-0.6 ms CPU cheaper per call than the restored
        # tf.function on ids (two tensors; on serving_default's 39 inputs the restored function won, which
        # is why the raw path calls serving_packed's two matrices instead, see `_compute`). Called flat, with
        # the batcher's aligned buffers shared rather than copied (`_flat_caller`, `_tensor`).
        sig = self._ids_signature
        if sig is not None:
            out = self._flat.get(id(sig), sig)(ids=_tensor(tf, inputs["ids"]), numeric=_tensor(tf, inputs["numeric"]))
        else:
            out = self._serve_ids(tf.constant(inputs["ids"]), tf.constant(inputs["numeric"]))
        if len(self._outputs) == 1:
            return out[self._outputs[0]].numpy()[:, None]
        return np.stack([out[k].numpy() for k in self._outputs], axis=1)

    def compute_ids(self, ids: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        """Probabilities of one direct predict_ids call (no batcher, no checks): the model's own cost."""
        return self._compute_ids({"ids": ids, "numeric": numeric})[:, self._p_index]

    def check_ids(self, ids: Any, numeric: Any) -> dict[str, np.ndarray]:
        """The batcher's inputs for pre-hashed rows, after checking what would fail a whole batch.

        ids must be integers [rows, F] with 0 <= id < the field's table size (ctrflow.json
        `feature_spec.id_buckets`), numerics finite numbers [rows, N]; else `InvalidArgument` (400 /
        INVALID_ARGUMENT) naming the row and field. Vectorized; copies only to fix dtype or layout.
        """
        inputs = self._ids_inputs(ids, numeric)
        error = self._ids_error(inputs["ids"], inputs["numeric"])
        if error is not None:
            raise error
        return inputs

    def _ids_inputs(self, ids: Any, numeric: Any) -> dict[str, np.ndarray]:
        """`check_ids` without the value checks (ranges, finiteness: `_ids_error`, which the ids batcher's
        screen runs per batch): shapes and dtypes, then int32 / float32 C-contiguous (copies only to fix)."""
        f, n = len(self._id_limits), len(self.numeric_names)
        ids = ids if isinstance(ids, np.ndarray) else np.asarray(ids)
        numeric = numeric if isinstance(numeric, np.ndarray) else np.asarray(numeric)
        if ids.ndim != 2 or ids.shape[1] != f or (ids.shape[0] and ids.dtype.kind not in "iu"):
            raise InvalidArgument(f"'ids' must be an integer matrix [rows, {f}] (one column per field: "
                                  f"{', '.join(self.id_names[:6])}, ...). Got {ids.dtype} of shape {list(ids.shape)}.")
        if numeric.ndim != 2 or numeric.shape != (ids.shape[0], n) or (numeric.size and numeric.dtype.kind not in "fiu"):
            raise InvalidArgument(f"'numeric' must be a float matrix [{ids.shape[0]}, {n}] (rows as in 'ids'). "
                                  f"Got {numeric.dtype} of shape {list(numeric.shape)}.")
        if ids.shape[0] == 0:
            raise InvalidArgument("no candidates to score (0 rows).")
        if ids.dtype != np.int32:
            # An id outside int32 (int64 or uint bodies) must not wrap into a table by the cast: refused here.
            if not self._ids_in_range(ids):
                raise self._range_error(ids)
        return {"ids": np.ascontiguousarray(ids, dtype=np.int32), "numeric": np.ascontiguousarray(numeric, dtype=np.float32)}

    def _screen_ids(self, inputs: Mapping[str, np.ndarray]) -> InvalidArgument | None:
        """The ids batcher's screen: `_ids_error` of a merged batch (or of one request's inputs)."""
        return self._ids_error(inputs["ids"], inputs["numeric"])

    def _ids_error(self, ids: np.ndarray, numeric: np.ndarray) -> InvalidArgument | None:
        """What fails int32 ids [rows, F] and float32 numerics [rows, N] (ids outside their table, a
        non-finite numeric), naming the first such row and field; None when every value is fine."""
        if not self._ids_in_range(ids):
            return self._range_error(ids)
        # A finite sum means every value is finite (NaN and inf propagate); only a non-finite sum (or an
        # overflow of huge finite values) pays for the element-wise check.
        if numeric.size:
            with np.errstate(over="ignore", invalid="ignore"):
                total = np.add.reduce(numeric, None)
            if not math.isfinite(total) and not np.isfinite(numeric).all():
                r, c = (int(x) for x in np.argwhere(~np.isfinite(numeric))[0])
                return InvalidArgument(f"'numeric' row {r}, column {c} (field {self.numeric_names[c]!r}) is "
                                       f"{numeric[r, c]}; numerics must be finite (missing = 0.0).")
        return None

    def _range_error(self, ids: np.ndarray) -> InvalidArgument:
        bad = (ids < 0) | (ids >= self._id_limits)
        r, c = (int(x) for x in np.argwhere(bad)[0])
        return InvalidArgument(f"'ids' row {r}, column {c} (field {self.id_names[c]!r}): id {int(ids[r, c])} is "
                               f"outside [0, {int(self._id_limits[c])}) ({int(bad.sum())} such ids in the request).")

    _TILED_ROWS_MAX = 8192  # rows whose flattened id limits are kept (160 kB per 1k rows at 39 fields)

    def _ids_in_range(self, ids: np.ndarray) -> bool:
        """0 <= id < the field's table size everywhere. The common case (C-contiguous int32, as decoded
        from an ids body) is one flat unsigned compare against the limits tiled per row (negative ids
        wrap to >= 2**31, above any table): a third of the broadcast compare's CPU."""
        rows = ids.shape[0]
        if ids.dtype == np.int32 and ids.flags.c_contiguous and rows <= self._TILED_ROWS_MAX and self._limits_u32:
            tiled = self._tiled_limits
            if tiled is None or tiled.size < ids.size:
                tiled = self._tiled_limits = np.tile(self._id_limits.astype(np.uint32), max(rows, 256))
            return not np.greater_equal(ids.reshape(-1).view(np.uint32), tiled[: ids.size]).any()
        return not ((ids < 0) | (ids >= self._id_limits)).any()

    def _predict_ids_all(self, ids: Any, numeric: Any, timeout_ms: float | None) -> np.ndarray:
        if self.ids_batcher is None:
            return self._compute_ids(self.check_ids(ids, numeric))
        return self.ids_batcher.predict(self._ids_inputs(ids, numeric), timeout_ms=timeout_ms)

    async def _apredict_ids_all(self, ids: Any, numeric: Any, timeout_ms: float | None) -> np.ndarray:
        if self.ids_batcher is None:
            return await asyncio.to_thread(self._compute_ids, self.check_ids(ids, numeric))
        return await self.ids_batcher.apredict(self._ids_inputs(ids, numeric), timeout_ms=timeout_ms)

    def predict_ids(self, ids: Any, numeric: Any, *, timeout_ms: float | None = None) -> np.ndarray:
        """Probabilities (float32 [rows]) for pre-hashed rows (the `Batch` layout), through the batcher
        when the predictor has one; out-of-range ids raise `InvalidArgument` before batching."""
        return self._predict_ids_all(ids, numeric, timeout_ms)[:, self._p_index]

    async def apredict_ids(self, ids: Any, numeric: Any, *, timeout_ms: float | None = None) -> np.ndarray:
        return (await self._apredict_ids_all(ids, numeric, timeout_ms))[:, self._p_index]

    async def apredict_ids_outputs(self, ids: Any, numeric: Any, *, timeout_ms: float | None = None,
                                   output_filter: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """Every predict_ids output ({"logits", "probabilities"}) for pre-hashed rows."""
        names = select_outputs(self._signature("predict_ids"), output_filter)
        return self._split(await self._apredict_ids_all(ids, numeric, timeout_ms), names)

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
            out[name] = _categorical(name, col) if name in self._cat_set else _numeric(name, col)
        if not n:
            raise SchemaError("no candidates to score (empty feature columns).")
        return out

    def predict(self, features: Mapping[str, Any], *, timeout_ms: float | None = None) -> np.ndarray:
        """Probabilities (float32 [n]) for columnar raw features."""
        return self._predict_all(features, timeout_ms)[:, self._p_index]

    async def apredict(self, features: Mapping[str, Any], *, timeout_ms: float | None = None) -> np.ndarray:
        return (await self._apredict_all(features, timeout_ms))[:, self._p_index]

    def _predict_all(self, features: Mapping[str, Any], timeout_ms: float | None) -> np.ndarray:
        inputs = self.prepare(features)
        if self.batcher is None:
            return self._compute(inputs)
        return self.batcher.predict(inputs, timeout_ms=timeout_ms)

    async def _apredict_all(self, features: Mapping[str, Any], timeout_ms: float | None) -> np.ndarray:
        inputs = self.prepare(features)
        if self.batcher is None:
            return self._compute(inputs)
        return await self.batcher.apredict(inputs, timeout_ms=timeout_ms)

    def predict_outputs(self, features: Mapping[str, Any], *, timeout_ms: float | None = None,
                        output_filter: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """Every serving_default output ({"logits", "probabilities"}) for columnar raw features."""
        names = select_outputs(self.signatures["serving_default"], output_filter)
        return self._split(self._predict_all(features, timeout_ms), names)

    async def apredict_outputs(self, features: Mapping[str, Any], *, timeout_ms: float | None = None,
                               output_filter: Sequence[str] = ()) -> dict[str, np.ndarray]:
        names = select_outputs(self.signatures["serving_default"], output_filter)
        return self._split(await self._apredict_all(features, timeout_ms), names)

    # --- TF Serving's Predict: any signature, by key --------------------------------------------
    def _features_of(self, inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """serving_default inputs by signature alias → columnar features by schema field."""
        return {self._field_of.get(alias, alias): values for alias, values in inputs.items()}

    def _split(self, stacked: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        return {n: stacked[:, self._outputs.index(n)] for n in names}

    def run(self, signature_key: str, inputs: Mapping[str, np.ndarray], *, output_filter: Sequence[str] = (),
            timeout_ms: float | None = None) -> dict[str, np.ndarray]:
        """TF Serving's Predict on one signature: {input alias: array} → {output alias: array}."""
        signature = self._signature(signature_key)
        names = select_outputs(signature, output_filter)
        if signature_key == "serving_default":
            return self._split(self._predict_all(self._features_of(inputs), timeout_ms), names)
        if signature_key == "predict_ids" and set(inputs) == {"ids", "numeric"}:
            return self._split(self._predict_ids_all(inputs["ids"], inputs["numeric"], timeout_ms), names)
        if signature_key == "serving_context" and self.context is not None:
            return self.context.predict_outputs(inputs, timeout_ms=timeout_ms, names=names)
        return call_signature(self._loaded, signature, inputs, names)

    async def arun(self, signature_key: str, inputs: Mapping[str, np.ndarray], *, output_filter: Sequence[str] = (),
                   timeout_ms: float | None = None) -> dict[str, np.ndarray]:
        signature = self._signature(signature_key)
        names = select_outputs(signature, output_filter)
        if signature_key == "serving_default":
            return self._split(await self._apredict_all(self._features_of(inputs), timeout_ms), names)
        if signature_key == "predict_ids" and set(inputs) == {"ids", "numeric"}:
            return self._split(await self._apredict_ids_all(inputs["ids"], inputs["numeric"], timeout_ms), names)
        if signature_key == "serving_context" and self.context is not None:
            return await self.context.apredict_outputs(inputs, timeout_ms=timeout_ms, names=names)
        return await asyncio.to_thread(call_signature, self._loaded, signature, inputs, names)

    def run_direct(self, signature_key: str, inputs: Mapping[str, np.ndarray], output_filter: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """Like `run` but never through the batcher (warmup replays this way)."""
        signature = self._signature(signature_key)
        names = select_outputs(signature, output_filter)
        if signature_key == "serving_default":
            return self._split(self._compute(self.prepare(self._features_of(inputs))), names)
        if signature_key == "serving_context" and self.context is not None:
            return self.context.run_direct(inputs, names)
        return call_signature(self._loaded, signature, inputs, names)

    def _signature(self, key: str) -> Signature:
        signature = self.signatures.get(key or "serving_default")
        if signature is None:
            raise InvalidArgument(f"Serving signature name: \"{key[:100]}\" not found in signature def; this model "
                                  f"has {sorted(self.signatures)}.")
        return signature

    def transform(self, features: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """The ids and numerics the serving graph computes from raw features (for parity checks)."""
        import tensorflow as tf

        inputs = self.prepare(features)
        out = self._loaded.signatures["transform"](**{self._inputs[n]: tf.constant(inputs[n]) for n in self.feature_names})
        return out["ids"].numpy(), out["numeric"].numpy()

    def warmup(self, rows: int = 64) -> int:
        """Replay the export's recorded warmup requests (else run blank rows once) so the first real
        request pays no one-time cost. Returns the requests replayed."""
        # The fast path's function is its own (the signature replayed by warmup records is another object).
        self._compute_ids({"ids": np.zeros((rows, len(self._id_limits)), np.int32),
                           "numeric": np.zeros((rows, len(self.numeric_names)), np.float32)})
        if (self.path / WARMUP_FILE).exists():
            return replay_warmup(self, self.path / WARMUP_FILE)
        feats = {n: [""] * rows if n in self.categorical_names else [None] * rows for n in self.feature_names}
        self._compute(self.prepare(feats))
        return 1

    def stats(self) -> dict[str, Any]:
        """The batchers' counters (raw-feature, ids and context batchers summed: one version, one figure)."""
        out = _sum_stats(self.batcher.stats().to_dict(), self.ids_batcher.stats().to_dict()) if self.batcher else {}
        if self.context is not None and self.context.batcher is not None:
            out = _sum_stats(out, self.context.stats())
        return out

    def close(self, *, drain: bool = True) -> None:
        if self.batcher is not None:
            self.batcher.close(drain=drain)
        if self.ids_batcher is not None:
            self.ids_batcher.close(drain=drain)
        if self.context is not None:
            self.context.close(drain=drain)

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def packed_tensors(categorical: Sequence[np.ndarray], numeric: Sequence[np.ndarray], rows: int) -> tuple[Any, Any]:
    """Columns → a packed raw signature's field-major `strings` tf.string `[C, rows]` and `numbers` float64
    `[N, rows]` (`serving_packed`, each side of `serving_context_packed`). Binary bodies' 'S' columns take
    `columns_tensor` (one op, no Python object per value, no column padded to another's width)."""
    import tensorflow as tf

    if categorical and all(fixed_width(c) for c in categorical):
        strings = columns_tensor(categorical)
    else:
        strings = tf.constant(np.stack(categorical) if categorical else np.empty((0, rows), object), tf.string)
    numbers = np.stack(numeric) if numeric else np.empty((0, rows), np.float64)
    return strings, tf.constant(numbers, tf.float64)


_SHAREABLE = frozenset(np.dtype(t) for t in (np.int32, np.int64, np.float32, np.float64))
_from_dlpack: Any = None  # tf.experimental.dlpack.from_dlpack, bound on first use


def _tensor(tf: Any, array: np.ndarray) -> Any:
    """An eager tensor over the array's own memory (DLPack: no copy, ~1 µs) when that is safe, else
    `tf.constant`'s copy. Served, the copy was ~0.1 ms per input of a 1,500-row batch (a fresh buffer's
    page faults each call); the batcher gathers batches into 64-byte-aligned buffers so they qualify.
    Safe means: C-contiguous, writable (numpy exports nothing else), a plain numeric dtype and a buffer
    aligned to `TF_ALIGN_BYTES` (TensorFlow checks alignment with a fatal CHECK, so it is tested here first).
    TensorFlow never writes into an input whose Python tensor is alive, and the capsule keeps the array
    alive as long as the tensor."""
    if (array.size and array.ctypes.data % TF_ALIGN_BYTES == 0 and array.flags.c_contiguous and array.flags.writeable
            and array.dtype in _SHAREABLE):
        global _from_dlpack
        try:
            if _from_dlpack is None:  # (the lazy module chain costs ~3 µs a lookup)
                _from_dlpack = tf.experimental.dlpack.from_dlpack
            return _from_dlpack(array.__dlpack__())
        except (AttributeError, BufferError, TypeError, ValueError, tf.errors.OpError):
            pass
    return tf.constant(array)


def _flat_caller(signature: Any) -> Any:
    """`signature(**tensors)` without TensorFlow's Python argument binding: the restored function's flat
    call with its inputs in order and its captured variables appended. On the ids path that binding
    (structured-signature matching, TensorSpec casts, the wrapper's replica check) is 0.1-0.2 ms of
    the batch thread's CPU per call, paid under the GIL. It leans on TensorFlow internals
    (`_inference_function.call_preflattened`), so it is checked once against the signature's own call
    on non-zero inputs and any difference or missing attribute falls back to the signature itself."""
    import tensorflow as tf

    try:
        order = tuple(signature.function_type.parameters)
        specs = signature.structured_input_signature[1]
        call = signature._inference_function.call_preflattened
        captured = list(signature.captured_inputs)
        if set(order) != set(specs) or any(t.dtype == tf.resource for t in signature.inputs[: len(order)]):
            return signature
        if any(callable(c) for c in captured):  # captures resolved at call time: only the public call knows them
            return signature

        def flat(**tensors: Any) -> Any:
            return call([tensors[k] for k in order] + captured)

        # Non-zero probes (ones; "1" for strings), so a call that drops or mixes up inputs reads differently.
        probe = {k: (tf.fill([1 if d is None else d for d in spec.shape], "1") if spec.dtype == tf.string
                     else tf.ones([1 if d is None else d for d in spec.shape], spec.dtype)) for k, spec in specs.items()}
        want, got = signature(**probe), flat(**probe)
        if set(want) != set(got) or not all(np.array_equal(want[k].numpy(), got[k].numpy()) for k in want):
            return signature
        return flat
    except Exception:  # noqa: BLE001 - any TensorFlow without these internals: the public call
        return signature


def call_signature(loaded: Any, signature: Signature, inputs: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Call one restored signature with numpy inputs cast to its dtypes; {output alias: numpy}."""
    import tensorflow as tf

    want, got = set(signature.inputs), set(inputs)
    if want != got:
        missing, extra = sorted(want - got), sorted(got - want)
        raise InvalidArgument(f"signature '{signature.key}': " + "; ".join(
            p for p in (f"missing inputs {missing[:20]}" if missing else "", f"unknown inputs {extra[:20]}" if extra else "") if p))
    tensors = {}
    for alias, info in signature.inputs.items():
        try:
            tensors[alias] = tf.constant(inputs[alias], dtype=tf.dtypes.as_dtype(info.dtype))
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"input {alias!r} cannot be a {info.dtype_name} tensor: {str(e)[:200]}") from None
    try:
        out = loaded.signatures[signature.key](**tensors)
    except (tf.errors.InvalidArgumentError, TypeError, ValueError) as e:
        raise InvalidArgument(f"signature '{signature.key}': {' '.join(str(e).split())[:300]}") from None
    return {n: out[n].numpy() for n in names}


def replay_warmup(predictor: Any, path: str | os.PathLike) -> int:
    """Run every PredictionLog of a TF Serving warmup file (TFRecord) through `predictor.run_direct`.

    As in TF Serving, a record that fails makes the version fail to load (a broken warmup file is a
    broken export); at most MAX_WARMUP_RECORDS are read. Returns the requests replayed.
    """
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    replayed = 0
    try:
        records = list(tf.data.TFRecordDataset(str(path)).take(MAX_WARMUP_RECORDS).as_numpy_iterator())
    except tf.errors.OpError as e:
        raise ModelNotFoundError(f"{path}: the warmup file is not a TFRecord file of PredictionLog ({str(e)[:200]}).") from None
    for i, raw in enumerate(records):
        record = prediction_log_pb2.PredictionLog()
        try:
            record.ParseFromString(raw)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError
            raise ModelNotFoundError(f"{path}: record {i} is not a PredictionLog.") from None
        kind = record.WhichOneof("log_type")
        if kind != "predict_log":
            raise ModelNotFoundError(f"{path}: record {i} is a {kind}; only predict_log warmup records are supported.")
        request = record.predict_log.request
        inputs = {alias: tensor_to_ndarray(t, name=alias) for alias, t in request.inputs.items()}
        try:
            predictor.run_direct(request.model_spec.signature_name or "serving_default", inputs, list(request.output_filter))
        except SchemaError as e:
            raise ModelNotFoundError(f"{path}: warmup record {i} failed: {e}") from None
        replayed += 1
    return replayed


class SavedModelPredictor:
    """A plain SavedModel (no ctrflow.json): served through its own signatures only, without batching.

    ctrflow's columnar endpoints need a ctrflow export's schema; `predict` says so. Thread-safe.
    """

    kind = "savedmodel"
    batcher = None
    categorical_names: tuple[str, ...] = ()
    numeric_names: tuple[str, ...] = ()
    feature_names: tuple[str, ...] = ()

    def __init__(self, path: Path, loaded: Any, *, name: str) -> None:
        self.path = path
        self.version = int(path.name) if path.name.isdigit() else 0
        self.name = name
        self.info: dict[str, Any] = {}
        self._loaded = loaded
        self.signature_defs = read_signature_defs(path)
        self.signatures = {k: v for k, v in signatures_from_defs(self.signature_defs).items() if k in loaded.signatures}
        if not self.signatures:
            raise ModelNotFoundError(f"{path}: this SavedModel has no serving signature; export it with "
                                     "`signatures=` (TF Serving could not serve it either).")

    @classmethod
    def load(cls, path: str | os.PathLike, *, name: str | None = None) -> "SavedModelPredictor":
        import tensorflow as tf

        p = Path(path)
        try:
            loaded = tf.saved_model.load(str(p))
        except (OSError, ValueError, tf.errors.OpError) as e:
            raise ModelNotFoundError(f"{p}: cannot load the SavedModel ({' '.join(str(e).split())[:300]}).") from None
        return cls(p, loaded, name=name or p.parent.name)

    def _signature(self, key: str) -> Signature:
        return Predictor._signature(self, key)  # type: ignore[arg-type]

    def run(self, signature_key: str, inputs: Mapping[str, np.ndarray], *, output_filter: Sequence[str] = (),
            timeout_ms: float | None = None) -> dict[str, np.ndarray]:
        signature = self._signature(signature_key)
        return call_signature(self._loaded, signature, inputs, select_outputs(signature, output_filter))

    async def arun(self, signature_key: str, inputs: Mapping[str, np.ndarray], *, output_filter: Sequence[str] = (),
                   timeout_ms: float | None = None) -> dict[str, np.ndarray]:
        signature = self._signature(signature_key)
        names = select_outputs(signature, output_filter)
        return await asyncio.to_thread(call_signature, self._loaded, signature, inputs, names)

    def run_direct(self, signature_key: str, inputs: Mapping[str, np.ndarray], output_filter: Sequence[str] = ()) -> dict[str, np.ndarray]:
        return self.run(signature_key, inputs, output_filter=output_filter)

    def predict(self, features: Mapping[str, Any], *, timeout_ms: float | None = None) -> np.ndarray:
        raise SchemaError(f"model '{self.name}' version {self.version} is a plain SavedModel (no ctrflow.json): "
                          "call POST /v1/models/NAME:predict (or gRPC Predict) with its signature's inputs; "
                          f"signatures: {sorted(self.signatures)}.")

    async def apredict(self, features: Mapping[str, Any], *, timeout_ms: float | None = None) -> np.ndarray:
        return self.predict(features)

    def warmup(self, rows: int = 64) -> int:
        if (self.path / WARMUP_FILE).exists():
            return replay_warmup(self, self.path / WARMUP_FILE)
        return 0

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self, *, drain: bool = True) -> None:
        pass


def load_predictor(path: str | os.PathLike, *, batching: BatchingOptions | None = None, name: str | None = None,
                   huge_pages: str = "auto") -> Any:
    """A version folder → `Predictor` (ctrflow export) or `SavedModelPredictor` (a plain SavedModel)."""
    p = Path(path)
    if (p / EXPORT_INFO).exists():
        return Predictor.load(p, batching=batching, name=name, huge_pages=huge_pages)
    if (p / "saved_model.pb").exists():
        return SavedModelPredictor.load(p, name=name)
    return Predictor.load(p, batching=batching, name=name, huge_pages=huge_pages)  # a base path: its newest ctrflow version
