"""The single-process training loop: compiled sparse steps over the input pipeline, Hogwild threads, and
exact resume. Everything around the steps (validation, early stopping, the best checkpoint, warm starts,
checks against a prior run, the run folder) is the trainer core's (`ctrflow.train.core`), shared with
the cluster loop.

A run folder (`RUN/`) holds:
    run.json            config, schema, transforms and feature spec (what export and serving need)
    checkpoints/        model + optimizer slots + loop position (`ctrflow.train.checkpoints`)
    holdout/            the train / validation split, when no validation data was given
    history.jsonl       one line per log interval / validation (examples, logloss, auc, ...)
    learning_curves.png train and validation logloss (and AUC) against examples seen
    tensorboard/        the same scalars for TensorBoard;  profile/  a profiler trace with `profile`
    summary.json        the final summary (what `--json` prints)

Resume: rerunning the same command on the same RUN restores the latest checkpoint and skips the batches
already trained in that epoch (the pipeline is deterministic per seed and epoch), so a crash costs at
most one checkpoint interval.
"""
from __future__ import annotations

import math
import os
import shutil
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ctrflow.data.batch import Batch, FeatureSpec
from ctrflow.data.pipeline import BatchStream, PipelineOptions, open_batches
from ctrflow.errors import TrainingError
from ctrflow.train import core
from ctrflow.train.checkpoints import RunCheckpoints, clean_partial_checkpoints, latest_checkpoint, make_counters, restore_latest
from ctrflow.train.config import TrainConfig
from ctrflow.train.core import (RUN_FILE, RunHistory, TrainSummary, build_model_from_run, init_output_bias, load_run_info,
                                training_step)

__all__ = ["TrainSummary", "train", "Trainer", "RUN_FILE", "RunHistory", "init_output_bias", "training_step", "load_run_info",
           "build_model_from_run", "restore_latest"]

ProgressFn = Callable[..., None]


def _configure_tf(config: TrainConfig) -> None:
    import tensorflow as tf

    tf.random.set_seed(config.seed)
    if config.deterministic:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TensorFlow already initialized in this process: op determinism still applies
            pass
        tf.config.experimental.enable_op_determinism()


class Trainer:
    """One process's training state: model, optimizers per group, loop counters and checkpoints (the
    run folder's layout), with its compiled step functions. Public so that tools above training
    (continuous training's row reset) can build the same state without training."""

    def __init__(self, run: Path, config: TrainConfig, spec: FeatureSpec) -> None:
        import tensorflow as tf

        from ctrflow.models.registry import make_model

        self.run, self.config, self.spec = run, config, spec
        self.model = make_model(config.model, spec)
        groups = self.model.variable_groups()
        group_of = {v.ref(): g for g, vs in groups.items() for v in vs}
        self.optimizer = core.make_optimizers(config, groups, lambda v: group_of[v.ref()])
        self.variables = self.model.trainable_variables
        self.optimizer.build(self.variables)
        self.counters = make_counters()
        for name, var in self.counters.items():
            setattr(self, name, var)
        self.checkpoints = RunCheckpoints(run, self.model, self.optimizer, self.counters, config.keep_checkpoints)
        self.ckpt, self.manager = self.checkpoints.ckpt, self.checkpoints.manager
        self.overhead_s = 0.0  # seconds in checkpoint writes (not training throughput)
        n_ids, n_num = len(spec.id_names), len(spec.numeric_names)
        sig = [tf.TensorSpec([None, n_ids], tf.int32), tf.TensorSpec([None, n_num], tf.float32),
               tf.TensorSpec([None], tf.float32), tf.TensorSpec([None], tf.float32)]
        sig_k = [tf.TensorSpec([None, *s.shape], s.dtype) for s in sig]
        self.train_step = tf.function(self._step, input_signature=sig, reduce_retracing=True)
        self.train_steps = tf.function(self._steps, input_signature=sig_k, reduce_retracing=True)
        self.predict = core.make_predict(self.model, spec, core.logit_correction(config.negative_sampling_rate))

    def _step(self, ids, numeric, label, weight):
        return training_step(self.model, self.optimizer, self.variables, ids, numeric, label, weight)

    def _steps(self, ids, numeric, label, weight):
        import tensorflow as tf

        k = tf.shape(ids)[0]
        losses = tf.TensorArray(tf.float32, size=k)
        for i in tf.range(k):
            losses = losses.write(i, self._step(ids[i], numeric[i], label[i], weight[i]))
        return losses.stack()

    def save(self) -> str:
        t0 = time.perf_counter()
        try:
            return self.checkpoints.save(int(self.step.numpy()))
        finally:
            self.overhead_s += time.perf_counter() - t0


