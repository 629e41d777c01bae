"""Model settings (`ModelConfig`) and the factory that turns a config and a `FeatureSpec` into a model.

The config is the one object that drives the API, the CLI and the saved run folder (`to_dict`/`from_dict`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import importlib
from typing import TYPE_CHECKING, Any

from ctrflow.data.batch import FeatureSpec
from ctrflow.errors import ConfigError
from ctrflow.validation import Bool, Choice, Float, Int, check_fields, suggest

if TYPE_CHECKING:
    from ctrflow.models.layers import CtrModel

__all__ = ["ModelConfig", "make_model", "model_class", "MODELS", "MODEL_KINDS", "TABLE_MODES", "CROSS_STRUCTURES",
           "PAIR_WEIGHT_SCALE", "CROSS_BUCKETS"]

# Model kinds by name, as written in configs and on the command line, and where each class lives. The
# classes are imported on first use: settings (ModelConfig, TrainConfig) must load without TensorFlow.
_CLASSES = {
    "lr": ("ctrflow.models.lr", "LogisticRegression"),
    "fm": ("ctrflow.models.fm", "FactorizationMachine"),
    "fwfm": ("ctrflow.models.fwfm", "FieldWeightedFM"),
    "ffm": ("ctrflow.models.ffm", "FieldAwareFM"),
    "deepfm": ("ctrflow.models.deepfm", "DeepFM"),
    "dcnv2": ("ctrflow.models.dcnv2", "DCNv2"),
}
MODEL_KINDS = tuple(_CLASSES)
CROSS_STRUCTURES = ("parallel", "stacked")  # dcnv2's cross/MLP arrangement
# FFM's pair weights learn at this many times the dense group's rate by default (`ModelConfig.ffm_pair_rate`;
# measured 1x, 3x, 10x, 30x: at 1x they barely leave their start, 1, within a run; ctrflow.models.ffm's doc).
PAIR_WEIGHT_SCALE = 10.0
CROSS_BUCKETS = 1 << 20  # default rows of the hashed cross table (ModelConfig.cross_buckets): 4 MiB + slots
# ModelConfig.cross_scale's default: measured 1, 2, 3, 10 (30) on the four benchmark sets; 3 is best or level where crosses
# help (LR + 4 crosses on zipfmix: valid 0.11043 at 1, 0.10628 at 3, 0.10798 at 10; BENCHMARKS.md, "Hashed crosses").
CROSS_SCALE = 3.0


def model_class(kind: str) -> "type[CtrModel]":
    """The class of model `kind` (imports TensorFlow)."""
    module, name = _CLASSES[kind]
    return getattr(importlib.import_module(module), name)


def __getattr__(name: str) -> Any:
    if name == "MODELS":  # {kind: class}; built on demand so that importing this module stays TensorFlow-free
        return {k: model_class(k) for k in MODEL_KINDS}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


TABLE_MODES = ("shared", "per_field")


def _widths(owner: str, name: str, value: object) -> tuple[int, ...]:
    """A tuple (or list) of positive ints: the MLP's hidden widths."""
    hidden = tuple(value) if isinstance(value, (list, tuple)) else value
    if not isinstance(hidden, tuple) or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden):
        raise ConfigError(f"The {name!r} parameter of {owner} must be a tuple of positive ints (layer widths). Got {value!r} instead.")
    return hidden


