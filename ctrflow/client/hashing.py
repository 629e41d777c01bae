"""Client-side feature hashing (spec `ctrflow-hash-1`, docs/hashing.md): raw values → the converter's ids.

A bidder that hashes its own requests sends one int32 id matrix and one float32 numeric matrix (the
`Batch` layout) instead of raw strings, so the server only runs the model. The ids must equal the
converter's bit for bit, so this is a second implementation of exactly one definition — keyed
SipHash-2-4 as in TensorFlow's `to_hash_bucket_strong` — written over numpy uint64 lanes: every value of a
column goes through each SipHash round at once, with no Python loop per value and no TensorFlow.

    hasher = FeatureHasher.from_manifest("shards/")          # or an export version folder
    ids = hasher.ids({"site": ["a.com", ""], "hour": [3.0, float("nan")], ...})   # int32 [B, F]
    numeric = hasher.numeric({"hour": [3.0, float("nan")], ...})                  # float32 [B, N]

Implementation: values become (UTF-8 bytes, offsets) through pyarrow (C++); each value's bytes are
scattered once into its own zero-padded run of 8-byte packets whose last one carries the length byte,
viewed as little-endian uint64; rows are sorted by packet count and compressed a packet at a time on the
prefix of rows that still have that packet, in cache-sized chunks. `FeatureHasher.ids` hashes all
categorical fields of a request in one pass (per-lane keys), so a 100-row request costs ~1-2 ms, not
one pass per field.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctrflow.data.transforms import Transforms, discretize, field_hash_key, log_transform, value_keys
from ctrflow.errors import InputError
from ctrflow.schema import VALUE_ID_SUFFIX, Schema

__all__ = ["HASH_SPEC_VERSION", "FeatureHasher", "siphash24", "hash_bucket_ids"]

HASH_SPEC_VERSION = "ctrflow-hash-1"

_CHUNK = 16384  # rows per chunk: the state and scratch lanes stay in L2
_C = (0x736F6D6570736575, 0x646F72616E646F6D, 0x6C7967656E657261, 0x7465646279746573)
_U = np.uint64
_NUMBER_TYPES = frozenset((int, float, type(None)))


def _rotl(v: np.ndarray, bits: int, t: np.ndarray) -> None:
    """v = rotl64(v, bits) in place (t: scratch of v's shape)."""
    np.right_shift(v, _U(64 - bits), out=t)
    np.left_shift(v, _U(bits), out=v)
    v |= t


def _sipround(v0: np.ndarray, v1: np.ndarray, v2: np.ndarray, v3: np.ndarray, t: np.ndarray, n: int) -> None:
    for _ in range(n):
        v0 += v1
        v2 += v3
        _rotl(v1, 13, t)
        _rotl(v3, 16, t)
        v1 ^= v0
        v3 ^= v2
        _rotl(v0, 32, t)
        v2 += v1
        v0 += v3
        _rotl(v1, 17, t)
        _rotl(v3, 21, t)
        v1 ^= v2
        v3 ^= v0
        _rotl(v2, 32, t)


def _siphash_sorted(words: np.ndarray, woff: np.ndarray, packets: np.ndarray, k0: np.ndarray,
                    k1: np.ndarray) -> np.ndarray:
    """SipHash-2-4 of rows sorted by descending packet count; row r's packets are words[woff[r]:...]."""
    n = len(packets)
    v0, v1 = _U(_C[0]) ^ k0, _U(_C[1]) ^ k1
    v2, v3 = _U(_C[2]) ^ k0, _U(_C[3]) ^ k1
    t = np.empty(n, _U)
    most = int(packets[0])
    active = np.searchsorted(-packets, -np.arange(1, most + 1), side="right")  # rows with > i packets
    with np.errstate(over="ignore"):
        for i in range(most):
            k = int(active[i])
            w = words[woff[:k] + i]
            a0, a1, a2, a3 = v0[:k], v1[:k], v2[:k], v3[:k]
            a3 ^= w
            _sipround(a0, a1, a2, a3, t[:k], 2)
            a0 ^= w
        v2 ^= _U(0xFF)
        _sipround(v0, v1, v2, v3, t, 4)
    v0 ^= v1
    v2 ^= v3
    v0 ^= v2
    return v0


def _siphash_offsets(data: np.ndarray, offsets: np.ndarray, k0: Any, k1: Any, ascii_values: list[str] | None = None) -> np.ndarray:
    """uint64 SipHash-2-4 of rows data[offsets[r]:offsets[r+1]], with per-row (or shared) key halves.

    Each row's bytes are scattered once into its own zero-padded run of 8-byte packets (its last packet
    carries the length byte), so the work is proportional to the bytes, not to rows x longest value.
    `ascii_values` (the same rows as ASCII str, when the caller has them): when the longest value does
    not pad the rest to over twice their size, numpy's C loop writes them straight into a padded matrix
    (one row of `most` packets each) instead of the scatter through per-byte index arrays.
    """
    lens = np.diff(offsets)
    n = len(lens)
    if n == 0:
        return np.empty(0, _U)
    packets = lens // 8 + 1
    most = int(packets.max())
    total = int(offsets[-1] - offsets[0])
    length = int(lens[0])
    uniform_len = bool((lens == length).all())
    if ascii_values is not None and not uniform_len and n * most <= 2 * int(packets.sum()):
        width = int(lens.max())
        flat = np.zeros(n * most * 8, np.uint8)
        if width:
            flat.reshape(n, -1)[:, :width] = np.array(ascii_values, dtype=f"S{width}").view(np.uint8).reshape(n, width)
        woff = np.arange(n, dtype=np.int64) * most
        total = 0  # written already
    else:
        woff = np.cumsum(packets) - packets  # first packet of each row in the padded buffer
        flat = np.zeros(int(packets.sum()) * 8, np.uint8)
    if total and uniform_len:  # one length (hex ids, fixed codes): a strided copy, no index arrays
        flat.reshape(n, -1)[:, :length] = data[offsets[0]:offsets[-1]].reshape(n, length)
    elif total:
        shift = np.repeat(woff * 8 - (offsets[:-1] - offsets[0]), lens)
        shift += np.arange(total)
        flat[shift] = data[offsets[0]:offsets[-1]]
    flat[(woff + packets - 1) * 8 + 7] = (lens & 0xFF).astype(np.uint8)  # SipHash's final packet
    words = flat.view("<u8")  # little-endian packets, whatever the host's byte order
    k0 = np.broadcast_to(np.asarray(k0, _U), (n,))
    k1 = np.broadcast_to(np.asarray(k1, _U), (n,))
    uniform = packets.min() == packets.max()
    order = None if uniform else np.argsort(-packets, kind="stable")
    out = np.empty(n, _U)
    for lo in range(0, n, _CHUNK):
        sel = slice(lo, min(lo + _CHUNK, n))
        idx = sel if order is None else order[sel]
        out[idx] = _siphash_sorted(words, woff[idx], packets[idx], k0[idx], k1[idx])
    return out


def _as_binary(values: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 UTF-8 bytes, int64 offsets [n+1]) of one column; None/null → empty (missing)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(
            values.tolist() if isinstance(values, np.ndarray) and values.dtype.kind in "SO" else values)
    except (pa.ArrowException, UnicodeError, TypeError, ValueError) as e:
        raise InputError(f"Field '{name}': values must be str or UTF-8 bytes ({e}).") from None
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_boolean(arr.type):
        arr = pc.if_else(arr, "1", "0")
    elif pa.types.is_floating(arr.type):  # the converter's rule: 3.0 and 3 hash alike
        as_int = arr.cast(pa.int64(), safe=False)
        arr = pc.if_else(pc.equal(as_int.cast(arr.type), arr), as_int.cast(pa.string()), arr.cast(pa.string()))
    elif pa.types.is_integer(arr.type):
        arr = arr.cast(pa.string())
    elif pa.types.is_null(arr.type):
        arr = pa.array([""] * len(arr), pa.string())
    elif not (pa.types.is_string(arr.type) or pa.types.is_binary(arr.type)
              or pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)):
        raise InputError(f"Field '{name}': cannot hash values of type {arr.type}; send strings.")
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        try:  # the converter rejects rows with invalid UTF-8; refuse them here too (validated in C++)
            arr = arr.cast(pa.large_string())
        except pa.ArrowInvalid:
            raise InputError(f"Field '{name}': a value is not valid UTF-8.") from None
    arr = arr.cast(pa.large_binary()).fill_null(b"")
    if arr.offset:
        arr = pa.concat_arrays([arr])  # drop a slice offset so the buffers start at row 0
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], np.int64, len(arr) + 1)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return data, offsets


