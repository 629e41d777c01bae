"""Tests for ctrflow/models: LR, FM, DeepFM over the Batch layout, tables, normalization, configs."""
from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
import tensorflow as tf

from ctrflow.data.batch import FeatureSpec
from ctrflow.errors import ConfigError
from ctrflow.models import (
    MODELS,
    TABLE_MODES,
    ModelConfig,
    OnlineNormalizer,
    fm_interaction,
    make_model,
)
from ctrflow.models.layers import make_table, normal_initializer
from ctrflow.train.metrics import auc

# Two categoricals, one discretized numeric ("price": its id column is read), one normalized numeric
# ("age": its id column is ignored, its value enters the model).
SPEC = FeatureSpec(
    id_names=("site", "app", "hour", "price", "age"),
    id_buckets=(50, 30, 24, 6, 6),
    numeric_names=("price", "age"),
    normalized_numeric=("age",),
)
KINDS = sorted(MODELS)
SMALL = dict(embedding_dim=4, hidden=(16, 8))


def random_inputs(spec: FeatureSpec, rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.integers(0, b, rows) for b in spec.id_buckets], axis=1).astype(np.int32)
    numeric = rng.normal(2.0, 3.0, size=(rows, len(spec.numeric_names))).astype(np.float32)
    return ids, numeric


def sgd_train(model, ids, numeric, labels, *, steps: int, lr: float) -> list[float]:
    """Plain full-batch gradient descent: scatter updates for IndexedSlices, dense updates otherwise."""
    variables = model.trainable_variables

    @tf.function
    def step(ids, numeric, labels):
        with tf.GradientTape() as tape:
            logits = model(ids, numeric, training=True)
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))
        for var, grad in zip(variables, tape.gradient(loss, variables)):
            if isinstance(grad, tf.IndexedSlices):
                var.scatter_sub(tf.IndexedSlices(lr * grad.values, grad.indices))
            else:
                var.assign_sub(lr * grad)
        return loss

    return [float(step(ids, numeric, labels)) for _ in range(steps)]


# -- forward pass ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,table_mode", list(itertools.product(KINDS, TABLE_MODES)))
def test_forward_gives_finite_logits_per_row(kind, table_mode):
    model = make_model(ModelConfig(kind, table_mode=table_mode, **SMALL), SPEC)
    ids, numeric = random_inputs(SPEC, 64)
    for training in (False, True):
        logits = model(ids, numeric, training=training)
        assert logits.shape == (64,) and logits.dtype == tf.float32
        assert np.isfinite(logits.numpy()).all()


def test_model_without_numerics_accepts_numeric_none():
    spec = FeatureSpec(("site", "app"), (10, 10))
    model = make_model(ModelConfig("fm", **SMALL), spec)
    assert model(np.array([[1, 2], [0, 9]], np.int32)).shape == (2,)


def test_missing_numeric_input_names_the_fields():
    model = make_model(ModelConfig("lr"), SPEC)
    ids, _ = random_inputs(SPEC, 4)
    with pytest.raises(ConfigError, match="age"):
        model(ids, None)


def test_spec_without_any_field_is_rejected():
    with pytest.raises(ConfigError, match="at least one input field"):
        make_model(ModelConfig("lr"), FeatureSpec((), ()))


def test_normalized_numeric_ignores_its_id_column():
    model = make_model(ModelConfig("fm", **SMALL), SPEC)
    ids, numeric = random_inputs(SPEC, 16)
    other = ids.copy()
    other[:, 4] = (other[:, 4] + 1) % 6  # the "age" id column
    np.testing.assert_array_equal(model(ids, numeric).numpy(), model(other, numeric).numpy())


