"""Worker processes on one port (ctrflow.serving.workers): one server to its clients and its scraper.

One supervisor with two real worker processes is shared by the tests of this module, in order: whole-server
metrics, a hot reload every worker serves with no failed request, a killed worker restarted, and last a
graceful stop that finishes in-flight requests. A separate test kills the `ctrflow serve` command itself
(kill -9) and expects its workers to end with it.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import serving_fixtures as sf
from serving_fixtures import Client

from ctrflow.serving.batcher import BatchingOptions
from ctrflow.serving.metrics import parse_metrics
from ctrflow.serving.server import ServeOptions
from ctrflow.serving.workers import Supervisor

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="workers need Linux")]

BATCH_WAIT_MS = 300.0  # every request waits this long for its batch: requests stay in flight long enough to stop


@pytest.fixture(scope="module")
def model():
    return sf.small_model()


@pytest.fixture(scope="module")
def group(model, tmp_path_factory):
    _, version_dir, rows = model
    base = tmp_path_factory.mktemp("workers") / "ctr"
    sf.copy_version(version_dir, base, 1)
    options = ServeOptions(model_base_path=str(base), port=0, grpc_port=0 if sf.grpc_ok() else None,
                           poll_interval_s=0.2, drain_grace_s=10,
                           batching=BatchingOptions(max_batch_size=100_000, batch_timeout_ms=BATCH_WAIT_MS))
    sup = Supervisor(options, 2).start()
    yield sup, base, version_dir, rows
    sup.stop()


def _metrics(url: str) -> dict[str, float]:
    c = Client(url)
    status, _, body = c.request("GET", "/metrics")
    c.close()
    assert status == 200
    return parse_metrics(body.decode())


def _predict_new_connection(url: str, rows: list[dict]) -> tuple[int, str]:
    c = Client(url)  # a new connection each time: the kernel spreads connections over the workers
    status, headers, body = c.post("/v1/models/ctr:predict", {"instances": rows})
    c.close()
    return status, headers.get("x-model-version", body.decode()[:200])


def _in_parallel(url: str, rows: list[dict], n: int) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    lock = threading.Lock()

    def one(k: int) -> None:
        r = _predict_new_connection(url, rows[k % 50 : k % 50 + 5])
        with lock:
            out.append(r)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def _scrape_file(sup: Supervisor, pid: int) -> dict[str, float]:
    with open(os.path.join(str(sup.metrics_dir), f"scrape_{pid}.prom")) as f:
        return parse_metrics(f.read())


def test_every_worker_serves_the_port_and_metrics_count_the_whole_server(group):
    sup, _, _, rows = group
    assert sup.ready() and len(sup.pids()) == 2
    before = _metrics(sup.url).get('ctrflow_requests_total{code="200",model="ctr",protocol="rest"}', 0.0)
    results = _in_parallel(sup.url, rows, 40)
    assert [s for s, _ in results] == [200] * 40
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # scrape-time families of the other worker are published every 0.25 s
        m = _metrics(sup.url)
        if m.get('ctrflow_batcher_requests_total{model="ctr"}', 0) >= before + 40:
            break
        time.sleep(0.1)
    # Request counters are exact over both workers whichever one answers the scrape.
    assert m['ctrflow_requests_total{code="200",model="ctr",protocol="rest"}'] == before + 40
    assert m['ctrflow_batcher_requests_total{model="ctr"}'] == before + 40
    assert m["ctrflow_workers"] == 2 and m["ctrflow_ready"] == 1
    assert m['ctrflow_model_latest_version{model="ctr"}'] == 1
    # Both workers took some of the 40 connections (all on one: probability 2**-39).
    per_worker = [_scrape_file(sup, pid).get('ctrflow_batcher_requests_total{model="ctr"}', 0) for pid in sup.pids()]
    assert all(n > 0 for n in per_worker), per_worker
    # CPU is the whole server's: at least the sum of what each worker alone reports.
    cpu = [_scrape_file(sup, pid)["process_cpu_seconds_total"] for pid in sup.pids()]
    assert m["process_cpu_seconds_total"] >= sum(cpu) - 0.05


def test_a_port_the_workers_serve_is_not_shared_with_a_second_server(group):
    import dataclasses

    from ctrflow.errors import ConfigError

    sup = group[0]
    with pytest.raises(ConfigError, match=f"Cannot listen on 127.0.0.1:{sup.port}"):
        Supervisor(dataclasses.replace(sup.options, port=sup.port, grpc_port=None), 2).start()


def test_the_grpc_port_is_served_by_the_workers_too(group):
    sup = group[0]
    if sup.grpc_port is None:
        pytest.skip("the gRPC server is unavailable (tensorflow-serving-api not installed)")
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    for _ in range(6):  # a channel each: new connections, spread over the workers by the kernel
        with grpc.insecure_channel(f"127.0.0.1:{sup.grpc_port}") as ch:
            request = get_model_status_pb2.GetModelStatusRequest()
            request.model_spec.name = "ctr"
            response = model_service_pb2_grpc.ModelServiceStub(ch).GetModelStatus(request, timeout=30)
            assert [s.version for s in response.model_version_status] == [1]
    # A config pushed over gRPC would reach one worker only: refused, with the way that reaches all.
    from tensorflow_serving.apis import model_management_pb2

    with grpc.insecure_channel(f"127.0.0.1:{sup.grpc_port}") as ch, pytest.raises(grpc.RpcError) as e:
        model_service_pb2_grpc.ModelServiceStub(ch).HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(),
                                                                            timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "every worker" in e.value.details()


def test_a_new_version_is_served_by_every_worker_and_no_request_fails(group):
    sup, base, version_dir, rows = group
    stop = threading.Event()
    outcomes: list[tuple[int, str]] = []

    def load() -> None:
        for _ in range(10_000):  # bounded; stopped long before
            if stop.is_set():
                break
            outcomes.extend(_in_parallel(sup.url, rows, 4))

    t = threading.Thread(target=load)
    t.start()
    try:
        time.sleep(0.5)
        sf.copy_version(version_dir, base, 2)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the least version over the workers: every one serves 2
            if _metrics(sup.url).get('ctrflow_model_latest_version{model="ctr"}') == 2:
                break
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        t.join(60)
    assert outcomes and all(s == 200 for s, _ in outcomes), [o for o in outcomes if o[0] != 200][:5]
    assert outcomes[0][1] == "1"
    after = _in_parallel(sup.url, rows, 20)
    assert after == [(200, "2")] * 20  # whichever worker answers
    m = _metrics(sup.url)
    assert m['ctrflow_model_version_available{model="ctr",version="2"}'] == 1
    assert 'ctrflow_model_version_available{model="ctr",version="1"}' not in m


def test_a_killed_worker_is_logged_and_restarted_and_counters_keep_its_requests(group, caplog):
    sup, _, _, rows = group
    caplog.set_level(logging.INFO, logger="ctrflow.serving")
    total = _metrics(sup.url)['ctrflow_requests_total{code="200",model="ctr",protocol="rest"}']
    victim = sup.pids()[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (sup.ready() and victim not in sup.pids()):
        time.sleep(0.2)
    assert sup.ready() and victim not in sup.pids() and len(sup.pids()) == 2
    assert any(f"(pid {victim}) exited with signal SIGKILL" in r.getMessage() for r in caplog.records)
    assert all(s == 200 for s, _ in _in_parallel(sup.url, rows, 10))
    m = _metrics(sup.url)
    assert m["ctrflow_worker_restarts_total"] == 1 and m["ctrflow_workers"] == 2
    assert m['ctrflow_requests_total{code="200",model="ctr",protocol="rest"}'] >= total + 10  # the dead one's kept


def test_stop_drains_the_requests_in_flight_on_every_worker(group):
    sup, _, _, rows = group
    pids = sup.pids()
    results: list[tuple[int, str]] = []
    threads = [threading.Thread(target=lambda k=k: results.append(_predict_new_connection(sup.url, rows[k : k + 3])))
               for k in range(12)]
    for t in threads:
        t.start()
    time.sleep(BATCH_WAIT_MS / 1e3 / 3)  # sent, waiting for their batch
    sup.stop(grace_s=10)
    for t in threads:
        t.join(30)
    assert len(results) == 12 and all(s == 200 for s, _ in results), results
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_workers_end_with_the_serve_command_even_on_kill_9(model, tmp_path):
    import psutil

    _, version_dir, _ = model
    base = tmp_path / "ctr"
    sf.copy_version(version_dir, base, 1)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "ctrflow", "serve", "--model-base-path", str(base), "--port", "0",
                             "--workers", "2", "--json", "--quiet"], stdout=subprocess.DEVNULL, env=env)
    try:
        supervisor = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        while len(supervisor.children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = supervisor.children()
        assert len(workers) == 2
        time.sleep(2.0)  # they are loading TensorFlow and the model (killing them then is the cheap test)
        proc.kill()  # no chance to stop them: the kernel (PR_SET_PDEATHSIG) or their watchdog must
        proc.wait(10)
        gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, alive
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_negative_worker_count_is_refused_by_both_commands(tmp_path, capsys):
    from ctrflow.cli import main as ctrflow_main
    from ctrflow.serving.model_server import main as model_server_main

    assert model_server_main(["--model_base_path", str(tmp_path), "--workers", "-1"]) == 2
    assert "--workers must be >= 0" in capsys.readouterr().err
    assert ctrflow_main(["serve", "--model-base-path", str(tmp_path), "--workers", "-2"]) == 2
    assert "--workers must be >= 0" in capsys.readouterr().err
