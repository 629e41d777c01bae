"""`ctrflow tune`: a budgeted hyper-parameter search with early pruning, by Optuna, over the public
training API. Trials run one after another in this process.

Each trial trains a `TrainConfig` one epoch at a time (rerunning `train` on the same run folder resumes
it) and reports the validation logloss after each epoch; Optuna's median pruner stops trials that fall
behind the others at the same epoch, and a trial stops by itself after an epoch without improvement.
The best (trial, epoch) wins, so the config written has `epochs` set to that epoch.

The output folder is built beside `out` and renamed into place when complete:
    best_config.yaml   the winning TrainConfig (`ctrflow train --config out/best_config.yaml`)
    trials.md / .tsv   one row per trial: state, best valid logloss, epochs, seconds, parameters
    trials.png         valid logloss per trial (best so far as a line) and each parameter against it
    summary.json       what `--json` prints

Example:
    >>> summary = tune("shards/train", "tuned/fm", TrainConfig(model=ModelConfig("fm")),
    ...                valid="shards/valid", options=TuneOptions(trials=20, budget_minutes=30))  # doctest: +SKIP
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ctrflow.atomic import fsync_dir, replace_atomically
from ctrflow.errors import ConfigError, CtrflowError, InsufficientMemoryError, TrainingError
from ctrflow.models.registry import ModelConfig
from ctrflow.train.config import MAX_EPOCHS, OPTIMIZER_GROUPS, GroupOptimizer, TrainConfig
from ctrflow.validation import Float, Int, check_fields

__all__ = ["TuneOptions", "TuneSummary", "tune", "SEARCH_SPACE"]

# What is searched, per parameter: (low, high, log scale) for floats, a list for choices. Each model searches
# only what acts on it (`_space_for`): no embeddings for `lr`, no MLP dropout without an MLP, and FFM its own
# vector width and pair-weight rate instead of `embedding_dim` (which it ignores).
SEARCH_SPACE: dict[str, Any] = {
    "learning_rate": (1e-4, 3e-2, True),  # the embedding and dense groups (every group for lr)
    "linear_learning_rate": (1e-3, 1e-1, True),  # the linear group
    "embedding_dim": [4, 8, 16, 32],  # fm, fwfm, deepfm, dcnv2
    "ffm_dim": [2, 4, 8],  # ffm: a row holds (fields - 1) vectors of this width (8: twice the default's table)
    "ffm_pair_rate": (1.0, 30.0, True),  # ffm: the pair weights' rate / the dense group's (measured 1x..30x)
    "l2": (1e-8, 1e-3, True),
    "dropout": (0.0, 0.5, False),
    "batch_size": [1024, 2048, 4096, 8192],
}
MLP_MODELS = frozenset({"deepfm", "dcnv2"})  # models whose `dropout` acts (an MLP)
MODEL_PARAMS = ("embedding_dim", "dropout", "ffm_dim", "ffm_pair_rate")  # searched ModelConfig fields
ProgressFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TuneOptions:
    """How long and how wide to search.

    trials: most trials to run, >= 1 (default 20).
    budget_minutes: wall-clock budget of the whole search, > 0, or None (no budget: `trials` bounds it).
        A trial running when it ends is cut short; its validated epochs still count. A budget that ends
        before the first trial validated once is an error (nothing is written).
    max_epochs: most epochs per trial, >= 1 (default `MAX_EPOCHS`, 10, the bound `train` itself uses: with 8, trial 0 —
        the defaults — was cut before its best epoch, e.g. FFM on zipfmix still improving at 10); a trial
        also stops after an epoch without improvement.
    seed: seeds the sampler (and every trial's model), >= 0.
    startup_trials: trials run in full before the pruner judges others, >= 0 (default 2).
    """

    trials: int = 20
    budget_minutes: float | None = None
    max_epochs: int = MAX_EPOCHS
    seed: int = 0
    startup_trials: int = 2

    def __post_init__(self) -> None:
        check_fields(self, {"trials": Int(low=1), "budget_minutes": Float(low=0.0, low_open=True, optional=True),
                            "max_epochs": Int(low=1), "seed": Int(low=0), "startup_trials": Int(low=0)})


@dataclass
class TuneSummary:
    out: str
    model: str
    trials: int  # trials started
    completed: int
    pruned: int
    best_trial: int
    best_valid_logloss: float
    best_epochs: int
    best_params: dict[str, Any]
    best_config: str  # path of best_config.yaml
    seconds: float
    budget_minutes: float | None
    stopped_by_budget: bool
    trial_table: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("trial_table")
        return d


class _Deadline(Exception):
    """Raised from the progress callback to cut a trial short when the budget is spent."""


def _space_for(model: str) -> list[str]:
    """The searched parameters of model kind `model`: only those that change what it trains."""
    names = ["learning_rate", "l2", "batch_size"]
    if model == "ffm":
        names += ["linear_learning_rate", "ffm_dim", "ffm_pair_rate"]
    elif model != "lr":
        names += ["linear_learning_rate", "embedding_dim"]
    if model in MLP_MODELS:
        names.append("dropout")
    return names


def _suggest(trial: Any, names: list[str]) -> dict[str, Any]:
    params = {}
    for n in names:
        spec = SEARCH_SPACE[n]
        if isinstance(spec, list):
            params[n] = trial.suggest_categorical(n, spec)
        else:
            lo, hi, log = spec
            params[n] = trial.suggest_float(n, lo, hi, log=log)
    return params


def base_params(base: TrainConfig, names: list[str]) -> dict[str, Any]:
    """`base`'s own values of the searched parameters, inside the space (a float clipped to its range, a
    choice left out when the base's value is not one): the first trial, so the search starts from the
    defaults and its best is never worse than they are on the validation split."""
    own = {"learning_rate": base.group_optimizer("linear" if base.model.kind == "lr" else "embedding").learning_rate,
           "linear_learning_rate": base.group_optimizer("linear").learning_rate, "l2": base.l2, "batch_size": base.batch_size,
           **{k: getattr(base.model, k) for k in MODEL_PARAMS}}
    out = {}
    for n in names:
        spec = SEARCH_SPACE[n]
        if isinstance(spec, list):
            if own[n] in spec:
                out[n] = own[n]
        else:
            out[n] = min(max(float(own[n]), spec[0]), spec[1])
    return out


def config_with(base: TrainConfig, params: dict[str, Any], epochs: int) -> TrainConfig:
    """`base` with a trial's parameters applied (the group optimizers keep their names)."""
    model = base.model
    mchanges = {k: params[k] for k in MODEL_PARAMS if k in params}
    if mchanges:
        model = ModelConfig.from_dict({**model.to_dict(), **mchanges})
    # Every group explicit, starting from the rates the base config would run with (its defaults included):
    # `learning_rate` moves the embedding and dense groups (and the linear one unless it has its own).
    lr = params.get("learning_rate")
    groups = {}
    for g in OPTIMIZER_GROUPS:
        spec = base.group_optimizer(g)
        rate = params.get("linear_learning_rate", lr) if g == "linear" else lr
        groups[g] = GroupOptimizer(spec.name, spec.learning_rate if rate is None else rate, dict(spec.extra))
    lr = base.learning_rate if lr is None else lr
    return base.replace(model=model, learning_rate=lr, optimizer_groups=groups, l2=params.get("l2", base.l2),
                        batch_size=params.get("batch_size", base.batch_size), epochs=epochs)


def _holdout(data: str | os.PathLike, work: Path) -> tuple[Path, Path, str]:
    """Without --valid: the latest 10% of rows by the time column (else a seeded random 10%), as `train` does."""
    from ctrflow.train.holdout import hold_out

    h = hold_out(data, work / "holdout", 0.1)
    return Path(h.train), Path(h.valid), h.describe()


def tune(
    data: str | os.PathLike,
    out: str | os.PathLike,
    base: TrainConfig,
    *,
    valid: str | os.PathLike | None = None,
    options: TuneOptions = TuneOptions(),
    overwrite: bool = False,
    on_trial: ProgressFn | None = None,
    on_note: Callable[[str], None] | None = None,
) -> TuneSummary:
    """Search learning rates, embedding size, L2, dropout and batch size for `base.model` on `valid` (FFM: its
    vector width `ffm_dim` and pair-weight rate `ffm_pair_rate` instead of the embedding size it does not use).

    Writes `out/` (see the module doc) only when the search has a result; on any error nothing is left.

    Raises:
        ConfigError: `out` exists (without `overwrite`), or the budget ended before one validated epoch.
    """
    import optuna

    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists: choose a new --out or pass --overwrite.")
    t0 = time.perf_counter()
    deadline = t0 + options.budget_minutes * 60 if options.budget_minutes else math.inf
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        train_data: Any = data
        if valid is None:
            train_data, valid, note = _holdout(data, work)
            if on_note:
                on_note(note)
        names = _space_for(base.model.kind)
        results: dict[int, dict[str, Any]] = {}
        state = {"stopped_by_budget": False}

        def objective(trial: Any) -> float:
            from ctrflow.train.loop import train

            params = _suggest(trial, names)
            run = work / f"trial-{trial.number}"
            rec = {"trial": trial.number, "params": params, "valid_by_epoch": [], "state": "running", "seconds": 0.0}
            results[trial.number] = rec
            ts = time.perf_counter()

            def watch(*_a: Any, **_k: Any) -> None:
                if time.perf_counter() > deadline:
                    raise _Deadline

            best, bad = math.inf, 0
            try:
                for epoch in range(1, options.max_epochs + 1):
                    cfg = config_with(base, params, epoch).replace(seed=options.seed, keep_checkpoints=1,
                                                                   refit=False)  # trials compare trained models; best_config keeps base's refit
                    try:
                        s = train(train_data, run, cfg, valid=valid, on_progress=watch)
                    except _Deadline:
                        state["stopped_by_budget"] = True
                        rec["state"] = "budget"
                        break
                    except (TrainingError, InsufficientMemoryError) as e:  # diverged, or too big to fit here: a bad
                        # region of the space (e.g. ffm_dim 8 on large tables), not a failed search
                        rec["state"], rec["error"] = "failed", str(e)[:200]
                        break
                    v = float(s.valid["logloss"]) if s.valid else math.nan
                    rec["valid_by_epoch"].append(v)
                    if not math.isfinite(v):
                        rec["state"] = "failed"
                        break
                    trial.report(v, epoch)
                    if v < best - 1e-6:
                        best, bad = v, 0
                    else:
                        bad += 1
                    if bad >= 1:
                        break
                    if trial.should_prune():
                        rec["state"] = "pruned"
                        break
                    if time.perf_counter() > deadline:
                        state["stopped_by_budget"] = True
                        rec["state"] = "budget"
                        break
                if rec["state"] == "running":
                    rec["state"] = "complete"
            finally:
                rec["seconds"] = time.perf_counter() - ts
                shutil.rmtree(run, ignore_errors=True)
                if on_trial:
                    on_trial(dict(rec))
            if rec["state"] == "budget":
                trial.study.stop()
            if not math.isfinite(best):
                if rec["state"] == "failed":
                    raise _Failed(rec.get("error", "no finite validation logloss"))
                raise optuna.TrialPruned()
            if rec["state"] in ("pruned", "budget"):  # cut short: its validated epochs still count below
                raise optuna.TrialPruned()
            return best

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")  # each epoch's trainer retraces by design; TF would warn every time
        study = optuna.create_study(
            direction="minimize", sampler=optuna.samplers.TPESampler(seed=options.seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=options.startup_trials, n_warmup_steps=0),
        )
        study.enqueue_trial(base_params(base, names))  # trial 0: the config tuned from, as it is
        study.optimize(objective, n_trials=options.trials, catch=(_Failed,),
                       timeout=None if math.isinf(deadline) else max(deadline - time.perf_counter(), 1e-3))
        rows = [results[k] for k in sorted(results)]
        scored = [(min(r["valid_by_epoch"]), r) for r in rows if r["valid_by_epoch"] and math.isfinite(min(r["valid_by_epoch"]))]
        if not scored:
            spent = time.perf_counter() - t0
            if state["stopped_by_budget"]:
                raise ConfigError(
                    f"--budget-minutes {options.budget_minutes:g} is too small for one trial: after {spent:.0f} s the first "
                    f"trial had not finished its first epoch on {data}. Give a larger budget (or train on fewer rows).")
            errors = "; ".join(sorted({r.get("error", r["state"]) for r in rows}))
            raise TrainingError(f"no trial produced a finite validation logloss ({errors}).")
        best_v, best_r = min(scored, key=lambda t: t[0])
        best_epochs = best_r["valid_by_epoch"].index(best_v) + 1
        best_config = config_with(base, best_r["params"], best_epochs).replace(seed=options.seed)

        stage = work / "out"
        stage.mkdir()
        summary = TuneSummary(
            out=str(out), model=base.model.kind, trials=len(rows), completed=sum(r["state"] == "complete" for r in rows),
            pruned=sum(r["state"] == "pruned" for r in rows), best_trial=best_r["trial"], best_valid_logloss=best_v,
            best_epochs=best_epochs, best_params=best_r["params"], best_config=str(out / "best_config.yaml"),
            seconds=time.perf_counter() - t0, budget_minutes=options.budget_minutes,
            stopped_by_budget=state["stopped_by_budget"], trial_table=rows,
        )
        _write_outputs(stage, summary, best_config, names)
        if out.exists():
            shutil.rmtree(out)
        replace_atomically(stage, out)
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)
        fsync_dir(out.parent)


