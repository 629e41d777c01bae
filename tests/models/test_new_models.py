"""DCN-v2, FwFM and FFM: their interactions against brute force, sparse updates, variants, orderings.

The contract every model shares (forward shapes, variable groups, IndexedSlices gradients, unique
variable names, checkpoint round trip) runs over every kind in test_models.py; this file adds what is
particular to the three newer models.
"""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from ctrflow.data.batch import FeatureSpec
from ctrflow.errors import ConfigError
from ctrflow.models import ModelConfig, make_model
from ctrflow.models.layers import CrossNetwork, FieldPairInteraction, ffm_interaction, fm_interaction
from ctrflow.train.metrics import auc
from ctrflow.train.optimizers import make_optimizer

from test_models import SMALL, SPEC, interaction_problem, random_inputs, sgd_train

VARIANTS = [
    ("fwfm", {}),
    ("ffm", {"ffm_dim": 3}),
    ("dcnv2", {"cross_structure": "parallel"}),
    ("dcnv2", {"cross_structure": "stacked"}),
    ("dcnv2", {"cross_structure": "parallel", "cross_rank": 2, "hidden": ()}),
    ("dcnv2", {"cross_structure": "stacked", "cross_rank": 3, "dropout": 0.2, "batch_norm": True}),
]
IDS = [f"{k}-{'-'.join(f'{a}={b}' for a, b in kw.items())}" for k, kw in VARIANTS]


def config(kind: str, **kw) -> ModelConfig:
    return ModelConfig(kind, **{**SMALL, **kw})


# -- the interactions against brute force ------------------------------------------------------------
def test_ffm_interaction_pairs_each_fields_vector_for_the_other_field():
    rng = np.random.default_rng(0)
    s, k = 5, 3
    vec = rng.normal(size=(4, s, s - 1, k)).astype(np.float32)  # [B, field, slot of the other field, k]
    slot = lambda f, g: g if g < f else g - 1  # noqa: E731
    expected = [sum(vec[b, i, slot(i, j)] @ vec[b, j, slot(j, i)] for i in range(s) for j in range(i + 1, s)) for b in range(4)]
    got = ffm_interaction(tf.constant(vec.reshape(4, s, (s - 1) * k)), s, k).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_ffm_hand_written_gradient_equals_autodiff_of_the_pairwise_sum():
    s, k = 4, 2
    x = tf.Variable(np.random.default_rng(5).normal(size=(3, s, (s - 1) * k)).astype(np.float32))
    slot = lambda f, g: g if g < f else g - 1  # noqa: E731
    weights = tf.constant([1.0, -2.0, 0.5])
    with tf.GradientTape(persistent=True) as tape:
        fast = tf.reduce_sum(weights * ffm_interaction(x, s, k))
        v = tf.reshape(x, [3, s, s - 1, k])
        slow = tf.reduce_sum(weights * tf.add_n([tf.reduce_sum(v[:, i, slot(i, j)] * v[:, j, slot(j, i)], axis=1)
                                                 for i in range(s) for j in range(i + 1, s)]))
    np.testing.assert_allclose(tape.gradient(fast, x).numpy(), tape.gradient(slow, x).numpy(), rtol=1e-5, atol=1e-6)


