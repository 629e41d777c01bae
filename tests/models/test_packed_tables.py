"""Packed serving tables (`CtrModel.pack_tables`): safe to trace from many threads, never trainable,
never silently un-sharding a partitioned table."""
from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import tensorflow as tf

from ctrflow.data.batch import FeatureSpec
from ctrflow.errors import ConfigError, TrainingError
from ctrflow.models import ModelConfig, make_model

# "x" enters normalized: its packed rows are looked up without an ids tensor (the memo key most at risk)
SPEC = FeatureSpec(("a", "b", "c", "x"), (20, 16, 12, 8), numeric_names=("x",), normalized_numeric=("x",))
IDS = np.stack([np.arange(30) % b for b in SPEC.id_buckets], axis=1).astype(np.int32)
NUMERIC = np.linspace(-1, 1, 30, dtype=np.float32)[:, None]


def _model(kind: str = "fm", table_mode: str = "shared"):
    model = make_model(ModelConfig(kind, embedding_dim=4, table_mode=table_mode, hidden=(8,)), SPEC)
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:
        v.assign(rng.normal(0.0, 0.5, v.shape).astype(np.float32))
    return model


@pytest.mark.parametrize("kind", ["fm", "deepfm"])  # the whole-rows path and the sliced one
def test_concurrent_tracings_of_a_packed_model_each_get_their_own_gathers(kind):
    model = _model(kind)
    want = model(IDS, NUMERIC).numpy()
    assert model.pack_tables()
    barrier, results, errors = threading.Barrier(4), [], []

    def trace() -> None:
        try:
            barrier.wait(timeout=30)
            for _ in range(3):  # fresh tracings, overlapping the other threads'
                f = tf.function(lambda ids, num: model(ids, num))
                results.append(f(tf.constant(IDS), tf.constant(NUMERIC)).numpy())
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(f"{type(e).__name__}: {e}"[:300])

    threads = [threading.Thread(target=trace) for _ in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: the tracings interleave op by op
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        sys.setswitchinterval(interval)
    assert not errors and len(results) == 12
    for got in results:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_pack_tables_refuses_a_sharded_table():
    from tensorflow.python.distribute.sharded_variable import ShardedVariable

    model = _model("fm", "shared")
    table = model.embedding.table.tables[0]
    half = int(table.shape[0]) // 2
    model.embedding.table.tables = [ShardedVariable([tf.Variable(table[:half], name="s0"), tf.Variable(table[half:], name="s1")])]
    with pytest.raises(ConfigError, match="row-sharded"):
        model.pack_tables()
    assert model.packed_rows is None


def test_a_packed_model_refuses_training():
    model = _model("deepfm", "per_field")
    model.variable_groups()  # (unpacked: fine)
    assert model.pack_tables()
    with pytest.raises(TrainingError, match="packed for serving"):
        model.variable_groups()
    with pytest.raises(TrainingError, match="packed for serving"):
        model(IDS, NUMERIC, training=True)
    model(IDS, NUMERIC)  # serving still works
