"""Evaluate a trained run on shards: exact AUC, logloss, normalized entropy, calibration (overall and per
prediction bin: the reliability diagram), per-slice metrics.

Predictions are the served ones: a run trained with negative sampling is corrected back to the
un-sampled rate (`train.core.logit_correction`), exactly as its export is. When the data carries the
synthetic generator's `true_ctr`, the Bayes-optimal logloss of the same rows is reported too, so a
model's distance from the best possible is known.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ctrflow.data.pipeline import PipelineOptions, open_batches
from ctrflow.errors import ConfigError, SchemaError
from ctrflow.train.checkpoints import restore_latest
from ctrflow.train.core import build_model_from_run, load_run_info, logit_correction, make_predict, write_errors
from ctrflow.train.metrics import MetricsAccumulator, expected_calibration_error, logloss

__all__ = ["evaluate", "plot_reliability"]


def evaluate(
    run: str | os.PathLike,
    data: str | os.PathLike | Any,
    *,
    batch_size: int = 16384,
    slice_by: str | None = None,
    min_slice_rows: int = 100,
    reliability_bins: int = 10,
    reliability_png: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Metrics of `run`'s latest checkpoint on `data` (a shard folder, "-" or a binary stream).

    Returns {"auc", "logloss", "ne", "calibration", "rows", "positives", "checkpoint"}, "reliability"
    (equal-mass prediction bins: predicted vs observed CTR) and "calibration_error" (their weighted mean
    |observed - predicted|), plus "bayes_logloss" / "logloss_gap" when the data has `true_ctr`, and
    "slices" {value: metrics} when `slice_by` names a field (categorical/numeric: by id) or the schema's
    time column. `reliability_png`: also draw the reliability diagram there (written atomically).
    """
    info = load_run_info(run)
    model = build_model_from_run(info)
    checkpoint = restore_latest(run, model)
    predict = make_predict(model, info["feature_spec"], logit_correction(info))
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
    points = acc.reliability(bins=reliability_bins)
    result["reliability"] = points
    result["calibration_error"] = expected_calibration_error(points)
    result["negative_sampling_rate"] = info["config"].get("negative_sampling_rate", 1.0)
    if true_ctr:
        tc = np.clip(np.concatenate(true_ctr), 1e-7, 1 - 1e-7)
        result["bayes_logloss"] = logloss(np.concatenate(labels), tc)
        result["logloss_gap"] = result["logloss"] - result["bayes_logloss"]
    if slicer:
        result["slices"] = {str(k): v for k, v in acc.per_slice(slice_by, min_rows=min_slice_rows).items()}
    if reliability_png is not None:
        plot_reliability(points, reliability_png, title=f"{Path(run).name} on {data}", calibration=result["calibration"])
        result["reliability_png"] = str(reliability_png)
    return result


def plot_reliability(points: list[dict[str, Any]], path: str | os.PathLike, *, title: str = "", calibration: float | None = None) -> None:
    """The reliability diagram: observed CTR against mean prediction per bin, on log axes (CTRs span
    decades), the diagonal being perfect calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctrflow.atomic import atomic_writer

    fig, ax = plt.subplots(figsize=(6, 5.5), dpi=100)
    pts = [b for b in points if b["predicted"] > 0]
    if pts:
        pred = np.array([b["predicted"] for b in pts])
        obs = np.array([b["observed"] for b in pts])
        floor = min(pred.min(), obs[obs > 0].min() if (obs > 0).any() else pred.min()) / 2
        lo, hi = floor, max(pred.max(), obs.max()) * 1.5
        ax.plot([lo, hi], [lo, hi], "--", color="gray", label="perfectly calibrated")
        ax.plot(pred, np.maximum(obs, floor), "o-", color="tab:blue", label="model (equal-mass bins)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.legend(loc="upper left")
    else:
        ax.text(0.5, 0.5, "no predictions", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("mean predicted CTR in bin")
    ax.set_ylabel("observed CTR in bin")
    cal = f" — calibration {calibration:.3f}" if calibration is not None and np.isfinite(calibration) else ""
    ax.set_title(f"reliability {title}{cal}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    with write_errors(str(path)):
        with atomic_writer(path) as f:
            fig.savefig(f, format="png")
    plt.close(fig)


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
