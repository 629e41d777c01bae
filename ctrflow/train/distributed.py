"""Distributed training on TensorFlow's parameter-server engine: sharded tables, asynchronous workers.

`train_distributed(data, out, config, cluster=...)` is `train()` for a cluster (`ctrflow.train.cluster`): this
process is the coordinator; `ps` tasks hold every variable, the big tables split row-wise into shards
(`tf.distribute.ParameterServerStrategy` with a `variable_partitioner`); `worker` tasks run the steps,
each on its own share of the shard files, and update the shared variables without waiting for each
other (asynchronous data parallelism, as in the TensorFlow paper).

How the pieces fit:
- Tables: `layers.make_table` hands the strategy a partition-aware initializer, so each shard makes
  only its rows on its own parameter server. Lookups (`tf.nn.embedding_lookup` on a `ShardedVariable`)
  gather on each shard and send back only the rows a batch uses; no table is ever concatenated.
- Optimizers: each shard (`ShardedVariable.variables`) is optimized as a variable of its own: its
  gradient is a `tf.IndexedSlices` of the rows it served, the sparse optimizer updates only those
  rows, and every slot variable is made on the shard's parameter server, shaped like the shard.
- Steps: a `ClusterCoordinator` schedules one tf.function per `steps_per_function` steps on whichever
  worker is free (a slow worker simply takes fewer), at most `in_flight_per_worker` per worker queued.
  Step, example and loss counters are variables on a parameter server, so the coordinator can follow
  progress without waiting for any function.
- Input: each worker reads whole shard files, every len(workers)-th one (its worker index comes from
  `tf.distribute.coordinator.experimental_get_current_worker_index`), straight in tf.data
  (`ctrflow.data.tfdata.worker_dataset`).
- Faults: a worker that dies is handled by the coordinator (its functions go to the other workers; a
  worker restarted at the same address rejoins and rebuilds its input). A parameter server that dies
  ends training with a `TrainingError` naming it and the last checkpoint; rerunning the same command on
  a restarted cluster resumes from that checkpoint. No wait is unbounded: reaching the tasks
  (`connect_timeout_s`) and progress (`stall_timeout_s`) have deadlines.
- Run folder: exactly `train()`'s (`run.json`, `checkpoints/`, `history.jsonl`, ...), plus a
  "distributed" record in run.json. Validation, early stopping, the best checkpoint, warm-start and
  prior-run checks are the trainer core's (`ctrflow.train.core`), the same as in one process. A sharded table is saved as one full tensor, so `export()`,
  `evaluate()` and a single-process `--warm-start` read a distributed run unchanged.

Resume is approximate where the single-process loop is exact: the step counter, model and optimizer
state come back from the checkpoint, but workers start a fresh shuffle of their files (asynchronous
training has no exact replay order).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ctrflow.data.batch import FeatureSpec
from ctrflow.data.pipeline import PipelineOptions, open_batches
from ctrflow.data.tfdata import shard_table, worker_dataset
from ctrflow.errors import ConfigError, CtrflowError, TrainingError
from ctrflow.train import core
from ctrflow.train.checkpoints import RunCheckpoints, clean_partial_checkpoints, latest_checkpoint, make_counters
from ctrflow.train.cluster import ClusterSpec, check_port_free, check_reachable, cluster_from_env, load_cluster
from ctrflow.train.config import OPTIMIZER_GROUPS, TrainConfig
from ctrflow.validation import Choice, Float, Int, check_fields
from ctrflow.train.core import DISTRIBUTED_KEY, RunHistory, TrainSummary, init_output_bias, training_step

__all__ = ["DistributedOptions", "train_distributed", "PARTITIONERS"]

PARTITIONERS = ("min_size", "fixed")
# TensorFlow connects a process to one cluster for its lifetime: (cluster, partitioner) -> (strategy, coordinator).
_CONNECTED: dict[str, Any] = {}


@dataclass(frozen=True)
class DistributedOptions:
    """How a run is spread over a cluster. Checked once, here.

    partitioner: "min_size" (default): a variable is split into as many shards as keep each at least
        `min_shard_bytes`, at most `shards`; small variables stay whole. "fixed": every variable of rank
        >= 1 is split into exactly `shards` (fewer if it has fewer rows).
    min_shard_bytes: smallest shard of the "min_size" partitioner, bytes, >= 1 (default 256 KiB).
    shards: the most shards per variable ("min_size") or the shard count ("fixed"), >= 0; 0 (default)
        means the number of parameter servers, which places one shard of each big table on each.
    steps_per_function: training steps per scheduled function, >= 1; None (default) takes
        `TrainConfig.steps_per_call` when it is > 1, else 10. More steps per function amortize the
        coordinator's round trip (~ms per function); fewer let a slow worker hold back less work.
    in_flight_per_worker: scheduled functions per worker not finished yet, >= 1 (default 2): one
        running, one queued, so no worker waits for the coordinator.
    connect_timeout_s: how long to wait for every worker and ps to answer before training, > 0.
    stall_timeout_s: stop with a TrainingError when no step finishes for this long (every worker
        dead, the cluster wedged), > 0. A restarted worker has this long to come back.
    poll_s: the coordinator's progress polling interval, > 0 (default 0.02 s).
    """

    partitioner: str = "min_size"
    min_shard_bytes: int = 256 << 10
    shards: int = 0
    steps_per_function: int | None = None
    in_flight_per_worker: int = 2
    connect_timeout_s: float = 30.0
    stall_timeout_s: float = 300.0
    poll_s: float = 0.02

    def __post_init__(self) -> None:
        check_fields(self, {
            "partitioner": Choice(PARTITIONERS), "min_shard_bytes": Int(1), "shards": Int(0),
            "steps_per_function": Int(1, optional=True), "in_flight_per_worker": Int(1),
            "connect_timeout_s": Float(0, low_open=True), "stall_timeout_s": Float(0, low_open=True), "poll_s": Float(0, low_open=True),
        })

    def function_steps(self, config: TrainConfig) -> int:
        if self.steps_per_function is not None:
            return self.steps_per_function
        return config.steps_per_call if config.steps_per_call > 1 else 10


# --- the training state on the cluster -----------------------------------------------------------------
def _partitioner(options: DistributedOptions, num_ps: int):
    import tensorflow as tf

    shards = options.shards or num_ps
    if options.partitioner == "fixed":
        return tf.distribute.experimental.partitioners.FixedShardsPartitioner(shards)
    return tf.distribute.experimental.partitioners.MinSizePartitioner(min_shard_bytes=options.min_shard_bytes, max_shards=shards)


def _parts(variable: Any) -> list[Any]:
    """The shard variables of a ShardedVariable, or [variable] for a plain one."""
    from tensorflow.python.distribute.sharded_variable import ShardedVariableMixin

    return list(variable.variables) if isinstance(variable, ShardedVariableMixin) else [variable]


class _ClusterTrainer:
    """Model, sparse optimizers (per shard), counters and checkpoint, made under the strategy's scope.

    The checkpoint has `train()`'s layout (model, optimizer, step, epoch, batch_in_epoch, examples,
    best, bad_validations), so the run folder works with export, evaluate and warm starts.
    """

    def __init__(self, run: Path, config: TrainConfig, spec: FeatureSpec, strategy: Any) -> None:
        import tensorflow as tf

        from ctrflow.models.layers import FieldTables
        from ctrflow.models.registry import make_model
        
        self.run, self.config, self.spec, self.strategy = run, config, spec, strategy
        with strategy.scope():
            self.model = make_model(config.model, spec)
            groups: dict[str, list[Any]] = {g: [] for g in OPTIMIZER_GROUPS}
            sparse: set[int] = set()
            self.table_shards: dict[str, list[int]] = {}
            for module in self.model.submodules:
                if isinstance(module, FieldTables):
                    for table in module.tables:
                        parts = _parts(table)
                        self.table_shards[parts[0].name.split("/part_")[0].removesuffix(":0")] = [int(p.shape[0]) for p in parts]
                        groups[module.group].extend(parts)
                        sparse.update(id(p) for p in parts)
            groups["dense"] = [v for v in self.model.trainable_variables if id(v) not in sparse]
            group_of = {id(v): g for g, vs in groups.items() for v in vs}
            self.optimizer = core.make_optimizers(config, groups, lambda v: group_of[id(v)])
            self.variables = [v for g in OPTIMIZER_GROUPS for v in groups[g]]
            for v in self.variables:  # slots live with their shard: same parameter server, same rows
                with strategy.extended.colocate_vars_with(v):
                    self.optimizer.build([v])
            self.counters = make_counters()
            for name, var in self.counters.items():
                setattr(self, name, var)
            # Progress since this process started (not checkpointed): weighted loss sum and weight sum.
            self.loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="progress_loss_sum")
            self.loss_rows = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="progress_loss_rows")
        self.checkpoints = RunCheckpoints(run, self.model, self.optimizer, self.counters, config.keep_checkpoints)
        self.ckpt, self.manager = self.checkpoints.ckpt, self.checkpoints.manager
        self.predict = core.make_predict(self.model, spec, core.logit_correction(config.negative_sampling_rate))

    def _step(self, ids, numeric, label, weight):
        return training_step(self.model, self.optimizer, self.variables, ids, numeric, label, weight)

    def make_function(self) -> Callable[..., Any]:
        """The scheduled function: `steps` training steps on a worker's iterator, then the counters."""
        import tensorflow as tf

        @tf.function
        def train_steps(iterator, steps):
            loss_sum = tf.constant(0.0, tf.float64)
            weight_sum = tf.constant(0.0, tf.float64)
            rows = tf.constant(0, tf.int64)
            for _ in tf.range(steps):
                ids, numeric, label, weight = next(iterator)
                loss = self.strategy.run(self._step, args=(ids, numeric, label, weight))
                tf.debugging.check_numerics(loss, "ctrflow: the training loss")
                w = tf.reduce_sum(tf.cast(weight, tf.float64))
                loss_sum += tf.cast(loss, tf.float64) * w
                weight_sum += w
                rows += tf.shape(label, out_type=tf.int64)[0]
            # Counters move only once every update of these steps has landed: tf.function orders stateful
            # ops per resource only, so without this edge the step could count before the tables change.
            with tf.control_dependencies([loss_sum, weight_sum, rows]):
                self.loss_sum.assign_add(loss_sum)
                self.loss_rows.assign_add(weight_sum)
                self.examples.assign_add(rows)
                self.step.assign_add(tf.cast(steps, tf.int64))
            return loss_sum / tf.maximum(weight_sum, 1e-12)

        return train_steps

    def save(self, step: int) -> str:
        return self.checkpoints.save(step)


