"""Model server configuration: TF Serving's textproto `--model_config_file`, ctrflow's YAML/JSON twin,
TF Serving's `--batching_parameters_file`, and re-reading the config while serving.

TF Serving's format (parsed with its own `ModelServerConfig` proto and protobuf's `text_format`)::

    model_config_list {
      config {
        name: "ctr"
        base_path: "/srv/models/ctr"          # relative paths: relative to this file's folder
        model_platform: "tensorflow"
        model_version_policy { specific { versions: 3 versions: 4 } }   # or latest { num_versions: 2 }, or all {}
        version_labels { key: "stable" value: 3 }
        version_labels { key: "canary" value: 4 }
      }
    }

The YAML/JSON form says the same with ctrflow's keys (and per-model batching, and rollouts)::

    models:
      - name: ctr
        base_path: models/ctr
        version_policy: specific              # latest (default) | all | specific
        versions: [3, 4]                      # specific only
        keep_versions: 2                      # latest only: how many of the newest (TF Serving's num_versions)
        labels: {stable: 3, canary: 4}
        batching: {max_batch_size: 2048, batch_timeout_ms: 1.0}   # or false
        allow_schema_change: false
    rollouts: [...]                           # see ctrflow.serving.rollout

A file ending in .yaml/.yml/.json is YAML/JSON; any other is TF Serving's textproto (a file that does
not parse as either is refused with both parsers' messages). `ConfigWatcher` re-reads the file every
`poll_s` seconds and applies a changed one (TF Serving's `--model_config_file_poll_wait_seconds`); a
bad edit is logged and the running config stays.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ctrflow.errors import ConfigError
from ctrflow.serving.batcher import BatchingOptions
from ctrflow.serving.models import ModelSpec

__all__ = [
    "ConfigWatcher",
    "ServerConfig",
    "TF_SERVING_BATCHING_DEFAULTS",
    "load_model_config",
    "parse_batching_parameters",
    "parse_model_server_config",
    "specs_from_proto",
    "specs_from_yaml",
]

log = logging.getLogger("ctrflow.serving")

_YAML_SUFFIXES = {".yaml", ".yml", ".json"}
_MODEL_KEYS = {"name", "base_path", "batching", "keep_versions", "allow_schema_change", "version_policy", "versions",
               "labels"}

# TF Serving's values for batching parameters a --batching_parameters_file leaves out
# (SharedBatchScheduler::QueueOptions: 1000 rows, 0 µs, 10 batches queued); threads: ctrflow's 1.
TF_SERVING_BATCHING_DEFAULTS = BatchingOptions(max_batch_size=1000, batch_timeout_ms=0.0, num_batch_threads=1,
                                               max_enqueued=10_000)


@dataclass(frozen=True)
class ServerConfig:
    """A parsed model config file: the models, the rollouts (raw, checked by `ctrflow.serving.rollout`)."""

    models: tuple[ModelSpec, ...]
    rollouts: tuple[Mapping[str, Any], ...] = ()
    source: str = ""
    format: str = "yaml"  # "yaml" (YAML/JSON) or "textproto"
    fingerprint: str = field(default="", compare=False)


# ---- TF Serving's textproto -----------------------------------------------------------------------


def parse_model_server_config(text: str, *, source: str) -> Any:
    """Text → `tensorflow.serving.ModelServerConfig`, with protobuf's line:column in errors."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    try:
        return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    except text_format.ParseError as e:
        raise ConfigError(f"{source}:{e}") from None


