"""The newer models through the paths the older ones take: a local cluster (sharded tables and sharded
dense cross kernels), export and serving from it, and continuous training with stale-row resets.

Both start real processes / many trainings and are marked slow.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctrflow.models.registry import ModelConfig
from ctrflow.train.config import TrainConfig

from conftest import REPO, cli_in_process, cluster_ready

COORDINATOR = """
import json, sys
from ctrflow.train.config import TrainConfig
from ctrflow.train.distributed import DistributedOptions, train_distributed
data, out, config, options = sys.argv[1:5]
s = train_distributed(data, out, TrainConfig.from_dict(json.loads(config)), options=DistributedOptions(**json.loads(options)))
print(json.dumps(s.to_dict(), default=str))
"""


@pytest.mark.slow
def test_dcnv2_trains_on_a_local_cluster_with_sharded_cross_kernels_and_serves_what_it_learned(tmp_path, synthetic_shards,
                                                                                               local_cluster):
    import tensorflow as tf

    from ctrflow.data.pipeline import PipelineOptions, open_batches
    from ctrflow.export import export
    from ctrflow.serving.predictor import Predictor
    from ctrflow.train.evaluate import evaluate
    from ctrflow.train.loop import build_model_from_run, load_run_info, restore_latest

    train_dir, test_dir, _ = synthetic_shards
    model = ModelConfig("dcnv2", embedding_dim=8, hidden=(32,), cross_layers=2, cross_rank=None, dropout=0.1)
    config = TrainConfig(model=model, batch_size=1024, learning_rate=0.003, max_steps=30, checkpoint_every_steps=10,
                         log_every_steps=10).to_dict()
    # 4 KiB shards: the tables, and every dense variable over 4 KiB such as the [312, 312] cross kernels
    # (389 KB), are split into 2 ShardedVariable parts by the strategy's partitioner.
    options = {"min_shard_bytes": 4096, "shards": 2}
    cluster = cluster_ready(local_cluster)  # the session's shared cluster (tests/conftest.py): 2 workers, 1 ps
    proc = subprocess.Popen([sys.executable, "-c", COORDINATOR, str(train_dir), str(tmp_path / "dist"), json.dumps(config),
                             json.dumps(options)], env=cluster.coordinator_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"coordinator hung:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] >= 30
    info = load_run_info(tmp_path / "dist")
    shards = info["distributed"]["table_shards"]
    assert len(shards["dcnv2/embedding/table/shared"]) == 2, shards
    assert evaluate(tmp_path / "dist", test_dir)["auc"] > 0.6  # it learned (0.5 = nothing)

    # The export gathers every part (tables and cross kernels whole) and serves what one process restores.
    e = export(tmp_path / "dist", tmp_path / "models" / "dcnv2")
    saved = dict(tf.train.list_variables(str(Path(e.path) / "variables" / "variables")))
    assert [shape for key, shape in saved.items() if "cross/kernels/0/" in key] == [[312, 312]], saved
    restored = build_model_from_run(info)
    restore_latest(tmp_path / "dist", restored)
    with open_batches(test_dir, PipelineOptions(batch_size=2000, shuffle=False)) as batches:
        b = next(iter(batches))
    served = Predictor.load(e.path).predict_ids(b.ids, b.numeric)
    np.testing.assert_allclose(served, tf.sigmoid(restored(b.ids, b.numeric)).numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_ffm_follows_continuous_slices_resets_stale_rows_and_publishes_servable_versions(tmp_path):
    from ctrflow.data.convert import ConvertOptions, convert
    from ctrflow.data.generate import GenerateOptions, generate
    from ctrflow.export import find_versions
    from ctrflow.schema import PRESETS
    from ctrflow.serving.predictor import Predictor
    from ctrflow.continuous import ContinuousOptions, continuous_train, read_decisions
    from ctrflow.train.loop import build_model_from_run, load_run_info, restore_latest

    days = ("mon", "tue", "wed")
    generate(tmp_path / "all.csv", GenerateOptions(rows=4000 * len(days), seed=5, days=len(days)))
    header, *rows = (tmp_path / "all.csv").read_text().splitlines(keepends=True)
    for d, name in enumerate(days):
        (tmp_path / f"{name}.csv").write_text(header + "".join(r for r in rows if r.startswith(f"{d},")))
        kw = {"schema": PRESETS["synthetic"].capped(1 << 10)} if d == 0 else {"like": tmp_path / "incoming" / days[0]}
        convert(tmp_path / f"{name}.csv", tmp_path / "incoming" / name, options=ConvertOptions(workers=1), **kw)
    config = TrainConfig(model=ModelConfig("ffm", ffm_dim=2), batch_size=512, learning_rate=0.01, checkpoint_every_steps=3)
    summary = continuous_train(tmp_path / "incoming", tmp_path / "models" / "ctr", tmp_path / "state", config,
                               ContinuousOptions(tolerance=0.5, reset_stale_after_slices=1), once=True)
    log = {d["slice"]: d for d in read_decisions(tmp_path / "state")}
    assert [log[n]["decision"] for n in days] == ["published"] * 3, log
    assert log["wed"]["reset_rows"] > 0 and log["wed"]["warm_start"] == "work/wed/warm"  # rows of 38 vectors reset
    assert find_versions(tmp_path / "models" / "ctr") == [1, 2, 3] and summary.published_version == 3
    line = Path(summary.line_run)
    model = build_model_from_run(load_run_info(line))
    restore_latest(line, model)
    from ctrflow.data.shards import load_manifest, read_shard

    batch = read_shard(load_manifest(tmp_path / "incoming" / "wed").shard_paths()[0])
    ids, numeric = batch.ids[:300], batch.numeric[:300]
    import tensorflow as tf

    served = Predictor.load(tmp_path / "models" / "ctr").predict_ids(ids, numeric)
    np.testing.assert_allclose(served, tf.sigmoid(model(ids, numeric)).numpy(), rtol=1e-5, atol=1e-7)
    shutil.rmtree(tmp_path / "state" / "runs", ignore_errors=True)


@pytest.mark.slow
def test_cli_model_flags_reach_the_run_and_a_misspelled_model_gets_a_suggestion(tmp_path, synthetic_shards):
    train_dir, _, _ = synthetic_shards

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ctrflow", "train", "--data", str(train_dir), *args], capture_output=True,
                              text=True, cwd=REPO, timeout=300)

    bad = cli("--out", str(tmp_path / "bad"), "--model", "dcn2")
    assert bad.returncode == 2 and "Did you mean 'dcnv2'?" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()
    # The training in this process (a new one imports TensorFlow): the flags' parsing is the same code.
    ok = cli_in_process("train", "--data", train_dir, "--out", tmp_path / "run", "--model", "dcnv2", "--cross-structure", "stacked",
                        "--cross-layers", "2", "--cross-rank", "4", "--dropout", "0.1", "--embedding-dim", "4", "--hidden", "8",
                        "--max-steps", "3", "--json")
    assert ok.returncode == 0, ok.stderr[-3000:]
    model = json.loads((tmp_path / "run" / "run.json").read_text())["config"]["model"]
    assert (model["kind"], model["cross_structure"], model["cross_layers"], model["cross_rank"], model["dropout"]) == \
        ("dcnv2", "stacked", 2, 4, 0.1)
