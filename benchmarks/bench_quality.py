"""Model quality vs peers: every ctrflow model with its defaults (and optionally after `ctrflow tune`)
side by side with scikit-learn, Vowpal Wabbit and DeepCTR-Torch on the same train / valid / test rows.

Datasets (benchmarks/quality_common.py): (a) synthetic (`ctrflow generate`), (b) zipfmix
(benchmarks/quality_data.py), both with known true CTR, so each model's gap to the Bayes-optimal
logloss is reported; (c) TalkingData, time split, schema inferred; (d) iPinYou, given train/test.

Peers (pip install -r benchmarks/requirements.txt; a missing peer is skipped and said so):
- scikit-learn LogisticRegression: hashed one-hot of every categorical (2^20 columns) + 20 quantile bins
  per numeric, L2, lbfgs to convergence, C chosen on the validation split;
- Vowpal Wabbit: defaults (one online pass, logistic loss), and with --l2 and -q :: (all field pairs),
  L2 chosen on the validation split;
- DeepCTR-Torch DeepFM (its defaults: embedding 4, DNN 256-128, Adam; batch 1024), epochs up to 5, the best
  validation epoch's test metrics.

Usage:
    python benchmarks/bench_quality.py [--datasets synthetic,zipfmix,talkingdata,ipinyou] [--rows 300000]
        [--models lr,fm,fwfm,ffm,deepfm,dcnv2] [--l2-mode touched|every_step] [--l2 X] [--peers sklearn,vw,deepctr] [--tune-trials 0] [--tune-minutes 10]
        [--talkingdata-ids explicit|inferred] [--min-count K] [--ffm-dim K] [--ffm-pair-l1 X] [--ffm-pair-l2 X] [--ffm-select top:K,frac:F [--ffm-select-start learnt,one] [--ffm-reuse-stage1]] [--cross-select 4,8 [--cross-buckets B] [--cross-models ffm,lr] [--cross-ffm-pairs] [--cross-scale 1,3] [--cross-pairs a:b]] [--max-epochs N] [--refit [--refit-lams 100,30,10,3,1]] [--sklearn-c 0.1,0.3] [--vw-l2 1e-6]
        [--work /tmp/ctrflow-bench-quality] [--rerun-peers]
Peer results are cached per dataset in WORK (they do not depend on ctrflow); --rerun-peers retrains them.
Prints a table per dataset, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import quality_common  # noqa: E402
from ctrflow.train.metrics import evaluate_predictions  # noqa: E402


def _metrics(y: np.ndarray, p: np.ndarray, bayes: float | None) -> dict[str, Any]:
    m = evaluate_predictions(y, np.clip(p, 1e-7, 1 - 1e-7))
    out = {"logloss": m["logloss"], "auc": m["auc"], "calibration": m["calibration"]}
    if bayes is not None:
        out["gap"] = m["logloss"] - bayes
    return out


# --- ctrflow ----------------------------------------------------------------------------------------
MODEL_OVERRIDES = ("min_count", "ffm_dim")  # overrides that are ModelConfig fields


def default_config(model: str, **overrides: Any) -> Any:
    """What `ctrflow train --model M [--flag V ...]` trains: TrainConfig's defaults (its default model's
    settings, e.g. the MLP dropout, with the kind changed), then `overrides`."""
    from dataclasses import replace

    from ctrflow.train.config import TrainConfig

    base = TrainConfig()
    mo = {k: overrides.pop(k) for k in MODEL_OVERRIDES if k in overrides}
    return base.replace(model=replace(base.model, kind=model, **mo), **overrides)


def run_ctrflow(ds: quality_common.Dataset, model: str, work: Path, *, tune_trials: int, tune_minutes: float,
                overrides: dict[str, Any] | None = None) -> list[dict]:
    from ctrflow.train.config import TrainConfig
    from ctrflow.train.evaluate import evaluate
    from ctrflow.train.loop import train

    rows = []
    run = work / f"ctrflow-{model}-{os.getpid()}"  # per process: another checkout's bench may share --work
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    config = default_config(model, **(overrides or {}))
    label = f"ctrflow {model}, defaults" + "".join(f", {k} {v}" for k, v in (overrides or {}).items())
    if model == "ffm":
        import ctrflow.models.ffm as ffm

        label += "".join(f", {k} {v}" for k, v in (("pair_l1", ffm.PAIR_L1), ("pair_l2", ffm.PAIR_L2), ("pair_prox", ffm.PAIR_PROX)) if v)
    stage1 = work / "ffm-stage1.json"  # stage 1 of --ffm-select: its row and learnt r, reused with --ffm-reuse-stage1
    if model == "ffm" and (FFM_SELECT or CROSS_SELECT) and FFM_REUSE_STAGE1 and stage1.exists():
        first = json.loads(stage1.read_text())
        rows.append(first["row"])
        learnt = np.asarray(first["r"])
    else:
        s = train(ds.shards["train"], run, config, valid=ds.shards["valid"])
        r = evaluate(run, ds.shards["test"])
        rows.append({"model": label, **_pick(r, ds), "valid_logloss": s.best_valid_logloss, "seconds": time.perf_counter() - t0,
                     "epochs": s.history[-1]["epoch"] if s.history else None, **(_pair_stats(s.checkpoint, config.model.ffm_pair_rate) if model == "ffm" else {})})
        if REFIT:
            rows.append(_refit_row(ds, run, rows[-1]))
        if model == "ffm" and (FFM_SELECT or CROSS_SELECT):
            learnt = _pair_weights(s.checkpoint, config.model.ffm_pair_rate)
            stage1.write_text(json.dumps({"row": rows[-1], "r": learnt.tolist(), "term_rms": _pair_term_rms(run, ds.shards["train"]).tolist()},
                                         default=float))
            first = json.loads(stage1.read_text())
        shutil.rmtree(run, ignore_errors=True)
    if model == "ffm" and FFM_SELECT:
        strength = np.abs(learnt) if FFM_SELECT_BY == "r" else np.asarray(first["term_rms"])
        rows += _ffm_stage2(ds, run, config, label, learnt, strength, rows[-1])
    if model == "ffm" and CROSS_SELECT:
        rows += _cross_stage2(ds, run, np.asarray(first["term_rms"]), rows[0], overrides or {})
    if tune_trials:
        from ctrflow.train.tune import TuneOptions, tune

        t0 = time.perf_counter()
        tdir = work / f"tune-{model}"
        shutil.rmtree(tdir, ignore_errors=True)
        ts = tune(ds.shards["train"], tdir, config, valid=ds.shards["valid"],
                  options=TuneOptions(trials=tune_trials, budget_minutes=tune_minutes))
        best = TrainConfig.load(tdir / "best_config.yaml")
        train(ds.shards["train"], run, best, valid=ds.shards["valid"])
        r = evaluate(run, ds.shards["test"])
        rows.append({"model": f"ctrflow {model}, tuned ({ts.trials} trials)", **_pick(r, ds),
                     "seconds": time.perf_counter() - t0, "params": ts.best_params})
        shutil.rmtree(run, ignore_errors=True)
    return rows


def _pair_weights(checkpoint: str | None, rate: float) -> np.ndarray | None:
    """FFM's learnt pair weights r `[S, S]` (stored * scale; upper triangle used) in a checkpoint, or None."""
    import tensorflow as tf


    if not checkpoint:
        return None
    reader = tf.train.load_checkpoint(checkpoint)
    keys = [k for k in reader.get_variable_to_shape_map() if k.startswith("model/") and k.endswith("pairs/r/.ATTRIBUTES/VARIABLE_VALUE")]
    return reader.get_tensor(keys[0]) * rate if len(keys) == 1 else None


