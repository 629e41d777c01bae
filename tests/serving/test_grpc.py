"""gRPC PredictionService/ModelService with the tensorflow-serving-api client protos, against a live server."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

import serving_fixtures as sf
from serving_fixtures import CATS, NUMS, Client, columns

grpc = pytest.importorskip("grpc")
apis = pytest.importorskip("tensorflow_serving.apis.predict_pb2")
from tensorflow_serving.apis import (  # noqa: E402
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)


@pytest.fixture(scope="module")
def live():
    server = sf.server()
    if server.grpc_port is None:
        pytest.skip("the gRPC server is unavailable (tensorflow-serving-api not installed)")
    return server


@pytest.fixture(scope="module")
def channel(live):
    ch = grpc.insecure_channel(f"127.0.0.1:{live.grpc_port}")
    yield ch
    ch.close()


def make_request(rows, *, version=None, drop=None, float_categorical=False):
    import tensorflow as tf

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "ctr"
    if version is not None:
        request.model_spec.version.value = version
    cols = columns(rows)
    for name in CATS:
        if name != drop:
            values = [float(len(v)) for v in cols[name]] if float_categorical and name == "C1" else cols[name]
            request.inputs[name].CopyFrom(tf.make_tensor_proto(values, tf.float32 if isinstance(values[0], float) else tf.string))
    for name in NUMS:
        if name != drop:
            request.inputs[name].CopyFrom(tf.make_tensor_proto([np.nan if v is None else v for v in cols[name]], tf.float32))
    return request


def test_predict_matches_rest_and_names_the_version(live, channel):
    import tensorflow as tf

    rows = sf.small_model()[2][:20]
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    response = stub.Predict(make_request(rows), timeout=30)
    got = tf.make_ndarray(response.outputs["probabilities"])
    status, _, body = Client(live.url).post("/v1/models/ctr:predict", {"instances": rows})
    assert status == 200 and got.shape == (20,)
    np.testing.assert_allclose(got, [p["probabilities"] for p in json.loads(body)["predictions"]], rtol=1e-6)
    assert list(response.outputs["probabilities"].float_val) == got.tolist()  # AsProtoField, as TF Serving answers
    assert response.model_spec.name == "ctr" and response.model_spec.version.value == 2
    pinned = stub.Predict(make_request(rows, version=1), timeout=30)
    assert pinned.model_spec.version.value == 1


@pytest.mark.parametrize("change, code, message", [
    ({"name": "nope"}, "NOT_FOUND", "not served here"),
    ({"version": 9}, "NOT_FOUND", "no version 9"),
    ({"drop": "I5"}, "INVALID_ARGUMENT", "missing inputs ['I5']"),
    ({"float_categorical": True}, "INVALID_ARGUMENT", "'C1' is categorical"),
    ({"signature": "other"}, "INVALID_ARGUMENT", "not found in signature def"),
])
def test_bad_calls_get_the_matching_status_code(live, channel, change, code, message):
    rows = sf.small_model()[2][:3]
    request = make_request(rows, version=change.get("version"), drop=change.get("drop"),
                           float_categorical=change.get("float_categorical", False))
    if "name" in change:
        request.model_spec.name = change["name"]
    if "signature" in change:
        request.model_spec.signature_name = change["signature"]
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=30)
    assert info.value.code().name == code and message in info.value.details()


def test_metadata_and_status(live, channel):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "ctr"
    response = stub.GetModelMetadata(request, timeout=30)
    sigmap = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(sigmap)
    inputs = sigmap.signature_def["serving_default"].inputs
    assert set(inputs) == set(CATS + NUMS) and inputs["C1"].dtype == 7 and inputs["I1"].dtype == 2  # DT_DOUBLE: what the graph takes

    status_stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "ctr"
    response = status_stub.GetModelStatus(request, timeout=30)
    assert [(s.version, s.state) for s in response.model_version_status] == [(2, 30), (1, 30)]


def test_many_concurrent_calls_share_one_batch(tmp_path):
    """grpc.aio awaits the batcher: 40 calls in flight at once wait in one queue (a thread per call capped it at 8)."""
    import tensorflow as tf

    slow = sf.SlowPredictor(max_enqueued=1000, max_batch_size=1000)
    server = sf.slow_server(tmp_path, slow, grpc_port=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "m"
        request.inputs["C1"].CopyFrom(tf.make_tensor_proto(["a"], tf.string))
        request.inputs["I1"].CopyFrom(tf.make_tensor_proto([1.0], tf.float32))
        first = stub.Predict.future(request, timeout=30)  # held inside compute by the gate
        deadline = time.monotonic() + 10
        while slow.batcher.stats().requests < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        rest = [stub.Predict.future(request, timeout=30) for _ in range(40)]
        deadline = time.monotonic() + 30  # a busy machine can take seconds to deliver 40 calls
        while slow.batcher.stats().rows_enqueued < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert slow.batcher.stats().rows_enqueued == 40
        slow.gate.set()
        answers = [f.result() for f in [first, *rest]]
        assert all(tf.make_ndarray(a.outputs["probabilities"]).tolist() == [0.5] for a in answers)
        assert slow.batcher.stats().compute_calls == 2  # the first call, then all 40 in one batch
    finally:
        channel.close()
        server.stop()
        slow.close()
