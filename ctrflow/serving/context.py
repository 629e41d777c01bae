"""Context + candidates requests: decoding them (JSON, binary, TF Serving inputs) and scoring them in batches.

A bid request scores many ads for one user and page. With context fields declared at export
(docs/context.md), the export has a `serving_context` signature that takes the context fields once per
context row (`[R]`), the candidate fields once per ad (`[M]`) and `row` (int32 `[M]`, each candidate's
context row), hashes the context once and reuses every term of the logit that depends on it alone.

Forms (all answered with the flat request's probabilities, to float32 rounding):
- REST JSON on the normal predict route: `{"context": {C1: v, ...}, "instances": [{C20: v, ...}, ...]}`
  (or `"inputs": {C20: [...]}` for columnar candidates); `"context"` may be a list of R objects, then
  `"row": [...]` gives each candidate's context. A TF Serving body `{"signature_name":
  "serving_context", "inputs": {...}}` (context inputs of leading dim R, `row`) works as well.
- binary: `application/x-ctrflow-context` on `:predict_columnar` (`ctrflow.client.context`).
- gRPC: `PredictRequest` on signature `serving_context`, context inputs of dim 1 (then `row` may be
  left out) or R plus `row`.

Batching: `ContextScorer` owns a second `AutoBatcher` per version. The batcher merges requests by
candidate rows, so a request's context rides on its candidates as one object column holding, at every
candidate, a reference to the request's context columns (plus the candidate's row within them); the
compute call finds each request's run of candidates by that reference, joins the requests' contexts
(R rows in all) and offsets `row`, so the graph still hashes each context row once.
"""
from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ctrflow.client.context import CONTEXT_CONTENT_TYPE, CONTEXT_HEADER, ROW_FLAG
from ctrflow.errors import SchemaError
from ctrflow.export import CONTEXT_PACKED_SIGNATURE
from ctrflow.serving.batcher import AutoBatcher, BatchingOptions
from ctrflow.serving.codec import (
    RequestError,
    _column,
    _columns_from_inputs,
    _columns_from_instances,
    _json_type,
    _load_json,
    decode_columnar,
)

if TYPE_CHECKING:
    from ctrflow.serving.rest import ModelTarget, RestRequest, RestResponse, RestRoutes

__all__ = ["CONTEXT_CONTENT_TYPE", "CONTEXT_SIGNATURE", "ContextScorer", "decode_context_body", "parse_context_json",
           "predict_context_binary", "predict_context_json"]

CONTEXT_SIGNATURE = "serving_context"
ROW = "row"
_CONTEXT, _LOCAL_ROW = "\x00context", "\x00row"  # batcher-only columns (no field can be named so: not a signature input)


class _Context:
    """One request's context columns (context_fields order); compared by identity in merged batches."""

    __slots__ = ("columns", "rows")

    def __init__(self, columns: tuple[np.ndarray, ...], rows: int) -> None:
        self.columns, self.rows = columns, rows


