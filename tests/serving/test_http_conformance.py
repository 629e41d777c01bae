"""HTTP/1.1 conformance and abuse (RFC 9112 framing, limits, timeouts, stop), with raw sockets on a live server.

Every case of issue 10's "HTTP framing" section has a test here. The served model is a stand-in behind
a real batcher (`SlowPredictor`, gate open): framing is the transport's business, so no TensorFlow is
needed and the suite stays fast; small limits keep the memory-cap tests bounded.
"""
from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time

import pytest

import serving_fixtures as sf
from ctrflow.serving.metrics import parse_metrics

MAX_BODY = 64 << 10
MAX_BUFFERED = 4 * MAX_BODY
MAX_CONNECTIONS = 24
GOOD = json.dumps({"instances": [{"C1": "a", "I1": 1.0}, {"C1": "b", "I1": 2.0}]}).encode()
PREDICT = b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\n"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    slow = sf.SlowPredictor(max_enqueued=1000)
    slow.gate.set()
    server = sf.slow_server(
        tmp_path_factory.mktemp("conformance"), slow, max_body_bytes=MAX_BODY, max_buffered_body_bytes=MAX_BUFFERED,
        max_connections=MAX_CONNECTIONS, head_timeout_s=0.5, body_timeout_s=0.5, drain_timeout_s=1.0,
        keep_alive_timeout_s=5.0,
    )
    yield server
    server.stop()
    slow.close()


def connect(live, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", live.port), timeout=timeout)


def read_all(s: socket.socket, limit_s: float = 5.0) -> bytes:
    """Everything the server sends until it closes (or `limit_s` passes)."""
    data, deadline = b"", time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            part = s.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not part:
            break
        data += part
    return data


def exchange(live, raw: bytes, limit_s: float = 5.0) -> bytes:
    with connect(live, timeout=limit_s) as s:
        s.sendall(raw)
        return read_all(s, limit_s)


def statuses(data: bytes) -> list[int]:
    """Status codes of every response in `data` (responses are parsed by their Content-Length)."""
    out = []
    while data.startswith(b"HTTP/1.1 "):
        head, _, rest = data.partition(b"\r\n\r\n")
        out.append(int(head.split(b" ", 2)[1]))
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                       if line.lower().startswith(b"content-length:")), 0)
        data = rest[length:]
    return out


def refused(data: bytes, status: int, message: str = "") -> bool:
    """One response with `status`, a JSON error naming the problem, Connection: close, then EOF."""
    head, _, body = data.partition(b"\r\n\r\n")
    return (statuses(data) == [status] and b"connection: close" in head.lower()
            and message.lower() in json.loads(body)["error"].lower())


def still_serves(live) -> None:
    status, _, body = sf.Client(live.url).post("/v1/models/m:predict", GOOD)
    assert status == 200 and json.loads(body) == {"predictions": [0.5, 0.5]}


# ---- request smuggling: Content-Length vs Transfer-Encoding ---------------------------------------