def _pair_stats(checkpoint: str | None, rate: float) -> dict[str, Any]:
    """FFM's learnt pair weights r (upper triangle) in the final checkpoint: how many end near 0, the largest."""
    r = _pair_weights(checkpoint, rate)
    if r is None:
        return {}
    w = np.abs(r[np.triu_indices(r.shape[0], 1)])
    return {"pairs_below_0.1": float((w < 0.1).mean()), "pairs_below_0.01": float((w < 0.01).mean()),
            "pair_median": float(np.median(w)), "pair_top4": [round(float(v), 2) for v in np.sort(w)[::-1][:4]],
            "pairs_off": int((w == 0).sum())}


# --- two-stage pair selection (AutoFIS-like: stage 1 learns r on every pair, stage 2 retrains on the kept) ------
FFM_SELECT: tuple[str, ...] = ()  # --ffm-select rules: "top:K" (the K largest |r|) or "frac:F" (|r| >= F x max |r|)
FFM_SELECT_START: tuple[str, ...] = ("learnt",)  # kept pairs' r starts at stage 1's value ("learnt") or at 1 ("one")
FFM_REUSE_STAGE1 = False
FFM_STAGE2_DIM: int | None = None  # stage 2's ffm_dim (default: stage 1's): the kept pairs' vectors may be wider


FFM_SELECT_BY = "r"  # rank pairs by |r| ("r") or by the RMS of the pair's term r_ij <v_ij, v_ji> over train rows ("term")


def _pair_term_rms(run: Path, train_shards: Any) -> np.ndarray:
    """`[S, S]`: the RMS of each pair's term over train rows (ctrflow.train.pair_selection, what `train --ffm-select-pairs` ranks by)."""
    from ctrflow.train.pair_selection import pair_term_rms

    return pair_term_rms(run, train_shards)[0]


