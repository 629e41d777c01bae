"""The client hasher (ctrflow.client.hashing) against the converter's own functions and shards.

The test vectors in docs/hashing_test_vectors.json are the spec's contract for other languages: the
converter (TensorFlow's op) must still produce them, and so must the numpy hasher.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from ctrflow.client.hashing import HASH_SPEC_VERSION, FeatureHasher, hash_bucket_ids, siphash24
from ctrflow.data.convert import ConvertOptions, convert
from ctrflow.data.generate import GenerateOptions, generate
from ctrflow.data.shards import load_manifest, read_shard
from ctrflow.data.transforms import discretize, field_hash_key, hash_values, log_transform
from ctrflow.errors import InputError

VECTORS = json.loads((Path(__file__).resolve().parents[2] / "docs" / "hashing_test_vectors.json").read_text())


def _groups():
    out: dict[tuple, list] = {}
    for c in VECTORS["categorical"]:
        out.setdefault((c["hash_seed"], c["field"], c["buckets"]), []).append(c)
    return out


def test_vectors_cover_the_spec():
    assert VECTORS["spec"] == HASH_SPEC_VERSION
    lens = {len(bytes.fromhex(c["utf8_hex"])) for c in VECTORS["categorical"]}
    assert set(range(18)) <= lens and max(lens) > 64
    assert any(ord(ch) > 0xFFFF for c in VECTORS["categorical"] for ch in c["value"])


@pytest.mark.parametrize("group", sorted(_groups()), ids=str)
def test_converter_still_produces_the_vectors(group):
    seed, name, buckets = group
    cases = _groups()[group]
    key = field_hash_key(seed, name)
    assert list(key) == cases[0]["key"]
    got = hash_values(np.array([bytes.fromhex(c["utf8_hex"]) for c in cases], dtype=object), buckets, key)
    assert got.tolist() == [c["id"] for c in cases]


@pytest.mark.parametrize("group", sorted(_groups()), ids=str)
def test_client_hasher_produces_the_vectors(group):
    seed, name, buckets = group
    cases = _groups()[group]
    got = hash_bucket_ids([c["value"] for c in cases], buckets, field_hash_key(seed, name))
    assert got.tolist() == [c["id"] for c in cases]
    as_bytes = hash_bucket_ids(np.array([bytes.fromhex(c["utf8_hex"]) for c in cases], dtype=object), buckets,
                               tuple(cases[0]["key"]))
    assert as_bytes.tolist() == got.tolist()


def test_numeric_vectors():
    for c in VECTORS["numeric"]:
        x = np.array([np.nan if c["value"] is None else c["value"]], np.float64)
        t = (log_transform(x) if c["transform"] == "log" else x).astype(np.float32)
        assert discretize(t, np.asarray(c["boundaries"], np.float32)).tolist() == [c["id"]]
        assert (np.isnan(t[0]) and c["numeric"] is None) or float(t[0]) == c["numeric"]


def test_siphash_reference_vectors():
    """The SipHash-2-4 paper's vectors: key 00..0f, messages 00, 00 01, ..., 00..0e."""
    key = (int.from_bytes(bytes(range(8)), "little"), int.from_bytes(bytes(range(8, 16)), "little"))
    h = siphash24([bytes(range(n)) for n in range(16)], key)
    assert int(h[0]) == 0x726FDB47DD0E0E31
    assert int(h[1]) == 0x74F839C593DC67FD
    assert int(h[15]) == 0xA129CA6149BE45E5


def test_random_strings_match_the_converter():
    rng = np.random.default_rng(3)
    alphabet = np.array(list("abcXYZ019 -_.é中😀"))
    lens = np.concatenate([rng.integers(0, 24, 3000), rng.integers(60, 300, 50), np.zeros(20, int)])
    vals = ["".join(rng.choice(alphabet, n)) for n in lens]
    for seed, buckets in ((0, 1 << 20), (9, 17), (5, 2)):
        key = field_hash_key(seed, "f")
        want = hash_values(np.array([v.encode() for v in vals], dtype=object), buckets, key)
        assert np.array_equal(hash_bucket_ids(vals, buckets, key), want)
        assert np.array_equal(hash_bucket_ids(pa.array(vals), buckets, key), want)