def _weights(b: Batch) -> np.ndarray:
    return b.weight if b.weight is not None else np.ones(b.rows, np.float32)


def _check_batch(b: Batch, where: str) -> None:
    if not np.isfinite(b.numeric).all():
        raise TrainingError(f"{where}: NaN or inf in the numeric features; reconvert the data (the converter rejects them).")
    if b.weight is not None and not np.isfinite(b.weight).all():
        raise TrainingError(f"{where}: NaN or inf in the example weights.")


def train(
    data: str | os.PathLike | Sequence[str | os.PathLike] | Any,
    out: str | os.PathLike,
    config: TrainConfig = TrainConfig(),
    *,
    valid: str | os.PathLike | None = None,
    warm_start: str | os.PathLike | None = None,
    on_progress: ProgressFn | None = None,
    check_memory: bool = True,
) -> TrainSummary:
    """Train a model on shard folder(s) (or "-" / a binary stream) into the run folder `out`.

    Without `valid`, the latest `config.holdout_fraction` of a shard folder is held out for validation
    (the summary's `valid_source` says how). With validation, epochs run until early stopping (at most
    `config.max_epochs`) and the run ends on its best checkpoint. Rerunning on an existing `out` resumes
    from its latest checkpoint. `warm_start` initializes model (and, with the same optimizer settings,
    optimizer) state from another run's latest checkpoint (same schema and model shapes). Every check
    runs before anything is written, among them (unless `check_memory` is False) that the model's tables and
    optimizer slots fit in the memory available (`ctrflow.train.memory`): else a `ConfigError` says how to fit.

    Example:
        summary = ctrflow.train("shards/train", "runs/fm", TrainConfig(model=ModelConfig("fm")), valid="shards/test")
    """
    import tensorflow as tf

    _configure_tf(config)
    run = Path(out)
    is_stream = hasattr(data, "read") or str(data) == "-"
    opts = PipelineOptions(batch_size=config.batch_size, epochs=1, shuffle_buffer_rows=config.shuffle_buffer_rows, seed=config.seed)
    first: BatchStream | None = open_batches(data, opts)  # epoch 0's stream; also tells schema and spec
    new_folder = not run.exists()
    try:
        spec = first.spec
        info = core.run_info(first, config, data)
        core.check_prior_run(run, info, distributed=False)
        core.check_valid_data(valid, info)
        if check_memory:
            from ctrflow.train.memory import check_training_memory

            check_training_memory(config, spec)
        warm = core.check_warm_start(warm_start, info) if warm_start is not None and latest_checkpoint(run) is None else None
        source = core.resolve_validation(data, valid, config, run)
        if source.train is not data:
            first.close()
            first = None
        info["validation"] = {"source": source.source, "note": source.note,
                              "data": None if source.valid is None or hasattr(source.valid, "read") else str(source.valid)}
        core.write_run_info(run, info)
    except BaseException:
        if first is not None:
            first.close()
        if new_folder:  # refused or out of disk before run.json: leave no folder behind
            shutil.rmtree(run, ignore_errors=True)
        raise
    train_data = source.train
    max_epochs = config.max_epochs(source.valid is not None)

    clean_partial_checkpoints(run)
    trainer = Trainer(run, config, spec)
    resumed_from = trainer.checkpoints.restore_latest() or 0
    warm_from = None
    if not resumed_from and trainer.checkpoints.latest is None:
        if warm is not None:
            warm_from = core.apply_warm_start(warm.checkpoint, trainer.model, trainer.optimizer if warm.same_optimizer else None)
            core.init_id_remap(trainer.model, train_data, warm=warm.merge_remap)
        else:
            rows_src = first if first is not None else open_batches(train_data, PipelineOptions(batch_size=1, shuffle=False))
            init_output_bias(trainer.model, rows_src.positives, rows_src.rows, config.negative_sampling_rate)
            if rows_src is not first:
                rows_src.close()
            core.init_id_remap(trainer.model, train_data)

    runlog = RunHistory(run, resumed_from)
    history, record = runlog.entries, runlog.record
    rows_per_epoch = None
    if not is_stream:
        if first is not None:
            rows_per_epoch = first.rows
        else:
            with open_batches(train_data, PipelineOptions(batch_size=1, shuffle=False)) as peek:
                rows_per_epoch = peek.rows
    total_examples = None if rows_per_epoch is None else (rows_per_epoch or 0) * max_epochs
    if config.max_steps:
        total_examples = min(total_examples or 1 << 62, config.max_steps * config.batch_size)
    t0 = time.perf_counter()
    start_examples = int(trainer.examples.numpy())
    window_loss, window_rows = 0.0, 0
    running = math.nan
    validation = core.Validation(source.valid, config, trainer.checkpoints, trainer.predict, record, t0)
    profiling = False

    def validate() -> None:
        validation(int(trainer.step.numpy()), int(trainer.epoch.numpy()))

    def after_steps(losses: np.ndarray, rows: int) -> bool:
        """Bookkeeping after one or more steps. Returns True to stop."""
        nonlocal window_loss, window_rows, running, profiling
        if not np.all(np.isfinite(losses)):
            raise TrainingError(
                f"the loss became {losses[~np.isfinite(losses)][0]} at step {int(trainer.step.numpy()) + 1}; training stopped. "
                f"The last good checkpoint {trainer.checkpoints.latest} is kept (nothing was saved after the "
                "divergence). Lower the learning rate or check the data."
            )
        k = len(losses)
        before = int(trainer.step.numpy())
        trainer.step.assign_add(k)
        trainer.batch_in_epoch.assign_add(k)
        trainer.examples.assign_add(rows)
        step = before + k
        window_loss += float(losses.sum()) * (rows / k)
        window_rows += rows
        running = float(losses.mean()) if math.isnan(running) else 0.98 * running + 0.02 * float(losses.mean())
        if on_progress:
            on_progress(int(trainer.examples.numpy()), total_examples, logloss=running)
        if config.profile and not profiling and step >= 5 and step < 10:
            tf.profiler.experimental.start(str(run / "profile"))
            profiling = True
        elif profiling and step >= 25:
            tf.profiler.experimental.stop()
            profiling = False
        if before // config.log_every_steps != step // config.log_every_steps:
            record({"kind": "train", "step": step, "examples": int(trainer.examples.numpy()), "epoch": int(trainer.epoch.numpy()),
                    "seconds": time.perf_counter() - t0, "logloss": window_loss / max(window_rows, 1)})
            window_loss, window_rows = 0.0, 0
        if config.valid_every_steps and before // config.valid_every_steps != step // config.valid_every_steps:
            validate()
        if before // config.checkpoint_every_steps != step // config.checkpoint_every_steps:
            trainer.save()
        return validation.stop or bool(config.max_steps and step >= config.max_steps)

    def epoch_batches(e: int, stream: BatchStream) -> Iterator[Batch]:
        it: Iterator[Batch] = iter(stream)
        if config.negative_sampling_rate < 1.0:
            it = core.sample_negatives(it, config.negative_sampling_rate, config.seed * 1_000_003 + 7919 * e + 1, config.batch_size)
        return it

    stopped_early = restored = False
    try:
        epoch = int(trainer.epoch.numpy())
        while epoch < max_epochs and not (validation.enabled and int(trainer.bad_validations.numpy()) >= config.early_stopping_patience > 0):
            if epoch == 0 and first is not None:
                stream, first = first, None
            else:
                if first is not None:
                    first.close()
                    first = None
                if is_stream:  # a stream is read once
                    break
                stream = open_batches(train_data, PipelineOptions(**{**asdict(opts), "seed": config.seed + 7919 * epoch}))
            with stream:
                it = epoch_batches(epoch, stream)
                for _ in range(int(trainer.batch_in_epoch.numpy())):  # resume mid-epoch: replay this epoch's order
                    if next(it, None) is None:
                        break
                run_steps = _hogwild if config.hogwild_threads > 1 else _single
                stop = run_steps(trainer, it, config, after_steps)
            if stop:
                if not validation.stop and not config.valid_every_steps:
                    validate()  # max_steps reached: the end of training is a validation point
                break
            epoch += 1
            trainer.epoch.assign(epoch)
            trainer.batch_in_epoch.assign(0)
            if not config.valid_every_steps:
                validate()
            trainer.save()
            if validation.stop:
                break
        if first is not None:
            first.close()
        stopped_early = validation.stop
        step = int(trainer.step.numpy())
        if step != core.ckpt_step(trainer.checkpoints):
            trainer.save()
        restored = validation.finish(step)
        from ctrflow.train.refit import refit_after_training

        refit = refit_after_training(trainer.model, trainer.checkpoints, train_data, source.valid, config, step=step, examples=int(trainer.examples.numpy()),
                                     record=record, predict=trainer.predict, optimizer=trainer.optimizer)
        if refit and refit.get("valid"):
            validation.last = refit["valid"]  # the summary's metrics are the final model's
        latest = trainer.checkpoints.latest
    finally:
        if profiling:
            tf.profiler.experimental.stop()
        runlog.close(best_step=trainer.checkpoints.best_step)
    return core.finish_run(run, trainer.counters, history, seconds=time.perf_counter() - t0,
                           overhead_s=trainer.overhead_s + validation.seconds, start_examples=start_examples,
                           steps=int(trainer.step.numpy()), running_logloss=running, validation=validation, source=source,
                           stopped_early=stopped_early, resumed_from=resumed_from, warm_from=warm_from, checkpoint=latest,
                           restored_best=restored, config=config, refit=refit)


