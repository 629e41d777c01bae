"""The REST routes: TensorFlow Serving's predict API, the columnar endpoint, status, metadata, metrics, health.

Routes see a decoded `RestRequest` (method, path, lower-cased headers, the whole body) and return a
`RestResponse`; they never see bytes of HTTP framing, so the transport (`ctrflow.serving.http`) can
change without touching them. Endpoints (NAME: a served model; `/versions/V` may follow NAME):

    POST /v1/models/NAME:predict            {"instances": [{"C1": "68fd1e64", "I1": 3, ...}, ...]}
                                            → {"predictions": [{"logits": l, "probabilities": p}, ...]}
                                            {"inputs": {"C1": [...], "I1": [...]}}
                                            → {"outputs": {"logits": [...], "probabilities": [...]}}
                                            (TF Serving's shapes for the signature called: see
                                            `ctrflow.serving.tfserving`; `/labels/L` pins a labelled version)
                                            {"context": {...}, "instances": [...]}: context + candidates
                                            (`ctrflow.serving.context`, docs/context.md)
    POST /v1/models/NAME:predict_columnar   compact columns for high-rate clients (see `COLUMNAR_FORMAT`);
                                            application/x-ctrflow-context: context + candidates, binary
    POST /v1/models/NAME:predict_ids        the one-tensor fast path: pre-hashed int32 ids + float32
                                            numerics (application/x-ctrflow-ids, docs/ids_body.md)
    GET  /v1/models/NAME                    {"model_version_status": [{"version": "3", "state": "AVAILABLE", ...}]}
    GET  /v1/models/NAME/metadata           the version's SignatureDefMap (TF Serving's JSON)
    GET  /v1/rollouts                       per-arm and shadow figures of the rollouts in force
    GET  /metrics, /monitoring/prometheus/metrics   Prometheus text format
    GET  /healthz                           200 while the process serves
    GET  /readyz                            200 once every model has a version loaded, else 503

Errors are `{"error": "..."}` with 400 (bad request), 404 (unknown model/version/path), 405, 413 (too
many rows), 503 + `Retry-After` (queue full, its deadline cannot be met given the queue, not ready:
retry), 504 (the request's deadline passed: header `X-Deadline-Ms`, else `default_timeout_ms`, counted
from the request's first byte), 500 (a bug). Every predict response carries `X-Model-Version`.

To add a route: write an `async def _name(self, request, target) -> RestResponse` method and add it
to one of the tables built in `RestRoutes.__init__` (`model_verbs` for POST .../NAME:VERB,
`model_gets` for GET .../NAME/TAIL, `paths` for fixed paths).
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctrflow.client.context import CONTEXT_CONTENT_TYPE
from ctrflow.errors import DeadlineExceeded
from ctrflow.export import signature_rows
from ctrflow.serving.codec import (
    COLUMNAR_CONTENT_TYPE,
    IDS_CONTENT_TYPE,
    RequestError,
    _load_json,
    decode_columnar,
    decode_ids,
    error_body,
    parse_columnar_json,
    parse_predict_json,
    predict_json,
    scores_json,
)
from ctrflow.serving.deadline import admit, left_ms
from ctrflow.serving.models import ModelManager
from ctrflow.serving.poison import check_strings, may_hold_surrogates
from ctrflow.serving.status import classify
from ctrflow.serving.tfserving import decode_json_request, encode_json_response, metadata_json

__all__ = ["ModelTarget", "RestRequest", "RestResponse", "RestRoutes", "status_of"]

log = logging.getLogger("ctrflow.serving")

JSON = b"application/json"


@dataclass
class RestRequest:
    """One HTTP request as the routes see it: the body is complete, header names are lower-case."""

    method: str
    path: str  # without the query string
    headers: Mapping[str, str]
    body: bytes | bytearray = b""
    query: str = ""
    arrived: float | None = None  # time.monotonic() of the request's first byte; its deadline counts from here
    # What the HTTP door learnt (`ctrflow.serving.deadline.DoorPass`): the model version it leased and the
    # deadline; the route takes the lease instead of leasing again. None: the route leases itself.
    door: Any = None


@dataclass
class RestResponse:
    """An answer: status, body, its content type and extra headers (name, value) as bytes."""

    status: int
    body: bytes
    content_type: bytes = JSON
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    @classmethod
    def json(cls, status: int, doc: Any) -> RestResponse:
        return cls(status, json.dumps(doc).encode())

    @classmethod
    def error(cls, status: int, message: str) -> RestResponse:
        return cls(status, error_body(message))


@dataclass(frozen=True)
class ModelTarget:
    """What a /v1/models/... path names: the model, a pinned version (or None) and what follows."""

    name: str
    version: int | None
    tail: str  # "" or e.g. "metadata"
    verb: str  # "" or e.g. "predict" (after ':')
    label: str | None = None  # a version label (/labels/L); None when not given


Handler = Callable[[RestRequest, ModelTarget], Awaitable[RestResponse]]
PathHandler = Callable[[RestRequest], Awaitable[RestResponse]]


class RestRoutes:
    """Dispatches `RestRequest`s over a `ModelManager`; counts predict requests in `metrics`.

    `render_metrics()` gives the `/metrics` text; `pool` runs unbatched compute off the event loop.
    """

    def __init__(self, manager: ModelManager, metrics: Any, *, pool: Executor, max_rows_per_request: int,
                 default_timeout_ms: float | None, render_metrics: Callable[[], tuple[bytes, bytes]]) -> None:
        self.manager = manager
        self.metrics = metrics
        self.pool = pool
        self.max_rows_per_request = max_rows_per_request
        self.default_timeout_ms = default_timeout_ms
        self._render_metrics = render_metrics
        # POST /v1/models/NAME[/versions/V]:VERB → (handler, protocol label for metrics)
        self.model_verbs: dict[str, tuple[Handler, str]] = {
            "predict": (self._predict, "rest"),
            "predict_columnar": (self._predict_columnar, "columnar"),
            "predict_ids": (self._predict_ids, "ids"),
        }
        # GET /v1/models/NAME[/versions/V][/TAIL]
        self.model_gets: dict[str, Handler] = {"": self._model_status, "metadata": self._metadata}
        # Fixed paths: path → (method, handler)
        self.paths: dict[str, tuple[str, PathHandler]] = {
            "/metrics": ("GET", self._metrics),
            "/monitoring/prometheus/metrics": ("GET", self._metrics),
            "/healthz": ("GET", self._healthz), "/v1/healthz": ("GET", self._healthz),
            "/readyz": ("GET", self._readyz), "/v1/readyz": ("GET", self._readyz),
            "/v1/rollouts": ("GET", self._rollouts),
        }

    async def handle(self, request: RestRequest) -> RestResponse:
        """Answer one request; every error becomes an error response (500 only for bugs, logged)."""
        started = time.perf_counter()
        path = request.path
        model, protocol, rows = "-", None, 0
        try:
            if path.startswith("/v1/models/"):
                target = split_model_path(path[len("/v1/models/"):])
                model = target.name if target.name in self.manager.model_names else "_unknown"  # bounded labels
                if target.verb:
                    if request.method != "POST":
                        raise RequestError(f"{request.method} {path} is not allowed; use POST.", 405)
                    if target.tail:
                        raise RequestError(f"No such endpoint {path!r}.", 404)
                    entry = self.model_verbs.get(target.verb)
                    if entry is None:
                        raise RequestError(f"Unknown method ':{target.verb}'; this server answers "
                                           f"{', '.join(':' + v for v in self.model_verbs)}.", 404)
                    handler, protocol = entry
                    rollout = self.manager.rollouts.get(target.name) if target.version is None and target.label is None else None
                    if rollout is not None:
                        response = await self._rollout(handler, request, target, rollout)
                    else:
                        response = await handler(request, target)
                    rows = getattr(response, "rows", 0)
                else:
                    if request.method != "GET":
                        raise RequestError(f"{request.method} {path} is not allowed; use GET.", 405)
                    handler = self.model_gets.get(target.tail)
                    if handler is None:
                        raise RequestError(f"No such endpoint {path!r}.", 404)
                    response = await handler(request, target)
            elif path in self.paths:
                method, handler = self.paths[path]
                if request.method != method:
                    raise RequestError(f"{request.method} {path} is not allowed; use {method}.", 405)
                response = await handler(request)
            else:
                raise RequestError(f"No such endpoint {path!r}; predictions are at POST /v1/models/NAME:predict.", 404)
        except Exception as e:  # noqa: BLE001 - every error becomes an answer
            status, message = status_of(e)
            if status == 500:
                log.exception("internal error answering %s %s", request.method, path)
            response = RestResponse.error(status, message)
        if response.status == 503 and not any(k == b"retry-after" for k, _ in response.headers):
            response.headers.append((b"retry-after", b"1"))
        if protocol is not None:
            self.metrics.observe(model, protocol, response.status, time.perf_counter() - started,
                                 rows if response.status == 200 else 0)
        return response

    # ---- predict ------------------------------------------------------------------------------------

    def _timeout_ms(self, headers: Mapping[str, str]) -> float | None:
        raw = headers.get("x-deadline-ms")
        if raw is None:
            return self.default_timeout_ms
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not math.isfinite(value) or value <= 0:
            raise RequestError(f"X-Deadline-Ms must be a number of milliseconds > 0. Got {raw[:40]!r} instead.")
        return value

    def _deadline(self, request: RestRequest) -> float | None:
        """The request's absolute deadline (`time.monotonic()`): its first byte + X-Deadline-Ms (or the
        server default); None without one. Already passed: DeadlineExceeded (504) before any work."""
        door = request.door
        if door is not None:  # the door read the same header from the same first byte
            left_ms(door.deadline, door.budget_ms)
            return door.deadline
        budget_ms = self._timeout_ms(request.headers)
        if budget_ms is None:
            return None
        arrived = request.arrived if request.arrived is not None else time.monotonic()
        deadline = arrived + budget_ms / 1e3
        left_ms(deadline, budget_ms)
        return deadline

    def _acquire(self, request: RestRequest, target: ModelTarget) -> Any:
        """Lease the version `target` names: the one the door leased for this request if it names the
        same (the newest of that model), else a lease of its own; pair with `manager.release`."""
        door = request.door
        if door is not None and target.version is None and target.label is None:
            loaded = door.take(target.name)
            if loaded is not None:
                return loaded
        return self.manager.acquire(target.name, target.version, target.label)

    async def _predict(self, request: RestRequest, target: ModelTarget) -> RestResponse:
        """TF Serving's predict, answered as TF Serving shapes it for the signature called (see
        `ctrflow.serving.tfserving`): ctrflow exports' serving_default/predict_ids bodies take the
        fast decoder; b64 values, other signatures and plain SavedModels the generic one."""
        deadline = self._deadline(request)
        body = bytes(request.body)
        if b'"context"' in body or b'_context"' in body:  # context + candidates (ctrflow.serving.context)
            from ctrflow.serving.context import predict_context_json

            answer = await predict_context_json(self, request, target, left_ms(deadline), body)
            if answer is not None:
                return answer
        loaded = self.manager.acquire(target.name, target.version, target.label)
        try:
            predictor = loaded.predictor
            parsed = None
            if getattr(predictor, "kind", "ctrflow") == "ctrflow":
                try:
                    if len(body) > 1 << 20:
                        parsed = await asyncio.to_thread(parse_predict_json, body, predictor.categorical_names, predictor.numeric_names)
                    else:
                        parsed = parse_predict_json(body, predictor.categorical_names, predictor.numeric_names)
                except RequestError:
                    # b64 values and other signatures fail the fast decoder: they take the general one.
                    # (Looked for only then: two scans of every body cost more than its model call's share.)
                    if b'"b64"' not in body and b'"transform"' not in body:
                        raise
            fast = parsed is not None
            if fast:
                fmt, rows = parsed.format, parsed.rows
                self._check_rows(rows)
                if parsed.signature == "predict_ids" and getattr(predictor, "ids_batcher", None) is not None:
                    timeout_ms = admit(predictor, rows, deadline, "predict_ids")
                    outputs = await predictor.arun("predict_ids", parsed.features, timeout_ms=timeout_ms)
                elif parsed.signature == "predict_ids":
                    outputs = await asyncio.get_running_loop().run_in_executor(
                        self.pool, functools.partial(predictor.run, "predict_ids", parsed.features))
                else:
                    if may_hold_surrogates(body):
                        check_strings(parsed.features, predictor.categorical_names)
                    timeout_ms = admit(predictor, rows, deadline)
                    outputs = await self._score_outputs(predictor, parsed.features, timeout_ms)
            else:
                doc = await asyncio.to_thread(_load_json, body) if len(body) > 1 << 20 else _load_json(body)
                decoded = decode_json_request(doc, predictor.signatures)
                fmt = decoded.format
                rows = decoded.rows or signature_rows(decoded.signature_key, decoded.inputs)
                self._check_rows(rows)
                # Only serving_default goes through the batcher: its queue says nothing about other signatures.
                timeout_ms = admit(predictor, rows, deadline, decoded.signature_key)
                outputs = await predictor.arun(decoded.signature_key, decoded.inputs, timeout_ms=timeout_ms)
        finally:
            self.manager.release(loaded)
        body = predict_json(outputs, fmt) or encode_json_response(outputs, fmt)  # fast for float vectors
        answer = _Predicted(200, body, JSON, [(b"x-model-version", b"%d" % loaded.version)], rows)
        if fast and parsed.signature == "serving_default":  # what a shadow compares and a request log keeps
            answer.probabilities, answer.features, answer.predictor = outputs.get("probabilities"), parsed.features, predictor
        return answer

    async def _score_outputs(self, predictor: Any, features: Mapping[str, Any], timeout_ms: float | None) -> dict[str, np.ndarray]:
        if not hasattr(predictor, "apredict_outputs"):  # a stand-in predictor that scores probabilities only
            return {"probabilities": await self._score(predictor, features, timeout_ms)}
        if getattr(predictor, "batcher", None) is not None:
            return await predictor.apredict_outputs(features, timeout_ms=timeout_ms)
        return await self._off_loop(predictor.predict_outputs, features, timeout_ms)

    async def _predict_columnar(self, request: RestRequest, target: ModelTarget) -> RestResponse:
        headers = request.headers
        deadline = self._deadline(request)
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == CONTEXT_CONTENT_TYPE:  # context + candidates, binary (ctrflow.serving.context)
            from ctrflow.serving.context import predict_context_binary

            return await predict_context_binary(self, request, target, left_ms(deadline))
        loaded = self._acquire(request, target)
        try:
            predictor = loaded.predictor
            if ctype == COLUMNAR_CONTENT_TYPE:
                features, rows = decode_columnar(request.body, predictor.categorical_names, predictor.numeric_names)
            elif ctype in ("application/json", ""):
                features, rows = parse_columnar_json(request.body, predictor.categorical_names, predictor.numeric_names)
                if may_hold_surrogates(request.body):
                    check_strings(features, predictor.categorical_names)
            else:
                raise RequestError(f"Content-Type {ctype!r} is not understood here; send {COLUMNAR_CONTENT_TYPE} "
                                   "or application/json.")
            self._check_rows(rows)
            timeout_ms = admit(predictor, rows, deadline)
            scores = await self._score(predictor, features, timeout_ms)
        finally:
            self.manager.release(loaded)
        if ctype == COLUMNAR_CONTENT_TYPE and "application/json" not in headers.get("accept", ""):
            payload, out_type = np.ascontiguousarray(scores, dtype="<f4").tobytes(), b"application/octet-stream"
        else:
            payload, out_type = scores_json("outputs", scores), JSON
        answer = _Predicted(200, payload, out_type, [(b"x-model-version", b"%d" % loaded.version)], rows)
        answer.probabilities, answer.features, answer.predictor = scores, features, predictor
        return answer

    async def _predict_ids(self, request: RestRequest, target: ModelTarget) -> RestResponse:
        """The one-tensor fast path: the binary ids body (docs/ids_body.md) → float32 probabilities.

        The body's two matrices are views of the request bytes (no parse, no copy) that go to the
        predictor's ids batcher, whose screen checks every id against its field's table per batch (a bad
        request is answered 400 alone)."""
        headers = request.headers
        deadline = self._deadline(request)
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != IDS_CONTENT_TYPE:
            raise RequestError(f"Content-Type {ctype!r} is not understood here; send {IDS_CONTENT_TYPE} "
                               "(docs/ids_body.md), or JSON to :predict with signature_name 'predict_ids'.", 415)
        loaded = self._acquire(request, target)
        try:
            predictor = loaded.predictor
            if not hasattr(predictor, "apredict_ids"):
                raise RequestError(f"Model {target.name!r} version {loaded.version} is not a ctrflow export; it takes "
                                   "no ids body (call :predict with its own signature).")
            ids, numeric, rows = decode_ids(request.body, len(predictor.id_names), len(predictor.numeric_names))
            self._check_rows(rows)
            # No `admit` first: the ids batcher's submit makes the same load checks (503 / 504), and there is
            # no preparing to spare (the matrices are views of the body).
            scores = await predictor.apredict_ids(ids, numeric, timeout_ms=left_ms(deadline))
        finally:
            self.manager.release(loaded)
        if "application/json" in headers.get("accept", ""):
            payload, out_type = scores_json("outputs", scores), JSON
        else:
            payload, out_type = np.ascontiguousarray(scores, dtype="<f4").tobytes(), b"application/octet-stream"
        return _Predicted(200, payload, out_type, [(b"x-model-version", b"%d" % loaded.version)], rows)

    # ---- rollouts: split, shadow, log (ctrflow.serving.rollout) ------------------------------------------

    async def _rollout(self, handler: Handler, request: RestRequest, target: ModelTarget, rollout: Any) -> RestResponse:
        from ctrflow.serving.rollout import choose_arm

        rollouts = self.manager.rollouts
        key = rollouts.key_of(rollout, request.headers, _key_value(rollout, request) if rollout.key_feature else None)
        arm = choose_arm(rollout.arms, key)
        started = time.perf_counter()
        try:
            response = await handler(request, ModelTarget(arm.model, arm.version, target.tail, target.verb, arm.label))
        except BaseException:
            rollouts.record(rollout, arm, 0, time.perf_counter() - started, False)
            raise
        rows = getattr(response, "rows", 0)
        rollouts.record(rollout, arm, rows, time.perf_counter() - started, response.status == 200)
        response.headers.append((b"x-rollout-arm", arm.key.encode()))
        served = getattr(response, "probabilities", None)
        if served is not None and rollouts.shadow_slot(rollout, key):
            shadow = rollout.shadow
            asyncio.get_running_loop().create_task(self._shadow(handler, request, target, rollout, shadow, served))
        if served is not None:
            rollouts.maybe_log(rollout, key, response.predictor, response.features, served, request.headers.get("x-request-id"))
        return response

    async def _shadow(self, handler: Handler, request: RestRequest, target: ModelTarget, rollout: Any, shadow: Any,
                      served: np.ndarray) -> None:
        """Score the same request on the shadow model after the answer left; never raises."""
        got = None
        try:
            # The shadow's budget counts from its own start; its lease is its own.
            request = dataclasses.replace(request, arrived=None, door=None)
            answer = await handler(request, ModelTarget(shadow.model, shadow.version, target.tail, target.verb, shadow.label))
            got = getattr(answer, "probabilities", None)
        except Exception as e:  # noqa: BLE001 - a shadow's failure is a figure, not an answer
            log.debug("shadow %s of rollout %s failed: %s", shadow.model, rollout.name, e)
        self.manager.rollouts.shadow_done(rollout, served, got)

    async def _rollouts(self, request: RestRequest) -> RestResponse:
        return RestResponse.json(200, {"rollouts": self.manager.rollouts.stats()})

    def _check_rows(self, rows: int) -> None:
        if rows > self.max_rows_per_request:
            raise RequestError(f"Request of {rows} candidates is over the limit of {self.max_rows_per_request} "
                               "(max_rows_per_request); split it.", 413)

    async def _score(self, predictor: Any, features: Mapping[str, Any], timeout_ms: float | None) -> np.ndarray:
        if getattr(predictor, "batcher", None) is not None:
            return await predictor.apredict(features, timeout_ms=timeout_ms)
        return await self._off_loop(predictor.predict, features, timeout_ms)

    async def _off_loop(self, compute: Callable[[Mapping[str, Any]], Any], features: Mapping[str, Any],
                        timeout_ms: float | None) -> Any:
        """Without batching each request is its own compute call: run it off the loop so others proceed,
        and drop it unstarted if its deadline passes while it waits for a thread."""
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1e3
        future = asyncio.get_running_loop().run_in_executor(self.pool, _compute_before, compute, features, deadline)
        if deadline is None:
            return await future
        try:
            return await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceeded(f"The request passed its deadline of {timeout_ms:g} ms.") from None

    # ---- model status and metadata ------------------------------------------------------------------

    async def _model_status(self, request: RestRequest, target: ModelTarget) -> RestResponse:
        version = target.version
        if target.label is not None:
            version = self.manager.resolve_label(target.name, target.label)
        statuses = self.manager.status(target.name, version)
        return RestResponse.json(200, {"model_version_status": [s.to_dict() for s in statuses]})

    async def _metadata(self, request: RestRequest, target: ModelTarget) -> RestResponse:
        """TF Serving's metadata: the version's true SignatureDefMap (from its saved_model.pb)."""
        with self.manager.lease(target.name, target.version, target.label) as predictor:
            return RestResponse.json(200, metadata_json(target.name, predictor.version, predictor.signature_defs))

    # ---- fixed paths ----------------------------------------------------------------------------------

    async def _metrics(self, request: RestRequest) -> RestResponse:
        body, content_type = self._render_metrics()
        return RestResponse(200, body, content_type)

    async def _healthz(self, request: RestRequest) -> RestResponse:
        return RestResponse(200, b'{"status": "ok"}')

    async def _readyz(self, request: RestRequest) -> RestResponse:
        ready = self.manager.ready()
        waiting = [n for n in self.manager.model_names if not self.manager.versions(n)]
        return RestResponse.json(200 if ready else 503, {"ready": ready, "models_not_ready": waiting})


class _Predicted(RestResponse):
    """A predict answer that also says how many candidates it scored (for the metrics) and, for
    rollouts, the served probabilities, the features and the predictor (shadow and request log)."""

    def __init__(self, status: int, body: bytes, content_type: bytes, headers: list[tuple[bytes, bytes]], rows: int) -> None:
        super().__init__(status, body, content_type, headers)
        self.rows = rows
        self.probabilities: np.ndarray | None = None
        self.features: Mapping[str, Any] | None = None
        self.predictor: Any = None


def _key_value(rollout: Any, request: RestRequest) -> Any:
    """For a rollout keyed by a feature: the first candidate's value from the body, JSON or binary columnar."""
    from ctrflow.serving.rollout import key_from_columnar, key_from_json

    ctype = request.headers.get("content-type", "application/json")
    if ctype.split(";")[0].strip().lower() == COLUMNAR_CONTENT_TYPE:
        return key_from_columnar(request.body, rollout.key_feature)
    return key_from_json(request.body, rollout.key_feature)


