"""The open-loop load generator: Poisson scheduling math, and short real runs against a server and a predictor."""
from __future__ import annotations

import json

import numpy as np
import pytest

import serving_fixtures as sf
from ctrflow.bench.loadgen import LoadOptions, arrival_times, latency_summary, run_load
from ctrflow.errors import ConfigError
from ctrflow.serving.batcher import BatchingOptions


def test_arrivals_are_poisson_at_the_asked_rate():
    t = arrival_times(rate_rps=2000, duration_s=5, seed=1)
    assert np.all(np.diff(t) >= 0) and t[0] >= 0 and t[-1] < 5
    assert abs(len(t) - 10_000) < 4 * 100  # Poisson count: sd = sqrt(10,000)
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / 2000, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential gaps: coefficient of variation 1
    counts = np.histogram(t, bins=50, range=(0, 5))[0]  # arrivals per 100 ms: mean = variance = 200
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.5)
    assert np.array_equal(t, arrival_times(2000, 5, seed=1)) and not np.array_equal(t, arrival_times(2000, 5, seed=2))
    assert len(arrival_times(1e6, 1.0, limit=1000)) == 1000


def test_latency_summary_quantiles():
    s = latency_summary(np.arange(1, 1001, dtype=float))
    assert s["p50"] == pytest.approx(500.5) and s["p99"] == pytest.approx(990.01) and s["max"] == 1000
    assert s["p99.9"] == pytest.approx(999.001) and latency_summary([])["p99"] == 0.0


def test_options_refuse_non_loopback_targets_and_bad_values():
    with pytest.raises(ConfigError, match="only drives loopback"):
        LoadOptions(url="http://192.0.2.1:8501", model_name="m")
    with pytest.raises(ConfigError, match="exactly one of"):
        LoadOptions()
    with pytest.raises(ConfigError, match="'rate_rps' parameter of LoadOptions must be a number > 0. Got 0"):
        LoadOptions(model_base_path="x", rate_rps=0)
    with pytest.raises(ConfigError, match="compare_batching"):
        LoadOptions(url="http://127.0.0.1:1", model_name="m", compare_batching=True)
    with pytest.raises(ConfigError, match="over the limit"):
        LoadOptions(model_base_path="x", rate_rps=1e6, duration_s=3600)


def test_run_against_a_live_server_counts_every_request_and_reads_its_metrics(tmp_path):
    server = sf.server()
    data = tmp_path / "rows.csv"
    data.write_text(_csv(sf.small_model()[2]))
    for protocol in ("rest", "columnar"):
        report = run_load(LoadOptions(url=server.url, model_name="ctr", rate_rps=100, candidates=20, duration_s=1.0,
                                      protocol=protocol, data=str(data), timeout_ms=2000, seed=3))
        (r,) = report.results
        assert r.scheduled > 50 and r.sent == r.scheduled == r.ok, r.status_counts
        assert r.predictions == 20 * r.ok and r.timeouts == r.errors == r.rejected == r.dropped == 0
        assert 0 < r.latency_ms["p50"] <= r.latency_ms["p99"] <= r.latency_ms["max"]
        assert 0 < r.compute_calls_per_prediction <= 1 / 20 and r.cpu_s_per_million_predictions > 0
        assert not r.cpu_includes_load_generator
    json.dumps(report.to_dict())
    assert "p99.9 ms" in report.format_table()


def test_in_process_run_compares_batching_on_and_off(tmp_path):
    _, version_dir, rows = sf.small_model()
    base = tmp_path / "ctr"
    sf.copy_version(version_dir, base, 1)
    data = tmp_path / "rows.csv"
    data.write_text(_csv(rows))
    report = run_load(LoadOptions(model_base_path=str(base), target="inprocess", compare_batching=True, rate_rps=150,
                                  candidates=10, duration_s=1.0, timeout_ms=5000, data=str(data),
                                  batching=BatchingOptions(max_batch_size=1024, batch_timeout_ms=5.0)))
    on, off = report.results
    assert (on.label, off.label) == ("batching on", "batching off")
    assert on.ok == on.sent > 0 and off.ok == off.sent > 0
    assert off.compute_calls_per_prediction == pytest.approx(1 / 10)
    assert on.compute_calls_per_prediction < off.compute_calls_per_prediction  # requests were joined
    # the predictor's CPU, the generator's own share of the loop's thread left out (and reported)
    assert not on.cpu_includes_load_generator and on.load_generator_cpu_s > 0 and on.cpu_s_per_million_predictions > 0


@pytest.mark.slow
def test_http_run_starts_its_own_servers_and_measures_their_cpu(tmp_path):
    _, version_dir, _ = sf.small_model()
    base = tmp_path / "ctr"
    sf.copy_version(version_dir, base, 1)
    report = run_load(LoadOptions(model_base_path=str(base), compare_batching=True, rate_rps=100, candidates=20,
                                  duration_s=1.0, timeout_ms=5000, protocol="columnar"))  # rows from ctrflow generate
    for r in report.results:
        assert r.ok == r.sent > 0 and r.server_cpu_s > 0 and not r.cpu_includes_load_generator
    assert report.results[0].compute_calls_per_prediction < report.results[1].compute_calls_per_prediction


def _csv(rows: list[dict]) -> str:
    names = list(rows[0])
    lines = [",".join(names)]
    for r in rows:
        lines.append(",".join("" if r[n] is None else str(r[n]) for n in names))
    return "\n".join(lines) + "\n"
