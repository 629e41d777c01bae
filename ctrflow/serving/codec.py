"""Request and response bodies of the REST API: TF Serving's JSON predict bodies and the binary columnar body.

Decoders turn bytes into numpy columns the predictor takes as they are (few Python loops per row) and
raise `RequestError` (400/413) with a message naming what is wrong and where; encoders build answers.
The columnar layout itself is defined once, client side, in `ctrflow.client.columnar`.

JSON is read and written with orjson (3x faster than the standard library on predict bodies; it is the
largest cost of a JSON request after the model): bodies orjson refuses (`NaN`/`Infinity` literals,
lone surrogates, UTF-16/32, nesting over 1024) are read again by `json`, which accepts them or says why;
integers beyond 64 bits are read as floats (send such ids as strings). Score answers print each float32
in its shortest form that reads back to the same float32 (`0.3149`, not `0.31490001082420349`).
"""
from __future__ import annotations

import itertools
import json
import operator
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import orjson
except ImportError:  # a declared dependency; the standard library does the same, slower
    orjson = None

from ctrflow.client.columnar import COLUMN as _COLUMN
from ctrflow.client.columnar import COLUMNAR_CONTENT_TYPE, COLUMNAR_FORMAT, encode_columnar
from ctrflow.client.columnar import HEADER as _HEADER
from ctrflow.client.ids import IDS_CONTENT_TYPE, IDS_FORMAT, IDS_HEADER, IDS_MAGIC, IDS_VERSION, ids_body_size
from ctrflow.errors import CtrflowError

__all__ = [
    "COLUMNAR_CONTENT_TYPE",
    "COLUMNAR_FORMAT",
    "IDS_CONTENT_TYPE",
    "IDS_FORMAT",
    "ParsedRequest",
    "RequestError",
    "decode_columnar",
    "decode_ids",
    "encode_columnar",
    "error_body",
    "parse_columnar_json",
    "parse_predict_json",
    "predict_json",
    "scores_json",
]


