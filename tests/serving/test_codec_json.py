"""The fast JSON codec (orjson) answers exactly what the general TF Serving encoder answers, reads what
the standard library reads, and names the bad instance as before."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ctrflow.serving import tfserving
from ctrflow.serving.codec import RequestError, parse_predict_json, predict_json, scores_json


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