def specs_from_proto(config: Any, *, base_dir: Path, batching: BatchingOptions | None, source: str) -> list[ModelSpec]:
    """A ModelServerConfig's `model_config_list` → ModelSpecs (every model gets the server's batching)."""
    choice = config.WhichOneof("config")
    if choice != "model_config_list":
        raise ConfigError(f"{source}: only 'model_config_list' is supported"
                          + (f" (got '{choice}')" if choice else " (the file lists no model)") + ".")
    specs = []
    for i, mc in enumerate(config.model_config_list.config):
        where = f"{source}: model_config_list.config[{i}]"
        if not mc.name or not mc.base_path:
            raise ConfigError(f"{where}: 'name' and 'base_path' are required.")
        if mc.model_platform not in ("", "tensorflow"):
            raise ConfigError(f"{where}: model_platform {mc.model_platform!r} is not served here; only 'tensorflow'.")
        if mc.HasField("logging_config"):
            log.warning("%s: logging_config is ignored; use ctrflow's rollouts 'log' section (YAML config)", where)
        policy = mc.model_version_policy.WhichOneof("policy_choice") or "latest"
        keep, versions = 1, ()
        if policy == "latest":
            keep = mc.model_version_policy.latest.num_versions or 1
        elif policy == "specific":
            versions = tuple(mc.model_version_policy.specific.versions)
            if not versions:
                raise ConfigError(f"{where}: a 'specific' version policy must list at least one version.")
        base = Path(mc.base_path)
        specs.append(ModelSpec(
            name=mc.name, base_path=str(base if base.is_absolute() else base_dir / base), batching=batching,
            keep_versions=keep, version_policy=policy, versions=versions, labels=dict(mc.version_labels),
        ))
    if not specs:
        raise ConfigError(f"{source}: model_config_list lists no model.")
    return specs


# ---- ctrflow's YAML / JSON ------------------------------------------------------------------------


def _batching_from(raw: Any, where: str, default: BatchingOptions | None) -> BatchingOptions | None:
    if raw is True:
        return default if default is not None else BatchingOptions()  # YAML asked for batching explicitly
    if raw is False or raw is None:
        return None
    if isinstance(raw, Mapping):
        allowed = {f.name for f in fields(BatchingOptions)}
        bad = set(raw) - allowed
        if bad:
            raise ConfigError(f"In {where}: unknown batching options {sorted(bad)}; allowed: {sorted(allowed)}.")
        return BatchingOptions(**raw)
    raise ConfigError(f"In {where}: 'batching' must be a mapping of BatchingOptions or false. Got {raw!r} instead.")


