"""Building blocks shared by every CTR model, and `CtrModel`, the life cycle the models share.

Blocks: the one place big tables are made (`make_table`), field tables in shared or per-field mode
(`FieldTables`), the Twitter-style sparse linear layer (`SparseLinear`), field embeddings
(`FieldEmbedding`), online normalization of numeric values (`OnlineNormalizer`), the pairwise
interactions (`fm_interaction`, `FieldPairInteraction` for FwFM, `ffm_interaction` for FFM), the DCN-v2
cross network (`CrossNetwork`) and a plain MLP (`MLP`). Models compose these (FuxiCTR style); a model
file holds only its wiring.

How fields are looked up (the `Batch` contract is in ctrflow/data/batch.py):
- every *active* ids column (`FeatureSpec.active_id_columns`) is one field with `buckets_f` rows;
- every normalized numeric (`FeatureSpec.normalized_columns`) is one field with a single row, whose
  vector is scaled by the field's normalized value ("weighted sparse lookup": value x weight).

In `table_mode="shared"` all fields live in one table, field f's rows start at `offsets[f]` (the sum of
the buckets before it) and the normalized numerics' rows come last, so one gather serves all fields.
In `table_mode="per_field"` each id field has its own table and the numerics share one `[N, dim]` table.

Every table lookup goes through `tf.nn.embedding_lookup`: on a plain variable that is `tf.gather`, whose
gradient is a `tf.IndexedSlices` (duplicate indices included: sparse optimizers must sum them), and on a
row-partitioned `ShardedVariable` it dispatches to one gather per shard.
"""
from __future__ import annotations

import contextlib
import functools
import re
import threading
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import numpy as np
import tensorflow as tf

from ctrflow.data.batch import FeatureSpec
from ctrflow.errors import ConfigError, TrainingError

if TYPE_CHECKING:
    from ctrflow.models.registry import ModelConfig

__all__ = [
    "Initializer",
    "normal_initializer",
    "glorot_uniform_initializer",
    "zeros_initializer",
    "make_table",
    "lookup",
    "FieldLayout",
    "rare_id_remap",
    "ContextSide",
    "ContextSplit",
    "FieldTables",
    "PackedRows",
    "SparseLinear",
    "FieldEmbedding",
    "OnlineNormalizer",
    "fm_interaction",
    "packed_fm",
    "FieldPairInteraction",
    "ffm_interaction",
    "ffm_pair_fields",
    "ffm_slot_fields",
    "CrossNetwork",
    "MLP",
    "CtrModel",
    "VARIABLE_GROUPS",
]

# An initializer maps (shape, dtype) to the initial value; tables receive it unevaluated (see make_table).
# Table initializers also accept `partition_shape`/`partition_offset` (the protocol tf.distribute's
# ParameterServerStrategy uses for row-partitioned variables) and then return only those rows.
Initializer = Callable[..., tf.Tensor]

# Tables are initialized in blocks of this many rows, each from its own seed, so the values of any row
# range can be produced alone: a sharded table gets the same values as an unsharded one, and no
# random-number kernel ever runs over a whole multi-million-row table at once (memory: see make_table).
_INIT_BLOCK_ROWS = 1 << 16

# Keys of `CtrModel.variable_groups()`: "linear" and "embedding" hold tables whose gradients are
# tf.IndexedSlices; "dense" holds every other trainable variable (dense gradients).
VARIABLE_GROUPS = ("linear", "embedding", "dense")


def _stateless_seed(seed: int, salt: str) -> tf.Tensor:
    # crc32, not hash(): Python's str hash is salted per process and would break determinism.
    return tf.constant([seed, zlib.crc32(salt.encode("utf-8"))], dtype=tf.int64)


def _row_range(shape, partition_shape, partition_offset) -> tuple[int, int]:
    start = int(partition_offset[0]) if partition_offset is not None else 0
    rows = int(partition_shape[0]) if partition_shape is not None else int(shape[0])
    return start, start + rows


