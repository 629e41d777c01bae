"""The binary context + candidates request body: its specification and the client-side encoder.

A bid request scores many ads for one user and page: the context fields travel once, the candidate
fields once per ad. The body is two columnar bodies (`ctrflow.client.columnar`) behind a small header;
the server's decoder is `ctrflow.serving.context.decode_context_body`. docs/context.md has the rest.
"""
from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ctrflow.client.columnar import encode_columnar
from ctrflow.errors import ConfigError

__all__ = ["CONTEXT_CONTENT_TYPE", "CONTEXT_FORMAT", "CONTEXT_HEADER", "encode_context"]

CONTEXT_CONTENT_TYPE = "application/x-ctrflow-context"
CONTEXT_FORMAT = """\
The binary context + candidates body (Content-Type: application/x-ctrflow-context, POST
/v1/models/NAME:predict_columnar), little-endian:
  header     b"CTRX"  u8 format=1  u8 flags  u16 0  u32 context_bytes  u32 candidate_bytes   (16 bytes)
  context    a columnar body (application/x-ctrflow-columnar) of R rows: exactly the context fields
  candidates a columnar body of M rows: exactly the candidate fields
  row        only when flags bit 0 is set: M int32, each candidate's context row in [0, R);
             without it R must be 1 (every candidate shares the one context)
The answer is the columnar one: M float32 probabilities, or JSON {"outputs": [...]} with
Accept: application/json."""

CONTEXT_HEADER = struct.Struct("<4sBBHII")
ROW_FLAG = 1


def encode_context(context: Mapping[str, Any], candidates: Mapping[str, Any], *, categorical: Sequence[str],
                   numeric: Sequence[str], row: Sequence[int] | np.ndarray | None = None) -> bytes:
    """Context columns (R values each; R = 1 for one request) and candidate columns (M values each) →
    the binary body. `categorical` / `numeric`: the model's schema fields of each kind (each side
    encodes the ones it holds); `row`: each candidate's context row, needed when R > 1."""
    cats, nums = set(categorical), set(numeric)
    unknown = sorted((set(context) | set(candidates)) - cats - nums)
    if unknown:
        raise ConfigError(f"encode_context: {unknown[:10]} are not fields of this model.")
    parts = []
    for side in (context, candidates):
        parts.append(encode_columnar(side, [n for n in categorical if n in side], [n for n in numeric if n in side]))
    flags, tail = 0, b""
    if row is not None:
        flags, tail = ROW_FLAG, np.ascontiguousarray(row, dtype="<i4").tobytes()
    return CONTEXT_HEADER.pack(b"CTRX", 1, flags, 0, len(parts[0]), len(parts[1])) + parts[0] + parts[1] + tail
