"""TensorFlow Serving's wire semantics as pure functions: what a request means and how the answer looks.

The front ends (REST routes, the gRPC servicer) call these so a client written for TF Serving sees
exactly TF Serving's behaviour for the SavedModel served:

- **Signatures** are read from the version's own `saved_model.pb` (`read_signature_defs`), so the
  metadata answer is the true `SignatureDef` (ctrflow's numerics are `DT_DOUBLE` in `serving_default`)
  and every signature (`serving_default`, `predict_ids`, `transform`, or a plain SavedModel's own) can
  be called by its key.
- **REST bodies** (`decode_json_request`, `encode_json_response`) follow TF Serving's
  `json_tensor.cc`: row format `{"instances": [...]}` answers `{"predictions": [...]}`, columnar
  `{"inputs": ...}` answers `{"outputs": ...}`; a signature with ONE output answers bare values (a flat
  list per row), one with SEVERAL outputs answers per-output objects (`[{"logits": .., "probabilities":
  ..}]` / `{"outputs": {"logits": [..], "probabilities": [..]}}`). `{"b64": "..."}` is a bytes value;
  string outputs whose alias ends in `_bytes` are answered as `{"b64": ...}`.
- **gRPC tensors** (`tensor_to_ndarray`, `ndarray_to_tensor`) fill the typed `*_val` fields as
  `tensorflow::Tensor::AsProtoField` does (TF Serving's default serialization in `predict_util.cc`),
  so `resp.outputs["probabilities"].float_val` holds the scores; requests may use either form.
- **output_filter** (`select_outputs`) with TF Serving's own error wording.
- **Versions**: `ctrflow.serving.rest.split_model_path` parses `/v1/models/NAME[/versions/V | /labels/L][/metadata][:verb]`.

Nothing here holds state or touches the network. Errors raise `InvalidArgument` (a `SchemaError`:
REST 400, gRPC INVALID_ARGUMENT) or `ModelNotFoundError` (404 / NOT_FOUND).
"""
from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctrflow.errors import ModelNotFoundError, SchemaError

__all__ = [
    "InvalidArgument",
    "JsonRequest",
    "Signature",
    "TensorInfo",
    "WARMUP_FILE",
    "decode_json_request",
    "encode_json_response",
    "metadata_json",
    "metadata_response",
    "ndarray_to_tensor",
    "predict_response",
    "read_signature_defs",
    "select_outputs",
    "signatures_from_defs",
    "tensor_to_ndarray",
]

# TF Serving's warmup convention: a TFRecord file of PredictionLog protos inside the version folder.
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
PREDICT_METHOD = "tensorflow/serving/predict"

# tensorflow/core/framework/types.proto
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_UINT8, DT_INT16, DT_INT8, DT_STRING = 1, 2, 3, 4, 5, 6, 7
DT_INT64, DT_BOOL, DT_UINT16, DT_HALF, DT_UINT32, DT_UINT64 = 9, 10, 17, 19, 22, 23
_NUMPY = {
    DT_FLOAT: np.float32, DT_DOUBLE: np.float64, DT_INT32: np.int32, DT_UINT8: np.uint8, DT_INT16: np.int16,
    DT_INT8: np.int8, DT_INT64: np.int64, DT_BOOL: np.bool_, DT_UINT16: np.uint16, DT_HALF: np.float16,
    DT_UINT32: np.uint32, DT_UINT64: np.uint64, DT_STRING: object,
}
_FIELD = {  # the TensorProto field AsProtoField fills, by dtype
    DT_FLOAT: "float_val", DT_DOUBLE: "double_val", DT_INT32: "int_val", DT_UINT8: "int_val", DT_INT16: "int_val",
    DT_INT8: "int_val", DT_UINT16: "int_val", DT_INT64: "int64_val", DT_BOOL: "bool_val", DT_HALF: "half_val",
    DT_UINT32: "uint32_val", DT_UINT64: "uint64_val", DT_STRING: "string_val",
}
_FROM_NUMPY = {np.dtype(v): k for k, v in _NUMPY.items() if v is not object}
_DT_NAMES = {DT_FLOAT: "DT_FLOAT", DT_DOUBLE: "DT_DOUBLE", DT_INT32: "DT_INT32", DT_UINT8: "DT_UINT8",
             DT_INT16: "DT_INT16", DT_INT8: "DT_INT8", DT_STRING: "DT_STRING", DT_INT64: "DT_INT64",
             DT_BOOL: "DT_BOOL", DT_UINT16: "DT_UINT16", DT_HALF: "DT_HALF", DT_UINT32: "DT_UINT32",
             DT_UINT64: "DT_UINT64"}


