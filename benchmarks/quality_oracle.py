"""How much of the gap to the Bayes-optimal logloss can any model close at this data size? Oracle models
that know the synthetic sets' generating structure, fitted on the same 150k training rows.

Both synthetic sets are drawn from a known hidden model (ctrflow/data/generate.py; benchmarks/quality_data.py);
this script rebuilds every row's parts of the true logit (per-id main effects, pairwise terms, numeric
effects) from the same seeds and checks them against the CSVs' `true_ctr`. Then it fits, by maximum a
posteriori (L-BFGS on the full objective, to convergence), models that are given more or less of the truth:

- `main effects estimated`: the true logit except the per-id main effects, which are estimated (Gaussian
  prior with each field's true variance; an id not in train reads 0, the prior mean); nothing else is left
  to learn, so its gap is what estimating the ids' own effects costs at this size, however good the model;
- `interactions estimated`: main effects and numerics true, the true pairs' latent vectors (or crossed
  weights) estimated with their true prior;
- `structure known, all estimated`: the true functional form, every parameter estimated (main effects,
  the true pairs only, numeric effects by their true shapes with fitted coefficients; true prior variances);
- `... one L2 on valid`: the same, with one prior variance for everything chosen on the validation split
  instead of the true per-field ones;
- `LR, true crosses`: a logistic regression on one-hot ids + one-hot crosses of exactly the true pairs +
  20 quantile bins per numeric (and the true numeric x category cross), one L2 chosen on valid — what a
  peer that was told the pairs would fit.

Each row's gap is divided by the best peer's gap (bench_quality's cached peers, or --peer-gap) — the
`gap ratio` the issue asks to be <= 0.5.

    python benchmarks/quality_oracle.py --work /tmp/quality2 [--datasets synthetic,zipfmix] [--rows 150000 --test-rows 60000]

Prints a table per dataset, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.optimize
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import quality_common  # noqa: E402

SPLITS = ("train", "valid", "test")


# --- the truth, rebuilt row by row --------------------------------------------------------------------
@dataclass
class Truth:
    """Per split: labels, the true logit and its parts; per field the value ids (any hashable int)."""

    y: dict[str, np.ndarray]
    logit: dict[str, np.ndarray]
    ids: dict[str, dict[str, np.ndarray]]  # split -> field -> int64 id
    main: dict[str, np.ndarray]  # split -> sum of per-id main effects
    inter: dict[str, np.ndarray]  # split -> sum of pairwise terms
    numeric: dict[str, np.ndarray]  # split -> numeric effects (incl. their category crosses) + bias
    main_var: dict[str, float]  # field -> prior variance of one id's main effect
    fm_pairs: list[tuple[str, str]]  # pairs with a latent inner product
    fm_var: dict[str, float]  # field -> prior variance of one latent component
    fm_k: int
    cross_pairs: list[tuple[str, str, float]]  # pairs with a free weight per value pair (prior variance)
    basis: dict[str, list[np.ndarray]]  # split -> numeric basis columns (coefficients fitted)
    slope: tuple[str, float]  # (field, prior var): per-value slope on slope_x
    slope_x: dict[str, np.ndarray]
    bins: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # split -> numeric -> raw value (nan = missing)


def _check(truth_p: np.ndarray, csv_p: np.ndarray, what: str, tol: float) -> None:
    err = float(np.max(np.abs(truth_p - csv_p)))
    if err > tol:
        raise SystemExit(f"error: rebuilt true CTR of {what} differs from the CSV by {err:.2e}")


def synthetic_truth(ds: quality_common.Dataset) -> Truth:
    import pandas as pd

    from ctrflow.data import generate as g

    n_train = sum(1 for _ in open(ds.csv["train"])) - 1
    n_valid = sum(1 for _ in open(ds.csv["valid"])) - 1
    n_test = sum(1 for _ in open(ds.csv["test"])) - 1
    model = g._DayModel(1, 0)  # bench_quality: GenerateOptions(rows=..., seed=1), one day
    draws = {"train": g._draw_rows(1, 0, 0, n_train, g._ROWS), "held": g._draw_rows(1, 0, 0, n_valid + n_test, g._TEST_ROWS)}
    cut = {"train": ("train", 0, n_train), "valid": ("held", 0, n_valid), "test": ("held", n_valid, n_valid + n_test)}
    t = Truth({}, {}, {}, {}, {}, {}, {f.name: f.weight_scale ** 2 for f in g._CATEGORICAL}, list(g._PAIRS),
              {k: v ** 2 for k, v in g._VECTOR_SCALE.items()}, g._LATENT_SIZE, [], {}, ("C17", 1.0 * 0.25 ** 2), {})
    for split, (src, a, b) in cut.items():
        d = draws[src]
        d = g._Draws([c[a:b] for c in d.cat_ids], [c[a:b] for c in d.counts], [m[a:b] for m in d.num_missing], d.click_u[a:b])
        main = np.zeros(b - a)
        vec = {}
        for f, ids in zip(g._CATEGORICAL, d.cat_ids):
            main += model._lookup(f, ids, "linear")
            if f.name in g._VECTOR_SCALE:
                vec[f.name] = model._lookup(f, ids, "vector")
        inter = sum(np.einsum("ij,ij->i", vec[x], vec[y]) for x, y in g._PAIRS)
        c17 = d.cat_ids[g._CAT_INDEX["C17"]]
        c17i = np.minimum(c17, len(model._c17_slope) - 1).astype(np.int64)
        num = g._numeric_effects(d, model._c17_slope[c17i]) + model.bias
        logit = np.clip(main + inter + num, -g._LOGIT_CLIP, g._LOGIT_CLIP)
        csv = pd.read_csv(ds.csv[split], usecols=["click", "true_ctr"])
        _check(g._round_significant(1 / (1 + np.exp(-logit))), csv["true_ctr"].to_numpy(float), f"synthetic {split}", 1e-6)
        t.y[split] = csv["click"].to_numpy(float)
        t.logit[split], t.main[split], t.inter[split], t.numeric[split] = logit, main, inter, num
        t.ids[split] = {f.name: ids.astype(np.int64) for f, ids in zip(g._CATEGORICAL, d.cat_ids)}
        x = {f.name: np.sign(c) * np.log1p(np.abs(c)) for f, c in zip(g._NUMERIC, d.counts)}
        miss = {f.name: m for f, m in zip(g._NUMERIC, d.num_missing)}

        def pres(name: str, v: np.ndarray) -> np.ndarray:
            return np.where(miss[name], 0.0, v)

        t.basis[split] = [pres("I1", np.tanh(x["I1"] - 0.7)), miss["I1"].astype(float), pres("I3", (x["I3"] < 1.2).astype(float)),
                          pres("I5", np.tanh(1.5 * (x["I5"] - 8.5))), miss["I5"].astype(float),
                          pres("I7", np.exp(-((x["I7"] - 1.6) ** 2))), pres("I11", np.minimum(x["I11"], 1.8))]
        t.slope_x[split] = pres("I13", np.minimum(x["I13"], 4.0) - 1.5)
        t.bins[split] = {f.name: np.where(m, np.nan, c.astype(float)) for f, c, m in zip(g._NUMERIC, d.counts, d.num_missing)}
    return t


def zipfmix_truth(ds: quality_common.Dataset) -> Truth:
    import pandas as pd

    import quality_data as q

    model = q.HiddenModel(0)
    model.calibrate(*q.draw(np.random.default_rng([0, 99]), 200_000))
    names = [f"c{i}" for i in range(len(q.FIELDS))]
    fm_var = {}
    for a, b, s in q.LOW_RANK_PAIRS:  # s * <ua, ub> / sqrt(3): components of variance s / sqrt(3) each side
        fm_var[names[a]] = fm_var[names[b]] = s / math.sqrt(3)
    t = Truth({}, {}, {}, {}, {}, {}, {n: s ** 2 for n, (_, _, s) in zip(names, q.FIELDS)},
              [(names[a], names[b]) for a, b, _ in q.LOW_RANK_PAIRS], fm_var, 3,
              [(names[a], names[b], s ** 2) for a, b, s in q.CROSS_PAIRS], {}, ("c9", 0.6 ** 2), {})
    for split in SPLITS:
        n = sum(1 for _ in open(ds.csv[split])) - 1
        rng = np.random.default_rng([0, {"train": 1, "valid": 2, "test": 3}[split]])
        ranks, num = q.draw(rng, n)
        main = sum(model.main[f][r] for f, r in enumerate(ranks))
        inter = sum(s * np.sum(ua[ranks[a]] * ub[ranks[b]], axis=1) / math.sqrt(3) for a, b, ua, ub, s in model.low)
        inter = inter + sum(w[ranks[a], ranks[b]] for a, b, w in model.cross)
        logit = model.logit(ranks, num)
        csv = pd.read_csv(ds.csv[split], usecols=["click", "true_ctr"])
        _check(np.round(1 / (1 + np.exp(-logit)), 7), csv["true_ctr"].to_numpy(float), f"zipfmix {split}", 2e-7)
        t.y[split] = csv["click"].to_numpy(float)
        t.logit[split], t.main[split], t.inter[split] = logit, main, inter
        t.numeric[split] = logit - main - inter
        t.ids[split] = {nm: r.astype(np.int64) for nm, r in zip(names, ranks)}
        n0, n1, n2 = num[:, 0], num[:, 1], num[:, 2]
        t.basis[split] = [np.where(np.isnan(n0), 0.0, np.sin(2.0 * np.log1p(np.nan_to_num(n0)))), np.isnan(n0).astype(float),
                          np.exp(-((n1 - 50.0) / 8.0) ** 2)]
        t.slope_x[split] = np.clip(n2 - 1.0, -2, 4)
        t.bins[split] = {"n0": n0, "n1": n1, "n2": n2}
    return t


# --- one MAP fitter: intercept + sparse linear columns + latent pairs, Gaussian priors -------------------
class Index:
    """Dense indices of one id field over every split (an id seen only in valid/test keeps its prior mean)."""

    def __init__(self, per_split: dict[str, np.ndarray]) -> None:
        self.values, inv = np.unique(np.concatenate([per_split[s] for s in SPLITS]), return_inverse=True)
        sizes = np.cumsum([0] + [len(per_split[s]) for s in SPLITS])
        self.idx = {s: inv[sizes[i]:sizes[i + 1]] for i, s in enumerate(SPLITS)}
        self.n = len(self.values)


def one_hot(ix: Index, split: str) -> sp.csr_matrix:
    n = len(ix.idx[split])
    return sp.csr_matrix((np.ones(n), (np.arange(n), ix.idx[split])), shape=(n, ix.n))


@dataclass
class Design:
    X: dict[str, sp.csr_matrix]  # split -> linear columns
    var: np.ndarray  # prior variance per column
    fm: list[tuple[Index, float]] = field(default_factory=list)  # latent tables: (ids, prior variance per component)
    pairs: list[tuple[int, int]] = field(default_factory=list)  # indices into fm
    k: int = 4
    offset: dict[str, np.ndarray] | None = None


def fit(d: Design, y: np.ndarray, *, seed: int = 0, maxiter: int = 400, log=None) -> np.ndarray:
    """MAP parameters: minimize sum logloss + sum w^2 / (2 var) (the intercept unpenalized), L-BFGS."""
    X = d.X["train"]
    XT = X.T.tocsr()
    n, p = X.shape
    off = d.offset["train"] if d.offset is not None else np.zeros(n)
    A = [one_hot(ix, "train") for ix, _ in d.fm]
    AT = [a.T.tocsr() for a in A]
    sizes = [ix.n * d.k for ix, _ in d.fm]
    rng = np.random.default_rng(seed)
    theta0 = [np.array([math.log(y.mean() / (1 - y.mean()))]), np.zeros(p)]
    for (ix, v), a in zip(d.fm, A):
        seen = np.asarray(a.sum(axis=0)).ravel() > 0
        theta0.append((rng.normal(0, 0.3 * math.sqrt(v), (ix.n, d.k)) * seen[:, None]).ravel())
    theta0 = np.concatenate(theta0)
    inv_var = 1.0 / d.var

    def unpack(theta):
        b, w = theta[0], theta[1:1 + p]
        tabs, o = [], 1 + p
        for (ix, _), s in zip(d.fm, sizes):
            tabs.append(theta[o:o + s].reshape(ix.n, d.k))
            o += s
        return b, w, tabs

    def f(theta):
        b, w, tabs = unpack(theta)
        rows = [a @ t for a, t in zip(A, tabs)]  # per-row latent vectors
        z = off + b + X @ w
        for i, j in d.pairs:
            z = z + np.sum(rows[i] * rows[j], axis=1)
        ll = np.sum(np.logaddexp(0, z) - y * z)
        g = 1 / (1 + np.exp(-z)) - y
        loss = ll + 0.5 * np.sum(w * w * inv_var)
        gw = XT @ g + w * inv_var
        grows = [np.zeros_like(r) for r in rows]
        for i, j in d.pairs:
            grows[i] += g[:, None] * rows[j]
            grows[j] += g[:, None] * rows[i]
        gt = []
        for (ix, v), at, t, gr in zip(d.fm, AT, tabs, grows):
            loss += 0.5 * np.sum(t * t) / v
            gt.append((at @ gr + t / v).ravel())
        return loss / n, np.concatenate([[g.sum()], gw, *gt]) / n

    t0, it = time.perf_counter(), [0]

    def progress(theta):
        it[0] += 1
        if log and it[0] % 100 == 0:
            log(f"      iteration {it[0]}: objective {f(theta)[0]:.6f} ({time.perf_counter() - t0:.0f} s)")

    r = scipy.optimize.minimize(f, theta0, jac=True, method="L-BFGS-B", callback=progress,
                                options={"maxiter": maxiter, "maxfun": maxiter * 2, "ftol": 1e-10, "gtol": 1e-6})
    if log:
        log(f"      {r.nit} iterations, objective {r.fun:.6f}, {time.perf_counter() - t0:.0f} s: {r.message}")
    return r.x


def predict_logit(d: Design, theta: np.ndarray, split: str) -> np.ndarray:
    X = d.X[split]
    p = X.shape[1]
    z = (d.offset[split] if d.offset is not None else 0.0) + theta[0] + X @ theta[1:1 + p]
    o, rows = 1 + p, []
    for ix, _ in d.fm:
        t = theta[o:o + ix.n * d.k].reshape(ix.n, d.k)
        rows.append(t[ix.idx[split]])
        o += ix.n * d.k
    for i, j in d.pairs:
        z = z + np.sum(rows[i] * rows[j], axis=1)
    return z


def logloss(y: np.ndarray, z: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0, z) - y * z))


# --- the oracle designs -----------------------------------------------------------------------------
def _stack(blocks: list[dict[str, sp.spmatrix]], variances: list[np.ndarray]) -> tuple[dict[str, sp.csr_matrix], np.ndarray]:
    X = {s: sp.hstack([b[s] for b in blocks], format="csr") for s in SPLITS}
    return X, np.concatenate(variances) if variances else np.zeros(0)


def _main_block(t: Truth, var: float | None = None):
    blocks, variances = [], []
    for f in t.ids["train"]:
        ix = Index({s: t.ids[s][f] for s in SPLITS})
        blocks.append({s: one_hot(ix, s) for s in SPLITS})
        variances.append(np.full(ix.n, t.main_var[f] if var is None else var))
    return blocks, variances


def _cross_ids(t: Truth, a: str, b: str, split: str) -> np.ndarray:
    return t.ids[split][a] * (1 << 32) + t.ids[split][b]


def _cross_block(t: Truth, pairs, var: float | None = None):
    blocks, variances = [], []
    for a, b, v in pairs:
        ix = Index({s: _cross_ids(t, a, b, s) for s in SPLITS})
        blocks.append({s: one_hot(ix, s) for s in SPLITS})
        variances.append(np.full(ix.n, v if var is None else var))
    return blocks, variances


def _numeric_block(t: Truth, var: float | None = None):
    cols = {s: sp.csr_matrix(np.stack(t.basis[s], axis=1)) for s in SPLITS}
    f, v = t.slope
    ix = Index({s: t.ids[s][f] for s in SPLITS})
    slope = {s: sp.diags(t.slope_x[s]) @ one_hot(ix, s) for s in SPLITS}
    return [cols, slope], [np.full(len(t.basis["train"]), 100.0), np.full(ix.n, v if var is None else var)]


def _fm(t: Truth, scale: float = 1.0):
    """Latent tables of the true FM pairs' fields, prior variance `scale` x the true one."""
    fields = sorted({f for p in t.fm_pairs for f in p})
    tabs = [(Index({s: t.ids[s][f] for s in SPLITS}), scale * t.fm_var[f]) for f in fields]
    return tabs, [(fields.index(a), fields.index(b)) for a, b in t.fm_pairs]