# -- variables and gradients ----------------------------------------------------------------------
@pytest.mark.parametrize("kind,table_mode", list(itertools.product(KINDS, TABLE_MODES)))
def test_table_gradients_are_indexed_slices_and_groups_partition_variables(kind, table_mode):
    model = make_model(ModelConfig(kind, table_mode=table_mode, batch_norm=True, **SMALL), SPEC)
    ids, numeric = random_inputs(SPEC, 32)
    groups = model.variable_groups()
    assert set(groups) == {"linear", "embedding", "dense"}
    grouped = [v.ref() for vs in groups.values() for v in vs]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {v.ref() for v in model.trainable_variables}
    assert groups["linear"] and (kind == "lr") == (not groups["embedding"])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(ids, numeric, training=True))
    grads = tape.gradient(loss, groups)
    for grad in grads["linear"] + grads["embedding"]:
        assert isinstance(grad, tf.IndexedSlices)
    for grad in grads["dense"]:
        assert isinstance(grad, tf.Tensor)


@pytest.mark.parametrize("kind,table_mode", list(itertools.product(KINDS, TABLE_MODES)))
def test_variable_names_are_unique_and_stable_for_optimizer_slots(kind, table_mode):
    # Field names that clean to the same variable name, and one named like the numerics' table.
    spec = FeatureSpec(("a b", "a_b", "normalized_numeric", "x"), (5, 5, 5, 5), ("x",), ("x",))
    config = ModelConfig(kind, table_mode=table_mode, batch_norm=True, **SMALL)
    names = [v.name for v in make_model(config, spec).variables]
    assert len(names) == len(set(names))
    assert names == [v.name for v in make_model(config, spec).variables]


def test_shared_table_has_one_row_block_per_field_and_per_field_mode_one_table_each():
    shared = make_model(ModelConfig("fm", table_mode="shared", **SMALL), SPEC)
    per_field = make_model(ModelConfig("fm", table_mode="per_field", **SMALL), SPEC)
    # site, app, hour, price buckets + 1 row for the normalized "age".
    assert [v.shape.as_list() for v in shared.variable_groups()["embedding"]] == [[50 + 30 + 24 + 6 + 1, 4]]
    assert [v.shape.as_list() for v in per_field.variable_groups()["embedding"]] == [
        [50, 4], [30, 4], [24, 4], [6, 4], [1, 4]
    ]
    assert [v.shape.as_list() for v in shared.variable_groups()["linear"]] == [[111, 1]]


@pytest.mark.parametrize("kind", ["fm", "deepfm"])
def test_shared_and_per_field_tables_compute_the_same_function(kind):
    shared = make_model(ModelConfig(kind, table_mode="shared", **SMALL), SPEC)
    per_field = make_model(ModelConfig(kind, table_mode="per_field", **SMALL), SPEC)
    for group in ("linear", "embedding"):
        (table,) = shared.variable_groups()[group]
        table.assign(tf.random.normal(table.shape, seed=1))
        start = 0
        for part in per_field.variable_groups()[group]:
            part.assign(table[start : start + part.shape[0]])
            start += part.shape[0]
        assert start == table.shape[0]
    ids, numeric = random_inputs(SPEC, 32)
    np.testing.assert_allclose(shared(ids, numeric).numpy(), per_field(ids, numeric).numpy(), rtol=1e-5, atol=1e-5)