class InvalidArgument(SchemaError):
    """A request TF Serving would refuse with INVALID_ARGUMENT (REST 400)."""


# ---- signatures -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of a signature: graph tensor name, dtype enum, shape (-1 = any; None = unknown rank)."""

    name: str
    dtype: int
    shape: tuple[int, ...] | None

    @property
    def dtype_name(self) -> str:
        return _DT_NAMES.get(self.dtype, f"DT_{self.dtype}")


@dataclass(frozen=True)
class Signature:
    """A SignatureDef in plain Python: what a client sends (`inputs`) and gets back (`outputs`), by alias."""

    key: str
    method_name: str
    inputs: Mapping[str, TensorInfo]
    outputs: Mapping[str, TensorInfo]

    @property
    def output_names(self) -> tuple[str, ...]:
        """Output aliases in answer order (sorted, like the JSON TF Serving writes)."""
        return tuple(sorted(self.outputs))


def read_signature_defs(version_dir: str | Path) -> Any:
    """The `SignatureDefMap` proto of a SavedModel folder, as written in its `saved_model.pb` (serve tag)."""
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow_serving.apis import get_model_metadata_pb2

    path = Path(version_dir) / "saved_model.pb"
    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString(path.read_bytes())
    except (OSError, ValueError) as e:  # protobuf's DecodeError is a ValueError... in recent versions
        raise ModelNotFoundError(f"{path}: cannot read the SavedModel ({e}).") from None
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError
        raise ModelNotFoundError(f"{path}: not a SavedModel ({type(e).__name__}: {e}).") from None
    graphs = [g for g in saved.meta_graphs if "serve" in g.meta_info_def.tags] or list(saved.meta_graphs)
    if not graphs:
        raise ModelNotFoundError(f"{path}: the SavedModel holds no MetaGraph.")
    out = get_model_metadata_pb2.SignatureDefMap()
    for key, sig in graphs[0].signature_def.items():
        if key.startswith("__"):  # TF's internal "__saved_model_init_op"
            continue
        out.signature_def[key].CopyFrom(sig)
    return out


def signatures_from_defs(defs: Any) -> dict[str, Signature]:
    """`SignatureDefMap` proto → {key: Signature}."""

    def info(t: Any) -> TensorInfo:
        shape = None if t.tensor_shape.unknown_rank else tuple(int(d.size) for d in t.tensor_shape.dim)
        return TensorInfo(t.name, int(t.dtype), shape)

    return {
        key: Signature(key, sig.method_name, {a: info(t) for a, t in sig.inputs.items()},
                       {a: info(t) for a, t in sig.outputs.items()})
        for key, sig in defs.signature_def.items()
    }


def metadata_response(name: str, version: int, defs: Any, fields: Sequence[str] = ()) -> Any:
    """gRPC `GetModelMetadataResponse`: the SignatureDefMap packed in `metadata["signature_def"]`."""
    from tensorflow_serving.apis import get_model_metadata_pb2

    wanted = set(fields) or {"signature_def"}
    if wanted != {"signature_def"}:
        raise InvalidArgument(f"Metadata field {sorted(wanted - {'signature_def'})[0]} is not supported")
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = name
    response.model_spec.version.value = version
    response.metadata["signature_def"].Pack(defs)
    return response


