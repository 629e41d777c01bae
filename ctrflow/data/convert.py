"""Raw logs (CSV/TSV, gzip, Parquet, JSON Lines) → binary shards + manifest, on all cores.

The input is cut into blocks (byte ranges of text files, row groups of Parquet); worker processes parse,
validate, hash and transform each block into one shard. Quantile boundaries of numeric fields are fitted
from a bounded weighted sample of *all* blocks, so block results are staged first and finalized once the
boundaries are known (or written directly when reusing an earlier conversion's transforms: `like`).

Nothing is lost: every malformed row is counted by reason and written with its file and line number to
`rejects.tsv`; the output folder appears only when complete (built as `<out>.partial-<pid>`, renamed).
"""
from __future__ import annotations

import csv
import errno
import gzip
import io
import json
import os
import shutil
import sys
import time
import zlib
from collections import Counter
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ctrflow.atomic import atomic_write_json, atomic_writer, replace_atomically
from ctrflow.data import shards as shardio
from ctrflow.data.transforms import (QuantileSketch, Transforms, discretize, field_hash_key, hash_values, log_transform,
                                     value_keys)
from ctrflow.errors import ConfigError, InputError, SchemaError, TooManyRejectsError
from ctrflow.schema import VALUE_ID_SUFFIX, Schema, load_schema
from ctrflow.validation import Bool, Int, check_fields

__all__ = ["ConvertOptions", "ConvertSummary", "convert", "REJECT_REASONS"]

REJECT_REASONS = (
    "wrong_field_count",  # the row has more or fewer fields than the schema's columns
    "bad_label",          # label missing or not 0/1
    "bad_number",         # a numeric field (or extra) is not a finite number
    "bad_weight",         # weight missing, negative or not a number
    "bad_time",           # time is neither an integer nor an ISO date-time
    "invalid_utf8",       # a categorical value is not valid UTF-8 (serving could never match it)
    "bad_json",           # a JSON Lines row is not a JSON object
    "empty_row",          # a blank line, or a row whose every field is empty
    "line_too_long",      # a line over max_line_bytes (skipped in pieces, never held in memory)
    "field_too_long",     # a used field over max_field_bytes
)

ProgressFn = Callable[[int, "int | None"], None]


@dataclass(frozen=True)
class ConvertOptions:
    """How a conversion runs. Every field is checked once, here."""

    workers: int = 0  # worker processes; 0 = one per core for large inputs, else 1; 1 = in this process
    block_bytes: int = 32 << 20  # text bytes per block (= per shard), >= 4 KiB
    max_errors: int | None = 1000  # abort when more rows are rejected; None = no bound
    sample_capacity: int = 1_000_000  # rows kept per numeric field for quantile fitting
    overwrite: bool = False  # replace an existing output folder
    seed: int = 0  # sampling seed (quantile sketch); conversion is deterministic given it
    max_line_bytes: int = 1 << 20  # longer lines are rejected (`line_too_long`) while read in bounded pieces
    max_field_bytes: int = 64 << 10  # a longer field value rejects its row (`field_too_long`)

    def __post_init__(self) -> None:
        check_fields(self, {
            "workers": Int(low=0), "block_bytes": Int(low=4096), "max_errors": Int(low=0, optional=True),
            "sample_capacity": Int(low=1000), "overwrite": Bool(), "seed": Int(low=0),
            "max_line_bytes": Int(low=64), "max_field_bytes": Int(low=1),
        })


@dataclass
class ConvertSummary:
    out: str
    rows: int
    rows_read: int
    rows_rejected: int
    rejects: dict[str, int]
    rejects_path: str | None
    shards: int
    bytes: int
    input_bytes: int
    seconds: float
    rows_per_s: float
    inputs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# Planning: cut inputs into blocks a worker can read on its own.
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Block:
    index: int
    file: str
    kind: str  # "text" | "parquet" | "jsonl"
    start: int = 0  # byte range (text/jsonl in plain files) or row-group index (parquet)
    end: int = 0
    first_line: int = 1  # 1-based line number of the block's first line in its file
    data: bytes | None = None  # decompressed text (gzip inputs are cut in this process); a long line's head
    too_long: bool = False  # one line over max_line_bytes: rejected whole, its bytes never held in memory


def _input_kind(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".parquet") or name.endswith(".pq"):
        return "parquet"
    if name.endswith(".jsonl") or name.endswith(".ndjson") or name.endswith(".json"):
        return "jsonl"
    return "text"


def _check_first_line(line: bytes, path: Path, schema: Schema) -> bool:
    """Validate a text file's first line against the schema. Returns True if it is a header to skip."""
    try:
        text = line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        text = line.decode("utf-8", "replace").rstrip("\r\n")
    try:
        fields = next(csv.reader([text], delimiter=schema.delimiter), [])
    except csv.Error as e:  # e.g. NUL bytes: binary data, not text
        raise InputError(f"{path} line 1: not text ({e}); is this a CSV/TSV file?") from None
    expected = list(schema.columns) if schema.columns else None
    if schema.header:
        if expected is not None and fields != expected:
            if len(fields) != len(expected):
                raise SchemaError(
                    f"{path} line 1: schema '{schema.name}' expects {len(expected)} fields, found {len(fields)} "
                    f"(header {fields[:8]}{'...' if len(fields) > 8 else ''})."
                )
            differ = [(e, f) for e, f in zip(expected, fields) if e != f]
            looks_like_data = schema.label in expected and fields[expected.index(schema.label)] in ("0", "1")
            hint = " It looks like data: this file has no header; use a schema with header: false." if looks_like_data else ""
            raise SchemaError(
                f"{path} line 1: header does not match schema '{schema.name}': expected column(s) "
                f"{[e for e, _ in differ][:5]} where the file has {[f for _, f in differ][:5]}.{hint}"
            )
        return True
    if expected is None:  # a headerless schema always lists its columns (checked in Schema)
        raise SchemaError(f"schema '{schema.name}' has header: false and no 'columns'.")
    if len(fields) != len(expected):
        raise SchemaError(
            f"{path} line 1: schema '{schema.name}' expects {len(expected)} fields, found {len(fields)}."
        )
    label_value = fields[expected.index(schema.label)]
    if fields == expected or (label_value not in ("0", "1", "") and label_value in (schema.label, "label", "click")):
        raise SchemaError(
            f"{path} line 1 looks like a header ({fields[:4]}...) but schema '{schema.name}' expects none: "
            "remove it or use a schema with header: true."
        )
    return False


