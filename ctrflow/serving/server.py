"""The serving life cycle: `serve(ServeOptions(...))` loads the models, starts REST (and gRPC), `stop()` ends them.

`serve(ServeOptions(model_base_path="models/ctr", port=8501))` starts a `Server`: the model registry
with hot reload (`ModelManager`), the REST routes (`ctrflow.serving.rest`) behind the HTTP/1.1
transport (`ctrflow.serving.http`) on a background event loop and, when `grpc_port` is set, the
gRPC `PredictionService` (`ctrflow.serving.grpc_server`).
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ctrflow.errors import ConfigError
from ctrflow.serving.batcher import BatchingOptions
from ctrflow.serving.hugepages import HUGE_PAGE_MODES
from ctrflow.serving.metrics import CONTENT_TYPE, PUBLISH_INTERVAL_S, ModelCollector, ServingMetrics, collector, rollout_families
from ctrflow.serving.models import ManagerOptions, ModelManager, ModelSpec, load_model_config
from ctrflow.serving.rest import RestRoutes
from ctrflow.validation import Choice, Float, Int, check_fields

__all__ = ["freeze_heap", "ServeOptions", "Server", "serve"]

log = logging.getLogger("ctrflow.serving")


@dataclass(frozen=True)
class ServeOptions:
    """What `serve` serves and how; exactly one of model_base_path, model_config_file, models."""

    # One model: its base path (integer version folders). Its name defaults to the folder's name.
    model_base_path: str | None = None
    # Name of the model given by model_base_path; default: the base path's last folder name.
    model_name: str | None = None
    # Several models: a YAML/JSON file (see `ctrflow.serving.models.load_model_config`).
    model_config_file: str | None = None
    # Several models given directly (API use).
    models: tuple[ModelSpec, ...] = ()
    # Interface to listen on. Default loopback; "0.0.0.0" to accept remote clients.
    host: str = "127.0.0.1"
    # REST port, 0..65535; 0 picks a free one (read it back from `Server.port`). Default 8501.
    port: int = 8501
    # gRPC port (0 picks a free one); None: no gRPC server. Default None.
    grpc_port: int | None = None
    # Autobatching for model_base_path (None: every request computed on its own). Config-file
    # models carry their own.
    batching: BatchingOptions | None = field(default_factory=BatchingOptions)
    # Newest versions served at once for model_base_path, >= 1. Default 1.
    keep_versions: int = 1
    # Seconds between scans of the base paths for new versions, > 0. Default 1.0.
    poll_interval_s: float = 1.0
    # Warm up each version before it takes traffic. Default True.
    warmup: bool = True
    # Longest a replaced version waits for its in-flight requests before closing, seconds. Default 30.
    drain_grace_s: float = 30.0
    # Largest request body accepted, in bytes, >= 1024; larger ones get 413. Default 8 MiB.
    max_body_bytes: int = 8 << 20
    # Largest request head (request line + headers), in bytes, >= 1024; else 431. Default 64 KiB.
    max_header_bytes: int = 64 << 10
    # Most candidates in one request, >= 1; more get 413. Default 100,000.
    max_rows_per_request: int = 100_000
    # Deadline of a request that sends no X-Deadline-Ms header, in ms (> 0); None: no deadline.
    default_timeout_ms: float | None = None
    # Seconds an idle keep-alive connection stays open, > 0. Default 75.
    keep_alive_timeout_s: float = 75.0
    # Seconds from a request's first byte to the end of its head, > 0; later: 408 and close. Default 10.
    head_timeout_s: float = 10.0
    # Seconds from the end of a request's head to the end of its body, > 0; later: 408 and close. Default 30.
    body_timeout_s: float = 30.0
    # Seconds a client may leave our answer unread (write buffer full) before its connection is dropped, > 0.
    drain_timeout_s: float = 30.0
    # Open HTTP connections at most, >= 1; one more is answered 503 and closed. Default 1000.
    max_connections: int = 1000
    # Request-body bytes buffered at once over all connections (requests read, not yet answered),
    # >= max_body_bytes; a request that would pass it gets 503 (retry). Default 256 MiB.
    max_buffered_body_bytes: int = 256 << 20
    # Threads computing unbatched requests (REST and gRPC), >= 1. Default 8.
    worker_threads: int = 8
    # TensorFlow's thread pools, as TF Serving's --tensorflow_intra_op_parallelism / _inter_op_: threads
    # one op may split over, and ops run at once, >= 0; 0: TensorFlow chooses (about the cores). Applied
    # by `start_server` before the models load (a process's TensorFlow takes them once). Default 0.
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    # "auto": loaded models' large variables (embedding tables) go on transparent huge pages where the
    # kernel allows, cheaper gathers at the same scores (`ctrflow.serving.hugepages`); "off". Default "auto".
    huge_pages: str = "auto"

    def __post_init__(self) -> None:
        sources = [x for x in ("model_base_path", "model_config_file", "models") if getattr(self, x)]
        if len(sources) != 1:
            raise ConfigError(
                "ServeOptions needs exactly one of 'model_base_path' (one model), 'model_config_file' or "
                f"'models' (several). Got {sources or 'none'}."
            )
        object.__setattr__(self, "models", tuple(self.models))
        check_fields(self, {"port": Int(0, 65535), "grpc_port": Int(0, 65535, optional=True), "keep_versions": Int(1),
                            "max_body_bytes": Int(1024), "max_header_bytes": Int(1024), "max_rows_per_request": Int(1),
                            "worker_threads": Int(1), "max_connections": Int(1), "intra_op_threads": Int(0),
                            "inter_op_threads": Int(0), "huge_pages": Choice(HUGE_PAGE_MODES)})
        check_fields(self, {"max_buffered_body_bytes": Int(self.max_body_bytes)})
        if self.grpc_port is not None:
            if self.grpc_port == self.port and self.port != 0:
                raise ConfigError(f"The 'grpc_port' parameter of ServeOptions must differ from 'port' ({self.port}).")
        for name in ("keep_alive_timeout_s", "poll_interval_s", "head_timeout_s", "body_timeout_s", "drain_timeout_s"):
            check_fields(self, {name: Float(0.0, low_open=True)})
        if self.default_timeout_ms is not None:
            check_fields(self, {"default_timeout_ms": Float(0.0, low_open=True)})
        if self.batching is not None and not isinstance(self.batching, BatchingOptions):
            raise ConfigError(f"The 'batching' parameter of ServeOptions must be BatchingOptions or None. Got {self.batching!r} instead.")

    def model_specs(self) -> list[ModelSpec]:
        """The served models these options name."""
        if self.model_config_file:
            return load_model_config(self.model_config_file)
        if self.models:
            return list(self.models)
        base = os.path.abspath(str(self.model_base_path))
        name = self.model_name or os.path.basename(base.rstrip(os.sep)) or "default"
        return [ModelSpec(name, base, batching=self.batching, keep_versions=self.keep_versions)]


def apply_tf_threads(intra_op: int, inter_op: int) -> None:
    """Size TensorFlow's intra-/inter-op thread pools (0: leave TensorFlow's choice). Only before this
    process's TensorFlow runs anything: later a different size is a `ConfigError`, not a silent no-op."""
    if not (intra_op or inter_op):
        return
    import tensorflow as tf

    threading_ = tf.config.threading
    for n, get, set_, what in ((intra_op, threading_.get_intra_op_parallelism_threads,
                                threading_.set_intra_op_parallelism_threads, "intra-op"),
                               (inter_op, threading_.get_inter_op_parallelism_threads,
                                threading_.set_inter_op_parallelism_threads, "inter-op")):
        if n and get() != n:
            try:
                set_(n)
            except RuntimeError:
                raise ConfigError(f"cannot set TensorFlow's {what} threads to {n}: this process's TensorFlow "
                                  f"already runs with {get() or 'its default'}.") from None
    log.info("TensorFlow threads: intra-op %s, inter-op %s", intra_op or "default", inter_op or "default")


