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

__version__ = "0.1.0"

__all__ = [
    "Schema", "CategoricalField", "NumericField", "load_schema", "infer_schema",
    "generate", "GenerateOptions", "GenerateSummary",
    "convert", "ConvertOptions", "ConvertSummary", "verify",
    "open_batches", "PipelineOptions", "BatchStream", "Batch", "FeatureSpec",
    "AutoBatcher", "BatchingOptions", "BatcherStats",
    "CtrflowError", "ConfigError", "SchemaError", "InputError", "TooManyRejectsError", "ShardCorruptError",
    "TrainingError", "DeadlineExceeded", "QueueFullError", "ModelNotFoundError",
]
