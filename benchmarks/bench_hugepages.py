"""Huge pages for the served tables: the model's own CPU per prediction with and without them.

Claim measured (BENCHMARKS.md, "Huge pages for the tables"): `Predictor.load(huge_pages="auto")`
(MADV_HUGEPAGE + MADV_COLLAPSE over the large variables' buffers) lowers `predict_ids`' CPU per
prediction when the gathers miss the caches, at no change of the scores; compared with starting the
process under `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc advises all of its heap).

Two ways, both with one TensorFlow intra-op thread (as a served compute call) and `compute_ids` (one
direct call, no batcher) on 8 batches per batch size and id distribution:
- **A/B in one process** (`--ab-processes N`, the headline figure): the version loaded twice, with
  `huge_pages="off"` and `"auto"`, timed in alternating rounds (off, auto, off, auto, ...), so both see
  the same machine at the same moments; per cell the best round of each and the median of the per-round
  ratios auto/off. Several processes, since each lays its memory out differently.
- **One variant per process** (`--variants off,auto,tunable,auto+tunable`, run in alternating order
  `--pairs` times): needed for `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, which glibc reads at start;
  AnonHugePages and RSS from /proc/self/smaps_rollup show each variant's memory cost.
A checksum of the scores is printed per variant (identical: bitwise the same model).
`--parts` (one more process): where the call's CPU goes at batch 4000 — the whole call against its two
gathers alone (embedding [R, 16] and linear [R, 1], the export's shared tables), with random ids and with
all-zero ids (every row cached), off and auto in alternating rounds; then the same gathers from other
table layouts built here from the model's own tables: the linear weight packed as a 17th column of the
embedding row (one lookup instead of two), and that row padded to 32 floats (128 B, two whole lines).
`--file-backed`: whether a table shared between workers through a memory-mapped file could be on huge
pages: a 64 MB float32 `.npy` (evicted from the page cache first), `np.load(mmap_mode="r"|"c")` with
and without MADV_HUGEPAGE before the first touch, then MADV_COLLAPSE; and a memfd (shmem) table. Reports
FilePmdMapped / ShmemPmdMapped / AnonHugePages of the mapping (/proc/self/smaps).

Id distributions: `random` (uniform over each field's table: the cache-miss worst case), `zipf`
(per field, rank r drawn with probability ~ 1/r^1.1, ranks scattered over the table by a fixed
permutation as hashing scatters them: real traffic's hot ids), and `data`: what the serving benchmarks'
load generator sends — 6,400 rows (its 64 distinct bodies x 100 candidates) sampled from 20,000
generated synthetic rows and hashed by the export's `FeatureHasher`, batches drawn from that pool
(~26k distinct table rows: 1.6 MB of rows, but spread over ~9k of the table's 10k 4 kB pages).

Usage: python benchmarks/bench_hugepages.py [--model-base-path /tmp/lead-bench2/ctr] [--ab-processes 3]
       [--variants off,auto,tunable,auto+tunable] [--pairs 3] [--batches 1000,2000,4000] [--reps 6] [--parts] [--file-backed]
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


def _data_pool(folder: str | Path):
    """The load generator's kind of ids: 6,400 generated rows (seeded), hashed as a client would."""
    import tempfile

    import numpy as np

    from ctrflow.bench.loadgen import _Features, _read_rows
    from ctrflow.client.hashing import FeatureHasher
    from ctrflow.data.generate import GenerateOptions, generate

    info = json.loads((Path(folder) / "ctrflow.json").read_text())
    spec = info["feature_spec"]
    cats = tuple(n for n in spec["id_names"] if n not in spec["numeric_names"])
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp) / "rows.csv", GenerateOptions(rows=20_000, seed=2, split="test"))
        cols = _read_rows(Path(tmp) / "rows.csv", _Features(cats, tuple(spec["numeric_names"])), None)
    idx = np.random.default_rng(3).integers(0, 20_000, 6_400)
    ids, _ = FeatureHasher.from_manifest(Path(folder)).transform({k: [v[i] for i in idx] for k, v in cols.items()})
    return np.ascontiguousarray(ids, dtype=np.int32)


