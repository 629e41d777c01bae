"""The HTTP/1.1 transport of the REST routes: uvicorn + httptools (llhttp) under a bare ASGI app.

`HttpTransport(options, handle)` serves `handle(RestRequest) -> RestResponse` (see
`ctrflow.serving.rest`) on `options.host:options.port` from an event loop on a background thread;
`ctrflow.serving.server.Server` starts and stops it. Routes see complete requests, never bytes, each stamped with the `time.monotonic()` of its first byte
(`RestRequest.arrived`): a request's deadline counts from there.

Framing follows RFC 9112. llhttp (C) already refuses, with 400 and a closed connection: Content-Length
together with Transfer-Encoding, repeated or malformed Content-Length (`²`, 5000 digits, `+5`, `1 2`),
chunk sizes that are not plain hex (`0x10`, `1_0`, `+10`), a chunk not ending in CRLF, bare LF, obs-fold,
a space before the colon. What llhttp leaves to its user is enforced in ONE place, `StrictHttpProtocol`
below (the h11 idea: every rule in one state machine, every violation one refusal):

    Transfer-Encoding other than exactly `chunked` (lists, `identity, chunked`) or on HTTP/1.0   400, close
    a missing or repeated Host on HTTP/1.1                                                           400, close
    POST/PUT/PATCH with neither Content-Length nor chunked                                           411, close
    request head over `max_header_bytes` (counted as it arrives)                                    431, close
    trailers over `MAX_TRAILER_FIELDS` fields or `max_header_bytes` bytes (and trailers are dropped) 400, close
    a body over `max_body_bytes` (known from Content-Length, or counted while chunks arrive)          413, close
    chunks smaller than `MIN_MEAN_CHUNK_BYTES` on average after the first `FREE_CHUNKS`              400, close
    head not complete `head_timeout_s` after its first byte; body not `body_timeout_s` after head   408, close
    more than `max_connections` connections; bodies buffered in total over `max_buffered_body_bytes` 503, close
    a client that reads no answer for `drain_timeout_s` (write buffer full)                         connection aborted

A refusal is written, the write side is shut, and what the client still sends is read and dropped for
up to `LINGER_S` (bounded in bytes) before the socket closes: a client that sends its whole body before
reading (Python's `http.client`, no `Expect`) reads the 413 instead of a connection reset. Graceful
stop (uvicorn's): stop accepting, close idle connections, let in-flight requests finish and answer
with `Connection: close`, up to the grace period.

Implementation details follow: the protocol subclasses uvicorn's `HttpToolsProtocol` (pinned range in
pyproject.toml) and overrides only parser callbacks and transport events; the request/response cycle,
pipelining, flow control and keep-alive remain uvicorn's.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ctrflow.serving.rest import RestRequest, RestResponse

__all__ = ["FREE_CHUNKS", "HttpTransport", "LINGER_S", "MAX_TRAILER_FIELDS", "MIN_MEAN_CHUNK_BYTES", "StrictHttpProtocol"]

log = logging.getLogger("ctrflow.serving")

Handle = Callable[[RestRequest], Awaitable[RestResponse]]

MAX_TRAILER_FIELDS = 32  # trailer fields accepted after the last chunk (then 400)
FREE_CHUNKS = 64  # chunks any body may use, whatever their size
MIN_MEAN_CHUNK_BYTES = 256  # beyond FREE_CHUNKS, the mean chunk must be at least this large (else 400)
LAG_PROBE_S = 0.01  # how often the event loop's lag is measured (a request's first byte is dated with it)
LINGER_S = 2.0  # after a refusal, read and drop what the client still sends for at most this long
_LINGER_MAX_BYTES = 64 << 20  # ... and at most this many bytes
_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))


class _Refuse(Exception):
    """Raised inside a parser callback: answer `status` with `message` and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Shared:
    """State every connection of one server shares: the limits and the buffered-body budget."""

    def __init__(self, options: Any) -> None:
        self.max_header_bytes = int(options.max_header_bytes)
        self.max_body_bytes = int(options.max_body_bytes)
        self.max_buffered = int(options.max_buffered_body_bytes)
        self.max_connections = int(options.max_connections)
        self.head_timeout_s = float(options.head_timeout_s)
        self.body_timeout_s = float(options.body_timeout_s)
        self.drain_timeout_s = float(options.drain_timeout_s)
        self.buffered = 0  # body bytes reserved by requests not yet answered, all connections
        self.refused: dict[int, int] = {}  # status → count, for tests and metrics
        self.drain_timeouts = 0  # connections dropped because their client read no answer
        # How late the event loop runs now, in seconds (`HttpTransport._probe_lag`): bytes that reach a
        # busy loop waited in the kernel about that long before any callback of ours saw them.
        self.loop_lag_s = 0.0


