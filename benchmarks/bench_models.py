"""Model-zoo benchmark: quality, training speed and serving compute of every model kind, one run.

Claims measured (issue 9, item 4: models ranked above DeepFM, cheap enough to serve on CPU): on
synthetic Criteo-shaped data (`ctrflow generate`, 39 fields), each model trained with the same optimizer,
learning rate, batch and epochs as DeepFM:
- test logloss and AUC, and the logloss difference to DeepFM (negative = better);
- training examples/s (`train()` end to end, pipeline included);
- serving compute: the exported `predict_ids` signature on a batch of 4000 rows, as microseconds per
  prediction (both cores; the model's own limit, no server), the models timed in turns (see _serving_us).
Variants compared in the same run: MLP dropout and batch norm, DCN-v2 stacked vs parallel, low-rank
(64, 16) vs full-rank cross layers.

Usage: python benchmarks/bench_models.py [--rows 300000] [--epochs 1] [--models deepfm,dcnv2,...] [--serve-only]
Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from ctrflow.data.convert import ConvertOptions, convert  # noqa: E402
from ctrflow.data.generate import GenerateOptions, generate  # noqa: E402
from ctrflow.data.pipeline import PipelineOptions, open_batches  # noqa: E402
from ctrflow.export import export  # noqa: E402
from ctrflow.models.registry import ModelConfig  # noqa: E402
from ctrflow.schema import PRESETS  # noqa: E402
from ctrflow.train.config import TrainConfig  # noqa: E402
from ctrflow.train.evaluate import evaluate  # noqa: E402
from ctrflow.train.loop import train  # noqa: E402

# name -> ModelConfig fields (embedding 16 and MLP 256-128 unless said).
VARIANTS: dict[str, dict] = {
    "lr": {"kind": "lr"},
    "fm": {"kind": "fm"},
    "fwfm": {"kind": "fwfm"},
    "ffm": {"kind": "ffm", "ffm_dim": 4},
    "deepfm": {"kind": "deepfm"},
    "deepfm-drop0.1": {"kind": "deepfm", "dropout": 0.1},
    "deepfm-drop0.2": {"kind": "deepfm", "dropout": 0.2},
    "deepfm-bn": {"kind": "deepfm", "batch_norm": True},
    "dcnv2": {"kind": "dcnv2"},  # defaults: stacked, rank 64
    "dcnv2-drop0.1": {"kind": "dcnv2", "dropout": 0.1},
    "dcnv2-parallel": {"kind": "dcnv2", "cross_structure": "parallel"},
    "dcnv2-fullrank": {"kind": "dcnv2", "cross_rank": None},
    "dcnv2-rank16": {"kind": "dcnv2", "cross_rank": 16},
}


def _data(out: Path, rows: int, test_rows: int, max_buckets: int) -> tuple[Path, Path]:
    train_dir, test_dir = out / f"train-{rows}-{max_buckets}", out / f"test-{test_rows}-{max_buckets}"
    if not (test_dir / "manifest.json").exists():
        generate(out / "train.csv", GenerateOptions(rows=rows, seed=3))
        generate(out / "test.csv", GenerateOptions(rows=test_rows, seed=3, split="test"))
        convert(out / "train.csv", train_dir, schema=PRESETS["synthetic"].capped(max_buckets), options=ConvertOptions(overwrite=True))
        convert(out / "test.csv", test_dir, like=train_dir, options=ConvertOptions(overwrite=True))
    return train_dir, test_dir


def _serving_us(model_dirs: dict[str, str], test_dir: Path, batch: int = 4000, rounds: int = 5, calls: int = 8) -> dict[str, float]:
    """µs per prediction of each export's `predict_ids` at `batch` rows: the models take turns (round
    robin, `rounds` x `calls` calls each) and each keeps its best round's median, so load from other
    work on the machine hits all of them alike."""
    import tensorflow as tf

    with open_batches(test_dir, PipelineOptions(batch_size=batch, shuffle=False)) as bs:
        b = next(iter(bs))
    ids, numeric = tf.constant(b.ids), tf.constant(b.numeric)
    fns = {name: tf.saved_model.load(d).signatures["predict_ids"] for name, d in model_dirs.items()}
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn(ids=ids, numeric=numeric)  # warm
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                fn(ids=ids, numeric=numeric)["probabilities"].numpy()
                times.append(time.perf_counter() - t0)
            best[name] = min(best[name], float(np.median(times)) / batch * 1e6)
    return best


def run(name: str, fields: dict, train_dir: Path, test_dir: Path, out: Path, args) -> dict:
    config = TrainConfig(model=ModelConfig(**{"embedding_dim": 16, "hidden": (256, 128), **fields}), batch_size=args.batch_size,
                         learning_rate=args.learning_rate, epochs=args.epochs, l2=args.l2, seed=0)
    run_dir = out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    s = train(train_dir, run_dir, config)
    wall = time.perf_counter() - t0
    ev = evaluate(run_dir, test_dir)
    e = export(run_dir, out / "models" / name, overwrite=True, version=1)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"model": name, **fields, "logloss": ev["logloss"], "auc": ev["auc"], "examples_per_s": s.examples_per_s,
            "train_wall_s": wall, "export_path": e.path, "export_mb": e.export_bytes / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--test-rows", type=int, default=50_000)
    ap.add_argument("--max-buckets", type=int, default=1 << 14, help="cap each field's hash buckets (FFM rows hold 38 vectors)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--learning-rate", type=float, default=0.003)
    ap.add_argument("--models", default=",".join(VARIANTS))
    ap.add_argument("--l2", type=float, default=0.0, help="TrainConfig.l2 for every model")
    ap.add_argument("--serve-only", action="store_true", help="re-time the exports of a previous run under --out")
    ap.add_argument("--out", default="/tmp/ctrflow-bench-models")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_dir, test_dir = _data(out, args.rows, args.test_rows, args.max_buckets)
    names = args.models.split(",")
    saved = out / "results.json"
    if args.serve_only:
        rows = [r for r in json.loads(saved.read_text()) if r["model"] in names]
    else:
        rows = []
        for name in names:
            r = run(name, VARIANTS[name], train_dir, test_dir, out, args)
            rows.append(r)
            print(f"{name:16s} logloss {r['logloss']:.5f} auc {r['auc']:.4f} {r['examples_per_s']:>9,.0f} ex/s "
                  f"export {r['export_mb']:7.1f} MB", flush=True)
        saved.write_text(json.dumps(rows))
    serve = _serving_us({r["model"]: r["export_path"] for r in rows}, test_dir)
    for r in rows:
        r["serve_us_per_prediction"] = serve[r["model"]]
    base = next((r for r in rows if r["model"] == "deepfm"), None)
    print("\n| model | test logloss | vs DeepFM | AUC | train examples/s | serving µs/prediction (batch 4000) | serving vs DeepFM | export MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        d = f"{r['logloss'] - base['logloss']:+.5f}" if base else "—"
        x = f"{r['serve_us_per_prediction'] / base['serve_us_per_prediction']:.2f}×" if base else "—"
        print(f"| {r['model']} | {r['logloss']:.5f} | {d} | {r['auc']:.4f} | {r['examples_per_s']:,.0f} | "
              f"{r['serve_us_per_prediction']:.2f} | {x} | {r['export_mb']:.1f} |")
    print(json.dumps({"rows": args.rows, "test_rows": args.test_rows, "epochs": args.epochs, "batch_size": args.batch_size,
                      "learning_rate": args.learning_rate, "l2": args.l2, "max_buckets": args.max_buckets, "results": rows}))


if __name__ == "__main__":
    main()