def _open_bytes(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # type: ignore[return-value]


_BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark at the start of a file
_PIECE = 4 << 20  # bytes read at a time while cutting: the planner's memory is O(block + piece), never O(line)
_HEAD = 256  # bytes of a too-long line kept for the rejects file


class _LineCutter:
    """Cuts a byte stream into blocks of whole lines, setting aside every line over `max_line` bytes.

    Fed consecutive pieces, it returns `_Block`s: row blocks of at least `block_bytes` (cut after a
    newline) and one `too_long` block per overlong line, whose bytes are skipped, not kept (only their
    first `_HEAD` bytes are). `keep_data` keeps the row blocks' bytes (decompressed inputs); otherwise
    blocks are byte ranges that a worker reads itself.
    """

    def __init__(self, file: str, kind: str, start: int, first_line: int, block_bytes: int, max_line: int,
                 keep_data: bool, index: int) -> None:
        self.file, self.kind, self.block_bytes, self.max_line, self.keep_data = file, kind, block_bytes, max_line, keep_data
        self.index = index
        self.pos = start  # stream offset of the bytes fed so far
        self.blk: int | None = start  # start of the pending row block (a line start); None inside a long line
        self.blk_line = first_line
        self.line_start, self.line_no = start, first_line  # the open (unterminated) line
        self.buf = bytearray()  # bytes [blk, blk + len(buf)) when keep_data
        self.long_head: bytes | None = None  # head of the open line once it is known to be too long
        # CSV quoting: a newline after an odd number of '"' lies inside a quoted field, so no block may end
        # there (both halves would be misparsed). Stray quotes in unquoted fields could keep the count odd
        # for good, so a block past 2x block_bytes is cut at a newline anyway (what it did before).
        self.quotes = kind == "text"
        self.quote_parity = 0  # '"' seen so far, mod 2

    def _emit_rows(self, end: int, out: list[_Block]) -> None:
        assert self.blk is not None
        if end > self.blk:
            data = bytes(self.buf[: end - self.blk]) if self.keep_data else None
            out.append(_Block(self.index, self.file, self.kind, self.blk, end, self.blk_line, data))
            self.index += 1
            del self.buf[: end - self.blk]
        self.blk = end

    def _append(self, c: bytes, base: int, upto: int) -> None:
        if self.keep_data and self.blk is not None:
            lo = self.blk + len(self.buf) - base
            if upto - base > lo:
                self.buf += c[max(lo, 0): upto - base]

    def _normal(self, ends: np.ndarray, c: bytes, base: int, out: list[_Block], outside: np.ndarray | None = None) -> None:
        """Lines ending at `ends` (stream offsets after each newline) are short: cut full blocks among them,
        only after newlines `outside` quoted fields (None: all are)."""
        if not len(ends):
            return
        first = 0
        while True:
            assert self.blk is not None
            k = int(np.searchsorted(ends[first:], self.blk + self.block_bytes, side="left")) + first
            if k >= len(ends):
                break
            if outside is not None and not outside[k]:
                ok = np.flatnonzero(outside[k:])
                forced = int(np.searchsorted(ends, self.blk + 2 * self.block_bytes, side="left"))
                if len(ok) and k + int(ok[0]) <= forced:
                    k += int(ok[0])
                elif forced < len(ends):
                    k = max(forced, k)
                else:
                    break  # the row goes on in the next piece
            cut = int(ends[k])
            self._append(c, base, cut)
            self._emit_rows(cut, out)
            self.blk_line = self.line_no + k + 1
            first = k + 1
        last = int(ends[-1])
        self._append(c, base, last)
        self.line_start, self.line_no = last, self.line_no + len(ends)

    def _long(self, start: int, end: int, c: bytes, base: int, out: list[_Block]) -> None:
        head = self.long_head
        if head is None:
            known = bytes(self.buf[start - self.blk:]) if (self.keep_data and self.blk is not None and start < self.blk + len(self.buf)) else b""
            head = (known + c[max(start - base, 0): max(start - base, 0) + _HEAD])[:_HEAD]
        if self.blk is not None:
            self._emit_rows(start, out)
        out.append(_Block(self.index, self.file, self.kind, start, end, self.line_no, head if self.keep_data else None, too_long=True))
        self.index += 1
        self.blk, self.blk_line, self.buf, self.long_head = end, self.line_no + 1, bytearray(), None
        self.line_start, self.line_no = end, self.line_no + 1

    def feed(self, c: bytes) -> list[_Block]:
        base, out = self.pos, []
        arr = np.frombuffer(c, np.uint8)
        ends = np.flatnonzero(arr == 10).astype(np.int64) + (base + 1)
        outside = None
        if self.quotes:
            quotes = np.flatnonzero(arr == 34)
            if len(quotes) or self.quote_parity:
                outside = (np.searchsorted(quotes, ends - base) + self.quote_parity) % 2 == 0
            self.quote_parity = (self.quote_parity + len(quotes)) % 2
        j = 0
        if len(ends):
            starts = np.concatenate(([self.line_start], ends[:-1]))
            for k in np.flatnonzero(ends - starts - 1 > self.max_line).tolist():
                self._normal(ends[j:k], c, base, out, None if outside is None else outside[j:k])
                self._long(int(starts[k]), int(ends[k]), c, base, out)
                j = k + 1
        self._normal(ends[j:], c, base, out, None if outside is None else outside[j:])
        self.pos = base + len(c)
        if self.long_head is None:
            if self.pos - self.line_start > self.max_line:  # the open line is already too long: stop keeping it
                lo = self.line_start - base
                known = bytes(self.buf[self.line_start - self.blk:]) if (self.keep_data and lo < 0) else b""
                self.long_head = (known + c[max(lo, 0): max(lo, 0) + _HEAD])[:_HEAD]
                self._emit_rows(self.line_start, out)
                self.blk = None
            else:
                self._append(c, base, self.pos)
        return out

    def finish(self) -> list[_Block]:
        out: list[_Block] = []
        if self.long_head is not None:
            out.append(_Block(self.index, self.file, self.kind, self.line_start, self.pos, self.line_no,
                              self.long_head if self.keep_data else None, too_long=True))
            self.index += 1
        elif self.blk is not None:
            self._emit_rows(self.pos, out)
        return out


def _plan_text(path: Path, kind: str, schema: Schema | None, block_bytes: int, start_index: int,
               max_line_bytes: int = 1 << 20) -> Iterator[_Block]:
    """Blocks of whole lines. Plain files become byte ranges; gzip is decompressed here, in order.

    Lines over `max_line_bytes` become `too_long` blocks (rejects); reading is in pieces, so a
    gigabyte-long line costs no more memory than a short one.
    """
    compressed = path.suffix == ".gz"
    try:
        with _open_bytes(path) as f:
            first = f.readline(max_line_bytes + 2)
            if not first:
                raise InputError(f"{path}: empty file (no rows).")
            if len(first) > max_line_bytes + 1 or (not first.endswith(b"\n") and f.read(1)):
                raise InputError(f"{path} line 1: longer than {max_line_bytes} bytes (max_line_bytes); "
                                 "is this a text file of rows? (raise the limit with --max-line-bytes)")
            bom = len(_BOM) if first.startswith(_BOM) else 0  # Excel and Windows tools write one: not data
            first = first[bom:]
            skip = _check_first_line(first, path, schema) if (kind == "text" and schema) else False
            line = 2 if skip else 1
            offset = bom + (len(first) if skip else 0)
            cutter = _LineCutter(str(path), kind, offset, line, block_bytes, max_line_bytes, compressed, start_index)
            f.seek(offset)
            while True:
                piece = f.read(_PIECE)
                if not piece:
                    break
                yield from cutter.feed(piece)
            yield from cutter.finish()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise InputError(f"{path}: truncated or damaged gzip ({e}); re-copy the file or drop it from the inputs.") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e}).") from None


