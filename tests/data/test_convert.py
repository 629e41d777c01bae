from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from ctrflow.data import shards
from ctrflow.data.convert import ConvertOptions, convert
from ctrflow.data.transforms import field_hash_key, hash_values, log_transform
from ctrflow.errors import ConfigError, InputError, SchemaError, TooManyRejectsError
from ctrflow.schema import PRESETS, CategoricalField, NumericField, Schema

from conftest import criteo_rows

INLINE = ConvertOptions(workers=1)
SMALL = Schema("small", "y", (CategoricalField("site", 64), CategoricalField("ad", 1024)), (NumericField("price", bins=4),),
               columns=("y", "site", "ad", "price"))


def _all(out):
    man = shards.load_manifest(out)
    parts = [shards.read_shard(p) for p in man.shard_paths()]
    return man, {k: np.concatenate([getattr(p, k) for p in parts]) for k in ("label", "ids", "numeric")}


def test_criteo_conversion_matches_independent_hashing_and_transforms(tmp_path, criteo_file):
    s = convert(criteo_file, tmp_path / "out", schema="criteo", options=INLINE)
    assert s.rows == 3000 and s.rows_rejected == 0
    man, d = _all(tmp_path / "out")
    lines = [l.split("\t") for l in criteo_file.read_text().splitlines()]
    schema = PRESETS["criteo"]
    np.testing.assert_array_equal(d["label"], [float(l[0]) for l in lines])
    for j, f in enumerate(schema.categorical):
        raw = np.array([l[14 + j].encode() for l in lines], dtype=object)
        expect = hash_values(raw, f.hash_buckets, field_hash_key(0, f.name))
        np.testing.assert_array_equal(d["ids"][:, j], expect)
        assert ((d["ids"][:, j] == 0) == (raw == b"")).all()
    i1 = np.array([float(l[1]) if l[1] else np.nan for l in lines])
    np.testing.assert_allclose(d["numeric"][:, 0], np.nan_to_num(log_transform(i1)), rtol=1e-6)
    bounds = np.asarray(man.data["transforms"]["boundaries"]["I1"], np.float32)
    assert 2 <= len(bounds) <= 31 and np.all(np.diff(bounds) > 0)
    ids_i1 = d["ids"][:, 26]
    assert ((ids_i1 == 0) == np.isnan(i1)).all() and ids_i1.max() <= len(bounds) + 1
    assert shards.verify(tmp_path / "out")["ok"]


def test_like_reuses_hashing_and_boundaries(tmp_path, criteo_file):
    convert(criteo_file, tmp_path / "a", schema="criteo", options=INLINE)
    later = tmp_path / "later.tsv"
    later.write_text("\n".join(criteo_rows(500, seed=7)) + "\n")
    convert(later, tmp_path / "b", like=tmp_path / "a", options=INLINE)
    ma, mb = shards.load_manifest(tmp_path / "a"), shards.load_manifest(tmp_path / "b")
    assert ma.data["transforms"] == mb.data["transforms"] and ma.data["schema"] == mb.data["schema"]
    # The same rows converted on their own get other boundaries, but with --like exactly the first ones.
    convert(criteo_file, tmp_path / "c", like=tmp_path / "b", options=INLINE)
    np.testing.assert_array_equal(_all(tmp_path / "a")[1]["ids"], _all(tmp_path / "c")[1]["ids"])


