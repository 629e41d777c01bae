"""The training loop: compiled sparse steps over the input pipeline, with validation, early stopping,
checkpoints that survive kill -9, warm starts, Hogwild threads and a run folder that explains itself.

A run folder (`RUN/`) holds:
    run.json            config, schema, transforms and feature spec (what export and serving need)
    checkpoints/        tf.train.CheckpointManager: model + optimizer slots + loop position
    history.jsonl       one line per log interval / validation (examples, logloss, auc, ...)
    learning_curves.png train and validation logloss (and AUC) against examples seen
    tensorboard/        the same scalars for TensorBoard;  profile/  a profiler trace with `profile`
    summary.json        the final summary (what `--json` prints)

Resume: rerunning the same command on the same RUN restores the latest checkpoint and skips the batches
already trained in that epoch (the pipeline is deterministic per seed and epoch), so a crash costs at
most one checkpoint interval. TensorFlow writes the `checkpoint` index file last, so a checkpoint cut
short by a crash is never the one picked up.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ctrflow.data.batch import Batch, FeatureSpec
from ctrflow.data.pipeline import BatchStream, PipelineOptions, open_batches
from ctrflow.errors import ConfigError, SchemaError, TrainingError
from ctrflow.train.config import OPTIMIZER_GROUPS, TrainConfig

__all__ = ["TrainSummary", "train", "RUN_FILE", "RunHistory", "finish_run", "init_output_bias", "training_step", "load_run_info", "build_model_from_run",
           "restore_latest"]

RUN_FILE = "run.json"
ProgressFn = Callable[..., None]


@dataclass
class TrainSummary:
    run: str
    steps: int
    examples: int
    seconds: float
    examples_per_s: float  # training throughput: wall time minus validation and checkpoint writes
    train_logloss: float
    valid: dict[str, Any] | None
    best_valid_logloss: float | None
    stopped_early: bool
    resumed_from_step: int
    warm_started_from: str | None
    checkpoint: str | None
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("history")
        return d


class RunHistory:
    """A run folder's `history.jsonl` and TensorBoard scalars. Opening it for a resumed run keeps only
    the lines the restored checkpoint had seen: the steps after it are redone and recorded again."""

    def __init__(self, run: Path, resumed_from_step: int) -> None:
        import tensorflow as tf

        self.path = run / "history.jsonl"
        self.entries: list[dict[str, Any]] = []
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            self.entries = [h for h in map(json.loads, lines) if h["step"] <= resumed_from_step]
            self.path.write_text("".join(json.dumps(h) + "\n" for h in self.entries))
        self._file = open(self.path, "a")
        self._writer = tf.summary.create_file_writer(str(run / "tensorboard"))

    def record(self, entry: dict[str, Any]) -> None:
        import tensorflow as tf

        self.entries.append(entry)
        self._file.write(json.dumps(entry, default=float) + "\n")
        self._file.flush()
        with self._writer.as_default(step=entry["examples"]):
            for k, v in entry.items():
                if k not in ("kind", "step", "examples", "epoch", "seconds") and isinstance(v, (int, float)):
                    tf.summary.scalar(f"{entry['kind']}/{k}", v)

    def close(self) -> None:
        """Close the files and draw learning_curves.png (a failed plot never hides training's outcome)."""
        self._file.close()
        self._writer.close()
        try:
            _plot_curves(self.path.parent, self.entries)
        except Exception:  # matplotlib raises many types; the PNG is a convenience
            pass


def init_output_bias(model: Any, positives: float | None, rows: int | None) -> None:
    """Start the output bias at the data's base rate: from logit 0 (p = 0.5) a 1% CTR takes hundreds of
    steps just to reach calibration, which on small data is most of the training."""
    if positives is not None and rows:
        rate = min(max(positives / rows, 1e-6), 1 - 1e-6)
        model.linear.bias.assign(math.log(rate / (1 - rate)))



def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, path)


def load_run_info(run: str | os.PathLike) -> dict[str, Any]:
    p = Path(run) / RUN_FILE
    if not p.exists():
        raise ConfigError(f"{run}: not a training run folder (no {RUN_FILE}).")
    return json.loads(p.read_text())


