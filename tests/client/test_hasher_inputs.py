"""FeatureHasher on what a bidder really passes: every id column the converter writes, wrong shapes refused."""
from __future__ import annotations

import numpy as np
import pytest

from ctrflow.client.hashing import FeatureHasher
from ctrflow.data.convert import ConvertOptions, convert
from ctrflow.data.shards import load_manifest, read_shard
from ctrflow.data.transforms import Transforms
from ctrflow.errors import InputError
from ctrflow.schema import CategoricalField, NumericField, Schema

BOTH = Schema("b", "y", (CategoricalField("c", 64),), (NumericField("n", mode="both", hash_buckets=512), NumericField("m")),
              columns=("y", "c", "n", "m"))


def test_both_mode_exact_value_ids_equal_the_converters(tmp_path):
    raw = ["3", "3.0", "-7", "12.5", "", "1e300", "-0", "9007199254740993", "0.1"]
    lines = ["y,c,n,m"] + [f"{i % 2},c{i},{v},{i}" for i, v in enumerate(raw)]
    (tmp_path / "x.csv").write_text("\n".join(lines) + "\n")
    convert(tmp_path / "x.csv", tmp_path / "s", schema=BOTH, options=ConvertOptions(workers=1))
    want = np.concatenate([read_shard(p).ids for p in load_manifest(tmp_path / "s").shard_paths()])
    hasher = FeatureHasher.from_manifest(tmp_path / "s")
    cols = {"c": [f"c{i}" for i in range(len(raw))], "n": [float(v) if v else None for v in raw],
            "m": list(range(len(raw)))}
    assert (want[:, 3] != 0).sum() == len(raw) - 1  # the exact-value column is filled
    np.testing.assert_array_equal(hasher.ids(cols), want)
    np.testing.assert_array_equal(hasher.transform({**cols, "n": np.array(cols["n"], dtype=float)})[0], want)


def test_a_column_of_the_wrong_shape_is_refused_naming_it():
    """A str is not a column of its characters, nor an (n, 1) array one of n rows: both silently gave other ids."""
    schema = Schema("s", "y", (CategoricalField("c", 64),), (NumericField("n"),), columns=("y", "c", "n"))
    hasher = FeatureHasher(schema, Transforms({"n": (0.5, 1.5)}))
    good = {"c": ["a", "b"], "n": [1.0, 2.0]}
    assert hasher.ids(good).shape == (2, 2)
    for name, bad, got in [("c", "ab", "a str"), ("c", b"ab", "a bytes"), ("n", np.ones((2, 1)), r"shape \(2, 1\)"),
                           ("c", np.array([["a"], ["b"]]), r"shape \(2, 1\)"), ("n", 3.0, "a float")]:
        with pytest.raises(InputError, match=f"column '{name}' must be one value per row.*Got {got} instead"):
            hasher.transform({**good, name: bad})


def test_a_list_of_big_ints_is_numbers_on_every_path():
    """pyarrow refuses ints past 2^53 as float64; numpy (and the converter's parse) round them. The list path
    is taken for `mode: both` ids, or when another numeric column is not a plain list."""
    transforms = Transforms({"n": (0.5, 40.0), "m": (0.5,)})
    hasher = FeatureHasher(BOTH, transforms)
    cols = {"c": ["a", "b"], "n": [2**60, -3.0], "m": [1.0, None]}
    want = hasher.ids({**cols, "n": np.array([2.0**60, -3.0])})
    np.testing.assert_array_equal(hasher.ids(cols), want)
    import pyarrow as pa

    np.testing.assert_array_equal(hasher.ids({**cols, "m": pa.array([1.0, None])}), want)


def test_identity_values_past_float32_are_refused_by_converter_and_client(tmp_path):
    """1e300 became FLT_MAX in the shards (and from the client) but inf in the served graph: now no id for it anywhere."""
    schema = Schema("i", "y", (CategoricalField("c", 64),), (NumericField("n", transform="identity", mode="normalize"),),
                    columns=("y", "c", "n"))
    (tmp_path / "x.csv").write_text("y,c,n\n1,a,1e300\n0,b,2\n1,c,-1e39\n0,d,3e38\n")
    s = convert(tmp_path / "x.csv", tmp_path / "s", schema=schema, options=ConvertOptions(workers=1))
    assert (s.rows, s.rejects) == (2, {"bad_number": 2})
    hasher = FeatureHasher.from_manifest(tmp_path / "s")
    assert hasher.numeric({"c": ["d"], "n": [3e38]}).tolist() == [[np.float32(3e38)]]
    with pytest.raises(InputError, match="'n': value at row 1 is beyond float32's range"):
        hasher.transform({"c": ["a", "b"], "n": [2.0, 1e300]})


def test_hash_bucket_ids_refuses_bucket_counts_outside_int32_ids():
    """1 bucket divided by zero (every id 1, a numpy warning); 2**40 wrapped ids past int32 silently."""
    from ctrflow.client.hashing import hash_bucket_ids
    from ctrflow.data.transforms import field_hash_key

    for buckets in (1, 0, 2**31, 2**40, 2.5):
        with pytest.raises(InputError, match="buckets must be an int in"):
            hash_bucket_ids(["a"], buckets, field_hash_key(0, "f"))
    assert hash_bucket_ids(["a", ""], 2, field_hash_key(0, "f")).tolist() == [1, 0]
