"""Odd inputs a real log dump has: each is converted row by row or refused in one line, never a crash."""
from __future__ import annotations

import numpy as np

from ctrflow.data.convert import ConvertOptions, convert
from ctrflow.data.shards import load_manifest, read_shard
from ctrflow.schema import CategoricalField, Schema

SCHEMA = Schema("e", "y", (CategoricalField("c", 1000), CategoricalField("d", 1000)), columns=("y", "c", "d"))


def _ids(folder):
    return np.concatenate([read_shard(p).ids for p in load_manifest(folder).shard_paths()]).tolist()


def test_jsonl_lone_surrogate_is_an_invalid_utf8_reject_not_a_crash(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"y":1,"c":"a","d":"x"}\n{"y":0,"c":"\\ud800","d":"y"}\n{"y":1,"c":"b","d":"z"}\n')
    s = convert(tmp_path / "x.jsonl", tmp_path / "o", schema=SCHEMA, options=ConvertOptions(workers=1))
    assert (s.rows, s.rejects) == (2, {"invalid_utf8": 1})
    assert "x.jsonl\t2\tinvalid_utf8\tc\t" in (tmp_path / "o" / "rejects.tsv").read_text()


def test_a_byte_order_mark_before_the_header_is_not_part_of_the_first_column(tmp_path):
    from ctrflow.schema import explain_schema

    plain, bom = tmp_path / "plain.csv", tmp_path / "bom.csv"
    plain.write_bytes(b"y,c,d\r\n1,a,x\r\n0,b,y\r\n")
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())  # what Excel's "CSV UTF-8" writes
    assert explain_schema(bom, label="y").schema.columns == ("y", "c", "d")
    convert(plain, tmp_path / "a", schema=SCHEMA, options=ConvertOptions(workers=1))
    convert(bom, tmp_path / "b", schema=SCHEMA, options=ConvertOptions(workers=1))
    assert _ids(tmp_path / "b") == _ids(tmp_path / "a")
