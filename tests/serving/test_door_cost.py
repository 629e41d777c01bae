"""What a refusal costs the event loop: the GIL switch interval held short while a server runs."""
from __future__ import annotations

import socket
import sys

from ctrflow.serving import http
from ctrflow.serving.models import GIL_SWITCH_INTERVAL_S
from ctrflow.serving.rest import RestResponse
from ctrflow.serving.server import ServeOptions


async def _ok(request):
    return RestResponse(200, b"{}")


def _get(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):  # bounded: the server closes after its answer
            data += chunk
    return data


def test_a_running_server_holds_the_switch_interval_short_and_gives_it_back():
    """The loop gives the GIL up in every recv and send; with the 5 ms default it then waited up to
    5 ms for it per call while the batcher's thread ran Python. Two servers in one process (workers,
    tests) share the setting: it returns to what it was when the last one stops."""
    before = sys.getswitchinterval()
    options = ServeOptions(model_base_path="/nonexistent", host="127.0.0.1", port=0)
    first, second = http.HttpTransport(options, _ok), http.HttpTransport(options, _ok)
    try:
        first.start()
        assert sys.getswitchinterval() == min(before, GIL_SWITCH_INTERVAL_S)
        port = second.start()
        first.stop(1.0)
        assert sys.getswitchinterval() == min(before, GIL_SWITCH_INTERVAL_S)  # the second still runs
        assert _get(port).startswith(b"HTTP/1.1 200 ")
        second.stop(1.0)
        assert sys.getswitchinterval() == before
    finally:
        first.stop(1.0)
        second.stop(1.0)
    assert sys.getswitchinterval() == before
