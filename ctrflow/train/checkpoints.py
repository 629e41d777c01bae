"""The checkpoint layout of a run folder, one for the single-process and the cluster loop.

    RUN/checkpoints/ckpt-N.*       model + optimizer slots + loop counters (tf.train.CheckpointManager)
    RUN/checkpoints/ckpt-best-N.*  the final state when training ended on its best validation (restore_best)
    RUN/checkpoints/best/best-N.*  the model (only) at its best validation so far
    RUN/checkpoints/ckpt-refit-N.* the final state with the per-id weights refitted (`TrainConfig.refit`)

The loop counters (`step`, `epoch`, `batch_in_epoch`, `examples`, `best`, `bad_validations`) are variables
saved with the model, so a resumed run knows where it was. TensorFlow writes a checkpoint's files under
`ckpt-N_temp` and the `checkpoint` index last, so a checkpoint cut short by a crash is never the one
picked up; `clean_partial_checkpoints` removes such leftovers on the next run.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

from ctrflow.errors import CheckpointError, ConfigError, TrainingError

__all__ = ["CHECKPOINTS", "RunCheckpoints", "make_counters", "restore_latest", "latest_checkpoint", "checkpoint_step",
           "clean_partial_checkpoints", "read_checkpoint"]

CHECKPOINTS = "checkpoints"
REFIT_NAME = "ckpt-refit"  # the refit weights' checkpoint (ctrflow.train.refit), the run's latest when written
COUNTERS = ("step", "epoch", "batch_in_epoch", "examples", "best", "bad_validations")


def make_counters() -> dict[str, Any]:
    """The loop counters, made in the current scope (a strategy's, on a cluster)."""
    import tensorflow as tf

    ints = {name: tf.Variable(0, dtype=tf.int64, trainable=False, name=f"loop_{name}")
            for name in ("step", "epoch", "batch_in_epoch", "examples", "bad_validations")}
    return {**ints, "best": tf.Variable(math.inf, dtype=tf.float64, trainable=False, name="loop_best_valid")}


def latest_checkpoint(run: str | os.PathLike) -> str | None:
    import tensorflow as tf

    return tf.train.latest_checkpoint(str(Path(run) / CHECKPOINTS))


def checkpoint_step(path: str | None) -> int:
    """The step number a checkpoint path ends with; -1 for None."""
    return int(path.rsplit("-", 1)[-1]) if path else -1


def restore_latest(run: str | os.PathLike, model: Any) -> str:
    """Restore a run's latest checkpoint into `model` (model variables only). Returns the checkpoint path."""
    import tensorflow as tf

    latest = latest_checkpoint(run)
    if latest is None:
        raise TrainingError(f"{run}: no checkpoint to restore (checkpoints/ is empty).")
    read_checkpoint(latest, lambda: tf.train.Checkpoint(model=model).read(latest).expect_partial())
    return latest


def _damage(path: str) -> str:
    """What is wrong with checkpoint `path`'s files, in words: its index or a data shard missing, else damaged."""
    import glob

    if not os.path.exists(path + ".index"):
        return f"its index file {Path(path).name}.index is missing"
    shards = sorted(glob.glob(glob.escape(path) + ".data-?????-of-?????"))
    if not shards:
        return f"its data file {Path(path).name}.data-00000-of-00001 is missing"
    total = int(shards[0].rsplit("-of-", 1)[1])
    missing = [f"{Path(path).name}.data-{i:05d}-of-{total:05d}" for i in range(total)
               if not os.path.exists(f"{path}.data-{i:05d}-of-{total:05d}")]
    if missing:
        return f"its data file{'s' if len(missing) > 1 else ''} {', '.join(missing)} {'are' if len(missing) > 1 else 'is'} missing"
    return "a file of it is truncated or damaged"


def read_checkpoint(path: str, read: Any) -> Any:
    """`read()` (a restore of checkpoint `path`), with a missing or damaged checkpoint file as one
    `CheckpointError` naming the checkpoint and the file: TensorFlow raises an OpError for a missing file and
    an IndexError ("Read less bytes than requested") for a truncated one."""
    import tensorflow as tf

    try:
        return read()
    except (tf.errors.OpError, IndexError) as e:
        if isinstance(e, tf.errors.UnavailableError):  # a cluster task is gone: the caller names it
            raise
        detail = (getattr(e, "message", None) or str(e) or type(e).__name__).strip().splitlines()[0][:200]
        raise CheckpointError(f"cannot read checkpoint {path}: {_damage(path)} ({detail}). Restore the run folder's "
                              "checkpoints/ from a copy, or train again.") from None


def clean_partial_checkpoints(run: str | os.PathLike) -> list[str]:
    """Remove the `*_temp*` folders and files a process killed while saving left in RUN/checkpoints."""
    removed = []
    for folder in (Path(run) / CHECKPOINTS, Path(run) / CHECKPOINTS / "best"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if "_temp" in p.name or p.name.startswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p.name)
    return removed


class RunCheckpoints:
    """Save, restore and keep the best of one run's training state (see the module docstring)."""

    def __init__(self, run: Path, model: Any, optimizer: Any, counters: dict[str, Any], keep: int) -> None:
        import tensorflow as tf

        self.run, self.model, self.counters = run, model, counters
        self.ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, **counters)
        self.manager = tf.train.CheckpointManager(self.ckpt, str(run / CHECKPOINTS), max_to_keep=keep)
        self._best = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), str(run / CHECKPOINTS / "best"),
                                                max_to_keep=1, checkpoint_name="best")
        self._keep = keep

    @property
    def latest(self) -> str | None:
        return self.manager.latest_checkpoint

    def restore_latest(self) -> int | None:
        """Restore the latest checkpoint (a resume); its step, or None when there is none."""
        if not self.latest:
            return None
        try:
            read_checkpoint(self.latest, lambda: self.ckpt.restore(self.latest).assert_existing_objects_matched())
        except (AssertionError, ValueError) as e:
            raise ConfigError(f"{self.latest} does not match this model and optimizer ({str(e).strip()[:300]}): resume "
                              "with the run's own settings, or use a new run folder.") from None
        return int(self.counters["step"].numpy())

    def save(self, step: int) -> str:
        return self._save(lambda: self.manager.save(checkpoint_number=step), step)

    def save_best(self, step: int) -> str:
        """The model alone, at a validation that improved on every earlier one."""
        return self._save(lambda: self._best.save(checkpoint_number=step), step)

    @property
    def best_step(self) -> int:
        return checkpoint_step(self._best.latest_checkpoint)

    def restore_best(self, step: int) -> str | None:
        """End on the best validation: its model with the final counters and optimizer state, saved as
        `ckpt-best-<step>` (the run's latest checkpoint). None when the model is the best already."""
        import tensorflow as tf

        best = self._best.latest_checkpoint
        if best is None or checkpoint_step(best) == step:
            return None
        if self.latest and Path(self.latest).name in (f"ckpt-best-{step}", f"{REFIT_NAME}-{step}"):  # a rerun of a finished run
            return self.latest
        tf.train.Checkpoint(model=self.model).read(best).assert_existing_objects_matched().expect_partial()
        final = tf.train.CheckpointManager(self.ckpt, str(self.run / CHECKPOINTS), max_to_keep=self._keep,
                                           checkpoint_name="ckpt-best")
        path = self._save(lambda: final.save(checkpoint_number=step), step)
        self.manager = final  # the run's latest checkpoint now
        return path

    def save_refit(self, step: int) -> str:
        """The refit model (`ctrflow.train.refit`) with the final counters and optimizer state, saved as
        `ckpt-refit-<step>`: the run's latest checkpoint (TensorFlow writes it under a temporary name and the
        index last, so a crash leaves the previous latest one)."""
        import tensorflow as tf

        final = tf.train.CheckpointManager(self.ckpt, str(self.run / CHECKPOINTS), max_to_keep=self._keep,
                                           checkpoint_name=REFIT_NAME)
        path = self._save(lambda: final.save(checkpoint_number=step), step)
        self.manager = final
        return path

    def refit_done(self, step: int) -> bool:
        """The latest checkpoint is the refit of step `step` (a rerun of a finished run)."""
        return bool(self.latest) and Path(self.latest).name == f"{REFIT_NAME}-{step}"

    def _save(self, write: Any, step: int) -> str:
        import tensorflow as tf

        try:
            return write()
        except (OSError, tf.errors.OpError) as e:
            if isinstance(e, tf.errors.UnavailableError):  # a cluster task is gone: the caller names it
                raise
            msg = getattr(e, "message", None) or str(e)
            raise TrainingError(f"checkpoint at step {step} failed ({msg.strip()[:300]}); the last good checkpoint "
                                f"{self.latest} is kept. Free disk space and rerun to resume.") from None
