"""Field-aware FM (Juan et al. 2016, what Outbrain's engine serves): one vector per (id, other field).

`logit = linear + sum_{i<j} r_ij <v_{id_i, field j}, v_{id_j, field i}>`. Each id keeps S - 1 vectors of
`config.ffm_dim` floats, stored side by side in one row of an ordinary field table, so the row is one
gather (sparse-aware optimizers update only looked-up rows, tables shard by row as every other table).

Size: table rows x (S - 1) x ffm_dim x 4 bytes, S = id fields + normalized numerics. The synthetic
preset's 39 fields capped at 16k buckets (223k rows): 223k x 38 x 4 x 4 B = 136 MB; uncapped (7.2M
rows) 4.4 GB, plus two LazyAdam slots while training. Hence the small default `ffm_dim=4` (libffm's
own default) and `embedding_dim` not being used here. Serving moves S x (S - 1) x ffm_dim floats per
prediction (23.7 KB for 39 fields): ~9x DeepFM's compute (BENCHMARKS.md, "Model zoo").

The pair weights r_ij (FwFM's, Pan et al. 2018, on FFM's vectors; S(S-1)/2 "dense" numbers starting at 1,
the plain FFM) let training turn off the many field pairs that do not interact — the truth of both
synthetic benchmark sets has 4-8 interacting pairs among 45-741 — instead of fitting noise into their
vectors. Their rate is 10x the dense group's (`PAIR_WEIGHT_SCALE`): at 1x they barely leave 1 within the
few hundred steps of a run. Test logloss, defaults otherwise: synthetic 0.11516 -> 0.11401, zipfmix
0.11352 -> 0.11205, TalkingData 0.00862 -> 0.00741, iPinYou 0.02006 -> 0.02006 (BENCHMARKS.md, "How much
of the gap is reachable"). A checkpoint written before them has no r: read with
`expect_partial` (evaluate, export, warm starts), r keeps its start, 1, the model it was; a resume of such a run
in its own folder is refused (the checkpoint does not match).

A pair whose r is exactly 0 is off (no gradient, not in the logit): `ctrflow train --ffm-select-pairs K`
(ctrflow.train.pair_selection) retrains with only K pairs that way, starting r from `PAIR_START`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from ctrflow.errors import ConfigError
from ctrflow.models.layers import (
    CtrModel, FieldEmbedding, FieldPairInteraction, SparseLinear, ffm_interaction, ffm_pair_fields, ffm_pair_slots,
    ffm_slot, ffm_slot_fields, slot_dot,
)
from ctrflow.models.registry import PAIR_WEIGHT_SCALE  # the default of ModelConfig.ffm_pair_rate (measured: 1x, 3x, 10x, 30x)

__all__ = ["FieldAwareFM", "PAIR_WEIGHT_SCALE", "PAIR_L1", "PAIR_L2", "PAIR_START", "PAIR_PROX"]

# Penalties on r itself during training, `PAIR_L1 * sum |r_ij| + PAIR_L2 * sum r_ij**2` (FieldPairInteraction's
# l1 / l2; read when a model is made). Off: they sharpen the selection, but every setting tried on synthetic (L1 1e-6,
# 3e-6, 1e-5; L2 1e-6) loses there on valid logloss, and zipfmix gains at most 0.00015 (BENCHMARKS.md, "Sharper pair
# selection").
PAIR_L1 = 0.0
PAIR_L2 = 0.0
# Where r starts when a model is made (read by build_layers): None, every r_ij = 1; or an [S, S] array, 0 = the pair is
# off for good (FieldPairInteraction.weights_matrix). Stage 2 of the two-stage pair selection sets it while it makes
# its model (ctrflow.train.pair_selection: 1 for the kept pairs; bench_quality --ffm-select-start learnt: stage 1's r).
PAIR_START = None
# Soft threshold on r before each training pass reads it (FieldPairInteraction.soft_threshold; 0 = off): an L1
# proximal step per optimizer step. Off: zipfmix at 0.003 / 0.01 / 0.03 ties or loses on valid (BENCHMARKS.md,
# "Two-stage pair selection").
PAIR_PROX = 0.0


class FieldAwareFM(CtrModel):
    """Linear terms plus field-aware pairwise interactions.

    Example:
        >>> from ctrflow.data.batch import FeatureSpec
        >>> from ctrflow.models import ModelConfig, make_model
        >>> model = make_model(ModelConfig("ffm", ffm_dim=2), FeatureSpec(("site", "app", "hour"), (1000, 500, 24)))
        >>> [v.shape.as_list() for v in model.variable_groups()["embedding"]]
        [[1524, 4]]

    Variables: "linear" tables; "embedding" tables of `[rows, (S - 1) * ffm_dim]`; "dense": a bias and the
    `[S, S]` pair weights (stored / `PAIR_WEIGHT_SCALE`; only i < j is used).
    Needs at least two fields (one field has no pair to interact with).
    """

    kind = "ffm"

    def __init__(self, config, spec, *, name=None) -> None:
        super().__init__(config, spec, name=name)
        n = self.layout.n_fields
        if n < 2:
            raise ConfigError(f"The ffm model needs at least 2 fields to interact; this FeatureSpec has {n}. Use --model lr.")
        with self.name_scope:
            self.linear = SparseLinear(self.layout, table_mode=config.table_mode)
            self.embedding = FieldEmbedding(
                self.layout, (n - 1) * config.ffm_dim, table_mode=config.table_mode, init_scale=config.init_scale,
                seed=config.seed,
            )
            self.pairs = FieldPairInteraction(n, scale=config.ffm_pair_rate, l1=PAIR_L1, l2=PAIR_L2)

    def build_layers(self) -> None:
        self.linear.build()
        self.embedding.build()
        self.pairs.build(self._pair_start())

    def _pair_start(self) -> Any:
        """Where r starts: `config.ffm_pairs` (1 on those pairs, 0 = off on every other), else `PAIR_START`."""
        if self.config.ffm_pairs is None:
            return PAIR_START
        names = list(self.layout.id_names) + list(self.layout.numeric_names)
        index = {n: i for i, n in enumerate(names)}
        start = np.zeros((len(names), len(names)), np.float32)
        for a, b in self.config.ffm_pairs:
            missing = [n for n in (a, b) if n not in index]
            if missing:
                raise ConfigError(f"ffm_pairs names {missing[0]!r}, which is not one of this model's fields {names}.")
            i, j = sorted((index[a], index[b]))
            start[i, j] = 1.0
        return start

    def call(self, ids: tf.Tensor, values: tf.Tensor | None, training: bool) -> tf.Tensor:
        emb = self.embedding(ids, values)
        n = self.layout.n_fields
        if training and PAIR_PROX:
            self.pairs.soft_threshold(PAIR_PROX)
        weights = self.pairs.symmetric_weights(ffm_slot_fields(n), penalize=training)
        return self.linear(ids, values) + ffm_interaction(emb, n, self.config.ffm_dim, weights)

    def pair_terms(self, ids: tf.Tensor, numeric: tf.Tensor | None = None) -> tf.Tensor:
        """`[B, S(S-1)/2]`: each pair's term `r_ij <v_{i,j}, v_{j,i}>` of the logit (pairs i < j in row-major
        order, `np.triu_indices(S, 1)`'s), serving mode — how much each pair moves predictions (the two-stage
        selection's strength of a pair)."""
        ids, values = self.prepare_inputs(ids, numeric)
        n, k = self.layout.n_fields, self.config.ffm_dim
        flat = tf.reshape(self.embedding(ids, values), [-1, n * (n - 1), k])
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        dots = tf.reduce_sum(tf.gather(flat, [ffm_slot(n, i, j, i) for i, j in pairs], axis=1)
                             * tf.gather(flat, [ffm_slot(n, j, i, j) for i, j in pairs], axis=1), axis=2)
        return dots * self.pairs.symmetric_weights(pairs)[None, :]

    # Context requests: context-context pairs once; each context field's vectors for the candidate
    # fields are gathered once per candidate and met by the candidate's vectors for the context fields.
    def _slots(self, split, side, ids, values):
        emb = self.embedding.side(ids, values, side)
        return tf.reshape(emb, [-1, len(side.fields) * (self.layout.n_fields - 1), self.config.ffm_dim])

    def context_terms(self, split, ids, values):
        flat = self._slots(split, split.context, ids, values)
        slots, pairs = ffm_pair_slots(self.layout.n_fields, split), ffm_pair_fields(split)
        out = {"logit": slot_dot(flat, slots["cc"][0], flat, slots["cc"][1], self._weights(pairs["cc"]))}
        if slots["ck"][0]:  # [R, Sc * Sk, k], each context vector already times its pair's weight
            out["ck"] = tf.gather(flat, slots["ck"][0], axis=1) * self._weights(pairs["ck"])[None, :, None]
        return out

    def candidate_terms(self, split, context, ids, values):
        flat = self._slots(split, split.candidate, ids, values)
        slots, pairs = ffm_pair_slots(self.layout.n_fields, split), ffm_pair_fields(split)
        out = slot_dot(flat, slots["kk"][0], flat, slots["kk"][1], self._weights(pairs["kk"]))
        if "ck" in context:
            out += tf.reduce_sum(context["ck"] * tf.gather(flat, slots["ck"][1], axis=1), axis=[1, 2])
        return out

    def _weights(self, pairs: list[tuple[int, int]]) -> tf.Tensor | None:
        return self.pairs.symmetric_weights(pairs) if pairs else None
