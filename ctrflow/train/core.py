"""The trainer core both training loops drive: the single-process loop (`train.loop`) and the cluster loop
(`train.distributed`) differ only in how steps run; everything around the steps exists once, here.

- the run folder's record (`run.json`) and the checks against a prior run in the same folder,
- where validation comes from (given, held out of the training data, or none) and what it is called,
- warm starts (checked before anything is written),
- optimizers per variable group, with learning rates scaled to the batch size,
- validation, early stopping and the best checkpoint (`Validation`),
- the history (`history.jsonl`, TensorBoard, `learning_curves.png`) and the summary (`summary.json`),
- the one training step and the calibrated predictions (negative sampling corrected).

Every write goes through `ctrflow.atomic`; a failed write (a full disk) becomes a `TrainingError` that
names the file, and nothing half-written is left under a final name.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from ctrflow.atomic import atomic_write_json
from ctrflow.data.batch import FeatureSpec
from ctrflow.data.pipeline import PipelineOptions, open_batches
from ctrflow.errors import CheckpointError, ConfigError, SchemaError, TrainingError
from ctrflow.models.registry import PAIR_WEIGHT_SCALE, ModelConfig
from ctrflow.train.checkpoints import CHECKPOINTS, RunCheckpoints, checkpoint_step, latest_checkpoint, read_checkpoint
from ctrflow.train.config import OPTIMIZER_GROUPS, TrainConfig

__all__ = ["RUN_FILE", "TrainSummary", "RunHistory", "ValidationSource", "Validation", "init_output_bias", "init_id_remap", "load_run_info",
           "build_model_from_run", "training_step", "make_optimizers", "make_group_optimizer", "make_predict", "logit_correction",
           "run_info", "check_prior_run", "check_valid_data", "WarmStart", "check_warm_start", "apply_warm_start", "resolve_validation",
           "finish_run", "write_errors", "DISTRIBUTED_KEY"]

RUN_FILE = "run.json"
DISTRIBUTED_KEY = "distributed"  # the run.json record of the cluster layout a run was trained with
HOLDOUT_DIR = "holdout"
_SHAPE_KEYS = ("kind", "embedding_dim", "hidden", "table_mode", "batch_norm")


@dataclass
class TrainSummary:
    run: str
    steps: int
    examples: int
    seconds: float
    examples_per_s: float  # training throughput: wall time minus validation and checkpoint writes
    train_logloss: float
    valid: dict[str, Any] | None  # metrics of the final model (the restored best one with restore_best)
    best_valid_logloss: float | None
    stopped_early: bool
    resumed_from_step: int
    warm_started_from: str | None
    checkpoint: str | None
    valid_source: str = "none"  # "given" | "held_out_by_time" | "held_out_random" | "none"
    valid_note: str = ""  # the same in words: what the model was validated on
    epochs: int = 0  # epochs completed
    best_step: int | None = None  # the step of the best validation
    restored_best: bool = False  # the final checkpoint holds the best validation's model, not the last one
    learning_rates: dict[str, float] = field(default_factory=dict)  # per group, scaled to the batch size
    negative_sampling_rate: float = 1.0
    refit: dict[str, Any] | None = None  # the per-id weights' refit after training (TrainConfig.refit; ctrflow.train.refit)
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("history")
        return d


@contextlib.contextmanager
def write_errors(what: str) -> Iterator[None]:
    """Map a failed write (ENOSPC, EFBIG, EACCES...) to a TrainingError naming `what`."""
    import tensorflow as tf

    try:
        yield
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise TrainingError(f"cannot write {what}: {e.strerror or e}{where}. Free disk space (or fix permissions) and rerun.") from None
    except tf.errors.OpError as e:
        if isinstance(e, (tf.errors.UnavailableError, tf.errors.InvalidArgumentError)):
            raise
        raise TrainingError(f"cannot write {what}: {(e.message or str(e)).strip()[:300]}. Free disk space and rerun.") from None


# --- the run folder's record ---------------------------------------------------------------------------------
def load_run_info(run: str | os.PathLike) -> dict[str, Any]:
    p = Path(run) / RUN_FILE
    if not p.exists():
        raise ConfigError(f"{run}: not a training run folder (no {RUN_FILE}).")
    try:
        info = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p}: cannot read the run record ({e}).") from None
    if isinstance(info.get("config"), dict):  # a run recorded before `l2_mode` existed trained (and checkpointed) "touched"
        info["config"].setdefault("l2_mode", "touched")
        if isinstance(info["config"].get("model"), dict):  # ... and before `min_count`: no remap in its checkpoints
            info["config"]["model"].setdefault("min_count", 0)
    return info


def build_model_from_run(info: dict[str, Any]):
    """The model of a run, built (variables created), not yet restored."""
    from ctrflow.models.registry import make_model

    return make_model(TrainConfig.from_dict(info["config"]).model, FeatureSpec.from_dict(info["feature_spec"]))


def logit_correction(info_or_rate: dict[str, Any] | float) -> float:
    """What to add to a model's logit so its probabilities are calibrated on un-sampled data: log(R) for a
    run trained keeping each negative with probability R (p' = p / (p + (1 - p) / R)); 0 without sampling."""
    rate = info_or_rate if isinstance(info_or_rate, (int, float)) else \
        float(info_or_rate.get("negative_sampling_rate") or info_or_rate.get("config", {}).get("negative_sampling_rate", 1.0))
    return math.log(rate) if rate < 1.0 else 0.0


def run_info(stream: Any, config: TrainConfig, data: Any, **extra: Any) -> dict[str, Any]:
    """run.json: what export, evaluate and serving need to know about a run."""
    schema, transforms, spec = stream.schema, stream.transforms, stream.spec
    is_stream = hasattr(data, "read") or str(data) == "-"
    return {
        "config": config.to_dict(), "schema": schema.to_dict(), "schema_fingerprint": schema.fingerprint(),
        "transforms": transforms.to_dict(), "feature_spec": spec.to_dict(),
        "data": None if is_stream else (str(data) if isinstance(data, (str, os.PathLike)) else [str(d) for d in data]),
        "negative_sampling_rate": config.negative_sampling_rate,
        "learning_rates": {g: config.effective_learning_rate(g) for g in OPTIMIZER_GROUPS}, **extra,
    }


def check_prior_run(run: Path, info: dict[str, Any], *, distributed: bool) -> dict[str, Any] | None:
    """The run.json already in `run` (None: a new run), after checking this command may go on with it."""
    prior = run / RUN_FILE
    if not prior.exists():
        return None
    old = load_run_info(run)
    if old["schema_fingerprint"] != info["schema_fingerprint"] or old["feature_spec"] != info["feature_spec"]:
        raise SchemaError(
            f"{run} was trained on data with another schema or other transforms (fingerprint {old['schema_fingerprint']}, "
            f"this data {info['schema_fingerprint']}): use a new --out, or convert this data with --like the run's original data."
        )
    # A run.json written before a ModelConfig field existed lacks it: it reads the field's default (the model it was).
    if ModelConfig.from_dict(old["config"]["model"]).to_dict() != info["config"]["model"]:
        raise ConfigError(f"{run} holds a {old['config']['model']} model; this command asks for {info['config']['model']}. Use a new --out.")
    if latest_checkpoint(run) is not None:
        if distributed and DISTRIBUTED_KEY not in old:
            raise ConfigError(f"{run} was trained in a single process; its optimizer state is not sharded. Resume it without "
                              f"--cluster, or start a new run folder with --warm-start {run} (the weights carry over).")
        sharded = [k for k, v in (old.get(DISTRIBUTED_KEY) or {}).get("table_shards", {}).items() if len(v) > 1]
        if not distributed and sharded:
            raise ConfigError(f"{run} was trained on a cluster with sharded tables ({', '.join(sharded)}): resume it with "
                              f"--cluster, or start a new run folder with --warm-start {run} (the weights carry over).")
    return old


def check_valid_data(valid: Any, info: dict[str, Any]) -> None:
    if valid is None or hasattr(valid, "read") or str(valid) == "-":
        return
    with open_batches(valid, PipelineOptions(batch_size=1, shuffle=False)) as vb:
        if vb.schema.fingerprint() != info["schema_fingerprint"] or vb.spec.to_dict() != info["feature_spec"]:
            raise SchemaError(f"validation data {valid} has another schema or other transforms than the training data: convert it with --like.")


@dataclass(frozen=True)
class ValidationSource:
    """Where a run's validation rows come from, and the data it trains on."""

    train: Any
    valid: Any
    source: str  # "given" | "held_out_by_time" | "held_out_random" | "none"
    note: str


def resolve_validation(data: Any, valid: Any, config: TrainConfig, run: Path) -> ValidationSource:
    """The given `valid`; else the latest `holdout_fraction` of a shard folder, held out into RUN/holdout/
    (by the time column, else a seeded random share); else none (a stream, several folders, fraction 0)."""
    if valid is not None:
        return ValidationSource(data, valid, "given", f"validation on {valid}")
    if not config.holdout_fraction:
        return ValidationSource(data, None, "none", "no validation (holdout_fraction is 0 and no --valid)")
    if hasattr(data, "read") or str(data) == "-" or not isinstance(data, (str, os.PathLike)):
        return ValidationSource(data, None, "none", "no validation: a stream or several folders cannot be held out from; pass --valid")
    from ctrflow.train.holdout import hold_out

    with write_errors(f"the held-out split in {run / HOLDOUT_DIR}"):
        h = hold_out(data, run / HOLDOUT_DIR, config.holdout_fraction, seed=config.seed)
    if h.rows_valid == 0:
        return ValidationSource(data, None, "none", "no validation: too few rows to hold any out")
    return ValidationSource(h.train, h.valid, f"held_out_{'by_time' if h.by == 'time' else 'random'}", h.describe())


# --- warm starts ---------------------------------------------------------------------------------------------
class WarmStart(NamedTuple):
    """A checked warm start: what to read, and how the run's rare-id remap (`ModelConfig.min_count`) starts."""

    checkpoint: str
    same_optimizer: bool  # the parent's optimizer state fits this run's optimizers
    # merge this run's counts into the parent's restored remap (`init_id_remap(warm=True)`); False: the parent
    # had no remap (min_count 0, or recorded before min_count), so this run counts its remap fresh
    merge_remap: bool


def check_warm_start(src: str | os.PathLike, info: dict[str, Any]) -> WarmStart:
    """The checkpoint to read and how to read it once `src` is known to fit this run; records in
    `info["warm_start"]` where from and how the rare-id remap starts (run.json says what the run did)."""
    src = Path(src)
    if not (src / RUN_FILE).exists():
        raise ConfigError(f"cannot warm start from {src}: not a training run folder (no {RUN_FILE}).")
    other = load_run_info(src)
    mm, tm = info["config"]["model"], other["config"]["model"]
    if mm["kind"] != tm["kind"]:
        raise ConfigError(f"cannot warm start a {mm['kind']} model from {src}: it holds a {tm['kind']} model. Warm start "
                          f"from a run of the same model kind, or drop --warm-start to train from scratch.")
    mine_spec, their_spec = info["feature_spec"], other["feature_spec"]
    if their_spec != mine_spec:
        diff = [k for k in mine_spec if mine_spec[k] != their_spec.get(k)]
        raise TrainingError(f"cannot warm start from {src}: its feature spec differs in {diff} (convert the data --like its data).")
    diff = {k: (tm.get(k), mm.get(k)) for k in _SHAPE_KEYS if tm.get(k) != mm.get(k)}
    if diff:
        raise TrainingError(f"cannot warm start from {src}: model shapes differ ({', '.join(f'{k}: {a} there, {b} here' for k, (a, b) in diff.items())}).")
    if mm["kind"] == "ffm" and float(tm.get("ffm_pair_rate", PAIR_WEIGHT_SCALE)) != float(mm["ffm_pair_rate"]):
        rate = tm.get("ffm_pair_rate", PAIR_WEIGHT_SCALE)
        raise ConfigError(f"cannot warm start from {src}: its FFM pair weights were trained with ffm_pair_rate {rate:g}, "
                          f"this run asks for {mm['ffm_pair_rate']:g} (r is stored as r / rate: the parent's values would "
                          f"mean other weights). Set ffm_pair_rate: {rate:g} in the model config, or train from scratch.")
    theirs, mine = int(tm.get("min_count") or 0), int(mm.get("min_count") or 0)
    if theirs and not mine:
        # Without a remap variable the parent's would be dropped by the partial restore: ids that shared one
        # row there would read their own rows, never trained.
        raise ConfigError(f"cannot warm start with min_count 0 from {src}: it was trained with min_count {theirs} (its rare "
                          f"ids share one row per field; this run has no remap to carry that). Pass --min-count {theirs} "
                          f"(min_count: {theirs} in the model config) as the parent did, or train from scratch.")
    crosses = {k: (ModelConfig.from_dict(tm).to_dict()[k], ModelConfig.from_dict(mm).to_dict()[k]) for k in ("cross_pairs", "cross_buckets", "cross_scale")}
    if any(a != b for a, b in crosses.values()):  # the hashed cross ids (pair index, ids) would mean other rows
        there, here = (", ".join(f"{k} {v[i]}" for k, v in crosses.items()) for i in (0, 1))
        raise ConfigError(f"cannot warm start from {src}: its cross features differ ({there} there; {here} here: a cross's "
                          f"row depends on its pair's index and the table size, its value on the scale). Use the parent's "
                          f"cross settings (its run.json), or train from scratch.")
    latest = latest_checkpoint(src)
    if latest is None:
        raise TrainingError(f"cannot warm start from {src}: it has no checkpoint.")
    same_optimizer = all(other["config"].get(k) == info["config"].get(k) for k in ("optimizer", "learning_rate", "optimizer_groups")) \
        and DISTRIBUTED_KEY not in other
    merge = bool(theirs and mine)
    if not mine:
        remap = "none (min_count 0)"
    elif info.get("data") is None:  # a stream: nothing to count before the first step (`init_id_remap`)
        remap = "the parent's, unchanged (a stream is not counted)" if merge else "none: the parent has no remap and a stream is not counted"
    else:
        remap = f"merged with the parent's (min_count {theirs} there, {mine} here)" if merge else \
            "counted fresh on this run's data: the parent has no remap (min_count 0)"
    info["warm_start"] = {"from": str(src), "checkpoint": latest, "optimizer_state": same_optimizer, "id_remap": remap}
    return WarmStart(latest, same_optimizer, merge)


def apply_warm_start(latest: str, model: Any, optimizer: Any | None) -> str:
    """Read the model (and, when given, the optimizer state) of a checked warm start."""
    import tensorflow as tf

    parts = {"model": model} if optimizer is None else {"model": model, "optimizer": optimizer}
    try:
        read_checkpoint(latest, lambda: tf.train.Checkpoint(**parts).read(latest).expect_partial())
    except CheckpointError as e:
        raise CheckpointError(f"cannot warm start: {e}") from None
    except ValueError as e:
        raise TrainingError(f"cannot warm start from {latest}: {str(e).strip()[:300]}") from None
    return latest


# --- the model, its optimizers, its steps --------------------------------------------------------------------
def init_output_bias(model: Any, positives: float | None, rows: int | None, negative_sampling_rate: float = 1.0) -> None:
    """Start the output bias at the data's base rate, as the sampled data shows it: from logit 0 (p = 0.5)
    a 1% CTR takes hundreds of steps just to reach calibration, which on small data is most of the training."""
    if positives is not None and rows:
        rate = min(max(positives / rows, 1e-6), 1 - 1e-6)
        model.linear.bias.assign(math.log(rate / (1 - rate)) - logit_correction(negative_sampling_rate))


def init_id_remap(model: Any, data: Any, *, warm: bool = False, batch_rows: int = 65_536) -> dict[str, dict[str, int]] | None:
    """`ModelConfig.min_count`: count every id column over the training data `data` (a shard folder or
    list; one pass) and set the model's rare-id remap from the counts, when a run starts (a resume keeps
    its checkpoint's). `warm`: after a warm start from a parent with a remap (`WarmStart.merge_remap`; from one
    without, the remap is counted fresh: its identity would leave nothing rare), merged with the restored
    remap — an id that had its own row keeps it, one now frequent gets its own (continuous training lets new
    ids graduate). None when off or when `data` is a stream (read once: no counts; the remap stays as it is,
    the identity in a new run: every id keeps its row)."""
    if not getattr(model.config, "min_count", 0) or hasattr(data, "read") or str(data) == "-":
        return None  # off, or a stream (read once: nothing to count before the first step; every id keeps its row)
    buckets = model.spec.id_buckets
    counts = [np.zeros(b, np.int64) for b in buckets]
    # A bincount costs its bucket count besides its ids, so batches are pooled until they hold about as many
    # rows as the largest field has buckets (at most 2^26 ids): measured at 39 fields x 2^20 buckets, 65k-row
    # batches, 115 -> 49 ms a batch (one bincount a batch over all fields, offset: 109 ms; random scatter into
    # one 39M-row count array misses the cache); at 2^14 buckets the same as per batch (19-22 ms).
    pool_rows = max(1, min(max(buckets, default=1), (1 << 26) // max(len(buckets), 1)))
    pool: list[np.ndarray] = []

    def add_pool() -> None:
        cols = np.ascontiguousarray(np.concatenate(pool).T)  # one contiguous row of ids per field
        for c, col in zip(counts, cols):
            c += np.bincount(col, minlength=len(c))[: len(c)]
        pool.clear()

    with open_batches(data, PipelineOptions(batch_size=batch_rows, shuffle=False)) as batches:
        for b in batches:
            pool.append(b.ids)
            if sum(len(p) for p in pool) >= pool_rows:
                add_pool()
    if pool:
        add_pool()
    return model.set_id_counts(counts, keep=warm)


def make_group_optimizer(config: TrainConfig, group: str):
    """The sparse optimizer of variable group `group`, at the group's rate scaled to the batch size."""
    from ctrflow.train.optimizers import make_optimizer

    spec = config.group_optimizer(group)
    return make_optimizer(spec.name, learning_rate=config.effective_learning_rate(group), l2=config.l2,
                          l2_mode=config.l2_mode, **spec.extra)


def make_optimizers(config: TrainConfig, groups: dict[str, list[Any]], group_of: Callable[[Any], str]):
    """One sparse optimizer per non-empty variable group (`make_group_optimizer`)."""
    from ctrflow.train.optimizers import OptimizerGroups

    optimizers = {g: make_group_optimizer(config, g) for g in OPTIMIZER_GROUPS if groups.get(g)}
    return OptimizerGroups(optimizers, assign=group_of)


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


def sample_negatives(batches: Iterator[Any], rate: float, seed: int, batch_size: int) -> Iterator[Any]:
    """Keep each negative row with probability `rate` (every positive), seeded, re-packed into full batches:
    the same stream for the same seed, so a resumed epoch replays it."""
    from ctrflow.data.batch import Batch

    rng = np.random.default_rng(seed)
    pending: list[Any] = []
    count = 0

    def cat(parts: list[Any]) -> Any:
        pick = lambda name: None if getattr(parts[0], name) is None else np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return Batch(ids=pick("ids"), numeric=pick("numeric"), label=pick("label"), weight=pick("weight"),
                     extras=pick("extras"), time=pick("time"))

    def take(b: Any, idx: Any) -> Any:
        return Batch(*(None if x is None else x[idx] for x in b))

    for b in batches:
        kept = take(b, (b.label > 0) | (rng.random(b.rows) < rate))
        pending.append(kept)
        count += kept.rows
        while count >= batch_size:
            whole = cat(pending)
            yield take(whole, slice(0, batch_size))
            rest = take(whole, slice(batch_size, None))
            pending, count = ([rest] if rest.rows else []), rest.rows
    if count:
        yield cat(pending)


def make_predict(model: Any, spec: FeatureSpec | dict[str, Any], correction: float = 0.0):
    """A compiled (ids, numeric) -> calibrated probability function: sigmoid(logit + correction)."""
    import tensorflow as tf

    spec = FeatureSpec.from_dict(spec) if isinstance(spec, dict) else spec
    n_ids, n_num = len(spec.id_names), len(spec.numeric_names)
    return tf.function(lambda ids, numeric: tf.sigmoid(model(ids, numeric, training=False) + correction),
                       input_signature=[tf.TensorSpec([None, n_ids], tf.int32), tf.TensorSpec([None, n_num], tf.float32)])


def evaluate_stream(predict: Callable[..., Any], batches: Any) -> dict[str, Any]:
    from ctrflow.train.metrics import MetricsAccumulator

    acc = MetricsAccumulator()
    for b in batches:
        acc.add(b.label, predict(b.ids, b.numeric).numpy(), b.weight)
    return acc.result()


# --- validation, early stopping, the best checkpoint ---------------------------------------------------------
class Validation:
    """Validate, record, decide early stopping and keep the best model; the same for both loops."""

    def __init__(self, valid: Any, config: TrainConfig, checkpoints: RunCheckpoints, predict: Callable[..., Any],
                 record: Callable[[dict[str, Any]], None], t0: float) -> None:
        self.valid, self.config, self.checkpoints, self.predict, self.record, self.t0 = valid, config, checkpoints, predict, record, t0
        self.counters = checkpoints.counters
        self.last: dict[str, Any] | None = None
        self.last_step = -1
        self.stop = False
        self.seconds = 0.0  # time spent validating and saving the best model (not training throughput)

    @property
    def enabled(self) -> bool:
        return self.valid is not None

    def __call__(self, step: int, epoch: int) -> None:
        if self.valid is None:
            return
        t = time.perf_counter()
        with open_batches(self.valid, PipelineOptions(batch_size=max(self.config.batch_size, 8192), shuffle=False)) as vb:
            m = evaluate_stream(self.predict, vb)
        self.last, self.last_step = m, step
        self.record({"kind": "valid", "step": step, "examples": int(self.counters["examples"].numpy()), "epoch": epoch,
                     "seconds": time.perf_counter() - self.t0, **m})
        if m["logloss"] < float(self.counters["best"].numpy()) - 1e-6:
            self.counters["best"].assign(m["logloss"])
            self.counters["bad_validations"].assign(0)
            if self.config.restore_best:
                self.checkpoints.save_best(step)
        else:
            self.counters["bad_validations"].assign_add(1)
        patience = self.config.early_stopping_patience
        if patience and int(self.counters["bad_validations"].numpy()) >= patience:
            self.stop = True
        self.seconds += time.perf_counter() - t

    def finish(self, step: int) -> bool:
        """At the end of training: restore the best model when it is not the last one (and re-measure it,
        so the summary's metrics are the final model's). True when the best was restored."""
        if self.valid is None or not self.config.restore_best:
            return False
        t = time.perf_counter()
        restored = self.checkpoints.restore_best(step) is not None
        if restored:
            with open_batches(self.valid, PipelineOptions(batch_size=max(self.config.batch_size, 8192), shuffle=False)) as vb:
                self.last = evaluate_stream(self.predict, vb)
        self.seconds += time.perf_counter() - t
        return restored


# --- history and summary -------------------------------------------------------------------------------------
class RunHistory:
    """A run folder's `history.jsonl` and TensorBoard scalars. Opening it for a resumed run keeps only
    the lines the restored checkpoint had seen: the steps after it are redone and recorded again."""

    def __init__(self, run: Path, resumed_from_step: int) -> None:
        import tensorflow as tf

        from ctrflow.atomic import atomic_write_text

        self.path = run / "history.jsonl"
        self.entries: list[dict[str, Any]] = []
        with write_errors(str(self.path)):
            if self.path.exists():
                lines = self.path.read_text().splitlines()
                self.entries = [h for h in map(json.loads, lines) if h["step"] <= resumed_from_step]
                atomic_write_text(self.path, "".join(json.dumps(h) + "\n" for h in self.entries))
            self._file = open(self.path, "a")
            self._writer = tf.summary.create_file_writer(str(run / "tensorboard"))

    def record(self, entry: dict[str, Any]) -> None:
        import tensorflow as tf

        self.entries.append(entry)
        with write_errors(str(self.path)):
            self._file.write(json.dumps(entry, default=float) + "\n")
            self._file.flush()
        with self._writer.as_default(step=entry["examples"]):
            for k, v in entry.items():
                if k not in ("kind", "step", "examples", "epoch", "seconds") and isinstance(v, (int, float)):
                    tf.summary.scalar(f"{entry['kind']}/{k}", v)

    def close(self, best_step: int | None = None) -> None:
        """Close the files and draw learning_curves.png (a failed plot never hides training's outcome)."""
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(Exception):
            self._writer.close()
        try:
            plot_curves(self.path.parent, self.entries, best_step=best_step)
        except Exception:  # matplotlib raises many types; the PNG is a convenience
            pass


def plot_curves(run: Path, history: list[dict[str, Any]], *, best_step: int | None = None) -> None:
    """learning_curves.png: train logloss per log interval and every validation, with markers (a short
    run of one or two points still shows them), the best validation ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctrflow.atomic import atomic_writer

    tr = [h for h in history if h["kind"] == "train"]
    va = [h for h in history if h["kind"] == "valid"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    handles = []
    if tr:
        handles += ax.plot([h["examples"] for h in tr], [h["logloss"] for h in tr], ".-", markersize=6 if len(tr) < 50 else 2,
                           label="train logloss (interval mean)", color="tab:blue")
    if va:
        handles += ax.plot([h["examples"] for h in va], [h["logloss"] for h in va], "o-", markersize=7, label="valid logloss",
                           color="tab:orange")
        best = [h for h in va if h["step"] == best_step] or [min(va, key=lambda h: h["logloss"])]
        handles += ax.plot([best[-1]["examples"]], [best[-1]["logloss"]], "o", markersize=14, markerfacecolor="none",
                           markeredgecolor="tab:red", markeredgewidth=2, label=f"best valid (step {best[-1]['step']})")
        if any(math.isfinite(h.get("auc", float("nan"))) for h in va):
            ax2 = ax.twinx()
            handles += ax2.plot([h["examples"] for h in va], [h.get("auc", float("nan")) for h in va], "s--", markersize=6,
                                color="tab:green", label="valid AUC (right axis)")
            ax2.set_ylabel("AUC")
    xs = [h["examples"] for h in tr + va]
    if xs and max(xs) == min(xs):  # one point: give the axis a width so it is drawn mid-plot
        ax.set_xlim(0, 2 * max(xs) or 1)
    ax.set_xlabel("examples seen")
    ax.set_ylabel("logloss")
    ax.set_title(f"learning curves — {run.name} ({len(tr)} train, {len(va)} valid points)")
    if handles:  # below the axes: a legend inside hides the points of short runs
        fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no steps recorded", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    with atomic_writer(run / "learning_curves.png") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def finish_run(run: Path, counters: dict[str, Any], history: list[dict[str, Any]], *, seconds: float, overhead_s: float,
               start_examples: int, steps: int, running_logloss: float, validation: Validation, source: ValidationSource,
               stopped_early: bool, resumed_from: int, warm_from: str | None, checkpoint: str | None, restored_best: bool,
               config: TrainConfig, refit: dict[str, Any] | None = None) -> TrainSummary:
    """The run's summary (examples/s without validation and checkpoint time), also written to summary.json."""
    tr_hist = [h for h in history if h["kind"] == "train"]
    best = float(counters["best"].numpy())
    examples = int(counters["examples"].numpy())
    best_step = validation.checkpoints.best_step if validation.enabled and config.restore_best else None
    summary = TrainSummary(
        run=str(run), steps=steps, examples=examples, seconds=seconds,
        examples_per_s=(examples - start_examples) / max(seconds - overhead_s, 1e-9),
        train_logloss=tr_hist[-1]["logloss"] if tr_hist else running_logloss,
        valid=validation.last, best_valid_logloss=None if math.isinf(best) else best, stopped_early=stopped_early,
        resumed_from_step=resumed_from, warm_started_from=warm_from, checkpoint=checkpoint, valid_source=source.source,
        valid_note=source.note, epochs=int(counters["epoch"].numpy()), best_step=best_step if best_step and best_step >= 0 else None,
        restored_best=restored_best, learning_rates={g: config.effective_learning_rate(g) for g in OPTIMIZER_GROUPS},
        negative_sampling_rate=config.negative_sampling_rate, refit=refit, history=history,
    )
    with write_errors(str(run / "summary.json")):
        atomic_write_json(run / "summary.json", summary.to_dict())
    return summary


def write_run_info(run: Path, info: dict[str, Any]) -> None:
    """Create the run folder (if new) and write run.json atomically; a full disk leaves no temp file."""
    with write_errors(str(run / RUN_FILE)):
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run / RUN_FILE, info)


def ckpt_step(checkpoints: RunCheckpoints) -> int:
    return checkpoint_step(checkpoints.latest)


__all__ += ["sample_negatives", "write_run_info", "ckpt_step", "evaluate_stream", "plot_curves", "CHECKPOINTS", "HOLDOUT_DIR"]
