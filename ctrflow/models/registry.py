"""Model settings (`ModelConfig`) and the factory that turns a config and a `FeatureSpec` into a model.

The config is the one object that drives the API, the CLI and the saved run folder (`to_dict`/`from_dict`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ctrflow.data.batch import FeatureSpec
from ctrflow.errors import ConfigError
from ctrflow.models.deepfm import DeepFM
from ctrflow.models.fm import FactorizationMachine
from ctrflow.models.layers import CtrModel
from ctrflow.models.lr import LogisticRegression

__all__ = ["ModelConfig", "make_model", "MODELS", "TABLE_MODES"]

# Model kinds by name, as written in configs and on the command line.
MODELS: dict[str, type[CtrModel]] = {
    LogisticRegression.kind: LogisticRegression,
    FactorizationMachine.kind: FactorizationMachine,
    DeepFM.kind: DeepFM,
}

TABLE_MODES = ("shared", "per_field")


def _bad(name: str, must: str, got: object) -> ConfigError:
    return ConfigError(f"The '{name}' parameter of ModelConfig must be {must}. Got {got!r} instead.")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to build and its sizes. Checked once, here; invalid values raise `ConfigError`.

    Example:
        >>> ModelConfig("deepfm", embedding_dim=8, hidden=(64, 32)).to_dict()["hidden"]
        [64, 32]
    """

    kind: str  # model kind: "lr", "fm" or "deepfm" (keys of MODELS)
    embedding_dim: int = 16  # width of each field's embedding vector (fm, deepfm), 1..4096
    hidden: tuple[int, ...] = (256, 128)  # deepfm MLP hidden widths, input to output; () = linear MLP
    dropout: float = 0.0  # deepfm MLP dropout rate while training, in [0, 1); 0 = off
    batch_norm: bool = False  # deepfm: batch normalization after each hidden layer
    table_mode: str = "shared"  # "shared": one table, per-field row offsets; "per_field": a table per field
    init_scale: float = 0.01  # stddev of the N(0, s^2) embedding init, > 0 (linear weights start at 0)
    seed: int = 0  # seeds every initializer: same seed + same FeatureSpec = same initial variables, >= 0
    norm_momentum: float | None = None  # online normalization: None = exact running stats; (0, 1) = EMA

    def __post_init__(self) -> None:
        if self.kind not in MODELS:
            raise _bad("kind", f"one of {sorted(MODELS)}", self.kind)
        if isinstance(self.embedding_dim, bool) or not isinstance(self.embedding_dim, int) or not 1 <= self.embedding_dim <= 4096:
            raise _bad("embedding_dim", "an int in [1, 4096]", self.embedding_dim)
        hidden = tuple(self.hidden) if isinstance(self.hidden, (list, tuple)) else self.hidden
        if not isinstance(hidden, tuple) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden
        ):
            raise _bad("hidden", "a tuple of positive ints (layer widths)", self.hidden)
        object.__setattr__(self, "hidden", hidden)
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise _bad("dropout", "a float in [0, 1)", self.dropout)
        if not isinstance(self.batch_norm, bool):
            raise _bad("batch_norm", "a bool", self.batch_norm)
        if self.table_mode not in TABLE_MODES:
            raise _bad("table_mode", f"one of {list(TABLE_MODES)}", self.table_mode)
        if not isinstance(self.init_scale, (int, float)) or not self.init_scale > 0:
            raise _bad("init_scale", "a float > 0", self.init_scale)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise _bad("seed", "an int >= 0", self.seed)
        if self.norm_momentum is not None and (
            not isinstance(self.norm_momentum, (int, float)) or not 0.0 < self.norm_momentum < 1.0
        ):
            raise _bad("norm_momentum", "None or a float in (0, 1)", self.norm_momentum)

    def to_dict(self) -> dict:
        """Plain JSON-able dict; `ModelConfig.from_dict(c.to_dict()) == c`."""
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of `to_dict`; missing keys take their defaults, unknown keys raise `ConfigError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"Unknown ModelConfig keys {unknown}; valid keys are {sorted(known)}.")
        if "kind" not in d:
            raise ConfigError(f"ModelConfig needs a 'kind', one of {sorted(MODELS)}; got keys {sorted(d)}.")
        return cls(**d)


def make_model(config: ModelConfig, spec: FeatureSpec) -> CtrModel:
    """Create and build the model `config.kind` for inputs described by `spec`.

    Variables are created here (call it inside a distribution strategy's scope to place them there).

    Example:
        >>> spec = FeatureSpec(("site", "app", "hour"), (1000, 500, 26))
        >>> model = make_model(ModelConfig("fm", embedding_dim=4), spec)
        >>> sorted(model.variable_groups())
        ['dense', 'embedding', 'linear']

    Raises:
        ConfigError: unknown `config.kind` (the message lists the valid names), or a spec with no fields.
    """
    try:
        cls = MODELS[config.kind]
    except KeyError:
        raise ConfigError(f"Unknown model kind {config.kind!r}; valid kinds are {sorted(MODELS)}.") from None
    model = cls(config, spec)
    model.build()
    return model
