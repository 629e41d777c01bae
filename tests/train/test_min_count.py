"""ModelConfig.min_count: rare ids share one row per field, counted on the training data, and the export
serves with the same remap as the run trained with."""
from __future__ import annotations

import numpy as np
import pytest

from ctrflow.models.layers import rare_id_remap


def test_rare_buckets_map_to_the_least_seen_one_and_frequent_ones_stay():
    remap, stats = rare_id_remap(np.array([4, 5, 1, 0, 2, 9]), 3)
    assert remap.tolist() == [0, 1, 3, 3, 3, 5]  # 1x, 0x and 2x seen -> bucket 3 (never seen: nothing merged into it)
    assert stats == {"seen": 5, "rare_seen": 2, "rare_rows": 3}
    assert rare_id_remap(np.array([3, 4]), 3)[0].tolist() == [0, 1]  # nothing rare: identity
    # a warm start: own rows stay own (even if rare now), the shared bucket stays, a now-frequent id gets its row
    previous = np.array([0, 1, 3, 3, 3, 5])
    assert rare_id_remap(np.array([0, 0, 5, 0, 0, 9]), 3, previous)[0].tolist() == [0, 1, 2, 3, 3, 5]
    assert rare_id_remap(np.array([0, 0, 5]), 3, np.arange(3))[0].tolist() == [0, 1, 2]  # from a run without min_count


def test_a_shared_bucket_frequent_after_a_warm_start_stops_being_the_rare_values_row():
    """A new value hashed into the shared bucket and frequent now gets that row as its own; the rare values
    move to their least-seen bucket instead of sharing a frequent value's row."""
    previous = np.array([0, 1, 3, 3, 3, 5])  # bucket 3 was the shared one
    remap, stats = rare_id_remap(np.array([4, 5, 1, 7, 0, 9]), 3, previous)
    assert remap.tolist() == [0, 1, 4, 3, 4, 5]  # 3 is its frequent value's own; rare 2 and empty 4 share bucket 4
    assert stats == {"seen": 5, "rare_seen": 1, "rare_rows": 1}
    # the next warm start keeps the moved shared bucket
    assert rare_id_remap(np.array([4, 5, 1, 7, 0, 9]), 3, remap)[0].tolist() == [0, 1, 4, 3, 4, 5]


def test_min_count_is_checked():
    from ctrflow.errors import ConfigError
    from ctrflow.models.registry import ModelConfig

    with pytest.raises(ConfigError, match="min_count"):
        ModelConfig("fm", min_count=-1)


@pytest.mark.slow
def test_remap_is_counted_on_train_restored_and_served_by_the_export(tmp_path):
    import tensorflow as tf

    from ctrflow.data.convert import ConvertOptions, convert
    from ctrflow.data.generate import GenerateOptions, generate
    from ctrflow.data.pipeline import PipelineOptions, open_batches
    from ctrflow.export import export
    from ctrflow.models.registry import ModelConfig
    from ctrflow.schema import PRESETS
    from ctrflow.train.config import TrainConfig
    from ctrflow.train.loop import build_model_from_run, load_run_info, restore_latest, train

    from conftest import raw_rows

    generate(tmp_path / "train.csv", GenerateOptions(rows=3000, seed=5))
    shards = tmp_path / "train"
    convert(tmp_path / "train.csv", shards, schema=PRESETS["synthetic"].capped(1 << 10), options=ConvertOptions(workers=1))
    run = tmp_path / "run"
    train(shards, run, TrainConfig(model=ModelConfig("fm", embedding_dim=4, min_count=3), batch_size=512, max_steps=6, holdout_fraction=0))

    with open_batches(shards, PipelineOptions(batch_size=3000, shuffle=False)) as bs:
        b = next(iter(bs))
    model = build_model_from_run(load_run_info(run))
    restore_latest(run, model)  # the remap is part of the checkpoint
    lay, remap = model.layout, model.id_remap.numpy()
    f = lay.id_names.index("C3")  # a 2M-value field capped at 1024 buckets: most seen values are rare at 3k rows
    col, start = lay.id_columns[f], lay.offsets[f]
    counts = np.bincount(b.ids[:, col], minlength=lay.id_buckets[f])
    expected, _ = rare_id_remap(counts, 3)
    np.testing.assert_array_equal(remap[start:start + lay.id_buckets[f]], expected)
    assert (counts[expected != np.arange(len(counts))] < 3).all() and len(set(expected[counts < 3])) == 1

    # two rows that differ only in which rare C3 value they hold score the same; a frequent value does not
    rare = np.flatnonzero((counts > 0) & (counts < 3))[:2]
    frequent = int(np.argmax(counts))
    ids = np.repeat(b.ids[:1], 3, axis=0)
    ids[:, col] = [rare[0], rare[1], frequent]
    p = tf.sigmoid(model(ids, np.repeat(b.numeric[:1], 3, axis=0))).numpy()
    assert p[0] == p[1] and p[0] != p[2]

    # serving: the export hashes raw values and applies the same remap; an unseen value reads the shared row
    export(run, tmp_path / "m")
    loaded = tf.saved_model.load(str(tmp_path / "m" / "1"))
    rows = raw_rows(tmp_path / "train.csv", 200)
    feats = {k: [r[k] if k.startswith("C") else (np.nan if r[k] is None else r[k]) for r in rows] for k in rows[0]}
    unseen = [f"never-seen-in-training-{i}" for i in range(len(rows))]  # 200 new values: some hash to empty buckets
    out = {}
    for name, c3 in (("train", feats["C3"]), ("unseen", unseen)):
        t = {k: tf.constant(c3 if k == "C3" else v, tf.string if k.startswith("C") else tf.float64) for k, v in feats.items()}
        ids_served = loaded.signatures["transform"](**t)["ids"].numpy()
        served = loaded.signatures["serving_default"](**t)["probabilities"].numpy()
        np.testing.assert_allclose(served, tf.sigmoid(model(ids_served, b.numeric[:200])).numpy(), rtol=1e-5, atol=1e-7)
        out[name] = (ids_served, served)
    ids_unseen = out["unseen"][0]
    empty = np.flatnonzero(counts[ids_unseen[:, col]] == 0)  # rows whose new value's bucket no training row had
    assert len(empty) and set(expected[ids_unseen[empty, col]]) == {expected[rare[0]]}  # ... all read the rare values' row
    shared = ids_unseen[empty].copy()
    shared[:, col] = expected[ids_unseen[empty, col]]
    np.testing.assert_allclose(out["unseen"][1][empty], tf.sigmoid(model(shared, b.numeric[:200][empty])).numpy(), rtol=1e-5)


