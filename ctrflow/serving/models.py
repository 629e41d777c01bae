"""The registry of served models: which versions of which models answer requests, and hot reload.

`ModelManager` watches each model's base path (TF Serving layout: integer version folders). A new
complete version is loaded on a background thread, warmed up, then swapped in under a lock; requests
hold a lease on the version they started with, so a swap fails none of them, and the old version is
closed (its queue drained) once its last lease is returned. The `keep_versions` newest are served.

Recommended use::

    manager = ModelManager([ModelSpec("ctr", "models/ctr")], ManagerOptions(poll_interval_s=1.0))
    manager.start()                           # loads what is there now, then watches
    with manager.lease("ctr") as predictor:   # the newest version; lease("ctr", 3) for version 3
        scores = predictor.predict(features)
    manager.close()

A bad version folder (incomplete, corrupt, a schema other than the one being served) is skipped with
a logged reason, shown in `status()` and retried only once its files change; the serving version stays.

Which versions are served follows TF Serving's version policies (`ModelSpec.version_policy`): the
newest `keep_versions` ("latest"), every version on disk ("all"), or the listed `versions`
("specific"); `labels` name versions (`lease(name, label="stable")`). `reconfigure(specs)` swaps the
model list while serving (config reload): added models load, removed ones drain and close.

The schema a model line accepted is kept across restarts in `BASE/.ctrflow-accepted-schema.json`
(dot-prefixed: TF Serving and the version scan ignore it), written when the first version is served
and whenever `allow_schema_change` accepts a new one. At start a version whose features differ from
it is refused exactly as at hot reload, so a restart never serves what a reload refused.

A folder without `ctrflow.json` is a plain SavedModel, served through its own signatures
(`SavedModelPredictor`), unless the line already serves ctrflow exports (then it is incomplete).

Loading and warming a new version runs on the watcher thread at a lower CPU priority (nice +10 for
that thread only) so the version being served keeps the CPU it needs; see BENCHMARKS.md.

Implementation details follow: each model has a `_ModelState` holding its served `ServedVersion` versions
(newest last) and the failures by version; every change to them happens under the manager's one lock,
and leases count in-flight requests on a `ServedVersion` under the same lock.
"""
from __future__ import annotations

import json
import logging
import numbers
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctrflow.errors import ConfigError, CtrflowError, ModelNotFoundError
from ctrflow.serving.batcher import BatchingOptions
from ctrflow.serving.hugepages import HUGE_PAGE_MODES
from ctrflow.serving.metrics import ModelGauges
from ctrflow.validation import Bool, Choice, Float, Int, check_fields

__all__ = [
    "ManagerOptions",
    "ServedVersion",
    "ModelManager",
    "ModelNotReadyError",
    "ModelSpec",
    "VersionStatus",
    "load_model_config",
    "ACCEPTED_SCHEMA_FILE",
]

log = logging.getLogger("ctrflow.serving")

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_EXPORT_INFO = "ctrflow.json"  # ctrflow.export.EXPORT_INFO, without importing TensorFlow here
ACCEPTED_SCHEMA_FILE = ".ctrflow-accepted-schema.json"
_POLICIES = ("latest", "all", "specific")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class ModelNotReadyError(CtrflowError):
    """The model is configured but no version of it is loaded yet (or every version failed). Retryable."""


