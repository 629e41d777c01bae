"""Transparent huge pages for a loaded model's large variables: fewer TLB misses in the embedding gathers.

Why: a served prediction of the demo DeepFM gathers 39 random rows from a 41 MB table (and 39 scalars
from a 2.6 MB linear table): about 30% of the model's own CPU with uniformly random ids, and on 4 kB
pages nearly every row is a TLB miss (a page walk) on top of its cache miss. Linux's transparent huge
pages map 2 MB with one TLB entry, but on the common `madvise` THP setting only memory that asked for it
gets them, and TensorFlow's allocator never asks. Measured (BENCHMARKS.md, "Huge pages for the
tables"): the whole `predict_ids` call 2-7% cheaper (interleaved A/B), no RSS cost.

What `advise_variables(loaded)` does, once after a SavedModel loads (`Predictor.load(huge_pages="auto")`,
`ctrflow serve --huge-pages auto`, the default): for every CPU variable of at least `MIN_BYTES`, find its
buffer (a CPU tensor read from a resource variable shares the variable's buffer: checked by reading it
twice and comparing addresses, a variable in copy-on-read mode is skipped), then over the 2 MB-aligned
span that covers it, clipped to its anonymous private mapping, `madvise(MADV_HUGEPAGE)` (later faults and
khugepaged may use huge pages) and `madvise(MADV_COLLAPSE)` (Linux >= 6.1: copy the populated pages into
huge pages now, synchronously). The memory's contents do not change, so scores are bitwise the same.

No environment variable is needed; `CTRFLOW_HUGE_PAGES=off` turns it off for a whole process tree
(benchmarks comparing both, a memory-tight container) whatever the option says. Where it cannot work — not Linux, THP `never`, a kernel without
MADV_COLLAPSE, a mapping that is not anonymous (memory-mapped files get no anonymous THP) — it does what
it can, raises nothing, and says so in `HugePages.status` (`Predictor.huge_pages`) and one log line per load.

Implementation details follow: ctypes `madvise` from libc; the span's huge-page bytes are read back from
`/proc/self/smaps` (AnonHugePages of the mappings inside the spans, which madvise splits out).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from ctrflow.validation import Choice, check_fields

__all__ = ["ENV_OFF", "HUGE_PAGE_MODES", "HugePages", "advise_variables", "thp_mode"]

log = logging.getLogger("ctrflow.serving")

HUGE_PAGE_MODES = ("auto", "off")
HUGE = 2 << 20  # x86-64 / arm64 (4 kB base pages) PMD size
MIN_BYTES = 1 << 20  # smaller variables: at most one huge page, not worth a syscall (and MLP kernels stay cached)
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25  # Linux >= 6.1
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
ENV_OFF = "CTRFLOW_HUGE_PAGES"  # "off" (or 0/false/no): every load in this process (and its children) as with mode "off"
_ENV_FALSE = ("off", "0", "false", "no")


@dataclass(frozen=True)
class HugePages:
    """What `advise_variables` did for one loaded model (`Predictor.huge_pages`, and the load's log line).

    mode: the option ("auto" or "off"). status: "collapsed" (the spans are on huge pages now),
    "advised" (MADV_HUGEPAGE only: khugepaged collapses them later), "off", or "unsupported: <why>".
    variables: how many variable buffers were advised; advised_bytes: the spans' size (2 MB-rounded);
    huge_bytes: how much of the spans is on huge pages right after (AnonHugePages).
    """

    mode: str = "auto"
    status: str = "off"
    variables: int = 0
    advised_bytes: int = 0
    huge_bytes: int = 0

    def __post_init__(self) -> None:
        check_fields(self, {"mode": Choice(HUGE_PAGE_MODES)})

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "status": self.status, "variables": self.variables,
                "advised_mb": round(self.advised_bytes / 2**20, 1), "huge_mb": round(self.huge_bytes / 2**20, 1)}


def thp_mode() -> str:
    """The kernel's THP setting ("always", "madvise", "never"), or "" where there is none (not Linux)."""
    try:
        with open(_THP_ENABLED) as f:
            text = f.read()
    except OSError:
        return ""
    return text[text.index("[") + 1:text.index("]")] if "[" in text else ""


def _libc_madvise() -> Any:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = libc.madvise
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def _anon_maps() -> list[tuple[int, int]]:
    """(start, end) of this process's anonymous private writable mappings, sorted."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            # address perms offset dev inode [path]: anonymous = inode 0 and no path, [heap] or a named
            # anonymous mapping ([anon:...], e.g. glibc's arenas under glibc.mem.decorate_maps)
            if len(parts) >= 5 and parts[1].startswith("rw") and parts[1][3] == "p" and parts[4] == "0" \
                    and (len(parts) == 5 or parts[5] == "[heap]" or parts[5].startswith("[anon:")):
                lo, hi = parts[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return _merge(sorted(out))  # neighbouring mappings (split by earlier madvise calls) form one span


def _span(addr: int, size: int, maps: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The 2 MB-aligned span covering [addr, addr + size), clipped to the anonymous mapping holding it."""
    for lo, hi in maps:
        if lo <= addr < hi:
            if addr + size > hi:
                return None
            start, end = max(lo, addr // HUGE * HUGE), min(hi, -(-(addr + size) // HUGE) * HUGE)
            return (start, end) if end - start >= HUGE else None
    return None  # not anonymous (a file mapping) or not found


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted spans with overlapping or touching ones joined (neighbouring tables share a huge page)."""
    out: list[tuple[int, int]] = []
    for lo, hi in spans:
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _buffers(loaded: Any, min_bytes: int) -> tuple[list[tuple[int, int]], list[Any]]:
    """(address, bytes) of every distinct CPU variable buffer >= min_bytes, and the tensors read (kept
    alive by the caller until done, so the addresses stay valid)."""
    import numpy as np
    import tensorflow as tf

    seen: set[int] = set()
    out, keep = [], []
    for obj in tf.train.TrackableView(loaded).descendants():
        if not isinstance(obj, tf.Variable) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if "CPU" not in (obj.device or "/CPU:0").upper() or obj.shape.num_elements() is None:
            continue
        if obj.shape.num_elements() * obj.dtype.size < min_bytes:
            continue
        first, second = obj.value(), obj.value()
        a, b = np.asarray(first), np.asarray(second)
        if a.ctypes.data != b.ctypes.data:  # each read copied: not the variable's own buffer
            continue
        out.append((int(a.ctypes.data), int(a.nbytes)))
        keep += [first, second]
    return out, keep


def _huge_bytes_in(spans: list[tuple[int, int]]) -> int:
    """AnonHugePages of the mappings overlapping the spans (/proc/self/smaps), at most the overlap each.

    Exact where madvise split the spans out as mappings of their own; a mapping that already had
    MADV_HUGEPAGE (e.g. glibc.malloc.hugetlb=1) is not split, so it counts up to its overlap."""
    total, overlap = 0, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                overlap = sum(max(0, min(hi, e) - max(lo, s)) for s, e in spans)
            elif overlap and head == "AnonHugePages:":
                total += min(overlap, int(line.split()[1]) * 1024)
    return total


def advise_variables(loaded: Any, mode: str = "auto", *, min_bytes: int = MIN_BYTES, what: str = "model") -> HugePages:
    """Put the large variable buffers of a loaded SavedModel on transparent huge pages (see the module doc).

    Never raises for an unsupported platform or kernel: the returned `HugePages.status` says what happened.
    """
    HugePages(mode=mode)  # validates the option
    if mode == "off":
        return HugePages(mode="off", status="off")
    env = os.environ.get(ENV_OFF, "").strip().lower()
    if env in _ENV_FALSE:
        return _report(what, HugePages(mode="off", status=f"off ({ENV_OFF}={env})"))
    thp = thp_mode()
    if not sys.platform.startswith("linux") or not thp:
        return _report(what, HugePages(mode=mode, status="unsupported: no transparent huge pages on this platform"))
    if thp == "never":
        return _report(what, HugePages(mode=mode, status="unsupported: transparent huge pages are 'never' on this kernel"))
    try:
        madvise = _libc_madvise()
        buffers, keep = _buffers(loaded, min_bytes)
        maps = _anon_maps()
    except (OSError, AttributeError, ValueError) as e:
        return _report(what, HugePages(mode=mode, status=f"unsupported: {e}"))
    spans = _merge(sorted(s for s in (_span(a, n, maps) for a, n in buffers) if s is not None))
    if not spans:
        return _report(what, HugePages(mode=mode, status="unsupported: no large variable in anonymous memory"
                                 if buffers else "off: no variable of at least 1 MB"))
    collapse_errors: set[str] = set()
    advised = 0
    for start, end in spans:
        if madvise(start, end - start, MADV_HUGEPAGE) != 0:
            collapse_errors.add(f"MADV_HUGEPAGE: {os.strerror(ctypes.get_errno())}")
            continue
        advised += 1
        if madvise(start, end - start, MADV_COLLAPSE) != 0:
            err = ctypes.get_errno()
            collapse_errors.add("MADV_COLLAPSE: EINVAL (a kernel before 6.1, or THP disabled for this process)" if err == errno.EINVAL else
                                f"MADV_COLLAPSE: {os.strerror(err)}")
    del keep
    size = sum(e - s for s, e in spans)
    try:
        huge = _huge_bytes_in(spans)
    except OSError:
        huge = 0
    if not advised:
        status = "unsupported: " + "; ".join(sorted(collapse_errors))
    elif collapse_errors and huge < size // 2:
        status = "advised (" + "; ".join(sorted(collapse_errors)) + ")"
    else:
        status = "collapsed"
    return _report(what, HugePages(mode=mode, status=status, variables=len(buffers), advised_bytes=size, huge_bytes=huge))


def _report(what: str, h: HugePages) -> HugePages:
    """The one log line per load."""
    if h.status == "collapsed":
        log.info("%s: huge pages: %d variable buffers, %.1f of %.1f MB on huge pages", what, h.variables,
                 h.huge_bytes / 2**20, h.advised_bytes / 2**20)
    else:
        log.info("%s: huge pages: %s", what, h.status)
    return h