def build_model_from_run(info: dict[str, Any]):
    """The model of a run, built (variables created), not yet restored."""
    from ctrflow.models.registry import ModelConfig, make_model

    config = TrainConfig.from_dict(info["config"])
    return make_model(config.model if isinstance(config.model, ModelConfig) else ModelConfig.from_dict(config.model),
                      FeatureSpec.from_dict(info["feature_spec"]))


def restore_latest(run: str | os.PathLike, model: Any) -> str:
    """Restore a run's latest checkpoint into `model` (model variables only). Returns the checkpoint path."""
    import tensorflow as tf

    ckpt_dir = Path(run) / "checkpoints"
    latest = tf.train.latest_checkpoint(str(ckpt_dir))
    if latest is None:
        raise TrainingError(f"{run}: no checkpoint to restore (checkpoints/ is empty).")
    tf.train.Checkpoint(model=model).read(latest).expect_partial()
    return latest


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


def _make_optimizer(config: TrainConfig, model: Any):
    from ctrflow.train.optimizers import OptimizerGroups, make_optimizer

    groups = model.variable_groups()
    group_of = {v.ref(): g for g, vs in groups.items() for v in vs}
    optimizers = {}
    for g in OPTIMIZER_GROUPS:
        if groups.get(g):
            spec = config.group_optimizer(g)
            optimizers[g] = make_optimizer(spec.name, learning_rate=spec.learning_rate, l2=config.l2, **spec.extra)
    return OptimizerGroups(optimizers, assign=lambda v: group_of[v.ref()])


def training_step(model: Any, optimizer: Any, variables: Sequence[Any], ids, numeric, label, weight):
    """One weighted-logloss step (traced inside a tf.function): the same math for every training loop."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        logits = model(ids, numeric, training=True)
        per_row = tf.nn.sigmoid_cross_entropy_with_logits(labels=label, logits=logits)
        loss = tf.reduce_sum(per_row * weight) / tf.maximum(tf.reduce_sum(weight), 1e-12)
    grads = tape.gradient(loss, variables)
    optimizer.apply_gradients(zip(grads, variables))
    return loss


class _Trainer:
    """One training run's state and compiled functions."""

    def __init__(self, run: Path, config: TrainConfig, spec: FeatureSpec) -> None:
        import tensorflow as tf

        from ctrflow.models.registry import make_model

        self.run, self.config, self.spec = run, config, spec
        self.model = make_model(config.model, spec)
        self.optimizer = _make_optimizer(config, self.model)
        self.variables = self.model.trainable_variables
        self.optimizer.build(self.variables)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="loop_step")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="loop_epoch")
        self.batch_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="loop_batch_in_epoch")
        self.examples = tf.Variable(0, dtype=tf.int64, trainable=False, name="loop_examples")
        self.best = tf.Variable(math.inf, dtype=tf.float64, trainable=False, name="loop_best_valid")
        self.bad_validations = tf.Variable(0, dtype=tf.int64, trainable=False, name="loop_bad_validations")
        self.ckpt = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self.step, epoch=self.epoch,
                                        batch_in_epoch=self.batch_in_epoch, examples=self.examples, best=self.best,
                                        bad_validations=self.bad_validations)
        self.overhead_s = 0.0  # seconds in checkpoint writes and validation (not training throughput)
        self.manager = tf.train.CheckpointManager(self.ckpt, str(run / "checkpoints"), max_to_keep=config.keep_checkpoints)
        n_ids, n_num = len(spec.id_names), len(spec.numeric_names)
        sig = [tf.TensorSpec([None, n_ids], tf.int32), tf.TensorSpec([None, n_num], tf.float32),
               tf.TensorSpec([None], tf.float32), tf.TensorSpec([None], tf.float32)]
        sig_k = [tf.TensorSpec([None, *s.shape], s.dtype) for s in sig]
        self.train_step = tf.function(self._step, input_signature=sig, reduce_retracing=True)
        self.train_steps = tf.function(self._steps, input_signature=sig_k, reduce_retracing=True)
        self.predict = tf.function(lambda ids, numeric: tf.sigmoid(self.model(ids, numeric, training=False)),
                                   input_signature=sig[:2])

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
        import tensorflow as tf

        t0 = time.perf_counter()
        try:
            return self.manager.save(checkpoint_number=int(self.step.numpy()))
        except (OSError, tf.errors.OpError) as e:
            msg = getattr(e, "message", None) or str(e)
            raise TrainingError(
                f"checkpoint at step {int(self.step.numpy())} failed ({msg.strip()[:300]}); "
                f"the last good checkpoint {self.manager.latest_checkpoint} is kept. Free disk space and rerun to resume."
            ) from None
        finally:
            self.overhead_s += time.perf_counter() - t0