def _ids(rng, limits, rows: int, dist: str, perms, pool=None):
    import numpy as np

    if dist == "data":
        return pool[rng.integers(0, len(pool), rows)]
    if dist == "random":
        return (rng.random((rows, len(limits))) * limits).astype(np.int32)
    cols = []
    for f, n in enumerate(limits):
        r = np.minimum(rng.zipf(1.1, rows), n) - 1  # rank 0 hottest; the tail clipped to the last rank
        cols.append(perms[f][r])
    return np.stack(cols, axis=1).astype(np.int32)


def _child(path: str, mode: str, batches: list[int], reps: int) -> None:
    """mode "off"/"auto": one predictor; "ab": both, timed in alternating rounds."""
    import numpy as np

    from ctrflow._tf import quiet_import

    tf = quiet_import()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    from ctrflow.serving.predictor import Predictor

    t0 = time.perf_counter()
    modes = ("off", "auto") if mode == "ab" else (mode,)
    ps = [Predictor.load(path, huge_pages=m) for m in modes]
    load_s = time.perf_counter() - t0
    limits = np.asarray(ps[0]._id_limits, dtype=np.int64)
    n_num = len(ps[0].numeric_names)
    out: dict = {"load_s": round(load_s, 2), "huge_pages": ps[-1].huge_pages.to_dict(),
                 "cpu_us": {m: {} for m in modes}, "round_ratio_median": {}}
    checksums = [0.0] * len(ps)
    pool = _data_pool(ps[0].path)
    for dist in ("random", "zipf", "data"):
        rng = np.random.default_rng(0)  # the same ids in every process
        perms = [rng.permutation(int(n)) for n in limits]
        for b in batches:
            key = f"{dist}@{b}"
            inputs = [(_ids(rng, limits, b, dist, perms, pool), rng.random((b, n_num)).astype(np.float32)) for _ in range(8)]
            for j, p in enumerate(ps):
                for ids, num in inputs:
                    checksums[j] += float(p.compute_ids(ids, num).astype(np.float64).sum())
            rounds: list[list[float]] = [[] for _ in ps]
            for r in range(reps):
                for j in (range(len(ps)) if r % 2 == 0 else range(len(ps) - 1, -1, -1)):
                    t = time.process_time()
                    for ids, num in inputs:
                        ps[j].compute_ids(ids, num)
                    rounds[j].append((time.process_time() - t) / (8 * b) * 1e6)
            for m, xs in zip(modes, rounds):
                out["cpu_us"][m][key] = round(min(xs), 3)
            if len(ps) == 2:
                out["round_ratio_median"][key] = round(float(np.median(np.divide(rounds[1], rounds[0]))), 3)
    from bench_shared_weights import _rollup  # (benchmarks/: the script's folder is on sys.path)

    roll = _rollup()
    out.update(checksums=checksums, rss_mb=round(roll.get("Rss", 0) / 1024, 1),
               anon_huge_mb=round(roll.get("AnonHugePages", 0) / 1024, 1))
    for p in ps:
        p.close()
    print(json.dumps(out))


