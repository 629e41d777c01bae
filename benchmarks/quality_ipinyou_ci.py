"""Is ctrflow's miss on iPinYou (best default model vs scikit-learn's LR) more than the noise of its 50 test
positives? A paired bootstrap of the per-row logloss difference on the test split.

Trains `ctrflow train --model M` (defaults; bench_quality's split: the given train, its last 10% validating)
and scikit-learn's LogisticRegression as bench_quality fits it (hashed one-hot, C from its cached peer result
or --sklearn-c), scores every test row with both, then resamples the test rows (with replacement, paired)
and reports the difference's mean and percentile interval. Also, as a diagnostic only (fitted on the test
labels, so never a model setting): each model's logloss after refitting one intercept shift on test — what
is left of the difference once the 4x train -> test drop in CTR (a different day: weekday 1 vs 4) is taken
out of both alike.

    python benchmarks/quality_ipinyou_ci.py --work /tmp/quality2/inf [--model fm] [--resamples 10000]

Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_quality  # noqa: E402
import quality_common  # noqa: E402


def ctrflow_test_predictions(ds: quality_common.Dataset, model: str, work: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predictions) of the default `model` on the test shards, in row order."""
    from ctrflow.data.pipeline import PipelineOptions, open_batches
    from ctrflow.train.checkpoints import restore_latest
    from ctrflow.train.core import build_model_from_run, load_run_info, logit_correction, make_predict
    from ctrflow.train.loop import train

    run = work / f"ci-{model}"
    shutil.rmtree(run, ignore_errors=True)
    train(ds.shards["train"], run, bench_quality.default_config(model), valid=ds.shards["valid"])
    info = load_run_info(run)
    m = build_model_from_run(info)
    restore_latest(run, m)
    predict = make_predict(m, info["feature_spec"], logit_correction(info))
    ys, ps = [], []
    with open_batches(ds.shards["test"], PipelineOptions(batch_size=16384, shuffle=False)) as batches:
        for b in batches:
            ps.append(predict(b.ids, b.numeric).numpy())
            ys.append(b.label)
    shutil.rmtree(run, ignore_errors=True)
    return np.concatenate(ys).astype(float), np.concatenate(ps).astype(float)


def sklearn_test_predictions(ds: quality_common.Dataset, C: float) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.feature_extraction import FeatureHasher
    from sklearn.linear_model import LogisticRegression

    tok = bench_quality.Tokens(ds)
    hasher = FeatureHasher(n_features=1 << 20, input_type="string", alternate_sign=False)

    def matrix(split: str):
        cols = tok.columns(split)
        return hasher.transform(zip(*(np.char.add(f"{n}=", cols[n]) for n in cols)))

    m = LogisticRegression(C=C, max_iter=2000, solver="lbfgs", tol=1e-6).fit(matrix("train"), tok.label("train"))
    return tok.label("test"), m.predict_proba(matrix("test"))[:, 1]


def row_logloss(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def intercept_refit(y: np.ndarray, p: np.ndarray) -> float:
    """Logloss after the best single logit shift (bisection on the score equation mean(p') = mean(y))."""
    z = np.log(np.clip(p, 1e-7, 1 - 1e-7) / np.clip(1 - p, 1e-7, 1))
    lo, hi = -10.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if np.mean(1 / (1 + np.exp(-(z + mid)))) > y.mean():
            hi = mid
        else:
            lo = mid
    return float(row_logloss(y, 1 / (1 + np.exp(-(z + (lo + hi) / 2)))).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/ctrflow-bench-quality", help="bench_quality's --work (dataset and cached peers)")
    ap.add_argument("--model", default="fm", help="the ctrflow model (defaults) compared")
    ap.add_argument("--sklearn-c", type=float, help="C of the LR (default: the one its cached peer result chose)")
    ap.add_argument("--resamples", type=int, default=10_000)
    a = ap.parse_args(argv)
    root = Path(a.work) / "ipinyou"
    ds = quality_common.prepare("ipinyou", root, rows=150_000, test_rows=60_000, max_buckets=1 << 17)
    C = a.sklearn_c
    if C is None:
        cache = root / "peer-sklearn.json"
        C = float(re.search(r"C=([0-9.e-]+)", json.loads(cache.read_text())[0]["model"]).group(1)) if cache.exists() else 1.0
    y1, p_ct = ctrflow_test_predictions(ds, a.model, root)
    y2, p_sk = sklearn_test_predictions(ds, C)
    if not np.array_equal(y1, y2):
        raise SystemExit("error: the shards' test rows are not in the CSV's order")
    l_ct, l_sk = row_logloss(y1, p_ct), row_logloss(y1, p_sk)
    d = l_ct - l_sk
    rng = np.random.default_rng(0)
    n = len(d)
    boot = np.array([d[i].mean() for i in (rng.integers(0, n, n) for _ in range(a.resamples))])
    pos = y1 > 0
    lo, hi = np.percentile(boot, [2.5, 97.5])
    res = {
        "test_rows": int(n), "test_positives": int(pos.sum()), "model": a.model, "sklearn_C": C,
        "ctrflow_logloss": float(l_ct.mean()), "sklearn_logloss": float(l_sk.mean()), "difference": float(d.mean()),
        "ci95": [float(lo), float(hi)], "share_of_resamples_ctrflow_better": float(np.mean(boot < 0)),
        "difference_on_positives": float(d[pos].sum() / n), "difference_on_negatives": float(d[~pos].sum() / n),
        "ctrflow_logloss_intercept_refit": intercept_refit(y1, p_ct), "sklearn_logloss_intercept_refit": intercept_refit(y1, p_sk),
        "calibration": {"ctrflow": float(p_ct.mean() / y1.mean()), "sklearn": float(p_sk.mean() / y1.mean())},
    }
    print(f"\n### iPinYou test: ctrflow {a.model} (defaults) vs scikit-learn LR (C={C:g}), {n} rows, {int(pos.sum())} positives\n")
    print("| | ctrflow | scikit-learn | difference (ctrflow - sklearn) |")
    print("|---|---|---|---|")
    print(f"| test logloss | {res['ctrflow_logloss']:.5f} | {res['sklearn_logloss']:.5f} | {res['difference']:+.5f} "
          f"(95% paired bootstrap CI {lo:+.5f} .. {hi:+.5f}; ctrflow better in {100 * res['share_of_resamples_ctrflow_better']:.0f}% of resamples) |")
    print(f"| of which positives / negatives | | | {res['difference_on_positives']:+.5f} / {res['difference_on_negatives']:+.5f} |")
    print(f"| calibration | {res['calibration']['ctrflow']:.2f} | {res['calibration']['sklearn']:.2f} | |")
    print(f"| logloss, one intercept refit on test (diagnostic) | {res['ctrflow_logloss_intercept_refit']:.5f} | "
          f"{res['sklearn_logloss_intercept_refit']:.5f} | {res['ctrflow_logloss_intercept_refit'] - res['sklearn_logloss_intercept_refit']:+.5f} |")
    print(json.dumps({"bench": "quality_ipinyou_ci", **res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