def _plan(inputs: Sequence[Path], schema: Schema, block_bytes: int, max_line_bytes: int = 1 << 20) -> Iterator[_Block]:
    index = 0
    for path in inputs:
        kind = _input_kind(path)
        if kind == "parquet":
            import pyarrow.parquet as pq

            try:
                pf = pq.ParquetFile(path)
            except Exception as e:  # pyarrow raises ArrowInvalid / OSError for damaged files
                raise InputError(f"{path}: not a readable Parquet file ({e}).") from None
            if pf.metadata.num_rows == 0:
                raise InputError(f"{path}: empty file (no rows).")
            missing = [c for c in schema.used_columns if c not in pf.schema_arrow.names]
            if missing:
                raise SchemaError(f"{path}: schema '{schema.name}' needs columns {missing} that the Parquet file lacks (it has {pf.schema_arrow.names}).")
            import pyarrow as pa

            nested = [f"{c} ({pf.schema_arrow.field(c).type})" for c in schema.used_columns if pa.types.is_nested(pf.schema_arrow.field(c).type)]
            if nested:
                raise SchemaError(f"{path}: columns {nested} hold lists or structs; a schema column must hold one string, "
                                  "number or bool per row (flatten them, or leave them out of the schema).")
            line = 1
            for rg in range(pf.num_row_groups):
                yield _Block(index, str(path), kind, rg, rg + 1, line)
                line += pf.metadata.row_group(rg).num_rows
                index += 1
        else:
            for block in _plan_text(path, kind, schema, block_bytes, index, max_line_bytes):
                index = block.index + 1
                yield block


# ------------------------------------------------------------------------------------------------
# Per-block work (runs in worker processes).
# ------------------------------------------------------------------------------------------------
@dataclass
class _BlockResult:
    index: int
    file: str
    rows_read: int
    rows: int
    rejects: list[tuple[int, str, str, str]]  # (line, reason, field, row text)
    staged: str | None  # folder of staged arrays (when boundaries were not known yet)
    shard: dict[str, Any] | None  # manifest entry (when written directly)
    sample: np.ndarray | None  # float32 [k, n_numeric] subsample of transformed numerics
    sample_weight: float
    time_range: tuple[int, int] | None
    positives: float = 0.0


