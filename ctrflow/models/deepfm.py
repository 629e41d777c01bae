"""DeepFM (Guo et al. 2017): one set of field embeddings feeds both an FM and an MLP; logits add up.

`logit = linear + fm_interaction(emb) + mlp(flatten(emb))`; the MLP learns higher-order interactions.
"""
from __future__ import annotations

import tensorflow as tf

from ctrflow.models.layers import MLP, CtrModel, FieldEmbedding, SparseLinear, fm_interaction

__all__ = ["DeepFM"]


class DeepFM(CtrModel):
    """FM plus an MLP over the concatenated (shared) field embeddings.

    The MLP uses `config.hidden` (widths, input to output), relu, `config.dropout` (training only) and,
    if `config.batch_norm`, batch normalization after each hidden layer.

    Example:
        >>> from ctrflow.data.batch import FeatureSpec
        >>> from ctrflow.models import ModelConfig, make_model
        >>> config = ModelConfig("deepfm", embedding_dim=8, hidden=(64, 32))
        >>> model = make_model(config, FeatureSpec(("site", "app"), (1000, 500)))
        >>> model(tf.constant([[5, 7]]), None, training=True).shape
        TensorShape([1])

    Variables: "linear" and "embedding" tables; "dense": bias, MLP kernels/biases, batch-norm scale and
    offset. Batch-norm moving averages and normalization statistics are `non_trainable_state()`.
    """

    kind = "deepfm"

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
            self.mlp = MLP(
                self.layout.n_fields * config.embedding_dim,
                config.hidden,
                dropout=config.dropout,
                batch_norm=config.batch_norm,
                seed=config.seed,
            )

    def build_layers(self) -> None:
        self.linear.build()
        self.embedding.build()
        self.mlp.build()

    def call(self, ids: tf.Tensor, values: tf.Tensor | None, training: bool) -> tf.Tensor:
        emb = self.embedding(ids, values)
        flat = tf.reshape(emb, [-1, self.layout.n_fields * self.config.embedding_dim])
        return self.linear(ids, values) + fm_interaction(emb) + self.mlp(flat, training=training)

    # Context requests: the FM splits as in FactorizationMachine; the MLP's first layer `flat @ W0`
    # splits by the kernel's rows into the context's share (once per context) and the candidate's.
    def context_terms(self, split, ids, values):
        emb = self.embedding.side(ids, values, split.context)
        dim = self.config.embedding_dim
        flat = tf.reshape(emb, [-1, len(split.context.fields) * dim])
        return {"logit": fm_interaction(emb), "sum": tf.reduce_sum(emb, axis=1),
                "first": self.mlp.first_matmul(flat, split.context.kernel_rows(dim), bias=True)}

    def candidate_terms(self, split, context, ids, values):
        emb = self.embedding.side(ids, values, split.candidate)
        dim = self.config.embedding_dim
        flat = tf.reshape(emb, [-1, len(split.candidate.fields) * dim])
        first = context["first"] + self.mlp.first_matmul(flat, split.candidate.kernel_rows(dim))
        fm = fm_interaction(emb) + tf.reduce_sum(context["sum"] * tf.reduce_sum(emb, axis=1), axis=1)
        return fm + self.mlp.from_first(first)
