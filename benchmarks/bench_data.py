"""Data-path benchmark: conversion rows/s and peak memory, binary pipeline vs CSV parsing per epoch.

Claims measured (issue "foundation"), on synthetic Criteo-shaped rows:
- conversion rows/s (both cores) and its peak memory at two input sizes (bounded: must not grow with size);
- pipeline rows/s from binary shards into ready batches (target >= 2M rows/s);
- the same batches made by parsing the CSV with the same transforms each epoch (pandas or tf.data CSV,
  whichever is faster) — target: binary >= 20x faster.

Usage: python benchmarks/bench_data.py [--rows 1000000] [--batch-size 4096] [--out bench-out]
Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctrflow.data.pipeline import PipelineOptions, open_batches  # noqa: E402
from ctrflow.data.shards import load_manifest  # noqa: E402
from ctrflow.data.transforms import discretize, field_hash_key, hash_values, log_transform  # noqa: E402


def _peak_rss_of(cmd: list[str]) -> tuple[float, int, str]:
    """Run a command; return (seconds, peak RSS in bytes of it and its children, stdout)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    peak = 0
    ps = psutil.Process(proc.pid)
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    out, err = proc.communicate()
    done.set()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {err.decode()[-2000:]}")
    return time.perf_counter() - t0, peak, out.decode()


def _ctrflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "ctrflow", *args]


def _generate(rows: int, path: Path) -> None:
    if not path.exists():
        subprocess.run(_ctrflow("generate", "--rows", str(rows), "--out", str(path), "--seed", "1", "--quiet"), check=True, cwd=REPO)


def _convert(src: Path, out: Path) -> dict:
    secs, peak, stdout = _peak_rss_of(_ctrflow("convert", str(src), "--schema", "synthetic", "--out", str(out), "--overwrite", "--json", "--quiet"))
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {"rows": summary["rows"], "seconds": secs, "rows_per_s": summary["rows"] / secs,
            "inner_rows_per_s": summary["rows_per_s"], "peak_rss_mb": peak / 2**20, "shards": summary["shards"]}


def _pipeline(shards: Path, batch_size: int, shuffle: bool, epochs: int = 2) -> dict:
    opts = PipelineOptions(batch_size=batch_size, epochs=epochs, shuffle=shuffle)
    t0 = time.perf_counter()
    rows = 0
    with open_batches(shards, opts) as batches:
        for b in batches:
            rows += b.rows
    secs = time.perf_counter() - t0
    return {"rows": rows, "seconds": secs, "rows_per_s": rows / secs}


def _csv_pandas(csv: Path, shards: Path, batch_size: int, max_rows: int) -> dict:
    """Parse CSV with pandas each epoch and apply the same transforms (hash, log, discretize) per chunk."""
    import pandas as pd

    man = load_manifest(shards)
    schema, transforms = man.schema(), man.transforms()
    keys = {f.name: field_hash_key(schema.hash_seed, f.name) for f in schema.categorical}
    dtypes = {f.name: str for f in schema.categorical}
    t0 = time.perf_counter()
    rows = 0
    for chunk in pd.read_csv(csv, chunksize=batch_size * 16, dtype=dtypes, keep_default_na=False, na_values={f.name: [""] for f in schema.numeric}, nrows=max_rows):
        n = len(chunk)
        ids = np.zeros((n, len(schema.id_names)), np.int32)
        for j, f in enumerate(schema.categorical):
            ids[:, j] = hash_values(chunk[f.name].to_numpy(dtype=object), f.hash_buckets, keys[f.name])
        numeric = np.zeros((n, len(schema.numeric)), np.float32)
        for j, f in enumerate(schema.numeric):
            v = log_transform(chunk[f.name].to_numpy(dtype=np.float64)).astype(np.float32)
            ids[:, len(schema.categorical) + j] = discretize(v, transforms.boundaries_of(f.name))
            numeric[:, j] = np.nan_to_num(v)
        label = chunk[schema.label].to_numpy(np.float32)
        for i in range(0, n, batch_size):  # cut into batches like the pipeline does
            _ = (ids[i : i + batch_size], numeric[i : i + batch_size], label[i : i + batch_size])
        rows += n
    secs = time.perf_counter() - t0
    return {"rows": rows, "seconds": secs, "rows_per_s": rows / secs}


