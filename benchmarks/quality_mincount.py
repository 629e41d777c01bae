"""Prototype of a min-count rule for rare ids (FuxiCTR's `min_categr_count`), done on the shards so any
model can be measured with it: in every id field, the buckets seen fewer than K times in the training
split all map to ONE shared row of that field (an empty bucket when there is one, else the rarest), so
the rare values learn one "rarely seen" weight from all of them together, and values unseen in training
(which hash to empty or rare buckets) read that row too. Valid and test use the training split's counts.

Used by bench_quality.py --min-count K (a measurement, not yet part of ctrflow itself).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np


def remap_tables(train: Path, k: int) -> tuple[list[np.ndarray], dict]:
    """Per id column: a remap array over its buckets, from the counts in the `train` shard folder."""
    from ctrflow.data import shards as shardio

    man = shardio.load_manifest(train)
    spec = man.transforms().feature_spec(man.schema())
    counts = [np.zeros(b, np.int64) for b in spec.id_buckets]
    for p in man.shard_paths():
        ids = shardio.read_shard(p).ids
        for j, c in enumerate(counts):
            c += np.bincount(ids[:, j], minlength=len(c))[: len(c)]
    maps, stats = [], {}
    for name, c in zip(spec.id_names, counts):
        m = np.arange(len(c), dtype=np.int32)
        rare = c < k
        if rare.any():
            oov = int(np.flatnonzero(rare)[np.argmin(c[rare])])
            m[rare] = oov
        maps.append(m)
        stats[name] = {"buckets": len(c), "seen": int((c > 0).sum()), "rare_seen": int(((c > 0) & rare).sum()),
                       "rare_rows": int(c[rare].sum())}
    return maps, stats


def remap_folder(src: Path, dst: Path, maps: list[np.ndarray]) -> None:
    from ctrflow.atomic import atomic_write_json
    from ctrflow.data import shards as shardio

    man = shardio.load_manifest(src)
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    meta = {k: man.data[k] for k in ("schema", "schema_fingerprint", "transforms")}
    entries = []
    for p in man.shard_paths():
        s = shardio.read_shard(p)
        ids = np.stack([m[s.ids[:, j]] for j, m in enumerate(maps)], axis=1).astype(np.int32)
        data = shardio.ShardData(s.label, ids, s.numeric, s.weight, s.time, s.extras)
        entries.append(shardio.write_shard(dst / p.name, data, meta))
    atomic_write_json(dst / shardio.MANIFEST, {**man.data, "shards": entries, "created_unix": time.time()})


def apply(ds, k: int, root: Path):
    """A copy of dataset `ds` whose shard folders use the min-count-`k` remap (CSV peers unchanged)."""
    import copy

    maps, stats = remap_tables(ds.shards["train"], k)
    out = copy.copy(ds)
    out.shards = {}
    for split, src in ds.shards.items():
        out.shards[split] = root / f"mincount{k}" / split
        remap_folder(src, out.shards[split], maps)
    (root / f"mincount{k}" / "stats.json").write_text(json.dumps(stats, indent=1))
    out.note = (ds.note + "; " if ds.note else "") + f"ids seen < {k} times in train -> one row per field"
    return out