def _parts(path: str, reps: int) -> None:
    import numpy as np

    from ctrflow._tf import quiet_import

    tf = quiet_import()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    from ctrflow.serving.hugepages import advise_variables
    from ctrflow.serving.predictor import Predictor

    ps = {m: Predictor.load(path, huge_pages=m) for m in ("off", "auto")}
    limits = np.asarray(ps["off"]._id_limits)
    offsets = tf.constant(np.concatenate([[0], np.cumsum(limits)[:-1]]).astype(np.int32))
    b, rng = 4000, np.random.default_rng(0)
    ids = {"random": [(rng.random((b, len(limits))) * limits).astype(np.int32) for _ in range(8)],
           "cached": [np.zeros((b, len(limits)), np.int32) for _ in range(8)]}
    numeric = rng.random((b, len(ps["off"].numeric_names))).astype(np.float32)

    def tables(p):
        vs = [o for o in tf.train.TrackableView(p._loaded).descendants() if isinstance(o, tf.Variable)]
        return [next(v for v in vs if f"{k}/table" in v.name) for k in ("embedding", "linear")]

    def module(**arrays):
        m = tf.Module()
        for k, a in arrays.items():
            setattr(m, k, tf.Variable(a))
        return m

    emb, lin = (v.numpy() for v in tables(ps["off"]))
    cells = {}  # name -> (fn, inputs)
    for m, p in ps.items():
        e, l = tables(p)
        cells[f"whole call, random ids, {m}"] = (lambda x, p=p: p.compute_ids(x, numeric), ids["random"])
        cells[f"whole call, cached ids, {m}"] = (lambda x, p=p: p.compute_ids(x, numeric), ids["cached"])
        gathers = tf.function(lambda i, e=e, l=l: (tf.reduce_sum(tf.gather(e, i + offsets)), tf.reduce_sum(tf.gather(l, i + offsets))))
        cells[f"both gathers, random ids, {m}"] = (gathers, [tf.constant(x) for x in ids["random"]])
        cells[f"both gathers, cached ids, {m}"] = (gathers, [tf.constant(x) for x in ids["cached"]])
        packed = module(t=np.concatenate([emb, lin], 1))
        padded = module(t=np.concatenate([emb, lin, np.zeros((len(emb), 15), np.float32)], 1))
        advise_variables(packed, m), advise_variables(padded, m)
        cells[f"packed [R,17] gather, random ids, {m}"] = (
            tf.function(lambda i, t=packed.t: tf.reduce_sum(tf.gather(t, i + offsets))), [tf.constant(x) for x in ids["random"]])
        cells[f"padded [R,32] gather, random ids, {m}"] = (
            tf.function(lambda i, t=padded.t: tf.reduce_sum(tf.gather(t, i + offsets)[..., :17])), [tf.constant(x) for x in ids["random"]])
    for fn, xs in cells.values():
        for x in xs:
            fn(x)
    times: dict[str, list[float]] = {k: [] for k in cells}
    names = list(cells)
    for r in range(reps):
        for k in (names if r % 2 == 0 else names[::-1]):
            fn, xs = cells[k]
            t = time.process_time()
            for x in xs:
                fn(x)
            times[k].append((time.process_time() - t) / (len(xs) * b) * 1e6)
    print(json.dumps({k: {"best": round(min(v), 3), "median": round(float(np.median(v)), 3)} for k, v in times.items()}))


