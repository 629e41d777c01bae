"""Distributed-training benchmark: one process vs real local clusters (1 ps + 1 or 2 workers) on this machine.

Claims measured (issue "distributed training"), FM (embedding 16, LazyAdam) on synthetic Criteo-shaped
data with tables capped at 2^16 rows per field (~1.7M embedding rows):
- examples/s (steady state, from each run's history) of `train()` in one process and of
  `train_distributed` on local clusters of 1 ps + 1 worker and 1 ps + 2 workers;
- parity: validation logloss / AUC of the same runs over two seeds (asynchrony's cost);
- communication bytes per step: the loopback interface's byte counter while a cluster trains (this
  sandbox's loopback carries nothing else: checked idle first), next to the analytic count from the
  batch's unique rows;
- straggler: worker 1 frozen 75% of the time (SIGSTOP/SIGCONT), examples/s against the unslowed run;
- input: rows/s of a worker's tf.data shard reader vs `open_batches`, and (--generator) a cluster fed by
  `tf.data.Dataset.from_generator` over `open_batches` in the coordinator, with a hard timeout (TF 2.21
  can deadlock there).

Usage: python benchmarks/bench_distributed.py [--rows 200000] [--seeds 0,1] [--generator]
Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from ctrflow.train.cluster import LocalCluster  # noqa: E402
from ctrflow.data.convert import ConvertOptions, convert  # noqa: E402
from ctrflow.data.generate import GenerateOptions, generate  # noqa: E402
from ctrflow.data.pipeline import PipelineOptions, open_batches  # noqa: E402
from ctrflow.schema import PRESETS  # noqa: E402

EMBEDDING_DIM = 16
BATCH = 1024

# The coordinator: train_distributed on the cluster file argv[1]; with argv[7] == "generator" the
# per-worker input is from_generator over open_batches in this process instead of the tf.data reader.
COORDINATOR = """
import json, sys
import numpy as np
from ctrflow.train.config import TrainConfig
import ctrflow.train.distributed as dist
cluster, data, out, config, valid, options, mode = sys.argv[1:8]
if mode == "generator":
    def generator_dataset(table, spec, *, batch_size, num_workers, seed, shuffle_buffer_rows=262144, worker_index=None):
        import itertools
        import tensorflow as tf
        from ctrflow.data.pipeline import PipelineOptions, open_batches
        def batches(worker):
            for epoch in itertools.count():
                opts = PipelineOptions(batch_size=batch_size, shuffle_buffer_rows=shuffle_buffer_rows, seed=seed + epoch,
                                       shard_index=int(worker), num_shards=num_workers, drop_remainder=True)
                with open_batches(data, opts) as stream:
                    for b in stream:
                        yield b.ids, b.numeric, b.label, np.ones(b.rows, np.float32)
        sig = (tf.TensorSpec([batch_size, len(spec.id_names)], tf.int32), tf.TensorSpec([batch_size, len(spec.numeric_names)], tf.float32),
               tf.TensorSpec([batch_size], tf.float32), tf.TensorSpec([batch_size], tf.float32))
        index = tf.distribute.coordinator.experimental_get_current_worker_index()
        return tf.data.Dataset.from_generator(batches, args=(index,), output_signature=sig).prefetch(2)
    dist.worker_dataset = generator_dataset
s = dist.train_distributed(data, out, TrainConfig.from_dict(json.loads(config)), cluster=cluster, valid=valid or None,
                           options=dist.DistributedOptions(**json.loads(options)))
