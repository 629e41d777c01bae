"""Refit a trained model's per-id scalar weights to convergence on the full L2-penalized training logloss.

What it fits: the linear table (every id field's weight; each normalized numeric's weight, times its value),
the hashed cross table (ctrflow.models.cross; it stores w / cross_scale, the refit works on w itself) and the
output bias (unpenalized). Everything else (embeddings, FFM vectors, pair weights, the MLP) is frozen: its part
of each training row's logit is a fixed offset, computed once by one forward pass of the model.

Why: a few early-stopped LazyAdam epochs leave the per-id weights short of the optimum of the penalized objective
(its gradient's max-norm 57-125 at the trained weights of zipfmix FFM + 4 crosses, ~1 after the refit). Measured
(BENCHMARKS.md, "Refit of the per-id weights"): valid and test lower for every model on both synthetic sets
(-0.0002 to -0.0009 test), far from halving the best peer's gap; so `TrainConfig.refit` is an option, off.

How: block-coordinate Newton. Within one id field (one cross pair) each row touches exactly one table row, so
that block's Hessian is diagonal and every id's Newton step is exact given the rest:
`g_i = sum_{rows of i} w (p - y) x + lam th_i`, `h_i = sum w p (1 - p) x^2 + lam` (x = 1 for an id, the value
for a value-weighted row), step `-g / h` clipped to `MAX_STEP` (a trust region in logit units), the block's step
halved while it does not lower the objective; closed-form centring steps along the directions that leave every
logit unchanged (`_fit`). Blocks cycle until the objective's relative change is below `tol`. The penalty
`lam / 2 * sum w^2` (the cross table: `lam_cross`) is on sums over rows (scikit-learn's 1/C); both are chosen on
the validation split's logloss by walks over a grid (`refit`).

Memory: per training row, its offset, one table row per id field and per cross pair (int32) and the normalized
numerics — 150k rows x 39 fields: ~30 MB. At larger sizes a block needs one pass over those columns (kept on
disk, not recomputed) per block per sweep: (fields + numerics + pairs + 1) x sweeps passes; a Jacobi variant
(every block from one pass, damped by the number of blocks) would need one pass per sweep. Not built.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ctrflow.errors import ConfigError
from ctrflow.validation import Float, Int, check_fields

__all__ = ["RefitOptions", "RefitResult", "RefitData", "collect", "refit", "refit_model", "objective", "gradient",
           "DEFAULT_LAMS", "MAX_STEP"]

DEFAULT_LAMS = (100.0, 30.0, 10.0, 3.0, 1.0)  # lam grid (sum-scale L2, like scikit-learn's 1/C), strongest first
MAX_STEP = 2.0  # largest change of one weight in one Newton step (logit units)


def _lams(owner: str, name: str, value: object) -> tuple[float, ...]:
    vals = tuple(value) if isinstance(value, (list, tuple)) else value
    if not isinstance(vals, tuple) or not vals or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in vals):
        raise ConfigError(f"The {name!r} parameter of {owner} must be a non-empty list of positive numbers (L2 strengths). "
                          f"Got {value!r} instead.")
    return tuple(sorted((float(v) for v in vals), reverse=True))


@dataclass(frozen=True)
class RefitOptions:
    """lams: the L2 grid of both tables (walked on valid, `refit`); search_sweeps: sweeps of each fit of the walk;
    max_rounds: of the alternating walks (crosses' lam, linear's lam); max_sweeps / tol: the chosen pair's final fit
    stops after max_sweeps or when a sweep lowers the objective by less than this fraction; batch_rows: rows per
    forward pass."""

    lams: tuple[float, ...] = DEFAULT_LAMS
    search_sweeps: int = 5
    max_rounds: int = 3
    max_sweeps: int = 30
    tol: float = 2e-6
    batch_rows: int = 65536

    def __post_init__(self) -> None:
        check_fields(self, {"lams": _lams, "search_sweeps": Int(1, 10_000), "max_rounds": Int(0, 100),
                            "max_sweeps": Int(1, 10_000), "tol": Float(0.0, 1.0), "batch_rows": Int(1, 1 << 24)})


@dataclass
class RefitData:
    """One split in the refit's terms: frozen offsets, the table rows each row reads, labels and weights."""

    offset: np.ndarray  # float64 [N]: the logit minus every refit term
    id_rows: np.ndarray  # int32 [N, F]: the linear row (flat over the linear tables) each id field reads
    values: np.ndarray  # float64 [N, Nn]: normalized numerics
    cross_rows: np.ndarray  # int32 [N, P]: each cross pair's row
    cross_x: np.ndarray  # float64 [N, P]: its multiplier (1 for id x id, the value for id x numeric)
    label: np.ndarray  # float64 [N]
    weight: np.ndarray  # float64 [N]
    # per cross pair: its two id fields (columns of id_rows) for id x id, or (field, None) and the numeric's column
    pair_fields: list[tuple[int, int | None]] = field(default_factory=list)
    pair_numeric: list[int | None] = field(default_factory=list)
    # per id field: the [start, stop) of the flat linear rows it can read (its table, or its part of the shared one);
    # the centring steps move all of them, so ids this data does not hold (trained on earlier data) keep their logit
    field_rows: list[tuple[int, int]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.label)