def metadata_json(name: str, version: int, defs: Any) -> dict[str, Any]:
    """REST `GET /v1/models/NAME/metadata`: TF Serving prints the gRPC answer with protobuf's JSON
    mapping (proto field names, default values printed, int64 as strings)."""
    from google.protobuf import json_format

    doc = json_format.MessageToDict(defs, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    doc["@type"] = "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    doc = {"@type": doc.pop("@type"), **doc}
    return {"model_spec": {"name": name, "signature_name": "", "version": str(version)},
            "metadata": {"signature_def": doc}}


def select_outputs(signature: Signature, output_filter: Sequence[str]) -> tuple[str, ...]:
    """The output aliases to answer: the filter's (in its order, checked as TF Serving checks it), or all."""
    seen: list[str] = []
    for alias in output_filter:
        if alias not in signature.outputs:
            raise InvalidArgument(f"output tensor alias not found in signature: {alias} Outputs expected to be in "
                                  f"the set {{{','.join(sorted(signature.outputs))}}}.")
        if alias in seen:
            raise InvalidArgument(f"duplicate output tensor alias: {alias}")
        seen.append(alias)
    return tuple(seen) or signature.output_names


# ---- gRPC tensors ---------------------------------------------------------------------------------


def tensor_to_ndarray(tensor: Any, *, name: str = "input") -> np.ndarray:
    """A TensorProto → numpy (object array of bytes for DT_STRING). Reads `tensor_content` or the typed
    `*_val` field; a single typed value fills the whole shape, as TensorFlow's `FromProto` does."""
    dtype = int(tensor.dtype)
    np_dtype = _NUMPY.get(dtype)
    if np_dtype is None:
        raise InvalidArgument(f"input {name!r}: dtype {_DT_NAMES.get(dtype, dtype)} is not supported.")
    shape = tuple(int(d.size) for d in tensor.tensor_shape.dim)
    if any(s < 0 for s in shape):
        raise InvalidArgument(f"input {name!r}: shape {list(shape)} has a negative dimension.")
    n = int(np.prod(shape)) if shape else 1
    if dtype == DT_STRING:
        arr = np.empty(len(tensor.string_val), dtype=object)
        arr[:] = list(tensor.string_val)
    elif tensor.tensor_content:
        if len(tensor.tensor_content) % np.dtype(np_dtype).itemsize:
            raise InvalidArgument(f"input {name!r}: tensor_content length does not fit dtype {_DT_NAMES[dtype]}.")
        arr = np.frombuffer(tensor.tensor_content, dtype=np.dtype(np_dtype).newbyteorder("<")).astype(np_dtype)
    elif dtype == DT_HALF:
        arr = np.array(tensor.half_val, np.uint16).view(np.float16)
    else:
        arr = np.array(getattr(tensor, _FIELD[dtype]), dtype=np_dtype)
    if arr.size != n:
        if arr.size == 1 or (arr.size and arr.size < n and dtype != DT_STRING and not tensor.tensor_content):
            arr = np.concatenate([arr, np.full(n - arr.size, arr[-1], dtype=arr.dtype)])  # TF pads with the last value
        else:
            raise InvalidArgument(f"input {name!r}: shape {list(shape)} needs {n} values, the tensor holds {arr.size}.")
    return arr.reshape(shape)


def ndarray_to_tensor(values: Any, tensor: Any) -> Any:
    """Fill a TensorProto from numpy as `Tensor::AsProtoField` does: dtype, shape, typed `*_val` values."""
    arr = np.asarray(values)
    if arr.dtype.kind in "OSU":
        dtype = DT_STRING
        flat = [v if isinstance(v, bytes) else str(v).encode() for v in arr.reshape(-1)]
    else:
        dtype = _FROM_NUMPY.get(arr.dtype)
        if dtype is None:
            raise InvalidArgument(f"cannot answer a tensor of numpy dtype {arr.dtype}.")
        flat = arr.reshape(-1).view(np.uint16) if dtype == DT_HALF else arr.reshape(-1)
    tensor.dtype = dtype
    for s in arr.shape:
        tensor.tensor_shape.dim.add().size = int(s)
    getattr(tensor, _FIELD[dtype]).extend(flat if dtype == DT_STRING else flat.tolist())
    return tensor


def predict_response(name: str, version: int, signature_key: str, outputs: Mapping[str, np.ndarray]) -> Any:
    """gRPC `PredictResponse` with every output filled AsProtoField-style."""
    from tensorflow_serving.apis import predict_pb2

    response = predict_pb2.PredictResponse()
    response.model_spec.name = name
    response.model_spec.version.value = version
    response.model_spec.signature_name = signature_key
    for alias, values in outputs.items():
        ndarray_to_tensor(values, response.outputs[alias])
    return response


# ---- REST JSON ------------------------------------------------------------------------------------


@dataclass
class JsonRequest:
    """A decoded REST predict body: which signature, which format, and one numpy array per input alias."""

    signature_key: str
    format: str  # "instances" (row format) or "inputs" (columnar)
    inputs: dict[str, np.ndarray]
    rows: int | None  # batch size in row format (None in columnar format)


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _is_b64(value: Any) -> bool:
    return type(value) is dict and len(value) == 1 and "b64" in value


def _strings(value: Any, where: str) -> Any:
    """Nested JSON strings / {"b64"} objects → nested lists of bytes."""
    if type(value) is str:
        return value.encode()
    if type(value) is list:
        return [_strings(v, where) for v in value]
    if _is_b64(value):
        raw = value["b64"]
        if type(raw) is not str:
            raise InvalidArgument(f"{where}: 'b64' must hold a base64 string. Got a JSON {_json_type(raw)}.")
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument(f"{where}: 'b64' value is not valid base64.") from None
    if value is None:
        return b""
    raise InvalidArgument(f"{where}: expected a string (or {{\"b64\": ...}}). Got a JSON {_json_type(value)}.")


def _to_array(value: Any, info: TensorInfo, where: str) -> np.ndarray:
    """A JSON value → numpy of the signature's dtype; null is NaN for floats (ctrflow's missing value)."""
    if info.dtype == DT_STRING:
        nested = _strings(value, where)
        shape = _rect_shape(nested, where)
        flat: list[bytes] = []
        _flatten(nested, flat)
        arr = np.empty(len(flat), dtype=object)
        arr[:] = flat
        return arr.reshape(shape)
    np_dtype = _NUMPY.get(info.dtype)
    if np_dtype is None:
        raise InvalidArgument(f"{where}: input dtype {info.dtype_name} is not supported over JSON.")
    if _contains_type(value, (str, dict, bool)) and info.dtype != DT_BOOL:
        raise InvalidArgument(f"{where}: expected numbers for a {info.dtype_name} input.")
    try:
        if np.issubdtype(np_dtype, np.floating):
            return np.array(value, dtype=np.float64).astype(np_dtype)
        if info.dtype == DT_BOOL:
            return np.array(value, dtype=np.bool_)
        arr = np.array(value, dtype=np.float64)
        if arr.size and (not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))):
            raise InvalidArgument(f"{where}: expected integers for a {info.dtype_name} input.")
        info_i = np.iinfo(np_dtype)
        if arr.size and (arr.min() < info_i.min or arr.max() > info_i.max):
            raise InvalidArgument(f"{where}: a value is out of the {info.dtype_name} range.")
        return arr.astype(np_dtype)
    except (ValueError, TypeError, OverflowError):
        raise InvalidArgument(f"{where}: not a rectangular array of numbers (ragged rows, or null in an integer "
                              "input).") from None


