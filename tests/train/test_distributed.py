"""Distributed training on real local clusters: sharded tables, parity with one process, faults survived.

Cluster tests start real processes (1 ps + 2 workers + the coordinator, each importing TensorFlow) on
loopback ports and kill them with SIGKILL; they are marked slow. The fast tests cover the cluster file,
the per-worker input and the errors that must come within seconds.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ctrflow.train.cluster import ClusterSpec, LocalCluster, cluster_from_env, load_cluster, tf_config
from ctrflow.data.pipeline import PipelineOptions, open_batches
from ctrflow.data.shards import load_manifest, read_shard
from ctrflow.errors import ConfigError
from ctrflow.models.registry import ModelConfig
from ctrflow.train.config import TrainConfig
from ctrflow.data.tfdata import shard_table, worker_dataset
from ctrflow.train.distributed import DistributedOptions, train_distributed

from conftest import REPO, cluster_ready

SMALL = dict(batch_size=1024, learning_rate=0.01, checkpoint_every_steps=20, log_every_steps=10, epochs=1, holdout_fraction=0.0,
             l2=0.0, early_stopping_patience=0, lr_scaling="none")  # the settings these tests were written for (one epoch, no split)

# The coordinator process of the cluster tests: train_distributed with TF_CONFIG from LocalCluster.
# argv: data, out, config JSON, options JSON, valid or "", warm start or "". Last stdout line: the summary JSON.
COORDINATOR = """
import json, sys
from ctrflow.errors import CtrflowError
from ctrflow.train.config import TrainConfig
from ctrflow.train.distributed import DistributedOptions, train_distributed
data, out, config, options, valid, warm = sys.argv[1:7]
try:
    s = train_distributed(data, out, TrainConfig.from_dict(json.loads(config)), valid=valid or None, warm_start=warm or None,
                          options=DistributedOptions(**json.loads(options)))
except CtrflowError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
print(json.dumps(s.to_dict(), default=str))
"""

# Several runs one after another in ONE coordinator process (each a fresh train_distributed call: its own
# strategy and connection): a coordinator's TensorFlow import costs far more than a short run. argv: one
# JSON list of [data, out, config, options, valid, warm]; stdout: one line per run, flushed as it ends,
# {"summary": ..., "seconds": s} or {"error": message, "seconds": s}.
SEQUENCE = """
import json, sys, time
from ctrflow.errors import CtrflowError
from ctrflow.train.config import TrainConfig
from ctrflow.train.distributed import DistributedOptions, train_distributed
for data, out, config, options, valid, warm in json.loads(sys.argv[1]):
    t0 = time.monotonic()
    try:
        s = train_distributed(data, out, TrainConfig.from_dict(config), valid=valid or None, warm_start=warm or None,
                              options=DistributedOptions(**options))
        line = {"summary": s.to_dict()}
    except CtrflowError as e:
        line = {"error": str(e)}
    print(json.dumps({**line, "seconds": time.monotonic() - t0}, default=str), flush=True)
"""


def config_dict(kind="fm", min_count=0, **kw) -> dict:
    return TrainConfig(model=ModelConfig(kind, embedding_dim=8, hidden=(32,), min_count=min_count), **{**SMALL, **kw}).to_dict()


def coordinator(cluster: LocalCluster, data, out, config: dict, options: dict | None = None, valid=None, warm_start=None, **popen):
    args = [sys.executable, "-c", COORDINATOR, str(data), str(out), json.dumps(config), json.dumps(options or {}), str(valid or ""),
            str(warm_start or "")]
    return subprocess.Popen(args, env=cluster.coordinator_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **popen)


def job(data, out, config: dict, options: dict | None = None, valid=None, warm_start=None) -> list:
    return [str(data), str(out), config, options or {}, str(valid or ""), str(warm_start or "")]


def coordinator_sequence(cluster: LocalCluster, jobs: list[list]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SEQUENCE, json.dumps(jobs)], env=cluster.coordinator_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish_sequence(proc: subprocess.Popen, runs: int, timeout: float = 300) -> list[dict]:
    """Each run's line ({"summary"|"error", "seconds"}); fails unless all `runs` ended and the process exited 0."""
    code, _, err = finish(proc, timeout)
    lines = [json.loads(l) for l in proc.stdout_text.strip().splitlines() if l.startswith("{")]
    assert code == 0 and len(lines) == runs, err[-3000:]
    return lines


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, dict | None, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"coordinator hung for {timeout} s:\n{err[-3000:]}")
    proc.stdout_text = out
    lines = out.strip().splitlines()
    summary = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    return proc.returncode, summary, err


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Wait until history.jsonl shows a step >= `step` (the coordinator records every log interval)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"coordinator exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        p = run / "history.jsonl"
        if p.exists():
            steps = [json.loads(l)["step"] for l in p.read_text().splitlines() if l.strip()]
            if steps and steps[-1] >= step:
                return steps[-1]
        time.sleep(0.1)
    pytest.fail(f"no step {step} within {timeout} s")


