"""FFM's field-pair weights: `sum_{i<j} r_ij <v_{i,j}, v_{j,i}>`, r starting at 1 (the plain FFM), learned
at `PAIR_WEIGHT_SCALE` times the dense group's rate; optional L1 / L2 penalties on r itself (training only)."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from ctrflow.data.batch import FeatureSpec
from ctrflow.models import ModelConfig, make_model
from ctrflow.models.ffm import PAIR_WEIGHT_SCALE
from ctrflow.models.layers import ffm_interaction, ffm_partner_slots, ffm_slot_fields


def _explicit(vec: np.ndarray, r: np.ndarray) -> np.ndarray:
    """vec [B, S, S, k]: field f's vector for partner g at [:, f, g]."""
    s = vec.shape[1]
    return sum(r[i, j] * np.sum(vec[:, i, j] * vec[:, j, i], axis=1) for i in range(s) for j in range(i + 1, s))


def test_weighted_interaction_and_its_gradients_match_the_definition():
    rng = np.random.default_rng(0)
    b, s, k = 5, 4, 3
    vec = rng.normal(size=(b, s, s, k))
    r = rng.normal(size=(s, s))
    r = np.triu(r, 1) + np.triu(r, 1).T
    fields = ffm_slot_fields(s)
    rows = np.stack([vec[:, f, g] for f, g in fields], axis=1).reshape(b, s, (s - 1) * k)  # the model's row layout
    w = tf.constant([r[f, g] for f, g in fields])
    x = tf.constant(rows)
    np.testing.assert_allclose(ffm_interaction(x, s, k, w).numpy(), _explicit(vec, r), rtol=1e-6)

    up = tf.constant(rng.normal(size=b))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, w])
        fast = tf.reduce_sum(up * ffm_interaction(x, s, k, w))
        flat = tf.reshape(x, [b, s * (s - 1), k])  # the same sum through TensorFlow's own gradients
        slow = tf.reduce_sum(up * 0.5 * tf.reduce_sum(flat * tf.gather(flat, ffm_partner_slots(s), axis=1) * w[None, :, None], axis=[1, 2]))
    for a, c in zip(tape.gradient(fast, [x, w]), tape.gradient(slow, [x, w])):
        np.testing.assert_allclose(a.numpy(), c.numpy(), rtol=1e-6, atol=1e-12)


def test_pair_weights_start_as_the_plain_ffm_and_a_zero_weight_removes_its_pair():
    spec = FeatureSpec(("a", "b", "c"), (20, 10, 5))
    model = make_model(ModelConfig("ffm", ffm_dim=2, init_scale=0.5), spec)
    ids = tf.constant([[1, 2, 3], [4, 5, 1], [7, 0, 2]])
    n = model.layout.n_fields
    emb = model.embedding(ids, None)
    plain = model.linear(ids, None) + ffm_interaction(emb, n, 2)
    np.testing.assert_allclose(model(ids, None).numpy(), plain.numpy(), rtol=1e-6)
    r = model.pairs.r
    assert any(v is r for v in model.variable_groups()["dense"])
    np.testing.assert_allclose(r.numpy(), 1.0 / PAIR_WEIGHT_SCALE)
    r.assign(tf.tensor_scatter_nd_update(r, [[0, 1]], [0.0]))  # turn off pair (a, b)
    rows = tf.reshape(emb, [3, n * (n - 1), 2]).numpy()
    fields = ffm_slot_fields(n)
    ab = rows[:, fields.index((0, 1))] @ np.eye(2) * rows[:, fields.index((1, 0))]
    np.testing.assert_allclose(model(ids, None).numpy(), plain.numpy() - ab.sum(axis=1), rtol=1e-5, atol=1e-6)


def test_a_checkpoint_from_before_the_pair_weights_restores_as_the_plain_ffm(tmp_path):
    spec = FeatureSpec(("a", "b", "c"), (20, 10, 5))
    ids = tf.constant([[1, 2, 3], [4, 5, 1]])
    old = make_model(ModelConfig("ffm", ffm_dim=2, init_scale=0.5, seed=1), spec)
    old.build()
    del old.pairs  # what an FFM checkpoint written before them holds: linear and embedding tables only
    path = tf.train.Checkpoint(model=old).write(str(tmp_path / "ckpt"))
    expect = old.linear(ids, None) + ffm_interaction(old.embedding(ids, None), 3, 2)
    new = make_model(ModelConfig("ffm", ffm_dim=2, init_scale=0.5, seed=2), spec)
    new.build()
    tf.train.Checkpoint(model=new).read(path).expect_partial()  # as evaluate, export and warm starts read it
    np.testing.assert_allclose(new(ids, None).numpy(), expect.numpy(), rtol=1e-6)