class RequestError(CtrflowError):
    """A request the server refuses before any model sees it; `status` is the HTTP code to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ---- request bodies (the hot path: few Python-level loops per row) ----------------------------------


@dataclass
class ParsedRequest:
    """A decoded predict body: columnar features (or `ids`/`numeric` for predict_ids) and row count."""

    signature: str  # "serving_default" or "predict_ids"
    format: str  # "instances" (row format) or "inputs" (columnar)
    features: dict[str, Any]
    rows: int


_CATEGORICAL_TYPES = frozenset((str, type(None), int))
_NUMERIC_TYPES = frozenset((int, float, type(None)))


def _load_json(body: bytes) -> Any:
    if not body:
        raise RequestError("Empty request body; send a JSON object.")
    if orjson is not None:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass  # what orjson refuses but json reads (NaN, lone surrogates, UTF-16), or json's own message
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise RequestError(f"Malformed JSON: {str(e)[:200]}") from None


def parse_predict_json(body: bytes, categorical: Sequence[str], numeric: Sequence[str]) -> ParsedRequest:
    """Decode a TF Serving predict body for a model with these features; raise RequestError (400) if bad.

    Row format `{"instances": [{name: value, ...}, ...]}` or columnar `{"inputs": {name: [values]}}`;
    optional `"signature_name"`: "serving_default" (raw features) or "predict_ids" (`ids` int
    [n, F] and `numeric` float [n, N]). Categorical values are strings (ints are taken as their text),
    numerics are numbers; null is missing. Returns numpy columns the predictor takes as they are.
    """
    doc = _load_json(body)
    if not isinstance(doc, dict):
        raise RequestError(f"The body must be a JSON object with 'instances' or 'inputs'. Got a JSON {_json_type(doc)}.")
    unknown = set(doc) - {"instances", "inputs", "signature_name"}
    if unknown:
        raise RequestError(f"Unknown top-level keys {sorted(unknown)[:10]}; a predict body has 'instances' or 'inputs' "
                           "and optionally 'signature_name'.")
    signature = doc.get("signature_name", "serving_default")
    if signature in ("", None):
        signature = "serving_default"
    if signature not in ("serving_default", "predict_ids"):
        raise RequestError(f"Unknown signature_name {str(signature)[:100]!r}; this model has 'serving_default' and 'predict_ids'.")
    if ("instances" in doc) == ("inputs" in doc):
        raise RequestError("The body must have exactly one of 'instances' (rows) or 'inputs' (columns).")
    if signature == "predict_ids":
        names, kinds = ("ids", "numeric"), None
    else:
        names = (*categorical, *numeric)
        kinds = {**{n: "categorical" for n in categorical}, **{n: "numeric" for n in numeric}}
    if "instances" in doc:
        columns = _columns_from_instances(doc["instances"], names)
        fmt = "instances"
    else:
        columns = _columns_from_inputs(doc["inputs"], names)
        fmt = "inputs"
    rows = len(columns[names[0]])
    if signature == "predict_ids":
        features = {"ids": _matrix(columns["ids"], "ids", rows, len(categorical) + len(numeric), integer=True),
                    "numeric": _matrix(columns["numeric"], "numeric", rows, len(numeric), integer=False)}
    else:
        features = {n: _column(n, columns[n], kinds[n]) for n in names}
    return ParsedRequest(signature, fmt, features, rows)


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _key_problem(keys: Any, want: Sequence[str]) -> str:
    keys, wanted = set(keys), set(want)
    missing, extra = sorted(wanted - keys), sorted(map(str, keys - wanted))
    parts = []
    if missing:
        parts.append(f"missing features {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    if extra:
        parts.append(f"unknown features {extra[:20]}{' ...' if len(extra) > 20 else ''}")
    return "; ".join(parts)


def _columns_from_instances(instances: Any, names: Sequence[str]) -> dict[str, tuple]:
    if not isinstance(instances, list):
        raise RequestError(f"'instances' must be a list of objects (one per candidate). Got a JSON {_json_type(instances)}.")
    if not instances:
        raise RequestError("'instances' is empty: send at least one candidate.")
    # Checked in C over all rows at once (types, lengths, then every name looked up); a row that fails
    # is then found and described. Same keys <=> same count and every (distinct) name present.
    if set(map(type, instances)) != {dict} or set(map(len, instances)) != {len(names)}:
        _bad_instance(instances, names)
    try:
        if len(names) == 1:
            return {names[0]: tuple(inst[names[0]] for inst in instances)}
        return dict(zip(names, zip(*map(operator.itemgetter(*names), instances))))
    except KeyError:
        _bad_instance(instances, names)
        raise


def _bad_instance(instances: list, names: Sequence[str]) -> None:
    """Raise the RequestError naming the first instance that is not an object of exactly `names`."""
    want = set(names)
    for i, inst in enumerate(instances):
        if type(inst) is not dict:
            raise RequestError(f"instances[{i}] must be an object of named features. Got a JSON {_json_type(inst)}.")
        if inst.keys() != want:
            raise RequestError(f"instances[{i}]: {_key_problem(inst, names)}.")


def _columns_from_inputs(inputs: Any, names: Sequence[str]) -> dict[str, Any]:
    if not isinstance(inputs, dict):
        raise RequestError(f"'inputs' must be an object of named columns. Got a JSON {_json_type(inputs)}.")
    if inputs.keys() != set(names):
        raise RequestError(f"'inputs': {_key_problem(inputs, names)}.")
    rows = None
    for n in names:
        col = inputs[n]
        if not isinstance(col, list):
            raise RequestError(f"inputs[{n!r}] must be a list (one value per candidate). Got a JSON {_json_type(col)}.")
        if rows is None:
            rows = len(col)
        elif len(col) != rows:
            raise RequestError(f"inputs[{n!r}] has {len(col)} values, inputs[{names[0]!r}] has {rows}: "
                               "every column needs one value per candidate.")
    if not rows:
        raise RequestError("'inputs' columns are empty: send at least one candidate.")
    return inputs


def _column(name: str, values: Sequence[Any], kind: str) -> np.ndarray:
    types = set(map(type, values))
    if kind == "categorical":
        if types <= {str}:
            return np.array(values, dtype=object)
        if not types <= _CATEGORICAL_TYPES:
            i = next(i for i, v in enumerate(values) if type(v) not in _CATEGORICAL_TYPES)
            raise RequestError(f"Feature {name!r} row {i}: expected a string (or null for missing). "
                               f"Got a JSON {_json_type(values[i])}.")
        return np.array(["" if v is None else v if type(v) is str else str(v) for v in values], dtype=object)
    if not types <= _NUMERIC_TYPES:
        i = next(i for i, v in enumerate(values) if type(v) not in _NUMERIC_TYPES)
        raise RequestError(f"Feature {name!r} row {i}: expected a number (or null for missing). Got a JSON {_json_type(values[i])}.")
    try:
        return np.array(values, dtype=np.float64)  # None → NaN (missing)
    except (OverflowError, ValueError, TypeError):
        raise RequestError(f"Feature {name!r}: a number is out of the float range.") from None


def _matrix(values: Sequence[Any], name: str, rows: int, width: int, *, integer: bool) -> np.ndarray:
    for i, row in enumerate(values):
        if not isinstance(row, list) or len(row) != width:
            raise RequestError(f"{name!r} row {i} must be a list of {width} numbers.")
        bad = set(map(type, row)) - ({int} if integer else {int, float})
        if bad:
            raise RequestError(f"{name!r} row {i} must hold {'integers' if integer else 'numbers'} only.")
    try:
        if integer:
            out = np.array(values, dtype=np.int64).reshape(rows, width)
            if out.size and (out.min() < 0 or out.max() >= 2**31):
                raise RequestError(f"{name!r} holds ids outside [0, 2**31).")
            return out.astype(np.int32)
        return np.array(values, dtype=np.float32).reshape(rows, width)
    except (OverflowError, ValueError, TypeError):
        raise RequestError(f"{name!r} holds a number out of range.") from None


def parse_columnar_json(body: bytes, categorical: Sequence[str], numeric: Sequence[str]) -> tuple[dict[str, Any], int]:
    """`{"columns": [names], "data": [[values of column 0], ...]}` → (features, rows)."""
    doc = _load_json(body)
    if not isinstance(doc, dict) or set(doc) != {"columns", "data"}:
        raise RequestError('A columnar JSON body is {"columns": [names], "data": [[values], ...]} and nothing else.')
    names, data = doc["columns"], doc["data"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not isinstance(data, list):
        raise RequestError("'columns' must be a list of feature names and 'data' a list of columns.")
    if len(names) != len(data):
        raise RequestError(f"'columns' names {len(names)} features but 'data' holds {len(data)} columns.")
    if len(set(names)) != len(names):
        raise RequestError("'columns' names a feature twice.")
    inputs = _columns_from_inputs(dict(zip(names, data)), (*categorical, *numeric))
    kinds = {**{n: "categorical" for n in categorical}, **{n: "numeric" for n in numeric}}
    rows = len(data[0])
    return {n: _column(n, inputs[n], kinds[n]) for n in (*categorical, *numeric)}, rows


# Column headers (name, kind, width) already seen valid, per schema: a body laid out like an earlier
# one is decoded with one dict lookup per column instead of parsing and checking each header again.
_LAYOUTS: dict[tuple[tuple[str, ...], tuple[str, ...]], dict[bytes, tuple[str, np.dtype]]] = {}
_LAYOUT_LIMIT = 4096  # headers remembered per schema (widths vary per request; bounded memory)
_U16 = struct.Struct("<H")


def decode_columnar(body: bytes, categorical: Sequence[str], numeric: Sequence[str]) -> tuple[dict[str, np.ndarray], int]:
    """The binary columnar body (see `COLUMNAR_FORMAT`) → (features as numpy columns, rows); no per-row loop.

    A body laid out like an earlier one (same rows, size and every header byte: `_BODIES`) is checked
    with one gather of its header bytes and cut into views; headers seen before for this schema are
    looked up one by one (`_LAYOUTS`); anything else (a new width, a malformed body) takes the checked
    decoder, which names what is wrong."""
    schema = (tuple(categorical), tuple(numeric))
    size = len(body)
    if size < _HEADER.size:
        return _decode_columnar_checked(body, categorical, numeric, {})
    rows = _U32.unpack_from(body, 8)[0]
    bodies = _BODIES.get(schema)
    seen = None if bodies is None else bodies.get((rows, size))
    if seen is not None and seen[1]:
        view = np.frombuffer(body, np.uint8)
        for index, expected, columns in seen[1]:  # at most _SAME_SIZE
            if view[index].tobytes() == expected:
                return {name: np.frombuffer(body, dtype, rows, offset) for name, dtype, offset in columns}, rows
    known = _LAYOUTS.get(schema)
    if known is None:
        if len(_LAYOUTS) >= 64:  # schemas served by one process: a handful
            _LAYOUTS.clear()
            _BODIES.clear()
            _BUILT.clear()
        known = _LAYOUTS[schema] = {}
    magic, fmt, _, n_columns, rows = _HEADER.unpack_from(body, 0)
    if magic == b"CTRC" and fmt == 1 and rows and n_columns == len(schema[0]) + len(schema[1]):
        out: dict[str, np.ndarray] = {}
        spans = [(0, _HEADER.size)]
        offset = _HEADER.size
        for _ in range(n_columns):
            if offset + 2 > size:
                break
            end = offset + 2 + _U16.unpack_from(body, offset)[0] + _COLUMN.size
            head = body[offset:end]
            entry = known.get(head if type(head) is bytes else bytes(head))
            if entry is None or entry[0] in out:
                break
            spans.append((offset, end))
            name, dtype = entry
            stop = end + rows * dtype.itemsize
            if stop > size:
                break
            out[name] = np.frombuffer(body, dtype, rows, end)
            offset = stop
        else:  # every column known and distinct, as many as the schema has: all present
            if offset == size:
                _remember_body(schema, body, rows, spans, out, seen)
                return out, rows
    return _decode_columnar_checked(body, categorical, numeric, known)


# Whole bodies' layouts, per schema and (rows, size): [the header bytes last seen at that size, its
# layouts: (positions of the header bytes, their values, columns (name, dtype, offset))]. A layout is built
# only when the same header bytes come back at the same size, so a client whose string widths vary per
# request (URLs, user agents) pays one join of its headers per body, not an index build. Bounded: at most
# _BODY_LIMIT sizes and _LAYOUTS_MAX layouts (~4-5 KB each) per schema, cleared when full.
_BODIES: dict[tuple[tuple[str, ...], tuple[str, ...]], dict[tuple[int, int], list]] = {}
_BODY_LIMIT = 1024  # sizes per schema (one bytes value of the header bytes each)
_LAYOUTS_MAX = 256  # built layouts per schema: ~1 MB at most
_SAME_SIZE = 4  # layouts per (rows, size)
_BUILT: dict[tuple[tuple[str, ...], tuple[str, ...]], int] = {}  # layouts built per schema (`_LAYOUTS_MAX`)
_U32 = struct.Struct("<I")


def _remember_body(schema: tuple, body: bytes, rows: int, spans: list[tuple[int, int]], out: dict[str, np.ndarray],
                   seen: list | None) -> None:
    bodies = _BODIES.get(schema)
    if bodies is None:
        bodies = _BODIES[schema] = {}
    heads = b"".join(body[a:b] for a, b in spans)  # == the gather of `index` below, in the same order
    if seen is None or seen[0] != heads:  # a new size, or another layout at this size: note its headers only
        if seen is None:
            if len(bodies) >= _BODY_LIMIT:
                bodies.clear()
                _BUILT[schema] = 0
            bodies[(rows, len(body))] = [heads, []]
        else:
            seen[0] = heads
        return
    if _BUILT.get(schema, 0) >= _LAYOUTS_MAX:
        for entry in bodies.values():
            entry[1] = []
        _BUILT[schema] = 0
    bounds = np.array(spans, dtype=np.int32)
    lengths = bounds[:, 1] - bounds[:, 0]
    index = (np.repeat(bounds[:, 0] - (np.cumsum(lengths) - lengths), lengths)
             + np.arange(int(lengths.sum()), dtype=np.int32))
    columns = [(name, column.dtype, end) for (_, end), (name, column) in zip(spans[1:], out.items())]
    layouts = seen[1]
    if len(layouts) >= _SAME_SIZE:
        del layouts[0]
    else:
        _BUILT[schema] = _BUILT.get(schema, 0) + 1
    layouts.append((index, heads, columns))


def _decode_columnar_checked(body: bytes, categorical: Sequence[str], numeric: Sequence[str],
                             learn: dict[bytes, tuple[str, np.dtype]]) -> tuple[dict[str, np.ndarray], int]:
    """`decode_columnar` reading and checking every column header; each valid one goes into `learn`."""
    if len(body) < _HEADER.size:
        raise RequestError(f"Columnar body of {len(body)} bytes is shorter than its {_HEADER.size}-byte header.")
    magic, fmt, _, n_columns, rows = _HEADER.unpack_from(body, 0)
    if magic != b"CTRC" or fmt != 1:
        raise RequestError("Not a columnar body: it must start with b'CTRC' and format 1.")
    if rows == 0:
        raise RequestError("Columnar body has 0 rows: send at least one candidate.")
    kinds = {**{n: "S" for n in categorical}, **{n: "fd" for n in numeric}}
    out: dict[str, np.ndarray] = {}
    offset = _HEADER.size
    view = memoryview(body)
    for _ in range(n_columns):
        if offset + 2 > len(body):
            raise RequestError("Columnar body ends inside a column header.")
        (name_len,) = struct.unpack_from("<H", body, offset)
        offset += 2
        end = offset + name_len + _COLUMN.size
        if end > len(body):
            raise RequestError("Columnar body ends inside a column header.")
        try:
            name = bytes(view[offset:offset + name_len]).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("A column name is not UTF-8.") from None
        kind, _, width = _COLUMN.unpack_from(body, offset + name_len)
        offset = end
        kind = chr(kind)
        if name not in kinds:
            raise RequestError(f"Unknown feature {name[:100]!r} in the columnar body.")
        if name in out:
            raise RequestError(f"Feature {name!r} appears twice in the columnar body.")
        if kind not in kinds[name]:
            want = "'S' (byte strings)" if kinds[name] == "S" else "'f' or 'd' (floats)"
            raise RequestError(f"Feature {name!r} has kind {kind!r}; it must be {want}.")
        if kind == "S":
            if width < 1 or width > 4096:
                raise RequestError(f"Feature {name!r}: string width {width} must be in [1, 4096].")
            dtype = np.dtype(f"S{width}")
        else:
            dtype = np.dtype("<f4" if kind == "f" else "<f8")
            if width != dtype.itemsize:
                raise RequestError(f"Feature {name!r}: width {width} does not match kind {kind!r}.")
        if len(learn) < _LAYOUT_LIMIT:  # a header valid for this schema, whatever follows it
            learn[bytes(view[offset - name_len - 2 - _COLUMN.size:offset])] = (name, dtype)
        size = rows * dtype.itemsize
        if offset + size > len(body):
            raise RequestError(f"Columnar body ends inside the values of feature {name!r}.")
        out[name] = np.frombuffer(body, dtype, rows, offset)
        offset += size
    if offset != len(body):
        raise RequestError(f"Columnar body has {len(body) - offset} bytes after its last column.")
    if len(out) != len(kinds):
        raise RequestError(f"Columnar body: {_key_problem(out, list(kinds))}.")
    return out, rows


def decode_ids(body: bytes | bytearray | memoryview, n_ids: int, n_numeric: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The binary ids body (see `IDS_FORMAT`) → (ids int32 [rows, F], numeric float32 [rows, N], rows).

    Both matrices are read-only views of `body` (np.frombuffer, no copy); only the 16-byte header is
    parsed. Id ranges are checked by the predictor (`Predictor.check_ids`), which knows the tables.
    """
    if len(body) < IDS_HEADER.size:
        raise RequestError(f"Ids body of {len(body)} bytes is shorter than its {IDS_HEADER.size}-byte header.")
    magic, version, flags, _, rows, f, n = IDS_HEADER.unpack_from(body, 0)
    if magic != IDS_MAGIC:
        raise RequestError(f"Not an ids body: it must start with {IDS_MAGIC!r} (see docs/ids_body.md).")
    if version != IDS_VERSION or flags:
        raise RequestError(f"Ids body version {version} (flags {flags}) is not understood; this server reads "
                           f"version {IDS_VERSION} with flags 0.")
    if f != n_ids or n != n_numeric:
        raise RequestError(f"Ids body has {f} id columns and {n} numeric columns; this model takes "
                           f"{n_ids} and {n_numeric}.")
    if rows == 0:
        raise RequestError("Ids body has 0 rows: send at least one candidate.")
    want = ids_body_size(rows, f, n)
    if len(body) != want:
        raise RequestError(f"Ids body of {rows} rows x ({f} ids + {n} numerics) must be {want} bytes. "
                           f"Got {len(body)} instead.")
    ids = np.frombuffer(body, "<i4", rows * f, IDS_HEADER.size).reshape(rows, f)
    numeric = np.frombuffer(body, "<f4", rows * n, IDS_HEADER.size + 4 * rows * f).reshape(rows, n)
    return ids, numeric, rows


