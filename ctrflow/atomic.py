"""The one atomic-write helper: a file appears complete under its final name or not at all.

Why fsync twice: `os.replace` is atomic for readers, but after a power loss the rename can be on disk
before the data is; syncing the temp file before the rename and the folder after it makes the new name
point at complete bytes. Every write of a file that a reader may pick up (manifests, run.json, configs,
PNGs, version folders) goes through here.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_writer", "replace_atomically", "fsync_dir", "fsync_tree",
           "temp_name"]


def temp_name(path: Path) -> Path:
    """The temp file beside `path`: same folder (so the rename cannot cross file systems), tagged with the pid."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or a creation inside `folder` durable. No-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Sync every file and folder under `folder`, deepest first: a tree written by a library that does not
    sync (`tf.saved_model.save`) before a rename publishes it, so the new name never points at empty files."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_dir(os.path.join(root, name))  # a read-only descriptor can be synced: files too
        fsync_dir(root)


def replace_atomically(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename `src` over `dst` (a file or a folder) and sync the destination folder."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside `path`; on a clean exit it is synced and renamed to `path`, on an error removed.

    >>> with atomic_writer("out.bin") as f:
    ...     f.write(b"...")
    """
    path = Path(path)
    tmp = temp_name(path)
    try:  # text is UTF-8 whatever the locale (an ASCII or cp1252 locale failed on the first non-Latin value)
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        replace_atomically(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_writer(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 1, default: Callable[[Any], Any] | None = float) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent, default=default))