@pytest.mark.parametrize("kind", ["fm", "ffm"])
def test_context_requests_apply_the_same_remap_as_flat_calls(kind):
    """A served context + candidates request reads the rows a flat call reads (rare ids remapped on both sides)."""
    from ctrflow.data.batch import FeatureSpec
    from ctrflow.models import ModelConfig, make_model

    spec = FeatureSpec(("a", "b", "c"), (20, 16, 12))
    model = make_model(ModelConfig(kind, embedding_dim=4, ffm_dim=2, min_count=2), spec)
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:
        v.assign(rng.normal(0.0, 0.5, v.shape).astype(np.float32))
    counts = [rng.integers(0, 4, b) for b in spec.id_buckets]
    model.set_id_counts(counts)
    ids = np.stack([rng.integers(0, b, 9) for b in spec.id_buckets], axis=1).astype(np.int32)
    remapped = np.stack([rare_id_remap(c, 2)[0][ids[:, j]] for j, c in enumerate(counts)], axis=1)
    assert (remapped != ids).any()
    want = model(ids).numpy()
    model.set_id_counts([np.full(b, 9) for b in spec.id_buckets])  # nothing rare: identity remap
    np.testing.assert_allclose(model(remapped).numpy(), want, rtol=1e-5, atol=1e-6)  # the remap is what changed the rows
    model.set_id_counts(counts)
    split = model.context_split((0,), ())
    row = np.arange(9, dtype=np.int32)
    got = model.call_context(split, ids[:, :1], np.zeros((9, 0), np.float32), ids[:, 1:], np.zeros((9, 0), np.float32), row).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def two_days(tmp_path_factory):
    """Two days of traffic in small shards (the second has values the first never saw) and runs trained on
    day a with min_count 4 and 0 (what warm starts read)."""
    from ctrflow.data.convert import ConvertOptions, convert
    from ctrflow.data.generate import GenerateOptions, generate
    from ctrflow.schema import PRESETS
    from ctrflow.train.loop import train

    root = tmp_path_factory.mktemp("days")
    schema = PRESETS["synthetic"].capped(1 << 8)
    for name, seed in (("a", 5), ("b", 6)):
        generate(root / f"{name}.csv", GenerateOptions(rows=1500, seed=seed))
    convert(root / "a.csv", root / "a", schema=schema, options=ConvertOptions(workers=1))
    convert(root / "b.csv", root / "b", like=root / "a", options=ConvertOptions(workers=1))
    for mc in (4, 0):
        train(root / "a", root / f"r{mc}", _config(mc))
    return root


def _config(min_count: int):
    from ctrflow.models.registry import ModelConfig
    from ctrflow.train.config import TrainConfig

    return TrainConfig(model=ModelConfig("lr", min_count=min_count), batch_size=500, max_steps=2, holdout_fraction=0)


def _remap(run):
    from ctrflow.train.loop import build_model_from_run, load_run_info, restore_latest

    model = build_model_from_run(load_run_info(run))
    restore_latest(run, model)
    return model, model.id_remap.numpy()


def _counts(shards, model):
    from ctrflow.data.pipeline import PipelineOptions, open_batches

    with open_batches(shards, PipelineOptions(batch_size=1 << 16, shuffle=False)) as bs:
        ids = np.concatenate([b.ids for b in bs])
    return [np.bincount(ids[:, c], minlength=n) for c, n in zip(model.layout.id_columns, model.layout.id_buckets)]


