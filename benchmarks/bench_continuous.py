"""Continuous training against a frozen model and daily retraining from scratch, on drifting data.

Claim measured (issue "continuous training"): on time-ordered data whose distribution drifts, the
continuous model (warm-started each slice from the last published one, optimizer state included,
gated, exported) beats a model trained once on the first slice and frozen, and comes close to a model
retrained from scratch on all data so far, at a fraction of its cost per update.

Progressive validation: every model that has seen slices 0..t is scored on slice t+1 (not trained on by
anyone yet). Strategies:
  frozen      trained on slice 0 only, never updated
  continuous  `continuous_train` over slices 0..t (each slice: 90 % trained, the latest 10 % gate rows)
  reset       the same with `reset_stale_after_slices` (rows untouched for K slices go back to init)
  scratch     a fresh model trained on slices 0..t together (one epoch), every slice
  constant    the click rate of slices 0..t (a reference: what no model at all scores)
Every model uses the same TrainConfig. Datasets: `generate --days` synthetic days (with the true CTR,
hence the Bayes-optimal logloss of each day), and the shared TalkingData sample cut into time slices by
`click_time` (skipped when ../shared/data is absent).

    python benchmarks/bench_continuous.py                      # 10 days x 60k rows + TalkingData, ~5 min on 2 cores
    python benchmarks/bench_continuous.py --days 6 --rows-per-day 30000 --skip-talkingdata

Writes bench-out/continuous_<dataset>.png (copied to docs/ with --docs docs), prints a table per dataset,
then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from ctrflow.data import shards as shardio  # noqa: E402
from ctrflow.data.batch import FeatureSpec  # noqa: E402
from ctrflow.data.convert import ConvertOptions, convert  # noqa: E402
from ctrflow.data.generate import GenerateOptions, generate  # noqa: E402
from ctrflow.models.registry import ModelConfig  # noqa: E402
from ctrflow.schema import PRESETS, infer_schema  # noqa: E402
from ctrflow.train.config import TrainConfig  # noqa: E402
from ctrflow.continuous import ContinuousOptions, continuous_train  # noqa: E402
from ctrflow.train.evaluate import evaluate  # noqa: E402
from ctrflow.train.loop import train  # noqa: E402
from ctrflow.train.metrics import logloss  # noqa: E402

SHARED = Path(os.environ.get("CTRFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


# --- data ------------------------------------------------------------------------------------------
def synthetic_slices(root: Path, days: int, rows_per_day: int, max_buckets: int, seed: int) -> list[Path]:
    """`generate --days` cut into one CSV per day, each converted `like` the first day."""
    generate(root / "all.csv", GenerateOptions(rows=days * rows_per_day, seed=seed, days=days))
    header, *rows = (root / "all.csv").read_text().splitlines(keepends=True)
    by_day: dict[str, list[str]] = {}
    for r in rows:
        by_day.setdefault(r.split(",", 1)[0], []).append(r)
    out = []
    for d in range(days):
        (root / f"day-{d:02d}.csv").write_text(header + "".join(by_day[str(d)]))
        kw = {"schema": PRESETS["synthetic"].capped(max_buckets)} if d == 0 else {"like": out[0]}
        convert(root / f"day-{d:02d}.csv", root / "slices" / f"day-{d:02d}", options=ConvertOptions(workers=1), **kw)
        out.append(root / "slices" / f"day-{d:02d}")
    (root / "all.csv").unlink()
    return out


def talkingdata_slices(root: Path, n: int) -> list[Path]:
    """The TalkingData sample ordered by click_time, cut into n slices of equal rows."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    src = SHARED / "talkingdata" / "train_sample.csv"
    table = pacsv.read_csv(src, convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in (
        "ip", "app", "device", "os", "channel", "click_time", "attributed_time", "is_attributed")}))
    times = pc.strptime(table.column("click_time"), format="%Y-%m-%d %H:%M", unit="s").cast(pa.int64()).to_numpy()
    table = table.take(pa.array(np.argsort(times, kind="stable")))
    schema = None
    out = []
    for i, idx in enumerate(np.array_split(np.arange(table.num_rows), n)):
        csv = root / f"slice-{i}.csv"
        pacsv.write_csv(table.take(pa.array(idx)), csv, pacsv.WriteOptions(quoting_style="none"))
        if schema is None:
            schema = infer_schema(csv, label="is_attributed", categorical=["ip", "app", "device", "os", "channel"],
                                  time="click_time", ignore=["attributed_time"])
        kw = {"schema": schema} if i == 0 else {"like": out[0]}
        convert(csv, root / "slices" / f"slice-{i}", options=ConvertOptions(workers=1), **kw)
        out.append(root / "slices" / f"slice-{i}")
    return out


def _labels(folder: Path) -> np.ndarray:
    return np.concatenate([shardio.read_shard(p).label for p in shardio.load_manifest(folder).shard_paths()])


