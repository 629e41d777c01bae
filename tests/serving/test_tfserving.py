"""TF Serving semantics as pure functions: bodies, tensors, output filters, paths, config files, batching flags."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from ctrflow.errors import ConfigError, ModelNotFoundError
from ctrflow.serving import tfserving as tfs
from ctrflow.serving.config import load_model_config, parse_batching_parameters
from ctrflow.serving.rollout import Arm, choose_arm, parse_rollouts

STR, F64, F32, I32 = tfs.DT_STRING, tfs.DT_DOUBLE, tfs.DT_FLOAT, tfs.DT_INT32


def _sig(key="serving_default", inputs=None, outputs=None):
    inputs = inputs or {"C1": tfs.TensorInfo("serving_default_C1:0", STR, (-1,)),
                        "I1": tfs.TensorInfo("serving_default_I1:0", F64, (-1,))}
    outputs = outputs or {"logits": tfs.TensorInfo("o:0", F32, (-1,)), "probabilities": tfs.TensorInfo("o:1", F32, (-1,))}
    return {key: tfs.Signature(key, tfs.PREDICT_METHOD, inputs, outputs)}


def test_rest_bodies_decode_rows_and_columns_with_b64_and_nulls():
    sigs = _sig()
    rows = tfs.decode_json_request({"instances": [{"C1": "a", "I1": 1}, {"C1": {"b64": base64.b64encode(b"\xffz").decode()}, "I1": None}]}, sigs)
    assert rows.format == "instances" and rows.rows == 2 and rows.signature_key == "serving_default"
    assert rows.inputs["C1"].tolist() == [b"a", b"\xffz"] and rows.inputs["I1"].dtype == np.float64
    assert np.isnan(rows.inputs["I1"][1])
    cols = tfs.decode_json_request({"signature_name": "serving_default", "inputs": {"C1": ["a", "b"], "I1": [1.5, 2]}}, sigs)
    assert cols.format == "inputs" and cols.inputs["I1"].tolist() == [1.5, 2.0]
    # A single-input signature takes bare values in both formats, as TF Serving does.
    one = {"x": tfs.Signature("x", tfs.PREDICT_METHOD, {"v": tfs.TensorInfo("v:0", I32, (-1, 2))}, {"y": tfs.TensorInfo("y:0", F32, (-1,))})}
    assert tfs.decode_json_request({"signature_name": "x", "instances": [[1, 2], [3, 4]]}, one).inputs["v"].shape == (2, 2)
    assert tfs.decode_json_request({"signature_name": "x", "inputs": [[1, 2]]}, one).inputs["v"].dtype == np.int32


@pytest.mark.parametrize("doc, message", [
    ({"instances": [{"C1": "a"}]}, r"missing inputs \['I1'\]"),
    ({"instances": [{"C1": "a", "I1": 1}], "inputs": {}}, "Not both 'inputs' and 'instances' keys"),
    ({"signature_name": "serving_default"}, "Missing 'inputs' or 'instances' key"),
    ({"signature_name": "nope", "instances": [1]}, 'Serving signature name: "nope" not found in signature def'),
    ({"instances": [{"C1": "a", "I1": "x"}]}, "expected numbers for a DT_DOUBLE input"),
    ({"instances": [{"C1": 3, "I1": 1}]}, "expected a string"),
    ({"instances": [{"C1": {"b64": "!!"}, "I1": 1}]}, "not valid base64"),
    ({"inputs": {"C1": [["a"], "b"], "I1": [1, 2]}}, "ragged"),
    ({"instances": [{"C1": "a", "I1": 1}], "colour": 1}, "Unknown top-level keys"),
])
def test_rest_bodies_are_refused_with_tf_servings_words(doc, message):
    with pytest.raises(tfs.InvalidArgument, match=message):
        tfs.decode_json_request(doc, _sig())


def test_answers_are_shaped_by_the_number_of_outputs():
    two = {"logits": np.array([0.5, -1.0], np.float32), "probabilities": np.array([0.25, 0.75], np.float32)}
    assert json.loads(tfs.encode_json_response(two, "instances")) == {
        "predictions": [{"logits": 0.5, "probabilities": 0.25}, {"logits": -1.0, "probabilities": 0.75}]}
    assert json.loads(tfs.encode_json_response(two, "inputs")) == {"outputs": {"logits": [0.5, -1.0], "probabilities": [0.25, 0.75]}}
    one = {"probabilities": two["probabilities"]}
    assert json.loads(tfs.encode_json_response(one, "instances")) == {"predictions": [0.25, 0.75]}
    assert json.loads(tfs.encode_json_response(one, "inputs")) == {"outputs": [0.25, 0.75]}
    strings = {"name_bytes": np.array([b"\x00a"], object), "text": np.array([b"hi"], object)}
    assert json.loads(tfs.encode_json_response(strings, "instances")) == {
        "predictions": [{"name_bytes": {"b64": "AGE="}, "text": "hi"}]}
    with pytest.raises(tfs.InvalidArgument, match="Batch size of the outputs differs"):
        tfs.encode_json_response({"a": np.zeros(2), "b": np.zeros(3)}, "instances")


def test_grpc_tensors_fill_typed_fields_like_as_proto_field_and_read_both_forms():
    from tensorflow.core.framework import tensor_pb2

    t = tfs.ndarray_to_tensor(np.array([0.25, 0.5], np.float32), tensor_pb2.TensorProto())
    assert list(t.float_val) == [0.25, 0.5] and not t.tensor_content and [d.size for d in t.tensor_shape.dim] == [2]
    t = tfs.ndarray_to_tensor(np.array([[1, 2]], np.int32), tensor_pb2.TensorProto())
    assert list(t.int_val) == [1, 2] and t.dtype == I32
    t = tfs.ndarray_to_tensor(np.array([b"a", b"bc"], object), tensor_pb2.TensorProto())
    assert list(t.string_val) == [b"a", b"bc"] and t.dtype == STR
    content = tensor_pb2.TensorProto(dtype=F64, tensor_content=np.array([1.5, 2.5], "<f8").tobytes())
    content.tensor_shape.dim.add().size = 2
    assert tfs.tensor_to_ndarray(content).tolist() == [1.5, 2.5]
    fill = tensor_pb2.TensorProto(dtype=F32, float_val=[7.0])
    fill.tensor_shape.dim.add().size = 3
    assert tfs.tensor_to_ndarray(fill).tolist() == [7.0, 7.0, 7.0]  # one value fills the shape, as FromProto does
    bad = tensor_pb2.TensorProto(dtype=F32, tensor_content=b"\x00" * 12)
    bad.tensor_shape.dim.add().size = 2
    with pytest.raises(tfs.InvalidArgument, match="needs 2 values"):
        tfs.tensor_to_ndarray(bad)


def test_output_filter_checks_like_predict_util():
    sig = _sig()["serving_default"]
    assert tfs.select_outputs(sig, []) == ("logits", "probabilities")
    assert tfs.select_outputs(sig, ["probabilities"]) == ("probabilities",)
    with pytest.raises(tfs.InvalidArgument, match=r"output tensor alias not found in signature: x Outputs expected to be in the set \{logits,probabilities\}"):
        tfs.select_outputs(sig, ["x"])
    with pytest.raises(tfs.InvalidArgument, match="duplicate output tensor alias: logits"):
        tfs.select_outputs(sig, ["logits", "logits"])


def test_model_paths_with_versions_and_labels():
    from ctrflow.serving.codec import RequestError
    from ctrflow.serving.rest import ModelTarget, split_model_path

    assert split_model_path("ctr/labels/stable:predict") == ModelTarget("ctr", None, "", "predict", "stable")
    assert split_model_path("ctr/versions/3/metadata") == ModelTarget("ctr", 3, "metadata", "", None)
    for bad in ("ctr/versions/x", "ctr/labels/", "/versions/1"):
        with pytest.raises(RequestError) as e:
            split_model_path(bad)
        assert e.value.status == 404


def test_tf_serving_textproto_config_with_policies_and_labels(tmp_path):
    cfg = tmp_path / "models.config"
    cfg.write_text('''
model_config_list {
  config { name: "ctr" base_path: "ctr" model_platform: "tensorflow"
           model_version_policy { specific { versions: 3 versions: 4 } }
           version_labels { key: "stable" value: 3 } version_labels { key: "canary" value: 4 } }
  config { name: "cvr" base_path: "/srv/cvr" model_version_policy { latest { num_versions: 2 } } }
  config { name: "all" base_path: "/srv/all" model_version_policy { all {} } }
}''')
    config = load_model_config(cfg, batching=None)
    ctr, cvr, every = config.models
    assert config.format == "textproto"
    assert ctr.base_path == str(tmp_path / "ctr") and ctr.version_policy == "specific" and ctr.versions == (3, 4)
    assert ctr.labels == {"stable": 3, "canary": 4} and ctr.batching is None
    assert cvr.version_policy == "latest" and cvr.keep_versions == 2 and every.version_policy == "all"
    for text, message in [
        ('model_config_list { config { name: "a" base_path: "x" model_platform: "pytorch" } }', "only 'tensorflow'"),
        ('model_config_list { config { name: "a" } }', "'name' and 'base_path' are required"),
        ('model_config_list { config { name: "a" base_path: "x" colour: 1 } }', r"models.config:1:\d+ .*colour"),
        ('model_config_list { config { name: "a" base_path: "x" } config { name: "a" base_path: "y" } }', "more than once"),
        ('model_config_list { config { name: "a" base_path: "x" version_labels { key: "b c" value: 1 } } }', "version label"),
    ]:
        cfg.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_model_config(cfg)


def test_yaml_config_speaks_the_same_policies_and_rollouts(tmp_path):
    cfg = tmp_path / "m.yaml"
    cfg.write_text("models:\n  - {name: a, base_path: x, version_policy: specific, versions: [1, 2], labels: {stable: 1}}\n"
                   "rollouts:\n  - {name: a, key: {header: X-User}, arms: [{model: a, version: 1, weight: 9}, {model: a, label: stable}]}\n")
    config = load_model_config(cfg)
    assert config.models[0].versions == (1, 2) and config.models[0].labels == {"stable": 1}
    (rollout,) = parse_rollouts(config.rollouts, ["a"])
    assert rollout.key_header == "X-User" and [a.weight for a in rollout.arms] == [9.0, 1.0]
    for text, message in [
        ("models:\n  - {name: a, base_path: x, version_policy: newest}\n", "version_policy"),
        ("models:\n  - {name: a, base_path: x, version_policy: specific}\n", "'versions' lists the versions"),
        ("models:\n  - {name: a, base_path: x, lables: {}}\n", "did you mean 'labels'"),
    ]:
        cfg.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_model_config(cfg)
    with pytest.raises(ConfigError, match="must name a served model"):
        parse_rollouts([{"name": "r", "arms": [{"model": "b"}]}], ["a"])
    with pytest.raises(ConfigError, match=r"'fraction' must be a number in \[0, 1\]"):
        parse_rollouts([{"name": "r", "arms": [{"model": "a"}], "shadow": {"model": "a", "fraction": 2}}], ["a"])


def test_batching_parameters_file_in_tf_servings_format(tmp_path):
    f = tmp_path / "batching.config"
    f.write_text("max_batch_size { value: 256 }\nbatch_timeout_micros { value: 500 }\nnum_batch_threads { value: 2 }\n"
                 "max_enqueued_batches { value: 4 }\nallowed_batch_sizes: 128\nallowed_batch_sizes: 256\n")
    opts = parse_batching_parameters(f)
    assert (opts.max_batch_size, opts.batch_timeout_ms, opts.num_batch_threads, opts.max_enqueued) == (256, 0.5, 2, 1024)
    f.write_text("max_batch_size { value: 0 }\n")
    with pytest.raises(ConfigError, match="max_batch_size"):
        parse_batching_parameters(f)
    f.write_text("max_batch_size: 12\n")  # a wrapper type, as in TF Serving: needs { value: 12 }
    with pytest.raises(ConfigError, match=r"batching.config:1:"):
        parse_batching_parameters(f)


def test_rendezvous_split_is_sticky_weighted_and_moves_few_keys():
    arms = [Arm("m", 90, version=1), Arm("m", 10, version=2)]
    keys = [f"user-{i}" for i in range(20_000)]
    first = [choose_arm(arms, k).version for k in keys]
    assert first == [choose_arm(arms, k).version for k in keys]  # sticky
    share = first.count(2) / len(keys)
    assert 0.08 < share < 0.12
    moved = [choose_arm([Arm("m", 80, version=1), Arm("m", 20, version=2)], k).version for k in keys]
    # Raising the canary to 20 % moves only keys onto it (~10 % of all), never off it.
    assert all(b == 2 for a, b in zip(first, moved) if a == 2)
    assert 0.07 < sum(a != b for a, b in zip(first, moved)) / len(keys) < 0.13
