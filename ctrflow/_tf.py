"""Import TensorFlow without its start-up chatter (oneDNN / CPU-feature notices) on the terminal.

TensorFlow's C++ core prints those lines to file descriptor 2 before its log level applies, so they
cannot be filtered by TF_CPP_MIN_LOG_LEVEL. The import runs with fd 2 pointed at a temporary file; if
the import fails, what was printed is replayed so nothing useful is lost.
"""
from __future__ import annotations

import os
import sys
import tempfile


def quiet_import():
    """`import tensorflow` with its banner suppressed; returns the module."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            import tensorflow as tf
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return tf
