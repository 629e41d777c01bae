"""The open-loop load generator: Poisson arrivals at a fixed rate against a server or an in-process predictor.

Send times are drawn in advance (exponential gaps at `rate_rps`) and every request goes out at its
time whether or not earlier ones have answered, so a slow server meets more load, not less; latency
counts from the *scheduled* send time, which keeps client-side queueing in the figures (no
coordinated omission). Requests carry `candidates` rows sampled from real feature values (a CSV in the
model's schema, or rows from `ctrflow.data.generate`).

    report = run_load(LoadOptions(model_base_path="models/ctr", rate_rps=500, candidates=100,
                                  duration_s=10, compare_batching=True))
    print(report.format_table()); json.dumps(report.to_dict())

Targets: `url` (a running server, loopback only), or `model_base_path` with `target="http"` (a server
started here in a child process per run, so its CPU is measured alone) or `target="inprocess"` (a
`Predictor` in this process; its CPU figure is the process's less the generator's own share of the
event loop's thread, measured around the predictor's coroutine steps). `compare_batching` runs
the same schedule twice, batching on and off, and reports both.

Implementation details follow: one asyncio loop sends; an HTTP/1.1 keep-alive pool of at most
`connections` sockets carries REST or binary-columnar bodies encoded ahead of time, so the generator
spends its CPU on sockets, not on JSON. Every loop is bounded in count and in time.
"""
from __future__ import annotations

import asyncio
import collections
import csv
import ipaddress
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctrflow.errors import ConfigError, CtrflowError, DeadlineExceeded, QueueFullError
from ctrflow.serving.batcher import BatchingOptions
from ctrflow.validation import Choice, Float, Int, check_fields

__all__ = ["LoadOptions", "LoadReport", "LoadResult", "arrival_times", "latency_summary", "run_load"]

# rest: TF Serving row-format JSON; columnar: the binary columnar body (raw strings, hashed in the graph);
# ids: the binary ids body (hashed here, ahead of time, by ctrflow.client.hashing: the one-tensor fast
# path); grpc: gRPC Predict on `predict_ids` with tensor_content; context: the export's context fields
# once per request (binary context body). In process, "ids" calls Predictor.apredict_ids and every other
# protocol Predictor.apredict on raw columns.
_PROTOCOLS = ("rest", "columnar", "ids", "grpc", "context")
_TARGETS = ("http", "inprocess")
MAX_REQUESTS = 5_000_000  # one run's schedule, whatever rate and duration say


@dataclass(frozen=True)
class LoadOptions:
    """One load test; every field is checked at construction."""

    # A running server to drive, e.g. "http://127.0.0.1:8501" (loopback addresses only). Or None and
    # model_base_path.
    url: str | None = None
    # A model base path (integer version folders): the generator starts its own target(s).
    model_base_path: str | None = None
    # Model name in the URL path; default: the base path's folder name (required with `url`).
    model_name: str | None = None
    # With model_base_path: "http" (a server in a child process) or "inprocess" (a Predictor here).
    target: str = "http"
    # "rest" (TF Serving row format JSON), "columnar" (the binary columnar endpoint), "ids" (the binary
    # ids endpoint, rows hashed by the client ahead of time) or "grpc" (gRPC Predict, predict_ids);
    # "context": the export's context fields once per request (binary context body), run after the same
    # requests sent flat (binary columnar), to compare CPU per candidate (needs model_base_path).
    protocol: str = "rest"
    # Mean request arrivals per second (Poisson), > 0.
    rate_rps: float = 200.0
    # Candidate ads (rows) per request, >= 1.
    candidates: int = 100
    # Seconds of scheduled arrivals, > 0 (the run then waits at most drain_s for the last answers).
    duration_s: float = 10.0
    # Per-request deadline in ms, > 0: sent as X-Deadline-Ms; answers later than this count as `late`.
    timeout_ms: float = 100.0
    # Requests in flight at most; arrivals beyond it are counted as `dropped` (client overload), >= 1.
    max_in_flight: int = 2048
    # Keep-alive connections to the server at most, >= 1.
    connections: int = 64
    # Run twice, batching on then off (needs model_base_path); else one run with `batching`.
    compare_batching: bool = False
    # Batching of the target started here (None: off). Ignored with `url`.
    batching: BatchingOptions | None = field(default_factory=lambda: BatchingOptions(max_batch_size=4096, batch_timeout_ms=2.0))
    # CSV (in the model's schema, or with a header naming the features) to sample rows from;
    # None: 20,000 rows from `ctrflow.data.generate` (models on the synthetic schema).
    data: str | None = None
    # Seeds the arrival times and the row sampling.
    seed: int = 0
    # Distinct request bodies encoded ahead of time and cycled, >= 1.
    distinct_bodies: int = 256
    # Seconds to wait for in-flight requests after the last arrival, > 0.
    drain_s: float = 10.0
    # With `url`: the pid of that server when it runs on this machine; its CPU is then read from the
    # OS (psutil) instead of its /metrics. None: from /metrics.
    server_pid: int | None = None
    # With `url` and protocol "grpc": the server's gRPC port on the same host.
    grpc_port: int | None = None
    # With `url` and protocol "ids"/"grpc": the served version folder (its ctrflow.json), to hash with.
    manifest: str | None = None

    def __post_init__(self) -> None:
        if (self.url is None) == (self.model_base_path is None):
            raise ConfigError("LoadOptions needs exactly one of 'url' (a running server) or 'model_base_path'. "
                              f"Got url={self.url!r}, model_base_path={self.model_base_path!r}.")
        if self.url is not None:
            _check_loopback(self.url)
            if not self.model_name:
                raise ConfigError("With 'url', LoadOptions needs 'model_name' (the NAME in /v1/models/NAME).")
            if self.compare_batching:
                raise ConfigError("'compare_batching' needs 'model_base_path' (the generator starts both targets); "
                                  "with 'url' the server's own batching is measured.")
        check_fields(self, {"target": Choice(tuple(_TARGETS)), "protocol": Choice(tuple(_PROTOCOLS)),
                            **{n: Float(0.0, low_open=True) for n in ("rate_rps", "duration_s", "timeout_ms", "drain_s")},
                            **{n: Int(1) for n in ("candidates", "max_in_flight", "connections", "distinct_bodies")}})
        if self.rate_rps * self.duration_s > MAX_REQUESTS:
            raise ConfigError(f"rate_rps * duration_s = {self.rate_rps * self.duration_s:.0f} requests is over the "
                              f"limit of {MAX_REQUESTS} per run; shorten the run.")
        if self.url is not None and self.protocol == "grpc" and self.grpc_port is None:
            raise ConfigError("With 'url', protocol 'grpc' needs 'grpc_port' (the server's gRPC port).")
        if self.url is not None and self.protocol in ("ids", "grpc") and self.manifest is None:
            raise ConfigError(f"With 'url', protocol {self.protocol!r} needs 'manifest' (the served version folder "
                              "or its ctrflow.json) to hash the rows with.")
        if self.protocol == "context" and (self.url is not None or self.compare_batching):
            raise ConfigError("protocol 'context' needs 'model_base_path' (it starts the flat and the context runs) "
                              "and no 'compare_batching'.")
        if self.batching is not None and not isinstance(self.batching, BatchingOptions):
            raise ConfigError(f"The 'batching' parameter of LoadOptions must be BatchingOptions or None. Got {self.batching!r} instead.")