# --- the coordinator ---------------------------------------------------------------------------------------
class _SaverRetracingFilter(logging.Filter):
    """Checkpoints of variables on several devices trace a fresh save function each time (TensorFlow's
    MultiDeviceSaver); its "retracing" warning says nothing actionable here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "tf_function_save" not in record.getMessage()


def _quiet_saver_retracing(tf: Any) -> None:
    logger = tf.get_logger()
    if not any(isinstance(f, _SaverRetracingFilter) for f in logger.filters):
        logger.addFilter(_SaverRetracingFilter())


def _resolve_cluster(cluster: Any) -> ClusterSpec:
    if cluster is not None:
        return load_cluster(cluster)
    from_env = cluster_from_env()
    if from_env is None:
        raise ConfigError("train_distributed needs a cluster: pass cluster=FILE (or --cluster FILE), or set TF_CONFIG.")
    spec, task_type, _ = from_env
    if task_type != "chief":
        raise ConfigError(f"TF_CONFIG names this process {task_type}: server tasks run `ctrflow cluster {task_type}`; "
                          "the coordinator's TF_CONFIG task is chief.")
    return spec


def _run_info(data: Any, config: TrainConfig, cluster: ClusterSpec,
              options: DistributedOptions) -> tuple[dict[str, Any], FeatureSpec]:
    if hasattr(data, "read") or str(data) == "-":
        raise ConfigError("Distributed training reads shard folders (each worker takes whole shard files): "
                          "convert the stream to a folder first (`ctrflow convert`), or train it in one process.")
    with open_batches(data, PipelineOptions(batch_size=1, shuffle=False)) as first:
        info = core.run_info(first, config, data, **{DISTRIBUTED_KEY: {"workers": cluster.num_workers, "ps": cluster.num_ps,
                                                                          **asdict(options)}})
        return info, first.spec


def _check_files(data: Any, table: dict[str, np.ndarray], cluster: ClusterSpec) -> None:
    if len(table["rows"]) < cluster.num_workers:
        raise ConfigError(
            f"{data} has {len(table['rows'])} shard file(s) for {cluster.num_workers} workers: each worker reads whole "
            "shard files. Convert with a smaller --block-mb (more files), or use fewer workers."
        )


def _probe_dead(cluster: ClusterSpec) -> list[str]:
    dead = []
    for kind, index, address in cluster.tasks():
        if kind == "chief":
            continue
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                pass
        except OSError:
            dead.append(f"{kind} {index} ({address})")
    return dead


def _connect(cluster: ClusterSpec, options: DistributedOptions):
    """This process as the cluster's coordinator: (strategy, coordinator), reused by later runs in it."""
    import tensorflow as tf

    key = json.dumps([cluster.to_dict(), options.partitioner, options.min_shard_bytes, options.shards])
    if _CONNECTED:
        if _CONNECTED["key"] != key:
            raise ConfigError("This process already coordinates another cluster (or other partitioner options); "
                              "TensorFlow connects a process to one cluster for its lifetime: use a new process.")
        return _CONNECTED["strategy"], _CONNECTED["coordinator"]
    check_reachable(cluster, timeout_s=options.connect_timeout_s)
    if cluster.chief:
        check_port_free(cluster.chief[0])
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(cluster.to_dict()), task_type="chief" if cluster.chief else None,
        task_id=0 if cluster.chief else None, rpc_layer="grpc")
    try:
        strategy = tf.distribute.ParameterServerStrategy(resolver, variable_partitioner=_partitioner(options, cluster.num_ps))
        coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    except (tf.errors.OpError, ValueError, RuntimeError) as e:
        dead = _probe_dead(cluster)
        raise ConfigError(f"cannot connect to the cluster{' (unreachable: ' + ', '.join(dead) + ')' if dead else ''}: "
                          f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__}") from None
    _CONNECTED.update(key=key, strategy=strategy, coordinator=coordinator)
    return strategy, coordinator


