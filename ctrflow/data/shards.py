"""The binary shard format: fixed-width column blocks that need no parsing and memory-map directly.

One shard file (and one record of a shard stream) is:

    magic  b"CTRSHRD1"  (8 bytes)
    header_len          (uint32 little-endian)
    header              (UTF-8 JSON, padded with spaces so the payload starts 64-byte aligned)
    payload             (column blocks, each 64-byte aligned: label f32[n], ids i32[n,F],
                         numeric f32[n,N], optional weight f32[n], time i64[n], extras f32[n,E])

The header names every block with dtype, shape and offset, the payload's CRC-32, the format version,
and the schema + fitted transforms, so a stream of shards (`cat part-*.ctrs | ...`) describes itself.
A shard folder also holds `manifest.json` (written last: a folder without one is incomplete).
"""
from __future__ import annotations

import json
import mmap
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

from ctrflow.atomic import atomic_writer
from ctrflow.errors import ShardCorruptError

__all__ = [
    "FORMAT_VERSION",
    "SHARD_SUFFIX",
    "MANIFEST",
    "read_header",
    "ShardData",
    "encode_shard",
    "write_shard",
    "read_shard",
    "iter_stream",
    "Manifest",
    "load_manifest",
    "verify",
    "crc32_file",
]

MAGIC = b"CTRSHRD1"
FORMAT_VERSION = 1
SHARD_SUFFIX = ".ctrs"
MANIFEST = "manifest.json"
_ALIGN = 64
_PREFIX = len(MAGIC) + 4
_MAX_HEADER = 16 << 20  # a header larger than this is damage, not data

# Block order in the payload; optional blocks are simply absent.
_BLOCKS = ("label", "ids", "numeric", "weight", "time", "extras")
_DTYPES = {"label": "float32", "ids": "int32", "numeric": "float32", "weight": "float32", "time": "int64", "extras": "float32"}


@dataclass
class ShardData:
    """The columns of one shard, as numpy arrays sharing their first dimension.

    `meta` is the shard's header dict (schema, transforms, version) when read back.
    """

    label: np.ndarray
    ids: np.ndarray
    numeric: np.ndarray
    weight: np.ndarray | None = None
    time: np.ndarray | None = None
    extras: np.ndarray | None = None
    meta: dict[str, Any] | None = None

    @property
    def rows(self) -> int:
        return int(self.label.shape[0])

    def blocks(self) -> list[tuple[str, np.ndarray]]:
        return [(n, getattr(self, n)) for n in _BLOCKS if getattr(self, n) is not None]


def _raw(arr: np.ndarray) -> np.ndarray:
    """The array's bytes as a flat uint8 view (works for zero-width blocks too)."""
    return arr.reshape(-1).view(np.uint8)


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def encode_shard(data: ShardData, meta: dict[str, Any]) -> tuple[bytes, list[np.ndarray], int, int]:
    """Header bytes, the payload arrays (in order, each followed by padding), payload size and CRC."""
    blocks, layout, offset, crc = [], [], 0, 0
    for name, arr in data.blocks():
        arr = np.ascontiguousarray(arr, dtype=_DTYPES[name])
        if arr.shape[0] != data.rows:
            raise ValueError(f"block {name!r} has {arr.shape[0]} rows, label has {data.rows}")
        layout.append({"name": name, "dtype": _DTYPES[name], "shape": list(arr.shape), "offset": offset, "nbytes": arr.nbytes})
        blocks.append(arr)
        crc = zlib.crc32(_raw(arr), crc)
        pad = _pad(arr.nbytes)
        crc = zlib.crc32(b"\0" * pad, crc)
        offset += arr.nbytes + pad
    header = dict(meta, version=FORMAT_VERSION, rows=data.rows, blocks=layout, payload_bytes=offset, payload_crc32=crc)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * _pad(_PREFIX + len(text))
    head = MAGIC + len(text).to_bytes(4, "little") + text
    return head, blocks, offset, crc


def _write_to(f: IO[bytes], head: bytes, blocks: list[np.ndarray]) -> None:
    f.write(head)
    for arr in blocks:
        f.write(_raw(arr))
        f.write(b"\0" * _pad(arr.nbytes))


def write_shard(path: str | os.PathLike, data: ShardData, meta: dict[str, Any]) -> dict[str, Any]:
    """Write one shard atomically (temp file, fsync, rename). Returns its manifest entry."""
    path = Path(path)
    head, blocks, payload, crc = encode_shard(data, meta)
    with atomic_writer(path) as f:
        _write_to(f, head, blocks)
    return {"file": path.name, "rows": data.rows, "bytes": len(head) + payload, "crc32": crc}