def _refusal(status: int, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    extra = b"retry-after: 1\r\n" if status == 503 else b""
    return b"%scontent-type: application/json\r\ncontent-length: %d\r\n%sconnection: close\r\n\r\n%s" % (
        STATUS_LINE[status], len(body), extra, body)


class _OneWriteResponse:
    """The transport as a request's cycle sees it: the response head is held and sent with the body.

    uvicorn writes a response's head and body separately; joined they cost one send() instead of two.
    Everything but `write` is the real transport's.
    """

    __slots__ = ("_transport", "_cycle", "_held")

    def __init__(self, transport: asyncio.Transport, cycle: Any) -> None:
        self._transport = transport
        self._cycle = cycle
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        cycle = self._cycle
        if self._held is None and cycle.response_started and not cycle.response_complete and cycle.chunked_encoding is False:
            if data[:9] == b"HTTP/1.1 " and cycle.expected_content_length and cycle.scope["method"] != "HEAD":
                self._held = data  # the head of a response whose body follows
                return
        if self._held is not None:
            data, self._held = self._held + data, None
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class StrictHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus the framing rules and limits llhttp leaves to its user."""

    shared: _Shared  # set on the per-server subclass made by `HttpTransport`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = "idle"  # idle → head → body → idle ...; "refused" is final
        self._head_bytes = 0  # request line and header fields received, exact
        self._raw_head_bytes = 0  # bytes of whole reads an unfinished head spans
        self._began = False  # a message began during the current read
        self._trailer_fields = 0
        self._trailer_bytes = 0
        self._body_bytes = 0
        self._chunks = 0
        self._chunked = False
        self._reserved: deque[list[int]] = deque()  # per request not yet answered: [bytes reserved]
        self._deadline: float | None = None  # loop time by which the head or body must be complete
        self._deadline_for: tuple[str, float] = ("head", 0.0)  # what, and its timeout in seconds
        self._drain_timer: asyncio.TimerHandle | None = None
        self._pending_refusal: bytes | None = None
        self._lingered = 0

    # ---- transport events -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.shared.max_connections:
            self._refuse(503, f"The server holds its limit of {self.shared.max_connections} connections; retry.")
            return
        # An opened connection that never sends is idle, not a request: close it silently after keep-alive.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        while self._reserved:
            self.shared.buffered -= self._reserved.popleft()[0]
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == "refused":
            self._lingered += len(data)
            if self._lingered > _LINGER_MAX_BYTES:
                self.transport.abort()
            return
        self._unset_keepalive_if_required()
        self._began = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "Protocol upgrades are not supported by this server.")
        except httptools.HttpParserError as e:
            cause = e.__context__
            if isinstance(cause, _Refuse):
                self._refuse(cause.status, cause.message)
            else:
                self._refuse(400, f"Malformed HTTP request: {str(e)[:200]}.")
        except _Refuse as e:  # raised outside a parser callback
            self._refuse(e.status, e.message)
        else:
            if self._phase == "head" and not self._began:  # all of this read went to an unfinished head
                self._raw_head_bytes += len(data)  # (a head begun inside a read adds at most that one read)
            if self._phase == "head" and self._raw_head_bytes > self.shared.max_header_bytes:
                self._refuse(431, f"Request head larger than max_header_bytes={self.shared.max_header_bytes}.")

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._drain_timer is None:  # the client reads nothing: give up on it after drain_timeout_s
            self._drain_timer = self.loop.call_later(self.shared.drain_timeout_s, self._drain_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None

    def _drain_timeout(self) -> None:
        self._drain_timer = None
        self.shared.drain_timeouts += 1
        log.warning("closing a connection whose client read no answer for %.0f s", self.shared.drain_timeout_s)
        self.transport.abort()

    # ---- parser callbacks ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # A request's deadline (X-Deadline-Ms) counts from its first byte, so reading it, waiting for the
        # loop and parsing it are spent from its budget, not added on top (ctrflow.serving.rest). The
        # first byte's time as well as we can know it: when the loop read it, less how late the loop runs.
        self.scope["ctrflow.arrived"] = time.monotonic() - self.shared.loop_lag_s
        self._phase = "head"
        self._began = True
        self._head_bytes = self._raw_head_bytes = 0
        self._trailer_fields = self._trailer_bytes = self._body_bytes = self._chunks = 0
        self._chunked = False
        self._set_timer(self.shared.head_timeout_s, "head")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._phase == "body":  # a trailer field: counted, bounded, dropped (routes never see trailers)
            self._trailer_fields += 1
            self._trailer_bytes += len(name) + len(value) + 4
            if self._trailer_fields > MAX_TRAILER_FIELDS or self._trailer_bytes > self.shared.max_header_bytes:
                raise _Refuse(400, f"Too many trailer fields after the last chunk (at most {MAX_TRAILER_FIELDS}, "
                                   f"{self.shared.max_header_bytes} bytes).")
            return
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.shared.max_header_bytes:
            raise _Refuse(431, f"Request head larger than max_header_bytes={self.shared.max_header_bytes}.")
        super().on_header(name, value)

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > self.shared.max_header_bytes:
            raise _Refuse(431, f"Request target larger than max_header_bytes={self.shared.max_header_bytes}.")
        super().on_url(url)

    def on_headers_complete(self) -> None:
        self._cancel_timer()
        self._phase = "body"
        method = self.parser.get_method().decode("ascii", "replace")
        version = self.parser.get_http_version()
        hosts = te = cl = 0
        te_value = b""
        length = 0
        for name, value in self.headers:
            if name == b"host":
                hosts += 1
            elif name == b"transfer-encoding":
                te += 1
                te_value = value
            elif name == b"content-length":
                cl += 1
                length = int(value)  # llhttp checked it: digits only, one value, no overflow
        if version == "1.1" and hosts != 1:
            raise _Refuse(400, f"An HTTP/1.1 request needs exactly one Host header; got {hosts}.")
        if te:
            if version != "1.1":
                raise _Refuse(400, "Transfer-Encoding is not allowed in an HTTP/1.0 request.")
            if te != 1 or te_value.strip().lower() != b"chunked":
                raise _Refuse(400, "The only Transfer-Encoding accepted is exactly 'chunked'. "
                                   f"Got {te_value[:60].decode('latin-1')!r}.")
            self._chunked = True
        elif not cl and method in _BODY_METHODS:
            raise _Refuse(411, f"A {method} needs a Content-Length header (or Transfer-Encoding: chunked).")
        if length > self.shared.max_body_bytes:
            raise _Refuse(413, f"Request body of {length} bytes is larger than the limit of {self.shared.max_body_bytes} "
                               "bytes (max_body_bytes); split it into several requests.")
        self._reserve(length, new_request=True)
        if length or self._chunked:
            self._set_timer(self.shared.body_timeout_s, "body")
        super().on_headers_complete()
        self.cycle.transport = _OneWriteResponse(self.transport, self.cycle)  # type: ignore[assignment]

    def on_chunk_header(self) -> None:
        self._chunks += 1
        if self._chunks > FREE_CHUNKS and self._body_bytes < (self._chunks - FREE_CHUNKS) * MIN_MEAN_CHUNK_BYTES:
            raise _Refuse(400, f"Chunks too small: {self._chunks} chunks for {self._body_bytes} bytes; "
                               f"send chunks of at least {MIN_MEAN_CHUNK_BYTES} bytes (or a Content-Length).")

    def on_body(self, body: bytes) -> None:
        if self._chunked:
            self._body_bytes += len(body)
            if self._body_bytes > self.shared.max_body_bytes:
                raise _Refuse(413, f"Chunked request body larger than the limit of {self.shared.max_body_bytes} "
                                   "bytes (max_body_bytes); split it into several requests.")
            self._reserve(len(body), new_request=False)
        cycle = self.cycle
        if cycle.response_complete or cycle.disconnected:
            return
        # Unlike uvicorn, gather the whole body before waking the app: one wake-up and one copy per
        # request instead of one per read, and no pause/resume of reading per 64 KiB. Memory stays
        # bounded by max_body_bytes per request and max_buffered_body_bytes in total (reserved above).
        cycle.body += body

    def on_message_complete(self) -> None:
        self._cancel_timer()
        self._phase = "idle"
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self._reserved:
            self.shared.buffered -= self._reserved.popleft()[0]
        if self._pending_refusal is not None and not self.pipeline:  # a pipelined request was refused: answer in order
            self.transport.write(self._pending_refusal)
            self._pending_refusal = None
            self._close_after_refusal()
            return
        super().on_response_complete()

    # ---- refusals, budget, timers ---------------------------------------------------------------------

    def _reserve(self, n: int, *, new_request: bool) -> None:
        """Count `n` more body bytes against the server-wide budget (503 beyond); released when answered."""
        shared = self.shared
        if shared.buffered + n > shared.max_buffered:
            raise _Refuse(503, f"The server holds its limit of {shared.max_buffered} request-body bytes in total "
                               "(max_buffered_body_bytes); retry.")
        shared.buffered += n
        if new_request:
            self._reserved.append([n])
        else:
            self._reserved[-1][0] += n

    def _set_timer(self, seconds: float, what: str) -> None:
        # A deadline, not a loop timer: `HttpTransport` sweeps every connection a few times a second,
        # which costs less per request than arming and cancelling two TimerHandles.
        self._deadline = self.loop.time() + seconds
        self._deadline_for = (what, seconds)

    def _cancel_timer(self) -> None:
        self._deadline = None

    def check_deadline(self, now: float) -> None:
        """Called by the transport's sweep: answer 408 if the head or body is late."""
        if self._deadline is not None and now >= self._deadline:
            self._deadline = None
            self._timed_out(*self._deadline_for)

    def _timed_out(self, what: str, seconds: float) -> None:
        if self.flow is not None and self.flow.read_paused:
            # We stopped reading (a pipelined request waits, or the app has not taken the body yet):
            # the client is not late. Look again later.
            self._set_timer(seconds, what)
            return
        if self._phase in ("head", "body"):
            self._refuse(408, f"The request {what} did not arrive within {seconds:g} s.")

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` (unless a response is already under way), stop reading requests, close soon."""
        if self._phase == "refused":
            return
        self._phase = "refused"
        self._cancel_timer()
        self.shared.refused[status] = self.shared.refused.get(status, 0) + 1
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started or cycle.scope is not self.scope:
                # The refused request is pipelined behind one being answered (or the answer is
                # being written): answer the refusal after it, in order.
                if cycle.scope is not self.scope:
                    self._pending_refusal = _refusal(status, message)  # written by on_response_complete
                    return
                self._close_after_refusal()
                return
            # The app waits for this request's body: tell it the client is gone, answer here.
            cycle.disconnected = True
            cycle.message_event.set()
        if not self.transport.is_closing():
            self.transport.write(_refusal(status, message))
        self._close_after_refusal()

    def _close_after_refusal(self) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        self._unset_keepalive_if_required()
        if transport.can_write_eof():
            transport.write_eof()  # the answer is flushed first; then FIN
        self.loop.call_later(LINGER_S, transport.close)

    def shutdown(self) -> None:
        if self._phase == "head":  # a request half-received when the server stops: it will not be served
            self.transport.close()
            return
        super().shutdown()


class HttpTransport:
    """uvicorn serving the ASGI app over `StrictHttpProtocol` on an event loop of a background thread."""

    def __init__(self, options: Any, handle: Handle) -> None:
        import uvicorn

        self.options = options
        self._handle = handle
        self.shared = _Shared(options)
        protocol = type("BoundStrictHttpProtocol", (StrictHttpProtocol,), {"shared": self.shared})
        self._config = uvicorn.Config(
            self._app, http=protocol, loop="asyncio", interface="asgi3", lifespan="off", ws="none",
            proxy_headers=False, server_header=False, access_log=False, log_config=None, log_level="warning",
            timeout_keep_alive=float(options.keep_alive_timeout_s), backlog=1024,
        )
        self._server = uvicorn.Server(self._config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

    def start(self) -> int:
        """Bind (errors raise here), then serve on a background thread; returns the bound port."""
        host = self.options.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say so, and without
        # it Nagle holds the body write behind the head write for a delayed ACK (40 ms per answer).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((host, self.options.port))
            sock.listen(1024)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        port = sock.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(self._serve([sock], started))
            except BaseException:  # noqa: BLE001 - logged; stop() still completes
                log.exception("the HTTP server stopped on an error")
            finally:
                started.set()
                try:
                    self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                finally:
                    self.loop.close()
                    sock.close()
                    self._done.set()

        self._thread = threading.Thread(target=run, name="ctrflow-http", daemon=True)
        self._thread.start()
        started.wait(60)
        return port

    async def _sweep(self) -> None:
        """Head and body deadlines of every connection, checked a few times per timeout."""
        tick = min(max(min(self.shared.head_timeout_s, self.shared.body_timeout_s) / 4, 0.02), 1.0)
        loop = asyncio.get_running_loop()
        while True:  # until the transport's loop ends (cancelled with the other tasks)
            await asyncio.sleep(tick)
            now = loop.time()
            for protocol in list(self._server.server_state.connections):
                check = getattr(protocol, "check_deadline", None)
                if check is not None:
                    check(now)

    async def _probe_lag(self) -> None:
        """Measure how late the loop wakes a timer (its lag) every LAG_PROBE_S, smoothed over ~50 ms: a
        loop that stays busy is charged in full, one stall (the process descheduled once) only in part."""
        loop = asyncio.get_running_loop()
        shared = self.shared
        while True:  # until the transport's loop ends (cancelled with the other tasks)
            asked = loop.time() + LAG_PROBE_S
            await asyncio.sleep(LAG_PROBE_S)
            lag = max(0.0, loop.time() - asked)
            shared.loop_lag_s += 0.2 * (lag - shared.loop_lag_s)

    async def _serve(self, sockets: list[socket.socket], started: threading.Event) -> None:
        sweeper = asyncio.ensure_future(self._sweep())
        prober = asyncio.ensure_future(self._probe_lag())
        task = asyncio.ensure_future(self._server.serve(sockets=sockets))
        while not self._server.started and not task.done():
            await asyncio.sleep(0.005)
        started.set()
        try:
            await task
        finally:
            sweeper.cancel()
            prober.cancel()

    def collect(self) -> list[Any]:
        """The transport's own metric families (connections, buffered body bytes, refusals by code)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        shared = self.shared
        connections = GaugeMetricFamily("ctrflow_http_connections", "Open HTTP connections.")
        connections.add_metric((), len(self._server.server_state.connections))
        buffered = GaugeMetricFamily("ctrflow_http_buffered_body_bytes",
                                     "Request-body bytes held by requests read but not yet answered.")
        buffered.add_metric((), shared.buffered)
        refused = CounterMetricFamily("ctrflow_http_refused", "Requests or connections refused by the transport "
                                      "(framing, limits, timeouts) by status code.", labels=("code",))
        for code, n in sorted(shared.refused.items()):
            refused.add_metric((str(code),), n)
        drains = CounterMetricFamily("ctrflow_http_drain_timeouts", "Connections dropped: their client read no answer "
                                     "for drain_timeout_s.")
        drains.add_metric((), shared.drain_timeouts)
        lag = GaugeMetricFamily("ctrflow_http_loop_lag_seconds", "How late the serving event loop wakes a timer now "
                                "(requests' deadlines are dated back by it).")
        lag.add_metric((), shared.loop_lag_s)
        return [connections, buffered, refused, drains, lag]

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float | None = 60.0) -> Any:
        """Run a coroutine on the serving loop from another thread and wait for its result."""
        if self.loop is None:
            raise RuntimeError("the HTTP transport is not started")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, finish in-flight requests for up to `grace_s`, close every connection."""
        if self._thread is None or not self._thread.is_alive():
            return
        self._config.timeout_graceful_shutdown = max(0.0, float(grace_s))
        self._server.should_exit = True
        self._done.wait(grace_s + 5)
        if not self._done.is_set():
            self._server.force_exit = True
            self._done.wait(5)

    # ---- the ASGI app ---------------------------------------------------------------------------------

    async def _app(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body: bytes | bytearray = message.get("body", b"")
        if message.get("more_body"):
            buffer = bytearray(body)
            while True:  # bounded: the protocol refuses bodies over max_body_bytes
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                buffer += message.get("body", b"")
                if not message.get("more_body"):
                    break
            body = buffer
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        response = await self._handle(RestRequest(scope["method"], scope["path"], headers, body,
                                                  scope["query_string"].decode("latin-1"), scope.get("ctrflow.arrived")))
        await send({"type": "http.response.start", "status": response.status,
                    "headers": [(b"content-type", response.content_type),
                                (b"content-length", b"%d" % len(response.body)), *response.headers]})
        await send({"type": "http.response.body", "body": response.body})


# ---- re-exports: names this module used to define --------------------------------------------------

_MOVED = {
    "ServeOptions": "ctrflow.serving.server", "Server": "ctrflow.serving.server", "serve": "ctrflow.serving.server",
    "COLUMNAR_CONTENT_TYPE": "ctrflow.serving.codec", "COLUMNAR_FORMAT": "ctrflow.serving.codec",
    "ParsedRequest": "ctrflow.serving.codec", "RequestError": "ctrflow.serving.codec",
    "decode_columnar": "ctrflow.serving.codec", "encode_columnar": "ctrflow.serving.codec",
    "parse_predict_json": "ctrflow.serving.codec", "parse_columnar_json": "ctrflow.serving.codec",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'ctrflow.serving.http' has no attribute {name!r}")