@dataclass
class Params:
    """The refit's parameters: flat linear rows (id rows, then numeric rows in `num_rows`), cross w, bias."""

    linear: np.ndarray  # float64, every linear table end to end
    num_rows: np.ndarray  # int [Nn]: the linear rows of the normalized numerics
    cross: np.ndarray  # float64 [buckets] (w = stored x scale), or empty
    bias: float

    def copy(self) -> "Params":
        return Params(self.linear.copy(), self.num_rows, self.cross.copy(), self.bias)


@dataclass
class RefitResult:
    lam: float | None
    lam_cross: float | None  # the cross table's (None without crosses)
    sweeps: int  # at the chosen lam
    objective_before: float  # training objective at the chosen lam, trained weights
    objective_after: float
    train_logloss_before: float
    train_logloss_after: float
    valid_logloss_before: float | None
    valid_logloss_after: float | None
    seconds: float
    grid: list[dict[str, Any]] = field(default_factory=list)  # per lam: sweeps, objective, valid logloss
    rows: int = 0
    applied: bool = True  # False: the refit was worse on valid than the trained weights, which were kept

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


# --- reading the model ----------------------------------------------------------------------------------------
def _field_rows(model: Any) -> list[tuple[int, int]]:
    """Each id field's flat linear rows, [start, stop) (`RefitData.field_rows`)."""
    lay = model.layout
    tables, starts, _, _ = _linear_layout(model)
    if model.linear.table.table_mode == "shared":
        return [(int(o), int(o) + int(n)) for o, n in zip(lay.offsets, lay.id_buckets)]
    return [(int(starts[f]), int(starts[f]) + int(tables[f].shape[0])) for f in range(lay.n_id_fields)]


def _linear_layout(model: Any) -> tuple[list[Any], np.ndarray, Callable[[int, np.ndarray], np.ndarray], np.ndarray]:
    """The linear tables, their start in the flat vector, `row(f, remapped local ids)`, the numerics' rows."""
    lin = model.linear.table
    lay = model.layout
    tables = list(lin.tables)
    sizes = [int(t.shape[0]) for t in tables]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    if lin.table_mode == "shared":
        offsets = np.asarray(lay.offsets, np.int64)
        row = lambda f, local: local + offsets[f]  # noqa: E731
        num_rows = sum(lay.id_buckets) + np.arange(lay.n_numeric_fields)
    else:
        row = lambda f, local: local + starts[f]  # noqa: E731
        num_rows = (starts[-1] + np.arange(lay.n_numeric_fields)) if lay.n_numeric_fields else np.zeros(0, np.int64)
    return tables, starts, row, np.asarray(num_rows, np.int64)


def read_params(model: Any) -> Params:
    tables, _, _, num_rows = _linear_layout(model)
    linear = np.concatenate([t.numpy()[:, 0].astype(np.float64) for t in tables])
    pc = model.pair_cross
    cross = pc.table.tables[0].numpy()[:, 0].astype(np.float64) * pc.scale if pc is not None else np.zeros(0)
    return Params(linear, num_rows, cross, float(model.linear.bias.numpy()))


def write_params(model: Any, params: Params, optimizer: Any = None) -> None:
    """Assign the refit weights into the model's variables (float32); `optimizer` (the run's) then adopts them, so
    that a resumed or warm-started run moves on from them (FTRL recomputes a weight from its slots otherwise)."""
    tables, starts, _, _ = _linear_layout(model)
    written = []
    for t, s in zip(tables, starts):
        n = int(t.shape[0])
        t.assign(params.linear[s:s + n, None].astype(np.float32))
        written.append(t)
    pc = model.pair_cross
    if pc is not None:
        pc.table.tables[0].assign((params.cross / pc.scale)[:, None].astype(np.float32))
        written.append(pc.table.tables[0])
    model.linear.bias.assign(np.float32(params.bias))
    written.append(model.linear.bias)
    if optimizer is not None:
        for v in written:
            optimizer.adopt(v)


