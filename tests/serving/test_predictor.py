"""The in-process predictor on real exports: validation, batching, errors."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ctrflow.errors import ModelNotFoundError, SchemaError
from ctrflow.export import export
from ctrflow.serving.batcher import BatchingOptions
from ctrflow.serving.predictor import Predictor, columns_from_rows

from conftest import raw_rows


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_run):
    run, train_dir, _ = trained_run
    base = tmp_path_factory.mktemp("models") / "ctr"
    export(run, base)
    return base, raw_rows(train_dir.parent / "train.csv", 2000)


def test_batched_concurrent_requests_score_like_one_call(exported):
    base, rows = exported
    plain = Predictor.load(base)
    names = plain.feature_names
    expected = plain.predict(columns_from_rows(rows, names))
    with Predictor.load(base, batching=BatchingOptions(max_batch_size=512, batch_timeout_ms=5)) as p:
        p.warmup()
        chunks = [rows[i : i + 100] for i in range(0, len(rows), 100)]
        with ThreadPoolExecutor(8) as ex:
            got = list(ex.map(lambda c: p.predict(columns_from_rows(c, names), timeout_ms=10_000), chunks))
        stats = p.stats()
    np.testing.assert_allclose(np.concatenate(got), expected, rtol=1e-5, atol=1e-7)
    assert stats["predictions"] == 2000 and stats["compute_calls"] < len(chunks)


def test_bad_requests_name_the_problem(exported):
    base, rows = exported
    p = Predictor.load(base)
    feats = columns_from_rows(rows[:3], p.feature_names)
    with pytest.raises(SchemaError, match=r"missing features \['C1'\]"):
        p.predict({k: v for k, v in feats.items() if k != "C1"})
    with pytest.raises(SchemaError, match=r"unknown features \['colour'\]"):
        p.predict({**feats, "colour": ["red"] * 3})
    with pytest.raises(SchemaError, match="'I1' row 1: 'abc' is not a number"):
        p.predict({**feats, "I1": [1.0, "abc", None]})
    with pytest.raises(SchemaError, match="has 2 values, others have 3"):
        p.predict({**feats, "C3": ["a", "b"]})
    with pytest.raises(SchemaError, match="no candidates"):
        p.predict({k: [] for k in feats})
    with pytest.raises(SchemaError, match="instance 1: missing features"):
        columns_from_rows([rows[0], {"C1": "x"}], p.feature_names)
    with pytest.raises(ModelNotFoundError, match="no complete model version"):
        Predictor.load(base.parent / "nothing-here")


def test_tokens_given_as_numbers_hash_like_their_text(exported):
    base, rows = exported
    p = Predictor.load(base)
    feats = columns_from_rows(rows[:4], p.feature_names)
    as_text = {**feats, "C6": ["12", "7", "", "3"]}
    as_numbers = {**feats, "C6": [12, 7.0, None, "3"]}
    np.testing.assert_array_equal(p.transform(as_text)[0], p.transform(as_numbers)[0])
