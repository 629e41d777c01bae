"""The defaults study: which optimizer, learning rates, L2, embedding size, batch size and epochs make
`ctrflow train --model M` competitive with no other flag. Evidence for the defaults in TrainConfig.

Each setting trains through the public API with an explicit validation split, one epoch at a time (a
rerun on the same run folder resumes it), up to `--max-epochs`, stopping after `--patience` epochs
without a better validation logloss; the test metrics reported are those of the best validation epoch
(what "restore the best checkpoint" gives). One setting at a time, nothing in parallel.

    python benchmarks/quality_defaults.py --datasets synthetic,zipfmix,talkingdata --rows 150000 --grid optimizers
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_common  # noqa: E402


def _scaled(config: Any, factor: float) -> Any:
    """`config` with every learning rate times `factor` (the rate is not checkpointed: a resume takes it)."""
    from ctrflow.train.config import GroupOptimizer

    groups = {g: GroupOptimizer(o.name, o.learning_rate * factor, dict(o.extra)) for g, o in config.optimizer_groups.items()}
    return config.replace(learning_rate=config.learning_rate * factor, optimizer_groups=groups)


def run_setting(ds: quality_common.Dataset, config: Any, work: Path, *, max_epochs: int, patience: int,
                decay: float = 1.0) -> dict[str, Any]:
    """Train epoch by epoch with early stopping on ds.valid; the test metrics of the best epoch.
    `decay` < 1 multiplies every learning rate by it after each epoch (epoch e trains at rate * decay^(e-1))."""
    from ctrflow.train.evaluate import evaluate
    from ctrflow.train.loop import train

    run = work / "run"
    if run.exists():
        shutil.rmtree(run)
    best: dict[str, Any] | None = None
    bad = 0
    per_epoch = []
    t0 = time.perf_counter()
    err = None
    for e in range(1, max_epochs + 1):
        try:
            cfg = _scaled(config, decay ** (e - 1)) if decay != 1.0 else config
            s = train(ds.shards["train"], run, cfg.replace(epochs=e, keep_checkpoints=1), valid=ds.shards["valid"])
        except Exception as ex:  # a diverged setting is a result, not a crash of the study
            err = f"{type(ex).__name__}: {str(ex)[:120]}"
            break
        v = s.valid["logloss"]
        t = evaluate(run, ds.shards["test"])
        per_epoch.append(round(v, 5))
        if not math.isfinite(v):
            break
        if best is None or v < best["valid_logloss"] - 1e-6:
            best = {"epoch": e, "valid_logloss": v, "test_logloss": t["logloss"], "test_auc": t["auc"],
                    "test_calibration": t["calibration"], "test_gap": t.get("logloss_gap")}
            bad = 0
        else:
            bad += 1
            if bad >= patience:
                break
    shutil.rmtree(run, ignore_errors=True)
    out = dict(best or {})
    out.update({"valid_by_epoch": per_epoch, "seconds": round(time.perf_counter() - t0, 1)})
    if err:
        out["error"] = err
    return out


def make_config(model: str, *, opt: str = "lazyadam", lr: float = 1e-3, linear: tuple[str, float] | None = None,
                embedding: tuple[str, float] | None = None, dense: tuple[str, float] | None = None,
                l2: float = 0.0, dim: int = 16, batch: int = 4096, dropout: float = 0.0, hidden=(256, 128), decay: float = 1.0,
                l2_mode: str = "touched"):
    from ctrflow.models.registry import ModelConfig
    from ctrflow.train.config import GroupOptimizer, TrainConfig

    groups = {g: GroupOptimizer(*spec) for g, spec in (("linear", linear), ("embedding", embedding), ("dense", dense)) if spec}
    return TrainConfig(model=ModelConfig(model, embedding_dim=dim, dropout=dropout, hidden=tuple(hidden)), optimizer=opt,
                       learning_rate=lr, optimizer_groups=groups, l2=l2, l2_mode=l2_mode, batch_size=batch, checkpoint_every_steps=100_000,
                       log_every_steps=1000)


def grid(name: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(model, label, make_config kwargs) of one study."""
    g: list[tuple[str, str, dict[str, Any]]] = []
    if name == "lr":  # LR: optimizer x learning rate
        for opt, lrs in (("lazyadam", (0.001, 0.01, 0.03)), ("adagrad", (0.05, 0.2)), ("ftrl", (0.05, 0.2)), ("sgd", (0.5,))):
            for lr in lrs:
                g.append(("lr", f"{opt} {lr}", {"opt": opt, "lr": lr}))
    elif name == "fm":  # FM: one optimizer for all, learning rates; FTRL/Adagrad on linear
        for lr in (0.001, 0.003, 0.01):
            g.append(("fm", f"lazyadam {lr}", {"opt": "lazyadam", "lr": lr}))
        g.append(("fm", "adagrad 0.05", {"opt": "adagrad", "lr": 0.05}))
        g.append(("fm", "lin ftrl 0.1 + lazyadam 0.003", {"opt": "lazyadam", "lr": 0.003, "linear": ("ftrl", 0.1)}))
        g.append(("fm", "lin lazyadam 0.01 + emb lazyadam 0.003", {"opt": "lazyadam", "lr": 0.003, "linear": ("lazyadam", 0.01)}))
    elif name == "deepfm":
        for lr in (0.001, 0.003):
            g.append(("deepfm", f"lazyadam {lr}", {"opt": "lazyadam", "lr": lr}))
        g.append(("deepfm", "lin lazyadam 0.01 + lazyadam 0.003 + dropout 0.2",
                  {"opt": "lazyadam", "lr": 0.003, "linear": ("lazyadam", 0.01), "dropout": 0.2}))
        g.append(("deepfm", "lazyadam 0.003, dense adam 0.001", {"opt": "lazyadam", "lr": 0.003, "dense": ("adam", 0.001)}))
    elif name == "l2":  # L2 on touched rows (the loss is a batch mean, so the penalty is per step)
        for model, base, l2s in (("lr", {"opt": "lazyadam", "lr": 0.01}, (1e-5, 1e-4)),
                                 ("fm", {"opt": "lazyadam", "lr": 0.003}, (1e-5, 1e-4, 1e-3)),
                                 ("deepfm", {"opt": "lazyadam", "lr": 0.002}, (1e-4,))):
            for l2 in l2s:
                g.append((model, f"{base['opt']} {base['lr']} l2 {l2:g}", {**base, "l2": l2}))
    elif name == "dim":
        for dim in (4, 8, 32):
            g.append(("fm", f"lazyadam 0.003 dim {dim}", {"opt": "lazyadam", "lr": 0.003, "dim": dim}))
    elif name == "batch":  # learning rate vs batch size: same rate, or sqrt-scaled from 4096
        for model, lr0, batches in (("lr", 0.01, (1024,)), ("fm", 0.003, (1024, 16384))):
            for b in batches:
                g.append((model, f"lazyadam {lr0} b{b}", {"opt": "lazyadam", "lr": lr0, "batch": b}))
                g.append((model, f"lazyadam {lr0 * math.sqrt(b / 4096):.4g} (sqrt-scaled) b{b}",
                          {"opt": "lazyadam", "lr": lr0 * math.sqrt(b / 4096), "batch": b}))
    elif name == "lr2":  # the per-coordinate optimizers at larger rates
        for opt, lrs in (("adagrad", (0.5, 1.0)), ("ftrl", (1.0,)), ("sgd", (2.0,)), ("lazyadam", (0.1,))):
            for lr in lrs:
                g.append(("lr", f"{opt} {lr}", {"opt": opt, "lr": lr}))
    elif name == "decay":  # the candidate defaults with every rate halved after each epoch
        g.append(("lr", "lazyadam 0.01 l2 1e-4 decay 0.5", {"opt": "lazyadam", "lr": 0.01, "l2": 1e-4, "decay": 0.5}))
        g.append(("lr", "lazyadam 0.02 l2 1e-4 decay 0.5", {"opt": "lazyadam", "lr": 0.02, "l2": 1e-4, "decay": 0.5}))
        g.append(("fm", "lin lazyadam 0.01 + lazyadam 0.003 l2 1e-4 decay 0.5",
                  {"opt": "lazyadam", "lr": 0.003, "linear": ("lazyadam", 0.01), "l2": 1e-4, "decay": 0.5}))
        g.append(("deepfm", "lin lazyadam 0.01 + lazyadam 0.002 l2 1e-4 dropout 0.2 decay 0.5",
                  {"opt": "lazyadam", "lr": 0.002, "linear": ("lazyadam", 0.01), "l2": 1e-4, "dropout": 0.2, "decay": 0.5}))
    elif name == "combo":  # candidate defaults together
        g.append(("lr", "lazyadam 0.01 l2 0.001", {"opt": "lazyadam", "lr": 0.01, "l2": 1e-3}))
        for l2 in (1e-3, 1e-4):
            g.append(("fm", f"lin lazyadam 0.01 + lazyadam 0.003 l2 {l2:g}",
                      {"opt": "lazyadam", "lr": 0.003, "linear": ("lazyadam", 0.01), "l2": l2}))
            g.append(("deepfm", f"lin lazyadam 0.01 + lazyadam 0.002 l2 {l2:g} dropout 0.2",
                      {"opt": "lazyadam", "lr": 0.002, "linear": ("lazyadam", 0.01), "l2": l2, "dropout": 0.2}))
    elif name == "l2mode":  # L2 on every row at every step (caught up lazily) vs on touched rows only
        lin = {"opt": "lazyadam", "lr": 0.003, "linear": ("lazyadam", 0.01)}
        for l2 in (1e-5, 3e-5, 1e-4):
            g.append(("lr", f"lazyadam 0.01 l2 {l2:g} every_step", {"opt": "lazyadam", "lr": 0.01, "l2": l2, "l2_mode": "every_step"}))
        for l2 in (1e-5, 3e-5, 1e-4, 3e-4):
            g.append(("fm", f"lin lazyadam 0.01 + lazyadam 0.003 l2 {l2:g} every_step", {**lin, "l2": l2, "l2_mode": "every_step"}))
        for l2 in (1e-5, 3e-5):
            g.append(("deepfm", f"lin lazyadam 0.01 + lazyadam 0.003 l2 {l2:g} every_step dropout 0.2",
                      {**lin, "l2": l2, "l2_mode": "every_step", "dropout": 0.2}))
    else:
        raise SystemExit(f"unknown grid {name!r}")
    return g


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="synthetic,zipfmix,talkingdata")
    ap.add_argument("--rows", type=int, default=150_000)
    ap.add_argument("--work", default="/tmp/ctrflow-quality-study")
    ap.add_argument("--grid", default="lr", help="lr|lr2|fm|deepfm|l2|combo|decay|dim|batch|l2mode|current (comma-separated)")
    ap.add_argument("--only", help="only settings whose label contains this")
    ap.add_argument("--max-epochs", type=int, default=8)
    ap.add_argument("--patience", type=int, default=1)
    ap.add_argument("--results", default="/tmp/ctrflow-quality-study/results.jsonl", help="appends one JSON line per setting")
    a = ap.parse_args(argv)
    work = Path(a.work)
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    for dname in a.datasets.split(","):
        ds = quality_common.prepare(dname, work / dname, rows=a.rows, test_rows=a.rows * 2 // 5, max_buckets=1 << 17)
        for gname in a.grid.split(","):
            for model, label, kw in grid(gname):
                if a.only and a.only not in label:
                    continue
                decay = kw.pop("decay", 1.0)
                cfg = make_config(model, **kw)
                epochs = 1 if gname == "current" else a.max_epochs
                r = run_setting(ds, cfg, work / dname, max_epochs=epochs, patience=a.patience, decay=decay)
                row = {"dataset": dname, "grid": gname, "model": model, "setting": label, **r,
                       "bayes_test": ds.bayes.get("test")}
                with open(a.results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{dname:12s} {model:7s} {label:45s} ep {r.get('epoch')} valid {r.get('valid_logloss', float('nan')):.5f} "
                      f"test {r.get('test_logloss', float('nan')):.5f} auc {r.get('test_auc', float('nan')):.4f} "
                      f"cal {r.get('test_calibration', float('nan')):.3f} {r['valid_by_epoch']} {r['seconds']}s {r.get('error', '')}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