def _compute_before(compute: Callable[[Mapping[str, Any]], Any], features: Mapping[str, Any], deadline: float | None) -> Any:
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded("The request passed its deadline while waiting for a compute thread; dropped.")
    return compute(features)


_TARGETS: dict[str, ModelTarget] = {}  # paths already split (a server sees a handful): one dict lookup each
_TARGETS_LIMIT = 1024
_TARGET_PATH_MAX = 256  # characters: at most ~0.3 MB remembered


def split_model_path(rest: str) -> ModelTarget:
    """'NAME[/versions/V][/TAIL][:VERB]' → ModelTarget (remembered per path; a bad path raises every time)."""
    target = _TARGETS.get(rest)
    if target is None:
        target = _split_model_path(rest)
        if len(rest) <= _TARGET_PATH_MAX:  # a client's long or random paths are split each time, never kept
            if len(_TARGETS) >= _TARGETS_LIMIT:
                _TARGETS.clear()
            _TARGETS[rest] = target
    return target


def _split_model_path(rest: str) -> ModelTarget:
    rest, _, verb = rest.partition(":")
    parts = rest.split("/")
    name = parts[0]
    if not name:
        raise RequestError("No model name in the path; use /v1/models/NAME.", 404)
    version = label = None
    tail = parts[1:]
    if len(tail) >= 2 and tail[0] == "versions":
        if not tail[1].isdigit() or len(tail[1]) > 18:
            raise RequestError(f"Version {tail[1][:40]!r} is not a non-negative integer.", 404)
        version = int(tail[1])
        tail = tail[2:]
    elif len(tail) >= 2 and tail[0] == "labels":
        if not tail[1]:
            raise RequestError("Empty version label in the path; use /v1/models/NAME/labels/LABEL.", 404)
        label = tail[1]
        tail = tail[2:]
    return ModelTarget(name, version, "/".join(tail), verb, label)


def status_of(error: BaseException) -> tuple[int, str]:
    """The HTTP status and message for an error raised while answering (`ctrflow.serving.status`)."""
    if isinstance(error, RequestError):
        return error.status, str(error)
    status, _ = classify(error)
    if status == 500:
        return 500, f"Internal error ({type(error).__name__}); the server logged the details."
    return status, str(error)
