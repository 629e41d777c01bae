"""Context + candidates requests against a real export: the in-process predictor (batched), REST JSON,
the binary body and gRPC all answer what the flat request answers for the same joined rows."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

import serving_fixtures as sf
from serving_fixtures import CATS, NUMS, Client

CONTEXT = (*CATS[:13], *NUMS[:7])  # 20 of the 39 fields travel once per request


@pytest.fixture(scope="module")
def context_export(tmp_path_factory):
    from ctrflow.export import export

    run, _, rows = sf.small_model()
    base = tmp_path_factory.mktemp("context") / "ctr"
    summary = export(run, base, context_fields=",".join(CONTEXT))
    assert {"serving_context", "predict_context", "serving_context_packed", "serving_packed"} <= set(summary.signatures)
    return base, rows


@pytest.fixture(scope="module")
def predictor(context_export):
    from ctrflow.serving.batcher import BatchingOptions
    from ctrflow.serving.predictor import Predictor

    p = Predictor.load(context_export[0], batching=BatchingOptions(max_batch_size=64, batch_timeout_ms=50.0))
    p.warmup()
    yield p
    p.close()


@pytest.fixture(scope="module")
def live(context_export):
    from ctrflow.serving.batcher import BatchingOptions
    from ctrflow.serving.server import ServeOptions, serve

    s = serve(ServeOptions(model_base_path=str(context_export[0]), port=0, grpc_port=0 if sf.grpc_ok() else None,
                           batching=BatchingOptions(max_batch_size=256, batch_timeout_ms=1.0), poll_interval_s=3600.0))
    yield s
    s.stop()


def request_parts(rows, contexts):
    """Candidates `rows`; candidate i gets context `contexts[i % len(contexts)]` (each a source row)."""
    ctx = [{f: c[f] for f in CONTEXT} for c in contexts]
    cands = [{f: r[f] for f in r if f not in CONTEXT} for r in rows]
    row = [i % len(contexts) for i in range(len(rows))]
    joined = [{**cands[i], **ctx[row[i]]} for i in range(len(rows))]
    return ctx, cands, row, joined


def columns_of(dicts, names):
    return {n: [d[n] for d in dicts] for n in names}


def test_context_fields_are_checked_and_leave_the_fingerprint(tmp_path):
    from ctrflow.errors import SchemaError
    from ctrflow.export import export
    from ctrflow.schema import PRESETS, Schema

    schema = PRESETS["synthetic"]
    marked = Schema.from_dict({**schema.to_dict(), "context": ["C1", "I2"]})
    assert marked.context == ("C1", "I2") and marked.fingerprint() == schema.fingerprint()
    assert Schema.from_dict(marked.to_dict()) == marked and "context" not in schema.to_dict()
    with pytest.raises(SchemaError, match="not feature fields"):
        Schema.from_dict({**schema.to_dict(), "context": ["C1", "click"]})
    with pytest.raises(SchemaError, match="every feature"):
        schema.check_context(schema.categorical_names + schema.numeric_names)
    with pytest.raises(SchemaError, match=r"\['C99'\]"):
        export(sf.small_model()[0], tmp_path / "m", context_fields="C1,C99")
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


def test_predictor_context_requests_score_like_flat_ones_batched(predictor, context_export):
    rows = context_export[1]
    cand_names = [f for f in (*CATS, *NUMS) if f not in CONTEXT]
    # first a round of one-context requests, then one of three-context requests, each round concurrent
    cases = [request_parts(rows[10 * k:10 * k + 7 + k], [rows[200 + k]] if k < 5 else rows[200 + k:203 + k])
             for k in range(9)]
    results: dict[int, np.ndarray] = {}

    def one(k):
        ctx, cands, row, _ = cases[k]
        inputs = {**columns_of(ctx, CONTEXT), **columns_of(cands, cand_names)}
        if len(ctx) > 1:
            inputs["row"] = np.array(row)
        results[k] = predictor.run("serving_context", inputs)["probabilities"]

    for round_ in (range(5), range(5, 9)):
        threads = [threading.Thread(target=one, args=(k,)) for k in round_]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for k, (_, _, _, joined) in enumerate(cases):
        want = predictor.predict(columns_of(joined, (*CATS, *NUMS)))
        np.testing.assert_allclose(results[k], want, rtol=1e-5, atol=1e-6)
    stats = predictor.context.stats()
    assert stats["compute_calls"] < stats["requests"]  # requests were merged (a 50 ms window)


def test_predict_context_ids_signature_matches_predict_ids(predictor, context_export):
    import tensorflow as tf

    rows = context_export[1][:12]
    ids, numeric = predictor.transform(columns_of(rows, (*CATS, *NUMS)))
    info = predictor.info["context"]
    ci, cn = info["id_columns"], info["numeric_columns"]
    ki = [i for i in range(ids.shape[1]) if i not in ci]
    kn = [i for i in range(numeric.shape[1]) if i not in cn]
    row = np.arange(12, dtype=np.int32)  # every candidate its own context: R = M
    got = predictor._loaded.signatures["predict_context"](
        context_ids=tf.constant(ids[:, ci]), context_numeric=tf.constant(numeric[:, cn]), ids=tf.constant(ids[:, ki]),
        numeric=tf.constant(numeric[:, kn]), row=tf.constant(row))["probabilities"].numpy()
    np.testing.assert_allclose(got, predictor.predict_ids(ids, numeric), rtol=1e-5, atol=1e-6)
    # serving_packed (two matrices) scores the raw rows as serving_default does
    cols = predictor.prepare(columns_of(rows, (*CATS, *NUMS)))
    packed = predictor._loaded.signatures["serving_packed"](
        strings=tf.constant(np.stack([cols[f] for f in CATS]), tf.string),  # field-major
        numbers=tf.constant(np.stack([cols[f] for f in NUMS]), tf.float64))["probabilities"].numpy()
    np.testing.assert_allclose(packed, predictor.predict(cols), rtol=1e-6, atol=1e-7)


def test_bad_context_requests_are_refused_alone(predictor, context_export):
    from ctrflow.errors import SchemaError

    ctx, cands, _, _ = request_parts(context_export[1][:4], [context_export[1][9]])
    cand_names = [f for f in (*CATS, *NUMS) if f not in CONTEXT]
    good = {**columns_of(ctx, CONTEXT), **columns_of(cands, cand_names)}
    with pytest.raises(SchemaError, match="missing inputs"):
        predictor.run("serving_context", {k: v for k, v in good.items() if k != "C1"})
    with pytest.raises(SchemaError, match="row"):
        predictor.run("serving_context", {**good, **{f: v * 2 for f, v in columns_of(ctx, CONTEXT).items()}})
    with pytest.raises(SchemaError, match="in \\[0, 1\\)"):
        predictor.run("serving_context", {**good, "row": np.array([0, 0, 1, 0])})
    with pytest.raises(SchemaError, match="surrogate"):
        predictor.run("serving_context", {**good, "C1": ["\ud800"]})


@pytest.mark.slow
def test_rest_json_binary_and_grpc_context_forms(live, context_export):
    from ctrflow.client.context import CONTEXT_CONTENT_TYPE, encode_context

    rows = context_export[1]
    ctx, cands, row, joined = request_parts(rows[:25], [rows[300]])
    client = Client(live.url)
    status, _, body = client.post("/v1/models/ctr:predict", {"instances": joined})
    assert status == 200, body
    want = np.array([p["probabilities"] for p in json.loads(body)["predictions"]])

    status, headers, body = client.post("/v1/models/ctr:predict", {"context": ctx[0], "instances": cands})
    assert status == 200, body
    assert headers["x-model-version"] == "1"
    got = np.array([p["probabilities"] for p in json.loads(body)["predictions"]])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    # several contexts in one body, candidates as columns
    ctx3, cands3, row3, joined3 = request_parts(rows[:9], rows[300:303])
    status, _, body = client.post("/v1/models/ctr:predict", {"instances": joined3})
    want3 = np.array([p["probabilities"] for p in json.loads(body)["predictions"]])
    cand_names = [f for f in (*CATS, *NUMS) if f not in CONTEXT]
    status, _, body = client.post("/v1/models/ctr:predict",
                                  {"context": ctx3, "row": row3, "inputs": columns_of(cands3, cand_names)})
    assert status == 200, body
    np.testing.assert_allclose(json.loads(body)["outputs"]["probabilities"], want3, rtol=1e-5, atol=1e-6)

    # TF Serving's own body on the context signature: context inputs [R], candidates [M], row
    status, _, body = client.post("/v1/models/ctr:predict", {
        "signature_name": "serving_context",
        "inputs": {**columns_of(ctx3, CONTEXT), **columns_of(cands3, cand_names), "row": row3}})
    assert status == 200, body
    np.testing.assert_allclose(json.loads(body)["outputs"]["probabilities"], want3, rtol=1e-5, atol=1e-6)

    # binary
    payload = encode_context(columns_of(ctx, CONTEXT), columns_of(cands, cand_names), categorical=CATS, numeric=NUMS)
    status, headers, body = client.post("/v1/models/ctr:predict_columnar", payload, {"Content-Type": CONTEXT_CONTENT_TYPE})
    assert status == 200, body
    np.testing.assert_allclose(np.frombuffer(body, "<f4"), want, rtol=1e-5, atol=1e-6)
    payload = encode_context(columns_of(ctx3, CONTEXT), columns_of(cands3, cand_names), categorical=CATS, numeric=NUMS, row=row3)
    status, _, body = client.post("/v1/models/ctr:predict_columnar", payload, {"Content-Type": CONTEXT_CONTENT_TYPE})
    assert status == 200, body
    np.testing.assert_allclose(np.frombuffer(body, "<f4"), want3, rtol=1e-5, atol=1e-6)

    # bad bodies: 400 with a reason
    status, _, body = client.post("/v1/models/ctr:predict", {"context": {"C1": "x"}, "instances": cands})
    assert status == 400 and b"missing features" in body
    status, _, body = client.post("/v1/models/ctr:predict", {"context": ctx3, "instances": cands3})
    assert status == 400 and b"'row'" in body
    status, _, body = client.post("/v1/models/ctr:predict_columnar", payload[:-3], {"Content-Type": CONTEXT_CONTENT_TYPE})
    assert status == 400, body
    client.close()

    if live.grpc_port is None:
        return
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "ctr"
    request.model_spec.signature_name = "serving_context"
    for side in (columns_of(ctx3, CONTEXT), columns_of(cands3, cand_names)):
        for name, values in side.items():
            if name in CATS:
                request.inputs[name].CopyFrom(tf.make_tensor_proto(values, tf.string))
            else:
                request.inputs[name].CopyFrom(tf.make_tensor_proto([np.nan if v is None else v for v in values], tf.float32))
    request.inputs["row"].CopyFrom(tf.make_tensor_proto(np.array(row3, np.int32)))
    with grpc.insecure_channel(f"127.0.0.1:{live.grpc_port}") as channel:
        reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    np.testing.assert_allclose(tf.make_ndarray(reply.outputs["probabilities"]), want3, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_bench_protocol_context_runs_flat_then_context(context_export):
    from ctrflow.bench.loadgen import LoadOptions, run_load
    from ctrflow.serving.batcher import BatchingOptions

    report = run_load(LoadOptions(model_base_path=str(context_export[0]), target="inprocess", protocol="context",
                                  rate_rps=40, duration_s=1.0, candidates=20, distinct_bodies=8, timeout_ms=2000,
                                  batching=BatchingOptions(max_batch_size=512, batch_timeout_ms=1.0)))
    flat, ctx = report.results
    assert flat.ok == flat.sent > 0 and ctx.ok == ctx.sent > 0 and flat.errors == ctx.errors == 0
    assert ctx.protocol == "python-context" and ctx.compute_calls >= 1
    notes = report.to_dict()["context"]
    assert notes["fields"] == len(CONTEXT) and notes["flat_over_context_cpu"] > 0
