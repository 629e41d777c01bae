"""The input pipeline: shards (memory-mapped) or a shard stream (stdin) → shuffled, ready batches.

A background thread cuts and shuffles batches ahead of the consumer (`prefetch_batches` deep), so a
training step never waits on I/O. Shuffling is two-level, as with any large on-disk data: the order of
shards changes every epoch, and rows are permuted within an in-memory buffer of `shuffle_buffer_rows`.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

import numpy as np

from ctrflow.data import shards as shardio
from ctrflow.data.batch import Batch, FeatureSpec
from ctrflow.data.transforms import Transforms
from ctrflow.errors import ConfigError, SchemaError, ShardCorruptError
from ctrflow.schema import Schema
from ctrflow.validation import Bool, Int, check_fields

__all__ = ["PipelineOptions", "BatchStream", "open_batches"]


@dataclass(frozen=True)
class PipelineOptions:
    """How batches are cut. Checked once, here."""

    batch_size: int = 4096  # rows per batch, >= 1
    epochs: int = 1  # passes over the data, >= 1 (a stream allows only 1)
    shuffle: bool = True  # shard order per epoch + rows within the buffer
    shuffle_buffer_rows: int = 262_144  # rows permuted together; larger mixes better, costs memory
    seed: int = 0  # same seed, same data → same batches
    prefetch_batches: int = 8  # batches kept ready by the background thread, >= 1
    drop_remainder: bool = False  # drop each epoch's last short batch
    shard_index: int = 0  # read shards i, i+n, i+2n, ... (one worker of n in a cluster)
    num_shards: int = 1
    check_crc: bool = False  # verify each shard's checksum when it is opened (costs one read)

    def __post_init__(self) -> None:
        check_fields(self, {
            "batch_size": Int(low=1), "epochs": Int(low=1), "shuffle": Bool(), "shuffle_buffer_rows": Int(low=1),
            "seed": Int(low=0), "prefetch_batches": Int(low=1), "drop_remainder": Bool(), "num_shards": Int(low=1),
            "shard_index": Int(low=0, high=max(self.num_shards - 1, 0) if isinstance(self.num_shards, int) else None),
            "check_crc": Bool(),
        })


_END = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _take(d: shardio.ShardData, idx: np.ndarray | slice) -> Batch:
    return Batch(
        ids=d.ids[idx], numeric=d.numeric[idx], label=d.label[idx],
        weight=None if d.weight is None else d.weight[idx],
        extras=None if d.extras is None else d.extras[idx],
        time=None if d.time is None else d.time[idx],
    )


def _concat(parts: list[shardio.ShardData]) -> shardio.ShardData:
    if len(parts) == 1:
        return parts[0]

    def cat(name: str) -> np.ndarray | None:
        arrays = [getattr(p, name) for p in parts]
        return None if arrays[0] is None else np.concatenate(arrays)

    return shardio.ShardData(label=cat("label"), ids=cat("ids"), numeric=cat("numeric"), weight=cat("weight"),
                             time=cat("time"), extras=cat("extras"))


def _slice(d: shardio.ShardData, start: int, end: int) -> shardio.ShardData:
    s = slice(start, end)
    return shardio.ShardData(label=d.label[s], ids=d.ids[s], numeric=d.numeric[s],
                             weight=None if d.weight is None else d.weight[s], time=None if d.time is None else d.time[s],
                             extras=None if d.extras is None else d.extras[s])


class BatchStream:
    """Iterable of `Batch`es fed by a background thread. Close it (or use `with`) to stop the thread.

    Attributes: `schema`, `transforms`, `spec` (FeatureSpec for the model), `rows` (rows per epoch,
    None for a stream), `batches_yielded`, `rows_yielded`.
    """

    def __init__(self, records: "_RecordSource", options: PipelineOptions) -> None:
        self.options = options
        self._src = records
        self.schema: Schema = records.schema
        self.transforms: Transforms = records.transforms
        self.spec: FeatureSpec = self.transforms.feature_spec(self.schema)
        self.rows: int | None = records.rows
        self.positives: float | None = records.positives  # label sum per epoch, when the manifest knows it
        self.batches_yielded = 0
        self.rows_yielded = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=options.prefetch_batches)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="ctrflow-pipeline", daemon=True)
        self._started = False

    # --- producer side (background thread) ---------------------------------------------------
    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for epoch in range(self.options.epochs):
                for batch in self._epoch(epoch):
                    if not self._put(batch):
                        return
            self._put(_END)
        except BaseException as e:  # delivered to the consumer, who re-raises it in its own thread
            self._put(_Failure(e))

    def _epoch(self, epoch: int) -> Iterator[Batch]:
        o = self.options
        rng = np.random.default_rng([o.seed, epoch])
        buffer: list[shardio.ShardData] = []
        buffered = 0
        target = o.shuffle_buffer_rows if o.shuffle else o.batch_size
        for shard in self._src.records(rng if o.shuffle else None):
            for start in range(0, shard.rows, target):
                piece = _slice(shard, start, min(shard.rows, start + target))
                buffer.append(piece)
                buffered += piece.rows
                if buffered >= target:
                    data = self._mix(buffer, rng)
                    n_full = (data.rows // o.batch_size) * o.batch_size
                    yield from self._cut(data, n_full)
                    buffer = [_slice(data, n_full, data.rows)] if n_full < data.rows else []
                    buffered = data.rows - n_full
        if buffered:
            data = self._mix(buffer, rng)
            n = data.rows if not o.drop_remainder else (data.rows // o.batch_size) * o.batch_size
            yield from self._cut(data, n)

    def _mix(self, buffer: list[shardio.ShardData], rng: np.random.Generator) -> shardio.ShardData:
        """The buffered rows as one block, permuted once when shuffling (batches are then views)."""
        data = _concat(buffer)
        if not self.options.shuffle:
            return data
        perm = rng.permutation(data.rows)
        b = _take(data, perm)
        return shardio.ShardData(label=b.label, ids=b.ids, numeric=b.numeric, weight=b.weight, extras=b.extras, time=b.time)

    def _cut(self, data: shardio.ShardData, n: int) -> Iterator[Batch]:
        b = self.options.batch_size
        for i in range(0, n, b):
            yield _take(data, slice(i, min(n, i + b)))

    # --- consumer side -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        if not self._started:
            self._started = True
            self._thread.start()
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            self.batches_yielded += 1
            self.rows_yielded += item.rows
            yield item

    def close(self) -> None:
        self._stop.set()
        if self._started:
            self._thread.join(timeout=5)
        self._src.close()

    def __enter__(self) -> "BatchStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _RecordSource:
    """Shard records from a folder (random access, reshufflable) or from a binary stream (once)."""

    schema: Schema
    transforms: Transforms
    rows: int | None
    positives: float | None = None

    def records(self, rng: np.random.Generator | None) -> Iterator[shardio.ShardData]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _FolderSource(_RecordSource):
    def __init__(self, roots: Sequence[Path], options: PipelineOptions) -> None:
        mans = [shardio.load_manifest(r) for r in roots]
        first = mans[0]
        for m in mans[1:]:
            if m.data["schema_fingerprint"] != first.data["schema_fingerprint"] or m.data["transforms"] != first.data["transforms"]:
                raise SchemaError(
                    f"{m.root} was converted with another schema or other transforms than {first.root}: "
                    f"convert it with `--like {first.root}` to read them together."
                )
        self.schema = first.schema()
        self.transforms = first.transforms()
        entries = [(m.root / s["file"], s["rows"]) for m in mans for s in m.shards]
        entries = entries[options.shard_index :: options.num_shards]
        if not entries:
            raise ConfigError(
                f"shard_index {options.shard_index} of {options.num_shards} gets no shard: "
                f"the data has only {sum(len(m.shards) for m in mans)} shard file(s)."
            )
        self._entries = entries
        self._check_crc = options.check_crc
        self.rows = sum(r for _, r in entries)
        whole = options.num_shards == 1 and all("positives" in m.data for m in mans)
        self.positives = sum(m.data["positives"] for m in mans) if whole else None

    def records(self, rng: np.random.Generator | None) -> Iterator[shardio.ShardData]:
        order = rng.permutation(len(self._entries)) if rng is not None else range(len(self._entries))
        for i in order:
            path, rows = self._entries[i]
            shard = shardio.read_shard(path, check_crc=self._check_crc)
            if shard.rows != rows:
                raise ShardCorruptError(f"{path}: {shard.rows} rows, manifest says {rows}; run `ctrflow verify`.")
            yield shard


class _StreamSource(_RecordSource):
    def __init__(self, f: IO[bytes], name: str) -> None:
        self._it = shardio.iter_stream(f, name=name)
        first = next(self._it, None)
        if first is None:
            raise ShardCorruptError(f"{name}: empty stream (no shard records).")
        meta = first.meta or {}
        if "schema" not in meta or "transforms" not in meta:
            raise ShardCorruptError(f"{name}: first record carries no schema/transforms (not written by ctrflow convert).")
        self.schema = Schema.from_dict(meta["schema"], source=name)
        self.transforms = Transforms.from_dict(meta["transforms"])
        self._fingerprint = meta.get("schema_fingerprint")
        self._transforms = meta["transforms"]
        self._first: shardio.ShardData | None = first
        self._name = name
        self.rows = None

    def records(self, rng: np.random.Generator | None) -> Iterator[shardio.ShardData]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        for i, rec in enumerate(self._it, start=1):
            meta = rec.meta or {}
            if meta.get("schema_fingerprint") != self._fingerprint:
                raise SchemaError(f"{self._name} record {i}: another schema than the stream's first record.")
            if meta.get("transforms") != self._transforms:  # same schema, other bins: its numeric ids mean other ranges
                raise SchemaError(f"{self._name} record {i}: other discretizer boundaries than the stream's first record "
                                  "(another conversion): convert later data with `--like` the first to stream them together.")
            yield rec


def open_batches(
    source: str | os.PathLike | Sequence[str | os.PathLike] | IO[bytes],
    options: PipelineOptions = PipelineOptions(),
) -> BatchStream:
    """Batches from shard folder(s), "-" (standard input) or an open binary stream.

    Example:
        with open_batches("shards/train", PipelineOptions(batch_size=4096, epochs=2)) as batches:
            for b in batches:
                ...  # b.ids int32 [B, F], b.numeric float32 [B, N], b.label float32 [B]
    """
    if hasattr(source, "read"):
        src: _RecordSource = _StreamSource(source, getattr(source, "name", "<stream>"))  # type: ignore[arg-type]
    elif isinstance(source, (str, os.PathLike)) and str(source) == "-":
        src = _StreamSource(sys.stdin.buffer, "<stdin>")
    else:
        roots = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(s) for s in source]  # type: ignore[union-attr]
        src = _FolderSource(roots, options)
    if isinstance(src, _StreamSource) and options.epochs != 1:
        raise ConfigError(f"A stream can be read once: epochs must be 1 for stream input. Got {options.epochs} instead.")
    return BatchStream(src, options)
