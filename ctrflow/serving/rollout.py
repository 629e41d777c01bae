"""Safe rollouts: traffic split by weight with sticky users, shadow traffic, sampled request logging.

Configured under `rollouts:` in the YAML/JSON model config (`ctrflow.serving.config`)::

    rollouts:
      - name: ctr                       # what clients call: POST /v1/models/ctr:predict (no /versions, no /labels)
        key: {header: X-User-Id}        # or {feature: C14} (the first candidate's value); no key: a random arm
        arms:                           # weights are relative (90/10 = 90 % / 10 %)
          - {model: ctr, label: stable, weight: 90}    # label:, version:, or neither (the newest)
          - {model: ctr, label: canary, weight: 10}
        shadow: {model: ctr_next, fraction: 0.05}       # optional: mirror 5 % to a candidate, answers unchanged
        log: {path: logs/ctr, fraction: 0.01, rows_per_shard: 50000}   # optional: sampled request logging

- **Key**: a header (REST) / call metadata entry (gRPC), or a feature's value in the first candidate,
  read from every body a predict takes: JSON `instances`/`inputs`/`columns`, the binary columnar
  body, gRPC `inputs` tensors (`key_from_json`, `key_from_columnar`, `key_from_tensors`); values are
  normalised (bytes as UTF-8 text, 3.0 as "3") so one user gets the same arm whichever protocol he uses.
- **Split**: weighted rendezvous hashing of the key (`choose_arm`): a key always lands on the same arm,
  and changing one arm's weight moves only the keys that must move (no reshuffle of everyone).
  Per-arm figures (requests, rows, errors, latency) are in `RolloutSet.stats()` (`GET /v1/rollouts`).
- **Shadow**: a sampled fraction of requests (chosen by key, so a user is mirrored consistently) is
  scored again by the shadow model after the answer was computed, on a background task bounded by
  `max_in_flight`; its errors and latency never reach the client. Score differences (mean and max
  absolute difference, a histogram) are recorded.
- **Log**: sampled requests are written with their predictions into the project's binary shard
  format (`ctrflow.data.shards`), a shard folder with `manifest.json` that `ctrflow train` /
  `continuous` read once labels are joined: `label` is NaN (not joined yet), `extras[:, 0]` the served
  probability, `time` the request's unix milliseconds, and each shard header lists the request ids
  (`X-Request-Id`, else generated) with the row counts, the join key. Ids and numerics are the serving
  graph's own `transform` output, so training/serving skew can be checked row by row.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import queue
import random
import struct
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctrflow.errors import ConfigError

__all__ = ["Arm", "Rollout", "RolloutSet", "RequestLogger", "ShadowStats", "choose_arm", "key_from_columnar",
           "key_from_json", "key_from_tensors", "key_text", "parse_rollouts"]

log = logging.getLogger("ctrflow.serving")

_DIFF_BOUNDS = (1e-6, 1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.5, 1.0)


@dataclass(frozen=True)
class Arm:
    """One arm of a split: a model and which of its versions (a version, a label, or the newest)."""

    model: str
    weight: float = 1.0
    version: int | None = None
    label: str | None = None

    @property
    def key(self) -> str:
        return f"{self.model}/" + (f"v{self.version}" if self.version is not None else f"l:{self.label}" if self.label else "latest")


@dataclass(frozen=True)
class ShadowSpec:
    model: str
    fraction: float
    version: int | None = None
    label: str | None = None
    max_in_flight: int = 64


@dataclass(frozen=True)
class LogSpec:
    path: str
    fraction: float
    rows_per_shard: int = 50_000
    flush_s: float = 30.0


@dataclass(frozen=True)
class Rollout:
    """A named rollout: how a request to `name` is split, mirrored and logged."""

    name: str
    arms: tuple[Arm, ...]
    key_header: str | None = None
    key_feature: str | None = None
    shadow: ShadowSpec | None = None
    log: LogSpec | None = None


def _hash01(key: str, salt: str) -> float:
    """A uniform number in (0, 1) from a key (stable across processes and versions: BLAKE2b)."""
    h = int.from_bytes(hashlib.blake2b(f"{salt}\0{key}".encode(), digest_size=8).digest(), "big")
    return (h + 0.5) / 2.0**64


def choose_arm(arms: Sequence[Arm], key: str | None) -> Arm:
    """Weighted rendezvous hashing: each arm scores -ln(u)/weight for u = hash(key, arm); the lowest wins.

    P(arm) = weight / sum(weights); a key keeps its arm while weights hold, and raising one weight
    only moves keys onto that arm. No key (None): a random arm by weight.
    """
    live = [a for a in arms if a.weight > 0]
    if not live:
        raise ConfigError("Every arm of the rollout has weight 0.")
    if key is None:
        return random.choices(live, weights=[a.weight for a in live])[0]
    return min(live, key=lambda a: -math.log(_hash01(key, a.key)) / a.weight)


def _sampled(key: str | None, fraction: float, salt: str) -> bool:
    if fraction >= 1:
        return True
    if fraction <= 0:
        return False
    return (random.random() if key is None else _hash01(key, salt)) < fraction


# ---- the key of a request ---------------------------------------------------------------------------


def key_text(value: Any) -> str | None:
    """One spelling of a key value whatever the body carried it in: b"u1" / "u1" → "u1", 3 / 3.0 → "3";
    None, "" (missing) and NaN → None (no key: a random arm)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        return value or None
    if isinstance(value, bool) or value is None:
        return None if value is None else str(value).lower()
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        f = float(value)
        if not math.isfinite(f):
            return None
        return str(int(f)) if f.is_integer() else repr(f)
    return str(value)


