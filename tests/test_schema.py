from __future__ import annotations

import json

import pytest

from ctrflow.errors import SchemaError
from ctrflow.schema import PRESETS, CategoricalField, NumericField, Schema, infer_schema, load_schema

from conftest import shared_file


def test_presets_have_the_documented_columns():
    c = PRESETS["criteo"]
    assert c.columns[0] == "label" and c.header is False and c.delimiter == "\t"
    assert c.numeric_names == tuple(f"I{i}" for i in range(1, 14))
    assert c.categorical_names == tuple(f"C{i}" for i in range(1, 27))
    a = PRESETS["avazu"]
    assert a.label == "click" and a.header and "id" in a.ignore and a.time == "hour"
    s = PRESETS["synthetic"]
    assert s.label == "click" and s.extras == ("true_ctr",) and s.time == "day"


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_schema_file_round_trips(tmp_path, suffix):
    s = Schema("mine", "y", (CategoricalField("a", 64),), (NumericField("n", mode="normalize", bins=8),), weight="w")
    p = tmp_path / f"s{suffix}"
    s.save(p)
    assert load_schema(p) == s
    assert load_schema(p).fingerprint() == s.fingerprint()


def test_unknown_schema_name_lists_presets():
    with pytest.raises(SchemaError, match="criteo, avazu, synthetic"):
        load_schema("critteo")


def test_bad_schema_values_are_named(tmp_path):
    with pytest.raises(SchemaError, match="hash_buckets.*'a'.*Got 1"):
        CategoricalField("a", 1)
    with pytest.raises(SchemaError, match="mode.*Got 'bucket'"):
        NumericField("n", mode="bucket")
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"label": "y", "categorical": ["a"], "colour": "red"}))
    with pytest.raises(SchemaError, match="unknown schema keys \\['colour'\\]"):
        load_schema(p)
    p.write_text("{not json")
    with pytest.raises(SchemaError, match="bad.json:1: not valid JSON"):
        load_schema(p)


def test_infer_detects_numeric_and_categorical(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("click,price,site,when\n0,1.5,a,3\n1,2,b,4\n0,,c,5\n")
    s = infer_schema(p, label="click", time="when")
    assert s.numeric_names == ("price",) and s.categorical_names == ("site",) and s.time == "when"
    with pytest.raises(SchemaError, match="'nope' is not in the header"):
        infer_schema(p, label="nope")


def test_infer_on_real_talkingdata_with_overrides():
    path = shared_file("talkingdata", "train_sample.csv")
    s = infer_schema(path, label="is_attributed", categorical=["ip", "app", "device", "os", "channel"],
                     time="click_time", ignore=["attributed_time"])
    assert s.categorical_names == ("ip", "app", "device", "os", "channel")
    assert s.numeric == () and "attributed_time" in s.ignore