@dataclass(frozen=True)
class ModelSpec:
    """One served model: where its versions appear and how they are served."""

    # URL-safe name clients use (`/v1/models/NAME`): letters, digits, '_', '.', '-'.
    name: str
    # Folder holding integer version folders (`BASE/1/`, `BASE/2/`, ...), watched for new ones.
    base_path: str
    # Autobatching of every version of this model; None scores each request on its own.
    batching: BatchingOptions | None = field(default_factory=BatchingOptions)
    # How many of the newest loadable versions are served at once, >= 1 (older ones are unloaded);
    # requests naming no version get the newest. Default 1.
    keep_versions: int = 1
    # Serve a new version whose features differ from the served one's. Default False: such a version
    # is skipped with a logged reason, since the clients send the old features.
    allow_schema_change: bool = False
    # TF Serving's model_version_policy: "latest" (the newest keep_versions), "all" (every version on
    # disk), "specific" (exactly `versions`, those present). Default "latest".
    version_policy: str = "latest"
    # The versions a "specific" policy serves (non-empty then; empty otherwise).
    versions: tuple[int, ...] = ()
    # Version labels: {"stable": 3, "canary": 4}; `/v1/models/NAME/labels/stable`, gRPC version_label.
    labels: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _MODEL_NAME.match(self.name):
            raise ConfigError(
                "The 'name' of a served model must start with a letter or digit and hold only letters, digits, "
                f"'_', '.', '-'. Got {self.name!r} instead."
            )
        if not isinstance(self.base_path, (str, os.PathLike)) or not str(self.base_path):
            raise ConfigError(f"The 'base_path' of model '{self.name}' must be a folder path. Got {self.base_path!r} instead.")
        object.__setattr__(self, "base_path", str(self.base_path))
        if self.batching is not None and not isinstance(self.batching, BatchingOptions):
            raise ConfigError(
                f"The 'batching' of model '{self.name}' must be BatchingOptions or None. Got {self.batching!r} instead."
            )
        check_fields(self, {"keep_versions": Int(1)}, owner=f"model '{self.name}'")
        if self.version_policy not in _POLICIES:
            raise ConfigError(f"The 'version_policy' of model '{self.name}' must be one of {list(_POLICIES)}. "
                              f"Got {self.version_policy!r} instead.")
        versions = tuple(self.versions)
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0 for v in versions):
            raise ConfigError(f"The 'versions' of model '{self.name}' must be ints >= 0. Got {list(versions)!r} instead.")
        if (self.version_policy == "specific") != bool(versions):
            raise ConfigError(f"Model '{self.name}': 'versions' lists the versions of a 'specific' version_policy "
                              f"(and only then). Got version_policy={self.version_policy!r}, versions={list(versions)}.")
        object.__setattr__(self, "versions", tuple(int(v) for v in versions))
        if not isinstance(self.labels, Mapping):
            raise ConfigError(f"The 'labels' of model '{self.name}' must map label names to versions. Got {self.labels!r} instead.")
        for label, v in self.labels.items():
            if not isinstance(label, str) or not _LABEL.match(label):
                raise ConfigError(f"Model '{self.name}': version label {label!r} must start with a letter or digit and "
                                  "hold only letters, digits, '_', '.', '-'.")
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise ConfigError(f"Model '{self.name}': label {label!r} must name a version (an int >= 0). Got {v!r} instead.")
        object.__setattr__(self, "labels", {str(k): int(v) for k, v in self.labels.items()})


@dataclass(frozen=True)
class ManagerOptions:
    """How the registry watches base paths and retires old versions."""

    # Seconds between scans of every base path, > 0. Default 1.0.
    poll_interval_s: float = 1.0
    # Run `Predictor.warmup()` before a version takes traffic (first requests then pay no tracing).
    warmup: bool = True
    # Longest a retired version waits for its in-flight requests before it is closed anyway, >= 0
    # seconds. Its queued requests are still computed (drained). Default 30.
    drain_grace_s: float = 30.0
    # "auto": each loaded version's large variables go on transparent huge pages where the kernel allows
    # (`ctrflow.serving.hugepages`); "off": as TensorFlow allocated them. Default "auto".
    huge_pages: str = "auto"

    def __post_init__(self) -> None:
        check_fields(self, {"poll_interval_s": Float(0.0, low_open=True), "drain_grace_s": Float(0.0), "warmup": Bool(),
                            "huge_pages": Choice(HUGE_PAGE_MODES)})


@dataclass(frozen=True)
class VersionStatus:
    """One version's state in TF Serving's words: LOADING, AVAILABLE, UNLOADING or END (failed/removed)."""

    version: int
    state: str
    error_code: str = "OK"
    error_message: str = ""

    def to_dict(self) -> dict[str, Any]:
        """TF Serving's REST shape: {"version": "3", "state": ..., "status": {"error_code", "error_message"}}."""
        return {
            "version": str(self.version),
            "state": self.state,
            "status": {"error_code": self.error_code, "error_message": self.error_message},
        }


