"""The one-tensor fast path end to end: client hashing → binary ids body → REST / gRPC / in-process, batched."""
from __future__ import annotations

import json
import struct
import threading

import numpy as np
import pytest

import serving_fixtures as sf
from ctrflow.client.hashing import FeatureHasher
from ctrflow.client.ids import IDS_CONTENT_TYPE, IdsClient, encode_ids
from ctrflow.serving.codec import RequestError, decode_ids
from ctrflow.serving.tfserving import InvalidArgument
from serving_fixtures import Client, columns


@pytest.fixture(scope="module")
def live():
    return sf.server()


@pytest.fixture(scope="module")
def data(live):
    rows = sf.small_model()[2][:60]
    cols = columns(rows)
    with live.manager.lease("ctr") as predictor:
        hasher = FeatureHasher.from_manifest(predictor.path)
        ids, numeric = hasher.transform(cols)
        graph_ids, graph_num = predictor.transform(cols)
        want = predictor.predict(cols)
        limits = predictor._id_limits.copy()
    return cols, hasher, ids, numeric, graph_ids, graph_num, want, limits


def test_client_ids_equal_the_graphs_and_score_alike_over_http(live, data):
    cols, hasher, ids, numeric, graph_ids, graph_num, want, _ = data
    np.testing.assert_array_equal(ids, graph_ids)
    np.testing.assert_array_equal(numeric, graph_num)
    with IdsClient(live.url, "ctr", hasher) as client:
        np.testing.assert_allclose(client.predict(cols), want, rtol=1e-6)
        np.testing.assert_allclose(client.predict_ids(ids[:7], numeric[:7]), want[:7], rtol=1e-6)


def test_decode_ids_is_a_view_of_the_body_and_checks_the_header():
    ids = np.arange(12, dtype=np.int32).reshape(3, 4)
    num = np.linspace(0, 1, 6, dtype=np.float32).reshape(3, 2)
    body = encode_ids(ids, num)
    got_ids, got_num, rows = decode_ids(body, 4, 2)
    assert rows == 3 and not got_ids.flags.owndata and got_ids.base is not None
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_num, num)
    for bad, message in [(body[:-1], "must be 88 bytes"), (b"CTRX" + body[4:], "Not an ids body"),
                         (body[:4] + b"\x02" + body[5:], "version 2"), (body[:10], "shorter than")]:
        with pytest.raises(RequestError, match=message):
            decode_ids(bad, 4, 2)
    with pytest.raises(RequestError, match="this model takes 5 and 2"):
        decode_ids(body, 5, 2)


def test_bad_ids_answer_400_naming_row_and_field_and_spare_their_batch_mates(live, data):
    _, _, ids, numeric, _, _, want, limits = data
    client = Client(live.url)
    headers = {"Content-Type": IDS_CONTENT_TYPE}
    bad = ids.copy()
    bad[4, 2] = limits[2]  # one past the table of C3
    status, _, body = client.post("/v1/models/ctr:predict_ids", encode_ids(bad, numeric), headers)
    assert status == 400 and "row 4" in json.loads(body)["error"] and "'C3'" in json.loads(body)["error"]
    negative = struct.pack("<4sBBHIHH", b"CTRI", 1, 0, 0, 1, ids.shape[1], numeric.shape[1]) + \
        np.full(ids.shape[1], -1, "<i4").tobytes() + numeric[:1].tobytes()
    status, _, body = client.post("/v1/models/ctr:predict_ids", negative, headers)
    assert status == 400 and "id -1" in json.loads(body)["error"]
    status, _, body = client.post("/v1/models/ctr:predict_ids", encode_ids(ids[:, :-1], numeric), headers)
    assert status == 400 and "id columns" in json.loads(body)["error"]
    status, _, _ = client.post("/v1/models/ctr:predict_ids", encode_ids(ids, numeric), {"Content-Type": "application/json"})
    assert status == 415
    # JSON predict_ids takes the same check (400, not 500) and the same batcher
    status, _, body = client.post("/v1/models/ctr:predict", {"signature_name": "predict_ids",
                                                              "inputs": {"ids": bad[:5].tolist(), "numeric": numeric[:5].tolist()}})
    assert status == 400 and "'C3'" in json.loads(body)["error"]
    # a poisoned request sent alongside good ones fails alone
    results: dict[int, int] = {}

    def send(i: int) -> None:
        c = Client(live.url)
        status, _, payload = c.post("/v1/models/ctr:predict_ids", encode_ids(bad if i == 0 else ids, numeric), headers)
        results[i] = status
        if status == 200:
            np.testing.assert_allclose(np.frombuffer(payload, "<f4"), want, rtol=1e-6)
        c.close()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {0: 400, **{i: 200 for i in range(1, 6)}}
    client.close()