def key_from_json(body: bytes | bytearray, feature: str) -> Any:
    """The first candidate's value of `feature` in a JSON predict body (`instances`, `inputs` or the
    columnar twin `{"columns", "data"}`); None when absent or the body is not JSON (its decoder says why)."""
    from ctrflow.serving.codec import RequestError, _load_json

    try:
        doc = _load_json(body)  # orjson: the key costs a third of what the body's own decode costs
        if isinstance(doc.get("instances"), list) and doc["instances"] and isinstance(doc["instances"][0], dict):
            return doc["instances"][0].get(feature)
        if isinstance(doc.get("inputs"), dict):
            col = doc["inputs"].get(feature)
            return col[0] if isinstance(col, list) and col else None
        if isinstance(doc.get("columns"), list) and feature in doc["columns"]:
            col = doc["data"][doc["columns"].index(feature)]
            return col[0] if isinstance(col, list) and col else None
    except (RequestError, ValueError, TypeError, AttributeError, IndexError, KeyError, RecursionError):
        return None
    return None


def key_from_columnar(body: bytes | bytearray, feature: str) -> Any:
    """The first candidate's value of `feature` in a binary columnar body (`COLUMNAR_FORMAT`): walks the
    column headers only, no decode; None when absent or malformed (the decoder then answers why)."""
    from ctrflow.client.columnar import COLUMN, HEADER

    want = feature.encode()
    try:
        magic, fmt, _, n_columns, rows = HEADER.unpack_from(body, 0)
        if magic != b"CTRC" or fmt != 1 or rows == 0:
            return None
        offset = HEADER.size
        for _ in range(n_columns):
            (name_len,) = struct.unpack_from("<H", body, offset)
            offset += 2
            name = bytes(body[offset:offset + name_len])
            kind, _, width = COLUMN.unpack_from(body, offset + name_len)
            offset += name_len + COLUMN.size
            if width < 1 or kind not in b"Sfd":
                return None
            if name == want:
                if offset + width > len(body):
                    return None
                if kind == ord("S"):
                    return bytes(body[offset:offset + width]).rstrip(b"\0")
                return struct.unpack_from("<f" if kind == ord("f") else "<d", body, offset)[0]
            offset += rows * width
    except struct.error:
        return None
    return None


