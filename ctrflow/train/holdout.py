"""Hold out the latest rows of a shard folder for validation: what `train` does when no `--valid` is given,
and how continuous training cuts each slice into train rows and gate rows.

The held-out rows are the latest `fraction` by the schema's time column (ties broken by position, so
the cut is exact and repeatable); a schema without a time column gets a seeded random share instead,
and the result says which (`by`). Both parts are written as complete shard folders (shards, then the
manifest, then a rename), one train and one valid shard per source shard, so memory stays at one
shard plus 9 bytes a row for the order. A split is reused when its `split.json` is there.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ctrflow.atomic import atomic_write_json, replace_atomically
from ctrflow.data import shards as shardio

__all__ = ["HoldOut", "hold_out"]

SPLIT_FILE = "split.json"


@dataclass(frozen=True)
class HoldOut:
    train: str  # shard folder of the training rows
    valid: str  # shard folder of the held-out rows
    by: str  # "time" (the latest rows by the schema's time column) or "random" (no time column: seeded)
    time_column: str | None
    fraction: float
    rows_train: int
    rows_valid: int

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        what = (f"the latest {self.fraction:.0%} of rows by time column {self.time_column!r}" if self.by == "time"
                else f"a seeded random {self.fraction:.0%} of rows (the schema has no time column)")
        return f"validation on {what}: {self.rows_valid:,} rows held out, {self.rows_train:,} trained on"


def _take(d: shardio.ShardData, idx: np.ndarray) -> shardio.ShardData:
    pick = lambda a: None if a is None else a[idx]  # noqa: E731
    return shardio.ShardData(label=d.label[idx], ids=d.ids[idx], numeric=d.numeric[idx], weight=pick(d.weight),
                             time=pick(d.time), extras=pick(d.extras))


def hold_out(src: str | os.PathLike, work: str | os.PathLike, fraction: float, *, seed: int = 0) -> HoldOut:
    """Split the shard folder `src` into `work/train` and `work/valid` (its latest `fraction`)."""
    work = Path(work)
    info_path = work / SPLIT_FILE
    if info_path.exists():
        d = json.loads(info_path.read_text())
        if d.get("source") == str(Path(src).resolve()) and d.get("fraction") == fraction and d.get("seed") == seed:
            return HoldOut(**d["holdout"])
    shutil.rmtree(work, ignore_errors=True)
    man = shardio.load_manifest(src)
    shards = [shardio.read_shard(p) for p in man.shard_paths()]  # memory-mapped views
    rows = sum(s.rows for s in shards)
    n_valid = min(rows - 1, max(1, int(round(rows * fraction)))) if rows > 1 else 0
    has_time = bool(shards) and all(s.time is not None for s in shards)
    valid_mask = np.zeros(rows, bool)
    if has_time:
        order = np.argsort(np.concatenate([s.time for s in shards]), kind="stable")
        valid_mask[order[rows - n_valid:]] = True
    else:
        valid_mask[np.random.default_rng(seed).choice(rows, n_valid, replace=False)] = True
    parts = {"train": work / "train", "valid": work / "valid"}
    partial = {k: v.with_name(f"{v.name}.partial-{os.getpid()}") for k, v in parts.items()}
    try:
        for p in partial.values():
            p.mkdir(parents=True)
        meta = {k: man.data[k] for k in ("schema", "schema_fingerprint", "transforms")}
        entries: dict[str, list] = {"train": [], "valid": []}
        stats = {k: {"rows": 0, "positives": 0.0, "time": []} for k in parts}
        start = 0
        for i, shard in enumerate(shards):
            mask = valid_mask[start:start + shard.rows]
            start += shard.rows
            for kind, idx in (("train", np.flatnonzero(~mask)), ("valid", np.flatnonzero(mask))):
                if not len(idx):
                    continue
                piece = _take(shard, idx)
                entries[kind].append(shardio.write_shard(partial[kind] / f"part-{i:05d}{shardio.SHARD_SUFFIX}", piece, meta))
                st = stats[kind]
                st["rows"] += piece.rows
                st["positives"] += float(piece.label.sum())
                if piece.time is not None:
                    st["time"] += [int(piece.time.min()), int(piece.time.max())]
        for kind in parts:
            st = stats[kind]
            manifest = {**man.data, "rows": st["rows"], "rows_read": st["rows"], "rows_rejected": 0, "rejects": {},
                        "positives": st["positives"], "time_range": [min(st["time"]), max(st["time"])] if st["time"] else None,
                        "inputs": [str(man.root)], "created_unix": time.time(), "shards": entries[kind]}
            atomic_write_json(partial[kind] / shardio.MANIFEST, manifest)
            replace_atomically(partial[kind], parts[kind])
    except BaseException:  # a full disk, an interrupt: no partial folder stays behind
        for p in partial.values():
            shutil.rmtree(p, ignore_errors=True)
        raise
    schema_time = man.data.get("schema", {}).get("time")
    result = HoldOut(train=str(parts["train"]), valid=str(parts["valid"]), by="time" if has_time else "random",
                     time_column=schema_time if has_time else None, fraction=fraction,
                     rows_train=stats["train"]["rows"], rows_valid=stats["valid"]["rows"])
    atomic_write_json(info_path, {"source": str(Path(src).resolve()), "fraction": fraction, "seed": seed, "holdout": result.to_dict()})
    return result
