"""The REST front end: TensorFlow Serving's predict API over HTTP/1.1, plus a compact columnar endpoint.

`serve(ServeOptions(model_base_path="models/ctr", port=8501))` starts a `Server`: one asyncio event
loop on a background thread (keep-alive connections, pipelining, no framework), the model registry
with hot reload (`ModelManager`), and, when `grpc_port` is set, the gRPC `PredictionService`.

Endpoints (NAME: a served model; `/versions/V` may follow NAME to pin a loaded version):

    POST /v1/models/NAME:predict            {"instances": [{"C1": "68fd1e64", "I1": 3, ...}, ...]}
                                            → {"predictions": [p, ...]}
                                            {"inputs": {"C1": [...], "I1": [...]}} → {"outputs": [p, ...]}
    POST /v1/models/NAME:predict_columnar   compact columns for high-rate clients (see `COLUMNAR_FORMAT`)
    GET  /v1/models/NAME                    {"model_version_status": [{"version": "3", "state": "AVAILABLE", ...}]}
    GET  /v1/models/NAME/metadata           input names and kinds
    GET  /metrics                           Prometheus text format
    GET  /healthz                           200 while the process serves
    GET  /readyz                            200 once every model has a version loaded, else 503

Errors are `{"error": "..."}` with 400 (bad request), 404 (unknown model/version/path), 405, 411,
413 (body over `max_body_bytes` or too many rows), 431, 503 (queue full or not ready: retry), 504
(the request's deadline passed: header `X-Deadline-Ms`, else `default_timeout_ms`), 500 (a bug).
Every predict response carries `X-Model-Version`.

Implementation details follow: one coroutine per connection reads a request head with `readuntil`,
the body by Content-Length (or chunks), parses it on the loop (bodies above 1 MiB on a worker thread),
then awaits the batcher's future, so thousands of concurrent requests cost no threads. Without
batching the compute runs on a small thread pool so the loop keeps serving.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import numbers
import operator
import os
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctrflow.errors import (
    ConfigError,
    CtrflowError,
    DeadlineExceeded,
    ModelNotFoundError,
    QueueFullError,
    SchemaError,
)
from ctrflow.serving.batcher import BatchingOptions
from ctrflow.serving.metrics import ServingMetrics
from ctrflow.serving.models import ManagerOptions, ModelManager, ModelNotReadyError, ModelSpec, load_model_config

__all__ = [
    "COLUMNAR_CONTENT_TYPE",
    "COLUMNAR_FORMAT",
    "ParsedRequest",
    "RequestError",
    "Server",
    "ServeOptions",
    "decode_columnar",
    "encode_columnar",
    "parse_predict_json",
    "serve",
]

log = logging.getLogger("ctrflow.serving")

COLUMNAR_CONTENT_TYPE = "application/x-ctrflow-columnar"
COLUMNAR_FORMAT = """\
The binary columnar body (Content-Type: application/x-ctrflow-columnar), little-endian:
  header   b"CTRC"  u8 format=1  u8 0  u16 n_columns  u32 n_rows                  (12 bytes)
  column   u16 name_len  name (UTF-8)  u8 kind  u8 0  u32 width  payload (n_rows * width bytes)
           kind b"S": fixed-width byte strings, NUL-padded (b"" = missing; trailing NULs are padding), width >= 1
           kind b"f": float32 (width 4), kind b"d": float64 (width 8); NaN = missing