def specs_from_yaml(doc: Any, *, base_dir: Path, batching: BatchingOptions | None, source: str) -> list[ModelSpec]:
    """`{"models": [...]}` (the YAML/JSON form) → ModelSpecs."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("models"), list) or not doc["models"]:
        raise ConfigError(f"Model config {source} must be a mapping with a non-empty 'models' list.")
    extra = set(doc) - {"models", "rollouts"}
    if extra:
        raise ConfigError(f"Model config {source} has unknown top-level keys {sorted(extra)}; allowed: 'models', 'rollouts'.")
    specs = []
    for i, entry in enumerate(doc["models"]):
        where = f"model config {source}, models[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"In {where}: each model must be a mapping. Got {entry!r} instead.")
        unknown = set(entry) - _MODEL_KEYS
        if unknown:
            from ctrflow.validation import suggest

            hint = "".join(f" (did you mean {s!r}?)" for s in (suggest(k, _MODEL_KEYS) for k in sorted(unknown)) if s)
            raise ConfigError(f"In {where}: unknown keys {sorted(unknown)}{hint}; allowed: {sorted(_MODEL_KEYS)}.")
        if "name" not in entry or "base_path" not in entry:
            raise ConfigError(f"In {where}: 'name' and 'base_path' are required.")
        base = Path(str(entry["base_path"]))
        labels = entry.get("labels") or {}
        if not isinstance(labels, Mapping):
            raise ConfigError(f"In {where}: 'labels' must map label names to versions. Got {labels!r} instead.")
        versions = entry.get("versions") or ()
        if not isinstance(versions, (list, tuple)):
            raise ConfigError(f"In {where}: 'versions' must be a list of version numbers. Got {versions!r} instead.")
        allow = entry.get("allow_schema_change", False)
        if not isinstance(allow, bool):
            raise ConfigError(f"In {where}: 'allow_schema_change' must be true or false. Got {allow!r} instead.")
        specs.append(ModelSpec(
            name=entry["name"], base_path=str(base if base.is_absolute() else base_dir / base),
            batching=_batching_from(entry.get("batching", True), where, batching),
            keep_versions=entry.get("keep_versions", 1), allow_schema_change=allow,
            version_policy=entry.get("version_policy", "latest"), versions=tuple(versions), labels=dict(labels),
        ))
    return specs


# ---- the file -------------------------------------------------------------------------------------


_DEFAULT: Any = object()


def load_model_config(path: str | Path, *, batching: BatchingOptions | None = _DEFAULT) -> ServerConfig:
    """Read a model config file, textproto or YAML/JSON (see the module docstring).

    Args:
        batching: what a textproto's models are batched with (TF Serving's config has no per-model
            batching: the server's flags decide; None: no batching), and YAML models that say
            `batching: true` or nothing. Default: ctrflow's BatchingOptions().
    """
    from ctrflow.configfile import parse_config_text, read_config_text

    p = Path(path)
    text = read_config_text(p, what="model config file")
    default = BatchingOptions() if batching is _DEFAULT else batching
    digest = hashlib.sha256(text.encode()).hexdigest()
    names: list[str]
    if p.suffix.lower() in _YAML_SUFFIXES:
        doc = parse_config_text(text, source=str(p), fmt="json" if p.suffix.lower() == ".json" else "yaml")
        specs = specs_from_yaml(doc, base_dir=p.parent, batching=default, source=str(p))
        rollouts = doc.get("rollouts") or []
        if not isinstance(rollouts, list):
            raise ConfigError(f"Model config {p}: 'rollouts' must be a list. Got {type(rollouts).__name__} instead.")
        fmt = "yaml"
    else:
        proto = parse_model_server_config(text, source=str(p))
        specs = specs_from_proto(proto, base_dir=p.parent, batching=default, source=str(p))
        rollouts, fmt = [], "textproto"
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"Model config {p} names these models more than once: {dupes}.")
    return ServerConfig(tuple(specs), tuple(rollouts), str(p), fmt, digest)


def config_from_request(request: Any, *, batching: BatchingOptions | None = _DEFAULT) -> ServerConfig:
    """gRPC `ReloadConfigRequest` → ServerConfig (relative base paths: relative to the working folder)."""
    specs = specs_from_proto(request.config, base_dir=Path.cwd(), batching=BatchingOptions() if batching is _DEFAULT else batching,
                             source="ReloadConfigRequest")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"ReloadConfigRequest names a model more than once: {names}.")
    return ServerConfig(tuple(specs), (), "ReloadConfigRequest", "textproto", request.config.SerializeToString().hex())


class ConfigWatcher:
    """Re-reads a model config file every `poll_s` seconds and calls `apply(config)` when it changed.

    A file that fails to parse (or that `apply` refuses) is logged with the reason and the running
    config stays; the same bad content is not reported twice.
    """

    def __init__(self, path: str | Path, apply: Callable[[ServerConfig], None], poll_s: float, *,
                 batching: BatchingOptions | None = _DEFAULT, current: ServerConfig | None = None) -> None:
        if not isinstance(poll_s, (int, float)) or isinstance(poll_s, bool) or not poll_s > 0:
            raise ConfigError(f"The 'model_config_file_poll_wait_seconds' must be a number > 0. Got {poll_s!r} instead.")
        self.path = Path(path)
        self._apply = apply
        self._poll_s = float(poll_s)
        self._batching = batching
        self._seen = current.fingerprint if current is not None else ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reloads = 0
        self.errors = 0

    def check_once(self) -> bool:
        """Read the file now; apply it if its content changed. True when a new config was applied."""
        try:
            text = self.path.read_bytes()
        except OSError as e:
            log.warning("model config %s: cannot read it (%s); keeping the running config", self.path, e)
            return False
        digest = hashlib.sha256(text).hexdigest()
        if digest == self._seen:
            return False
        self._seen = digest
        try:
            config = load_model_config(self.path, batching=self._batching)
            self._apply(config)
        except Exception as e:  # noqa: BLE001 - a bad edit must not stop serving
            self.errors += 1
            log.error("model config %s changed but was not applied: %s; keeping the running config", self.path, e)
            return False
        self.reloads += 1
        log.info("model config %s re-read: serving %s", self.path, [s.name for s in config.models])
        return True

    def start(self) -> ConfigWatcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ctrflow-config-watcher", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            self.check_once()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# ---- TF Serving's --batching_parameters_file ------------------------------------------------------

_BATCHING_CLASS: Any = None


def _batching_parameters_class() -> Any:
    """tensorflow.serving.BatchingParameters (session_bundle_config.proto). The tensorflow-serving-api
    wheel does not ship that proto, so the message is declared here with the same field names and
    numbers, in a private descriptor pool, and parsed with protobuf's text_format."""
    global _BATCHING_CLASS
    if _BATCHING_CLASS is None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

        pool = descriptor_pool.DescriptorPool()
        wrappers = descriptor_pb2.FileDescriptorProto.FromString(wrappers_pb2.DESCRIPTOR.serialized_pb)
        pool.Add(wrappers)
        fd = descriptor_pb2.FileDescriptorProto(name="ctrflow/batching_parameters.proto", package="tensorflow.serving",
                                                syntax="proto3", dependency=[wrappers.name])
        msg = fd.message_type.add(name="BatchingParameters")
        F = descriptor_pb2.FieldDescriptorProto
        for number, name, kind in (
            (1, "max_batch_size", ".google.protobuf.Int64Value"), (2, "batch_timeout_micros", ".google.protobuf.Int64Value"),
            (3, "max_enqueued_batches", ".google.protobuf.Int64Value"), (4, "num_batch_threads", ".google.protobuf.Int64Value"),
            (5, "thread_pool_name", ".google.protobuf.StringValue"),
        ):
            msg.field.add(name=name, number=number, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE, type_name=kind)
        msg.field.add(name="allowed_batch_sizes", number=6, label=F.LABEL_REPEATED, type=F.TYPE_INT64)
        msg.field.add(name="pad_variable_length_inputs", number=7, label=F.LABEL_OPTIONAL, type=F.TYPE_BOOL)
        msg.field.add(name="enable_large_batch_splitting", number=8, label=F.LABEL_OPTIONAL, type=F.TYPE_BOOL)
        msg.field.add(name="max_execution_batch_size", number=9, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                      type_name=".google.protobuf.Int64Value")
        pool.Add(fd)
        _BATCHING_CLASS = message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))
    return _BATCHING_CLASS


