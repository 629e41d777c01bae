"""`TrainConfig`: every setting of a training run, one frozen object for the API, the CLI and the run folder.

Free of TensorFlow: a config is checked (optimizer names and their extra settings included) where it is
written, before anything is trained.

Defaults that converge without flags
------------------------------------
- Validation: with no `valid` data, the latest `holdout_fraction` of the rows by the schema's time
  column (a seeded random share when there is none) is held out, and the summary says so
  (`valid_source`).
- Epochs: with validation data, train until `early_stopping_patience` validations in a row do not
  improve, at most `MAX_EPOCHS` epochs (`epochs=None`), then restore the best checkpoint
  (`restore_best`); without validation data, one epoch.
- Learning rates: `learning_rate=None` takes the measured per-group rates of `DEFAULT_LEARNING_RATES`.
  Every rate is the rate at `reference_batch_size` rows per batch (4096, the default batch size) and is
  scaled with the batch size
  by `lr_scaling` ("sqrt": rate x sqrt(batch / reference), the rule for Adam-family and adaptive
  optimizers; "linear" for plain SGD; "none"), so `--batch-size` can change without retuning.
- Regularization: L2 1e-4 (`l2`) on every table row at every step, as in the loss's definition, applied
  lazily (`l2_mode="every_step"`: a row touched again carries the penalty of the steps it missed), so a
  rare id is regularized as much as a frequent one while a step still costs only the rows it touched;
  dropout 0.2 in the MLP of the default model. Measured against L2 on touched rows only ("touched", the
  former default): better or tied for every model on two synthetic datasets, the best model (FFM) by
  0.0013 / 0.0002 logloss (BENCHMARKS.md "Model quality vs peers", helper "quality").
- Rare ids: the default model has `min_count=5` (ids seen fewer than 5 times in the training data share
  one row per field, counted when the run starts; BENCHMARKS.md "Rare ids share one row per field"), and so
  does a `model` mapping (a config file's `model: {kind: fm}`) that does not set `min_count`.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ctrflow.errors import ConfigError
from ctrflow.models.registry import ModelConfig
from ctrflow.train.optimizer_settings import L2_MODES, OPTIMIZER_NAMES, check_optimizer_settings
from ctrflow.validation import Bool, Choice, Float, Int, check_fields

__all__ = ["GroupOptimizer", "TrainConfig", "OPTIMIZER_GROUPS", "OPTIMIZER_NAMES", "DEFAULT_LEARNING_RATES", "MAX_EPOCHS",
           "LR_SCALINGS", "L2_MODES", "DEFAULT_MIN_COUNT"]

OPTIMIZER_GROUPS = ("linear", "embedding", "dense")
LR_SCALINGS = ("sqrt", "linear", "none")
MAX_EPOCHS = 10  # the bound on epochs when `epochs` is None and early stopping decides

# Rates at `reference_batch_size` (4096, the default batch) rows per batch, per optimizer and variable
# group. LazyAdam's were measured on three datasets (synthetic, a Zipf-mixture generator, TalkingData;
# helper "quality", benchmarks/quality_defaults.py, BENCHMARKS.md "Defaults"): LazyAdam wins in every
# group; the linear weights (one per id) want ~3x the embeddings' rate (0.01 vs 0.003; 0.03 overshoots,
# 0.001 is far from converged after 8 epochs); a dense Adam for the MLP gains nothing over LazyAdam.
# The others are starting points, not measured optima (Adagrad/FTRL/SGD stayed behind LazyAdam).
DEFAULT_LEARNING_RATES: dict[str, dict[str, float]] = {
    "lazyadam": {"linear": 0.01, "embedding": 0.003, "dense": 0.003},
    "adam": {"linear": 0.01, "embedding": 0.003, "dense": 0.003},
    "adagrad": {"linear": 0.1, "embedding": 0.05, "dense": 0.01},
    "ftrl": {"linear": 0.1, "embedding": 0.05, "dense": 0.01},
    "sgd": {"linear": 0.5, "embedding": 0.2, "dense": 0.05},
}


DEFAULT_MIN_COUNT = 5  # ModelConfig.min_count of a run's model unless set (ModelConfig alone defaults to 0: off)


@dataclass(frozen=True)
class GroupOptimizer:
    """The optimizer of one variable group ("linear", "embedding" or "dense").

    name: one of OPTIMIZER_NAMES (case, "_" and "-" ignored; a near miss is suggested).
    learning_rate: > 0, the rate at `TrainConfig.reference_batch_size` rows per batch.
    extra: that optimizer's own settings, checked here, e.g. {"l1": 1.0} for ftrl.
    """

    name: str
    learning_rate: float
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.extra, dict):
            raise ConfigError(f"The 'extra' parameter of GroupOptimizer must be a mapping of settings. Got {self.extra!r} instead.")
        name, extra = check_optimizer_settings("GroupOptimizer", self.name, self.extra)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "extra", extra)
        check_fields(self, {"learning_rate": Float(0, low_open=True)})


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Every field is validated here, with the value received in the message.

    The optimizer applies to every variable group unless `optimizer_groups` overrides a group, e.g.
    `{"linear": GroupOptimizer("ftrl", 0.05, {"l1": 1.0})}` (FTRL on the linear part, `optimizer` on
    the embeddings and the MLP). Sparse groups update only the rows a batch touched.
    """

    # DeepFM with MLP dropout 0.2 (measured: zipfmix 0.1216-0.1237 vs 0.1251 without, synthetic equal) and ids
    # seen < 5 times sharing one row per field (min_count; measured over six models x four datasets: TalkingData
    # every model -0.0006..-0.0011, the best 0.00793 -> 0.00720; iPinYou best 0.01974 -> 0.01941; synthetic and
    # zipfmix better or tied for the best models; 3 and 20 worse than 5 on TalkingData and iPinYou; BENCHMARKS.md
    # "Rare ids"); the CLI's `--model KIND` keeps these settings and changes the kind.
    # A `model` mapping (a config file's `model: {kind: fm}`) gets the same min_count unless it sets one, as
    # `--model fm` does (run.json records always carry min_count; `load_run_info` fills 0 into older ones).
    model: ModelConfig = field(default_factory=lambda: ModelConfig("deepfm", dropout=0.2, min_count=DEFAULT_MIN_COUNT))
    optimizer: str = "lazyadam"  # one of OPTIMIZER_NAMES, for every group not in optimizer_groups
    learning_rate: float | None = None  # > 0 for every group; None: DEFAULT_LEARNING_RATES[optimizer][group]
    optimizer_groups: dict[str, GroupOptimizer] = field(default_factory=dict)
    l2: float = 1e-4  # L2 on table rows (see l2_mode) / all weights (dense), >= 0 (measured: 1e-5 too weak, 3e-4 too strong)
    # "every_step": every table row at every step, caught up lazily when a row is next touched; "touched": a row is
    # penalized only in the steps it is in, so a rare id barely (sparse optimizers' `l2_mode`)
    l2_mode: str = "every_step"
    batch_size: int = 4096  # >= 1
    epochs: int | None = None  # >= 1; None: until early stopping (at most MAX_EPOCHS) with validation data, else 1
    shuffle_buffer_rows: int = 262_144
    steps_per_call: int = 1  # training steps per tf.function call (fewer Python round trips), >= 1
    seed: int = 0
    deterministic: bool = False  # single-threaded, deterministic ops: same seed → same model bit for bit
    max_steps: int | None = None  # stop after this many steps (None: all epochs)
    valid_every_steps: int = 0  # 0: validate at the end of each epoch
    early_stopping_patience: int = 1  # stop after this many validations without improvement; 0: off
    restore_best: bool = True  # end on the checkpoint of the best validation logloss, not the last
    holdout_fraction: float = 0.1  # without valid data: latest share held out for validation, in [0, 0.5]; 0: none
    reference_batch_size: int = 4096  # the batch size learning rates are given for, >= 1
    lr_scaling: str = "sqrt"  # how rates follow batch_size / reference_batch_size: sqrt | linear | none
    negative_sampling_rate: float = 1.0  # keep each negative row with this probability, in (0, 1]; exports correct for it
    checkpoint_every_steps: int = 500  # >= 1; also at each epoch end and at the end
    keep_checkpoints: int = 3
    log_every_steps: int = 50  # history/TensorBoard interval for train logloss
    hogwild_threads: int = 1  # > 1: that many threads run steps on shared variables without locks
    profile: bool = False  # write a TensorFlow profiler trace of a few steps to RUN/profile
    # After training (with validation): refit the per-id weights — linear, crosses, output bias — to convergence on the
    # full L2-penalized training logloss, the rest of the model frozen, L2 chosen on validation (ctrflow.train.refit)
    refit: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            model = dict(self.model)
            if "kind" in model:  # (without one, from_dict's message lists only the keys given)
                model.setdefault("min_count", DEFAULT_MIN_COUNT)
            object.__setattr__(self, "model", ModelConfig.from_dict(model))
        if not isinstance(self.model, ModelConfig):
            raise ConfigError(f"The 'model' parameter of TrainConfig must be a ModelConfig or a mapping. Got {self.model!r} instead.")
        if not isinstance(self.optimizer_groups, dict):
            raise ConfigError(f"The 'optimizer_groups' parameter of TrainConfig must be a mapping of group to optimizer. "
                              f"Got {self.optimizer_groups!r} instead.")
        groups = {}
        for g, spec in self.optimizer_groups.items():
            Choice(OPTIMIZER_GROUPS)("TrainConfig", "optimizer_groups", g)
            if isinstance(spec, dict):
                unknown = sorted(set(spec) - {"name", "learning_rate", "extra"})
                if unknown or "name" not in spec:
                    raise ConfigError(f"The optimizer of group {g!r} must be a mapping with 'name', 'learning_rate' (optional) "
                                      f"and 'extra' (optional). Got {spec!r} instead.")
                spec = GroupOptimizer(spec["name"], spec.get("learning_rate") or self._default_rate(spec["name"], g), spec.get("extra") or {})
            if not isinstance(spec, GroupOptimizer):
                raise ConfigError(f"The optimizer of group {g!r} must be a GroupOptimizer. Got {spec!r} instead.")
            groups[g] = spec
        object.__setattr__(self, "optimizer_groups", groups)
        object.__setattr__(self, "optimizer", check_optimizer_settings("TrainConfig", self.optimizer, {}, param="optimizer")[0])
        check_fields(self, {
            "learning_rate": Float(0, low_open=True, optional=True), "l2": Float(0), "l2_mode": Choice(L2_MODES),
            "batch_size": Int(1), "epochs": Int(1, optional=True), "shuffle_buffer_rows": Int(1), "steps_per_call": Int(1),
            "seed": Int(0), "deterministic": Bool(), "max_steps": Int(1, optional=True), "valid_every_steps": Int(0),
            "early_stopping_patience": Int(0), "restore_best": Bool(), "holdout_fraction": Float(0, 0.5),
            "reference_batch_size": Int(1), "lr_scaling": Choice(LR_SCALINGS),
            "negative_sampling_rate": Float(0, 1, low_open=True), "checkpoint_every_steps": Int(1),
            "keep_checkpoints": Int(1), "log_every_steps": Int(1), "hogwild_threads": Int(1), "profile": Bool(), "refit": Bool(),
        })
        if self.hogwild_threads > 1 and self.deterministic:
            raise ConfigError("hogwild_threads > 1 cannot be deterministic: choose one (set deterministic=False or hogwild_threads=1).")

    @staticmethod
    def _default_rate(optimizer: str, group: str) -> float:
        name = check_optimizer_settings("TrainConfig", optimizer, {}, param="optimizer")[0]
        return DEFAULT_LEARNING_RATES[name][group]

    def group_optimizer(self, group: str) -> GroupOptimizer:
        """The optimizer of `group` as configured (rates at `reference_batch_size`)."""
        if group in self.optimizer_groups:
            return self.optimizer_groups[group]
        return GroupOptimizer(self.optimizer, self.learning_rate or self._default_rate(self.optimizer, group))

    def batch_scale(self) -> float:
        """The factor every configured learning rate is multiplied by at this `batch_size`."""
        ratio = self.batch_size / self.reference_batch_size
        return {"sqrt": math.sqrt(ratio), "linear": ratio, "none": 1.0}[self.lr_scaling]

    def effective_learning_rate(self, group: str) -> float:
        """The rate `group`'s optimizer runs with: its configured rate scaled to this batch size."""
        return self.group_optimizer(group).learning_rate * self.batch_scale()

    def max_epochs(self, has_validation: bool) -> int:
        if self.epochs is not None:
            return self.epochs
        return MAX_EPOCHS if has_validation and self.early_stopping_patience else 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        d["optimizer_groups"] = {g: asdict(o) for g, o in self.optimizer_groups.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"A TrainConfig must be a mapping of settings. Got {type(d).__name__} instead.")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            from ctrflow.validation import suggest

            hints = [f"{k!r} (did you mean {suggest(k, known)!r}?)" if suggest(k, known) else repr(k) for k in unknown]
            raise ConfigError(f"Unknown TrainConfig keys {', '.join(hints)}; valid keys are {sorted(known)}.")
        return cls(**d)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainConfig":
        """From a YAML or JSON file (the `--config FILE` of `ctrflow train`): YAML 1.2 numbers, file:line errors."""
        from ctrflow.configfile import load_config_file

        data = load_config_file(path, what="training config")
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def replace(self, **changes: Any) -> "TrainConfig":
        return replace(self, **changes)