# --- strategies --------------------------------------------------------------------------------------
def _score(run: Path, data: Path) -> dict:
    m = evaluate(run, data)
    return {"logloss": m["logloss"], "auc": m["auc"], "bayes_logloss": m.get("bayes_logloss")}


def run_dataset(name: str, slices: list[Path], work: Path, config: TrainConfig, options: ContinuousOptions,
                reset_k: int) -> dict:
    n = len(slices)
    days = list(range(1, n))  # scored slices
    res: dict = {"dataset": name, "slices": n, "rows": [shardio.load_manifest(s).rows for s in slices], "scored": days}

    # constant: the click rate so far
    labels = [_labels(s) for s in slices]
    res["constant"] = [logloss(labels[t + 1], np.full(len(labels[t + 1]), np.clip(np.concatenate(labels[: t + 1]).mean(), 1e-6, 1)))
                       for t in range(n - 1)]

    # frozen
    t0 = time.perf_counter()
    train(slices[0], work / "frozen", config)
    res["frozen_train_s"] = time.perf_counter() - t0
    scores = [_score(work / "frozen", slices[t + 1]) for t in range(n - 1)]
    res["frozen"] = [s["logloss"] for s in scores]
    res["bayes"] = [s["bayes_logloss"] for s in scores]

    # continuous (and with stale-row reset)
    for key, opts in (("continuous", options), ("reset", replace(options, reset_stale_after_slices=reset_k or None))):
        if key == "reset" and not reset_k:
            continue
        inc, base, state = work / key / "incoming", work / key / "models" / "ctr", work / key / "state"
        inc.mkdir(parents=True)
        lls, secs, train_secs, decisions, resets, live = [], [], [], [], [], []
        for t in range(n - 1):
            shutil.copytree(slices[t], inc / slices[t].name)
            s = continuous_train(inc, base, state, config, opts, once=True)
            [d] = s.decisions
            decisions.append(d.decision)
            secs.append(d.seconds["total"])
            train_secs.append(d.seconds.get("train", math.nan))
            resets.append(d.reset_rows)
            live.append(d.live_rows)
            lls.append(_score(Path(s.line_run), slices[t + 1])["logloss"] if s.line_run else math.nan)
        res[key] = lls
        res[f"{key}_update_s"] = secs
        res[f"{key}_train_s"] = train_secs
        res[f"{key}_decisions"] = decisions
        if key == "reset":
            res["reset_rows"] = resets
            res["live_rows"] = live
            spec = FeatureSpec.from_dict(json.loads((Path(s.line_run) / "run.json").read_text())["feature_spec"])
            res["table_rows"] = int(sum(spec.id_buckets[c] for c in spec.active_id_columns))
            newest = base / str(max(int(p.name) for p in base.iterdir() if p.name.isdigit()))
            res["export_bytes"] = sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())  # fixed: hashed tables

    # scratch: all data so far, fresh model, every slice
    lls, secs = [], []
    for t in range(n - 1):
        t0 = time.perf_counter()
        train(slices[: t + 1], work / f"scratch-{t}", config)
        secs.append(time.perf_counter() - t0)
        lls.append(_score(work / f"scratch-{t}", slices[t + 1])["logloss"])
        shutil.rmtree(work / f"scratch-{t}")
    res["scratch"] = lls
    res["scratch_train_s"] = secs
    return res


# --- report ------------------------------------------------------------------------------------------
STRATEGIES = ("frozen", "continuous", "reset", "scratch", "constant", "bayes")


def table(res: dict) -> str:
    cols = [s for s in STRATEGIES if s in res and res[s] and res[s][0] is not None]
    lines = [f"{res['dataset']}: logloss on slice t+1 of a model that saw slices 0..t",
             f"{'slice':>5}" + "".join(f"{c:>12}" for c in cols) + f"{'cont. s':>10}{'scratch s':>11}"]
    for i, day in enumerate(res["scored"]):
        lines.append(f"{day:>5}" + "".join(f"{res[c][i]:>12.5f}" for c in cols)
                     + f"{res['continuous_update_s'][i]:>10.1f}{res['scratch_train_s'][i]:>11.1f}")
    mean = {c: float(np.nanmean(res[c])) for c in cols}
    lines.append(f"{'mean':>5}" + "".join(f"{mean[c]:>12.5f}" for c in cols)
                 + f"{np.mean(res['continuous_update_s']):>10.1f}{np.mean(res['scratch_train_s']):>11.1f}")
    return "\n".join(lines)