def load_model_config(path: str | os.PathLike) -> list[ModelSpec]:
    """Read a model config file (YAML/JSON, or TF Serving's textproto) into specs.

    See `ctrflow.serving.config` for both formats; this keeps the older entry point::

        models:
          - name: ctr
            base_path: models/ctr          # relative paths are relative to this file's folder
            keep_versions: 2
            batching: {max_batch_size: 2048, batch_timeout_ms: 1.0}   # or `batching: false`
    """
    from ctrflow.serving.config import load_model_config as load

    return list(load(path).models)


class ServedVersion:
    """A loaded version and the requests currently using it (what `acquire` hands out)."""

    __slots__ = ("version", "predictor", "in_flight", "retired", "signature", "loaded_at", "predictor_kind")

    def __init__(self, version: int, predictor: Any, signature: tuple) -> None:
        self.version = version
        self.predictor = predictor
        self.predictor_kind = getattr(predictor, "kind", "ctrflow")  # "ctrflow" or "savedmodel"
        self.in_flight = 0
        self.retired = False
        self.signature = signature  # (categorical names, numeric names): what clients must send
        self.loaded_at = time.time()


@dataclass
class _Failure:
    fingerprint: tuple
    reason: str


class _ModelState:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.served: list[ServedVersion] = []  # ascending by version; the last one is the default
        self.by_version: dict[int, ServedVersion] = {}
        self.failures: dict[int, _Failure] = {}
        self.loading: int | None = None
        self.unloading: list[ServedVersion] = []
        self.load_failures = 0
        self.swaps = 0
        self.retired_totals: dict[str, float] = {}
        self.retired_hist: list[int] = []
        self.hist_bounds: tuple[int, ...] = ()


