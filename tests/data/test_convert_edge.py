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


def test_a_stream_of_two_conversions_with_other_bins_is_refused(tmp_path):
    """Same schema, other quantile boundaries: concatenated shards would silently give numeric ids other meanings."""
    import io

    import pytest

    from ctrflow.data.pipeline import open_batches
    from ctrflow.errors import SchemaError
    from ctrflow.schema import NumericField

    schema = Schema("n", "y", (CategoricalField("c", 64),), (NumericField("x"),), columns=("y", "c", "x"))
    for name, scale in (("a", 1), ("b", 1000)):
        (tmp_path / f"{name}.csv").write_text("y,c,x\n" + "".join(f"{i % 2},c,{i * scale}\n" for i in range(50)))
        convert(tmp_path / f"{name}.csv", tmp_path / name, schema=schema, options=ConvertOptions(workers=1))
    shards = [p.read_bytes() for d in "ab" for p in load_manifest(tmp_path / d).shard_paths()]
    assert sum(1 for _ in open_batches(io.BytesIO(shards[0] * 2))) == 1  # one conversion's records stream together
    with pytest.raises(SchemaError, match="record 1: other discretizer boundaries"):
        list(open_batches(io.BytesIO(b"".join(shards))))


def test_an_overwrite_killed_mid_swap_gets_its_last_good_output_back(tmp_path):
    """Between `out → out.old-<pid>` and `partial → out` only the .old folder holds data: the next run restores it."""
    import pytest

    from ctrflow.errors import ConfigError

    old = tmp_path / "o.old-999999999"  # above any pid_max: that conversion is dead
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    (tmp_path / "x.csv").write_text("y,c,d\n1,a,x\n")
    with pytest.raises(ConfigError, match="already exists"):  # it is back, so no --overwrite means no overwrite
        convert(tmp_path / "x.csv", tmp_path / "o", schema=SCHEMA, options=ConvertOptions(workers=1))
    assert (tmp_path / "o" / "manifest.json").read_text() == "{}" and not old.exists()


def test_parquet_booleans_read_as_1_and_0_like_json_lines(tmp_path):
    """A bool label was a bad_label on every row; a bool categorical hashed "true" where JSONL and the client hash "1"."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ctrflow.schema import NumericField

    schema = Schema("p", "y", (CategoricalField("c", 1000),), (NumericField("n"),))
    table = pa.table({"y": [True, False, True], "c": [True, False, None], "n": [True, False, None]})
    pq.write_table(table, tmp_path / "x.parquet")
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    for name in ("x.parquet", "x.jsonl"):
        s = convert(tmp_path / name, tmp_path / name.replace(".", "_"), schema=schema, options=ConvertOptions(workers=1))
        assert (s.rows, s.rejects) == (3, {})
    assert _ids(tmp_path / "x_parquet") == _ids(tmp_path / "x_jsonl")


def test_times_with_fractional_seconds_and_parquet_timestamps_are_epoch_seconds(tmp_path):
    """Schema inference takes "09:30:00.123" for a date-time (the time column), but convert rejected every such
    row as bad_time; Parquet timestamps (stored in ms, printed with ".000") were all bad_time too."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = Schema("t", "y", (CategoricalField("c", 64),), time="t", columns=("y", "c", "t"))
    (tmp_path / "x.csv").write_text("y,c,t\n1,a,2020-01-01 00:00:00.750\n0,b,2020-01-01 01:00:00\n")
    when = [dt.datetime(2020, 1, 1, 0, 0, 0, 750000), dt.datetime(2020, 1, 1, 1)]
    for unit, tz in (("ms", None), ("us", "UTC")):
        pq.write_table(pa.table({"y": [1, 0], "c": ["a", "b"], "t": pa.array(when, pa.timestamp(unit, tz=tz))}), tmp_path / f"{unit}.parquet")
    for name in ("x.csv", "ms.parquet", "us.parquet"):
        s = convert(tmp_path / name, tmp_path / name.replace(".", "_"), schema=schema, options=ConvertOptions(workers=1))
        assert s.rejects == {}, name
        times = np.concatenate([read_shard(p).time for p in load_manifest(tmp_path / name.replace(".", "_")).shard_paths()])
        assert times.tolist() == [1577836800, 1577840400], name


def test_a_parquet_list_column_is_a_schema_error_naming_it(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from ctrflow.errors import SchemaError

    pq.write_table(pa.table({"y": [1, 0], "c": [[1], [2]], "d": ["x", "y"]}), tmp_path / "x.parquet")
    with pytest.raises(SchemaError, match=r"columns \['c \(list<element: int64>\)'\] hold lists"):
        convert(tmp_path / "x.parquet", tmp_path / "o", schema=SCHEMA, options=ConvertOptions(workers=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.parquet"]


def test_a_weight_past_float32_is_a_bad_weight(tmp_path):
    """1e39 was stored as an inf weight: one row would turn the weighted loss into inf / NaN."""
    schema = Schema("w", "y", (CategoricalField("c", 64),), weight="w", columns=("y", "c", "w"))
    (tmp_path / "x.csv").write_text("y,c,w\n1,a,1e39\n0,b,2\n")
    s = convert(tmp_path / "x.csv", tmp_path / "o", schema=schema, options=ConvertOptions(workers=1))
    assert (s.rows, s.rejects) == (1, {"bad_weight": 1})


def test_a_quoted_field_with_newlines_is_never_cut_between_blocks(tmp_path):
    """A block ending inside a quoted multi-line field misparsed both halves (wrong_field_count rejects, rows lost)."""
    rows = ["y,c,d"] + [f'{i % 2},"a\nb\nc\nd\ne\nf\ng {i}",d{i}' for i in range(1500)]
    (tmp_path / "x.csv").write_text("\n".join(rows) + "\n")
    whole = convert(tmp_path / "x.csv", tmp_path / "a", schema=SCHEMA, options=ConvertOptions(workers=1))
    cut = convert(tmp_path / "x.csv", tmp_path / "b", schema=SCHEMA, options=ConvertOptions(workers=1, block_bytes=4096))
    assert (whole.shards, cut.shards) == (1, 11) and cut.rejects == {} and cut.rows == 1500
    assert _ids(tmp_path / "b") == _ids(tmp_path / "a")
