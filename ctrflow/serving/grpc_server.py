"""The gRPC front end: TF Serving's `PredictionService` (Predict, GetModelMetadata) and `ModelService`
(GetModelStatus), wire-compatible with clients built on the `tensorflow-serving-api` protos.

It needs that package (`pip install --no-deps tensorflow-serving-api==2.21.0`: its protos import
TensorFlow's, which tensorflow-cpu provides). Without it `GrpcServer` raises a ConfigError saying so;
the REST server never imports this module unless a gRPC port is asked for.

Rollouts (`ctrflow.serving.rollout`) apply to Predict as to REST: a call to a rollout's name is split by
its key (a call metadata entry, or an input's first value), recorded per arm, mirrored to the shadow
and sampled into the request log; the answer is the chosen arm's only.

Predict takes one TensorProto per schema field, named as in the export (`ctrflow.json` "inputs"):
DT_STRING for categoricals, DT_FLOAT/DT_DOUBLE (or integer types) for numerics, NaN = missing, all of
shape [n]; it answers `outputs["probabilities"]` float32 [n]. Signature `predict_ids` takes the
one-tensor fast path: `ids` DT_INT32 [n, F] and `numeric` DT_FLOAT [n, N], read from `tensor_content`
without a copy and batched (`ids_tensors`; ids outside a field's table → INVALID_ARGUMENT).
Errors map to gRPC codes: NOT_FOUND (model/version), INVALID_ARGUMENT (bad inputs), UNAVAILABLE
(queue full, not ready: retry), DEADLINE_EXCEEDED (the call's own deadline passed), INTERNAL (a bug,
logged). The call's deadline (`context.time_remaining()`, else the server's default) counts from when
the handler is entered; a call that cannot make it given the batcher's queue is refused at once with
UNAVAILABLE, as TF Serving's batch scheduler answers a full queue (retryable, unlike
RESOURCE_EXHAUSTED's "out of quota").

The server is `grpc.aio` on the REST server's event loop: a Predict call awaits the batcher's future
(`apredict`), so any number of concurrent gRPC calls share one batch and cost no thread each; unbatched
models compute on the server's worker pool. `start()`/`stop()` are coroutines run on that loop.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from concurrent.futures import Executor
from typing import Any

import numpy as np

from ctrflow.errors import ConfigError, SchemaError
from ctrflow.export import signature_rows
from ctrflow.serving.metrics import ServingMetrics
from ctrflow.serving.deadline import admit, left_ms
from ctrflow.serving.models import ModelManager
from ctrflow.serving.status import classify
from ctrflow.serving.tfserving import metadata_response, predict_response, tensor_to_ndarray

__all__ = ["GrpcServer", "grpc_available", "tensor_to_array", "array_to_tensor", "ids_tensors"]

log = logging.getLogger("ctrflow.serving")

# TensorFlow DataType enum values (tensorflow/core/framework/types.proto).
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_STRING, DT_INT64 = 1, 2, 3, 7, 9
_STATE = {"START": 10, "LOADING": 20, "AVAILABLE": 30, "UNLOADING": 40, "END": 50}


def _import_apis() -> Any:
    try:
        import grpc
        import grpc.aio  # noqa: F401 - the server is grpc.aio
        from tensorflow_serving.apis import (
            get_model_metadata_pb2,
            get_model_status_pb2,
            model_service_pb2_grpc,
            predict_pb2,
            prediction_service_pb2_grpc,
        )
    except ImportError as e:
        raise ConfigError(
            f"gRPC serving needs grpcio and the TF Serving protos ({e}). Install them with "
            "`pip install --no-deps tensorflow-serving-api==2.21.0` (no-deps: it would pull the full "
            "tensorflow package over tensorflow-cpu), or serve REST only (no --grpc-port)."
        ) from None
    return grpc, predict_pb2, prediction_service_pb2_grpc, get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc


def grpc_available() -> bool:
    """True when the gRPC server can start (grpcio and tensorflow-serving-api importable)."""
    try:
        _import_apis()
    except ConfigError:
        return False
    return True


class _Invalid(SchemaError):
    """An input tensor the model cannot take (INVALID_ARGUMENT)."""


def tensor_to_array(name: str, tensor: Any, kind: str) -> np.ndarray:
    """A TensorProto of shape [n] → a numpy column: 'S' bytes for categoricals, float64 for numerics."""
    dims = [d.size for d in tensor.tensor_shape.dim]
    if len(dims) > 1:
        raise _Invalid(f"input {name!r} must have shape [n] (one value per candidate). Got shape {dims}.")
    dtype = tensor.dtype
    if kind == "categorical":
        if dtype != DT_STRING:
            raise _Invalid(f"input {name!r} is categorical: send DT_STRING values. Got dtype enum {dtype}.")
        values = list(tensor.string_val)
        out = np.array(values, dtype="S") if values else np.zeros(0, "S1")
    else:
        if dtype == DT_FLOAT:
            out = np.frombuffer(tensor.tensor_content, "<f4") if tensor.tensor_content else np.array(tensor.float_val, np.float32)
        elif dtype == DT_DOUBLE:
            out = np.frombuffer(tensor.tensor_content, "<f8") if tensor.tensor_content else np.array(tensor.double_val, np.float64)
        elif dtype == DT_INT64:
            out = np.frombuffer(tensor.tensor_content, "<i8") if tensor.tensor_content else np.array(tensor.int64_val, np.int64)
        elif dtype == DT_INT32:
            out = np.frombuffer(tensor.tensor_content, "<i4") if tensor.tensor_content else np.array(tensor.int_val, np.int32)
        else:
            raise _Invalid(f"input {name!r} is numeric: send DT_FLOAT or DT_DOUBLE values (NaN = missing). Got dtype enum {dtype}.")
        out = out.astype(np.float64)
    if dims and dims[0] != len(out):
        raise _Invalid(f"input {name!r} declares shape {dims} but holds {len(out)} values.")
    return out


def ids_tensors(inputs: Any) -> tuple[np.ndarray, np.ndarray]:
    """predict_ids' two TensorProtos → (ids int32 [n, F], numeric float32 [n, N]) without a copy.

    `tensor_content` (what `tf.make_tensor_proto` writes) is read with np.frombuffer; typed
    `int_val`/`float_val` fields are taken too (one conversion). Shapes and ranges are checked by the
    predictor (its batcher's screen, or `check_ids` unbatched); dtypes and declared shapes here."""
    if set(inputs) != {"ids", "numeric"}:
        raise _Invalid(f"signature 'predict_ids' takes inputs 'ids' (DT_INT32 [n, F]) and 'numeric' (DT_FLOAT [n, N]). "
                       f"Got {sorted(inputs)[:10]}.")
    out = []
    for key, dtype, np_dtype, field in (("ids", DT_INT32, "<i4", "int_val"), ("numeric", DT_FLOAT, "<f4", "float_val")):
        t = inputs[key]
        if t.dtype != dtype:
            raise _Invalid(f"input {key!r} of predict_ids must be {'DT_INT32' if key == 'ids' else 'DT_FLOAT'}. "
                           f"Got dtype enum {t.dtype}.")
        dims = [d.size for d in t.tensor_shape.dim]
        if len(dims) != 2 or min(dims) < 0:
            raise _Invalid(f"input {key!r} of predict_ids must have shape [n, columns]. Got shape {dims}.")
        content = t.tensor_content
        if content:
            if len(content) != 4 * dims[0] * dims[1]:
                raise _Invalid(f"input {key!r}: shape {dims} needs {4 * dims[0] * dims[1]} bytes of tensor_content, "
                               f"got {len(content)}.")
            arr = np.frombuffer(content, np_dtype)
        else:
            arr = np.asarray(getattr(t, field), np_dtype)
            if arr.size != dims[0] * dims[1]:
                raise _Invalid(f"input {key!r}: shape {dims} needs {dims[0] * dims[1]} values, got {arr.size}.")
        out.append(arr.reshape(dims))
    return out[0], out[1]


def array_to_tensor(values: np.ndarray, tensor: Any) -> None:
    """Fill a TensorProto with a float32 vector (tensor_content: one copy, no per-value fields)."""
    tensor.dtype = DT_FLOAT
    tensor.tensor_shape.dim.add().size = int(values.shape[0])
    tensor.tensor_content = np.ascontiguousarray(values, dtype="<f4").tobytes()


class GrpcServer:
    """PredictionService + ModelService over a `ModelManager` on grpc.aio; started and stopped by `Server`."""

    def __init__(self, manager: ModelManager, metrics: ServingMetrics, *, host: str = "127.0.0.1", port: int = 8500,
                 pool: Executor | None = None, default_timeout_ms: float | None = None, max_rows: int = 100_000,
                 max_message_bytes: int = 8 << 20) -> None:
        (self._grpc, self._predict_pb2, self._svc_grpc, self._meta_pb2, self._status_pb2, self._model_svc_grpc) = _import_apis()
        self._manager = manager
        self._metrics = metrics
        self._host = host
        self._port = port
        self._pool = pool
        self._default_timeout_ms = default_timeout_ms
        self._max_rows = max_rows
        self._max_message_bytes = max_message_bytes
        self._server: Any = None
        self._shadows: set[asyncio.Task] = set()  # running shadow calls (the loop keeps weak references only)

    async def start(self) -> int:
        """Bind and start on the running loop; returns the port (useful with port 0)."""
        import grpc.aio

        self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", self._max_message_bytes),
                                                ("grpc.max_send_message_length", self._max_message_bytes)])
        outer = self

        class Prediction(self._svc_grpc.PredictionServiceServicer):
            async def Predict(self, request, context):  # noqa: N802 - the proto's name
                return await outer._predict(request, context)

            async def GetModelMetadata(self, request, context):  # noqa: N802
                return await outer._metadata(request, context)

        class Models(self._model_svc_grpc.ModelServiceServicer):
            async def GetModelStatus(self, request, context):  # noqa: N802
                return await outer._status(request, context)

            async def HandleReloadConfigRequest(self, request, context):  # noqa: N802
                return await outer._reload(request, context)

        self._svc_grpc.add_PredictionServiceServicer_to_server(Prediction(), self._server)
        self._model_svc_grpc.add_ModelServiceServicer_to_server(Models(), self._server)
        address = f"[{self._host}]:{self._port}" if ":" in self._host else f"{self._host}:{self._port}"
        try:
            port = self._server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0:
            raise ConfigError(f"Cannot listen for gRPC on {address}: the port is taken or the address is not local.")
        await self._server.start()
        return port

    async def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new calls, let in-flight ones finish for up to `grace_s`, then cancel the rest."""
        if self._server is not None:
            await self._server.stop(grace_s)

    # ---- handlers -----------------------------------------------------------------------------------

    async def _abort(self, context: Any, error: BaseException) -> None:
        _, name = classify(error)
        code = getattr(self._grpc.StatusCode, name)
        if name == "INTERNAL":
            log.error("internal error in gRPC Predict", exc_info=error)
        await context.abort(code, str(error) if name != "INTERNAL" else f"Internal error ({type(error).__name__}).")

    async def _predict(self, request: Any, context: Any) -> Any:
        started = time.perf_counter()
        entered = time.monotonic()  # the call's budget counts from here (its own deadline, else the default)
        name = request.model_spec.name
        code, rows = "OK", 0
        rollout = arm = None
        try:
            spec = request.model_spec
            version = spec.version.value if spec.HasField("version") else None
            label = spec.version_label or None
            signature = spec.signature_name or "serving_default"
            output_filter = list(request.output_filter)
            remaining = context.time_remaining()
            budget_ms = remaining * 1e3 if remaining is not None else self._default_timeout_ms
            deadline = None if budget_ms is None else entered + budget_ms / 1e3
            left_ms(deadline, budget_ms)  # already past it: DEADLINE_EXCEEDED before any work
            rollouts = self._manager.rollouts
            rollout = rollouts.get(name) if version is None and label is None else None
            if rollout is not None:  # a traffic split: the arm by the key (call metadata or an input's first value)
                from ctrflow.serving.rollout import choose_arm, key_from_tensors

                metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
                key = rollouts.key_of(rollout, metadata,
                                      key_from_tensors(request.inputs, rollout.key_feature) if rollout.key_feature else None)
                arm = choose_arm(rollout.arms, key)
                name, version, label = arm.model, arm.version, arm.label
            outputs, used, rows, features, predictor = await self._score(
                request, name, version, label, signature, output_filter, deadline)
            if rollout is not None:
                rollouts.record(rollout, arm, rows, time.perf_counter() - started, True)
                served = outputs.get("probabilities") if features is not None else None
                if served is not None:  # what a shadow compares and a request log keeps (serving_default only)
                    if rollouts.shadow_slot(rollout, key):
                        task = asyncio.get_running_loop().create_task(self._shadow(request, rollout, served, deadline))
                        self._shadows.add(task)
                        task.add_done_callback(self._shadows.discard)
                    rollouts.maybe_log(rollout, key, predictor, features, served, metadata.get("x-request-id"))
            # Typed *_val fields, as TF Serving's default AsProtoField serialization fills them.
            return predict_response(name, used, signature, outputs)
        except self._grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001 - every error becomes a status
            code = type(e).__name__
            if arm is not None:
                self._manager.rollouts.record(rollout, arm, 0, time.perf_counter() - started, False)
            await self._abort(context, e)
        finally:
            label_ = name if name in self._manager.model_names else "_unknown"  # bounded label values
            self._metrics.observe(label_, "grpc", code, time.perf_counter() - started, rows if code == "OK" else 0)

    async def _score(self, request: Any, name: str, version: int | None, label: str | None, signature: str,
                     output_filter: list[str], deadline: float | None) -> tuple[dict[str, np.ndarray], int, int, Any, Any]:
        """Score a PredictRequest on one model version → (outputs, version used, rows, features, predictor);
        `features` (decoded by schema field) is None unless the ctrflow serving_default path was taken.
        A call its batcher cannot answer before `deadline` is refused at once (UNAVAILABLE)."""
        loaded = self._manager.acquire(name, version, label)
        features = None
        try:
            predictor = loaded.predictor
            if signature == "serving_default" and getattr(predictor, "kind", "ctrflow") == "ctrflow":
                features = self._features(request.inputs, predictor)
                rows = len(next(iter(features.values())))
                if rows > self._max_rows:
                    raise _Invalid(f"Request of {rows} candidates is over the limit of {self._max_rows}; split it.")
                timeout_ms = admit(predictor, rows, deadline)
                if not hasattr(predictor, "apredict_outputs"):  # a stand-in predictor: probabilities only
                    outputs = {"probabilities": await predictor.apredict(features, timeout_ms=timeout_ms)}
                elif getattr(predictor, "batcher", None) is not None:
                    outputs = await predictor.apredict_outputs(features, timeout_ms=timeout_ms, output_filter=output_filter)
                else:
                    outputs = await asyncio.get_running_loop().run_in_executor(
                        self._pool, functools.partial(predictor.predict_outputs, features, output_filter=output_filter))
            elif signature == "predict_ids" and hasattr(predictor, "apredict_ids_outputs"):
                ids, numeric = ids_tensors(request.inputs)
                rows = ids.shape[0]
                if rows > self._max_rows:
                    raise _Invalid(f"Request of {rows} rows is over the limit of {self._max_rows}; split it.")
                timeout_ms = admit(predictor, rows, deadline, "predict_ids")
                outputs = await predictor.apredict_ids_outputs(ids, numeric, timeout_ms=timeout_ms, output_filter=output_filter)
            else:
                inputs = {alias: tensor_to_ndarray(t, name=alias) for alias, t in request.inputs.items()}
                rows = signature_rows(signature, inputs)
                if rows > self._max_rows:
                    raise _Invalid(f"Request of {rows} rows is over the limit of {self._max_rows}; split it.")
                timeout_ms = admit(predictor, rows, deadline, signature)  # each signature's own queue
                outputs = await predictor.arun(signature, inputs, output_filter=output_filter, timeout_ms=timeout_ms)
            return outputs, loaded.version, rows, features, predictor
        finally:
            self._manager.release(loaded)

    async def _shadow(self, request: Any, rollout: Any, served: np.ndarray, deadline: float | None) -> None:
        """Score the same call on the rollout's shadow model after the answer left; never raises, and
        nothing of it reaches the caller (its score differences are figures in `/v1/rollouts`)."""
        shadow, got = rollout.shadow, None
        try:
            outputs, _, _, features, _ = await self._score(request, shadow.model, shadow.version, shadow.label,
                                                            "serving_default", ["probabilities"], deadline)
            got = outputs.get("probabilities") if features is not None else None
        except Exception as e:  # noqa: BLE001 - a shadow's failure is a figure, not an answer
            log.debug("shadow %s of rollout %s failed: %s", shadow.model, rollout.name, e)
        self._manager.rollouts.shadow_done(rollout, served, got)

    @staticmethod
    def _features(inputs: Any, predictor: Any) -> dict[str, np.ndarray]:
        # Inputs are named as the export names them (ctrflow.json "inputs"); schema names also work.
        aliases = getattr(predictor, "_inputs", None) or {}
        by_input = {aliases.get(n, n): n for n in predictor.feature_names}
        cats = set(predictor.categorical_names)
        out: dict[str, np.ndarray] = {}
        for key in inputs:
            field = by_input.get(key, key if key in predictor.feature_names else None)
            if field is None:
                raise _Invalid(f"unknown input {key!r}; this model takes {list(by_input)[:60]}.")
            if field in out:
                raise _Invalid(f"input {key!r} given twice (by schema name and input name).")
            out[field] = tensor_to_array(key, inputs[key], "categorical" if field in cats else "numeric")
        missing = [n for n in predictor.feature_names if n not in out]
        if missing:
            raise _Invalid(f"missing inputs {missing[:30]}: send every feature (empty string / NaN for missing values).")
        lengths = {len(v) for v in out.values()}
        if len(lengths) != 1:
            raise _Invalid(f"inputs have different lengths {sorted(lengths)}: one value per candidate in each.")
        if lengths == {0}:
            raise _Invalid("no candidates to score (empty inputs).")
        return out

    async def _metadata(self, request: Any, context: Any) -> Any:
        try:
            spec = request.model_spec
            version = spec.version.value if spec.HasField("version") else None
            with self._manager.lease(spec.name, version, spec.version_label or None) as predictor:
                # The version's true SignatureDefMap, read from its saved_model.pb.
                return metadata_response(spec.name, predictor.version, predictor.signature_defs, list(request.metadata_field))
        except self._grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001
            await self._abort(context, e)

    async def _reload(self, request: Any, context: Any) -> Any:
        """ModelService.HandleReloadConfigRequest: serve the request's model_config_list from now on."""
        from tensorflow_serving.apis import model_management_pb2

        from ctrflow.serving.config import config_from_request

        try:
            if os.environ.get("CTRFLOW_WORKER_INDEX") is not None:  # one of several workers (ctrflow.serving.workers)
                raise ConfigError("ReloadConfig would reach one server worker of several: with --workers > 1, change the "
                                  "model config file and let --model_config_file_poll_wait_seconds apply it to every worker.")
            config = config_from_request(request)
            # Loading the new models blocks: off the event loop, which keeps answering meanwhile.
            await asyncio.get_running_loop().run_in_executor(self._pool, self._manager.reconfigure, config.models)
            return model_management_pb2.ReloadConfigResponse()
        except self._grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001
            await self._abort(context, e)

    async def _status(self, request: Any, context: Any) -> Any:
        try:
            name = request.model_spec.name
            version = request.model_spec.version.value if request.model_spec.HasField("version") else None
            if request.model_spec.version_label:
                version = self._manager.resolve_label(name, request.model_spec.version_label)
            response = self._status_pb2.GetModelStatusResponse()
            for s in self._manager.status(name, version):
                entry = response.model_version_status.add()
                entry.version = s.version
                entry.state = _STATE.get(s.state, 0)
                entry.status.error_code = 0 if s.error_code == "OK" else 2  # tensorflow.error.Code UNKNOWN
                entry.status.error_message = s.error_message
            return response
        except Exception as e:  # noqa: BLE001
            await self._abort(context, e)
