"""The binary columnar request body: its specification, layout and the client-side encoder.

One definition of the format, shared by the server's decoder (`ctrflow.serving.codec`), the load
generator and any Python client; clients in other languages implement `COLUMNAR_FORMAT` directly.
"""
from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ctrflow.client.hashing import row_column
from ctrflow.errors import ConfigError

__all__ = ["COLUMNAR_CONTENT_TYPE", "COLUMNAR_FORMAT", "HEADER", "COLUMN", "encode_columnar"]

COLUMNAR_CONTENT_TYPE = "application/x-ctrflow-columnar"
COLUMNAR_FORMAT = """\
The binary columnar body (Content-Type: application/x-ctrflow-columnar), little-endian:
  header   b"CTRC"  u8 format=1  u8 0  u16 n_columns  u32 n_rows                  (12 bytes)
  column   u16 name_len  name (UTF-8)  u8 kind  u8 0  u32 width  payload (n_rows * width bytes)
           kind b"S": fixed-width byte strings, NUL-padded (b"" = missing; trailing NULs are padding), width >= 1
           kind b"f": float32 (width 4), kind b"d": float64 (width 8); NaN = missing
Every schema field exactly once: categoricals as "S", numerics as "f"/"d". The answer is n_rows
little-endian float32 probabilities (Content-Type application/octet-stream), or JSON
{"outputs": [...]} when the request says Accept: application/json.
The JSON twin (Content-Type: application/json): {"columns": ["C1", ...], "data": [[...], ...]}."""

# The fixed parts of the layout (see COLUMNAR_FORMAT): body header, then per column after its name.
HEADER = struct.Struct("<4sBBHI")
COLUMN = struct.Struct("<BBI")


def _value_bytes(v: Any) -> bytes:
    """One categorical value's bytes, by the converter's rule for non-strings (docs/hashing.md §4): None →
    missing, bools `1`/`0`, integral floats as integers (`3.0` → `3`), other values as `str` prints them."""
    if v is None:
        return b""
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode()
    if isinstance(v, (bool, np.bool_)):
        return b"1" if v else b"0"
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v)).encode()
    return str(float(v) if isinstance(v, np.floating) else v).encode()


def _column(features: Mapping[str, Any], name: str) -> Any:
    return row_column(features, name, "encode_columnar", ConfigError)


def encode_columnar(features: Mapping[str, Any], categorical: Sequence[str], numeric: Sequence[str]) -> bytes:
    """Named columns → the binary body (strings UTF-8, None → missing); the inverse of the server's decoder."""
    names = [*categorical, *numeric]
    rows = len(_column(features, names[0])) if names else 0
    parts = [HEADER.pack(b"CTRC", 1, 0, len(names), rows)]
    for n in names:
        col = _column(features, n)
        if len(col) != rows:
            raise ConfigError(f"encode_columnar: column {n!r} has {len(col)} values, expected {rows}.")
        if n in categorical:
            try:
                if isinstance(col, np.ndarray) and col.dtype.kind == "S":
                    arr = np.asarray(col)
                elif set(map(type, col)) == {str}:  # the common case, without a call per value
                    arr = np.array([v.encode() for v in col], dtype="S")
                else:
                    arr = np.array([_value_bytes(v) for v in col], dtype="S")
            except UnicodeEncodeError as e:  # a lone surrogate ("\ud800") has no UTF-8 form
                raise ConfigError(f"encode_columnar: column {n!r} holds a value that is not valid text ({e.reason}).") from None
            if arr.dtype.itemsize == 0 or arr.dtype == np.dtype("S0"):
                arr = arr.astype("S1")
            kind, payload, width = b"S", arr.tobytes(), arr.dtype.itemsize
        else:
            try:
                arr = np.array([np.nan if v is None else v for v in col], dtype="<f4") if not isinstance(col, np.ndarray) \
                    else np.asarray(col, dtype="<f4")
            except (TypeError, ValueError):
                raise ConfigError(f"encode_columnar: numeric column {n!r} must hold numbers (None/NaN = missing).") from None
            kind, payload, width = b"f", arr.tobytes(), 4
        name = n.encode()
        parts.append(struct.pack("<H", len(name)) + name + COLUMN.pack(kind[0], 0, width) + payload)
    return b"".join(parts)
