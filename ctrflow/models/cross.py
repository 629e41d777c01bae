"""Hashed cross features of chosen field pairs (the "wide" part of Wide & Deep; VW's `-q` restricted to pairs):
one learned scalar per (pair, id_a, id_b), added to any model's logit (`ModelConfig.cross_pairs`).

Why: a low-rank pair interaction (FFM's 4-wide vectors, FM's dot products) cannot fit a full table of pair
effects — a 300 x 10 cross is rank 10 — while a memorized cross can; on the synthetic benchmarks "LR + crosses of
exactly the true pairs" beats FFM (BENCHMARKS.md, "How much of the gap is reachable"). Which pairs: the user's
(`train --cross-pairs a:b,...`) or the strongest of a first FFM stage (`train --cross-select K`,
ctrflow.train.pair_selection).

The cross id is computed in the graph from the two fields' ids, the same function in training, evaluation and
every exported signature (clients send the ids they send today), `cross_index`:

    P = 2^31 - 1 (prime); h = (a + 1) * K1 mod P; h = (h + b + 1) * K2 mod P; h = (h + p + 1) * K3 mod P;
    id = h mod buckets

with p the pair's index in `cross_pairs`, a / b the fields' local ids (the bucket ids of the shards; before the
rare-id remap of `min_count`, so exports, which bake that remap into the tables, compute the same ids), and
K1, K2, K3 below. Every product stays below 2^63 in int64: the arithmetic is exact on any platform.
An id field x normalized numeric pair is a per-id slope: `w[id(p, a, 0)] * x` (x the normalized value).
Two numerics cannot be crossed (ConfigError).

The table is `[buckets, 1]`, zero at the start, a "linear" group table (`FieldTables`): it gets the linear
optimizer, rate and L2, is sharded by row in cluster training, counted by the memory check, slimmed by float16
exports — like the linear weights, which is what a cross is (one weight per crossed id). It holds w / `cross_scale`
(default 3): under LazyAdam the crosses then step 3x as far as the linear weights and feel l2 / 9 (measured:
LR + 4 crosses on zipfmix, valid 0.11043 at 1, 0.10623 at 3, 0.10798 at 10; BENCHMARKS.md, "Hashed crosses").
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from ctrflow.errors import ConfigError
from ctrflow.models.layers import ContextSplit, FieldLayout, FieldTables, lookup, take, zeros_initializer
from ctrflow.validation import suggest

__all__ = ["PairCross", "cross_index", "CROSS_PRIME", "CROSS_MULTIPLIERS"]

CROSS_PRIME = 2**31 - 1
CROSS_MULTIPLIERS = (1_103_515_245, 1_664_525_461, 2_013_265_921)  # K1, K2, K3, each < P


def cross_index(pair: int, a: np.ndarray, b: np.ndarray, buckets: int) -> np.ndarray:
    """The cross ids of pair index `pair` for ids `a`, `b` (numpy, int64): the graph's function, for checks."""
    p, (k1, k2, k3) = CROSS_PRIME, CROSS_MULTIPLIERS
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    h = (a + 1) * k1 % p
    h = (h + b + 1) * k2 % p
    h = (h + pair + 1) * k3 % p
    return h % buckets


def _cross_ids(pair: tf.Tensor, a: tf.Tensor, b: tf.Tensor, buckets: int) -> tf.Tensor:
    """`cross_index` in the graph: int64 ids of the same shape as `a` (pair broadcasts)."""
    p, (k1, k2, k3) = CROSS_PRIME, CROSS_MULTIPLIERS
    a, b, pair = tf.cast(a, tf.int64), tf.cast(b, tf.int64), tf.cast(pair, tf.int64)
    h = tf.math.floormod((a + 1) * k1, p)
    h = tf.math.floormod((h + b + 1) * k2, p)
    h = tf.math.floormod((h + pair + 1) * k3, p)
    return tf.math.floormod(h, buckets)