def write_stream_record(f: IO[bytes], data: ShardData, meta: dict[str, Any]) -> None:
    """Append one shard record to a binary stream (what `cat part-*.ctrs` produces)."""
    head, blocks, _, _ = encode_shard(data, meta)
    _write_to(f, head, blocks)


def _parse_header(buf: bytes | memoryview, where: str) -> tuple[dict[str, Any], int]:
    """Header dict and payload start offset, from a buffer beginning at a record."""
    if len(buf) < _PREFIX:
        raise ShardCorruptError(f"{where}: too short to be a shard ({len(buf)} bytes, need at least {_PREFIX}).")
    if bytes(buf[:8]) != MAGIC:
        raise ShardCorruptError(f"{where}: not a ctrflow shard (bad magic {bytes(buf[:8])!r}, expected {MAGIC!r}).")
    hlen = int.from_bytes(bytes(buf[8:12]), "little")
    if hlen > _MAX_HEADER or len(buf) < _PREFIX + hlen:
        raise ShardCorruptError(f"{where}: header length {hlen} runs past the end of the data ({len(buf)} bytes).")
    try:
        header = json.loads(bytes(buf[_PREFIX : _PREFIX + hlen]))
    except ValueError as e:
        raise ShardCorruptError(f"{where}: header is not valid JSON ({e}).") from None
    if not isinstance(header, dict) or header.get("version") != FORMAT_VERSION:
        version = header.get("version") if isinstance(header, dict) else None
        raise ShardCorruptError(f"{where}: shard format version {version!r}, this ctrflow reads {FORMAT_VERSION}.")
    try:  # damage that still parses as JSON must not surface as a KeyError or a numpy error later
        ok = isinstance(header["payload_bytes"], int) and header["payload_bytes"] >= 0 and isinstance(header["rows"], int) \
            and all(b["name"] in _DTYPES and b["dtype"] == _DTYPES[b["name"]] and b["offset"] >= 0
                    and int(np.prod(b["shape"])) * np.dtype(b["dtype"]).itemsize == b["nbytes"] for b in header["blocks"])
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ShardCorruptError(f"{where}: the header's block layout is damaged (run `ctrflow verify` on its folder).")
    return header, _PREFIX + hlen


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """A shard file's header dict and the byte offset its payload starts at, reading only the header."""
    where = str(path)
    try:
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX)
            hlen = int.from_bytes(prefix[8:12], "little") if len(prefix) == _PREFIX else 0
            return _parse_header(prefix + f.read(min(hlen, _MAX_HEADER)), where)
    except OSError as e:
        raise ShardCorruptError(f"{where}: cannot read shard ({e.strerror}).") from None


def _views(header: dict[str, Any], payload: memoryview | bytes, where: str) -> ShardData:
    arrays: dict[str, np.ndarray] = {}
    for b in header["blocks"]:
        end = b["offset"] + b["nbytes"]
        if end > len(payload):
            raise ShardCorruptError(f"{where}: block {b['name']!r} ends at byte {end} of a {len(payload)}-byte payload (truncated).")
        arrays[b["name"]] = np.frombuffer(payload, dtype=b["dtype"], count=int(np.prod(b["shape"])), offset=b["offset"]).reshape(b["shape"])
    meta = {k: v for k, v in header.items() if k not in ("blocks",)}
    return ShardData(meta=meta, **arrays)


def read_shard(path: str | os.PathLike, *, check_crc: bool = False) -> ShardData:
    """Memory-map one shard; arrays are read-only views of the file (no copy, no parse)."""
    path = Path(path)
    where = str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ShardCorruptError(f"{where}: empty file.")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ShardCorruptError(f"{where}: cannot open shard ({e.strerror}).") from None
    header, start = _parse_header(memoryview(mm)[: min(size, _PREFIX + _MAX_HEADER)], where)
    expected = start + header["payload_bytes"]
    if size != expected:
        raise ShardCorruptError(f"{where}: file is {size} bytes, its header says {expected} (truncated or appended to).")
    payload = memoryview(mm)[start:]
    if check_crc and zlib.crc32(payload) != header["payload_crc32"]:
        raise ShardCorruptError(f"{where}: checksum mismatch (payload CRC-32 {zlib.crc32(payload):#010x}, header says {header['payload_crc32']:#010x}).")
    return _views(header, payload, where)