def _file_backed() -> None:
    import ctypes
    import mmap
    import tempfile

    import numpy as np

    from ctrflow.serving.hugepages import HUGE, MADV_COLLAPSE, MADV_HUGEPAGE, _libc_madvise

    madvise = _libc_madvise()
    fields = ("Rss:", "FilePmdMapped:", "ShmemPmdMapped:", "AnonHugePages:")

    def pmd(lo: int, hi: int) -> dict:
        out, cur = {}, False
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    a, b = (int(x, 16) for x in head.split("-"))
                    cur = a < hi and lo < b
                elif cur and head in fields:
                    out[head[:-1]] = out.get(head[:-1], 0) + int(line.split()[1]) // 1024
        return out

    def advise(addr: int, size: int, how: int) -> str:
        lo = -(-addr // HUGE) * HUGE
        n = (addr + size - lo) // HUGE * HUGE
        return "ok" if madvise(lo, n, how) == 0 else os.strerror(ctypes.get_errno())

    rows = []
    with tempfile.TemporaryDirectory(prefix="ctrflow-thp-", dir="/tmp") as tmp:
        path = os.path.join(tmp, "table.npy")
        np.save(path, np.random.default_rng(0).random((1 << 20, 16), dtype=np.float32))
        os.sync()
        for mode in ("r", "c"):
            for hint in (False, True):
                fd = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: evicted without root
                os.close(fd)
                a = np.load(path, mmap_mode=mode)
                addr, size = a.ctypes.data, a.nbytes
                pre = advise(addr, size, MADV_HUGEPAGE) if hint else "-"
                float(a.sum())
                before = pmd(addr, addr + size)
                collapse = advise(addr, size, MADV_COLLAPSE)
                rows.append({"mapping": f"np.load mmap_mode={mode!r}", "MADV_HUGEPAGE before touch": pre,
                             "after touch": before, "MADV_COLLAPSE": collapse, "after collapse": pmd(addr, addr + size)})
                del a
    fd = os.memfd_create("ctrflow-thp")
    os.ftruncate(fd, 64 << 20)
    m = mmap.mmap(fd, 64 << 20, mmap.MAP_SHARED)
    b = np.frombuffer(m, np.float32)
    addr, size = b.ctypes.data, b.nbytes
    pre = advise(addr, size, MADV_HUGEPAGE)
    b[:] = 1.0
    rows.append({"mapping": "memfd (shmem)", "MADV_HUGEPAGE before touch": pre, "after touch": pmd(addr, addr + size),
                 "MADV_COLLAPSE": advise(addr, size, MADV_COLLAPSE), "after collapse": pmd(addr, addr + size)})
    # A second process mapping the same memfd (as another worker would): are its pages PMD-mapped too?
    # Once where mmap puts it, once at a 2 MB-aligned address (an aligned reservation, then MAP_FIXED).
    os.set_inheritable(fd, True)
    for aligned in (False, True):
        out = subprocess.run([sys.executable, __file__, "--child", "memfd-reader", "--reps", str(fd),
                              "--batches", "1" if aligned else "0"], close_fds=False, capture_output=True, text=True)
        got = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-300:]}
        rows.append({"mapping": f"memfd, 2nd process{', aligned' if aligned else ''}", "MADV_HUGEPAGE before touch": "-",
                     "after touch": got, "MADV_COLLAPSE": "-", "after collapse": {}})
    del b
    m.close()
    os.close(fd)
    print(json.dumps(rows))


