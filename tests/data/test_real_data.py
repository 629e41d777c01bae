"""The shared real datasets convert completely and round-trip (skipped when ../shared/data is absent)."""
from __future__ import annotations

import csv

import numpy as np

from ctrflow.data import shards
from ctrflow.data.convert import ConvertOptions, convert
from ctrflow.data.pipeline import PipelineOptions, open_batches
from ctrflow.schema import infer_schema

from conftest import shared_file

INLINE = ConvertOptions(workers=1)
IPINYOU_FIELDS = ["weekday", "hour", "useragent", "ip", "region", "city", "adexchange", "domain", "slotid", "slotwidth",
                  "slotheight", "slotvisibility", "slotformat", "slotprice", "creative", "usertag"]


def _labels(out):
    with open_batches(out, PipelineOptions(batch_size=8192, shuffle=False)) as bs:
        return np.concatenate([b.label for b in bs])


def test_ipinyou_train_and_later_test_split_convert_with_the_same_ids(tmp_path):
    train, test = shared_file("ipinyou", "train.csv"), shared_file("ipinyou", "test.csv")
    schema = infer_schema(train, label="click", categorical=IPINYOU_FIELDS)  # opaque tokens, all categorical
    a = convert(train, tmp_path / "train", schema=schema, options=INLINE)
    b = convert(test, tmp_path / "test", like=tmp_path / "train", options=INLINE)
    assert (a.rows, a.rows_rejected, b.rows, b.rows_rejected) == (26773, 0, 21150, 0)
    assert _labels(tmp_path / "train").sum() == 255 and _labels(tmp_path / "test").sum() == 50
    # A token seen in both splits maps to the same id in both.
    with open(train) as f:
        first_train = next(csv.DictReader(f))
    rows = [r for r in csv.DictReader(open(test)) if r["domain"] == first_train["domain"]]
    if rows:
        j = IPINYOU_FIELDS.index("domain")
        ids_train = shards.read_shard(shards.load_manifest(tmp_path / "train").shard_paths()[0]).ids[0, j]
        ids_test = np.concatenate([shards.read_shard(p).ids[:, j] for p in shards.load_manifest(tmp_path / "test").shard_paths()])
        assert ids_train in set(ids_test.tolist())
    assert shards.verify(tmp_path / "train")["ok"] and shards.verify(tmp_path / "test")["ok"]


def test_talkingdata_converts_with_times_and_never_uses_attribution_time(tmp_path):
    path = shared_file("talkingdata", "train_sample.csv")
    schema = infer_schema(path, label="is_attributed", categorical=["ip", "app", "device", "os", "channel"],
                          time="click_time", ignore=["attributed_time"])
    s = convert(path, tmp_path / "td", schema=schema, options=ConvertOptions(workers=1, block_bytes=1 << 20))
    assert s.rows == 100_000 and s.rows_rejected == 0 and s.shards >= 3
    man = shards.load_manifest(tmp_path / "td")
    assert "attributed_time" not in man.data["feature_spec"]["id_names"]
    assert _labels(tmp_path / "td").sum() == 227
    t0, t1 = man.data["time_range"]
    assert t0 < t1 and t1 - t0 < 5 * 86400  # epoch seconds of a few November 2017 days
    times = np.concatenate([shards.read_shard(p).time for p in man.shard_paths()])
    assert times.min() == t0 and times.max() == t1