class ModelManager:
    """Serves the versions of several models and hot-reloads them from their base paths.

    Args:
        models: one `ModelSpec` per served model (unique names).
        options: `ManagerOptions` (poll interval, warmup, drain grace).
        loader: `(version_dir, batching, name) -> predictor`; default `Predictor.load`. Tests and
            benchmarks may pass their own.
    """

    def __init__(self, models: Sequence[ModelSpec], options: ManagerOptions = ManagerOptions(), *, loader: Any = None) -> None:
        if not models:
            raise ConfigError("The 'models' parameter of ModelManager must name at least one ModelSpec. Got none.")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ConfigError(f"The 'models' parameter of ModelManager names a model twice: {names}.")
        if not isinstance(options, ManagerOptions):
            raise ConfigError(f"The 'options' parameter of ModelManager must be ManagerOptions. Got {options!r} instead.")
        self._options = options
        self._loader = loader
        self._lock = threading.Condition(threading.Lock())
        self._models: dict[str, _ModelState] = {m.name: _ModelState(m) for m in models}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_lock = threading.Lock()  # one scan at a time (watcher thread or poll_once)
        self._closers: list[threading.Thread] = []
        from ctrflow.serving.rollout import RolloutSet

        # Traffic splits, shadows and request logs in force (`set_rollouts`; from the model config).
        self.rollouts = RolloutSet()

    # ---- life cycle -------------------------------------------------------------------------------

    def start(self, *, watch: bool = True) -> ModelManager:
        """Load what every base path holds now (blocking), then watch on a background thread."""
        self.poll_once()
        if watch and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="ctrflow-model-watcher", daemon=True)
            self._thread.start()
        return self

    def set_rollouts(self, rollouts: Any) -> None:
        """Put a `RolloutSet` in force (config load or reload); the previous one's logs are flushed."""
        old, self.rollouts = self.rollouts, rollouts
        if old is not rollouts:
            old.close()

    def close(self) -> None:
        """Stop watching, then close every version (queued requests are computed first). Idempotent."""
        self._stop.set()
        self.rollouts.close()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self._options.poll_interval_s * 2 + 60))
        with self._lock:
            doomed = []
            for state in self._models.values():
                for loaded in state.served:
                    loaded.retired = True
                    doomed.append(loaded)
                state.served, state.by_version = [], {}
            closers = list(self._closers)
        for loaded in doomed:
            self._close_predictor(loaded)
        for t in closers:
            t.join(timeout=self._options.drain_grace_s + 5)

    def __enter__(self) -> ModelManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- requests ---------------------------------------------------------------------------------

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(self._models)

    def spec(self, name: str) -> ModelSpec:
        return self._state(name).spec

    def resolve_label(self, name: str, label: str) -> int:
        """The version a label names (TF Serving's version_labels); ModelNotFoundError if none."""
        labels = self._state(name).spec.labels
        if label not in labels:
            raise ModelNotFoundError(f"Unrecognized servable version label: {label[:100]} (model '{name}' has labels "
                                     f"{sorted(labels)}).")
        return labels[label]

    def acquire(self, name: str, version: int | None = None, label: str | None = None) -> ServedVersion:
        """Lease the newest (or the given, or the labelled) version; pair with `release`. Raises
        ModelNotFoundError (unknown model, version or label) or ModelNotReadyError (nothing loaded yet)."""
        state = self._state(name)
        if label is not None:
            if version is not None:
                raise ModelNotFoundError("Give a version or a version label, not both.")
            version = self.resolve_label(name, label)
        with self._lock:
            if version is None:
                if not state.served:
                    raise ModelNotReadyError(
                        f"Model '{name}' has no version loaded yet ({self._why_not_ready(state)}); retry shortly."
                    )
                loaded = state.served[-1]
            else:
                loaded = state.by_version.get(version)
                if loaded is None:
                    served = [x.version for x in state.served]
                    raise ModelNotFoundError(
                        f"Model '{name}' has no version {version} loaded; versions being served: {served}."
                    )
            loaded.in_flight += 1
            return loaded

    def release(self, loaded: ServedVersion) -> None:
        with self._lock:
            loaded.in_flight -= 1
            if loaded.retired and loaded.in_flight == 0:
                self._lock.notify_all()

    @contextmanager
    def lease(self, name: str, version: int | None = None, label: str | None = None) -> Iterator[Any]:
        """`with manager.lease(name) as predictor:` — the version stays open until the block ends."""
        loaded = self.acquire(name, version, label)
        try:
            yield loaded.predictor
        finally:
            self.release(loaded)

    # ---- state ------------------------------------------------------------------------------------

    def ready(self) -> bool:
        """True when every model serves at least one version."""
        with self._lock:
            return all(state.served for state in self._models.values())

    def versions(self, name: str) -> list[int]:
        """Versions of `name` being served, ascending."""
        state = self._state(name)
        with self._lock:
            return [x.version for x in state.served]

    def status(self, name: str, version: int | None = None) -> list[VersionStatus]:
        """Every version this model knows of (served, loading, unloading, failed), newest first."""
        state = self._state(name)
        with self._lock:
            out: dict[int, VersionStatus] = {}
            for v, failure in state.failures.items():
                out[v] = VersionStatus(v, "END", "UNKNOWN", failure.reason)
            for loaded in state.unloading:
                out[loaded.version] = VersionStatus(loaded.version, "UNLOADING")
            if state.loading is not None:
                out[state.loading] = VersionStatus(state.loading, "LOADING")
            for loaded in state.served:
                out[loaded.version] = VersionStatus(loaded.version, "AVAILABLE")
        if version is not None:
            if version not in out:
                raise ModelNotFoundError(f"Model '{name}' has no version {version}; known versions: {sorted(out)}.")
            return [out[version]]
        return [out[v] for v in sorted(out, reverse=True)]

    def gauges(self) -> list[ModelGauges]:
        """Per-model figures for `/metrics`; batcher counters are summed over retired versions too."""
        with self._lock:
            snapshot = [(s, list(s.served) + list(s.unloading)) for s in self._models.values()]
        out = []
        for state, live in snapshot:
            totals = dict(state.retired_totals)
            hist = list(state.retired_hist)
            bounds = state.hist_bounds
            for loaded in live:
                stats = _batcher_stats(loaded.predictor)
                if stats is None:
                    continue
                counters, b, counts = stats
                for k, v in counters.items():
                    totals[k] = totals.get(k, 0) + v
                bounds, hist = _add_hist(bounds, hist, b, counts)
            with self._lock:
                out.append(
                    ModelGauges(
                        name=state.spec.name, versions_available=tuple(x.version for x in state.served),
                        load_failures=state.load_failures, swaps=state.swaps, batcher=totals,
                        batch_size_bounds=tuple(bounds), batch_size_counts=tuple(hist),
                    )
                )
        return out

    # ---- watching ---------------------------------------------------------------------------------

    def poll_once(self) -> None:
        """Scan every base path once: load new versions, swap them in, retire the ones past the policy."""
        with self._poll_lock:
            for state in self._models.values():
                if self._stop.is_set():
                    return
                try:
                    self._poll_model(state)
                except Exception:  # a watcher that dies would silently stop reloads for every model
                    log.exception("model '%s': scanning %s failed; will retry", state.spec.name, state.spec.base_path)

    def _watch(self) -> None:
        while not self._stop.wait(self._options.poll_interval_s):
            self.poll_once()

    def _poll_model(self, state: _ModelState) -> None:
        spec = state.spec
        on_disk = _scan(Path(spec.base_path))
        accepted = _read_accepted(Path(spec.base_path))
        with self._lock:
            loaded_versions = set(state.by_version)
            reference = state.served[-1].signature if state.served else None
            line_kind = state.served[-1].predictor_kind if state.served else None
        if reference is None and accepted is not None:
            reference, line_kind = accepted  # what this line accepted before a restart
        candidates = sorted(on_disk, reverse=True)
        if spec.version_policy == "specific":
            candidates = [v for v in candidates if v in set(spec.versions)]
        limit = spec.keep_versions if spec.version_policy == "latest" else len(candidates)
        keep: list[int] = []
        for version in candidates:
            if len(keep) >= limit:
                break
            if version in loaded_versions:
                keep.append(version)
                continue
            path = on_disk[version]
            fingerprint, problem = _inspect(path, ctrflow_line=line_kind == "ctrflow")
            failure = state.failures.get(version)
            if failure is not None and failure.fingerprint == fingerprint:
                continue  # failed before and unchanged since: do not retry every poll
            if problem is None:
                loaded, problem = self._load(state, version, path, reference)
            if problem is not None:
                self._record_failure(state, version, fingerprint, problem)
                continue
            with self._lock:
                state.failures.pop(version, None)
            self._publish(state, loaded)
            loaded_versions.add(version)
            if reference is None or (loaded.signature != reference and version == max(keep + [version])):
                reference, line_kind = loaded.signature, loaded.predictor_kind
            if accepted is None or accepted != (reference, line_kind):
                accepted = (reference, line_kind)
                _write_accepted(Path(spec.base_path), reference, line_kind, version)
            keep.append(version)
        with self._lock:
            # Retire what fell out of the policy, but never leave a model with nothing to serve.
            keep_set = set(keep)
            doomed = [x for x in state.served if x.version not in keep_set] if keep_set else []
            if not doomed:
                return
            for loaded in doomed:
                loaded.retired = True
                state.unloading.append(loaded)
            state.served = [x for x in state.served if x.version in keep_set]
            state.by_version = {x.version: x for x in state.served}
        for loaded in doomed:
            self._start_retire(state, loaded)

    def _start_retire(self, state: _ModelState, loaded: ServedVersion) -> None:
        log.info("model '%s': version %d retired; closing after its in-flight requests", state.spec.name, loaded.version)
        closer = threading.Thread(
            target=self._retire, args=(state, loaded), name=f"ctrflow-retire-{state.spec.name}-{loaded.version}", daemon=True
        )
        with self._lock:
            self._closers = [t for t in self._closers if t.is_alive()] + [closer]
        closer.start()

    def reconfigure(self, models: Sequence[ModelSpec]) -> None:
        """Serve this model list from now on (TF Serving's config reload): new models are loaded now,
        models no longer listed drain and close, changed settings (policy, labels, batching of new
        versions) apply from this call. A model whose base path changed is reloaded from the new path."""
        if not models:
            raise ConfigError("A model config must list at least one model; refusing to serve nothing.")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ConfigError(f"The model config names a model twice: {names}.")
        if not all(isinstance(m, ModelSpec) for m in models):
            raise ConfigError("reconfigure takes ModelSpec values.")
        with self._poll_lock:
            with self._lock:
                new: dict[str, _ModelState] = {}
                for spec in models:
                    old = self._models.get(spec.name)
                    if old is not None and old.spec.base_path == spec.base_path:
                        old.spec = spec
                        new[spec.name] = old
                    else:
                        new[spec.name] = _ModelState(spec)
                removed = [st for n, st in self._models.items() if new.get(n) is not st]
                self._models = new
                doomed = []
                for st in removed:
                    for loaded in st.served:
                        loaded.retired = True
                        st.unloading.append(loaded)
                        doomed.append((st, loaded))
                    st.served, st.by_version = [], {}
        for st, loaded in doomed:
            self._start_retire(st, loaded)
        log.info("model config applied: serving %s", names)
        self.poll_once()

    def _load(self, state: _ModelState, version: int, path: Path, reference: tuple | None) -> tuple[ServedVersion | None, str | None]:
        spec = state.spec
        with self._lock:
            state.loading = version
        t0 = time.perf_counter()
        predictor = None
        try:
            with _background_priority(enabled=threading.current_thread() is self._thread):
                predictor = self._load_predictor(path, spec)
                signature = _signature_of(predictor)
                if reference is not None and signature != reference and not spec.allow_schema_change:
                    predictor.close()
                    return None, (
                        f"its features {_describe_signature(signature)} differ from the ones this model line accepted "
                        f"{_describe_signature(reference)} (kept in {Path(spec.base_path) / ACCEPTED_SCHEMA_FILE}); "
                        "clients would send the wrong features. Export it under another model name, or set "
                        "allow_schema_change for this model"
                    )
                if self._options.warmup:
                    predictor.warmup()
        except Exception as e:  # noqa: BLE001 - any loader error means "skip this folder"
            if predictor is not None:
                try:
                    predictor.close()
                except Exception:  # noqa: BLE001
                    pass
            message = " ".join(str(e).split())[:500].rstrip(".") or type(e).__name__
            return None, f"cannot be loaded: {type(e).__name__}: {message}"
        finally:
            with self._lock:
                state.loading = None
        log.info("model '%s': version %d loaded and warmed up in %.2f s", spec.name, version, time.perf_counter() - t0)
        return ServedVersion(version, predictor, signature), None

    def _load_predictor(self, path: Path, spec: ModelSpec) -> Any:
        if self._loader is not None:
            return self._loader(path, spec.batching, spec.name)
        from ctrflow.serving.predictor import load_predictor

        return load_predictor(path, batching=spec.batching, name=spec.name, huge_pages=self._options.huge_pages)

    def _publish(self, state: _ModelState, loaded: ServedVersion) -> None:
        with self._lock:
            previous = state.served[-1].version if state.served else None
            state.served = sorted([*state.served, loaded], key=lambda x: x.version)
            state.by_version = {x.version: x for x in state.served}
            if previous is not None and state.served[-1].version != previous:
                state.swaps += 1
        if previous is not None and loaded.version > previous:
            log.info("model '%s': now serving version %d (was %d)", state.spec.name, loaded.version, previous)

    def _record_failure(self, state: _ModelState, version: int, fingerprint: tuple, reason: str) -> None:
        path = Path(state.spec.base_path) / str(version)
        log.warning("model '%s': skipping version folder %s: %s; still serving %s", state.spec.name, path, reason,
                    [x.version for x in state.served] or "nothing")
        with self._lock:
            state.failures[version] = _Failure(fingerprint, reason)
            state.load_failures += 1

    def _retire(self, state: _ModelState, loaded: ServedVersion) -> None:
        deadline = time.monotonic() + self._options.drain_grace_s
        with self._lock:
            while loaded.in_flight > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("model '%s': version %d still has %d requests after %.0f s; closing it anyway",
                                state.spec.name, loaded.version, loaded.in_flight, self._options.drain_grace_s)
                    break
                self._lock.wait(min(left, 0.5))
        self._close_predictor(loaded)
        final = _batcher_stats(loaded.predictor)
        with self._lock:
            if final is not None:
                counters, bounds, counts = final
                for k, v in counters.items():
                    if k != "rows_enqueued":  # a gauge: a closed queue holds nothing
                        state.retired_totals[k] = state.retired_totals.get(k, 0) + v
                state.hist_bounds, state.retired_hist = _add_hist(state.hist_bounds, state.retired_hist, bounds, counts)
            if loaded in state.unloading:
                state.unloading.remove(loaded)

    @staticmethod
    def _close_predictor(loaded: ServedVersion) -> None:
        try:
            loaded.predictor.close()
        except Exception:  # noqa: BLE001 - closing must not stop the others from closing
            log.exception("closing version %d failed", loaded.version)

    def _state(self, name: str) -> _ModelState:
        state = self._models.get(name)
        if state is None:
            raise ModelNotFoundError(f"Model '{name}' is not served here; served models: {sorted(self._models)}.")
        return state

    @staticmethod
    def _why_not_ready(state: _ModelState) -> str:
        if state.loading is not None:
            return f"version {state.loading} is loading"
        if state.failures:
            v = max(state.failures)
            return f"version {v} {state.failures[v].reason}"
        return f"no version folder in {state.spec.base_path}"