def key_from_tensors(inputs: Mapping[str, Any], feature: str) -> Any:
    """The first value of `feature` among a gRPC PredictRequest's input TensorProtos; None when absent."""
    tensor = inputs.get(feature) if feature in inputs else None
    if tensor is None:
        return None
    if tensor.string_val:
        return tensor.string_val[0]
    for values in (tensor.float_val, tensor.double_val, tensor.int64_val, tensor.int_val):
        if values:
            return values[0]
    if tensor.tensor_content:
        from ctrflow.serving.tfserving import tensor_to_ndarray

        try:
            flat = tensor_to_ndarray(tensor, name=feature).reshape(-1)
        except Exception:  # noqa: BLE001 - a bad tensor is the decoder's to refuse
            return None
        return flat[0] if flat.size else None
    return None


# ---- config -----------------------------------------------------------------------------------------


def _fraction(raw: Any, where: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not 0 <= raw <= 1:
        raise ConfigError(f"In {where}: 'fraction' must be a number in [0, 1]. Got {raw!r} instead.")
    return float(raw)


def _target(raw: Mapping[str, Any], where: str, models: Sequence[str], extra: set[str]) -> dict[str, Any]:
    unknown = set(raw) - {"model", "version", "label"} - extra
    if unknown:
        raise ConfigError(f"In {where}: unknown keys {sorted(unknown)}; allowed: {sorted({'model', 'version', 'label'} | extra)}.")
    model = raw.get("model")
    if model not in models:
        raise ConfigError(f"In {where}: 'model' must name a served model {sorted(models)}. Got {model!r} instead.")
    version, label = raw.get("version"), raw.get("label")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
        raise ConfigError(f"In {where}: 'version' must be an int >= 0. Got {version!r} instead.")
    if label is not None and not isinstance(label, str):
        raise ConfigError(f"In {where}: 'label' must be a string. Got {label!r} instead.")
    if version is not None and label is not None:
        raise ConfigError(f"In {where}: give 'version' or 'label', not both.")
    return {"model": model, "version": version, "label": label}


def parse_rollouts(raw: Sequence[Any], models: Sequence[str], *, source: str = "model config", base_dir: Path | None = None) -> list[Rollout]:
    """The `rollouts:` list of a model config → Rollouts, every mistake named with its place."""
    out: list[Rollout] = []
    for i, entry in enumerate(raw):
        where = f"{source}, rollouts[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"In {where}: each rollout must be a mapping. Got {entry!r} instead.")
        unknown = set(entry) - {"name", "key", "arms", "shadow", "log"}
        if unknown:
            raise ConfigError(f"In {where}: unknown keys {sorted(unknown)}; allowed: arms, key, log, name, shadow.")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"In {where}: 'name' (what clients call) is required.")
        arms_raw = entry.get("arms")
        if not isinstance(arms_raw, list) or not arms_raw:
            raise ConfigError(f"In {where}: 'arms' must be a non-empty list of {{model, weight, version|label}}.")
        arms = []
        for j, a in enumerate(arms_raw):
            w = f"{where}.arms[{j}]"
            if not isinstance(a, Mapping):
                raise ConfigError(f"In {w}: an arm is a mapping. Got {a!r} instead.")
            t = _target(a, w, models, {"weight"})
            weight = a.get("weight", 1)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
                raise ConfigError(f"In {w}: 'weight' must be a finite number >= 0. Got {weight!r} instead.")
            arms.append(Arm(t["model"], float(weight), t["version"], t["label"]))
        if sum(a.weight for a in arms) <= 0:
            raise ConfigError(f"In {where}: at least one arm needs a weight > 0.")
        if len({a.key for a in arms}) != len(arms):
            raise ConfigError(f"In {where}: two arms name the same model version.")
        key = entry.get("key") or {}
        if not isinstance(key, Mapping) or set(key) - {"header", "feature"} or len(key) > 1:
            raise ConfigError(f"In {where}: 'key' is {{header: NAME}} or {{feature: NAME}}. Got {key!r} instead.")
        shadow = None
        if entry.get("shadow") is not None:
            s = entry["shadow"]
            if not isinstance(s, Mapping):
                raise ConfigError(f"In {where}.shadow: a mapping {{model, fraction}}. Got {s!r} instead.")
            t = _target(s, f"{where}.shadow", models, {"fraction", "max_in_flight"})
            mif = s.get("max_in_flight", 64)
            if isinstance(mif, bool) or not isinstance(mif, int) or mif < 1:
                raise ConfigError(f"In {where}.shadow: 'max_in_flight' must be an int >= 1. Got {mif!r} instead.")
            shadow = ShadowSpec(t["model"], _fraction(s.get("fraction", 1.0), f"{where}.shadow"), t["version"], t["label"], mif)
        log_spec = None
        if entry.get("log") is not None:
            lg = entry["log"]
            if not isinstance(lg, Mapping) or "path" not in lg or set(lg) - {"path", "fraction", "rows_per_shard", "flush_s"}:
                raise ConfigError(f"In {where}.log: {{path, fraction, rows_per_shard, flush_s}} with a path. Got {lg!r} instead.")
            rps = lg.get("rows_per_shard", 50_000)
            if isinstance(rps, bool) or not isinstance(rps, int) or rps < 1:
                raise ConfigError(f"In {where}.log: 'rows_per_shard' must be an int >= 1. Got {rps!r} instead.")
            flush = lg.get("flush_s", 30.0)
            if isinstance(flush, bool) or not isinstance(flush, (int, float)) or not flush > 0:
                raise ConfigError(f"In {where}.log: 'flush_s' must be a number > 0. Got {flush!r} instead.")
            path = Path(str(lg["path"]))
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            log_spec = LogSpec(str(path), _fraction(lg.get("fraction", 1.0), f"{where}.log"), rps, float(flush))
        out.append(Rollout(name, tuple(arms), key.get("header"), key.get("feature"), shadow, log_spec))
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: two rollouts have the same name: {names}.")
    return out


