"""Schemas: which column is the label, which are categorical or numeric features, and how they are read.

A schema is a frozen dataclass that round-trips through YAML/JSON. Built-in presets (`criteo`, `avazu`,
`synthetic`) cover the common public formats; `infer_schema` guesses one from a CSV header and sample.
"""
from __future__ import annotations

import csv
import difflib
import gzip
import hashlib
import io
import json
import math
import os
import re
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Literal

from ctrflow.atomic import atomic_write_text
from ctrflow.configfile import load_config_file
from ctrflow.errors import ConfigError, SchemaError
from ctrflow.validation import Bool, Int, Str, check_fields

__all__ = [
    "CategoricalField",
    "NumericField",
    "Schema",
    "PRESETS",
    "load_schema",
    "infer_schema",
    "explain_schema",
    "SchemaInference",
    "ColumnInference",
]

NumericTransform = Literal["log", "identity"]
NumericMode = Literal["discretize", "normalize", "both"]
_TRANSFORMS = ("log", "identity")
_MODES = ("discretize", "normalize", "both")
VALUE_ID_SUFFIX = "#value"  # id column of a `mode: both` numeric's exact value: "<name>#value"


@dataclass(frozen=True)
class CategoricalField:
    """A categorical feature, hashed into `hash_buckets` ids (id 0 is reserved for missing)."""

    name: str
    hash_buckets: int = 1 << 20  # ids per field, >= 2; collisions grow as cardinality approaches it

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SchemaError(f"The 'name' of a categorical field must be a non-empty string. Got {self.name!r} instead.")
        if not isinstance(self.hash_buckets, int) or isinstance(self.hash_buckets, bool) or self.hash_buckets < 2:
            raise SchemaError(
                f"The 'hash_buckets' of categorical field '{self.name}' must be an int >= 2. "
                f"Got {self.hash_buckets!r} instead."
            )


@dataclass(frozen=True)
class NumericField:
    """A numeric feature: transformed (`log`: sign(x)*log1p(|x|)), then discretized into quantile bins
    learned by the converter, or fed as an online-normalized value (`mode='normalize'`).

    `mode='both'` is for integer columns that are ids and quantities at once (an hour, a price in
    cents, a count with meaningful exact values): the value is discretized *and* its exact value is
    hashed into `hash_buckets` ids, an extra id column `<name>#value` after all other id columns.
    """

    name: str
    transform: NumericTransform = "log"
    mode: NumericMode = "discretize"
    bins: int = 32  # quantile bins learned from the data, 2..4096 (fewer if values repeat)
    hash_buckets: int = 1 << 16  # ids of the exact-value column (mode 'both' only), >= 2

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SchemaError(f"The 'name' of a numeric field must be a non-empty string. Got {self.name!r} instead.")
        if not isinstance(self.hash_buckets, int) or isinstance(self.hash_buckets, bool) or self.hash_buckets < 2:
            raise SchemaError(
                f"The 'hash_buckets' of numeric field '{self.name}' must be an int >= 2. Got {self.hash_buckets!r} instead."
            )
        if self.transform not in _TRANSFORMS:
            raise SchemaError(
                f"The 'transform' of numeric field '{self.name}' must be one of {_TRANSFORMS}. "
                f"Got {self.transform!r} instead."
            )
        if self.mode not in _MODES:
            raise SchemaError(
                f"The 'mode' of numeric field '{self.name}' must be one of {_MODES}. Got {self.mode!r} instead."
            )
        if not isinstance(self.bins, int) or not 2 <= self.bins <= 4096:
            raise SchemaError(
                f"The 'bins' of numeric field '{self.name}' must be an int in [2, 4096]. Got {self.bins!r} instead."
            )