def parse_batching_parameters(path: str | Path) -> BatchingOptions:
    """TF Serving's `--batching_parameters_file` (textproto BatchingParameters) → BatchingOptions.

    `max_batch_size`, `batch_timeout_micros`, `num_batch_threads` map one to one; the queue bound is
    `max_enqueued_batches × max_batch_size` rows. `allowed_batch_sizes`, `pad_variable_length_inputs`,
    `thread_pool_name` and large-batch splitting have no meaning here (ctrflow's inputs are [n] columns
    and batches are split already) and are accepted, with a log line. Omitted fields take TF Serving's
    defaults (`TF_SERVING_BATCHING_DEFAULTS`).
    """
    from google.protobuf import text_format

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the batching parameters file ({getattr(e, 'strerror', None) or e}).") from None
    try:
        msg = text_format.Parse(text, _batching_parameters_class()())
    except text_format.ParseError as e:
        raise ConfigError(f"{p}:{e}") from None
    d = TF_SERVING_BATCHING_DEFAULTS
    size = msg.max_batch_size.value if msg.HasField("max_batch_size") else d.max_batch_size
    timeout_ms = msg.batch_timeout_micros.value / 1e3 if msg.HasField("batch_timeout_micros") else d.batch_timeout_ms
    threads = msg.num_batch_threads.value if msg.HasField("num_batch_threads") else d.num_batch_threads
    batches = msg.max_enqueued_batches.value if msg.HasField("max_enqueued_batches") else d.max_enqueued // d.max_batch_size
    ignored = [f.name for f, _ in msg.ListFields() if f.name in ("allowed_batch_sizes", "pad_variable_length_inputs",
                                                                 "thread_pool_name", "enable_large_batch_splitting",
                                                                 "max_execution_batch_size")]
    if ignored:
        log.info("%s: %s have no effect in ctrflow's batcher (columns of [n], batches split already)", p, ignored)
    try:
        return BatchingOptions(max_batch_size=int(size), batch_timeout_ms=float(timeout_ms),
                               num_batch_threads=int(threads), max_enqueued=int(max(batches, 1) * size))
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def apply_config(manager: Any, config: ServerConfig) -> None:
    """Put a parsed config in force on a running `ModelManager`: its models, then its rollouts."""
    from ctrflow.serving.rollout import RolloutSet, parse_rollouts

    base_dir = Path(config.source).parent if config.source and config.format == "yaml" else None
    rollouts = parse_rollouts(config.rollouts, [s.name for s in config.models], source=config.source or "model config",
                              base_dir=base_dir)
    manager.reconfigure(config.models)
    manager.set_rollouts(RolloutSet(rollouts))
