"""The HTTP door's lease is the request's only lease: taken once at the head, returned once on every way out."""
from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

import serving_fixtures as sf
from ctrflow.client.hashing import FeatureHasher
from ctrflow.client.ids import IDS_CONTENT_TYPE, encode_ids
from ctrflow.serving.batcher import BatchingOptions
from ctrflow.serving.server import ServeOptions, serve
from serving_fixtures import Client, columns

WAIT_S = 20.0


@pytest.fixture()
def live(request, tmp_path):
    """A server on its own copy of version 1; indirect parametrize may pass (body timeout s, batch timeout ms)."""
    body_timeout_s, batch_timeout_ms = getattr(request, "param", (0.3, 1.0))
    _, version_dir, rows = sf.small_model()
    base = tmp_path / "ctr"
    sf.copy_version(version_dir, base, 1)
    server = serve(ServeOptions(model_base_path=str(base), port=0, poll_interval_s=3600.0, drain_grace_s=10,
                                batching=BatchingOptions(max_batch_size=256, batch_timeout_ms=batch_timeout_ms),
                                body_timeout_s=body_timeout_s, max_rows_per_request=50, max_body_bytes=1 << 16))
    try:
        with server.manager.lease("ctr") as predictor:
            ids, numeric = FeatureHasher.from_manifest(predictor.path).transform(columns(rows[:60]))
        yield server, base, version_dir, ids, numeric
    finally:
        server.stop()


def _leases(server) -> dict[int, int]:
    """In-flight leases per version still held by the manager (served or unloading)."""
    state = server.manager._state("ctr")
    return {v.version: v.in_flight for v in (*state.served, *state.unloading)}