@dataclass(frozen=True)
class Schema:
    """How to read one kind of log file into features.

    columns: the file's columns in order. Required for files without a header; for files with a header
        it is the expected header (checked against the file, order included).
    extras: float columns carried into the shards but never used as features (e.g. `true_ctr` of the
        synthetic generator, for Bayes-optimal reference metrics).
    ignore: columns read and dropped (ids, leakage such as an attribution time).
    hash_seed: changes every field's hash function; keep it fixed for a model's whole life.
    context: feature fields that describe the user/page rather than the ad: exports then also serve
        context + candidates requests (one context row, many candidates; `ctrflow export
        --context-fields` overrides it). Serving only: it changes no id and not the fingerprint.
    """

    name: str
    label: str
    categorical: tuple[CategoricalField, ...] = ()
    numeric: tuple[NumericField, ...] = ()
    weight: str | None = None
    time: str | None = None
    extras: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    columns: tuple[str, ...] | None = None
    delimiter: str = ","
    header: bool = True
    hash_seed: int = 0
    context: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            check_fields(self, {"name": Str(), "label": Str(), "weight": Str(optional=True), "time": Str(optional=True),
                                "delimiter": Str(), "header": Bool(), "hash_seed": Int(low=0)}, owner="Schema")
        except ConfigError as e:
            raise SchemaError(str(e)) from None
        for key in ("categorical", "numeric", "extras", "ignore", "columns", "context"):
            value = getattr(self, key)
            if isinstance(value, (str, bytes)) or (value is None and key != "columns"):
                raise SchemaError(f"The {key!r} parameter of Schema must be a list. Got {value!r} instead.")
        for key in ("extras", "ignore", "columns"):
            bad = [c for c in (getattr(self, key) or ()) if not isinstance(c, str) or not c]
            if bad:
                raise SchemaError(f"The {key!r} parameter of Schema must list column names (strings). Got {bad[:5]!r} in it.")
        object.__setattr__(self, "categorical", tuple(self.categorical))
        object.__setattr__(self, "numeric", tuple(self.numeric))
        object.__setattr__(self, "extras", tuple(self.extras))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "context", tuple(self.context))
        if self.columns is not None:
            object.__setattr__(self, "columns", tuple(self.columns))
        if not self.categorical and not self.numeric:
            raise SchemaError(f"Schema '{self.name}' has no feature fields: name at least one categorical or numeric field.")
        if len(self.delimiter) != 1:
            raise SchemaError(f"The 'delimiter' of schema '{self.name}' must be one character. Got {self.delimiter!r} instead.")
        used = self.used_columns
        dupes = sorted({c for c in used if used.count(c) > 1})
        if dupes:
            raise SchemaError(f"Schema '{self.name}' uses these columns more than once: {dupes}.")
        clash = sorted({f.name + VALUE_ID_SUFFIX for f in self.both_numeric} & set(used))
        if clash:
            raise SchemaError(f"Schema '{self.name}' has columns {clash} named like the exact-value ids of 'both' numerics; rename them.")
        if self.columns is not None:
            missing = [c for c in used if c not in self.columns]
            if missing:
                raise SchemaError(f"Schema '{self.name}' names fields {missing} that are not in its columns list.")
        elif not self.header:
            raise SchemaError(f"Schema '{self.name}' has header: false, so it must list its 'columns' in file order.")
        if self.context:
            self.check_context(self.context)

    def check_context(self, names: Iterable[str]) -> tuple[str, ...]:
        """Context field names, checked: feature fields of this schema, not all of them, no repeats."""
        names = tuple(names)
        features = self.categorical_names + self.numeric_names
        bad = [n for n in names if not isinstance(n, str) or n not in features]
        if bad:
            raise SchemaError(f"Schema '{self.name}': context fields {bad[:10]} are not feature fields; "
                              f"the features are {list(features)[:60]}.")
        if len(set(names)) != len(names):
            raise SchemaError(f"Schema '{self.name}': a context field is named twice in {list(names)}.")
        if set(names) == set(features):
            raise SchemaError(f"Schema '{self.name}': every feature is a context field; leave at least one per candidate.")
        return names

    # --- derived views -------------------------------------------------------------------------
    @property
    def used_columns(self) -> list[str]:
        """Every column the converter reads (label, features, weight, time, extras)."""
        cols = [self.label, *(f.name for f in self.categorical), *(f.name for f in self.numeric)]
        cols += [c for c in (self.weight, self.time) if c]
        return cols + list(self.extras)

    @property
    def categorical_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.categorical)

    @property
    def numeric_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.numeric)

    @property
    def both_numeric(self) -> tuple[NumericField, ...]:
        """Numeric fields of `mode: both`, in schema order (each adds an exact-value id column)."""
        return tuple(f for f in self.numeric if f.mode == "both")

    @property
    def id_names(self) -> tuple[str, ...]:
        """Columns of `Batch.ids`: categoricals, then numerics (discretized), then the exact-value ids of
        `mode: both` numerics (`<name>#value`)."""
        return self.categorical_names + self.numeric_names + tuple(f.name + VALUE_ID_SUFFIX for f in self.both_numeric)

    def fingerprint(self) -> str:
        """Stable digest of everything that changes ids or columns; equal digests mean compatible data."""
        d = self.to_dict()
        d.pop("name", None)
        d.pop("context", None)  # which fields a request sends once changes no id
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    # --- (de)serialization ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["categorical"] = [asdict(f) for f in self.categorical]
        # hash_buckets of a numeric matters only in mode 'both': left out otherwise, so the fingerprints
        # of schemas written before that mode existed do not change.
        d["numeric"] = [{k: v for k, v in asdict(f).items() if k != "hash_buckets" or f.mode == "both"} for f in self.numeric]
        d["extras"] = list(self.extras)
        d["ignore"] = list(self.ignore)
        d["columns"] = list(self.columns) if self.columns is not None else None
        d["context"] = list(self.context)
        if not self.context:  # written only when set: older schema files and fingerprints stay as they were
            del d["context"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "schema") -> "Schema":
        if not isinstance(d, dict):
            raise SchemaError(f"{source}: a schema must be a mapping, got {type(d).__name__}.")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SchemaError(f"{source}: unknown schema keys {unknown}; valid keys are {sorted(known)}.")
        if "label" not in d:
            raise SchemaError(f"{source}: a schema needs a 'label' column.")
        d = dict(d)
        d.setdefault("name", Path(source).stem if source != "schema" else "custom")
        try:
            d["categorical"] = tuple(
                CategoricalField(name=c) if isinstance(c, str) else CategoricalField(**c) for c in d.get("categorical") or ()
            )
            d["numeric"] = tuple(NumericField(name=c) if isinstance(c, str) else NumericField(**c) for c in d.get("numeric") or ())
            for key in ("extras", "ignore", "context"):
                d[key] = tuple(d.get(key) or ())
            if d.get("columns") is not None:
                d["columns"] = tuple(d["columns"])
            return cls(**d)
        except (TypeError, SchemaError) as e:  # unknown keys inside a field entry, bad values
            raise SchemaError(f"{source}: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write as YAML (.yaml/.yml) or JSON (anything else), atomically."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2)
        atomic_write_text(path, text)

    def describe(self) -> str:
        """Human-readable table of the schema, for `ctrflow schema show`."""
        lines = [
            f"schema {self.name}  (fingerprint {self.fingerprint()})",
            f"  format     delimiter={self.delimiter!r} header={self.header}",
            f"  label      {self.label}",
        ]
        for k in ("weight", "time"):
            if getattr(self, k):
                lines.append(f"  {k:<10} {getattr(self, k)}")
        lines.append(f"  categorical ({len(self.categorical)}):")
        lines += [f"    {f.name:<24} hash_buckets={f.hash_buckets}" for f in self.categorical]
        lines.append(f"  numeric ({len(self.numeric)}):")
        lines += [f"    {f.name:<24} transform={f.transform} mode={f.mode} bins={f.bins}"
                  + (f" hash_buckets={f.hash_buckets}" if f.mode == "both" else "") for f in self.numeric]
        if self.extras:
            lines.append(f"  extras     {', '.join(self.extras)}")
        if self.ignore:
            lines.append(f"  ignore     {', '.join(self.ignore)}")
        return "\n".join(lines)

    def with_overrides(self, **changes: Any) -> "Schema":
        return replace(self, **changes)

    def capped(self, max_buckets: int) -> "Schema":
        """The same schema with every categorical field's hash_buckets at most `max_buckets` (small tables
        for quick experiments and tests; more collisions on high-cardinality fields)."""
        if max_buckets < 2:
            raise SchemaError(f"max_buckets must be >= 2. Got {max_buckets} instead.")
        cats = tuple(replace(f, hash_buckets=min(f.hash_buckets, max_buckets)) for f in self.categorical)
        nums = tuple(replace(f, hash_buckets=min(f.hash_buckets, max_buckets)) if f.mode == "both" else f for f in self.numeric)
        return replace(self, categorical=cats, numeric=nums)