class ContextScorer:
    """Scores context + candidates requests on one loaded version (`Predictor.context`); thread-safe.

    Inputs are named as the signature names them (`ctrflow.json` "inputs"; schema names also work):
    every context field with R values, every candidate field with M values, and `row` (int `[M]`,
    optional when R = 1).
    """

    def __init__(self, predictor: Any, batching: BatchingOptions | None) -> None:
        info = predictor.info["context"]
        chosen = set(info["fields"])
        # Signatures' concrete functions, called with keyword tensors: ~0.6 ms CPU cheaper per call than the
        # restored tf.function on a dict of 40 inputs; the packed one (two matrices per side, exports since
        # issue 11) another ~0.8 ms: most of a 1-request call's fixed cost (BENCHMARKS.md, "Context + candidates").
        signatures = predictor._loaded.signatures
        self._fn = signatures[CONTEXT_SIGNATURE]
        self._packed = signatures.get(CONTEXT_PACKED_SIGNATURE)
        self._alias: dict[str, str] = predictor._inputs
        self._field_of = {alias: field for field, alias in self._alias.items()}
        self._categorical = frozenset(predictor.categorical_names)
        self.context_fields = tuple(f for f in predictor.feature_names if f in chosen)
        self.candidate_fields = tuple(f for f in predictor.feature_names if f not in chosen)
        self.output_names = predictor.signatures[CONTEXT_SIGNATURE].output_names
        # Each side's (categorical, numeric) fields in schema order: the packed signature's matrix columns.
        self._sides = tuple((tuple(f for f in fields if f in self._categorical), tuple(f for f in fields if f not in self._categorical))
                            for fields in (self.context_fields, self.candidate_fields))
        self.batcher = (AutoBatcher(self._compute_merged, batching, name=f"{predictor.name}/{predictor.version}/context")
                        if batching else None)

    # ---- checking and converting ------------------------------------------------------------------
    def prepare(self, inputs: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
        """By-alias (or by-field) columns → (context by field [R], candidates by field [M], row int32 [M]).
        Everything a compute call could fail on is checked here, so a bad request fails alone (400)."""
        by_field: dict[str, Any] = {}
        row = None
        for key, values in inputs.items():
            if key == ROW:
                row = values
                continue
            field = self._field_of.get(key, key)
            if field not in self._alias:
                raise SchemaError(f"unknown input {str(key)[:100]!r}; context fields are {list(self.context_fields)[:40]}, "
                                  f"candidate fields {list(self.candidate_fields)[:40]}, plus {ROW!r}.")
            if field in by_field:
                raise SchemaError(f"input {key!r} given twice (by schema name and input name).")
            by_field[field] = values
        missing = [f for f in (*self.context_fields, *self.candidate_fields) if f not in by_field]
        if missing:
            raise SchemaError(f"missing inputs {missing[:30]}: send every field (empty string / NaN for missing values).")
        context = {f: self._convert(f, by_field[f]) for f in self.context_fields}
        candidates = {f: self._convert(f, by_field[f]) for f in self.candidate_fields}
        r = _common_length(context, "context")
        m = _common_length(candidates, "candidate")
        if row is None:
            if r != 1:
                raise SchemaError(f"{r} context rows but no {ROW!r} input: give each candidate's context row.")
            row = np.zeros(m, np.int32)
        else:
            row = np.asarray(row)
            if row.shape != (m,) or row.dtype.kind not in "iu":
                raise SchemaError(f"{ROW!r} must hold {m} integers (one per candidate). Got shape {row.shape}, "
                                  f"dtype {row.dtype}.")
            if m and (row.min() < 0 or row.max() >= r):
                raise SchemaError(f"{ROW!r} values must lie in [0, {r}) (the context rows). Got [{row.min()}, {row.max()}].")
            row = row.astype(np.int32, copy=False)
        return context, candidates, row

    def _convert(self, field: str, values: Any) -> np.ndarray:
        from ctrflow.serving.predictor import _categorical, _numeric

        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise SchemaError(f"feature {field!r} must be a list of values, got {type(values).__name__}.")
        if field in self._categorical:
            if isinstance(values, np.ndarray) and values.dtype.kind == "S":
                return values.astype(object)  # bytes (binary bodies, gRPC): nothing to encode
            out = _categorical(field, values)
            try:  # a lone surrogate cannot become a tf.string: refuse it here, not in a shared batch
                try:
                    "".join(out).encode("utf-8")
                except TypeError:  # bytes among the strings
                    "".join(v for v in out if type(v) is str).encode("utf-8")
            except UnicodeEncodeError:
                raise SchemaError(f"feature {field!r} holds a string that is not valid Unicode (a lone surrogate).") from None
            return out
        return _numeric(field, values)

    # ---- scoring ----------------------------------------------------------------------------------
    def _call(self, context: Mapping[str, np.ndarray], candidates: Mapping[str, np.ndarray], row: np.ndarray) -> np.ndarray:
        """One graph call → [M, outputs] (`output_names` order)."""
        import tensorflow as tf

        if self._packed is not None:
            out = self._packed(**_packed(context, self._sides[0], "context_"), **_packed(candidates, self._sides[1], ""),
                               row=tf.constant(row, tf.int32))
        else:
            feats = {self._alias[f]: tf.constant(v) for f, v in context.items()}
            feats.update({self._alias[f]: tf.constant(v) for f, v in candidates.items()})
            feats[ROW] = tf.constant(row, tf.int32)
            out = self._fn(**feats)
        return np.stack([out[k].numpy() for k in self.output_names], axis=1)

    def _merged_inputs(self, context, candidates, row) -> dict[str, np.ndarray]:
        """The per-candidate form the batcher merges: candidate columns, a reference to the context, row."""
        merged = dict(candidates)
        ref = np.empty(len(row), object)
        ref[:] = _Context(tuple(context[f] for f in self.context_fields), len(next(iter(context.values()))))
        merged[_CONTEXT] = ref
        merged[_LOCAL_ROW] = row
        return merged

    def _compute_merged(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """A merged batch → one call: the requests' contexts joined (R rows), `row` offset per request."""
        ref, row = inputs[_CONTEXT], inputs[_LOCAL_ROW]
        first = np.empty(len(ref), bool)
        first[0] = True
        first[1:] = ref[1:] != ref[:-1]  # identity: each request is one run of candidates
        starts = np.flatnonzero(first)
        contexts = ref[starts]
        if len(contexts) == 1:
            joined = contexts[0].columns
        else:
            joined = tuple(np.concatenate(cols) for cols in zip(*(c.columns for c in contexts)))
            offsets = np.cumsum([0] + [c.rows for c in contexts[:-1]]).astype(np.int32)
            row = row + np.repeat(offsets, np.diff(np.append(starts, len(ref))))
        context = dict(zip(self.context_fields, joined))
        candidates = {f: inputs[f] for f in self.candidate_fields}
        return self._call(context, candidates, row)

    def predict_outputs(self, inputs: Mapping[str, Any], *, timeout_ms: float | None = None,
                        names: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """{output: [M]} for one context request (through the batcher when the version batches)."""
        context, candidates, row = self.prepare(inputs)
        if self.batcher is None:
            stacked = self._call(context, candidates, row)
        else:
            stacked = self.batcher.predict(self._merged_inputs(context, candidates, row), timeout_ms=timeout_ms)
        return self._split(stacked, names)

    async def apredict_outputs(self, inputs: Mapping[str, Any], *, timeout_ms: float | None = None,
                               names: Sequence[str] = ()) -> dict[str, np.ndarray]:
        context, candidates, row = self.prepare(inputs)
        if self.batcher is None:
            stacked = await asyncio.to_thread(self._call, context, candidates, row)
        else:
            stacked = await self.batcher.apredict(self._merged_inputs(context, candidates, row), timeout_ms=timeout_ms)
        return self._split(stacked, names)

    def run_direct(self, inputs: Mapping[str, Any], names: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """Never through the batcher (warmup)."""
        return self._split(self._call(*self.prepare(inputs)), names)

    def _split(self, stacked: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        return {n: stacked[:, self.output_names.index(n)] for n in (names or self.output_names)}

    def stats(self) -> dict[str, Any]:
        return self.batcher.stats().to_dict() if self.batcher else {}

    def close(self, *, drain: bool = True) -> None:
        if self.batcher is not None:
            self.batcher.close(drain=drain)


def _packed(columns: Mapping[str, np.ndarray], side: tuple[tuple[str, ...], tuple[str, ...]], prefix: str) -> dict[str, Any]:
    """One side's columns → the packed signature's field-major `strings` / `numbers` matrices."""
    from ctrflow.serving.predictor import packed_tensors

    cats, nums = side
    strings, numbers = packed_tensors([columns[f] for f in cats], [columns[f] for f in nums], len(columns[(cats or nums)[0]]))
    return {prefix + "strings": strings, prefix + "numbers": numbers}


def _common_length(columns: Mapping[str, np.ndarray], side: str) -> int:
    lengths = {len(v) for v in columns.values()}
    if len(lengths) != 1:
        raise SchemaError(f"the {side} inputs have different lengths {sorted(lengths)[:10]}: one value per {side} row in each.")
    (n,) = lengths
    if n == 0:
        raise SchemaError(f"no {side} rows (empty inputs).")
    return n


# ---- decoding --------------------------------------------------------------------------------------------

def parse_context_json(doc: Mapping[str, Any], context_fields: Sequence[str], candidate_fields: Sequence[str],
                       categorical: frozenset[str] | set[str]) -> tuple[dict[str, Any], str, int]:
    """`{"context": {...} | [{...}, ...], "instances": [...] | "inputs": {...}, "row"?: [...]}` →
    (inputs by field plus `row`, "instances" or "inputs" (the answer's shape), candidates)."""
    unknown = set(doc) - {"context", "instances", "inputs", "row", "signature_name"}
    if unknown:
        raise RequestError(f"Unknown top-level keys {sorted(map(str, unknown))[:10]}; a context request has 'context', "
                           "'instances' or 'inputs', and 'row' when it sends several contexts.")
    if doc.get("signature_name") not in (None, "", CONTEXT_SIGNATURE):
        raise RequestError(f"A body with 'context' calls signature {CONTEXT_SIGNATURE!r}; got signature_name "
                           f"{str(doc['signature_name'])[:100]!r}.")
    if ("instances" in doc) == ("inputs" in doc):
        raise RequestError("A context request needs exactly one of 'instances' (candidate rows) or 'inputs' (candidate columns).")
    ctx = doc["context"]
    contexts = [ctx] if isinstance(ctx, dict) else ctx
    if not isinstance(contexts, list) or not contexts or any(type(c) is not dict for c in contexts):
        raise RequestError(f"'context' must be an object of the context fields (or a non-empty list of such objects). "
                           f"Got a JSON {_json_type(ctx)}.")
    kind = lambda n: "categorical" if n in categorical else "numeric"  # noqa: E731
    try:
        ctx_columns = _columns_from_instances(contexts, context_fields)
    except RequestError as e:
        raise RequestError(str(e).replace("instances[", "context[")) from None
    if "instances" in doc:
        cand_columns, fmt = _columns_from_instances(doc["instances"], candidate_fields), "instances"
    else:
        cand_columns, fmt = _columns_from_inputs(doc["inputs"], candidate_fields), "inputs"
    inputs: dict[str, Any] = {n: _column(n, ctx_columns[n], kind(n)) for n in context_fields}
    inputs.update({n: _column(n, cand_columns[n], kind(n)) for n in candidate_fields})
    rows = len(inputs[candidate_fields[0]])
    if "row" in doc:
        row = doc["row"]
        if not isinstance(row, list) or any(type(v) is not int for v in row):
            raise RequestError("'row' must be a list of integers (each candidate's context, 0-based).")
        inputs[ROW] = np.array(row, np.int64)
    elif len(contexts) > 1:
        raise RequestError(f"'context' holds {len(contexts)} contexts: add 'row' (each candidate's context, 0-based).")
    return inputs, fmt, rows


def decode_context_body(body: bytes, context_fields: Sequence[str], candidate_fields: Sequence[str],
                        categorical: frozenset[str] | set[str]) -> tuple[dict[str, Any], int]:
    """The binary body (`ctrflow.client.context.CONTEXT_FORMAT`) → (inputs by field plus `row`, candidates)."""
    if len(body) < CONTEXT_HEADER.size:
        raise RequestError(f"Context body of {len(body)} bytes is shorter than its {CONTEXT_HEADER.size}-byte header.")
    magic, fmt, flags, _, ctx_bytes, cand_bytes = CONTEXT_HEADER.unpack_from(body, 0)
    if magic != b"CTRX" or fmt != 1:
        raise RequestError("Not a context body: it must start with b'CTRX' and format 1.")
    start = CONTEXT_HEADER.size
    if start + ctx_bytes + cand_bytes > len(body):
        raise RequestError(f"Context body declares {ctx_bytes} + {cand_bytes} section bytes but holds {len(body) - start}.")
    split = lambda names: ([n for n in names if n in categorical], [n for n in names if n not in categorical])  # noqa: E731
    view = memoryview(body)
    try:
        ctx, _ = decode_columnar(view[start:start + ctx_bytes], *split(context_fields))
    except RequestError as e:
        raise RequestError(f"context section: {e}") from None
    try:
        cand, rows = decode_columnar(view[start + ctx_bytes:start + ctx_bytes + cand_bytes], *split(candidate_fields))
    except RequestError as e:
        raise RequestError(f"candidate section: {e}") from None
    inputs: dict[str, Any] = {**ctx, **cand}
    rest = len(body) - start - ctx_bytes - cand_bytes
    if flags & ROW_FLAG:
        if rest != 4 * rows:
            raise RequestError(f"The row section must hold {rows} int32 values ({4 * rows} bytes); got {rest} bytes.")
        inputs[ROW] = np.frombuffer(body, "<i4", rows, start + ctx_bytes + cand_bytes)
    elif rest:
        raise RequestError(f"Context body has {rest} bytes after its sections (set flags bit 0 for a row section).")
    return inputs, rows


# ---- REST handlers (hooked into ctrflow.serving.rest) ----------------------------------------------------

def _scorer(predictor: Any) -> ContextScorer:
    scorer = getattr(predictor, "context", None)
    if scorer is None:
        raise RequestError(f"Model version {getattr(predictor, 'version', '?')} has no context signature: export it "
                           "with context fields (schema 'context' or `ctrflow export --context-fields`).")
    return scorer


async def predict_context_json(routes: "RestRoutes", request: "RestRequest", target: "ModelTarget",
                               timeout_ms: float | None, body: bytes) -> "RestResponse | None":
    """A predict body with a top-level "context" (or naming the context signature); None: not one."""
    from ctrflow.serving.rest import JSON, _Predicted
    from ctrflow.serving.tfserving import decode_json_request, encode_json_response

    doc = await asyncio.to_thread(_load_json, body) if len(body) > 1 << 20 else _load_json(body)
    if not isinstance(doc, dict):
        return None
    generic = "context" not in doc and doc.get("signature_name") in (CONTEXT_SIGNATURE, "predict_context")
    if "context" not in doc and not generic:
        return None
    loaded = routes.manager.acquire(target.name, target.version, target.label)
    try:
        predictor = loaded.predictor
        if generic:  # TF Serving's own body on the context signatures
            decoded = decode_json_request(doc, predictor.signatures)
            fmt, rows = decoded.format, max((a.shape[0] for a in decoded.inputs.values() if a.ndim), default=1)
            routes._check_rows(rows)
            outputs = await predictor.arun(decoded.signature_key, decoded.inputs, timeout_ms=timeout_ms)
        else:
            scorer = _scorer(predictor)
            inputs, fmt, rows = parse_context_json(doc, scorer.context_fields, scorer.candidate_fields, scorer._categorical)
            routes._check_rows(rows)
            outputs = await scorer.apredict_outputs(inputs, timeout_ms=timeout_ms)
    finally:
        routes.manager.release(loaded)
    return _Predicted(200, encode_json_response(outputs, fmt), JSON, [(b"x-model-version", b"%d" % loaded.version)], rows)


async def predict_context_binary(routes: "RestRoutes", request: "RestRequest", target: "ModelTarget",
                                 timeout_ms: float | None) -> "RestResponse":
    """`application/x-ctrflow-context` on :predict_columnar → float32 probabilities (or JSON)."""
    from ctrflow.serving.codec import scores_json
    from ctrflow.serving.rest import JSON, _Predicted

    loaded = routes.manager.acquire(target.name, target.version, target.label)
    try:
        scorer = _scorer(loaded.predictor)
        inputs, rows = decode_context_body(bytes(request.body), scorer.context_fields, scorer.candidate_fields,
                                           scorer._categorical)
        routes._check_rows(rows)
        scores = (await scorer.apredict_outputs(inputs, timeout_ms=timeout_ms, names=("probabilities",)))["probabilities"]
    finally:
        routes.manager.release(loaded)
    if "application/json" in request.headers.get("accept", ""):
        payload, out_type = scores_json("outputs", scores), JSON
    else:
        payload, out_type = np.ascontiguousarray(scores, dtype="<f4").tobytes(), b"application/octet-stream"
    return _Predicted(200, payload, out_type, [(b"x-model-version", b"%d" % loaded.version)], rows)

