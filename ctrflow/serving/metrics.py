"""Serving metrics on prometheus-client: request counters and latency histograms, plus collectors read at scrape.

`ServingMetrics` owns one `CollectorRegistry` per server (not the global one, so servers in one process
stay apart) holding the process collector (`process_cpu_seconds_total`, a true
`process_start_time_seconds`, memory, open fds), the per-request families the front ends update, and
custom collectors that read each model's registry and batcher counters (`ModelCollector`) and the HTTP
transport's counters when `/metrics` (or `/monitoring/prometheus/metrics`) is scraped.

Several worker processes on one port (`ctrflow.serving.workers`) report as one server: see
`MultiprocessMetrics` at the end of this module.
"""
from __future__ import annotations

import asyncio
import os
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS_S", "ModelCollector", "ModelGauges", "MultiprocessMetrics", "PUBLISH_INTERVAL_S",
           "ServingMetrics", "collector", "parse_metrics"]

# No `*_created` series beside every counter and histogram: scrapers here do not use them and they
# double the exposition. (A process-wide switch of prometheus-client.)
prometheus_client.disable_created_metrics()

CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()

# Request latency bucket upper bounds in seconds: 0.25 ms .. 10 s, dense around an RTB budget of 100 ms.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
    0.15, 0.25, 0.5, 1.0, 2.5, 10.0,
)


@dataclass(frozen=True)
class ModelGauges:
    """What the model registry knows about one model at scrape time (see `ModelManager.gauges`)."""

    name: str
    versions_available: tuple[int, ...]  # loaded and serving, ascending
    load_failures: int  # version folders skipped (corrupt, incomplete, schema mismatch) since start
    swaps: int  # times the default version changed
    # Batcher counters summed over every version this model ever served (monotonic across swaps);
    # empty when the model serves without batching.
    batcher: Mapping[str, float]
    batch_size_bounds: tuple[int, ...] = ()
    batch_size_counts: tuple[int, ...] = ()


