"""Logistic regression: the sparse linear layer alone, `logit = sum_f w[id_f] + sum_j w_j x_j + bias`.

The baseline every other model must beat; cheap to train and serve (one scalar per id).
"""
from __future__ import annotations

import tensorflow as tf

from ctrflow.models.layers import CtrModel, SparseLinear

__all__ = ["LogisticRegression"]


class LogisticRegression(CtrModel):
    """Logistic regression over all fields (see `CtrModel` for inputs and life cycle).

    Example:
        >>> from ctrflow.data.batch import FeatureSpec
        >>> from ctrflow.models import ModelConfig, make_model
        >>> model = make_model(ModelConfig("lr"), FeatureSpec(("site", "app"), (1000, 500)))
        >>> model(tf.constant([[5, 7], [0, 2]]), None).shape
        TensorShape([2])

    Variables: "linear" tables (`[rows, 1]`, zero-initialized) and a "dense" bias.
    """

    kind = "lr"

    def __init__(self, config, spec, *, name=None) -> None:
        super().__init__(config, spec, name=name)
        with self.name_scope:
            self.linear = SparseLinear(self.layout, table_mode=config.table_mode)

    def build_layers(self) -> None:
        self.linear.build()

    def call(self, ids: tf.Tensor, values: tf.Tensor | None, training: bool) -> tf.Tensor:
        return self.linear(ids, values)
