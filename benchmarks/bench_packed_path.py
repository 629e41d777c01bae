"""The Predictor's raw compute call: `serving_packed` (two matrices) vs one input per field (before).

Claim measured: at serving batch sizes most of a raw call's CPU is its per-input cost, so the packed
call costs about half at 100 rows; at thousands of rows the graph's own work dominates and both cost
the same. What the batcher calls (`Predictor._compute` on prepared columns), CPU time of this process,
the two ways interleaved in rounds (median of the rounds), run on one pinned core:

    taskset -c 1 python benchmarks/bench_packed_path.py --model-base-path /tmp/packed-bench/ctr

The export needs `serving_packed` (exports made since it exists). Prints a table, then one JSON line.

`--flat-call`: instead, both batchers' calls (`_compute_ids` on ids, `_compute` on prepared raw columns)
through the signature's own Python call vs the flat call the predictor uses (`_flat_caller`: no
argument binding), CPU of the calling thread (what the batch thread spends, under the GIL) and of the
process, per call, interleaved rounds, median:

    python benchmarks/bench_packed_path.py --model-base-path /tmp/lead-bench2/ctr --flat-call --rows 1,100,1500
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
    ap.add_argument("--flat-call", action="store_true", help="signature call vs the flat call, ids and raw (see above)")
    args = ap.parse_args()
    import numpy as np

    from ctrflow.serving.predictor import Predictor

    p = Predictor.load(args.model_base_path)
    if args.flat_call:
        return flat_call(p, args)
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


def flat_call(p, args) -> int:
    """Per call CPU (calling thread, process) of each batcher's compute: signature call vs flat call."""
    import numpy as np

    flat = p._flat
    rng = np.random.default_rng(0)
    result: dict = {}
    for n in (int(x) for x in args.rows.split(",")):
        ids = (rng.integers(0, 2**31, (n, len(p._id_limits))) % p._id_limits).astype(np.int32)
        calls = {"ids": (p._compute_ids, {"ids": ids, "numeric": rng.random((n, len(p.numeric_names)), dtype=np.float32)})}
        if p._packed_signature is not None:
            calls["raw"] = (p._compute, p.prepare({k: ([f"{x:x}" for x in rng.integers(0, 5000, n)] if k in p._cat_set
                                                       else list(rng.normal(size=n))) for k in p.feature_names}))
        for path, (fn, inputs) in calls.items():
            outs = {}
            for way, table in (("signature", {}), ("flat", flat)):  # warm both; they must score alike
                p._flat = table
                outs[way] = fn(inputs)
            assert np.array_equal(outs["signature"], outs["flat"]), "the two calls scored differently"
            t0 = time.process_time()
            fn(inputs)
            reps = max(1, int(args.cpu_ms_per_way / max((time.process_time() - t0) * 1e3, 0.05)))
            times: dict = {w: ([], []) for w in ("signature", "flat")}
            for _ in range(args.rounds):
                for way, table in (("signature", {}), ("flat", flat)):
                    p._flat = table
                    c0, t0 = time.process_time(), time.thread_time()
                    for _ in range(reps):
                        fn(inputs)
                    times[way][0].append((time.thread_time() - t0) / reps * 1e6)
                    times[way][1].append((time.process_time() - c0) / reps * 1e6)
            result[f"{path}_{n}"] = {f"{way}_{what}_us": round(float(np.median(v)), 1)
                                     for way, (thread, proc) in times.items() for what, v in (("thread", thread), ("process", proc))}
    p._flat = flat
    print(f"{'call':>10} {'signature: thread us':>21} {'process us':>11} {'flat: thread us':>16} {'process us':>11}")
    for key, r in result.items():
        print(f"{key:>10} {r['signature_thread_us']:>21.1f} {r['signature_process_us']:>11.1f} {r['flat_thread_us']:>16.1f} {r['flat_process_us']:>11.1f}")
    print(json.dumps({"benchmark": "flat_call", "model": args.model_base_path, "calls": result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