def _read_block_columns(block: _Block, schema: Schema) -> tuple[dict[str, Any], np.ndarray, list[tuple[int, str, str, str]], int]:
    """Columns (pyarrow binary arrays) of one block, their line numbers, structural rejects, rows read."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rejects: list[tuple[int, str, str, str]] = []
    if block.kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(block.file).read_row_group(block.start, columns=schema.used_columns)
        cols = {}
        for name in schema.used_columns:
            col = table.column(name).combine_chunks()
            import pyarrow.compute as pc

            if pa.types.is_floating(col.type):  # 3.0 and 3 must hash alike: integral floats print as ints
                as_int = col.cast(pa.int64(), safe=False)
                col = pc.if_else(pc.equal(as_int.cast(col.type), col), as_int.cast(pa.string()), col.cast(pa.string()))
            elif pa.types.is_boolean(col.type):  # 1/0 as JSON Lines and FeatureHasher read them (Arrow prints "true")
                col = pc.if_else(col, "1", "0")
            elif pa.types.is_timestamp(col.type) and name == schema.time:  # epoch seconds (UTC), floored
                per_s = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[col.type.unit]
                raw = col.cast(pa.int64()).to_numpy(zero_copy_only=False)
                col = pa.array(np.floor_divide(np.nan_to_num(raw).astype(np.int64), per_s), mask=col.is_null().to_numpy(zero_copy_only=False))
            cols[name] = col.cast(pa.string()).fill_null("").cast(pa.binary())
        lines = np.arange(block.first_line, block.first_line + table.num_rows, dtype=np.int64)
        return cols, lines, rejects, table.num_rows

    data = block.data
    if data is None:
        with open(block.file, "rb") as f:
            f.seek(block.start)
            data = f.read(block.end - block.start)
    if block.kind == "jsonl":
        return _read_jsonl(data, block, schema)

    if not schema.columns:
        raise SchemaError(f"schema '{schema.name}' lists no 'columns': a text block cannot be read without them.")
    columns = list(schema.columns)
    blanked: set[int] = set()
    if not data.isascii():  # pyarrow cannot hand a non-UTF-8 malformed row to the handler: set those lines aside
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            data = _blank_invalid_utf8(data, block.first_line, rejects, blanked, schema.delimiter, len(columns))
    n_lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    bad_lines: list[int] = []

    def on_invalid(row: Any) -> str:
        line = block.first_line + row.number - 1
        bad_lines.append(line)
        if line not in blanked:
            rejects.append((line, "wrong_field_count", f"{row.actual_columns} of {row.expected_columns}", row.text))
        return "skip"

    hook, sys.unraisablehook = sys.unraisablehook, lambda _: None  # pyarrow reports a handler's failure there
    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=columns, use_threads=False, block_size=max(1 << 20, len(data) + 1)),
            parse_options=pacsv.ParseOptions(delimiter=schema.delimiter, invalid_row_handler=on_invalid, ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.binary() for c in columns}, include_columns=schema.used_columns,
                strings_can_be_null=False, quoted_strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        raise InputError(f"{block.file} from line {block.first_line}: cannot be read as "
                         f"{schema.delimiter!r}-separated text ({str(e)[:200]}); is it a text file of rows?") from None
    finally:
        sys.unraisablehook = hook
    all_lines = np.arange(block.first_line, block.first_line + n_lines, dtype=np.int64)
    lines = np.setdiff1d(all_lines, np.asarray(bad_lines, np.int64), assume_unique=True) if bad_lines else all_lines
    if len(lines) != table.num_rows:  # quoted newlines inside fields: line numbers become approximate
        lines = np.arange(block.first_line, block.first_line + table.num_rows, dtype=np.int64)
    rows_read = table.num_rows + len(bad_lines)
    if blanked:  # already rejected as invalid_utf8: drop their (empty) rows
        keep = ~np.isin(lines, np.fromiter(blanked, np.int64))
        table, lines = table.filter(pa.array(keep)), lines[keep]
    cols = {name: table.column(name).combine_chunks() for name in schema.used_columns}
    return cols, lines, rejects, rows_read


def _blank_invalid_utf8(data: bytes, first_line: int, rejects: list, blanked: set[int], delimiter: str, n_columns: int) -> bytes:
    """Replace each non-UTF-8 line of the wrong field count by an empty line (so line numbers hold) and
    reject it; non-UTF-8 lines of the right shape are kept (their field is named by the invalid_utf8 check)."""
    out = []
    sep = delimiter.encode()
    for i, raw in enumerate(data.split(b"\n")):
        try:
            raw.decode("utf-8")
            out.append(raw)
        except UnicodeDecodeError:
            if raw.rstrip(b"\r").count(sep) + 1 == n_columns and b'"' not in raw:
                out.append(raw)
                continue
            line = first_line + i
            blanked.add(line)
            rejects.append((line, "invalid_utf8", "", raw[:4096].decode("utf-8", "replace")))
            out.append(b"")
    return b"\n".join(out)


def _read_jsonl(data: bytes, block: _Block, schema: Schema) -> tuple[dict[str, Any], np.ndarray, list, int]:
    import pyarrow as pa

    rejects: list[tuple[int, str, str, str]] = []
    names = schema.used_columns
    values: dict[str, list[bytes]] = {n: [] for n in names}
    lines: list[int] = []
    rows_read = 0
    for i, raw in enumerate(data.splitlines()):
        line = block.first_line + i
        if not raw.strip():
            rows_read += 1
            rejects.append((line, "bad_json", "", ""))
            continue
        rows_read += 1
        try:
            obj = json.loads(raw)
        except ValueError as e:
            rejects.append((line, "bad_json", str(e)[:60], raw.decode("utf-8", "replace")))
            continue
        if not isinstance(obj, dict):
            rejects.append((line, "bad_json", "not an object", raw.decode("utf-8", "replace")))
            continue
        row: list[bytes] = []
        for n in names:
            v = obj.get(n)
            if v is None:
                row.append(b"")
            elif isinstance(v, bool):
                row.append(b"1" if v else b"0")
            elif isinstance(v, float) and v.is_integer():
                row.append(str(int(v)).encode())
            else:
                try:  # JSON may escape a lone surrogate ("\ud800"): no UTF-8 form, so the row is refused
                    row.append(str(v).encode())
                except UnicodeEncodeError:
                    rejects.append((line, "invalid_utf8", n, raw.decode("utf-8", "replace")))
                    break
        else:
            for n, b in zip(names, row):
                values[n].append(b)
            lines.append(line)
    cols = {n: pa.array(v, pa.binary()) for n, v in values.items()}
    return cols, np.asarray(lines, np.int64), rejects, rows_read


def _parse_floats(col: Any) -> tuple[np.ndarray, np.ndarray]:
    """float64 values (NaN where empty) and a mask of values that are present but not numbers."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        s = col.cast(pa.string())
        s = pc.if_else(pc.equal(s, ""), pa.scalar(None, pa.string()), s)
        vals = s.cast(pa.float64()).to_numpy(zero_copy_only=False)
        bad = np.isinf(vals) | (np.isnan(vals) & s.is_valid().to_numpy(zero_copy_only=False))
        return np.where(bad, np.nan, vals), bad
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        out = np.full(len(col), np.nan)
        bad = np.zeros(len(col), bool)
        for i, b in enumerate(col.to_pylist()):
            if not b:
                continue
            try:
                v = float(b)
                if np.isfinite(v):
                    out[i] = v
                else:
                    bad[i] = True
            except ValueError:
                bad[i] = True
        return out, bad


