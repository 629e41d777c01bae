"""Slim exports: a trained run → a SavedModel without optimizer state, with the data transforms in-graph.

`export(run, "models/ctr")` writes `models/ctr/<version>/` in TensorFlow Serving's layout (integer
version folders holding `saved_model.pb` and `variables/`), so TF Serving itself could load it, plus
`ctrflow.json` (schema, transforms, feature spec, model config) for ctrflow's own server.

Signatures:
- `serving_default`: raw feature values, one input per schema field (categoricals `tf.string [None]`,
  numerics `tf.float64 [None]`, NaN = missing), hashed and discretized in-graph with exactly the
  converter's functions → `{"probabilities", "logits"}` float32 `[None]`.
- `predict_ids`: pre-hashed `ids` int32 `[None, F]` and `numeric` float32 `[None, N]` (the shard layout).
- `transform`: raw features → `{"ids", "numeric"}` (what the converter would have written), for parity checks.
- `serving_packed`: `serving_default` on two field-major matrices, `strings` tf.string `[C, None]` (one row
  per categorical, schema order) and `numbers` float64 `[N, None]` (one row per numeric): a call costs
  ~0.8 ms CPU less than one with an input per field.

With context fields (schema `context:` or `export(context_fields=...)`, docs/context.md), two more:
- `serving_context`: raw context fields `[R]`, raw candidate fields `[M]` and `row` int32 `[M]` (each
  candidate's context row): the context is hashed and its terms computed once per context row.
- `predict_context`: the same on ids: `context_ids` int32 `[R, Fc]`, `context_numeric` float32 `[R, Nc]`
  (the context fields' columns of the shard layout, in layout order), `ids` `[M, Fk]`, `numeric`
  `[M, Nk]` (the other columns) and `row` `[M]`.
- `serving_context_packed`: `serving_context` on packed matrices (as `serving_packed`): `context_strings`
  `[Cc, R]`, `context_numbers` `[Nc, R]`, `strings` `[Ck, M]`, `numbers` `[Nk, M]`, `row` `[M]`
  (each side's fields in schema order); `ContextScorer` calls this one.

Packed tables (`pack_tables`, default "auto": FM only, where it measured faster): the linear weight is
stored as the embedding table's last column, so every signature gathers each id once
(`CtrModel.pack_tables`); `packed_tables` in ctrflow.json says which layout a version has.

Only the model's variables are saved: optimizer slots (two per weight for Adam-family optimizers) stay
in the checkpoints, so an export is about a third of a checkpoint. The version folder is built under a
dot-prefixed temp name (which TF Serving and ctrflow ignore) and renamed when complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from ctrflow.atomic import fsync_tree, replace_atomically
from ctrflow.data.transforms import field_hash_key
from ctrflow.errors import ConfigError, TrainingError
from ctrflow.schema import VALUE_ID_SUFFIX, Schema

__all__ = ["ExportSummary", "export", "find_versions", "EXPORT_INFO", "input_name", "write_warmup_requests", "context_layout",
           "CONTEXT_ROW_INPUT", "PACKED_SIGNATURE", "PACK_MODES", "PACK_AUTO_KINDS", "CONTEXT_PACKED_SIGNATURE", "signature_rows"]

EXPORT_INFO = "ctrflow.json"
PACK_MODES = ("auto", "on", "off")  # export(pack_tables=...), `ctrflow export --pack-tables`
# Kinds that "auto" packs: where serving from packed tables measured faster (BENCHMARKS.md, "Packed tables").
PACK_AUTO_KINDS: frozenset[str] = frozenset({"fm"})
_NAME_OK = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\-/]*$")


def input_name(field: str) -> str:
    """A field's signature input name (TensorFlow allows a restricted character set)."""
    return field if _NAME_OK.match(field) else (re.sub(r"[^A-Za-z0-9_.\-/]", "_", field).lstrip("_-/") or "f")