def test_gzip_parquet_jsonl_give_identical_shards(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [("1", "s1", "ad7", "3"), ("0", "s2", "", ""), ("0", "s1", "ad9", "12.5"), ("1", "s3", "ad7", "0")]
    text = "y,site,ad,price\n" + "".join(",".join(r) + "\n" for r in rows)
    (tmp_path / "x.csv").write_text(text)
    with gzip.open(tmp_path / "x.csv.gz", "wt") as f:
        f.write(text)
    with open(tmp_path / "x.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"y": int(r[0]), "site": r[1], "ad": r[2] or None, "price": float(r[3]) if r[3] else None}) + "\n")
    pq.write_table(pa.table({"y": [int(r[0]) for r in rows], "site": [r[1] for r in rows], "ad": [r[2] or None for r in rows],
                             "price": [float(r[3]) if r[3] else None for r in rows]}), tmp_path / "x.parquet")
    convert(tmp_path / "x.csv", tmp_path / "ref", schema=SMALL, options=INLINE)
    ref = _all(tmp_path / "ref")[1]
    for name in ("x.csv.gz", "x.jsonl", "x.parquet"):
        convert(tmp_path / name, tmp_path / f"o-{name}", like=tmp_path / "ref", options=INLINE)
        got = _all(tmp_path / f"o-{name}")[1]
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{name}:{k}")


def test_malformed_rows_are_counted_and_kept_with_line_numbers(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("y,site,ad,price\n1,s,a,1\n0,s,a\n2,s,a,1\nx,s,a,1\n0,s,a,abc\n0,s,a,inf\n\n1,s,a,2\n")
    p.write_bytes(p.read_bytes() + b"0,\xff\xfe,a,1\n")
    s = convert(p, tmp_path / "out", schema=SMALL, options=INLINE)
    assert s.rows == 2 and s.rows_read == 9
    assert s.rejects == {"wrong_field_count": 1, "empty_row": 1, "bad_label": 2, "bad_number": 2, "invalid_utf8": 1}
    rej = [l.split("\t") for l in (tmp_path / "out" / "rejects.tsv").read_text().splitlines()[1:]]
    by_line = {int(r[1]): (r[2], r[3]) for r in rej}
    assert by_line == {3: ("wrong_field_count", "3 of 4"), 4: ("bad_label", "y"), 5: ("bad_label", "y"),
                       6: ("bad_number", "price"), 7: ("bad_number", "price"), 8: ("empty_row", ""),
                       10: ("invalid_utf8", "site")}
    man = shards.load_manifest(tmp_path / "out")
    assert man.data["rows_rejected"] == 7 and man.rows == 2


def test_max_errors_aborts_without_output_but_keeps_rejects(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("y,site,ad,price\n" + "9,s,a,1\n" * 20)
    with pytest.raises(TooManyRejectsError, match="more than 5 malformed rows"):
        convert(p, tmp_path / "out", schema=SMALL, options=ConvertOptions(workers=1, max_errors=5))
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("out.partial-*"))
    assert len((tmp_path / "out.rejects.tsv").read_text().splitlines()) == 21


def test_crash_mid_conversion_leaves_nothing_that_looks_complete(tmp_path, criteo_file):
    def boom(done, total):
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        convert(criteo_file, tmp_path / "out", schema="criteo", options=ConvertOptions(workers=1, block_bytes=8192), on_progress=boom)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.*"))


def test_bad_files_get_clear_errors(tmp_path, criteo_file):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(InputError, match="empty.tsv: empty file"):
        convert(empty, tmp_path / "o1", schema="criteo", options=INLINE)
    headed = tmp_path / "headed.tsv"
    headed.write_text("\t".join(PRESETS["criteo"].columns) + "\n" + criteo_file.read_text())
    with pytest.raises(SchemaError, match="line 1 looks like a header"):
        convert(headed, tmp_path / "o2", schema="criteo", options=INLINE)
    short = tmp_path / "short.tsv"
    short.write_text("1\t2\t3\n")
    with pytest.raises(SchemaError, match="expects 40 fields, found 3"):
        convert(short, tmp_path / "o3", schema="criteo", options=INLINE)
    wrong_header = tmp_path / "w.csv"
    wrong_header.write_text("y,site,advert,price\n1,a,b,1\n")
    with pytest.raises(SchemaError, match="expected column\\(s\\) \\['ad'\\] where the file has \\['advert'\\]"):
        convert(wrong_header, tmp_path / "o4", schema=SMALL, options=INLINE)
    gz = tmp_path / "t.tsv.gz"
    gz.write_bytes(gzip.compress(criteo_file.read_bytes())[:-200])
    with pytest.raises(InputError, match="truncated or damaged gzip"):
        convert(gz, tmp_path / "o5", schema="criteo", options=INLINE)
    with pytest.raises(InputError, match="no such input file"):
        convert(tmp_path / "nope.tsv", tmp_path / "o6", schema="criteo", options=INLINE)
    with pytest.raises(SchemaError, match="Unknown schema 'kriteo'"):
        convert(criteo_file, tmp_path / "o7", schema="kriteo", options=INLINE)
    convert(criteo_file, tmp_path / "o8", schema="criteo", options=INLINE)
    with pytest.raises(ConfigError, match="already exists"):
        convert(criteo_file, tmp_path / "o8", schema="criteo", options=INLINE)
    with pytest.raises(ConfigError, match="'max_errors'.*Got -3"):
        ConvertOptions(max_errors=-3)


def test_two_worker_processes_give_the_same_shards_as_one(tmp_path, criteo_file):
    opts = dict(block_bytes=64 << 10)
    convert(criteo_file, tmp_path / "one", schema="criteo", options=ConvertOptions(workers=1, **opts))
    convert(criteo_file, tmp_path / "two", schema="criteo", options=ConvertOptions(workers=2, **opts))
    m1, d1 = _all(tmp_path / "one")
    m2, d2 = _all(tmp_path / "two")
    assert len(m1.shards) > 2 and [s["crc32"] for s in m1.shards] == [s["crc32"] for s in m2.shards]
    np.testing.assert_array_equal(d1["ids"], d2["ids"])


def test_verify_names_the_damaged_shard(tmp_path, criteo_file):
    convert(criteo_file, tmp_path / "o", schema="criteo", options=ConvertOptions(workers=1, block_bytes=64 << 10))
    man = shards.load_manifest(tmp_path / "o")
    victim = man.shard_paths()[1]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(raw)
    r = shards.verify(tmp_path / "o")
    assert not r["ok"] and [d["file"] for d in r["damaged"]] == [victim.name]
    assert "checksum mismatch" in r["damaged"][0]["reason"]


@pytest.mark.parametrize("keep_data", [False, True])
def test_line_cutter_matches_a_line_by_line_reference(keep_data):
    """Random line lengths (some over the limit), random piece sizes, with and without a final newline."""
    from ctrflow.data.convert import _LineCutter

    rng = np.random.default_rng(1 if keep_data else 2)
    for trial in range(30):
        lengths = rng.choice([0, 1, 5, 30, 99, 100, 101, 400], size=int(rng.integers(1, 60)))
        lines = [bytes([97 + i % 26]) * int(n) for i, n in enumerate(lengths)]
        data = b"\n".join(lines) + (b"\n" if trial % 2 else b"")
        block_bytes, max_line = int(rng.integers(1, 300)), 100
        cutter = _LineCutter("f", "text", 0, 1, block_bytes, max_line, keep_data, 0)
        blocks, pos = [], 0
        while pos < len(data):
            step = int(rng.integers(1, 250))
            blocks += cutter.feed(data[pos:pos + step])
            pos += step
        blocks += cutter.finish()
        # Reference: every line either inside exactly one row block, or a too_long block of its own.
        starts = np.cumsum([0] + [len(x) + 1 for x in lines])[:-1]
        got_rows, got_long = [], []
        for b in blocks:
            if b.too_long:
                got_long.append((b.first_line, b.start))
                continue
            text = data[b.start:b.end]
            if keep_data:
                assert b.data == text
            got_rows += [(b.first_line + i, line) for i, line in enumerate(text.split(b"\n")[:text.count(b"\n") + (0 if text.endswith(b"\n") else 1)])]
        assert [b.index for b in blocks] == list(range(len(blocks)))
        assert all(b.end - b.start >= block_bytes or b is blocks[-1] or blocks[blocks.index(b) + 1].too_long or b.too_long for b in blocks)
        n_real = len(lines) - (0 if trial % 2 or lines[-1] else 1)  # no final newline + empty last "line" = no line
        want_long = [(i + 1, int(starts[i])) for i in range(n_real) if len(lines[i]) > max_line]
        want_rows = [(i + 1, lines[i]) for i in range(n_real) if len(lines[i]) <= max_line]
        assert got_long == want_long and got_rows == want_rows, (trial, block_bytes)
