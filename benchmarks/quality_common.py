"""Datasets of the quality benchmark and the defaults study: raw CSVs split train / valid / test, and the
shard folders ctrflow trains on (the peers read the same CSVs, so every model sees the same rows).

(a) synthetic: `ctrflow generate` (known true CTR);  (b) zipfmix: benchmarks/quality_data.py (known true
CTR);  (c) talkingdata: time split of the shared sample (first 80% by click_time; the last 10% of those
rows validate), schema inferred;  (d) ipinyou: the given train/test, the last 10% of train validates.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("CTRFLOW_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DATASETS = ("synthetic", "zipfmix", "talkingdata", "ipinyou")
TALKINGDATA_IDS = "ip,app,device,os,channel"


@dataclass
class Dataset:
    name: str
    label: str
    csv: dict[str, Path]  # split -> CSV (header; label column `label`; features; maybe true_ctr)
    shards: dict[str, Path]  # split -> ctrflow shard folder
    features: list[str]  # feature columns (peers use the same)
    numeric: list[str]  # which of them are numeric
    bayes: dict[str, float] = field(default_factory=dict)  # split -> Bayes-optimal logloss (synthetic sets)
    note: str = ""


def _split_csv(src: Path, parts: dict[str, tuple[int, int]], out: Path, sort_by: str | None = None) -> dict[str, Path]:
    import pandas as pd

    df = pd.read_csv(src, dtype=str, keep_default_na=False)
    if sort_by:
        df = df.iloc[np.argsort(pd.to_datetime(df[sort_by]).to_numpy(), kind="stable")]
        df[sort_by] = pd.to_datetime(df[sort_by]).dt.strftime("%Y-%m-%dT%H:%M:%S")
    paths = {}
    for name, (a, b) in parts.items():
        p = out / f"{name}.csv"
        df.iloc[a:b].to_csv(p, index=False)
        paths[name] = p
    return paths


def _convert(ds: Dataset, schema, root: Path) -> None:
    from ctrflow.data.convert import ConvertOptions, convert

    opts = ConvertOptions(overwrite=True, workers=1)
    first = root / "shards" / "train"
    convert(ds.csv["train"], first, schema=schema, options=opts)
    ds.shards["train"] = first
    for split in ("valid", "test"):
        convert(ds.csv[split], root / "shards" / split, like=first, options=opts)
        ds.shards[split] = root / "shards" / split


def _bayes(csv: Path, label: str) -> float:
    import pandas as pd

    d = pd.read_csv(csv, usecols=[label, "true_ctr"])
    p = np.clip(d["true_ctr"].to_numpy(float), 1e-7, 1 - 1e-7)
    y = d[label].to_numpy(float)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def prepare(name: str, root: str | os.PathLike, *, rows: int = 300_000, test_rows: int | None = None,
            max_buckets: int | None = 1 << 18, explicit_ids: bool = True) -> Dataset:
    """Make (or reuse, when `root/dataset.json` says the same settings) one dataset under `root`."""
    root = Path(root)
    test_rows = test_rows or rows // 3
    key = {"name": name, "rows": rows, "test_rows": test_rows, "max_buckets": max_buckets,
           **({"explicit_ids": explicit_ids} if name == "talkingdata" else {})}
    meta = root / "dataset.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        if m.get("key") == key:
            d = m["dataset"]
            return Dataset(d["name"], d["label"], {k: Path(v) for k, v in d["csv"].items()},
                           {k: Path(v) for k, v in d["shards"].items()}, d["features"], d["numeric"], d["bayes"], d["note"])
    if root.exists():
        shutil.rmtree(root)
    (root / "csv").mkdir(parents=True)
    valid_rows = max(test_rows // 2, 1000)
    note = ""
    if name == "synthetic":
        from ctrflow.data.generate import GenerateOptions, generate
        from ctrflow.schema import load_schema

        generate(root / "csv" / "train.csv", GenerateOptions(rows=rows, seed=1))
        generate(root / "csv" / "held.csv", GenerateOptions(rows=valid_rows + test_rows, seed=1, split="test"))
        csv = {"train": root / "csv" / "train.csv",
               **_split_csv(root / "csv" / "held.csv", {"valid": (0, valid_rows), "test": (valid_rows, valid_rows + test_rows)}, root / "csv")}
        schema = load_schema("synthetic")
        if max_buckets:
            schema = schema.capped(max_buckets)
            note = f"hash buckets capped at {max_buckets}"
        feats = [*(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27))]
        ds = Dataset(name, "click", csv, {}, feats, [f"I{i}" for i in range(1, 14)], note=note)
    elif name == "zipfmix":
        import quality_data

        csv = {}
        for split, n in (("train", rows), ("valid", valid_rows), ("test", test_rows)):
            csv[split] = root / "csv" / f"{split}.csv"
            quality_data.generate(csv[split], n, seed=0, split=split)
        schema = quality_data.schema_for(csv["train"])
        ds = Dataset(name, "click", csv, {}, [c for c in quality_data.COLUMNS if c not in ("click", "true_ctr")], ["n0", "n1", "n2"])
    elif name == "talkingdata":
        from ctrflow.schema import infer_schema

        src = SHARED / "talkingdata" / "train_sample.csv"
        if not src.exists():
            raise FileNotFoundError(src)
        n = sum(1 for _ in open(src)) - 1
        cut, vcut = int(n * 0.8), int(n * 0.72)
        csv = _split_csv(src, {"train": (0, vcut), "valid": (vcut, cut), "test": (cut, n)}, root / "csv", sort_by="click_time")
        if explicit_ids:  # what a user who knows the columns would pass
            schema = infer_schema(csv["train"], label="is_attributed", categorical=TALKINGDATA_IDS.split(","),
                                  time="click_time", ignore=["attributed_time"], name="talkingdata")
            note = "--categorical " + TALKINGDATA_IDS + " --time click_time --ignore attributed_time passed explicitly"
        else:  # `ctrflow convert train.csv --label is_attributed` alone: ids, time column and leak inferred
            schema = infer_schema(csv["train"], label="is_attributed", name="talkingdata")
            note = "schema inferred from --label is_attributed alone"
        feats = ["ip", "app", "device", "os", "channel"]
        ds = Dataset(name, "is_attributed", csv, {}, feats, [f.name for f in schema.numeric], note=note)
    elif name == "ipinyou":
        from ctrflow.schema import infer_schema

        tr, te = SHARED / "ipinyou" / "train.csv", SHARED / "ipinyou" / "test.csv"
        if not tr.exists():
            raise FileNotFoundError(tr)
        n = sum(1 for _ in open(tr)) - 1
        csv = _split_csv(tr, {"train": (0, int(n * 0.9)), "valid": (int(n * 0.9), n)}, root / "csv")
        csv["test"] = root / "csv" / "test.csv"
        shutil.copyfile(te, csv["test"])
        header = open(tr).readline().strip().split(",")
        feats = [c for c in header if c != "click"]
        schema = infer_schema(csv["train"], label="click", categorical=feats, name="ipinyou")
        ds = Dataset(name, "click", csv, {}, feats, [], note="all 16 fields categorical (opaque integer tokens)")
    else:
        raise ValueError(f"unknown dataset {name!r}; one of {DATASETS}")
    if name in ("synthetic", "zipfmix"):
        ds.bayes = {s: _bayes(p, ds.label) for s, p in ds.csv.items()}
    _convert(ds, schema, root)
    d = {"name": ds.name, "label": ds.label, "csv": {k: str(v) for k, v in ds.csv.items()},
         "shards": {k: str(v) for k, v in ds.shards.items()}, "features": ds.features, "numeric": ds.numeric,
         "bayes": ds.bayes, "note": ds.note}
    meta.write_text(json.dumps({"key": key, "dataset": d}, indent=1))
    return ds
