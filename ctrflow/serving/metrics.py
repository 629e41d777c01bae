"""Serving metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

Counters and histograms the front ends update on every request, plus a renderer that also folds in
each model's batcher counters (batch sizes, queue depth, timeouts, rejects) when `/metrics` is scraped.

Implementation details follow: a `Histogram` keeps cumulative-free bucket counts in a list (one
`bisect` and three additions per observation, under the registry's single lock); rendering makes
them cumulative as Prometheus expects. Label values are escaped (backslash, quote, newline).
"""
from __future__ import annotations

import bisect
import math
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "LATENCY_BUCKETS_S",
    "Histogram",
    "ServingMetrics",
    "ModelGauges",
    "escape_label_value",
    "format_labels",
    "parse_metrics",
]

# Request latency bucket upper bounds in seconds: 0.25 ms .. 10 s, dense around an RTB budget of 100 ms.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
    0.15, 0.25, 0.5, 1.0, 2.5, 10.0,
)


def escape_label_value(value: str) -> str:
    """A label value escaped per the text format: backslash, double quote and newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_labels(labels: Mapping[str, str] | Iterable[tuple[str, str]]) -> str:
    """`{a="x",b="y"}`, or "" for no labels."""
    items = labels.items() if isinstance(labels, Mapping) else labels
    inner = ",".join(f'{k}="{escape_label_value(str(v))}"' for k, v in items)
    return "{" + inner + "}" if inner else ""


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


class Histogram:
    """Bucket counts, sum and count of observations; not thread-safe on its own (the registry locks)."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(bounds) or len(set(bounds)) != len(bounds) or not bounds:
            raise ValueError(f"histogram bounds must be strictly increasing and non-empty. Got {bounds!r} instead.")
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last: above every bound (+Inf only)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """[(le, cumulative count)] ending with ("+Inf", count)."""
        out, total = [], 0
        for bound, n in zip(self.bounds, self.counts):
            total += n
            out.append((_number(bound), total))
        out.append(("+Inf", total + self.counts[-1]))
        return out

    def quantile(self, q: float) -> float:
        """An upper-bound estimate of the q-quantile (the bound of the bucket that holds it)."""
        if not self.count:
            return 0.0
        rank, total = q * self.count, 0
        for bound, n in zip(self.bounds, self.counts):
            total += n
            if total >= rank:
                return bound
        return math.inf


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

    `observe(model, protocol, code, seconds, predictions)` once per finished request; `render(...)`
    for `/metrics`. One lock: an observation is a few additions, far below a request's parse cost.
    """

    def __init__(self, latency_buckets_s: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        self._lock = threading.Lock()
        self._bounds = tuple(latency_buckets_s)
        self._latency: dict[tuple[str, str], Histogram] = {}
        self._requests: dict[tuple[str, str, str], int] = {}
        self._predictions: dict[str, int] = {}
        self._started = time.time()

    def observe(self, model: str, protocol: str, code: str | int, seconds: float, predictions: int = 0) -> None:
        """Count one finished request: its status code (HTTP code or gRPC code name) and latency."""
        key = (model, protocol)
        with self._lock:
            hist = self._latency.get(key)
            if hist is None:
                hist = self._latency[key] = Histogram(self._bounds)
            hist.observe(seconds)
            rkey = (model, protocol, str(code))
            self._requests[rkey] = self._requests.get(rkey, 0) + 1
            if predictions:
                self._predictions[model] = self._predictions.get(model, 0) + predictions

    def requests(self, model: str | None = None) -> dict[tuple[str, str, str], int]:
        """Request counts by (model, protocol, code), for tests and the load generator."""
        with self._lock:
            return {k: v for k, v in self._requests.items() if model is None or k[0] == model}

    def latency(self, model: str, protocol: str) -> Histogram | None:
        with self._lock:
            return self._latency.get((model, protocol))

    def render(self, models: Iterable[ModelGauges] = (), *, ready: bool | None = None) -> str:
        """The whole exposition: request metrics, each model's registry and batcher state, process CPU."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        with self._lock:
            requests = sorted(self._requests.items())
            latency = sorted((k, h.cumulative(), h.sum, h.count) for k, h in self._latency.items())
            predictions = sorted(self._predictions.items())

        family("ctrflow_requests_total", "counter", "Finished prediction requests by model, protocol and status code.")
        for (model, protocol, code), n in requests:
            lines.append(f"ctrflow_requests_total{format_labels({'model': model, 'protocol': protocol, 'code': code})} {n}")
        family("ctrflow_request_duration_seconds", "histogram", "Prediction request latency from body received to response ready.")
        for (model, protocol), buckets, total, count in latency:
            base = {"model": model, "protocol": protocol}
            for le, n in buckets:
                lines.append(f"ctrflow_request_duration_seconds_bucket{format_labels({**base, 'le': le})} {n}")
            lines.append(f"ctrflow_request_duration_seconds_sum{format_labels(base)} {_number(total)}")
            lines.append(f"ctrflow_request_duration_seconds_count{format_labels(base)} {count}")
        family("ctrflow_predictions_total", "counter", "Candidates scored in successful requests.")
        for model, n in predictions:
            lines.append(f"ctrflow_predictions_total{format_labels({'model': model})} {n}")

        models = sorted(models, key=lambda g: g.name)
        family("ctrflow_model_version_available", "gauge", "1 for every model version loaded and serving.")
        for g in models:
            for v in g.versions_available:
                lines.append(f"ctrflow_model_version_available{format_labels({'model': g.name, 'version': str(v)})} 1")
        family("ctrflow_model_latest_version", "gauge", "The version served when a request names none (0: none loaded).")
        for g in models:
            latest = g.versions_available[-1] if g.versions_available else 0
            lines.append(f"ctrflow_model_latest_version{format_labels({'model': g.name})} {latest}")
        family("ctrflow_model_load_failures_total", "counter", "Version folders skipped: corrupt, incomplete or schema mismatch.")
        for g in models:
            lines.append(f"ctrflow_model_load_failures_total{format_labels({'model': g.name})} {g.load_failures}")
        family("ctrflow_model_swaps_total", "counter", "Times a newer version replaced the served one.")
        for g in models:
            lines.append(f"ctrflow_model_swaps_total{format_labels({'model': g.name})} {g.swaps}")

        batcher_families = (
            ("requests", "ctrflow_batcher_requests_total", "counter", "Requests accepted by the autobatcher."),
            ("predictions", "ctrflow_batcher_predictions_total", "counter", "Rows scored by successful compute calls."),
            ("compute_calls", "ctrflow_batcher_compute_calls_total", "counter", "Model compute calls (batches)."),
            ("timeouts", "ctrflow_batcher_timeouts_total", "counter", "Requests failed with DeadlineExceeded."),
            ("rejects", "ctrflow_batcher_rejects_total", "counter", "Requests refused at once: queue full or closed."),
            ("errors", "ctrflow_batcher_errors_total", "counter", "Requests failed by a compute error."),
            ("rows_dropped", "ctrflow_batcher_rows_dropped_total", "counter", "Accepted rows never scored."),
            ("queue_wait_seconds_sum", "ctrflow_batcher_queue_wait_seconds_sum", "counter", "Queue wait summed over request pieces."),
            ("queue_wait_count", "ctrflow_batcher_queue_wait_count", "counter", "Request pieces whose queue wait was measured."),
            ("rows_enqueued", "ctrflow_batcher_queue_depth_rows", "gauge", "Rows waiting for a batch thread now."),
        )
        batched = [g for g in models if g.batcher]
        for key, name, kind, help_text in batcher_families:
            family(name, kind, help_text)
            for g in batched:
                lines.append(f"{name}{format_labels({'model': g.name})} {_number(g.batcher.get(key, 0))}")
        family("ctrflow_batch_size_rows", "histogram", "Rows per model compute call.")
        for g in batched:
            total = 0
            for bound, n in zip(g.batch_size_bounds, g.batch_size_counts):
                total += n
                lines.append(f"ctrflow_batch_size_rows_bucket{format_labels({'model': g.name, 'le': str(bound)})} {total}")
            lines.append(f"ctrflow_batch_size_rows_bucket{format_labels({'model': g.name, 'le': '+Inf'})} {total}")
            lines.append(f"ctrflow_batch_size_rows_sum{format_labels({'model': g.name})} {_number(g.batcher.get('predictions', 0))}")
            lines.append(f"ctrflow_batch_size_rows_count{format_labels({'model': g.name})} {total}")

        if ready is not None:
            family("ctrflow_ready", "gauge", "1 when every configured model serves at least one version.")
            lines.append(f"ctrflow_ready {int(ready)}")
        cpu = os.times()
        family("process_cpu_seconds_total", "counter", "User and system CPU time of the serving process.")
        lines.append(f"process_cpu_seconds_total {_number(cpu.user + cpu.system)}")
        family("process_start_time_seconds", "gauge", "When the metrics registry was created, in Unix seconds.")
        lines.append(f"process_start_time_seconds {_number(self._started)}")
        return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """Samples of an exposition as {'name{labels}': value}; for tests and the load generator.

    Understands what `render` writes (no timestamps, no escaped quotes inside label values needed
    by the callers); comment lines are skipped, unparsable lines raise ValueError.
    """
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if not key:
            raise ValueError(f"not a sample line: {line!r}")
        out[key] = float(value)
    return out