print(json.dumps(s.to_dict(), default=str))
"""


def _config(seed: int, epochs: int = 1) -> dict:
    from ctrflow.models.registry import ModelConfig
    from ctrflow.train.config import TrainConfig

    return TrainConfig(model=ModelConfig("fm", embedding_dim=EMBEDDING_DIM), learning_rate=0.003, batch_size=BATCH,
                       epochs=epochs, seed=seed, log_every_steps=10, checkpoint_every_steps=100_000).to_dict()


def _lo_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        if line.strip().startswith("lo:"):
            return int(line.split(":", 1)[1].split()[0])
    return 0


def _steady_rate(history: list[dict]) -> float:
    """examples/s between the second and the last train log (skips the first function's trace)."""
    tr = [h for h in history if h["kind"] == "train"]
    if len(tr) < 3:
        return float("nan")
    a, b = tr[1], tr[-1]
    return (b["examples"] - a["examples"]) / max(b["seconds"] - a["seconds"], 1e-9)


def _history(run: Path) -> list[dict]:
    p = run / "history.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []


def run_single(data: Path, valid: Path, out: Path, seed: int) -> dict:
    code = ("import json, sys\nfrom ctrflow.train.config import TrainConfig\nfrom ctrflow.train.loop import train\n"
            "s = train(sys.argv[1], sys.argv[2], TrainConfig.from_dict(json.loads(sys.argv[3])), valid=sys.argv[4])\n"
            "print(json.dumps(s.to_dict(), default=str))")
    r = subprocess.run([sys.executable, "-c", code, str(data), str(out), json.dumps(_config(seed)), str(valid)],
                       capture_output=True, text=True, cwd=REPO, timeout=900)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    s = json.loads(r.stdout.strip().splitlines()[-1])
    return {"valid_logloss": s["valid"]["logloss"], "valid_auc": s["valid"]["auc"], "examples_per_s": _steady_rate(_history(out)),
            "steps": s["steps"]}


def run_cluster(cluster: LocalCluster, workers: int, data: Path, valid: Path | None, out: Path, seed: int, *,
                mode: str = "files", straggler: bool = False, timeout: float = 600) -> dict:
    spec = cluster.cluster.to_dict()
    spec["worker"] = spec["worker"][:workers]  # the other workers idle: one cluster serves every run
    cfile = out.with_suffix(".cluster.json")
    cfile.write_text(json.dumps(spec))
    args = [sys.executable, "-c", COORDINATOR, str(cfile), str(data), str(out), json.dumps(_config(seed)), str(valid or ""),
            json.dumps({}), mode]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    samples: list[tuple[float, int, int]] = []  # (time, step, loopback bytes)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            h = [x for x in _history(out) if x["kind"] == "train"]
            if h:
                samples.append((time.monotonic(), h[-1]["step"], _lo_bytes()))

    def freeze() -> None:  # worker 1 runs 50 ms of every 200 ms
        pid = cluster.pid("worker", 1)
        while not stop.is_set():
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.15)
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.05)

    threads = [threading.Thread(target=sample, daemon=True)]
    if straggler:
        threads.append(threading.Thread(target=freeze, daemon=True))
    for t in threads:
        t.start()
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"hung": True, "timeout_s": timeout}
    finally:
        stop.set()
        for t in threads:
            t.join()
        if straggler:
            os.kill(cluster.pid("worker", 1), signal.SIGCONT)
    if proc.returncode:
        raise RuntimeError(stderr[-3000:])
    s = json.loads(stdout.strip().splitlines()[-1])
    result = {"examples_per_s": _steady_rate(_history(out)), "steps": s["steps"]}
    if s.get("valid"):
        result.update(valid_logloss=s["valid"]["logloss"], valid_auc=s["valid"]["auc"])
    # After the first functions (trace, dataset start-up), up to the first sample at the final step: the
    # end-of-run validation and checkpoint (the coordinator reading every table) are not step traffic.
    steady = [x for x in samples if x[1] > 20]
    last = next((x for x in steady if x[1] == steady[-1][1]), None) if steady else None
    if steady and last and last[1] > steady[0][1]:
        result["loopback_bytes_per_step"] = (last[2] - steady[0][2]) / (last[1] - steady[0][1])
    return result


def analytic_bytes(data: Path, batches: int = 20) -> dict:
    """Bytes a step moves between a worker and the parameter servers, from the batch's unique rows."""
    from ctrflow.models.layers import FieldLayout

    with open_batches(data, PipelineOptions(batch_size=BATCH, seed=1)) as stream:
        lay = FieldLayout.from_spec(stream.spec)
        offsets = np.asarray(lay.offsets, np.int64)
        unique = []
        for i, b in enumerate(stream):
            if i == batches:
                break
            unique.append(len(np.unique(b.ids[:, list(lay.id_columns)].astype(np.int64) + offsets)))
    fields, u = lay.n_id_fields, float(np.mean(unique))
    width = EMBEDDING_DIM + 1  # embedding row + linear row
    lookups = 4 * BATCH * fields * width  # forward: every id's rows (embedding_lookup does not deduplicate)
    optimizer = 2 * 4 * u * width * 3  # LazyAdam: read then write each unique row with its 2 slots
    return {"fields": fields, "unique_rows_per_batch": u, "lookup_bytes": lookups, "optimizer_bytes": optimizer,
            "bytes_per_step": lookups + optimizer, "unique_fraction": u / (BATCH * fields)}