class ServingMetrics:
    """Per-model request counters and latency histograms shared by the REST and gRPC front ends.

    `observe(model, protocol, code, seconds, predictions)` once per finished request; `add_collector`
    for what is read at scrape time; `render()` for `/metrics`.
    """

    def __init__(self, latency_buckets_s: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        # A worker of several (prometheus-client's multiprocess mode is on): the request families live in
        # the shared folder, what is read at scrape time is published from `_scraped` (MultiprocessMetrics).
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self._scraped = CollectorRegistry(auto_describe=False) if directory else self.registry
        self.multiprocess = MultiprocessMetrics(directory, self._scraped) if directory else None
        ProcessCollector(registry=self._scraped)
        # One process: plain per-thread totals, exposed at scrape (`_RequestTally`): ~1 µs per request on the
        # event loop instead of ~10 µs for three prometheus-client updates (each through its own lock).
        # Workers keep the library's multiprocess values, which every worker's /metrics sums at once.
        self._tally = None if directory else _RequestTally(tuple(latency_buckets_s))
        if self._tally is not None:
            self.registry.register(self._tally)
            return
        self._requests = Counter("ctrflow_requests", _REQUESTS_HELP, ("model", "protocol", "code"), registry=self.registry)
        self._latency = Histogram("ctrflow_request_duration_seconds", _LATENCY_HELP, ("model", "protocol"),
                                  buckets=tuple(latency_buckets_s), registry=self.registry)
        self._predictions = Counter("ctrflow_predictions", _PREDICTIONS_HELP, ("model",), registry=self.registry)
        # Children by label values: one dict lookup per observation instead of prometheus-client's labels().
        self._children: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
        self._lock = threading.Lock()

    def observe(self, model: str, protocol: str, code: str | int, seconds: float, predictions: int = 0) -> None:
        """Count one finished request: its status code (HTTP code or gRPC code name) and latency."""
        tally = self._tally
        if tally is not None:
            tally.add(model, protocol, code, seconds, predictions)
            return
        key = (model, protocol, str(code))
        children = self._children.get(key)
        if children is None:
            with self._lock:
                children = self._children[key] = (self._requests.labels(*key), self._latency.labels(model, protocol),
                                                   self._predictions.labels(model))
        children[0].inc()
        children[1].observe(seconds)
        if predictions:
            children[2].inc(predictions)

    def requests(self, model: str | None = None) -> dict[tuple[str, str, str], int]:
        """Request counts by (model, protocol, code), for tests and the load generator."""
        if self._tally is not None:
            return {k: v for k, v in self._tally.requests().items() if model is None or k[0] == model}
        out = {}
        for family in self._requests.collect():
            for s in family.samples:
                if s.name.endswith("_total") and (model is None or s.labels["model"] == model):
                    out[(s.labels["model"], s.labels["protocol"], s.labels["code"])] = int(s.value)
        return out

    def add_collector(self, collector: Any) -> None:
        """Register an object with `collect() -> Iterable[Metric]`, read at every scrape."""
        self._scraped.register(collector)

    def render(self) -> bytes:
        """The whole exposition in the Prometheus text format (`CONTENT_TYPE`); of every worker, in a worker."""
        if self.multiprocess is not None:
            return self.multiprocess.render()
        return prometheus_client.generate_latest(self.registry)

    def publish(self) -> None:
        """A worker: write this process's scrape-time families for the other workers' `/metrics`."""
        if self.multiprocess is not None:
            self.multiprocess.publish()

    async def publish_every(self, interval_s: float) -> None:
        """`publish()` every `interval_s` on the serving loop (until cancelled): collectors read loop state."""
        while True:
            try:
                self.publish()
            except OSError:  # the folder is gone: the supervisor is stopping
                pass
            await asyncio.sleep(interval_s)


_REQUESTS_HELP = "Finished prediction requests by model, protocol and status code."
_LATENCY_HELP = "Prediction request latency from body received to response ready."
_PREDICTIONS_HELP = "Candidates scored in successful requests."


class _RequestTally:
    """The per-request families of one process as plain running totals, exposed at scrape time.

    Each thread that observes adds to its own dict {(model, protocol, code): [requests, predictions,
    seconds summed, count per latency bucket..., over the last bound]}, so no lock is taken per request
    and no update is lost; `collect` sums every thread's (copied in one C call each, so a thread adding a
    key meanwhile is harmless). The same families, names and labels as prometheus-client's Counter and
    Histogram wrote (`ctrflow_requests_total`, `ctrflow_request_duration_seconds`, `ctrflow_predictions_total`).
    """

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = tuple(float(b) for b in bounds)
        self._le = [floatToGoString(b) for b in self._bounds]
        self._local = threading.local()
        self._threads: list[dict[tuple[str, str, Any], list[Any]]] = []  # every observing thread's totals
        self._lock = threading.Lock()  # guards `_threads` (a thread's first observation only)

    def add(self, model: str, protocol: str, code: str | int, seconds: float, predictions: int) -> None:
        try:
            mine = self._local.totals
        except AttributeError:
            mine = self._local.totals = {}
            with self._lock:
                self._threads.append(mine)
        row = mine.get((model, protocol, code))
        if row is None:
            row = mine[(model, protocol, code)] = [0, 0, 0.0] + [0] * (len(self._bounds) + 1)
        row[0] += 1
        row[1] += predictions
        row[2] += seconds
        row[3 + bisect_left(self._bounds, seconds)] += 1  # the first bound >= seconds (`le`), else +Inf

    def _totals(self) -> dict[tuple[str, str, str], list[Any]]:
        """Every thread's totals summed, by (model, protocol, code as text)."""
        with self._lock:
            threads = list(self._threads)
        out: dict[tuple[str, str, str], list[Any]] = {}
        for mine in threads:
            for (model, protocol, code), row in list(mine.items()):
                row = list(row)
                key = (model, protocol, str(code))
                have = out.get(key)
                if have is None:
                    out[key] = row
                else:
                    out[key] = [a + b for a, b in zip(have, row)]
        return out

    def requests(self) -> dict[tuple[str, str, str], int]:
        return {key: int(row[0]) for key, row in self._totals().items()}

    def collect(self) -> Iterable[Metric]:
        totals = self._totals()
        requests = CounterMetricFamily("ctrflow_requests", _REQUESTS_HELP, labels=("model", "protocol", "code"))
        latency = HistogramMetricFamily("ctrflow_request_duration_seconds", _LATENCY_HELP, labels=("model", "protocol"))
        predictions = CounterMetricFamily("ctrflow_predictions", _PREDICTIONS_HELP, labels=("model",))
        by_route: dict[tuple[str, str], list[Any]] = {}
        by_model: dict[str, int] = {}
        for (model, protocol, code), row in sorted(totals.items()):
            requests.add_metric((model, protocol, code), row[0])
            by_model[model] = by_model.get(model, 0) + row[1]
            have = by_route.get((model, protocol))
            by_route[(model, protocol)] = row[2:] if have is None else [a + b for a, b in zip(have, row[2:])]
        for (model, protocol), (seconds, *counts) in by_route.items():
            buckets, total = [], 0
            for le, n in zip(self._le + ["+Inf"], counts):
                total += n
                buckets.append((le, total))
            latency.add_metric((model, protocol), buckets, seconds)
        for model, n in by_model.items():
            predictions.add_metric((model,), n)
        return [requests, latency, predictions]


class _Collector:
    """A prometheus-client collector from a function returning metric families."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


def collector(collect: Callable[[], Iterable[Metric]]) -> _Collector:
    """Wrap a function yielding metric families as a collector for `ServingMetrics.add_collector`."""
    return _Collector(collect)


_BATCHER_FAMILIES = (
    ("requests", "ctrflow_batcher_requests", "counter", "Requests accepted by the autobatcher."),
    ("predictions", "ctrflow_batcher_predictions", "counter", "Rows scored by successful compute calls."),
    ("compute_calls", "ctrflow_batcher_compute_calls", "counter", "Model compute calls (batches)."),
    ("timeouts", "ctrflow_batcher_timeouts", "counter", "Requests failed with DeadlineExceeded."),
    ("rejects", "ctrflow_batcher_rejects", "counter", "Requests refused at once: queue full or closed."),
    ("shed", "ctrflow_batcher_shed", "counter", "Requests refused at once (503): queue wait + compute would miss their deadline."),
    ("expired", "ctrflow_batcher_expired", "counter", "Accepted requests dropped before compute: deadline passed while queued."),
    ("errors", "ctrflow_batcher_errors", "counter",
     "Requests failed: by a compute error, or refused by the batch's input screen (those also in ctrflow_batcher_invalid)."),
    ("invalid", "ctrflow_batcher_invalid", "counter", "Requests the batch's input screen refused (400: ids out of range, non-finite numerics)."),
    ("rows_dropped", "ctrflow_batcher_rows_dropped", "counter", "Accepted rows never scored."),
    ("queue_wait_seconds_sum", "ctrflow_batcher_queue_wait_seconds_sum", "gauge", "Queue wait summed over request pieces."),
    ("queue_wait_count", "ctrflow_batcher_queue_wait_count", "gauge", "Request pieces whose queue wait was measured."),
    ("rows_enqueued", "ctrflow_batcher_queue_depth_rows", "gauge", "Rows waiting for a batch thread now."),
)


def rollout_families(stats: dict[str, Any]) -> Iterable[Metric]:
    """Per-arm and shadow figures of `RolloutSet.stats()` as metric families (labels rollout, arm)."""
    requests = CounterMetricFamily("ctrflow_rollout_arm_requests", "Requests routed to a rollout arm.", labels=("rollout", "arm"))
    rows = CounterMetricFamily("ctrflow_rollout_arm_rows", "Rows scored by a rollout arm.", labels=("rollout", "arm"))
    errors = CounterMetricFamily("ctrflow_rollout_arm_errors", "Requests a rollout arm failed.", labels=("rollout", "arm"))
    latency = CounterMetricFamily("ctrflow_rollout_arm_latency_seconds_sum", "Answer time summed over an arm's requests.",
                                  labels=("rollout", "arm"))
    shadow_rows = CounterMetricFamily("ctrflow_shadow_rows", "Rows mirrored to a shadow model and compared.", labels=("rollout",))
    shadow_errors = CounterMetricFamily("ctrflow_shadow_errors", "Shadow requests that failed.", labels=("rollout",))
    shadow_dropped = CounterMetricFamily("ctrflow_shadow_dropped", "Requests not mirrored: the shadow was busy.", labels=("rollout",))
    shadow_diff = GaugeMetricFamily("ctrflow_shadow_mean_abs_score_diff", "Mean |shadow - served| probability.", labels=("rollout",))
    for name, r in sorted(stats.items()):
        for arm, a in sorted(r["arms"].items()):
            requests.add_metric((name, arm), a["requests"])
            rows.add_metric((name, arm), a["rows"])
            errors.add_metric((name, arm), a["errors"])
            latency.add_metric((name, arm), (a["mean_latency_ms"] or 0.0) * a["requests"] / 1e3)
        if r.get("shadow"):
            sh = r["shadow"]
            shadow_rows.add_metric((name,), sh["rows"])
            shadow_errors.add_metric((name,), sh["errors"])
            shadow_dropped.add_metric((name,), sh["dropped"])
            if sh["mean_abs_diff"] is not None:
                shadow_diff.add_metric((name,), sh["mean_abs_diff"])
    yield from (requests, rows, errors, latency, shadow_rows, shadow_errors, shadow_dropped, shadow_diff)


class ModelCollector:
    """The model registry and every model's batcher counters, read from `gauges()` at scrape time."""

    def __init__(self, gauges: Callable[[], Iterable[ModelGauges]], ready: Callable[[], bool] | None = None) -> None:
        self._gauges = gauges
        self._ready = ready

    def collect(self) -> Iterable[Metric]:
        models = sorted(self._gauges(), key=lambda g: g.name)
        available = GaugeMetricFamily("ctrflow_model_version_available", "1 for every model version loaded and serving.",
                                      labels=("model", "version"))
        latest = GaugeMetricFamily("ctrflow_model_latest_version",
                                   "The version served when a request names none (0: none loaded).", labels=("model",))
        failures = CounterMetricFamily("ctrflow_model_load_failures",
                                       "Version folders skipped: corrupt, incomplete or schema mismatch.", labels=("model",))
        swaps = CounterMetricFamily("ctrflow_model_swaps", "Times a newer version replaced the served one.", labels=("model",))
        for g in models:
            for v in g.versions_available:
                available.add_metric((g.name, str(v)), 1)
            latest.add_metric((g.name,), g.versions_available[-1] if g.versions_available else 0)
            failures.add_metric((g.name,), g.load_failures)
            swaps.add_metric((g.name,), g.swaps)
        yield from (available, latest, failures, swaps)

        batched = [g for g in models if g.batcher]
        for key, name, kind, help_text in _BATCHER_FAMILIES:
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, help_text, labels=("model",))
            for g in batched:
                family.add_metric((g.name,), float(g.batcher.get(key, 0)))
            yield family
        sizes = HistogramMetricFamily("ctrflow_batch_size_rows", "Rows per model compute call.", labels=("model",))
        for g in batched:
            buckets, total = [], 0
            for bound, n in zip(g.batch_size_bounds, g.batch_size_counts):
                total += n
                buckets.append((str(bound), total))
            buckets.append(("+Inf", total))
            sizes.add_metric((g.name,), buckets, float(g.batcher.get("predictions", 0)))
        yield sizes
        if self._ready is not None:
            ready = GaugeMetricFamily("ctrflow_ready", "1 when every configured model serves at least one version.")
            ready.add_metric((), int(self._ready()))
            yield ready