def _cross_pairs(owner: str, name: str, value: object) -> tuple[tuple[str, str], ...]:
    """Pairs of two distinct field names, no pair twice (either order); empty = no crosses. Lists accepted (a
    config file or JSON), and "a:b,c:d" (the command line's form). Whether the names are fields is checked when
    the model is made (the config does not know the schema)."""
    if value is None:  # a config file's `cross_pairs: null`
        return ()
    if isinstance(value, str):
        value = [p.split(":") for p in value.split(",") if p.strip()]
    pairs = tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in value) if isinstance(value, (list, tuple)) else value
    if not isinstance(pairs, tuple) or not all(isinstance(p, tuple) and len(p) == 2 and all(isinstance(n, str) and n for n in p)
                                               for p in pairs):
        raise ConfigError(f"The {name!r} parameter of {owner} must be a list of pairs of field names (\"a:b,c:d\" on the "
                          f"command line). Got {value!r} instead.")
    pairs = tuple((a.strip(), b.strip()) for a, b in pairs)
    seen: set[frozenset] = set()
    for a, b in pairs:
        if a == b:
            raise ConfigError(f"The {name!r} parameter of {owner} crosses {a!r} with itself; a cross needs two different fields.")
        if frozenset((a, b)) in seen:
            raise ConfigError(f"The {name!r} parameter of {owner} names the pair ({a!r}, {b!r}) twice.")
        seen.add(frozenset((a, b)))
    return pairs


def _pairs(owner: str, name: str, value: object) -> tuple[tuple[str, str], ...] | None:
    """None, or pairs of two distinct field names (lists accepted, as a config file or JSON gives them)."""
    if value is None:
        return None
    pairs = tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in value) if isinstance(value, (list, tuple)) else value
    if (not isinstance(pairs, tuple) or not pairs
            or not all(isinstance(p, tuple) and len(p) == 2 and all(isinstance(n, str) and n for n in p) and p[0] != p[1] for p in pairs)):
        raise ConfigError(f"The {name!r} parameter of {owner} must be None or a non-empty list of pairs of two "
                          f"different field names. Got {value!r} instead.")
    return pairs