def _weights(b: Batch) -> np.ndarray:
    return b.weight if b.weight is not None else np.ones(b.rows, np.float32)


def _check_batch(b: Batch, where: str) -> None:
    if not np.isfinite(b.numeric).all():
        raise TrainingError(f"{where}: NaN or inf in the numeric features; reconvert the data (the converter rejects them).")
    if b.weight is not None and not np.isfinite(b.weight).all():
        raise TrainingError(f"{where}: NaN or inf in the example weights.")


def _evaluate_stream(trainer: _Trainer, batches: BatchStream) -> dict[str, Any]:
    from ctrflow.train.metrics import MetricsAccumulator

    acc = MetricsAccumulator()
    for b in batches:
        p = trainer.predict(b.ids, b.numeric).numpy()
        acc.add(b.label, p, b.weight)
    return acc.result()


def _plot_curves(run: Path, history: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [h for h in history if h["kind"] == "train"]
    va = [h for h in history if h["kind"] == "valid"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if tr:
        ax.plot([h["examples"] for h in tr], [h["logloss"] for h in tr], label="train logloss (interval mean)", color="tab:blue")
    if va:
        ax.plot([h["examples"] for h in va], [h["logloss"] for h in va], "o-", label="valid logloss", color="tab:orange")
        ax2 = ax.twinx()
        ax2.plot([h["examples"] for h in va], [h.get("auc", float("nan")) for h in va], "s--", color="tab:green", label="valid AUC")
        ax2.set_ylabel("AUC")
        ax2.legend(loc="upper center")
    ax.set_xlabel("examples seen")
    ax.set_ylabel("logloss")
    ax.set_title(f"learning curves — {run.name}")
    if tr or va:
        ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = run / "learning_curves.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, run / "learning_curves.png")


def _data_info(data: Any) -> tuple[Any, FeatureSpec] | None:
    """(schema, spec) of a shard folder without reading it; None for a stream (it cannot be peeked)."""
    if hasattr(data, "read") or str(data) == "-":
        return None
    with open_batches(data, PipelineOptions(batch_size=1, shuffle=False)) as b:
        return b.schema, b.spec


def train(
    data: str | os.PathLike | Sequence[str | os.PathLike] | Any,
    out: str | os.PathLike,
    config: TrainConfig = TrainConfig(),
    *,
    valid: str | os.PathLike | None = None,
    warm_start: str | os.PathLike | None = None,
    on_progress: ProgressFn | None = None,
) -> TrainSummary:
    """Train a model on shard folder(s) (or "-" / a binary stream) into the run folder `out`.

    Rerunning on an existing `out` resumes from its latest checkpoint. `warm_start` initializes model
    and optimizer state from another run's latest checkpoint (same schema and model shapes).

    Example:
        summary = ctrflow.train("shards/train", "runs/fm", TrainConfig(model=ModelConfig("fm")), valid="shards/test")
    """
    import tensorflow as tf

    _configure_tf(config)
    run = Path(out)
    run.mkdir(parents=True, exist_ok=True)
    is_stream = hasattr(data, "read") or str(data) == "-"
    opts = PipelineOptions(batch_size=config.batch_size, epochs=1, shuffle_buffer_rows=config.shuffle_buffer_rows, seed=config.seed)
    first = open_batches(data, opts)  # epoch 0's stream; also tells schema and spec
    schema, transforms, spec = first.schema, first.transforms, first.spec
    info = {
        "config": config.to_dict(), "schema": schema.to_dict(), "schema_fingerprint": schema.fingerprint(),
        "transforms": transforms.to_dict(), "feature_spec": spec.to_dict(), "data": None if is_stream else str(data),
    }
    prior = run / RUN_FILE
    if prior.exists():
        old = json.loads(prior.read_text())
        if old["schema_fingerprint"] != info["schema_fingerprint"] or old["feature_spec"] != info["feature_spec"]:
            first.close()
            raise SchemaError(
                f"{run} was trained on data with another schema or other transforms (fingerprint "
                f"{old['schema_fingerprint']}, this data {info['schema_fingerprint']}): use a new --out, "
                "or convert this data with --like the run's original data."
            )
        if old["config"]["model"] != info["config"]["model"]:
            first.close()
            raise ConfigError(f"{run} holds a {old['config']['model']} model; this command asks for {info['config']['model']}. Use a new --out.")
        sharded = [k for k, v in (old.get("distributed") or {}).get("table_shards", {}).items() if len(v) > 1]
        if sharded and (run / "checkpoints" / "checkpoint").exists():
            first.close()
            raise ConfigError(f"{run} was trained on a cluster with sharded tables ({', '.join(sharded)}): resume it with "
                              f"--cluster, or start a new run folder with --warm-start {run} (the weights carry over).")
    if valid is not None:
        vinfo = _data_info(valid)
        if vinfo is not None and (vinfo[0].fingerprint() != schema.fingerprint() or vinfo[1] != spec):
            first.close()
            raise SchemaError(f"validation data {valid} has another schema or other transforms than the training data: convert it with --like.")
    _write_json(prior, info)

    trainer = _Trainer(run, config, spec)
    resumed_from = 0
    warm_from = None
    if trainer.manager.latest_checkpoint:
        trainer.ckpt.restore(trainer.manager.latest_checkpoint).assert_existing_objects_matched()
        resumed_from = int(trainer.step.numpy())
    elif warm_start is not None:
        warm_from = str(_warm_start(trainer, Path(warm_start), info))
    else:
        init_output_bias(trainer.model, first.positives, first.rows)

    runlog = RunHistory(run, resumed_from)
    history, record = runlog.entries, runlog.record

    total_examples = None if is_stream else (first.rows or 0) * config.epochs
    if config.max_steps:
        total_examples = min(total_examples or 1 << 62, config.max_steps * config.batch_size)
    t0 = time.perf_counter()
    start_examples = int(trainer.examples.numpy())
    window_loss, window_rows = 0.0, 0
    running = math.nan
    last_valid: dict[str, Any] | None = None
    stopped_early = False
    profiling = False

    def validate() -> None:
        """Run validation, record it, update early stopping."""
        nonlocal last_valid, stopped_early
        if valid is None:
            return
        tv = time.perf_counter()
        with open_batches(valid, PipelineOptions(batch_size=max(config.batch_size, 8192), shuffle=False)) as vb:
            m = _evaluate_stream(trainer, vb)
        trainer.overhead_s += time.perf_counter() - tv
        last_valid = m
        record({"kind": "valid", "step": int(trainer.step.numpy()), "examples": int(trainer.examples.numpy()),
                "epoch": int(trainer.epoch.numpy()), "seconds": time.perf_counter() - t0, **m})
        if m["logloss"] < float(trainer.best.numpy()) - 1e-6:
            trainer.best.assign(m["logloss"])
            trainer.bad_validations.assign(0)
        else:
            trainer.bad_validations.assign_add(1)
        if config.early_stopping_patience and trainer.bad_validations.numpy() >= config.early_stopping_patience:
            stopped_early = True

    def after_steps(losses: np.ndarray, rows: int) -> bool:
        """Bookkeeping after one or more steps. Returns True to stop."""
        nonlocal window_loss, window_rows, running, profiling
        if not np.all(np.isfinite(losses)):
            raise TrainingError(
                f"the loss became {losses[~np.isfinite(losses)][0]} at step {int(trainer.step.numpy()) + 1}; training stopped. "
                f"The last good checkpoint {trainer.manager.latest_checkpoint} is kept (nothing was saved after the "
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
        return stopped_early or bool(config.max_steps and step >= config.max_steps)

    def epoch_stream(e: int) -> BatchStream:
        return open_batches(data, PipelineOptions(**{**asdict(opts), "seed": config.seed + 7919 * e}))

    try:
        epoch = int(trainer.epoch.numpy())
        while epoch < config.epochs:
            if epoch == 0 and first is not None:
                stream, first = first, None
            else:
                if first is not None:
                    first.close()
                    first = None
                if is_stream:  # a stream is read once
                    break
                stream = epoch_stream(epoch)
            with stream:
                it = iter(stream)
                for _ in range(int(trainer.batch_in_epoch.numpy())):  # resume mid-epoch: replay this epoch's order
                    if next(it, None) is None:
                        break
                run_steps = _hogwild if config.hogwild_threads > 1 else _single
                stop = run_steps(trainer, it, config, after_steps)
            if stop:
                if not stopped_early and not config.valid_every_steps:
                    validate()  # max_steps reached: the end of training is a validation point
                break
            epoch += 1
            trainer.epoch.assign(epoch)
            trainer.batch_in_epoch.assign(0)
            if not config.valid_every_steps:
                validate()
            trainer.save()
            if stopped_early:
                break
        if first is not None:
            first.close()
        latest = trainer.save() if int(trainer.step.numpy()) != _ckpt_step(trainer) else trainer.manager.latest_checkpoint
    finally:
        if profiling:
            tf.profiler.experimental.stop()
        runlog.close()
    return finish_run(run, trainer, history, seconds=time.perf_counter() - t0, overhead_s=trainer.overhead_s,
                      start_examples=start_examples, steps=int(trainer.step.numpy()), running_logloss=running,
                      valid=last_valid, stopped_early=stopped_early, resumed_from=resumed_from, warm_from=warm_from,
                      checkpoint=latest)


def finish_run(run: Path, trainer: Any, history: list[dict[str, Any]], *, seconds: float, overhead_s: float,
               start_examples: int, steps: int, running_logloss: float, valid: dict[str, Any] | None,
               stopped_early: bool, resumed_from: int, warm_from: str | None, checkpoint: str | None) -> TrainSummary:
    """The run's summary (examples/s without validation and checkpoint time), also written to summary.json."""
    tr_hist = [h for h in history if h["kind"] == "train"]
    best = float(trainer.best.numpy())
    summary = TrainSummary(
        run=str(run), steps=steps, examples=int(trainer.examples.numpy()), seconds=seconds,
        examples_per_s=(int(trainer.examples.numpy()) - start_examples) / max(seconds - overhead_s, 1e-9),
        train_logloss=tr_hist[-1]["logloss"] if tr_hist else running_logloss,
        valid=valid, best_valid_logloss=None if math.isinf(best) else best, stopped_early=stopped_early,
        resumed_from_step=resumed_from, warm_started_from=warm_from, checkpoint=checkpoint, history=history,
    )
    _write_json(run / "summary.json", summary.to_dict())
    return summary


def _ckpt_step(trainer: _Trainer) -> int:
    latest = trainer.manager.latest_checkpoint
    return int(latest.rsplit("-", 1)[-1]) if latest else -1


def _single(trainer: _Trainer, it: Iterator[Batch], config: TrainConfig, after: Callable[[np.ndarray, int], bool]) -> bool:
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


def _hogwild(trainer: _Trainer, it: Iterator[Batch], config: TrainConfig, after: Callable[[np.ndarray, int], bool]) -> bool:
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


def _warm_start(trainer: _Trainer, src: Path, info: dict[str, Any]) -> str:
    import tensorflow as tf

    other = load_run_info(src)
    mine_spec, their_spec = info["feature_spec"], other["feature_spec"]
    if their_spec != mine_spec:
        diff = [k for k in mine_spec if mine_spec[k] != their_spec.get(k)]
        raise TrainingError(f"cannot warm start from {src}: its feature spec differs in {diff} (convert the data --like its data).")
    mm, tm = info["config"]["model"], other["config"]["model"]
    shape_keys = ("kind", "embedding_dim", "hidden", "table_mode", "batch_norm")
    diff = {k: (tm.get(k), mm.get(k)) for k in shape_keys if tm.get(k) != mm.get(k)}
    if diff:
        raise TrainingError(f"cannot warm start from {src}: model shapes differ ({', '.join(f'{k}: {a} there, {b} here' for k, (a, b) in diff.items())}).")
    latest = tf.train.latest_checkpoint(str(src / "checkpoints"))
    if latest is None:
        raise TrainingError(f"cannot warm start from {src}: it has no checkpoint.")
    same_optimizer = other["config"].get("optimizer") == info["config"].get("optimizer") and \
        other["config"].get("optimizer_groups") == info["config"].get("optimizer_groups")
    parts = {"model": trainer.model, "optimizer": trainer.optimizer} if same_optimizer else {"model": trainer.model}
    try:
        tf.train.Checkpoint(**parts).read(latest).expect_partial()
    except (ValueError, tf.errors.OpError) as e:
        raise TrainingError(f"cannot warm start from {latest}: {str(e).strip()[:300]}") from None
    return latest