def _single(trainer: Trainer, it: Iterator[Batch], config: TrainConfig, after: Callable[[np.ndarray, int], bool]) -> bool:
    k = config.steps_per_call
    pending: list[Batch] = []
    for b in it:
        _check_batch(b, f"batch {int(trainer.step.numpy()) + len(pending) + 1}")
        if k == 1 or b.rows != config.batch_size:
            for p in [*pending, b]:  # flush: short (last) batches go one by one
                loss = trainer.train_step(p.ids, p.numeric, p.label, _weights(p)).numpy()
                if after(np.array([loss]), p.rows):
                    return True
            pending = []
            continue
        pending.append(b)
        if len(pending) == k:
            losses = trainer.train_steps(np.stack([p.ids for p in pending]), np.stack([p.numeric for p in pending]),
                                         np.stack([p.label for p in pending]), np.stack([_weights(p) for p in pending])).numpy()
            rows = sum(p.rows for p in pending)
            pending = []
            if after(losses, rows):
                return True
    for p in pending:
        loss = trainer.train_step(p.ids, p.numeric, p.label, _weights(p)).numpy()
        if after(np.array([loss]), p.rows):
            return True
    return False


def _hogwild(trainer: Trainer, it: Iterator[Batch], config: TrainConfig, after: Callable[[np.ndarray, int], bool]) -> bool:
    """Several threads run steps on the shared variables without locks (Hogwild!); bookkeeping is locked."""
    take, book = threading.Lock(), threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            while not stop.is_set():
                with take:
                    b = next(it, None)
                if b is None:
                    return
                _check_batch(b, "batch")
                loss = trainer.train_step(b.ids, b.numeric, b.label, _weights(b)).numpy()
                with book:
                    if after(np.array([loss]), b.rows):
                        stop.set()
        except BaseException as e:  # re-raised in the calling thread
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=work, name=f"hogwild-{i}") for i in range(config.hogwild_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return stop.is_set()