@dataclass(frozen=True)
class ModelConfig:
    """Which model to build and its sizes. Checked once, here; invalid values raise `ConfigError`.

    Example:
        >>> ModelConfig("deepfm", embedding_dim=8, hidden=(64, 32)).to_dict()["hidden"]
        [64, 32]

    Fields a kind does not use are ignored by it (e.g. `cross_layers` by "fm").
    """

    kind: str  # model kind: "lr", "fm", "fwfm", "ffm", "deepfm" or "dcnv2" (keys of MODELS)
    embedding_dim: int = 16  # width of each field's embedding vector (fm, fwfm, deepfm, dcnv2), 1..4096
    hidden: tuple[int, ...] = (256, 128)  # deepfm/dcnv2 MLP hidden widths, input to output; () = no hidden layer
    dropout: float = 0.0  # deepfm/dcnv2 MLP dropout rate while training, in [0, 1); 0 = off
    batch_norm: bool = False  # deepfm/dcnv2: batch normalization after each hidden layer
    table_mode: str = "shared"  # "shared": one table, per-field row offsets; "per_field": a table per field
    init_scale: float = 0.01  # stddev of the N(0, s^2) embedding init, > 0 (linear weights start at 0)
    seed: int = 0  # seeds every initializer: same seed + same FeatureSpec = same initial variables, >= 0
    norm_momentum: float | None = None  # online normalization: None = exact running stats; (0, 1) = EMA
    cross_layers: int = 3  # dcnv2: number of cross layers, 1..16
    cross_structure: str = "stacked"  # dcnv2: "stacked" (MLP on the cross output) or "parallel" (side by side)
    cross_rank: int | None = 64  # dcnv2: low-rank cross layers of rank r (full rank when 2r >= D); None = full rank
    ffm_dim: int = 4  # ffm: width of each field-aware vector; a row holds (fields - 1) of them, 1..256
    # ffm: the pair weights' rate as a multiple of the dense group's, in [0.01, 1000] (r is stored as r / rate, so the
    # optimizer's steps on it move r `rate` times as far). A config written before this field reads the default.
    # Warm starts need the parent's value (the stored r / rate would mean another r). fwfm's pair weights learn at 1x.
    ffm_pair_rate: float = PAIR_WEIGHT_SCALE
    # ffm: the only field pairs that interact, by field name (either order); every other pair's weight is 0 for good
    # (no gradient, not in the logit). None: every pair. What `train --ffm-select-pairs` trains its second stage with.
    ffm_pairs: tuple[tuple[str, str], ...] | None = None
    # Ids seen fewer than this many times in the training data share one row per field (learned from all of
    # them: "rarely seen" is itself a signal; unseen values at serving read it too); counted when a run
    # starts, kept by resumes, warm starts and exports. 0: off.
    min_count: int = 0
    # Every kind: hashed cross features of these field pairs (by name, either order), one learned scalar per
    # (pair, id_a, id_b) added to the logit (ctrflow.models.cross; `train --cross-pairs a:b` / `--cross-select K`).
    # Empty: none, the model of before.
    cross_pairs: tuple[tuple[str, str], ...] = ()
    cross_buckets: int = CROSS_BUCKETS  # rows of the hashed cross table (one float each, plus optimizer slots)
    # The cross weights are stored / this scale and multiplied back: under the (Lazy)Adam linear group their steps
    # move `scale` times as far and the group's L2 acts as l2 / scale^2 on them (its own rate and penalty without a
    # fourth optimizer group). Warm starts need the parent's value. In [0.01, 1000].
    cross_scale: float = CROSS_SCALE

    def __post_init__(self) -> None:
        check_fields(self, {
            "kind": Choice(MODEL_KINDS),
            "embedding_dim": Int(1, 4096),
            "hidden": _widths,
            "dropout": Float(0.0, 1.0, high_open=True),
            "batch_norm": Bool(),
            "table_mode": Choice(TABLE_MODES),
            "init_scale": Float(0.0, low_open=True),
            "seed": Int(0),
            "norm_momentum": Float(0.0, 1.0, low_open=True, high_open=True, optional=True),
            "cross_layers": Int(1, 16),
            "cross_structure": Choice(CROSS_STRUCTURES),
            "cross_rank": Int(1, 4096, optional=True),
            "ffm_dim": Int(1, 256),
            "ffm_pair_rate": Float(0.01, 1000.0),
            "ffm_pairs": _pairs,
            "min_count": Int(0),
            "cross_pairs": _cross_pairs,
            "cross_buckets": Int(1, 2**30),
            "cross_scale": Float(0.01, 1000.0),
        })

    def to_dict(self) -> dict:
        """Plain JSON-able dict; `ModelConfig.from_dict(c.to_dict()) == c`."""
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        d["ffm_pairs"] = None if self.ffm_pairs is None else [list(p) for p in self.ffm_pairs]
        d["cross_pairs"] = [list(p) for p in self.cross_pairs]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of `to_dict`; missing keys take their defaults, unknown keys raise `ConfigError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            hints = [f"{k!r} -> {suggest(k, known)!r}" for k in unknown if suggest(k, known)]
            raise ConfigError(f"Unknown ModelConfig keys {unknown}; valid keys are {sorted(known)}."
                              + (f" Did you mean {', '.join(hints)}?" if hints else ""))
        if "kind" not in d:
            raise ConfigError(f"ModelConfig needs a 'kind', one of {sorted(MODEL_KINDS)}; got keys {sorted(d)}.")
        return cls(**d)


def make_model(config: ModelConfig, spec: FeatureSpec) -> "CtrModel":
    """Create and build the model `config.kind` for inputs described by `spec`.

    Variables are created here (call it inside a distribution strategy's scope to place them there).

    Example:
        >>> spec = FeatureSpec(("site", "app", "hour"), (1000, 500, 26))
        >>> model = make_model(ModelConfig("fm", embedding_dim=4), spec)
        >>> sorted(model.variable_groups())
        ['dense', 'embedding', 'linear']

    Raises:
        ConfigError: a spec with no fields (or, for "ffm", fewer than two).
    """
    model = model_class(config.kind)(config, spec)  # the kind was checked when the config was made
    model.build()
    return model
