"""CTR models as `tf.Module`s over the `Batch` layout: LR, FM, FwFM, FFM, DeepFM and DCN-v2.

`make_model(ModelConfig(kind, ...), spec)` builds one; every model is called as
`model(ids, numeric, training=False) -> logits [B]` and splits its variables into optimizer groups.
"""
from ctrflow.models.registry import CROSS_STRUCTURES, MODEL_KINDS, TABLE_MODES, ModelConfig, make_model, model_class

# The model classes and layers import TensorFlow: they load on first access, so `ctrflow.models.registry`
# (ModelConfig, imported by every settings module) stays TensorFlow-free.
_LAZY = {
    "MODELS": "ctrflow.models.registry",
    "DCNv2": "ctrflow.models.dcnv2", "DeepFM": "ctrflow.models.deepfm", "FieldAwareFM": "ctrflow.models.ffm",
    "FactorizationMachine": "ctrflow.models.fm", "FieldWeightedFM": "ctrflow.models.fwfm",
    "LogisticRegression": "ctrflow.models.lr",
    **{n: "ctrflow.models.layers" for n in ("MLP", "VARIABLE_GROUPS", "CrossNetwork", "CtrModel", "FieldPairInteraction",
                                             "FieldEmbedding", "FieldLayout", "FieldTables", "OnlineNormalizer",
                                             "SparseLinear", "ffm_interaction", "fm_interaction", "make_table")},
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ModelConfig",
    "make_model",
    "MODELS",
    "MODEL_KINDS",
    "model_class",
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