def _rect_shape(nested: Any, where: str) -> tuple[int, ...]:
    if not isinstance(nested, list):
        return ()
    shapes = {_rect_shape(v, where) for v in nested}
    if len(shapes) > 1:
        raise InvalidArgument(f"{where}: the nested lists are ragged; every row needs the same shape.")
    return (len(nested), *(shapes.pop() if shapes else ()))


def _flatten(nested: Any, out: list) -> None:
    if isinstance(nested, list):
        for v in nested:
            _flatten(v, out)
    else:
        out.append(nested)


def _contains_type(value: Any, types: tuple) -> bool:
    if isinstance(value, types):
        return True
    if type(value) is list:
        return any(_contains_type(v, types) for v in value[:1]) or (
            len(value) > 1 and any(_contains_type(v, types) for v in value[1:]))
    return False


def _check_shape(arr: np.ndarray, info: TensorInfo, where: str) -> None:
    if info.shape is None:
        return
    if arr.ndim != len(info.shape) or any(w not in (-1, s) for w, s in zip(info.shape, arr.shape)):
        raise InvalidArgument(f"{where}: shape {list(arr.shape)} does not match the signature's "
                              f"{list(info.shape)} (-1: any size).")


def decode_json_request(doc: Any, signatures: Mapping[str, Signature]) -> JsonRequest:
    """A parsed REST predict body → the signature it calls and numpy inputs, checked against that signature.

    Accepts TF Serving's documented bodies: `{"signature_name"?, "instances": [...]}` (each element an
    object of named inputs, or a bare value when the signature has one input) or `{"signature_name"?,
    "inputs": {...}}` (an object of named inputs, or a bare value for a single-input signature).
    """
    if not isinstance(doc, dict):
        raise InvalidArgument(f"The body must be a JSON object with 'instances' or 'inputs'. Got a JSON {_json_type(doc)}.")
    unknown = set(doc) - {"instances", "inputs", "signature_name"}
    if unknown:
        raise InvalidArgument(f"Unknown top-level keys {sorted(unknown)[:10]}; a predict body has 'instances' or "
                              "'inputs' and optionally 'signature_name'.")
    key = doc.get("signature_name") or "serving_default"
    if not isinstance(key, str):
        raise InvalidArgument(f"'signature_name' must be a string. Got a JSON {_json_type(key)}.")
    signature = signatures.get(key)
    if signature is None:
        raise InvalidArgument(f"Serving signature name: \"{key[:100]}\" not found in signature def; this model has "
                              f"{sorted(signatures)}.")
    if "instances" not in doc and "inputs" not in doc:
        raise InvalidArgument("Missing 'inputs' or 'instances' key")
    if "instances" in doc and "inputs" in doc:
        raise InvalidArgument("Not both 'inputs' and 'instances' keys")
    names = sorted(signature.inputs)
    if "instances" in doc:
        instances = doc["instances"]
        if not isinstance(instances, list) or not instances:
            raise InvalidArgument("'instances' must be a non-empty list (one element per example).")
        named = all(type(x) is dict and not _is_b64(x) for x in instances)
        if len(names) > 1 and not named:
            i = next(i for i, x in enumerate(instances) if not (type(x) is dict and not _is_b64(x)))
            raise InvalidArgument(f"instances[{i}] must be an object of named inputs {names[:20]}: the signature "
                                  f"'{key}' has {len(names)} inputs.")
        if named:
            want = set(names)
            for i, x in enumerate(instances):
                if x.keys() != want:
                    missing, extra = sorted(want - x.keys()), sorted(map(str, x.keys() - want))
                    raise InvalidArgument(f"instances[{i}]: " + "; ".join(
                        p for p in (f"missing inputs {missing[:20]}" if missing else "",
                                    f"unknown inputs {extra[:20]}" if extra else "") if p))
            columns = {n: [x[n] for x in instances] for n in names}
        else:
            columns = {names[0]: instances}
        inputs = {}
        for n in names:
            arr = _to_array(columns[n], signature.inputs[n], f"input {n!r}")
            _check_shape(arr, signature.inputs[n], f"input {n!r}")
            inputs[n] = arr
        return JsonRequest(key, "instances", inputs, len(instances))
    raw = doc["inputs"]
    if type(raw) is dict and not _is_b64(raw) and (len(names) > 1 or set(raw) == set(names)):
        if raw.keys() != set(names):
            missing, extra = sorted(set(names) - raw.keys()), sorted(map(str, raw.keys() - set(names)))
            raise InvalidArgument("'inputs': " + "; ".join(
                p for p in (f"missing inputs {missing[:20]}" if missing else "",
                            f"unknown inputs {extra[:20]}" if extra else "") if p))
        columns = raw
    elif len(names) == 1:
        columns = {names[0]: raw}
    else:
        raise InvalidArgument(f"'inputs' must be an object of named inputs {names[:20]}: the signature '{key}' has "
                              f"{len(names)} inputs.")
    inputs = {}
    for n in names:
        arr = _to_array(columns[n], signature.inputs[n], f"input {n!r}")
        _check_shape(arr, signature.inputs[n], f"input {n!r}")
        inputs[n] = arr
    return JsonRequest(key, "inputs", inputs, None)


