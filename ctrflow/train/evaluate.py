"""Evaluate a trained run on shards: exact AUC, logloss, normalized entropy, calibration, per-slice metrics.

When the data carries the synthetic generator's `true_ctr`, the Bayes-optimal logloss of the same rows
is reported too, so a model's distance from the best possible is known.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ctrflow.data.pipeline import PipelineOptions, open_batches
from ctrflow.errors import ConfigError, SchemaError
from ctrflow.train.loop import build_model_from_run, load_run_info, restore_latest
from ctrflow.train.metrics import MetricsAccumulator, logloss

__all__ = ["evaluate"]


def evaluate(
    run: str | os.PathLike,
    data: str | os.PathLike | Any,
    *,
    batch_size: int = 16384,
    slice_by: str | None = None,
    min_slice_rows: int = 100,
) -> dict[str, Any]:
    """Metrics of `run`'s latest checkpoint on `data` (a shard folder, "-" or a binary stream).

    Returns {"auc", "logloss", "ne", "calibration", "rows", "positives", "checkpoint"} plus
    "bayes_logloss" / "logloss_gap" when the data has `true_ctr`, and "slices" {value: metrics} when
    `slice_by` names a field (categorical/numeric: by id) or the schema's time column.
    """
    import tensorflow as tf

    info = load_run_info(run)
    model = build_model_from_run(info)
    checkpoint = restore_latest(run, model)
    n_ids, n_num = len(info["feature_spec"]["id_names"]), len(info["feature_spec"]["numeric_names"])
    predict = tf.function(lambda ids, numeric: tf.sigmoid(model(ids, numeric, training=False)),
                          input_signature=[tf.TensorSpec([None, n_ids], tf.int32), tf.TensorSpec([None, n_num], tf.float32)])
    acc = MetricsAccumulator()
    true_ctr: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    with open_batches(data, PipelineOptions(batch_size=batch_size, shuffle=False)) as batches:
        if batches.schema.fingerprint() != info["schema_fingerprint"] or batches.spec.to_dict() != info["feature_spec"]:
            raise SchemaError(
                f"{data} was converted with another schema or other transforms than the data {run} was trained on: "
                "convert it with --like the training data."
            )
        schema = batches.schema
        slicer = _slicer(schema, slice_by)
        extra_ix = schema.extras.index("true_ctr") if "true_ctr" in schema.extras else None
        for b in batches:
            p = predict(b.ids, b.numeric).numpy()
            acc.add(b.label, p, b.weight, slices={slice_by: slicer(b)} if slicer else None)
            if extra_ix is not None and b.extras is not None:
                true_ctr.append(b.extras[:, extra_ix])
                labels.append(b.label)
    result: dict[str, Any] = {**acc.result(), "checkpoint": checkpoint}
    if true_ctr:
        tc = np.clip(np.concatenate(true_ctr), 1e-7, 1 - 1e-7)
        result["bayes_logloss"] = logloss(np.concatenate(labels), tc)
        result["logloss_gap"] = result["logloss"] - result["bayes_logloss"]
    if slicer:
        result["slices"] = {str(k): v for k, v in acc.per_slice(slice_by, min_rows=min_slice_rows).items()}
    return result


def _slicer(schema: Any, slice_by: str | None):
    if slice_by is None:
        return None
    if slice_by == schema.time:
        return lambda b: b.time
    if slice_by in schema.id_names:
        j = schema.id_names.index(slice_by)
        return lambda b: b.ids[:, j]
    raise ConfigError(
        f"Cannot slice by {slice_by!r}: name a field ({', '.join(schema.id_names)}) or the time column ({schema.time})."
    )
