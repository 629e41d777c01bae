"""Step time of the sparse optimizers against dense Adam and Keras 3 Adam on one big embedding table.

Claim measured: updating only the touched rows (LazyAdam, Adagrad, FTRL, SGD) makes a training step cost
what the batch touches, while dense Adam and Keras's Adam pay for the whole table every step.

Each step, inside one `tf.function`: look up a batch of `--batch` x `--fields` ids (Zipf-distributed, so
many duplicates) in a `--rows` x `--dim` float32 table, sum them into a logit, take the logistic loss's
gradient (an IndexedSlices) and apply it. "none" is the same step without an optimizer: the forward and
backward cost every row shares. Prints a table, then one JSON line (the last line of stdout).

    PYTHONPATH=. python benchmarks/bench_optimizers.py        # 1M x 16 table, 4096 x 39 ids, 50 steps
    PYTHONPATH=. python benchmarks/bench_optimizers.py --rows 4000000 --optimizers lazyadam,adam
    PYTHONPATH=. python benchmarks/bench_optimizers.py --compare-kernels   # + fused kernels vs scatter

`--compare-kernels` times the update alone (no lookup) for the fused `tf.raw_ops` kernels against the
gather/compute/scatter path `ctrflow.train.optimizers` uses; it backs the choice documented there.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from ctrflow.train.optimizers import make_optimizer  # noqa: E402

OPTIMIZERS = ["none", "sgd", "adagrad", "ftrl", "lazyadam", "adam", "keras_adam"]
DISTINCT_BATCHES = 8  # the steps cycle through this many different batches


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="table rows (default 1,000,000)")
    parser.add_argument("--dim", type=int, default=16, help="embedding width (default 16)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per optimizer (default 50)")
    parser.add_argument("--batch", type=int, default=4096, help="examples per batch (default 4096)")
    parser.add_argument("--fields", type=int, default=39, help="ids per example (default 39, as Criteo)")
    parser.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of popularity (default 1.2)")
    parser.add_argument(
        "--optimizers", default=",".join(OPTIMIZERS), help=f"comma-separated subset of {','.join(OPTIMIZERS)}"
    )
    parser.add_argument("--compare-kernels", action="store_true", help="also time fused kernels vs scatters")
    args = parser.parse_args(argv)
    tf.get_logger().setLevel("ERROR")  # one step function per optimizer trips the retracing warning
    names = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    unknown = sorted(set(names) - set(OPTIMIZERS))
    if unknown:
        parser.error(f"unknown optimizer(s) {', '.join(unknown)}; choose from {', '.join(OPTIMIZERS)}")
    if args.steps < 1 or args.rows < 1 or args.dim < 1:
        parser.error("--rows, --dim and --steps must be >= 1")

    batches = make_batches(args.rows, args.batch, args.fields, args.zipf, seed=0)
    unique_rows = statistics.mean(len(np.unique(b)) for b in batches)
    ids = [tf.constant(b) for b in batches]
    rng = np.random.default_rng(1)
    labels = [tf.constant(rng.integers(0, 2, args.batch).astype(np.float32)) for _ in batches]

    results = {
        name: {
            "step_ms_median": round(statistics.median(times_ms), 2),
            "step_ms_mean": round(statistics.mean(times_ms), 2),
            "step_ms_min": round(min(times_ms), 2),
        }
        for name, times_ms in time_steps(names, args.rows, args.dim, ids, labels, args.steps).items()
    }
    gc.collect()

    kernels = compare_kernels(args.rows, args.dim, batches[0]) if args.compare_kernels else None

    summary = {
        "benchmark": "optimizers",
        "rows": args.rows,
        "dim": args.dim,
        "batch": args.batch,
        "fields": args.fields,
        "zipf": args.zipf,
        "lookups_per_step": args.batch * args.fields,
        "unique_rows_per_step": round(unique_rows),
        "steps": args.steps,
        "results": results,
        "tensorflow": tf.__version__,
        "cpus": os.cpu_count(),
    }
    if "adam" in results and "lazyadam" in results:
        summary["lazyadam_speedup_vs_adam"] = round(
            results["adam"]["step_ms_median"] / results["lazyadam"]["step_ms_median"], 2
        )
    if "keras_adam" in results and "lazyadam" in results:
        summary["lazyadam_speedup_vs_keras_adam"] = round(
            results["keras_adam"]["step_ms_median"] / results["lazyadam"]["step_ms_median"], 2
        )
    if kernels is not None:
        summary["update_only_ms"] = kernels

    print_table(summary)
    print(json.dumps(summary))
    return summary


def make_batches(rows: int, batch: int, fields: int, zipf: float, seed: int) -> list[np.ndarray]:
    """Int64 ids `[batch, fields]`: per field, Zipf-popular values, spread over the table by a permutation."""
    rng = np.random.default_rng(seed)
    permutation = rng.permutation(rows)
    out = []
    for _ in range(DISTINCT_BATCHES):
        rank = rng.zipf(zipf, size=(batch, fields)) - 1  # 0 = the most popular value of its field
        slot = (rank * fields + np.arange(fields)) % rows  # each field's popular values land on its own rows
        out.append(permutation[slot].astype(np.int64))
    return out


def make_step(name: str, rows: int, dim: int):
    """A compiled training step on a fresh table with optimizer `name` ("none": no update)."""
    table = tf.Variable(tf.random.normal([rows, dim], stddev=0.01), name="embedding")
    if name == "keras_adam":
        import keras

        optimizer = keras.optimizers.Adam(learning_rate=0.001)
        optimizer.build([table])
    elif name != "none":
        optimizer = make_optimizer(name)

    @tf.function
    def step(batch_ids, batch_labels):
        with tf.GradientTape() as tape:
            logits = tf.reduce_sum(tf.gather(table, batch_ids), axis=[1, 2])
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(batch_labels, logits))
        grad = tape.gradient(loss, table)
        if name == "none":
            return loss + 0 * tf.reduce_sum(grad.values)  # keep the backward pass from being pruned
        optimizer.apply_gradients([(grad, table)])
        return loss

    return step


def time_steps(names: list[str], rows: int, dim: int, ids: list, labels: list, steps: int) -> dict[str, list]:
    """Per-step wall times (ms) of each optimizer; steps are interleaved across optimizers so that load
    from other processes on the machine falls on all of them alike."""
    step_fns = {name: make_step(name, rows, dim) for name in names}
    for fn in step_fns.values():
        for i in range(2):  # trace, then one warm step
            fn(ids[i], labels[i]).numpy()
    times_ms: dict[str, list] = {name: [] for name in names}
    for i in range(steps):
        batch = i % len(ids)
        for name, fn in step_fns.items():
            start = time.perf_counter()
            fn(ids[batch], labels[batch]).numpy()
            times_ms[name].append((time.perf_counter() - start) * 1e3)
    return times_ms


def compare_kernels(rows: int, dim: int, batch_ids: np.ndarray, repeats: int = 10) -> dict[str, float]:
    """Median ms of each way to deduplicate and to update, on one batch's gradient, without the lookup.

    Inputs live in variables so that grappler cannot fold the work away as constants.
    """
    from ctrflow.train.optimizers import _sum_rows

    flat_ids = tf.Variable(batch_ids.reshape(-1).astype(np.int32))
    lookups = tf.Variable(tf.random.normal([batch_ids.size, dim], seed=2))
    unique = tf.Variable(np.unique(batch_ids).astype(np.int32))
    grad = tf.Variable(tf.random.normal([int(unique.shape[0]), dim], seed=1))
    dense_grad = tf.Variable(tf.scatter_nd(unique[:, None], grad, [rows, dim]))
    var = tf.Variable(tf.random.normal([rows, dim], stddev=0.01))
    accum, linear = tf.Variable(tf.fill([rows, dim], 0.1)), tf.Variable(tf.zeros([rows, dim]))
    m, v = tf.Variable(tf.zeros([rows, dim])), tf.Variable(tf.zeros([rows, dim]))
    lr, l1, l2 = 0.05, 0.01, 0.01

    def scatter(updated, values):
        updated.scatter_update(tf.IndexedSlices(values, unique))

    @tf.function
    def dedup_segment_sum():
        unique_ids, positions = tf.unique(flat_ids)
        return tf.math.unsorted_segment_sum(lookups, positions, tf.shape(unique_ids)[0])

    @tf.function
    def dedup_sparse_matmul():  # what ctrflow does
        unique_ids, positions = tf.unique(flat_ids)
        return _sum_rows(lookups, positions, tf.shape(unique_ids)[0])

    @tf.function
    def adagrad_fused():
        tf.raw_ops.ResourceSparseApplyAdagradV2(
            var=var.handle, accum=accum.handle, lr=lr, epsilon=1e-7, grad=grad, indices=unique
        )

    @tf.function
    def adagrad_scatter():  # what ctrflow does
        n = tf.gather(accum, unique) + grad * grad
        scatter(accum, n)
        scatter(var, tf.gather(var, unique) - lr * grad / (tf.sqrt(n) + 1e-7))

    @tf.function
    def ftrl_fused():
        tf.raw_ops.ResourceSparseApplyFtrlV2(
            var=var.handle, accum=accum.handle, linear=linear.handle, grad=grad, indices=unique,
            lr=lr, l1=l1, l2=l2, l2_shrinkage=0.0, lr_power=-0.5,
        )

    @tf.function
    def ftrl_scatter():  # what ctrflow does
        n, w, z = tf.gather(accum, unique), tf.gather(var, unique), tf.gather(linear, unique)
        new_n = n + grad * grad
        z = z + grad - (tf.sqrt(new_n) - tf.sqrt(n)) / lr * w
        w = tf.where(tf.abs(z) > l1, (tf.sign(z) * l1 - z) / (tf.sqrt(new_n) / lr + 2 * l2), 0.0)
        scatter(accum, new_n)
        scatter(linear, z)
        scatter(var, w)

    @tf.function
    def adam_dense_fused():  # what ctrflow does
        tf.raw_ops.ResourceApplyAdam(
            var=var.handle, m=m.handle, v=v.handle, beta1_power=0.9, beta2_power=0.999, lr=0.001,
            beta1=0.9, beta2=0.999, epsilon=1e-7, grad=dense_grad,
        )

    @tf.function
    def adam_dense_ops():
        m.assign(0.9 * m + 0.1 * dense_grad)
        v.assign(0.999 * v + 0.001 * tf.square(dense_grad))
        var.assign_sub(0.001 * m / (tf.sqrt(v) + 1e-7))

    functions = (
        dedup_segment_sum, dedup_sparse_matmul, adagrad_fused, adagrad_scatter,
        ftrl_fused, ftrl_scatter, adam_dense_fused, adam_dense_ops,
    )
    times: dict[str, list[float]] = {fn.__name__: [] for fn in functions}
    for fn in functions:
        fn()  # trace
    for _ in range(repeats):  # interleaved, so that load from other processes hits every variant alike
        for fn in functions:
            start = time.perf_counter()
            fn()
            times[fn.__name__].append((time.perf_counter() - start) * 1e3)
    return {name: round(statistics.median(t), 2) for name, t in times.items()}


def print_table(summary: dict) -> None:
    print(
        f"table {summary['rows']:,} x {summary['dim']} float32, "
        f"batch {summary['batch']} x {summary['fields']} ids "
        f"(Zipf {summary['zipf']}, {summary['unique_rows_per_step']:,} unique rows/step), "
        f"{summary['steps']} steps, TF {summary['tensorflow']}, {summary['cpus']} CPUs"
    )
    results = summary["results"]
    base = results.get("lazyadam", {}).get("step_ms_median")
    print(f"{'optimizer':<12} {'median ms':>10} {'mean ms':>9} {'min ms':>8} {'vs lazyadam':>12}")
    for name, r in results.items():
        ratio = f"{r['step_ms_median'] / base:.2f}x" if base else "-"
        print(
            f"{name:<12} {r['step_ms_median']:>10.2f} {r['step_ms_mean']:>9.2f} "
            f"{r['step_ms_min']:>8.2f} {ratio:>12}"
        )
    if "update_only_ms" in summary:
        print("update only (no lookup), median ms:")
        for name, ms in summary["update_only_ms"].items():
            print(f"  {name:<18} {ms:>8.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
