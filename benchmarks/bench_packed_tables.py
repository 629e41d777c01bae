"""Packed tables: serving CPU per prediction of an export with the linear weight packed into the
embedding rows (`ctrflow export --pack-tables on`) against the same run exported unpacked (`off`).

Claim measured (BENCHMARKS.md, "Packed tables"): one gather of an `[R, dim + 1]` table instead of two
(`[R, dim]` and `[R, 1]`) saves CPU per prediction; the scores are the same.

For each run: exports it twice (`pack_tables="off"` and `"on"`, same checkpoint, into a temp folder; with
`--context-fields` both also get the context signatures), loads both versions in this one process
(`Predictor.load`, huge pages as served: "auto") and times direct signature calls (no batcher, one
TensorFlow intra-op thread, as one served compute call) in alternating rounds (off, on, on, off, ...),
so both see the same machine at the same moments: on a shared 2-core box only such interleaved ratios
mean anything. Per cell: the best round of each (CPU µs per prediction, `time.process_time`) and the
median of the per-round ratios on/off. Cells:
- `predict_ids` at each batch size with `random`, `zipf` and `data` ids (bench_hugepages' distributions:
  uniform over each field's table; Zipf 1.1 ranks scattered by a permutation; the load generator's rows
  hashed by the export's FeatureHasher);
- with `--raw`: `serving_packed` (raw strings/numbers, hashed in-graph) on the `data` rows;
- with `--context-fields`: `predict_context`, one context row per 100 candidates, `data` ids.
Scores of the two exports are compared on every input (max |difference| printed; 0 = bitwise equal).
`--parts`: instead, the gathers alone at the largest batch (random ids): the run's embedding and linear
tables, the packed table, and the packed table gathered then sliced into its parts (where the saving goes).

Usage: python benchmarks/bench_packed_tables.py --run RUN [--run RUN2 ...] [--batches 500,1000,2000,4000]
       [--reps 6] [--raw] [--context-fields C1,C2,...] [--parts]
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
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

N_INPUTS = 6  # distinct batches per cell (each timed once per round)


def _time_ab(calls, inputs, rows: int, reps: int) -> tuple[list[float], list[float]]:
    """Rounds of CPU µs per prediction for calls[0] (off) and calls[1] (on), alternating their order."""
    rounds: tuple[list[float], list[float]] = ([], [])
    for r in range(reps):
        for j in ((0, 1) if r % 2 == 0 else (1, 0)):
            t = time.process_time()
            for x in inputs:
                calls[j](x)
            rounds[j].append((time.process_time() - t) / (len(inputs) * rows) * 1e6)
    return rounds


def _cell(out: dict, key: str, calls, inputs, rows: int, reps: int) -> None:
    import numpy as np

    diff = 0.0
    for x in inputs:  # first calls: warm, and the scores compared
        a, b = calls[0](x), calls[1](x)
        diff = max(diff, float(np.abs(a.astype(np.float64) - b).max()))
    off, on = _time_ab(calls, inputs, rows, reps)
    ratio = float(np.median(np.divide(on, off)))
    out[key] = {"off_best": round(min(off), 3), "on_best": round(min(on), 3), "ratio_median": round(ratio, 3),
                "max_abs_diff": diff}
    print(f"| {key} | {min(off):.3f} | {min(on):.3f} | {ratio:.3f} | {diff:.2g} |", flush=True)


def bench_run(run: str, batches: list[int], reps: int, raw: bool, context_fields: str | None) -> dict:
    import numpy as np

    from bench_hugepages import _data_pool, _ids
    from ctrflow.export import export
    from ctrflow.serving.predictor import Predictor

    tmp = Path(tempfile.mkdtemp(prefix="bench-packed-"))
    paths = {}
    for mode in ("off", "on"):
        s = export(run, tmp / mode, pack_tables=mode, context_fields=context_fields if context_fields else [])
        paths[mode] = s.path
    info = json.loads((Path(paths["on"]) / "ctrflow.json").read_text())
    ps = [Predictor.load(paths[m]) for m in ("off", "on")]
    result: dict = {"run": run, "kind": info["model"]["kind"], "table_mode": info["model"]["table_mode"],
                    "packed": info["packed_tables"], "cells": {}}
    print(f"\n{run}: {result['kind']} ({result['table_mode']}), packed: {result['packed']}, "
          f"export {sum(f.stat().st_size for f in Path(paths['on']).rglob('*') if f.is_file()) / 1e6:.1f} MB")
    print("| cell | off µs/pred best | on µs/pred best | median ratio on/off | max abs diff |")
    print("|---|---|---|---|---|")
    limits = np.asarray(ps[0]._id_limits, dtype=np.int64)
    n_num = len(ps[0].numeric_names)
    pool = _data_pool(paths["on"])
    cells = result["cells"]
    ids_calls = [lambda x, p=p: p.run_direct("predict_ids", {"ids": x[0], "numeric": x[1]})["probabilities"] for p in ps]
    for dist in ("random", "zipf", "data"):
        rng = np.random.default_rng(0)
        perms = [rng.permutation(int(n)) for n in limits]
        for b in batches:
            inputs = [(_ids(rng, limits, b, dist, perms, pool), rng.random((b, n_num)).astype(np.float32))
                      for _ in range(N_INPUTS)]
            _cell(cells, f"predict_ids {dist} @ {b}", ids_calls, inputs, b, reps)
    if raw:
        from ctrflow.bench.loadgen import _Features, _read_rows
        from ctrflow.data.generate import GenerateOptions, generate
        from ctrflow.export import PACKED_SIGNATURE
        from ctrflow.schema import Schema

        schema = Schema.from_dict(info["schema"])
        with tempfile.TemporaryDirectory() as t:
            generate(Path(t) / "rows.csv", GenerateOptions(rows=8000, seed=2, split="test"))
            cols = _read_rows(Path(t) / "rows.csv", _Features(tuple(schema.categorical_names), tuple(schema.numeric_names)), None)
        b = min(2000, max(batches))
        rng = np.random.default_rng(1)
        inputs = []
        for _ in range(N_INPUTS):
            idx = rng.integers(0, 8000, b)
            strings = np.array([[str(cols[n][i]) if cols[n][i] is not None else "" for i in idx] for n in schema.categorical_names], object)
            numbers = np.array([[np.nan if cols[n][i] is None else float(cols[n][i]) for i in idx] for n in schema.numeric_names], np.float64)
            inputs.append((strings, numbers))
        raw_calls = [lambda x, p=p: p.run_direct(PACKED_SIGNATURE, {"strings": x[0], "numbers": x[1]})["probabilities"] for p in ps]
        _cell(cells, f"serving_packed (raw) data @ {b}", raw_calls, inputs, b, reps)
    if context_fields:
        ctx = info["context"]
        ci, cn = ctx["id_columns"], ctx["numeric_columns"]
        ki = [c for c in range(len(limits)) if c not in ci]
        kn = [c for c in range(n_num) if c not in cn]
        rng = np.random.default_rng(2)
        for b in (x for x in batches if x >= 1000):
            r = b // 100  # 100 candidates per context row
            inputs = []
            for _ in range(N_INPUTS):
                ids = pool[rng.integers(0, len(pool), b)]
                num = rng.random((b, n_num)).astype(np.float32)
                row = np.repeat(np.arange(r, dtype=np.int32), 100)
                inputs.append({"context_ids": np.ascontiguousarray(ids[:r][:, ci]), "context_numeric": np.ascontiguousarray(num[:r][:, cn]),
                               "ids": np.ascontiguousarray(ids[:, ki]), "numeric": np.ascontiguousarray(num[:, kn]), "row": row})
            ctx_calls = [lambda x, p=p: p.run_direct("predict_context", x)["probabilities"] for p in ps]
            _cell(cells, f"predict_context data @ {r} x 100", ctx_calls, inputs, b, reps)
    for p in ps:
        p.close()
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return result


def parts(run: str, batch: int, reps: int) -> dict:
    """Where packing's saving goes: the run's own embedding [R, dim] and linear [R, 1] tables gathered
    alone, the packed [R, dim + 1] table gathered alone, and gathered then sliced into its two parts (what
    a model that reads the parts as separate tensors pays), random ids, one op each (tf.function)."""
    import numpy as np
    import tensorflow as tf

    from ctrflow.train.loop import build_model_from_run, load_run_info, restore_latest

    model = build_model_from_run(load_run_info(run))
    restore_latest(run, model)
    model.bake_id_remap()
    emb, lin = model.embedding.table.tables[0], model.linear.table.tables[0]
    packed = tf.Variable(tf.concat([emb, lin], axis=1))
    dim, rows, fields = emb.shape[1], emb.shape[0], model.layout.n_id_fields
    rng = np.random.default_rng(0)
    inputs = [tf.constant(rng.integers(0, rows, (batch, fields)).astype(np.int32)) for _ in range(N_INPUTS)]
    touch = lambda *ts: tf.add_n([t[0, 0, 0] if t.shape.rank == 3 else t[0, 0] for t in ts])  # noqa: E731
    cells = {
        "gather embedding [R, dim]": lambda i: touch(tf.gather(emb, i)),
        "gather linear [R, 1]": lambda i: touch(tf.gather(lin, i)),
        "gather both (the unpacked export)": lambda i: touch(tf.gather(emb, i), tf.gather(lin, i)),
        "gather packed [R, dim + 1]": lambda i: touch(tf.gather(packed, i)),
        "gather packed, then slice both parts": lambda i: (lambda g: touch(g[..., :dim], g[..., dim:]))(tf.gather(packed, i)),
        "gather packed, then tf.split": lambda i: touch(*tf.split(tf.gather(packed, i), [dim, 1], axis=-1)),
    }
    fns = {k: tf.function(f) for k, f in cells.items()}
    for f in fns.values():
        f(inputs[0])
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t = time.process_time()
            for x in inputs:
                fns[k](x).numpy()
            times[k].append((time.process_time() - t) / (len(inputs) * batch) * 1e6)
    print(f"\n{run}: gathers alone, random ids @ {batch} ({rows:,} rows x {fields} fields), CPU µs/pred")
    print("| op | best | median |\n|---|---|---|")
    out = {}
    for k, v in times.items():
        out[k] = {"best": round(min(v), 3), "median": round(float(np.median(v)), 3)}
        print(f"| {k} | {min(v):.3f} | {np.median(v):.3f} |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", required=True, help="a training run (repeat for several)")
    ap.add_argument("--batches", default="500,1000,2000,4000")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--raw", action="store_true", help="also time serving_packed (raw features)")
    ap.add_argument("--context-fields", help="export context signatures with these fields and time predict_context")
    ap.add_argument("--parts", action="store_true", help="only the gathers alone (and sliced) at the largest batch")
    args = ap.parse_args()
    from ctrflow._tf import quiet_import

    tf = quiet_import()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.time()
    if args.parts:
        out = {r: parts(r, max(batches), args.reps) for r in args.run}
        print(json.dumps({"bench": "packed_tables_parts", "batch": max(batches), "reps": args.reps, "runs": out}))
        return 0
    results = [bench_run(r, batches, args.reps, args.raw, args.context_fields) for r in args.run]
    load = os.getloadavg()
    print(f"\nload average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; {time.time() - t0:.0f} s")
    print(json.dumps({"bench": "packed_tables", "batches": batches, "reps": args.reps, "loadavg": [round(x, 2) for x in load],
                      "runs": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