# --- presets ------------------------------------------------------------------------------------
# Criteo display-ads: approximate per-field cardinalities (Kaggle 45M rows) set the bucket counts so
# small fields get small tables and huge ones are capped at 2^20.
_CRITEO_CARD = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
                14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]


def _buckets_for(cardinality: int, cap: int = 1 << 20) -> int:
    """Next power of two at or above twice the cardinality, at least 16, at most `cap`."""
    b = 16
    while b < 2 * cardinality and b < cap:
        b <<= 1
    return b


def _criteo() -> Schema:
    cats = tuple(CategoricalField(f"C{i + 1}", _buckets_for(c)) for i, c in enumerate(_CRITEO_CARD))
    nums = tuple(NumericField(f"I{i}") for i in range(1, 14))
    cols = ("label", *(f.name for f in nums), *(f.name for f in cats))
    return Schema("criteo", "label", cats, nums, columns=cols, delimiter="\t", header=False)


def _synthetic() -> Schema:
    # Matches ctrflow.data.generate: day,click,true_ctr,I1..I13,C1..C26 with a header.
    s = _criteo()
    cols = ("day", "click", "true_ctr", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27)))
    return replace(s, name="synthetic", label="click", time="day", extras=("true_ctr",), columns=cols,
                   delimiter=",", header=True)


