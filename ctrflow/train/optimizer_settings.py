"""The optimizers' names and extra settings, free of TensorFlow, so settings (`TrainConfig`) are checked
where they are given, not when training starts.

`ctrflow.train.optimizers` builds the optimizers these names stand for; its classes take exactly these
keyword settings (a test checks that the two agree).
"""
from __future__ import annotations

from typing import Any, Mapping

from ctrflow.errors import ConfigError
from ctrflow.validation import Choice, Float

__all__ = ["L2_MODES", "OPTIMIZER_NAMES", "OPTIMIZER_SETTINGS", "normalize_optimizer_name", "check_optimizer_settings"]

_ADAM = {"beta_1": Float(0, 1, high_open=True), "beta_2": Float(0, 1, high_open=True), "epsilon": Float(0, low_open=True)}

# name -> {setting -> rule}; `learning_rate`, `l2` and `l2_mode` are common to all and set by TrainConfig.
OPTIMIZER_SETTINGS: dict[str, dict[str, Any]] = {
    "sgd": {},
    "adagrad": {"initial_accumulator_value": Float(0), "epsilon": Float(0, low_open=True)},
    "ftrl": {"l1": Float(0), "beta": Float(0), "initial_accumulator_value": Float(0, low_open=True)},
    "adam": dict(_ADAM),
    "lazyadam": dict(_ADAM),
}
OPTIMIZER_NAMES: tuple[str, ...] = tuple(sorted(OPTIMIZER_SETTINGS))
# How L2 reaches table rows a sparse step skips (`SparseOptimizer`'s `l2_mode`): only while touched, or at
# every step (caught up lazily when the row is next touched).
L2_MODES: tuple[str, ...] = ("touched", "every_step")


def normalize_optimizer_name(name: Any) -> Any:
    """"LazyAdam", "lazy_adam" and "lazy-adam" all name "lazyadam" (non-strings come back unchanged)."""
    return name.lower().replace("_", "").replace("-", "") if isinstance(name, str) else name


def check_optimizer_settings(owner: str, name: Any, extra: Mapping[str, Any], *, param: str = "name") -> tuple[str, dict[str, Any]]:
    """(normalized name, checked settings); a misspelled name or setting suggests the nearest one."""
    name = Choice(OPTIMIZER_NAMES)(owner, param, normalize_optimizer_name(name))
    rules = OPTIMIZER_SETTINGS[name]
    out = {}
    for key, value in dict(extra).items():
        if key in ("learning_rate", "l2", "l2_mode"):
            raise ConfigError(f"The 'extra' parameter of {owner} must not set {key!r}: TrainConfig sets it "
                              f"(learning_rate per group, l2 and l2_mode for all). Got {key!r} instead.")
        if key not in rules:
            Choice(tuple(rules) or ("(none)",))(f"{owner} ({name})", "extra", key)
        out[key] = rules[key](f"{owner} ({name})", key, value)
    return name, out

