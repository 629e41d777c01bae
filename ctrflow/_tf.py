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


class _QuietFinder:
    """A `sys.meta_path` entry that turns the first `import tensorflow`, wherever it happens, into
    `quiet_import()`: commands import TensorFlow only when they need it (a usage error answers in a
    second, not after TensorFlow's five-second start) and still print no banner."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "tensorflow" or "tensorflow" in sys.modules:
            return None
        import importlib.util

        uninstall_quiet_hook()
        module = quiet_import()
        return importlib.util.spec_from_loader(name, _Loaded(module), origin=getattr(module, "__file__", None))


class _Loaded:
    """Loader for a module imported already: hands it back unchanged."""

    def __init__(self, module) -> None:
        self.module = module

    def create_module(self, spec):
        return self.module

    def exec_module(self, module) -> None:
        pass


def install_quiet_hook() -> None:
    """Make every later first `import tensorflow` quiet (see `_QuietFinder`)."""
    if _QuietFinder not in sys.meta_path and "tensorflow" not in sys.modules:
        sys.meta_path.insert(0, _QuietFinder)


def uninstall_quiet_hook() -> None:
    while _QuietFinder in sys.meta_path:
        sys.meta_path.remove(_QuietFinder)
