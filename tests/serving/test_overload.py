"""Overload sheds instead of queueing (issue 11, item 5): the batcher's admission control, then a real server.

Timing-robust on a busy 2-core machine: the assertions are about behaviour (a request that cannot
make its deadline is refused at once, work past its deadline is never computed, accepted answers are
not late by seconds), with slack far above scheduling noise.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest

import serving_fixtures as sf  # noqa: E402 - also imported by the flood child, from this folder
from ctrflow.errors import DeadlineExceeded, QueueFullError
from ctrflow.serving.batcher import AutoBatcher, BatchingOptions

WAIT_S = 10.0


class SleepCompute:
    """A compute call that takes `call_s` seconds (a real sleep), remembering the first id of each row."""

    def __init__(self, call_s: float) -> None:
        self.call_s = call_s
        self.seen: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        assert self.gate.wait(WAIT_S)
        time.sleep(self.call_s)
        with self._lock:
            self.seen.extend(inputs["ids"][:, 0].tolist())
        return inputs["ids"][:, 0].astype(np.float32)


def rows(first: int, n: int) -> dict[str, np.ndarray]:
    ids = np.zeros((n, 1), np.int32)
    ids[:, 0] = np.arange(first, first + n)
    return {"ids": ids}


def test_the_batcher_learns_its_cost_and_refuses_at_once_what_its_queue_cannot_answer_in_time():
    compute = SleepCompute(0.02)
    with AutoBatcher(compute, BatchingOptions(max_batch_size=8, batch_timeout_ms=0, max_enqueued=10_000)) as batcher:
        assert batcher.estimated_wait_ms(8) is None  # nothing learnt: nothing shed
        for i in range(4):
            batcher.predict(rows(100 * i, 8))
        stats = batcher.stats()
        assert stats.estimated_call_ms + 8 * stats.estimated_row_us / 1e3 >= 15.0  # ~20 ms a call
        compute.gate.clear()  # hold the thread so the queue stays put while we look at it
        queued = [batcher.submit(rows(1000 + 8 * i, 8)) for i in range(20)]  # 20 calls: ~400 ms of work
        assert batcher.estimated_wait_ms(8) > 300.0

        started = time.monotonic()
        with pytest.raises(QueueFullError, match="cannot score a request of 8 rows within its deadline"):
            batcher.submit(rows(5000, 8), deadline=time.monotonic() + 0.1)
        with pytest.raises(QueueFullError, match="within its deadline"):
            batcher.admit(8, deadline=time.monotonic() + 0.1)
        with pytest.raises(DeadlineExceeded, match="after its deadline"):
            batcher.admit(8, deadline=time.monotonic() - 0.001)
        assert time.monotonic() - started < 1.0  # refused at once, not after waiting
        patient = batcher.submit(rows(6000, 8), deadline=time.monotonic() + 60.0)  # has time: accepted
        batcher.admit(8)  # no deadline: only the queue bound applies
        compute.gate.set()
        for future in queued:
            future.result(WAIT_S)
        np.testing.assert_array_equal(patient.result(WAIT_S), np.arange(6000, 6008))
        stats = batcher.stats()
        assert stats.shed == 2
        assert 5000 not in compute.seen  # the refused request was never computed
        # Idle again: a request would be computed at once, so it is never refused (and the cost model,
        # which only learns from calls, can never lock the door on a stale estimate).
        assert batcher.estimated_wait_ms(8) is None
        batcher.admit(8, deadline=time.monotonic() + 0.001)
        assert stats.requests == stats.completed == 4 + 20 + 1


def test_work_whose_deadline_passes_in_the_queue_never_reaches_compute():
    compute = SleepCompute(0.0)
    with AutoBatcher(compute, BatchingOptions(max_batch_size=4, batch_timeout_ms=0)) as batcher:
        compute.gate.clear()
        held = batcher.submit(rows(0, 4))  # occupies the batch thread
        late = batcher.submit(rows(100, 4), deadline=time.monotonic() + 0.05)  # admitted: nothing learnt yet
        time.sleep(0.15)
        compute.gate.set()
        held.result(WAIT_S)
        with pytest.raises(DeadlineExceeded, match="dropped before compute"):
            late.result(WAIT_S)
        stats = batcher.stats()
        assert stats.expired == 1 and stats.timeouts == 1
        assert not set(compute.seen) & set(range(100, 104))


def test_an_absolute_deadline_and_a_timeout_take_the_earlier():
    compute = SleepCompute(0.0)
    with AutoBatcher(compute, BatchingOptions(max_batch_size=4, batch_timeout_ms=0)) as batcher:
        compute.gate.clear()
        held = batcher.submit(rows(0, 4))

        async def call():
            return await batcher.apredict(rows(10, 1), timeout_ms=60_000, deadline=time.monotonic() + 0.05)

        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            asyncio.run(call())
        assert time.monotonic() - started < 5.0
        compute.gate.set()
        held.result(WAIT_S)


def test_admission_learns_what_asyncio_callers_wait_beyond_the_cost_model_and_refuses_by_it():
    """A busy event loop resumes callers late after their scores are ready: admission must count that
    (the answer's way back), or what it accepts is answered late."""
    compute = SleepCompute(0.005)
    with AutoBatcher(compute, BatchingOptions(max_batch_size=8, batch_timeout_ms=0)) as batcher:
        for i in range(4):
            batcher.predict(rows(100 * i, 8))
        assert batcher.stats().estimated_unseen_ms == 0.0  # threads resume at once: nothing unseen

        async def slow_loop() -> None:
            calls = [asyncio.ensure_future(batcher.apredict(rows(1000 + 8 * i, 8), deadline=time.monotonic() + 60))
                     for i in range(24)]
            await asyncio.sleep(0)  # all submitted
            time.sleep(0.25)  # the loop is busy elsewhere while the scores come in
            await asyncio.gather(*calls)

        asyncio.run(slow_loop())
        assert batcher.stats().estimated_unseen_ms > 100.0  # ~250 ms late, smoothed over 24 callers
        compute.gate.clear()
        batcher.submit(rows(5000, 8))  # busy: the estimate applies
        batcher.submit(rows(5008, 8))
        wait_ms, margin_ms = batcher.estimated_wait_ms(8), batcher.stats().estimated_unseen_ms
        # A budget whose half covers the cost model's estimate plus half the learnt margin (derived from
        # both, so a slow box moves the budget with them): the cost model alone would admit it ...
        budget_s = 2 * (wait_ms + 0.5 * margin_ms) / 1e3
        assert wait_ms < 0.5 * budget_s * 1e3
        with pytest.raises(QueueFullError, match="within its deadline"):  # ... what was seen says no
            batcher.admit(8, deadline=time.monotonic() + budget_s)
        compute.gate.set()


# ---- a real server under far more load than it can take ---------------------------------------------------


async def _flood(port: int, body: bytes, *, ctype: str, deadline_ms: float | None, rate: float,
                 seconds: float) -> list[tuple[int, float, bool]]:
    """Open loop: a request every 1/rate s for `seconds`, whatever the answers; (status, latency s, retry-after)."""
    out: list[tuple[int, float, bool]] = []
    extra = f"X-Deadline-Ms: {deadline_ms:g}\r\n" if deadline_ms is not None else ""
    head = (f"POST /v1/models/ctr:predict_columnar HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode()
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    loop = asyncio.get_running_loop()

    async def one(at: float) -> None:
        reader, writer = idle.pop() if idle else await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(head + body)
            response_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
            lines = response_head.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            fields = dict(line.lower().split(b": ", 1) for line in lines[1:] if b": " in line)
            await reader.readexactly(int(fields.get(b"content-length", b"0")))
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            writer.close()
            out.append((0, loop.time() - at, False))
            return
        out.append((status, loop.time() - at, b"retry-after" in fields))
        if fields.get(b"connection") == b"close":
            writer.close()
        else:
            idle.append((reader, writer))

    tasks = []
    start = loop.time() + 0.05
    for i in range(int(rate * seconds)):  # bounded by the schedule
        at = start + i / rate
        await asyncio.sleep(max(0.0, at - loop.time()))
        tasks.append(loop.create_task(one(at)))
    await asyncio.wait(tasks, timeout=90)
    for _, writer in idle:
        writer.close()
    return out


def _flood_from_child(port: int, body: bytes, *, tmp_path, **kwargs) -> list[tuple[int, float, bool]]:
    """`_flood` from another process: in this one its loop would share the server's GIL (and slow it)."""
    import subprocess
    import sys

    body_file = tmp_path / "body.bin"
    body_file.write_bytes(body)
    spec = json.dumps({"port": port, "body": str(body_file), **kwargs})
    done = subprocess.run([sys.executable, __file__, spec], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return [tuple(r) for r in json.loads(done.stdout.strip().splitlines()[-1])]


@pytest.mark.slow
def test_a_flood_with_deadlines_is_shed_with_503_and_what_is_accepted_is_answered_in_time(tmp_path):
    from ctrflow.client.columnar import encode_columnar
    from ctrflow.serving.metrics import parse_metrics

    _, _, instances = sf.small_model()
    rows_per_request = 500
    body = encode_columnar(sf.columns((instances * 2)[:rows_per_request]), sf.CATS, sf.NUMS)
    server = sf.server()  # the shared one: batching 1024 rows / 1 ms, shedding on by default
    client = sf.Client(server.url)
    try:
        for _ in range(5):  # teach the batcher what a call costs
            assert client.post("/v1/models/ctr:predict_columnar", body, {"Content-Type": "application/x-ctrflow-columnar"})[0] == 200
        loaded = server.manager.acquire("ctr", None, None)
        server.manager.release(loaded)
        batcher = loaded.predictor.batcher
        computed_before = batcher.stats().predictions
        deadline_ms = 250.0
        # 500 candidates x 400 requests/s for 2 s: several times what this model scores on 2 cores.
        results = _flood_from_child(server.port, body, tmp_path=tmp_path, ctype="application/x-ctrflow-columnar",
                                    deadline_ms=deadline_ms, rate=400.0, seconds=2.0)
        codes = [status for status, _, _ in results]
        tally = {c: codes.count(c) for c in set(codes)}
        assert set(codes) <= {200, 503, 504}, tally
        shed = [r for r in results if r[0] == 503]
        ok = sorted(latency for status, latency, _ in results if status == 200)
        assert shed and ok, tally
        assert all(retry for _, _, retry in shed)  # every 503 says when to retry
        # Accepted answers come about in time, not seconds late (before: p50 4.8 s, p99 10 s). Loose
        # bounds: on a shared 2-core machine the client's own scheduling shows up in these figures.
        assert ok[len(ok) // 2] < deadline_ms / 1e3 + 0.25, (ok[len(ok) // 2], tally)
        assert ok[-1] < deadline_ms / 1e3 + 1.0, (ok[-1], tally)
        # Work for requests that were not answered 200 was (nearly) never computed (before: 36 of 90 504s were).
        computed = batcher.stats().predictions - computed_before
        wasted = computed - tally[200] * rows_per_request
        assert 0 <= wasted <= 0.2 * computed, (wasted, computed, tally)
        metrics = parse_metrics(client.get("/metrics")[2].decode())
        assert metrics['ctrflow_batcher_shed_total{model="ctr"}'] >= len(shed) // 2  # most 503s: the batcher's
        assert 'ctrflow_batcher_expired_total{model="ctr"}' in metrics
        # And it recovers at once: the next request is answered.
        status, _, _ = client.post("/v1/models/ctr:predict_columnar", body,
                                   {"Content-Type": "application/x-ctrflow-columnar", "X-Deadline-Ms": "5000"})
        assert status == 200
    finally:
        client.close()


def test_a_request_already_past_its_deadline_when_routed_is_answered_504_without_work():
    from ctrflow.serving.rest import RestRequest

    server = sf.server()
    _, _, instances = sf.small_model()
    body = json.dumps({"instances": instances[:3]}).encode()
    before = server.routes.manager.acquire("ctr", None, None)
    server.routes.manager.release(before)
    stats0 = before.predictor.stats()
    request = RestRequest("POST", "/v1/models/ctr:predict", {"x-deadline-ms": "50"}, body, "", time.monotonic() - 1.0)
    response = server._http.run(server.routes.handle(request))
    assert response.status == 504 and b"counted from its arrival" in response.body
    assert before.predictor.stats()["requests"] == stats0["requests"]  # never reached the batcher
    fresh = RestRequest("POST", "/v1/models/ctr:predict", {"x-deadline-ms": "5000"}, body, "", time.monotonic())
    assert server._http.run(server.routes.handle(fresh)).status == 200



class _SleepyModel(sf.SlowPredictor):
    """The fixtures' stand-in model behind a real batcher, whose compute takes `call_s` (and records its rows)."""

    def __init__(self, call_s: float) -> None:
        super().__init__(max_enqueued=10_000, max_batch_size=1)
        self.call_s = call_s
        self.seen: list[float] = []
        self.gate.set()

    def _compute(self, inputs):
        self.gate.wait(WAIT_S)
        time.sleep(self.call_s)
        self.seen.extend(inputs["I1"].tolist())
        return self._np.full(len(inputs["I1"]), 0.5, self._np.float32)


def _answers(sock, count: int) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Read `count` HTTP answers from one connection: (status, fields, body) each."""
    buf, out = b"", []
    while len(out) < count:  # bounded by the socket's timeout
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, (buf, out)
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        fields = dict(line.lower().split(b": ", 1) for line in lines[1:])
        length = int(fields.get(b"content-length", b"0"))
        while len(buf) < length:
            chunk = sock.recv(65536)
            assert chunk
            buf += chunk
        out.append((int(lines[0].split(b" ", 2)[1]), fields, buf[:length]))
        buf = buf[length:]
    return out


def test_the_door_refuses_from_the_head_alone_what_the_queue_cannot_answer_and_the_connection_stays_usable(tmp_path):
    import socket

    model = _SleepyModel(call_s=0.02)
    server = sf.slow_server(tmp_path, model)
    try:
        batcher = model.batcher
        for i in range(4):  # teach it ~20 ms a call
            batcher.predict({"I1": np.array([float(i)])})
        model.gate.clear()
        queued = [batcher.submit({"I1": np.array([100.0 + i])}) for i in range(20)]  # ~0.4 s of work queued
        garbage = b"x" * 5000  # not a columnar body: a refusal that decoded it would be a 400
        def post(budget_ms: int) -> bytes:
            return (f"POST /v1/models/m:predict_columnar HTTP/1.1\r\nHost: x\r\nContent-Type: "
                    f"application/x-ctrflow-columnar\r\nContent-Length: {len(garbage)}\r\nX-Deadline-Ms: {budget_ms}"
                    "\r\n\r\n").encode() + garbage
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S) as sock:
            # Pipelined on one connection: refused at the door (body read and dropped), let in (the route
            # answers its body: 400), then a GET that only parses if both bodies were consumed exactly.
            sock.sendall(post(100) + post(60_000) + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            (s1, f1, b1), (s2, _, b2), (s3, _, _) = _answers(sock, 3)
        assert s1 == 503 and f1.get(b"retry-after") == b"1" and b"within its deadline" in b1, (s1, b1)
        assert b"connection" not in f1  # kept alive
        assert s2 == 400, (s2, b2)
        assert s3 == 200
        assert server._http.shared.door_refused == 1
        assert batcher.stats().shed == 1
        from ctrflow.serving.metrics import parse_metrics

        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            metrics = parse_metrics(_answers(sock, 1)[0][2].decode())
        assert metrics['ctrflow_requests_total{code="503",model="m",protocol="columnar"}'] == 1  # counted like the route's
        assert metrics["ctrflow_http_door_refused_total"] == 1
        model.gate.set()
        for future in queued:
            future.result(WAIT_S)
    finally:
        model.gate.set()
        server.stop()


@pytest.mark.skipif(not sf.grpc_ok(), reason="grpcio / tensorflow-serving-api not installed")
def test_grpc_honours_the_call_deadline_refusing_at_once_what_cannot_make_it(tmp_path):
    """Official stubs: a call whose deadline the queue cannot meet is UNAVAILABLE at once; one whose
    deadline passes while queued is DEADLINE_EXCEEDED and its rows are never computed."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    model = _SleepyModel(call_s=0.02)
    server = sf.slow_server(tmp_path, model, grpc_port=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")

    def request(value: float):
        r = predict_pb2.PredictRequest()
        r.model_spec.name = "m"
        r.inputs["C1"].CopyFrom(tf.make_tensor_proto(["a"], tf.string))
        r.inputs["I1"].CopyFrom(tf.make_tensor_proto([value], tf.float32))
        return r

    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for i in range(4):  # teach the batcher: ~20 ms a call
            stub.Predict(request(float(i)), timeout=30)
        queued = [stub.Predict.future(request(100.0 + i), timeout=60) for i in range(60)]  # ~1.2 s of calls
        time_limit = time.monotonic() + 20
        while model.batcher.stats().rows_enqueued < 50 and time.monotonic() < time_limit:
            time.sleep(0.005)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(request(500.0), timeout=1.0)  # > 1 s of queue: more than half of its budget
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
        assert "within its deadline" in refused.value.details()
        assert time.monotonic() - started < 1.0  # refused at once, not when the deadline passed
        for f in queued:
            f.result()
        assert 500.0 not in model.seen

        model.gate.clear()  # hold the next call inside compute
        held = stub.Predict.future(request(600.0), timeout=30)
        time_limit = time.monotonic() + 20
        while model.batcher.stats().requests < 65 and time.monotonic() < time_limit:
            time.sleep(0.005)
        with pytest.raises(grpc.RpcError) as late:
            stub.Predict(request(700.0), timeout=0.3)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        model.gate.set()
        held.result()
        time_limit = time.monotonic() + 20
        while model.batcher.stats().queue_wait_count < 66 and time.monotonic() < time_limit:
            time.sleep(0.005)
        assert 700.0 not in model.seen  # its rows were dropped, never computed
    finally:
        channel.close()
        server.stop()
        model.close()

if __name__ == "__main__":  # the flood's child process (see _flood_from_child)
    import sys
    from pathlib import Path

    spec = json.loads(sys.argv[1])
    body = Path(spec.pop("body")).read_bytes()
    port = spec.pop("port")
    print(json.dumps(asyncio.run(_flood(port, body, **spec))))