def test_in_process_predict_ids_goes_through_its_batcher(live, data):
    _, _, ids, numeric, _, _, want, _ = data
    with live.manager.lease("ctr") as predictor:
        assert predictor.ids_batcher is not None
        before = predictor.ids_batcher.stats()
        out: list[np.ndarray] = []
        threads = [threading.Thread(target=lambda: out.append(predictor.predict_ids(ids, numeric, timeout_ms=10_000)))
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        after = predictor.ids_batcher.stats()
        np.testing.assert_allclose(np.stack(out), np.tile(want, (8, 1)), rtol=1e-6)
        assert after.requests - before.requests == 8 and after.predictions - before.predictions == 8 * len(ids)
        assert predictor.stats()["requests"] >= after.requests  # the model's figures include the ids batcher
        with pytest.raises(InvalidArgument, match="outside"):
            predictor.predict_ids(ids + 10**7, numeric)
        # decoded views reach the batcher as they are: no copy between the request bytes and the batch
        got_ids, got_num, _ = decode_ids(encode_ids(ids, numeric), ids.shape[1], numeric.shape[1])
        inputs = predictor.check_ids(got_ids, got_num)
        assert inputs["ids"] is got_ids and inputs["numeric"] is got_num


def test_check_ids_fast_checks_agree_with_the_element_wise_ones(live, data):
    """The flat unsigned id compare and the finite-sum test must refuse and accept exactly what the
    element-wise checks do: every edge of a table, negative ids, any layout, sums that overflow."""
    _, _, ids, numeric, _, _, _, limits = data
    with live.manager.lease("ctr") as predictor:
        for r, c, value, ok in [(0, 0, limits[0] - 1, True), (5, 7, limits[7], False), (59, 38, -1, False),
                                (1, 3, 0, True), (2, 4, -2**31, False)]:
            bad = ids.copy()
            bad[r, c] = value
            for layout in (bad, np.asfortranarray(bad), bad.astype(np.int64)):
                if ok:
                    predictor.check_ids(layout, numeric)
                else:
                    with pytest.raises(InvalidArgument, match=f"row {r}, column {c}"):
                        predictor.check_ids(layout, numeric)
        huge = np.full_like(numeric, 3e38)  # finite values whose sum overflows: accepted
        with np.errstate(over="ignore"):
            predictor.check_ids(ids, huge)
        for poison in (np.nan, np.inf, -np.inf):
            bad = numeric.copy()
            bad[9, 1] = poison
            with pytest.raises(InvalidArgument, match="'numeric' row 9, column 1"):
                predictor.check_ids(ids, bad)


def test_grpc_predict_ids_reads_tensor_content(live, data):
    grpc = pytest.importorskip("grpc")
    pytest.importorskip("tensorflow_serving.apis.predict_pb2")
    if live.grpc_port is None:
        pytest.skip("the gRPC server is unavailable")
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    _, _, ids, numeric, _, _, want, limits = data
    with grpc.insecure_channel(f"127.0.0.1:{live.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        def request(i: np.ndarray) -> predict_pb2.PredictRequest:
            r = predict_pb2.PredictRequest()
            r.model_spec.name, r.model_spec.signature_name = "ctr", "predict_ids"
            r.inputs["ids"].CopyFrom(tf.make_tensor_proto(i))
            r.inputs["numeric"].CopyFrom(tf.make_tensor_proto(numeric))
            return r

        assert request(ids).inputs["ids"].tensor_content  # what make_tensor_proto sends
        response = stub.Predict(request(ids), timeout=30)
        np.testing.assert_allclose(tf.make_ndarray(response.outputs["probabilities"]), want, rtol=1e-6)
        bad = ids.copy()
        bad[3, 30] = limits[30] + 5
        with pytest.raises(grpc.RpcError) as e:
            stub.Predict(request(bad), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "row 3" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Predict(request(ids.astype(np.int64)), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "DT_INT32" in e.value.details()


@pytest.mark.slow
def test_loadgen_drives_the_ids_and_grpc_protocols(live):
    from ctrflow.bench.loadgen import LoadOptions, run_load
    from ctrflow.errors import ConfigError

    with live.manager.lease("ctr") as predictor:
        manifest = str(predictor.path)
    protocols = ["ids"] + (["grpc"] if live.grpc_port is not None else [])
    for protocol in protocols:
        report = run_load(LoadOptions(url=live.url, model_name="ctr", protocol=protocol, rate_rps=40, duration_s=0.5,
                                      candidates=20, distinct_bodies=4, manifest=manifest, grpc_port=live.grpc_port))
        r = report.results[0]
        assert r.ok > 0 and r.errors == 0 and r.status_counts.get("200") == r.ok, (protocol, r.status_counts)
        assert r.predictions == r.ok * 20
    with pytest.raises(ConfigError, match="manifest"):
        LoadOptions(url=live.url, model_name="ctr", protocol="ids")
