"""The fast codec paths: JSON (orjson) answers exactly what the general TF Serving encoder answers, reads
what the standard library reads and names the bad instance as before; the binary columnar decoder's
remembered layouts decode as the checked decoder does and never let a bad body through."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ctrflow.serving import tfserving
from ctrflow.client.columnar import encode_columnar
from ctrflow.serving.codec import RequestError, decode_columnar, parse_predict_json, predict_json, scores_json


def _as_float32(doc):
    return json.loads(json.dumps(doc), parse_float=lambda s: float(np.float32(float(s))))


@pytest.mark.parametrize("rows", [1, 3, 100])
@pytest.mark.parametrize("names", [("logits", "probabilities"), ("p",), ("a", "b|,\"c", "d")])
@pytest.mark.parametrize("fmt", ["instances", "inputs"])
def test_fast_answers_equal_the_general_encoder(rows, names, fmt):
    rng = np.random.default_rng(rows)
    stacked = rng.normal(size=(rows, len(names))).astype(np.float32)
    outputs = {n: stacked[:, i] for i, n in enumerate(names)}  # column views, as the predictor splits them
    fast = predict_json(outputs, fmt)
    assert fast is not None
    assert _as_float32(json.loads(fast)) == _as_float32(json.loads(tfserving.encode_json_response(outputs, fmt)))
    got = json.loads(fast)["predictions" if fmt == "instances" else "outputs"]
    first = got[0][names[0]] if fmt == "instances" and len(names) > 1 else got[names[0]][0] if len(names) > 1 else got[0]
    assert np.float32(first) == stacked[0, 0]  # float32 printed in a form that reads back exactly


def test_what_the_fast_encoder_leaves_to_the_general_one():
    assert predict_json({"p": np.array([0.5, np.nan], np.float32)}, "instances") is None  # NaN: the general encoder
    assert predict_json({"s": np.array([b"x"])}, "instances") is None
    assert predict_json({"m": np.zeros((2, 2), np.float32)}, "inputs") is None
    assert predict_json({"a": np.zeros(2, np.float32), "b": np.zeros(3, np.float32)}, "inputs") is None
    assert json.loads(scores_json("outputs", np.array([0.25, 0.5], np.float32))) == {"outputs": [0.25, 0.5]}


def test_bodies_orjson_refuses_are_read_by_json_and_bad_rows_named():
    doc = b'{"instances": [{"C1": "a", "I1": NaN}, {"C1": "b", "I1": 2}]}'  # NaN: not JSON, but json reads it
    parsed = parse_predict_json(doc, ("C1",), ("I1",))
    assert np.isnan(parsed.features["I1"][0]) and parsed.features["I1"][1] == 2.0
    for body, message in [
        (b'{"instances": [{"C1": "a", "I1": 1}, {"C1": "b"}]}', "instances[1]: missing features ['I1']"),
        (b'{"instances": [{"C1": "a", "I1": 1}, {"C1": "b", "X": 1}]}', "instances[1]: missing features ['I1']; unknown features ['X']"),
        (b'{"instances": [{"C1": "a", "I1": 1}, 7]}', "instances[1] must be an object"),
        (b'{"instances": [{"C1": "a", "I1": 1, "I2": 3}]}', "instances[0]: unknown features ['I2']"),
        (b'{"instances": [', "Malformed JSON"),
    ]:
        with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_predict_json(body, ("C1",), ("I1",))


def test_columnar_layouts_seen_before_decode_the_same_and_bad_bodies_still_fail():
    cats, nums = ("C1", "C2"), ("I1",)
    good = encode_columnar({"C1": ["ab", "c"], "C2": ["", "xyz"], "I1": [1.5, None]}, cats, nums)
    for _ in range(2):  # cold (checked, learns the headers), then warm (looked up)
        out, rows = decode_columnar(good, cats, nums)
        assert rows == 2 and out["C1"].tolist() == [b"ab", b"c"] and out["C2"].tolist() == [b"", b"xyz"]
        assert out["I1"][0] == 1.5 and np.isnan(out["I1"][1])
    out, _ = decode_columnar(bytearray(good), cats, nums)  # a body gathered from chunks
    assert out["C2"].tolist() == [b"", b"xyz"]
    head, col1 = good[:12], good[12:12 + 2 + 2 + 6 + 2 * 2]  # body header (n_columns at 6:8); C1's column
    for body, message in [
        (good + b"\0", "1 bytes after its last column"),
        (good[:-1], "ends inside the values of feature 'I1'"),
        (head[:6] + b"\x04\0" + head[8:] + good[12:] + col1, "appears twice"),  # four columns, C1 twice
        (head[:6] + b"\x01\0" + head[8:] + good[12:], "after its last column"),  # one column announced, three sent
        (encode_columnar({"C1": ["ab"], "C2": ["z"]}, cats, ()), "missing features"),  # I1 not sent
        (encode_columnar({"C1": ["a"], "X": ["b"], "I1": [1.0]}, ("C1", "X"), nums), "Unknown feature 'X'"),
    ]:
        with pytest.raises(RequestError, match=message):
            decode_columnar(body, cats, nums)