def select_pairs(strength: np.ndarray, rule: str) -> np.ndarray:
    """Boolean `[S, S]` (upper triangle) of the pairs a rule keeps, from stage 1's strengths (valid data never enters)."""
    iu = np.triu_indices(strength.shape[0], 1)
    w = np.abs(strength[iu])
    kind, _, arg = rule.partition(":")
    if kind == "top":
        keep = np.zeros(len(w), bool)
        keep[np.argsort(-w, kind="stable")[:int(arg)]] = True
    elif kind == "frac":
        keep = w >= float(arg) * w.max()
    else:
        raise SystemExit(f"--ffm-select: unknown rule {rule!r} (top:K or frac:F)")
    out = np.zeros(strength.shape, bool)
    out[iu] = keep
    return out


def _ffm_stage2(ds: quality_common.Dataset, run: Path, config: Any, label: str, learnt: np.ndarray, strength: np.ndarray,
                first: dict) -> list[dict]:
    """Stage 2 of every --ffm-select rule x start: FFM from scratch with the dropped pairs' r at exactly 0."""
    from dataclasses import replace

    import ctrflow.models.ffm as ffm
    from ctrflow.train.evaluate import evaluate
    from ctrflow.train.loop import train

    rows = []
    for rule in FFM_SELECT:
        keep = select_pairs(strength, rule)
        for start in FFM_SELECT_START:
            t0 = time.perf_counter()
            ffm.PAIR_START = np.where(keep, learnt if start == "learnt" else 1.0, 0.0)
            second = config.replace(model=replace(config.model, ffm_dim=FFM_STAGE2_DIM)) if FFM_STAGE2_DIM else config
            try:
                shutil.rmtree(run, ignore_errors=True)
                s = train(ds.shards["train"], run, second, valid=ds.shards["valid"])
                r = evaluate(run, ds.shards["test"])
            finally:
                ffm.PAIR_START = None
            rows.append({"model": f"{label}, two-stage {rule} by {FFM_SELECT_BY} start {start}" + (f" dim {FFM_STAGE2_DIM}" if FFM_STAGE2_DIM else ""), **_pick(r, ds), "valid_logloss": s.best_valid_logloss,
                         "seconds": time.perf_counter() - t0 + first.get("seconds", 0.0), "pairs_kept": int(keep.sum()),
                         "epochs": s.history[-1]["epoch"] if s.history else None, "stage1_epochs": first.get("epochs"),
                         **_pair_stats(s.checkpoint, config.model.ffm_pair_rate)})
            print(f"  stage 2: {rows[-1]}", file=sys.stderr, flush=True)
            shutil.rmtree(run, ignore_errors=True)
    return rows


# --- hashed crosses of the pairs stage 1 ranks first (`train --cross-select K`, ctrflow.models.cross) ----------------
CROSS_SELECT: tuple[int, ...] = ()  # --cross-select: K values (top K crossable pairs by stage 1's term RMS)
CROSS_BUCKETS: tuple[int, ...] = ()  # --cross-buckets: table sizes (default: ModelConfig's)
CROSS_MODELS: tuple[str, ...] = ("ffm",)  # --cross-models: stage 2's model kinds
CROSS_FFM_PAIRS = False  # --cross-ffm-pairs: stage 2's FFM also keeps only the crossed pairs (ffm_pairs)
CROSS_SCALES: tuple[float, ...] = ()  # --cross-scale: ModelConfig.cross_scale values (default: its default)
CROSS_GIVEN: tuple[tuple[str, str], ...] = ()  # --cross-pairs: a row with exactly these pairs (K written as 0)


