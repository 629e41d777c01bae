"""The one loader of configuration files (YAML or JSON): schemas, training configs, cluster files, model configs.

Why not plain `yaml.safe_load`: PyYAML follows YAML 1.1, so `learning_rate: 1e-3` is read as the
*string* "1e-3" and `on`/`off`/`yes`/`no` become booleans. Users write YAML 1.2 (JSON-compatible)
numbers, so this loader resolves scalars by the YAML 1.2 core schema: `1e-3`, `.5`, `+1`, `0x1F`,
`.inf`, `.nan` are numbers; only `true`/`false` (any case) are booleans; `null`/`~`/empty are None.
Every error names the file, and the line and column when the parser knows them.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ctrflow.errors import ConfigError

__all__ = ["load_config_file", "parse_config_text", "read_config_text"]

_INT = re.compile(r"^[-+]?[0-9]+$")
_HEX, _OCT = re.compile(r"^0x[0-9a-fA-F]+$"), re.compile(r"^0o[0-7]+$")
_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_INF = re.compile(r"^[-+]?\.(inf|Inf|INF)$")
_NAN = re.compile(r"^\.(nan|NaN|NAN)$")
_BOOL = {"true": True, "false": False}
_NULL = {"", "~", "null", "Null", "NULL"}


def _loader() -> Any:
    import yaml

    class Yaml12Loader(yaml.SafeLoader):
        """SafeLoader with YAML 1.2 core-schema scalars (see module docstring)."""

    # Drop YAML 1.1's implicit resolvers for bool/int/float/null, then resolve plain scalars ourselves.
    Yaml12Loader.yaml_implicit_resolvers = {
        k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:null")]
        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def plain_scalar(loader: Any, node: Any) -> Any:
        value = loader.construct_scalar(node)
        if node.style is not None:  # quoted: always a string
            return value
        if value in _NULL:
            return None
        if value.lower() in _BOOL:
            return _BOOL[value.lower()]
        if _INT.match(value):
            return int(value)
        if _HEX.match(value):
            return int(value[2:], 16)
        if _OCT.match(value):
            return int(value[2:], 8)
        if _FLOAT.match(value):
            return float(value)
        if _INF.match(value):
            return float("-inf") if value.startswith("-") else float("inf")
        if _NAN.match(value):
            return float("nan")
        return value

    Yaml12Loader.add_constructor("tag:yaml.org,2002:str", plain_scalar)
    return Yaml12Loader


def parse_config_text(text: str, *, source: str, fmt: str = "yaml") -> Any:
    """Parse `text` (YAML 1.2 or JSON; JSON is YAML too, so "yaml" reads both) naming `source` in errors."""
    if fmt == "json":
        try:
            return json.loads(text)
        except ValueError as e:
            line = getattr(e, "lineno", None)
            where = f"{source}:{line}" if line else source
            raise ConfigError(f"{where}: not valid JSON ({getattr(e, 'msg', e)}).") from None
    import yaml

    try:
        return yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = e.problem or e.context or "malformed YAML"
        raise ConfigError(f"{where}: not valid YAML ({problem}).") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({e}).") from None


def read_config_text(path: str | os.PathLike, *, what: str = "config file") -> str:
    """A config file's text (UTF-8); a missing, unreadable or binary file is a ConfigError naming it."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such {what}.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read the {what} ({getattr(e, 'strerror', None) or e}).") from None


def load_config_file(path: str | os.PathLike, *, what: str = "config file", expect: type = dict) -> Any:
    """Read a YAML (.yaml/.yml, or anything else that is not .json) or JSON (.json) file.

    Args:
        path: the file.
        what: what the file is, for messages ("training config", "cluster file", ...).
        expect: the type the top level must have (dict by default); an empty file gives `expect()`.

    Raises:
        ConfigError: unreadable, malformed (with line and column), or the top level is of another type.
    """
    p = Path(path)
    text = read_config_text(p, what=what)
    data = parse_config_text(text, source=str(p), fmt="json" if p.suffix == ".json" else "yaml")
    if data is None:
        return expect()
    if not isinstance(data, expect):
        raise ConfigError(f"{p}: the {what} must be a {'mapping' if expect is dict else expect.__name__} at the top level. Got {type(data).__name__} instead.")
    return data
