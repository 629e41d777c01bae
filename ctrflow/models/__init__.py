"""CTR models as `tf.Module`s over the `Batch` layout: LR, FM, FwFM, FFM, DeepFM and DCN-v2.

`make_model(ModelConfig(kind, ...), spec)` builds one; every model is called as
`model(ids, numeric, training=False) -> logits [B]` and splits its variables into optimizer groups.
"""
from ctrflow.models.dcnv2 import DCNv2
from ctrflow.models.deepfm import DeepFM
from ctrflow.models.ffm import FieldAwareFM
from ctrflow.models.fm import FactorizationMachine
from ctrflow.models.fwfm import FieldWeightedFM
from ctrflow.models.layers import (
    MLP,
    VARIABLE_GROUPS,
    CrossNetwork,
    CtrModel,
    FieldPairInteraction,
    FieldEmbedding,
    FieldLayout,
    FieldTables,
    OnlineNormalizer,
    SparseLinear,
    ffm_interaction,
    fm_interaction,
    make_table,
)
from ctrflow.models.lr import LogisticRegression
from ctrflow.models.registry import CROSS_STRUCTURES, MODELS, TABLE_MODES, ModelConfig, make_model

__all__ = [
    "ModelConfig",
    "make_model",
    "MODELS",
    "TABLE_MODES",
    "CROSS_STRUCTURES",
    "VARIABLE_GROUPS",
    "CtrModel",
    "LogisticRegression",
    "FactorizationMachine",
    "FieldWeightedFM",
    "FieldAwareFM",
    "DeepFM",
    "DCNv2",
    "SparseLinear",
    "FieldEmbedding",
    "FieldLayout",
    "FieldTables",
    "OnlineNormalizer",
    "MLP",
    "CrossNetwork",
    "FieldPairInteraction",
    "fm_interaction",
    "ffm_interaction",
    "make_table",
]
