"""The HTTP/1.1 transport of the REST routes: connections, framing, limits; routes never see bytes.

`HttpTransport(options, handle)` serves `handle(RestRequest) -> RestResponse` (see
`ctrflow.serving.rest`) on `options.host:options.port` from an event loop on a background thread;
`ctrflow.serving.server.Server` starts and stops it. Older imports (`from ctrflow.serving.http import
serve, ServeOptions, encode_columnar, ...`) keep working through the re-exports at the bottom.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from ctrflow.serving.codec import RequestError, error_body
from ctrflow.serving.rest import RestRequest, RestResponse

__all__ = ["HttpTransport", "parse_head"]

log = logging.getLogger("ctrflow.serving")

Handle = Callable[[RestRequest], Awaitable[RestResponse]]

_REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    411: "Length Required", 413: "Content Too Large", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable", 504: "Gateway Timeout",
}


def _response(status: int, body: bytes, content_type: bytes, *, keep_alive: bool = True, extra: bytes = b"") -> bytes:
    head = (
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n"
        % (status, _REASONS.get(status, "Error").encode(), content_type, len(body), extra,
           b"" if keep_alive else b"Connection: close\r\n")
    )
    return head + body


class _Head:
    __slots__ = ("method", "target", "version", "headers")

    def __init__(self, method: str, target: str, version: str, headers: dict[str, str]) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers


def parse_head(head: bytes) -> _Head:
    """Request line and headers (names lower-cased; a repeated header keeps the last value)."""
    text = head.decode("latin-1")
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise RequestError(f"Malformed request line {lines[0][:100]!r}; expected 'METHOD /path HTTP/1.1'.")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise RequestError(f"Malformed header line {line[:100]!r}.")
        headers[name.lower()] = value.strip()
    return _Head(parts[0], parts[1], parts[2], headers)


class HttpTransport:
    """One asyncio event loop on a background thread serving HTTP/1.1 keep-alive connections."""

    def __init__(self, options: Any, handle: Handle) -> None:
        self.options = options
        self._handle = handle
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> int:
        """Bind and serve on a background thread; returns the bound port."""
        started = threading.Event()
        errors: list[BaseException] = []
        port: list[int] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(
                        self._connection, self.options.host, self.options.port,
                        limit=self.options.max_header_bytes, reuse_address=True, backlog=1024,
                    )
                )
                port.append(self._server.sockets[0].getsockname()[1])
            except BaseException as e:  # noqa: BLE001 - reported to start()
                errors.append(e)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="ctrflow-http", daemon=True)
        self._thread.start()
        started.wait()
        if errors:
            raise errors[0]
        return port[0]

    def stop(self, grace_s: float = 5.0) -> None:
        loop = self._loop
        if loop is not None and self._thread is not None and self._thread.is_alive():
            async def shutdown() -> None:
                if self._server is not None:
                    self._server.close()
                for w in list(self._writers):
                    w.close()
                await asyncio.sleep(0)

            try:
                asyncio.run_coroutine_threadsafe(shutdown(), loop).result(grace_s)
            except Exception:  # noqa: BLE001 - shutting down regardless
                pass
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(grace_s + 5)

    # ---- the connection loop ------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        loop = asyncio.get_running_loop()
        idle = self.options.keep_alive_timeout_s
        try:
            while True:
                timer = loop.call_later(idle, writer.close)  # cheaper than wait_for per request
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    await self._reply_and_close(writer, 431, error_body("Request head larger than "
                                                f"max_header_bytes={self.options.max_header_bytes}."))
                    return
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                finally:
                    timer.cancel()
                keep_alive = await self._request(head, reader, writer)
                if not keep_alive:
                    await _close(writer)
                    return
                if writer.transport.get_write_buffer_size() > 1 << 16:
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:  # noqa: BLE001 - one broken connection must not take the server down
            log.exception("connection handler failed")
        finally:
            self._writers.discard(writer)
            if not writer.is_closing():
                writer.close()

    async def _reply_and_close(self, writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
        writer.write(_response(status, body, b"application/json", keep_alive=False))
        await _close(writer)

    async def _request(self, raw_head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        try:
            head = parse_head(raw_head[:-4])
        except RequestError as e:
            writer.write(_response(e.status, error_body(str(e)), b"application/json", keep_alive=False))
            return False
        h = head.headers
        conn = h.get("connection", "").lower()
        keep_alive = ("close" not in conn) if head.version == "HTTP/1.1" else ("keep-alive" in conn)
        # A body that trickles in slower than the idle timeout (slowloris) loses its connection.
        timer = asyncio.get_running_loop().call_later(self.options.keep_alive_timeout_s, writer.close)
        try:
            body = await self._read_body(head, reader, writer)
        except RequestError as e:  # the body was not (fully) read: the connection cannot be reused
            writer.write(_response(e.status, error_body(str(e)), b"application/json", keep_alive=False))
            return False
        finally:
            timer.cancel()
        path, _, query = head.target.partition("?")
        response = await self._handle(RestRequest(head.method, path, h, body, query))
        extra = b"".join(b"%s: %s\r\n" % (k, v) for k, v in response.headers)
        writer.write(_response(response.status, response.body, response.content_type, keep_alive=keep_alive, extra=extra))
        return keep_alive

    async def _read_body(self, head: _Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        h = head.headers
        limit = self.options.max_body_bytes
        if "chunked" in h.get("transfer-encoding", "").lower():
            if h.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            chunks, total = [], 0
            for _ in range(limit + 1):  # bounded: each chunk holds at least one byte
                try:
                    line = await reader.readuntil(b"\r\n")
                except asyncio.LimitOverrunError:
                    raise RequestError("Malformed chunked body: a chunk-size line is too long.") from None
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise RequestError("Malformed chunk size in a chunked body.") from None
                if size < 0:
                    raise RequestError("Malformed chunk size in a chunked body.")
                if size == 0:
                    for _ in range(100):  # trailers, bounded
                        try:
                            if await reader.readuntil(b"\r\n") == b"\r\n":
                                break
                        except asyncio.LimitOverrunError:
                            raise RequestError("Malformed chunked body: a trailer line is too long.") from None
                    return b"".join(chunks)
                total += size
                if total > limit:
                    raise RequestError(f"Request body larger than the limit of {limit} bytes.", 413)
                data = await reader.readexactly(size + 2)
                if data[-2:] != b"\r\n":
                    raise RequestError("Malformed chunked body: a chunk does not end with CRLF.")
                chunks.append(data[:-2])
            raise RequestError("Too many chunks.", 413)
        raw = h.get("content-length")
        if raw is None:
            if head.method in ("POST", "PUT"):
                raise RequestError("A POST needs a Content-Length header (or Transfer-Encoding: chunked).", 411)
            return b""
        if not raw.isdigit():
            raise RequestError(f"Invalid Content-Length {raw[:40]!r}.")
        length = int(raw)
        if length > limit:
            raise RequestError(f"Request body of {length} bytes is larger than the limit of {limit} bytes "
                               "(max_body_bytes); split it into several requests.", 413)
        if length and h.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return await reader.readexactly(length) if length else b""


async def _close(writer: asyncio.StreamWriter) -> None:
    try:
        await writer.drain()
    except ConnectionError:
        pass
    writer.close()


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
