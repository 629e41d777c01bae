"""Training state, sized before it is made: the model's tables and each group's optimizer slots against the
memory this machine has available, so a table that cannot fit fails with an `error:` that says what to do,
instead of the kernel killing the process half-way through allocating it (no message at all).

What is counted (`estimate_training_state`), from the same objects the trainer builds, before any variable
exists: every table of the model (`FieldTables`, the "linear" and "embedding" groups: rows x width x 4 bytes;
FFM's rows are (S - 1) x ffm_dim wide; the hashed cross table of `cross_pairs`, cross_buckets x 1, is one of the
"linear" group's), the rare-id remap of `min_count` (4 or 8 bytes per id row), and the
slots the group's optimizer keeps per table (`SparseOptimizer.slot_bytes`: LazyAdam and Adam 2, FTRL 2,
Adagrad 1, SGD 0, plus 8 bytes per row for l2_mode="every_step"). Transient: while a table is made its
initial value and the initializer's temporaries exist beside it, and checkpoint writes buffer part of a table:
1.5x the largest table (measured for FFM on the synthetic preset at 0.65M and 2.2M rows: peak RSS above the
process's own before training = state + 1.2x the largest table + ~0.1 GB); dense `adam` also sums each step's
sparse gradient into a table-sized dense one. Dense variables (MLP, cross layers, pair weights) are small and not
counted; `HEADROOM_BYTES` stands for them, the input pipeline's buffers and TensorFlow's working memory.

Single-process training only (`ctrflow.train.loop.train`). In cluster training (`--cluster`, parameter
servers) the tables and their slots are made on the parameter servers, sharded by row, in processes and on
machines whose memory the chief cannot see; the check is not run there (each server holds about its
share, total / servers, of the same estimate).

Example:
    >>> est = estimate_training_state(TrainConfig(model=ModelConfig("ffm")), spec)  # doctest: +SKIP
    >>> check_fits(est, available=8 << 30)  # raises InsufficientMemoryError with the split and the fixes  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ctrflow.data.batch import FeatureSpec
from ctrflow.errors import InsufficientMemoryError
from ctrflow.train.config import OPTIMIZER_GROUPS, TrainConfig

__all__ = ["StateEstimate", "estimate_training_state", "available_memory", "check_fits", "check_training_memory",
           "HEADROOM_BYTES"]

HEADROOM_BYTES = 512 << 20  # beyond the estimate: dense variables, batches, TensorFlow's runtime and working memory
_CAPS = tuple(1 << k for k in range(24, 5, -1))  # --max-buckets values a suggestion is chosen from


@dataclass(frozen=True)
class StateEstimate:
    """Bytes of one run's training state, by part. `tables`: group -> its tables' bytes ("id_remap": the rare-id
    remap); `slots`: group -> its optimizer's slots for those tables; `optimizers`: group -> optimizer name."""

    model: str
    rows: int  # table rows (every id field's buckets plus one per normalized numeric)
    tables: dict[str, int]
    slots: dict[str, int]
    optimizers: dict[str, str]
    transient: int  # extra while building / per step (see the module doc)

    @property
    def state(self) -> int:
        return sum(self.tables.values()) + sum(self.slots.values())

    @property
    def peak(self) -> int:
        return self.state + self.transient + HEADROOM_BYTES

    def describe(self) -> str:
        tables = " + ".join(f"{g} {_size(b)}" for g, b in self.tables.items() if b)
        slots = " + ".join(f"{g} {self.optimizers[g]} {_size(b)}" for g, b in self.slots.items() if b) or "none"
        return (f"tables {_size(sum(self.tables.values()))} ({tables}; {self.rows:,} rows), optimizer slots "
                f"{_size(sum(self.slots.values()))} ({slots}), {_size(self.transient)} more while the tables are made "
                f"and {_size(HEADROOM_BYTES)} headroom")