def test_pair_penalties_act_on_r_itself_in_training_only(monkeypatch):
    import ctrflow.models.ffm as ffm

    l1, l2 = 0.03, 0.02
    monkeypatch.setattr(ffm, "PAIR_L1", l1)
    monkeypatch.setattr(ffm, "PAIR_L2", l2)
    spec = FeatureSpec(("a", "b", "c"), (20, 10, 5))
    model = make_model(ModelConfig("ffm", ffm_dim=2, init_scale=0.5), spec)
    r = model.pairs.r
    r.assign(tf.constant([[0.3, -0.2, 0.05], [0.7, 0.1, 0.0], [0.2, 0.4, -0.6]]))  # stored r / scale, any sign
    ids = tf.constant([[1, 2, 3], [4, 5, 1], [7, 0, 2]])
    grads, outs = {}, {}
    for training in (False, True):
        with tf.GradientTape() as tape:
            outs[training] = model(ids, None, training=training)
            loss = tf.reduce_sum(outs[training] * tf.constant([0.5, -1.0, 2.0]))
        grads[training] = tape.gradient(loss, r).numpy()
    np.testing.assert_allclose(outs[True].numpy(), outs[False].numpy(), rtol=1e-6)  # the forward value does not change
    with tf.GradientTape() as tape:  # the definition: the penalty on r = stored * scale, upper triangle only
        w = tf.linalg.band_part(r * PAIR_WEIGHT_SCALE, 0, -1) - tf.linalg.band_part(r * PAIR_WEIGHT_SCALE, 0, 0)
        penalty = l1 * tf.reduce_sum(tf.abs(w)) + l2 * tf.reduce_sum(w * w)
    np.testing.assert_allclose(grads[True], grads[False] + tape.gradient(penalty, r).numpy(), rtol=1e-5, atol=1e-7)
    assert np.abs(grads[True] - grads[False]).max() > 0.1  # the penalty moved something (scale x l1 = 0.3)


def test_a_pair_started_at_zero_stays_off_through_training(monkeypatch):
    """Two-stage selection's stage 2: `PAIR_START` with 0 for the dropped pairs; their r gets no gradient and stays
    exactly 0 under the default optimizers (L2 included), their vectors get none and never enter the logit."""
    import ctrflow.models.ffm as ffm
    from ctrflow.train.config import TrainConfig
    from ctrflow.train.core import make_optimizers, training_step

    start = np.array([[0.0, 2.0, 0.0], [0.0, 0.0, 0.5], [0.0, 0.0, 0.0]])  # (a, c) off
    monkeypatch.setattr(ffm, "PAIR_START", start)
    spec = FeatureSpec(("a", "b", "c"), (20, 10, 5))
    model = make_model(ModelConfig("ffm", ffm_dim=2, init_scale=0.5), spec)
    np.testing.assert_allclose(model.pairs.r.numpy() * PAIR_WEIGHT_SCALE, start, rtol=1e-6)
    groups = model.variable_groups()
    owner = {v.ref(): g for g, vs in groups.items() for v in vs}
    opt = make_optimizers(TrainConfig(), groups, lambda v: owner[v.ref()])
    variables = [v for vs in groups.values() for v in vs]
    rng = np.random.default_rng(0)
    ids = tf.constant(np.stack([rng.integers(0, b, 64) for b in (20, 10, 5)], axis=1), tf.int32)
    label = tf.constant(rng.integers(0, 2, 64), tf.float32)
    emb = groups["embedding"][0]
    before = emb.numpy()
    for _ in range(3):
        training_step(model, opt, variables, ids, None, label, tf.ones([64]))
    r = model.pairs.r.numpy() * PAIR_WEIGHT_SCALE
    assert r[0, 2] == 0.0 and r[0, 1] != 2.0 and r[1, 2] != 0.5  # the kept pairs learn, the dropped one stays 0
    a_rows, c_rows = ids[:, 0].numpy(), 20 + 10 + ids[:, 2].numpy()  # shared table: a's, b's, c's rows end to end
    # field a's vector for c is its row's slot 1; field c's vector for a is slot 0: no step may have reached them
    # other than the L2 decay toward 0 (a pair's vectors count only through a nonzero r)
    for rows, slot in ((a_rows, 1), (c_rows, 0)):
        moved, was = emb.numpy()[rows, slot * 2:(slot + 1) * 2], before[rows, slot * 2:(slot + 1) * 2]
        assert np.all(np.abs(moved) <= np.abs(was) + 1e-7)
    with np.testing.assert_raises(Exception):
        monkeypatch.setattr(ffm, "PAIR_START", np.ones((2, 2)))
        make_model(ModelConfig("ffm", ffm_dim=2), spec)
