"""The binary ids body: the one-tensor fast path's wire format, its layout and the client-side encoder.

A bidder that hashes its own requests (`ctrflow.client.hashing`, spec `ctrflow-hash-1`) sends the model
its inputs directly: one int32 id matrix and one float32 numeric matrix, the `predict_ids` signature's
two tensors. The server reads both with `np.frombuffer` (no parsing, no per-value work) and hands them
to the batcher as they are. Specified in docs/ids_body.md; `IDS_FORMAT` is the short form.
"""
from __future__ import annotations

import struct
from typing import Any

import numpy as np

from ctrflow.errors import ConfigError, CtrflowError, DeadlineExceeded, InputError, ModelNotFoundError, QueueFullError

__all__ = ["IDS_CONTENT_TYPE", "IDS_FORMAT", "IDS_HEADER", "IDS_MAGIC", "IDS_VERSION", "IdsClient", "ServerConnectionError",
           "encode_ids", "ids_body_size"]

IDS_CONTENT_TYPE = "application/x-ctrflow-ids"
IDS_MAGIC = b"CTRI"
IDS_VERSION = 1
IDS_FORMAT = """\
The binary ids body (POST /v1/models/NAME:predict_ids, Content-Type: application/x-ctrflow-ids), little-endian:
  header   b"CTRI"  u8 version=1  u8 flags=0  u16 reserved=0  u32 rows  u16 n_ids  u16 n_numeric   (16 bytes)
  ids      rows * n_ids int32, row-major: one column per categorical field (hashed, spec ctrflow-hash-1),
           then one per numeric field (discretized), in schema order; 0 <= id < that field's table size
  numeric  rows * n_numeric float32, row-major: transformed numerics in schema order, missing = 0.0
The body is exactly 16 + 4 * rows * (n_ids + n_numeric) bytes. The answer is rows little-endian
float32 probabilities (application/octet-stream), or JSON {"outputs": [...]} with Accept: application/json."""

# magic, version, flags, reserved, rows, n_ids, n_numeric
IDS_HEADER = struct.Struct("<4sBBHIHH")


def ids_body_size(rows: int, n_ids: int, n_numeric: int) -> int:
    """Bytes of a well-formed body of this shape."""
    return IDS_HEADER.size + 4 * rows * (n_ids + n_numeric)


def encode_ids(ids: np.ndarray, numeric: np.ndarray) -> bytes:
    """int32 ids [rows, F] and float32 numerics [rows, N] → the binary ids body (one copy of each matrix)."""
    ids = np.asarray(ids)
    numeric = np.asarray(numeric)
    if ids.ndim != 2 or numeric.ndim != 2 or ids.shape[0] != numeric.shape[0]:
        raise ConfigError(f"encode_ids: ids must be [rows, F] and numeric [rows, N] with the same rows. "
                          f"Got shapes {ids.shape} and {numeric.shape} instead.")
    if ids.dtype.kind not in "iu" or numeric.dtype.kind not in "fiu":
        raise ConfigError(f"encode_ids: ids must be integers and numeric numbers. Got {ids.dtype} and {numeric.dtype} instead.")
    rows, n_ids = ids.shape
    n_num = numeric.shape[1]
    if n_ids > 0xFFFF or n_num > 0xFFFF or rows > 0xFFFFFFFF:
        raise ConfigError(f"encode_ids: shape {ids.shape} / {numeric.shape} is over the format's limits "
                          "(65535 columns, 2**32-1 rows).")
    if ids.size and (ids.min() < 0 or ids.max() > 0x7FFFFFFF):
        raise ConfigError("encode_ids: ids must lie in [0, 2**31).")
    return b"".join((IDS_HEADER.pack(IDS_MAGIC, IDS_VERSION, 0, 0, rows, n_ids, n_num),
                     np.ascontiguousarray(ids, dtype="<i4").tobytes(),
                     np.ascontiguousarray(numeric, dtype="<f4").tobytes()))


