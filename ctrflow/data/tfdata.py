"""The shard format as a `tf.data.Dataset`: each worker of a cluster reads whole shard files straight in
TensorFlow (no Python generator in the loop), for distributed training.

Why not `tf.data.Dataset.from_generator` over `open_batches`: its generator runs in the coordinator
(every batch of every worker crosses that one process), and TensorFlow 2.21 deadlocks when a function
is released while a worker waits on the generator (BENCHMARKS.md). Here a file is read once with
`tf.io.read_file`, its column blocks decoded with `tf.io.decode_raw` at the offsets the shard header
gives (`shards.read_header`), its rows permuted, then mixed with other files' rows in a shuffle buffer.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ctrflow.data import shards as shardio
from ctrflow.data.batch import FeatureSpec

__all__ = ["shard_table", "worker_dataset", "CHUNK_ROWS"]

CHUNK_ROWS = 32  # rows moved together by a worker's shuffle buffer



def shard_table(data: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, np.ndarray]:
    """Where each shard file's columns are: {"path", "rows", "label", "ids", "numeric", "weight"} arrays,
    one entry per shard file (absolute byte offsets of each column block; weight -1 when absent)."""
    roots = [Path(data)] if isinstance(data, (str, os.PathLike)) else [Path(d) for d in data]
    out: dict[str, list[Any]] = {k: [] for k in ("path", "rows", "label", "ids", "numeric", "weight")}
    for root in roots:
        manifest = shardio.load_manifest(root)
        for entry in manifest.shards:
            path = (manifest.root / entry["file"]).resolve()
            header, start = shardio.read_header(path)
            blocks = {b["name"]: start + b["offset"] for b in header["blocks"]}
            out["path"].append(str(path))
            out["rows"].append(int(header["rows"]))
            for name in ("label", "ids", "numeric"):
                out[name].append(blocks[name])
            out["weight"].append(blocks.get("weight", -1))
    return {k: np.asarray(v, dtype=object if k == "path" else np.int64) for k, v in out.items()}


def worker_dataset(table: dict[str, np.ndarray], spec: FeatureSpec, *, batch_size: int, num_workers: int,
                   seed: int, shuffle_buffer_rows: int = 262_144, worker_index: Any = None,
                   negative_sampling_rate: float = 1.0):
    """An endless, shuffled `tf.data.Dataset` of (ids, numeric, label, weight) batches from one worker's
    shard files (every `num_workers`-th, starting at `worker_index`; None: the current worker's index
    inside a coordinator's per-worker dataset function).

    Shuffling, as the single-process pipeline's: the file order changes every pass, each file's rows are
    permuted as a whole, then cut into chunks of `CHUNK_ROWS` rows that are shuffled in a buffer of
    `shuffle_buffer_rows` rows within the pass, so a batch mixes rows of several files. Chunks keep
    tf.data's element count (and cost) 32x below one element per row. Batches run on across passes
    (every batch is full). `negative_sampling_rate` < 1 keeps each negative row with that probability
    (every positive), seeded, before the rows are mixed.
    """
    import tensorflow as tf

    n_ids, n_num = len(spec.id_names), len(spec.numeric_names)
    if worker_index is None:
        worker_index = tf.distribute.coordinator.experimental_get_current_worker_index()
    files = tf.data.Dataset.from_tensor_slices(
        {k: tf.constant(v.tolist(), dtype=tf.string if k == "path" else tf.int64) for k, v in table.items()})
    files = files.shard(num_workers, tf.cast(worker_index, tf.int64))
    mine = -(-len(table["rows"]) // num_workers)
    files = files.shuffle(max(mine, 1), seed=seed, reshuffle_each_iteration=True)

    def read(f):
        raw = tf.io.read_file(f["path"])
        rows = f["rows"]

        def column(offset, width, dtype):
            return tf.reshape(tf.io.decode_raw(tf.strings.substr(raw, offset, rows * width * 4), dtype), [rows, width])

        label = column(f["label"], 1, tf.float32)[:, 0]
        ids = column(f["ids"], n_ids, tf.int32)
        numeric = column(f["numeric"], n_num, tf.float32) if n_num else tf.zeros([rows, 0], tf.float32)
        weight = tf.cond(f["weight"] >= 0, lambda: column(tf.maximum(f["weight"], 0), 1, tf.float32)[:, 0],
                         lambda: tf.ones([rows], tf.float32))
        order = tf.random.shuffle(tf.range(rows, dtype=tf.int64), seed=seed)
        if negative_sampling_rate < 1.0:
            keep = (label > 0) | (tf.random.uniform([rows], seed=seed + 1) < negative_sampling_rate)
            order = tf.boolean_mask(order, tf.gather(keep, order))
        return tuple(tf.gather(x, order) for x in (ids, numeric, label, weight))

    chunks = files.map(read, num_parallel_calls=2, deterministic=False).rebatch(CHUNK_ROWS)
    # Shuffle within one pass, then repeat: a buffer spanning passes would serve some rows twice and
    # others not at all in an "epoch" (sampling with replacement), which measurably hurt the model.
    chunks = chunks.shuffle(max(1, shuffle_buffer_rows // CHUNK_ROWS), seed=seed, reshuffle_each_iteration=True).repeat()
    return chunks.rebatch(batch_size, drop_remainder=True).prefetch(2)