_AVAZU_CATS = {
    "C1": 8, "banner_pos": 8, "site_id": 4738, "site_domain": 7746, "site_category": 26, "app_id": 8553,
    "app_domain": 560, "app_category": 37, "device_id": 2686409, "device_ip": 6729487, "device_model": 8252,
    "device_type": 5, "device_conn_type": 4, "C14": 2627, "C15": 8, "C16": 9, "C17": 436, "C18": 4,
    "C19": 69, "C20": 173, "C21": 61,
}


def _avazu() -> Schema:
    cats = tuple(CategoricalField(n, _buckets_for(c)) for n, c in _AVAZU_CATS.items())
    cols = ("id", "click", "hour", *_AVAZU_CATS)
    return Schema("avazu", "click", cats, (), time="hour", ignore=("id",), columns=cols, delimiter=",", header=True)


PRESETS: dict[str, Schema] = {"criteo": _criteo(), "avazu": _avazu(), "synthetic": _synthetic()}


def load_schema(name_or_path: str | os.PathLike | Schema) -> Schema:
    """A preset by name, or a YAML/JSON schema file. Unknown names list the presets."""
    if isinstance(name_or_path, Schema):
        return name_or_path
    s = str(name_or_path)
    if s in PRESETS:
        return PRESETS[s]
    p = Path(s)
    if p.is_dir() and (p / "manifest.json").exists():  # a shard folder carries its schema
        manifest = load_config_file(p / "manifest.json", what="shard manifest")
        if not isinstance(manifest.get("schema"), dict):
            raise SchemaError(f"{p / 'manifest.json'}: no 'schema' in this manifest (not written by ctrflow convert?).")
        return Schema.from_dict(manifest["schema"], source=str(p))
    if not p.is_file():
        raise SchemaError(
            f"Unknown schema {s!r}: not a preset ({', '.join(PRESETS)}) and no such file. "
            "Pass a preset name or a .yaml/.json schema file."
        )
    try:
        data = load_config_file(p, what="schema file", expect=dict)
    except ConfigError as e:
        raise SchemaError(str(e)) from None
    return Schema.from_dict(data, source=str(p))


