"""TF Serving clients against a real server on loopback: the official gRPC stubs and the documented REST bodies.

The server is configured by a TF Serving textproto (version policy, labels), serves a ctrflow export
and a plain SavedModel, and is driven only as a TF Serving client would drive it.
"""
from __future__ import annotations

import base64
import json
import time

import numpy as np
import pytest

import serving_fixtures as sf
from serving_fixtures import CATS, NUMS, Client, columns

grpc = pytest.importorskip("grpc")
from tensorflow_serving.apis import (  # noqa: E402
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

CONFIG = '''model_config_list {
  config { name: "ctr" base_path: "%(ctr)s" model_platform: "tensorflow"
           model_version_policy { specific { versions: 1 versions: 2 } }
           version_labels { key: "stable" value: 1 } version_labels { key: "canary" value: 2 } }
  config { name: "plain" base_path: "%(plain)s" model_platform: "tensorflow" }
}
'''


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from ctrflow.serving.batcher import BatchingOptions
    from ctrflow.serving.model_server import start_server
    from ctrflow.serving.server import ServeOptions

    root = tmp_path_factory.mktemp("tfs")
    _, version_dir, rows = sf.small_model()
    for v in (1, 2, 3):  # 3 is on disk but outside the 'specific' policy
        sf.copy_version(version_dir, root / "ctr", v)
    sf.plain_saved_model(root / "plain")
    cfg = root / "models.config"
    cfg.write_text(CONFIG % {"ctr": root / "ctr", "plain": root / "plain"})
    server, watcher = start_server(ServeOptions(model_config_file=str(cfg), port=0, grpc_port=0, poll_interval_s=3600,
                                                batching=BatchingOptions(max_batch_size=512, batch_timeout_ms=1.0)),
                                   config_poll_s=0.2)
    yield server, rows, cfg, root
    server.stop()
    watcher.close()


@pytest.fixture(scope="module")
def channel(live):
    ch = grpc.insecure_channel(f"127.0.0.1:{live[0].grpc_port}")
    yield ch
    ch.close()


def _rest(live):
    return Client(live[0].url)


def test_policy_and_plain_savedmodel_are_served(live):
    server = live[0]
    assert server.manager.versions("ctr") == [1, 2] and server.manager.versions("plain") == [1]
    status, _, body = _rest(live).get("/v1/models/ctr/labels/stable")
    assert status == 200 and [s["version"] for s in json.loads(body)["model_version_status"]] == ["1"]


def test_rest_answers_are_shaped_as_tf_serving_shapes_them(live):
    _, rows, _, _ = live
    c = _rest(live)
    status, headers, body = c.post("/v1/models/ctr:predict", {"instances": rows[:5]})
    preds = json.loads(body)["predictions"]
    assert status == 200 and headers["x-model-version"] == "2" and len(preds) == 5
    assert set(preds[0]) == {"logits", "probabilities"}
    np.testing.assert_allclose([p["probabilities"] for p in preds], 1 / (1 + np.exp(-np.array([p["logits"] for p in preds]))), rtol=1e-5)
    status, _, body = c.post("/v1/models/ctr:predict", {"inputs": columns(rows[:5])})
    outputs = json.loads(body)["outputs"]
    np.testing.assert_allclose(outputs["probabilities"], [p["probabilities"] for p in preds], rtol=1e-6)
    # b64 values are bytes: the same tokens sent as b64 score the same.
    b64 = [{k: ({"b64": base64.b64encode(v.encode()).decode()} if k in CATS else v) for k, v in r.items()} for r in rows[:5]]
    status, _, body = c.post("/v1/models/ctr:predict", {"instances": b64})
    assert status == 200
    np.testing.assert_allclose([p["probabilities"] for p in json.loads(body)["predictions"]], [p["probabilities"] for p in preds], rtol=1e-6)
    # Every signature is callable: transform answers what the converter would have written.
    status, _, body = c.post("/v1/models/ctr:predict", {"signature_name": "transform", "instances": rows[:3]})
    assert status == 200 and len(json.loads(body)["predictions"][0]["ids"]) == len(CATS) + len(NUMS)
    status, _, body = c.post("/v1/models/ctr:predict", {"signature_name": "transform", "inputs": columns(rows[:3])})
    assert status == 200 and np.array(json.loads(body)["outputs"]["numeric"]).shape == (3, len(NUMS))


def test_rest_labels_pin_versions(live):
    _, rows, _, _ = live
    c = _rest(live)
    for label, version in (("stable", "1"), ("canary", "2")):
        status, headers, _ = c.post(f"/v1/models/ctr/labels/{label}:predict", {"instances": rows[:2]})
        assert status == 200 and headers["x-model-version"] == version
    status, _, body = c.post("/v1/models/ctr/labels/nope:predict", {"instances": rows[:2]})
    assert status == 404 and "Unrecognized servable version label: nope" in json.loads(body)["error"]
    status, _, body = c.post("/v1/models/ctr/versions/3:predict", {"instances": rows[:2]})
    assert status == 404  # on disk, but the specific policy does not serve it


def test_rest_metadata_is_the_true_signature_def(live):
    status, _, body = _rest(live).get("/v1/models/ctr/metadata")
    doc = json.loads(body)
    assert status == 200 and doc["model_spec"] == {"name": "ctr", "signature_name": "", "version": "2"}
    sigs = doc["metadata"]["signature_def"]["signature_def"]
    assert set(sigs) == {"serving_default", "predict_ids", "transform", "serving_packed"}
    inputs = sigs["serving_default"]["inputs"]
    assert inputs["C1"]["dtype"] == "DT_STRING" and inputs["I1"]["dtype"] == "DT_DOUBLE"
    assert inputs["I1"]["name"] == "serving_default_I1:0" and inputs["I1"]["tensor_shape"]["dim"] == [{"size": "-1", "name": ""}]
    assert set(sigs["serving_default"]["outputs"]) == {"logits", "probabilities"}
    assert sigs["predict_ids"]["inputs"]["ids"]["dtype"] == "DT_INT32"


def _request(rows, *, signature="", label=None, output_filter=()):
    import tensorflow as tf

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "ctr"
    if signature:
        request.model_spec.signature_name = signature
    if label:
        request.model_spec.version_label = label
    request.output_filter.extend(output_filter)
    cols = columns(rows)
    for n in CATS:
        request.inputs[n].CopyFrom(tf.make_tensor_proto(cols[n], tf.string))
    for n in NUMS:  # DT_DOUBLE, as the metadata says
        request.inputs[n].CopyFrom(tf.make_tensor_proto([np.nan if v is None else v for v in cols[n]], tf.float64))
    return request


def test_grpc_predict_fills_float_val_honours_output_filter_and_labels(live, channel):
    _, rows, _, _ = live
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    response = stub.Predict(_request(rows[:8]), timeout=30)
    assert set(response.outputs) == {"logits", "probabilities"}
    probs = response.outputs["probabilities"]
    assert len(probs.float_val) == 8 and not probs.tensor_content and [d.size for d in probs.tensor_shape.dim] == [8]
    status, _, body = _rest(live).post("/v1/models/ctr:predict", {"instances": rows[:8]})
    np.testing.assert_allclose(list(probs.float_val), [p["probabilities"] for p in json.loads(body)["predictions"]], rtol=1e-6)
    only = stub.Predict(_request(rows[:3], output_filter=["logits"]), timeout=30)
    assert set(only.outputs) == {"logits"} and len(only.outputs["logits"].float_val) == 3
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(_request(rows[:3], output_filter=["scores"]), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "output tensor alias not found" in err.value.details()
    assert stub.Predict(_request(rows[:3], label="stable"), timeout=30).model_spec.version.value == 1
    ids = stub.Predict(_request(rows[:3], signature="transform"), timeout=30)
    assert ids.model_spec.signature_name == "transform" and len(ids.outputs["ids"].int_val) == 3 * (len(CATS) + len(NUMS))


def test_grpc_metadata_and_status(live, channel):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "ctr"
    request.model_spec.version_label = "stable"
    response = stub.GetModelMetadata(request, timeout=30)
    sigmap = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(sigmap)
    assert response.model_spec.version.value == 1 and sigmap.signature_def["serving_default"].inputs["I1"].dtype == 2
    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "ctr"}), timeout=30)
    assert [s.version for s in status.model_version_status] == [2, 1]


