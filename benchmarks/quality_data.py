"""A second synthetic CTR generator for the quality benchmark, built unlike `ctrflow generate`.

`ctrflow generate` hides an FM-shaped truth over Criteo-like hex tokens; a model tuned on it alone could
overfit that shape. This one draws string tokens (`c0_1a2b`) from Zipf laws over cardinalities up to 100k,
and its logit mixes per-value main effects, two low-rank (FM-like) interactions between large fields,
two full-table crosses between small fields (what `-q` in Vowpal Wabbit or a cross network learns),
non-monotone numeric effects (a sine, a bump, a slope that depends on a category) and an effect of
missingness. Every row carries its true CTR, so the Bayes-optimal logloss is known.

    python benchmarks/quality_data.py --rows 300000 --out /tmp/zipfmix/train.csv
    python benchmarks/quality_data.py --rows 100000 --out /tmp/zipfmix/test.csv --split test
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

# (cardinality, Zipf exponent, main-effect stddev): a few fields carry most of the signal.
FIELDS = [
    (100_000, 1.05, 0.45), (30_000, 1.1, 0.35), (10_000, 1.15, 0.5), (3_000, 1.2, 0.3), (1_000, 1.1, 0.4),
    (300, 1.2, 0.35), (100, 1.0, 0.3), (30, 1.1, 0.25), (10, 0.9, 0.3), (4, 0.5, 0.2),
]
LOW_RANK_PAIRS = [(0, 4, 0.55), (2, 6, 0.6)]  # <u_a, u_b> with latent size 3, scaled
CROSS_PAIRS = [(5, 8, 0.8), (7, 9, 1.0)]  # a free N(0, s^2) weight per value pair
TARGET_CTR = 0.04
COLUMNS = ["click", "true_ctr", *(f"c{i}" for i in range(len(FIELDS))), "n0", "n1", "n2"]


def _zipf_ranks(rng: np.random.Generator, n: int, card: int, exponent: float) -> np.ndarray:
    p = 1.0 / np.arange(1, card + 1) ** exponent
    cdf = np.cumsum(p / p.sum())
    return np.minimum(np.searchsorted(cdf, rng.random(n)), card - 1)


class HiddenModel:
    """The truth: all weights drawn once from `seed` (independent of rows and split)."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng([seed, 17])
        self.main = [rng.normal(0, s, card) for card, _, s in FIELDS]
        self.perm = [rng.permutation(card) for card, _, _ in FIELDS]  # token ids unrelated to frequency rank
        self.low = [(a, b, rng.normal(0, 1, (FIELDS[a][0], 3)), rng.normal(0, 1, (FIELDS[b][0], 3)), s)
                    for a, b, s in LOW_RANK_PAIRS]
        self.cross = [(a, b, rng.normal(0, s, (FIELDS[a][0], FIELDS[b][0]))) for a, b, s in CROSS_PAIRS]
        self.slope = rng.normal(0, 0.6, FIELDS[9][0])
        self.bias = 0.0

    def logit(self, ranks: list[np.ndarray], num: np.ndarray) -> np.ndarray:
        z = np.zeros(len(num), np.float64)
        for f, r in enumerate(ranks):
            z += self.main[f][r]
        for a, b, ua, ub, s in self.low:
            z += s * np.sum(ua[ranks[a]] * ub[ranks[b]], axis=1) / math.sqrt(3)
        for a, b, w in self.cross:
            z += w[ranks[a], ranks[b]]
        n0, n1, n2 = num[:, 0], num[:, 1], num[:, 2]
        z += np.where(np.isnan(n0), 0.3, 0.7 * np.sin(2.0 * np.log1p(np.nan_to_num(n0))))  # non-monotone, missing
        z += 0.8 * np.exp(-((n1 - 50.0) / 8.0) ** 2)  # a bump in the middle of the range
        z += self.slope[ranks[9]] * np.clip((n2 - 1.0), -2, 4)  # slope set by a category
        return z + self.bias

    def calibrate(self, ranks: list[np.ndarray], num: np.ndarray) -> None:
        """Bisection on the bias so the mean true CTR is TARGET_CTR."""
        z0 = self.logit(ranks, num) - self.bias
        lo, hi = -15.0, 5.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if np.mean(1 / (1 + np.exp(-(z0 + mid)))) > TARGET_CTR:
                hi = mid
            else:
                lo = mid
        self.bias = (lo + hi) / 2


def draw(rng: np.random.Generator, n: int) -> tuple[list[np.ndarray], np.ndarray]:
    ranks = [_zipf_ranks(rng, n, card, e) for card, e, _ in FIELDS]
    n0 = rng.lognormal(1.0, 1.2, n)
    n0[rng.random(n) < 0.05] = np.nan
    n1 = rng.uniform(0, 100, n).round()
    n2 = rng.exponential(1.0, n)
    return ranks, np.stack([n0, n1, n2], axis=1)


def generate(out: str | os.PathLike, rows: int, *, seed: int = 0, split: str = "train") -> dict:
    """Write `rows` rows (header `COLUMNS`) to `out` atomically; returns rows, CTR and Bayes logloss."""
    import pandas as pd

    from ctrflow.atomic import atomic_writer

    if rows < 1:
        raise SystemExit(f"error: --rows must be >= 1, got {rows}")
    model = HiddenModel(seed)
    model.calibrate(*draw(np.random.default_rng([seed, 99]), 200_000))
    rng = np.random.default_rng([seed, {"train": 1, "valid": 2, "test": 3}[split]])
    ranks, num = draw(rng, rows)
    p = 1 / (1 + np.exp(-model.logit(ranks, num)))
    y = (rng.random(rows) < p).astype(np.int8)
    cols = {"click": y, "true_ctr": np.round(p, 7)}
    for f, r in enumerate(ranks):
        tok = model.perm[f][r]
        cols[f"c{f}"] = np.char.add(f"c{f}_", np.char.mod("%x", tok * 2654435761 % (1 << 32)))
    cols["n0"] = np.round(num[:, 0], 3)
    cols["n1"] = num[:, 1].astype(np.int64)
    cols["n2"] = np.round(num[:, 2], 4)
    df = pd.DataFrame(cols, columns=COLUMNS)
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    bayes = float(-np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc)))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(out, "w") as f:
        df.to_csv(f, index=False, na_rep="")
    return {"path": str(out), "rows": rows, "mean_ctr": float(y.mean()), "bayes_logloss": bayes, "split": split, "seed": seed}


def schema_for(train_csv: str | os.PathLike):
    """The inferred schema (label `click`), with `true_ctr` carried as an extra for Bayes metrics."""
    from dataclasses import replace

    from ctrflow.schema import infer_schema

    s = infer_schema(train_csv, label="click", ignore=["true_ctr"], name="zipfmix")
    return replace(s, ignore=(), extras=("true_ctr",))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", choices=["train", "valid", "test"], default="train")
    a = ap.parse_args(argv)
    print(json.dumps(generate(a.out, a.rows, seed=a.seed, split=a.split)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