def _open_text(path: Path) -> io.TextIOBase:
    # utf-8-sig: a leading byte order mark (Excel, Windows tools) is dropped, not read into the first column's name
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", errors="replace", newline="")
    return open(path, encoding="utf-8-sig", errors="replace", newline="")


def _is_number(v: str) -> bool:
    try:
        return math.isfinite(float(v))
    except ValueError:
        return False


_INT = re.compile(r"^[-+]?[0-9]+$")
_DATETIME = re.compile(r"^\d{4}-\d{1,2}-\d{1,2}([ T]\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?)?$")
# Names of ad-log columns that hold ids even when their values are integers (TalkingData, Avazu, iPinYou...).
ID_NAMES = frozenset({
    "id", "ip", "app", "device", "os", "channel", "site", "campaign", "user", "uid", "ad", "adid", "advertiser",
    "creative", "publisher", "domain", "placement", "slot", "browser", "city", "region", "country", "zip",
    "carrier", "banner", "category", "brand", "item", "shop", "seller", "query", "page", "model", "exchange",
})
_ID_SUFFIXES = ("_id", "id", "_ip", "_key", "_hash", "_code", "_no", "_type", "_category")
UNIQUE_RATIO = 0.5  # an integer column with more distinct values than this share of its rows is id-like


def _id_like_name(col: str) -> bool:
    low = col.lower().strip()
    parts = re.split(r"[^a-z0-9]+", low)
    return low in ID_NAMES or any(p in ID_NAMES for p in parts if p) or low.endswith(_ID_SUFFIXES)


@dataclass(frozen=True)
class ColumnInference:
    """Why one column got its role, and the flag that gives it another."""

    name: str
    role: str  # label | time | weight | ignore | categorical | numeric | both
    reason: str
    override: str  # e.g. "--numeric ip"; "" when the user chose the role

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class SchemaInference:
    """An inferred schema and the reason for each column (what `schema infer` and `convert --label` print)."""

    schema: Schema
    columns: tuple[ColumnInference, ...]

    def describe(self) -> str:
        width = max([len(c.name) for c in self.columns] + [6])
        lines = [f"inferred schema {self.schema.name} from {len(self.columns)} columns "
                 f"(fingerprint {self.schema.fingerprint()}):"]
        for c in self.columns:
            lines.append(f"  {c.name:<{width}}  {c.role:<11}  {c.reason}" + (f"  [override: {c.override}]" if c.override else ""))
        return "\n".join(lines)

    def to_dict(self) -> list[dict[str, str]]:
        return [c.to_dict() for c in self.columns]


def infer_schema(path: str | os.PathLike, **kwargs: Any) -> Schema:
    """Guess a schema from a CSV/TSV header and a sample of rows; see `explain_schema` for the rules."""
    return explain_schema(path, **kwargs).schema