Every schema field exactly once: categoricals as "S", numerics as "f"/"d". The answer is n_rows
little-endian float32 probabilities (Content-Type application/octet-stream), or JSON
{"outputs": [...]} when the request says Accept: application/json.
The JSON twin (Content-Type: application/json): {"columns": ["C1", ...], "data": [[...], ...]}."""


class RequestError(CtrflowError):
    """A request the server refuses before any model sees it; `status` is the HTTP code to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ---- options and life cycle ---------------------------------------------------------------------


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
    # Threads computing unbatched requests (and gRPC handler threads), >= 1. Default 8.
    worker_threads: int = 8

    def __post_init__(self) -> None:
        sources = [x for x in ("model_base_path", "model_config_file", "models") if getattr(self, x)]
        if len(sources) != 1:
            raise ConfigError(
                "ServeOptions needs exactly one of 'model_base_path' (one model), 'model_config_file' or "
                f"'models' (several). Got {sources or 'none'}."
            )
        object.__setattr__(self, "models", tuple(self.models))
        _check_int("port", self.port, 0, 65535)
        if self.grpc_port is not None:
            _check_int("grpc_port", self.grpc_port, 0, 65535)
            if self.grpc_port == self.port and self.port != 0:
                raise ConfigError(f"The 'grpc_port' option of ServeOptions must differ from 'port' ({self.port}).")
        _check_int("keep_versions", self.keep_versions, 1)
        _check_int("max_body_bytes", self.max_body_bytes, 1024)
        _check_int("max_header_bytes", self.max_header_bytes, 1024)
        _check_int("max_rows_per_request", self.max_rows_per_request, 1)
        _check_int("worker_threads", self.worker_threads, 1)
        for name in ("keep_alive_timeout_s", "poll_interval_s"):
            _check_positive(name, getattr(self, name))
        if self.default_timeout_ms is not None:
            _check_positive("default_timeout_ms", self.default_timeout_ms)
        if self.batching is not None and not isinstance(self.batching, BatchingOptions):
            raise ConfigError(f"The 'batching' option of ServeOptions must be BatchingOptions or None. Got {self.batching!r} instead.")

    def model_specs(self) -> list[ModelSpec]:
        """The served models these options name."""
        if self.model_config_file:
            return load_model_config(self.model_config_file)
        if self.models:
            return list(self.models)
        base = os.path.abspath(str(self.model_base_path))
        name = self.model_name or os.path.basename(base.rstrip(os.sep)) or "default"
        return [ModelSpec(name, base, batching=self.batching, keep_versions=self.keep_versions)]


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"The '{name}' option of ServeOptions must be an int {span}. Got {value!r} instead.")


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"The '{name}' option of ServeOptions must be a finite number > 0. Got {value!r} instead.")


