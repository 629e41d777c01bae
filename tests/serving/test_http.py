"""The REST server for real: a trained, exported model behind a live loopback server."""
from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest

import serving_fixtures as sf
from ctrflow.errors import ConfigError
from ctrflow.serving.batcher import AutoBatcher, BatchingOptions
from ctrflow.client.columnar import COLUMNAR_CONTENT_TYPE, encode_columnar
from ctrflow.serving.server import ServeOptions, Server, serve
from ctrflow.serving.metrics import parse_metrics
from ctrflow.serving.models import ManagerOptions, ModelManager, ModelSpec
from serving_fixtures import CATS, NUMS, Client, columns


@pytest.fixture(scope="module")
def live():
    return sf.server()


@pytest.fixture(scope="module")
def rows():
    return sf.small_model()[2]


@pytest.fixture
def client(live):
    c = Client(live.url)
    yield c
    c.close()


def expected_scores(live, rows):
    with live.manager.lease("ctr") as predictor:
        return predictor.predict(columns(rows))


def test_row_columnar_and_binary_bodies_score_like_the_in_process_predictor(live, rows, client):
    batch = rows[:50]
    want = expected_scores(live, batch)
    status, headers, body = client.post("/v1/models/ctr:predict", {"instances": batch})
    assert status == 200 and headers["x-model-version"] == "2"
    # serving_default has two outputs, so TF Serving answers per-output objects (rows) / an object of columns
    np.testing.assert_allclose([p["probabilities"] for p in json.loads(body)["predictions"]], want, rtol=1e-6)

    status, _, body = client.post("/v1/models/ctr:predict", {"signature_name": "serving_default", "inputs": columns(batch)})
    assert status == 200
    np.testing.assert_allclose(json.loads(body)["outputs"]["probabilities"], want, rtol=1e-6)

    binary = encode_columnar(columns(batch), CATS, NUMS)
    status, headers, body = client.post("/v1/models/ctr:predict_columnar", binary, {"Content-Type": COLUMNAR_CONTENT_TYPE})
    assert status == 200 and headers["content-type"] == "application/octet-stream"
    np.testing.assert_allclose(np.frombuffer(body, "<f4"), want, rtol=1e-6)

    doc = {"columns": list(columns(batch)), "data": list(columns(batch).values())}
    status, _, body = client.post("/v1/models/ctr:predict_columnar", doc, {"Content-Type": "application/json"})
    assert status == 200
    np.testing.assert_allclose(json.loads(body)["outputs"], want, rtol=1e-6)