def latest_step(run: Path) -> int:
    steps = [json.loads(l)["step"] for l in (run / "history.jsonl").read_text().splitlines() if l.strip()]
    return steps[-1] if steps else 0


# --- the cluster file and TF_CONFIG ----------------------------------------------------------------------
def test_cluster_file_accepts_plain_and_tf_config_shapes(tmp_path):
    plain = {"worker": ["127.0.0.1:2001", "127.0.0.1:2002"], "ps": ["localhost:2003"]}
    (tmp_path / "c.json").write_text(json.dumps(plain))
    (tmp_path / "c.yaml").write_text("cluster:\n  worker: [127.0.0.1:2001, 127.0.0.1:2002]\n  ps: [localhost:2003]\ntask: {type: worker, index: 1}\n")
    a, b = load_cluster(tmp_path / "c.json"), load_cluster(tmp_path / "c.yaml")
    assert a == b and a.num_workers == 2 and a.num_ps == 1 and a.chief == ()
    spec, kind, index = cluster_from_env({"TF_CONFIG": tf_config(a, "worker", 1)})
    assert (spec, kind, index) == (a, "worker", 1)
    assert cluster_from_env({}) is None


@pytest.mark.parametrize("cluster, message", [
    ({"worker": ["127.0.0.1:1"], "ps": ["127.0.0.1:2"], "evaluator": ["127.0.0.1:3"]}, r"unknown task type\(s\) \['evaluator'\]"),
    ({"worker": ["127.0.0.1:1"]}, "at least one 'ps'"),
    ({"worker": [], "ps": ["127.0.0.1:2"]}, "at least one 'worker'"),
    ({"worker": ["127.0.0.1"], "ps": ["127.0.0.1:2"]}, r"worker 0 must be \"host:port\".*Got '127.0.0.1'"),
    ({"worker": ["127.0.0.1:70000"], "ps": ["127.0.0.1:2"]}, "port in 1..65535"),
    ({"worker": ["127.0.0.1:2222"], "ps": ["localhost:2222"]}, "Port conflict.*worker 0 and ps 0|Port conflict.*ps 0 and worker 0"),
    ({"worker": "127.0.0.1:1", "ps": ["127.0.0.1:2"]}, "must be a list"),
    ({"chief": ["127.0.0.1:1", "127.0.0.1:3"], "worker": ["127.0.0.1:4"], "ps": ["127.0.0.1:2"]}, "at most one 'chief'"),
])
def test_bad_cluster_files_are_rejected_with_the_reason(tmp_path, cluster, message):
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(cluster))
    with pytest.raises(ConfigError, match=message):
        load_cluster(path)


