"""Property tests: random and mutated bodies never crash the REST decoders or the live server."""
from __future__ import annotations

import json
import math
import socket

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import serving_fixtures as sf
from ctrflow.client.columnar import encode_columnar
from ctrflow.serving.codec import RequestError, decode_columnar, parse_predict_json
from serving_fixtures import Client

CATS = ("C1", "C2", "C3")
NUMS = ("I1", "I2")
FIELDS = CATS + NUMS

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.sampled_from(["", "0", "abc", "\u00e9", "1e400"]),
)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
                           max_leaves=20)
instance = st.fixed_dictionaries({}, optional={n: json_values for n in (*FIELDS, "extra")})
good_instance = st.fixed_dictionaries({
    **{n: st.one_of(st.none(), st.text(max_size=10), st.integers(0, 10**6)) for n in CATS},
    **{n: st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False, width=32), st.integers(-1000, 10**6)) for n in NUMS},
})
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"instances": st.lists(instance, max_size=4)}, optional={"signature_name": json_values}),
    st.fixed_dictionaries({"inputs": st.dictionaries(st.sampled_from(FIELDS + ("zz",)), json_values, max_size=6)}),
    st.fixed_dictionaries({"instances": st.lists(good_instance, min_size=1, max_size=5)}),
).map(lambda b: b if isinstance(b, bytes) else json.dumps(b).encode())


def check_parsed(request) -> None:
    assert request.rows >= 1
    for name in CATS:
        col = request.features[name]
        assert col.dtype == object and len(col) == request.rows and all(type(v) is str for v in col)
    for name in NUMS:
        col = request.features[name]
        assert col.dtype == np.float64 and len(col) == request.rows


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_predict_parser_returns_clean_columns_or_a_400(body):
    try:
        request = parse_predict_json(body, CATS, NUMS)
    except RequestError as e:
        assert e.status == 400 and str(e)
    else:
        check_parsed(request)


@settings(max_examples=200, deadline=None)
@given(st.lists(good_instance, min_size=1, max_size=6))
def test_well_formed_rows_and_columns_decode_to_the_same_arrays(rows):
    by_rows = parse_predict_json(json.dumps({"instances": rows}).encode(), CATS, NUMS)
    by_cols = parse_predict_json(json.dumps({"inputs": {n: [r[n] for r in rows] for n in FIELDS}}).encode(), CATS, NUMS)
    check_parsed(by_rows)
    for n in FIELDS:
        np.testing.assert_array_equal(by_rows.features[n], by_cols.features[n])
    for n in NUMS:
        want = [math.nan if r[n] is None else float(r[n]) for r in rows]
        np.testing.assert_array_equal(by_rows.features[n], np.array(want))


@settings(max_examples=300, deadline=None)
@given(st.lists(good_instance, min_size=1, max_size=4), st.data())
def test_binary_columnar_round_trips_and_any_corruption_is_a_400(rows, data):
    cols = {n: [r[n] for r in rows] for n in FIELDS}
    body = encode_columnar(cols, CATS, NUMS)
    features, n = decode_columnar(body, CATS, NUMS)
    assert n == len(rows) and set(features) == set(FIELDS)
    for name in CATS:
        # NUL-padded fixed width: trailing NULs are padding by definition (COLUMNAR_FORMAT says so)
        assert list(features[name]) == [b"" if v is None else str(v).encode().rstrip(b"\x00") for v in cols[name]]
    # Flip, cut or extend the body anywhere: a clean 400 or a well-formed decode, never a crash.
    mutation = data.draw(st.sampled_from(["flip", "cut", "extend"]))
    at = data.draw(st.integers(0, len(body) - 1))
    if mutation == "flip":
        mutated = body[:at] + bytes([body[at] ^ data.draw(st.integers(1, 255))]) + body[at + 1:]
    elif mutation == "cut":
        mutated = body[:at]
    else:
        mutated = body + data.draw(st.binary(min_size=1, max_size=8))
    try:
        features, n = decode_columnar(mutated, CATS, NUMS)
    except RequestError as e:
        assert e.status == 400
    else:
        assert all(len(v) == n for v in features.values()) and set(features) == set(FIELDS)


@pytest.fixture(scope="module")
def live():
    return sf.server()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=bodies, path=st.sampled_from(["/v1/models/ctr:predict", "/v1/models/ctr:predict_columnar"]))
def test_live_server_answers_random_bodies_without_a_500_and_keeps_serving(live, body, path):
    status, headers, data = Client(live.url).post(path, body, {"Content-Type": "application/json"})
    assert status in (200, 400), data
    assert "error" in json.loads(data) if status != 200 else True


def test_live_server_survives_raw_garbage_on_the_socket(live):
    for garbage in (b"\x00\xff" * 100 + b"\r\n\r\n", b"POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                    b"GET /healthz HTTP/1.1\r\nbad header line\r\n\r\n", b"POST /v1/models/ctr:predict HTTP/1.1\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"):
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as s:
            s.sendall(garbage)
            assert s.recv(65536).split(b" ")[1] in (b"400", b"404", b"411")
    rows = sf.small_model()[2][:2]
    assert Client(live.url).post("/v1/models/ctr:predict", {"instances": rows})[0] == 200


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(raw=st.one_of(st.binary(max_size=200),
                     st.builds(lambda m, t, h: m + b" " + t + b" HTTP/1.1\r\n" + h, st.sampled_from([b"GET", b"POST", b"PUT", b"G\x00T"]),
                               st.binary(max_size=20), st.binary(max_size=80))))
def test_live_server_answers_random_request_heads_with_a_status_or_closes(live, raw):
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as s:
        s.sendall(raw + b"\r\n\r\n")
        s.shutdown(socket.SHUT_WR)  # no more bytes: the server answers what it has, or closes
        data = b""
        while True:
            try:
                part = s.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            data += part
    if data:
        assert data.startswith(b"HTTP/1.1 ") and int(data[9:12]) in (200, 400, 404, 405, 408, 411, 413, 431), data[:200]