@dataclass
class ExportSummary:
    path: str
    version: int
    export_bytes: int
    checkpoint_bytes: int
    export_vs_checkpoint: float
    embedding_dtype: str
    signatures: list[str]
    seconds: float
    packed_tables: bool = False  # served from packed tables (export's pack_tables)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def find_versions(model_base_path: str | os.PathLike) -> list[int]:
    """Complete version folders under a base path, ascending (temp folders and non-integers ignored)."""
    base = Path(model_base_path)
    if not base.is_dir():
        return []
    out = []
    for p in base.iterdir():
        if p.is_dir() and p.name.isdigit() and (p / "saved_model.pb").exists() and (p / EXPORT_INFO).exists():
            out.append(int(p.name))
    return sorted(out)


def _raw_transform(features: dict[str, Any], schema: Schema, boundaries: dict[str, tuple[float, ...]]):
    """The converter's transforms as TensorFlow ops: raw features → (ids int32 [B, F], numeric float32 [B, N]).

    Vectorized over fields: one hash op per categorical (each field has its own key) and one op per step
    on the stacked `[B, N]` numerics (a batched `searchsorted` for every field's boundaries at once), not
    a chain of ops per field: the demo's `serving_default` graph went from 643 to 168 nodes, ~0.15-0.2 ms
    CPU less per call (BENCHMARKS.md, "Context + candidates requests")."""
    import numpy as np
    import tensorflow as tf

    parts = []
    batch = None
    if schema.categorical:
        xs = [features[input_name(f.name)] for f in schema.categorical]
        batch = tf.shape(xs[0])[0]
        hashed = tf.stack([tf.strings.to_hash_bucket_strong(x, f.hash_buckets - 1, key=list(field_hash_key(schema.hash_seed, f.name)))
                           for f, x in zip(schema.categorical, xs)], axis=1)
        present = tf.stack([tf.strings.length(x) for x in xs], axis=1) > 0  # the empty string is missing: id 0
        parts.append((tf.cast(hashed, tf.int32) + 1) * tf.cast(present, tf.int32))
    nums = None
    if schema.numeric:
        x = tf.stack([features[input_name(f.name)] for f in schema.numeric], axis=1)  # float64 [B, N]
        batch = tf.shape(x)[0]
        logs = [f.transform == "log" for f in schema.numeric]
        if any(logs):
            logged = tf.sign(x) * tf.math.log1p(tf.abs(x))
            x = logged if all(logs) else tf.where(tf.constant([logs]), logged, x)
        v = tf.cast(x, tf.float32)  # the converter stores float32 after a float64 transform
        missing = tf.math.is_nan(v)
        # Bucketize per field == searchsorted(boundaries, v, "right") (the converter's discretize): one
        # batched searchsorted over [N, widest] boundaries padded with +inf, clipped to each field's count
        # (only v = +inf could count the padding).
        bounds = [tuple(float(b) for b in boundaries[f.name]) for f in schema.numeric]
        widest = max(len(b) for b in bounds)
        if widest:
            table = np.full((len(bounds), widest), np.inf, np.float32)
            for i, b in enumerate(bounds):
                table[i, :len(b)] = b
            counts = tf.searchsorted(tf.constant(table), tf.transpose(v), side="right", out_type=tf.int32)
            counts = tf.minimum(tf.transpose(counts), tf.constant([[len(b) for b in bounds]], tf.int32))
        else:
            counts = tf.zeros_like(v, tf.int32)
        parts.append((counts + 1) * tf.cast(tf.logical_not(missing), tf.int32))
        nums = tf.where(missing, tf.zeros_like(v), v)
    for f in schema.both_numeric:  # exact-value ids, keyed as transforms.value_keys keys them
        x = features[input_name(f.name)]
        missing = tf.math.is_nan(x)
        integral = tf.logical_and(tf.logical_not(missing), tf.logical_and(tf.floor(x) == x, tf.abs(x) < 2.0**53))
        as_int = tf.strings.as_string(tf.cast(tf.where(integral, x, tf.zeros_like(x)), tf.int64))
        as_bits = tf.strings.join(["f", tf.strings.as_string(tf.bitcast(x, tf.int64))])
        key = tf.where(integral, as_int, as_bits)
        name = f.name + VALUE_ID_SUFFIX
        h = tf.strings.to_hash_bucket_strong(key, f.hash_buckets - 1, key=list(field_hash_key(schema.hash_seed, name))) + 1
        parts.append(tf.cast(tf.where(missing, tf.zeros_like(h), h), tf.int32)[:, None])
    ids = parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)
    numeric = nums if nums is not None else tf.zeros([batch, 0], tf.float32)
    return ids, numeric