def train_distributed(
    data: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    config: TrainConfig = TrainConfig(),
    *,
    cluster: ClusterSpec | str | os.PathLike | dict | None = None,
    valid: str | os.PathLike | None = None,
    warm_start: str | os.PathLike | None = None,
    options: DistributedOptions = DistributedOptions(),
    on_progress: Callable[..., None] | None = None,
) -> TrainSummary:
    """Train on a parameter-server cluster, this process being the coordinator; `train()`'s contract.

    Rerunning on an existing `out` resumes from its latest checkpoint (on a cluster with the same table
    shards). `cluster`: a cluster file, a dict or `ClusterSpec`; None reads TF_CONFIG.

    Example:
        summary = train_distributed("shards/train", "runs/fm", TrainConfig(model=ModelConfig("fm")), cluster="cluster.json")

    Raises:
        ConfigError: bad cluster or settings, unreachable tasks, fewer shard files than workers,
            a resume on a cluster that shards the tables differently.
        TrainingError: a parameter server died, training stalled, or the loss became NaN; the last
            checkpoint is kept and named.
    """
    import tensorflow as tf

    if config.deterministic:
        raise ConfigError("Asynchronous parameter-server training cannot be deterministic: drop --deterministic, or train in one process.")
    if config.hogwild_threads > 1:
        raise ConfigError("hogwild_threads applies to one process; on a cluster the workers are the parallelism. Drop --hogwild-threads.")
    if config.profile:
        raise ConfigError("--profile traces a single-process run; profile without --cluster.")
    spec_cluster = _resolve_cluster(cluster)
    run = Path(out)
    info, spec = _run_info(data, config, spec_cluster, options)
    _check_files(data, shard_table(data), spec_cluster)
    old = core.check_prior_run(run, info, distributed=True)
    core.check_valid_data(valid, info)
    warm = core.check_warm_start(warm_start, info) if warm_start is not None and latest_checkpoint(run) is None else None

    tf.random.set_seed(config.seed)
    _quiet_saver_retracing(tf)
    strategy, coordinator = _connect(spec_cluster, options)
    clean_partial_checkpoints(run)
    try:
        trainer = _ClusterTrainer(run, config, spec, strategy)
    except (tf.errors.OpError, ValueError) as e:
        raise _cluster_error(e, spec_cluster, None, run) from None
    info[DISTRIBUTED_KEY]["table_shards"] = trainer.table_shards
    if old is not None and trainer.checkpoints.latest:
        before = old.get(DISTRIBUTED_KEY, {}).get("table_shards")
        if before is not None and before != trainer.table_shards:
            changed = [k for k in trainer.table_shards if before.get(k) != trainer.table_shards[k]]
            then = old[DISTRIBUTED_KEY]
            what = ", ".join(f"{k}: {len(before.get(k) or [])} shard(s) then, {len(trainer.table_shards[k])} now" for k in changed)
            raise ConfigError(
                f"{run} was trained with its tables in other shards ({what}; {then['ps']} ps then, {spec_cluster.num_ps} now). "
                f"Resume on a cluster with {then['ps']} ps and the same partitioner options, or start a new run folder "
                f"with --warm-start {run} (the weights carry over)."
            )
    new_folder = not run.exists()
    try:
        source = core.resolve_validation(data, valid, config, run)
        table = shard_table(source.train)
        _check_files(source.train, table, spec_cluster)
        info["validation"] = {"source": source.source, "note": source.note, "data": None if source.valid is None else str(source.valid)}
        core.write_run_info(run, info)
    except BaseException:
        if new_folder:  # refused or out of disk before run.json: leave no folder behind
            shutil.rmtree(run, ignore_errors=True)
        raise
    with open_batches(source.train, PipelineOptions(batch_size=1, shuffle=False)) as first:
        rows, positives = first.rows or 0, first.positives
    try:
        return _coordinate(trainer, coordinator, spec_cluster, table, spec, rows, positives, config, options, run,
                           source=source, warm=warm, on_progress=on_progress)
    except CtrflowError:
        raise
    except (tf.errors.OpError, ValueError, RuntimeError) as e:
        raise _cluster_error(e, spec_cluster, trainer, run) from None