_TIME_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d")


def _parse_times(col: Any) -> tuple[np.ndarray, np.ndarray]:
    """int64 times (integers as given, date-times as epoch seconds) and a mask of bad values."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        s = col.cast(pa.string())
    except pa.ArrowInvalid:
        return np.zeros(len(col), np.int64), np.ones(len(col), bool)
    try:
        return s.cast(pa.int64()).to_numpy(zero_copy_only=False), np.zeros(len(col), bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    # Fractional seconds ("09:30:00.123", which schema inference takes for a date-time) floor to the second.
    s = pc.replace_substring_regex(s, pattern=r"(:\d\d)\.\d+$", replacement=r"\1")
    out = pa.nulls(len(s), pa.timestamp("s"))
    for fmt in _TIME_FORMATS:
        out = pc.coalesce(out, pc.strptime(s, format=fmt, unit="s", error_is_null=True))
    bad = out.is_null().to_numpy(zero_copy_only=False)
    values = out.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
    return values, bad


def _bad_utf8(col: Any) -> np.ndarray | None:
    import pyarrow as pa

    try:
        col.cast(pa.string())
        return None
    except pa.ArrowInvalid:
        bad = np.zeros(len(col), bool)
        for i, b in enumerate(col.to_pylist()):
            try:
                b.decode("utf-8")
            except UnicodeDecodeError:
                bad[i] = True
        return bad


def _row_text(cols: dict[str, Any], i: int, schema: Schema, limit: int = 4096) -> str:
    """The row as the rejects file shows it (at most `limit` bytes per field, so a giant field stays small)."""
    def show(b: bytes) -> str:
        return b[:limit].decode("utf-8", "replace") + ("..." if len(b) > limit else "")

    return schema.delimiter.join(show(cols[n][i].as_py()) for n in schema.used_columns)


def _long_line_result(block: _Block) -> _BlockResult:
    """The one reject a too-long line makes (its head is kept for the rejects file, the rest was skipped)."""
    head = block.data or b""
    if not head and not block.file.endswith(".gz"):
        with open(block.file, "rb") as f:
            f.seek(block.start)
            head = f.read(_HEAD)
    text = head.split(b"\n", 1)[0].decode("utf-8", "replace") + "..."
    reject = (block.first_line, "line_too_long", f"{block.end - block.start} bytes", text)
    return _BlockResult(block.index, block.file, 1, 0, [reject], None, None, None, 0.0, None)


def _process_block(block: _Block, schema_dict: dict[str, Any], staging: str, final_dir: str,
                   boundaries: dict[str, list[float]] | None, meta: dict[str, Any], sample_rows: int, seed: int,
                   max_field_bytes: int = 64 << 10) -> _BlockResult:
    """Parse, validate, hash and transform one block; stage it or write its final shard."""
    schema = Schema.from_dict(schema_dict)
    cols, lines, rejects, rows_read = _read_block_columns(block, schema)
    n = len(lines)
    bad = np.zeros(n, bool)

    def reject(mask: np.ndarray, reason: str, fieldname: str) -> None:
        new = mask & ~bad
        for i in np.flatnonzero(new):
            rejects.append((int(lines[i]), reason, fieldname, _row_text(cols, int(i), schema)))
        bad[:] |= mask

    if n:
        import pyarrow.compute as pc

        empty = np.ones(n, bool)
        for name in schema.used_columns:
            length = pc.binary_length(cols[name]).to_numpy(zero_copy_only=False)
            empty &= length == 0
            if length.max() > max_field_bytes:
                reject(length > max_field_bytes, "field_too_long", name)
        reject(empty, "empty_row", "")
    label, lbad = _parse_floats(cols[schema.label])
    reject(lbad | ~np.isin(label, (0.0, 1.0)), "bad_label", schema.label)
    numeric = np.zeros((n, len(schema.numeric)), np.float32)
    exact: dict[str, np.ndarray] = {}  # raw values of `mode: both` numerics, hashed below
    for j, f in enumerate(schema.numeric):
        v, vbad = _parse_floats(cols[f.name])
        reject(vbad, "bad_number", f.name)
        with np.errstate(over="ignore"):
            numeric[:, j] = log_transform(v) if f.transform == "log" else v
        # past float32's range (an identity value over 3.4e38): the shard would hold FLT_MAX, the served graph inf
        reject(np.isinf(numeric[:, j]), "bad_number", f.name)
        if f.mode == "both":
            exact[f.name] = v
    weight = None
    if schema.weight:
        w, wbad = _parse_floats(cols[schema.weight])
        reject(wbad | np.isnan(w) | (w < 0) | (w > np.finfo(np.float32).max), "bad_weight", schema.weight)  # inf as float32
        with np.errstate(over="ignore"):  # such rows are rejected just above
            weight = w.astype(np.float32)
    times = None
    if schema.time:
        times, tbad = _parse_times(cols[schema.time])
        reject(tbad, "bad_time", schema.time)
    extras = None
    if schema.extras:
        extras = np.zeros((n, len(schema.extras)), np.float32)
        for j, name in enumerate(schema.extras):
            v, vbad = _parse_floats(cols[name])
            reject(vbad | (np.abs(v) > np.finfo(np.float32).max), "bad_number", name)
            with np.errstate(over="ignore"):
                extras[:, j] = v
    for f in schema.categorical:
        m = _bad_utf8(cols[f.name])
        if m is not None:
            reject(m, "invalid_utf8", f.name)

    good = ~bad
    keep = np.flatnonzero(good)
    rows = len(keep)
    ids = np.zeros((rows, len(schema.id_names)), np.int32)
    for j, f in enumerate(schema.categorical):
        col = cols[f.name] if rows == n else cols[f.name].take(keep)
        ids[:, j] = hash_values(col.to_numpy(zero_copy_only=False), f.hash_buckets, field_hash_key(schema.hash_seed, f.name))
    offset = len(schema.categorical) + len(schema.numeric)
    for j, f in enumerate(schema.both_numeric):
        name = f.name + VALUE_ID_SUFFIX
        ids[:, offset + j] = hash_values(value_keys(exact[f.name][keep]), f.hash_buckets, field_hash_key(schema.hash_seed, name))
    data = shardio.ShardData(
        label=label[keep].astype(np.float32), ids=ids, numeric=numeric[keep],
        weight=None if weight is None else weight[keep], time=None if times is None else times[keep],
        extras=None if extras is None else extras[keep],
    )
    time_range = (int(data.time.min()), int(data.time.max())) if data.time is not None and rows else None
    name = f"part-{block.index:05d}"
    positives = float(data.label.sum())
    if boundaries is not None:
        entry = _finalize(data, schema, boundaries, Path(final_dir) / (name + shardio.SHARD_SUFFIX), meta)
        return _BlockResult(block.index, block.file, rows_read, rows, rejects, None, entry, None, 0.0, time_range, positives)
    stage = Path(staging) / name
    stage.mkdir(parents=True, exist_ok=True)
    for key, arr in data.blocks():
        _save_array(stage / f"{key}.npy", arr)
    rng = np.random.default_rng([seed, block.index])
    k = min(rows, sample_rows)
    pick = rng.choice(rows, size=k, replace=False) if k < rows else np.arange(rows)
    return _BlockResult(block.index, block.file, rows_read, rows, rejects, str(stage), None,
                        data.numeric[pick], rows / max(k, 1), time_range, positives)


def _save_array(path: Path, arr: np.ndarray) -> None:
    """np.save, with numpy's errno-less short write ("N requested and M written") reported as the full disk it is."""
    try:
        np.save(path, arr)
    except OSError as e:
        if e.errno is None and "requested and" in str(e):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise


def _finalize(data: shardio.ShardData, schema: Schema, boundaries: dict[str, list[float]], path: Path,
              meta: dict[str, Any]) -> dict[str, Any]:
    """Fill the discretized numeric ids, zero the missing numerics, write the shard atomically."""
    offset = len(schema.categorical)
    ids = np.array(data.ids, copy=True)
    numeric = np.array(data.numeric, copy=True)
    for j, f in enumerate(schema.numeric):
        ids[:, offset + j] = discretize(numeric[:, j], np.asarray(boundaries[f.name], np.float32))
    np.nan_to_num(numeric, copy=False, nan=0.0)
    out = shardio.ShardData(data.label, ids, numeric, data.weight, data.time, data.extras)
    return shardio.write_shard(path, out, meta)


def _finalize_staged(stage: str, schema_dict: dict[str, Any], boundaries: dict[str, list[float]], path: str,
                     meta: dict[str, Any]) -> dict[str, Any]:
    schema = Schema.from_dict(schema_dict)
    arrays = {p.stem: np.load(p, mmap_mode="r") for p in Path(stage).glob("*.npy")}
    data = shardio.ShardData(**arrays)
    entry = _finalize(data, schema, boundaries, Path(path), meta)
    shutil.rmtree(stage, ignore_errors=True)
    return entry


def _worker_init(parent_pid: int) -> None:
    from ctrflow.processes import die_with_parent

    die_with_parent(parent_pid)
    from ctrflow._tf import quiet_import

    tf = quiet_import()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


