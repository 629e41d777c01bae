"""Can server workers share an embedding table through a memory-mapped .npy? Private vs file-backed pages.

Each way of turning a memory-mapped table into a TensorFlow tensor runs in a fresh process, which then
gathers rows inside a `tf.function` (as a serving graph would) and reports from /proc/self/smaps_rollup
how much of its memory grew as private dirty pages (a copy: per worker) and as clean file-backed pages
(the page cache: shared by every worker mapping the file).

Usage: python benchmarks/bench_shared_weights.py [--rows 4000000] [--dim 16]
Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WAYS = {
    "convert_to_tensor, mmap r": ("r", False),
    "convert_to_tensor, mmap c (copy-on-write)": ("c", False),
    "dlpack, mmap c (copy-on-write)": ("c", True),
}


def _rollup() -> dict[str, int]:
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                out[parts[0][:-1]] = int(parts[1])
    return out


def _child(path: str, mode: str, dlpack: bool) -> None:
    import numpy as np

    from ctrflow._tf import quiet_import

    tf = quiet_import()
    before = _rollup()
    table = np.load(path, mmap_mode=mode)
    t = tf.experimental.dlpack.from_dlpack(table.__dlpack__()) if dlpack else tf.convert_to_tensor(table)
    ids = tf.constant(np.random.default_rng(1).integers(0, table.shape[0], 400_000), tf.int64)

    @tf.function
    def score(i):
        return tf.reduce_sum(tf.gather(t, i))

    total = float(score(ids))
    after = _rollup()
    print(json.dumps({"private_dirty_mb": (after["Private_Dirty"] - before["Private_Dirty"]) / 1024,
                      "file_clean_mb": (after["Private_Clean"] + after["Shared_Clean"] - before["Private_Clean"]
                                        - before["Shared_Clean"]) / 1024, "checksum": total}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4_000_000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.child[2] == "1")
        return
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "table.npy")
        np.save(path, np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32))
        table_mb = args.rows * args.dim * 4 / 2**20
        results = {}
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for name, (mode, dlpack) in WAYS.items():
            r = subprocess.run([sys.executable, __file__, "--child", path, mode, "1" if dlpack else "0"],
                               capture_output=True, text=True, env=env, timeout=600)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            results[name] = json.loads(lines[-1]) if lines else {"error": r.stderr.strip().splitlines()[-1:]}
    print(f"table {args.rows:,} x {args.dim} float32 = {table_mb:.0f} MB")
    print(f"{'way':44s} {'private dirty MB':>17s} {'file-backed MB':>15s}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:44s} error: {r['error']}")
        else:
            print(f"{name:44s} {r['private_dirty_mb']:17.0f} {r['file_clean_mb']:15.0f}")
    print(json.dumps({"table_mb": table_mb, "results": results}))


if __name__ == "__main__":
    main()