def _bins_block(t: Truth, bins: int = 20):
    """20 quantile bins per numeric (+ a missing bin), and the true numeric x category cross on those bins."""
    blocks, variances = [], []
    binned = {s: {} for s in SPLITS}
    for name, v in t.bins["train"].items():
        fin = v[np.isfinite(v)]
        edges = np.unique(np.quantile(fin, np.linspace(0, 1, bins + 1)[1:-1]))
        for s in SPLITS:
            x = t.bins[s][name]
            binned[s][name] = np.where(np.isfinite(x), np.searchsorted(edges, np.nan_to_num(x), side="right"), -1)
        ix = Index({s: binned[s][name] for s in SPLITS})
        blocks.append({s: one_hot(ix, s) for s in SPLITS})
        variances.append(np.ones(ix.n))
    f, _ = t.slope
    num = {"C17": "I13", "c9": "n2"}[f]
    ix = Index({s: t.ids[s][f] * 64 + binned[s][num] + 1 for s in SPLITS})
    blocks.append({s: one_hot(ix, s) for s in SPLITS})
    variances.append(np.ones(ix.n))
    return blocks, variances


def oracles(t: Truth, *, grid: tuple[float, ...], lr_grid: tuple[float, ...], log) -> list[dict]:
    rows = []
    y = t.y["train"]

    def run(name: str, make, note: str, choose: tuple[float, ...] = (), label: str = "") -> float | None:
        t0 = time.perf_counter()
        best = None
        for v in (choose or (None,)):
            d = make(v)
            theta = fit(d, y, log=log)
            vl = logloss(t.y["valid"], predict_logit(d, theta, "valid"))
            if best is None or vl < best[0]:
                best = (vl, v, logloss(t.y["test"], predict_logit(d, theta, "test")), d.X["train"].shape[1] + sum(ix.n * d.k for ix, _ in d.fm))
            log(f"    {name} {label}={v}: valid {vl:.5f}")
        vl, v, te, params = best
        rows.append({"model": name + (f" ({label}={v:g} on valid)" if choose else ""), "valid_logloss": vl,
                     "logloss": te, "parameters": params, "note": note, "seconds": time.perf_counter() - t0})
        log(f"  {rows[-1]['model']}: test {te:.5f}")
        return v

    def main_only(v):
        X, var = _stack(*_main_block(t))
        return Design(X, var, offset={s: t.inter[s] + t.numeric[s] for s in SPLITS})

    def inter_only(c):  # c scales the true prior variances of the pairwise parameters
        blocks, variances = _cross_block(t, [(a, b, c * v) for a, b, v in t.cross_pairs])
        empty = {s: sp.csr_matrix((len(t.y[s]), 0)) for s in SPLITS}
        X, var = _stack([empty, *blocks], [np.zeros(0), *variances])
        tabs, pairs = _fm(t, c)
        return Design(X, var, tabs, pairs, t.fm_k, offset={s: t.main[s] + t.numeric[s] for s in SPLITS})

    def structure(c):
        b1, v1 = _main_block(t)
        b2, v2 = _cross_block(t, [(a, b, c * v) for a, b, v in t.cross_pairs])
        b3, v3 = _numeric_block(t)
        X, var = _stack(b1 + b2 + b3, v1 + v2 + v3)
        tabs, pairs = _fm(t, c)
        return Design(X, var, tabs, pairs, t.fm_k)

    def lr_crosses(v):
        b1, v1 = _main_block(t, v)
        allpairs = [(a, b, 0.0) for a, b in t.fm_pairs] + list(t.cross_pairs)
        b2, v2 = _cross_block(t, allpairs, v)
        b3, v3 = _bins_block(t)
        X, var = _stack(b1 + b2 + b3, v1 + v2 + [x * v for x in v3])
        return Design(X, var)

    run("main effects estimated, the rest true", main_only,
        "true logit minus the per-id main effects, MAP-estimated with their true prior (unseen ids: 0)")
    c = run("interactions estimated, the rest true", inter_only,
            "true main effects and numerics; the true pairs' latent vectors / cross weights MAP-estimated, "
            "prior variance = c x the true one, c on valid (MAP with the true prior itself overfits the vectors)",
            choose=grid, label="c")
    run("structure known, all estimated", lambda _: structure(c),
        f"true functional form (true pairs only, numeric shapes), every parameter MAP-estimated: true priors, pairwise ones x c={c:g}")
    run("LR, one-hot + crosses of the true pairs + 20 bins", lr_crosses,
        "L2 logistic regression on exactly the true pairs crossed (a weight per value pair), C on valid", choose=lr_grid, label="C")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="synthetic,zipfmix")
    ap.add_argument("--rows", type=int, default=150_000)
    ap.add_argument("--test-rows", type=int, default=60_000)
    ap.add_argument("--max-buckets", type=int, default=1 << 17, help="as bench_quality was run (locates its cached dataset)")
    ap.add_argument("--work", default="/tmp/ctrflow-bench-quality", help="bench_quality's --work (datasets and cached peers)")
    ap.add_argument("--grid", default="0.3,0.1", help="multipliers of the pairwise parameters' true prior variances, tried on valid")
    ap.add_argument("--lr-grid", default="0.03,0.1,0.3", help="the LR's prior variances (= scikit-learn's C) tried on valid")
    ap.add_argument("--peer-gap", help="name=gap,... the best peer's test gap when no cached peers exist")
    ap.add_argument("--ctrflow", help="name=logloss,... the best ctrflow model's test logloss, shown for reference")
    a = ap.parse_args(argv)
    grid = tuple(float(x) for x in a.grid.split(","))
    given = dict(kv.split("=") for kv in a.peer_gap.split(",")) if a.peer_gap else {}
    ours = dict(kv.split("=") for kv in a.ctrflow.split(",")) if a.ctrflow else {}
    out = {}

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    for name in a.datasets.split(","):
        root = Path(a.work) / name
        ds = quality_common.prepare(name, root, rows=a.rows, test_rows=a.test_rows, max_buckets=a.max_buckets)
        bayes = ds.bayes["test"]
        peers = []
        for p in sorted(root.glob("peer-*.json")):
            peers += json.loads(p.read_text())
        best_peer = min(peers, key=lambda r: r["logloss"], default=None)
        peer_gap = float(given[name]) if name in given else (best_peer["logloss"] - bayes if best_peer else math.nan)
        log(f"{name}: rebuilding the truth")
        t = {"synthetic": synthetic_truth, "zipfmix": zipfmix_truth}[name](ds)
        rows = [{"model": "Bayes-optimal (true probabilities)", "logloss": logloss(t.y["test"], t.logit["test"]), "note": "the floor"}]
        rows += oracles(t, grid=grid, lr_grid=tuple(float(x) for x in a.lr_grid.split(",")), log=log)
        if name in ours:
            rows.append({"model": "ctrflow, best default model (given)", "logloss": float(ours[name])})
        if best_peer:
            rows.append({"model": f"best peer: {best_peer['model']}", "logloss": best_peer["logloss"]})
        for r in rows:
            r["gap"] = r["logloss"] - bayes
            r["gap_ratio_to_best_peer"] = r["gap"] / peer_gap if peer_gap > 0 else math.nan
        out[name] = {"bayes_test": bayes, "best_peer_gap": peer_gap, "train_rows": int(len(t.y["train"])), "rows": rows}
        print(f"\n### {name} (Bayes-optimal test logloss {bayes:.5f}; best peer's gap {peer_gap:.5f})\n")
        print("| model | test logloss | gap to Bayes | gap / best peer's gap |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['logloss']:.5f} | {r['gap']:.5f} | {r['gap_ratio_to_best_peer']:.2f} |")
    print(json.dumps({"bench": "quality_oracle", "rows": a.rows, "results": out}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
