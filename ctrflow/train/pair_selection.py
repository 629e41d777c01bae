"""Two-stage pair selection for FFM (in the spirit of AutoFIS, Liu et al. KDD 2020): stage 1 trains the
default FFM, whose pair weights r act as gates on every field pair; stage 2 retrains from scratch with
only the K pairs whose term moves the logit most, every other pair's r at exactly 0 (off: no gradient, not
in the logit, so exports and serving need nothing new; `FieldPairInteraction.weights_matrix`).

A pair's strength is the RMS over training rows of its term `r_ij <v_{i,j}, v_{j,i}>`, not |r|: r and
the vectors' scale trade off, and on the Zipf-mixture benchmark |r| ranks noise pairs beside the true
ones while the term's RMS puts the true ones first. Valid and test data never enter the choice.
Costs about twice a plain run (BENCHMARKS.md, "Two-stage pair selection").

`--cross-select K` uses the same stage 1 to choose the K pairs that stage 2 memorizes with hashed cross features
(ctrflow.models.cross), on any model kind (BENCHMARKS.md, "Hashed crosses of the selected pairs").
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ctrflow.errors import ConfigError

__all__ = ["pair_term_rms", "select_top", "crossable", "train_two_stage", "STAGE1_DIR", "SELECTION_FILE"]

STAGE1_DIR = "stage1"  # stage 1's run folder, inside the final run folder
SELECTION_FILE = "pair_selection.json"  # what stage 2 kept, and why


def pair_term_rms(run: str | os.PathLike, data: Any, rows: int = 65_536) -> tuple[np.ndarray, list[str]]:
    """`[S, S]` (upper triangle): the RMS of each pair's term over the first `rows` rows of `data`, for the
    FFM of `run`'s latest checkpoint; and the S field names in the model's order."""
    from ctrflow.data.pipeline import PipelineOptions, open_batches
    from ctrflow.train.checkpoints import restore_latest
    from ctrflow.train.core import build_model_from_run, load_run_info

    model = build_model_from_run(load_run_info(run))
    restore_latest(run, model)
    total, seen = 0.0, 0
    with open_batches(data, PipelineOptions(batch_size=8192, shuffle=False)) as batches:
        for b in batches:
            t = model.pair_terms(b.ids, b.numeric).numpy().astype(np.float64)
            total, seen = total + (t * t).sum(axis=0), seen + len(t)
            if seen >= rows:
                break
    n = model.layout.n_fields
    out = np.zeros((n, n))
    out[np.triu_indices(n, 1)] = np.sqrt(total / max(seen, 1))
    return out, list(model.layout.id_names) + list(model.layout.numeric_names)


def select_top(strength: np.ndarray, k: int) -> np.ndarray:
    """Boolean `[S, S]` (upper triangle): the `k` pairs of largest strength (ties: the earlier pair)."""
    iu = np.triu_indices(strength.shape[0], 1)
    keep = np.zeros(len(iu[0]), bool)
    keep[np.argsort(-np.abs(strength[iu]), kind="stable")[:k]] = True
    out = np.zeros(strength.shape, bool)
    out[iu] = keep
    return out


def crossable(names: list[str], n_id_fields: int) -> np.ndarray:
    """Boolean `[S, S]`: the pairs a hashed cross can take (not two normalized numerics; ctrflow.models.cross)."""
    n = len(names)
    ok = np.ones((n, n), bool)
    ok[n_id_fields:, n_id_fields:] = False
    return ok


def train_two_stage(data: Any, out: str | os.PathLike, config: Any, *, keep_pairs: int | None = None,
                    cross_pairs: int | None = None, valid: Any = None, on_progress: Callable[..., Any] | None = None) -> Any:
    """Stage 1 (the default FFM) into `out/stage1`, then stage 2 (`config`'s model) into `out`, from scratch:
    - `keep_pairs` K (`--ffm-select-pairs`, FFM only): its FFM keeps only the K strongest pairs (r starting at 1
      there; starting at stage 1's r measured worse);
    - `cross_pairs` K (`--cross-select`, any model): hashed cross features of the K strongest pairs a cross can
      take (`ModelConfig.cross_pairs`) are added to its logit — the memorized full table of each chosen pair
      that FFM's low-rank vectors cannot fit. Stage 1 is an FFM whatever `config`'s kind (an LR + crosses run
      picks its pairs from an FFM).
    Rerun to resume: a run folder with a checkpoint resumes stage 2 with the pairs it recorded. Returns stage
    2's TrainSummary."""
    from dataclasses import replace

    from ctrflow.atomic import atomic_write_json
    from ctrflow.train.checkpoints import latest_checkpoint
    from ctrflow.train.loop import train

    flag = "--ffm-select-pairs" if keep_pairs is not None else "--cross-select"
    if keep_pairs is None and cross_pairs is None:
        raise ConfigError("train_two_stage needs keep_pairs (--ffm-select-pairs K) or cross_pairs (--cross-select K).")
    if keep_pairs is not None and config.model.kind != "ffm":
        raise ConfigError(f"--ffm-select-pairs selects FFM's field pairs; this run trains {config.model.kind!r}. Use --model ffm.")
    for name, k in (("--ffm-select-pairs", keep_pairs), ("--cross-select", cross_pairs)):
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"{name} must keep at least 1 pair. Got {k!r} instead.")
    if cross_pairs is not None and config.model.cross_pairs:
        raise ConfigError("--cross-select chooses the crossed pairs itself: drop --cross-pairs (or cross_pairs in the config).")
    if hasattr(data, "read") or str(data) == "-":
        raise ConfigError(f"{flag} reads the training data twice: give a shard folder, not a stream.")
    run = Path(out)
    if latest_checkpoint(run) is not None and (run / SELECTION_FILE).exists():  # resume stage 2 with its own pairs
        try:
            chosen = json.loads((run / SELECTION_FILE).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{run / SELECTION_FILE} cannot be read ({e}); start the two-stage run in a new folder.") from None
        for name, key, k in (("--ffm-select-pairs", "ffm_select_pairs", keep_pairs), ("--cross-select", "cross_select", cross_pairs)):
            if k is not None and key in chosen and chosen[key] != k:  # (records of older runs lack the K)
                raise ConfigError(f"{run} selected its pairs with {name} {chosen[key]}; this run asks for {k}. "
                                  f"Resume with {name} {chosen[key]}, or start the two-stage run in a new folder.")
        return train(data, run, _stage2(config, chosen, keep_pairs, cross_pairs), valid=valid, on_progress=on_progress)
    stage1 = config if config.model.kind == "ffm" and not config.model.cross_pairs else \
        config.replace(model=replace(config.model, kind="ffm", cross_pairs=()))
    stage1 = stage1.replace(refit=False)  # stage 1 only ranks pairs by its FFM terms, which a refit does not touch
    first = train(data, run / STAGE1_DIR, stage1, valid=valid, on_progress=on_progress)
    strength, names = pair_term_rms(first.run, data)
    from ctrflow.train.core import build_model_from_run, load_run_info

    n_ids = build_model_from_run(load_run_info(first.run)).layout.n_id_fields
    iu = np.triu_indices(len(strength), 1)

    def ranked(keep: np.ndarray) -> list[dict]:  # resumes read this order back: the run's recorded config must match
        return sorted(({"pair": [names[i], names[j]], "term_rms": float(strength[i, j])} for i, j in zip(*iu) if keep[i, j]),
                      key=lambda p: -p["term_rms"])

    record = {"stage1": str(first.run), "stage1_valid_logloss": first.best_valid_logloss, "pairs": int(len(iu[0])),
              **({"ffm_select_pairs": keep_pairs} if keep_pairs is not None else {}),
              **({"cross_select": cross_pairs} if cross_pairs is not None else {})}
    if keep_pairs is not None:
        record["kept"] = ranked(select_top(strength, keep_pairs))
    if cross_pairs is not None:
        ok = crossable(names, n_ids)
        record["crossed"] = ranked(select_top(np.where(ok, strength, 0.0), cross_pairs) & ok)
    atomic_write_json(run / SELECTION_FILE, record)
    return train(data, run, _stage2(config, record, keep_pairs, cross_pairs), valid=valid, on_progress=on_progress)


def _stage2(config: Any, record: dict, keep_pairs: int | None, cross_pairs: int | None) -> Any:
    """`config` with the recorded pairs: ModelConfig.ffm_pairs (FFM trains only those) and / or cross_pairs (crossed),
    recorded in the run, so resumes, exports and warm starts rebuild the same model."""
    from dataclasses import replace

    missing = [flag for flag, key, k in (("--ffm-select-pairs", "kept", keep_pairs), ("--cross-select", "crossed", cross_pairs))
               if k is not None and key not in record]
    if missing:  # a resume with another selection flag than the run's: its record does not say which pairs
        raise ConfigError(f"this run folder's {SELECTION_FILE} was written without {missing[0]}: rerun it with the flags it "
                          f"was started with, or use a new folder.")
    changes = {}
    if keep_pairs is not None:
        changes["ffm_pairs"] = tuple(tuple(p["pair"]) for p in record.get("kept", ()))
    if cross_pairs is not None:
        changes["cross_pairs"] = tuple(tuple(p["pair"]) for p in record.get("crossed", ()))
    return config.replace(model=replace(config.model, **changes))