def _cross_stage2(ds: quality_common.Dataset, run: Path, strength: np.ndarray, first: dict, overrides: dict) -> list[dict]:
    """Stage 2 with crosses of the top K pairs (what `ctrflow train --model M --cross-select K` trains), for every
    model x K x buckets of the grid; stage 1 (the default FFM) is `first` / WORK/DATASET/ffm-stage1.json."""
    from dataclasses import replace

    from ctrflow.data.pipeline import PipelineOptions, open_batches
    from ctrflow.models.layers import FieldLayout
    from ctrflow.train.evaluate import evaluate
    from ctrflow.train.loop import train
    from ctrflow.train.pair_selection import crossable, select_top

    with open_batches(ds.shards["train"], PipelineOptions(batch_size=1, shuffle=False)) as b:
        lay = FieldLayout.from_spec(b.spec)
    names = list(lay.id_names) + list(lay.numeric_names)
    ok = crossable(names, lay.n_id_fields)
    iu = np.triu_indices(len(names), 1)
    rows = []
    for kind in CROSS_MODELS:
        for k in CROSS_SELECT:
            if k == 0:  # --cross-pairs: the given pairs, not a selection
                pairs, k = list(CROSS_GIVEN), "given"
            else:
                keep = select_top(np.where(ok, strength, 0.0), k) & ok
                pairs = sorted(((names[i], names[j]) for i, j in zip(*iu) if keep[i, j]), key=lambda p: -strength[names.index(p[0]), names.index(p[1])])
            for buckets, scale in [(b, c) for b in CROSS_BUCKETS or (None,) for c in CROSS_SCALES or (None,)]:
                t0 = time.perf_counter()
                config = default_config(kind, **dict(overrides))
                extra = {"cross_pairs": tuple(pairs), **({"cross_buckets": buckets} if buckets else {}),
                         **({"cross_scale": scale} if scale else {})}
                if CROSS_FFM_PAIRS and kind == "ffm":
                    extra["ffm_pairs"] = tuple(pairs)
                config = config.replace(model=replace(config.model, **extra))
                shutil.rmtree(run, ignore_errors=True)
                s = train(ds.shards["train"], run, config, valid=ds.shards["valid"])
                r = evaluate(run, ds.shards["test"])
                rows.append({"model": f"ctrflow {kind}, cross-select {k}" + (f", buckets {buckets}" if buckets else "")
                             + (f", cross_scale {scale:g}" if scale else "")
                             + (", ffm_pairs = crossed" if "ffm_pairs" in extra else "")
                             + "".join(f", {a} {v}" for a, v in overrides.items()),
                             **_pick(r, ds), "valid_logloss": s.best_valid_logloss,
                             "seconds": time.perf_counter() - t0 + first.get("seconds", 0.0), "stage2_seconds": time.perf_counter() - t0,
                             "epochs": s.history[-1]["epoch"] if s.history else None, "stage1_epochs": first.get("epochs"),
                             "crossed": [list(p) for p in pairs]})
                print(f"  cross stage 2: {rows[-1]}", file=sys.stderr, flush=True)
                if REFIT:
                    rows.append(_refit_row(ds, run, rows[-1]))
                    print(f"  refit: {rows[-1]}", file=sys.stderr, flush=True)
                shutil.rmtree(run, ignore_errors=True)
    return rows


# --- refit of the per-id weights after training (ctrflow.train.refit) ------------------------------------------
REFIT = False  # --refit: after every ctrflow row, a row with its per-id weights refitted to convergence
REFIT_LAMS: tuple[float, ...] = ()  # --refit-lams: the lam grid (default: ctrflow.train.refit.DEFAULT_LAMS)


def _refit_row(ds: quality_common.Dataset, run: Path, trained: dict) -> dict:
    """The run's model with its linear + cross weights and bias refitted (lam on valid), scored on test."""
    from ctrflow.data.pipeline import PipelineOptions, open_batches
    from ctrflow.train.checkpoints import restore_latest
    from ctrflow.train.core import build_model_from_run, evaluate_stream, load_run_info, logit_correction, make_predict
    from ctrflow.train.refit import RefitOptions, refit_model

    t0 = time.perf_counter()
    info = load_run_info(run)
    model = build_model_from_run(info)
    restore_latest(run, model)
    options = RefitOptions(lams=REFIT_LAMS) if REFIT_LAMS else RefitOptions()
    res = refit_model(model, ds.shards["train"], ds.shards["valid"], options, correction=logit_correction(info),
                      progress=lambda m: print(f"    {m}", file=sys.stderr, flush=True), keep_if_worse=False)
    predict = make_predict(model, info["feature_spec"], logit_correction(info))
    with open_batches(ds.shards["test"], PipelineOptions(batch_size=16384, shuffle=False)) as tb:
        r = evaluate_stream(predict, tb)
    out = {"model": trained["model"] + ", refit", **_pick(r, ds), "valid_logloss": res.valid_logloss_after,
           "valid_before": trained.get("valid_logloss"), "test_before": trained["logloss"], "refit_seconds": time.perf_counter() - t0,
           "seconds": trained.get("seconds", 0.0) + time.perf_counter() - t0, "lam": res.lam, "lam_cross": res.lam_cross, "sweeps": res.sweeps,
           "train_refit_keeps_it": bool(res.valid_logloss_after < res.valid_logloss_before),  # what `train --refit` would do
           "objective_before": res.objective_before, "objective_after": res.objective_after,
           "train_logloss_before": res.train_logloss_before, "train_logloss_after": res.train_logloss_after,
           "grid": res.grid}
    print(f"  refit: {out}", file=sys.stderr, flush=True)
    return out


def _pick(r: dict[str, Any], ds: quality_common.Dataset) -> dict[str, Any]:
    out = {"logloss": r["logloss"], "auc": r["auc"], "calibration": r["calibration"]}
    if "test" in ds.bayes:
        out["gap"] = r["logloss"] - ds.bayes["test"]
    return out