def summarize(res: dict) -> dict:
    out = {"dataset": res["dataset"], "slices": res["slices"], "rows_per_slice": int(np.mean(res["rows"]))}
    for c in STRATEGIES:
        if c in res and res[c] and res[c][0] is not None:
            out[f"{c}_mean_logloss"] = float(np.nanmean(res[c]))
            out[f"{c}_last_logloss"] = float(res[c][-1])
    out["continuous_update_s_mean"] = float(np.mean(res["continuous_update_s"]))
    out["continuous_train_s_mean"] = float(np.nanmean(res["continuous_train_s"]))
    out["scratch_train_s_mean"] = float(np.mean(res["scratch_train_s"]))
    out["scratch_train_s_last"] = float(res["scratch_train_s"][-1])
    out["continuous_decisions"] = res["continuous_decisions"]
    if "reset_rows" in res:
        out["reset_rows"] = res["reset_rows"]
        out["live_rows"] = res["live_rows"]
        out["table_rows"] = res["table_rows"]
        out["export_bytes"] = res["export_bytes"]
        out["reset_decisions"] = res["reset_decisions"]
    if "frozen_mean_logloss" in out and "scratch_mean_logloss" in out:
        gap = out["frozen_mean_logloss"] - out["scratch_mean_logloss"]
        out["continuous_closes_gap"] = (out["frozen_mean_logloss"] - out["continuous_mean_logloss"]) / gap if gap > 0 else None
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100, gridspec_kw={"width_ratios": [3, 2]})
    x = res["scored"]
    style = {"frozen": ("tab:red", "s-"), "continuous": ("tab:blue", "o-"), "reset": ("tab:cyan", "^--"),
             "scratch": ("tab:green", "D-"), "constant": ("tab:gray", ":"), "bayes": ("black", "--")}
    labels = {"frozen": "(a) frozen after slice 0", "continuous": "(b) continuous", "reset": "(b) continuous + stale-row reset",
              "scratch": "(c) from scratch on all data so far", "constant": "constant click rate", "bayes": "Bayes-optimal"}
    for k, (color, fmt) in style.items():
        if k in res and res[k] and res[k][0] is not None:
            ax.plot(x, res[k], fmt, color=color, label=labels[k], markersize=4)
    ax.set_xticks(x)
    ax.set_xlabel("slice scored (model saw all earlier slices)")
    ax.set_ylabel("logloss")
    ax.set_title(f"{res['dataset']}: progressive validation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    bx.plot(x, res["scratch_train_s"], "D-", color="tab:green", label="(c) retrain from scratch: train")
    bx.plot(x, res["continuous_update_s"], "o-", color="tab:blue", label="(b) update: split+train+gate+export")
    bx.plot(x, res["continuous_train_s"], "o:", color="tab:blue", label="(b) update: train only")
    bx.set_xticks(x)
    bx.set_xlabel("slice")
    bx.set_ylabel("seconds per update")
    bx.set_title("cost per update")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=10)
    ap.add_argument("--rows-per-day", type=int, default=60_000)
    ap.add_argument("--max-buckets", type=int, default=1 << 16, help="hash buckets cap of the synthetic schema")
    ap.add_argument("--talkingdata-slices", type=int, default=5)
    ap.add_argument("--skip-talkingdata", action="store_true")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--model", default="fm", choices=["lr", "fm", "deepfm"])
    ap.add_argument("--learning-rate", type=float, default=0.003)
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--reset-stale", type=int, default=2, help="K of the reset variant; 0: skip it")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--docs", help="also copy the PNGs into this folder (e.g. docs)")
    args = ap.parse_args()
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # one evaluate per slice trips TensorFlow's retracing warning
    out = REPO / args.out
    work = out / "continuous"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = TrainConfig(model=ModelConfig(args.model, embedding_dim=8, hidden=(64, 32)), batch_size=1024,
                         learning_rate=args.learning_rate, checkpoint_every_steps=1000)
    options = ContinuousOptions(tolerance=args.tolerance)
    datasets = []
    if not args.skip_synthetic:
        (work / "synthetic").mkdir()
        slices = synthetic_slices(work / "synthetic", args.days, args.rows_per_day, args.max_buckets, seed=1)
        datasets.append(("synthetic", slices))
    td = SHARED / "talkingdata" / "train_sample.csv"
    if not args.skip_talkingdata and td.is_file():
        (work / "talkingdata").mkdir()
        datasets.append(("talkingdata", talkingdata_slices(work / "talkingdata", args.talkingdata_slices)))
    summary: dict = {"model": args.model, "learning_rate": args.learning_rate, "tolerance": args.tolerance,
                     "reset_stale_after_slices": args.reset_stale, "cpus": os.cpu_count()}
    for name, slices in datasets:
        t0 = time.perf_counter()
        res = run_dataset(name, slices, work / name / "runs", config, options, args.reset_stale)
        png = out / f"continuous_{name}.png"
        plot(res, png)
        if args.docs:
            (REPO / args.docs).mkdir(exist_ok=True)
            shutil.copy(png, REPO / args.docs / png.name)
        print(table(res))
        print(f"plot: {png}  ({time.perf_counter() - t0:.0f} s)\n")
        summary[name] = {**summarize(res), "per_slice": {k: res[k] for k in STRATEGIES if k in res}}
        (out / f"continuous_{name}.json").write_text(json.dumps(res, default=float))
    print(json.dumps(summary, default=float))


if __name__ == "__main__":
    main()