def error_body(message: str) -> bytes:
    """The JSON error answer: {"error": message}."""
    return json.dumps({"error": message}).encode()


def scores_json(key: str, scores: np.ndarray) -> bytes:
    """{"<key>": [p, ...]} for a vector of scores."""
    fast = _float_list(scores)
    if fast is not None:
        return b'{"%s":%s}' % (key.encode(), fast)
    return b'{"%s": %s}' % (key.encode(), json.dumps(np.asarray(scores).tolist()).encode())


def predict_json(outputs: dict[str, np.ndarray], fmt: str) -> bytes | None:
    """TF Serving's predict answer for float vector outputs, fast: `{"predictions": [...]}` (row format:
    bare values for one output, `{"logits": l, "probabilities": p}` per row for several) or
    `{"outputs": ...}` (columnar). None when an output is not a finite float vector of the batch's
    length: the caller then uses the general encoder (`ctrflow.serving.tfserving.encode_json_response`)."""
    names = list(outputs)
    if not names or orjson is None:
        return None
    if len({np.shape(outputs[n]) for n in names}) != 1 or not all(_finite_vector(outputs[n]) for n in names):
        return None
    if len(names) > 1 and fmt == "instances":
        return _row_objects(outputs, names)
    texts = [_float_list(outputs[n]) for n in names]
    if len(names) == 1:
        return b'{"%s":%s}' % (b"predictions" if fmt == "instances" else b"outputs", texts[0])
    keys = [orjson.dumps(n) for n in names]
    return b'{"outputs":{' + b",".join(k + b":" + t for k, t in zip(keys, texts)) + b"}}"