class _InlineExecutor(Executor):
    """Runs tasks in this process: no start-up cost, for small inputs, tests and workers=1."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # delivered through the future like a pool would
            fut.set_exception(e)
        return fut


# ------------------------------------------------------------------------------------------------
# The driver.
# ------------------------------------------------------------------------------------------------
def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _write_rejects(path: Path, rejects: list[tuple[str, int, str, str, str]]) -> None:
    with atomic_writer(path, "w") as f:
        f.write("file\tline\treason\tfield\trow\n")
        for file, line, reason, fieldname, text in sorted(rejects, key=lambda r: (r[0], r[1])):
            f.write(f"{file}\t{line}\t{reason}\t{_escape(fieldname)}\t{_escape(text)}\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_partials(out: Path) -> list[str]:
    """Remove what dead conversions into `out` left: `out.partial-<pid>` / `out.old-<pid>` folders and
    temp files of the rejects file, whose pid no longer runs. A live conversion's are kept. An
    `out.old-<pid>` while `out` is missing is the last good output of an overwrite killed between its
    two renames: it is put back as `out`, not removed."""
    removed = []
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return removed
    prefixes = (f"{out.name}.partial-", f"{out.name}.old-", f".{out.name}.rejects.tsv.tmp-")
    for p in sorted(parent.iterdir(), key=lambda p: not p.name.startswith(prefixes[1])):  # .old- first
        prefix = next((x for x in prefixes if p.name.startswith(x)), None)
        pid = p.name[len(prefix):] if prefix else ""
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        if prefix == prefixes[1] and p.is_dir() and not out.exists():
            replace_atomically(p, out)
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(str(p))
    return removed


def _is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def _with_header_columns(schema: Schema, paths: Sequence[Path], max_line_bytes: int) -> Schema:
    """A schema with `header: true` and no `columns` takes its columns from the first text input's header
    (every other input's header is then checked against them); a clear SchemaError when it cannot."""
    if schema.columns is not None or not schema.header:
        return schema
    text = [p for p in paths if _input_kind(p) == "text"]
    if not text:
        return schema
    try:
        with _open_bytes(text[0]) as f:
            first = f.readline(max_line_bytes + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{text[0]}: cannot read its header ({getattr(e, 'strerror', None) or e}).") from None
    if not first.strip():
        raise SchemaError(f"schema '{schema.name}' has header: true and no 'columns', and {text[0]} has no header line: "
                          "list the columns in the schema.")
    try:
        header = next(csv.reader([first.removeprefix(_BOM).decode("utf-8").rstrip("\r\n")], delimiter=schema.delimiter))
    except (UnicodeDecodeError, csv.Error) as e:
        raise SchemaError(f"{text[0]} line 1: not a text header ({e}); is this a CSV file?") from None
    missing = [c for c in schema.used_columns if c not in header]
    if missing:
        raise SchemaError(f"schema '{schema.name}' has header: true and no 'columns', and the header of {text[0]} "
                          f"lacks its columns {missing} (the header is {header[:12]}{'...' if len(header) > 12 else ''}).")
    try:
        return schema.with_overrides(columns=tuple(header))
    except SchemaError as e:
        raise SchemaError(f"{text[0]} line 1: {e}") from None


def convert(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    schema: Schema | str | None = None,
    like: str | os.PathLike | None = None,
    options: ConvertOptions = ConvertOptions(),
    on_progress: ProgressFn | None = None,
) -> ConvertSummary:
    """Convert raw logs into a shard folder.

    Args:
        inputs: one or more files (CSV/TSV, optionally .gz; .parquet; .jsonl).
        out: the shard folder to create.
        schema: a Schema, preset name or schema file. Exactly one of `schema` / `like`.
        like: an earlier shard folder whose schema, hashing and discretizer boundaries are reused, so
            later data (a test split, tomorrow's logs) gets exactly the same ids.
        on_progress: called as on_progress(rows_done, rows_total_estimate) after each block.
    """
    t0 = time.perf_counter()
    paths = [Path(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    if not paths:
        raise InputError("convert needs at least one input file.")
    for p in paths:
        if not p.is_file():
            raise InputError(f"{p}: no such input file.")
    if (schema is None) == (like is None):
        raise ConfigError("convert needs exactly one of 'schema' (a preset, file or Schema) or 'like' (an earlier shard folder).")
    boundaries: dict[str, list[float]] | None = None
    if like is not None:
        man = shardio.load_manifest(like)
        schema_obj = man.schema()
        boundaries = {k: list(v) for k, v in man.transforms().boundaries.items()}
    else:
        schema_obj = load_schema(schema)  # type: ignore[arg-type]
    schema_obj = _with_header_columns(schema_obj, paths, options.max_line_bytes)
    out = Path(out)
    remove_stale_partials(out)  # first: it may put back the output an overwrite killed mid-swap left aside
    if out.exists():
        if not options.overwrite:
            raise ConfigError(f"{out} already exists: choose another folder or pass overwrite (--overwrite).")
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    staging = partial / ".staging"
    input_bytes = sum(p.stat().st_size for p in paths)
    meta = {"schema": schema_obj.to_dict(), "schema_fingerprint": schema_obj.fingerprint()}
    if boundaries is not None:
        meta["transforms"] = Transforms({k: tuple(v) for k, v in boundaries.items()}).to_dict()

    # Worker processes pay a TensorFlow import each (seconds): worth it only for inputs of many blocks.
    workers = options.workers or (1 if input_bytes < 4 * options.block_bytes else (os.cpu_count() or 1))
    executor: Executor
    if workers == 1:
        executor = _InlineExecutor()
    else:
        import multiprocessing

        executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                                       initargs=(os.getpid(),))
    results: list[_BlockResult] = []
    rejects_all: list[tuple[str, int, str, str, str]] = []
    reasons: Counter[str] = Counter()
    rows_done = 0
    sample_rows = max(1000, options.sample_capacity // 16)
    schema_dict = schema_obj.to_dict()
    try:
        try:
            pending: list[Future] = []
            blocks = _plan(paths, schema_obj, options.block_bytes, options.max_line_bytes)
            exhausted = False
            while pending or not exhausted:
                while not exhausted and len(pending) < 2 * workers:
                    block = next(blocks, None)
                    if block is None:
                        exhausted = True
                        break
                    if block.too_long:  # nothing to parse: its reject is made here, in order
                        done: Future = Future()
                        done.set_result(_long_line_result(block))
                        pending.append(done)
                        continue
                    pending.append(executor.submit(_process_block, block, schema_dict, str(staging), str(partial),
                                                   boundaries, meta, sample_rows, options.seed, options.max_field_bytes))
                if not pending:
                    break
                res: _BlockResult = pending.pop(0).result()
                results.append(res)
                rows_done += res.rows
                for line, reason, fieldname, text in res.rejects:
                    reasons[reason] += 1
                    rejects_all.append((res.file, line, reason, fieldname, text))
                if options.max_errors is not None and len(rejects_all) > options.max_errors:
                    for fut in pending:
                        fut.cancel()
                    raise TooManyRejectsError(
                        f"more than {options.max_errors} malformed rows (max_errors): {dict(reasons)}; "
                        f"see {out}.rejects.tsv for each row, its file and line."
                    )
                if on_progress:
                    frac = (sum(1 for _ in results) / max(1, len(results) + len(pending)))
                    est = None if not exhausted else int(rows_done / max(frac, 1e-9))
                    on_progress(rows_done, est)
            if rows_done == 0:
                raise InputError(f"no valid rows in {', '.join(map(str, paths))} ({dict(reasons) or 'no rows at all'}).")

            # Fit the discretizer on the weighted sample of every block, then finalize staged blocks.
            if boundaries is None:
                boundaries = {}
                for j, f in enumerate(schema_obj.numeric):
                    sketch = QuantileSketch(options.sample_capacity, seed=options.seed + j)
                    for r in results:
                        if r.sample is not None and len(r.sample):
                            sketch.add(r.sample[:, j], np.full(len(r.sample), r.sample_weight))
                    boundaries[f.name] = [float(x) for x in sketch.boundaries(f.bins)]
                meta["transforms"] = Transforms({k: tuple(v) for k, v in boundaries.items()}).to_dict()
                futs = [executor.submit(_finalize_staged, r.staged, schema_dict, boundaries,
                                        str(partial / f"part-{r.index:05d}{shardio.SHARD_SUFFIX}"), meta)
                        for r in results if r.staged and r.rows]
                entries = [f.result() for f in futs]
            else:
                entries = [r.shard for r in results if r.shard and r.rows]
            for r in results:  # blocks with no valid rows leave no shard
                if r.rows == 0 and r.shard:
                    (partial / r.shard["file"]).unlink(missing_ok=True)
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
    except BaseException as e:
        # Cleanup first frees space and never needs any; the rejects file (the diagnosis of bad input)
        # is written afterwards, only when the input is at fault, and given up on if even that fails.
        shutil.rmtree(partial, ignore_errors=True)
        if rejects_all and isinstance(e, InputError) and not _is_disk_full(e):
            try:
                _write_rejects(out.with_name(out.name + ".rejects.tsv"), rejects_all)
            except OSError:
                pass
        raise

    try:  # a failure from here on (a full disk) also leaves nothing behind
        shutil.rmtree(staging, ignore_errors=True)
        transforms = Transforms({k: tuple(v) for k, v in boundaries.items()})
        rejects_path = None
        if rejects_all:
            _write_rejects(partial / "rejects.tsv", rejects_all)
            rejects_path = str(out / "rejects.tsv")
        times = [r.time_range for r in results if r.time_range]
        rows_read = sum(r.rows_read for r in results)
        manifest = {
            "format": "ctrflow-shards",
            "version": shardio.FORMAT_VERSION,
            "schema": schema_dict,
            "schema_fingerprint": schema_obj.fingerprint(),
            "transforms": transforms.to_dict(),
            "feature_spec": transforms.feature_spec(schema_obj).to_dict(),
            "rows": rows_done,
            "positives": sum(r.positives for r in results),
            "rows_read": rows_read,
            "rows_rejected": len(rejects_all),
            "rejects": dict(reasons),
            "time_range": [min(t[0] for t in times), max(t[1] for t in times)] if times else None,
            "inputs": [str(p) for p in paths],
            "like": str(like) if like is not None else None,
            "created_unix": time.time(),
            "shards": entries,
        }
        atomic_write_json(partial / shardio.MANIFEST, manifest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():  # overwrite: swap the old folder out only now that the new one is complete
        trash = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, trash)
        replace_atomically(partial, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        replace_atomically(partial, out)
    seconds = time.perf_counter() - t0
    return ConvertSummary(
        out=str(out), rows=rows_done, rows_read=rows_read, rows_rejected=len(rejects_all), rejects=dict(reasons),
        rejects_path=rejects_path, shards=len(entries), bytes=sum(e["bytes"] for e in entries), input_bytes=input_bytes,
        seconds=seconds, rows_per_s=rows_done / max(seconds, 1e-9), inputs=[str(p) for p in paths],
    )