# --- peers: features from the same CSVs -------------------------------------------------------------
class Tokens:
    """Every row as `field=value` tokens: categoricals as they are, numerics as one of 20 quantile bins
    learned on train (`field=NA` when missing). The peers' shared view of the data."""

    def __init__(self, ds: quality_common.Dataset, bins: int = 20) -> None:
        import pandas as pd

        self.ds = ds
        self.frames = {s: pd.read_csv(p, dtype=str, keep_default_na=False) for s, p in ds.csv.items()}
        self.edges = {}
        tr = self.frames["train"]
        for c in ds.numeric:
            v = pd.to_numeric(tr[c], errors="coerce").to_numpy(float)
            v = v[np.isfinite(v)]
            self.edges[c] = np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1])) if len(v) else np.array([])

    def label(self, split: str) -> np.ndarray:
        return self.frames[split][self.ds.label].to_numpy(float)

    def columns(self, split: str) -> dict[str, np.ndarray]:
        """field -> string token array (numerics binned)."""
        import pandas as pd

        df = self.frames[split]
        out = {}
        for c in self.ds.features:
            if c in self.edges:
                v = pd.to_numeric(df[c], errors="coerce").to_numpy(float)
                b = np.searchsorted(self.edges[c], v, side="right").astype(str)
                out[c] = np.where(np.isfinite(v), b, "NA")
            else:
                out[c] = df[c].to_numpy(str)
        return out


SKLEARN_C = (0.03, 0.1, 0.3, 1.0)  # chosen on valid; --sklearn-c narrows it (each fit is minutes at 300k rows)
VW_L2 = (1e-6, 1e-7, 1e-8)


def run_sklearn(tok: Tokens, bayes: float | None) -> list[dict]:
    from sklearn.feature_extraction import FeatureHasher
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    hasher = FeatureHasher(n_features=1 << 20, input_type="string", alternate_sign=False)

    def matrix(split: str):
        cols = tok.columns(split)
        names = list(cols)
        rows = zip(*(np.char.add(f"{n}=", cols[n]) for n in names))
        return hasher.transform(rows)

    X = {s: matrix(s) for s in ("train", "valid", "test")}
    y = {s: tok.label(s) for s in ("train", "valid", "test")}
    best = None
    for C in SKLEARN_C:
        m = LogisticRegression(C=C, max_iter=2000, solver="lbfgs", tol=1e-6)
        m.fit(X["train"], y["train"])
        v = _metrics(y["valid"], m.predict_proba(X["valid"])[:, 1], None)["logloss"]
        if best is None or v < best[0]:
            best = (v, C, m)
    _, C, m = best
    return [{"model": f"scikit-learn LogisticRegression (hashed one-hot, 20 bins, C={C:g})",
             **_metrics(y["test"], m.predict_proba(X["test"])[:, 1], bayes), "seconds": time.perf_counter() - t0}]


def run_vw(tok: Tokens, bayes: float | None) -> list[dict]:
    from vowpalwabbit import pyvw

    def lines(split: str) -> list[str]:
        cols = tok.columns(split)
        names = list(cols)
        y = tok.label(split)
        ns = [chr(ord("a") + i) if i < 26 else chr(ord("A") + i - 26) for i in range(len(names))]  # one namespace per field
        feats = [np.char.add(f"|{ns[i]} ", np.char.replace(np.char.replace(cols[n], " ", "_"), ":", ";")) for i, n in enumerate(names)]
        body = feats[0]
        for f in feats[1:]:
            body = np.char.add(np.char.add(body, " "), f)
        return [("1 " if t > 0 else "-1 ") + b for t, b in zip(y, body)]

    L = {s: lines(s) for s in ("train", "valid", "test")}
    y = {s: tok.label(s) for s in ("train", "valid", "test")}

    def fit(args: str) -> Any:
        vw = pyvw.Workspace(f"--loss_function logistic --link logistic --quiet -b 24 {args}")
        for line in L["train"]:
            vw.learn(line)
        return vw

    def predict(vw: Any, split: str) -> np.ndarray:
        return np.array([vw.predict(line.split(" ", 1)[1]) for line in L[split]], float)

    out = []
    t0 = time.perf_counter()
    vw = fit("")
    out.append({"model": "Vowpal Wabbit, defaults (1 pass)", **_metrics(y["test"], predict(vw, "test"), bayes),
                "seconds": time.perf_counter() - t0})
    vw.finish()
    t0 = time.perf_counter()
    best = None
    for l2 in VW_L2:
        vw = fit(f"--l2 {l2:g} -q ::")
        v = _metrics(y["valid"], predict(vw, "valid"), None)["logloss"]
        if best is None or v < best[0]:
            if best is not None:
                best[2].finish()
            best = (v, l2, vw)
        else:
            vw.finish()
    _, l2, vw = best
    out.append({"model": f"Vowpal Wabbit, --l2 {l2:g} -q :: (1 pass)", **_metrics(y["test"], predict(vw, "test"), bayes),
                "seconds": time.perf_counter() - t0})
    vw.finish()
    return out


