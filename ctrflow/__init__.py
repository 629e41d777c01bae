"""ctrflow: train and serve click-through-rate models on very sparse ad data, at real-time-bidding scale.

The public API, re-exported here; the `ctrflow` command is a thin layer over it.
"""
from ctrflow.data.batch import Batch, FeatureSpec
from ctrflow.data.convert import ConvertOptions, ConvertSummary, convert
from ctrflow.data.generate import GenerateOptions, GenerateSummary, generate
from ctrflow.data.pipeline import BatchStream, PipelineOptions, open_batches
from ctrflow.data.shards import verify
from ctrflow.errors import (
    ConfigError,
    CtrflowError,
    DeadlineExceeded,
    InputError,
    ModelNotFoundError,
    QueueFullError,
    SchemaError,
    ShardCorruptError,
    TooManyRejectsError,
    TrainingError,
)
from ctrflow.schema import CategoricalField, NumericField, Schema, infer_schema, load_schema
from ctrflow.serving.batcher import AutoBatcher, BatcherStats, BatchingOptions


def __getattr__(name: str):
    """TensorFlow-backed parts load on first use, so `import ctrflow` (and the CLI) stays fast."""
    lazy = {
        "TrainConfig": "ctrflow.train.config", "GroupOptimizer": "ctrflow.train.config",
        "ModelConfig": "ctrflow.models.registry", "make_model": "ctrflow.models.registry",
        "train": "ctrflow.train.loop", "TrainSummary": "ctrflow.train.loop",
        "evaluate": "ctrflow.train.evaluate",
        "export": "ctrflow.export", "ExportSummary": "ctrflow.export",
        "Predictor": "ctrflow.serving.predictor",
        "serve": "ctrflow.serving.server", "ServeOptions": "ctrflow.serving.server",
        "continuous_train": "ctrflow.train.continuous", "ContinuousOptions": "ctrflow.train.continuous",
    }
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(f"module 'ctrflow' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "Schema", "CategoricalField", "NumericField", "load_schema", "infer_schema",
    "generate", "GenerateOptions", "GenerateSummary",
    "convert", "ConvertOptions", "ConvertSummary", "verify",
    "open_batches", "PipelineOptions", "BatchStream", "Batch", "FeatureSpec",
    "AutoBatcher", "BatchingOptions", "BatcherStats",
    "TrainConfig", "GroupOptimizer", "ModelConfig", "make_model", "train", "TrainSummary", "evaluate",
    "export", "ExportSummary", "Predictor", "serve", "ServeOptions", "continuous_train", "ContinuousOptions",
    "CtrflowError", "ConfigError", "SchemaError", "InputError", "TooManyRejectsError", "ShardCorruptError",
    "TrainingError", "DeadlineExceeded", "QueueFullError", "ModelNotFoundError",
]