def _row_objects(outputs: dict[str, np.ndarray], names: list[str]) -> bytes:
    """`{"predictions": [{name: value, ...} per row]}` for several float vectors of one length."""
    keys = [orjson.dumps(n) for n in names]
    n = np.shape(outputs[names[0]])[0]
    if not n:
        return b'{"predictions":[]}'
    # Row objects without a Python loop per row: the [n, k] matrix's numbers, split, then interleaved
    # with the key separators (`,"probabilities":` within a row, `},{"logits":` between rows).
    matrix = orjson.dumps(np.stack([np.asarray(outputs[k]) for k in names], axis=1), option=orjson.OPT_SERIALIZE_NUMPY)
    inner = matrix[2:-2]  # "l0,p0],[l1,p1" ...: numbers hold no commas or brackets
    if len(keys) == 2 and b"|" not in keys[1]:  # ctrflow's serving_default (logits, probabilities): 3 passes in C
        inner = inner.replace(b"],[", b"|").replace(b",", b"," + keys[1] + b":").replace(b"|", b"},{" + keys[0] + b":")
        return b'{"predictions":[{' + keys[0] + b":" + inner + b"}]}"
    numbers = inner.replace(b"],[", b",").split(b",")
    separators = [b"," + k + b":" for k in keys[1:]] + [b"},{" + keys[0] + b":"]
    separators = separators * n
    separators[-1] = b"}]}"
    return b'{"predictions":[{' + keys[0] + b":" + b"".join(itertools.chain.from_iterable(zip(numbers, separators)))


def _finite_vector(values: Any) -> bool:
    """A float32/float64 vector without NaN or infinities (those are left to the general encoder)."""
    arr = np.asarray(values)
    return arr.ndim == 1 and arr.dtype in (np.float32, np.float64) and bool(np.isfinite(arr).all())


def _float_list(values: Any) -> bytes | None:
    """A float vector as a JSON list (orjson; float32 in its shortest round-trip form); None when it is
    not a finite float vector or orjson is missing."""
    if orjson is None or not _finite_vector(values):
        return None
    return orjson.dumps(np.ascontiguousarray(values), option=orjson.OPT_SERIALIZE_NUMPY)