def run_deepctr(tok: Tokens, bayes: float | None, *, max_epochs: int = 5) -> list[dict]:
    import torch
    from deepctr_torch.inputs import SparseFeat, get_feature_names
    from deepctr_torch.models import DeepFM

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    cols = {s: tok.columns(s) for s in ("train", "valid", "test")}
    y = {s: tok.label(s) for s in ("train", "valid", "test")}
    enc = {}
    for n, v in cols["train"].items():  # vocabulary from train; unseen values share index 0
        uniq = np.unique(v)
        enc[n] = uniq
    def ids(split: str) -> dict[str, np.ndarray]:
        out = {}
        for n, v in cols[split].items():
            i = np.searchsorted(enc[n], v)
            i = np.clip(i, 0, len(enc[n]) - 1)
            out[n] = np.where(enc[n][i] == v, i + 1, 0).astype(np.int64)
        return out
    X = {s: ids(s) for s in ("train", "valid", "test")}
    feats = [SparseFeat(n, vocabulary_size=len(enc[n]) + 1) for n in cols["train"]]
    names = get_feature_names(feats)
    with contextlib.redirect_stdout(io.StringIO()):
        model = DeepFM(feats, feats, task="binary", device="cpu", seed=0)
    model.compile("adam", "binary_crossentropy")
    best = None
    for epoch in range(1, max_epochs + 1):
        with contextlib.redirect_stdout(io.StringIO()):  # DeepCTR prints its device and sizes on every fit
            model.fit({n: X["train"][n] for n in names}, y["train"], batch_size=1024, epochs=1, verbose=0)
        v = _metrics(y["valid"], model.predict({n: X["valid"][n] for n in names}, batch_size=8192).ravel(), None)["logloss"]
        if best is None or v < best[0]:
            best = (v, epoch, model.predict({n: X["test"][n] for n in names}, batch_size=8192).ravel())
        elif epoch - best[1] >= 1:
            break
    _, epoch, p = best
    return [{"model": f"DeepCTR-Torch DeepFM (defaults, best epoch {epoch})", **_metrics(y["test"], p, bayes),
             "seconds": time.perf_counter() - t0}]


PEERS = {"sklearn": run_sklearn, "vw": run_vw, "deepctr": run_deepctr}


class _LazyTokens:
    """Reads the CSVs only when a peer actually runs (cached peers need nothing)."""

    def __init__(self, ds: quality_common.Dataset) -> None:
        self.ds, self._t = ds, None

    def __getattr__(self, name: str) -> Any:
        if self._t is None:
            self._t = Tokens(self.ds)
        return getattr(self._t, name)


