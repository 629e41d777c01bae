"""Factorization machine: linear terms plus every pairwise field interaction `<v_i x_i, v_j x_j>`.

Interactions cost O(fields x dim) per row through the sum-of-squares identity (`fm_interaction`).
"""
from __future__ import annotations

import tensorflow as tf

from ctrflow.models.layers import CtrModel, FieldEmbedding, SparseLinear, fm_interaction, packed_fm

__all__ = ["FactorizationMachine"]


class FactorizationMachine(CtrModel):
    """`logit = linear + 0.5 * sum_d((sum_i v_id)^2 - sum_i v_id^2)` over the field embeddings.

    Id fields contribute their row's vector; normalized numerics contribute value x their own vector.

    Example:
        >>> from ctrflow.data.batch import FeatureSpec
        >>> from ctrflow.models import ModelConfig, make_model
        >>> model = make_model(ModelConfig("fm", embedding_dim=8), FeatureSpec(("site", "app"), (1000, 500)))
        >>> model(tf.constant([[5, 7]]), None).shape
        TensorShape([1])

    Variables: "linear" tables, "embedding" tables (`[rows, embedding_dim]`), a "dense" bias.
    """

    kind = "fm"

    def __init__(self, config, spec, *, name=None) -> None:
        super().__init__(config, spec, name=name)
        with self.name_scope:
            self.linear = SparseLinear(self.layout, table_mode=config.table_mode)
            self.embedding = FieldEmbedding(
                self.layout,
                config.embedding_dim,
                table_mode=config.table_mode,
                init_scale=config.init_scale,
                seed=config.seed,
            )

    def build_layers(self) -> None:
        self.linear.build()
        self.embedding.build()

    def call(self, ids: tf.Tensor, values: tf.Tensor | None, training: bool) -> tf.Tensor:
        if self.packed_rows is not None:  # a packed export: one gather, both terms from the same rows
            linear, fm, _ = packed_fm(self.embedding.packed(ids, values), self.embedding.table.dim)
            return linear + self.linear.bias + fm
        return self.linear(ids, values) + fm_interaction(self.embedding(ids, values))

    # Context requests: FM(all) = FM(context) + FM(candidate) + <sum of context vectors, sum of candidate vectors>.
    packed_terms = True  # packed exports: call and the context terms below read the packed rows whole

    def context_terms(self, split, ids, values):
        if self.packed_rows is not None:  # the linear sums ride along (CtrModel._call_context adds none)
            linear, fm, vectors = packed_fm(self.embedding.packed_side(ids, values, split.context), self.embedding.table.dim)
            return {"logit": linear + fm, "sum": vectors}
        emb = self.embedding.side(ids, values, split.context)
        return {"logit": fm_interaction(emb), "sum": tf.reduce_sum(emb, axis=1)}

    def candidate_terms(self, split, context, ids, values):
        if self.packed_rows is not None:
            linear, fm, vectors = packed_fm(self.embedding.packed_side(ids, values, split.candidate), self.embedding.table.dim)
            return linear + fm + tf.reduce_sum(context["sum"] * vectors, axis=1)
        emb = self.embedding.side(ids, values, split.candidate)
        return fm_interaction(emb) + tf.reduce_sum(context["sum"] * tf.reduce_sum(emb, axis=1), axis=1)