def _cluster_error(e: BaseException, cluster: ClusterSpec, trainer: _ClusterTrainer | None, run: Path) -> CtrflowError:
    import tensorflow as tf

    msg = (getattr(e, "message", None) or str(e)).strip().splitlines()
    first = msg[0][:300] if msg else type(e).__name__
    if isinstance(e, tf.errors.InvalidArgumentError) and "ctrflow: the training loss" in str(e):
        latest = trainer.checkpoints.latest if trainer else None
        return TrainingError(f"the loss became NaN or inf; training stopped. The last good checkpoint {latest} is kept. "
                             "Lower the learning rate or check the data.")
    dead = _probe_dead(cluster)
    latest = trainer.checkpoints.latest if trainer else tf.train.latest_checkpoint(str(run / "checkpoints"))
    where = f"the last checkpoint is {latest}" if latest else "no checkpoint was written yet"
    dead_ps = [d for d in dead if d.startswith("ps")]
    if dead_ps:
        return TrainingError(
            f"parameter server {', '.join(dead_ps)} is gone: training stopped ({where}). Restart the cluster's ps and "
            f"worker tasks and rerun the same command: it resumes from that checkpoint. (TensorFlow: {first})"
        )
    if dead:
        return TrainingError(f"the cluster failed: {', '.join(dead)} unreachable ({where}); restart those tasks and rerun "
                             f"to resume. (TensorFlow: {first})")
    return TrainingError(f"distributed training failed: {type(e).__name__}: {first} ({where}). Rerun to resume.")