def test_same_seed_same_initial_variables_and_other_seed_differs():
    a = make_model(ModelConfig("deepfm", seed=3, **SMALL), SPEC)
    b = make_model(ModelConfig("deepfm", seed=3, **SMALL), SPEC)
    c = make_model(ModelConfig("deepfm", seed=4, **SMALL), SPEC)
    for va, vb in zip(a.trainable_variables, b.trainable_variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    (ea,), (ec,) = a.variable_groups()["embedding"], c.variable_groups()["embedding"]
    assert not np.allclose(ea.numpy(), ec.numpy())
    assert np.std(ea.numpy()) == pytest.approx(0.01, rel=0.2)


def test_table_initializer_gives_the_same_rows_for_any_partition():
    init = normal_initializer(0.01, seed=0, salt="t")
    table = make_table("t", 200_000, 3, init)
    part = init([200_000, 3], tf.float32, partition_shape=(70_000, 3), partition_offset=(60_000, 0))
    np.testing.assert_array_equal(part.numpy(), table[60_000:130_000].numpy())


def test_multi_million_row_table_looks_up_its_last_rows():
    spec = FeatureSpec(("user", "ad"), (2_000_000, 1_000_000))
    model = make_model(ModelConfig("fm", embedding_dim=2), spec)
    (table,) = model.variable_groups()["embedding"]
    assert table.shape == (3_000_000, 2)
    ids = np.array([[1_999_999, 999_999]], np.int32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(ids))
    grad = tape.gradient(loss, table)
    assert sorted(grad.indices.numpy().tolist()) == [1_999_999, 2_999_999]


# -- FM interaction -------------------------------------------------------------------------------
def test_fm_interaction_equals_pairwise_dot_products():
    emb = np.random.default_rng(0).normal(size=(5, 7, 3)).astype(np.float32)
    expected = [
        sum(emb[b, i] @ emb[b, j] for i in range(7) for j in range(i + 1, 7)) for b in range(5)
    ]
    np.testing.assert_allclose(fm_interaction(tf.constant(emb)).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_fm_model_logit_is_linear_plus_pairwise_interactions_of_field_vectors():
    model = make_model(ModelConfig("fm", table_mode="shared", **SMALL), SPEC)
    (lin,), (emb,) = model.variable_groups()["linear"], model.variable_groups()["embedding"]
    lin.assign(tf.random.normal(lin.shape, seed=2))
    emb.assign(tf.random.normal(emb.shape, seed=3))
    ids, numeric = random_inputs(SPEC, 8)
    logits = model(ids, numeric).numpy()
    offsets = np.cumsum([0, 50, 30, 24])  # site, app, hour, price; age's row is last (110)
    norm = model.normalizer
    age = (numeric[:, 1] - norm.mean.numpy()[0]) / np.sqrt(norm.variance.numpy()[0] + norm.epsilon)
    L, E = lin.numpy()[:, 0], emb.numpy()
    for b in range(8):
        rows = [offsets[f] + ids[b, f] for f in range(4)]
        vectors = [E[r] for r in rows] + [age[b] * E[110]]
        linear = sum(L[r] for r in rows) + age[b] * L[110] + model.linear.bias.numpy()
        pairs = sum(vectors[i] @ vectors[j] for i in range(5) for j in range(i + 1, 5))
        assert logits[b] == pytest.approx(linear + pairs, rel=1e-4, abs=1e-5)


# -- online normalization -------------------------------------------------------------------------
def test_online_normalization_converges_to_data_stats_in_training_and_freezes_in_inference():
    rng = np.random.default_rng(0)
    data = rng.normal([3.0, -1.0], [2.0, 0.5], size=(5000, 2)).astype(np.float32)
    norm = OnlineNormalizer(2)
    for start in range(0, 5000, 128):  # uneven last batch on purpose
        norm(tf.constant(data[start : start + 128]), training=True)
    np.testing.assert_allclose(norm.mean.numpy(), data.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(norm.variance.numpy(), data.astype(np.float64).var(0), rtol=1e-6)
    assert norm.count.numpy() == 5000
    frozen = [v.numpy().copy() for v in (norm.count, norm.mean, norm.variance)]
    out = norm(tf.constant(data[:10] + 100.0), training=False)
    for before, var in zip(frozen, (norm.count, norm.mean, norm.variance)):
        np.testing.assert_array_equal(before, var.numpy())
    expected = (data[:10] + 100.0 - frozen[1]) / np.sqrt(frozen[2] + norm.epsilon)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5)
    norm(tf.zeros([0, 2]), training=True)  # an empty batch changes nothing
    np.testing.assert_array_equal(frozen[1], norm.mean.numpy())


def test_online_normalization_with_momentum_follows_drifting_data():
    norm = OnlineNormalizer(1, momentum=0.9)
    for _ in range(100):
        norm(tf.fill([64, 1], 1.0), training=True)
    for _ in range(100):
        norm(tf.fill([64, 1], 5.0), training=True)
    assert norm.mean.numpy()[0] == pytest.approx(5.0, abs=1e-3)


def test_model_updates_normalization_only_in_training_mode():
    model = make_model(ModelConfig("lr"), SPEC)
    ids, numeric = random_inputs(SPEC, 256)
    model(ids, numeric, training=False)
    assert model.normalizer.count.numpy() == 0
    model(ids, numeric, training=True)
    assert model.normalizer.count.numpy() == 256
    assert model.normalizer.mean.numpy()[0] == pytest.approx(numeric[:, 1].mean(), rel=1e-5)
    assert {v.ref() for v in model.non_trainable_state()} == {
        v.ref() for v in (model.normalizer.count, model.normalizer.mean, model.normalizer.variance)
    }


# -- DeepFM specifics -----------------------------------------------------------------------------
def test_deepfm_dropout_applies_only_in_training_and_batch_norm_stats_move_only_in_training():
    model = make_model(ModelConfig("deepfm", dropout=0.5, batch_norm=True, init_scale=0.5, **SMALL), SPEC)
    ids, numeric = random_inputs(SPEC, 64)
    moving = [v for v in model.non_trainable_state() if "bn_mean" in v.name]
    assert len(moving) == 2
    first = model(ids, numeric).numpy()
    np.testing.assert_array_equal(first, model(ids, numeric).numpy())
    before = moving[0].numpy().copy()
    model(ids, numeric).numpy()
    np.testing.assert_array_equal(before, moving[0].numpy())
    a = model(ids, numeric, training=True).numpy()
    b = model(ids, numeric, training=True).numpy()
    assert not np.allclose(a, b)  # different dropout masks
    assert not np.allclose(before, moving[0].numpy())


# -- training -------------------------------------------------------------------------------------
def interaction_problem(rows: int = 4000, seed: int = 0):
    """Clicks depend only on a pairwise interaction: logit = 3 * s[a] * t[b], no main effects."""
    rng = np.random.default_rng(seed)
    spec = FeatureSpec(("a", "b", "noise", "x"), (9, 9, 20, 4), ("x",), ("x",))
    balanced = np.array([1.0] * 4 + [-1.0] * 4)  # half of each sign: no main effect to learn
    s = np.concatenate(([0.0], rng.permutation(balanced)))
    t = np.concatenate(([0.0], rng.permutation(balanced)))
    a, b = rng.integers(1, 9, rows), rng.integers(1, 9, rows)
    ids = np.stack([a, b, rng.integers(0, 20, rows), np.zeros(rows)], axis=1).astype(np.int32)
    numeric = rng.normal(5.0, 2.0, (rows, 1)).astype(np.float32)
    labels = (rng.random(rows) < 1 / (1 + np.exp(-3.0 * s[a] * t[b]))).astype(np.float32)
    return spec, ids, numeric, labels


def test_sgd_decreases_loss_and_fm_fits_the_interaction_that_lr_cannot():
    spec, ids, numeric, labels = interaction_problem()
    results = {}
    for kind in ("lr", "fm", "deepfm"):
        model = make_model(ModelConfig(kind, embedding_dim=4, hidden=(16,), init_scale=0.3, seed=1), spec)
        losses = sgd_train(model, ids, numeric, labels, steps=300, lr=2.0 if kind != "deepfm" else 0.5)
        assert losses[-1] < losses[0]
        results[kind] = (losses[-1], auc(labels, model(ids, numeric).numpy()))
    # Optimal logloss here is ~0.19 nats; LR stays near log(2) = 0.69 (no main effects to learn).
    assert results["lr"][0] > 0.6 and results["lr"][1] < 0.6
    assert results["fm"][0] < 0.35 and results["fm"][1] > 0.9
    assert results["deepfm"][0] < 0.35 and results["deepfm"][1] > 0.9


# -- saving and serving ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_round_trips_predictions(kind, tmp_path):
    config = ModelConfig(kind, batch_norm=True, **SMALL)
    model = make_model(config, SPEC)
    ids, numeric = random_inputs(SPEC, 64)
    labels = (np.random.default_rng(0).random(64) < 0.3).astype(np.float32)
    sgd_train(model, ids, numeric, labels, steps=3, lr=0.5)  # moves tables and statistics off init
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    restored = make_model(ModelConfig.from_dict({**config.to_dict(), "seed": 9}), SPEC)
    assert not np.allclose(restored(ids, numeric).numpy(), model(ids, numeric).numpy())
    tf.train.Checkpoint(model=restored).restore(path).assert_existing_objects_matched()
    np.testing.assert_allclose(restored(ids, numeric).numpy(), model(ids, numeric).numpy(), rtol=1e-6)
    for a, b in zip(model.non_trainable_state(), restored.non_trainable_state()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_serving_concrete_function_accepts_any_batch_size():
    model = make_model(ModelConfig("deepfm", **SMALL), SPEC)
    serve = tf.function(lambda ids, numeric: tf.sigmoid(model(ids, numeric)), input_signature=model.input_signature)
    concrete = serve.get_concrete_function()
    assert model.input_signature[0].shape.as_list() == [None, 5]
    assert model.input_signature[1].shape.as_list() == [None, 2]
    for rows in (1, 17):
        ids, numeric = random_inputs(SPEC, rows)
        np.testing.assert_allclose(
            concrete(tf.constant(ids), tf.constant(numeric)).numpy(),
            tf.sigmoid(model(ids, numeric)).numpy(),
            rtol=1e-6,
        )


def test_first_call_inside_tf_function_builds_the_model():
    model = MODELS["deepfm"](ModelConfig("deepfm", batch_norm=True, **SMALL), SPEC)
    assert not model.built
    ids, numeric = random_inputs(SPEC, 8)
    logits = tf.function(lambda i, n: model(i, n, training=True))(ids, numeric)
    assert model.built and logits.shape == (8,)
    np.testing.assert_allclose(model.normalizer.count.numpy(), 8)


# -- config ---------------------------------------------------------------------------------------
def test_config_round_trips_through_dict_and_json():
    config = ModelConfig("deepfm", embedding_dim=8, hidden=(64, 32), dropout=0.1, batch_norm=True,
                         table_mode="per_field", init_scale=0.05, seed=7, norm_momentum=0.99)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert ModelConfig.from_dict({"kind": "fm"}) == ModelConfig("fm")
    assert ModelConfig("deepfm", hidden=[8, 4]).hidden == (8, 4)


def test_unknown_kind_error_lists_valid_kinds_and_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"'kind'.*'lr', 'fm', 'fwfm', 'ffm', 'deepfm', 'dcnv2'.*'xgboost'") as e:
        ModelConfig("xgboost")
    assert "Did you mean" not in str(e.value)
    with pytest.raises(ConfigError, match="Did you mean 'dcnv2'"):
        ModelConfig("dcn2")
    with pytest.raises(ConfigError, match="deepfm"):
        make_model(ModelConfig.from_dict({"kind": "gbdt"}), SPEC)


@pytest.mark.parametrize(
    "field,value",
    [("embedding_dim", 0), ("hidden", (8, 0)), ("dropout", 1.0), ("table_mode", "sharded"),
     ("init_scale", 0.0), ("seed", -1), ("norm_momentum", 1.0), ("batch_norm", "yes"), ("cross_layers", 0),
     ("cross_structure", "serial"), ("cross_rank", 0), ("ffm_dim", 0), ("dropout", -0.1)],
)
def test_invalid_config_values_name_the_parameter_and_value(field, value):
    with pytest.raises(ConfigError, match=re.escape(f"'{field}' parameter") + ".*" + re.escape(f"Got {value!r}")):
        ModelConfig("fm", **{field: value})


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="embeding_dim.*Did you mean 'embeding_dim' -> 'embedding_dim'"):
        ModelConfig.from_dict({"kind": "fm", "embeding_dim": 8})