def _table(name: str, ds: quality_common.Dataset, rows: list[dict]) -> str:
    bayes = ds.bayes.get("test")
    head = f"\n### {name}" + (f" (Bayes-optimal test logloss {bayes:.5f})" if bayes is not None else "") + (f" — {ds.note}" if ds.note else "")
    lines = [head, "", "| model | test logloss | AUC | calibration |" + (" gap to Bayes |" if bayes is not None else "") + " seconds |",
             "|---|---|---|---|" + ("---|" if bayes is not None else "") + "---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['error']} |")
            continue
        gap = f" {r['gap']:.5f} |" if bayes is not None else ""
        lines.append(f"| {r['model']} | {r['logloss']:.5f} | {r['auc']:.4f} | {r['calibration']:.3f} |{gap} {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default=",".join(quality_common.DATASETS))
    ap.add_argument("--rows", type=int, default=300_000, help="train rows of the synthetic sets")
    ap.add_argument("--test-rows", type=int, help="test rows of the synthetic sets (default: a third of --rows; valid: half that)")
    ap.add_argument("--models", default="lr,fm,fwfm,ffm,deepfm,dcnv2", help="ctrflow models")
    ap.add_argument("--peers", default="sklearn,vw,deepctr")
    ap.add_argument("--tune-trials", type=int, default=0, help="also run `ctrflow tune` with this many trials per model")
    ap.add_argument("--tune-minutes", type=float, default=10.0)
    ap.add_argument("--talkingdata-ids", choices=["explicit", "inferred"], default="explicit",
                    help="explicit: --categorical ip,app,device,os,channel; inferred: the schema inference alone")
    ap.add_argument("--max-buckets", type=int, default=1 << 18, help="cap of the synthetic preset's hash buckets")
    ap.add_argument("--l2-mode", choices=["touched", "every_step"], help="override TrainConfig.l2_mode (default: its default)")
    ap.add_argument("--l2", type=float, help="override TrainConfig.l2")
    ap.add_argument("--batch-size", type=int, help="override TrainConfig.batch_size (rates follow by its lr_scaling)")
    ap.add_argument("--sklearn-c", help="comma-separated C values tried on valid (default 0.03,0.1,0.3,1)")
    ap.add_argument("--vw-l2", help="comma-separated --l2 values of VW -q tried on valid (default 1e-6,1e-7,1e-8)")
    ap.add_argument("--min-count", type=int, help="override ModelConfig.min_count (ids seen < K times in train share a row)")
    ap.add_argument("--ffm-dim", type=int, help="override ModelConfig.ffm_dim (width of FFM's field-aware vectors)")
    ap.add_argument("--ffm-pair-l1", type=float, help="override ctrflow.models.ffm.PAIR_L1 (L1 on FFM's pair weights r, training only)")
    ap.add_argument("--ffm-pair-l2", type=float, help="override ctrflow.models.ffm.PAIR_L2 (L2 on r itself, not on r / 10)")
    ap.add_argument("--ffm-pair-prox", type=float, help="override ctrflow.models.ffm.PAIR_PROX (soft threshold on r per training step)")
    ap.add_argument("--ffm-select", help="two-stage FFM: after the default run, retrain with only the pairs each comma-separated "
                    "rule keeps, top:K (the K largest learnt |r|) or frac:F (|r| >= F x the largest)")
    ap.add_argument("--ffm-select-start", default="learnt", help="comma-separated: kept pairs' r starts at stage 1's (learnt) or 1 (one)")
    ap.add_argument("--ffm-select-by", choices=["r", "term"], default="r",
                    help="rank pairs by |r| or by the RMS of their term r_ij <v_ij, v_ji> over train rows")
    ap.add_argument("--ffm-stage2-dim", type=int, help="ffm_dim of stage 2 (default: stage 1's)")
    ap.add_argument("--ffm-reuse-stage1", action="store_true", help="take stage 1 (row and r) from WORK/DATASET/ffm-stage1.json if present")
    ap.add_argument("--cross-select", help="comma-separated K: after the default FFM (stage 1), train --cross-models with hashed "
                    "crosses of the top K pairs by stage 1's term RMS (`train --cross-select K`); reuses stage 1 with --ffm-reuse-stage1")
    ap.add_argument("--cross-buckets", help="comma-separated cross table sizes (default: ModelConfig.cross_buckets)")
    ap.add_argument("--cross-models", default="ffm", help="comma-separated stage 2 model kinds of --cross-select (e.g. ffm,lr)")
    ap.add_argument("--cross-scale", help="comma-separated ModelConfig.cross_scale values (rate x s, L2 / s^2 on the crosses)")
    ap.add_argument("--cross-pairs", help="--cross-select: also a row with exactly these pairs, a:b,c:d (e.g. the true ones)")
    ap.add_argument("--cross-ffm-pairs", action="store_true", help="--cross-select: stage 2's FFM also keeps only the crossed pairs")
    ap.add_argument("--linear-optimizer", help="override the linear group's optimizer, NAME or NAME:RATE (e.g. adagrad:1.0)")
    ap.add_argument("--max-epochs", type=int, help="override the bound on early-stopped epochs (ctrflow.train.config.MAX_EPOCHS)")
    ap.add_argument("--refit", action="store_true", help="after every ctrflow row, add one with its per-id weights refitted to "
                    "convergence (ctrflow.train.refit; lam chosen on valid)")
    ap.add_argument("--refit-lams", help="comma-separated lam grid of --refit (default: ctrflow.train.refit.DEFAULT_LAMS)")
    ap.add_argument("--work", default="/tmp/ctrflow-bench-quality")
    ap.add_argument("--rerun-peers", action="store_true", help="retrain the peers even if WORK/DATASET/peer-P.json exists")
    a = ap.parse_args(argv)
    work = Path(a.work)
    global SKLEARN_C, VW_L2
    global REFIT, REFIT_LAMS
    REFIT = a.refit
    REFIT_LAMS = tuple(float(x) for x in a.refit_lams.split(",")) if a.refit_lams else ()
    if a.max_epochs:
        import ctrflow.train.config

        ctrflow.train.config.MAX_EPOCHS = a.max_epochs
    for flag, attr in ((a.ffm_pair_l1, "PAIR_L1"), (a.ffm_pair_l2, "PAIR_L2"), (a.ffm_pair_prox, "PAIR_PROX")):
        if flag is not None:
            import ctrflow.models.ffm

            setattr(ctrflow.models.ffm, attr, flag)
    global FFM_SELECT, FFM_SELECT_START, FFM_REUSE_STAGE1, FFM_SELECT_BY, FFM_STAGE2_DIM
    FFM_SELECT_BY, FFM_STAGE2_DIM = a.ffm_select_by, a.ffm_stage2_dim
    if a.ffm_select:
        FFM_SELECT = tuple(a.ffm_select.split(","))
        FFM_SELECT_START = tuple(a.ffm_select_start.split(","))
        FFM_REUSE_STAGE1 = a.ffm_reuse_stage1
    global CROSS_SELECT, CROSS_BUCKETS, CROSS_MODELS, CROSS_FFM_PAIRS, CROSS_SCALES, CROSS_GIVEN
    if a.cross_select or a.cross_pairs:
        CROSS_SELECT = tuple(int(k) for k in (a.cross_select or "").split(",") if k) + ((0,) if a.cross_pairs else ())
        CROSS_GIVEN = tuple(tuple(p.split(":")) for p in (a.cross_pairs or "").split(",") if p)
        CROSS_SCALES = tuple(float(c) for c in a.cross_scale.split(",")) if a.cross_scale else ()
        CROSS_BUCKETS = tuple(int(b) for b in a.cross_buckets.split(",")) if a.cross_buckets else ()
        CROSS_MODELS = tuple(m for m in a.cross_models.split(",") if m)
        CROSS_FFM_PAIRS = a.cross_ffm_pairs
        FFM_REUSE_STAGE1 = a.ffm_reuse_stage1
    if a.sklearn_c:
        SKLEARN_C = tuple(float(c) for c in a.sklearn_c.split(","))
    if a.vw_l2:
        VW_L2 = tuple(float(c) for c in a.vw_l2.split(","))
    results: dict[str, Any] = {}
    overrides = {k: v for k, v in (("l2_mode", a.l2_mode), ("l2", a.l2), ("batch_size", a.batch_size), ("min_count", a.min_count),
                                                 ("ffm_dim", a.ffm_dim))
                 if v is not None}
    if a.linear_optimizer:
        from ctrflow.train.config import DEFAULT_LEARNING_RATES, GroupOptimizer

        name, _, rate = a.linear_optimizer.partition(":")
        overrides["optimizer_groups"] = {"linear": GroupOptimizer(name, float(rate) if rate else DEFAULT_LEARNING_RATES[name]["linear"])}
    for name in a.datasets.split(","):
        try:
            ds = quality_common.prepare(name, work / name, rows=a.rows, test_rows=a.test_rows, max_buckets=a.max_buckets,
                                        explicit_ids=a.talkingdata_ids == "explicit")
        except FileNotFoundError as e:
            print(f"skipping {name}: {e} not present")
            continue
        rows: list[dict] = []
        for m in [m for m in a.models.split(",") if m]:
            try:
                rows += run_ctrflow(ds, m, work / name, tune_trials=a.tune_trials, tune_minutes=a.tune_minutes,
                                    overrides=overrides)
            except Exception as e:  # an unknown model (not yet added) or a failed run is reported, not fatal
                rows.append({"model": f"ctrflow {m}", "error": f"{type(e).__name__}: {str(e)[:100]}"})
            print(f"  {name}: {rows[-1]}", file=sys.stderr, flush=True)
        tok = _LazyTokens(ds)
        for p in [p for p in a.peers.split(",") if p]:
            cache = work / name / f"peer-{p}.json"  # peers do not change when ctrflow does: reuse unless --rerun-peers
            if cache.exists() and not a.rerun_peers:
                rows += json.loads(cache.read_text())
                print(f"  {name}: {p} from {cache}", file=sys.stderr, flush=True)
                continue
            try:
                got = PEERS[p](tok, ds.bayes.get("test"))
                cache.write_text(json.dumps(got, default=float))
                rows += got
            except ImportError as e:
                rows.append({"model": p, "error": f"not installed ({e.name}): pip install -r benchmarks/requirements.txt"})
            except Exception as e:
                rows.append({"model": p, "error": f"{type(e).__name__}: {str(e)[:100]}"})
            print(f"  {name}: {rows[-1]}", file=sys.stderr, flush=True)
        ok = [r for r in rows if "error" not in r]
        best_ct = min((r for r in ok if r["model"].startswith("ctrflow")), key=lambda r: r["logloss"], default=None)
        best_peer = min((r for r in ok if not r["model"].startswith("ctrflow")), key=lambda r: r["logloss"], default=None)
        summary = {"rows": rows, "bayes_test": ds.bayes.get("test"), "note": ds.note,
                   "best_ctrflow": best_ct and best_ct["model"], "best_peer": best_peer and best_peer["model"]}
        if best_ct and best_peer:
            summary["ctrflow_beats_peers"] = best_ct["logloss"] < best_peer["logloss"]
            if "gap" in best_ct:
                summary["gap_ratio_ctrflow_to_peer"] = best_ct["gap"] / best_peer["gap"] if best_peer["gap"] > 0 else math.nan
        results[name] = summary
        print(_table(name, ds, rows), flush=True)
    print(json.dumps({"bench": "quality", "rows": a.rows, "models": a.models, "results": results}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
