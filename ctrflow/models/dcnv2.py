"""DCN-v2 (Wang et al. 2021): a cross network for explicit bounded-degree crosses plus an MLP.

`x0 = flatten(field embeddings)`; structures (`config.cross_structure`):
- "stacked" (default):  `logit = linear + mlp(cross(x0))`;
- "parallel": `logit = linear + w^T [cross(x0); mlp_hidden(x0)]`.
The sparse linear term carries the output bias (started at the base rate by the trainers) and the
per-id main effects, as in every ctrflow model. Cross layers are low-rank (`config.cross_rank`, 64) by
default: full rank cost 2.5x the training time for no measurable gain (BENCHMARKS.md, "Model zoo").

Serving cost per row, D = fields x embedding_dim: cross layers x D^2 (full rank) or x 2 D r (low rank),
plus the MLP's D x hidden[0] first layer, which in "parallel" is the part a context/candidates request
can split (issue 11); the cross network mixes x0 elementwise and does not split.
"""
from __future__ import annotations

import tensorflow as tf

from ctrflow.models.layers import MLP, CtrModel, CrossNetwork, FieldEmbedding, SparseLinear

__all__ = ["DCNv2"]



class DCNv2(CtrModel):
    """Cross network and MLP over the concatenated field embeddings, stacked or in parallel.

    Uses `config.cross_layers`, `config.cross_rank` (None = full rank), `config.cross_structure`,
    and for the MLP `config.hidden`, `config.dropout` (training only) and `config.batch_norm`.

    Example:
        >>> from ctrflow.data.batch import FeatureSpec
        >>> from ctrflow.models import ModelConfig, make_model
        >>> config = ModelConfig("dcnv2", embedding_dim=8, hidden=(64, 32), cross_layers=2)
        >>> model = make_model(config, FeatureSpec(("site", "app"), (1000, 500)))
        >>> model(tf.constant([[5, 7]]), None, training=True).shape
        TensorShape([1])

    Variables: "linear" and "embedding" tables; "dense": bias, cross kernels (or U, V factors) and
    biases, MLP kernels/biases (and batch-norm scale/offset), the parallel structure's output layer.
    """

    kind = "dcnv2"

    def __init__(self, config, spec, *, name=None) -> None:
        super().__init__(config, spec, name=name)
        width = self.layout.n_fields * config.embedding_dim
        self.stacked = config.cross_structure == "stacked"
        with self.name_scope:
            self.linear = SparseLinear(self.layout, table_mode=config.table_mode)
            self.embedding = FieldEmbedding(
                self.layout, config.embedding_dim, table_mode=config.table_mode, init_scale=config.init_scale, seed=config.seed
            )
            self.cross = CrossNetwork(width, config.cross_layers, rank=config.cross_rank, seed=config.seed)
            self.mlp = MLP(
                width, config.hidden, dropout=config.dropout, batch_norm=config.batch_norm, seed=config.seed,
                output=self.stacked,
            )
            # Parallel: one linear output layer over both towers (an MLP without hidden layers).
            self.head = None if self.stacked else MLP(width + self.mlp.output_dim, (), seed=config.seed, name="head")

    def build_layers(self) -> None:
        self.linear.build()
        self.embedding.build()
        self.cross.build()
        self.mlp.build()
        if self.head is not None:
            self.head.build()

    def call(self, ids: tf.Tensor, values: tf.Tensor | None, training: bool) -> tf.Tensor:
        x0 = tf.reshape(self.embedding(ids, values), [-1, self.layout.n_fields * self.config.embedding_dim])
        if self.stacked:
            deep = self.mlp(self.cross(x0), training=training)
        else:
            towers = tf.concat([self.cross(x0), self.mlp(x0, training=training)], axis=1)
            deep = self.head(towers)
        return self.linear(ids, values) + deep

    # Context requests: the first cross layer's `x0 @ W0` (low rank: `x0 @ V0`) and, in the parallel
    # structure, the MLP's first layer split by kernel rows into the context's share (once) and the
    # candidate's; the cross network then needs the whole x0 per candidate (it mixes x0 elementwise).
    def context_terms(self, split, ids, values):
        emb = self.embedding.side(ids, values, split.context)
        dim = self.config.embedding_dim
        flat = tf.reshape(emb, [-1, len(split.context.fields) * dim])
        rows = split.context.kernel_rows(dim)
        out = {"emb": emb, "cross": self.cross.first_mix(flat, rows)}
        if not self.stacked and self.mlp.splittable:
            out["first"] = self.mlp.first_matmul(flat, rows, bias=True)
        return out

    def candidate_terms(self, split, context, ids, values):
        emb = self.embedding.side(ids, values, split.candidate)
        dim = self.config.embedding_dim
        flat = tf.reshape(emb, [-1, len(split.candidate.fields) * dim])
        rows = split.candidate.kernel_rows(dim)
        x0 = tf.reshape(split.merge(context["emb"], emb), [-1, self.layout.n_fields * dim])
        crossed = self.cross.from_first_mix(x0, context["cross"] + self.cross.first_mix(flat, rows))
        if self.stacked:
            return self.mlp(crossed)
        deep = self.mlp.from_first(context["first"] + self.mlp.first_matmul(flat, rows)) if "first" in context else self.mlp(x0)
        return self.head(tf.concat([crossed, deep], axis=1))
