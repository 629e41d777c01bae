"""Tests for ctrflow/train/metrics.py: exact AUC, logloss, NE, calibration, slices, accumulator."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ctrflow.train.metrics import (
    MetricsAccumulator,
    auc,
    calibration,
    evaluate_predictions,
    logloss,
    normalized_entropy,
    per_slice,
)


def brute_force_auc(labels, scores, weights=None) -> float:
    """Every (positive, negative) pair: win 1, tie 1/2, weighted by w_pos * w_neg."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    weights = np.ones(len(labels)) if weights is None else np.asarray(weights, dtype=np.float64)
    pos = np.flatnonzero(labels == 1)
    neg = np.flatnonzero(labels == 0)
    sp, sn = scores[pos][:, None], scores[neg][None, :]
    pair_w = weights[pos][:, None] * weights[neg][None, :]
    wins = (sp > sn) + 0.5 * (sp == sn)
    return float((wins * pair_w).sum() / pair_w.sum())


def test_auc_equals_brute_force_pairwise_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 300))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        scores = rng.integers(0, 8, n) / 8.0  # few distinct values: many ties
        assert auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)


def test_auc_equals_brute_force_pairwise_with_weights_and_ties():
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(2, 300))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        scores = np.round(rng.random(n), 1)
        weights = rng.random(n) * 3
        assert auc(labels, scores, weights) == pytest.approx(brute_force_auc(labels, scores, weights), abs=1e-12)


def test_auc_integer_weights_equal_repeated_rows():
    labels = np.array([0, 1, 1, 0, 1])
    scores = np.array([0.3, 0.3, 0.9, 0.5, 0.1])
    weights = np.array([2, 1, 3, 1, 2])
    assert auc(labels, scores, weights) == pytest.approx(
        auc(np.repeat(labels, weights), np.repeat(scores, weights)), abs=1e-12
    )


def test_auc_known_values():
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert auc([0, 1], [0.2, 0.9]) == 1.0
    assert auc([0, 1], [0.9, 0.2]) == 0.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_auc_is_invariant_to_monotone_transforms_and_row_order():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 1000)
    scores = rng.random(1000)
    perm = rng.permutation(1000)
    base = auc(labels, scores)
    assert auc(labels, np.log(scores) * 3 + 1) == pytest.approx(base, abs=1e-12)
    assert auc(labels[perm], scores[perm]) == pytest.approx(base, abs=1e-12)


def test_auc_on_a_million_rows_is_exact_and_fast():
    rng = np.random.default_rng(3)
    n = 1_000_000
    labels = (rng.random(n) < 0.05).astype(np.float32)
    scores = (rng.random(n) * 0.5 + labels * 0.1).astype(np.float32)
    value = auc(labels, scores)
    # Analytic: P(U1 + 0.1 > U2) for U ~ Uniform(0, 0.5) is 1 - 0.5 * 0.8^2 = 0.68.
    assert value == pytest.approx(0.68, abs=0.005)


def test_single_class_gives_nan_without_crashing():
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([0, 0], [0.1, 0.2]))
    assert math.isnan(auc([], []))
    assert math.isnan(normalized_entropy([0, 0], [0.1, 0.2]))
    assert math.isnan(calibration([0, 0], [0.1, 0.2]))
    m = evaluate_predictions([0, 0, 0], [0.1, 0.2, 0.3])
    assert math.isnan(m["auc"]) and math.isnan(m["ne"]) and m["positives"] == 0 and m["rows"] == 3
    assert math.isfinite(m["logloss"])


def test_auc_rejects_nan_scores():
    with pytest.raises(ValueError, match="NaN"):
        auc([0, 1], [0.1, float("nan")])


def test_logloss_against_hand_computed_values():
    assert logloss([1, 0], [0.9, 0.2]) == pytest.approx(-(math.log(0.9) + math.log(0.8)) / 2, rel=1e-12)
    weighted = -(3 * math.log(0.9) + 1 * math.log(0.8)) / 4
    assert logloss([1, 0], [0.9, 0.2], weights=[3, 1]) == pytest.approx(weighted, rel=1e-12)


def test_logloss_clips_certain_wrong_predictions():
    value = logloss([1, 0], [0.0, 1.0], eps=1e-7)
    assert value == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_normalized_entropy_against_hand_computed_values():
    labels = [1, 0, 0, 0]
    probs = [0.6, 0.1, 0.2, 0.1]
    ll = -(math.log(0.6) + math.log(0.9) + math.log(0.8) + math.log(0.9)) / 4
    base = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert normalized_entropy(labels, probs) == pytest.approx(ll / base, rel=1e-12)
    # Predicting the base rate everywhere scores exactly 1.
    assert normalized_entropy(labels, [0.25] * 4) == pytest.approx(1.0, rel=1e-12)


