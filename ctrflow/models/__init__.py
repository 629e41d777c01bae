"""CTR models as `tf.Module`s over the `Batch` layout: logistic regression, FM and DeepFM.

`make_model(ModelConfig(kind, ...), spec)` builds one; every model is called as
`model(ids, numeric, training=False) -> logits [B]` and splits its variables into optimizer groups.
"""
from ctrflow.models.deepfm import DeepFM
from ctrflow.models.fm import FactorizationMachine
from ctrflow.models.layers import (
    MLP,
    VARIABLE_GROUPS,
    CtrModel,
    FieldEmbedding,
    FieldLayout,
    FieldTables,
    OnlineNormalizer,
    SparseLinear,
    fm_interaction,
    make_table,
)
from ctrflow.models.lr import LogisticRegression
from ctrflow.models.registry import MODELS, TABLE_MODES, ModelConfig, make_model

__all__ = [
    "ModelConfig",
    "make_model",
    "MODELS",
    "TABLE_MODES",
    "VARIABLE_GROUPS",
    "CtrModel",
    "LogisticRegression",
    "FactorizationMachine",
    "DeepFM",
    "SparseLinear",
    "FieldEmbedding",
    "FieldLayout",
    "FieldTables",
    "OnlineNormalizer",
    "MLP",
    "fm_interaction",
    "make_table",
]