def explain_schema(
    path: str | os.PathLike,
    *,
    label: str,
    categorical: Iterable[str] = (),
    numeric: Iterable[str] = (),
    both: Iterable[str] = (),
    time: str | None = None,
    weight: str | None = None,
    ignore: Iterable[str] = (),
    delimiter: str | None = None,
    sample_rows: int = 100_000,
    name: str | None = None,
) -> SchemaInference:
    """Infer a schema from a CSV/TSV header and a sample of rows, with the reason for each column.

    Rules, in order (the first that applies wins; `categorical`/`numeric`/`both`/`ignore`/`time`/`weight`
    override them):
    - date-time values (`2017-11-07 09:30`): the time column when none is named (the most filled one),
      else ignored: a time is for splitting, never a feature;
    - a column filled (almost) only on positive rows leaks the label (an attribution time): ignored;
    - values that are not all numbers: categorical;
    - integers under an ad-log id name (`ip`, `app`, `os`, `channel`, `*_id`, ...): categorical;
    - integers with more distinct values than `UNIQUE_RATIO` of the rows: `mode: both` (hashed exact value
      and discretized), since such a column may be an id or a quantity;
    - other numbers: numeric (log transform, quantile bins).
    Bucket counts follow the sampled cardinality (x8, power of two, 64..2^22).
    """
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"Cannot infer a schema: no such file {path}.")
    if delimiter is None:
        delimiter = "\t" if ".tsv" in path.suffixes else ","
    if len(delimiter) != 1:
        raise SchemaError(f"The delimiter must be one character. Got {delimiter!r} instead.")
    try:
        with _open_text(path) as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if not header:
                raise SchemaError(f"Cannot infer a schema: {path} is empty (no header line).")
            sample = [row for _, row in zip(range(sample_rows), reader) if len(row) == len(header)]
    except csv.Error as e:  # NUL bytes, a field over csv's size limit: not a text table
        raise SchemaError(f"Cannot infer a schema: {path} is not a {delimiter!r}-separated text file ({e}).") from None
    except (EOFError, OSError, zlib.error) as e:
        raise SchemaError(f"Cannot infer a schema: cannot read {path} ({getattr(e, 'strerror', None) or e}).") from None
    if label not in header:
        other = next((d for d in (";", "\t", "|", ",") if d != delimiter and len(header) == 1 and d in header[0]), None)
        hint = f" The header reads as one column: is the delimiter {other!r}? Pass --delimiter {other!r}." if other else ""
        raise SchemaError(f"Label column {label!r} is not in the header of {path}: found {header}.{hint}")
    categorical, numeric, both, ignore = set(categorical), set(numeric), set(both), set(ignore)
    repeated = [c for i, c in enumerate(header) if c in header[:i] and c not in ignore]
    if repeated:
        c = repeated[0]
        where = [i + 1 for i, h in enumerate(header) if h == c]
        raise SchemaError(f"{path} line 1: the header names column {c!r} {len(where)} times (columns {where}): "
                          f"rename them in the file, or pass --ignore {c} to drop them.")
    for c in categorical | numeric | both | ignore | {x for x in (time, weight) if x}:
        if c not in header:
            hint = difflib.get_close_matches(c, header, n=1)
            raise SchemaError(f"Column {c!r} is not in the header of {path}: found {header}."
                              + (f" Did you mean {hint[0]!r}?" if hint else ""))
    for a_name, a, b_name, b in (("categorical", categorical, "numeric", numeric), ("categorical", categorical, "both", both),
                                 ("numeric", numeric, "both", both)):
        if a & b:
            raise SchemaError(f"Columns {sorted(a & b)} are named both --{a_name} and --{b_name}: pick one.")
    garbled = sum(1 for row in sample if any("\ufffd" in v or "\x00" in v for v in row))
    if garbled > 0.1 * max(len(sample), 1) or any("\ufffd" in h or "\x00" in h for h in header):
        raise SchemaError(f"Cannot infer a schema: {path} does not hold text ({garbled} of {len(sample)} sampled rows "
                          "are not valid UTF-8); is it a CSV/TSV file?")
    li = header.index(label)
    if sample and not any(row[li] in ("0", "1") for row in sample):
        raise SchemaError(f"Cannot infer a schema: label column {label!r} of {path} holds no 0/1 values in "
                          f"{len(sample)} sampled rows (e.g. {sample[0][li][:20]!r}).")
    positive = [row[li] == "1" for row in sample]
    n_pos = sum(positive)

    def values(i: int) -> list[str]:
        return [row[i] for row in sample]

    out: list[ColumnInference] = []
    roles: dict[str, str] = {}
    # Pass 1: date-time columns (the time column first, so the others know it is taken).
    datetimes = {}
    for i, col in enumerate(header):
        present = [v for v in values(i) if v != ""]
        if col not in (label, time, weight) and col not in ignore | categorical | numeric | both and present \
                and all(_DATETIME.match(v) for v in present[:5000]):
            datetimes[col] = len(present)
    if time is None and datetimes:
        time = max(datetimes, key=lambda c: datetimes[c])
        roles[time] = "auto-time"
    cats: list[CategoricalField] = []
    nums: list[NumericField] = []
    for i, col in enumerate(header):
        vals = values(i)
        present = [v for v in vals if v != ""]
        distinct = len(set(vals))

        def add(role: str, reason: str, override: str) -> None:
            out.append(ColumnInference(col, role, reason, override))

        buckets = _buckets_for(4 * distinct, cap=1 << 22) if vals else 1024
        if col == label:
            add("label", "the label (--label)", "")
        elif col == time:
            if roles.get(col) == "auto-time":
                add("time", "date-time values, the most filled: the time column (never a feature)", f"--time OTHER or --categorical {col}")
            else:
                add("time", "the time column (--time)", "")
        elif col == weight:
            add("weight", "the example weight (--weight)", "")
        elif col in ignore:
            add("ignore", "dropped (--ignore)", "")
        elif col in categorical:
            add("categorical", f"chosen (--categorical); {distinct} distinct in {len(vals)} sampled rows", "")
            cats.append(CategoricalField(col, buckets))
        elif col in numeric:
            add("numeric", "chosen (--numeric)", "")
            nums.append(NumericField(col))
        elif col in both:
            add("both", "chosen (--both): hashed exact value and quantile bins", "")
            nums.append(NumericField(col, mode="both", hash_buckets=buckets))
        elif present and n_pos and len(present) < 0.5 * len(vals) and \
                sum(1 for v, p in zip(vals, positive) if v != "" and p) >= 0.99 * len(present) >= 0.9 * n_pos:
            ignore.add(col)
            add("ignore", f"filled on {len(present)} rows, almost all positive ({n_pos} positives): it leaks the label",
                f"--categorical {col} or --numeric {col}")
        elif col in datetimes:
            ignore.add(col)
            add("ignore", f"date-time values: not a feature (the time column is {time!r})", f"--time {col} or --categorical {col}")
        elif not present:
            add("categorical", "empty in every sampled row", f"--ignore {col}")
            cats.append(CategoricalField(col, 1024))
        elif not all(_is_number(v) for v in present[:5000]):
            example = next(v for v in present if not _is_number(v))
            add("categorical", f"non-numeric values (e.g. {example[:20]!r}); {distinct} distinct", f"--numeric {col}")
            cats.append(CategoricalField(col, buckets))
        elif all(_INT.match(v) for v in present[:5000]) and _id_like_name(col):
            add("categorical", f"integer ids: {col!r} is an id-like name; {distinct} distinct in {len(vals)} rows",
                f"--numeric {col} or --both {col}")
            cats.append(CategoricalField(col, buckets))
        elif all(_INT.match(v) for v in present[:5000]) and distinct > UNIQUE_RATIO * len(vals):
            add("both", f"integers with {distinct} distinct values in {len(vals)} rows (id-like): hashed exact value "
                "and quantile bins", f"--categorical {col} or --numeric {col}")
            nums.append(NumericField(col, mode="both", hash_buckets=buckets))
        else:
            kind = "integers" if all(_INT.match(v) for v in present[:5000]) else "real numbers"
            add("numeric", f"{kind}, {distinct} distinct in {len(vals)} rows: log transform, quantile bins",
                f"--categorical {col} or --both {col}")
            nums.append(NumericField(col))
    if not cats and not nums:
        raise SchemaError(f"Cannot infer a schema from {path}: no feature column is left "
                          f"(label {label!r}, time {time!r}, ignored {sorted(ignore)}).")
    schema = Schema(
        name or path.name.split(".")[0],
        label,
        tuple(cats),
        tuple(nums),
        weight=weight,
        time=time,
        ignore=tuple(c for c in header if c in ignore),
        columns=tuple(header),
        delimiter=delimiter,
        header=True,
    )
    return SchemaInference(schema, tuple(out))