def _coordinate(trainer: _ClusterTrainer, coordinator: Any, cluster: ClusterSpec, table: dict[str, np.ndarray],
                spec: FeatureSpec, rows: int, positives: float | None, config: TrainConfig, options: DistributedOptions,
                run: Path, *, source: core.ValidationSource, warm: core.WarmStart | None,
                on_progress: Callable[..., None] | None) -> TrainSummary:
    import tensorflow as tf

    resumed_from = trainer.checkpoints.restore_latest() or 0
    warm_from = None
    if not resumed_from and trainer.checkpoints.latest is None:
        if warm is not None:  # model weights only: optimizer slots here are per shard
            warm_from = core.apply_warm_start(warm.checkpoint, trainer.model, None)
            core.init_id_remap(trainer.model, source.train, warm=warm.merge_remap)
        else:
            init_output_bias(trainer.model, positives, rows, config.negative_sampling_rate)
            core.init_id_remap(trainer.model, source.train)

    runlog = RunHistory(run, resumed_from)
    history, record = runlog.entries, runlog.record

    # Steps are counted as in train(): an epoch is as many global steps as one process would take.
    epochs = config.max_epochs(source.valid is not None)
    kept = rows if config.negative_sampling_rate >= 1.0 else int((positives or 0) + (rows - (positives or 0)) * config.negative_sampling_rate)
    steps_per_epoch = max(1, -(-kept // config.batch_size))
    total = steps_per_epoch * epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    total_examples = min(kept * epochs, total * config.batch_size)
    k = options.function_steps(config)
    in_flight = options.in_flight_per_worker * cluster.num_workers * k
    # A resumed run starts a fresh shuffle (no exact replay in asynchronous training).
    data_seed = (config.seed * 1_000_003 + resumed_from) % (2**31 - 1)
    workers = cluster.num_workers
    iterator = iter(coordinator.create_per_worker_dataset(
        lambda: worker_dataset(table, spec, batch_size=config.batch_size, num_workers=workers, seed=data_seed,
                               shuffle_buffer_rows=config.shuffle_buffer_rows,
                               negative_sampling_rate=config.negative_sampling_rate)))
    train_steps = trainer.make_function()

    t0 = time.perf_counter()
    start_examples = int(trainer.examples.numpy())
    progress = {"loss": 0.0, "rows": 0.0, "running": math.nan,
                "saved": resumed_from if trainer.checkpoints.latest else -1, "overhead_s": 0.0}
    # Validation on the coordinator: lookups gather from the shards.
    validation = core.Validation(source.valid, config, trainer.checkpoints, trainer.predict, record, t0)

    def validate(step: int) -> None:
        validation(step, step // steps_per_epoch)

    def save(step: int) -> None:
        epoch = min(step // steps_per_epoch, epochs)
        trainer.epoch.assign(epoch)
        trainer.batch_in_epoch.assign(step - epoch * steps_per_epoch)
        ts = time.perf_counter()
        trainer.save(step)
        progress["overhead_s"] += time.perf_counter() - ts
        progress["saved"] = step

    def bookkeeping(before: int, now: int) -> None:
        """Log, validate and checkpoint for the steps (before, now] that finished since the last look."""
        loss_sum, loss_rows = float(trainer.loss_sum.numpy()), float(trainer.loss_rows.numpy())
        if loss_rows > progress["rows"]:
            interval = (loss_sum - progress["loss"]) / (loss_rows - progress["rows"])
            running = progress["running"]
            progress["running"] = interval if math.isnan(running) else 0.9 * running + 0.1 * interval
            if before // config.log_every_steps != now // config.log_every_steps:
                record({"kind": "train", "step": now, "examples": int(trainer.examples.numpy()), "epoch": now // steps_per_epoch,
                        "seconds": time.perf_counter() - t0, "logloss": interval})
                progress["loss"], progress["rows"] = loss_sum, loss_rows
        if on_progress:
            on_progress(int(trainer.examples.numpy()), total_examples, logloss=progress["running"])
        epoch_end = before // steps_per_epoch != now // steps_per_epoch
        if config.valid_every_steps and before // config.valid_every_steps != now // config.valid_every_steps:
            validate(now)
        elif epoch_end and not config.valid_every_steps:
            validate(now)
        if before // config.checkpoint_every_steps != now // config.checkpoint_every_steps or epoch_end:
            save(now)

    done = scheduled = resumed_from
    last_change = time.monotonic()
    try:
        while True:
            now = int(trainer.step.numpy())  # finished steps, counted on a parameter server
            if now != done:
                bookkeeping(done, now)
                done, last_change = now, time.monotonic()
            if validation.stop or done >= total:
                break
            if scheduled < total and scheduled - done < in_flight:
                steps = min(k, total - scheduled)
                coordinator.schedule(train_steps, args=(iterator, tf.constant(steps, tf.int32)))
                scheduled += steps
                continue
            coordinator.done()  # raises the error of any function that failed for good
            if time.monotonic() - last_change > options.stall_timeout_s:
                raise _stalled(cluster, options, done, total, trainer)
            time.sleep(options.poll_s)
        done = _drain(coordinator, options, trainer, cluster, done, total, bookkeeping)
        if validation.enabled and not config.valid_every_steps and not validation.stop and validation.last_step != done:
            validate(done)  # max_steps reached mid-epoch: the end of training is a validation point
        if progress["saved"] != done:
            save(done)
        restored = validation.finish(done)
        from ctrflow.train.refit import refit_after_training

        refit = refit_after_training(trainer.model, trainer.checkpoints, source.train, source.valid, config, step=done, examples=int(trainer.examples.numpy()),
                                     record=record, predict=None, distributed=True)  # skipped, said in the record
        latest = trainer.checkpoints.latest
    finally:
        runlog.close(best_step=trainer.checkpoints.best_step)
    return core.finish_run(run, trainer.counters, history, seconds=time.perf_counter() - t0,
                           overhead_s=progress["overhead_s"] + validation.seconds, start_examples=start_examples, steps=done,
                           running_logloss=progress["running"], validation=validation, source=source,
                           stopped_early=validation.stop, resumed_from=resumed_from, warm_from=warm_from, checkpoint=latest,
                           restored_best=restored, config=config, refit=refit)


def _stalled(cluster: ClusterSpec, options: DistributedOptions, done: int, total: int, trainer: _ClusterTrainer) -> TrainingError:
    dead = _probe_dead(cluster)
    return TrainingError(
        f"no training step finished in {options.stall_timeout_s:g} s (step {done} of {total}); "
        f"{'unreachable: ' + ', '.join(dead) if dead else 'every task answers, but none makes progress'}. "
        f"The last checkpoint is {trainer.checkpoints.latest}; restart the cluster's tasks and rerun to resume."
    )


def _drain(coordinator: Any, options: DistributedOptions, trainer: _ClusterTrainer, cluster: ClusterSpec, done: int,
           total: int, bookkeeping: Callable[[int, int], None]) -> int:
    """Wait for every scheduled function, with the stall deadline instead of join()'s unbounded wait."""
    last_change = time.monotonic()
    while True:
        finished = coordinator.done()  # raises the error of any function that failed for good
        now = int(trainer.step.numpy())
        if now != done:
            bookkeeping(done, now)
            done, last_change = now, time.monotonic()
        if finished:
            return done
        if time.monotonic() - last_change > options.stall_timeout_s:
            raise _stalled(cluster, options, done, total, trainer)
        time.sleep(options.poll_s)
