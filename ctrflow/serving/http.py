"""The HTTP/1.1 transport of the REST routes: uvicorn + httptools (llhttp), dispatching to the routes directly.

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
stop (uvicorn's server, our protocol's `shutdown`): stop accepting, close idle connections, let
in-flight requests finish and answer with `Connection: close`, up to the grace period.

Implementation: the protocol subclasses uvicorn's `HttpToolsProtocol` (pinned range in pyproject.toml)
for llhttp, the connection set, listening sockets and graceful shutdown, but dispatches each complete
request to the routes itself (one task, one write per answer) instead of through uvicorn's generic ASGI
request cycle, whose per-request objects cost more than the old hand-framed server's whole transport
(measured in BENCHMARKS.md, "One coroutine per request"). Pipelining, flow control and keep-alive are
therefore `StrictHttpProtocol`'s, below.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE, HttpToolsProtocol

from ctrflow.serving.deadline import DoorPass, door_for
from ctrflow.serving.models import hold_short_switch_interval, release_short_switch_interval
from ctrflow.serving.rest import RestRequest, RestResponse

__all__ = ["FREE_CHUNKS", "HttpTransport", "LINGER_S", "MAX_TRAILER_FIELDS", "MIN_MEAN_CHUNK_BYTES", "StrictHttpProtocol"]

log = logging.getLogger("ctrflow.serving")

Handle = Callable[[RestRequest], Awaitable[RestResponse]]

MAX_TRAILER_FIELDS = 32  # trailer fields accepted after the last chunk (then 400)
FREE_CHUNKS = 64  # chunks any body may use, whatever their size
MIN_MEAN_CHUNK_BYTES = 256  # beyond FREE_CHUNKS, the mean chunk must be at least this large (else 400)
LAG_PROBE_S = 0.01  # how often the event loop's lag is measured while it lags (a request's first byte is dated with it)
LAG_PROBE_SLOW_S = 0.1  # ... and while it does not (lag under _LAG_FAST_ABOVE_S)
_LAG_FAST_ABOVE_S = 0.001
_LAG_MEMORY_S = 0.05  # the lag is smoothed over about this long
LINGER_S = 2.0  # after a refusal, read and drop what the client still sends for at most this long
_LINGER_MAX_BYTES = 64 << 20  # ... and at most this many bytes
_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))
# While a server runs, Python's GIL switch interval is held short (`hold_short_switch_interval`): the
# event loop gives the GIL up in every socket call (a recv and a send per request, refused or served)
# and then waits for it while the batcher's thread runs TensorFlow's Python dispatch, up to a whole
# interval (5 ms by default) per call (BENCHMARKS.md, "Where a refusal's time goes at 2x").


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
        self.head_timer = ("head", self.head_timeout_s)  # (what, seconds) of a connection's deadline, made once
        self.body_timer = ("body", self.body_timeout_s)
        self.drain_timeout_s = float(options.drain_timeout_s)
        self.buffered = 0  # body bytes reserved by requests not yet answered, all connections
        self.refused: dict[int, int] = {}  # status → count, for tests and metrics
        self.drain_timeouts = 0  # connections dropped because their client read no answer
        # How late the event loop runs now, in seconds (`HttpTransport._probe_lag`): bytes that reach a
        # busy loop waited in the kernel about that long before any callback of ours saw them.
        self.loop_lag_s = 0.0
        self.reads = 0  # reads from any connection (the lag probe parks while this stands still)
        self.wake_prober: Callable[[], None] | None = None  # set while the lag probe is parked
        # Asked once a request's head is read: (status, message) refuses it before its body is buffered
        # (`ctrflow.serving.deadline.door_for`: overload and passed deadlines); a `DoorPass` lets it in
        # with the door's lease (handed to the routes in `RestRequest.door`); None lets it in without.
        self.door: Callable[[str, list[tuple[bytes, bytes]], float], Any] | None = None
        self.door_refused = 0  # requests so refused (also counted by their batcher's shed counter)


_VALID_FIELDS: set[tuple[bytes, bytes]] = set()  # response header fields already checked (no CR/LF/NUL)
_VALID_FIELDS_MAX = 1024
_date: tuple[int, bytes] = (0, b"")  # (second, its Date field): formatted once per second, not per answer


def _date_field() -> bytes:
    """`date: <IMF-fixdate>` (RFC 9110 6.6.1: an origin server with a clock sends it)."""
    global _date
    now = int(time.time())
    if now != _date[0]:
        _date = (now, b"date: %s\r\n" % formatdate(now, usegmt=True).encode())
    return _date[1]


def _refusal(status: int, message: str, keep_alive: bool = False) -> bytes:
    """A whole error answer (JSON error, Retry-After on 503): a refusal, or a request turned away at the door."""
    body = json.dumps({"error": message}).encode()
    extra = b"retry-after: 1\r\n" if status == 503 else b""
    return b"%s%scontent-type: application/json\r\ncontent-length: %d\r\n%s%s\r\n%s" % (
        STATUS_LINE[status], _date_field(), len(body), extra, b"" if keep_alive else b"connection: close\r\n", body)


class StrictHttpProtocol(HttpToolsProtocol):
    """llhttp framing (via uvicorn's httptools protocol) plus the rules and limits llhttp leaves to its
    user, and a direct dispatch of each complete request to the routes.

    uvicorn's own request cycle (an ASGI task, scope dict, `asyncio.Event`, two `send()` messages and a
    keep-alive `TimerHandle` per request) cost +67-130 µs per request over the old hand-framed server
    (BENCHMARKS.md, "One coroutine per request"); what it did is done here instead: a complete request
    becomes one `RestRequest`, one task awaits the routes and writes the whole answer with one
    `transport.write`. Pipelined requests are answered in order (reading paused while they wait), the
    next one starts only when the client reads (write side not paused), idle keep-alive is a deadline
    of the transport's sweep, and a graceful stop lets the request in flight finish with
    `connection: close`. uvicorn still owns the listening sockets, the connection set and shutdown.
    """

    shared: _Shared  # set on the per-server subclass made by `HttpTransport`
    handle: Handle  # the routes; set on that subclass too

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
        self._body: bytes | bytearray = b""
        self._arrived = 0.0
        self._turned_away: tuple[int, str] | None = None  # refused at the door: its body is read and dropped
        self._pass: DoorPass | None = None  # let in by the door: its lease, until the request is complete
        self._method = ""
        self._path = ""
        self._query = ""
        self._reserved: deque[list[int]] = deque()  # per request not yet answered: [bytes reserved]
        self._deadline: float | None = None  # loop time by which the head or body must be complete
        self._deadline_for: tuple[str, float] = ("head", 0.0)  # what, and its timeout in seconds
        self._idle_timer = ("idle", float(self.timeout_keep_alive))
        self._drain_timer: asyncio.TimerHandle | None = None
        self._pending_refusal: bytes | None = None
        self._lingered = 0
        self._queue: deque[tuple[RestRequest, bool]] = deque()  # complete requests not yet started
        self._busy = False  # a request is being answered
        self._task: asyncio.Task | None = None  # ... by this task (held: the loop keeps only weak refs)
        self._pumping = False
        self._continue_owed = False
        self._stopping = False  # graceful stop: answer what is in flight with `connection: close`, then close
        self._closed = False

    # ---- transport events -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.shared.max_connections:
            self._refuse(503, f"The server holds its limit of {self.shared.max_connections} connections; retry.")
            return
        # An opened connection that never sends is idle, not a request: closed silently after keep-alive.
        self._set_timer(self._idle_timer)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.connections.discard(self)
        self._cancel_timer()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        while self._reserved:
            self.shared.buffered -= self._reserved.popleft()[0]
        self._drop_pass()
        for request, _ in self._queue:  # read, never started: their leases go back (a started one's route returns its own)
            if type(request) is RestRequest and request.door is not None:
                request.door.release()
        self._queue.clear()
        if self.flow is not None:
            self.flow.resume_writing()
        if exc is None:
            self.transport.close()
        self.parser = None  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        shared = self.shared
        shared.reads += 1
        if shared.wake_prober is not None:
            shared.wake_prober()
        if self._phase == "refused":
            self._lingered += len(data)
            if self._lingered > _LINGER_MAX_BYTES:
                self.transport.abort()
            return
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
        if self._queue:
            self._pump()

    def pause_writing(self) -> None:
        self.flow.pause_writing()
        if self._drain_timer is None:  # the client reads nothing: give up on it after drain_timeout_s
            self._drain_timer = self.loop.call_later(self.shared.drain_timeout_s, self._drain_timeout)

    def resume_writing(self) -> None:
        self.flow.resume_writing()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        if not self._busy:
            self._pump()

    def _drain_timeout(self) -> None:
        self._drain_timer = None
        self.shared.drain_timeouts += 1
        log.warning("closing a connection whose client read no answer for %.0f s", self.shared.drain_timeout_s)
        self.transport.abort()

    # ---- parser callbacks ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        # A request's deadline (X-Deadline-Ms) counts from its first byte, so reading it, waiting for the
        # loop and parsing it are spent from its budget, not added on top (ctrflow.serving.rest). The
        # first byte's time as well as we can know it: when the loop read it, less how late the loop runs.
        shared = self.shared
        now = time.monotonic()  # (asyncio's loop.time() is this clock: the sweep compares deadlines with it)
        self._arrived = now - shared.loop_lag_s
        self.url = b""
        self.headers = []
        self.expect_100_continue = False
        self._continue_owed = False  # a 100 Continue owed once the answers before this request are sent
        self._body = b""
        self._phase = "head"
        self._began = True
        self._head_bytes = self._raw_head_bytes = 0
        self._trailer_fields = self._trailer_bytes = self._body_bytes = self._chunks = 0
        self._chunked = False
        self._turned_away = None
        self._set_timer(shared.head_timer, now)

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
        self.headers.append((name.lower(), value))

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > self.shared.max_header_bytes:
            raise _Refuse(431, f"Request target larger than max_header_bytes={self.shared.max_header_bytes}.")
        self.url += url

    def on_headers_complete(self) -> None:
        self._cancel_timer()
        self._phase = "body"
        parser = self.parser
        method = parser.get_method().decode("ascii", "replace")
        version = parser.get_http_version()
        if parser.should_upgrade():
            raise _Refuse(400, "Protocol upgrades are not supported by this server.")
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
            elif name == b"expect" and value.lower() == b"100-continue":
                self.expect_100_continue = True
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
        url = httptools.parse_url(self.url)
        path = url.path.decode("ascii")
        self._path = unquote(path) if "%" in path else path
        self._query = url.query.decode("latin-1") if url.query else ""
        self._method = method
        door = self.shared.door
        if door is not None and method == "POST" and not self.expect_100_continue:
            # Under overload most requests are refused: decided here, a refusal skips buffering, decoding
            # and routing its body (read and dropped below, so the connection stays in step).
            try:
                answer = door(self._path, self.headers, self._arrived)
            except Exception:  # noqa: BLE001 - a bug in the door must not refuse the request: let it in
                log.exception("the door failed on POST %s; letting the request in", self._path)
            else:
                if type(answer) is tuple:
                    self._turned_away = answer
                else:
                    self._pass = answer  # returned by `_refuse`/`connection_lost` if the request never completes
        self._reserve(length if self._turned_away is None else 0, new_request=True)  # nothing to buffer when refused
        if length or self._chunked:
            self._set_timer(self.shared.body_timer)
            if self.expect_100_continue:  # after the answers before it, if any (`_pump`)
                if self._busy or self._queue:
                    self._continue_owed = True
                else:
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

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
            if self._turned_away is not None:
                return
            self._reserve(len(body), new_request=False)
        elif self._turned_away is not None:
            return
        # The whole body is gathered before the routes see it: one copy per request at most (none when it
        # came in one read). Memory stays bounded by max_body_bytes per request and
        # max_buffered_body_bytes in total (reserved above).
        if not self._body:
            self._body = body
        elif isinstance(self._body, bytearray):
            self._body += body
        else:
            self._body = bytearray(self._body) + body

    def on_message_complete(self) -> None:
        self._cancel_timer()
        self._phase = "idle"
        if self._turned_away is not None:  # answered in order by `_pump`, without a task or the routes
            parser = self.parser
            keep_alive = parser.get_http_version() != "1.0" and parser.should_keep_alive()
            self._queue.append((_refusal(*self._turned_away, keep_alive), keep_alive))
            self._turned_away = None
            self.shared.door_refused += 1
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in self.headers}
        request = RestRequest(self._method, self._path, headers, self._body, self._query, self._arrived, self._pass)
        self._pass = None  # the request's now: taken by its route, or returned when it is answered or dropped
        self._body = b""
        parser = self.parser
        self._queue.append((request, parser.get_http_version() != "1.0" and parser.should_keep_alive()))

    # ---- answering ------------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Start the next queued request if none is being answered and the client reads its answers."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._queue and not self._busy and not self.flow.write_paused and not self._closed:
                request, keep_alive = self._queue.popleft()
                if type(request) is bytes:  # refused at the door: its answer is ready
                    self._write_door_answer(request, keep_alive)
                    continue
                self._busy = True
                self._task = self.loop.create_task(self._answer(request, keep_alive))
            if self._queue:  # a request waits behind the one in flight: read no more until it starts
                self.flow.pause_reading()
            elif not self._busy:
                self.flow.resume_reading()
                if self._continue_owed:
                    self._continue_owed = False
                    if self._phase == "body":
                        self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                if self._pending_refusal is not None:  # a pipelined request was refused: answer in order
                    if not self.transport.is_closing():
                        self.transport.write(self._pending_refusal)
                    self._pending_refusal = None
                    self._close_after_refusal()
        finally:
            self._pumping = False

    async def _answer(self, request: RestRequest, keep_alive: bool) -> None:
        try:
            try:
                response = await self.handle(request)
            finally:
                if request.door is not None:  # a lease its route did not take (e.g. answered 404/415)
                    request.door.release()
            extra = response.headers
            head = b"%s%scontent-type: %s\r\ncontent-length: %d\r\n" % (
                STATUS_LINE[response.status], _date_field(), response.content_type, len(response.body))
            if extra:
                for pair in extra:
                    if pair not in _VALID_FIELDS:  # (a handful: x-model-version per version, rollout arms)
                        name, value = pair
                        if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
                            raise ValueError(f"invalid response header {name!r}: {value!r}")
                        if len(_VALID_FIELDS) >= _VALID_FIELDS_MAX:
                            _VALID_FIELDS.clear()
                        _VALID_FIELDS.add(pair)
                head += b"".join(b"%s: %s\r\n" % pair for pair in extra)
            body = b"" if request.method == "HEAD" else response.body
        except Exception:  # noqa: BLE001 - the routes answer their own errors; this is a bug, logged
            log.exception("the REST routes failed on %s %s", request.method, request.path)
            head = STATUS_LINE[500] + _date_field() + b"content-type: text/plain; charset=utf-8\r\ncontent-length: 21\r\n"
            body, keep_alive = b"Internal Server Error", False
        keep_alive = keep_alive and not self._stopping
        transport = self.transport
        self._busy = False
        self._task = None
        if self._reserved:
            self.shared.buffered -= self._reserved.popleft()[0]
        self.server_state.total_requests += 1
        if self._closed or transport.is_closing():
            return
        if keep_alive:
            transport.write(head + b"\r\n" + body)
            if self._phase == "idle" and not self._queue:  # nothing more read: the connection is idle now
                self._set_timer(self._idle_timer)
            self._pump()
        else:
            transport.write(head + b"connection: close\r\n\r\n" + body)
            if self._pending_refusal is not None or self._phase == "refused":
                self._pending_refusal = None
                self._close_after_refusal()
            else:
                transport.close()

    def _write_door_answer(self, answer: bytes, keep_alive: bool) -> None:
        if self._reserved:
            self.shared.buffered -= self._reserved.popleft()[0]  # 0 bytes: kept in step with the queue
        self.server_state.total_requests += 1
        transport = self.transport
        if self._closed or transport.is_closing():
            return
        transport.write(answer)
        if not (keep_alive and not self._stopping):
            transport.close()
        elif self._phase == "idle" and not self._queue:
            self._set_timer(self._idle_timer)

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

    def _set_timer(self, timer: tuple[str, float], now: float | None = None) -> None:
        """Arm the connection's one deadline: `timer` is (what, seconds), e.g. `_Shared.head_timer`; `now`
        a `time.monotonic()` already read. A deadline, not a loop timer: `HttpTransport` sweeps every
        connection a few times a second, which costs less per request than arming and cancelling TimerHandles."""
        self._deadline_for = timer
        self._deadline = (time.monotonic() if now is None else now) + timer[1]

    def _cancel_timer(self) -> None:
        self._deadline = None

    def check_deadline(self, now: float) -> None:
        """Called by the transport's sweep: answer 408 if the head or body is late; close if idle too long."""
        if self._deadline is not None and now >= self._deadline:
            self._deadline = None
            self._timed_out(*self._deadline_for)

    def _timed_out(self, what: str, seconds: float) -> None:
        if what == "idle":  # keep-alive expired: close without an answer
            if self._phase == "idle" and not self._busy and not self._queue and not self.transport.is_closing():
                self.transport.close()
            return
        if self.flow is not None and self.flow.read_paused:
            # We stopped reading (a pipelined request waits): the client is not late. Look again later.
            self._set_timer((what, seconds))
            return
        if self._phase in ("head", "body"):
            self._refuse(408, f"The request {what} did not arrive within {seconds:g} s.")

    def _drop_pass(self) -> None:
        door_pass, self._pass = self._pass, None
        if door_pass is not None:
            door_pass.release()

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` after the requests before it, stop reading requests, close soon."""
        self._drop_pass()  # the request being read (if the door let it in) is never answered
        if self._phase == "refused":
            return
        self._phase = "refused"
        self._cancel_timer()
        self.shared.refused[status] = self.shared.refused.get(status, 0) + 1
        if self._busy or self._queue:  # requests read before this one are answered first, in order
            self._pending_refusal = _refusal(status, message)  # written by `_pump` once they are
            return
        if not self.transport.is_closing():
            self.transport.write(_refusal(status, message))
        self._close_after_refusal()

    def _close_after_refusal(self) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        self._cancel_timer()
        if transport.can_write_eof():
            transport.write_eof()  # the answer is flushed first; then FIN
        self.loop.call_later(LINGER_S, transport.close)

    def shutdown(self) -> None:
        """Graceful stop (called by uvicorn's server): close unless a request is in flight or being read."""
        self._stopping = True
        if self._phase == "refused":
            return
        if self._phase == "head" or (self._phase == "idle" and not self._busy and not self._queue):
            # idle, or a request half-received when the server stops: it will not be served
            self.transport.close()


class _Server(uvicorn.Server):
    """uvicorn's server, woken by `HttpTransport.stop` instead of polling `should_exit`.

    uvicorn's `main_loop` wakes ten times a second to poll it and to refresh a Date header that this
    protocol does not use. That cost ~1 ms of CPU per second on an idle server here, which the paired
    bench charges to every request (BENCHMARKS.md, "One coroutine per request")."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._exit: asyncio.Event | None = None

    async def main_loop(self) -> None:
        self._exit = asyncio.Event()
        if not self.should_exit:  # `stop` sets should_exit first, then wakes us on the loop
            await self._exit.wait()

    def wake(self) -> None:
        """On the serving loop: `should_exit` was set; end `main_loop` now."""
        if self._exit is not None:
            self._exit.set()


class HttpTransport:
    """uvicorn serving the ASGI app over `StrictHttpProtocol` on an event loop of a background thread."""

    def __init__(self, options: Any, handle: Handle) -> None:
        self.options = options
        self._handle = handle
        self.shared = _Shared(options)
        self.shared.door = door_for(getattr(handle, "__self__", None))
        protocol = type("BoundStrictHttpProtocol", (StrictHttpProtocol,),
                        {"shared": self.shared, "handle": staticmethod(handle)})
        self._config = uvicorn.Config(
            _no_asgi_app, http=protocol, loop="asyncio", interface="asgi3", lifespan="off", ws="none",
            proxy_headers=False, server_header=False, access_log=False, log_config=None, log_level="warning",
            timeout_keep_alive=float(options.keep_alive_timeout_s), backlog=1024,
        )
        self._server = _Server(self._config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._prober: asyncio.TimerHandle | None = None
        self._probed_at = 0.0
        self._probe_reads = 0

    def start(self, *, sock: socket.socket | None = None) -> int:
        """Bind (errors raise here), then serve on a background thread; returns the bound port.

        `sock`: an already bound and listening socket to serve instead (e.g. one with SO_REUSEPORT,
        shared by worker processes: `ctrflow.serving.workers`); it is closed when the server stops.
        """
        if sock is None:
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
                    release_short_switch_interval()
                    self._done.set()

        hold_short_switch_interval()
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

    def _probe_lag(self, asked: float) -> None:
        """How late the loop runs a timer (its lag), smoothed over ~50 ms: a loop that stays busy is charged
        in full, one stall (the process descheduled once) only in part.

        A bare timer callback, every LAG_PROBE_S while the loop lags and every LAG_PROBE_SLOW_S while it
        does not, parked while no bytes arrive: the first version (a task sleeping 10 ms in a loop) cost
        an idle server ~9 ms of CPU per second, ~100 µs per wake-up (BENCHMARKS.md, "One coroutine per
        request"). A late timer is late by the whole lag whatever its period, so the slow period only
        delays noticing a change, by at most LAG_PROBE_SLOW_S."""
        loop = self.loop
        now = loop.time()
        shared = self.shared
        alpha = 1.0 - math.exp(-(now - self._probed_at) / _LAG_MEMORY_S)
        shared.loop_lag_s += alpha * (max(0.0, now - asked) - shared.loop_lag_s)
        self._probed_at = now
        if shared.reads == self._probe_reads and shared.loop_lag_s < _LAG_FAST_ABOVE_S:
            self._prober = None  # nothing arrives: no request to date; `_wake_prober` on the next read
            shared.loop_lag_s = 0.0
            shared.wake_prober = self._wake_prober
            return
        self._probe_reads = shared.reads
        step = LAG_PROBE_S if shared.loop_lag_s >= _LAG_FAST_ABOVE_S else LAG_PROBE_SLOW_S
        self._prober = loop.call_at(now + step, self._probe_lag, now + step)

    def _wake_prober(self) -> None:
        self.shared.wake_prober = None
        self._probed_at = now = self.loop.time()
        self._probe_reads = self.shared.reads
        self._prober = self.loop.call_at(now + LAG_PROBE_SLOW_S, self._probe_lag, now + LAG_PROBE_SLOW_S)

    async def _serve(self, sockets: list[socket.socket], started: threading.Event) -> None:
        sweeper = asyncio.ensure_future(self._sweep())
        self._wake_prober()
        task = asyncio.ensure_future(self._server.serve(sockets=sockets))
        while not self._server.started and not task.done():
            await asyncio.sleep(0.005)
        started.set()
        try:
            await task
        finally:
            sweeper.cancel()
            if self._prober is not None:
                self._prober.cancel()

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
        door = CounterMetricFamily("ctrflow_http_door_refused", "Predict requests refused from their head alone "
                                   "(overload or a passed deadline), before their body was buffered.")
        door.add_metric((), shared.door_refused)
        return [connections, buffered, refused, drains, lag, door]

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
        try:
            self.loop.call_soon_threadsafe(self._server.wake)
        except RuntimeError:  # the loop has just closed
            pass
        self._done.wait(grace_s + 5)
        if not self._done.is_set():
            self._server.force_exit = True
            self._done.wait(5)


async def _no_asgi_app(scope: dict, receive: Callable, send: Callable) -> None:
    """uvicorn's Config wants an app; `StrictHttpProtocol` dispatches to the routes itself."""
    raise RuntimeError("StrictHttpProtocol never calls the ASGI app")


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
