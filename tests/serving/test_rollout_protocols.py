"""Rollouts over every protocol: a feature key read from JSON, binary columnar and gRPC bodies puts one
user on one arm whichever he uses; gRPC Predict is mirrored to the shadow (answers unchanged) and
sampled into the request log, as REST is."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

import serving_fixtures as sf
from serving_fixtures import CATS, NUMS, Client, columns

grpc = pytest.importorskip("grpc")
pytest.importorskip("tensorflow_serving.apis.predict_pb2")


def test_key_readers_agree_across_body_formats():
    from ctrflow.client.columnar import encode_columnar
    from ctrflow.serving.rollout import key_from_columnar, key_from_json, key_text

    feats = {"C1": ["u7", "x"], "C2": ["", "y"], "I1": [3.0, 1.5]}
    body = encode_columnar(feats, ("C1", "C2"), ("I1",))
    assert key_text(key_from_columnar(body, "C1")) == "u7"
    assert key_text(key_from_columnar(body, "I1")) == "3" == key_text(3) == key_text(3.0)
    assert key_from_columnar(body, "C2") == b"" and key_text(b"") is None  # missing: no key
    assert key_from_columnar(body, "nope") is None
    assert key_from_columnar(body[:20], "I1") is None and key_from_columnar(b"junk", "C1") is None  # never raises
    for doc in ({"instances": [{"C1": "u7"}, {"C1": "x"}]}, {"inputs": {"C1": ["u7", "x"]}},
                {"columns": ["C1"], "data": [["u7", "x"]]}):
        assert key_text(key_from_json(json.dumps(doc).encode(), "C1")) == "u7"
    assert key_from_json(b"{not json", "C1") is None and key_from_json(b"[1]", "C1") is None
    assert key_text(float("nan")) is None


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout-protocols")
    server, rows = sf.rollout_server(root, key="{feature: C1}", weights=(50, 50),
                                     log="{path: served-log, fraction: 1.0, rows_per_shard: 100000, flush_s: 0.2}")
    yield server, rows, root
    server.stop()


def _batch(rows, user):
    return [{**r, "C1": user} for r in rows[:10]]


def _grpc_request(batch):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "ctr"
    for n, values in columns(batch).items():
        request.inputs[n].CopyFrom(tf.make_tensor_proto(values, tf.string) if n in CATS else
                                   tf.make_tensor_proto([np.nan if v is None else v for v in values], tf.float64))
    return request


def _stats(server):
    return json.loads(Client(server.url).get("/v1/rollouts")[2])["rollouts"]["ctr"]


@pytest.mark.slow
def test_grpc_is_split_shadowed_and_logged_and_the_key_holds_across_protocols(live):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from ctrflow.client.columnar import COLUMNAR_CONTENT_TYPE, encode_columnar
    from ctrflow.data.shards import load_manifest, read_shard

    server, rows, root = live
    users = [f"user{i}" for i in range(16)]
    # gRPC first: every call mirrored to the shadow and logged, answers the arm's own.
    arm_of: dict[str, int] = {}
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        for i, user in enumerate(users):
            answer = stub.Predict(_grpc_request(_batch(rows, user)), timeout=30, metadata=(("x-request-id", f"g{i}"),))
            arm_of[user] = answer.model_spec.version.value
            with server.manager.lease("ctr", arm_of[user]) as p:
                direct = p.predict(columns(_batch(rows, user)))
            np.testing.assert_allclose(tf.make_ndarray(answer.outputs["probabilities"]), direct, rtol=1e-6)
            again = stub.Predict(_grpc_request(_batch(rows, user)), timeout=30)  # sticky: the same arm again
            assert again.model_spec.version.value == arm_of[user]
    assert set(arm_of.values()) == {1, 2}  # the key (C1 of the first candidate) spreads users over both arms
    calls = 2 * len(users)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        shadow = _stats(server)["shadow"]
        if shadow["requests"] + shadow["errors"] + shadow["dropped"] >= calls:
            break
        time.sleep(0.05)
    stats = _stats(server)
    assert sum(a["requests"] for a in stats["arms"].values()) == calls
    assert stats["shadow"]["requests"] == calls and stats["shadow"]["errors"] == 0 and stats["shadow"]["rows"] == 10 * calls
    assert stats["shadow"]["max_abs_diff"] < 1e-6  # the shadow holds the same weights
    while time.monotonic() < deadline and (load_manifest(root / "served-log").rows if (root / "served-log" / "manifest.json").exists() else 0) < 10 * calls:
        time.sleep(0.05)
    man = load_manifest(root / "served-log")
    assert man.rows == 10 * calls
    logged = [r for path in man.shard_paths() for r in read_shard(path).meta["served"]["requests"]]
    assert [r[:2] for r in logged if r[0] == "g3"] == [["g3", 10]]
    # The same users over JSON and binary columnar land on the arm gRPC gave them.
    c = Client(server.url)
    for user in users:
        batch = _batch(rows, user)
        status, headers, _ = c.post("/v1/models/ctr:predict", {"instances": batch})
        assert status == 200 and int(headers["x-model-version"]) == arm_of[user], user
        body = encode_columnar(columns(batch), CATS, NUMS)
        status, headers, _ = c.post("/v1/models/ctr:predict_columnar", body, {"Content-Type": COLUMNAR_CONTENT_TYPE})
        assert status == 200 and int(headers["x-model-version"]) == arm_of[user], user
    c.close()