# ---- figures ----------------------------------------------------------------------------------------


@dataclass
class ArmStats:
    requests: int = 0
    rows: int = 0
    errors: int = 0
    latency_s_sum: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "rows": self.rows, "errors": self.errors,
                "mean_latency_ms": 1e3 * self.latency_s_sum / self.requests if self.requests else None}


@dataclass
class ShadowStats:
    """Score differences shadow − served, over the rows mirrored."""

    requests: int = 0
    rows: int = 0
    errors: int = 0
    dropped: int = 0  # not mirrored: max_in_flight shadow requests were running
    abs_diff_sum: float = 0.0
    abs_diff_max: float = 0.0
    diff_sum: float = 0.0
    histogram: list[int] = field(default_factory=lambda: [0] * (len(_DIFF_BOUNDS) + 1))

    def add(self, served: np.ndarray, shadow: np.ndarray) -> None:
        d = np.asarray(shadow, np.float64) - np.asarray(served, np.float64)
        a = np.abs(d)
        self.requests += 1
        self.rows += int(d.size)
        self.abs_diff_sum += float(a.sum())
        self.diff_sum += float(d.sum())
        self.abs_diff_max = max(self.abs_diff_max, float(a.max(initial=0.0)))
        for i, c in enumerate(np.bincount(np.searchsorted(_DIFF_BOUNDS, a), minlength=len(self.histogram))):
            self.histogram[i] += int(c)

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "rows": self.rows, "errors": self.errors, "dropped": self.dropped,
                "mean_abs_diff": self.abs_diff_sum / self.rows if self.rows else None,
                "mean_diff": self.diff_sum / self.rows if self.rows else None, "max_abs_diff": self.abs_diff_max,
                "abs_diff_histogram": {**{f"<={b:g}": c for b, c in zip(_DIFF_BOUNDS, self.histogram)},
                                       f">{_DIFF_BOUNDS[-1]:g}": self.histogram[-1]}}