def parse_metrics(text: str) -> dict[str, float]:
    """Samples of an exposition as {'name{k="v",...}': value}, label names sorted (as prometheus-client writes them).

    For tests and the load generator; parsed by prometheus-client's own text parser.
    """
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return out


# ---- several worker processes, one server ------------------------------------------------------------

PUBLISH_INTERVAL_S = 0.25  # how often a worker publishes its scrape-time families (their staleness in /metrics)

# Gauges whose whole-server value is the least over the workers (a worker without the series counts 0):
# a version is available, and the server ready, only when every worker says so.
_MIN_GAUGES = frozenset(("ctrflow_ready", "ctrflow_model_version_available", "ctrflow_model_latest_version",
                         "process_start_time_seconds", "process_max_fds"))
_OMIT_ZERO = frozenset(("ctrflow_model_version_available",))  # absent rather than 0, as one process writes it


class _Families:
    """A registry-like list of families for `generate_latest`."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


class MultiprocessMetrics:
    """`/metrics` of a worker reporting the whole server: every worker's figures, merged.

    The supervisor gives every worker one folder (PROMETHEUS_MULTIPROC_DIR) and writes `workers.json`
    there (the live workers' pids, how many are expected, restarts). In it:
    - prometheus-client's multiprocess files: the request counters and latency histograms of every
      worker, dead ones included, summed exactly by its `MultiProcessCollector`;
    - `scrape_<pid>.prom`: each worker's scrape-time families (models, batchers, HTTP transport,
      rollouts, process), published every `PUBLISH_INTERVAL_S` on its serving loop, so up to that old;
      the answering worker uses its own, fresh. A dead worker's file is renamed `retired_<pid>.prom`
      by the supervisor: its counters still count (whole-server counters never go down), its gauges not.
    Process figures (CPU, memory, fds) of live workers are read from /proc at scrape time.
    Merging: counters and histograms are summed; gauges are summed over live workers, except those in
    `_MIN_GAUGES` (the least: ready, versions available, the latest version every worker serves).
    Added: `ctrflow_workers` (live), `ctrflow_workers_expected`, `ctrflow_worker_restarts`.
    """

    def __init__(self, directory: str, local: CollectorRegistry) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self.directory = directory
        self._local = local
        self._requests = MultiProcessCollector(None, path=directory)
        self._pid = os.getpid()

    def _path(self, kind: str, pid: int) -> str:
        return os.path.join(self.directory, f"{kind}_{pid}.prom")

    def publish(self) -> bytes:
        """Write this worker's scrape-time families; returns them."""
        text = prometheus_client.generate_latest(self._local)
        path = self._path("scrape", self._pid)
        tmp = f"{path}.tmp"
        # No fsync (unlike ctrflow.atomic): a live snapshot rewritten 4 times a second, meaningless after a crash.
        with open(tmp, "wb") as f:
            f.write(text)
        os.replace(tmp, path)
        return text

    @staticmethod
    def retire(directory: str, pid: int) -> None:
        """The supervisor, when worker `pid` is gone: keep its counters, drop its gauges."""
        from prometheus_client import multiprocess

        try:
            os.replace(os.path.join(directory, f"scrape_{pid}.prom"), os.path.join(directory, f"retired_{pid}.prom"))
        except OSError:
            pass
        multiprocess.mark_process_dead(pid, directory)

    def _workers(self) -> dict[str, Any]:
        import json

        try:
            with open(os.path.join(self.directory, "workers.json")) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            doc = {}
        pids = [int(p) for p in doc.get("pids", [])]
        if self._pid not in pids:  # before the supervisor's first list, or a stale one
            pids.append(self._pid)
        return {"pids": pids, "expected": int(doc.get("expected", len(pids))), "restarts": int(doc.get("restarts", 0))}

    def render(self) -> bytes:
        workers = self._workers()
        live: list[list[Metric]] = []
        for pid in workers["pids"]:
            if pid == self._pid:
                text = self.publish().decode()
            else:
                try:
                    with open(self._path("scrape", pid), encoding="utf-8") as f:
                        text = f.read()
                except OSError:
                    continue  # starting: not published yet
            families = [m for m in text_string_to_metric_families(text) if not m.name.startswith("process_")]
            families.extend(ProcessCollector(pid=lambda p=pid: p, registry=None).collect())
            live.append(families)
        retired: list[list[Metric]] = []
        for name in sorted(os.listdir(self.directory)):
            if name.startswith("retired_") and name.endswith(".prom"):
                try:
                    with open(os.path.join(self.directory, name), encoding="utf-8") as f:
                        retired.append([m for m in text_string_to_metric_families(f.read()) if m.type != "gauge"])
                except OSError:
                    continue
        merged = _merge(live, retired)
        ready_all = len(live) >= workers["expected"]
        for m in merged:
            if m.name == "ctrflow_ready" and not ready_all:
                m.samples = [s._replace(value=0.0) for s in m.samples]
        count = GaugeMetricFamily("ctrflow_workers", "Server worker processes serving now.")
        count.add_metric((), len(live))
        expected = GaugeMetricFamily("ctrflow_workers_expected", "Server worker processes configured (--workers).")
        expected.add_metric((), workers["expected"])
        restarts = CounterMetricFamily("ctrflow_worker_restarts", "Worker processes restarted after an unexpected exit.")
        restarts.add_metric((), workers["restarts"])
        families = [*self._requests.collect(), *merged, count, expected, restarts]
        return prometheus_client.generate_latest(_Families(families))  # type: ignore[arg-type]


def _merge(live: list[list[Metric]], retired: list[list[Metric]]) -> list[Metric]:
    """One family per name: counters and histograms summed over live and retired workers, gauges over live."""
    heads: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    for worker_families, is_live in [(f, True) for f in live] + [(f, False) for f in retired]:
        for m in worker_families:
            if m.type == "gauge" and not is_live:
                continue
            if m.name not in heads:
                heads[m.name] = Metric(m.name, m.documentation, m.type, m.unit)
                values[m.name] = {}
            series = values[m.name]
            for s in m.samples:
                series.setdefault((s.name, tuple(sorted(s.labels.items()))), []).append(float(s.value))
    out = []
    for name, head in heads.items():
        for (sample, labels), vs in values[name].items():
            if head.type == "gauge" and name in _MIN_GAUGES:
                value = min(vs) if len(vs) >= len(live) else 0.0
                if value == 0.0 and name in _OMIT_ZERO:
                    continue
            else:
                value = sum(vs)
            head.add_sample(sample, dict(labels), value)
        out.append(head)
    return out
