"""A poison input fails only its own request (issue 11, item 6): refused 400 before batching, and a batch
that still fails is re-run request by request — checked on the real model, through a real server."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest

import serving_fixtures as sf
from ctrflow.serving.poison import PoisonInput, check_strings, may_hold_surrogates

COLUMNAR = {"Content-Type": "application/x-ctrflow-columnar"}


def test_the_body_scan_lets_plain_json_through_and_flags_what_could_hold_a_surrogate():
    assert not may_hold_surrogates(b'{"instances": [{"C1": "68fd1e64", "I1": 3}]}')
    assert may_hold_surrogates(b'{"C1": "\\ud800"}')  # an escape
    assert may_hold_surrogates('{"C1": "x"}'.encode("utf-16"))  # json also reads UTF-16
    assert may_hold_surrogates(b'{"C1": "\xed\xa0\x80"}')  # a surrogate's own UTF-8 bytes (json accepts them)


def test_strings_are_checked_with_the_row_and_field_named():  # ids: Predictor.check_ids (test_ids_path.py)
    check_strings({"C1": np.array(["a", "\U0001F600"], dtype=object)}, ["C1"])  # a surrogate pair decoded: fine
    with pytest.raises(PoisonInput, match=r"Feature 'C2' row 1: .*lone UTF-16 surrogate"):
        check_strings({"C1": np.array(["a"], dtype=object), "C2": np.array(["b", "x\ud800"], dtype=object)}, ["C1", "C2"])


def test_good_and_poison_requests_sent_together_the_good_ones_all_succeed():
    """Clients on their own connections at once: JSON rows, binary columnar, predict_ids, each with a bad twin."""
    from ctrflow.client.columnar import encode_columnar

    server = sf.server()
    _, version_dir, instances = sf.small_model()
    buckets = json.loads((version_dir / "ctrflow.json").read_text())["feature_spec"]["id_buckets"]
    good_json = [json.dumps({"instances": instances[i:i + 20]}).encode() for i in range(0, 200, 20)]
    bad_json = json.dumps({"instances": [dict(instances[0], C3="ok\ud800")] + instances[1:20]}).encode()
    good_columnar = encode_columnar(sf.columns(instances[200:300]), sf.CATS, sf.NUMS)
    ids = [[b - 1 for b in buckets]] * 5
    good_ids = json.dumps({"signature_name": "predict_ids", "inputs": {"ids": ids, "numeric": [[0.5] * len(sf.NUMS)] * 5}}).encode()
    bad_ids = json.dumps({"signature_name": "predict_ids",
                          "inputs": {"ids": [ids[0][:3] + [buckets[3]] + ids[0][4:]] + ids[1:],
                                     "numeric": [[0.5] * len(sf.NUMS)] * 5}}).encode()
    cases = [("/v1/models/ctr:predict", b, {}, 200) for b in good_json]
    cases += [("/v1/models/ctr:predict_columnar", good_columnar, COLUMNAR, 200), ("/v1/models/ctr:predict", good_ids, {}, 200)]
    cases += [("/v1/models/ctr:predict", bad_json, {}, 400)] * 6 + [("/v1/models/ctr:predict", bad_ids, {}, 400)] * 3

    expected = {}  # each good body's answer when sent alone
    client = sf.Client(server.url)
    for path, body, headers, status in cases:
        if status == 200 and body not in expected:
            code, _, answer = client.post(path, body, headers)
            assert code == 200
            expected[body] = answer
    client.close()

    results: list[tuple[int, int, bytes]] = []
    lock = threading.Lock()
    start = threading.Barrier(len(cases) * 2)

    def send(index: int) -> None:
        path, body, headers, _ = cases[index]
        c = sf.Client(server.url)
        try:
            start.wait(30)
            code, _, answer = c.post(path, body, headers)
            with lock:
                results.append((index, code, answer))
        finally:
            c.close()

    threads = [threading.Thread(target=send, args=(i,)) for i in list(range(len(cases))) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == len(threads)
    for index, code, answer in results:
        path, body, _, want = cases[index]
        assert code == want, (index, code, answer[:200])
        if want == 200:
            if path.endswith(":predict_columnar"):
                np.testing.assert_allclose(np.frombuffer(answer, "<f4"), np.frombuffer(expected[body], "<f4"), rtol=1e-5)
            else:
                np.testing.assert_allclose(_probabilities(answer), _probabilities(expected[body]), rtol=1e-5)
        elif body is bad_json:
            assert b"Feature 'C3' row 0" in answer and b"surrogate" in answer
        else:
            assert b"'ids' row 0, column 3 (field 'C4')" in answer


def _probabilities(answer: bytes) -> list[float]:
    doc = json.loads(answer)
    if "outputs" in doc:
        return doc["outputs"]["probabilities"]
    return [p["probabilities"] for p in doc["predictions"]]


def test_a_poison_that_reaches_the_real_model_fails_alone_and_its_batch_mates_are_scored():
    """Past the front ends' checks (an in-process caller): the batch fails in TensorFlow, then each request
    is re-run on its own — the good ones get exactly their scores, the bad one its own error."""
    from ctrflow.serving.batcher import BatchingOptions
    from ctrflow.serving.predictor import Predictor

    _, version_dir, instances = sf.small_model()
    with Predictor.load(version_dir, batching=BatchingOptions(max_batch_size=4096, batch_timeout_ms=50.0)) as predictor:
        goods = [sf.columns(instances[i:i + 10]) for i in range(0, 50, 10)]
        alone = [predictor.predict(g) for g in goods]
        bad = sf.columns(instances[:10])
        bad["C5"] = list(bad["C5"])
        bad["C5"][4] = "\udfff"
        calls_before = predictor.batcher.stats()

        async def together():
            return await asyncio.gather(*(predictor.apredict(g) for g in [goods[0], goods[1], bad, *goods[2:]]),
                                        return_exceptions=True)

        out = asyncio.run(together())
        for _ in range(500):  # the batch thread counts a call just after it hands out its results
            stats = predictor.batcher.stats()
            if stats.completed + stats.errors == stats.requests:
                break
            time.sleep(0.01)
    assert isinstance(out[2], ValueError) and "UTF-8" in str(out[2])
    for got, want in zip([out[0], out[1], *out[3:]], alone):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert stats.compute_errors - calls_before.compute_errors == 2  # the shared call, then the poison alone
    assert stats.errors - calls_before.errors == 1