# ---- request logging ----------------------------------------------------------------------------------


class RequestLogger:
    """Writes sampled (features, prediction) rows into a shard folder on a background thread.

    `offer(...)` never blocks a request: it hands the rows to a bounded queue (dropped and counted
    when full). Rows are transformed with the version's own `transform` signature (the ids/numerics
    the graph scored), gathered up to `rows_per_shard` or `flush_s`, and written as one shard, then
    `manifest.json` is rewritten (atomically) so the folder is always a complete shard folder.
    """

    def __init__(self, spec: LogSpec, *, max_queued: int = 1000) -> None:
        self.spec = spec
        self.root = Path(spec.path)
        self._queue: queue.Queue = queue.Queue(max_queued)
        self._lock = threading.Lock()
        self.dropped = 0
        self.rows_written = 0
        self.errors = 0
        self._shards: list[dict[str, Any]] = []
        self._meta: dict[str, Any] | None = None
        self._pending: list[tuple] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ctrflow-request-log", daemon=True)
        self._thread.start()

    def offer(self, predictor: Any, features: Mapping[str, Any], probabilities: np.ndarray, request_id: str) -> None:
        try:
            self._queue.put_nowait((predictor, features, np.asarray(probabilities, np.float32), request_id, time.time()))
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set() or not self._queue.empty():
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                item = None
            if item is not None:
                try:
                    self._pending.append(self._rows(*item))
                except Exception as e:  # noqa: BLE001 - logging must never break serving
                    self.errors += 1
                    log.warning("request log %s: a request could not be logged: %s", self.root, e)
            rows = sum(p[0].shape[0] for p in self._pending)
            if rows and (rows >= self.spec.rows_per_shard or time.monotonic() - last >= self.spec.flush_s or self._stop.is_set()):
                self._flush()
                last = time.monotonic()
        if self._pending:
            self._flush()

    def _rows(self, predictor: Any, features: Mapping[str, Any], probs: np.ndarray, request_id: str, when: float) -> tuple:
        ids, numeric = predictor.transform(features)
        if self._meta is None:
            info = predictor.info
            self._meta = {k: info[k] for k in ("schema", "schema_fingerprint", "transforms", "feature_spec") if k in info}
        n = ids.shape[0]
        return ids, numeric, probs.reshape(n), np.full(n, int(when * 1e3), np.int64), request_id, getattr(predictor, "version", 0)

    def _flush(self) -> None:
        from ctrflow.atomic import atomic_write_json
        from ctrflow.data.shards import FORMAT_VERSION, MANIFEST, SHARD_SUFFIX, ShardData, write_shard

        pending, self._pending = self._pending, []
        ids = np.concatenate([p[0] for p in pending])
        numeric = np.concatenate([p[1] for p in pending])
        probs = np.concatenate([p[2] for p in pending])
        times = np.concatenate([p[3] for p in pending])
        data = ShardData(label=np.full(ids.shape[0], np.nan, np.float32), ids=ids, numeric=numeric, time=times,
                         extras=probs[:, None])
        meta = dict(self._meta or {}, served={"extras": ["probability"], "label": "NaN until joined",
                                               "requests": [[p[4], int(p[0].shape[0]), int(p[5])] for p in pending]})
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            name = f"served-{int(time.time() * 1e3)}-{os.getpid()}-{len(self._shards):05d}{SHARD_SUFFIX}"
            entry = write_shard(self.root / name, data, meta)
            self._shards.append(entry)
            manifest = {"format": "ctrflow-shards", "version": FORMAT_VERSION, **(self._meta or {}),
                        "rows": sum(s["rows"] for s in self._shards), "source": "served traffic (ctrflow serve)",
                        "labels_joined": False, "created_unix": time.time(), "shards": self._shards}
            atomic_write_json(self.root / MANIFEST, manifest)
            self.rows_written += data.rows
        except OSError as e:
            self.errors += 1
            log.warning("request log %s: cannot write a shard (%s); %d rows lost", self.root, e, data.rows)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def stats(self) -> dict[str, Any]:
        return {"path": str(self.root), "rows_written": self.rows_written, "shards": len(self._shards),
                "dropped_requests": self.dropped, "errors": self.errors}