def test_version_status_pinned_versions_and_metadata(live, rows, client):
    status, _, body = client.get("/v1/models/ctr")
    assert status == 200
    assert json.loads(body) == {"model_version_status": [
        {"version": v, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}} for v in ("2", "1")]}
    status, _, body = client.get("/v1/models/ctr/versions/1")
    assert status == 200 and [s["version"] for s in json.loads(body)["model_version_status"]] == ["1"]
    status, headers, _ = client.post("/v1/models/ctr/versions/1:predict", {"instances": rows[:3]})
    assert status == 200 and headers["x-model-version"] == "1"
    status, _, body = client.get("/v1/models/ctr/metadata")
    inputs = json.loads(body)["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
    assert status == 200 and inputs["C1"]["dtype"] == "DT_STRING" and inputs["I1"]["dtype"] == "DT_DOUBLE"


def test_predict_ids_signature_takes_pre_hashed_rows(live, client):
    ids = [[1] * 39, [2] * 39]
    status, _, body = client.post("/v1/models/ctr:predict", {"signature_name": "predict_ids",
                                                             "inputs": {"ids": ids, "numeric": [[0.5] * 13] * 2}})
    assert status == 200 and len(json.loads(body)["outputs"]["probabilities"]) == 2


@pytest.mark.parametrize("path, body, code, message", [
    ("/v1/models/nope:predict", {"instances": [{}]}, 404, "not served here"),
    ("/v1/models/ctr/versions/9:predict", None, 404, "no version 9"),
    ("/v1/models/ctr/labels/stable:predict", None, 404, "Unrecognized servable version label: stable"),
    ("/v1/models/ctr:classify", None, 404, "Unknown method"),
    ("/v2/whatever", None, 404, "No such endpoint"),
    ("/v1/models/ctr:predict", b"{not json", 400, "Malformed JSON"),
    ("/v1/models/ctr:predict", b"", 400, "Empty request body"),
    ("/v1/models/ctr:predict", [1, 2], 400, "must be a JSON object"),
    ("/v1/models/ctr:predict", {"instances": []}, 400, "'instances' is empty"),
    ("/v1/models/ctr:predict", {"inputs": {}, "instances": []}, 400, "exactly one of"),
    ("/v1/models/ctr:predict", {"instances": [{"C1": "a"}]}, 400, "missing features"),
    ("/v1/models/ctr:predict", "extra", 400, "unknown features ['colour']"),
    ("/v1/models/ctr:predict", "wrongtype", 400, "Feature 'I3' row 1: expected a number"),
    ("/v1/models/ctr:predict", "listvalue", 400, "Feature 'C2' row 0: expected a string"),
    ("/v1/models/ctr:predict", "ragged", 400, "every column needs one value per candidate"),
    ("/v1/models/ctr:predict", {"instances": [{}], "signature_name": "foo"}, 400, "Unknown signature_name"),
    ("/v1/models/ctr:predict", {"instances": [{}], "extra_key": 1}, 400, "Unknown top-level keys"),
])
def test_bad_requests_get_a_clear_error_and_the_right_code(live, rows, client, path, body, code, message):
    good = rows[:2]
    if body is None:
        body = {"instances": good}
    elif body == "extra":
        body = {"instances": [{**good[0], "colour": "red"}]}
    elif body == "wrongtype":
        body = {"instances": [good[0], {**good[1], "I3": "abc"}]}
    elif body == "listvalue":
        body = {"instances": [{**good[0], "C2": ["x"]}]}
    elif body == "ragged":
        cols = columns(good)
        cols["C3"] = cols["C3"][:1]
        body = {"inputs": cols}
    elif isinstance(body, list):
        body = json.dumps(body).encode()
    status, headers, data = client.post(path, body)
    assert status == code, data
    assert message in json.loads(data)["error"]
    assert headers["content-type"] == "application/json"
    # The server keeps serving everyone (and this connection, unless it had to close it).
    status, _, _ = Client(live.url).post("/v1/models/ctr:predict", {"instances": good})
    assert status == 200


def test_oversized_body_is_refused_with_413_before_it_is_read(live):
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as s:
        s.sendall(b"POST /v1/models/ctr:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413 ") and b"max_body_bytes" in reply and b"connection: close" in reply.lower()


def test_too_many_rows_get_413_and_odd_methods_and_headers_get_their_codes(live, rows, client):
    status, _, body = client.get("/v1/models/ctr:predict")
    assert status == 405
    status, _, _ = client.post("/v1/models/ctr", {"instances": rows[:1]})
    assert status == 405
    status, _, body = client.post("/v1/models/ctr:predict", {"instances": rows[:1]}, {"X-Deadline-Ms": "soon"})
    assert status == 400 and "X-Deadline-Ms" in json.loads(body)["error"]
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as s:
        s.sendall(b"POST /v1/models/ctr:predict HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 411 ")
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as s:
        s.sendall(b"GARBAGE\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 400 ")
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 431 ")


def test_keep_alive_pipelining_chunked_bodies_and_expect_continue(live, rows):
    body = json.dumps({"instances": rows[:2]}).encode()
    one = b"POST /v1/models/ctr:predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    chunked = (b"POST /v1/models/ctr:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"%x\r\n%s\r\n" % (10, body[:10]) + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body) - 10, body[10:]))
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as s:
        s.sendall(one + one + chunked)  # three requests in one write
        data = b""
        deadline = time.monotonic() + 10
        while data.count(b'{"predictions"') < 3 and time.monotonic() < deadline:
            data += s.recv(65536)
        assert data.count(b"HTTP/1.1 200 OK") == 3 and b"connection: close" not in data.lower()
        s.sendall(b"POST /v1/models/ctr:predict HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
        assert s.recv(65536).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(body)
        assert s.recv(65536).startswith(b"HTTP/1.1 200 OK")


def test_metrics_health_and_readiness(live, rows, client):
    client.post("/v1/models/ctr:predict", {"instances": rows[:7]})
    status, headers, body = client.get("/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert client.get("/monitoring/prometheus/metrics")[0] == 200  # TF Serving's path
    samples = parse_metrics(body.decode())
    assert samples['ctrflow_requests_total{code="200",model="ctr",protocol="rest"}'] >= 1
    assert samples['ctrflow_request_duration_seconds_count{model="ctr",protocol="rest"}'] >= 1
    assert samples['ctrflow_request_duration_seconds_bucket{le="+Inf",model="ctr",protocol="rest"}'] >= 1
    assert samples['ctrflow_predictions_total{model="ctr"}'] >= 7
    assert samples['ctrflow_batcher_compute_calls_total{model="ctr"}'] >= 1
    assert 'ctrflow_batcher_queue_depth_rows{model="ctr"}' in samples
    assert 'ctrflow_batcher_timeouts_total{model="ctr"}' in samples
    assert samples['ctrflow_batch_size_rows_count{model="ctr"}'] >= 1
    assert samples['ctrflow_model_latest_version{model="ctr"}'] == 2
    assert samples["process_cpu_seconds_total"] > 0 and samples["ctrflow_ready"] == 1
    import psutil  # the process's own start, not when a registry was made

    assert abs(samples["process_start_time_seconds"] - psutil.Process().create_time()) < 2
    assert samples["ctrflow_http_connections"] >= 1 and "ctrflow_http_buffered_body_bytes" in samples
    assert client.get("/healthz")[0] == 200
    status, _, body = client.get("/readyz")
    assert status == 200 and json.loads(body)["ready"] is True


def test_queue_full_is_503_and_a_passed_deadline_is_504(tmp_path):
    slow = sf.SlowPredictor()
    server = sf.slow_server(tmp_path, slow)
    try:
        body = {"instances": [{"C1": "a", "I1": 1.0}, {"C1": "b", "I1": 2.0}]}
        results = {}

        def first():
            results["first"] = Client(server.url).post("/v1/models/m:predict", body)[0]

        t = threading.Thread(target=first)
        t.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # until the first request is inside compute, held by the gate
            stats = slow.batcher.stats()
            if stats.requests == 1 and stats.rows_enqueued == 0:
                break
            time.sleep(0.01)
        c = Client(server.url)
        assert c.post("/v1/models/m:predict", body, {"X-Deadline-Ms": "50"})[0] == 504  # queued, then expired
        status, headers, data = c.post("/v1/models/m:predict", body)  # its rows still hold the queue's room
        assert status == 503 and "full" in json.loads(data)["error"] and headers["retry-after"] == "1"
        slow.gate.set()
        t.join(10)
        assert results["first"] == 200
    finally:
        server.stop()


def test_options_are_checked_with_the_fix_in_the_message(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of"):
        ServeOptions()
    with pytest.raises(ConfigError, match="exactly one of"):
        ServeOptions(model_base_path="a", model_config_file="b.yaml")
    with pytest.raises(ConfigError, match="'port' parameter of ServeOptions must be an int in \\[0, 65535\\]. Got 70000"):
        ServeOptions(model_base_path="a", port=70000)
    with pytest.raises(ConfigError, match="max_body_bytes"):
        ServeOptions(model_base_path="a", max_body_bytes=10)
    with pytest.raises(ConfigError, match="default_timeout_ms"):
        ServeOptions(model_base_path="a", default_timeout_ms=0)


def test_several_models_from_a_config_file_and_readiness_waits_for_all(tmp_path, live):
    version_dir = sf.small_model()[1]
    sf.copy_version(version_dir, tmp_path / "a", 1)
    (tmp_path / "b").mkdir()
    config = tmp_path / "models.yaml"
    config.write_text("models:\n"
                      "  - {name: a, base_path: a, batching: {max_batch_size: 256, batch_timeout_ms: 0.5}}\n"
                      "  - {name: b, base_path: b, batching: false}\n")
    server = serve(ServeOptions(model_config_file=str(config), port=0, poll_interval_s=0.2))
    try:
        c = Client(server.url)
        rows = sf.small_model()[2][:3]
        assert c.post("/v1/models/a:predict", {"instances": rows})[0] == 200
        status, _, body = c.post("/v1/models/b:predict", {"instances": rows})
        assert status == 503 and "no version loaded yet" in json.loads(body)["error"]
        status, _, body = c.get("/readyz")
        assert status == 503 and json.loads(body)["models_not_ready"] == ["b"]
        sf.copy_version(version_dir, tmp_path / "b", 4)
        deadline = time.monotonic() + 30
        while c.get("/readyz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        status, headers, _ = c.post("/v1/models/b:predict", {"instances": rows})
        assert status == 200 and headers["x-model-version"] == "4"  # unbatched model b serves too
    finally:
        server.stop()
