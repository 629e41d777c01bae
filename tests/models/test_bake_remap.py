"""Exports bake the rare-id remap into the tables, then pack them: the same scores with fewer gathers."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from ctrflow.data.batch import FeatureSpec
from ctrflow.models import ModelConfig, make_model


@pytest.mark.parametrize("kind,table_mode", [("fm", "shared"), ("deepfm", "per_field"), ("ffm", "shared"),
                                              ("lr", "per_field"), ("dcnv2", "shared"), ("fwfm", "per_field")])
def test_baked_tables_score_as_the_remap_did(kind, table_mode):
    spec = FeatureSpec(("a", "b", "c"), (20, 16, 12), numeric_names=("x",))
    model = make_model(ModelConfig(kind, embedding_dim=4, ffm_dim=2, min_count=2, table_mode=table_mode, hidden=(8,)), spec)
    rng = np.random.default_rng(1)
    for v in model.trainable_variables:
        v.assign(rng.normal(0.0, 0.5, v.shape).astype(np.float32))
    model.set_id_counts([rng.integers(0, 4, b) for b in spec.id_buckets])
    ids = np.stack([np.arange(40) % b for b in spec.id_buckets], axis=1).astype(np.int32)  # every id of every field
    numeric = rng.normal(size=(40, 1)).astype(np.float32)
    want = model(ids, numeric).numpy()
    model.bake_id_remap()
    count = kind in ("deepfm", "dcnv2")  # (a trace each: two kinds, both table modes)
    unpacked = _table_gathers(model, ids, numeric) if count else 0
    # dropped, not only None: a tracked variable set to None stays in the checkpoint graph, and exports save it
    assert model.id_remap is None
    assert not [t for t in tf.train.TrackableView(model).descendants() if isinstance(t, tf.Variable) and "id_remap" in t.name]
    np.testing.assert_allclose(model(ids, numeric).numpy(), want, rtol=1e-6, atol=1e-6)
    # exports then pack the tables (linear weight as the embedding rows' last column): same scores, one gather
    assert model.pack_tables() == (kind != "lr")
    np.testing.assert_allclose(model(ids, numeric).numpy(), want, rtol=1e-6, atol=1e-6)
    if kind != "lr":
        assert model.linear.table.tables[0] is model.embedding.table.tables[0]
        assert not model.pack_tables()  # once
        if count:  # each table's lookups (ids, numerics): one gather where there were two
            assert 2 * _table_gathers(model, ids, numeric) == unpacked


def _table_gathers(model, ids, numeric) -> int:
    """Table lookups (ResourceGather ops) in the model's serving graph."""
    graph = tf.function(lambda i, n: model(i, n)).get_concrete_function(tf.constant(ids), tf.constant(numeric)).graph
    return sum(op.type == "ResourceGather" for op in graph.get_operations())