def _scan(base: Path) -> dict[int, Path]:
    """{version: folder} for the integer folders of `base`; dot-prefixed folders (exports in
    progress) and other names are ignored."""
    try:
        entries = list(os.scandir(base))
    except OSError:
        return {}
    return {int(e.name): Path(e.path) for e in entries
            if not e.name.startswith(".") and e.name.isdigit() and e.is_dir()}


def _inspect(path: Path, *, ctrflow_line: bool = False) -> tuple[tuple, str | None]:
    """(fingerprint of the folder's files, problem or None). The fingerprint (names, sizes, mtimes)
    changes while a folder is still being copied, so a failed folder is retried once it changes."""
    fingerprint = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
            try:
                st = os.stat(os.path.join(root, f))
            except OSError:
                continue
            fingerprint.append((os.path.relpath(os.path.join(root, f), path), st.st_size, st.st_mtime_ns))
        if len(fingerprint) > 10_000:  # bounded: a version folder holds a handful of files
            break
    # A plain SavedModel (no ctrflow.json) is served through its signatures; on a line that serves ctrflow
    # exports a missing ctrflow.json means the folder is still being written.
    needed = ("saved_model.pb", _EXPORT_INFO, "variables") if ctrflow_line or (path / _EXPORT_INFO).exists() else ("saved_model.pb",)
    missing = [n for n in needed if not (path / n).exists()]
    return tuple(fingerprint), (f"is incomplete: missing {', '.join(missing)}" if missing else None)


