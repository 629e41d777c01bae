"""The load generators' open-loop HTTP client against real loopback peers: answers split across reads,
`connection: close` (reconnects), a peer that never answers (client timeouts, connection closed), and
at most `size` connections (the rest wait their turn)."""
from __future__ import annotations

import asyncio

from ctrflow.bench.loadgen import _OpenLoopHttp


async def _peer(mode: str, seen: list[int]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(1)
        try:
            while True:  # bounded by the client closing
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                if mode == "silent":
                    continue
                close = mode == "close"
                answer = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 3\r\n"
                          + (b"connection: close\r\n" if close else b"") + b"\r\nabc")
                writer.write(answer[:20])  # split across reads
                await writer.drain()
                await asyncio.sleep(0.005)
                writer.write(answer[20:])
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def _run(mode: str, n: int, size: int, limit_s: float) -> tuple[list[tuple[int, int, str]], int]:
    async def main() -> tuple[list[tuple[int, int, str]], int]:
        seen: list[int] = []
        server = await _peer(mode, seen)
        port = server.sockets[0].getsockname()[1]
        got: list[tuple[int, int, str]] = []
        request = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nbody"
        client = _OpenLoopHttp("127.0.0.1", port, size, [request], limit_s,
                               lambda i, status, at, now, kind: got.append((i, status, kind)))
        loop = asyncio.get_running_loop()
        for i in range(n):
            client.fire(i, loop.time())
        await client.drain(5.0)
        client.close()
        server.close()
        await server.wait_closed()
        return got, len(seen)

    return asyncio.run(main())


def test_answers_keep_alive_and_close():
    got, connections = _run("keep", 6, 2, 5.0)
    assert sorted(got) == [(i, 503, "503") for i in range(6)] and connections <= 2
    got, connections = _run("close", 4, 2, 5.0)
    assert sorted(got) == [(i, 503, "503") for i in range(4)] and connections == 4  # one connection per answer


def test_unanswered_requests_expire_as_client_timeouts():
    got, connections = _run("silent", 5, 2, 0.1)
    assert sorted(got) == [(i, 0, "client_timeout") for i in range(5)]
    assert connections == 2  # never more than `size`; the expired ones were closed by the client


def test_a_refusing_port_fails_every_waiting_request_as_a_connection_error():
    """Nothing listens: every request fails at once as a connection error (not a client timeout after
    `limit_s`), the way the task-per-request client counted them."""
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main() -> list[str]:
        kinds: list[str] = []
        client = _OpenLoopHttp("127.0.0.1", port, 4, [b"GET / HTTP/1.1\r\n\r\n"], 5.0,
                               lambda i, status, at, now, kind: kinds.append(kind))
        loop = asyncio.get_running_loop()
        for i in range(20):
            client.fire(i, loop.time())
        await client.drain(3.0)
        client.close()
        return kinds

    kinds = asyncio.run(main())
    assert len(kinds) == 20 and all(k.startswith("connection_error") for k in kinds), kinds