def _read_exact(f: IO[bytes], n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = f.read(n - got)
        if not b:
            break
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def iter_stream(f: IO[bytes], *, name: str = "<stdin>", check_crc: bool = True) -> Iterator[ShardData]:
    """Shard records from a binary stream, one at a time; a record cut short raises, naming where."""
    index = 0
    while True:
        prefix = _read_exact(f, _PREFIX)
        if not prefix:
            return
        where = f"{name} record {index}"
        if prefix[:8] != MAGIC[:len(prefix)]:  # text or other bytes: say so, not "ended mid-record"
            raise ShardCorruptError(f"{where}: not a ctrflow shard stream (bad magic {prefix[:8]!r}, expected {MAGIC!r}).")
        if len(prefix) < _PREFIX:
            raise ShardCorruptError(f"{where}: stream ended mid-record ({len(prefix)} of {_PREFIX} prefix bytes).")
        if prefix[:8] != MAGIC:
            raise ShardCorruptError(f"{where}: not a ctrflow shard stream (bad magic {prefix[:8]!r}).")
        hlen = int.from_bytes(prefix[8:], "little")
        if hlen > _MAX_HEADER:
            raise ShardCorruptError(f"{where}: header length {hlen} is not plausible (damaged stream).")
        head = _read_exact(f, hlen)
        if len(head) < hlen:
            raise ShardCorruptError(f"{where}: stream ended mid-record ({len(head)} of {hlen} header bytes).")
        header, _ = _parse_header(prefix + head, where)
        payload = _read_exact(f, header["payload_bytes"])
        if len(payload) < header["payload_bytes"]:
            raise ShardCorruptError(
                f"{where}: stream ended mid-record ({len(payload)} of {header['payload_bytes']} payload bytes)."
            )
        if check_crc and zlib.crc32(payload) != header["payload_crc32"]:
            raise ShardCorruptError(f"{where}: checksum mismatch.")
        yield _views(header, payload, where)
        index += 1


def crc32_file(path: str | os.PathLike) -> int:
    """CRC-32 of a shard's payload as stored on disk (what the manifest records)."""
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX)
        hlen = int.from_bytes(prefix[8:12], "little") if len(prefix) == _PREFIX else 0
        f.seek(_PREFIX + hlen)
        crc = 0
        while chunk := f.read(8 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


@dataclass(frozen=True)
class Manifest:
    """What `manifest.json` says about a shard folder."""

    root: Path
    data: dict[str, Any]

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.data["shards"]

    @property
    def rows(self) -> int:
        return int(self.data["rows"])

    def shard_paths(self) -> list[Path]:
        return [self.root / s["file"] for s in self.shards]

    def schema(self):  # -> Schema (lazy import keeps this module free of schema logic)
        from ctrflow.schema import Schema

        return Schema.from_dict(self.data["schema"], source=str(self.root / MANIFEST))

    def transforms(self):
        from ctrflow.data.transforms import Transforms

        return Transforms.from_dict(self.data["transforms"])


def load_manifest(root: str | os.PathLike) -> Manifest:
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ShardCorruptError(f"{root}: no such shard folder.")
    if not path.exists():
        raise ShardCorruptError(f"{root}: no {MANIFEST}: the conversion did not finish, or this is not a shard folder.")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ShardCorruptError(f"{path}: not valid JSON ({e}).") from None
    except OSError as e:
        raise ShardCorruptError(f"{path}: cannot read ({e.strerror or e}).") from None
    if not isinstance(data, dict) or data.get("format") != "ctrflow-shards" or data.get("version") != FORMAT_VERSION \
            or not isinstance(data.get("shards"), list):
        raise ShardCorruptError(f"{path}: not a ctrflow shard manifest of version {FORMAT_VERSION}.")
    return Manifest(root, data)


def verify(root: str | os.PathLike) -> dict[str, Any]:
    """Check every shard of a folder against the manifest: presence, size, header, row count, CRC.

    Returns {"ok": bool, "shards": n, "rows": n, "damaged": [{"file", "reason"}]}; never raises for a
    damaged shard (it is named in the report), only for a missing or unreadable manifest.
    """
    man = load_manifest(root)
    damaged, rows = [], 0
    for entry in man.shards:
        path = man.root / entry["file"]
        try:
            shard = read_shard(path, check_crc=False)
            if shard.rows != entry["rows"]:
                raise ShardCorruptError(f"{path}: {shard.rows} rows, manifest says {entry['rows']}.")
            crc = crc32_file(path)
            if crc != entry["crc32"]:
                raise ShardCorruptError(f"{path}: checksum mismatch (CRC-32 {crc:#010x}, manifest says {entry['crc32']:#010x}).")
            rows += shard.rows
        except (ShardCorruptError, OSError) as e:
            damaged.append({"file": entry["file"], "reason": str(e)})
    return {"ok": not damaged and rows == man.rows, "shards": len(man.shards), "rows": rows,
            "expected_rows": man.rows, "damaged": damaged}