def test_none_is_missing_and_bad_strings_are_refused():
    key = field_hash_key(0, "f")
    assert hash_bucket_ids(["", None, "a"], 100, key).tolist()[:2] == [0, 0]
    assert hash_bucket_ids([], 100, key).shape == (0,)
    with pytest.raises(InputError, match="'site'"):
        hash_bucket_ids(["ok", "\ud800"], 100, key, name="site")
    with pytest.raises(InputError, match="'site': a value is not valid UTF-8"):
        hash_bucket_ids([b"ok", b"\xff"], 100, key, name="site")


def test_synthetic_preset_matches_the_shards(tmp_path):
    generate(tmp_path / "raw.csv", GenerateOptions(rows=4000, seed=2))
    convert(tmp_path / "raw.csv", tmp_path / "shards", schema="synthetic", options=ConvertOptions(workers=1))
    man = load_manifest(tmp_path / "shards")
    shards = [read_shard(p) for p in man.shard_paths()]
    ids = np.concatenate([s.ids for s in shards])
    numeric = np.concatenate([s.numeric for s in shards])
    schema = man.schema()
    table = pacsv.read_csv(tmp_path / "raw.csv", convert_options=pacsv.ConvertOptions(
        column_types={f.name: pa.string() for f in schema.categorical}, strings_can_be_null=False))
    cols = {f.name: table.column(f.name) for f in schema.categorical}
    cols.update({f.name: table.column(f.name).to_numpy() for f in schema.numeric})
    hasher = FeatureHasher.from_manifest(tmp_path / "shards")
    got_ids, got_num = hasher.transform(cols)
    assert got_ids.dtype == np.int32 and got_num.dtype == np.float32
    assert got_ids.shape == ids.shape == (4000, 39)
    assert (ids[:, :26] == 0).any() and (ids[:, 26:] == 0).any()  # missing values are exercised
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_num, numeric)
    np.testing.assert_array_equal(hasher.numeric(cols), numeric)
    # Python lists of str (what a bidder holds): the numpy path and TensorFlow's kernel agree with the shards
    as_lists = {**cols, **{f.name: table.column(f.name).to_pylist() for f in schema.categorical}}
    np.testing.assert_array_equal(hasher.ids(as_lists), ids)
    np.testing.assert_array_equal(FeatureHasher.from_manifest(tmp_path / "shards", backend="tensorflow").ids(as_lists), ids)


def test_hasher_errors_name_the_column(tmp_path):
    generate(tmp_path / "raw.csv", GenerateOptions(rows=500, seed=1))
    convert(tmp_path / "raw.csv", tmp_path / "shards", schema="synthetic", options=ConvertOptions(workers=1))
    hasher = FeatureHasher.from_manifest(tmp_path / "shards" / "manifest.json")
    cols = {n: [""] * 3 for n in hasher.schema.categorical_names}
    cols.update({n: [1.0, None, 2.0] for n in hasher.schema.numeric_names})
    assert hasher.ids(cols)[1, 26:].tolist() == [0] * 13
    with pytest.raises(InputError, match="'C3'"):
        hasher.ids({k: v for k, v in cols.items() if k != "C3"})
    with pytest.raises(InputError, match="'I2'.*infinite"):
        hasher.ids({**cols, "I2": [1.0, float("inf"), 0.0]})
    with pytest.raises(InputError, match="'I2'"):
        hasher.ids({**cols, "I2": ["a", "b", "c"]})
    with pytest.raises(InputError, match="'C2' has 2 values, expected 3"):
        hasher.ids({**cols, "C2": ["a", "b"]})


def test_client_hashing_does_not_import_tensorflow():
    import subprocess
    import sys

    code = "import sys, ctrflow.client.hashing; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
