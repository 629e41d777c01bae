"""Training-speed benchmark: ctrflow's sparse steps vs the plain Keras way, and memory per million rows.

Claims measured (issue "training"), on Criteo-shaped synthetic data with the `synthetic` preset's full
hash-bucket sizes (~6.9M embedding rows), 2 cores:
- examples/s of LR, FM and DeepFM (embedding 16, MLP 256-128) at batch 4096, ctrflow vs a Keras model
  (Keras `Embedding` + Keras Adam, `model.fit`): target >= 5x;
- DeepFM at batch 1024 vs Twitter's published 13,312 samples/s for its optimized sparse layer: >= 3x;
- resident memory per million embedding rows (weights + LazyAdam slots).

FFM (`--models ffm`) trains on shards whose hash buckets are capped at `--ffm-max-buckets` (default 16,384 per
field: 223k rows of (fields - 1) x 4 floats, ctrflow.models.ffm's example): the preset's full 7.2M rows would
need ~19 GiB of training state (4.1 GiB table, 8.3 GiB LazyAdam slots, the rest while it is made), more than a
small box has. `--ffm-max-buckets 0`: the full sizes (train refuses them up front where they cannot fit).

Usage: python benchmarks/bench_train.py [--rows 300000] [--steps 60] [--models lr,fm,deepfm] [--skip-keras]
       [--ffm-max-buckets 16384]
Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
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
from ctrflow.models.registry import ModelConfig  # noqa: E402
from ctrflow.train.config import TrainConfig  # noqa: E402
from ctrflow.train.loop import train  # noqa: E402

TWITTER_SAMPLES_PER_S = 13_312  # Twitter's sparse linear layer on CPU, batch 1024 (their blog)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _data(out: Path, rows: int, max_buckets: int = 0) -> Path:
    """Shards of `rows` synthetic rows, the preset's hash buckets (capped at `max_buckets` per field when > 0)."""
    from ctrflow.schema import PRESETS

    shards = out / (f"train-shards-{rows}" + (f"-cap{max_buckets}" if max_buckets else ""))
    if not (shards / "manifest.json").exists():
        csv = out / f"train-{rows}.csv"
        if not csv.exists():
            generate(csv, GenerateOptions(rows=rows, seed=3))
        schema = PRESETS["synthetic"].capped(max_buckets) if max_buckets else "synthetic"
        convert(csv, shards, schema=schema, options=ConvertOptions(overwrite=True))
    return shards


def _table_rows(shards: Path) -> int:
    with open_batches(shards, PipelineOptions(batch_size=1, shuffle=False)) as bs:
        return int(sum(bs.spec.id_buckets))


def _ctrflow(shards: Path, out: Path, kind: str, batch: int, steps: int, steps_per_call: int) -> dict:
    """Steady-state `train()` throughput (pipeline included): examples/s between the first and last history
    points, so the one-time trace/compile of the first steps is left out."""
    import shutil

    model = ModelConfig(kind, embedding_dim=16, hidden=(256, 128))
    run = out / f"run-{kind}-{batch}"
    shutil.rmtree(run, ignore_errors=True)
    log_every = 4 * steps_per_call
    cfg = TrainConfig(model=model, optimizer="lazyadam", learning_rate=1e-3, batch_size=batch, steps_per_call=steps_per_call,
                      max_steps=steps + log_every, checkpoint_every_steps=10**9, log_every_steps=log_every, epochs=100,
                      holdout_fraction=0.0, l2=0.0, lr_scaling="none")  # the settings BENCHMARKS.md's figures were measured with
    s = train(shards, run, cfg)
    hist = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    tr = [h for h in hist if h["kind"] == "train"]
    steady = (tr[-1]["examples"] - tr[0]["examples"]) / (tr[-1]["seconds"] - tr[0]["seconds"])
    shutil.rmtree(run, ignore_errors=True)
    return {"examples_per_s": steady, "with_compile_examples_per_s": s.examples_per_s, "steps": s.steps}