class Server:
    """A running REST (and optional gRPC) server over a `ModelManager`; `stop()` shuts all down.

    Use `serve(options)` to build and start one; `.port`, `.grpc_port`, `.url` tell where it listens.
    """

    def __init__(self, options: ServeOptions, *, manager: ModelManager | None = None, reuse_port: bool = False) -> None:
        self.options = options
        self.manager = manager or ModelManager(
            options.model_specs(),
            ManagerOptions(poll_interval_s=options.poll_interval_s, warmup=options.warmup, drain_grace_s=options.drain_grace_s,
                           huge_pages=options.huge_pages),
        )
        self.metrics = ServingMetrics()
        self.port: int | None = None
        self.grpc_port: int | None = None
        self._grpc: Any = None
        self._pool = ThreadPoolExecutor(options.worker_threads, thread_name_prefix="ctrflow-http-compute")
        self._stopped = threading.Event()
        self.routes = RestRoutes(
            self.manager, self.metrics, pool=self._pool, max_rows_per_request=options.max_rows_per_request,
            default_timeout_ms=options.default_timeout_ms, render_metrics=self._render_metrics,
        )
        if reuse_port:  # one of several worker processes on one port (ctrflow.serving.workers)
            from ctrflow.serving.workers import reuseport_transport

            Transport = reuseport_transport()
        else:
            from ctrflow.serving.http import HttpTransport as Transport

        self._http = Transport(options, self.routes.handle)
        self._publisher: Any = None
        self.metrics.add_collector(ModelCollector(self.manager.gauges, self.manager.ready))
        self.metrics.add_collector(collector(self._http.collect))
        self.metrics.add_collector(collector(lambda: rollout_families(self.manager.rollouts.stats())))

    def _render_metrics(self) -> tuple[bytes, bytes]:
        return self.metrics.render(), CONTENT_TYPE

    @property
    def url(self) -> str:
        host = self.options.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def start(self) -> Server:
        """Load the models (blocking), bind the ports and start serving on background threads."""
        self.manager.start()
        try:
            self.port = self._http.start()
        except BaseException as e:
            self.manager.close()
            raise ConfigError(f"Cannot listen on {self.options.host}:{self.options.port}: {e}") from None
        if self.options.grpc_port is not None:
            from ctrflow.serving.grpc_server import GrpcServer

            try:
                self._grpc = GrpcServer(self.manager, self.metrics, host=self.options.host, port=self.options.grpc_port,
                                        pool=self._pool, default_timeout_ms=self.options.default_timeout_ms,
                                        max_rows=self.options.max_rows_per_request)
                self.grpc_port = self._http.run(self._grpc.start())  # on the serving loop, beside REST
            except BaseException:
                self.stop()
                raise
        if self.metrics.multiprocess is not None:  # a worker: publish what only this process knows
            import asyncio

            self._publisher = asyncio.run_coroutine_threadsafe(self.metrics.publish_every(PUBLISH_INTERVAL_S), self._http.loop)
        log.info("serving %s on %s%s", ", ".join(self.manager.model_names), self.url,
                 f" and gRPC port {self.grpc_port}" if self.grpc_port else "")
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, finish in-flight requests (up to `grace_s`), close every model. Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._grpc is not None:
            try:
                self._http.run(self._grpc.stop(grace_s), timeout_s=grace_s + 5)
            except Exception:  # noqa: BLE001 - stopping regardless
                log.exception("the gRPC server did not stop cleanly")
        if self._publisher is not None:
            self._publisher.cancel()
        self._http.stop(grace_s)
        if self.metrics.multiprocess is not None:
            self.metrics.publish()  # the final figures of this worker
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.manager.close()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until `stop()` (from another thread or a signal handler); True if stopped."""
        return self._stopped.wait(timeout_s)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def freeze_heap() -> None:
    """Move every object alive now (TensorFlow's modules, the loaded models) out of the cyclic collector's view.

    Why: with TensorFlow loaded the heap holds millions of tracked objects, and each full (generation 2)
    collection walks them all — measured 100-300 ms pauses of the serving loop at 300 req/s, which were
    the whole p99 tail (BENCHMARKS.md). Frozen objects are still freed by reference counting; only cycles
    among them are never collected, which is harmless for objects that live as long as the process.
    Called by the server commands (`ctrflow serve`, `ctrflow-model-server`) once their models are loaded;
    a program that embeds a `Server` calls it itself when its own start-up is done.
    """
    import gc

    gc.collect()
    gc.freeze()


def serve(options: ServeOptions) -> Server:
    """Start serving `options`' models; returns the running `Server` (call `.stop()` when done).

    Example:
        server = serve(ServeOptions(model_base_path="models/ctr", port=0))
        print(server.url)   # http://127.0.0.1:43121 → POST {url}/v1/models/ctr:predict
    """
    return Server(options).start()