def _check_loopback(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "http" or not parts.hostname or port is None:
        raise ConfigError(f"The 'url' option of LoadOptions must look like http://127.0.0.1:PORT. Got {url!r} instead.")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port, proto=socket.IPPROTO_TCP)
    except OSError as e:
        raise ConfigError(f"Cannot resolve {parts.hostname!r}: {e}.") from None
    for info in infos:
        if not ipaddress.ip_address(info[4][0]).is_loopback:
            raise ConfigError(f"The load generator only drives loopback addresses; {parts.hostname!r} resolves to "
                              f"{info[4][0]}. Run it on the serving machine against 127.0.0.1.")


# ---- results --------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """One run's figures (latencies in ms, from the scheduled send time)."""

    label: str  # e.g. "batching on"
    target: str
    protocol: str
    rate_rps: float  # asked
    candidates: int
    duration_s: float  # from the first scheduled arrival to the last answer
    scheduled: int  # arrivals drawn
    sent: int
    ok: int
    timeouts: int  # 504 from the server, or no answer within the client's limit
    late: int  # answered OK but after timeout_ms
    rejected: int  # 503 (queue full / not ready)
    errors: int  # any other failure
    dropped: int  # arrivals not sent because max_in_flight requests were already out
    status_counts: dict[str, int]
    predictions: int
    requests_per_s: float  # OK answers per second
    predictions_per_s: float
    latency_ms: dict[str, float]  # p50, p90, p99, p99.9, max, mean over OK answers
    compute_calls: int | None
    compute_calls_per_prediction: float | None
    mean_batch_rows: float | None
    server_cpu_s: float | None
    cpu_s_per_million_predictions: float | None
    cpu_includes_load_generator: bool
    schedule_lag_ms_p99: float  # how late the generator itself sent (its own overload shows here)
    # The generator's own CPU while driving, never in server_cpu_s (in process: its share of the event
    # loop's thread; over HTTP/gRPC: this process's, which on one machine competes with the server's).
    load_generator_cpu_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadReport:
    options: dict[str, Any]
    results: list[LoadResult]
    notes: dict[str, Any] = field(default_factory=dict)  # e.g. "context": flat vs context ratios

    def to_dict(self) -> dict[str, Any]:
        out = {"options": self.options, "results": [r.to_dict() for r in self.results]}
        return {**out, **self.notes}

    def format_table(self) -> str:
        """A fixed-width table, one column per run."""
        rows = [
            ("run", lambda r: r.label),
            ("target / protocol", lambda r: f"{r.target}/{r.protocol}"),
            ("requests/s asked", lambda r: f"{r.rate_rps:g}"),
            ("candidates/request", lambda r: str(r.candidates)),
            ("requests OK/s", lambda r: f"{r.requests_per_s:,.0f}"),
            ("predictions/s", lambda r: f"{r.predictions_per_s:,.0f}"),
            ("p50 ms", lambda r: f"{r.latency_ms['p50']:.2f}"),
            ("p90 ms", lambda r: f"{r.latency_ms['p90']:.2f}"),
            ("p99 ms", lambda r: f"{r.latency_ms['p99']:.2f}"),
            ("p99.9 ms", lambda r: f"{r.latency_ms['p99.9']:.2f}"),
            ("timeouts", lambda r: str(r.timeouts)),
            ("late (> timeout)", lambda r: str(r.late)),
            ("rejected / errors / dropped", lambda r: f"{r.rejected} / {r.errors} / {r.dropped}"),
            ("compute calls/prediction", lambda r: "-" if r.compute_calls_per_prediction is None else f"{r.compute_calls_per_prediction:.5f}"),
            ("mean batch rows", lambda r: "-" if r.mean_batch_rows is None else f"{r.mean_batch_rows:,.0f}"),
            ("CPU s / M predictions", lambda r: "-" if r.cpu_s_per_million_predictions is None else
             f"{r.cpu_s_per_million_predictions:.1f}{' *' if r.cpu_includes_load_generator else ''}"),
        ]
        width = max(len(k) for k, _ in rows)
        cols = [[fmt(r) for _, fmt in rows] for r in self.results]
        cw = [max(len(c) for c in col) for col in cols]
        lines = [f"{k:<{width}}  " + "  ".join(f"{col[i]:>{w}}" for col, w in zip(cols, cw)) for i, (k, _) in enumerate(rows)]
        if any(r.cpu_includes_load_generator for r in self.results):
            lines.append("* in-process: the CPU figure includes the load generator")
        for r in self.results:
            if r.load_generator_cpu_s is not None and r.target == "inprocess":
                lines.append(f"{r.label}: in-process CPU is the predictor's; the load generator's own "
                             f"{r.load_generator_cpu_s:.2f} s (its share of the event loop's thread) is left out")
        for key, value in self.notes.items():
            lines.append(f"{key}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items()))
        return "\n".join(lines)


# ---- scheduling math ------------------------------------------------------------------------------


def arrival_times(rate_rps: float, duration_s: float, seed: int = 0, *, limit: int = MAX_REQUESTS) -> np.ndarray:
    """Poisson arrival offsets in seconds within [0, duration_s): cumulative exponential gaps, sorted.

    The count is Poisson(rate * duration); at most `limit`.
    """
    rng = np.random.default_rng(seed)
    expected = rate_rps * duration_s
    out: list[np.ndarray] = []
    last, total = 0.0, 0
    chunk = int(expected + 6 * math.sqrt(expected) + 16)
    for _ in range(64):  # bounded: each round adds `chunk` arrivals, ~1 round in practice
        gaps = rng.exponential(1.0 / rate_rps, chunk)
        times = last + np.cumsum(gaps)
        keep = times[times < duration_s]
        out.append(keep)
        total += len(keep)
        if len(keep) < chunk or total >= limit:
            break
        last = float(times[-1])
    return np.concatenate(out)[:limit] if out else np.zeros(0)


def latency_summary(latencies_ms: Sequence[float] | np.ndarray) -> dict[str, float]:
    """p50/p90/p99/p99.9/max/mean of latencies (0s when empty); quantiles by linear interpolation."""
    a = np.asarray(latencies_ms, dtype=np.float64)
    if not a.size:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "p99.9": 0.0, "max": 0.0, "mean": 0.0}
    q = np.percentile(a, [50, 90, 99, 99.9])
    return {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "p99.9": float(q[3]),
            "max": float(a.max()), "mean": float(a.mean())}