def _signature_of(predictor: Any) -> tuple:
    """What clients must send: (categorical names, numeric names) for a ctrflow export; for a plain
    SavedModel (("savedmodel",), serving_default's "alias:dtype" inputs)."""
    if getattr(predictor, "kind", "ctrflow") == "savedmodel":
        sig = predictor.signatures.get("serving_default") or next(iter(predictor.signatures.values()))
        return (("savedmodel",), tuple(sorted(f"{a}:{i.dtype_name}" for a, i in sig.inputs.items())))
    return (tuple(predictor.categorical_names), tuple(predictor.numeric_names))


def _read_accepted(base: Path) -> tuple[tuple, str] | None:
    """(signature, kind) this model line accepted before, from its state file; None if none (or unreadable)."""
    path = base / ACCEPTED_SCHEMA_FILE
    try:
        doc = json.loads(path.read_text())
        cats, nums = doc["features"]["categorical"], doc["features"]["numeric"]
        return (tuple(map(str, cats)), tuple(map(str, nums))), str(doc.get("kind", "ctrflow"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s is unreadable (%s); the next served version's schema replaces it", path, e)
        return None


def _write_accepted(base: Path, signature: tuple, kind: str, version: int) -> None:
    from ctrflow.atomic import atomic_write_json

    cats, nums = signature
    doc = {"kind": kind, "features": {"categorical": list(cats), "numeric": list(nums)}, "accepted_version": version,
           "updated_unix": time.time(),
           "note": "ctrflow: the features this model line serves; versions with others are refused (allow_schema_change)"}
    try:
        atomic_write_json(base / ACCEPTED_SCHEMA_FILE, doc)
    except OSError as e:  # a read-only model store still serves; the check then covers this process only
        log.warning("cannot record the accepted schema in %s (%s); a restart will not remember it",
                    base / ACCEPTED_SCHEMA_FILE, e)


GIL_SWITCH_INTERVAL_S = 0.0005  # Python's GIL switch interval while a server runs or a version loads (5 ms by default)
_switch_holds = [0, 0.0]  # holders now, and the interval before the first of them
_switch_lock = threading.Lock()


def hold_short_switch_interval() -> None:
    """Cut Python's GIL switch interval to GIL_SWITCH_INTERVAL_S until every holder has released it.

    A thread that gives the GIL up (the event loop in every socket call, a request thread) then waits
    at most about that long for it while another thread runs Python (TensorFlow's call dispatch, a
    version's tf.saved_model.load). Counted, so a loader finishing while a server runs, or the other
    way round, never restores the 5 ms under the other."""
    import sys

    with _switch_lock:
        if _switch_holds[0] == 0:
            _switch_holds[1] = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch_holds[1], GIL_SWITCH_INTERVAL_S))
        _switch_holds[0] += 1


