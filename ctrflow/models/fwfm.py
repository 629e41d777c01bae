"""Field-weighted FM (Pan et al. 2018): FM whose pair terms get a learned weight per field pair.

`logit = linear + sum_{i<j} r_ij <v_i, v_j>`: an FM (same tables, same serving cost order) that learns
that some field pairs matter and most do not, at S(S-1)/2 extra numbers (741 for 39 fields).
"""
from __future__ import annotations

import tensorflow as tf

from ctrflow.models.layers import CtrModel, FieldEmbedding, FieldPairInteraction, SparseLinear

__all__ = ["FieldWeightedFM"]


class FieldWeightedFM(CtrModel):
    """Linear terms plus field-pair-weighted interactions of the field embeddings.

    Example:
        >>> from ctrflow.data.batch import FeatureSpec
        >>> from ctrflow.models import ModelConfig, make_model
        >>> model = make_model(ModelConfig("fwfm", embedding_dim=8), FeatureSpec(("site", "app"), (1000, 500)))
        >>> model(tf.constant([[5, 7]]), None).shape
        TensorShape([1])

    Variables: "linear" and "embedding" tables (as FM); "dense": the bias and the `[S, S]` pair weights
    `r` (S = id fields + normalized numerics; only i < j is used, starting at 1 = a plain FM).
    """

    kind = "fwfm"

    def __init__(self, config, spec, *, name=None) -> None:
        super().__init__(config, spec, name=name)
        with self.name_scope:
            self.linear = SparseLinear(self.layout, table_mode=config.table_mode)
            self.embedding = FieldEmbedding(
                self.layout, config.embedding_dim, table_mode=config.table_mode, init_scale=config.init_scale, seed=config.seed
            )
            self.pairs = FieldPairInteraction(self.layout.n_fields)

    def build_layers(self) -> None:
        self.linear.build()
        self.embedding.build()
        self.pairs.build()

    def call(self, ids: tf.Tensor, values: tf.Tensor | None, training: bool) -> tf.Tensor:
        return self.linear(ids, values) + self.pairs(self.embedding(ids, values))

    # Context requests: pairs split into context-context (once), context-candidate (the context folds
    # into one mixed vector per candidate field) and candidate-candidate blocks.
    def context_terms(self, split, ids, values):
        emb = self.embedding.side(ids, values, split.context)
        cc, ck, _ = self.pairs.split(split)
        mixed = tf.einsum("rid,ij->rjd", emb, ck)  # [R, Sk, D]: sum_i r_ij v_i for each candidate field j
        return {"logit": FieldPairInteraction.weighted(emb, cc), "mixed": mixed}

    def candidate_terms(self, split, context, ids, values):
        emb = self.embedding.side(ids, values, split.candidate)
        _, _, kk = self.pairs.split(split)
        return FieldPairInteraction.weighted(emb, kk) + tf.reduce_sum(emb * context["mixed"], axis=[1, 2])