class ServerConnectionError(CtrflowError, ConnectionError):
    """The server could not be reached, or dropped the connection before answering (no answer to act on)."""


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After in seconds (its delta-seconds form); None when absent or an HTTP date."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class IdsClient:
    """Hash raw features on the client and score them over the binary ids endpoint, on one keep-alive connection.

        hasher = FeatureHasher.from_manifest("models/ctr/3")          # the served version's ctrflow.json
        client = IdsClient("http://127.0.0.1:8501", "ctr", hasher)
        p = client.predict({"C1": ["68fd1e64", ""], ..., "I1": [3.0, None], ...})   # float32 [rows]

    `predict_ids(ids, numeric)` sends matrices hashed already. Not thread-safe (one connection: one
    client per thread). Errors carry the server's message: 503 (queue full, shed, connection cap) raises
    `QueueFullError` with `retry_after_s` (the Retry-After header; nothing is retried here, a bid's
    deadline is shorter than any back-off), 504 and a `timeout_s` without an answer `DeadlineExceeded`,
    404 `ModelNotFoundError`, other statuses `InputError`, an unreachable server `ServerConnectionError`.
    After any failure the connection is dropped, so the next call opens a fresh one; a kept-alive
    connection the server closed while idle is reopened and the request sent once more (it is idempotent).
    """

    def __init__(self, url: str, model: str, hasher: Any | None = None, *, timeout_s: float = 10.0,
                 deadline_ms: float | None = None) -> None:
        import http.client
        import urllib.parse

        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.port is None:
            raise ConfigError(f"IdsClient: the url must look like http://HOST:PORT. Got {url!r} instead.")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ConfigError(f"The 'timeout_s' parameter of IdsClient must be a number > 0. Got {timeout_s!r} instead.")
        self._conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
        self._timeout_s = timeout_s
        self._used = False  # the connection answered before: a failure to send on it may be a stale keep-alive
        self._path = f"/v1/models/{urllib.parse.quote(model)}:predict_ids"
        self._headers = {"Content-Type": IDS_CONTENT_TYPE}
        if deadline_ms is not None:
            self._headers["X-Deadline-Ms"] = f"{deadline_ms:g}"
        self.hasher = hasher

    def predict(self, columns: Any) -> np.ndarray:
        """Raw columns (every schema field) → probabilities; hashed here (`FeatureHasher.transform`)."""
        if self.hasher is None:
            raise ConfigError("IdsClient.predict needs a FeatureHasher (pass hasher=); or call predict_ids.")
        return self.predict_ids(*self.hasher.transform(columns))

    def predict_ids(self, ids: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        """int32 ids [rows, F] and float32 numerics [rows, N] → float32 probabilities [rows]."""
        body = encode_ids(ids, numeric)
        status, retry_after, payload = self._post(body)
        if status != 200:
            try:
                import json

                message = json.loads(payload)["error"]
            except (ValueError, KeyError, TypeError):
                message = payload[:300].decode(errors="replace")
            text = f"{self._path} answered {status}: {message}"
            if status == 503:
                error = QueueFullError(text)
                error.retry_after_s = _retry_after_s(retry_after)  # type: ignore[attr-defined]
                raise error
            if status == 504:
                raise DeadlineExceeded(text)
            if status == 404:
                raise ModelNotFoundError(text)
            raise InputError(text)
        return np.frombuffer(payload, "<f4")

    def _post(self, body: bytes) -> tuple[int, str | None, bytes]:
        """(status, Retry-After, body) of one POST; transport failures mapped, the connection reset after any."""
        import http.client
        import socket

        for attempt in (0, 1):
            reused = self._used
            try:
                self._conn.request("POST", self._path, body=body, headers=self._headers)
                response = self._conn.getresponse()
                payload = response.read()
            except (socket.timeout, TimeoutError):
                self._conn.close()  # a late answer must not be read as the next request's
                raise DeadlineExceeded(f"{self._path}: no answer within timeout_s={self._timeout_s:g} s.") from None
            except (OSError, http.client.HTTPException) as e:
                self._conn.close()
                self._used = False
                stale = isinstance(e, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError))
                if attempt == 0 and reused and stale:
                    continue  # the server closed the idle keep-alive connection: once more on a new one
                raise ServerConnectionError(f"{self._path} on {self._conn.host}:{self._conn.port}: "
                                            f"{type(e).__name__}: {e or 'connection closed'}.") from None
            self._used = not response.will_close
            if response.will_close:
                self._conn.close()
            return response.status, response.getheader("Retry-After"), payload
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "IdsClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
