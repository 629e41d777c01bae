"""Context + candidates requests vs flat ones: CPU per candidate, graph alone and served (issue 11, part 2).

Claim measured: with half of the fields in the context, a context request costs >= 1.8x less CPU per
candidate than the same request sent flat (DeepFM, 39 fields, 100 candidates per request).

1. Graph alone (this process, CPU time, median of --reps calls): R requests of C candidates in one call,
   flat (`serving_packed` on the joined rows, `predict_ids` on their ids) vs context
   (`serving_context_packed` as `ContextScorer` calls it, `predict_context`: R context rows, R*C
   candidates, `row`); also both raw forms with one input per field (`*_fields_ms`) and the
   Predictor's flat call (`raw_flat_predictor_ms`). Exports made before the packed signatures are
   compared per field.
2. Served (`--rate` > 0): `ctrflow bench serve --protocol context` over HTTP, the server in a child
   process (its own CPU from the OS), the same schedule flat (binary columnar) then context (binary).

The export needs context fields (`ctrflow export RUN --model-base-path M --context-fields ...`):

    python benchmarks/bench_context.py --model-base-path /tmp/ctx-demo/models/ctr --rate 300

Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _paired_cpu_ms(fns: dict, reps: int) -> dict:
    """Median CPU ms per call of each function, calls interleaved (a busy machine's load drifts over a
    run; interleaving gives every function the same conditions)."""
    import numpy as np

    times: dict = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for key, fn in fns.items():
            c0 = time.process_time()
            fn()
            times[key].append(time.process_time() - c0)
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}


def _graph_calls(p, requests: int, candidates: int, seed: int = 0) -> tuple[dict, dict]:
    """The four calls (flat/context x raw/ids) of one export on the same R requests x C candidates,
    and the facts to report (sizes, max |p_context - p_flat|)."""
    import numpy as np
    import tensorflow as tf

    ctx = p.context
    rng = np.random.default_rng(seed)
    cats = set(p.categorical_names)

    def column(field: str, n: int):
        if field in cats:
            return np.array([b"%08x" % v for v in rng.integers(0, 1 << 20, n)], dtype=object)
        return np.where(rng.random(n) < 0.1, np.nan, np.round(rng.pareto(1.5, n) * 3))

    m = requests * candidates
    cands = {f: column(f, m) for f in ctx.candidate_fields}
    contexts = {f: column(f, requests) for f in ctx.context_fields}
    row = np.repeat(np.arange(requests, dtype=np.int32), candidates)
    flat = {**cands, **{f: v[row] for f, v in contexts.items()}}
    ids, numeric = p.transform(flat)
    info = p.info["context"]
    ci, cn = info["id_columns"], info["numeric_columns"]
    ki = [i for i in range(ids.shape[1]) if i not in ci]
    kn = [i for i in range(numeric.shape[1]) if i not in cn]
    first = np.searchsorted(row, np.arange(requests))
    ids_args = {"context_ids": tf.constant(ids[first][:, ci]), "context_numeric": tf.constant(numeric[first][:, cn]),
                "ids": tf.constant(ids[:, ki]), "numeric": tf.constant(numeric[:, kn]), "row": tf.constant(row)}
    flat_ids, flat_num = tf.constant(ids), tf.constant(numeric)
    predict_context = p._loaded.signatures["predict_context"]
    got = ctx._call(contexts, cands, row)[:, ctx.output_names.index("probabilities")]
    want = p._compute(flat)[:, p._p_index]
    facts = {"requests_per_call": requests, "candidates": candidates, "fields": len(p.feature_names),
             "context_fields": len(ctx.context_fields), "max_abs_diff": float(np.max(np.abs(got - want)))}
    sigs = p._loaded.signatures
    serving_default, serving_context = sigs["serving_default"], sigs["serving_context"]
    cat_names = [f for f in p.feature_names if f in cats]
    num_names = [f for f in p.feature_names if f not in cats]

    def raw_flat_fields():  # one input per field
        return serving_default(**{p._inputs[f]: tf.constant(v) for f, v in flat.items()})

    def raw_context_fields():
        feats = {ctx._alias[f]: tf.constant(v) for f, v in {**contexts, **cands}.items()}
        return serving_context(**feats, row=tf.constant(row))

    def raw_flat_packed():  # the call form ContextScorer uses: two matrices (exports since issue 11)
        return sigs["serving_packed"](strings=tf.constant(np.stack([flat[f] for f in cat_names]), tf.string),
                                      numbers=tf.constant(np.stack([flat[f] for f in num_names]), tf.float64))

    packed = "serving_packed" in sigs and ctx._packed is not None
    calls = {
        "raw_flat_ms": raw_flat_packed if packed else raw_flat_fields,
        "raw_context_ms": lambda: ctx._call(contexts, cands, row),
        "ids_flat_ms": lambda: p._serve_ids(flat_ids, flat_num),
        "ids_context_ms": lambda: predict_context(**ids_args),
        "raw_flat_fields_ms": raw_flat_fields,
        "raw_context_fields_ms": raw_context_fields,
        "raw_flat_predictor_ms": lambda: p._compute(flat),  # Predictor's flat path (the restored tf.function)
    }
    facts["raw_call"] = "packed" if packed else "per-field"
    return calls, facts


def graph_costs(bases: list[str], requests: int, candidates: int, reps: int, seed: int = 0) -> list[dict]:
    """One result per export, all calls of all exports interleaved (same machine conditions)."""
    from ctrflow.serving.predictor import Predictor

    predictors, facts, calls = [], [], {}
    for i, base in enumerate(bases):
        p = Predictor.load(base)
        if p.context is None:
            raise SystemExit(f"{base}: exported without context fields; re-export with --context-fields.")
        fns, fact = _graph_calls(p, requests, candidates, seed)
        predictors.append(p)
        facts.append({"model_base_path": base, **fact})
        calls.update({(i, k): fn for k, fn in fns.items()})
    times = _paired_cpu_ms(calls, reps)
    m = requests * candidates
    out = []
    for i, fact in enumerate(facts):
        res = {**fact, **{k: v for (j, k), v in times.items() if j == i}}
        for kind in ("raw", "ids"):
            res[f"{kind}_flat_us_per_candidate"] = res[f"{kind}_flat_ms"] * 1e3 / m
            res[f"{kind}_context_us_per_candidate"] = res[f"{kind}_context_ms"] * 1e3 / m
            res[f"{kind}_flat_over_context"] = res[f"{kind}_flat_ms"] / res[f"{kind}_context_ms"]
        out.append(res)
    for p in predictors:
        p.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-base-path", required=True, action="append",
                    help="an export with context fields; repeat it to compare exports in one interleaved run")
    ap.add_argument("--requests-per-call", default="40",
                    help="requests stacked in one graph call; a comma list measures several batch sizes")
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s for the served comparison (0: skip it)")
    ap.add_argument("--duration-s", type=float, default=10.0)
    args = ap.parse_args()

    graphs = []
    for requests in (int(r) for r in str(args.requests_per_call).split(",")):
        graphs += graph_costs(args.model_base_path, requests, args.candidates, args.reps)
    g0 = graphs[0]
    print(f"graph alone, {g0['candidates']} candidates per request, {g0['context_fields']} of {g0['fields']} fields "
          f"in the context (CPU us per candidate, median of {args.reps} interleaved calls):")
    print(f"{'export':<28}{'requests':>9}{'path':>6}{'flat':>9}{'context':>9}{'flat/context':>14}")
    for g in graphs:
        for kind in ("raw", "ids"):
            print(f"{g['model_base_path'][-28:]:<28}{g['requests_per_call']:>9}{kind:>6}"
                  f"{g[f'{kind}_flat_us_per_candidate']:>9.2f}{g[f'{kind}_context_us_per_candidate']:>9.2f}"
                  f"{g[f'{kind}_flat_over_context']:>14.2f}")
    result = {"graph": graphs[0] if len(graphs) == 1 else graphs}
    if args.rate > 0:
        from ctrflow.bench.loadgen import LoadOptions, run_load

        report = run_load(LoadOptions(model_base_path=args.model_base_path[0], protocol="context", rate_rps=args.rate,
                                      candidates=args.candidates, duration_s=args.duration_s))
        print(report.format_table())
        result["served"] = report.to_dict()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
