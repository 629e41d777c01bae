"""The one validation helper: declarative checks of settings, one message shape everywhere.

Every options class (`TrainConfig`, `PipelineOptions`, `BatchingOptions`, optimizers, schemas, server
settings) validates at construction with these, so a bad value is refused where it is given, with
"The 'x' parameter of Owner must be <rule>. Got <value> instead." (scikit-learn's wording). Numbers
from JSON/YAML arrive as int or float; booleans are never accepted as numbers, nor strings as either.
"""
from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ctrflow.errors import ConfigError

__all__ = ["Int", "Float", "Bool", "Choice", "Str", "check", "check_fields", "check_int", "check_float", "check_bool", "check_choice", "suggest"]


def _fail(owner: str, name: str, rule: str, value: Any) -> ConfigError:
    return ConfigError(f"The {name!r} parameter of {owner} must be {rule}. Got {value!r} instead.")


@dataclass(frozen=True)
class Int:
    """An int in [low, high] (either bound optional); `optional` also admits None."""

    low: int | None = None
    high: int | None = None
    optional: bool = False

    def rule(self) -> str:
        r = "an int"
        if self.low is not None and self.high is not None:
            r += f" in [{self.low}, {self.high}]"
        elif self.low is not None:
            r += f" >= {self.low}"
        elif self.high is not None:
            r += f" <= {self.high}"
        return ("None or " + r) if self.optional else r

    def __call__(self, owner: str, name: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if ok and ((self.low is not None and value < self.low) or (self.high is not None and value > self.high)):
            ok = False
        if not ok:
            raise _fail(owner, name, self.rule(), value)
        return int(value)


@dataclass(frozen=True)
class Float:
    """A finite real number; `low`/`high` bounds, each inclusive unless `low_open`/`high_open`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False

    def rule(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        if self.low is not None and self.high is not None:
            r = f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        else:
            r = "a number" + (" " + parts[0] if parts else "")
        return ("None or " + r) if self.optional else r

    def __call__(self, owner: str, name: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        if ok and self.low is not None and (value <= self.low if self.low_open else value < self.low):
            ok = False
        if ok and self.high is not None and (value >= self.high if self.high_open else value > self.high):
            ok = False
        if not ok:
            raise _fail(owner, name, self.rule(), value)
        return float(value)


@dataclass(frozen=True)
class Bool:
    def __call__(self, owner: str, name: str, value: Any) -> Any:
        if not isinstance(value, bool):
            raise _fail(owner, name, "a bool (true or false)", value)
        return value


@dataclass(frozen=True)
class Str:
    nonempty: bool = True
    optional: bool = False

    def __call__(self, owner: str, name: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        if not isinstance(value, str) or (self.nonempty and not value):
            raise _fail(owner, name, "a non-empty string" if self.nonempty else "a string", value)
        return value


@dataclass(frozen=True)
class Choice:
    """One of `options`; the message suggests the nearest when the value is a near miss."""

    options: tuple[str, ...]

    def __call__(self, owner: str, name: str, value: Any) -> Any:
        if value not in self.options:
            hint = suggest(value, self.options)
            msg = f"The {name!r} parameter of {owner} must be one of {', '.join(map(repr, self.options))}. Got {value!r} instead."
            raise ConfigError(msg + (f" Did you mean {hint!r}?" if hint else ""))
        return value


Rule = Callable[[str, str, Any], Any]


def suggest(value: Any, options: Iterable[str]) -> str | None:
    """The option closest to a misspelled `value`, or None when nothing is close."""
    if not isinstance(value, str):
        return None
    match = difflib.get_close_matches(value.lower(), list(options), n=1, cutoff=0.6)
    return match[0] if match else None


def check(owner: str, name: str, value: Any, rule: Rule) -> Any:
    """Validate one value; returns it normalized (ints as int, numbers as float)."""
    return rule(owner, name, value)


def check_fields(obj: Any, rules: dict[str, Rule], *, owner: str | None = None) -> None:
    """Validate the named attributes of a (frozen) dataclass in `__post_init__`, storing normalized values."""
    owner = owner or type(obj).__name__
    for name, rule in rules.items():
        value = rule(owner, name, getattr(obj, name))
        if value is not getattr(obj, name):
            object.__setattr__(obj, name, value)


def check_int(owner: str, name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    return Int(low, high)(owner, name, value)


def check_float(owner: str, name: str, value: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False) -> float:
    return Float(low, high, low_open, high_open)(owner, name, value)


def check_bool(owner: str, name: str, value: Any) -> bool:
    return Bool()(owner, name, value)


def check_choice(owner: str, name: str, value: Any, options: Iterable[str]) -> str:
    return Choice(tuple(options))(owner, name, value)