def estimate_training_state(config: TrainConfig, spec: FeatureSpec) -> StateEstimate:
    """The training state `config` would make for inputs `spec`, counted without making it (imports TensorFlow:
    the model's layers and the optimizers say their own sizes)."""
    from ctrflow.models.layers import FieldTables
    from ctrflow.models.registry import model_class
    from ctrflow.train.core import make_group_optimizer

    model = model_class(config.model.kind)(config.model, spec)  # layers only: variables are made by build()
    tables: dict[str, int] = {}
    slots: dict[str, int] = {}
    names: dict[str, str] = {}
    largest, dense_grads, rows = 0, 0, 0
    for t in (m for m in model.submodules if isinstance(m, FieldTables)):
        lay = t.layout
        parts = [lay.shared_rows] if t.table_mode == "shared" else [*lay.id_buckets, lay.n_numeric_fields]
        parts = [r for r in parts if r]
        rows = max(rows, sum(parts))
        opt = make_group_optimizer(config, t.group)
        names[t.group] = opt.kind
        tables[t.group] = tables.get(t.group, 0) + sum(r * t.dim * 4 for r in parts)
        slots[t.group] = slots.get(t.group, 0) + sum(opt.slot_bytes(r, t.dim) for r in parts)
        largest = max([largest, *(r * t.dim * 4 for r in parts)])
        if opt.dense_only:
            dense_grads += sum(r * t.dim * 4 for r in parts)
    if config.model.min_count and model.layout.n_id_fields:
        ids = sum(model.layout.id_buckets)
        tables["id_remap"] = ids * (8 if ids >= 2**31 else 4)
    order = [g for g in OPTIMIZER_GROUPS if g in tables] + [g for g in tables if g not in OPTIMIZER_GROUPS]
    return StateEstimate(model=config.model.kind, rows=rows, tables={g: tables[g] for g in order},
                         slots={g: slots[g] for g in order if g in slots}, optimizers=names, transient=largest + largest // 2 + dense_grads)


def available_memory() -> int:
    """Bytes this process can still allocate: the system's available memory (psutil), or less where a cgroup
    (a container's limit) leaves less room."""
    import psutil

    avail = int(psutil.virtual_memory().available)
    room = _cgroup_room()
    return min(avail, room) if room is not None else avail


def _cgroup_room() -> int | None:
    """A cgroup's memory limit minus its usage (reclaimable file cache not counted as used); None: no limit."""
    for limit_f, usage_f, inactive in (("memory.max", "memory.current", "inactive_file"),
                                       ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "total_inactive_file")):
        root = Path("/sys/fs/cgroup")
        try:
            limit_s = (root / limit_f).read_text().strip()
            usage = int((root / usage_f).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_s == "max" or not limit_s.isdigit() or int(limit_s) >= 1 << 60:
            return None
        try:
            stat = dict(line.split() for line in (root / Path(limit_f).parent / "memory.stat").read_text().splitlines())
            usage -= int(stat.get(inactive, 0))
        except (OSError, ValueError):
            pass
        return max(int(limit_s) - usage, 0)
    return None


def check_fits(est: StateEstimate, available: int, *, config: TrainConfig, spec: FeatureSpec) -> None:
    """Raise `InsufficientMemoryError` (a `ConfigError`) when `est.peak` exceeds `available` bytes, naming the
    estimate's parts and the fixes (a --max-buckets that would fit, a narrower model, or --skip-memory-check)."""
    if est.peak <= available:
        return
    m = config.model
    width = None
    if m.kind != "lr":
        key = "ffm_dim" if m.kind == "ffm" else "embedding_dim"
        now = getattr(m, key)
        fits = _fitting_width(config, spec, available, key)
        width = (f"--{key.replace('_', '-')} {fits}" if fits else f"a smaller --{key.replace('_', '-')}") + f" (now {now}" + \
            ("; each id row holds fields - 1 vectors of it)" if m.kind == "ffm" else ")")
    cap = _fitting_cap(config, spec, available)
    convert = (f"convert the data again with `ctrflow convert ... --max-buckets {cap}` (then --like that folder for "
               f"validation and test data)" if cap else "cap the hash buckets (`ctrflow convert ... --max-buckets N`)")
    fixes = "; ".join(x for x in (convert, width, "fewer or smaller categorical fields in the schema") if x)
    raise InsufficientMemoryError(
        f"the {m.kind} model needs about {_size(est.peak)} to train on this data: {est.describe()}; this machine has "
        f"{_size(available)} available. To fit: {fixes}. Or pass --skip-memory-check (API: "
        f"train(..., check_memory=False)) if memory will be freed or swap covers it.")


def check_training_memory(config: TrainConfig, spec: FeatureSpec, *, available: int | None = None) -> StateEstimate:
    """`estimate_training_state` then `check_fits` against `available` bytes (default: `available_memory()`)."""
    est = estimate_training_state(config, spec)
    check_fits(est, available_memory() if available is None else int(available), config=config, spec=spec)
    return est


def _fitting_cap(config: TrainConfig, spec: FeatureSpec, available: int) -> int | None:
    """The largest power-of-two --max-buckets under which the same model fits (None: none does, or none is needed
    because the tables are not what is large)."""
    top = max(spec.id_buckets, default=0)
    for cap in (c for c in _CAPS if c < top):
        capped = dataclasses.replace(spec, id_buckets=tuple(min(b, cap) for b in spec.id_buckets))
        if estimate_training_state(config, capped).peak <= available:
            return cap
    return None


def _fitting_width(config: TrainConfig, spec: FeatureSpec, available: int, key: str) -> int | None:
    """The largest `key` (ffm_dim or embedding_dim), halving from the config's, under which the model fits."""
    width = getattr(config.model, key) // 2
    while width >= 1:
        c = config.replace(model=dataclasses.replace(config.model, **{key: width}))
        if estimate_training_state(c, spec).peak <= available:
            return width
        width //= 2
    return None


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"
