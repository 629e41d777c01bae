"""Field-aware FM (Juan et al. 2016, what Outbrain's engine serves): one vector per (id, other field).

`logit = linear + sum_{i<j} <v_{id_i, field j}, v_{id_j, field i}>`. Each id keeps S - 1 vectors of
`config.ffm_dim` floats, stored side by side in one row of an ordinary field table, so the row is one
gather (sparse-aware optimizers update only looked-up rows, tables shard by row as every other table).

Size: table rows x (S - 1) x ffm_dim x 4 bytes, S = id fields + normalized numerics. The synthetic
preset's 39 fields capped at 16k buckets (223k rows): 223k x 38 x 4 x 4 B = 136 MB; uncapped (7.2M
rows) 4.4 GB, plus two LazyAdam slots while training. Hence the small default `ffm_dim=4` (libffm's
own default) and `embedding_dim` not being used here. Serving moves S x (S - 1) x ffm_dim floats per
prediction (23.7 KB for 39 fields): ~9x DeepFM's compute (BENCHMARKS.md, "Model zoo").
"""
from __future__ import annotations

import tensorflow as tf

from ctrflow.errors import ConfigError
from ctrflow.models.layers import CtrModel, FieldEmbedding, SparseLinear, ffm_interaction, ffm_pair_slots, slot_dot

__all__ = ["FieldAwareFM"]


class FieldAwareFM(CtrModel):
    """Linear terms plus field-aware pairwise interactions.

    Example:
        >>> from ctrflow.data.batch import FeatureSpec
        >>> from ctrflow.models import ModelConfig, make_model
        >>> model = make_model(ModelConfig("ffm", ffm_dim=2), FeatureSpec(("site", "app", "hour"), (1000, 500, 24)))
        >>> [v.shape.as_list() for v in model.variable_groups()["embedding"]]
        [[1524, 4]]

    Variables: "linear" tables; "embedding" tables of `[rows, (S - 1) * ffm_dim]`; a "dense" bias.
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

    def build_layers(self) -> None:
        self.linear.build()
        self.embedding.build()

    def call(self, ids: tf.Tensor, values: tf.Tensor | None, training: bool) -> tf.Tensor:
        emb = self.embedding(ids, values)
        return self.linear(ids, values) + ffm_interaction(emb, self.layout.n_fields, self.config.ffm_dim)

    # Context requests: context-context pairs once; each context field's vectors for the candidate
    # fields are gathered once per candidate and met by the candidate's vectors for the context fields.
    def _slots(self, split, side, ids, values):
        emb = self.embedding.side(ids, values, side)
        return tf.reshape(emb, [-1, len(side.fields) * (self.layout.n_fields - 1), self.config.ffm_dim])

    def context_terms(self, split, ids, values):
        flat = self._slots(split, split.context, ids, values)
        slots = ffm_pair_slots(self.layout.n_fields, split)
        out = {"logit": slot_dot(flat, slots["cc"][0], flat, slots["cc"][1])}
        if slots["ck"][0]:
            out["ck"] = tf.gather(flat, slots["ck"][0], axis=1)  # [R, Sc * Sk, k]
        return out

    def candidate_terms(self, split, context, ids, values):
        flat = self._slots(split, split.candidate, ids, values)
        slots = ffm_pair_slots(self.layout.n_fields, split)
        out = slot_dot(flat, slots["kk"][0], flat, slots["kk"][1])
        if "ck" in context:
            out += tf.reduce_sum(context["ck"] * tf.gather(flat, slots["ck"][1], axis=1), axis=[1, 2])
        return out