def test_unreadable_cluster_file_and_bad_tf_config(tmp_path):
    with pytest.raises(ConfigError, match="missing.json: no such cluster file"):
        load_cluster(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad.json:1: not valid JSON"):
        load_cluster(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="TF_CONFIG is not valid JSON"):
        cluster_from_env({"TF_CONFIG": "{"})
    spec = ClusterSpec(worker=("127.0.0.1:1",), ps=("127.0.0.1:2",))
    with pytest.raises(ConfigError, match=r"1 worker task\(s\): the index must be in \[0, 1\)"):
        cluster_from_env({"TF_CONFIG": tf_config(spec, "worker", 3)})


def test_a_task_on_a_taken_port_fails_at_once(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    (tmp_path / "c.json").write_text(json.dumps({"worker": ["127.0.0.1:1"], "ps": [f"127.0.0.1:{port}"]}))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "ctrflow", "cluster", "ps", "--cluster", str(tmp_path / "c.json"), "--index", "0"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    holder.close()
    assert r.returncode == 2 and f"Port {port}" in r.stderr and "already in use" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 10
    r = subprocess.run([sys.executable, "-m", "ctrflow", "cluster", "ps", "--cluster", str(tmp_path / "c.json"), "--index", "4"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2 and "1 ps task(s): the index must be in [0, 1)" in r.stderr


def test_unreachable_cluster_fails_within_the_connect_timeout(tmp_path, synthetic_shards):
    train_dir, _, _ = synthetic_shards
    ports = []
    for _ in range(3):  # free now, nobody listening
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    cluster = {"worker": [f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"], "ps": [f"127.0.0.1:{ports[2]}"]}
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=f"Cannot reach worker 0 at 127.0.0.1:{ports[0]}, worker 1 .*, ps 0 .* within 1 s"):
        train_distributed(train_dir, tmp_path / "run", TrainConfig(**SMALL), cluster=cluster,
                          options=DistributedOptions(connect_timeout_s=1))
    assert time.monotonic() - t0 < 10
    with pytest.raises(ConfigError, match="cannot resolve host 'no-such-host.invalid'"):
        train_distributed(train_dir, tmp_path / "run", TrainConfig(**SMALL),
                          cluster={"worker": ["no-such-host.invalid:2222"], "ps": [f"127.0.0.1:{ports[2]}"]})


def test_settings_that_cannot_hold_on_a_cluster_are_rejected_early(tmp_path, synthetic_shards):
    train_dir, _, _ = synthetic_shards
    cluster = {"worker": [f"127.0.0.1:{p}" for p in (1, 2, 3, 4, 5, 6, 7, 8, 9)], "ps": ["127.0.0.1:10"]}
    n_files = len(load_manifest(train_dir).shards)
    with pytest.raises(ConfigError, match=f"has {n_files} shard file\\(s\\) for 9 workers"):
        train_distributed(train_dir, tmp_path / "run", TrainConfig(**SMALL), cluster=cluster)
    with pytest.raises(ConfigError, match="cannot be deterministic"):
        train_distributed(train_dir, tmp_path / "run", TrainConfig(deterministic=True, **SMALL), cluster=cluster)
    with pytest.raises(ConfigError, match="reads shard folders"):
        train_distributed("-", tmp_path / "run", TrainConfig(**SMALL), cluster=cluster)
    with pytest.raises(ConfigError, match="'partitioner' parameter of DistributedOptions must be one of"):
        DistributedOptions(partitioner="round_robin")
    with pytest.raises(ConfigError, match="needs a cluster"):
        os.environ.pop("TF_CONFIG", None)
        train_distributed(train_dir, tmp_path / "run", TrainConfig(**SMALL))


# --- input: each worker reads its own shard files in tf.data ----------------------------------------------
def test_each_worker_reads_exactly_its_shard_files(synthetic_shards):
    train_dir, _, _ = synthetic_shards
    with open_batches(train_dir, PipelineOptions(batch_size=1, shuffle=False)) as b:
        spec = b.spec
    table = shard_table(train_dir)
    manifest = load_manifest(train_dir)
    for worker in range(2):
        files = [manifest.root / s["file"] for s in manifest.shards][worker::2]
        expected = np.concatenate([read_shard(f).ids for f in files])
        batch = 500
        ds = worker_dataset(table, spec, batch_size=batch, num_workers=2, seed=3, worker_index=worker)
        got = np.concatenate([ids.numpy() for ids, _, _, _ in ds.take(len(expected) // batch)])
        # One pass: every row from this worker's files, none twice, fewer than a batch left over.
        assert not Counter(r.tobytes() for r in got) - Counter(r.tobytes() for r in expected)
        assert len(got) > len(expected) - batch
        ids, numeric, label, weight = next(iter(ds))
        assert ids.dtype.name == "int32" and numeric.shape == (batch, len(spec.numeric_names)) and float(weight.numpy().min()) == 1.0
        assert set(np.unique(label.numpy())) <= {0.0, 1.0}


# --- real clusters ----------------------------------------------------------------------------------------
# An in-process cluster (2 ps, 1 worker) in a subprocess: inspects the sharded tables and the traced step,
# and runs three synchronous steps per optimizer against the single-process trainer on the same batch.
TABLES_SCRIPT = """
import json, pathlib, socket, sys, tempfile
import numpy as np
import tensorflow as tf
from ctrflow.data.pipeline import PipelineOptions, open_batches
from ctrflow.models.registry import ModelConfig
from ctrflow.train.config import TrainConfig
from ctrflow.train.distributed import DistributedOptions, _ClusterTrainer, _partitioner
from ctrflow.train.loop import Trainer
def port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
cluster = {"worker": [f"127.0.0.1:{port()}"], "ps": [f"127.0.0.1:{port()}", f"127.0.0.1:{port()}"]}
servers = [tf.distribute.Server(tf.train.ClusterSpec(cluster), job_name=k, task_index=i, start=True)
           for k in ("worker", "ps") for i in range(len(cluster[k]))]
resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(tf.train.ClusterSpec(cluster), rpc_layer="grpc")
strategy = tf.distribute.ParameterServerStrategy(resolver, _partitioner(DistributedOptions(min_shard_bytes=4096), 2))
coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
with open_batches(sys.argv[1], PipelineOptions(batch_size=512, shuffle=False)) as batches:
    spec = batches.spec
    b = next(iter(batches))
batch = (b.ids, b.numeric, b.label, np.ones(b.rows, np.float32))
result = {"diff": {}}
for name in ("sgd", "adagrad", "lazyadam", "ftrl"):  # ftrl last: its trainer (two slots) is inspected below
    config = TrainConfig(model=ModelConfig("deepfm", embedding_dim=8, hidden=(16,)), optimizer=name, learning_rate=0.05)
    t = _ClusterTrainer(pathlib.Path(tempfile.mkdtemp()), config, spec, strategy)
    single = Trainer(pathlib.Path(tempfile.mkdtemp()), config, spec)
    three = tf.function(lambda: [strategy.run(t._step, args=batch) for _ in range(3)])
    coordinator.schedule(three)
    coordinator.join()
    for _ in range(3):
        single.train_step(*batch)
    result["diff"][name] = float(np.abs(t.predict(b.ids, b.numeric).numpy() - single.predict(b.ids, b.numeric).numpy()).max())
step = tf.function(t._step).get_concrete_function(
    tf.TensorSpec([64, len(spec.id_names)], tf.int32), tf.TensorSpec([64, len(spec.numeric_names)], tf.float32),
    tf.TensorSpec([64], tf.float32), tf.TensorSpec([64], tf.float32))
result["parts"] = {name: len(shards) for name, shards in t.table_shards.items()}
handles = {}
for v in t.variables:
    for outer, inner in step.graph.captures:
        if outer is v.handle:
            handles[inner.name] = v.name
ops = {}
for op in step.graph.get_operations():
    for x in op.inputs:
        if x.name in handles and "table" in handles[x.name]:
            ops.setdefault(op.type, set()).add(handles[x.name])
result["ops"] = {k: sorted(v) for k, v in ops.items()}
result["slots"] = {key: [(n, list(v.shape), v.device) for n, v in s.items()]
                   for opt in t.optimizer.optimizers.values() for key, s in opt.slots.items()}
result["devices"] = {v.name: (list(v.shape), v.device) for v in t.variables}
print(json.dumps(result))
"""


@pytest.mark.slow
def test_tables_are_sharded_and_sparse_updates_per_shard_match_one_process(synthetic_shards):
    train_dir, _, _ = synthetic_shards
    r = subprocess.run([sys.executable, "-c", TABLES_SCRIPT, str(train_dir)], capture_output=True, text=True, cwd=REPO, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["parts"] == {"deepfm/linear/table/shared": 2, "deepfm/embedding/table/shared": 2}
    # Three steps on two shards over two parameter servers = three steps on one process's whole tables.
    assert all(d < 1e-5 for d in info["diff"].values()), info["diff"]
    # A table shard is only ever gathered or scattered by row, never read whole (no concatenated table).
    assert set(info["ops"]) <= {"ResourceGather", "ResourceScatterUpdate"}, info["ops"]
    assert len(info["ops"]["ResourceGather"]) == 4 and len(info["ops"]["ResourceScatterUpdate"]) == 4
    # Slots are sharded alongside: same rows, same parameter server as their shard (sgd has none: ftrl's two here).
    for name, (shape, device) in info["devices"].items():
        assert [(s, d) for _, s, d in info["slots"][name.removesuffix(":0")]] == [(shape, device)] * 2
    table_devices = {d for n, (_, d) in info["devices"].items() if "embedding/table" in n}
    assert table_devices == {"/job:ps/replica:0/task:0/device:CPU:0", "/job:ps/replica:0/task:1/device:CPU:0"}


@pytest.fixture
def cluster(local_cluster):
    """The session's shared cluster (tests/conftest.py), every task running."""
    return cluster_ready(local_cluster)


@pytest.mark.slow
def test_cluster_training_matches_one_process_and_exports_serve_alike(tmp_path, cluster, synthetic_shards):
    import tensorflow as tf

    from ctrflow.export import export
    from ctrflow.serving.predictor import Predictor
    from ctrflow.train.evaluate import evaluate
    from ctrflow.train.loop import build_model_from_run, load_run_info, restore_latest, train

    train_dir, test_dir, _ = synthetic_shards
    config = config_dict(epochs=1, learning_rate=0.003, min_count=3)  # the rare-id remap too, sharded like a table
    options = {"min_shard_bytes": 4096, "shards": 2}  # two shards of each table on the one ps
    proc = coordinator(cluster, train_dir, tmp_path / "dist", config, options, valid=test_dir)
    single = train(train_dir, tmp_path / "single", TrainConfig.from_dict(config), valid=test_dir)
    code, dist, err = finish(proc)
    assert code == 0, err[-3000:]
    assert dist["steps"] >= single.steps == 59
    info = load_run_info(tmp_path / "dist")
    assert len(info["distributed"]["table_shards"]["fm/embedding/table/shared"]) == 2
    ev_dist, ev_single = evaluate(tmp_path / "dist", test_dir), evaluate(tmp_path / "single", test_dir)
    assert ev_dist["logloss"] == pytest.approx(dist["valid"]["logloss"], abs=1e-6)
    # Asynchrony costs a little: measured +0.0015..0.002 logloss (BENCHMARKS.md); a broken sharded update
    # or input would cost far more.
    assert abs(ev_dist["logloss"] - ev_single["logloss"]) < 0.005, (ev_dist, ev_single)
    # AUC: one process reaches 0.744 here; two asynchronous workers 0.716-0.729 over runs (59 steps of stale
    # reads); a broken update or input would be near 0.5.
    assert ev_dist["auc"] > 0.70 and ev_dist["auc"] > ev_single["auc"] - 0.05, (ev_dist, ev_single)

    # The export gathers the shards: the same SavedModel as a single-process run's (same variables, same
    # shapes, whole tables), serving what the checkpoint restored in one process computes.
    e, e_single = export(tmp_path / "dist", tmp_path / "models" / "dist"), export(tmp_path / "single", tmp_path / "models" / "single")
    saved = dict(tf.train.list_variables(str(Path(e.path) / "variables" / "variables")))
    assert saved == dict(tf.train.list_variables(str(Path(e_single.path) / "variables" / "variables")))
    rows = sum(info["distributed"]["table_shards"]["fm/embedding/table/shared"])
    # FM exports serve from one packed table (export's pack_tables "auto"): the 8 embedding columns + the linear weight
    tables = [shape for key, shape in saved.items() if shape and shape[0] == rows]
    assert tables == [[rows, 8 + 1]], saved
    model = build_model_from_run(load_run_info(tmp_path / "dist"))
    restore_latest(tmp_path / "dist", model)
    with open_batches(test_dir, PipelineOptions(batch_size=2000, shuffle=False)) as batches:
        b = next(iter(batches))
    served = Predictor.load(e.path).predict_ids(b.ids, b.numeric)
    np.testing.assert_allclose(served, tf.sigmoid(model(b.ids, b.numeric)).numpy(), rtol=1e-5, atol=1e-7)
    remap = model.id_remap.numpy()  # counted on the same rows as the single-process run's
    single_model = build_model_from_run(load_run_info(tmp_path / "single"))
    restore_latest(tmp_path / "single", single_model)
    np.testing.assert_array_equal(remap, single_model.id_remap.numpy())
    assert (remap != np.concatenate([np.arange(n) for n in model.layout.id_buckets])).any()

    # Resuming on a cluster that shards the tables differently is refused within seconds; then the fix it
    # names, in the same coordinator process (one process coordinates one partitioning for its lifetime).
    refused, warm = finish_sequence(coordinator_sequence(cluster, [
        job(train_dir, tmp_path / "dist", config_dict(epochs=2, learning_rate=0.003, min_count=3), {"min_shard_bytes": 4096, "shards": 1}),
        job(train_dir, tmp_path / "resharded", config_dict(max_steps=5, min_count=3), {"min_shard_bytes": 4096, "shards": 1},
            warm_start=tmp_path / "dist"),
    ]), 2)
    message = refused.get("error", "")
    assert "trained with its tables in other shards" in message and "2 shard(s) then, 1 now" in message, refused
    assert refused["seconds"] < 60
    # ... and the fix it names works: a new run folder warm-started from the two-shard run, tables whole.
    assert warm["summary"]["warm_started_from"].endswith("ckpt-" + str(dist["steps"])), warm
    # the remap carried over and merged with the same data's counts: nothing new is frequent, it is unchanged
    assert load_run_info(tmp_path / "resharded")["warm_start"]["id_remap"].startswith("merged"), warm
    warmed = build_model_from_run(load_run_info(tmp_path / "resharded"))
    restore_latest(tmp_path / "resharded", warmed)
    np.testing.assert_array_equal(warmed.id_remap.numpy(), remap)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cluster, synthetic_shards):
    train_dir, _, _ = synthetic_shards
    good, diverged = finish_sequence(coordinator_sequence(cluster, [
        job(train_dir, tmp_path / "r", config_dict(optimizer="sgd", max_steps=20)),
        job(train_dir, tmp_path / "r", config_dict(optimizer="sgd", learning_rate=1e30, max_steps=200)),
    ]), 2)
    assert good["summary"]["checkpoint"].endswith("ckpt-20"), good
    message = diverged.get("error", "")
    assert "the loss became NaN or inf" in message and "ckpt-20 is kept" in message, diverged


def cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


@pytest.mark.slow
def test_worker_killed_mid_training_the_other_goes_on_and_it_rejoins(tmp_path, cluster, synthetic_shards):
    train_dir, _, _ = synthetic_shards
    run = tmp_path / "run"
    total = 25 * 59  # long enough to outlast a restart (TensorFlow's import takes seconds) on a fast machine too
    proc = coordinator(cluster, train_dir, run, config_dict(epochs=25), {"stall_timeout_s": 120})
    at_kill = wait_for_step(run, 30, proc)
    cluster.kill("worker", 1)
    wait_for_step(run, at_kill + 20, proc, timeout=60)  # worker 0 alone goes on
    cluster.restart("worker", 1)
    # The coordinator takes the restarted worker back (TensorFlow re-sends the cluster to every task and
    # rebuilds the worker's input): an idle server burns no CPU, a training one does.
    idle = cpu_seconds(cluster.pid("worker", 1))
    deadline = time.monotonic() + 60
    while cpu_seconds(cluster.pid("worker", 1)) - idle < 2.0 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert cpu_seconds(cluster.pid("worker", 1)) - idle >= 2.0, "worker 1 did not rejoin"
    cluster.kill("worker", 0)  # from here on, only the rejoined worker 1 trains
    left = total - latest_step(run)
    code, summary, err = finish(proc)
    assert code == 0, err[-3000:]
    assert left > 20 and summary["steps"] >= total  # the rejoined worker finished the run alone and summary["resumed_from_step"] == 0
    cluster.restart("worker", 0)


@pytest.mark.slow
def test_ps_killed_stops_clearly_and_a_restarted_cluster_resumes_from_the_last_checkpoint(tmp_path, cluster, synthetic_shards):
    train_dir, _, _ = synthetic_shards
    run = tmp_path / "run"
    config = config_dict(epochs=2)  # 118 steps: the ps dies at 60, the second run is killed at 45
    with LocalCluster(workers=2, ps=1) as c:  # a cluster of its own: its parameter server dies here
        proc = coordinator(c, train_dir, run, config)
        wait_for_step(run, 60, proc)
        c.kill("ps", 0)
        t0 = time.monotonic()
        code, _, err = finish(proc, timeout=120)
        stopped_in = time.monotonic() - t0
        killed_at = latest_step(run)
    assert code == 2 and "parameter server ps 0" in err and "is gone" in err and "rerun the same command" in err, err[-3000:]
    assert stopped_in < 60
    # Rerun on another cluster (the shared one: other processes, other ports), then, in the same coordinator
    # process, a second run that is killed with it mid-training.
    proc = coordinator_sequence(cluster, [job(train_dir, run, config), job(train_dir, tmp_path / "run2", config)])
    wait_for_step(tmp_path / "run2", 45, proc, timeout=240)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    resumed = json.loads(proc.stdout.readline())  # the first run's line, written before the kill
    assert "summary" in resumed, resumed
    summary = resumed["summary"]
    assert killed_at - 20 <= summary["resumed_from_step"] <= killed_at + 20  # at most one checkpoint interval lost
    assert summary["steps"] >= 2 * 59
    # The coordinator killed: a rerun on the same, still running tasks resumes too.
    killed_at = latest_step(tmp_path / "run2")
    code, summary2, err = finish(coordinator(cluster, train_dir, tmp_path / "run2", config))
    assert code == 0, err[-3000:]
    assert killed_at - 20 <= summary2["resumed_from_step"] <= killed_at + 20


@pytest.mark.slow
def test_local_cluster_launcher_tears_everything_down_on_ctrl_c(tmp_path, synthetic_shards):
    import psutil

    train_dir, _, _ = synthetic_shards
    # A long-running coordinator command that needs no cluster: reading the data many times over.
    launcher = subprocess.Popen([sys.executable, "-m", "ctrflow", "cluster", "local", "--workers", "1", "--ps", "1",
                                 "--log-dir", str(tmp_path / "logs"), "--", "read", str(train_dir), "--epochs", "100000", "--quiet"],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    line = ""
    while time.monotonic() < deadline and "ready" not in line:
        line = launcher.stderr.readline()
    assert "ready" in line, line
    time.sleep(2)
    family = psutil.Process(launcher.pid).children(recursive=True)
    assert len(family) >= 3  # ps, worker, coordinator
    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(timeout=30) == 128 + signal.SIGINT
    gone, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, [p.cmdline() for p in alive]


def _cli_has_cluster() -> bool:
    from ctrflow import cli

    return hasattr(cli, "_cmd_cluster_local")


@pytest.mark.slow
def test_cli_trains_on_a_local_cluster_and_rejects_bad_cluster_files(tmp_path, synthetic_shards, capsys):
    import psutil

    from ctrflow.cli import main as ctrflow_main

    if not _cli_has_cluster():
        pytest.skip("ctrflow.cli has no `cluster` command / `train --cluster` yet")
    train_dir, _, _ = synthetic_shards
    (tmp_path / "bad.json").write_text(json.dumps({"worker": ["127.0.0.1:1"], "ps": ["127.0.0.1:2"], "master": ["127.0.0.1:3"]}))
    t0 = time.monotonic()  # in this process (TensorFlow imported already): the command's own check, not an import
    code = ctrflow_main(["train", "--data", str(train_dir), "--out", str(tmp_path / "x"), "--cluster", str(tmp_path / "bad.json")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown task type(s) ['master']" in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "x").exists() and time.monotonic() - t0 < 30
    launcher = subprocess.Popen(
        [sys.executable, "-m", "ctrflow", "cluster", "local", "--workers", "2", "--ps", "1", "--",
         "train", "--data", str(train_dir), "--out", str(tmp_path / "run"), "--model", "fm", "--embedding-dim", "8",
         "--batch-size", "1024", "--max-steps", "40", "--json", "--quiet"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    family = psutil.Process(launcher.pid).children(recursive=True)
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] >= 40 and (tmp_path / "run" / "run.json").exists()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["distributed"]["workers"] == 2
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