CONTEXT_ROW_INPUT = "row"  # the context signatures' candidate → context row input


def context_layout(schema: Schema, context_fields: Any) -> dict[str, Any]:
    """Where the context fields sit in the shard layout: {"fields", "id_columns", "numeric_columns"}
    (columns of `Batch.ids` / `Batch.numeric`, ascending). Raises SchemaError for unknown fields."""
    fields = schema.check_context(context_fields)
    chosen = set(fields)
    owner = [n for n in schema.categorical_names + schema.numeric_names] + [f.name for f in schema.both_numeric]
    return {
        "fields": [n for n in schema.categorical_names + schema.numeric_names if n in chosen],
        "id_columns": [i for i, n in enumerate(owner) if n in chosen],
        "numeric_columns": [i for i, n in enumerate(schema.numeric_names) if n in chosen],
    }


def _side_schema(schema: Schema, fields: set[str]) -> Schema:
    """The schema restricted to these feature fields (order kept): its `_raw_transform` gives exactly
    those fields' columns of the full layout, in layout order."""
    from dataclasses import replace

    return replace(schema, categorical=tuple(f for f in schema.categorical if f.name in fields),
                   numeric=tuple(f for f in schema.numeric if f.name in fields), context=())


PACKED_SIGNATURE = "serving_packed"  # raw features as two matrices (see _packed_spec)
CONTEXT_PACKED_SIGNATURE = "serving_context_packed"
FIELD_MAJOR_SIGNATURES = frozenset({PACKED_SIGNATURE, CONTEXT_PACKED_SIGNATURE})  # rows on the last axis


def signature_rows(signature: str, inputs: Mapping[str, Any]) -> int:
    """Rows (candidates) of one call's inputs: the first axis, but the last of the field-major packed
    signatures ([fields, rows]), so a request's row limit and its metrics count candidates, not fields."""
    axis = -1 if signature in FIELD_MAJOR_SIGNATURES else 0
    return max((a.shape[axis] for a in inputs.values() if getattr(a, "ndim", 0)), default=1)


def _packed_spec(schema: Schema, prefix: str = "") -> list[Any]:
    """Inputs of a packed raw signature, field-major: `strings` tf.string `[C, B]` (one row per categorical,
    schema order) and `numbers` float64 `[N, B]` (one row per numeric): two tensors instead of one per
    field, which saves ~0.8 ms CPU per call on the demo's 39 fields (the per-input cost of a call,
    BENCHMARKS.md). Field-major so the graph splits them into fields without copying (an aligned
    unstack along axis 0 shares the buffer), and a columnar body's columns stack without interleaving."""
    import tensorflow as tf

    return [tf.TensorSpec([len(schema.categorical), None], tf.string, name=prefix + "strings"),
            tf.TensorSpec([len(schema.numeric), None], tf.float64, name=prefix + "numbers")]


def _unpacked(schema: Schema, strings: Any, numbers: Any) -> dict[str, Any]:
    """A packed signature's two matrices → the per-field inputs `_raw_transform` reads."""
    import tensorflow as tf

    out = {}
    if schema.categorical:
        out.update(zip((input_name(f.name) for f in schema.categorical), tf.unstack(strings, len(schema.categorical), axis=0)))
    if schema.numeric:
        out.update(zip((input_name(f.name) for f in schema.numeric), tf.unstack(numbers, len(schema.numeric), axis=0)))
    return out


WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"  # TF Serving's convention (ctrflow.serving.tfserving)
WARMUP_BATCH_SIZES = (1, 16, 64)  # small: the file ships in every export (shapes are [None] anyway)


def write_warmup_requests(version_dir: str | os.PathLike, schema: Schema, boundaries: dict[str, tuple[float, ...]],
                          *, batch_sizes: tuple[int, ...] = WARMUP_BATCH_SIZES, context: dict[str, Any] | None = None) -> Path:
    """Write TF Serving's warmup file: a TFRecord of `PredictionLog` predict requests, one per batch size
    for `serving_default` plus one for `predict_ids`, that TF Serving and ctrflow's server replay before a
    version takes traffic. Values cover the schema: tokens and blanks, numerics at every fitted bucket
    boundary and NaN (missing), so every transform branch runs once. Returns the file's path."""
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    path = Path(version_dir) / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)

    def numeric_column(name: str, n: int) -> np.ndarray:
        values = [float("nan"), *boundaries.get(name, ()), 0.0]
        return np.array([values[i % len(values)] for i in range(n)], np.float64)

    with tf.io.TFRecordWriter(str(path)) as writer:
        for n in batch_sizes:
            request = predict_pb2.PredictRequest()
            request.model_spec.signature_name = "serving_default"
            for f in schema.categorical:
                tokens = [b"" if i % 3 == 0 else b"w%d" % i for i in range(n)]
                request.inputs[input_name(f.name)].CopyFrom(tf.make_tensor_proto(tokens, tf.string, [n]))
            for f in schema.numeric:
                request.inputs[input_name(f.name)].CopyFrom(tf.make_tensor_proto(numeric_column(f.name, n), tf.float64, [n]))
            writer.write(prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)).SerializeToString())
        request = predict_pb2.PredictRequest()
        request.model_spec.signature_name = "predict_ids"
        n = batch_sizes[min(1, len(batch_sizes) - 1)]
        request.inputs["ids"].CopyFrom(tf.make_tensor_proto(np.zeros((n, len(schema.id_names)), np.int32), tf.int32))
        request.inputs["numeric"].CopyFrom(tf.make_tensor_proto(np.zeros((n, len(schema.numeric)), np.float32), tf.float32))
        writer.write(prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)).SerializeToString())
        if context is not None:  # one context row, a few candidates
            request = predict_pb2.PredictRequest()
            request.model_spec.signature_name = "serving_context"
            chosen, m = set(context["fields"]), 4
            for f in schema.categorical:
                k = 1 if f.name in chosen else m
                request.inputs[input_name(f.name)].CopyFrom(tf.make_tensor_proto([b"w%d" % i for i in range(k)], tf.string, [k]))
            for f in schema.numeric:
                k = 1 if f.name in chosen else m
                request.inputs[input_name(f.name)].CopyFrom(tf.make_tensor_proto(numeric_column(f.name, k), tf.float64, [k]))
            request.inputs[CONTEXT_ROW_INPUT].CopyFrom(tf.make_tensor_proto(np.zeros(m, np.int32), tf.int32))
            writer.write(prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)).SerializeToString())
    return path