def input_rates(data: Path) -> dict:
    code = """
import json, sys, time
from ctrflow.data.pipeline import PipelineOptions, open_batches
from ctrflow.data.tfdata import shard_table, worker_dataset
data = sys.argv[1]
with open_batches(data, PipelineOptions(batch_size=1, shuffle=False)) as b:
    spec = b.spec
it = iter(worker_dataset(shard_table(data), spec, batch_size=1024, num_workers=1, seed=1, worker_index=0))
next(it)
t0 = time.perf_counter()
n = sum(int(next(it)[0].shape[0]) for _ in range(300))
files = n / (time.perf_counter() - t0)
with open_batches(data, PipelineOptions(batch_size=1024, epochs=3)) as bs:
    t0 = time.perf_counter()
    n = sum(b.rows for b in bs)
print(json.dumps({"tfdata_files_rows_per_s": files, "open_batches_rows_per_s": n / (time.perf_counter() - t0)}))
"""
    r = subprocess.run([sys.executable, "-c", code, str(data)], capture_output=True, text=True, cwd=REPO, timeout=600)
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-500:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--generator", action="store_true", help="also run the from_generator input (may hang: timeout)")
    ap.add_argument("--work", help="keep data and runs here (default: a temp folder)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    root = Path(args.work or tempfile.mkdtemp(prefix="ctrflow-bench-dist-"))
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "train" / "manifest.json").exists():
        generate(root / "train.csv", GenerateOptions(rows=args.rows, seed=5))
        generate(root / "test.csv", GenerateOptions(rows=max(args.rows // 5, 10_000), seed=5, split="test"))
        convert(root / "train.csv", root / "train", schema=PRESETS["synthetic"].capped(1 << 16), options=ConvertOptions(workers=2, block_bytes=4 << 20))
        convert(root / "test.csv", root / "test", like=root / "train", options=ConvertOptions(workers=2))
    train_dir, test_dir = root / "train", root / "test"
    result: dict = {"rows": args.rows, "batch_size": BATCH, "embedding_dim": EMBEDDING_DIM, "cores": os.cpu_count()}
    result["input"] = input_rates(train_dir)
    result["analytic"] = analytic_bytes(train_dir)
    before = _lo_bytes()
    time.sleep(2)
    result["loopback_idle_bytes_per_s"] = (_lo_bytes() - before) / 2

    runs: dict[str, list[dict]] = {"single": [], "cluster_1w": [], "cluster_2w": []}
    for seed in seeds:
        runs["single"].append(run_single(train_dir, test_dir, root / f"single-{seed}", seed))
    with LocalCluster(workers=2, ps=1) as cluster:
        for seed in seeds:
            runs["cluster_1w"].append(run_cluster(cluster, 1, train_dir, test_dir, root / f"c1-{seed}", seed))
            runs["cluster_2w"].append(run_cluster(cluster, 2, train_dir, test_dir, root / f"c2-{seed}", seed))
        result["straggler_2w"] = run_cluster(cluster, 2, train_dir, None, root / "straggler", seeds[0], straggler=True)
        result["unslowed_2w"] = run_cluster(cluster, 2, train_dir, None, root / "unslowed", seeds[0])
        if args.generator:
            result["generator_2w"] = run_cluster(cluster, 2, train_dir, None, root / "generator", seeds[0], mode="generator", timeout=180)
    result["runs"] = runs
    for name, rs in runs.items():
        result[name] = {k: float(np.mean([r[k] for r in rs if k in r])) for k in ("examples_per_s", "valid_logloss", "valid_auc", "loopback_bytes_per_step")
                        if any(k in r for r in rs)}

    print(f"{'measure':<58}{'value':>18}")
    rows = [
        ("single process: examples/s", result["single"]["examples_per_s"]),
        ("1 ps + 1 worker: examples/s", result["cluster_1w"]["examples_per_s"]),
        ("1 ps + 2 workers: examples/s", result["cluster_2w"]["examples_per_s"]),
        ("single process: valid logloss (mean over seeds)", result["single"]["valid_logloss"]),
        ("1 ps + 1 worker: valid logloss", result["cluster_1w"]["valid_logloss"]),
        ("1 ps + 2 workers: valid logloss", result["cluster_2w"]["valid_logloss"]),
        ("single process: valid AUC", result["single"]["valid_auc"]),
        ("1 ps + 2 workers: valid AUC", result["cluster_2w"]["valid_auc"]),
        ("loopback bytes/step, 1 worker (measured)", result["cluster_1w"].get("loopback_bytes_per_step", float("nan"))),
        ("loopback bytes/step, 2 workers (measured)", result["cluster_2w"].get("loopback_bytes_per_step", float("nan"))),
        ("worker<->ps bytes/step (analytic)", result["analytic"]["bytes_per_step"]),
        ("unique rows per batch (of batch x fields)", result["analytic"]["unique_rows_per_batch"]),
        ("2 workers, worker 1 frozen 75%: examples/s", result["straggler_2w"].get("examples_per_s", float("nan"))),
        ("2 workers, unslowed (same run length): examples/s", result["unslowed_2w"].get("examples_per_s", float("nan"))),
        ("tf.data shard reader: rows/s (one worker)", result["input"].get("tfdata_files_rows_per_s", float("nan"))),
        ("open_batches: rows/s", result["input"].get("open_batches_rows_per_s", float("nan"))),
    ]
    if "generator_2w" in result:
        g = result["generator_2w"]
        rows.append(("from_generator input, 2 workers: examples/s", "hung" if g.get("hung") else g["examples_per_s"]))
    for k, v in rows:
        print(f"{k:<58}{v:>18,.4f}" if isinstance(v, float) and abs(v) < 10 else f"{k:<58}{v:>18,.0f}" if isinstance(v, float) else f"{k:<58}{v!s:>18}")
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