def _csv_tfdata(csv: Path, shards: Path, batch_size: int, max_rows: int) -> dict:
    """tf.data's CSV reader with the same transforms in-graph (the serving graph's ops)."""
    import tensorflow as tf

    man = load_manifest(shards)
    schema, transforms = man.schema(), man.transforms()
    cols = list(schema.columns)
    defaults = []
    for c in cols:
        defaults.append([""] if c in schema.categorical_names else [float("nan")])
    ds = tf.data.experimental.CsvDataset(str(csv), defaults, header=True).take(max_rows).batch(batch_size)

    def transform(*fields):
        by = dict(zip(cols, fields))
        ids = []
        for f in schema.categorical:
            x = by[f.name]
            h = tf.strings.to_hash_bucket_strong(x, f.hash_buckets - 1, key=list(field_hash_key(schema.hash_seed, f.name))) + 1
            ids.append(tf.where(tf.strings.length(x) > 0, h, tf.zeros_like(h)))
        nums = []
        for f in schema.numeric:
            x = by[f.name]
            v = tf.sign(x) * tf.math.log1p(tf.abs(x))
            b = tf.raw_ops.Bucketize(input=v, boundaries=list(transforms.boundaries[f.name])) + 1
            ids.append(tf.cast(tf.where(tf.math.is_nan(v), 0, b), tf.int64))
            nums.append(tf.where(tf.math.is_nan(v), 0.0, v))
        return tf.cast(tf.stack(ids, 1), tf.int32), tf.stack(nums, 1), by[schema.label]

    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE).prefetch(4)
    t0 = time.perf_counter()
    rows = 0
    for ids, _, _ in ds:
        rows += int(ids.shape[0])
    secs = time.perf_counter() - t0
    return {"rows": rows, "seconds": secs, "rows_per_s": rows / secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--csv-rows", type=int, default=200_000, help="rows parsed by the CSV baselines (rate is per row)")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    out = REPO / args.out
    out.mkdir(exist_ok=True)

    small_rows = max(args.rows // 4, 1000)
    big_csv, small_csv = out / f"synthetic-{args.rows}.csv", out / f"synthetic-{small_rows}.csv"
    _generate(args.rows, big_csv)
    _generate(small_rows, small_csv)
    conv_small = _convert(small_csv, out / "shards-small")
    conv = _convert(big_csv, out / "shards")
    pipe = _pipeline(out / "shards", args.batch_size, shuffle=True)
    pipe_seq = _pipeline(out / "shards", args.batch_size, shuffle=False)
    pandas_r = _csv_pandas(big_csv, out / "shards", args.batch_size, args.csv_rows)
    tfdata_r = _csv_tfdata(big_csv, out / "shards", args.batch_size, args.csv_rows)
    best_csv = max((pandas_r, "pandas"), (tfdata_r, "tf.data"), key=lambda r: r[0]["rows_per_s"])
    result = {
        "rows": args.rows,
        "batch_size": args.batch_size,
        "convert_rows_per_s": conv["rows_per_s"],
        "convert_peak_rss_mb": conv["peak_rss_mb"],
        "convert_peak_rss_mb_quarter_input": conv_small["peak_rss_mb"],
        "convert_peak_rss_ratio_4x_input": conv["peak_rss_mb"] / conv_small["peak_rss_mb"],
        "pipeline_rows_per_s_shuffled": pipe["rows_per_s"],
        "pipeline_rows_per_s_sequential": pipe_seq["rows_per_s"],
        "csv_pandas_rows_per_s": pandas_r["rows_per_s"],
        "csv_tfdata_rows_per_s": tfdata_r["rows_per_s"],
        "csv_best": best_csv[1],
        "binary_vs_csv_speedup": pipe["rows_per_s"] / best_csv[0]["rows_per_s"],
        "shard_bytes_per_row": sum(s["bytes"] for s in load_manifest(out / "shards").shards) / args.rows,
        "csv_bytes_per_row": big_csv.stat().st_size / args.rows,
    }
    print(f"{'measure':<42}{'value':>16}")
    for k, v in result.items():
        print(f"{k:<42}{v:>16,.2f}" if isinstance(v, float) else f"{k:<42}{v!s:>16}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
