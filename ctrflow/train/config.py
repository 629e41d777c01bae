"""`TrainConfig`: every setting of a training run, one frozen object for the API, the CLI and the run folder."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ctrflow.errors import ConfigError
from ctrflow.models.registry import ModelConfig
from ctrflow.train.optimizers import optimizer_names

__all__ = ["GroupOptimizer", "TrainConfig", "OPTIMIZER_GROUPS"]

OPTIMIZER_GROUPS = ("linear", "embedding", "dense")


@dataclass(frozen=True)
class GroupOptimizer:
    """The optimizer of one variable group ("linear", "embedding" or "dense")."""

    name: str  # sgd | adagrad | ftrl | adam | lazyadam
    learning_rate: float
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"l1": 1.0} for ftrl

    def __post_init__(self) -> None:
        if self.name not in optimizer_names():
            raise ConfigError(f"Unknown optimizer {self.name!r}. Valid names: {', '.join(optimizer_names())}.")
        if not self.learning_rate > 0:
            raise ConfigError(f"The 'learning_rate' of optimizer {self.name!r} must be > 0. Got {self.learning_rate!r} instead.")


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Every field is validated here, with the value received in the message.

    The optimizer applies to every variable group unless `optimizer_groups` overrides a group, e.g.
    `{"linear": GroupOptimizer("ftrl", 0.05, {"l1": 1.0})}` (FTRL on the linear part, `optimizer` on
    the embeddings and the MLP). Sparse groups update only the rows a batch touched.
    """

    model: ModelConfig = field(default_factory=lambda: ModelConfig("deepfm"))
    optimizer: str = "lazyadam"
    learning_rate: float = 1e-3  # > 0
    optimizer_groups: dict[str, GroupOptimizer] = field(default_factory=dict)
    l2: float = 0.0  # L2 on the rows a batch touched (sparse groups) / all weights (dense), >= 0
    batch_size: int = 4096
    epochs: int = 1
    shuffle_buffer_rows: int = 262_144
    steps_per_call: int = 1  # training steps per tf.function call (fewer Python round trips), >= 1
    seed: int = 0
    deterministic: bool = False  # single-threaded, deterministic ops: same seed → same model bit for bit
    max_steps: int | None = None  # stop after this many steps (None: all epochs)
    valid_every_steps: int = 0  # 0: validate at the end of each epoch
    early_stopping_patience: int = 0  # stop after this many validations without improvement; 0: off
    checkpoint_every_steps: int = 500  # >= 1; also at each epoch end and at the end
    keep_checkpoints: int = 3
    log_every_steps: int = 50  # history/TensorBoard interval for train logloss
    hogwild_threads: int = 1  # > 1: that many threads run steps on shared variables without locks
    profile: bool = False  # write a TensorFlow profiler trace of a few steps to RUN/profile

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", ModelConfig.from_dict(self.model))
        groups = {}
        for g, spec in dict(self.optimizer_groups).items():
            if g not in OPTIMIZER_GROUPS:
                raise ConfigError(f"Unknown optimizer group {g!r}; groups are {list(OPTIMIZER_GROUPS)}.")
            groups[g] = GroupOptimizer(**spec) if isinstance(spec, dict) else spec
        object.__setattr__(self, "optimizer_groups", groups)
        GroupOptimizer(self.optimizer, self.learning_rate)  # validates name and rate
        ints = {
            "batch_size": 1, "epochs": 1, "shuffle_buffer_rows": 1, "steps_per_call": 1, "checkpoint_every_steps": 1,
            "keep_checkpoints": 1, "log_every_steps": 1, "hogwild_threads": 1, "valid_every_steps": 0,
            "early_stopping_patience": 0, "seed": 0,
        }
        for name, low in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"The '{name}' parameter of TrainConfig must be an int >= {low}. Got {v!r} instead.")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ConfigError(f"The 'max_steps' parameter of TrainConfig must be None or an int >= 1. Got {self.max_steps!r} instead.")
        if not self.l2 >= 0:
            raise ConfigError(f"The 'l2' parameter of TrainConfig must be >= 0. Got {self.l2!r} instead.")
        if self.hogwild_threads > 1 and self.deterministic:
            raise ConfigError("hogwild_threads > 1 cannot be deterministic: choose one (set deterministic=False or hogwild_threads=1).")

    def group_optimizer(self, group: str) -> GroupOptimizer:
        return self.optimizer_groups.get(group) or GroupOptimizer(self.optimizer, self.learning_rate)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        d["optimizer_groups"] = {g: asdict(o) for g, o in self.optimizer_groups.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"Unknown TrainConfig keys {unknown}; valid keys are {sorted(known)}.")
        return cls(**d)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainConfig":
        """From a JSON or YAML file (the `--config FILE` of `ctrflow train`)."""
        p = Path(path)
        try:
            text = p.read_text()
            if p.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{p}: cannot read the training config ({e}).") from None
        return cls.from_dict(data or {})

    def replace(self, **changes: Any) -> "TrainConfig":
        return replace(self, **changes)