def _context_signatures(module: Any, model: Any, schema: Schema, boundaries: dict[str, tuple[float, ...]],
                        context: dict[str, Any], raw_spec: dict[str, Any], correction: float) -> dict[str, Any]:
    """`serving_context` (raw) and `predict_context` (ids): context + candidates in one call."""
    import tensorflow as tf

    split = model.context_split(context["id_columns"], context["numeric_columns"])
    chosen = set(context["fields"])
    ctx_schema = _side_schema(schema, chosen)
    cand_schema = _side_schema(schema, set(schema.categorical_names + schema.numeric_names) - chosen)
    row_spec = tf.TensorSpec([None], tf.int32, name=CONTEXT_ROW_INPUT)

    def scored(logits):
        logits = logits + correction
        return {"probabilities": tf.sigmoid(logits), "logits": logits}

    def serve_context(features):
        c_ids, c_num = _raw_transform(features, ctx_schema, boundaries)
        k_ids, k_num = _raw_transform(features, cand_schema, boundaries)
        return scored(model.call_context(split, c_ids, c_num, k_ids, k_num, features[CONTEXT_ROW_INPUT]))

    def serve_context_ids(context_ids, context_numeric, ids, numeric, row):
        return scored(model.call_context(split, context_ids, context_numeric, ids, numeric, row))

    def serve_context_packed(context_strings, context_numbers, strings, numbers, row):
        c_ids, c_num = _raw_transform(_unpacked(ctx_schema, context_strings, context_numbers), ctx_schema, boundaries)
        k_ids, k_num = _raw_transform(_unpacked(cand_schema, strings, numbers), cand_schema, boundaries)
        return scored(model.call_context(split, c_ids, c_num, k_ids, k_num, row))

    c, k = split.context, split.candidate
    module.serve_context = tf.function(serve_context, input_signature=[{**raw_spec, CONTEXT_ROW_INPUT: row_spec}])
    module.serve_context_packed = tf.function(serve_context_packed, input_signature=[
        *_packed_spec(ctx_schema, "context_"), *_packed_spec(cand_schema), row_spec])
    module.serve_context_ids = tf.function(serve_context_ids, input_signature=[
        tf.TensorSpec([None, len(c.id_inputs)], tf.int32, name="context_ids"),
        tf.TensorSpec([None, len(c.numeric_inputs)], tf.float32, name="context_numeric"),
        tf.TensorSpec([None, len(k.id_inputs)], tf.int32, name="ids"),
        tf.TensorSpec([None, len(k.numeric_inputs)], tf.float32, name="numeric"),
        row_spec])
    return {"serving_context": module.serve_context.get_concrete_function(),
            "predict_context": module.serve_context_ids.get_concrete_function(),
            CONTEXT_PACKED_SIGNATURE: module.serve_context_packed.get_concrete_function()}


def _remove_stale_temps(base: Path) -> list[str]:
    """Remove the `.tmp-<version>-<pid>` / `.old-<version>-<pid>` folders of exports that died (their pid
    no longer runs): a killed export of a large model otherwise leaves gigabytes behind, forever. An
    overwrite killed between its two renames left the old version only as `.old-*`: it is put back."""
    from ctrflow.data.convert import _pid_alive

    removed = []
    for p in sorted(base.iterdir(), key=lambda p: p.name.startswith(".tmp")):  # .old first: restored before any .tmp goes
        parts = p.name.split("-")
        if len(parts) == 3 and parts[0] in (".tmp", ".old") and parts[2].isdigit() and p.is_dir() \
                and int(parts[2]) != os.getpid() and not _pid_alive(int(parts[2])):
            if parts[0] == ".old" and parts[1].isdigit() and not (base / parts[1]).exists():
                replace_atomically(p, base / parts[1])
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def _slim_tables(model: Any, dtype: str) -> None:
    """Replace every embedding/linear table of `model` by a copy in `dtype` (lookups widen to float32)."""
    import tensorflow as tf

    from ctrflow.models.layers import FieldTables

    for module in model.submodules:
        if isinstance(module, FieldTables):
            module.tables = [tf.Variable(tf.cast(t, dtype), name=t.name.split(":")[0], trainable=False) for t in module.tables]


