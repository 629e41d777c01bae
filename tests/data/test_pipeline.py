from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest

from ctrflow.data import shards
from ctrflow.data.convert import ConvertOptions, convert
from ctrflow.data.pipeline import PipelineOptions, open_batches
from ctrflow.errors import ConfigError, ShardCorruptError

from conftest import REPO


@pytest.fixture
def shard_dir(tmp_path, criteo_file):
    convert(criteo_file, tmp_path / "s", schema="criteo", options=ConvertOptions(workers=1, block_bytes=64 << 10))
    return tmp_path / "s"


def _rows(batches):
    # a row's identity: its full id vector (collisions between distinct rows don't matter for counting)
    return sorted(map(tuple, np.concatenate([b.ids for b in batches]).tolist()))


def test_every_row_exactly_once_per_epoch_in_shuffled_order(shard_dir):
    with open_batches(shard_dir, PipelineOptions(batch_size=256, shuffle=False)) as bs:
        plain = list(bs)
        assert bs.spec.id_buckets[:26] == tuple(f.hash_buckets for f in bs.schema.categorical)
    with open_batches(shard_dir, PipelineOptions(batch_size=256, epochs=2, shuffle_buffer_rows=1000, seed=3)) as bs:
        shuffled = list(bs)
    assert sum(b.rows for b in plain) == 3000 and sum(b.rows for b in shuffled) == 6000
    assert all(b.ids.dtype == np.int32 and b.numeric.dtype == np.float32 and b.label.dtype == np.float32 for b in shuffled)
    assert all(b.rows == 256 for b in plain[:-1]) and plain[-1].rows == 3000 % 256
    first, second = shuffled[: len(shuffled) // 2], shuffled[len(shuffled) // 2 :]
    assert _rows(first) == _rows(plain) == _rows(second)
    assert not np.array_equal(np.concatenate([b.ids for b in first]), np.concatenate([b.ids for b in plain]))


def test_same_seed_same_batches_other_seed_other_order(shard_dir):
    def ids(seed):
        with open_batches(shard_dir, PipelineOptions(batch_size=500, seed=seed)) as bs:
            return np.concatenate([b.ids for b in bs])
    np.testing.assert_array_equal(ids(1), ids(1))
    assert not np.array_equal(ids(1), ids(2))


def test_drop_remainder_and_worker_sharding(shard_dir):
    with open_batches(shard_dir, PipelineOptions(batch_size=256, drop_remainder=True, shuffle=False)) as bs:
        assert all(b.rows == 256 for b in bs)
    n = len(shards.load_manifest(shard_dir).shards)
    parts = []
    for i in range(2):
        with open_batches(shard_dir, PipelineOptions(batch_size=256, shard_index=i, num_shards=2, shuffle=False)) as bs:
            parts.append(_rows(list(bs)))
    assert n >= 2 and sorted(parts[0] + parts[1]) == _rows(list(open_batches(shard_dir, PipelineOptions(shuffle=False))))
    with pytest.raises(ConfigError, match="shard_index"):
        PipelineOptions(shard_index=2, num_shards=2)


def test_damaged_shard_raises_in_the_consumer(shard_dir):
    victim = shards.load_manifest(shard_dir).shard_paths()[-1]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(ShardCorruptError, match="truncated"):
        with open_batches(shard_dir, PipelineOptions(batch_size=256)) as bs:
            list(bs)


def test_reads_a_shard_stream_and_names_a_cut_record(shard_dir):
    raw = b"".join(p.read_bytes() for p in shards.load_manifest(shard_dir).shard_paths())
    with open_batches(io.BytesIO(raw), PipelineOptions(batch_size=100)) as bs:
        assert sum(b.rows for b in bs) == 3000
    with pytest.raises(ShardCorruptError, match="stream ended mid-record"):
        with open_batches(io.BytesIO(raw[:-1]), PipelineOptions(batch_size=100)) as bs:
            list(bs)
    with pytest.raises(ConfigError, match="epochs must be 1"):
        open_batches(io.BytesIO(raw), PipelineOptions(epochs=2))


def test_cli_reads_shards_piped_on_stdin(shard_dir):
    raw = b"".join(p.read_bytes() for p in shards.load_manifest(shard_dir).shard_paths())
    out = subprocess.run([sys.executable, "-m", "ctrflow", "read", "-", "--json"], input=raw, capture_output=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    import json
    assert json.loads(out.stdout.decode().splitlines()[-1])["rows"] == 3000
    out = subprocess.run([sys.executable, "-m", "ctrflow", "read", "-", "--json"], input=raw[:-5], capture_output=True, cwd=REPO, timeout=120)
    assert out.returncode == 2 and b"stream ended mid-record" in out.stderr


@pytest.mark.parametrize("field,value", [("batch_size", True), ("batch_size", "64"), ("batch_size", 0), ("epochs", 1.5),
                                         ("shuffle", 1), ("shard_index", 2), ("prefetch_batches", None)])
def test_pipeline_options_refuse_wrong_types_with_one_message_shape(field, value):
    kwargs = {field: value} | ({"num_shards": 2} if field == "shard_index" else {})
    with pytest.raises(ConfigError, match=f"The '{field}' parameter of PipelineOptions must be .* Got {value!r} instead"):
        PipelineOptions(**kwargs)


def test_convert_and_generate_options_use_the_same_checks():
    from ctrflow.data.convert import ConvertOptions
    from ctrflow.data.generate import GenerateOptions

    for kwargs in ({"workers": True}, {"block_bytes": "64"}, {"max_errors": -1}, {"overwrite": "yes"}, {"max_line_bytes": 10}):
        with pytest.raises(ConfigError, match=f"The '{next(iter(kwargs))}' parameter of ConvertOptions"):
            ConvertOptions(**kwargs)
    with pytest.raises(ConfigError, match="The 'rows' parameter of GenerateOptions must be an int >= 1. Got True"):
        GenerateOptions(rows=True)
    with pytest.raises(ConfigError, match="'split'.*Did you mean 'test'"):
        GenerateOptions(rows=10, split="tset")