def test_calibration_is_mean_prediction_over_observed_ctr():
    assert calibration([1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(2.0)
    assert calibration([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(1.0)
    # Weighted: sum(w p) / sum(w y) = (0.4 * 3 + 0.1 * 1) / 3
    assert calibration([1, 0], [0.4, 0.1], weights=[3, 1]) == pytest.approx(1.3 / 3)


def test_evaluate_predictions_has_all_keys():
    m = evaluate_predictions([0, 1, 1, 0], [0.2, 0.7, 0.6, 0.4])
    assert set(m) == {"auc", "logloss", "ne", "calibration", "rows", "positives"}
    assert m["auc"] == 1.0 and m["rows"] == 4 and m["positives"] == 2
    assert m["calibration"] == pytest.approx(1.9 / 2)


def test_per_slice_matches_metrics_on_each_subset_and_drops_small_slices():
    rng = np.random.default_rng(4)
    n = 2000
    labels = rng.integers(0, 2, n)
    probs = rng.random(n)
    site = rng.choice([3, 5, 7], size=n, p=[0.5, 0.49, 0.01])
    result = per_slice(labels, probs, site, min_rows=50)
    assert 7 not in result and set(result) == {3, 5}
    for value in (3, 5):
        mask = site == value
        expected = evaluate_predictions(labels[mask], probs[mask])
        assert result[value]["rows"] == int(mask.sum())
        for key in ("auc", "logloss", "ne", "calibration"):
            assert result[value][key] == pytest.approx(expected[key], rel=1e-12)
    assert all(type(k) is int for k in result)  # plain Python keys


def test_per_slice_with_string_values_and_weights():
    result = per_slice([0, 1, 1, 0], [0.2, 0.7, 0.6, 0.9], ["a", "a", "b", "b"], weights=[1, 2, 1, 1], min_rows=1)
    assert result["a"]["auc"] == 1.0 and result["b"]["auc"] == 0.0
    assert result["a"]["calibration"] == pytest.approx((0.2 + 1.4) / 2)


def test_accumulator_equals_one_shot():
    rng = np.random.default_rng(5)
    n = 10_000
    labels = rng.integers(0, 2, n).astype(np.float32)
    probs = rng.random(n).astype(np.float32)
    weights = rng.random(n).astype(np.float32)
    site = rng.integers(0, 4, n)
    acc = MetricsAccumulator()
    for start in range(0, n, 777):
        sl = slice(start, start + 777)
        acc.add(labels[sl], probs[sl], weights[sl], slices={"site": site[sl]})
    assert acc.rows == n
    one_shot = evaluate_predictions(labels, probs, weights)
    result = acc.result()
    for key in one_shot:
        assert result[key] == pytest.approx(one_shot[key], rel=1e-12)
    sliced = acc.per_slice("site", min_rows=1)
    assert sliced == per_slice(labels, probs, site, weights, min_rows=1)


def test_accumulator_weights_arriving_later_count_earlier_rows_as_one():
    acc = MetricsAccumulator()
    acc.add([0, 1], [0.2, 0.8])
    acc.add([1, 0], [0.3, 0.6], weights=[2.0, 1.0])
    expected = evaluate_predictions([0, 1, 1, 0], [0.2, 0.8, 0.3, 0.6], [1, 1, 2, 1])
    assert acc.result()["auc"] == pytest.approx(expected["auc"])
    assert acc.result()["logloss"] == pytest.approx(expected["logloss"], rel=1e-6)


def test_accumulator_rejects_changing_slice_fields_and_keeps_its_rows():
    acc = MetricsAccumulator()
    acc.add([0, 1], [0.2, 0.8], slices={"site": [1, 2]})
    with pytest.raises(ValueError, match="same slice fields"):
        acc.add([0, 1], [0.2, 0.8], slices={"app": [1, 2]})
    with pytest.raises(ValueError, match="weights"):
        acc.add([0, 1], [0.2, 0.8], weights=[1.0], slices={"site": [1, 2]})
    assert acc.rows == 2
    with pytest.raises(KeyError, match="app"):
        acc.per_slice("app")


def test_empty_accumulator_does_not_crash():
    acc = MetricsAccumulator()
    m = acc.result()
    assert m["rows"] == 0 and math.isnan(m["auc"]) and math.isnan(m["logloss"])


def test_reliability_bins_are_equal_mass_ordered_and_calibrated_for_a_calibrated_model():
    from ctrflow.train.metrics import expected_calibration_error, reliability

    rng = np.random.default_rng(4)
    p = rng.uniform(0.001, 0.2, 20_000)
    y = (rng.random(20_000) < p).astype(np.float32)  # drawn from p: calibrated by construction
    pts = reliability(y, p, bins=10)
    assert [b["rows"] for b in pts] == [2_000] * 10
    assert all(a["high"] <= b["low"] for a, b in zip(pts, pts[1:]))
    assert expected_calibration_error(pts) < 0.01
    twice = reliability(y, p * 2, bins=10)  # a model predicting double: every bin over-predicts
    assert all(b["predicted"] > b["observed"] for b in twice) and expected_calibration_error(twice) > 0.05
    w = np.where(np.arange(20_000) % 2 == 0, 2.0, 0.0)  # weights: only the even rows count, twice
    weighted = reliability(y, p, w, bins=5)
    even = reliability(y[::2], p[::2], bins=5)
    for a, b in zip(weighted, even):
        assert a["predicted"] == pytest.approx(b["predicted"]) and a["observed"] == pytest.approx(b["observed"])
    assert reliability([], []) == []