@pytest.mark.parametrize("headers", [b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                                     b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"])
def test_content_length_with_chunked_is_400_and_close_and_the_smuggled_request_is_never_answered(live, headers):
    smuggled = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    data = exchange(live, PREDICT + headers + b"\r\n0\r\n\r\n" + smuggled)
    assert refused(data, 400, "Content-Length") and data.count(b"HTTP/1.1") == 1
    still_serves(live)
    samples = parse_metrics(sf.Client(live.url).get("/metrics")[2].decode())
    assert samples['ctrflow_http_refused_total{code="400"}'] >= 1


def test_a_refusal_pipelined_behind_a_good_request_is_answered_after_it_in_order(live):
    good = PREDICT + b"Content-Length: %d\r\n\r\n" % len(GOOD) + GOOD
    data = exchange(live, good + PREDICT + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + good)
    assert statuses(data) == [200, 400]


def test_pipelined_requests_are_answered_in_order_and_a_100_continue_waits_for_the_answers_before_it(live):
    good = PREDICT + b"Content-Length: %d\r\n\r\n" % len(GOOD) + GOOD
    with connect(live) as s:
        s.sendall(good * 3 + PREDICT + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(GOOD))
        data, deadline = b"", time.monotonic() + 5
        while b"100 Continue" not in data and time.monotonic() < deadline:
            data += s.recv(65536)
        assert statuses(data) == [200, 200, 200, 100]  # the 100 only after the three answers
        assert data.count(b"\r\ndate: ") == 3  # RFC 9110 6.6.1
        s.sendall(GOOD + b"GET /v1/models/m HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = read_all(s)
    assert statuses(data) == [200, 200] and data.count(b"connection: close") == 1


@pytest.mark.parametrize("lengths", [(b"2", b"5"), (b"5", b"5"), (b"5, 5",)])
def test_repeated_or_listed_content_length_is_400(live, lengths):
    head = b"".join(b"Content-Length: %s\r\n" % v for v in lengths)
    assert refused(exchange(live, PREDICT + head + b"\r\n" + b"abcde"), 400, "Content-Length")


@pytest.mark.parametrize("coding", [b"chunked, identity", b"identity, chunked", b"xchunkedx", b"gzip", b"chunked\r\nTransfer-Encoding: chunked"])
def test_only_an_exact_chunked_transfer_encoding_is_accepted(live, coding):
    data = exchange(live, PREDICT + b"Transfer-Encoding: " + coding + b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert refused(data, 400, "Transfer-Encoding")


def test_transfer_encoding_on_http_1_0_is_400(live):
    data = exchange(live, b"POST /v1/models/m:predict HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert refused(data, 400, "HTTP/1.0")


@pytest.mark.parametrize("size", [b"0x10", b"1_0", b"+10", b"-1", b"10 ", b"f" * 40])
def test_chunk_sizes_that_are_not_plain_hex_are_400(live, size):
    data = exchange(live, PREDICT + b"Transfer-Encoding: chunked\r\n\r\n" + size + b"\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n")
    assert refused(data, 400, "chunk size")


def test_a_chunk_without_its_crlf_is_400(live):
    assert refused(exchange(live, PREDICT + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX0\r\n\r\n"), 400)


def test_chunked_body_with_a_few_trailers_is_served_and_trailers_stay_out_of_the_headers(live):
    body = PREDICT + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n0\r\n" % (len(GOOD), GOOD)
    data = exchange(live, body + b"X-Deadline-Ms: soon\r\n\r\n" + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses(data) == [200, 200]  # a trailer named X-Deadline-Ms would have made the first a 400


def test_too_many_trailer_lines_are_400_and_the_rest_is_never_parsed_as_a_request(live):
    trailers = b"".join(b"X-T%d: v\r\n" % i for i in range(150))
    smuggled = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    data = exchange(live, PREDICT + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n" + trailers + b"\r\n" + smuggled)
    assert refused(data, 400, "trailer") and data.count(b"HTTP/1.1") == 1


# ---- malformed Content-Length: an answer, never a traceback ----------------------------------------


@pytest.mark.parametrize("value", ["²".encode(), b"9" * 5000, b"-5", b"+5", b"1 2", b"0x10", b""])
def test_malformed_content_length_is_400_not_a_traceback(live, value, caplog):
    with caplog.at_level(logging.WARNING):
        data = exchange(live, PREDICT + b"Content-Length: " + value + b"\r\n\r\nabcde")
    assert refused(data, 400, "Content-Length")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_head_requests_get_a_head_without_a_body(live):
    with connect(live) as s:
        s.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = read_all(s)
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 405 ") and rest.startswith(b"HTTP/1.1 200 ")  # no body after the HEAD answer


def test_post_without_a_length_is_411(live):
    assert refused(exchange(live, PREDICT + b"\r\n"), 411, "Content-Length")


@pytest.mark.parametrize("raw, message", [
    (b"GET /healthz HTTP/1.1\r\n\r\n", "Host"),
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "Host"),
    (b"GET /healthz HTTP/1.1\nHost: x\n\n", "Malformed"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", "Malformed"),
    (b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n", "Malformed"),
    (b"\x00\xff GARBAGE\r\n\r\n", "Malformed"),
])
def test_malformed_heads_are_400(live, raw, message):
    assert refused(exchange(live, raw), 400, message)


def test_a_head_over_the_limit_is_431_even_while_it_trickles_in(live):
    assert refused(exchange(live, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"), 431)
    with connect(live) as s:  # never-ending header: refused once max_header_bytes have arrived, not buffered on
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(400):  # 1.6 MB at most: refused after max_header_bytes plus at most one read
            try:
                s.sendall(b"a" * 4096)
            except (BrokenPipeError, ConnectionResetError):
                break
        assert refused(read_all(s), 431)


# ---- tiny chunks: bounded cost ---------------------------------------------------------------------


def test_a_body_in_2_byte_chunks_is_refused_within_a_few_chunks_and_others_are_served_meanwhile(live):
    with connect(live) as s:
        s.sendall(PREDICT + b"Transfer-Encoding: chunked\r\n\r\n")
        sent = 0
        for _ in range(10_000):  # an 8 MB-body attacker would send 4M of these; we stop when refused
            try:
                s.sendall(b"2\r\nab\r\n" * 16)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 16
            if sent > 2_000:
                break
        still_serves(live)
        assert refused(read_all(s), 400, "Chunks too small")


def test_a_body_in_moderate_chunks_is_served(live):
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(GOOD[i:i + 300]), GOOD[i:i + 300]) for i in range(0, len(GOOD), 300))
    padded = b"%x\r\n%s\r\n" % (300, b" " * 300) * 100  # JSON allows leading whitespace
    data = exchange(live, PREDICT + b"Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n" + padded + chunks + b"0\r\n\r\n")
    assert statuses(data) == [200]


# ---- timeouts ----------------------------------------------------------------------------------------


def test_a_head_that_does_not_arrive_in_time_is_408(live):
    with connect(live) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: the head never ends
        started = time.monotonic()
        data = read_all(s)
    assert refused(data, 408, "head") and time.monotonic() - started < 4


def test_a_body_that_does_not_arrive_in_time_is_408(live):
    with connect(live) as s:
        s.sendall(PREDICT + b"Content-Length: 100\r\n\r\n" + GOOD[:10])
        data = read_all(s)
    assert refused(data, 408, "body")
    still_serves(live)


def test_an_idle_keep_alive_connection_is_closed_without_an_answer(live):
    with connect(live, timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)
        first = s.recv(65536)
        assert statuses(first) == [200]
        assert read_all(s, 8) == b""  # keep_alive_timeout_s=5: closed, nothing sent


# ---- limits: body size, buffered bytes, connections -------------------------------------------------


def test_a_body_over_the_limit_gets_a_413_that_http_client_can_read_without_expect(live):
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=10)
    try:
        conn.request("POST", "/v1/models/m:predict", body=b"x" * (4 << 20), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 413 and "max_body_bytes" in json.loads(response.read())["error"]
    finally:
        conn.close()


def test_a_chunked_body_over_the_limit_is_413(live):
    chunk = b"%x\r\n%s\r\n" % (16384, b" " * 16384)
    data = exchange(live, PREDICT + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 5 + b"0\r\n\r\n")
    assert refused(data, 413, "max_body_bytes")


def test_bodies_buffered_over_the_total_cap_get_503_then_the_room_comes_back(live):
    holders = []
    try:
        for _ in range(MAX_BUFFERED // MAX_BODY):  # each announces a full-size body and sends half of it
            s = connect(live)
            s.sendall(PREDICT + b"Content-Length: %d\r\n\r\n" % MAX_BODY + b" " * (MAX_BODY // 2))
            holders.append(s)
        time.sleep(0.1)
        data = exchange(live, PREDICT + b"Content-Length: %d\r\n\r\n" % len(GOOD) + GOOD)
        assert refused(data, 503, "max_buffered_body_bytes") and b"retry-after: 1" in data.lower()
    finally:
        for s in holders:
            s.close()
    time.sleep(0.2)
    still_serves(live)


def test_connections_over_the_cap_get_503(live):
    sockets = []
    try:
        for _ in range(MAX_CONNECTIONS):
            sockets.append(connect(live))
        time.sleep(0.1)
        with connect(live) as extra:
            data = read_all(extra, 3)
        assert refused(data, 503, "connections")
    finally:
        for s in sockets:
            s.close()
    time.sleep(0.2)
    still_serves(live)


def test_a_client_that_never_reads_its_answers_is_dropped_after_the_drain_timeout(live):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", live.port))
    try:
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        n = 3000
        try:
            s.sendall(request * n)  # pipelined; the answers (n * ~8 KB) overfill every buffer
        except (BrokenPipeError, ConnectionResetError):
            pass  # dropped while we were still sending
        drops = 0.0
        deadline = time.monotonic() + 20  # the buffers fill at the server's pace (a busy machine is slow)
        while drops < 1 and time.monotonic() < deadline:
            time.sleep(0.5)
            drops = parse_metrics(sf.Client(live.url).get("/metrics")[2].decode())["ctrflow_http_drain_timeouts_total"]
        got = read_all(s, 5)
    finally:
        s.close()
    assert drops >= 1 and 0 < got.count(b"HTTP/1.1 200") < n  # dropped: the rest was never sent
    still_serves(live)


# ---- graceful stop -----------------------------------------------------------------------------------


def test_stop_finishes_in_flight_requests_and_refuses_new_connections(tmp_path):
    slow = sf.SlowPredictor()
    server = sf.slow_server(tmp_path, slow)
    results = {}

    def call():
        results["status"] = sf.Client(server.url).post("/v1/models/m:predict", GOOD)[0]

    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 5
    while slow.batcher.stats().requests < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    stopper = threading.Thread(target=server.stop, kwargs={"grace_s": 5})
    stopper.start()
    time.sleep(0.3)  # the server is stopping, the request is still inside compute
    try:  # the listening socket is closed: refused, or (still in the backlog) closed without an answer
        with connect(server, timeout=2) as s:
            assert read_all(s, 2) == b""
    except ConnectionRefusedError:
        pass
    slow.gate.set()
    t.join(10)
    stopper.join(15)
    assert results["status"] == 200 and not stopper.is_alive()