def release_short_switch_interval() -> None:
    """Undo one `hold_short_switch_interval`; the last release restores the interval from before."""
    import sys

    with _switch_lock:
        _switch_holds[0] -= 1
        if _switch_holds[0] == 0:
            sys.setswitchinterval(_switch_holds[1])


@contextmanager
def _background_priority(nice: int = 10, *, enabled: bool = True) -> Iterator[None]:
    """Run the block (loading and warming a version) so the version being served keeps its tail:
    this thread's CPU priority is lowered (Linux: per-thread nice +10), and Python's GIL switch
    interval is held short meanwhile (`hold_short_switch_interval`), so a request thread waits at most
    about 0.5 ms for the interpreter while the loader runs Python (tf.saved_model.load is mostly
    Python). Only the watcher thread does this (an unprivileged process cannot raise its priority back)."""
    if not enabled:
        yield
        return
    tid = threading.get_native_id()
    try:
        before = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, before + nice))
    except (AttributeError, OSError):
        before = None
    hold_short_switch_interval()
    try:
        yield
    finally:
        release_short_switch_interval()
        if before is not None:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, before)  # needs CAP_SYS_NICE; else the watcher stays lower
            except OSError:
                pass


def _describe_signature(signature: tuple) -> str:
    cats, nums = signature
    if tuple(cats) == ("savedmodel",):
        return f"(SavedModel inputs {list(nums)})"
    return f"(categorical {list(cats)}, numeric {list(nums)})"


