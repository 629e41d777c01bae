"""Child processes that must not outlive their parent: the converter's and the server's workers."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

__all__ = ["die_with_parent"]


def die_with_parent(parent_pid: int) -> None:
    """Make this worker process end when `parent_pid` does, even by kill -9 (workers blocked on a pipe
    would otherwise live on forever, holding their memory).

    Linux: the kernel sends SIGKILL on the parent's death (PR_SET_PDEATHSIG). Everywhere: a daemon
    thread polls the parent pid once a second, a fallback where prctl is missing.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="ctrflow-parent-watchdog", daemon=True).start()