class Server:
    """A running REST (and optional gRPC) server over a `ModelManager`; `stop()` shuts all down.

    Use `serve(options)` to build and start one; `.port`, `.grpc_port`, `.url` tell where it listens.
    """

    def __init__(self, options: ServeOptions, *, manager: ModelManager | None = None) -> None:
        self.options = options
        self.manager = manager or ModelManager(
            options.model_specs(),
            ManagerOptions(poll_interval_s=options.poll_interval_s, warmup=options.warmup, drain_grace_s=options.drain_grace_s),
        )
        self.metrics = ServingMetrics()
        self.port: int | None = None
        self.grpc_port: int | None = None
        self._grpc: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pool = ThreadPoolExecutor(options.worker_threads, thread_name_prefix="ctrflow-http-compute")
        self._stopped = threading.Event()
        self._handler = _Handler(self)

    @property
    def url(self) -> str:
        host = self.options.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def start(self) -> Server:
        """Load the models (blocking), bind the ports and start serving on background threads."""
        self.manager.start()
        started = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(
                        self._connection, self.options.host, self.options.port,
                        limit=self.options.max_header_bytes, reuse_address=True, backlog=1024,
                    )
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:  # noqa: BLE001 - reported to start()
                errors.append(e)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="ctrflow-http", daemon=True)
        self._thread.start()
        started.wait()
        if errors:
            self.manager.close()
            e = errors[0]
            raise ConfigError(f"Cannot listen on {self.options.host}:{self.options.port}: {e}") from None
        if self.options.grpc_port is not None:
            from ctrflow.serving.grpc_server import GrpcServer

            try:
                self._grpc = GrpcServer(self.manager, self.metrics, host=self.options.host, port=self.options.grpc_port,
                                        workers=self.options.worker_threads, default_timeout_ms=self.options.default_timeout_ms,
                                        max_rows=self.options.max_rows_per_request)
                self.grpc_port = self._grpc.start()
            except BaseException:
                self.stop()
                raise
        log.info("serving %s on %s%s", ", ".join(self.manager.model_names), self.url,
                 f" and gRPC port {self.grpc_port}" if self.grpc_port else "")
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, close connections, close every model (queued requests finish). Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._grpc is not None:
            self._grpc.stop(grace_s)
        loop = self._loop
        if loop is not None and self._thread is not None and self._thread.is_alive():
            async def shutdown() -> None:
                if self._server is not None:
                    self._server.close()
                for w in list(self._writers):
                    w.close()
                await asyncio.sleep(0)

            try:
                asyncio.run_coroutine_threadsafe(shutdown(), loop).result(grace_s)
            except Exception:  # noqa: BLE001 - shutting down regardless
                pass
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(grace_s + 5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.manager.close()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until `stop()` (from another thread or a signal handler); True if stopped."""
        return self._stopped.wait(timeout_s)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the connection loop ------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        loop = asyncio.get_running_loop()
        idle = self.options.keep_alive_timeout_s
        try:
            while True:
                timer = loop.call_later(idle, writer.close)  # cheaper than wait_for per request
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    await self._reply_and_close(writer, 431, _error_body("Request head larger than "
                                                f"max_header_bytes={self.options.max_header_bytes}."))
                    return
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                finally:
                    timer.cancel()
                keep_alive = await self._handler.handle(head, reader, writer)
                if not keep_alive:
                    await _close(writer)
                    return
                if writer.transport.get_write_buffer_size() > 1 << 16:
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:  # noqa: BLE001 - one broken connection must not take the server down
            log.exception("connection handler failed")
        finally:
            self._writers.discard(writer)
            if not writer.is_closing():
                writer.close()

    async def _reply_and_close(self, writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
        writer.write(_response(status, body, b"application/json", keep_alive=False))
        await _close(writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    try:
        await writer.drain()
    except ConnectionError:
        pass
    writer.close()


def serve(options: ServeOptions) -> Server:
    """Start serving `options`' models; returns the running `Server` (call `.stop()` when done).

    Example:
        server = serve(ServeOptions(model_base_path="models/ctr", port=0))
        print(server.url)   # http://127.0.0.1:43121 → POST {url}/v1/models/ctr:predict
    """
    return Server(options).start()


# ---- HTTP framing ---------------------------------------------------------------------------------

_REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    411: "Length Required", 413: "Content Too Large", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable", 504: "Gateway Timeout",
}


def _response(status: int, body: bytes, content_type: bytes, *, keep_alive: bool = True,
              extra: bytes = b"") -> bytes:
    head = (
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n"
        % (status, _REASONS.get(status, "Error").encode(), content_type, len(body), extra,
           b"" if keep_alive else b"Connection: close\r\n")
    )
    return head + body


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


class _Head:
    __slots__ = ("method", "target", "version", "headers")

    def __init__(self, method: str, target: str, version: str, headers: dict[str, str]) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers


def parse_head(head: bytes) -> _Head:
    """Request line and headers (names lower-cased; a repeated header keeps the last value)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # latin-1 decodes any byte; kept for clarity
        raise RequestError("Request head is not text.") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise RequestError(f"Malformed request line {lines[0][:100]!r}; expected 'METHOD /path HTTP/1.1'.")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise RequestError(f"Malformed header line {line[:100]!r}.")
        headers[name.lower()] = value.strip()
    return _Head(parts[0], parts[1], parts[2], headers)


class _Handler:
    """Routes one request: reads its body, answers it; returns whether the connection stays open."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.options = server.options
        self.manager = server.manager
        self.metrics = server.metrics

    async def handle(self, raw_head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        started = time.perf_counter()
        try:
            head = parse_head(raw_head[:-4])
        except RequestError as e:
            writer.write(_response(e.status, _error_body(str(e)), b"application/json", keep_alive=False))
            return False
        h = head.headers
        conn = h.get("connection", "").lower()
        keep_alive = ("close" not in conn) if head.version == "HTTP/1.1" else ("keep-alive" in conn)

        # A body that trickles in slower than the idle timeout (slowloris) loses its connection.
        timer = asyncio.get_running_loop().call_later(self.options.keep_alive_timeout_s, writer.close)
        try:
            body = await self._read_body(head, reader, writer)
        except RequestError as e:  # the body was not (fully) read: the connection cannot be reused
            writer.write(_response(e.status, _error_body(str(e)), b"application/json", keep_alive=False))
            return False
        finally:
            timer.cancel()

        path, _, _query = head.target.partition("?")
        model = "-"
        status, payload, ctype, extra = 500, b"", b"application/json", b""
        protocol = None
        predictions = 0
        try:
            if path.startswith("/v1/models/"):
                rest = path[len("/v1/models/"):]
                rest, _, verb = rest.partition(":")
                name, version, tail = _split_model_path(rest)
                model = name if name in self.manager.model_names else "_unknown"  # bounded label values
                if verb:
                    if head.method != "POST":
                        raise RequestError(f"{head.method} {path} is not allowed; use POST.", 405)
                    if tail:
                        raise RequestError(f"No such endpoint {path!r}.", 404)
                    if verb == "predict":
                        protocol = "rest"
                        payload, n, used = await self._predict(name, version, body, h)
                    elif verb == "predict_columnar":
                        protocol = "columnar"
                        payload, n, used, ctype = await self._predict_columnar(name, version, body, h)
                    else:
                        raise RequestError(f"Unknown method ':{verb}'; this server answers ':predict' and "
                                           "':predict_columnar'.", 404)
                    predictions = n
                    extra = b"X-Model-Version: %d\r\n" % used
                else:
                    if head.method != "GET":
                        raise RequestError(f"{head.method} {path} is not allowed; use GET.", 405)
                    if tail == "":
                        statuses = self.manager.status(name, version)
                        payload = json.dumps({"model_version_status": [s.to_dict() for s in statuses]}).encode()
                    elif tail == "metadata":
                        payload = self._metadata(name, version)
                    else:
                        raise RequestError(f"No such endpoint {path!r}.", 404)
                status = 200
            elif path == "/metrics":
                _require(head, "GET", path)
                payload = self.metrics.render(self.manager.gauges(), ready=self.manager.ready()).encode()
                ctype, status = b"text/plain; version=0.0.4; charset=utf-8", 200
            elif path in ("/healthz", "/v1/healthz"):
                _require(head, "GET", path)
                payload, status = b'{"status": "ok"}', 200
            elif path in ("/readyz", "/v1/readyz"):
                _require(head, "GET", path)
                ready = self.manager.ready()
                waiting = [n for n in self.manager.model_names if not self.manager.versions(n)]
                payload = json.dumps({"ready": ready, "models_not_ready": waiting}).encode()
                status = 200 if ready else 503
            else:
                raise RequestError(f"No such endpoint {path!r}; predictions are at POST /v1/models/NAME:predict.", 404)
        except Exception as e:  # noqa: BLE001 - every error becomes an answer
            status, message = _status_of(e)
            if status == 500:
                log.exception("internal error answering %s %s", head.method, path)
            payload, ctype, extra = _error_body(message), b"application/json", b""
        if status == 503:
            extra += b"Retry-After: 1\r\n"
        writer.write(_response(status, payload, ctype, keep_alive=keep_alive, extra=extra))
        if protocol is not None:
            self.metrics.observe(model, protocol, status, time.perf_counter() - started, predictions if status == 200 else 0)
        return keep_alive

    async def _read_body(self, head: _Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        h = head.headers
        limit = self.options.max_body_bytes
        if "chunked" in h.get("transfer-encoding", "").lower():
            if h.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            chunks, total = [], 0
            for _ in range(limit + 1):  # bounded: each chunk holds at least one byte
                try:
                    line = await reader.readuntil(b"\r\n")
                except asyncio.LimitOverrunError:
                    raise RequestError("Malformed chunked body: a chunk-size line is too long.") from None
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise RequestError("Malformed chunk size in a chunked body.") from None
                if size < 0:
                    raise RequestError("Malformed chunk size in a chunked body.")
                if size == 0:
                    for _ in range(100):  # trailers, bounded
                        try:
                            if await reader.readuntil(b"\r\n") == b"\r\n":
                                break
                        except asyncio.LimitOverrunError:
                            raise RequestError("Malformed chunked body: a trailer line is too long.") from None
                    return b"".join(chunks)
                total += size
                if total > limit:
                    raise RequestError(f"Request body larger than the limit of {limit} bytes.", 413)
                data = await reader.readexactly(size + 2)
                if data[-2:] != b"\r\n":
                    raise RequestError("Malformed chunked body: a chunk does not end with CRLF.")
                chunks.append(data[:-2])
            raise RequestError("Too many chunks.", 413)
        raw = h.get("content-length")
        if raw is None:
            if head.method in ("POST", "PUT"):
                raise RequestError("A POST needs a Content-Length header (or Transfer-Encoding: chunked).", 411)
            return b""
        if not raw.isdigit():
            raise RequestError(f"Invalid Content-Length {raw[:40]!r}.")
        length = int(raw)
        if length > limit:
            raise RequestError(f"Request body of {length} bytes is larger than the limit of {limit} bytes "
                               "(max_body_bytes); split it into several requests.", 413)
        if length and h.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return await reader.readexactly(length) if length else b""

    # ---- predict ----------------------------------------------------------------------------------

    def _timeout_ms(self, headers: Mapping[str, str]) -> float | None:
        raw = headers.get("x-deadline-ms")
        if raw is None:
            return self.options.default_timeout_ms
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not math.isfinite(value) or value <= 0:
            raise RequestError(f"X-Deadline-Ms must be a number of milliseconds > 0. Got {raw[:40]!r} instead.")
        return value

    async def _predict(self, name: str, version: int | None, body: bytes, headers: Mapping[str, str]):
        timeout_ms = self._timeout_ms(headers)
        loaded = self.manager.acquire(name, version)
        try:
            predictor = loaded.predictor
            if len(body) > 1 << 20:
                request = await asyncio.to_thread(parse_predict_json, body, predictor.categorical_names, predictor.numeric_names)
            else:
                request = parse_predict_json(body, predictor.categorical_names, predictor.numeric_names)
            self._check_rows(request.rows)
            if request.signature == "predict_ids":
                scores = await asyncio.get_running_loop().run_in_executor(
                    self.server._pool, predictor.predict_ids, request.features["ids"], request.features["numeric"])
            else:
                scores = await self._score(predictor, request.features, timeout_ms)
        finally:
            self.manager.release(loaded)
        key = "predictions" if request.format == "instances" else "outputs"
        return b'{"%s": %s}' % (key.encode(), json.dumps(scores.tolist()).encode()), request.rows, loaded.version

    async def _predict_columnar(self, name: str, version: int | None, body: bytes, headers: Mapping[str, str]):
        timeout_ms = self._timeout_ms(headers)
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        loaded = self.manager.acquire(name, version)
        try:
            predictor = loaded.predictor
            if ctype == COLUMNAR_CONTENT_TYPE:
                features, rows = decode_columnar(body, predictor.categorical_names, predictor.numeric_names)
            elif ctype in ("application/json", ""):
                features, rows = parse_columnar_json(body, predictor.categorical_names, predictor.numeric_names)
            else:
                raise RequestError(f"Content-Type {ctype!r} is not understood here; send {COLUMNAR_CONTENT_TYPE} "
                                   "or application/json.")
            self._check_rows(rows)
            scores = await self._score(predictor, features, timeout_ms)
        finally:
            self.manager.release(loaded)
        if ctype == COLUMNAR_CONTENT_TYPE and "application/json" not in headers.get("accept", ""):
            payload, out_type = np.ascontiguousarray(scores, dtype="<f4").tobytes(), b"application/octet-stream"
        else:
            payload, out_type = b'{"outputs": %s}' % json.dumps(scores.tolist()).encode(), b"application/json"
        return payload, rows, loaded.version, out_type

    def _check_rows(self, rows: int) -> None:
        if rows > self.options.max_rows_per_request:
            raise RequestError(f"Request of {rows} candidates is over the limit of {self.options.max_rows_per_request} "
                               "(max_rows_per_request); split it.", 413)

    async def _score(self, predictor: Any, features: Mapping[str, Any], timeout_ms: float | None) -> np.ndarray:
        if getattr(predictor, "batcher", None) is not None:
            return await predictor.apredict(features, timeout_ms=timeout_ms)
        # Without batching each request is its own compute call; run it off the loop so others proceed.
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1e3
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.server._pool, _predict_before, predictor, features, deadline)
        if deadline is None:
            return await future
        try:
            return await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceeded(f"The request passed its deadline of {timeout_ms:g} ms.") from None

    def _metadata(self, name: str, version: int | None) -> bytes:
        with self.manager.lease(name, version) as predictor:
            inputs = {n: {"dtype": "DT_STRING", "shape": [-1], "kind": "categorical"} for n in predictor.categorical_names}
            inputs.update({n: {"dtype": "DT_FLOAT", "shape": [-1], "kind": "numeric"} for n in predictor.numeric_names})
            meta = {
                "model_spec": {"name": name, "version": str(predictor.version), "signature_name": ""},
                "metadata": {"signature_def": {"signature_def": {
                    "serving_default": {
                        "inputs": inputs,
                        "outputs": {"probabilities": {"dtype": "DT_FLOAT", "shape": [-1]}},
                        "method_name": "tensorflow/serving/predict",
                    },
                    "predict_ids": {
                        "inputs": {"ids": {"dtype": "DT_INT32", "shape": [-1, len(predictor.feature_names)]},
                                   "numeric": {"dtype": "DT_FLOAT", "shape": [-1, len(predictor.numeric_names)]}},
                        "outputs": {"probabilities": {"dtype": "DT_FLOAT", "shape": [-1]}},
                        "method_name": "tensorflow/serving/predict",
                    },
                }}},
            }
        return json.dumps(meta).encode()


def _predict_before(predictor: Any, features: Mapping[str, Any], deadline: float | None) -> np.ndarray:
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded("The request passed its deadline while waiting for a compute thread; dropped.")
    return predictor.predict(features)


def _require(head: _Head, method: str, path: str) -> None:
    if head.method != method:
        raise RequestError(f"{head.method} {path} is not allowed; use {method}.", 405)


def _split_model_path(rest: str) -> tuple[str, int | None, str]:
    """'NAME[/versions/V][/TAIL]' → (name, version or None, tail)."""
    parts = rest.split("/")
    name = parts[0]
    if not name:
        raise RequestError("No model name in the path; use /v1/models/NAME.", 404)
    version = None
    tail = parts[1:]
    if len(tail) >= 2 and tail[0] == "versions":
        if not tail[1].isdigit() or len(tail[1]) > 18:
            raise RequestError(f"Version {tail[1][:40]!r} is not a non-negative integer.", 404)
        version = int(tail[1])
        tail = tail[2:]
    elif len(tail) >= 2 and tail[0] == "labels":
        raise RequestError("Version labels are not supported by this server; name the version: /versions/V.", 404)
    return name, version, "/".join(tail)


def _status_of(error: BaseException) -> tuple[int, str]:
    """The HTTP status and message for an error raised while answering."""
    if isinstance(error, RequestError):
        return error.status, str(error)
    if isinstance(error, ModelNotFoundError):
        return 404, str(error)
    if isinstance(error, (ModelNotReadyError, QueueFullError)):
        return 503, str(error)
    if isinstance(error, DeadlineExceeded):
        return 504, str(error)
    if isinstance(error, (SchemaError, ConfigError)):
        return 400, str(error)
    if isinstance(error, CtrflowError):  # e.g. a batcher closed under a request: retryable
        return 503, str(error)
    return 500, f"Internal error ({type(error).__name__}); the server logged the details."


# ---- request bodies (the hot path: few Python-level loops per row) ----------------------------------


@dataclass
class ParsedRequest:
    """A decoded predict body: columnar features (or `ids`/`numeric` for predict_ids) and row count."""

    signature: str  # "serving_default" or "predict_ids"
    format: str  # "instances" (row format) or "inputs" (columnar)
    features: dict[str, Any]
    rows: int


_CATEGORICAL_TYPES = frozenset((str, type(None), int))
_NUMERIC_TYPES = frozenset((int, float, type(None)))


def _load_json(body: bytes) -> Any:
    if not body:
        raise RequestError("Empty request body; send a JSON object.")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise RequestError(f"Malformed JSON: {str(e)[:200]}") from None


def parse_predict_json(body: bytes, categorical: Sequence[str], numeric: Sequence[str]) -> ParsedRequest:
    """Decode a TF Serving predict body for a model with these features; raise RequestError (400) if bad.

    Row format `{"instances": [{name: value, ...}, ...]}` or columnar `{"inputs": {name: [values]}}`;
    optional `"signature_name"`: "serving_default" (raw features) or "predict_ids" (`ids` int
    [n, F] and `numeric` float [n, N]). Categorical values are strings (ints are taken as their text),
    numerics are numbers; null is missing. Returns numpy columns the predictor takes as they are.
    """
    doc = _load_json(body)
    if not isinstance(doc, dict):
        raise RequestError(f"The body must be a JSON object with 'instances' or 'inputs'. Got a JSON {_json_type(doc)}.")
    unknown = set(doc) - {"instances", "inputs", "signature_name"}
    if unknown:
        raise RequestError(f"Unknown top-level keys {sorted(unknown)[:10]}; a predict body has 'instances' or 'inputs' "
                           "and optionally 'signature_name'.")
    signature = doc.get("signature_name", "serving_default")
    if signature in ("", None):
        signature = "serving_default"
    if signature not in ("serving_default", "predict_ids"):
        raise RequestError(f"Unknown signature_name {str(signature)[:100]!r}; this model has 'serving_default' and 'predict_ids'.")
    if ("instances" in doc) == ("inputs" in doc):
        raise RequestError("The body must have exactly one of 'instances' (rows) or 'inputs' (columns).")
    if signature == "predict_ids":
        names, kinds = ("ids", "numeric"), None
    else:
        names = (*categorical, *numeric)
        kinds = {**{n: "categorical" for n in categorical}, **{n: "numeric" for n in numeric}}
    if "instances" in doc:
        columns = _columns_from_instances(doc["instances"], names)
        fmt = "instances"
    else:
        columns = _columns_from_inputs(doc["inputs"], names)
        fmt = "inputs"
    rows = len(columns[names[0]])
    if signature == "predict_ids":
        features = {"ids": _matrix(columns["ids"], "ids", rows, len(categorical) + len(numeric), integer=True),
                    "numeric": _matrix(columns["numeric"], "numeric", rows, len(numeric), integer=False)}
    else:
        features = {n: _column(n, columns[n], kinds[n]) for n in names}
    return ParsedRequest(signature, fmt, features, rows)


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _key_problem(keys: Any, want: Sequence[str]) -> str:
    keys, wanted = set(keys), set(want)
    missing, extra = sorted(wanted - keys), sorted(map(str, keys - wanted))
    parts = []
    if missing:
        parts.append(f"missing features {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    if extra:
        parts.append(f"unknown features {extra[:20]}{' ...' if len(extra) > 20 else ''}")
    return "; ".join(parts)


def _columns_from_instances(instances: Any, names: Sequence[str]) -> dict[str, tuple]:
    if not isinstance(instances, list):
        raise RequestError(f"'instances' must be a list of objects (one per candidate). Got a JSON {_json_type(instances)}.")
    if not instances:
        raise RequestError("'instances' is empty: send at least one candidate.")
    want = set(names)
    for i, inst in enumerate(instances):
        if type(inst) is not dict:
            raise RequestError(f"instances[{i}] must be an object of named features. Got a JSON {_json_type(inst)}.")
        if inst.keys() != want:
            raise RequestError(f"instances[{i}]: {_key_problem(inst, names)}.")
    if len(names) == 1:
        return {names[0]: tuple(inst[names[0]] for inst in instances)}
    return dict(zip(names, zip(*map(operator.itemgetter(*names), instances))))


def _columns_from_inputs(inputs: Any, names: Sequence[str]) -> dict[str, Any]:
    if not isinstance(inputs, dict):
        raise RequestError(f"'inputs' must be an object of named columns. Got a JSON {_json_type(inputs)}.")
    if inputs.keys() != set(names):
        raise RequestError(f"'inputs': {_key_problem(inputs, names)}.")
    rows = None
    for n in names:
        col = inputs[n]
        if not isinstance(col, list):
            raise RequestError(f"inputs[{n!r}] must be a list (one value per candidate). Got a JSON {_json_type(col)}.")
        if rows is None:
            rows = len(col)
        elif len(col) != rows:
            raise RequestError(f"inputs[{n!r}] has {len(col)} values, inputs[{names[0]!r}] has {rows}: "
                               "every column needs one value per candidate.")
    if not rows:
        raise RequestError("'inputs' columns are empty: send at least one candidate.")
    return inputs


def _column(name: str, values: Sequence[Any], kind: str) -> np.ndarray:
    types = set(map(type, values))
    if kind == "categorical":
        if types <= {str}:
            return np.array(values, dtype=object)
        if not types <= _CATEGORICAL_TYPES:
            i = next(i for i, v in enumerate(values) if type(v) not in _CATEGORICAL_TYPES)
            raise RequestError(f"Feature {name!r} row {i}: expected a string (or null for missing). "
                               f"Got a JSON {_json_type(values[i])}.")
        return np.array(["" if v is None else v if type(v) is str else str(v) for v in values], dtype=object)
    if not types <= _NUMERIC_TYPES:
        i = next(i for i, v in enumerate(values) if type(v) not in _NUMERIC_TYPES)
        raise RequestError(f"Feature {name!r} row {i}: expected a number (or null for missing). Got a JSON {_json_type(values[i])}.")
    try:
        return np.array(values, dtype=np.float64)  # None → NaN (missing)
    except (OverflowError, ValueError, TypeError):
        raise RequestError(f"Feature {name!r}: a number is out of the float range.") from None


def _matrix(values: Sequence[Any], name: str, rows: int, width: int, *, integer: bool) -> np.ndarray:
    for i, row in enumerate(values):
        if not isinstance(row, list) or len(row) != width:
            raise RequestError(f"{name!r} row {i} must be a list of {width} numbers.")
        bad = set(map(type, row)) - ({int} if integer else {int, float})
        if bad:
            raise RequestError(f"{name!r} row {i} must hold {'integers' if integer else 'numbers'} only.")
    try:
        if integer:
            out = np.array(values, dtype=np.int64).reshape(rows, width)
            if out.size and (out.min() < 0 or out.max() >= 2**31):
                raise RequestError(f"{name!r} holds ids outside [0, 2**31).")
            return out.astype(np.int32)
        return np.array(values, dtype=np.float32).reshape(rows, width)
    except (OverflowError, ValueError, TypeError):
        raise RequestError(f"{name!r} holds a number out of range.") from None


def parse_columnar_json(body: bytes, categorical: Sequence[str], numeric: Sequence[str]) -> tuple[dict[str, Any], int]:
    """`{"columns": [names], "data": [[values of column 0], ...]}` → (features, rows)."""
    doc = _load_json(body)
    if not isinstance(doc, dict) or set(doc) != {"columns", "data"}:
        raise RequestError('A columnar JSON body is {"columns": [names], "data": [[values], ...]} and nothing else.')
    names, data = doc["columns"], doc["data"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not isinstance(data, list):
        raise RequestError("'columns' must be a list of feature names and 'data' a list of columns.")
    if len(names) != len(data):
        raise RequestError(f"'columns' names {len(names)} features but 'data' holds {len(data)} columns.")
    if len(set(names)) != len(names):
        raise RequestError("'columns' names a feature twice.")
    inputs = _columns_from_inputs(dict(zip(names, data)), (*categorical, *numeric))
    kinds = {**{n: "categorical" for n in categorical}, **{n: "numeric" for n in numeric}}
    rows = len(data[0])
    return {n: _column(n, inputs[n], kinds[n]) for n in (*categorical, *numeric)}, rows


_HEADER = struct.Struct("<4sBBHI")
_COLUMN = struct.Struct("<BBI")


def decode_columnar(body: bytes, categorical: Sequence[str], numeric: Sequence[str]) -> tuple[dict[str, np.ndarray], int]:
    """The binary columnar body (see `COLUMNAR_FORMAT`) → (features as numpy columns, rows); no per-row loop."""
    if len(body) < _HEADER.size:
        raise RequestError(f"Columnar body of {len(body)} bytes is shorter than its {_HEADER.size}-byte header.")
    magic, fmt, _, n_columns, rows = _HEADER.unpack_from(body, 0)
    if magic != b"CTRC" or fmt != 1:
        raise RequestError("Not a columnar body: it must start with b'CTRC' and format 1.")
    if rows == 0:
        raise RequestError("Columnar body has 0 rows: send at least one candidate.")
    kinds = {**{n: "S" for n in categorical}, **{n: "fd" for n in numeric}}
    out: dict[str, np.ndarray] = {}
    offset = _HEADER.size
    view = memoryview(body)
    for _ in range(n_columns):
        if offset + 2 > len(body):
            raise RequestError("Columnar body ends inside a column header.")
        (name_len,) = struct.unpack_from("<H", body, offset)
        offset += 2
        end = offset + name_len + _COLUMN.size
        if end > len(body):
            raise RequestError("Columnar body ends inside a column header.")
        try:
            name = bytes(view[offset:offset + name_len]).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("A column name is not UTF-8.") from None
        kind, _, width = _COLUMN.unpack_from(body, offset + name_len)
        offset = end
        kind = chr(kind)
        if name not in kinds:
            raise RequestError(f"Unknown feature {name[:100]!r} in the columnar body.")
        if name in out:
            raise RequestError(f"Feature {name!r} appears twice in the columnar body.")
        if kind not in kinds[name]:
            want = "'S' (byte strings)" if kinds[name] == "S" else "'f' or 'd' (floats)"
            raise RequestError(f"Feature {name!r} has kind {kind!r}; it must be {want}.")
        if kind == "S":
            if width < 1 or width > 4096:
                raise RequestError(f"Feature {name!r}: string width {width} must be in [1, 4096].")
            dtype = np.dtype(f"S{width}")
        else:
            dtype = np.dtype("<f4" if kind == "f" else "<f8")
            if width != dtype.itemsize:
                raise RequestError(f"Feature {name!r}: width {width} does not match kind {kind!r}.")
        size = rows * dtype.itemsize
        if offset + size > len(body):
            raise RequestError(f"Columnar body ends inside the values of feature {name!r}.")
        out[name] = np.frombuffer(body, dtype, rows, offset)
        offset += size
    if offset != len(body):
        raise RequestError(f"Columnar body has {len(body) - offset} bytes after its last column.")
    if len(out) != len(kinds):
        raise RequestError(f"Columnar body: {_key_problem(out, list(kinds))}.")
    return out, rows


def encode_columnar(features: Mapping[str, Any], categorical: Sequence[str], numeric: Sequence[str]) -> bytes:
    """Client side of `decode_columnar`: named columns → the binary body (strings UTF-8, None → missing)."""
    names = [*categorical, *numeric]
    rows = len(features[names[0]]) if names else 0
    parts = [_HEADER.pack(b"CTRC", 1, 0, len(names), rows)]
    for n in names:
        col = features[n]
        if len(col) != rows:
            raise ConfigError(f"encode_columnar: column {n!r} has {len(col)} values, expected {rows}.")
        if n in categorical:
            arr = np.asarray(col) if isinstance(col, np.ndarray) and col.dtype.kind == "S" else np.array(
                [b"" if v is None else (v if isinstance(v, bytes) else str(v).encode()) for v in col], dtype="S")
            if arr.dtype.itemsize == 0 or arr.dtype == np.dtype("S0"):
                arr = arr.astype("S1")
            kind, payload, width = b"S", arr.tobytes(), arr.dtype.itemsize
        else:
            arr = np.array([np.nan if v is None else v for v in col], dtype="<f4") if not isinstance(col, np.ndarray) \
                else np.asarray(col, dtype="<f4")
            kind, payload, width = b"f", arr.tobytes(), 4
        name = n.encode()
        parts.append(struct.pack("<H", len(name)) + name + _COLUMN.pack(kind[0], 0, width) + payload)
    return b"".join(parts)