class PairCross(tf.Module):
    """`sum_p w[cross id of pair p]` (id x id) `+ sum_q w[id(q, a, 0)] * x_q` (id x numeric) -> `[B]`.

    Built by `CtrModel` when `config.cross_pairs` is not empty; pairs name fields of `layout` (either order).
    """

    def __init__(self, layout: FieldLayout, pairs: Sequence[tuple[str, str]], buckets: int, *, scale: float = 1.0,
                 name: str = "pair_cross") -> None:
        super().__init__(name=name)
        ids = {n: i for i, n in enumerate(layout.id_names)}
        nums = {n: j for j, n in enumerate(layout.numeric_names)}
        known = list(ids) + list(nums)
        self.id_pairs: list[tuple[int, int, int]] = []  # (pair index, id field a, id field b)
        self.num_pairs: list[tuple[int, int, int]] = []  # (pair index, id field a, numeric j)
        for p, (x, y) in enumerate(pairs):
            for n in (x, y):
                if n not in ids and n not in nums:
                    hint = suggest(n, known)
                    raise ConfigError(f"cross_pairs names {n!r}, which is not one of this model's fields {known}"
                                      + (f". Did you mean {hint!r}?" if hint else "."))
            if x in nums and y in nums:
                raise ConfigError(f"cross_pairs ({x!r}, {y!r}): both are numeric fields; a cross needs at least one "
                                  "categorical (id) field.")
            if x in nums:
                x, y = y, x
            if y in ids:
                self.id_pairs.append((p, ids[x], ids[y]))
            else:
                self.num_pairs.append((p, ids[x], nums[y]))
        self.buckets = int(buckets)
        self.scale = float(scale)  # the table holds w / scale (ModelConfig.cross_scale)
        self.n_id_fields = layout.n_id_fields
        cross_layout = FieldLayout((0,), ("cross",), (self.buckets,), (), (), 1, 0)
        with self.name_scope:
            self.table = FieldTables(cross_layout, 1, table_mode="shared", group="linear",
                                     initializer_for=lambda _: zeros_initializer, name="table")

    def build(self) -> None:
        self.table.build()

    def __call__(self, ids: tf.Tensor, values: tf.Tensor | None) -> tf.Tensor:
        """ids: the active id fields' local ids `[B, F]` (before any rare-id remap); values: `[B, N]` or None."""
        self.build()
        return self._terms(self.id_pairs, self.num_pairs, lambda f: ids[:, f], lambda j: values[:, j])

    def _terms(self, id_pairs, num_pairs, id_col, num_col) -> tf.Tensor:
        """The sum over the given pairs, reading each field's column with `id_col(field)` / `num_col(j)`."""
        table = self.table.tables[0]
        out = None
        if id_pairs:
            a = tf.stack([id_col(f) for _, f, _ in id_pairs], axis=1)
            b = tf.stack([id_col(g) for _, _, g in id_pairs], axis=1)
            h = _cross_ids(tf.constant([p for p, _, _ in id_pairs], tf.int64)[None, :], a, b, self.buckets)
            out = tf.reduce_sum(lookup(table, h)[..., 0], axis=1)
        if num_pairs:
            a = tf.stack([id_col(f) for _, f, _ in num_pairs], axis=1)
            x = tf.stack([num_col(j) for _, _, j in num_pairs], axis=1)
            h = _cross_ids(tf.constant([p for p, _, _ in num_pairs], tf.int64)[None, :], a, tf.zeros_like(a), self.buckets)
            term = tf.reduce_sum(lookup(table, h)[..., 0] * x, axis=1)
            out = term if out is None else out + term
        return out * self.scale if self.scale != 1.0 else out

    # Context requests: a pair of two context fields once per context row; every other pair per candidate, the
    # context side's column gathered by the candidate's row (an int gather: the cross id needs both ids).
    def context_logit(self, split: ContextSplit, ids: tf.Tensor, values: tf.Tensor | None) -> tf.Tensor | None:
        """`[R]`: the pairs whose fields are both context, or None when there are none."""
        self.build()
        c = split.context
        in_ctx = lambda f: f in c.id_fields  # noqa: E731
        id_pairs = [t for t in self.id_pairs if in_ctx(t[1]) and in_ctx(t[2])]
        num_pairs = [t for t in self.num_pairs if in_ctx(t[1]) and t[2] in c.numeric_fields]
        if not id_pairs and not num_pairs:
            return None
        return self._terms(id_pairs, num_pairs, lambda f: ids[:, c.id_fields.index(f)],
                           lambda j: values[:, c.numeric_fields.index(j)])

    def candidate_logit(self, split: ContextSplit, c_ids, c_values, k_ids, k_values, row) -> tf.Tensor | None:
        """`[M]`: the pairs with at least one candidate field, or None when there are none."""
        self.build()
        c, k = split.context, split.candidate
        in_ctx = lambda f: f in c.id_fields  # noqa: E731
        id_pairs = [t for t in self.id_pairs if not (in_ctx(t[1]) and in_ctx(t[2]))]
        num_pairs = [t for t in self.num_pairs if not (in_ctx(t[1]) and t[2] in c.numeric_fields)]
        if not id_pairs and not num_pairs:
            return None
        ctx_cols = sorted({f for _, a, b in id_pairs for f in (a, b) if in_ctx(f)} | {a for _, a, _ in num_pairs if in_ctx(a)})
        ctx_nums = sorted({j for _, _, j in num_pairs if j in c.numeric_fields})
        gathered_ids = tf.gather(take(c_ids, [c.id_fields.index(f) for f in ctx_cols], axis=1), row) if ctx_cols else None
        gathered_vals = tf.gather(take(c_values, [c.numeric_fields.index(j) for j in ctx_nums], axis=1), row) if ctx_nums else None

        def id_col(f):
            return gathered_ids[:, ctx_cols.index(f)] if in_ctx(f) else k_ids[:, k.id_fields.index(f)]

        def num_col(j):
            return gathered_vals[:, ctx_nums.index(j)] if j in c.numeric_fields else k_values[:, k.numeric_fields.index(j)]

        return self._terms(id_pairs, num_pairs, id_col, num_col)
