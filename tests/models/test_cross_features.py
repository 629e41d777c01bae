"""Hashed cross features of chosen field pairs (`ModelConfig.cross_pairs`, ctrflow.models.cross): the in-graph cross
id, old models unchanged without them, context requests and exports scoring as the training model, bad configs,
warm starts across other crosses, and `train --cross-select K` (two stages) end to end, with a resume reading the recorded pairs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from ctrflow.data.batch import FeatureSpec
from ctrflow.errors import ConfigError
from ctrflow.models import ModelConfig, make_model
from ctrflow.models.cross import cross_index

# as tests/models/test_context_models.py: a, b, c categoricals, n1 / n2 discretized, n1#value, n2 normalized
SPEC = FeatureSpec(("a", "b", "c", "n1", "n2", "n1#value"), (50, 40, 30, 6, 6, 20), ("n1", "n2"), ("n2",))
PAIRS = (("a", "b"), ("c", "a"), ("n2", "b"), ("c", "n1#value"), ("n2", "c"))  # id x id and id x normalized numeric


def _random(model, seed=0):
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:
        v.assign(rng.normal(0.0, 0.3, v.shape).astype(np.float32))


def _inputs(n, rng):
    return (np.stack([rng.integers(0, b, n) for b in SPEC.id_buckets], 1).astype(np.int32),
            rng.normal(0.0, 2.0, (n, 2)).astype(np.float32))


def test_cross_id_is_the_documented_function_in_range_and_per_pair():
    from ctrflow.models.cross import _cross_ids

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2**31 - 1, 5000), rng.integers(0, 2**31 - 1, 5000)
    for pair, buckets in ((0, 1 << 20), (7, 1000)):
        got = _cross_ids(tf.constant(pair, tf.int64), a, b, buckets).numpy()
        np.testing.assert_array_equal(got, cross_index(pair, a, b, buckets))
        assert got.min() >= 0 and got.max() < buckets
    small = np.arange(200)
    ids = cross_index(0, np.repeat(small, 200), np.tile(small, 200), 1 << 20)
    assert len(np.unique(ids)) > 0.95 * 40_000  # 40k id pairs spread over the table
    assert (cross_index(0, small, small, 1 << 20) != cross_index(1, small, small, 1 << 20)).mean() > 0.99


@pytest.mark.parametrize("kind", ["lr", "ffm", "dcnv2"])  # dcnv2: its own `cross` network sits beside the crosses
def test_empty_pairs_is_the_old_model_and_zero_crosses_score_alike(kind):
    old = {k: v for k, v in ModelConfig(kind).to_dict().items() if k not in ("cross_pairs", "cross_buckets")}
    assert ModelConfig.from_dict(old) == ModelConfig(kind)  # a config / run.json written before the fields
    plain = make_model(ModelConfig(kind, embedding_dim=4, hidden=(8,)), SPEC)
    crossed = make_model(ModelConfig(kind, embedding_dim=4, hidden=(8,), cross_pairs=PAIRS, cross_buckets=500), SPEC)
    assert plain.pair_cross is None and not any("pair_cross" in v.name for v in plain.variables)
    assert [v.name for v in crossed.variable_groups()["linear"]].count(f"{kind}/pair_cross/table/shared:0") == 1
    ids, num = _inputs(20, np.random.default_rng(1))
    np.testing.assert_allclose(crossed(ids, num).numpy(), plain(ids, num).numpy(), rtol=1e-6)  # the table starts at 0


@pytest.mark.parametrize("kind", ["lr", "ffm", "dcnv2"])
def test_context_requests_and_baked_remap_score_as_the_flat_call(kind):
    model = make_model(ModelConfig(kind, embedding_dim=4, ffm_dim=2, hidden=(8,), cross_pairs=PAIRS, cross_buckets=997, cross_scale=3.0,
                                   min_count=2), SPEC)
    _random(model)
    rng = np.random.default_rng(2)
    model.set_id_counts([rng.integers(0, 4, b) for b in SPEC.id_buckets])
    # a + n1 context (a x b: context x candidate); b + n2 (n2 x b: both context; a x b mixed); all but one field
    for split_cols in (((0, 3, 5), (0,)), ((1, 4), (1,)), ((0, 1, 2, 3, 5), (0,))):
        split = model.context_split(*split_cols)
        (ci_, cn_), (ki_, kn_) = _inputs(3, rng), _inputs(11, rng)
        row = rng.integers(0, 3, 11).astype(np.int32)
        ci, cn = list(split.context.id_inputs), list(split.context.numeric_inputs)
        ki, kn = list(split.candidate.id_inputs), list(split.candidate.numeric_inputs)
        flat_ids, flat_num = ki_.copy(), kn_.copy()
        flat_ids[:, ci], flat_num[:, cn] = ci_[row][:, ci], cn_[row][:, cn]
        want = model(flat_ids, flat_num).numpy()
        got = model.call_context(split, ci_[:, ci], cn_[:, cn], ki_[:, ki], kn_[:, kn], row).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    ids, num = _inputs(40, rng)
    want = model(ids, num).numpy()
    model.bake_id_remap()  # exports: the cross hashes raw ids, so baking the remap leaves it alone
    np.testing.assert_allclose(model(ids, num).numpy(), want, rtol=1e-5, atol=1e-5)


def test_bad_cross_configs_are_refused():
    assert ModelConfig("lr", cross_pairs="a:b, c:n2").cross_pairs == (("a", "b"), ("c", "n2"))
    c = ModelConfig("ffm", cross_pairs=[["b", "a"]], cross_buckets=64)
    assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    for bad, match in (([("a", "a")], "with itself"), ([("a", "b"), ("b", "a")], "twice"), ([("a",)], "pairs of field names"),
                       ("a:b:c", "pairs of field names")):
        with pytest.raises(ConfigError, match=match):
            ModelConfig("lr", cross_pairs=bad)
    with pytest.raises(ConfigError, match="cross_buckets"):
        ModelConfig("lr", cross_pairs=[("a", "b")], cross_buckets=0)
    with pytest.raises(ConfigError, match=r"'bb', which is not one of this model's fields.*Did you mean 'b'"):
        make_model(ModelConfig("lr", cross_pairs=[("a", "bb")]), SPEC)
    with pytest.raises(ConfigError, match="both are numeric"):
        make_model(ModelConfig("lr", cross_pairs=[("n2", "n2x")]), FeatureSpec(("a",), (4,), ("n2", "n2x"), ("n2", "n2x")))


def test_memory_estimate_counts_the_cross_table():
    from ctrflow.train.config import TrainConfig
    from ctrflow.train.memory import estimate_training_state

    plain = estimate_training_state(TrainConfig(model=ModelConfig("lr")), SPEC)
    crossed = estimate_training_state(TrainConfig(model=ModelConfig("lr", cross_pairs=PAIRS, cross_buckets=1 << 20)), SPEC)
    assert crossed.tables["linear"] - plain.tables["linear"] == 4 << 20
    assert crossed.slots["linear"] > plain.slots["linear"]


def test_warm_start_across_other_crosses_is_refused(tmp_path):
    from ctrflow.train.core import RUN_FILE, check_warm_start

    def info(**model):
        return {"config": {"model": ModelConfig("lr", **model).to_dict()}, "feature_spec": SPEC.to_dict()}

    (tmp_path / RUN_FILE).write_text(json.dumps(info(cross_pairs=[("a", "b")])))
    for mine in (info(), info(cross_pairs=[("b", "c")]), info(cross_pairs=[("a", "b")], cross_buckets=1 << 10)):
        with pytest.raises(ConfigError, match="cross features differ"):
            check_warm_start(tmp_path, mine)


@pytest.mark.slow
def test_cross_select_trains_and_exports_with_served_parity(tmp_path, capsys):
    from ctrflow.cli import main
    from ctrflow.data.convert import ConvertOptions, convert
    from ctrflow.data.pipeline import PipelineOptions, open_batches
    from ctrflow.schema import CategoricalField, Schema
    from ctrflow.train.checkpoints import restore_latest
    from ctrflow.train.core import build_model_from_run, load_run_info

    schema = Schema("s", "y", tuple(CategoricalField(c, 32) for c in "abcd"), (), columns=("y", "a", "b", "c", "d"),
                    context=("a", "c"))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 8, size=(3000, 4))
    logit = -1.0 + 1.5 * ((x[:, 0] * 3 + x[:, 1]) % 5 == 0) - 0.5 * (x[:, 2] > 4)  # one interacting pair, (a, b)
    y = (rng.random(3000) < 1 / (1 + np.exp(-logit))).astype(int)
    csv = tmp_path / "d.csv"
    csv.write_text("y,a,b,c,d\n" + "".join(f"{t},{','.join(map(str, r))}\n" for t, r in zip(y, x)))
    convert(csv, tmp_path / "shards", schema=schema, options=ConvertOptions(workers=1))
    run = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "shards"), "--out", str(run), "--model", "lr", "--cross-select", "2",
            "--epochs", "1", "--batch-size", "256", "--holdout-fraction", "0.2"]
    assert main(args + ["--json"]) == 0  # LR + crosses of the pairs an FFM stage 1 ranks first
    sel = json.loads((run / "pair_selection.json").read_text())
    assert len(sel["crossed"]) == 2 and ["a", "b"] in [p["pair"] for p in sel["crossed"]]
    info = load_run_info(run)
    assert info["config"]["model"]["kind"] == "lr" and load_run_info(run / "stage1")["config"]["model"]["kind"] == "ffm"
    assert [p["pair"] for p in sel["crossed"]] == info["config"]["model"]["cross_pairs"]
    other_k = [("3" if a == "2" else a) for a in args]
    assert main(other_k) == 2  # a rerun asking for another K is refused, not resumed with the recorded pairs
    assert "selected its pairs with --cross-select 2" in capsys.readouterr().err
    # a rerun resumes stage 2 with the pairs recorded (the same path as --ffm-select-pairs' resume, tested there)
    from ctrflow.train.config import TrainConfig
    from ctrflow.train.pair_selection import _stage2

    again = _stage2(TrainConfig(model=ModelConfig("lr")), sel, None, 2).model
    assert [list(p) for p in again.cross_pairs] == info["config"]["model"]["cross_pairs"]
    assert main(["export", str(run), "--model-base-path", str(tmp_path / "m"), "--json"]) == 0
    capsys.readouterr()
    model = build_model_from_run(load_run_info(run))
    restore_latest(run, model)
    with open_batches(tmp_path / "shards", PipelineOptions(batch_size=64, shuffle=False)) as b:
        batch = next(iter(b))
    want = tf.sigmoid(model(batch.ids, batch.numeric)).numpy()
    assert np.std(want) > 1e-3
    sigs = tf.saved_model.load(str(tmp_path / "m" / "1")).signatures
    got = sigs["predict_ids"](ids=tf.constant(batch.ids), numeric=tf.constant(batch.numeric))["probabilities"].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    ci = [0, 2]  # a, c: the context; (a, b) crosses a context field with a candidate one
    row = np.arange(64, dtype=np.int32)
    ctx = sigs["predict_context"](context_ids=tf.constant(batch.ids[:, ci]), context_numeric=tf.zeros([64, 0]),
                                  ids=tf.constant(batch.ids[:, [1, 3]]), numeric=tf.zeros([64, 0]), row=tf.constant(row))
    np.testing.assert_allclose(ctx["probabilities"].numpy(), want, rtol=1e-5, atol=1e-6)


def test_continuous_stale_row_reset_leaves_the_cross_table_alone(tmp_path):
    """The stale-id reset of continuous training acts on per-field tables only: a cross table's rows are
    hashed pairs, not ids of column 0 (which zeroed unrelated crosses, or ran past a smaller table)."""
    from ctrflow.continuous import _reset_rows_copy
    from ctrflow.train.config import TrainConfig
    from ctrflow.train.core import RUN_FILE
    from ctrflow.train.loop import Trainer

    spec = FeatureSpec(("a", "b"), (5000, 10))
    cfg = TrainConfig(model=ModelConfig("lr", cross_pairs=(("a", "b"),), cross_buckets=4096))
    line = tmp_path / "line"
    line.mkdir()
    trainer = Trainer(line, cfg, spec)
    table = trainer.model.pair_cross.table.tables[0]
    table.assign(np.ones(table.shape, np.float32))
    (line / RUN_FILE).write_text(json.dumps({"config": cfg.to_dict(), "feature_spec": spec.to_dict()}))
    trainer.manager.save(checkpoint_number=1)
    stale = {0: np.zeros(5000, bool), 1: np.zeros(10, bool)}
    stale[0][[3, 7, 4500]] = True  # 4500 is past the 4096-row cross table
    out = _reset_rows_copy(line, tmp_path / "warm", stale)
    check = Trainer(tmp_path / "check", cfg, spec)
    check.ckpt.read(tf.train.latest_checkpoint(str(out / "checkpoints"))).expect_partial()
    assert (check.model.pair_cross.table.tables[0].numpy() == 1).all()