class _Failed(CtrflowError):
    """A trial that produced nothing (diverged at once); Optuna records it as failed and goes on."""


def _write_outputs(stage: Path, summary: TuneSummary, best: TrainConfig, names: list[str]) -> None:
    import json

    import yaml

    (stage / "best_config.yaml").write_text(
        "# ctrflow tune: the best trial's TrainConfig; use it with `ctrflow train --config best_config.yaml`\n"
        + yaml.safe_dump(best.to_dict(), sort_keys=False))
    head = ["trial", "state", "best_valid_logloss", "epochs", "seconds", *names]
    lines = []
    for r in summary.trial_table:
        v = r["valid_by_epoch"]
        ok = [x for x in v if math.isfinite(x)]
        b = min(ok) if ok else math.nan
        lines.append([str(r["trial"]), r["state"], f"{b:.6f}", str(v.index(b) + 1 if ok else 0), f"{r['seconds']:.1f}",
                      *(_fmt(r["params"].get(n)) for n in names)])
    (stage / "trials.tsv").write_text("\t".join(head) + "\n" + "".join("\t".join(l) + "\n" for l in lines))
    md = [f"# ctrflow tune: {summary.model}, {summary.trials} trials ({summary.completed} complete, {summary.pruned} pruned)", "",
          f"Best: trial {summary.best_trial}, valid logloss {summary.best_valid_logloss:.6f} after {summary.best_epochs} epoch(s).", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(l) + " |" for l in lines]
    (stage / "trials.md").write_text("\n".join(md) + "\n")
    (stage / "summary.json").write_text(json.dumps(summary.to_dict(), indent=1, default=float))
    try:
        _plot(stage / "trials.png", summary, names)
    except Exception as e:  # matplotlib raises many types; the table has the same facts
        (stage / "trials.png.error.txt").write_text(f"{type(e).__name__}: {e}\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _plot(path: Path, summary: TuneSummary, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary.trial_table if any(math.isfinite(x) for x in r["valid_by_epoch"])]
    vals = [min(x for x in r["valid_by_epoch"] if math.isfinite(x)) for r in rows]
    colors = {"complete": "tab:blue", "pruned": "tab:gray", "budget": "tab:orange", "failed": "tab:red"}
    n = len(names)
    cols = min(n, 3)
    prow = -(-n // cols)
    fig = plt.figure(figsize=(10, 3.6 + 2.6 * prow), dpi=100)
    grid = fig.add_gridspec(1 + prow, cols, height_ratios=[1.4] + [1] * prow)
    ax = fig.add_subplot(grid[0, :])
    xs = [r["trial"] for r in rows]
    for r in rows:  # each trial's validated epochs, light, behind its best
        v = [x for x in r["valid_by_epoch"] if math.isfinite(x)]
        ax.plot([r["trial"]] * len(v), v, "_", color="tab:gray", alpha=0.6, markersize=10)
    ax.scatter(xs, vals, c=[colors.get(r["state"], "k") for r in rows], s=45, zorder=3)
    best_so_far = [min(vals[: i + 1]) for i in range(len(vals))]
    ax.step(xs, best_so_far, where="post", color="tab:green", label="best so far", marker=".")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("trial")
    ax.set_ylabel("best valid logloss")
    ax.set_title(f"{summary.model}: {summary.trials} trial(s)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    if len(xs) == 1:
        ax.set_xlim(xs[0] - 1, xs[0] + 1)
    for i, name in enumerate(names):
        a = fig.add_subplot(grid[1 + i // cols, i % cols])
        pv = [r["params"].get(name) for r in rows]
        a.scatter(pv, vals, c=[colors.get(r["state"], "k") for r in rows], s=30)
        a.scatter([summary.best_params.get(name)], [summary.best_valid_logloss], marker="*", s=160, c="tab:green", zorder=4)
        spec = SEARCH_SPACE[name]
        if isinstance(spec, tuple) and spec[2]:
            a.set_xscale("log")
            a.set_xlim(spec[0], spec[1])
        elif isinstance(spec, list):
            a.set_xscale("log", base=2)
            a.set_xticks(spec, [str(s) for s in spec])
        else:
            a.set_xlim(spec[0], spec[1])
        a.set_xlabel(name)
        a.grid(alpha=0.3)
    fig.suptitle("ctrflow tune: validation logloss per trial (dots: best epoch; dashes: every epoch; blue complete, gray pruned, "
                 "orange cut by the budget; * best)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