def test_the_counting_pass_pools_batches_and_counts_every_row(two_days):
    """Batches are pooled before counting (a bincount costs its buckets): every row is counted once, the
    last partial pool too."""
    from ctrflow.data.batch import FeatureSpec
    from ctrflow.models import ModelConfig, make_model
    from ctrflow.train.core import init_id_remap, load_run_info

    model = make_model(ModelConfig("lr", min_count=4), FeatureSpec.from_dict(load_run_info(two_days / "r4")["feature_spec"]))
    assert max(model.layout.id_buckets) < 1500  # several pools of 7-row batches, and a partial one
    init_id_remap(model, two_days / "b", batch_rows=7)
    expected = np.concatenate([rare_id_remap(c, 4)[0] for c in _counts(two_days / "b", model)])
    np.testing.assert_array_equal(model.id_remap.numpy(), expected)


def test_a_warm_start_keeps_every_own_row_and_the_shared_row(tmp_path, two_days):
    from ctrflow.train.loop import train

    train(two_days / "b", tmp_path / "r2", _config(4), warm_start=two_days / "r4")
    (model, first), (_, second) = _remap(two_days / "r4"), _remap(tmp_path / "r2")
    local = np.concatenate([np.arange(b) for b in model.layout.id_buckets])  # the remap holds each field's local ids
    own1, own2 = first == local, second == local
    assert (~own1).any() and (own2[own1]).all()  # rare ids existed; every own row of run 1 is still own
    assert (own2 & ~own1).any()  # some ids rare on day a became frequent on day b and got their own row
    moved = 0
    for f, counts in enumerate(_counts(two_days / "b", model)):  # per field: the still-rare ones read one row, the same
        part = slice(model.layout.offsets[f], model.layout.offsets[f] + model.layout.id_buckets[f])  # shared row unless
        was, now = set(first[part][~own1[part]]), set(second[part][~own2[part]])  # a new frequent value took it
        assert len(was) <= 1 and len(now) <= 1
        if was and now and was != now:
            assert counts[was.pop()] >= 4 and counts[now.pop()] < 4
            moved += 1
    assert moved < len(model.layout.id_buckets)


def test_a_warm_start_without_min_count_from_a_run_with_it_is_refused(tmp_path, two_days):
    """The child would have no remap: the parent's would be dropped, its rare ids reading untrained rows of their own."""
    from ctrflow.errors import ConfigError
    from ctrflow.train.loop import train

    with pytest.raises(ConfigError, match=r"min_count 0 from .*trained with min_count 4.*--min-count 4 .*as the parent did, or train from scratch"):
        train(two_days / "b", tmp_path / "child", _config(0), warm_start=two_days / "r4")
    assert not (tmp_path / "child").exists()  # refused before anything was written
    train(two_days / "b", tmp_path / "child3", _config(3), warm_start=two_days / "r4")  # another K > 0 merges


def test_a_warm_start_from_a_run_without_min_count_counts_the_remap_fresh(tmp_path, two_days):
    """The parent's checkpoint has no remap: the child's identity remap would leave no id rare (every bucket
    "own") while run.json says min_count 4; the child counts its own remap instead, and says so."""
    import json

    from ctrflow.train.loop import train

    train(two_days / "b", tmp_path / "child", _config(4), warm_start=two_days / "r0")
    model, remap = _remap(tmp_path / "child")
    expected = np.concatenate([rare_id_remap(c, 4)[0] for c in _counts(two_days / "b", model)])
    assert (expected != np.concatenate([np.arange(b) for b in model.layout.id_buckets])).any()
    np.testing.assert_array_equal(remap, expected)
    record = json.loads((tmp_path / "child" / "run.json").read_text())["warm_start"]
    assert record["from"] == str(two_days / "r0") and record["id_remap"].startswith("counted fresh")


def test_new_runs_count_rare_ids_by_default_and_runs_recorded_before_min_count_keep_none(tmp_path):
    import json

    from ctrflow.train.config import TrainConfig
    from ctrflow.train.core import RUN_FILE, load_run_info

    assert TrainConfig().model.min_count == 5  # what `ctrflow train --model M` trains
    # ... and a config file's `model: {kind: fm}` (a mapping) too, unless it sets min_count
    assert TrainConfig(model={"kind": "fm"}).model.min_count == 5
    assert TrainConfig.from_dict({"model": {"kind": "fm", "min_count": 0}}).model.min_count == 0
    (tmp_path / "c.yaml").write_text("model: {kind: fm}\n")
    assert TrainConfig.load(tmp_path / "c.yaml").model.min_count == 5
    (tmp_path / RUN_FILE).write_text(json.dumps({"config": {"model": {"kind": "fm"}, "l2_mode": "every_step"}}))
    assert load_run_info(tmp_path)["config"]["model"]["min_count"] == 0  # its checkpoints hold no remap
