"""Huge pages for the served tables: the model's own CPU per prediction with and without them.

Claim measured (BENCHMARKS.md, "Huge pages for the tables"): `Predictor.load(huge_pages="auto")`
(MADV_HUGEPAGE + MADV_COLLAPSE over the large variables' buffers) lowers `predict_ids`' CPU per
prediction when the gathers miss the caches, at no change of the scores; compared with starting the
process under `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc advises all of its heap).

Each variant runs in a fresh process (one TensorFlow intra-op thread, as a served compute call), the
variants interleaved `--pairs` times, so a noisy machine shows in the spread rather than in one
variant. Per process: `compute_ids` (one direct call, no batcher) on `--reps` rounds of 8 batches per
batch size and id distribution, best round's process CPU per prediction; AnonHugePages and RSS from
/proc/self/smaps_rollup; a checksum of the scores (identical across variants: bitwise the same model).

Id distributions: `random` (uniform over each field's table: the cache-miss worst case) and `zipf`
(per field, rank r drawn with probability ~ 1/r^1.1, ranks scattered over the table by a fixed
permutation as hashing scatters them: real traffic's hot ids).

Usage: python benchmarks/bench_hugepages.py [--model-base-path /tmp/lead-bench2/ctr] [--pairs 3]
       [--batches 1000,2000,4000] [--variants off,auto,tunable] [--reps 4]
Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {  # name: (huge_pages option, extra environment)
    "off": ("off", {}),
    "auto": ("auto", {}),
    "tunable": ("off", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}),
    "auto+tunable": ("auto", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}),
}


def _rollup() -> dict[str, int]:
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                out[parts[0][:-1]] = int(parts[1])
    return out


def _ids(rng, limits, rows: int, dist: str, perms):
    import numpy as np

    if dist == "random":
        return (rng.random((rows, len(limits))) * limits).astype(np.int32)
    cols = []
    for f, n in enumerate(limits):
        r = np.minimum(rng.zipf(1.1, rows), n) - 1  # rank 0 hottest; the tail clipped to the last rank
        cols.append(perms[f][r])
    return np.stack(cols, axis=1).astype(np.int32)


def _child(path: str, mode: str, batches: list[int], reps: int) -> None:
    import numpy as np

    from ctrflow._tf import quiet_import

    tf = quiet_import()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    from ctrflow.serving.predictor import Predictor

    t0 = time.perf_counter()
    p = Predictor.load(path, huge_pages=mode)
    load_s = time.perf_counter() - t0
    limits = np.asarray(p._id_limits, dtype=np.int64)
    n_num = len(p.numeric_names)
    out: dict = {"load_s": round(load_s, 2), "huge_pages": p.huge_pages.to_dict(), "cpu_us": {}}
    checksum = 0.0
    for dist in ("random", "zipf"):
        rng = np.random.default_rng(0)  # the same ids in every process
        perms = [rng.permutation(int(n)) for n in limits]
        for b in batches:
            inputs = [(_ids(rng, limits, b, dist, perms), rng.random((b, n_num)).astype(np.float32)) for _ in range(8)]
            for ids, num in inputs:
                checksum += float(p.compute_ids(ids, num).astype(np.float64).sum())
            best = float("inf")
            for _ in range(reps):
                t = time.process_time()
                for ids, num in inputs:
                    p.compute_ids(ids, num)
                best = min(best, (time.process_time() - t) / (8 * b) * 1e6)
            out["cpu_us"][f"{dist}@{b}"] = round(best, 3)
    roll = _rollup()
    out.update(checksum=checksum, rss_mb=round(roll.get("Rss", 0) / 1024, 1),
               anon_huge_mb=round(roll.get("AnonHugePages", 0) / 1024, 1))
    print(json.dumps(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-base-path", default="/tmp/lead-bench2/ctr")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--batches", default="1000,2000,4000")
    ap.add_argument("--variants", default="off,auto,tunable")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    batches = [int(x) for x in a.batches.split(",")]
    if a.child:
        _child(a.model_base_path, a.child, batches, a.reps)
        return 0
    variants = a.variants.split(",")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for i in range(a.pairs):
        for v in (variants if i % 2 == 0 else variants[::-1]):  # alternate the order: no variant always first
            mode, env = VARIANTS[v]
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--model-base-path", a.model_base_path,
                                   "--batches", a.batches, "--reps", str(a.reps)],
                                  env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            runs[v].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    keys = list(runs[variants[0]][0]["cpu_us"])
    print(f"{'variant':<14}" + "".join(f"{k:>16}" for k in keys) + f"{'AnonHuge MB':>12}{'RSS MB':>9}  huge_pages")
    for v in variants:
        cells = ["/".join(f"{r['cpu_us'][k]:.2f}" for r in runs[v]) for k in keys]
        print(f"{v:<14}" + "".join(f"{c:>16}" for c in cells)
              + f"{runs[v][0]['anon_huge_mb']:>12}{runs[v][0]['rss_mb']:>9}  {runs[v][0]['huge_pages']}")
    base = variants[0]
    ratios = {}
    for v in variants[1:]:
        ratios[v] = {k: round(sum(r[k] for r in (x["cpu_us"] for x in runs[v])) /
                              sum(r[k] for r in (x["cpu_us"] for x in runs[base])), 3) for k in keys}
        print(f"{v} / {base} (mean of pairs): " + ", ".join(f"{k} {x:.3f}" for k, x in ratios[v].items()))
    sums = {v: {round(r["checksum"], 6) for r in runs[v]} for v in variants}
    print("score checksums:", sums)
    print(json.dumps({"runs": runs, "ratios": ratios, "checksums_equal": len(set().union(*sums.values())) == 1}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