def collect(model: Any, data: Any, *, batch_rows: int = 65536, correction: float = 0.0) -> RefitData:
    """One pass over `data` (shards): each row's frozen offset and the rows it reads. `correction` is added to
    every logit (a negative-sampled run's log R: the refit fits the served, calibrated predictions)."""
    import tensorflow as tf

    from ctrflow.data.pipeline import PipelineOptions, open_batches
    from ctrflow.models.cross import cross_index

    lay = model.layout
    params = read_params(model)
    _, _, row_of, _ = _linear_layout(model)
    remap = tf.convert_to_tensor(model.id_remap).numpy().astype(np.int64) if model.id_remap is not None else None
    pc = model.pair_cross
    pairs = [] if pc is None else [(p, a, b, None) for p, a, b in pc.id_pairs] + [(p, a, None, j) for p, a, j in pc.num_pairs]
    # the served logit and the normalized numerics the linear layer reads (serving mode: no statistics updated)
    forward = tf.function(lambda ids, numeric: (model(ids, numeric, training=False),
                                                model._inputs(ids, numeric, training=False)[1]))
    names = ("offset", "id_rows", "values", "cross_rows", "cross_x", "label", "weight")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    offsets = np.asarray(lay.offsets, np.int64)
    with open_batches(data, PipelineOptions(batch_size=batch_rows, shuffle=False)) as batches:
        for b in batches:
            numeric = b.numeric if b.numeric is not None else np.zeros((b.rows, lay.n_numeric_input), np.float32)
            logit, values = forward(tf.constant(b.ids), tf.constant(numeric))
            logit = logit.numpy().astype(np.float64) + correction
            values = np.zeros((b.rows, 0)) if values is None else values.numpy().astype(np.float64)
            raw = b.ids[:, list(lay.id_columns)].astype(np.int64)
            local = raw if remap is None else remap[raw + offsets[None, :]]
            rows = (np.stack([row_of(f, local[:, f]) for f in range(lay.n_id_fields)], 1) if lay.n_id_fields
                    else np.zeros((b.rows, 0), np.int64))
            cr = np.zeros((b.rows, len(pairs)), np.int64)
            cx = np.ones((b.rows, len(pairs)))
            for k, (p, a, bb, j) in enumerate(pairs):
                other = raw[:, bb] if bb is not None else np.zeros(b.rows, np.int64)
                cr[:, k] = cross_index(p, raw[:, a], other, pc.buckets)
                if j is not None:
                    cx[:, k] = values[:, j]
            refit_part = (params.linear[rows].sum(1) + values @ params.linear[params.num_rows] + params.bias
                          + ((params.cross[cr] * cx).sum(1) if len(pairs) else 0.0))
            parts["offset"].append(logit - refit_part)
            parts["id_rows"].append(rows.astype(np.int32))
            parts["values"].append(values)
            parts["cross_rows"].append(cr.astype(np.int32))
            parts["cross_x"].append(cx)
            parts["label"].append(b.label.astype(np.float64))
            parts["weight"].append(np.ones(b.rows) if b.weight is None else b.weight.astype(np.float64))
    if not parts["label"]:
        raise ConfigError(f"{data}: no rows to refit on.")
    return RefitData(**{k: np.concatenate(v) for k, v in parts.items()}, pair_fields=[(a, bb) for _, a, bb, _ in pairs],
                     pair_numeric=[j for _, _, _, j in pairs], field_rows=_field_rows(model))


# --- the objective ------------------------------------------------------------------------------------------
def logits(d: RefitData, th: Params) -> np.ndarray:
    z = d.offset + th.linear[d.id_rows].sum(1) + th.bias
    if d.values.shape[1]:
        z = z + d.values @ th.linear[th.num_rows]
    if d.cross_rows.shape[1]:
        z = z + (th.cross[d.cross_rows] * d.cross_x).sum(1)
    return z


def _loss(d: RefitData, z: np.ndarray) -> float:
    """Weighted sum of logloss from logits (stable)."""
    return float(np.sum(d.weight * (np.logaddexp(0.0, z) - d.label * z)))


def _penalized_rows(d: RefitData, th: Params) -> tuple[np.ndarray, np.ndarray]:
    """The rows the penalty covers: every linear row and cross row some training row reads (rows nothing reads
    are not moved by the refit and are left out of its objective)."""
    lin = np.unique(np.concatenate([d.id_rows.ravel(), th.num_rows.astype(np.int32)]))
    cr = np.unique(d.cross_rows.ravel()) if d.cross_rows.size else np.zeros(0, np.int64)
    return lin, cr