def test_plain_savedmodel_through_its_signature_over_rest_and_grpc(live, channel):
    import tensorflow as tf

    c = _rest(live)
    status, _, body = c.post("/v1/models/plain:predict", {"instances": [{"x": [1, 2], "s": "abc"}, {"x": [0, 1], "s": ""}]})
    assert status == 200 and json.loads(body) == {"predictions": [{"n": 3, "y": 5.0}, {"n": 0, "y": 2.0}]}
    status, _, body = c.post("/v1/models/plain:predict_columnar", b"{}", {"Content-Type": "application/json"})
    assert status == 400
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "plain"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([[1, 1]], np.float32)))
    request.inputs["s"].CopyFrom(tf.make_tensor_proto([b"xy"]))
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    assert list(response.outputs["y"].float_val) == [3.0] and list(response.outputs["n"].int_val) == [2]


def test_config_file_is_re_read_and_reload_config_request_replaces_the_model_list(live, channel):
    server, rows, cfg, root = live
    c = _rest(live)
    cfg.write_text((CONFIG % {"ctr": root / "ctr", "plain": root / "plain"}).replace('value: 1 }', 'value: 2 }'))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        _, headers, _ = c.post("/v1/models/ctr/labels/stable:predict", {"instances": rows[:1]})
        if headers.get("x-model-version") == "2":
            break
        time.sleep(0.1)
    assert headers.get("x-model-version") == "2"  # the poll picked up the relabel
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    new = text_format.Parse(f'model_config_list {{ config {{ name: "ctr" base_path: "{root / "ctr"}" }} }}',
                            model_server_config_pb2.ModelServerConfig())
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=new), timeout=60)
    assert server.manager.model_names == ("ctr",) and server.manager.versions("ctr") == [3]  # latest policy now
    assert c.post("/v1/models/plain:predict", {"instances": [{"x": [1, 2], "s": "a"}]})[0] == 404
    bad = text_format.Parse('model_config_list { config { name: "x" base_path: "/a" model_platform: "onnx" } }',
                            model_server_config_pb2.ModelServerConfig())
    with pytest.raises(grpc.RpcError) as err:
        stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=bad), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and server.manager.model_names == ("ctr",)