# ---- request data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Features:
    categorical: tuple[str, ...]
    numeric: tuple[str, ...]


def _read_rows(path: Path, features: _Features, schema: Any | None, limit: int = 50_000) -> dict[str, list]:
    """Columns of the features from a CSV/TSV: categoricals as text, numerics as float or None."""
    names = (*features.categorical, *features.numeric)
    cols: dict[str, list] = {n: [] for n in names}
    delimiter = schema.delimiter if schema is not None else ("\t" if path.suffix in (".tsv", ".txt") else ",")
    header = schema.header if schema is not None else True
    with open(path, newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        # A header names the columns (in the file's order); without one the schema lists them.
        columns = next(reader, None) if header else (list(schema.columns) if schema is not None and schema.columns else None)
        if not columns:
            raise ConfigError(f"{path}: no header and no schema columns; cannot tell which column is which feature.")
        index = {c: i for i, c in enumerate(columns)}
        missing = [n for n in names if n not in index]
        if missing:
            raise ConfigError(f"{path} has no columns {missing[:10]} that the model needs; pass data in the model's schema.")
        where = [(n, index[n], n in features.numeric) for n in names]
        for i, row in enumerate(reader):
            if i >= limit:
                break
            if len(row) != len(columns):
                continue
            for n, j, is_num in where:
                v = row[j]
                if is_num:
                    try:
                        cols[n].append(float(v) if v else None)
                    except ValueError:
                        cols[n].append(None)
                else:
                    cols[n].append(v)
    if not cols[names[0]]:
        raise ConfigError(f"{path} holds no usable rows.")
    return cols


def _sample_data(options: LoadOptions, features: _Features, schema: Any | None, tmp: Path) -> dict[str, list]:
    if options.data is not None:
        return _read_rows(Path(options.data), features, schema)
    from ctrflow.data.generate import CATEGORICAL_FIELDS, NUMERIC_FIELDS, GenerateOptions, generate

    if not set(features.categorical) <= set(CATEGORICAL_FIELDS) or not set(features.numeric) <= set(NUMERIC_FIELDS):
        raise ConfigError("The model is not on the synthetic schema, so the generator cannot invent its rows: "
                          "pass data= (a CSV in the model's schema).")
    path = tmp / "loadgen-rows.csv"
    generate(path, GenerateOptions(rows=20_000, seed=options.seed + 1, split="test"))
    return _read_rows(path, features, None)


def _bodies(options: LoadOptions, data: dict[str, list], features: _Features, manifest: Path | None = None,
            model: str = "") -> list[Any]:
    """`distinct_bodies` requests of `candidates` sampled rows, encoded for the protocol/target."""
    from ctrflow.client.columnar import encode_columnar

    rng = np.random.default_rng(options.seed + 2)
    names = (*features.categorical, *features.numeric)
    n = len(data[names[0]])
    hasher = None
    if options.protocol in ("ids", "grpc"):
        from ctrflow.client.hashing import FeatureHasher

        hasher = FeatureHasher.from_manifest(manifest)
    out = []
    for _ in range(options.distinct_bodies):
        idx = rng.integers(0, n, options.candidates)
        cols = {k: [data[k][i] for i in idx] for k in names}
        if hasher is not None:
            ids, numeric = hasher.transform(cols)
            if options.target == "inprocess" and options.url is None:
                out.append((ids, numeric))
            elif options.protocol == "ids":
                from ctrflow.client.ids import encode_ids

                out.append(encode_ids(ids, numeric))
            else:
                out.append(_grpc_ids_request(model, ids, numeric))
        elif options.target == "inprocess" and options.url is None:
            out.append(cols)
        elif options.protocol == "rest":
            rows = [dict(zip(names, values)) for values in zip(*(cols[k] for k in names))]
            out.append(json.dumps({"instances": rows}, separators=(",", ":")).encode())
        else:
            out.append(encode_columnar(cols, features.categorical, features.numeric))
    return out


def _grpc_ids_request(model: str, ids: np.ndarray, numeric: np.ndarray) -> bytes:
    """A serialized PredictRequest on predict_ids with tensor_content (sent as bytes: no client-side encoding)."""
    from tensorflow_serving.apis import predict_pb2

    from ctrflow.serving.grpc_server import DT_FLOAT, DT_INT32

    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = model, "predict_ids"
    for key, arr, dtype in (("ids", np.ascontiguousarray(ids, "<i4"), DT_INT32), ("numeric", np.ascontiguousarray(numeric, "<f4"), DT_FLOAT)):
        t = request.inputs[key]
        t.dtype = dtype
        for d in arr.shape:
            t.tensor_shape.dim.add().size = int(d)
        t.tensor_content = arr.tobytes()
    return request.SerializeToString()


# ---- the HTTP client --------------------------------------------------------------------------------


class _FireConnection(asyncio.Protocol):
    """One keep-alive connection of `_OpenLoopHttp`: carries one request at a time; on its answer it
    reports to the client and takes the next waiting request (no task, future or timer per request)."""

    __slots__ = ("client", "transport", "buf", "job", "closed")

    def __init__(self, client: "_OpenLoopHttp") -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.job: tuple[int, float] | None = None  # (request index, scheduled time) in flight
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.client._ready(self)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self.buf = buf
            return
        head = buf[:end]
        at = head.find(b"\r\ncontent-length:")
        if at < 0:  # the server under test writes lower-case names; anything else is read case-blind
            head = head.lower()
            at = head.find(b"\r\ncontent-length:")
        length = 0
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17: stop if stop > 0 else len(head)])
        if len(buf) < end + 4 + length:
            self.buf = buf
            return
        self.buf = b""  # one request in flight per connection: nothing follows its answer
        close = (b"onnection" in head or b"ONNECTION" in head) and b"\r\nconnection: close" in head.lower()
        job, self.job = self.job, None
        if job is not None:
            self.client._answered(self, job, int(buf[9:12]), close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        job, self.job = self.job, None
        self.client._lost(self, job)


class _OpenLoopHttp:
    """The open-loop HTTP/1.1 client of the load generators: `fire(i, at)` writes request i's pre-encoded
    bytes (head and body joined once, ahead of time) on an idle keep-alive connection, or queues it
    until one is free (at most `size` connections; that wait counts as latency). Each answer calls
    `done(i, status, at, now)` from `data_received` (status 0: no answer within `limit_s` of its
    scheduled time, or the connection failed; `kind` names which). One sweep timer every 10 ms expires
    late requests and closes their connections (an answer may still come on them).

    Against a connection pool + a task per request (the client before it: `benchmarks/bench_wire_costs.py`
    keeps it to compare) this spends no task, future, timer or copy of the body per
    request: what a generator on the server's own cores takes from the server is what it measures."""

    def __init__(self, host: str, port: int, size: int, requests: Sequence[bytes], limit_s: float,
                 done: Any) -> None:
        self._loop = asyncio.get_running_loop()
        self._host, self._port, self._size = host, port, size
        self._requests, self._limit_s, self._done = requests, limit_s, done
        self._idle: list[_FireConnection] = []
        self._busy: set[_FireConnection] = set()
        self._opening = 0
        self._waiting: "collections.deque[tuple[int, float]]" = collections.deque()
        self.in_flight = 0
        self._sweeper = self._loop.call_later(0.01, self._sweep)
        self.closing = False

    def fire(self, i: int, at: float) -> None:
        self.in_flight += 1
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                self._start(conn, i, at)
                return
        self._waiting.append((i, at))
        if len(self._busy) + self._opening < self._size:
            self._opening += 1
            self._loop.create_task(self._open())

    def _start(self, conn: _FireConnection, i: int, at: float) -> None:
        conn.job = (i, at)
        self._busy.add(conn)
        conn.transport.write(self._requests[i % len(self._requests)])

    async def _open(self) -> None:
        try:
            await self._loop.create_connection(lambda: _FireConnection(self), self._host, self._port)
        except Exception as e:  # noqa: BLE001 - refused, reset, unreachable...: counted, never raised
            self._opening -= 1
            if not self._busy and not self._opening:  # nothing else would serve them: all fail as the old client did
                while self._waiting:  # bounded by the requests waiting
                    i, at = self._waiting.popleft()
                    self._finish(i, 0, at, f"connection_error:{type(e).__name__}")

    def _ready(self, conn: _FireConnection) -> None:
        self._opening -= 1
        if self.closing:  # opened after close(): nothing will use it
            conn.transport.close()
            return
        self._next(conn)

    def _next(self, conn: _FireConnection) -> None:
        if self._waiting and not self.closing:
            i, at = self._waiting.popleft()
            self._start(conn, i, at)
        else:
            self._idle.append(conn)

    def _finish(self, i: int, status: int, at: float, kind: str) -> None:
        self.in_flight -= 1
        self._done(i, status, at, self._loop.time(), kind)

    def _answered(self, conn: _FireConnection, job: tuple[int, float], status: int, close: bool) -> None:
        self._busy.discard(conn)
        self._finish(job[0], status, job[1], str(status))
        if close:
            conn.transport.close()
        else:
            self._next(conn)

    def _lost(self, conn: _FireConnection, job: tuple[int, float] | None) -> None:
        self._busy.discard(conn)
        if job is not None:
            self._finish(job[0], 0, job[1], "connection_error:ConnectionResetError")
        if self._waiting and len(self._busy) + self._opening < self._size and not self.closing:
            self._opening += 1
            self._loop.create_task(self._open())

    def _sweep(self) -> None:
        oldest = self._loop.time() - self._limit_s
        waiting = self._waiting
        while waiting and waiting[0][1] < oldest:  # scheduled in order: the oldest first
            i, at = waiting.popleft()
            self._finish(i, 0, at, "client_timeout")
        for conn in [c for c in self._busy if c.job is not None and c.job[1] < oldest]:
            job, conn.job = conn.job, None
            self._busy.discard(conn)
            self._finish(job[0], 0, job[1], "client_timeout")
            conn.transport.close()
        if not self.closing:
            self._sweeper = self._loop.call_later(0.01, self._sweep)

    async def drain(self, timeout_s: float) -> None:
        """Until every fired request is answered or expired (bounded by `timeout_s`)."""
        stop = self._loop.time() + timeout_s
        while self.in_flight > 0 and self._loop.time() < stop:  # bounded by timeout_s
            await asyncio.sleep(0.005)

    def close(self) -> None:
        """Stop: the tally is final once the caller returns, so what is still in flight is not counted
        again when its connection closes (`_lost` sees no job)."""
        self.closing = True
        self._sweeper.cancel()
        for conn in [*self._idle, *self._busy]:
            conn.job = None
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()
        self._busy.clear()
        self._waiting.clear()


async def _read_to_eof(reader: asyncio.StreamReader, limit: int) -> bytes:
    """Everything until the server closes (it was asked to: Connection: close), at most `limit` bytes."""
    parts, total = [], 0
    while total < limit:  # bounded by limit (and by the caller's timeout)
        part = await reader.read(limit - total)
        if not part:
            break
        parts.append(part)
        total += len(part)
    return b"".join(parts)


async def _http_get(host: str, port: int, path: str, timeout_s: float = 10.0) -> tuple[int, bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(_read_to_eof(reader, 64 << 20), timeout_s)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _scrape(url: str, model: str) -> dict[str, float]:
    from ctrflow.serving.metrics import parse_metrics

    parts = urllib.parse.urlsplit(url)
    try:
        status, body = asyncio.run(_http_get(parts.hostname, parts.port, "/metrics", timeout_s=30.0))
    except (OSError, TimeoutError, ValueError, IndexError):
        return {}  # figures from the server's metrics are then missing (NaN), the run's own are kept
    if status != 200:
        return {}
    samples = parse_metrics(body.decode())
    label = f'{{model="{model}"}}'
    ok = sum(v for k, v in samples.items() if k.startswith("ctrflow_requests_total{") and f'model="{model}"' in k
             and 'code="200"' in k)
    return {
        "cpu": samples.get("process_cpu_seconds_total", float("nan")),
        "compute_calls": samples.get(f"ctrflow_batcher_compute_calls_total{label}", float("nan")),
        "predictions": samples.get(f"ctrflow_predictions_total{label}", 0.0),
        "requests_ok": ok,
    }


def _fetch_features(url: str, model: str) -> _Features:
    parts = urllib.parse.urlsplit(url)
    status, body = asyncio.run(_http_get(parts.hostname, parts.port, f"/v1/models/{model}/metadata"))
    if status != 200:
        raise ConfigError(f"{url}: GET /v1/models/{model}/metadata answered {status}: {body[:300]!r}.")
    inputs = json.loads(body)["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
    # ctrflow's metadata says "kind"; a plain SignatureDef only its dtype (strings are categorical).
    def kind(v: dict) -> str:
        return v.get("kind") or ("categorical" if v.get("dtype") == "DT_STRING" else "numeric")

    cats = tuple(n for n, v in inputs.items() if kind(v) == "categorical")
    nums = tuple(n for n, v in inputs.items() if kind(v) == "numeric")
    return _Features(cats, nums)


# ---- one run ----------------------------------------------------------------------------------------


class _Tally:
    def __init__(self, n: int) -> None:
        self.latency_ms = np.full(n, np.nan)
        self.lag_ms = np.zeros(n)
        self.ok = np.zeros(n, dtype=bool)
        self.status: dict[str, int] = {}
        self.sent = self.dropped = 0
        self.in_flight = 0

    def count(self, key: str) -> None:
        self.status[key] = self.status.get(key, 0) + 1


async def on_schedule(times: np.ndarray, start: float) -> Any:
    """Yield (i, scheduled loop time) as each of `times` (seconds after `start`, ascending) comes due:
    the open-loop pacing every driver shares (sleeps only for gaps over 0.5 ms; a late step is yielded
    at once, its lag for the caller to record)."""
    loop = asyncio.get_running_loop()
    for i, offset in enumerate(times):  # bounded by the schedule
        at = start + float(offset)
        delay = at - loop.time()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        yield i, at


async def _drive(options: LoadOptions, times: np.ndarray, send: Any) -> tuple[_Tally, float]:
    """Fire `send(i)` at each scheduled offset; returns the tally and the wall seconds used."""
    tally = _Tally(len(times))
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()
    client_limit_s = max(1.0, 10 * options.timeout_ms / 1e3)

    def expire(task: asyncio.Task, flag: list[bool]) -> None:
        flag[0] = True
        task.cancel()

    async def one(i: int, scheduled: float) -> None:
        # The client's limit is one timer cancelling this task (wait_for would start a second task per
        # request: generator CPU that a shared machine takes from the server).
        expired = [False]
        timer = loop.call_later(client_limit_s, expire, asyncio.current_task(), expired)
        try:
            key = await send(i)
        except asyncio.CancelledError:
            if not expired[0]:
                raise
            key = "client_timeout"
        except TimeoutError:
            key = "client_timeout"
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as e:
            key = f"connection_error:{type(e).__name__}"
        except Exception as e:  # noqa: BLE001 - counted, never raised
            key = f"error:{type(e).__name__}"
        finally:
            timer.cancel()
        tally.latency_ms[i] = (loop.time() - scheduled) * 1e3
        tally.ok[i] = key == "200"
        tally.count(key)
        tally.in_flight -= 1

    start = loop.time() + 0.05
    async for i, at in on_schedule(times, start):
        tally.lag_ms[i] = max(0.0, (loop.time() - at) * 1e3)
        if tally.in_flight >= options.max_in_flight:
            tally.dropped += 1
            continue
        tally.in_flight += 1
        tally.sent += 1
        task = loop.create_task(one(i, at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks), timeout=options.drain_s + 10 * options.timeout_ms / 1e3)
    for t in list(tasks):
        t.cancel()
    return tally, loop.time() - start


async def _drive_http(options: LoadOptions, times: np.ndarray, requests: Sequence[bytes], host: str,
                      port: int) -> tuple[_Tally, float]:
    """`_drive` for HTTP: request i (`requests[i % len]`, head and body pre-joined) fired at its scheduled
    offset through `_OpenLoopHttp`, answers tallied from its callback (no task per request)."""
    tally = _Tally(len(times))
    loop = asyncio.get_running_loop()
    client_limit_s = max(1.0, 10 * options.timeout_ms / 1e3)
    latency, ok = tally.latency_ms, tally.ok

    def done(i: int, status: int, scheduled: float, now: float, kind: str) -> None:
        latency[i] = (now - scheduled) * 1e3
        ok[i] = status == 200
        tally.count(kind)

    client = _OpenLoopHttp(host, port, options.connections, requests, client_limit_s, done)
    start = loop.time() + 0.05
    try:
        async for i, at in on_schedule(times, start):
            tally.lag_ms[i] = max(0.0, (loop.time() - at) * 1e3)
            if client.in_flight >= options.max_in_flight:
                tally.dropped += 1
                continue
            tally.sent += 1
            client.fire(i, at)
        await client.drain(options.drain_s + 10 * options.timeout_ms / 1e3)
    finally:
        client.close()
    tally.in_flight = client.in_flight
    return tally, loop.time() - start


def _result(label: str, options: LoadOptions, tally: _Tally, wall_s: float, *, server: dict[str, Any]) -> LoadResult:
    s = tally.status
    ok = s.get("200", 0)
    lat = tally.latency_ms
    ok_lat = lat[tally.ok]  # what a bidder sees; the failures are counted by kind
    late = int(np.sum(ok_lat > options.timeout_ms))
    timeouts = s.get("504", 0) + s.get("client_timeout", 0)
    rejected = s.get("503", 0)
    errors = sum(v for k, v in s.items() if k not in ("200", "504", "503", "client_timeout"))
    predictions = ok * options.candidates
    calls = server.get("compute_calls")
    cpu = server.get("cpu_s")
    # The server's own count: it also scored requests whose answer the client gave up on.
    computed = server.get("rows_computed") or predictions
    return LoadResult(
        label=label, target=server.get("target", options.target), protocol=server.get("protocol", options.protocol),
        rate_rps=options.rate_rps, candidates=options.candidates, duration_s=wall_s, scheduled=len(lat),
        sent=tally.sent, ok=ok, timeouts=timeouts, late=late, rejected=rejected, errors=errors, dropped=tally.dropped,
        status_counts=dict(sorted(s.items())), predictions=predictions, requests_per_s=ok / wall_s if wall_s else 0.0,
        predictions_per_s=predictions / wall_s if wall_s else 0.0, latency_ms=latency_summary(ok_lat),
        compute_calls=None if calls is None else int(calls),
        compute_calls_per_prediction=None if calls is None or not computed else calls / computed,
        mean_batch_rows=None if not calls else computed / calls,
        server_cpu_s=cpu, cpu_s_per_million_predictions=None if cpu is None or not computed else cpu / computed * 1e6,
        cpu_includes_load_generator=bool(server.get("cpu_includes_load_generator", False)),
        schedule_lag_ms_p99=float(np.percentile(tally.lag_ms, 99)) if len(tally.lag_ms) else 0.0,
        load_generator_cpu_s=server.get("load_generator_cpu_s"),
    )


def _run_http(options: LoadOptions, url: str, model: str, bodies: list[bytes], times: np.ndarray,
              server_pid: int | None, grpc_port: int | None = None) -> tuple[_Tally, float, dict[str, Any]]:
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port
    if options.protocol == "rest":
        path, ctype = f"/v1/models/{model}:predict", "application/json"
    elif options.protocol == "ids":
        from ctrflow.client.ids import IDS_CONTENT_TYPE

        path, ctype = f"/v1/models/{model}:predict_ids", IDS_CONTENT_TYPE
    elif options.protocol == "context":
        from ctrflow.client.context import CONTEXT_CONTENT_TYPE

        path, ctype = f"/v1/models/{model}:predict_columnar", CONTEXT_CONTENT_TYPE
    else:
        from ctrflow.client.columnar import COLUMNAR_CONTENT_TYPE

        path, ctype = f"/v1/models/{model}:predict_columnar", COLUMNAR_CONTENT_TYPE
    heads = [
        (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\nContent-Length: {len(b)}\r\n"
         f"X-Deadline-Ms: {options.timeout_ms:g}\r\n\r\n").encode()
        for b in bodies
    ]
    before = _scrape(url, model)
    proc = None
    if server_pid is not None:
        import psutil

        proc = psutil.Process(server_pid)
        cpu0 = sum(proc.cpu_times()[:2])

    async def main_grpc() -> tuple[_Tally, float]:
        import grpc.aio

        codes = {"OK": "200", "UNAVAILABLE": "503", "DEADLINE_EXCEEDED": "504"}
        async with grpc.aio.insecure_channel(f"{host}:{grpc_port}", options=[
                ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]) as channel:
            # pre-serialized requests, responses left as bytes: the generator spends no CPU on protobuf
            predict = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
            timeout_s = options.timeout_ms / 1e3

            async def send(i: int) -> str:
                try:
                    await predict(bodies[i % len(bodies)], timeout=timeout_s)
                except grpc.aio.AioRpcError as e:
                    return codes.get(e.code().name, f"grpc:{e.code().name}")
                return "200"

            return await _drive(options, times, send)

    generator0 = time.process_time()
    tally, wall = asyncio.run(main_grpc() if options.protocol == "grpc"
                              else _drive_http(options, times, [h + b for h, b in zip(heads, bodies)], host, port))
    generator = time.process_time() - generator0
    after = _scrape(url, model)
    if proc is not None:
        cpu = sum(proc.cpu_times()[:2]) - cpu0
    else:
        cpu = after.get("cpu", math.nan) - before.get("cpu", math.nan)
    calls = after.get("compute_calls", math.nan) - before.get("compute_calls", math.nan)
    rows = after.get("predictions", 0) - before.get("predictions", 0)
    if math.isnan(calls):  # no batcher: every OK request was one compute call
        calls = after.get("requests_ok", 0) - before.get("requests_ok", 0)
    server = {"cpu_s": None if math.isnan(cpu) else cpu, "compute_calls": calls, "rows_computed": rows,
              "target": "grpc" if options.protocol == "grpc" else "http", "protocol": options.protocol,
              "load_generator_cpu_s": generator}
    return tally, wall, server


class _OnThisThread:
    """Awaits a coroutine and adds the CPU its own steps take on this thread to `spent[0]`.

    In process the load generator and the predictor share the event loop's thread: the predictor's
    share of it is what its coroutine runs between suspensions (checks, enqueueing, taking the answer);
    the rest of that thread's CPU (scheduling, tasks, timers, the tally, and the loop waking a caller
    whose answer arrived) is the generator's, and `_run_inprocess` subtracts it from the process's CPU.
    """

    __slots__ = ("coro", "spent")

    def __init__(self, coro: Any, spent: list[float]) -> None:
        self.coro, self.spent = coro, spent

    def __await__(self) -> Any:
        coro, spent, clock = self.coro, self.spent, time.thread_time
        value: Any = None
        error: BaseException | None = None
        while True:
            began = clock()
            try:
                yielded = coro.send(value) if error is None else coro.throw(error)
            except StopIteration as stop:
                spent[0] += clock() - began
                return stop.value
            except BaseException:
                spent[0] += clock() - began
                raise
            spent[0] += clock() - began
            try:
                value, error = (yield yielded), None
            except BaseException as e:  # noqa: BLE001 - cancellation and the like go on into the coroutine
                value, error = None, e


def _run_inprocess(options: LoadOptions, predictor: Any, bodies: list[dict], times: np.ndarray) -> tuple[_Tally, float, dict[str, Any]]:
    """Drive an in-process predictor; its CPU is the process's less the generator's own (see `_OnThisThread`)."""
    pool = ThreadPoolExecutor(16, thread_name_prefix="loadgen-predict")
    before = predictor.stats() or {}
    cpu0 = time.process_time()
    batched = getattr(predictor, "batcher", None) is not None
    ids = options.protocol == "ids"
    in_predictor = [0.0]  # CPU of the predictor's coroutine steps on the loop's thread
    loop_thread = [0.0]  # CPU of the loop's thread over the whole run

    async def main() -> tuple[_Tally, float]:
        loop = asyncio.get_running_loop()

        async def send(i: int) -> str:
            features = bodies[i % len(bodies)]
            try:
                if ids:
                    if batched:
                        await _OnThisThread(predictor.apredict_ids(*features, timeout_ms=options.timeout_ms), in_predictor)
                    else:
                        await loop.run_in_executor(pool, predictor.predict_ids, *features)
                elif batched:
                    await _OnThisThread(predictor.apredict(features, timeout_ms=options.timeout_ms), in_predictor)
                else:
                    await loop.run_in_executor(pool, predictor.predict, features)
            except DeadlineExceeded:
                return "504"
            except QueueFullError:
                return "503"
            return "200"

        began = time.thread_time()
        try:
            return await _drive(options, times, send)
        finally:
            loop_thread[0] = time.thread_time() - began

    try:
        tally, wall = asyncio.run(main())
    finally:
        pool.shutdown(wait=True)
    cpu = time.process_time() - cpu0
    generator = max(0.0, loop_thread[0] - in_predictor[0])
    after = predictor.stats() or {}
    ok = tally.status.get("200", 0)
    calls = after.get("compute_calls", 0) - before.get("compute_calls", 0) if batched else ok
    rows = after.get("predictions", 0) - before.get("predictions", 0) if batched else ok * options.candidates
    server = {"cpu_s": max(0.0, cpu - generator), "load_generator_cpu_s": generator, "compute_calls": calls,
              "rows_computed": rows, "target": "inprocess", "protocol": "ids" if ids else "python"}
    return tally, wall, server


# ---- targets started here -----------------------------------------------------------------------------


def child_port(proc: subprocess.Popen, timeout_s: float, *, extra: dict[str, int] | None = None) -> int | None:
    """The port a child server announces on stdout as `CTRFLOW_PORT N`, or None if it exits or stays silent.

    Lines `CTRFLOW_<NAME> N` printed before it (e.g. CTRFLOW_GRPC_PORT) land in `extra`. Bounded by
    time and by the lines the child prints.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return None
        if line.startswith("CTRFLOW_PORT "):
            return int(line.split()[1])
        key, _, value = line.strip().partition(" ")
        if extra is not None and key.startswith("CTRFLOW_") and value.isdigit():
            extra[key] = int(value)
    return None


class _ChildServer:
    """`serve()` in a child process on a free loopback port; its pid gives the server's own CPU."""

    def __init__(self, base_path: str, name: str, batching: BatchingOptions | None, timeout_s: float = 180.0,
                 *, grpc: bool = False) -> None:
        spec = {"model_base_path": base_path, "model_name": name, "batching": None if batching is None else asdict(batching),
                "grpc": grpc}
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ctrflow.bench.loadgen", "--child-server", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
        )
        extra: dict[str, int] = {}
        self.port = child_port(self.proc, timeout_s, extra=extra)
        self.grpc_port = extra.get("CTRFLOW_GRPC_PORT")
        if self.port is None or (grpc and self.grpc_port is None):
            self.close()
            raise CtrflowError(f"The child server for {base_path} did not start (exit code {self.proc.poll()}).")
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # the child stops on EOF
                self.proc.wait(30)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait(10)


def _child_server(spec_json: str) -> None:
    from ctrflow.serving.server import ServeOptions, freeze_heap, serve

    spec = json.loads(spec_json)
    batching = None if spec["batching"] is None else BatchingOptions(**spec["batching"])
    server = serve(ServeOptions(model_base_path=spec["model_base_path"], model_name=spec["model_name"], port=0,
                                batching=batching, poll_interval_s=3600.0, grpc_port=0 if spec.get("grpc") else None))
    freeze_heap()
    if server.grpc_port is not None:
        print(f"CTRFLOW_GRPC_PORT {server.grpc_port}", flush=True)
    print(f"CTRFLOW_PORT {server.port}", flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin
    finally:
        server.stop()


def _model_info(base_path: str) -> tuple[_Features, Any, Path]:
    from ctrflow.export import find_versions
    from ctrflow.schema import Schema

    base = Path(base_path)
    versions = find_versions(base)
    if (base / "ctrflow.json").exists():
        folder = base
    elif versions:
        folder = base / str(versions[-1])
    else:
        raise ConfigError(f"{base} holds no exported model version (expected {base}/<version>/ctrflow.json).")
    schema = Schema.from_dict(json.loads((folder / "ctrflow.json").read_text())["schema"])
    return _Features(schema.categorical_names, schema.numeric_names), schema, folder


def run_load(options: LoadOptions) -> LoadReport:
    """Drive the target(s) with the open-loop schedule; one `LoadResult` per run (two with compare_batching)."""
    times = arrival_times(options.rate_rps, options.duration_s, options.seed)
    results: list[LoadResult] = []
    with tempfile.TemporaryDirectory(prefix="ctrflow-loadgen-") as tmp:
        name = options.model_name or Path(options.model_base_path).resolve().name
        if options.url is not None:
            features, schema = _fetch_features(options.url, options.model_name), None
            folder = Path(options.manifest) if options.manifest else None
        else:
            features, schema, folder = _model_info(options.model_base_path)
        data = _sample_data(options, features, schema, Path(tmp))
        if options.protocol == "context":
            return _run_context(options, data, features, folder, times)
        bodies = _bodies(options, data, features, folder, name)
        import gc

        gc.collect()
        gc.freeze()  # the generator's own full collections would show up as server latency (see freeze_heap)
        if options.url is not None:
            tally, wall, server = _run_http(options, options.url, options.model_name, bodies, times, options.server_pid,
                                            options.grpc_port)
            results.append(_result("server", options, tally, wall, server=server))
            return LoadReport(_options_dict(options), results)
        modes = [("batching on", options.batching or BatchingOptions()), ("batching off", None)] \
            if options.compare_batching else [("batching " + ("on" if options.batching else "off"), options.batching)]
        for label, batching in modes:
            if options.target == "http":
                child = _ChildServer(str(Path(options.model_base_path).resolve()), name, batching,
                                     grpc=options.protocol == "grpc")
                try:
                    tally, wall, server = _run_http(options, child.url, name, bodies, times, child.proc.pid, child.grpc_port)
                finally:
                    child.close()
            else:
                from ctrflow.serving.predictor import Predictor

                with Predictor.load(folder, batching=batching, name=name) as predictor:
                    predictor.warmup()
                    tally, wall, server = _run_inprocess(options, predictor, bodies, times)
            results.append(_result(label, options, tally, wall, server=server))
    return LoadReport(_options_dict(options), results)


# ---- context + candidates requests (--protocol context) -------------------------------------------------


def _context_bodies(options: LoadOptions, data: dict[str, list], features: _Features,
                    context_fields: Sequence[str]) -> tuple[list[Any], list[Any]]:
    """The same requests twice: flat (every candidate carries the context's values) and as context +
    candidates (the context once). One context per request, drawn from the sampled rows."""
    from ctrflow.client.columnar import encode_columnar
    from ctrflow.client.context import encode_context

    rng = np.random.default_rng(options.seed + 3)
    names = (*features.categorical, *features.numeric)
    n = len(data[names[0]])
    chosen = set(context_fields)
    flat, context = [], []
    for _ in range(options.distinct_bodies):
        idx, at = rng.integers(0, n, options.candidates), int(rng.integers(0, n))
        ctx = {k: [data[k][at]] for k in names if k in chosen}
        cands = {k: [data[k][i] for i in idx] for k in names if k not in chosen}
        joined = {**cands, **{k: v * options.candidates for k, v in ctx.items()}}
        if options.target == "inprocess":
            flat.append(joined)
            context.append({**ctx, **cands})
        else:
            flat.append(encode_columnar(joined, features.categorical, features.numeric))
            context.append(encode_context(ctx, cands, categorical=features.categorical, numeric=features.numeric))
    return flat, context


class _ContextTarget:
    """An in-process predictor seen through its context scorer (what `_run_inprocess` drives)."""

    def __init__(self, predictor: Any) -> None:
        self._scorer = predictor.context
        self.batcher = self._scorer.batcher

    async def apredict(self, inputs: dict[str, list], *, timeout_ms: float | None = None) -> Any:
        return await self._scorer.apredict_outputs(inputs, timeout_ms=timeout_ms, names=("probabilities",))

    def predict(self, inputs: dict[str, list]) -> Any:
        return self._scorer.predict_outputs(inputs, names=("probabilities",))

    def stats(self) -> dict[str, Any]:
        return self._scorer.stats()


def _run_context(options: LoadOptions, data: dict[str, list], features: _Features, folder: Path,
                 times: np.ndarray) -> LoadReport:
    """Flat, then context + candidates, on the same schedule and model: CPU per candidate of each."""
    from dataclasses import replace

    info = json.loads((folder / "ctrflow.json").read_text()).get("context")
    if not info:
        raise ConfigError(f"{folder} was exported without context fields: re-export it with "
                          "`ctrflow export RUN --model-base-path ... --context-fields A,B,C` (docs/context.md).")
    flat_bodies, context_bodies = _context_bodies(options, data, features, info["fields"])
    import gc

    gc.collect()
    gc.freeze()
    name = options.model_name or Path(options.model_base_path).resolve().name
    results = []
    for label, protocol, bodies in (("flat", "columnar", flat_bodies),
                                    (f"context ({len(info['fields'])} fields)", "context", context_bodies)):
        run = replace(options, protocol=protocol)
        if options.target == "http":
            child = _ChildServer(str(Path(options.model_base_path).resolve()), name, options.batching)
            try:
                tally, wall, server = _run_http(run, child.url, name, bodies, times, child.proc.pid)
            finally:
                child.close()
        else:
            from ctrflow.serving.predictor import Predictor

            with Predictor.load(folder, batching=options.batching, name=name) as predictor:
                predictor.warmup()
                target = predictor if protocol == "columnar" else _ContextTarget(predictor)
                tally, wall, server = _run_inprocess(run, target, bodies, times)
                server["protocol"] = "python" if protocol == "columnar" else "python-context"
        server["protocol"] = protocol if options.target == "http" else server["protocol"]
        results.append(_result(label, run, tally, wall, server=server))
    flat, ctx = (r.cpu_s_per_million_predictions for r in results)
    notes = {"context": {"fields": len(info["fields"]), "of_fields": len(features.categorical) + len(features.numeric),
                         "cpu_us_per_candidate_flat": flat, "cpu_us_per_candidate_context": ctx,
                         "flat_over_context_cpu": (flat / ctx) if flat and ctx else None}}
    return LoadReport(_options_dict(options), results, notes)


def _options_dict(options: LoadOptions) -> dict[str, Any]:
    return asdict(options)


if __name__ == "__main__":  # the child server of `_ChildServer`; not a user-facing command
    if len(sys.argv) == 3 and sys.argv[1] == "--child-server":
        _child_server(sys.argv[2])
    else:
        sys.exit("usage: python -m ctrflow.bench.loadgen --child-server JSON (internal; use `ctrflow bench serve`)")
