"""IdsClient's transport: a timeout or a refused connection is one typed error, and the client keeps working after it."""
from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ctrflow.client.ids import IdsClient, ServerConnectionError
from ctrflow.errors import DeadlineExceeded, QueueFullError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
IDS, NUM = np.zeros((2, 1), np.int32), np.zeros((2, 1), np.float32)


def test_a_timeout_is_deadline_exceeded_and_the_next_call_sends_again():
    """A peer that never answers: each call times out on its own (it was CannotSendRequest forever after the first)."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(8)  # connections complete in the kernel's backlog; nobody reads them
        port = hole.getsockname()[1]
        with IdsClient(f"http://127.0.0.1:{port}", "m", timeout_s=0.2) as client:
            for _ in range(2):
                with pytest.raises(DeadlineExceeded, match="no answer within timeout_s=0.2 s"):
                    client.predict_ids(IDS, NUM)
    with IdsClient(f"http://127.0.0.1:{port}", "m", timeout_s=1) as client:  # closed now
        with pytest.raises(ServerConnectionError, match="ConnectionRefused"):
            client.predict_ids(IDS, NUM)


def test_503_with_retry_after_is_a_retryable_queue_full_and_the_client_recovers(tmp_path):
    import serving_fixtures as sf

    slow = sf.SlowPredictor()
    server = sf.slow_server(tmp_path, slow, max_connections=1)
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as held, IdsClient(server.url, "m", timeout_s=5) as client:
            with pytest.raises(QueueFullError, match="answered 503: .*limit of 1 connections") as e:
                client.predict_ids(IDS, NUM)
            assert e.value.retry_after_s == 1.0
            held.close()
            for _ in range(100):  # the server counts the held connection gone a moment later
                with pytest.raises(Exception) as e:  # the same client reaches the server (it serves no ids signature)
                    client.predict_ids(IDS, NUM)
                if not isinstance(e.value, QueueFullError):
                    break
                time.sleep(0.02)
            assert not isinstance(e.value, (QueueFullError, ServerConnectionError)), e.value
    finally:
        server.stop()
        slow.close()
