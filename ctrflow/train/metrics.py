"""Offline CTR metrics in pure numpy: exact AUC, logloss, normalized entropy, calibration, per-slice.

`MetricsAccumulator` collects predictions batch by batch (float32, about 12 bytes a row) so AUC stays
exact, not a bucketed approximation, on millions of rows.

Conventions shared by every function:
- `labels`: clicks in {0, 1} (values in between are read as fractional clicks), shape `[n]`.
- `probs` / `scores`: predicted click probabilities (AUC accepts any finite score), shape `[n]`.
- `weights`: optional non-negative row weights, shape `[n]`; None means 1 for every row.
- Undefined values come back as NaN rather than raising: AUC with only one class present, NE when the
  observed CTR is 0 or 1, calibration with no clicks, and every metric on zero rows.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

__all__ = [
    "auc",
    "logloss",
    "normalized_entropy",
    "calibration",
    "reliability",
    "expected_calibration_error",
    "evaluate_predictions",
    "per_slice",
    "MetricsAccumulator",
]


def _arrays(labels, probs, weights, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"{name}: labels and predictions need the same length; got {y.shape[0]} and {p.shape[0]}.")
    if weights is None:
        return y, p, None
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != y.shape:
        raise ValueError(f"{name}: weights need one value per row; got {w.shape[0]} for {y.shape[0]} rows.")
    return y, p, w


def auc(labels, scores, weights=None) -> float:
    """Exact area under the ROC curve, ties counted as half (the Mann-Whitney U statistic / (P N)).

    Sort-based, O(n log n). Rows with equal scores form one group; within a group each positive wins
    against the negatives ranked below and half of those tied with it, which equals average-rank
    Mann-Whitney. With weights, every (positive, negative) pair counts with weight w_pos * w_neg.

    Example:
        >>> auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        0.75

    Returns NaN when there are no positives or no negatives (weighted).
    """
    y, s, w = _arrays(labels, scores, weights, "auc")
    if np.isnan(s).any():
        raise ValueError("auc: scores contain NaN; a NaN prediction cannot be ranked.")
    if y.size == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    s = s[order]
    y = y[order]
    w = np.ones_like(y) if w is None else w[order]
    pos = w * y
    neg = w - pos
    # Start index of each run of equal scores.
    starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
    pos_g = np.add.reduceat(pos, starts)
    neg_g = np.add.reduceat(neg, starts)
    total_pos, total_neg = pos_g.sum(), neg_g.sum()
    if total_pos <= 0 or total_neg <= 0:
        return float("nan")
    neg_below = np.cumsum(neg_g) - neg_g
    return float(np.dot(pos_g, neg_below + 0.5 * neg_g) / (total_pos * total_neg))


def logloss(labels, probs, weights=None, eps: float = 1e-7) -> float:
    """Mean (weighted) binary cross-entropy in nats; probabilities are clipped to [eps, 1 - eps].

    Example:
        >>> round(logloss([1, 0], [0.9, 0.2]), 6)  # -(ln 0.9 + ln 0.8) / 2
        0.164252
    """
    y, p, w = _arrays(labels, probs, weights, "logloss")
    if y.size == 0:
        return float("nan")
    p = np.clip(p, eps, 1.0 - eps)
    losses = -(y * np.log(p) + (1.0 - y) * np.log1p(-p))
    return _mean(losses, w)


def _mean(values: np.ndarray, w: np.ndarray | None) -> float:
    if w is None:
        return float(values.mean()) if values.size else float("nan")
    total = w.sum()
    return float(np.dot(values, w) / total) if total > 0 else float("nan")


def _entropy(rate: float) -> float:
    if not 0.0 < rate < 1.0:
        return 0.0
    return float(-(rate * np.log(rate) + (1.0 - rate) * np.log1p(-rate)))


def normalized_entropy(labels, probs, weights=None, eps: float = 1e-7) -> float:
    """Logloss divided by the entropy of the observed CTR (He et al. 2014, "Practical lessons ...").

    1.0 is a model no better than always predicting the observed CTR; lower is better. NaN when the
    observed CTR is 0 or 1 (the baseline entropy is 0).

    Example:
        >>> round(normalized_entropy([1, 0, 0, 0], [0.25] * 4), 6)
        1.0
    """
    y, p, w = _arrays(labels, probs, weights, "normalized_entropy")
    base = _entropy(_mean(y, w)) if y.size else 0.0
    if base == 0.0:
        return float("nan")
    return logloss(y, p, w, eps) / base


def calibration(labels, probs, weights=None) -> float:
    """Mean prediction / observed CTR (weighted): 1.0 is calibrated, > 1 over-predicts clicks.

    NaN when there are no clicks (or no rows).

    Example:
        >>> calibration([1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5])
        2.0
    """
    y, p, w = _arrays(labels, probs, weights, "calibration")
    clicks = float(y.sum() if w is None else np.dot(y, w))
    if clicks <= 0:
        return float("nan")
    predicted = float(p.sum() if w is None else np.dot(p, w))
    return predicted / clicks


def reliability(labels, probs, weights=None, *, bins: int = 10) -> list[dict[str, float | int]]:
    """The reliability diagram's points: rows sorted by prediction, cut into `bins` groups of equal
    (weighted) size, each with its mean prediction and observed CTR. Equal-mass bins, not equal-width:
    CTR predictions crowd below a few percent, where equal-width bins would leave one bin with all rows.

    Each point: {"predicted", "observed", "rows", "weight", "low", "high"} (low/high: the bin's prediction
    range). A calibrated model has observed == predicted in every bin.

    Example:
        >>> [round(b["observed"], 2) for b in reliability([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], bins=2)]
        [0.0, 1.0]
    """
    y, p, w = _arrays(labels, probs, weights, "reliability")
    if y.size == 0:
        return []
    order = np.argsort(p, kind="stable")
    y, p = y[order], p[order]
    w = np.ones_like(y) if w is None else w[order]
    cum = np.cumsum(w)
    total = float(cum[-1])
    if total <= 0:
        return []
    edges = np.searchsorted(cum, np.linspace(0, total, bins + 1)[1:-1], side="right")
    out = []
    for part in np.split(np.arange(y.size), edges):
        if not len(part):
            continue
        ww = w[part]
        sw = float(ww.sum())
        if sw <= 0:
            continue
        out.append({"predicted": float(np.dot(p[part], ww) / sw), "observed": float(np.dot(y[part], ww) / sw),
                    "rows": int(len(part)), "weight": sw, "low": float(p[part[0]]), "high": float(p[part[-1]])})
    return out


def expected_calibration_error(points: list[dict[str, float | int]]) -> float:
    """Weighted mean |observed - predicted| over reliability points (NaN without points)."""
    total = sum(b["weight"] for b in points)
    if not total:
        return float("nan")
    return float(sum(b["weight"] * abs(b["observed"] - b["predicted"]) for b in points) / total)


def evaluate_predictions(labels, probs, weights=None) -> dict[str, float | int]:
    """All metrics at once: `auc, logloss, ne, calibration` (floats, NaN where undefined) and
    `rows` (row count) and `positives` (number of clicks, the sum of labels rounded) as ints.

    Example:
        >>> m = evaluate_predictions([0, 1, 1, 0], [0.2, 0.7, 0.6, 0.4])
        >>> m["auc"], m["rows"], m["positives"]
        (1.0, 4, 2)
    """
    y, p, w = _arrays(labels, probs, weights, "evaluate_predictions")
    return {
        "auc": auc(y, p, w),
        "logloss": logloss(y, p, w),
        "ne": normalized_entropy(y, p, w),
        "calibration": calibration(y, p, w),
        "rows": int(y.size),
        "positives": int(round(float(y.sum()))),
    }


def _scalar_key(value: Any) -> Any:
    # numpy scalars -> Python scalars, so results compare, print and serialize as plain values.
    return value.item() if isinstance(value, np.generic) else value


def per_slice(labels, probs, slice_values, weights=None, *, min_rows: int = 100) -> dict[Any, dict]:
    """`evaluate_predictions` for each distinct value of `slice_values` (e.g. one ids column).

    Slices with fewer than `min_rows` rows are left out (their metrics would be noise); set 1 to keep
    all. Keys are plain Python values, in sorted order; each row is sorted once, O(n log n) overall.

    Example:
        >>> per_slice([0, 1, 1, 0], [0.2, 0.7, 0.6, 0.4], ["a", "a", "b", "b"], min_rows=1)["a"]["auc"]
        1.0
    """
    y, p, w = _arrays(labels, probs, weights, "per_slice")
    keys = np.asarray(slice_values).reshape(-1)
    if keys.shape != y.shape:
        raise ValueError(f"per_slice: slice_values need one value per row; got {keys.shape[0]} for {y.shape[0]} rows.")
    if y.size == 0:
        return {}
    values, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.concatenate(([0], np.cumsum(counts)))
    out: dict[Any, dict] = {}
    for i in np.flatnonzero(counts >= min_rows):
        rows = order[bounds[i] : bounds[i + 1]]
        out[_scalar_key(values[i])] = evaluate_predictions(y[rows], p[rows], None if w is None else w[rows])
    return out


class _Buffer:
    """A growing 1-D numpy array (capacity doubles), so appending n rows costs amortized O(n)."""

    def __init__(self, dtype) -> None:
        self.data = np.empty(1024, dtype=dtype)
        self.size = 0

    def append(self, values: np.ndarray) -> None:
        need = self.size + values.shape[0]
        if values.dtype != self.data.dtype and np.result_type(self.data.dtype, values.dtype) != self.data.dtype:
            # e.g. longer strings than seen so far: widen instead of silently truncating.
            self.data = self.data.astype(np.result_type(self.data.dtype, values.dtype))
        if need > self.data.shape[0]:
            grown = np.empty(max(need, 2 * self.data.shape[0]), dtype=self.data.dtype)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[self.size : need] = values
        self.size = need

    def view(self) -> np.ndarray:
        return self.data[: self.size]


class MetricsAccumulator:
    """Collects (label, prediction, weight, slice values) batch by batch for exact metrics at the end.

    Predictions, labels and weights are kept as float32 (12 bytes a row: 1M rows = 12 MB), plus one
    array per slice field. Weights are stored only once a batch brings them (earlier rows count 1).

    Example:
        >>> acc = MetricsAccumulator()
        >>> acc.add([0, 1], [0.2, 0.7], slices={"site": [3, 3]})
        >>> acc.add([1, 0], [0.6, 0.4], slices={"site": [5, 5]})
        >>> acc.result()["auc"], acc.per_slice("site", min_rows=1)[3]["auc"]
        (1.0, 1.0)
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every row added so far."""
        self._labels = _Buffer(np.float32)
        self._probs = _Buffer(np.float32)
        self._weights: _Buffer | None = None
        self._slice_names: tuple[str, ...] | None = None  # fixed by the first batch
        self._slices: dict[str, _Buffer] = {}

    @property
    def rows(self) -> int:
        return self._labels.size

    def add(self, labels, probs, weights=None, slices: Mapping[str, Any] | None = None) -> None:
        """Append one batch. `slices` maps a field name to that field's value per row; every batch
        must bring the same field names (the first batch fixes them)."""
        y = np.asarray(labels, dtype=np.float32).reshape(-1)
        p = np.asarray(probs, dtype=np.float32).reshape(-1)
        n = y.shape[0]
        if p.shape[0] != n:
            raise ValueError(f"MetricsAccumulator.add: labels and predictions need the same length; got {n} and {p.shape[0]}.")
        names = tuple(sorted(slices)) if slices else ()
        if self._slice_names is not None and names != self._slice_names:
            raise ValueError(
                f"MetricsAccumulator.add: every batch needs the same slice fields; the first batch had "
                f"{list(self._slice_names)}, this one {list(names)}."
            )
        columns = {}
        for name in names:
            column = np.asarray(slices[name]).reshape(-1)
            if column.shape[0] != n:
                raise ValueError(f"MetricsAccumulator.add: slice {name!r} has {column.shape[0]} values for {n} rows.")
            columns[name] = column
        if weights is not None:
            w = np.asarray(weights, dtype=np.float32).reshape(-1)
            if w.shape[0] != n:
                raise ValueError(f"MetricsAccumulator.add: weights have {w.shape[0]} values for {n} rows.")
        # Everything is checked: only now change state, so a rejected batch leaves no partial rows.
        self._slice_names = names
        if weights is not None:
            if self._weights is None:
                self._weights = _Buffer(np.float32)
                self._weights.append(np.ones(self.rows, dtype=np.float32))
            self._weights.append(w)
        elif self._weights is not None:
            self._weights.append(np.ones(n, dtype=np.float32))
        self._labels.append(y)
        self._probs.append(p)
        for name, column in columns.items():
            if name not in self._slices:
                self._slices[name] = _Buffer(column.dtype)
            self._slices[name].append(column)

    def _weights_view(self) -> np.ndarray | None:
        return None if self._weights is None else self._weights.view()

    def result(self) -> dict[str, float | int]:
        """`evaluate_predictions` over every row added."""
        return evaluate_predictions(self._labels.view(), self._probs.view(), self._weights_view())

    def reliability(self, *, bins: int = 10) -> list[dict[str, float | int]]:
        """`reliability` over every row added."""
        return reliability(self._labels.view(), self._probs.view(), self._weights_view(), bins=bins)

    def per_slice(self, name: str, *, min_rows: int = 100) -> dict[Any, dict]:
        """`per_slice` over every row added, for the slice field `name` given to `add`."""
        if name not in (self._slice_names or ()):
            raise KeyError(f"No slice field {name!r} was added; fields: {list(self._slice_names or ())}.")
        column = self._slices[name].view() if name in self._slices else np.empty(0)
        return per_slice(self._labels.view(), self._probs.view(), column, self._weights_view(), min_rows=min_rows)
