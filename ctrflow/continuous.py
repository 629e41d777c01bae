"""Continuous training: follow time-ordered shard sets as they land, warm-start, gate, publish.

`continuous_train(incoming, model_base_path, state)` watches `incoming/` for shard folders written by
`ctrflow convert` (a folder is ready once its `manifest.json` exists) and turns each new one, a *slice*,
into a candidate model; the candidate replaces the published model only if it is not worse.

Behaviour, for each new slice, oldest first (by the manifest's `time_range`, then by name):
1. check: a manifest that cannot be read, a damaged shard (`verify`) or fewer than `min_slice_rows`
   rows → *quarantined* (moved to `state/quarantine/`); another schema or other transforms than the
   line's (convert it `--like` the first slice) → *rejected*. Either way the loop goes on.
2. split: the last `holdout_fraction` of the slice's rows by time become its *gate rows*, never trained
   on (progressive validation on a held-out tail: each slice is decided as soon as it lands).
3. train: into `state/runs/<slice>/`, warm-started (model and optimizer state) from the *line*: the run
   of the last published slice. Optionally, table rows no line slice touched in the last
   `reset_stale_after_slices` slices go back to their initial values (optimizer slots too) first.
4. gate: the candidate and the published model are evaluated on the gate rows; the candidate is
   published if its logloss is finite and at most `(1 + tolerance)` times the published model's (the
   first candidate is held against a constant predictor at the training rows' click rate). A loss that
   turns NaN while training (`TrainingError`) rejects the candidate too. Rejected: the published
   version stays and the next slice starts again from the line.
5. publish: `export` into `model_base_path/<newest + 1>/` (built aside, renamed when complete), which a
   server watching the base path picks up; the decision is appended to `state/decisions.jsonl`.

The state folder:
    decisions.jsonl   one JSON object per decided slice (the source of truth; `status` prints it)
    state.json        a summary derived from it: line run, published version, counts (written atomically)
    lock              `flock`ed while a process follows this state; holds that process's pid
    runs/<slice>/     the training run of each slice (the line's and the last `keep_runs` others kept)
    work/<slice>/     the slice's train/gate split (and reset warm start) while it is being processed
    quarantine/       slices that could not be read
    touched.npz       per field, the line slice that last touched each table row (with the reset option)

Crash safety: a slice goes through split → train → gate → export → log, and each step is atomic or
resumable, so `kill -9` at any point and a rerun on the same state finish the slice exactly once: the
split and the gate result are reused once written, `train` resumes its own run folder, a version whose
`ctrflow.json` names the slice's run means the export already happened (it is logged, never made
twice), a torn last line of the log is dropped. Versions are only ever visible complete.

Example:
    summary = continuous_train("incoming", "models/ctr", "state", TrainConfig(model=ModelConfig("fm")),
                               ContinuousOptions(tolerance=0.01), once=True)
    for d in read_decisions("state"):
        print(d["slice"], d["decision"], d["version"], d["reason"])
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ctrflow.atomic import atomic_write_json, atomic_writer
from ctrflow.data import shards as shardio
from ctrflow.errors import ConfigError, CtrflowError, ShardCorruptError, TrainingError
from ctrflow.train.config import TrainConfig
from ctrflow.validation import Choice, Float, Int, check_fields

__all__ = [
    "ContinuousOptions",
    "Decision",
    "ContinuousSummary",
    "StateLockedError",
    "StateLock",
    "continuous_train",
    "read_decisions",
    "status",
    "DECISIONS_FILE",
    "STATE_FILE",
]

DECISIONS_FILE = "decisions.jsonl"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
GATE_FILE = "gate.json"  # in runs/<slice>/: the gate's result, written before the export
TOUCHED_FILE = "touched.npz"
_MODEL_SHAPE_KEYS = ("kind", "embedding_dim", "hidden", "table_mode", "batch_norm")

EventFn = Callable[["Decision"], None]


class StateLockedError(CtrflowError):
    """Another process follows the same state folder; the message names its pid."""


@dataclass(frozen=True)
class ContinuousOptions:
    """How slices are gated and published. Every field is checked once, here.

    Args:
        tolerance: how much worse than the published model a candidate may be and still be published:
            its gate logloss must be <= published logloss x (1 + tolerance). >= 0; default 0.01 (1 %).
            0 publishes only candidates at least as good; large values publish anything finite.
        holdout_fraction: share of each slice's rows, the latest by time (ties: the last in file order),
            held out as gate rows and never trained on. In (0, 0.5]; default 0.1.
        min_slice_rows: a slice with fewer rows is quarantined (its gate would be noise). >= 10; default 100.
        reset_stale_after_slices: None (default) keeps every row; K >= 1 resets the table rows (linear
            weights, embeddings and their optimizer slots) that no published slice touched in the last K
            published slices to their initial values before the next slice trains, so rows of ids
            that left the traffic stop carrying stale weights. Tracking starts when first enabled.
        poll_seconds: pause between scans of the incoming folder when not `once`, > 0; default 30.
        max_polls: stop after this many scans (None, default: until stopped or interrupted).
        keep_runs: run folders kept besides the line's (the newest decided slices), >= 0; default 3.
        embedding_dtype: tables of the published export, "float32" (default) or "float16". (Packed
            tables follow `export`'s default, pack_tables="auto": FM versions are packed.)
    """

    tolerance: float = 0.01
    holdout_fraction: float = 0.1
    min_slice_rows: int = 100
    reset_stale_after_slices: int | None = None
    poll_seconds: float = 30.0
    max_polls: int | None = None
    keep_runs: int = 3
    embedding_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_fields(self, {
            "tolerance": Float(0), "holdout_fraction": Float(0, 0.5, low_open=True), "min_slice_rows": Int(10),
            "reset_stale_after_slices": Int(1, optional=True), "poll_seconds": Float(0, low_open=True),
            "max_polls": Int(1, optional=True), "keep_runs": Int(0), "embedding_dtype": Choice(("float32", "float16")),
        })


@dataclass
class Decision:
    """What happened to one slice: one line of `decisions.jsonl`."""

    slice: str
    decision: str  # "published" | "rejected" | "quarantined"
    reason: str
    version: int | None = None  # the published version (published only)
    candidate: dict[str, Any] | None = None  # the candidate's metrics on the gate rows
    published: dict[str, Any] | None = None  # the then-published model's metrics on the same rows
    baseline_logloss: float | None = None  # a constant predictor at the training rows' click rate
    rows_train: int = 0
    rows_gate: int = 0
    time_range: list[int] | None = None
    run: str | None = None  # the candidate's run folder, relative to the state folder ("runs/<slice>")
    warm_start: str | None = None  # the run (or reset copy of it) the candidate started from, same
    reset_rows: int = 0  # table rows reset before training (reset_stale_after_slices)
    live_rows: int | None = None  # rows touched by the line within the last K slices (with the reset option)
    seconds: dict[str, float] = field(default_factory=dict)  # split, train, gate, export, total
    unix: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ContinuousSummary:
    state: str
    decisions: list[Decision]  # made by this call, in order
    published_version: int | None  # the line's newest version after this call
    line_run: str | None
    polls: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decisions"] = [x.to_dict() for x in self.decisions]
        counts = {k: sum(x.decision == k for x in self.decisions) for k in ("published", "rejected", "quarantined")}
        return {**d, **counts}


# ------------------------------------------------------------------------------------------------
# Small durable-file helpers.
# ------------------------------------------------------------------------------------------------
def _write_json(path: Path, data: Any) -> None:
    atomic_write_json(path, data, default=_json_default)


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return str(x)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_decisions(state: str | os.PathLike) -> list[dict[str, Any]]:
    """Every decision logged in `state/decisions.jsonl`, oldest first (a torn last line is skipped)."""
    path = Path(state) / DECISIONS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # only the last line can be torn (kill during append); repaired on the next run
            continue
    return out


class StateLock:
    """An exclusive, non-blocking `flock` on `state/lock`: one process follows a state folder at a time.

    The lock dies with its process (kill -9 included), so a stale lock never blocks a restart.
    """

    def __init__(self, state: str | os.PathLike) -> None:
        self.state = Path(state)
        self._fd: int | None = None

    def __enter__(self) -> "StateLock":
        self.state.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StateLockedError(
                    f"{self.state} is in use by another `ctrflow continuous` (pid {holder}): stop that process "
                    "first, or give this one another --state folder."
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # no holder any more (after kill -9 the pid stays, but is dead)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# ------------------------------------------------------------------------------------------------
# The follower: one state folder, one line of published runs.
# ------------------------------------------------------------------------------------------------
class _Follower:
    def __init__(self, incoming: Path, base: Path, state: Path, config: TrainConfig, options: ContinuousOptions,
                 on_event: EventFn | None, on_progress: Callable[..., None] | None) -> None:
        self.incoming, self.base, self.state = incoming, base, state
        self.config, self.options = config, options
        self.on_event, self.on_progress = on_event, on_progress
        self.runs, self.work, self.quarantine = state / "runs", state / "work", state / "quarantine"
        self.log: list[dict[str, Any]] = []

    # --- the log and what derives from it -------------------------------------------------------
    def recover(self) -> None:
        """Repair what a crash can leave: a torn log line, temp folders; then rewrite state.json."""
        for d in (self.runs, self.work, self.quarantine):
            d.mkdir(parents=True, exist_ok=True)
        path = self.state / DECISIONS_FILE
        if path.exists():
            raw = path.read_bytes()
            keep = raw if raw.endswith(b"\n") or not raw else raw[: raw.rfind(b"\n") + 1]
            if keep != raw:  # a torn append: drop it, the slice is redone from its saved steps
                with open(path, "r+b") as f:
                    f.truncate(len(keep))
                    f.flush()
                    os.fsync(f.fileno())
        self.log = read_decisions(self.state)
        decided = self.decided
        for p in list(self.work.iterdir()):  # splits of decided slices (killed before the cleanup), temp folders
            if p.name in decided or ".partial-" in p.name:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.work.glob("*/*.partial-*"):
            shutil.rmtree(p, ignore_errors=True)
        if self.base.is_dir():  # export's temp folders (.tmp-<version>-<pid>) of dead processes
            for p in self.base.glob(".tmp-*-*"):
                pid = p.name.rsplit("-", 1)[-1]
                if pid.isdigit() and not _pid_alive(int(pid)):
                    shutil.rmtree(p, ignore_errors=True)
        self._check_config_matches_line()
        self._write_state()

    @property
    def decided(self) -> set[str]:
        return {d["slice"] for d in self.log}

    @property
    def line(self) -> dict[str, Any] | None:
        """The last published decision (its run is the line's head), or None."""
        return next((d for d in reversed(self.log) if d["decision"] == "published"), None)

    def line_run(self) -> Path | None:
        head = self.line
        return self.state / head["run"] if head else None

    def line_info(self) -> dict[str, Any] | None:
        from ctrflow.train.core import load_run_info

        run = self.line_run()
        return load_run_info(run) if run is not None else None

    def _check_config_matches_line(self) -> None:
        info = self.line_info()
        if info is None:
            return
        theirs, mine = info["config"]["model"], self.config.to_dict()["model"]
        diff = {k: (theirs.get(k), mine.get(k)) for k in _MODEL_SHAPE_KEYS if theirs.get(k) != mine.get(k)}
        if diff:
            raise ConfigError(
                f"the line in {self.state} holds a model of other shapes than this config asks for "
                f"({', '.join(f'{k}: {a} there, {b} here' for k, (a, b) in diff.items())}): use the same model "
                "settings, or start a new line with another --state folder."
            )

    def _write_state(self) -> None:
        head = self.line
        counts = {k: sum(d["decision"] == k for d in self.log) for k in ("published", "rejected", "quarantined")}
        _write_json(self.state / STATE_FILE, {
            "incoming": str(self.incoming), "model_base_path": str(self.base),
            "line_run": head["run"] if head else None, "published_version": head["version"] if head else None,
            "last_slice": self.log[-1]["slice"] if self.log else None, "slices": len(self.log), **counts,
            "updated_unix": time.time(),
        })

    def _append(self, decision: Decision) -> None:
        decision.unix = time.time()
        line = json.dumps(decision.to_dict(), default=_json_default) + "\n"
        with open(self.state / DECISIONS_FILE, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.log.append(json.loads(line))
        self._write_state()
        self._cleanup(decision)
        if self.on_event:
            self.on_event(decision)

    def _cleanup(self, decision: Decision) -> None:
        shutil.rmtree(self.work / decision.slice, ignore_errors=True)
        if decision.decision == "quarantined":
            self._move_to_quarantine(decision.slice)
        head = self.line
        trained = [d["run"] for d in self.log if d.get("run")]
        keep = set(trained[max(0, len(trained) - self.options.keep_runs):])
        keep.update([head["run"]] if head else [])
        for run in trained:
            if run not in keep:
                shutil.rmtree(self.state / run, ignore_errors=True)

    def _move_to_quarantine(self, name: str) -> None:
        src = self.incoming / name
        if not src.exists():
            return
        dst = self.quarantine / name
        if dst.exists():
            dst = self.quarantine / f"{name}.{int(time.time())}"
        try:
            shutil.move(str(src), str(dst))
        except OSError:  # a read-only incoming folder: the decision is logged, the slice stays where it is
            pass

    # --- scanning -------------------------------------------------------------------------------
    def ready(self) -> list[str]:
        """Names of new ready slices, oldest first (manifest time_range, then name)."""
        if not self.incoming.is_dir():
            raise ConfigError(f"{self.incoming}: no such incoming folder.")
        decided = self.decided
        found = []
        for p in self.incoming.iterdir():
            if p.name.startswith(".") or ".partial-" in p.name or not p.is_dir():
                continue
            if p.name in decided:
                if any(d["slice"] == p.name and d["decision"] == "quarantined" for d in self.log):
                    self._move_to_quarantine(p.name)  # logged, then killed before the move
                continue
            if not (p / shardio.MANIFEST).exists():
                continue  # still being written
            try:
                tr = json.loads((p / shardio.MANIFEST).read_text()).get("time_range")
                start = float(tr[0]) if tr else math.inf
            except (ValueError, OSError, TypeError, AttributeError, IndexError):
                start = -math.inf  # unreadable: quarantined first
            found.append((start, p.name))
        return [name for _, name in sorted(found)]

    # --- one slice ------------------------------------------------------------------------------
    def process(self, name: str) -> Decision:
        t0 = time.perf_counter()
        secs: dict[str, float] = {}
        src = self.incoming / name
        try:
            man = shardio.load_manifest(src)
            report = shardio.verify(src)
        except (ShardCorruptError, OSError, KeyError, TypeError) as e:
            return self._decide(Decision(name, "quarantined", f"unreadable: {e}"), t0, secs)
        if not report["ok"]:
            what = "; ".join(d["reason"] for d in report["damaged"][:3]) or \
                f"{report['rows']} rows in the shards, the manifest says {report['expected_rows']}"
            return self._decide(Decision(name, "quarantined", f"damaged: {what}"), t0, secs)
        if man.rows < self.options.min_slice_rows:
            return self._decide(Decision(name, "quarantined", f"only {man.rows} rows (min_slice_rows {self.options.min_slice_rows})"), t0, secs)
        time_range = man.data.get("time_range")
        info = self.line_info()
        if info is not None:
            if man.data["schema_fingerprint"] != info["schema_fingerprint"]:
                return self._decide(Decision(
                    name, "rejected", f"schema: fingerprint {man.data['schema_fingerprint']}, the line's is "
                    f"{info['schema_fingerprint']} (convert the slice --like the first one)", time_range=time_range), t0, secs)
            if man.data["transforms"] != info["transforms"]:
                return self._decide(Decision(
                    name, "rejected", "schema: other discretizer boundaries than the line's (convert the slice "
                    "--like the first one)", time_range=time_range), t0, secs)

        t = time.perf_counter()
        train_dir, gate_dir, split = _split(src, self.work / name, self.options.holdout_fraction)
        secs["split"] = time.perf_counter() - t
        run = self.runs / name
        line_run = self.line_run()
        ordinal = sum(d["decision"] == "published" for d in self.log)  # this slice's place in the line
        trained = _run_complete(run, self.config)
        start = self._warm_start(name, info, line_run, ordinal, trained)
        warm = self.state / start["warm_start"] if start["warm_start"] else None
        base = Decision(name, "rejected", "", rows_train=split["rows_train"], rows_gate=split["rows_gate"],
                        time_range=time_range, run=self._relative(run), **start,
                        baseline_logloss=split["baseline_logloss"])

        t = time.perf_counter()
        if not trained:
            from ctrflow.train.loop import train

            try:  # the gate rows are this slice's validation: no second split inside the slice
                train(train_dir, run, self.config.replace(holdout_fraction=0.0), warm_start=warm, on_progress=self.on_progress)
            except TrainingError as e:
                secs["train"] = time.perf_counter() - t
                base.reason = f"diverged: {e}"
                return self._decide(base, t0, secs)
        secs["train"] = time.perf_counter() - t

        t = time.perf_counter()
        gate = self._gate(run, line_run, gate_dir, split["baseline_logloss"])
        secs["gate"] = time.perf_counter() - t
        base.candidate, base.published, base.reason = gate["candidate"], gate["published"], gate["reason"]
        if not gate["pass"]:
            return self._decide(base, t0, secs)

        t = time.perf_counter()
        head = self.line
        version = _exported_version(self.base, name, after=head["version"] if head else -1)
        if version is None:
            from ctrflow.export import export

            version = export(run, self.base, embedding_dtype=self.options.embedding_dtype).version
        secs["export"] = time.perf_counter() - t
        if self.options.reset_stale_after_slices:
            touched = _Touched.load(self.state / TOUCHED_FILE, (info or _load_run_json(run))["feature_spec"])
            touched.apply(name, train_dir, ordinal, self.options.reset_stale_after_slices)
        base.decision, base.version = "published", version
        return self._decide(base, t0, secs)

    def _warm_start(self, name: str, info: dict[str, Any] | None, line_run: Path | None, ordinal: int,
                    trained: bool) -> dict[str, Any]:
        """Where the candidate starts: the line's run, or a copy of it with stale rows reset. Saved in
        work/<slice>/warm.json once decided, so a rerun reports the same."""
        path = self.work / name / "warm.json"
        if path.exists():
            return json.loads(path.read_text())
        out: dict[str, Any] = {"warm_start": self._relative(line_run) if line_run else None, "reset_rows": 0, "live_rows": None}
        k = self.options.reset_stale_after_slices
        if k and info is not None and line_run is not None and not trained:
            touched = _Touched.load(self.state / TOUCHED_FILE, info["feature_spec"])
            stale = touched.stale(ordinal, k)
            out["live_rows"] = touched.live(ordinal, k)
            out["reset_rows"] = int(sum(int(s.sum()) for s in stale.values()))
            if out["reset_rows"]:
                out["warm_start"] = self._relative(_reset_rows_copy(line_run, self.work / name / "warm", stale))
        _write_json(path, out)
        return out

    def _relative(self, path: Path) -> str:
        return str(path.relative_to(self.state)) if path.is_relative_to(self.state) else str(path)

    def _decide(self, decision: Decision, t0: float, secs: dict[str, float]) -> Decision:
        decision.seconds = {**{k: round(v, 3) for k, v in secs.items()}, "total": round(time.perf_counter() - t0, 3)}
        self._append(decision)
        return decision

    def _gate(self, run: Path, line_run: Path | None, gate_dir: Path, baseline: float) -> dict[str, Any]:
        """Evaluate candidate and published model on the gate rows; saved in run/gate.json, reused after a crash."""
        path = run / GATE_FILE
        if path.exists():
            return json.loads(path.read_text())
        import logging

        from ctrflow.train.evaluate import evaluate

        # Each evaluate traces its own model's function: expected here, so TensorFlow's retracing
        # warning (logged from the second slice on) is held back while the gate runs.
        tf_log = logging.getLogger("tensorflow")
        level = tf_log.level
        tf_log.setLevel(max(level, logging.ERROR))
        try:
            cand = _metrics(evaluate(run, gate_dir))
            pub = _metrics(evaluate(line_run, gate_dir)) if line_run is not None else None
        finally:
            tf_log.setLevel(level)
        tol = self.options.tolerance
        ref_name, ref = ("published", pub["logloss"]) if pub and math.isfinite(pub["logloss"]) else ("constant-rate baseline", baseline)
        limit = ref * (1 + tol)
        c = cand["logloss"]
        if not math.isfinite(c):
            ok, reason = False, f"diverged: candidate gate logloss is {c}"
        else:
            ok = c <= limit
            reason = (f"gate logloss {c:.5f} vs {ref_name} {ref:.5f} (limit {limit:.5f}, tolerance {tol:g}): "
                      f"{'not worse' if ok else 'worse beyond tolerance'}")
        result = {"pass": ok, "reason": reason, "candidate": cand, "published": pub, "baseline_logloss": baseline}
        _write_json(path, result)
        return result


def _metrics(m: dict[str, Any]) -> dict[str, Any]:
    keep = ("logloss", "auc", "ne", "calibration", "rows", "positives", "bayes_logloss", "logloss_gap")
    return {k: m[k] for k in keep if k in m}


def _load_run_json(run: Path) -> dict[str, Any]:
    from ctrflow.train.core import load_run_info

    return load_run_info(run)


def _run_complete(run: Path, config: TrainConfig) -> bool:
    """Whether `run` finished training (so it is never trained twice). `train` writes summary.json last."""
    if (run / "summary.json").exists():
        return True
    if config.max_steps and (run / "checkpoints" / "checkpoint").exists():
        import tensorflow as tf

        latest = tf.train.latest_checkpoint(str(run / "checkpoints"))
        return bool(latest) and int(latest.rsplit("-", 1)[-1]) >= config.max_steps
    return False


def _exported_version(base: Path, name: str, *, after: int) -> int | None:
    """The version newer than `after` exported from the run of slice `name`, if any: the export was made
    but the process died before logging it. (Each export records its run folder in ctrflow.json; only
    the folder's last two parts are compared, so a moved state folder still matches.)"""
    from ctrflow.export import EXPORT_INFO, find_versions

    for v in find_versions(base):
        if v <= after:
            continue
        try:
            if Path(json.loads((base / str(v) / EXPORT_INFO).read_text()).get("run", "")).parts[-2:] == ("runs", name):
                return v
        except (OSError, ValueError):
            continue
    return None


# ------------------------------------------------------------------------------------------------
# The train / gate split of a slice.
# ------------------------------------------------------------------------------------------------
def _labels(folder: str) -> tuple[np.ndarray, np.ndarray | None]:
    parts = [shardio.read_shard(p) for p in shardio.load_manifest(folder).shard_paths()]
    label = np.concatenate([p.label for p in parts])
    weight = None if parts[0].weight is None else np.concatenate([p.weight for p in parts])
    return label, weight


def _split(src: Path, work: Path, fraction: float) -> tuple[Path, Path, dict[str, Any]]:
    """Cut a slice into train rows and gate rows (its latest `fraction` by time: the trainer's held-out
    split, `ctrflow.train.holdout`), with the gate's constant-rate baseline. Reused once complete."""
    from ctrflow.train.holdout import hold_out
    from ctrflow.train.metrics import logloss

    info_path = work / "gate-split.json"
    h = hold_out(src, work / "split", fraction)
    if info_path.exists():
        return Path(h.train), Path(h.valid), json.loads(info_path.read_text())
    label, w = _labels(h.train)
    rate = float(np.average(label, weights=w)) if w is None or w.sum() > 0 else float(label.mean())
    rate = min(max(rate, 1e-6), 1 - 1e-6)
    gate_label, gate_w = _labels(h.valid)
    info = {"rows_train": h.rows_train, "rows_gate": h.rows_valid, "train_ctr": rate,
            "baseline_logloss": logloss(gate_label, np.full(len(gate_label), rate, np.float32), gate_w)}
    _write_json(info_path, info)
    return Path(h.train), Path(h.valid), info


# ------------------------------------------------------------------------------------------------
# Vocabulary: which table rows the line touched when, and resetting the stale ones.
# ------------------------------------------------------------------------------------------------
class _Touched:
    """Per active id field, the line ordinal of the published slice that last touched each row (-1: none)."""

    def __init__(self, path: Path, columns: list[int], last: dict[int, np.ndarray], applied: list[str]) -> None:
        self.path, self.columns, self.last, self.applied = path, columns, last, applied

    @classmethod
    def load(cls, path: Path, feature_spec: dict[str, Any]) -> "_Touched":
        from ctrflow.data.batch import FeatureSpec

        spec = FeatureSpec.from_dict(feature_spec)
        columns = list(spec.active_id_columns)
        if path.exists():
            with np.load(path, allow_pickle=False) as z:
                last = {c: z[f"c{c}"].copy() for c in columns}
                applied = [str(s) for s in z["applied"]]
            return cls(path, columns, last, applied)
        return cls(path, columns, {c: np.full(int(spec.id_buckets[c]), -1, np.int32) for c in columns}, [])

    def stale(self, ordinal: int, k: int) -> dict[int, np.ndarray]:
        """Rows touched once, but by none of the last k line slices (before slice `ordinal`)."""
        return {c: (v >= 0) & (v < ordinal - k) for c, v in self.last.items()}

    def live(self, ordinal: int, k: int) -> int:
        return int(sum(int(((v >= 0) & (v >= ordinal - k)).sum()) for v in self.last.values()))

    def apply(self, name: str, train_dir: Path, ordinal: int, k: int) -> None:
        """Record that published slice `name` (line ordinal `ordinal`) touched its rows. Idempotent."""
        if name in self.applied:
            return
        for c, s in self.stale(ordinal, k).items():  # rows reset before this slice count as untouched again
            self.last[c][s] = -1
        man = shardio.load_manifest(train_dir)
        for p in man.shard_paths():
            ids = shardio.read_shard(p).ids
            for c in self.columns:
                self.last[c][np.unique(ids[:, c])] = ordinal
        self.applied.append(name)
        with atomic_writer(self.path) as f:
            np.savez(f, applied=np.array(self.applied, dtype=str), **{f"c{c}": v for c, v in self.last.items()})


def _reset_rows_copy(line_run: Path, out: Path, stale: dict[int, np.ndarray]) -> Path:
    """A run folder holding `line_run`'s latest state with the `stale` rows (per ids column) back at their
    initial values, optimizer slots included: the warm start of the next candidate. Reused once complete."""
    import tensorflow as tf

    from ctrflow.data.batch import FeatureSpec
    from ctrflow.models.layers import FieldTables
    from ctrflow.train.core import RUN_FILE, load_run_info
    from ctrflow.train.loop import Trainer

    if tf.train.latest_checkpoint(str(out / "checkpoints")):
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    info = load_run_info(line_run)
    config, spec = TrainConfig.from_dict(info["config"]), FeatureSpec.from_dict(info["feature_spec"])
    state = Trainer(out, config, spec)  # the same checkpoint layout as the line's runs
    state.ckpt.read(tf.train.latest_checkpoint(str(line_run / "checkpoints"))).assert_existing_objects_matched()
    fresh = Trainer(out / "fresh-unsaved", config, spec)  # initial values of every table and slot
    tables = [m for m in state.model.submodules if isinstance(m, FieldTables)]
    fresh_tables = [m for m in fresh.model.submodules if isinstance(m, FieldTables)]
    for mine, init in zip(tables, fresh_tables):
        lay = mine.layout
        if lay is not state.model.layout:
            # Not a per-field table: the hashed pair crosses' rows are not ids of one column (found in
            # review: field 0's stale ids zeroed unrelated cross rows, or ran past a smaller table). A
            # cross of a stale id keeps its weight; it is trained by that pair's rows only.
            continue
        fields = [np.flatnonzero(stale[c]) for c in lay.id_columns]
        if mine.table_mode == "shared":
            per_table = [np.concatenate([off + rows for off, rows in zip(lay.offsets, fields)])]
        else:
            per_table = fields  # one table per id field; the numerics' table (last, if any) is never stale
        for var, var0, rows in zip(mine.tables, init.tables, per_table):
            if not len(rows):
                continue
            idx = tf.constant(rows, tf.int64)
            var.scatter_update(tf.IndexedSlices(tf.gather(var0, idx), idx))
            key = var.name[:-2] if var.name.endswith(":0") else var.name
            for group, opt in state.optimizer.optimizers.items():
                for slot_name, slot in opt.slots.get(key, {}).items():
                    slot0 = fresh.optimizer.optimizers[group].slots[key][slot_name]
                    slot.scatter_update(tf.IndexedSlices(tf.gather(slot0, idx), idx))
    atomic_write_json(out / RUN_FILE, json.loads((line_run / RUN_FILE).read_text()))
    state.manager.save(checkpoint_number=int(state.step.numpy()))  # the index file is written last
    return out


# ------------------------------------------------------------------------------------------------
# The API.
# ------------------------------------------------------------------------------------------------
def continuous_train(
    incoming: str | os.PathLike,
    model_base_path: str | os.PathLike,
    state: str | os.PathLike,
    config: TrainConfig = TrainConfig(),
    options: ContinuousOptions = ContinuousOptions(),
    *,
    once: bool = False,
    stop: threading.Event | None = None,
    on_event: EventFn | None = None,
    on_progress: Callable[..., None] | None = None,
) -> ContinuousSummary:
    """Follow `incoming` for new shard folders; train, gate and publish each (see the module docstring).

    Args:
        incoming: folder whose sub-folders are slices (`ctrflow convert --out incoming/<name>`, the
            later ones `--like` the first).
        model_base_path: `MODELS/NAME`: published versions go to `<newest + 1>/` inside.
        state: the state folder (created); one process at a time (else `StateLockedError`).
        config: how each slice is trained (epochs are passes over the slice). Its model shapes must
            match the line's; the optimizer state carries over when its optimizer settings do too.
        options: gate, split, reset and polling settings.
        once: process every ready slice, then return. Otherwise scan every `options.poll_seconds`
            until `stop` is set, `options.max_polls` scans were made, or KeyboardInterrupt (any point
            is safe: a rerun finishes the slice in progress).
        on_event: called with each `Decision` once it is logged.
        on_progress: passed to `train` for each slice.
    """
    t0 = time.perf_counter()
    state_dir = Path(state).resolve()
    stop = stop or threading.Event()
    made: list[Decision] = []
    polls = 0

    def record(d: Decision) -> None:
        made.append(d)
        if on_event:
            on_event(d)

    with StateLock(state_dir):
        follower = _Follower(Path(incoming).resolve(), Path(model_base_path).resolve(), state_dir, config, options,
                             record, on_progress)
        follower.recover()
        while True:
            for name in follower.ready():
                if stop.is_set():
                    break
                follower.process(name)
            polls += 1
            if once or stop.is_set() or (options.max_polls and polls >= options.max_polls):
                break
            if stop.wait(options.poll_seconds):
                break
        head = follower.line
    return ContinuousSummary(state=str(state_dir), decisions=made, published_version=head["version"] if head else None,
                             line_run=str(state_dir / head["run"]) if head else None, polls=polls, seconds=time.perf_counter() - t0)


def status(state: str | os.PathLike) -> dict[str, Any]:
    """The state folder at a glance, without taking its lock: state.json, every decision, who runs it."""
    state = Path(state)
    if not state.is_dir():
        raise ConfigError(f"{state}: no such state folder.")
    decisions = read_decisions(state)
    head = next((d for d in reversed(decisions) if d["decision"] == "published"), None)
    pid = None
    lock = state / LOCK_FILE
    if lock.exists():
        text = lock.read_text().strip()
        pid = int(text) if text.isdigit() and _pid_alive(int(text)) else None
    counts = {k: sum(d["decision"] == k for d in decisions) for k in ("published", "rejected", "quarantined")}
    return {"state": str(state), "published_version": head["version"] if head else None,
            "line_run": str(state / head["run"]) if head else None, "slices": len(decisions), **counts,
            "running_pid": pid, "decisions": decisions}