def _memfd_reader(fd: int, aligned: bool) -> None:
    """Map the parent's 64 MB memfd read-only, touch it, report ShmemPmdMapped of the mapping."""
    import ctypes
    import mmap

    import numpy as np

    from ctrflow.serving.hugepages import HUGE

    size = 64 << 20
    if aligned:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
        hold = libc.mmap(None, size + HUGE, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)  # PROT_NONE
        at = -(-hold // HUGE) * HUGE
        addr = libc.mmap(at, size, mmap.PROT_READ, mmap.MAP_SHARED | 0x10, fd, 0)  # 0x10: MAP_FIXED
        table = np.ctypeslib.as_array(ctypes.cast(addr, ctypes.POINTER(ctypes.c_float)), (size // 4,))
    else:
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        table = np.frombuffer(m, np.float32)
        addr = table.ctypes.data
    total = float(table.sum())
    n, cur = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                cur = lo < addr + size and addr < hi
            elif cur and head == "ShmemPmdMapped:":
                n += int(line.split()[1]) // 1024
    print(json.dumps({"ShmemPmdMapped": n, "address 2 MB-aligned": addr % HUGE == 0, "sum": total}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-base-path", default="/tmp/lead-bench2/ctr")
    ap.add_argument("--ab-processes", type=int, default=3, help="processes timing off and auto in alternating rounds")
    ap.add_argument("--variants", default="", help="also one process per variant, e.g. off,auto,tunable,auto+tunable")
    ap.add_argument("--pairs", type=int, default=3, help="rounds of --variants processes")
    ap.add_argument("--batches", default="1000,2000,4000")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--parts", action="store_true", help="also the call's parts and other table layouts (one process)")
    ap.add_argument("--file-backed", action="store_true", help="also: huge pages for a memory-mapped (shared) table")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    batches = [int(x) for x in a.batches.split(",")]
    if a.child == "memfd-reader":  # --reps carries the fd, --batches 1 asks for an aligned mapping
        _memfd_reader(a.reps, a.batches == "1")
        return 0
    if a.child == "file":
        _file_backed()
        return 0
    if a.child == "parts":
        _parts(a.model_base_path, a.reps)
        return 0
    if a.child:
        _child(a.model_base_path, a.child, batches, a.reps)
        return 0
    def run(mode: str, env: dict) -> dict:
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--model-base-path", a.model_base_path,
                               "--batches", a.batches, "--reps", str(a.reps)],
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
        if proc.returncode:
            raise SystemExit(f"child {mode} failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    report: dict = {}
    if a.ab_processes:
        ab = [run("ab", {}) for _ in range(a.ab_processes)]
        keys = list(ab[0]["round_ratio_median"])
        print(f"A/B in one process ({a.ab_processes} processes, {a.reps} alternating rounds each): "
              "best CPU µs/pred off -> auto, median per-round ratio auto/off")
        print(f"{'cell':<14}" + "".join(f"{'process %d' % (i + 1):>28}" for i in range(len(ab))) + f"{'median ratio':>14}")
        for k in keys:
            cells = [f"{r['cpu_us']['off'][k]:.2f} -> {r['cpu_us']['auto'][k]:.2f} ({r['round_ratio_median'][k]:.3f})" for r in ab]
            med = float(sorted(r["round_ratio_median"][k] for r in ab)[len(ab) // 2])
            print(f"{k:<14}" + "".join(f"{c:>28}" for c in cells) + f"{med:>14.3f}")
        same = all(r["checksums"][0] == r["checksums"][1] for r in ab)
        print(f"huge pages: {ab[0]['huge_pages']}; scores off == auto (checksum): {same}")
        report["ab"] = {"runs": ab, "scores_equal": same,
                        "median_ratio": {k: sorted(r["round_ratio_median"][k] for r in ab)[len(ab) // 2] for k in keys}}
    variants = [v for v in a.variants.split(",") if v]
    if variants:
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for i in range(a.pairs):
            for v in (variants if i % 2 == 0 else variants[::-1]):  # alternate the order: no variant always first
                mode, env = VARIANTS[v]
                r = run(mode, env)
                r["cpu_us"] = r["cpu_us"][mode]
                runs[v].append(r)
        keys = list(runs[variants[0]][0]["cpu_us"])
        print(f"\none variant per process, {a.pairs} rounds in alternating order: best CPU µs/pred per process")
        print(f"{'variant':<14}" + "".join(f"{k:>18}" for k in keys) + f"{'AnonHuge MB':>12}{'RSS MB':>9}  huge_pages")
        for v in variants:
            cells = ["/".join(f"{r['cpu_us'][k]:.2f}" for r in runs[v]) for k in keys]
            print(f"{v:<14}" + "".join(f"{c:>18}" for c in cells)
                  + f"{runs[v][0]['anon_huge_mb']:>12}{runs[v][0]['rss_mb']:>9}  {runs[v][0]['huge_pages']['status']}")
        base = variants[0]
        ratios = {}
        for v in variants[1:]:  # per round (the two processes ran next to each other), then the median
            ratios[v] = {k: float(sorted(x["cpu_us"][k] / y["cpu_us"][k] for x, y in zip(runs[v], runs[base]))[a.pairs // 2])
                         for k in keys}
            print(f"{v} / {base} (median over rounds): " + ", ".join(f"{k} {x:.3f}" for k, x in ratios[v].items()))
        sums = {v: sorted({round(r["checksums"][0], 6) for r in runs[v]}) for v in variants}
        print("score checksums:", sums)
        report["variants"] = {"runs": runs, "ratios": ratios}
    if a.parts:
        parts = run("parts", {})
        print(f"\nparts at batch 4000 (one process, {a.reps} alternating rounds): CPU µs/pred best / median")
        for k, v in parts.items():
            print(f"  {k:<44}{v['best']:>8.2f}{v['median']:>8.2f}")
        report["parts"] = parts
    if a.file_backed:
        rows = run("file", {})
        print("\nfile-backed and shmem tables (64 MB; MB of the mapping):")
        for r in rows:
            print(f"  {r['mapping']:<24} MADV_HUGEPAGE before touch: {r['MADV_HUGEPAGE before touch']:<4} after touch {r['after touch']}"
                  f"  MADV_COLLAPSE: {r['MADV_COLLAPSE']}  after {r['after collapse']}")
        report["file_backed"] = rows
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
