"""Numeric `mode: both`: exact-value ids + bins, identical in the converter and in an export's graph."""
from __future__ import annotations

import numpy as np
import pytest

from ctrflow.data.convert import ConvertOptions, convert
from ctrflow.data.pipeline import PipelineOptions, open_batches
from ctrflow.data.transforms import field_hash_key, hash_values, value_keys
from ctrflow.schema import CategoricalField, NumericField, Schema

SCHEMA = Schema("b", "y", (CategoricalField("c", 64),),
                (NumericField("n", mode="both", hash_buckets=512), NumericField("m")), columns=("y", "c", "n", "m"))


def _values(rng: np.random.Generator, k: int) -> list[str]:
    """Integers, negatives, fractions, huge and tiny values, integral floats written as 3.0, and missing."""
    pool = ["0", "-0", "3", "3.0", "-7", "12.5", "0.1", "1e300", "-2.5e-8", "9007199254740993", "", "42", "42.000"]
    return [pool[i] if i < len(pool) else str(int(rng.integers(0, 500))) for i in rng.integers(0, len(pool) + 20, k)]


@pytest.fixture(scope="module")
def both_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("both")
    rng = np.random.default_rng(3)
    n = _values(rng, 3000)
    lines = ["y,c,n,m"] + [f"{int(rng.random() < 0.3)},c{int(rng.integers(0, 9))},{v},{int(rng.integers(0, 90))}" for v in n]
    (root / "x.csv").write_text("\n".join(lines) + "\n")
    convert(root / "x.csv", root / "shards", schema=SCHEMA, options=ConvertOptions(workers=1))
    return root, n


def test_both_adds_an_exact_value_id_column_after_the_others(both_data):
    root, raw = both_data
    with open_batches(root / "shards", PipelineOptions(batch_size=4096, shuffle=False)) as bs:
        b = next(iter(bs))
        spec = bs.spec
    assert spec.id_names == ("c", "n", "m", "n#value")
    assert spec.id_buckets[3] == 512 and spec.active_id_columns == (0, 1, 2, 3)
    x = np.array([float(v) if v else np.nan for v in raw])
    want = hash_values(value_keys(x), 512, field_hash_key(0, "n#value"))
    np.testing.assert_array_equal(b.ids[:, 3], want)
    # 3 and 3.0 (and 42 / 42.000, 0 / -0) are one value; missing is id 0; distinct values get distinct keys.
    by_text = {v: int(i) for v, i in zip(raw, b.ids[:, 3])}
    assert by_text["3"] == by_text["3.0"] and by_text["42"] == by_text["42.000"] and by_text["0"] == by_text["-0"]
    assert by_text[""] == 0 and len({by_text[k] for k in ("3", "-7", "12.5", "0.1", "1e300", "-2.5e-8")}) == 6
    assert (b.ids[:, 1] > 0).sum() == sum(1 for v in raw if v)  # still discretized as well


def test_export_transforms_both_mode_exactly_like_the_converter(tmp_path, both_data):
    pytest.importorskip("tensorflow")
    from ctrflow.export import export
    from ctrflow.models.registry import ModelConfig
    from ctrflow.serving.predictor import Predictor, columns_from_rows
    from ctrflow.train.config import TrainConfig
    from ctrflow.train.loop import train

    root, raw = both_data
    run = tmp_path / "run"
    train(root / "shards", run, TrainConfig(model=ModelConfig("fm", embedding_dim=4), batch_size=512, max_steps=3))
    export(run, tmp_path / "m")
    p = Predictor.load(tmp_path / "m")
    text = (root / "x.csv").read_text().splitlines()[1:]
    rows = [dict(zip(("c", "n", "m"), line.split(",")[1:])) for line in text]
    rows = [{"c": r["c"], "n": float(r["n"]) if r["n"] else None, "m": float(r["m"])} for r in rows]
    ids, numeric = p.transform(columns_from_rows(rows, p.feature_names))
    with open_batches(root / "shards", PipelineOptions(batch_size=4096, shuffle=False)) as bs:
        b = next(iter(bs))
    np.testing.assert_array_equal(ids, b.ids)
    np.testing.assert_array_equal(numeric, b.numeric)
