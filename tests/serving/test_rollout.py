"""Rollouts under (bounded) load on a live server: sticky weighted split, shadow that never changes an
answer, per-arm figures, and sampled request logs that read back as a shard folder."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

import serving_fixtures as sf
from serving_fixtures import Client, columns


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    server, rows = sf.rollout_server(root, key="{header: X-User-Id}", weights=(70, 30),
                                     log="{path: served-log, fraction: 0.5, rows_per_shard: 200, flush_s: 0.2}")
    yield server, rows, root
    server.stop()


@pytest.mark.slow
def test_split_is_sticky_per_user_shadow_never_changes_answers_and_logs_read_back(live):
    from ctrflow.data.shards import load_manifest, read_shard

    server, rows, root = live
    users = [f"u{i}" for i in range(60)]
    seen: dict[str, set] = {u: set() for u in users}
    failures, lock = [], threading.Lock()
    batch = rows[:20]
    direct = None

    def client(k: int) -> None:
        c = Client(server.url)
        for j in range(50):  # bounded: 4 threads x 50 requests
            user = users[(k * 50 + j) % len(users)]
            status, headers, body = c.post("/v1/models/ctr:predict", {"instances": batch}, {"X-User-Id": user})
            with lock:
                if status != 200:
                    failures.append((status, body[:200]))
                else:
                    seen[user].add(headers["x-model-version"])
                    probs.append([p["probabilities"] for p in json.loads(body)["predictions"]])
        c.close()

    probs: list = []
    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[:3]
    assert all(len(v) == 1 for v in seen.values())  # one user, one arm
    arms = [next(iter(v)) for v in seen.values()]
    assert 0.45 < arms.count("1") / len(arms) < 0.9 and "2" in arms
    with server.manager.lease("ctr", 1) as p:
        direct = p.predict(columns(batch))
    np.testing.assert_allclose(probs, np.tile(direct, (len(probs), 1)), rtol=1e-6)  # answers are the served arm's only
    # gRPC calls split by the same key (call metadata), onto the same arm as over REST.
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "ctr"
    cols = columns(batch)
    for n, values in cols.items():
        request.inputs[n].CopyFrom(tf.make_tensor_proto(values, tf.string) if n.startswith("C") else
                                   tf.make_tensor_proto([np.nan if v is None else v for v in values], tf.float64))
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        for user in users[:10]:
            answer = stub.Predict(request, timeout=30, metadata=(("x-user-id", user),))
            assert str(answer.model_spec.version.value) in seen[user]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = json.loads(Client(server.url).get("/v1/rollouts")[2])["rollouts"]["ctr"]
        if stats["shadow"]["requests"] + stats["shadow"]["dropped"] + stats["shadow"]["errors"] >= 200:
            break
        time.sleep(0.1)
    assert sum(a["requests"] for a in stats["arms"].values()) == 210
    assert stats["arms"]["ctr/l:stable"]["rows"] == 20 * stats["arms"]["ctr/l:stable"]["requests"]
    from ctrflow.serving.metrics import parse_metrics

    scraped = parse_metrics(Client(server.url).get("/monitoring/prometheus/metrics")[2].decode())
    for arm, a in stats["arms"].items():  # the same per-arm figures for Prometheus
        assert scraped[f'ctrflow_rollout_arm_requests_total{{arm="{arm}",rollout="ctr"}}'] == a["requests"]
    assert scraped['ctrflow_shadow_rows_total{rollout="ctr"}'] >= stats["shadow"]["rows"]
    shadow = stats["shadow"]
    assert shadow["requests"] > 100 and shadow["errors"] == 0 and shadow["max_abs_diff"] < 1e-6  # same weights
    server.manager.rollouts.close()  # flushes the request log
    man = load_manifest(root / "served-log")
    assert 0 < man.rows < 200 * 20 and man.rows % 20 == 0  # half the users' requests, whole requests
    shard = read_shard(man.shard_paths()[0])
    assert np.isnan(shard.label).all() and shard.extras.shape[1] == 1
    with server.manager.lease("ctr", 1) as p:
        ids, numeric = p.transform(columns(batch))
    np.testing.assert_array_equal(shard.ids[:20], ids)  # the ids the serving graph scored
    np.testing.assert_allclose(shard.extras[:20, 0], direct, rtol=1e-6)
    assert shard.meta["served"]["requests"][0][1] == 20