def _settled(server, want: dict[int, int] | None = None, wait_s: float = WAIT_S) -> dict[int, int]:
    """The lease counts once they reach `want` (default: every version at 0), else as they are after `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        got = _leases(server)
        if (got == want) if want is not None else not any(got.values()):
            return got
        if time.monotonic() > deadline:
            return got
        time.sleep(0.01)


def _head(length: int, *, ctype: str = IDS_CONTENT_TYPE, budget_ms: int = 5000) -> bytes:
    return (f"POST /v1/models/ctr:predict_ids HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {length}\r\nX-Deadline-Ms: {budget_ms}\r\n\r\n").encode()


def _status(sock: socket.socket) -> int:
    sock.settimeout(WAIT_S)
    buf = b""
    while b"\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before an answer"
        buf += chunk
    return int(buf.split(b" ", 2)[1])


@pytest.mark.parametrize("live", [(0.3, 200.0)], indirect=True)  # a lone request waits 200 ms for its batch
def test_every_way_out_returns_the_door_lease_exactly_once(live):
    server, _, _, ids, numeric = live
    body = encode_ids(ids[:10], numeric[:10])
    client = Client(server.url)
    headers = {"Content-Type": IDS_CONTENT_TYPE, "X-Deadline-Ms": "5000"}
    answers = [
        client.post("/v1/models/ctr:predict_ids", body, headers)[0],  # 200: the route took the door's lease
        client.post("/v1/models/ctr:predict_ids", body, {**headers, "Content-Type": "text/plain"})[0],  # 415 before it
        client.post("/v1/models/ctr:predict_ids", body[:-4], headers)[0],  # 400: a bad body, after the route took it
        client.post("/v1/models/ctr:predict_ids", encode_ids(ids, numeric), headers)[0],  # 413: 60 rows > 50
        client.post("/v1/models/ctr:predict_ids", body, {**headers, "X-Deadline-Ms": "0.001"})[0],  # 504 at the door
        client.post("/v1/models/nope:predict_ids", body, headers)[0],  # 404: no lease to take
    ]
    client.close()
    assert answers == [200, 415, 400, 413, 504, 404]
    assert _settled(server) == {1: 0}

    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # the body never completes: 408
        sock.sendall(_head(len(body)) + body[:100])
        time.sleep(0.05)
        assert _leases(server) == {1: 1}  # held by the door while the body is read
        assert _status(sock) == 408
        assert _settled(server, wait_s=1.0) == {1: 0}  # at the refusal, not when the connection closes

    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # the client leaves mid-body
        sock.sendall(_head(len(body)) + body[:100])
        assert _settled(server, {1: 1}) == {1: 1}
    assert _settled(server) == {1: 0}

    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # larger than max_body_bytes, chunked
        sock.sendall(b"POST /v1/models/ctr:predict_ids HTTP/1.1\r\nHost: x\r\nContent-Type: " + IDS_CONTENT_TYPE.encode()
                     + b"\r\nTransfer-Encoding: chunked\r\nX-Deadline-Ms: 5000\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (40_000, b"\0" * 40_000)
        sock.sendall(chunk)
        try:
            sock.sendall(chunk)
        except OSError:
            pass  # refused and closed while we were still sending
        assert _status(sock) == 413
        assert _settled(server, wait_s=1.0) == {1: 0}

    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # pipelined, then reset without reading:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall((_head(len(body)) + body) * 6)  # the first waits for its batch, five wait behind it ...
        assert _settled(server, {1: 6}) == {1: 6}
    assert _settled(server) == {1: 0}  # ... and never start


@pytest.mark.parametrize("live", [(30.0, 1.0)], indirect=True)  # the body waits while version 2 loads
def test_a_request_whose_leased_version_retires_before_its_body_is_answered_by_the_new_one(live):
    server, base, version_dir, ids, numeric = live
    body = encode_ids(ids[:10], numeric[:10])
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(_head(len(body)) + body[:50])  # the door leases version 1
        assert _settled(server, {1: 1}) == {1: 1}
        sf.copy_version(version_dir, base, 2)
        server.manager.poll_once()  # version 2 in; version 1 retired, waiting for its lease
        assert server.manager.versions("ctr") == [2]
        assert _leases(server) == {2: 0, 1: 1}
        sock.sendall(body[50:])
        sock.settimeout(WAIT_S)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
    # the retired version (which drain_grace_s may close even with a lease out) is handed back at the route
    assert answer.startswith(b"HTTP/1.1 200") and b"x-model-version: 2\r\n" in answer, answer[:300]
    deadline = time.monotonic() + WAIT_S
    while _leases(server) != {2: 0} and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _leases(server) == {2: 0}  # version 1 closed once its one lease came back, at the route
    assert [s.state for s in server.manager.status("ctr")] == ["AVAILABLE"]


@pytest.mark.slow
def test_a_version_swap_under_ids_load_through_the_door_fails_nothing_and_drains_the_old_version(live):
    server, base, version_dir, ids, numeric = live
    stop = threading.Event()
    outcomes: list[tuple[int, str]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        c = Client(server.url)
        body = encode_ids(ids[k * 10:k * 10 + 10], numeric[k * 10:k * 10 + 10])
        headers = {"Content-Type": IDS_CONTENT_TYPE, "X-Deadline-Ms": "10000"}
        for _ in range(100_000):  # bounded; stopped long before
            if stop.is_set():
                break
            status, got, data = c.post("/v1/models/ctr:predict_ids", body, headers)
            with lock:
                outcomes.append((status, got.get("x-model-version", data.decode(errors="replace")[:200])))
        c.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.3)
        sf.copy_version(version_dir, base, 2)
        server.manager.poll_once()
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            with lock:
                if sum(1 for _, v in outcomes if v == "2") >= 20:
                    break
            time.sleep(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join(WAIT_S)
    assert not [o for o in outcomes if o[0] != 200], [o for o in outcomes if o[0] != 200][:5]
    versions = [v for _, v in outcomes]
    assert versions[0] == "1" and versions[-1] == "2"
    deadline = time.monotonic() + WAIT_S
    while _leases(server) != {2: 0} and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _leases(server) == {2: 0}
