"""Two-stage pair selection for FFM (in the spirit of AutoFIS, Liu et al. KDD 2020): stage 1 trains the
default FFM, whose pair weights r act as gates on every field pair; stage 2 retrains from scratch with
only the K pairs whose term moves the logit most, every other pair's r at exactly 0 (off: no gradient, not
in the logit, so exports and serving need nothing new; `FieldPairInteraction.weights_matrix`).

A pair's strength is the RMS over training rows of its term `r_ij <v_{i,j}, v_{j,i}>`, not |r|: r and
the vectors' scale trade off, and on the Zipf-mixture benchmark |r| ranks noise pairs beside the true
ones while the term's RMS puts the true ones first. Valid and test data never enter the choice.
Costs about twice a plain run (BENCHMARKS.md, "Two-stage pair selection").
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ctrflow.errors import ConfigError

__all__ = ["pair_term_rms", "select_top", "train_two_stage", "STAGE1_DIR", "SELECTION_FILE"]

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


def train_two_stage(data: Any, out: str | os.PathLike, config: Any, *, keep_pairs: int, valid: Any = None,
                    on_progress: Callable[..., Any] | None = None) -> Any:
    """Stage 1 into `out/stage1`, then stage 2 into `out` with only the `keep_pairs` strongest pairs (r
    starting at 1 there; starting at stage 1's r measured worse). Rerun to resume: a run folder with a
    checkpoint resumes stage 2 (its r already holds the zeros). Returns stage 2's TrainSummary."""
    from ctrflow.atomic import atomic_write_json
    from ctrflow.train.checkpoints import latest_checkpoint
    from ctrflow.train.loop import train

    if config.model.kind != "ffm":
        raise ConfigError(f"--ffm-select-pairs selects FFM's field pairs; this run trains {config.model.kind!r}. Use --model ffm.")
    if keep_pairs < 1:
        raise ConfigError(f"--ffm-select-pairs must keep at least 1 pair. Got {keep_pairs} instead.")
    if hasattr(data, "read") or str(data) == "-":
        raise ConfigError("--ffm-select-pairs reads the training data twice: give a shard folder, not a stream.")
    run = Path(out)
    if latest_checkpoint(run) is not None and (run / SELECTION_FILE).exists():  # resume stage 2 with its own pairs
        try:
            chosen = json.loads((run / SELECTION_FILE).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{run / SELECTION_FILE} cannot be read ({e}); start the two-stage run in a new folder.") from None
        pairs = tuple(tuple(p["pair"]) for p in chosen.get("kept", ()))
        return train(data, run, _with_pairs(config, pairs), valid=valid, on_progress=on_progress)
    first = train(data, run / STAGE1_DIR, config, valid=valid, on_progress=on_progress)
    strength, names = pair_term_rms(first.run, data)
    keep = select_top(strength, keep_pairs)
    iu = np.triu_indices(len(strength), 1)
    kept = sorted(({"pair": [names[i], names[j]], "term_rms": float(strength[i, j])} for i, j in zip(*iu) if keep[i, j]),
                  key=lambda p: -p["term_rms"])  # resumes read this order back: the run's recorded config must match
    atomic_write_json(run / SELECTION_FILE, {"stage1": str(first.run), "stage1_valid_logloss": first.best_valid_logloss,
                                             "pairs": int(len(iu[0])), "kept": kept})
    return train(data, run, _with_pairs(config, tuple(tuple(p["pair"]) for p in kept)), valid=valid, on_progress=on_progress)


def _with_pairs(config: Any, pairs: tuple[tuple[str, str], ...]) -> Any:
    """`config` whose FFM trains only `pairs` (ModelConfig.ffm_pairs: recorded in the run, so resumes, exports and
    warm starts rebuild the same model)."""
    from dataclasses import replace

    return config.replace(model=replace(config.model, ffm_pairs=pairs))