def export(
    run: str | os.PathLike,
    model_base_path: str | os.PathLike,
    *,
    version: int | None = None,
    embedding_dtype: str = "float32",
    overwrite: bool = False,
    context_fields: Any = None,
    pack_tables: str = "auto",
) -> ExportSummary:
    """Export `run`'s latest checkpoint to `model_base_path/<version>/` (default: newest version + 1).

    Args:
        embedding_dtype: "float32" or "float16" (half the table bytes; report the AUC change with
            `ctrflow evaluate` on the export, see BENCHMARKS.md).
        overwrite: replace an existing folder of the same version.
        context_fields: feature fields sent once per request in context + candidates requests (adds the
            `serving_context` and `predict_context` signatures); None takes the schema's `context`
            list, an empty list exports none.
        pack_tables: "auto", "on" or "off": "on" serves from packed tables (the linear weight as the
            embedding table's last column, `CtrModel.pack_tables`: one gather per id instead of two; the
            same scores, bitwise for the kinds that slice the packed rows, within float32 rounding for FM,
            which sums them whole in another order); "auto" packs the kinds in `PACK_AUTO_KINDS` (where it measured faster, BENCHMARKS.md
            "Packed tables"); "off" keeps the two tables. Recorded as `packed_tables` in ctrflow.json.
    """
    import tensorflow as tf

    from ctrflow.train.checkpoints import restore_latest
    from ctrflow.train.core import build_model_from_run, load_run_info, logit_correction

    t0 = time.perf_counter()
    if embedding_dtype not in ("float32", "float16"):
        raise ConfigError(f"The 'embedding_dtype' option of export must be 'float32' or 'float16'. Got {embedding_dtype!r} instead.")
    if pack_tables not in PACK_MODES:
        raise ConfigError(f"The 'pack_tables' option of export must be one of {', '.join(PACK_MODES)}. Got {pack_tables!r} instead.")
    info = load_run_info(run)
    base = Path(model_base_path)
    if base.exists() and not base.is_dir():
        raise ConfigError(f"{base} is a file: the model base path (--model-base-path) must be a folder, whose "
                          "integer subfolders are the versions.")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
        raise ConfigError(f"The 'version' of export must be an int >= 0. Got {version!r} instead.")
    if version is not None and (base / str(version)).exists() and not overwrite:  # before minutes of model building
        raise ConfigError(f"{base / str(version)} already exists: pass another --version or --overwrite.")
    schema = Schema.from_dict(info["schema"])
    if context_fields is None:
        context_fields = schema.context
    if isinstance(context_fields, str):
        context_fields = [n.strip() for n in context_fields.split(",") if n.strip()]
    if context_fields:
        schema.check_context(context_fields)  # before the model is built: a typo fails at once
    boundaries = {k: tuple(v) for k, v in info["transforms"]["boundaries"].items()}
    model = build_model_from_run(info)
    try:
        checkpoint = restore_latest(run, model)
    except (tf.errors.OpError, ValueError) as e:  # a checkpoint file missing, truncated or of another model
        raise TrainingError(f"{run}: its latest checkpoint cannot be read ({str(e).strip()[:300]}); "
                            "nothing was exported.") from None
    model.bake_id_remap()  # min_count: rare ids read copies of their shared row, no remap gather when serving
    if embedding_dtype != "float32":
        _slim_tables(model, embedding_dtype)
    # after slimming: the packed table is built from the served (float16) copies
    packed = (pack_tables == "on" or (pack_tables == "auto" and model.kind in PACK_AUTO_KINDS)) and model.pack_tables()
    names = [input_name(f) for f in schema.categorical_names + schema.numeric_names]
    if len(set(names)) != len(names):
        raise ConfigError(f"field names collide as signature inputs: {names}; rename the fields in the schema.")

    base.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(base)
    existing = find_versions(base)
    version = version if version is not None else (existing[-1] + 1 if existing else 1)
    if not isinstance(version, int) or version < 0:
        raise ConfigError(f"The 'version' of export must be an int >= 0. Got {version!r} instead.")
    final = base / str(version)
    if final.exists() and not overwrite:
        raise ConfigError(f"{final} already exists: pass another --version or --overwrite.")

    raw_spec = {input_name(f.name): tf.TensorSpec([None], tf.string, name=input_name(f.name)) for f in schema.categorical}
    raw_spec.update({input_name(f.name): tf.TensorSpec([None], tf.float64, name=input_name(f.name)) for f in schema.numeric})
    n_ids, n_num = len(schema.id_names), len(schema.numeric)

    module = tf.Module()
    module.model = model
    # A run trained on negatives kept with probability R predicts odds 1/R too high: log(R) on the logit
    # is p / (p + (1 - p) / R), so served probabilities are calibrated on the un-sampled traffic.
    correction = logit_correction(info)

    def serve_raw(features):
        ids, numeric = _raw_transform(features, schema, boundaries)
        logits = model(ids, numeric, training=False) + correction
        return {"probabilities": tf.sigmoid(logits), "logits": logits}

    def serve_ids(ids, numeric):
        logits = model(ids, numeric, training=False) + correction
        return {"probabilities": tf.sigmoid(logits), "logits": logits}

    def serve_packed(strings, numbers):
        return serve_raw(_unpacked(schema, strings, numbers))

    def transform(features):
        ids, numeric = _raw_transform(features, schema, boundaries)
        return {"ids": ids, "numeric": numeric}

    module.serve_raw = tf.function(serve_raw, input_signature=[raw_spec])
    module.serve_ids = tf.function(serve_ids, input_signature=[tf.TensorSpec([None, n_ids], tf.int32, name="ids"),
                                                               tf.TensorSpec([None, n_num], tf.float32, name="numeric")])
    module.transform = tf.function(transform, input_signature=[raw_spec])
    module.serve_packed = tf.function(serve_packed, input_signature=_packed_spec(schema))
    signatures = {
        "serving_default": module.serve_raw.get_concrete_function(),
        "predict_ids": module.serve_ids.get_concrete_function(),
        "transform": module.transform.get_concrete_function(),
        PACKED_SIGNATURE: module.serve_packed.get_concrete_function(),
    }
    context = None
    if context_fields:
        context = context_layout(schema, context_fields)
        if CONTEXT_ROW_INPUT in raw_spec:
            raise ConfigError(f"a field's signature input is named {CONTEXT_ROW_INPUT!r}, the context signatures' "
                              "row input; rename the field to export context signatures.")
        signatures.update(_context_signatures(module, model, schema, boundaries, context, raw_spec, correction))
    tmp = base / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tf.saved_model.save(module, str(tmp), signatures=signatures)
        meta = {
            "format": "ctrflow-export", "version": version, "run": str(run), "checkpoint": checkpoint,
            "schema": info["schema"], "schema_fingerprint": info["schema_fingerprint"], "transforms": info["transforms"],
            "feature_spec": info["feature_spec"], "model": info["config"]["model"], "embedding_dtype": embedding_dtype,
            "packed_tables": bool(packed),
            "negative_sampling_rate": info["config"].get("negative_sampling_rate", 1.0), "logit_correction": correction,
            "inputs": {f: input_name(f) for f in schema.categorical_names + schema.numeric_names},
            "created_unix": time.time(),
        }
        if context is not None:
            meta["context"] = context
        (tmp / EXPORT_INFO).write_text(json.dumps(meta, indent=1))
        write_warmup_requests(tmp, schema, boundaries, context=context)
        fsync_tree(tmp)  # the version's bytes on disk before its name (the rename below syncs the base folder)
        if final.exists():  # overwrite: the old version goes aside only once the new one is complete, in one rename
            old = base / f".old-{version}-{os.getpid()}"
            os.replace(final, old)
            replace_atomically(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            replace_atomically(tmp, final)
    except (OSError, tf.errors.OpError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"export to {final} failed ({str(e).strip()[:300]}); nothing was published.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ckpt_bytes = sum(Path(p).stat().st_size for p in tf.io.gfile.glob(checkpoint + ".*"))
    export_bytes = _dir_bytes(final)
    return ExportSummary(
        path=str(final), version=version, export_bytes=export_bytes, checkpoint_bytes=ckpt_bytes,
        export_vs_checkpoint=export_bytes / max(ckpt_bytes, 1), embedding_dtype=embedding_dtype,
        signatures=sorted(signatures), seconds=time.perf_counter() - t0, packed_tables=bool(packed),
    )
