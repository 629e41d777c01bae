"""Context + candidates scoring (`CtrModel.call_context`) gives the flat model's logits, for every model kind.

Variables are set to random values (embeddings, linear weights, dense layers, normalization and
batch-norm statistics) so that every term of every model matters; context rows are shared by several
candidates through `row`, as a served bid request shares them.
"""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from ctrflow.data.batch import FeatureSpec
from ctrflow.models import MODEL_KINDS, ModelConfig, make_model

# ids columns: a, b, c (categoricals), n1, n2 (discretized numerics), n1#value (n1 in mode 'both');
# numeric columns: n1, n2; n2 enters normalized (its id column is then unused).
SPEC = FeatureSpec(("a", "b", "c", "n1", "n2", "n1#value"), (50, 40, 30, 6, 6, 20), ("n1", "n2"), ("n2",))

CONFIGS = [
    ModelConfig("lr"),
    ModelConfig("fm", embedding_dim=4),
    ModelConfig("fwfm", embedding_dim=4),
    ModelConfig("ffm", ffm_dim=3),
    ModelConfig("deepfm", embedding_dim=4, hidden=(8, 5)),
    ModelConfig("deepfm", embedding_dim=4, hidden=(), table_mode="per_field"),
    ModelConfig("deepfm", embedding_dim=4, hidden=(6,), batch_norm=True),
    ModelConfig("dcnv2", embedding_dim=4, hidden=(8,), cross_layers=2, cross_rank=3),
    ModelConfig("dcnv2", embedding_dim=4, hidden=(8,), cross_layers=2, cross_rank=None, cross_structure="parallel"),
    ModelConfig("dcnv2", embedding_dim=4, hidden=(), cross_layers=1, cross_structure="parallel", table_mode="per_field"),
]

# (context id columns, context numeric columns): the fields a + n1 (its id, its exact-value id and its
# value), or b + n2 (a normalized numeric in the context), or all but one field.
SPLITS = [((0, 3, 5), (0,)), ((1, 4), (1,)), ((0, 1, 2, 3, 5), (0,))]


def _randomize(model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for v in model.variables:
        name = v.name
        if "count" in name:
            v.assign(tf.constant(10.0, v.dtype))
        elif "variance" in name or "bn_var" in name:
            v.assign(rng.uniform(0.5, 2.0, v.shape).astype(v.dtype.as_numpy_dtype))
        else:
            v.assign(rng.normal(0.0, 0.3, v.shape).astype(v.dtype.as_numpy_dtype))


def _inputs(rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    ids = np.stack([rng.integers(0, b, rows) for b in SPEC.id_buckets], axis=1).astype(np.int32)
    return ids, rng.normal(0.0, 2.0, (rows, 2)).astype(np.float32)


def test_every_model_kind_is_covered():
    assert {c.kind for c in CONFIGS} == set(MODEL_KINDS)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.kind}-{c.table_mode}-{len(c.hidden)}-{c.cross_structure}")
@pytest.mark.parametrize("split_cols", SPLITS, ids=["a+n1", "b+n2", "all-but-one"])
def test_context_call_equals_flat_call(config, split_cols):
    model = make_model(config, SPEC)
    _randomize(model, seed=len(config.kind))
    split = model.context_split(*split_cols)
    rng = np.random.default_rng(3)
    r, m = 3, 11
    ctx_ids, ctx_num = _inputs(r, rng)
    cand_ids, cand_num = _inputs(m, rng)
    row = rng.integers(0, r, m).astype(np.int32)
    row[:3] = [0, 1, 2]
    ci, cn = list(split.context.id_inputs), list(split.context.numeric_inputs)
    ki, kn = list(split.candidate.id_inputs), list(split.candidate.numeric_inputs)
    flat_ids, flat_num = cand_ids.copy(), cand_num.copy()
    flat_ids[:, ci] = ctx_ids[row][:, ci]
    flat_num[:, cn] = ctx_num[row][:, cn]
    want = model(flat_ids, flat_num).numpy()
    got = model.call_context(split, ctx_ids[:, ci], ctx_num[:, cn], cand_ids[:, ki], cand_num[:, kn], row).numpy()
    assert got.shape == (m,)
    assert np.std(want) > 1e-3  # the random weights make candidates differ: the comparison means something
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    if model.pack_tables():  # packed exports: one gather per id, the same answers
        np.testing.assert_allclose(model(flat_ids, flat_num).numpy(), want, rtol=1e-5, atol=1e-5)
        got = model.call_context(split, ctx_ids[:, ci], ctx_num[:, cn], cand_ids[:, ki], cand_num[:, kn], row).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_context_split_rejects_out_of_range_columns():
    from ctrflow.errors import ConfigError

    model = make_model(ModelConfig("lr"), SPEC)
    with pytest.raises(ConfigError, match="out of range"):
        model.context_split((0, 9), ())
