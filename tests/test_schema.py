from __future__ import annotations

import json

import numpy as np

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


def test_header_without_columns_takes_the_files_header_or_says_what_is_missing(tmp_path):
    from ctrflow.data.convert import ConvertOptions, convert
    from ctrflow.errors import SchemaError as SE

    p = tmp_path / "x.csv"
    p.write_text("when,site,y,price\n1,a,1,3\n2,b,0,\n")
    f = tmp_path / "s.yaml"
    f.write_text("label: y\ncategorical: [site]\nnumeric: [price]\nheader: true\n")
    s = convert(p, tmp_path / "out", schema=str(f), options=ConvertOptions(workers=1))
    assert s.rows == 2
    f.write_text("label: y\ncategorical: [site, ad]\nheader: true\n")
    with pytest.raises(SE, match=r"lacks its columns \['ad'\]"):
        convert(p, tmp_path / "out2", schema=str(f), options=ConvertOptions(workers=1))
    f.write_text("label: y\ncategorical: [site]\nnumeric: [price]\nweight: 1e-3\n")  # YAML 1.2: a number, not a string
    with pytest.raises(SE, match="s.yaml"):
        load_schema(f)


def test_inference_knows_ad_logs_and_says_why(tmp_path):
    from ctrflow.schema import explain_schema

    rng = np.random.default_rng(0)
    n = 4000
    y = (rng.random(n) < 0.05).astype(int)
    rows = ["ip,app,hour,price,amount,when,conv_time,y"]
    for i in range(n):
        rows.append(f"{rng.integers(0, 5000)},{rng.integers(0, 40)},{rng.integers(0, 24)},{rng.random() * 10:.3f},"
                    f"{i * 7919},2017-11-07 {i % 24}:00,{'2017-11-08 1:00' if y[i] else ''},{y[i]}")
    p = tmp_path / "ads.csv"
    p.write_text("\n".join(rows) + "\n")
    r = explain_schema(p, label="y")
    roles = {c.name: c.role for c in r.columns}
    assert roles == {"ip": "categorical", "app": "categorical", "hour": "numeric", "price": "numeric",
                     "amount": "both", "when": "time", "conv_time": "ignore", "y": "label"}
    why = {c.name: c for c in r.columns}
    assert "id-like name" in why["ip"].reason and why["ip"].override == "--numeric ip or --both ip"
    assert "leaks the label" in why["conv_time"].reason
    assert r.schema.time == "when" and r.schema.ignore == ("conv_time",)
    assert r.schema.id_names[-1] == "amount#value"
    text = r.describe()
    assert all(name in text for name in roles) and "[override: --numeric ip or --both ip]" in text
    r2 = explain_schema(p, label="y", numeric=["ip"], both=["hour"], time="when", ignore=["amount"])
    roles2 = {c.name: c.role for c in r2.columns}
    assert roles2["ip"] == "numeric" and roles2["hour"] == "both" and roles2["amount"] == "ignore"
    with pytest.raises(SchemaError, match="Did you mean 'price'"):
        explain_schema(p, label="y", categorical=["prise"])
    with pytest.raises(SchemaError, match="named both --categorical and --numeric"):
        explain_schema(p, label="y", categorical=["ip"], numeric=["ip"])


def test_talkingdata_inference_makes_its_ids_categorical():
    from conftest import shared_file
    from ctrflow.schema import explain_schema

    r = explain_schema(shared_file("talkingdata", "train_sample.csv"), label="is_attributed")
    assert set(r.schema.categorical_names) == {"ip", "app", "device", "os", "channel"}
    assert r.schema.numeric == () and r.schema.time == "click_time" and r.schema.ignore == ("attributed_time",)


def test_a_header_read_as_one_column_suggests_the_delimiter(tmp_path):
    (tmp_path / "x.csv").write_text("y;c;n\n1;a;3\n")
    with pytest.raises(SchemaError, match="is the delimiter ';'\\? Pass --delimiter ';'"):
        infer_schema(tmp_path / "x.csv", label="y")
    assert infer_schema(tmp_path / "x.csv", label="y", delimiter=";").columns == ("y", "c", "n")


def test_a_repeated_header_name_is_named_with_its_columns_and_the_way_out(tmp_path):
    (tmp_path / "x.csv").write_text("y,c,n,c\n1,a,3,b\n")
    with pytest.raises(SchemaError, match=r"x.csv line 1: the header names column 'c' 2 times \(columns \[2, 4\]\).*--ignore c"):
        infer_schema(tmp_path / "x.csv", label="y")
    assert infer_schema(tmp_path / "x.csv", label="y", ignore=["c"]).used_columns == ["y", "n"]