def _keras(shards: Path, kind: str, batch: int, steps: int) -> dict:
    """The same model written the plain Keras way: Embedding layers, Keras Adam, model.fit."""
    import keras

    with open_batches(shards, PipelineOptions(batch_size=batch, shuffle=False)) as bs:
        spec = bs.spec
        batches = []
        for b in bs:
            if b.rows == batch:
                batches.append(b)
            if len(batches) == min(steps, 40):
                break
    ids = np.concatenate([b.ids for b in batches])
    label = np.concatenate([b.label for b in batches])
    offsets = np.cumsum((0,) + spec.id_buckets[:-1]).astype(np.int32)
    total = int(sum(spec.id_buckets))
    f = len(spec.id_buckets)
    inp = keras.Input((f,), dtype="int32")
    shifted = keras.layers.Lambda(lambda x: x + offsets)(inp)
    linear = keras.layers.Embedding(total, 1)(shifted)
    logit = keras.ops.sum(keras.ops.squeeze(linear, -1), axis=1, keepdims=True)
    if kind in ("fm", "deepfm"):
        emb = keras.layers.Embedding(total, 16)(shifted)
        s = keras.ops.sum(emb, axis=1)
        fm = 0.5 * keras.ops.sum(s * s - keras.ops.sum(emb * emb, axis=1), axis=1, keepdims=True)
        logit = logit + fm
        if kind == "deepfm":
            h = keras.layers.Flatten()(emb)
            for w in (256, 128):
                h = keras.layers.Dense(w, activation="relu")(h)
            logit = logit + keras.layers.Dense(1)(h)
    out = keras.layers.Activation("sigmoid")(logit)
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    n = len(batches)
    model.fit(ids[: 2 * batch], label[: 2 * batch], batch_size=batch, epochs=1, verbose=0)  # compile
    t0 = time.perf_counter()
    model.fit(ids, label, batch_size=batch, epochs=1, verbose=0)
    secs = time.perf_counter() - t0
    del model
    gc.collect()
    return {"examples_per_s": n * batch / secs, "steps": n}


def _memory_per_million(dim: int = 16) -> dict:
    """Bytes per million embedding rows held by the model's variables and by LazyAdam's slots (FM, dim 16:
    one [rows, 16] embedding and one [rows, 1] linear table, each with two slot tables)."""
    from ctrflow.data.batch import FeatureSpec
    from ctrflow.models.registry import make_model
    from ctrflow.train.core import make_optimizers

    config = TrainConfig(model=ModelConfig("fm", embedding_dim=dim), optimizer="lazyadam")
    model = make_model(config.model, FeatureSpec(("a",), (1_000_000,)))
    groups = model.variable_groups()
    group_of = {v.ref(): g for g, vs in groups.items() for v in vs}
    opt = make_optimizers(config, groups, lambda v: group_of[v.ref()])
    opt.build(model.trainable_variables)
    model_bytes = sum(v.shape.num_elements() * v.dtype.size for v in model.variables)
    slot_bytes = sum(v.shape.num_elements() * v.dtype.size for v in opt.variables)
    return {"model_mb_per_million_rows": model_bytes / 2**20, "optimizer_slots_mb_per_million_rows": slot_bytes / 2**20,
            "train_state_mb_per_million_rows": (model_bytes + slot_bytes) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--models", default="lr,fm,deepfm")
    ap.add_argument("--steps-per-call", type=int, default=4)
    ap.add_argument("--skip-keras", action="store_true")
    ap.add_argument("--ffm-max-buckets", type=int, default=16_384,
                    help="ffm: cap every field's hash buckets at this (default 16384: 223k table rows); 0: the preset's full sizes")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    out = REPO / args.out
    out.mkdir(exist_ok=True)
    result: dict = {"rows": args.rows}
    for kind in args.models.split(","):
        shards = _data(out, args.rows, args.ffm_max_buckets if kind == "ffm" else 0)
        if kind == "ffm":
            result["ffm_max_buckets"] = args.ffm_max_buckets
            result["ffm_table_rows"] = _table_rows(shards)
            print(f"ffm: hash buckets capped at {args.ffm_max_buckets:,} per field ({result['ffm_table_rows']:,} table rows)"
                  if args.ffm_max_buckets else f"ffm: the preset's full hash buckets ({result['ffm_table_rows']:,} table rows)",
                  flush=True)
        for batch in ((4096, 1024) if kind == "deepfm" else (4096,)):
            steps = args.steps * (4096 // batch)
            runs = {k: _ctrflow(shards, out, kind, batch, steps, k) for k in sorted({1, args.steps_per_call})}
            best_k = max(runs, key=lambda k: runs[k]["examples_per_s"])
            ours = runs[best_k]
            for k, r in runs.items():
                result[f"{kind}_b{batch}_ctrflow_k{k}_examples_per_s"] = r["examples_per_s"]
            result[f"{kind}_b{batch}_ctrflow_examples_per_s"] = ours["examples_per_s"]
            if not args.skip_keras and batch == 4096 and kind in ("lr", "fm", "deepfm"):  # the Keras twins written here
                k = _keras(shards, kind, batch, args.steps)
                result[f"{kind}_b{batch}_keras_examples_per_s"] = k["examples_per_s"]
                result[f"{kind}_b{batch}_speedup_vs_keras"] = ours["examples_per_s"] / k["examples_per_s"]
    if "deepfm_b1024_ctrflow_examples_per_s" in result:
        result["deepfm_b1024_vs_twitter_13312"] = result["deepfm_b1024_ctrflow_examples_per_s"] / TWITTER_SAMPLES_PER_S
    result.update(_memory_per_million())
    print(f"{'measure':<46}{'value':>16}")
    for k, v in result.items():
        print(f"{k:<46}{v:>16,.2f}" if isinstance(v, float) else f"{k:<46}{v!s:>16}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
