"""The raw path computes through `serving_packed` (two matrices) when the export has it, and scores exactly
like the per-field `serving_default` call; exports without it still serve through the per-field function."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tensorflow as tf

import serving_fixtures as sf
from serving_fixtures import columns

from ctrflow.serving.batcher import BatchingOptions
from ctrflow.serving.predictor import Predictor


@pytest.fixture(scope="module")
def model():
    _, version, rows = sf.small_model()
    return version, rows


def _per_field(p: Predictor, feats: dict) -> np.ndarray:
    """serving_default called the pre-packed way: one tensor per field."""
    inputs = p.prepare(feats)
    out = p._loaded.signatures["serving_default"](**{p._inputs[n]: tf.constant(inputs[n]) for n in p.feature_names})
    return out["probabilities"].numpy()


def test_packed_scores_equal_per_field(model):
    version, rows = model
    feats = columns(rows[:300])
    # Tokens of every accepted kind and missing values: the packing must not change their conversion.
    feats["C1"] = [None, b"x", 7, float("nan"), *feats["C1"][4:]]
    feats["I1"] = [None, 2, 3.5, float("nan"), *feats["I1"][4:]]
    with Predictor.load(version) as p:
        assert p._packed_signature is not None
        expected = _per_field(p, feats)
        np.testing.assert_array_equal(p.predict(feats), expected)
        outs = p.predict_outputs(feats)
        assert set(outs) == {"probabilities", "logits"}
        np.testing.assert_array_equal(outs["probabilities"], expected)
    with Predictor.load(version, batching=BatchingOptions(max_batch_size=128, batch_timeout_ms=1)) as p:
        np.testing.assert_array_equal(p.predict(feats, timeout_ms=10_000), expected)


def test_export_without_packed_signature_serves_per_field(model):
    version, rows = model
    feats = columns(rows[:50])
    with Predictor.load(version) as p:
        packed = p.predict(feats)
        p._packed_signature = None  # what an export from before serving_packed restores as
        np.testing.assert_array_equal(p.predict(feats), packed)


def test_bytes_columns_of_any_width_batch_with_objects_and_score_alike(model):
    """Binary bodies' fixed-width 'S' columns stay bytes through prepare, the batcher and the packed call:
    requests of different widths (and a JSON-like request of str objects) merged in one batch score as
    each scores alone through objects — a merge buffer of the first request's width would cut values."""
    version, rows = model
    base = columns(rows[:60])
    names = None
    with Predictor.load(version, batching=BatchingOptions(max_batch_size=4096, batch_timeout_ms=200)) as p:
        names = p.categorical_names
        short, wide, plain = ({k: v[i * 20:(i + 1) * 20] for k, v in base.items()} for i in range(3))
        for feats, pad in ((short, 0), (wide, 9)):
            for k in names:
                feats[k] = np.array([str(v).encode() + b"z" * pad for v in feats[k]], dtype="S")
        alone = [p._compute(p.prepare({k: (v.astype(object) if getattr(v, "dtype", None) is not None and v.dtype.kind == "S" else v) for k, v in f.items()}))
                 for f in (short, wide, plain)]
        assert p.prepare(short)[names[0]].dtype.kind == "S"

        async def together():
            return await asyncio.gather(*(p.apredict(f, timeout_ms=10_000) for f in (short, wide, plain)))

        got = asyncio.run(together())
        assert p.batcher.stats().compute_calls == 1  # merged: one call
        col = p._p_index
    for g, a in zip(got, alone):
        np.testing.assert_allclose(g, a[:, col], rtol=0, atol=1e-6)