_COUNTER_KEYS = ("requests", "predictions", "compute_calls", "timeouts", "rejects", "errors", "rows_dropped",
                 "rows_enqueued", "queue_wait_count", "shed", "expired", "invalid")


def _batcher_stats(predictor: Any) -> tuple[dict[str, float], tuple[int, ...], list[int]] | None:
    """(counters, batch size bounds, counts) from a predictor's `stats()`, or None without batching."""
    try:
        stats = predictor.stats()
    except Exception:  # noqa: BLE001 - a closed or odd predictor reports nothing
        return None
    if stats is None:
        return None
    if not isinstance(stats, Mapping):
        stats = stats.to_dict() if hasattr(stats, "to_dict") else None
        if stats is None:
            return None
    if "batcher" in stats and isinstance(stats["batcher"], Mapping):
        stats = stats["batcher"]
    if "compute_calls" not in stats:
        return None
    counters = {k: float(stats.get(k, 0) or 0) for k in _COUNTER_KEYS}
    counters["queue_wait_seconds_sum"] = float(stats.get("queue_wait_ms_sum", 0) or 0) / 1e3
    bounds: tuple[int, ...] = ()
    counts: list[int] = []
    if "batch_size_bounds" in stats:
        bounds, counts = tuple(stats["batch_size_bounds"]), list(stats["batch_size_counts"])
    elif isinstance(stats.get("batch_size_histogram"), Mapping):
        items = [(int(str(k).lstrip("<=")), int(v)) for k, v in stats["batch_size_histogram"].items()]
        bounds, counts = tuple(b for b, _ in items), [c for _, c in items]
    return counters, bounds, counts


def _add_hist(bounds: tuple[int, ...], counts: list[int], other_bounds: tuple[int, ...], other: list[int]):
    if not other_bounds:
        return bounds, counts
    if bounds != tuple(other_bounds):  # first one, or batching options changed: keep the newest shape
        return tuple(other_bounds), list(other)
    return bounds, [a + b for a, b in zip(counts, other)]