def test_ffm_with_equal_vectors_for_every_field_is_an_fm():
    emb = np.random.default_rng(1).normal(size=(6, 4, 2)).astype(np.float32)
    tiled = np.tile(emb, (1, 1, 3))  # each field's 3 field-aware vectors all equal its FM vector
    np.testing.assert_allclose(ffm_interaction(tf.constant(tiled), 4, 2).numpy(), fm_interaction(tf.constant(emb)).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_field_pair_weights_scale_each_pair_and_start_as_an_fm():
    emb = tf.constant(np.random.default_rng(2).normal(size=(5, 6, 3)).astype(np.float32))
    pairs = FieldPairInteraction(6)
    np.testing.assert_allclose(pairs(emb).numpy(), fm_interaction(emb).numpy(), rtol=1e-5, atol=1e-5)
    r = np.random.default_rng(3).normal(size=(6, 6)).astype(np.float32)
    pairs.r.assign(r)
    e = emb.numpy()
    expected = [sum(r[i, j] * e[b, i] @ e[b, j] for i in range(6) for j in range(i + 1, 6)) for b in range(5)]
    np.testing.assert_allclose(pairs(emb).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_cross_layer_formula_and_low_rank_equals_full_rank_with_w_equal_v_u():
    rng = np.random.default_rng(4)
    x0 = rng.normal(size=(3, 6)).astype(np.float32)
    full, low = CrossNetwork(6, 2), CrossNetwork(6, 2, rank=2)
    full.build(), low.build()
    expected = x0
    for i in range(2):
        low.biases[i].assign(rng.normal(size=6).astype(np.float32))
        full.biases[i].assign(low.biases[i])
        full.kernels[i].assign(tf.matmul(low.v[i], low.u[i]))
        expected = x0 * (expected @ full.kernels[i].numpy() + low.biases[i].numpy()) + expected
    np.testing.assert_allclose(full(tf.constant(x0)).numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(low(tf.constant(x0)).numpy(), expected, rtol=1e-4, atol=1e-5)
    assert sorted(v.shape.as_list() for v in low.trainable_variables if v.shape.rank == 2) == [[2, 6]] * 2 + [[6, 2]] * 2


# -- variants and sizes ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,kw", VARIANTS, ids=IDS)
@pytest.mark.parametrize("table_mode", ["shared", "per_field"])
def test_variants_give_finite_logits_and_group_every_variable_once(kind, kw, table_mode):
    model = make_model(config(kind, table_mode=table_mode, **kw), SPEC)
    ids, numeric = random_inputs(SPEC, 33)
    for training in (False, True):
        out = model(ids, numeric, training=training)
        assert out.shape == (33,) and np.isfinite(out.numpy()).all()
    groups = model.variable_groups()
    grouped = [v.ref() for vs in groups.values() for v in vs]
    assert len(grouped) == len(set(grouped)) and set(grouped) == {v.ref() for v in model.trainable_variables}
    assert model.linear.bias is not None  # the trainers start the output bias at the base rate here


def test_ffm_table_rows_hold_one_vector_per_other_field():
    model = make_model(ModelConfig("ffm", ffm_dim=3), SPEC)  # 4 id fields + 1 normalized numeric = 5 fields
    (table,) = model.variable_groups()["embedding"]
    assert table.shape.as_list() == [50 + 30 + 24 + 6 + 1, 4 * 3]
    with pytest.raises(ConfigError, match="at least 2 fields"):
        make_model(ModelConfig("ffm"), FeatureSpec(("site",), (10,)))


def test_dcnv2_low_rank_has_fewer_cross_weights_than_full_rank():
    def cross_params(**kw):
        return sum(int(np.prod(v.shape)) for v in make_model(config("dcnv2", **kw), SPEC).cross.trainable_variables)

    d = 5 * SMALL["embedding_dim"]
    assert cross_params(cross_rank=None) == cross_params() == 3 * (d * d + d)  # rank 64 >= d / 2: full rank
    assert cross_params(cross_rank=2) == 3 * (2 * d * 2 + d)


def test_a_cross_rank_that_would_cost_more_than_full_rank_gives_full_rank():
    assert CrossNetwork(20, 1, rank=9).rank == 9
    assert CrossNetwork(20, 1, rank=10).rank is None and CrossNetwork(20, 1, rank=None).rank is None
    assert ModelConfig("dcnv2").cross_rank == 64 and ModelConfig("dcnv2").cross_structure == "stacked"


def test_dcnv2_dropout_only_in_training():
    model = make_model(config("dcnv2", dropout=0.5, init_scale=0.5), SPEC)
    ids, numeric = random_inputs(SPEC, 64)
    np.testing.assert_array_equal(model(ids, numeric).numpy(), model(ids, numeric).numpy())
    assert not np.allclose(model(ids, numeric, training=True).numpy(), model(ids, numeric, training=True).numpy())


# -- sparse updates ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,kw", VARIANTS[:3], ids=IDS[:3])
def test_a_sparse_optimizer_step_changes_only_the_looked_up_rows(kind, kw):
    model = make_model(config(kind, **kw), SPEC)
    ids, numeric = random_inputs(SPEC, 16)
    (lin,), (emb,) = model.variable_groups()["linear"], model.variable_groups()["embedding"]
    offsets = np.cumsum([0, 50, 30, 24])
    looked_up = sorted({int(offsets[f] + ids[b, f]) for b in range(16) for f in range(4)} | {110})  # 110: "age"
    labels = tf.constant((np.arange(16) % 3 == 0).astype(np.float32))
    variables = [v for vs in model.variable_groups().values() for v in vs]
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=model(ids, numeric, training=True)))
    grads = tape.gradient(loss, variables)
    grad_of = {v.ref(): g for v, g in zip(variables, grads)}
    for table, grad in ((lin, grad_of[lin.ref()]), (emb, grad_of[emb.ref()])):
        assert isinstance(grad, tf.IndexedSlices)
        assert sorted(set(grad.indices.numpy().tolist())) == looked_up
    before = emb.numpy().copy(), lin.numpy().copy()
    opt = make_optimizer("lazyadam", learning_rate=0.1)
    opt.build(variables)
    opt.apply_gradients(zip(grads, variables))
    for table, old in zip((emb, lin), before):
        changed = np.flatnonzero(np.any(table.numpy() != old, axis=1))
        assert set(changed.tolist()) <= set(looked_up) and len(changed) > 0.8 * len(looked_up)


# -- ordering: interactions beat LR on data made of an interaction ---------------------------------------
@pytest.mark.slow
def test_interaction_models_fit_the_interaction_that_lr_cannot():
    spec, ids, numeric, labels = interaction_problem(rows=2000)
    results = {}
    for kind, kw, lr in (("lr", {}, 2.0), ("fwfm", {}, 2.0), ("ffm", {"ffm_dim": 4}, 2.0), ("dcnv2", {"hidden": (16,)}, 0.5),
                         ("dcnv2", {"hidden": (16,), "cross_structure": "stacked", "cross_rank": 4}, 0.5)):
        model = make_model(ModelConfig(kind, embedding_dim=4, init_scale=0.3, seed=1, **kw), spec)
        losses = sgd_train(model, ids, numeric, labels, steps=150, lr=lr)
        assert losses[-1] < losses[0], kind
        results[f"{kind}{kw.get('cross_structure', '')}"] = (losses[-1], auc(labels, model(ids, numeric).numpy()))
    # Optimal logloss ~0.19 nats; LR stays near log(2) = 0.69 (the truth has no main effects).
    assert results["lr"][0] > 0.6 and results["lr"][1] < 0.6, results
    for name, (loss, area) in results.items():
        if name != "lr":
            assert loss < 0.35 and area > 0.9, (name, results)