def _json_value(alias: str, arr: np.ndarray) -> Any:
    if arr.dtype.kind in "OSU":
        b64 = alias.endswith("_bytes")

        def one(v: Any) -> Any:
            raw = v if isinstance(v, bytes) else str(v).encode()
            return {"b64": base64.b64encode(raw).decode()} if b64 else raw.decode("utf-8", "replace")

        if arr.ndim == 0:
            return one(arr[()])
        return np.vectorize(one, otypes=[object])(arr).tolist()
    return arr.tolist()


def encode_json_response(outputs: Mapping[str, np.ndarray], fmt: str) -> bytes:
    """`{"predictions": ...}` (row format) or `{"outputs": ...}` (columnar), shaped as TF Serving shapes
    them: bare values for a single output, per-output objects for several (aliases in the given order)."""
    names = list(outputs)
    if fmt == "instances":
        arrays = [np.asarray(outputs[n]) for n in names]
        if any(a.ndim == 0 for a in arrays):
            raise InvalidArgument("Row format answers need outputs with a batch dimension; send 'inputs' (columnar).")
        sizes = {a.shape[0] for a in arrays}
        if len(sizes) > 1:
            raise InvalidArgument(f"Batch size of the outputs differs ({sorted(sizes)}); TF Serving cannot answer this "
                                  "in row format: send 'inputs' (columnar).")
        if len(names) == 1:
            body: Any = _json_value(names[0], arrays[0])
        else:
            columns = [_json_value(n, a) for n, a in zip(names, arrays)]
            body = [dict(zip(names, row)) for row in zip(*columns)]
        return b'{"predictions": ' + json.dumps(body).encode() + b"}"
    if len(names) == 1:
        value: Any = _json_value(names[0], np.asarray(outputs[names[0]]))
    else:
        value = {n: _json_value(n, np.asarray(outputs[n])) for n in names}
    return b'{"outputs": ' + json.dumps(value).encode() + b"}"