def _binary(values: Any, name: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """`_as_binary`, plus the values themselves when they are a list of ASCII str (the padded-matrix path)."""
    if isinstance(values, list) and set(map(type, values)) == {str}:
        joined = "".join(values)
        if joined.isascii():
            offsets = np.zeros(len(values) + 1, np.int64)
            np.cumsum(np.fromiter(map(len, values), np.int64, len(values)), out=offsets[1:])
            return np.frombuffer(joined.encode("ascii"), np.uint8), offsets, values
    return (*_as_binary(values, name), None)


def siphash24(values: Any, key: tuple[int, int], *, name: str = "value") -> np.ndarray:
    """uint64 keyed SipHash-2-4 of each value's UTF-8 bytes (the 64-bit hash TensorFlow reduces)."""
    data, offsets, ascii_values = _binary(values, name)
    return _siphash_offsets(data, offsets, key[0], key[1], ascii_values)


def hash_bucket_ids(values: Any, buckets: int, key: tuple[int, int], *, name: str = "value") -> np.ndarray:
    """int32 ids in [1, buckets) (`1 + siphash % (buckets - 1)`); empty/None → 0. Equals transforms.hash_values."""
    if isinstance(buckets, bool) or not isinstance(buckets, (int, np.integer)) or not 2 <= buckets <= 0x7FFFFFFF:
        raise InputError(f"hash_bucket_ids: buckets must be an int in [2, 2**31 - 1] (ids are int32). Got {buckets!r} instead.")
    data, offsets, ascii_values = _binary(values, name)
    h = _siphash_offsets(data, offsets, key[0], key[1], ascii_values)
    ids = (h % _U(buckets - 1)).astype(np.int64) + 1
    ids[np.diff(offsets) == 0] = 0
    return ids.astype(np.int32)


def row_column(columns: Mapping[str, Any], name: str, who: str, error: type[Exception]) -> Any:
    """`columns[name]`, checked to be one value per row (a list, a 1-D numpy or pyarrow array): a str would be
    read as its characters and an (n, 1) array as n rows of arrays. Raises `error` naming `who` and the column."""
    if name not in columns:
        raise error(f"{who}: missing column '{name}'.")
    col = columns[name]
    shape = getattr(col, "shape", None)
    if isinstance(col, (str, bytes, Mapping)) or not hasattr(col, "__len__") or (shape is not None and len(shape) != 1):
        got = f"shape {tuple(shape)}" if shape is not None and len(shape) != 1 else f"a {type(col).__name__}"
        raise error(f"{who}: column '{name}' must be one value per row (a list, a 1-D numpy or pyarrow array). "
                    f"Got {got} instead.")
    return col


@dataclass(frozen=True)
class FeatureHasher:
    """Raw columns → the model's inputs, exactly as the converter and the serving graph compute them."""

    schema: Schema
    transforms: Transforms
    # "numpy" (default: no TensorFlow), "tensorflow" (TensorFlow's own kernel, `to_hash_bucket_strong`,
    # for all fields in one graph call: ~2x the values/s on long columns) or "auto" (TensorFlow when
    # importable). Same ids either way; columns that are not all str take the numpy path.
    backend: str = "numpy"

    def __post_init__(self) -> None:
        if self.backend not in ("numpy", "tensorflow", "auto"):
            raise InputError(f"The 'backend' parameter of FeatureHasher must be 'numpy', 'tensorflow' or 'auto'. "
                             f"Got {self.backend!r} instead.")
        use_tf = self.backend == "tensorflow"
        if self.backend == "auto":
            import importlib.util

            use_tf = importlib.util.find_spec("tensorflow") is not None
        object.__setattr__(self, "_use_tf", use_tf)
        object.__setattr__(self, "_tf_fn", None)
        missing = [f.name for f in self.schema.numeric if f.name not in self.transforms.boundaries]
        if missing:
            raise InputError(f"FeatureHasher: the transforms have no boundaries for numeric fields {missing}.")
        object.__setattr__(self, "_keys", {f.name: field_hash_key(self.schema.hash_seed, f.name)
                                           for f in self.schema.categorical})
        object.__setattr__(self, "_bounds", {f.name: self.transforms.boundaries_of(f.name) for f in self.schema.numeric})
        object.__setattr__(self, "_key_matrix", np.array([self._keys[f.name] for f in self.schema.categorical], _U).reshape(-1, 2))
        object.__setattr__(self, "_log_rows", np.array([j for j, f in enumerate(self.schema.numeric) if f.transform == "log"], np.intp))
        object.__setattr__(self, "_both_keys", {f.name: field_hash_key(self.schema.hash_seed, f.name + VALUE_ID_SUFFIX)
                                                for f in self.schema.both_numeric})

    @classmethod
    def from_manifest(cls, path: str | Path, *, backend: str = "numpy") -> "FeatureHasher":
        """From a shard folder (manifest.json), an export version folder (ctrflow.json) or either JSON file."""
        p = Path(path)
        if p.is_dir():
            cands = [p / "manifest.json", p / "ctrflow.json"]
            p = next((c for c in cands if c.exists()), cands[0])
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{p}: cannot read a manifest ({e}).") from None
        if not isinstance(d, dict) or "schema" not in d or "transforms" not in d:
            raise InputError(f"{p}: not a ctrflow manifest (needs 'schema' and 'transforms').")
        return cls(Schema.from_dict(d["schema"], source=str(p)), Transforms.from_dict(d["transforms"]), backend=backend)

    def _column(self, columns: Mapping[str, Any], name: str, rows: int | None) -> Any:
        col = row_column(columns, name, "FeatureHasher", InputError)
        n = len(col)
        if rows is not None and n != rows:
            raise InputError(f"FeatureHasher: column '{name}' has {n} values, expected {rows}.")
        return col

    def _transformed(self, columns: Mapping[str, Any], rows: int | None) -> np.ndarray:
        """float32 [B, N] transformed numerics, NaN where missing (the converter's staged values)."""
        fast = self._numeric_matrix(columns, rows)
        if fast is not None:
            return fast
        out = []
        for f in self.schema.numeric:
            x = self._float64(columns, f.name, rows)
            with np.errstate(over="ignore"):
                v = (log_transform(x) if f.transform == "log" else x).astype(np.float32)
            if np.isinf(v).any():  # the converter rejects such rows (bad_number): no id to match
                raise InputError(f"Field '{f.name}': value at row {int(np.flatnonzero(np.isinf(v))[0])} is beyond float32's range.")
            out.append(v)
            rows = len(x)
        return np.stack(out, axis=1) if out else np.zeros((rows or 0, 0), np.float32)

    def _float64(self, columns: Mapping[str, Any], name: str, rows: int | None) -> np.ndarray:
        """One numeric column as float64, NaN where missing; infinities refused with the row."""
        col = self._column(columns, name, rows)
        try:
            if isinstance(col, np.ndarray) and col.dtype.kind in "fiub":
                x = col.astype(np.float64, copy=False)
            elif isinstance(col, (list, tuple)) and set(map(type, col)) <= _NUMBER_TYPES:
                x = np.array(col, dtype=np.float64)  # None → NaN; ints past 2^53 round as the converter's parse does
            else:  # lists with None, pyarrow arrays: nulls → NaN in C++
                import pyarrow as pa

                arr = col if isinstance(col, (pa.Array, pa.ChunkedArray)) else pa.array(col, pa.float64(), from_pandas=True)
                x = arr.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        except Exception:  # pyarrow's ArrowInvalid/ArrowTypeError, numpy's TypeError/ValueError
            raise InputError(f"Field '{name}': numeric values must be numbers (NaN/None = missing).") from None
        if np.isinf(x).any():
            raise InputError(f"Field '{name}': value at row {int(np.flatnonzero(np.isinf(x))[0])} is infinite.")
        return x

    def _numeric_matrix(self, columns: Mapping[str, Any], rows: int | None) -> np.ndarray | None:
        """All numeric columns in one numpy conversion when they are plain numbers (None = missing), else None."""
        nums = self.schema.numeric
        if not nums:
            return None
        cols = [self._column(columns, f.name, rows) for f in nums]
        for c in cols:
            if isinstance(c, np.ndarray):
                if c.dtype.kind not in "fiu":
                    return None
            elif not set(map(type, c)) <= _NUMBER_TYPES:  # C-level type scan (bool, str → the slow path)
                return None
        try:
            x = np.array(cols, dtype=np.float64)  # [N, B]; None → NaN
        except (OverflowError, ValueError, TypeError):
            return None
        if x.ndim != 2:
            return None
        if np.isinf(x).any():
            return None  # the per-field path names the field and row
        logs = self._log_rows
        if len(logs):
            x[logs] = log_transform(x[logs])
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(x.T, dtype=np.float32)
        return None if np.isinf(out).any() else out  # the per-field path names the field and row

    def _flat_binary(self, cols: list[Any]) -> tuple[np.ndarray, np.ndarray, list[str] | None] | None:
        """UTF-8 bytes and offsets of all-str columns, field after field, in one pass (None: not all str)."""
        from itertools import chain

        for c in cols:
            if isinstance(c, np.ndarray) or set(map(type, c)) != {str}:
                return None
        flat = list(chain.from_iterable(cols))
        joined = "".join(flat)
        if joined.isascii():  # one encode, lengths by a C-level map: no per-value Python code
            lens = np.fromiter(map(len, flat), np.int64, len(flat))
            offsets = np.zeros(len(flat) + 1, np.int64)
            np.cumsum(lens, out=offsets[1:])
            return np.frombuffer(joined.encode("ascii"), np.uint8), offsets, flat
        try:
            return (*_as_binary(flat, "categorical"), None)
        except InputError:
            return None  # the per-field path names the field

    def _rows(self, columns: Mapping[str, Any]) -> int:
        names = self.schema.id_names
        if not isinstance(columns, Mapping):
            raise InputError(f"FeatureHasher: columns must be a mapping of field name to values. Got a {type(columns).__name__} instead.")
        if not names or names[0] not in columns:
            raise InputError(f"FeatureHasher: missing column '{names[0] if names else '?'}'.")
        return len(self._column(columns, names[0], None))

    def ids(self, columns: Mapping[str, Any]) -> np.ndarray:
        """int32 [B, F]: categoricals in schema order (hashed), then numerics (discretized)."""
        rows = self._rows(columns)
        return self._ids(columns, rows, self._transformed(columns, rows))

    def _ids(self, columns: Mapping[str, Any], rows: int, num: np.ndarray) -> np.ndarray:
        out = np.zeros((rows, len(self.schema.id_names)), np.int32)
        cats = self.schema.categorical
        stacked = self._all_str(columns, rows) if cats and rows and self._use_tf else None
        if stacked is not None:
            out[:, :len(cats)] = self._tf_ids(stacked)
        elif cats and rows:  # every field's values in one SipHash pass, with per-lane keys
            flat = self._flat_binary([self._column(columns, f.name, rows) for f in cats])
            ascii_values = None
            if flat is not None:
                data, offsets, ascii_values = flat
            else:
                datas, offs, base = [], [np.zeros(1, np.int64)], 0
                for f in cats:
                    d, o = _as_binary(self._column(columns, f.name, rows), f.name)
                    datas.append(d[o[0]:o[-1]])
                    offs.append(o[1:] - o[0] + base)
                    base += int(o[-1] - o[0])
                data, offsets = np.concatenate(datas), np.concatenate(offs)
            keys = self._key_matrix
            h = _siphash_offsets(data, offsets, np.repeat(keys[:, 0], rows), np.repeat(keys[:, 1], rows), ascii_values)
            mod = np.repeat(np.array([f.hash_buckets - 1 for f in cats], _U), rows)
            ids = (h % mod).astype(np.int64) + 1
            ids[np.diff(offsets) == 0] = 0
            out[:, :len(cats)] = ids.reshape(len(cats), rows).T
        off = len(self.schema.categorical)
        for j, f in enumerate(self.schema.numeric):
            out[:, off + j] = discretize(num[:, j], self._bounds[f.name])
        off += len(self.schema.numeric)
        for j, f in enumerate(self.schema.both_numeric):  # the exact value's id, keyed as the converter keys it
            keys = value_keys(self._float64(columns, f.name, rows))
            out[:, off + j] = hash_bucket_ids(list(keys), f.hash_buckets, self._both_keys[f.name], name=f.name)
        return out

    def _all_str(self, columns: Mapping[str, Any], rows: int) -> np.ndarray | None:
        """The categorical columns as one object array [F, rows] when every value is a str, else None."""
        cols = [self._column(columns, f.name, rows) for f in self.schema.categorical]
        for c in cols:
            if isinstance(c, np.ndarray):
                if c.dtype.kind != "U" and not (c.dtype == object and set(map(type, c)) == {str}):
                    return None
            elif set(map(type, c)) != {str}:  # a C-level scan; None, bytes, numbers: the numpy path
                return None
        return np.array(cols, dtype=object)

    def _tf_ids(self, stacked: np.ndarray) -> np.ndarray:
        """int32 [rows, F] from TensorFlow's kernel: one graph call hashes every field (its own key each)."""
        import tensorflow as tf

        fn = self._tf_fn
        if fn is None:
            cats = self.schema.categorical
            keys = [list(self._keys[f.name]) for f in cats]

            @tf.function(input_signature=[tf.TensorSpec([len(cats), None], tf.string)])
            def fn(x):  # exactly ctrflow.data.transforms.hash_values, per field
                out = []
                for i, f in enumerate(cats):
                    h = tf.strings.to_hash_bucket_strong(x[i], f.hash_buckets - 1, key=keys[i]) + 1
                    out.append(tf.where(tf.strings.length(x[i]) > 0, h, tf.zeros_like(h)))
                return tf.cast(tf.stack(out, axis=1), tf.int32)

            object.__setattr__(self, "_tf_fn", fn)
        try:
            t = tf.constant(stacked)
        except (UnicodeError, ValueError, TypeError) as e:  # a lone surrogate has no UTF-8 form
            raise InputError(f"FeatureHasher: a categorical value is not valid text ({str(e)[:120]}).") from None
        return fn(t).numpy()

    def numeric(self, columns: Mapping[str, Any]) -> np.ndarray:
        """float32 [B, N]: transformed numerics in schema order, missing as 0.0."""
        rows = self._rows(columns)
        return np.nan_to_num(self._transformed(columns, rows), nan=0.0)

    def transform(self, columns: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, numeric) in one pass over the numeric columns."""
        rows = self._rows(columns)
        num = self._transformed(columns, rows)
        return self._ids(columns, rows, num), np.nan_to_num(num, nan=0.0)