def objective(d: RefitData, th: Params, lam: float, lam_cross: float | None = None,
              rows: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """`sum w logloss + lam / 2 ||linear||^2 + lam_cross / 2 ||cross||^2` (lam_cross None: lam) over the rows the data
    reads; bias unpenalized."""
    lin, cr = rows or _penalized_rows(d, th)
    lc = lam if lam_cross is None else lam_cross
    return _loss(d, logits(d, th)) + 0.5 * (lam * float(np.sum(th.linear[lin] ** 2)) + lc * float(np.sum(th.cross[cr] ** 2)))


def gradient(d: RefitData, th: Params, lam: float, lam_cross: float | None = None) -> Params:
    """The objective's gradient w.r.t. every refit weight (an independent check of convergence)."""
    r = d.weight * (1.0 / (1.0 + np.exp(-logits(d, th))) - d.label)
    lin, cr = _penalized_rows(d, th)
    g_lin = np.bincount(d.id_rows.ravel(), np.repeat(r, d.id_rows.shape[1]), minlength=len(th.linear))
    for j, row in enumerate(th.num_rows):
        g_lin[row] += float(r @ d.values[:, j])
    g_lin[lin] += lam * th.linear[lin]
    g_cross = np.zeros_like(th.cross)
    if d.cross_rows.size:
        g_cross = np.bincount(d.cross_rows.ravel(), (r[:, None] * d.cross_x).ravel(), minlength=len(th.cross))
        g_cross[cr] += (lam if lam_cross is None else lam_cross) * th.cross[cr]
    return Params(g_lin, th.num_rows, g_cross, float(r.sum()))


# --- block-coordinate Newton ----------------------------------------------------------------------------------
def _fit(d: RefitData, th: Params, lam: float, lc: float, *, max_sweeps: int, tol: float) -> tuple[Params, int, float]:
    """Newton sweeps over the blocks (bias, each id field, each numeric, each cross pair) at one lam.

    Centring steps, each exact (no logit changes) and closed-form: after each id field's step its weights are
    centred into the bias (every training row reads exactly one row of the field, so +c on all of them and -c on
    the bias leaves every logit as it was; the penalty is least at c = -their mean); an id x id cross pair's rows
    into the bias, and, grouped by the row of either field they go with, into that field's row (+c on the group,
    -c on the row: least at c = (lam w_row - lc sum group) / (lc n + lam)); an id x numeric pair's into the
    numeric's weight. An id field's centring moves every row the field can read (`RefitData.field_rows`), not
    only this data's, so an id trained on earlier data (warm start, continuous training) keeps its logit; a cross
    pair's cannot (the hashed table is shared by every pair): a row with a combination this data does not hold
    reads the bias (or the field's row) without the +c and moves by that step's -c; every row of the data is exact.
    Without them coordinate descent crawls along those directions (the bias is unpenalized; measured on
    zipfmix: LR's bias gradient still 60 after 12 sweeps; FFM + 4 crosses 30 sweeps without reaching tol, 6-8
    with). The cross rows that two pairs share (hash collisions) are a block of their own (a Jacobi step over all
    their occurrences): each pair's block then reads only rows no other pair reads, so its Hessian is diagonal and
    its steps cost O(rows)."""
    pen = _penalized_rows(d, th)
    z = logits(d, th)
    cross = th.cross
    fields = [np.unique(d.id_rows[:, f], return_inverse=True) for f in range(d.id_rows.shape[1])]
    n_pairs = d.cross_rows.shape[1]
    pairs = [np.unique(d.cross_rows[:, k], return_inverse=True) for k in range(n_pairs)]
    if n_pairs:
        shared = np.bincount(np.concatenate([u for u, _ in pairs]), minlength=len(cross)) > 1
        free = [~shared[u] for u, _ in pairs]  # rows only this pair reads
        # the shared rows' own block: every occurrence of them (a Jacobi step; backtracking keeps it monotone)
        occ = shared[d.cross_rows]
        sh_ex, sh_k = np.nonzero(occ)
        sh_rows, sh_inv = np.unique(d.cross_rows[sh_ex, sh_k], return_inverse=True)
        sh_x = d.cross_x[sh_ex, sh_k]
    # per pair: (field row of each group, group of each cross row, group sizes, the field's row of each training row)
    groups = []
    for k, (uniq, inv) in enumerate(pairs):
        sides = []
        if d.pair_numeric[k] is None:
            first = np.zeros(len(uniq), np.int64)
            first[inv[::-1]] = np.arange(d.rows)[::-1]  # each cross row's first training row
            for f in d.pair_fields[k]:
                rows, ginv = np.unique(d.id_rows[first, f], return_inverse=True)
                sides.append((rows, ginv, np.bincount(ginv, minlength=len(rows)).astype(np.float64), d.id_rows[:, f]))
        groups.append(sides)
    loss = _loss(d, z)

    def penalty() -> float:
        return 0.5 * (lam * float(np.sum(th.linear[pen[0]] ** 2)) + lc * float(np.sum(cross[pen[1]] ** 2)))

    def step(dz: np.ndarray | float, pen_change: Callable[[float], float], z: np.ndarray) -> tuple[float, np.ndarray]:
        """Backtracking on the block's step: the largest t in 1, 1/2, ... that does not raise the objective."""
        nonlocal loss
        for t in (1.0, 0.5, 0.25, 0.125, 0.0625):
            zn = z + t * dz
            new = _loss(d, zn)
            if new + pen_change(t) <= loss + 1e-12 * abs(loss):
                loss = new
                return t, zn
        return 0.0, z

    def residuals(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = 1.0 / (1.0 + np.exp(-z))
        return d.weight * (p - d.label), d.weight * p * (1 - p)

    def sq(w: np.ndarray, delta: np.ndarray | float, l: float = lam) -> Callable[[float], float]:
        """The penalty's change when w (under L2 l) moves by t * delta."""
        return lambda t: 0.5 * l * float(np.sum((w + t * delta) ** 2 - w ** 2))

    obj = loss + penalty()
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        r, s = residuals(z)  # bias: unpenalized 1-D Newton
        delta = float(np.clip(-r.sum() / max(s.sum(), 1e-12), -MAX_STEP, MAX_STEP))
        t, z = step(np.float64(delta), lambda t: 0.0, z)
        th.bias += t * delta
        for f, (uniq, inv) in enumerate(fields):  # each id field: diagonal Hessian, an exact per-id Newton step; centred
            r, s = residuals(z)
            w = th.linear[uniq]
            g = np.bincount(inv, r, minlength=len(uniq)) + lam * w
            delta = np.clip(-g / (np.bincount(inv, s, minlength=len(uniq)) + lam), -MAX_STEP, MAX_STEP)
            t, z = step(delta[inv], sq(w, delta), z)
            c = -float(np.mean(w + t * delta))
            th.linear[uniq] = w + t * delta
            if d.field_rows:  # every row the field can read, not only this data's: each logit the model makes stays
                lo, hi = d.field_rows[f]
                th.linear[lo:hi] += c
            else:
                th.linear[uniq] += c
            th.bias -= c
        for j, row in enumerate(th.num_rows):  # each normalized numeric: one scalar
            x = d.values[:, j]
            r, s = residuals(z)
            w = th.linear[row]
            delta = float(np.clip(-(r @ x + lam * w) / (s @ (x * x) + lam), -MAX_STEP, MAX_STEP))
            t, z = step(delta * x, sq(np.float64(w), delta), z)
            th.linear[row] = w + t * delta
        for k, (uniq, inv) in enumerate(pairs):  # each cross pair: its own rows
            x = d.cross_x[:, k]
            r, s = residuals(z)
            w = cross[uniq]
            delta = np.clip(-(np.bincount(inv, r * x, minlength=len(uniq)) + lc * w)
                            / (np.bincount(inv, s * x * x, minlength=len(uniq)) + lc), -MAX_STEP, MAX_STEP) * free[k]
            t, z = step(delta[inv] * x, sq(w, delta, lc), z)
            cross[uniq] = w = w + t * delta
            j = d.pair_numeric[k]
            if free[k].any():  # centre into the bias (id x id) or the numeric's weight (id x numeric): +c on the
                # pair's rows, -c on the other; exact but for training rows on a shared row, hence checked as a step
                if j is None:
                    c = -float(np.mean(w[free[k]]))
                    other, pen_other = np.float64(0.0), (lambda t: 0.0)
                else:
                    wj = th.linear[th.num_rows[j]]
                    c = (lam * wj - lc * float(np.sum(w[free[k]]))) / (lc * int(free[k].sum()) + lam)
                    other, pen_other = wj, sq(np.float64(wj), -c)
                move = c * free[k]
                t, z = step((move[inv] - c) * x, lambda t: sq(w, move, lc)(t) + pen_other(t), z)
                cross[uniq] = w + t * move
                if j is None:
                    th.bias -= t * c
                else:
                    th.linear[th.num_rows[j]] = other - t * c
            for rows, ginv, n, ex_lin in groups[k]:  # ... and each group into its field's row
                w, wl = cross[uniq], th.linear[rows]
                total = np.bincount(ginv, w * free[k], minlength=len(rows))
                c = (lam * wl - lc * total) / (lc * np.bincount(ginv, free[k], minlength=len(rows)) + lam)
                shift = np.zeros(len(th.linear))
                shift[rows] = c
                move = c[ginv] * free[k]
                dz = move[inv] - shift[ex_lin]  # 0 without collisions
                t, z = step(dz, lambda t: sq(w, move, lc)(t) + sq(wl, -c)(t), z)
                cross[uniq] = w + t * move
                th.linear[rows] = wl - t * c
        if n_pairs and len(sh_rows):
            r, s = residuals(z)
            w = cross[sh_rows]
            delta = np.clip(-(np.bincount(sh_inv, r[sh_ex] * sh_x, minlength=len(w)) + lc * w)
                            / (np.bincount(sh_inv, s[sh_ex] * sh_x * sh_x, minlength=len(w)) + lc), -MAX_STEP, MAX_STEP)
            t, z = step(np.bincount(sh_ex, delta[sh_inv] * sh_x, minlength=d.rows), sq(w, delta, lc), z)
            cross[sh_rows] = w + t * delta
        new = loss + penalty()
        done = (obj - new) <= tol * abs(obj)
        obj = new
        if done:
            break
    return th, sweeps, obj


def refit(train: RefitData, valid: RefitData | None, start: Params, options: RefitOptions = RefitOptions(),
          progress: Callable[[str], None] | None = None) -> tuple[Params, RefitResult]:
    """Choose (lam, lam_cross) on valid by walks over the grid, each fit starting from the nearest one's end and
    cut at `search_sweeps`: from the middle lam (both tables at it) up the grid while valid improves, else down
    it; then, with crosses, the cross table's lam alone, the linear's alone, and so on until neither moves (at
    most `max_rounds`). The best pair is then fitted to convergence (`max_sweeps`, `tol`). Without valid: the
    middle lam. Measured (BENCHMARKS.md): zipfmix FFM / LR 10, FFM + 4 crosses 3; synthetic FFM 30, LR + 8
    crosses lam 30 with lam_cross 3 (one lam for both lost to the trained model there)."""
    t0 = time.perf_counter()
    say = progress or (lambda s: None)
    vloss = lambda th: _loss(valid, logits(valid, th)) / valid.weight.sum() if valid is not None else 0.0  # noqa: E731
    if train.weight.sum() <= 0 or (valid is not None and valid.weight.sum() <= 0):
        raise ConfigError(f"the {'training' if train.weight.sum() <= 0 else 'validation'} rows' weights sum to 0: "
                          "no logloss to refit on.")
    valid_before = vloss(start) if valid is not None else None
    lams = options.lams
    has_cross = bool(train.cross_rows.size)
    # (lam index, lam_cross index) -> valid logloss; the weights of the walk's current point and of the one tried
    # from it only (every table a full float64 copy)
    scores: dict[tuple[int, int], float] = {}
    kept: dict[tuple[int, int], Params] = {}
    grid = []

    def fit(i: int, j: int, th: Params, sweeps_max: int) -> tuple[float, Params]:
        th, sweeps, obj = _fit(train, th.copy(), lams[i], lams[j], max_sweeps=sweeps_max, tol=options.tol)
        v = vloss(th)
        grid.append({"lam": lams[i], "lam_cross": lams[j], "sweeps": sweeps, "objective": obj,
                     "valid_logloss": v if valid is not None else None,
                     "train_logloss": _loss(train, logits(train, th)) / train.weight.sum()})
        say(f"refit lam {lams[i]:g}" + (f", crosses {lams[j]:g}" if has_cross else "") + f": {sweeps} sweeps, objective "
            f"{obj:.6g}" + (f", valid logloss {v:.6f}" if valid is not None else ""))
        return v, th

    def at(i: int, j: int, near: tuple[int, int]) -> float:
        if (i, j) not in scores:
            scores[(i, j)], kept[(i, j)] = fit(i, j, kept[near], options.search_sweeps)
        return scores[(i, j)]

    def walk(point: tuple[int, int], move: Callable[[tuple[int, int], int], tuple[int, int]]) -> tuple[int, int]:
        """From `point`, steps of `move` up the grid while valid improves, else down it."""
        for direction in (1, -1):
            cur, moved = point, False
            while True:
                nxt = move(cur, direction)
                if not (0 <= nxt[0] < len(lams) and 0 <= nxt[1] < len(lams)) or at(*nxt, cur) >= scores[cur]:
                    if nxt != cur:
                        kept.pop(nxt, None)
                    break
                kept.pop(cur, None)
                cur, moved = nxt, True
            if moved:
                return cur
        return point

    mid = (len(lams) - 1) // 2
    scores[(mid, mid)], kept[(mid, mid)] = fit(mid, mid, start, options.search_sweeps if valid is not None else options.max_sweeps)
    point = (mid, mid)
    if valid is not None:
        point = walk(point, lambda p, d: (p[0] + d, p[1] + d))  # both tables at one lam
        for _ in range(options.max_rounds if has_cross else 0):
            before = point
            point = walk(point, lambda p, d: (p[0], p[1] + d))  # the crosses' lam alone
            point = walk(point, lambda p, d: (p[0] + d, p[1]))  # the linear table's alone
            if point == before:
                break
        # the chosen point to convergence
        scores[point], kept[point] = fit(*point, kept[point], options.max_sweeps)
    v, fitted = scores[point], kept[point]
    final = grid[-1]
    lam, lam_cross = lams[point[0]], lams[point[1]]
    result = RefitResult(
        lam=lam, lam_cross=lam_cross if has_cross else None, sweeps=final["sweeps"],
        objective_before=objective(train, start, lam, lam_cross), objective_after=final["objective"],
        train_logloss_before=_loss(train, logits(train, start)) / train.weight.sum(),
        train_logloss_after=final["train_logloss"], valid_logloss_before=valid_before,
        valid_logloss_after=v if valid is not None else None, seconds=time.perf_counter() - t0, grid=grid, rows=train.rows)
    return fitted, result


def refit_model(model: Any, train_data: Any, valid_data: Any | None, options: RefitOptions = RefitOptions(), *,
                correction: float = 0.0, progress: Callable[[str], None] | None = None,
                keep_if_worse: bool = True, optimizer: Any = None) -> RefitResult:
    """Refit `model`'s per-id weights in place on `train_data` (shards), lam chosen on `valid_data`.

    `keep_if_worse`: when the best lam's valid logloss is not below the trained weights', keep those (applied
    False). `optimizer`: the run's, made to adopt the written weights (`write_params`). Models without a sparse
    linear layer are refused (every ctrflow kind has one)."""
    if getattr(model, "linear", None) is None:
        raise ConfigError(f"a {model.kind} model has no per-id linear weights to refit.")
    t0 = time.perf_counter()
    start = read_params(model)
    train = collect(model, train_data, batch_rows=options.batch_rows, correction=correction)
    valid = None if valid_data is None else collect(model, valid_data, batch_rows=options.batch_rows, correction=correction)
    fitted, result = refit(train, valid, start, options, progress)
    finite = all(v is None or math.isfinite(v) for v in (result.objective_after, result.valid_logloss_before,
                                                          result.valid_logloss_after))
    if not finite or (keep_if_worse and valid is not None and result.valid_logloss_after >= result.valid_logloss_before):
        result.applied = False  # a non-finite fit is never written
    else:
        write_params(model, fitted, optimizer)
    result.seconds = time.perf_counter() - t0
    return result


# --- after training (the trainer core's last step) ------------------------------------------------------------
def refit_bytes(model: Any, rows: int) -> int:
    """What `collect` and `refit` hold for `rows` rows: the collected columns (offset, label, weight, the numerics
    and the pairs' multipliers float64, one int32 row per id field and per pair), twice at `collect`'s concatenation;
    the logits and per-block temporaries (float64, ~10 per row), `logits`' gathers (float64 per field, two per pair)
    and `_fit`'s int64 inverses (per field and pair); and ~6 float64 copies of the tables (the start, the walk's
    current and tried fits, `_fit`'s copy, its per-sweep temporaries)."""
    lay = model.layout
    pairs = len(model.pair_cross.id_pairs) + len(model.pair_cross.num_pairs) if model.pair_cross is not None else 0
    columns = 24 + 4 * lay.n_id_fields + 8 * lay.n_numeric_fields + 12 * pairs
    tables = sum(int(t.shape[0]) for t in model.linear.table.tables)
    if model.pair_cross is not None:
        tables += int(model.pair_cross.table.tables[0].shape[0])
    return rows * (2 * columns + 10 * 8 + 16 * lay.n_id_fields + 24 * pairs) + 6 * 8 * tables


def _prior_record(run: Any) -> dict[str, Any] | None:
    """The refit record of the run's summary.json, when it has one."""
    import json
    from pathlib import Path

    try:
        record = json.loads((Path(run) / "summary.json").read_text()).get("refit")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _too_big(model: Any, train_data: Any, valid: Any) -> str | None:
    """Why the refit cannot hold its data in the memory available (half of it, the model being there too), or None."""
    from ctrflow.data.pipeline import PipelineOptions, open_batches
    from ctrflow.train.memory import available_memory

    rows = 0
    for data in (train_data, valid):
        with open_batches(data, PipelineOptions(batch_size=1, shuffle=False)) as b:
            rows += int(b.rows or 0)
    need, room = refit_bytes(model, rows), available_memory() // 2
    if need > room:
        return (f"its {rows:,} rows need about {need / 2**30:.1f} GiB in memory, more than half of the "
                f"{2 * room / 2**30:.1f} GiB available (a streaming refit is not built)")
    return None


def _failed(e: BaseException) -> str:
    return f"failed ({type(e).__name__}: {str(e).strip()[:300]}); the trained model stays the run's latest"


def refit_after_training(model: Any, checkpoints: Any, train_data: Any, valid: Any, config: Any, *, step: int, examples: int,
                         record: Callable[[dict[str, Any]], None], predict: Callable[..., Any],
                         distributed: bool = False, optimizer: Any = None) -> dict[str, Any] | None:
    """`TrainConfig.refit`: refit the trained model's per-id weights (lam chosen on `valid`) and save them as the
    run's latest checkpoint (`RunCheckpoints.save_refit`). Returns run.json / summary's record of it: "status"
    "refit" (applied), "kept" (no lam beat the trained weights on valid: they stay), or "skipped" with the reason;
    None when `config.refit` is off.

    Applied, it is the run's best model too (its valid logloss the best score, saved as checkpoints/best/), so a
    continued run compares against it. It never fails a finished training: an error inside it (memory, an empty
    or zero-weight split) or a non-finite result is "skipped" with the reason, and the trained model stays the
    run's latest; `optimizer` (the run's) adopts the written weights (`write_params`)."""
    if not getattr(config, "refit", False):
        return None
    skip = None
    if distributed:
        skip = "cluster training: the refit reads every training row in one process; not run"
    elif valid is None:
        skip = "no validation split to choose its L2 on"
    elif hasattr(train_data, "read") or str(train_data) == "-":
        skip = "the training data is a stream (read once)"
    elif checkpoints.refit_done(step):  # a rerun of the finished run: the earlier record stands
        prior = _prior_record(checkpoints.run)
        if prior is not None:
            return {**prior, "note": f"done by an earlier run of this command ({checkpoints.latest})"}
        skip = f"already done ({checkpoints.latest})"
    else:
        try:
            skip = _too_big(model, train_data, valid)
        except Exception as e:  # noqa: BLE001 -- as below: the finished training stands
            skip = _failed(e)
    if skip:
        out = {"status": "skipped", "reason": skip}
        record({"kind": "refit", "step": step, "examples": examples, "epoch": -1, "seconds": 0.0, **out})
        return out
    from ctrflow.data.pipeline import PipelineOptions, open_batches
    from ctrflow.train.core import evaluate_stream, logit_correction

    t0 = time.perf_counter()
    counters = checkpoints.counters
    best_before = (float(counters["best"].numpy()), int(counters["bad_validations"].numpy()))
    res = None
    try:
        res = refit_model(model, train_data, valid, RefitOptions(), correction=logit_correction(config.negative_sampling_rate),
                          progress=lambda m: record({"kind": "refit", "step": step, "examples": examples, "epoch": -1,
                                                     "seconds": time.perf_counter() - t0, "message": m}),
                          optimizer=optimizer)
        values = (res.objective_before, res.objective_after, res.valid_logloss_before, res.valid_logloss_after)
        if not all(v is not None and math.isfinite(v) for v in values):
            out = {"status": "skipped", "reason": "its objective or valid logloss is not finite "
                   f"({', '.join(f'{v:.6g}' if v is not None else 'None' for v in values)}); the trained weights stay"}
        else:
            out = {"status": "refit" if res.applied else "kept", **res.to_dict()}
        if out["status"] == "refit":
            with open_batches(valid, PipelineOptions(batch_size=max(config.batch_size, 8192), shuffle=False)) as vb:
                out["valid"] = evaluate_stream(predict, vb)
            if out["valid"]["logloss"] < best_before[0]:  # the run's best now (Validation's rule), saved as such
                counters["best"].assign(out["valid"]["logloss"])
                counters["bad_validations"].assign(0)
                if config.restore_best:
                    checkpoints.save_best(step)
            out["checkpoint"] = checkpoints.save_refit(step)
    except Exception as e:  # noqa: BLE001 -- the training is done and saved: the refit must not fail it
        if res is not None and res.applied:  # weights (and slots) written: back to the trained model's checkpoint
            counters["best"].assign(best_before[0])
            counters["bad_validations"].assign(best_before[1])
            checkpoints.restore_latest()
        out = {"status": "skipped", "reason": _failed(e)}
    out["seconds"] = time.perf_counter() - t0
    record({"kind": "refit", "step": step, "examples": examples, "epoch": -1, "seconds": out["seconds"],
            **{k: v for k, v in out.items() if isinstance(v, (int, float, str)) or v is None}})
    return out
