from __future__ import annotations

import io

import numpy as np
import pytest

from ctrflow.data import shards
from ctrflow.errors import ShardCorruptError


def _data(n=100, seed=0):
    rng = np.random.default_rng(seed)
    return shards.ShardData(
        label=(rng.random(n) < 0.3).astype(np.float32),
        ids=rng.integers(0, 1000, (n, 5)).astype(np.int32),
        numeric=rng.normal(size=(n, 3)).astype(np.float32),
        weight=rng.random(n).astype(np.float32),
        time=np.arange(n, dtype=np.int64),
    )


def test_write_then_mmap_read_round_trips(tmp_path):
    d = _data()
    entry = shards.write_shard(tmp_path / "a.ctrs", d, {"schema": {"x": 1}})
    back = shards.read_shard(tmp_path / "a.ctrs", check_crc=True)
    for name, arr in d.blocks():
        np.testing.assert_array_equal(getattr(back, name), arr)
    assert back.meta["schema"] == {"x": 1} and entry["rows"] == 100
    assert entry["crc32"] == shards.crc32_file(tmp_path / "a.ctrs")
    assert not back.ids.flags.writeable  # a read-only view of the mapped file, not a copy


def test_zero_width_blocks_are_fine(tmp_path):
    d = shards.ShardData(label=np.zeros(3, np.float32), ids=np.zeros((3, 2), np.int32), numeric=np.zeros((3, 0), np.float32))
    shards.write_shard(tmp_path / "z.ctrs", d, {})
    assert shards.read_shard(tmp_path / "z.ctrs").numeric.shape == (3, 0)


def test_flipped_byte_fails_checksum_and_truncation_is_named(tmp_path):
    p = tmp_path / "a.ctrs"
    shards.write_shard(p, _data(), {})
    raw = bytearray(p.read_bytes())
    raw[-10] ^= 0xFF
    p.write_bytes(raw)
    with pytest.raises(ShardCorruptError, match="checksum mismatch"):
        shards.read_shard(p, check_crc=True)
    p.write_bytes(raw[:-50])
    with pytest.raises(ShardCorruptError, match="truncated"):
        shards.read_shard(p)
    p.write_bytes(b"hello world, not a shard")
    with pytest.raises(ShardCorruptError, match="bad magic"):
        shards.read_shard(p)


def test_stream_of_records_and_cut_stream(tmp_path):
    buf = io.BytesIO()
    for s in range(3):
        shards.write_stream_record(buf, _data(50, seed=s), {"k": s})
    raw = buf.getvalue()
    recs = list(shards.iter_stream(io.BytesIO(raw)))
    assert [r.meta["k"] for r in recs] == [0, 1, 2] and all(r.rows == 50 for r in recs)
    with pytest.raises(ShardCorruptError, match="record 2: stream ended mid-record"):
        list(shards.iter_stream(io.BytesIO(raw[:-7])))


def test_damage_that_still_parses_is_a_shard_corrupt_error(tmp_path):
    """Text on stdin is 'not a shard stream' (it said 'ended mid-record'); a header that is valid JSON with a
    broken layout is ShardCorruptError (it was a KeyError or a numpy error)."""
    import io
    import json

    from ctrflow.data.shards import MAGIC, iter_stream, read_shard
    from ctrflow.errors import ShardCorruptError

    with pytest.raises(ShardCorruptError, match="not a ctrflow shard stream"):
        list(iter_stream(io.BytesIO(b"hello\n")))
    for header in ({"version": 1}, [1], {"version": 1, "rows": 1, "payload_bytes": 64, "blocks": [{"name": "label"}]},
                   {"version": 1, "rows": 1, "payload_bytes": 64,
                    "blocks": [{"name": "label", "dtype": "float32", "shape": [9], "offset": 0, "nbytes": 4}]}):
        text = json.dumps(header).encode()
        text += b" " * ((-(12 + len(text))) % 64)
        (tmp_path / "x.ctrs").write_bytes(MAGIC + len(text).to_bytes(4, "little") + text + b"\0" * 64)
        with pytest.raises(ShardCorruptError):
            read_shard(tmp_path / "x.ctrs")


def test_a_manifest_of_the_wrong_shape_is_named(tmp_path):
    from ctrflow.data.shards import load_manifest
    from ctrflow.errors import ShardCorruptError

    for text in ("[]", '{"format": "ctrflow-shards", "version": 1}'):  # AttributeError / KeyError before
        (tmp_path / "manifest.json").write_text(text)
        with pytest.raises(ShardCorruptError, match="not a ctrflow shard manifest"):
            load_manifest(tmp_path).shard_paths()
