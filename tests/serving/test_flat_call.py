"""The batchers' compute calls the restored signatures below TensorFlow's Python argument binding
(`_flat_caller`): the same scores, bit for bit, as the signature's own call; anything that is not a
restored signature (or lacks the internals) falls back to being called as it is."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import serving_fixtures as sf
from serving_fixtures import columns

from ctrflow.serving.predictor import Predictor, _flat_caller


@pytest.fixture(scope="module")
def model():
    _, version, rows = sf.small_model()
    return version, rows


def test_flat_calls_score_like_the_signatures(model):
    version, rows = model
    feats = columns(rows[:200])
    with Predictor.load(version) as p:
        ids_sig, packed_sig = p._ids_signature, p._packed_signature
        assert p._flat[id(ids_sig)] is not ids_sig and p._flat[id(packed_sig)] is not packed_sig  # the flat call is used
        ids, numeric = p.transform(feats)
        got = p.compute_ids(ids, numeric)
        want = ids_sig(ids=tf.constant(ids), numeric=tf.constant(numeric))["probabilities"].numpy()
        np.testing.assert_array_equal(got, want)
        raw = p.predict(feats)
        p._flat = {}  # the signatures' own calls
        np.testing.assert_array_equal(p.predict(feats), raw)
        np.testing.assert_array_equal(p.compute_ids(ids, numeric), got)


def test_flat_caller_falls_back_to_the_callable_itself():
    def not_a_signature(**tensors):
        return tensors

    assert _flat_caller(not_a_signature) is not_a_signature


def test_aligned_inputs_are_shared_with_tensorflow_and_score_the_same(model):
    from ctrflow.serving.batcher import _aligned_empty
    from ctrflow.serving.predictor import _tensor

    version, rows = model
    with Predictor.load(version) as p:
        ids, numeric = p.transform(columns(rows[:300]))
        ids, numeric = np.ascontiguousarray(ids, np.int32), np.ascontiguousarray(numeric, np.float32)
        shared_ids, shared_num = _aligned_empty(ids.shape, ids.dtype), _aligned_empty(numeric.shape, numeric.dtype)
        shared_ids[:], shared_num[:] = ids, numeric
        t = _tensor(tf, shared_ids)
        shared_ids[0, 0] += 1  # the tensor is a view of the array (DLPack), not a copy
        assert int(t.numpy()[0, 0]) == int(ids[0, 0]) + 1
        shared_ids[0, 0] -= 1
        unaligned = np.empty(ids.size + 1, np.int32)[1:].reshape(ids.shape)  # 4 bytes off: never shared
        unaligned[:] = ids
        assert unaligned.ctypes.data % 64 and int(_tensor(tf, unaligned).numpy()[0, 0]) == int(ids[0, 0])
        want = p.compute_ids(ids, numeric)
        np.testing.assert_array_equal(p.compute_ids(shared_ids, shared_num), want)
        np.testing.assert_array_equal(p.compute_ids(unaligned, numeric), want)
        np.testing.assert_array_equal(shared_ids, ids)  # inputs left as they were
        np.testing.assert_array_equal(shared_num, numeric)