# ---- the running set ---------------------------------------------------------------------------------


class RolloutSet:
    """The rollouts in force: choose an arm, mirror to the shadow, log; and their figures."""

    def __init__(self, rollouts: Sequence[Rollout] = ()) -> None:
        self._lock = threading.Lock()
        self.rollouts: dict[str, Rollout] = {r.name: r for r in rollouts}
        self._arms: dict[str, dict[str, ArmStats]] = {r.name: {a.key: ArmStats() for a in r.arms} for r in rollouts}
        self._shadow: dict[str, ShadowStats] = {r.name: ShadowStats() for r in rollouts if r.shadow}
        self._shadow_in_flight: dict[str, int] = {r.name: 0 for r in rollouts}
        self._loggers: dict[str, RequestLogger] = {r.name: RequestLogger(r.log) for r in rollouts if r.log}

    def get(self, name: str) -> Rollout | None:
        return self.rollouts.get(name)

    @staticmethod
    def key_of(rollout: Rollout, headers: Mapping[str, str], value: Any = None) -> str | None:
        """The split key: the rollout's header from `headers` (lower-case names), else `value`, the key
        feature's first value as one of the `key_from_*` readers found it."""
        if rollout.key_header:
            return headers.get(rollout.key_header.lower()) or None
        if rollout.key_feature:
            return key_text(value)
        return None

    def record(self, rollout: Rollout, arm: Arm, rows: int, seconds: float, ok: bool) -> None:
        with self._lock:
            s = self._arms[rollout.name][arm.key]
            s.requests += 1
            s.latency_s_sum += seconds
            if ok:
                s.rows += rows
            else:
                s.errors += 1

    def shadow_slot(self, rollout: Rollout, key: str | None) -> bool:
        """Whether to mirror this request (sampled by key); takes a slot the caller must `shadow_done`."""
        spec = rollout.shadow
        if spec is None or not _sampled(key, spec.fraction, f"shadow:{rollout.name}"):
            return False
        with self._lock:
            if self._shadow_in_flight[rollout.name] >= spec.max_in_flight:
                self._shadow[rollout.name].dropped += 1
                return False
            self._shadow_in_flight[rollout.name] += 1
        return True

    def shadow_done(self, rollout: Rollout, served: np.ndarray | None, shadow: np.ndarray | None) -> None:
        with self._lock:
            self._shadow_in_flight[rollout.name] -= 1
            stats = self._shadow[rollout.name]
            if served is None or shadow is None or np.shape(served) != np.shape(shadow):
                stats.errors += 1
            else:
                stats.add(served, shadow)

    def maybe_log(self, rollout: Rollout, key: str | None, predictor: Any, features: Mapping[str, Any],
                  probabilities: np.ndarray, request_id: str | None) -> bool:
        logger = self._loggers.get(rollout.name)
        if logger is None or not hasattr(predictor, "transform") or not _sampled(key, logger.spec.fraction, f"log:{rollout.name}"):
            return False
        logger.offer(predictor, features, probabilities, request_id or uuid.uuid4().hex)
        return True

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out = {}
            for name, r in self.rollouts.items():
                total = sum(s.requests for s in self._arms[name].values())
                out[name] = {
                    "arms": {a.key: {"weight": a.weight, "share": (self._arms[name][a.key].requests / total) if total else None,
                                     **self._arms[name][a.key].to_dict()} for a in r.arms},
                    "shadow": self._shadow[name].to_dict() if name in self._shadow else None,
                }
        for name, logger in self._loggers.items():
            out[name]["log"] = logger.stats()
        return out

    def close(self) -> None:
        for logger in self._loggers.values():
            logger.close()
