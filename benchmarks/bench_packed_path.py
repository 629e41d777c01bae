"""The Predictor's raw compute call: `serving_packed` (two matrices) vs one input per field (before).

Claim measured: at serving batch sizes most of a raw call's CPU is its per-input cost, so the packed
call costs about half at 100 rows; at thousands of rows the graph's own work dominates and both cost
the same. What the batcher calls (`Predictor._compute` on prepared columns), CPU time of this process,
the two ways interleaved in rounds (median of the rounds), run on one pinned core:

    taskset -c 1 python benchmarks/bench_packed_path.py --model-base-path /tmp/packed-bench/ctr

The export needs `serving_packed` (exports made since it exists). Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-base-path", required=True)
    ap.add_argument("--rows", default="100,1000,4000", help="rows per call, comma-separated")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cpu-ms-per-way", type=float, default=300.0, help="CPU per way per round, about")
    args = ap.parse_args()
    import numpy as np

    from ctrflow.serving.predictor import Predictor

    p = Predictor.load(args.model_base_path)
    packed = p._packed_signature
    if packed is None:
        print(f"error: {args.model_base_path} has no serving_packed signature; re-export it.", file=sys.stderr)
        return 2
    ways = {"per_field": None, "packed": packed}
    rng = np.random.default_rng(0)
    result = {}
    for n in (int(x) for x in args.rows.split(",")):
        inputs = p.prepare({k: ([f"{x:x}" for x in rng.integers(0, 5000, n)] if k in p._cat_set
                                else list(rng.normal(size=n))) for k in p.feature_names})
        outs = {}
        for way, sig in ways.items():  # warm both; they must score alike
            p._packed_signature = sig
            outs[way] = p._compute(inputs)
        assert np.array_equal(outs["per_field"], outs["packed"]), "the two ways scored differently"
        c0 = time.process_time()
        p._compute(inputs)
        reps = max(1, int(args.cpu_ms_per_way / max((time.process_time() - c0) * 1e3, 0.05)))
        times: dict = {w: [] for w in ways}
        for _ in range(args.rounds):
            for way, sig in ways.items():
                p._packed_signature = sig
                c0 = time.process_time()
                for _ in range(reps):
                    p._compute(inputs)
                times[way].append((time.process_time() - c0) / reps * 1e3)
        med = {w: float(np.median(v)) for w, v in times.items()}
        result[n] = {"per_field_ms": round(med["per_field"], 3), "packed_ms": round(med["packed"], 3),
                     "saving": round(1 - med["packed"] / med["per_field"], 3)}
    p._packed_signature = packed
    print(f"{'rows':>6} {'per-field ms':>13} {'packed ms':>10} {'saving':>7}")
    for n, r in result.items():
        print(f"{n:>6} {r['per_field_ms']:>13.3f} {r['packed_ms']:>10.3f} {r['saving']:>7.0%}")
    print(json.dumps({"benchmark": "packed_path", "model": args.model_base_path, "rows": result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
