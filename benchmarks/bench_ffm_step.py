"""FFM's compiled training step alone (no pipeline, no bookkeeping): ms per step, min and median of N.

Steps are timed one by one on the same few batches, so on a shared machine the minimum is the step's cost
and the median what the load left of it; compare trees by alternating runs (the script only uses APIs
older than the pair weights, so a copy runs in an older tree). `--plain-too` also builds the same model
with its pair weights off (ffm_interaction's unweighted path, the FFM before them) and interleaves the two
step by step in this process: what the pair weights cost, both under the same load.

Usage: python benchmarks/bench_ffm_step.py --shards DIR [--steps 40] [--batch-size 4096] [--plain-too]
(DIR: e.g. bench_train.py's capped FFM shards, bench-out/train-shards-100000-cap16384.)
Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--plain-too", action="store_true", help="interleave the same model without its pair weights")
    args = ap.parse_args()

    import tensorflow as tf

    import ctrflow.models.registry as registry
    from ctrflow.data.pipeline import PipelineOptions, open_batches
    from ctrflow.models.registry import ModelConfig
    from ctrflow.train.config import TrainConfig
    from ctrflow.train.loop import Trainer

    bs_ = args.batch_size
    cfg = TrainConfig(model=ModelConfig("ffm"), optimizer="lazyadam", learning_rate=1e-3, batch_size=bs_, l2=0.0,
                      lr_scaling="none")  # bench_train.py's settings
    with open_batches(args.shards, PipelineOptions(batch_size=bs_, shuffle=False)) as bs:
        spec = bs.spec
        batches = [b for _, b in zip(range(8), bs) if b.rows == bs_]
    w = tf.ones([bs_])
    inputs = [(tf.constant(b.ids), tf.constant(b.numeric), tf.constant(b.label), w) for b in batches]
    trainers = {"ffm": Trainer(Path(tempfile.mkdtemp()), cfg, spec)}
    if args.plain_too:
        from ctrflow.models.ffm import FieldAwareFM
        from ctrflow.models.layers import ffm_interaction

        class PlainFFM(FieldAwareFM):  # the pair weights built but unused: every r_ij = 1
            def call(self, ids, values, training):
                emb = self.embedding(ids, values)
                return self.linear(ids, values) + ffm_interaction(emb, self.layout.n_fields, self.config.ffm_dim)

        real = registry.model_class
        registry.model_class = lambda kind: PlainFFM if kind == "ffm" else real(kind)
        try:
            trainers["ffm_plain"] = Trainer(Path(tempfile.mkdtemp()), cfg, spec)
        finally:
            registry.model_class = real
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for tr in trainers.values():
        for a in inputs[:3]:  # trace and warm up
            tr.train_step(*a)
    order = list(trainers.items())
    for i in range(args.steps):
        a = inputs[i % len(inputs)]
        for name, tr in (order if i % 2 == 0 else order[::-1]):
            t = time.perf_counter()
            tr.train_step(*a).numpy()
            times[name].append(time.perf_counter() - t)
    rows = int(sum(spec.id_buckets))
    result = {"table_rows": rows, "batch_size": bs_, "steps": args.steps, "load_1min": os.getloadavg()[0]}
    for name, ts in times.items():
        result[f"{name}_min_ms"] = 1e3 * min(ts)
        result[f"{name}_median_ms"] = 1e3 * float(np.median(ts))
    if args.plain_too:
        result["pair_weights_cost_min"] = result["ffm_min_ms"] / result["ffm_plain_min_ms"]
        result["pair_weights_cost_median"] = result["ffm_median_ms"] / result["ffm_plain_median_ms"]
    print(f"{'measure':<34}{'value':>14}")
    for k, v in result.items():
        print(f"{k:<34}{v:>14,.3f}" if isinstance(v, float) else f"{k:<34}{v!s:>14}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