def normal_initializer(stddev: float, seed: int, salt: str) -> Initializer:
    """N(0, stddev^2) table rows; the same (stddev, seed, salt, shape) always gives the same values."""

    def init(shape, dtype=tf.float32, partition_shape=None, partition_offset=None) -> tf.Tensor:
        base = _stateless_seed(seed, salt)
        rows, rest = int(shape[0]), [int(d) for d in shape[1:]]
        start, stop = _row_range(shape, partition_shape, partition_offset)
        pieces = []
        for block in range(start // _INIT_BLOCK_ROWS, -(-stop // _INIT_BLOCK_ROWS)):
            lo = block * _INIT_BLOCK_ROWS
            hi = min(lo + _INIT_BLOCK_ROWS, rows)
            values = tf.random.stateless_normal(
                [hi - lo, *rest], seed=tf.random.experimental.stateless_fold_in(base, block), stddev=stddev, dtype=dtype
            )
            pieces.append(values[max(start, lo) - lo : min(stop, hi) - lo])
        if not pieces:
            return tf.zeros([0, *rest], dtype)
        return pieces[0] if len(pieces) == 1 else tf.concat(pieces, axis=0)

    return init


def zeros_initializer(shape, dtype=tf.float32, partition_shape=None, partition_offset=None) -> tf.Tensor:
    """All zeros (linear weights and biases start at zero)."""
    return tf.zeros(partition_shape if partition_shape is not None else shape, dtype)


def glorot_uniform_initializer(seed: int, salt: str) -> Initializer:
    """Glorot/Xavier uniform values for a `[fan_in, fan_out]` dense kernel, deterministic given seed and salt."""

    def init(shape, dtype=tf.float32) -> tf.Tensor:
        limit = (6.0 / (shape[0] + shape[-1])) ** 0.5
        return tf.random.stateless_uniform(
            shape, seed=_stateless_seed(seed, salt), minval=-limit, maxval=limit, dtype=dtype
        )

    return init


def _variable_name(name: str) -> str:
    # Field names come from user schemas; variable names only accept a small character set.
    return re.sub(r"[^A-Za-z0-9_.\-/]", "_", name) or "table"


def make_table(name: str, rows: int, dim: int, initializer: Initializer, *, trainable: bool = True) -> tf.Variable:
    """Create one `[rows, dim]` float32 table: the single place where models make big variables.

    Distributed training hooks row-wise partitioning (a `ShardedVariable` over parameter servers) here:
    a `variable_partitioner` set on the strategy applies to this `tf.Variable` call, and the initial
    value is handed over as an unevaluated callable, which the strategy calls once per shard with
    `partition_shape`/`partition_offset` so only that shard's rows are made. Memory: rows x dim x 4
    bytes (1M x 16 is 64 MB) once made, about twice that while the initial value is assembled.

    Args:
        name: variable name (characters outside `[A-Za-z0-9_.-/]` become `_`).
        rows: number of rows, >= 1.
        dim: row width, >= 1.
        initializer: `(shape, dtype) -> Tensor`, e.g. `normal_initializer(0.01, seed=0, salt="emb")`.
        trainable: False for state such as statistics.
    """
    return tf.Variable(
        functools.partial(initializer, [rows, dim], tf.float32),
        name=_variable_name(name),
        trainable=trainable,
        dtype=tf.float32,
        shape=tf.TensorShape([rows, dim]),
    )


def _variable(initializer: Initializer, shape: Sequence[int], name: str, *, trainable: bool = True) -> tf.Variable:
    """A small dense float32 variable. The initial value is a callable so `build()` may run inside the
    first trace of a `tf.function` (the initializer is then lifted out of the function)."""
    return tf.Variable(
        functools.partial(initializer, shape, tf.float32), name=name, trainable=trainable, dtype=tf.float32
    )


def take(x: tf.Tensor, indices: Sequence[int], axis: int = 0) -> tf.Tensor:
    """`tf.gather` of constant indices that also takes an empty list (an empty slice, not a float index)."""
    indices = [int(i) for i in indices]
    if not indices:
        return tf.gather(x, tf.zeros([0], tf.int32), axis=axis)
    return tf.gather(x, indices, axis=axis)


def lookup(table: tf.Variable, ids: tf.Tensor) -> tf.Tensor:
    """Rows of `table` at `ids`: `[...]` -> `[..., dim]`; the table's gradient is a `tf.IndexedSlices`.

    A float16 table (a slim export) is widened to float32 after the gather, so only looked-up rows are cast."""
    rows = tf.nn.embedding_lookup(table, ids)
    return rows if rows.dtype == tf.float32 else tf.cast(rows, tf.float32)


@dataclass(frozen=True)
class FieldLayout:
    """Which input columns a model reads and where each field's rows sit in a shared table.

    id_columns: columns of `ids` the model looks up (`FeatureSpec.active_id_columns`).
    id_names / id_buckets: name and row count of each of those fields.
    numeric_columns / numeric_names: columns of `numeric` that enter as normalized values.
    n_ids_input / n_numeric_input: total columns of the `ids` / `numeric` inputs (the serving signature).
    """

    id_columns: tuple[int, ...]
    id_names: tuple[str, ...]
    id_buckets: tuple[int, ...]
    numeric_columns: tuple[int, ...]
    numeric_names: tuple[str, ...]
    n_ids_input: int
    n_numeric_input: int

    @classmethod
    def from_spec(cls, spec: FeatureSpec) -> "FieldLayout":
        ids = spec.active_id_columns
        num = spec.normalized_columns
        return cls(
            id_columns=ids,
            id_names=tuple(spec.id_names[i] for i in ids),
            id_buckets=tuple(int(spec.id_buckets[i]) for i in ids),
            numeric_columns=num,
            numeric_names=tuple(spec.numeric_names[i] for i in num),
            n_ids_input=len(spec.id_names),
            n_numeric_input=len(spec.numeric_names),
        )

    @property
    def n_id_fields(self) -> int:
        return len(self.id_buckets)

    @property
    def n_numeric_fields(self) -> int:
        return len(self.numeric_columns)

    @property
    def n_fields(self) -> int:
        """Fields that get a vector: id fields, then normalized numerics."""
        return self.n_id_fields + self.n_numeric_fields

    @property
    def offsets(self) -> tuple[int, ...]:
        """First row of each id field in a shared table."""
        out, start = [], 0
        for b in self.id_buckets:
            out.append(start)
            start += b
        return tuple(out)

    @property
    def shared_rows(self) -> int:
        """Rows of a shared table: every id field's buckets, then one row per normalized numeric."""
        return sum(self.id_buckets) + self.n_numeric_fields


@dataclass(frozen=True)
class ContextSide:
    """One side (context or candidate) of a context split: which inputs it carries, which fields it feeds.

    id_inputs / numeric_inputs: columns of the model's `ids` / `numeric` inputs on this side (ascending);
        the side's tensors hold exactly these columns, in this order.
    id_fields / id_positions: active id fields (layout indices) on this side, and their columns in the
        side's ids tensor. numeric_fields / numeric_positions: the same for normalized numerics.
    """

    id_inputs: tuple[int, ...]
    numeric_inputs: tuple[int, ...]
    id_fields: tuple[int, ...]
    id_positions: tuple[int, ...]
    numeric_fields: tuple[int, ...]
    numeric_positions: tuple[int, ...]
    n_id_fields: int  # of the whole layout: numerics' field indices start there

    @property
    def fields(self) -> tuple[int, ...]:
        """Global field indices (`[B, S, D]` order: id fields, then normalized numerics) of this side."""
        return self.id_fields + tuple(self.n_id_fields + j for j in self.numeric_fields)

    def kernel_rows(self, dim: int) -> list[int]:
        """Rows of a `[S * dim, ...]` kernel over the flattened field vectors that this side's fields meet."""
        return [f * dim + d for f in self.fields for d in range(dim)]


@dataclass(frozen=True)
class ContextSplit:
    """The model's inputs split into context (once per request) and candidate (once per ad) columns.

    Built by `CtrModel.context_split`; `CtrModel.call_context` uses it to compute every term of the
    logit that only involves context fields once per context row, and the rest per candidate.
    """

    context: ContextSide
    candidate: ContextSide

    @classmethod
    def from_inputs(cls, layout: FieldLayout, context_id_inputs: Sequence[int],
                    context_numeric_inputs: Sequence[int]) -> "ContextSplit":
        ctx_ids, ctx_num = sorted(set(context_id_inputs)), sorted(set(context_numeric_inputs))
        if any(not 0 <= c < layout.n_ids_input for c in ctx_ids) or any(not 0 <= c < layout.n_numeric_input for c in ctx_num):
            raise ConfigError(f"context columns out of range: ids {ctx_ids} of {layout.n_ids_input}, "
                              f"numeric {ctx_num} of {layout.n_numeric_input}.")
        sides = []
        for in_ctx in (True, False):
            id_inputs = tuple(c for c in range(layout.n_ids_input) if (c in ctx_ids) == in_ctx)
            num_inputs = tuple(c for c in range(layout.n_numeric_input) if (c in ctx_num) == in_ctx)
            id_fields = tuple(f for f, c in enumerate(layout.id_columns) if c in id_inputs)
            num_fields = tuple(j for j, c in enumerate(layout.numeric_columns) if c in num_inputs)
            sides.append(ContextSide(
                id_inputs, num_inputs, id_fields, tuple(id_inputs.index(layout.id_columns[f]) for f in id_fields),
                num_fields, tuple(num_inputs.index(layout.numeric_columns[j]) for j in num_fields), layout.n_id_fields))
        return cls(*sides)

    def merge(self, context: tf.Tensor, candidate: tf.Tensor) -> tf.Tensor:
        """`[M, Sc, D]` (context vectors gathered per candidate) and `[M, Sk, D]` -> `[M, S, D]` in field order."""
        order = self.context.fields + self.candidate.fields
        inverse = [order.index(f) for f in range(len(order))]
        return tf.gather(tf.concat([context, candidate], axis=1), inverse, axis=1)


class FieldTables(tf.Module):
    """The `[rows, dim]` tables of one kind ("linear" or "embedding") for all fields of a layout.

    `lookup_ids(ids)` gives `[B, F, dim]` for local ids `[B, F]` (the active columns); `numeric_rows()`
    gives the `[N, dim]` rows of the normalized numerics. Both gather, so gradients are IndexedSlices.
    """

    def __init__(
        self,
        layout: FieldLayout,
        dim: int,
        *,
        table_mode: str,
        group: str,
        initializer_for: Callable[[str], Initializer],
        name: str | None = None,
    ) -> None:
        super().__init__(name=name or group)
        self.layout = layout
        self.dim = dim
        self.table_mode = table_mode
        self.group = group
        self._initializer_for = initializer_for
        self.tables: list[tf.Variable] = []
        self.built = False

    def build(self) -> None:
        if self.built:
            return
        lay = self.layout
        with self.name_scope:
            if self.table_mode == "shared":
                rows = lay.shared_rows
                self.tables = [make_table("shared", rows, self.dim, self._initializer_for("shared"))]
            else:
                # Names are unique within the model (optimizers key their slots by variable name):
                # id tables live under "id/", and a field whose cleaned name repeats gets its column.
                names = [_variable_name(n) for n in lay.id_names]
                names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
                self.tables = [
                    make_table(f"id/{n}", b, self.dim, self._initializer_for(field))
                    for n, field, b in zip(names, lay.id_names, lay.id_buckets)
                ]
                if lay.n_numeric_fields:
                    self.tables.append(
                        make_table(
                            "normalized_numeric",
                            lay.n_numeric_fields,
                            self.dim,
                            self._initializer_for("normalized_numeric"),
                        )
                    )
        self.built = True

    @property
    def _width(self) -> int:
        """Columns of `self.tables`' rows: `dim`, or the packed width when packed."""
        return self.dim if self.packed is None else self.packed.dim + 1

    # -- packed serving tables (exports, `CtrModel.pack_tables`) ----------------------------------------
    packed: "PackedRows | None" = None

    def _part(self, rows: tf.Tensor) -> tf.Tensor:
        """This table's columns of packed rows: the embedding's first `dim`, or the linear weight after them."""
        width = self.packed.dim
        return rows[..., :width] if self.group == "embedding" else rows[..., width:]

    def lookup_ids(self, ids: tf.Tensor) -> tf.Tensor:
        """`[B, F]` int32 local ids -> `[B, F, dim]` rows."""
        if self.packed is not None:
            return self._part(self.packed.rows(("ids",), ids, lambda: self._lookup_ids(ids)))
        return self._lookup_ids(ids)

    def lookup_fields(self, ids: tf.Tensor, fields: Sequence[int]) -> tf.Tensor:
        """`[B, len(fields)]` local ids of the active id fields `fields` (layout indices, ascending) ->
        `[B, len(fields), dim]`: `lookup_ids` restricted to some fields (one side of a context split)."""
        if self.packed is not None:
            fields = tuple(fields)
            return self._part(self.packed.rows(("fields", fields), ids, lambda: self._lookup_fields(ids, fields)))
        return self._lookup_fields(ids, fields)

    def numeric_rows(self) -> tf.Tensor:
        """`[N, dim]` rows of the normalized numeric fields (gathered, for IndexedSlices gradients)."""
        if self.packed is not None:
            return self._part(self.packed.rows(("numeric",), None, self._numeric_rows))
        return self._numeric_rows()

    def lookup_packed(self, ids: tf.Tensor) -> tf.Tensor:
        """Packed tables only: `[B, F]` local ids -> the whole packed rows `[B, F, dim + 1]` (no slice copy:
        models whose ops take the linear column along, `FieldEmbedding.packed`)."""
        return self.packed.rows(("ids",), ids, lambda: self._lookup_ids(ids))

    def lookup_fields_packed(self, ids: tf.Tensor, fields: Sequence[int]) -> tf.Tensor:
        """Packed tables only: `lookup_fields` as whole packed rows `[B, len(fields), dim + 1]`."""
        fields = tuple(fields)
        return self.packed.rows(("fields", fields), ids, lambda: self._lookup_fields(ids, fields))

    def numeric_packed(self) -> tf.Tensor:
        """Packed tables only: the normalized numerics' whole packed rows `[N, dim + 1]`."""
        return self.packed.rows(("numeric",), None, self._numeric_rows)

    def _lookup_ids(self, ids: tf.Tensor) -> tf.Tensor:
        lay = self.layout
        if lay.n_id_fields == 0:
            return tf.zeros([tf.shape(ids)[0], 0, self._width])
        if self.table_mode == "shared":
            if lay.shared_rows >= 2**31:
                return lookup(self.tables[0], tf.cast(ids, tf.int64) + tf.constant(lay.offsets, tf.int64))
            return lookup(self.tables[0], ids + tf.constant(lay.offsets, tf.int32))
        columns = tf.unstack(ids, num=lay.n_id_fields, axis=1)
        return tf.stack([lookup(t, c) for t, c in zip(self.tables, columns)], axis=1)

    def _lookup_fields(self, ids: tf.Tensor, fields: Sequence[int]) -> tf.Tensor:
        lay = self.layout
        fields = tuple(fields)
        if not fields:
            return tf.zeros([tf.shape(ids)[0], 0, self._width])
        if fields == tuple(range(lay.n_id_fields)):
            return self._lookup_ids(ids)
        if self.table_mode == "shared":
            offsets = [lay.offsets[f] for f in fields]
            if lay.shared_rows >= 2**31:
                return lookup(self.tables[0], tf.cast(ids, tf.int64) + tf.constant(offsets, tf.int64))
            return lookup(self.tables[0], ids + tf.constant(offsets, tf.int32))
        columns = tf.unstack(ids, num=len(fields), axis=1)
        return tf.stack([lookup(self.tables[f], c) for f, c in zip(fields, columns)], axis=1)

    def _numeric_rows(self) -> tf.Tensor:
        lay = self.layout
        if self.table_mode == "shared":
            start = sum(lay.id_buckets)
            return lookup(self.tables[0], tf.range(start, start + lay.n_numeric_fields))
        return lookup(self.tables[-1], tf.range(lay.n_numeric_fields))


class PackedRows:
    """Serving layout of an export: the linear weight as one more column of the embedding table's rows.

    Every model but LR looks each id up twice, in the embedding `[R, dim]` and the linear `[R, 1]` table
    (same rows); `CtrModel.pack_tables` makes one `[R, dim + 1]` table of the two (per table of the
    layout) and sets it on both `FieldTables`, which then take their columns of the same rows. Inside
    `scope()` (one call of the model) a lookup of the same ids tensor is gathered once and shared by
    both; outside it each lookup gathers (still correct). The memo is per thread and per graph, so
    concurrent calls and tracings (serving threads, several `tf.function`s) never share a gather. The values are the same floats: sliced, they
    give the unpacked scores bitwise; kinds that read the rows whole (`CtrModel.packed_terms`, FM) sum
    them in another order, equal within float32 rounding. Training never packs: checkpoints keep the
    two tables.
    """

    def __init__(self, tables: Sequence[tf.Variable], dim: int) -> None:
        self.tables = list(tables)
        self.dim = dim  # the embedding's columns; the linear weight is column `dim`
        # One memo per thread (serving threads and tracings run concurrently on one model), keyed by the
        # graph too: a gather of one graph (or of eager mode) must never be handed to another.
        self._local = threading.local()

    @contextlib.contextmanager
    def scope(self):
        """Share the gathers of one call of the model (nested scopes join the outer one of this thread)."""
        if getattr(self._local, "memo", None) is not None:
            yield
            return
        self._local.memo = {}
        try:
            yield
        finally:
            self._local.memo = None

    def rows(self, key: tuple, ids: tf.Tensor | None, gather: Callable[[], tf.Tensor]) -> tf.Tensor:
        """The packed rows for `key` of this ids tensor (by identity) in the current graph, gathered on
        first use in this thread's scope."""
        memo = getattr(self._local, "memo", None)
        if memo is None:
            return gather()
        k = (tf.compat.v1.get_default_graph(), key, None if ids is None else ids.ref())
        if k not in memo:
            memo[k] = (ids, gather())  # ids kept alive: its ref cannot be reused within the scope
        return memo[k][1]


class SparseLinear(tf.Module):
    """Twitter-style sparse linear layer: `sum_f w[id_f] + sum_j w_j * x_j + bias` -> `[B]` logits.

    `w` is a `[rows, 1]` table (one scalar per id, zero-initialized); the normalized numerics `x_j` are
    weighted lookups (value x their own row). The bias is a dense scalar.

    Example:
        >>> spec = FeatureSpec(("site", "hour"), (100, 26))
        >>> linear = SparseLinear(FieldLayout.from_spec(spec), table_mode="shared"); linear.build()
        >>> linear(tf.constant([[3, 1]]), None).shape
        TensorShape([1])
    """

    def __init__(self, layout: FieldLayout, *, table_mode: str, name: str = "linear") -> None:
        super().__init__(name=name)
        with self.name_scope:
            self.table = FieldTables(
                layout,
                1,
                table_mode=table_mode,
                group="linear",
                initializer_for=lambda _: zeros_initializer,
                name="table",
            )
        self.bias: tf.Variable | None = None

    def build(self) -> None:
        if self.bias is not None:
            return
        self.table.build()
        with self.name_scope:
            self.bias = _variable(tf.zeros, [], "bias")

    def __call__(self, ids: tf.Tensor, values: tf.Tensor | None) -> tf.Tensor:
        """ids: `[B, F]` int32 local ids; values: `[B, N]` normalized numerics or None when N = 0."""
        logit = tf.reduce_sum(self.table.lookup_ids(ids), axis=[1, 2])
        if values is not None:
            logit += tf.linalg.matvec(values, self.table.numeric_rows()[:, 0])
        return logit + self.bias

    def side(self, ids: tf.Tensor, values: tf.Tensor | None, side: "ContextSide") -> tf.Tensor:
        """The linear sum over one side's fields only, without the bias -> `[B]` (context splits)."""
        logit = tf.reduce_sum(self.table.lookup_fields(ids, side.id_fields), axis=[1, 2])
        if values is not None and side.numeric_fields:
            rows = tf.gather(self.table.numeric_rows()[:, 0], list(side.numeric_fields))
            logit += tf.linalg.matvec(values, rows)
        return logit


class FieldEmbedding(tf.Module):
    """One `dim`-vector per field: `[B, F + N, dim]`, id fields first, numerics scaled by their value.

    Embeddings start as N(0, init_scale^2), deterministic given `seed`.
    """

    def __init__(
        self, layout: FieldLayout, dim: int, *, table_mode: str, init_scale: float, seed: int, name: str = "embedding"
    ) -> None:
        super().__init__(name=name)
        with self.name_scope:
            self.table = FieldTables(
                layout,
                dim,
                table_mode=table_mode,
                group="embedding",
                name="table",
                initializer_for=lambda salt: normal_initializer(init_scale, seed, f"embedding/{salt}"),
            )

    def build(self) -> None:
        self.table.build()

    def __call__(self, ids: tf.Tensor, values: tf.Tensor | None) -> tf.Tensor:
        """ids: `[B, F]` int32 local ids; values: `[B, N]` normalized numerics or None when N = 0."""
        return _with_numerics(self.table.lookup_ids(ids), values, self.table.numeric_rows)

    def packed(self, ids: tf.Tensor, values: tf.Tensor | None) -> tf.Tensor:
        """Packed tables only (`CtrModel.pack_tables`): `__call__`'s `[B, F + N, dim]` with each field's
        linear term as column `dim` (`[B, F + N, dim + 1]`; numerics scaled by their value, which is the
        linear layer's `w_j x_j`), taken straight from the gathered rows: no copy of the slice."""
        return _with_numerics(self.table.lookup_packed(ids), values, self.table.numeric_packed)

    def packed_side(self, ids: tf.Tensor, values: tf.Tensor | None, side: "ContextSide") -> tf.Tensor:
        """Packed tables only: `side` as whole packed rows `[B, len(side.fields), dim + 1]` (see `packed`)."""
        return _with_numerics(self.table.lookup_fields_packed(ids, side.id_fields), values, self.table.numeric_packed,
                              side.numeric_fields)

    def side(self, ids: tf.Tensor, values: tf.Tensor | None, side: "ContextSide") -> tf.Tensor:
        """One side's field vectors `[B, len(side.fields), dim]`, in global field order (context splits)."""
        return _with_numerics(self.table.lookup_fields(ids, side.id_fields), values, self.table.numeric_rows,
                              side.numeric_fields)


def _with_numerics(rows: tf.Tensor, values: tf.Tensor | None, numeric_rows: Callable[[], tf.Tensor],
                   fields: Sequence[int] | None = None) -> tf.Tensor:
    """`rows` `[B, F, W]` followed by the normalized numerics' rows scaled by their values (`fields`: those of one
    context side; None: all) -> `[B, F + N, W]`; `rows` as they are without numerics."""
    if values is None or (fields is not None and not fields):
        return rows
    num = numeric_rows() if fields is None else tf.gather(numeric_rows(), list(fields))
    return tf.concat([rows, values[:, :, None] * num[None, :, :]], axis=1)


def packed_fm(rows: tf.Tensor, dim: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """`FieldEmbedding.packed` rows `[B, S, dim + 1]` -> (the linear sum over fields `[B]`, without the
    bias; `fm_interaction` of the embedding columns `[B]`; the sum of the embedding vectors `[B, dim]`),
    reducing the packed rows as they are: only the `[B, dim + 1]` sums are sliced (slicing the rows
    themselves copies them and costs what the saved gather saves). Equal to the unpacked terms up to
    float32 rounding (the linear sum adds the id and numeric terms in one reduction)."""
    total = tf.reduce_sum(rows, axis=1)
    squares = tf.reduce_sum(tf.square(rows), axis=1)
    vectors = total[:, :dim]
    return total[:, dim], 0.5 * tf.reduce_sum(tf.square(vectors) - squares[:, :dim], axis=1), vectors


def fm_interaction(emb: tf.Tensor) -> tf.Tensor:
    """Second-order FM term `sum_{i<j} <v_i, v_j>` over fields, `[B, S, D]` -> `[B]`, in O(S D).

    Uses `0.5 * sum_d((sum_i v_id)^2 - sum_i v_id^2)` (Rendle 2010).
    """
    total = tf.reduce_sum(emb, axis=1)
    squares = tf.reduce_sum(tf.square(emb), axis=1)
    return 0.5 * tf.reduce_sum(tf.square(total) - squares, axis=1)


class FieldPairInteraction(tf.Module):
    """Field-weighted FM term (Pan et al. 2018): `sum_{i<j} r_ij <v_i, v_j>`, `[B, S, D]` -> `[B]`.

    `r` is a learned `[S, S]` "dense" variable of which only the strict upper triangle is used; it starts
    at 1 (the model starts as a plain FM) and learns how much each field pair matters: S(S-1)/2 numbers
    instead of FFM's (S-1) vectors per id. Cost O(S^2 D) per row, as one matmul over the batch.

    Kept as a sum over pairs so a serving graph can later split it into context-context,
    context-candidate and candidate-candidate blocks (issue 11).

    `scale` > 1 stores `r / scale` (starting at `1 / scale`) and multiplies back: the optimizer's step on the
    stored variable moves r `scale` times as far (Adam's step does not depend on the gradient's size, so
    this is the one way to give r a faster rate inside the "dense" group). FFM uses 10: its pair weights
    must travel from 1 to ~0 for the many pairs that do not interact within a few hundred steps.

    `l1`, `l2` (default 0, off): a penalty `l1 * sum_{i<j} |r_ij| + l2 * sum_{i<j} r_ij**2` on r itself (not
    on the stored r / scale, which the optimizer's own L2 sees: 1/scale**2 of it) — a sharper pair
    selection. The trainer's loss has no hook for a model's own penalty, so `weights_matrix(penalize=True)`
    (the training pass) adds the penalty's gradient to r's on the way back (the forward value is r).
    """

    def __init__(self, n_fields: int, *, scale: float = 1.0, l1: float = 0.0, l2: float = 0.0,
                 name: str = "field_pairs") -> None:
        super().__init__(name=name)
        if not (l1 >= 0 and l2 >= 0):
            raise ConfigError(f"The pair-weight penalties of FieldPairInteraction must be >= 0. Got l1={l1!r}, l2={l2!r} instead.")
        self.n_fields = n_fields
        self.scale = float(scale)
        self.l1, self.l2 = float(l1), float(l2)
        self.r: tf.Variable | None = None

    def build(self, start: Any = None) -> None:
        """Create r (idempotent). `start`: None (every r_ij = 1) or an `[S, S]` array of each pair's
        starting r (upper triangle used; 0 = the pair is off for good, see `weights_matrix`)."""
        if self.r is not None:
            return
        n = self.n_fields
        if start is None:
            init = lambda shape, dtype: tf.fill(shape, tf.constant(1.0 / self.scale, dtype))  # noqa: E731
        else:
            start = np.asarray(start, dtype=np.float32)
            if start.shape != (n, n) or not np.all(np.isfinite(start)):
                raise ConfigError(f"The start of FieldPairInteraction's pair weights must be a finite [{n}, {n}] array. "
                                  f"Got shape {start.shape} instead.")
            init = lambda shape, dtype: tf.constant(start / self.scale, dtype)  # noqa: E731
        with self.name_scope:
            self.r = _variable(init, [n, n], "r")

    def soft_threshold(self, t: float) -> tf.Operation:
        """Proximal step of an L1 penalty on r: `r <- sign(r) max(|r| - t, 0)` (t on r's scale, not r / scale).
        Run in the training pass before r is read, so it follows the previous optimizer step (no optimizer
        hook needed). A pair it zeroes gets no gradient in that step, but Adam's momentum from earlier steps
        still moves it off 0 (measured: no pair ends at exactly 0), so this is a per-step L1 shrink, not pruning."""
        self.build()
        cut = tf.constant(t / self.scale, self.r.dtype)
        return self.r.assign(tf.sign(self.r) * tf.nn.relu(tf.abs(self.r) - cut))

    @property
    def pair_weights(self) -> tf.Tensor:
        """`[S, S]`: r_ij above the diagonal, zeros elsewhere."""
        return self.weights_matrix()

    def weights_matrix(self, penalize: bool = False) -> tf.Tensor:
        """`pair_weights`; `penalize` (training): its gradient also carries the `l1` / `l2` penalty's.

        A pair whose stored r is exactly 0 is off: its gradient is masked, and its vectors get none
        either and do not enter the logit. A pair that *starts* at 0 (two-stage selection, `build(start)`)
        so never gets a gradient, its optimizer moments stay 0 and r stays exactly 0 through training,
        resumes, warm starts and continuous runs (decay keeps 0), with no extra state in the checkpoint."""
        r = self.r * self.scale if self.scale != 1.0 else self.r
        r = r * tf.cast(tf.not_equal(self.r, 0.0), r.dtype)
        upper = tf.linalg.band_part(r, 0, -1)
        w = upper - tf.linalg.band_part(r, 0, 0)
        return _with_penalty_gradient(w, self.l1, self.l2) if penalize and (self.l1 or self.l2) else w

    def symmetric_weights(self, pairs: Sequence[tuple[int, int]], penalize: bool = False) -> tf.Tensor:
        """`[P]`: r of each (i, j) in `pairs`, whichever of i, j is smaller (FFM's per-slot / per-pair weights).
        `penalize`: see `weights_matrix`; pass it once per forward pass (each call adds the penalty once)."""
        self.build()
        w = self.weights_matrix(penalize)
        return tf.gather_nd(w + tf.transpose(w), [[int(i), int(j)] for i, j in pairs])

    def __call__(self, emb: tf.Tensor) -> tf.Tensor:
        self.build()
        return self.weighted(emb, self.pair_weights)

    @staticmethod
    def weighted(emb: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
        """`sum_{i,j} w_ij <v_i, v_j>` over `[B, S, D]` with `[S, S]` weights -> `[B]`."""
        # sum_i <v_i, sum_j U_ij v_j> with U strictly upper = sum_{i<j} r_ij <v_i, v_j>. tensordot makes
        # it one [B*D, S] x [S, S] matmul (an einsum over [B, S, D] measured 3.4x slower at batch 4000).
        mixed = tf.tensordot(emb, weights, axes=[[1], [1]])  # [B, D, S]
        return tf.reduce_sum(tf.transpose(emb, [0, 2, 1]) * mixed, axis=[1, 2])

    def split(self, split: "ContextSplit") -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """The pair weights in blocks: (context-context `[Sc, Sc]`, context-candidate `[Sc, Sk]` with
        both triangles folded in, candidate-candidate `[Sk, Sk]`), so `sum_{i<j} r_ij <v_i, v_j>` =
        cc + sum_j <v_j, sum_i ck_ij v_i> + kk."""
        self.build()
        w = self.pair_weights
        both = w + tf.transpose(w)  # a context/candidate pair sits in one triangle or the other
        c, k = list(split.context.fields), list(split.candidate.fields)
        block = lambda m, rows, cols: take(take(m, rows, axis=0), cols, axis=1)  # noqa: E731
        return block(w, c, c), block(both, c, k), block(w, k, k)


def _with_penalty_gradient(w: tf.Tensor, l1: float, l2: float) -> tf.Tensor:
    """`w` (zero off the strict upper triangle) unchanged; on the way back its gradient gains that of
    `l1 * sum |w| + l2 * sum w**2` (zero entries get none: sign(0) = 0)."""

    @tf.custom_gradient
    def identity(x):
        def grad(up):
            return up + tf.cast(l1, x.dtype) * tf.sign(x) + tf.cast(2.0 * l2, x.dtype) * x

        return tf.identity(x), grad

    return identity(w)


def ffm_partner_slots(n_fields: int) -> list[int]:
    """For every slot of the `[B, S * (S - 1), k]` view of FFM rows, the slot it is paired with.

    Field f's row holds S - 1 vectors, one per other field g, at slot `g if g < f else g - 1`, i.e. at
    `f * (S - 1) + slot` in the flat view. Field i's vector for j pairs with field j's vector for i, so
    the map is an involution: every slot has exactly one partner and `partner[partner[s]] == s`.
    """
    s = n_fields
    at = lambda f, g: f * (s - 1) + (g if g < f else g - 1)  # noqa: E731
    return [at(g, f) for f in range(s) for g in range(s) if g != f]


def ffm_interaction(emb: tf.Tensor, n_fields: int, dim: int, slot_weights: tf.Tensor | None = None) -> tf.Tensor:
    """Field-aware FM term (Juan et al. 2016): `sum_{i<j} r_ij <v_{i,j}, v_{j,i}>`, -> `[B]`.

    emb: `[B, S, (S - 1) * dim]`, each field's looked-up row holding its S - 1 field-aware vectors
    (order: `ffm_partner_slots`). slot_weights: None (every r_ij = 1, plain FFM) or `[S * (S - 1)]`, the
    weight of each slot's pair (a slot and its partner carry the same r_ij; `ffm_slot_fields`).
    Computed as `0.5 * sum(w * x * x[partner])` with one gather; since the partner map is an involution
    the gradient is exactly `w * x[partner]`, reused from the forward pass (TensorFlow's generic gather
    gradient, a scatter-add, made FFM training ~several times slower). Cost O(S^2 dim) per row.
    """
    if n_fields < 2:
        return tf.zeros([tf.shape(emb)[0]])
    partner = ffm_partner_slots(n_fields)
    flat = tf.reshape(emb, [-1, n_fields * (n_fields - 1), dim])
    if slot_weights is None:
        @tf.custom_gradient
        def pairs(flat):
            swapped = tf.gather(flat, partner, axis=1)

            def grad(upstream):
                return upstream[:, None, None] * swapped

            return 0.5 * tf.reduce_sum(flat * swapped, axis=[1, 2]), grad

        return pairs(flat)

    slots = n_fields * (n_fields - 1)

    @tf.custom_gradient
    def weighted(flat, w):
        swapped = tf.gather(flat, partner, axis=1)
        # One [B, slots * dim] x [slots * dim] matvec: as fast as the unweighted sum (a per-slot dot, then a
        # matvec over slots, measured 1.4x slower: the reduction over the 4-wide axis is the cost).
        prod = tf.reshape(flat * swapped, [-1, slots * dim])

        w_rep = tf.repeat(w, dim)

        def grad(upstream):
            dw = tf.reduce_sum(tf.reshape(tf.linalg.matvec(prod, upstream, transpose_a=True), [slots, dim]), axis=1)
            # Row scale, then column scale, on the 2-D view: 0.76x the time of the same product broadcast over
            # [B, slots, dim] (two passes with a size-1 inner axis; FFM's training step was 1.14x the plain one's).
            d_flat = upstream[:, None] * (tf.reshape(swapped, [-1, slots * dim]) * w_rep)
            return tf.reshape(d_flat, tf.shape(flat)), 0.5 * dw

        return 0.5 * tf.linalg.matvec(prod, w_rep), grad

    return weighted(flat, slot_weights)


def ffm_slot_fields(n_fields: int) -> list[tuple[int, int]]:
    """(field, partner field) of every slot of the `[B, S * (S - 1), k]` view, in `ffm_partner_slots`' order."""
    return [(f, g) for f in range(n_fields) for g in range(n_fields) if g != f]


def ffm_slot(n_fields: int, f: int, g: int, local: int) -> int:
    """The flat slot of field `f`'s vector for partner `g` in a `[B, Ss * (S - 1), k]` view of the rows
    of one side's fields, where `f` is the side's `local`-th field (`ffm_partner_slots` for one side)."""
    return local * (n_fields - 1) + (g if g < f else g - 1)


def ffm_pair_slots(n_fields: int, split: "ContextSplit") -> dict[str, tuple[list[int], list[int]]]:
    """Slot lists for the three blocks of FFM pairs under a context split: "cc" and "kk" (both slots
    on the same side), "ck" (context field's slot in the context view, candidate's in the candidate
    view). Each pair `i < j` appears once; `sum <x[a], x[b]>` over the lists is that block's term."""
    c, k = split.context.fields, split.candidate.fields
    at_c = {f: i for i, f in enumerate(c)}
    at_k = {f: i for i, f in enumerate(k)}
    out: dict[str, tuple[list[int], list[int]]] = {"cc": ([], []), "ck": ([], []), "kk": ([], [])}
    for side, fields, at in (("cc", c, at_c), ("kk", k, at_k)):
        for x, i in enumerate(fields):
            for j in fields[x + 1:]:
                out[side][0].append(ffm_slot(n_fields, i, j, at[i]))
                out[side][1].append(ffm_slot(n_fields, j, i, at[j]))
    for i in c:
        for j in k:
            out["ck"][0].append(ffm_slot(n_fields, i, j, at_c[i]))
            out["ck"][1].append(ffm_slot(n_fields, j, i, at_k[j]))
    return out


def ffm_pair_fields(split: "ContextSplit") -> dict[str, list[tuple[int, int]]]:
    """The field pair (i, j) of every entry of `ffm_pair_slots`' lists, in the same order (for pair weights)."""
    c, k = split.context.fields, split.candidate.fields
    out: dict[str, list[tuple[int, int]]] = {"cc": [], "ck": [], "kk": []}
    for side, fields in (("cc", c), ("kk", k)):
        for x, i in enumerate(fields):
            out[side].extend((i, j) for j in fields[x + 1:])
    out["ck"] = [(i, j) for i in c for j in k]
    return out


def slot_dot(a: tf.Tensor, a_slots: Sequence[int], b: tf.Tensor, b_slots: Sequence[int],
             weights: tf.Tensor | None = None) -> tf.Tensor:
    """`sum_p w_p <a[:, a_slots[p]], b[:, b_slots[p]]>` over `[B, slots, k]` views -> `[B]` (0 if no pairs);
    `weights` `[P]` or None (all 1)."""
    if not a_slots:
        return tf.zeros([tf.shape(a)[0]])
    prod = tf.gather(a, list(a_slots), axis=1) * tf.gather(b, list(b_slots), axis=1)
    if weights is None:
        return tf.reduce_sum(prod, axis=[1, 2])
    k = a.shape[-1]  # as in ffm_interaction: one matvec over pairs x k, not a per-pair dot first
    return tf.linalg.matvec(tf.reshape(prod, [-1, len(a_slots) * k]), tf.repeat(weights, k))


class CrossNetwork(tf.Module):
    """DCN-v2 cross layers (Wang et al. 2021): `x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`, `[B, D]` -> `[B, D]`.

    Each layer adds one degree of explicit feature crossing at O(D^2) per row (full rank) or O(2 D r)
    with the low-rank factorization `W_l = V_l U_l` (`rank` = r, the paper's cost-efficient variant).
    Kernels start Glorot-uniform, biases at 0; all are "dense".

    Args:
        input_dim: D, the width of `x_0` (fields x embedding_dim).
        layers: number of cross layers, >= 1.
        rank: None for full `[D, D]` kernels, else r for `[D, r]` and `[r, D]` factors V and U; a rank
            with 2r >= D would cost more than full rank and express no more, so full rank is used then.
        seed: seeds the kernels' initializers.
    """

    def __init__(self, input_dim: int, layers: int, *, rank: int | None = None, seed: int = 0, name: str = "cross") -> None:
        super().__init__(name=name)
        self.input_dim = input_dim
        self.layers = layers
        self.rank = rank if rank is not None and 2 * rank < input_dim else None
        self.seed = seed
        self.built = False

    def build(self) -> None:
        if self.built:
            return
        d, r = self.input_dim, self.rank
        self.kernels, self.u, self.v, self.biases = [], [], [], []
        with self.name_scope:
            for i in range(self.layers):
                if r is None:
                    self.kernels.append(_variable(glorot_uniform_initializer(self.seed, f"cross/kernel_{i}"), [d, d], f"kernel_{i}"))
                else:
                    self.v.append(_variable(glorot_uniform_initializer(self.seed, f"cross/v_{i}"), [d, r], f"v_{i}"))
                    self.u.append(_variable(glorot_uniform_initializer(self.seed, f"cross/u_{i}"), [r, d], f"u_{i}"))
                self.biases.append(_variable(tf.zeros, [d], f"bias_{i}"))
        self.built = True

    def __call__(self, x0: tf.Tensor) -> tf.Tensor:
        self.build()
        if not self.layers:
            return x0
        return self.from_first_mix(x0, tf.matmul(x0, self.kernels[0] if self.rank is None else self.v[0]))

    def first_mix(self, x: tf.Tensor, rows: Sequence[int]) -> tf.Tensor:
        """One side's share of the first layer's mixing: `x_side @ W_0[rows]` (`[B, D]` full rank, the
        low-rank `x_side @ V_0[rows]` `[B, r]`); the shares of both sides add up to `x0 @ W_0`."""
        self.build()
        kernel = self.kernels[0] if self.rank is None else self.v[0]
        return tf.matmul(x, take(kernel, rows))

    def from_first_mix(self, x0: tf.Tensor, mix: tf.Tensor) -> tf.Tensor:
        """`__call__(x0)` given the summed `first_mix` shares of `x0` (the first layer's `x0 @ W_0`)."""
        self.build()
        mixed = mix if self.rank is None else tf.matmul(mix, self.u[0])
        x = x0 * (mixed + self.biases[0]) + x0
        for i in range(1, self.layers):
            if self.rank is None:
                mixed = tf.matmul(x, self.kernels[i])
            else:
                mixed = tf.matmul(tf.matmul(x, self.v[i]), self.u[i])
            x = x0 * (mixed + self.biases[i]) + x
        return x


class OnlineNormalizer(tf.Module):
    """Standardizes numeric values with running mean/variance, learned while training, frozen after.

    `__call__(x, training=True)` first merges the batch's mean/variance into the running statistics, then
    normalizes with the updated statistics; `training=False` only reads them (serving, evaluation), so
    an exported model normalizes exactly as the last training step did. Statistics are non-trainable
    float64 variables: `count` (rows seen), `mean`, `variance`, all `[N]` except `count`.

    Args:
        size: number of numeric columns N.
        momentum: None (default) gives the exact mean/variance over all rows seen (Chan et al.'s
            parallel Welford merge). A value in (0, 1) gives an exponential moving average where the old
            statistics keep weight `momentum` per batch (early batches still get weight `b / (n + b)`
            so the first batches are not biased to the initial values), for continuous training on
            drifting data.
        epsilon: added to the variance before the square root.
    """

    def __init__(self, size: int, *, momentum: float | None = None, epsilon: float = 1e-6, name: str = "normalizer"):
        super().__init__(name=name)
        self.size = size
        self.momentum = momentum
        self.epsilon = epsilon
        self.count: tf.Variable | None = None

    def build(self) -> None:
        if self.count is not None:
            return
        with self.name_scope:
            # Callable initial values: build() may run inside a tf.function's first trace.
            self.count = tf.Variable(lambda: tf.constant(0.0, tf.float64), trainable=False, name="count")
            self.mean = tf.Variable(lambda: tf.zeros([self.size], tf.float64), trainable=False, name="mean")
            self.variance = tf.Variable(lambda: tf.ones([self.size], tf.float64), trainable=False, name="variance")

    def update(self, x: tf.Tensor) -> None:
        """Merge a batch `[B, N]` into the running statistics (a batch of 0 rows changes nothing)."""
        x = tf.cast(x, tf.float64)
        rows = tf.cast(tf.shape(x)[0], tf.float64)
        batch_mean = tf.math.divide_no_nan(tf.reduce_sum(x, axis=0), rows)
        batch_var = tf.math.divide_no_nan(tf.reduce_sum(tf.square(x - batch_mean), axis=0), rows)
        # Weight of the new batch: exact merge of counts, or at least (1 - momentum) for an EMA.
        alpha = tf.math.divide_no_nan(rows, self.count + rows)
        if self.momentum is not None:
            alpha = tf.where(rows > 0, tf.maximum(alpha, 1.0 - self.momentum), alpha)
        delta = batch_mean - self.mean
        self.variance.assign((1.0 - alpha) * self.variance + alpha * batch_var + alpha * (1.0 - alpha) * tf.square(delta))
        self.mean.assign_add(alpha * delta)
        self.count.assign_add(rows)

    def __call__(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        """`[B, N]` float32 -> `[B, N]` float32 `(x - mean) / sqrt(variance + epsilon)`."""
        self.build()
        if training:
            self.update(x)
        mean = tf.cast(self.mean, tf.float32)
        scale = tf.cast(tf.math.rsqrt(self.variance + self.epsilon), tf.float32)
        return (x - mean) * scale

    def columns(self, x: tf.Tensor, columns: Sequence[int]) -> tf.Tensor:
        """Normalize `[B, len(columns)]` values of these normalized columns only (serving: no update)."""
        self.build()
        mean = tf.gather(tf.cast(self.mean, tf.float32), list(columns))
        scale = tf.gather(tf.cast(tf.math.rsqrt(self.variance + self.epsilon), tf.float32), list(columns))
        return (x - mean) * scale


class MLP(tf.Module):
    """Dense layers `input -> hidden... -> 1` with relu, optional batch norm and dropout -> `[B]` logits.

    With `output=False` there is no final 1-wide layer and the MLP returns its last hidden layer
    `[B, output_dim]` (the input itself when `hidden` is empty), for models that combine it with other
    towers (DCN-v2's parallel structure). Each hidden layer: matmul + bias, then batch norm (if enabled: batch statistics while training,
    moving averages with momentum 0.99 otherwise), relu, dropout (training only). All variables are
    ordinary dense-gradient variables; the batch-norm moving averages are non-trainable. Dropout
    masks come from TensorFlow's op seeds (`tf.random.set_seed` makes them repeatable).
    """

    def __init__(
        self,
        input_dim: int,
        hidden: Sequence[int],
        *,
        dropout: float = 0.0,
        batch_norm: bool = False,
        seed: int = 0,
        output: bool = True,
        name: str = "mlp",
    ) -> None:
        super().__init__(name=name)
        self.input_dim = input_dim
        self.output = output
        self.hidden = tuple(hidden)
        self.dropout = dropout
        self.batch_norm = batch_norm
        self.seed = seed
        self.bn_momentum = 0.99
        self.bn_epsilon = 1e-3
        self.built = False

    def build(self) -> None:
        if self.built:
            return
        self.kernels, self.biases = [], []
        self.gammas, self.betas, self.moving_means, self.moving_vars = [], [], [], []
        widths = (self.input_dim, *self.hidden, *((1,) if self.output else ()))
        with self.name_scope:
            for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
                init = glorot_uniform_initializer(self.seed, f"{self.name}/kernel_{i}")
                self.kernels.append(_variable(init, [fan_in, fan_out], f"kernel_{i}"))
                self.biases.append(_variable(tf.zeros, [fan_out], f"bias_{i}"))
                if self.batch_norm and i < len(self.hidden):
                    self.gammas.append(_variable(tf.ones, [fan_out], f"bn_gamma_{i}"))
                    self.betas.append(_variable(tf.zeros, [fan_out], f"bn_beta_{i}"))
                    self.moving_means.append(_variable(tf.zeros, [fan_out], f"bn_mean_{i}", trainable=False))
                    self.moving_vars.append(_variable(tf.ones, [fan_out], f"bn_var_{i}", trainable=False))
        self.built = True

    @property
    def output_dim(self) -> int:
        """Width of what `__call__` returns per row: 1 (squeezed to `[B]`) or the last hidden width."""
        return 1 if self.output else (self.hidden[-1] if self.hidden else self.input_dim)

    def __call__(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        """`[B, input_dim]` -> `[B]` (or `[B, output_dim]` when `output=False`)."""
        self.build()
        if not self.splittable:  # no layer at all
            return x
        return self.from_first(tf.matmul(x, self.kernels[0]) + self.biases[0], training)

    @property
    def splittable(self) -> bool:
        """True when the MLP has a first dense layer whose input rows can be split (context requests)."""
        return bool(self.hidden) or self.output

    def first_matmul(self, x: tf.Tensor, rows: Sequence[int], *, bias: bool = False) -> tf.Tensor:
        """One side's share of the first layer: `x_side @ kernel_0[rows]` (+ its bias: give it to the
        side computed once, the context) -> `[B, width_0]`."""
        self.build()
        out = tf.matmul(x, take(self.kernels[0], rows))
        return out + self.biases[0] if bias else out

    def from_first(self, pre: tf.Tensor, training: bool = False) -> tf.Tensor:
        """`__call__(x)` given the first layer's pre-activation `x @ kernel_0 + bias_0` (summed shares)."""
        self.build()
        h = pre
        if not self.hidden:  # the first layer is the output layer
            return h[:, 0]
        for i in range(len(self.hidden)):
            if i:
                h = tf.matmul(h, self.kernels[i]) + self.biases[i]
            if self.batch_norm:
                h = self._batch_norm(i, h, training)
            h = tf.nn.relu(h)
            if training and self.dropout > 0.0:
                h = tf.nn.dropout(h, rate=self.dropout)
        if not self.output:
            return h
        return tf.matmul(h, self.kernels[-1])[:, 0] + self.biases[-1][0]

    def _batch_norm(self, i: int, h: tf.Tensor, training: bool) -> tf.Tensor:
        if training:
            mean, var = tf.nn.moments(h, axes=[0])
            m = self.bn_momentum
            self.moving_means[i].assign(m * self.moving_means[i] + (1.0 - m) * mean)
            self.moving_vars[i].assign(m * self.moving_vars[i] + (1.0 - m) * var)
        else:
            mean, var = self.moving_means[i], self.moving_vars[i]
        return tf.nn.batch_normalization(h, mean, var, self.betas[i], self.gammas[i], self.bn_epsilon)


def rare_id_remap(counts: "np.ndarray", min_count: int, previous: "np.ndarray | None" = None) -> tuple["np.ndarray", dict[str, int]]:
    """One field's remap for `ModelConfig.min_count`: every bucket seen fewer than `min_count` times in training
    maps to ONE shared bucket of the field (FuxiCTR's `min_categr_count`), so the rare values learn one "rarely
    seen" row together, and a value never seen in training (an empty bucket at serving) reads it too. The shared
    bucket is the field's least-seen one (an empty bucket when there is one: no frequent value is merged into it).

    `previous` (a warm start's remap): a bucket that had its own row keeps it, and the shared bucket stays, so the
    learned rows stay where they are; a bucket frequent in the new data gets its own row (new ids can graduate).
    Unless the shared bucket itself is frequent in the new data (a new value hashed into it): then it is that
    value's own row (the rows it learned as the shared one are its start) and the rare values move to their
    least-seen bucket, whose row starts where the parent's initializer left it (no parent id read it).
    Returns (remap of len(counts), {"seen", "rare_seen", "rare_rows"})."""
    import numpy as np

    counts = np.asarray(counts, np.int64)
    remap = np.arange(len(counts), dtype=np.int64)
    rare = counts < min_count
    shared = None
    if previous is not None:
        previous = np.asarray(previous, np.int64)
        own = previous == remap
        rare &= ~own
        moved = previous[~own]
        shared = int(moved[0]) if len(moved) else None
        if shared is not None and counts[shared] >= min_count:  # frequent now: not every rare value's row too
            shared = None
    if rare.any():
        if shared is None:
            shared = int(np.flatnonzero(rare)[np.argmin(counts[rare])])
        remap[rare] = shared
    return remap, {"seen": int((counts > 0).sum()), "rare_seen": int(((counts > 0) & rare).sum()),
                   "rare_rows": int(counts[rare].sum())}


class CtrModel(tf.Module):
    """What every CTR model shares: inputs in the `Batch` layout, logits out, a Keras-like life cycle.

    `__init__` stores the config and creates sub-layers, `build()` makes all variables (idempotent;
    `make_model` calls it, otherwise the first call does), `__call__` computes. Subclasses set `kind`
    and implement `build_layers()` and `call(ids, values, training)`.

    `__call__(ids, numeric, training=False) -> logits [B]` (float32, pre-sigmoid):
        ids: int32 `[B, n_id_fields]`, every column of `Batch.ids` (the model picks the active ones).
            Each must lie in `[0, buckets_f)`; this hot path does not check (the converter and the
            serving graph's hashing guarantee it), and in shared mode an out-of-range id would read
            the next field's rows.
        numeric: float32 `[B, n_numeric]`, every column of `Batch.numeric`; may be None when the spec
            has no normalized numerics.
        training: Python bool; True updates normalization statistics, batch-norm averages and applies
            dropout. Works eagerly and inside `tf.function` (one trace per value of `training`).
    """

    kind: ClassVar[str] = ""

    def __init__(self, config: "ModelConfig", spec: FeatureSpec, *, name: str | None = None) -> None:
        super().__init__(name=name or config.kind or type(self).__name__.lower())
        self.config = config
        self.spec = spec
        self.layout = FieldLayout.from_spec(spec)
        if self.layout.n_fields == 0:
            raise ConfigError(
                "A model needs at least one input field: the FeatureSpec has no id columns and no "
                f"normalized numerics (id_names={spec.id_names}, normalized_numeric={spec.normalized_numeric})."
            )
        self.built = False
        with self.name_scope:
            self.normalizer = (
                OnlineNormalizer(self.layout.n_numeric_fields, momentum=config.norm_momentum)
                if self.layout.n_numeric_fields
                else None
            )
            # Hashed crosses of chosen field pairs added to the logit, for every kind (ctrflow.models.cross);
            # None without `cross_pairs`: the model, its variables and checkpoints are those of before.
            self.pair_cross = None
            if getattr(config, "cross_pairs", ()):
                from ctrflow.models.cross import PairCross

                self.pair_cross = PairCross(self.layout, config.cross_pairs, config.cross_buckets, scale=config.cross_scale)

    # -- life cycle ---------------------------------------------------------------------------------
    def build(self) -> None:
        """Create every variable (idempotent). Call it inside a distribution strategy's scope if any."""
        if self.built:
            return
        with self.name_scope:
            if self.normalizer is not None:
                self.normalizer.build()
            if getattr(self.config, "min_count", 0) and self.layout.n_id_fields:
                # Rare-id remap (ModelConfig.min_count): local id -> local id, all fields end to end; identity
                # until the trainer sets it from the training data's counts (`set_id_counts`). A variable,
                # so checkpoints, warm starts and exports carry it and serving maps ids as training did.
                rows = sum(self.layout.id_buckets)
                dtype = tf.int64 if rows >= 2**31 else tf.int32
                self.id_remap = tf.Variable(
                    tf.concat([tf.range(b, dtype=dtype) for b in self.layout.id_buckets], 0), trainable=False, name="id_remap")
            if self.pair_cross is not None:
                self.pair_cross.build()
            self.build_layers()
        self.built = True

    def build_layers(self) -> None:
        raise NotImplementedError

    def call(self, ids: tf.Tensor, values: tf.Tensor | None, training: bool) -> tf.Tensor:
        """ids: active id columns `[B, F]`; values: normalized numerics `[B, N]` or None -> logits `[B]`."""
        raise NotImplementedError

    def __call__(self, ids, numeric=None, training: bool = False) -> tf.Tensor:
        if training:
            self._refuse_training_if_packed()
        with self._packed_scope():
            if self.pair_cross is None:
                return self.call(*self.prepare_inputs(ids, numeric, training), training)
            active, values = self._inputs(ids, numeric, training)
            logit = self.call(self.remap_ids(active, range(self.layout.n_id_fields)), values, training)
            return logit + self.pair_cross(active, values)

    def prepare_inputs(self, ids, numeric=None, training: bool = False) -> tuple[tf.Tensor, tf.Tensor | None]:
        """`__call__`'s inputs as `call` takes them: the active id columns remapped, normalized numerics or None."""
        active, values = self._inputs(ids, numeric, training)
        return self.remap_ids(active, range(self.layout.n_id_fields)), values

    def _inputs(self, ids, numeric=None, training: bool = False) -> tuple[tf.Tensor, tf.Tensor | None]:
        """The active id columns (not remapped: crosses hash these) and the normalized numerics or None."""
        self.build()
        lay = self.layout
        ids = tf.cast(ids, tf.int32)
        if len(lay.id_columns) != lay.n_ids_input:
            ids = tf.gather(ids, lay.id_columns, axis=1)
        values = None
        if self.normalizer is not None:
            if numeric is None:
                raise ConfigError(
                    f"This model reads normalized numerics {list(lay.numeric_names)}: pass `numeric` "
                    f"(float32 [B, {lay.n_numeric_input}]), got None."
                )
            numeric = tf.cast(numeric, tf.float32)
            if lay.n_numeric_fields != lay.n_numeric_input:
                numeric = tf.gather(numeric, lay.numeric_columns, axis=1)
            values = self.normalizer(numeric, training=training)
        return ids, values

    # -- context + candidates requests (issue 11) -----------------------------------------------------
    def context_split(self, context_id_inputs: Sequence[int], context_numeric_inputs: Sequence[int] = ()) -> ContextSplit:
        """Split the inputs: these columns of `ids` / `numeric` are the context, every other the candidate."""
        return ContextSplit.from_inputs(self.layout, context_id_inputs, context_numeric_inputs)

    def call_context(self, split: ContextSplit, context_ids, context_numeric, ids, numeric, row) -> tf.Tensor:
        """Logits `[M]` of M candidates, each scored with context row `row[m]`, serving mode only.

        context_ids / context_numeric: `[R, ...]` the context's columns (`split.context.id_inputs`,
        `.numeric_inputs`); ids / numeric: `[M, ...]` the candidates' columns; row: int `[M]` in
        `[0, R)`. Equals `__call__` on the rows joined column-wise (float32 rounding aside), but every
        term that involves only context fields is computed once per context row, then gathered.
        """
        self.build()
        with self._packed_scope():
            return self._call_context(split, context_ids, context_numeric, ids, numeric, row)

    def _call_context(self, split, context_ids, context_numeric, ids, numeric, row) -> tf.Tensor:
        c_raw, c_vals = self._side_inputs(split.context, context_ids, context_numeric, remap=False)
        k_raw, k_vals = self._side_inputs(split.candidate, ids, numeric, remap=False)
        c_ids, k_ids = self.remap_ids(c_raw, split.context.id_fields), self.remap_ids(k_raw, split.candidate.id_fields)
        packed = self.packed_rows is not None and self.packed_terms  # the terms below carry the linear sums
        parts = self.context_terms(split, c_ids, c_vals)
        if packed:
            parts["logit"] = parts.get("logit", 0.0) + self.linear.bias
        else:
            parts["logit"] = parts.get("logit", 0.0) + self.linear.side(c_ids, c_vals, split.context) + self.linear.bias
        row = tf.cast(row, tf.int32)
        if self.pair_cross is not None:
            both_context = self.pair_cross.context_logit(split, c_raw, c_vals)
            if both_context is not None:
                parts["logit"] += both_context
        gathered = {name: tf.gather(value, row) for name, value in parts.items()}
        logit = gathered.pop("logit")
        if not packed:
            logit += self.linear.side(k_ids, k_vals, split.candidate)
        if self.pair_cross is not None:
            with_candidate = self.pair_cross.candidate_logit(split, c_raw, c_vals, k_raw, k_vals, row)
            if with_candidate is not None:
                logit += with_candidate
        return logit + self.candidate_terms(split, gathered, k_ids, k_vals)

    def context_terms(self, split: ContextSplit, ids: tf.Tensor, values: tf.Tensor | None) -> dict[str, tf.Tensor]:
        """Per context row `[R, ...]`: what the candidates reuse; "logit" `[R]` adds to every candidate's logit."""
        return {}

    def candidate_terms(self, split: ContextSplit, context: dict[str, tf.Tensor], ids: tf.Tensor,
                        values: tf.Tensor | None) -> tf.Tensor:
        """Per candidate `[M]`: the rest of the logit beyond the linear terms, given `context_terms`
        gathered per candidate (without "logit")."""
        return tf.zeros([tf.shape(ids)[0]])

    def _side_inputs(self, side: ContextSide, ids, numeric, *, remap: bool = True) -> tuple[tf.Tensor, tf.Tensor | None]:
        """A side's raw columns -> (its active id fields' ids, remapped unless `remap` is False; its normalized
        numerics' values or None)."""
        ids = tf.cast(ids, tf.int32)
        if side.id_positions != tuple(range(len(side.id_inputs))):
            ids = take(ids, side.id_positions, axis=1)
        if remap:
            ids = self.remap_ids(ids, side.id_fields)
        values = None
        if side.numeric_fields:
            numeric = take(tf.cast(numeric, tf.float32), side.numeric_positions, axis=1)
            values = self.normalizer.columns(numeric, side.numeric_fields)
        return ids, values

    # -- rare ids (ModelConfig.min_count) ------------------------------------------------------------
    id_remap: tf.Variable | None = None

    def remap_ids(self, ids: tf.Tensor, fields: Sequence[int]) -> tf.Tensor:
        """`[B, len(fields)]` local ids of active id fields `fields` -> the same with every rare id replaced by
        its field's shared row (identity without `min_count`)."""
        if self.id_remap is None or not len(fields):
            return ids
        offsets = [self.layout.offsets[f] for f in fields]
        # embedding_lookup, not gather: it also reads a remap sharded over parameter servers (distributed runs)
        if self.id_remap.dtype == tf.int64:
            return tf.cast(tf.nn.embedding_lookup(self.id_remap, tf.cast(ids, tf.int64) + tf.constant(offsets, tf.int64)), tf.int32)
        return tf.nn.embedding_lookup(self.id_remap, ids + tf.constant(offsets, tf.int32))

    def bake_id_remap(self) -> None:
        """Copy every rare id's shared row into its own rows of every field table, then drop the remap.

        For exports: the model then scores exactly as with the remap (a rare id reads a copy of the row it
        was mapped to) without the remap's extra gather per field per call (+18% of a DeepFM forward pass)
        or its 4 bytes per table row. Training state must keep the remap (warm starts merge it).
        """
        if self.id_remap is None:
            return
        import numpy as np

        lay = self.layout
        remap = tf.convert_to_tensor(self.id_remap).numpy().astype(np.int64)
        starts = np.cumsum((0,) + tuple(lay.id_buckets))
        for module in self.submodules:
            if not isinstance(module, FieldTables) or not module.tables or module.layout is not lay:
                continue  # (a cross table is indexed by hashed pairs of raw ids: nothing to remap)
            if module.table_mode == "shared":
                source = np.arange(lay.shared_rows, dtype=np.int64)
                for f in range(lay.n_id_fields):
                    source[lay.offsets[f]:lay.offsets[f] + lay.id_buckets[f]] = remap[starts[f]:starts[f + 1]] + lay.offsets[f]
                module.tables[0].assign(tf.gather(module.tables[0], source))
            else:
                for f in range(lay.n_id_fields):
                    table = module.tables[f]
                    table.assign(tf.gather(table, remap[starts[f]:starts[f + 1]]))
        del self.id_remap  # (not `= None`: the module would keep tracking the variable, and exports would save it)

    # -- packed serving tables (exports) ----------------------------------------------------------------
    packed_rows: PackedRows | None = None
    # True for a kind whose call / context_terms / candidate_terms read the packed rows whole once packed
    # (`FieldEmbedding.packed`, `packed_fm`), the linear sums included; the others read sliced columns.
    packed_terms: ClassVar[bool] = False

    def can_pack_tables(self) -> bool:
        """Whether this model has an embedding and a linear table of the same rows (every kind but LR)."""
        lin, emb = getattr(self, "linear", None), getattr(self, "embedding", None)
        if not isinstance(lin, SparseLinear) or not isinstance(emb, FieldEmbedding):
            return False
        a, b = emb.table, lin.table
        return (a.layout is b.layout and a.table_mode == b.table_mode and len(a.tables) == len(b.tables) > 0
                and all(e.shape[0] == w.shape[0] and e.dtype == w.dtype for e, w in zip(a.tables, b.tables)))

    def pack_tables(self) -> bool:
        """For exports: replace the embedding and linear tables by one `[rows, dim + 1]` table each (the
        linear weight as the last column, `PackedRows`), so serving gathers each id once instead of twice.
        Scores are unchanged: the same floats are read, bitwise for the kinds that slice the packed rows,
        within float32 rounding for FM (`packed_terms`: it sums the rows in another order). Returns False
        (and changes nothing) where the model has no such pair of tables (LR) or they are packed already.
        Call after `bake_id_remap` and any float16 slimming; the model is a serving model afterwards: it
        refuses training (`variable_groups`, `__call__(training=True)` raise TrainingError).

        Memory: tables are packed one at a time, each old pair freed before the next is made, so the
        extra peak is bounded by the largest table (its copy, plus the concat's while it is made); in
        "shared" mode that one table is the whole set (measured: +269 MB for 252 MB of shared tables;
        per field, 8 tables of 32 MB: +77 MB, was +243 MB), provided nothing else holds the old variables.
        """
        self.build()
        if self.packed_rows is not None or not self.can_pack_tables():
            return False
        emb, lin = self.embedding.table, self.linear.table
        from tensorflow.python.distribute.sharded_variable import ShardedVariableMixin  # (as train/distributed.py)

        sharded = [t.name for t in emb.tables + lin.tables if isinstance(t, ShardedVariableMixin)]
        if sharded:  # the concat would silently gather every shard into one local variable
            raise ConfigError(f"pack_tables does not take row-sharded tables (ShardedVariable: {', '.join(sharded)}); "
                              "export from a model built without a variable partitioner.")
        packed = PackedRows([], emb.dim)
        # Plain lists, and the modules' tracked lists dropped: a tracked list keeps a snapshot of its items
        old_emb, old_lin = list(emb.tables), list(lin.tables)
        emb.tables, lin.tables = [], []
        for i in range(len(old_emb)):
            e, w = old_emb[i], old_lin[i]
            old_emb[i] = old_lin[i] = None
            packed.tables.append(tf.Variable(tf.concat([e, w], axis=1), name=e.name.split(":")[0] + "_with_linear",
                                             trainable=False))
            del e, w  # the old pair is freed here, before the next table's copy is made
        for module in (emb, lin):
            module.tables = list(packed.tables)
            module.packed = packed
        self.packed_rows = packed
        return True

    def _refuse_training_if_packed(self) -> None:
        """A packed model shares one non-trainable variable between its embedding and linear tables: an
        optimizer would get it in both groups (and no gradient), so training one must fail loudly."""
        if self.packed_rows is not None:
            raise TrainingError("this model's tables are packed for serving (CtrModel.pack_tables): it cannot be "
                                "trained; train from the run's checkpoint (it keeps the two tables) instead.")

    def _packed_scope(self):
        return self.packed_rows.scope() if self.packed_rows is not None else contextlib.nullcontext()

    def set_id_counts(self, counts: Sequence["np.ndarray"], *, keep: bool = False) -> dict[str, dict[str, int]]:
        """Set the rare-id remap from `counts` (one array per column of `Batch.ids`: how often each bucket
        occurs in the training data); `keep`: merge with the current remap (a warm start: rows that had their
        own row keep it, see `rare_id_remap`). Returns per active field how many seen buckets are rare."""
        import numpy as np

        self.build()
        if self.id_remap is None:
            return {}
        current = tf.convert_to_tensor(self.id_remap).numpy() if keep else None
        parts, stats = [], {}
        for f, col in enumerate(self.layout.id_columns):
            start, rows = self.layout.offsets[f], self.layout.id_buckets[f]
            local, stats[self.layout.id_names[f]] = rare_id_remap(
                np.asarray(counts[col]), self.config.min_count, None if current is None else current[start:start + rows])
            parts.append(local)
        self.id_remap.assign(np.concatenate(parts).astype(self.id_remap.dtype.as_numpy_dtype))
        return stats

    # -- introspection ------------------------------------------------------------------------------
    @property
    def input_signature(self) -> tuple[tf.TensorSpec, tf.TensorSpec]:
        """`(ids, numeric)` specs for a serving concrete function: int32 `[None, F]`, float32 `[None, N]`."""
        return (
            tf.TensorSpec([None, self.layout.n_ids_input], tf.int32, name="ids"),
            tf.TensorSpec([None, self.layout.n_numeric_input], tf.float32, name="numeric"),
        )

    def variable_groups(self) -> dict[str, list[tf.Variable]]:
        """Trainable variables by optimizer group; every trainable variable is in exactly one group.

        "linear": `[rows, 1]` linear tables; "embedding": `[rows, dim]` embedding tables (both get
        `tf.IndexedSlices` gradients); "dense": everything else (biases, MLP, batch norm scale/offset).
        """
        self.build()
        self._refuse_training_if_packed()
        groups: dict[str, list[tf.Variable]] = {g: [] for g in VARIABLE_GROUPS}
        sparse = set()
        for module in (m for m in self.submodules if isinstance(m, FieldTables)):
            groups[module.group].extend(module.tables)
            sparse.update(v.ref() for v in module.tables)
        groups["dense"] = [v for v in self.trainable_variables if v.ref() not in sparse]
        return groups

    def non_trainable_state(self) -> list[tf.Variable]:
        """Variables updated in training mode but not by the optimizer: normalization statistics and
        batch-norm moving averages. They belong in checkpoints and exports, never in optimizer groups."""
        self.build()
        return [v for v in self.variables if not v.trainable]
