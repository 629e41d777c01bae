"""Sparse-aware optimizers: a step updates only the table rows its batch touched, not the whole table.

SGD, Adagrad, FTRL-Proximal and LazyAdam work row by row; Adam is the dense reference that moves every row.

Behaviour
---------
`apply_gradients([(grad, variable), ...])` takes, per variable, either a `tf.IndexedSlices` (what
`tf.gather` / an embedding lookup gives: a few rows of a big table) or a dense `tf.Tensor`. Sparse
gradients are deduplicated first: rows that appear several times in a batch get the *sum* of their
gradients, then one update each. Rows absent from the batch are left bit-for-bit unchanged (their
optimizer state too), so a step costs O(rows touched), whatever the table size. Dense gradients update
every element. `Adam` is the exception on purpose: it sums a sparse gradient into a dense one and moves
every row, as textbook Adam does, which makes it the reference `LazyAdam` is measured against.

Every optimizer counts its steps in `iterations` (int64, +1 per `apply_gradients`) and keeps its state
("slots") in `optimizer.slots[variable_key][slot_name]`, where `variable_key` is the variable's name
without ":0". All of it hangs off the optimizer object, so `tf.train.Checkpoint(model=..., optimizer=...)`
saves and restores it, and exporting the model alone leaves it out. Works eagerly and inside
`tf.function` (slots are made on the first call / first trace).

Recommended use
---------------
`SparseFtrl` (with `l1`) for logistic regression weights, `SparseAdagrad` or `LazyAdam` for embeddings,
and `OptimizerGroups` to give each its own optimizer and learning rate. Keras optimizers turn a sparse
gradient into a dense one: on a 1M-row table several times slower per step, and the gap grows with the
table (benchmarks/bench_optimizers.py).

Example
-------
>>> table = tf.Variable(tf.zeros([1000, 8]), name="embedding")
>>> optimizer = make_optimizer("lazyadam", learning_rate=0.01)
>>> with tf.GradientTape() as tape:
...     loss = tf.reduce_sum(tf.gather(table, [3, 5, 3]))
>>> optimizer.apply_gradients([(tape.gradient(loss, table), table)])   # rows 3 and 5 move, no other

Implementation details follow. A subclass overrides two hooks: `_slot_initial_values` (which slots,
filled with what) and `_update_rows` (the math for a block of rows). The base class deduplicates
(`tf.unique`, then a sparse 0/1 matrix product to sum each row's gradients: 2-3x faster on CPU than
`tf.math.unsorted_segment_sum`, and the largest cost of a sparse step), gathers the touched rows of the
variable and of each slot, calls `_update_rows`, and scatters the results back. On a 1M x 16 table that
measured 1.4x (FTRL) to 2.6x (Adagrad) faster than the fused `ResourceSparseApply*` kernels
(benchmarks/bench_optimizers.py --compare-kernels), and the same ops exist on `ShardedVariable`. Dense
`Adam` uses the fused `ResourceApplyAdam` kernel, ~3x faster than the same math as separate ops.
"""
from __future__ import annotations

import contextlib
import fnmatch
import inspect
import math
import numbers
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Union

import tensorflow as tf

from ctrflow.errors import ConfigError, TrainingError
from ctrflow.train.optimizer_settings import L2_MODES, OPTIMIZER_NAMES, check_optimizer_settings, normalize_optimizer_name

__all__ = [
    "SparseOptimizer",
    "SparseSGD",
    "SparseAdagrad",
    "SparseFtrl",
    "Adam",
    "LazyAdam",
    "OptimizerGroups",
    "make_optimizer",
    "optimizer_names",
]

LAST_STEP = "last_step"  # the per-row slot of l2_mode="every_step": the step each row was last updated

# A float, or a callable taking the step (the int64 `iterations` before this update) and returning the
# rate, such as a `keras.optimizers.schedules.LearningRateSchedule`.
LearningRate = Union[float, Callable[[tf.Tensor], Any]]
Gradient = Union[tf.Tensor, tf.IndexedSlices]


class SparseOptimizer(tf.Module):
    """Base class: validates settings, makes slots, deduplicates sparse gradients, applies updates.

    Subclasses override `_slot_initial_values` and `_update_rows`; the base class does the rest.

    Args:
        learning_rate: step size, > 0; or a callable schedule of the step (the step counts from 0).
        l2: L2 penalty `l2 * sum(w**2)` added to the loss, >= 0 (default 0, off). With a sparse gradient
            it acts on the touched rows only, as part of their update (gradient `+ 2 * l2 * w`); with a
            dense gradient, and always in dense `Adam`, on every row.
        l2_mode: how the penalty reaches rows a sparse gradient skips. "touched" (default): only a
            touched row is penalized, once per step it is in, so a row's total penalty grows with its
            frequency and a rare id is barely regularized. "every_step": the penalty acts on every row
            at every step, as in the loss's definition, but lazily: a per-row slot `last_step` keeps the
            step a row was last updated, and when it is touched again the L2 gradient is multiplied by
            the steps since (`+ 2 * l2 * w * (step - last_step)`), so each row carries the penalty of
            every step it missed (what scikit-learn's uniform L2 does) and a step still costs O(rows
            touched). For SGD the missed steps are applied exactly, as the decays they would have been
            (`w *= (1 - 2 * lr * l2) ** missed` before the update). FTRL solves L2 in closed form over
            the whole history, so it ignores `l2_mode`.
    """

    kind: ClassVar[str] = ""  # the name `make_optimizer` knows this class by
    # True for optimizers that move every row (Adam): sparse gradients are summed into a dense one.
    dense_only: ClassVar[bool] = False

    def __init__(self, learning_rate: LearningRate, *, l2: float = 0.0, l2_mode: str = "touched") -> None:
        super().__init__()
        self.learning_rate = _check_learning_rate(type(self).__name__, learning_rate)
        self.l2 = self._check("l2", l2, ">= 0")
        if l2_mode not in L2_MODES:
            raise ConfigError(f"The 'l2_mode' parameter of {type(self).__name__} must be one of {', '.join(L2_MODES)}. "
                              f"Got {l2_mode!r} instead.")
        self.l2_mode = l2_mode
        with self.name_scope:
            self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")
        self.slots: dict[str, dict[str, tf.Variable]] = {}
        # key -> weak reference to the variable the slots were built for (not checkpointed).
        self._built: dict[str, weakref.ref] = {}

    # ---- life cycle ---------------------------------------------------------------------------------

    def build(self, var_list: Iterable[tf.Variable]) -> None:
        """Make the slots of every variable in `var_list` not built yet. Called by `apply_gradients`.

        Raises:
            ConfigError: two different variables share a name (slots are keyed by name, so that a
                checkpoint restores into a freshly built model).
        """
        for var in var_list:
            key = _variable_key(var)
            built = self._built.get(key)
            if built is not None:
                if built() is not var:
                    raise ConfigError(
                        f"Two variables are named {key!r}; {type(self).__name__} keys its slots by "
                        f"variable name. Give each variable a unique name= when creating it."
                    )
                continue
            self.slots[key] = {
                slot_name: self._create_slot(var, slot_name, fill)
                for slot_name, fill in self._slot_initial_values().items()
            }
            if self._catches_up() and var.shape.rank:
                self.slots[key][LAST_STEP] = self._create_slot(var, LAST_STEP, 0, shape=var.shape[:1], dtype=tf.int64)
            self._built[key] = weakref.ref(var)

    def slot_bytes(self, rows: int, width: int) -> int:
        """Bytes of the slots `build` makes for a float32 `[rows, width]` table: each slot shaped like it, plus
        the int64 `last_step` per row that l2_mode="every_step" keeps (`ctrflow.train.memory` counts them first)."""
        return len(self._slot_initial_values()) * rows * width * 4 + (rows * 8 if self._catches_up() else 0)

    def apply_gradients(self, grads_and_vars: Iterable[tuple[Gradient | None, tf.Variable]]) -> None:
        """Apply one step: update each variable from its gradient, then add 1 to `iterations`.

        Pairs whose gradient is None are skipped (the loss does not depend on that variable).

        Raises:
            TrainingError: every gradient is None.
        """
        pairs = [(grad, var) for grad, var in grads_and_vars if grad is not None]
        if not pairs:
            raise TrainingError(
                "No gradient to apply: every gradient is None, so the loss does not depend on any of "
                "the variables given. Compute the loss from them inside the tf.GradientTape."
            )
        self._apply(pairs)

    def current_learning_rate(self) -> tf.Tensor:
        """The learning rate the next step will use (float32 scalar)."""
        if callable(self.learning_rate):
            return tf.cast(self.learning_rate(self.iterations), tf.float32)
        return tf.constant(self.learning_rate, tf.float32)

    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments; `type(self).from_config(config)` makes an equal optimizer.

        A learning-rate schedule is kept as the object itself (the config is JSON-ready with a float).
        """
        return {"learning_rate": self.learning_rate, "l2": self.l2, "l2_mode": self.l2_mode}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SparseOptimizer:
        """Make an optimizer from `get_config()`'s output; unknown keys raise `ConfigError`."""
        accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        unknown = sorted(set(config) - set(accepted))
        if unknown:
            raise ConfigError(
                f"{cls.__name__} has no parameter {', '.join(map(repr, unknown))}. "
                f"Its parameters are: {', '.join(accepted)}."
            )
        return cls(**config)

    # ---- hooks for subclasses -----------------------------------------------------------------------

    def _slot_initial_values(self) -> dict[str, float]:
        """Slot name -> the constant that slot starts filled with; each slot is shaped like the variable."""
        return {}

    def _update_rows(
        self,
        rows: tf.Tensor,
        grad: tf.Tensor,
        slot_rows: Mapping[str, tf.Tensor],
        *,
        lr: tf.Tensor,
        step: tf.Tensor,
    ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """Return the new rows and new slot rows for a block of rows.

        `rows`, `grad` and each of `slot_rows` have the same shape: some rows of the variable (sparse
        path) or all of it (dense path), with `grad` already summed over duplicates and L2-regularized.
        `lr` is the learning rate and `step` the 1-based step number, scalars of the variable's dtype.
        """
        raise NotImplementedError

    # ---- implementation details ---------------------------------------------------------------------

    def adopt(self, var: tf.Variable) -> None:
        """`var` was assigned from outside (ctrflow.train.refit): make its slots agree, so the next update moves
        from its new value. SGD, Adagrad and the Adams step the weight itself: nothing to do."""

    def _catches_up(self) -> bool:
        """Whether rows keep a `last_step` slot: L2 on every row at every step, applied when touched."""
        return bool(self.l2) and self.l2_mode == "every_step" and not self.dense_only and self._l2_in_gradient

    _l2_in_gradient: ClassVar[bool] = True  # False where L2 is solved in closed form (FTRL)

    def _create_slot(self, var: tf.Variable, slot_name: str, fill: float, *, shape: Any = None,
                     dtype: Any = None) -> tf.Variable:
        """The one place slots are made: `var`'s shape and dtype (unless given), under `var`'s distribution strategy.

        Under ParameterServerStrategy, creating the slot inside the strategy's scope gives it the same
        partitioner, hence the same sharding as a same-shaped table; adapt this method if that changes.
        """
        strategy = getattr(var, "_distribute_strategy", None)
        in_scope = strategy is None or tf.distribute.get_strategy() is strategy
        with tf.init_scope(), (contextlib.nullcontext() if in_scope else strategy.scope()), self.name_scope:
            return tf.Variable(
                lambda: tf.fill(var.shape if shape is None else shape, tf.constant(fill, dtype or var.dtype)),
                trainable=False,
                name=f"{_variable_key(var)}/{slot_name}",
            )

    def _apply(self, pairs: list[tuple[Gradient, tf.Variable]]) -> None:
        """`apply_gradients` without the None filter; an empty `pairs` only advances `iterations`."""
        self.build([var for _, var in pairs])
        lr = self.current_learning_rate()
        step = tf.cast(self.iterations + 1, tf.float32)
        for grad, var in pairs:
            slots = self.slots[_variable_key(var)]
            var_lr, var_step = tf.cast(lr, var.dtype), tf.cast(step, var.dtype)
            if isinstance(grad, tf.IndexedSlices):
                indices = grad.indices
                if indices.dtype == tf.int64 and var.shape[0] is not None and var.shape[0] < 2**31:
                    indices = tf.cast(indices, tf.int32)  # tf.unique is ~1.5x faster on int32
                if self.dense_only:
                    dense = _sum_rows(grad.values, indices, var.shape[0])
                    self._dense_update(var, dense, slots, lr=var_lr, step=var_step)
                else:
                    indices, positions = tf.unique(indices)
                    values = _sum_rows(grad.values, positions, tf.shape(indices)[0])
                    self._sparse_update(var, values, indices, slots, lr=var_lr, step=var_step)
            else:
                grad = tf.convert_to_tensor(grad, dtype=var.dtype)
                self._dense_update(var, grad, slots, lr=var_lr, step=var_step)
        self.iterations.assign_add(1)

    def _sparse_update(
        self,
        var: tf.Variable,
        grad_values: tf.Tensor,
        indices: tf.Tensor,
        slots: Mapping[str, tf.Variable],
        *,
        lr: tf.Tensor,
        step: tf.Tensor,
    ) -> None:
        """Update the rows `indices` (unique) of `var` and of its slots; leave every other row alone."""
        # embedding_lookup, not tf.gather: on a ShardedVariable it reads each shard's rows where they live
        # instead of concatenating the whole table first; on a plain variable it is a gather.
        rows = tf.nn.embedding_lookup(var, indices)
        slot_rows = {name: tf.nn.embedding_lookup(slot, indices) for name, slot in slots.items() if name != LAST_STEP}
        if LAST_STEP in slots:
            # Steps since the row's last update (last_step 0: never updated, so every step so far).
            now = tf.cast(step, tf.int64)
            since = now - tf.nn.embedding_lookup(slots[LAST_STEP], indices)
            since = tf.reshape(tf.cast(since, rows.dtype), tf.concat([tf.shape(since), tf.ones([rows.shape.rank - 1], tf.int32)], 0))
            rows, grad_values = self._catch_up(rows, grad_values, since, lr=lr)
            slots[LAST_STEP].scatter_update(tf.IndexedSlices(tf.fill(tf.shape(indices), now), indices))
        else:
            grad_values = self._regularized(grad_values, rows)
        new_rows, new_slot_rows = self._update_rows(rows, grad_values, slot_rows, lr=lr, step=step)
        for name, value in new_slot_rows.items():
            slots[name].scatter_update(tf.IndexedSlices(value, indices))
        var.scatter_update(tf.IndexedSlices(new_rows, indices))

    def _catch_up(self, rows: tf.Tensor, grad: tf.Tensor, since: tf.Tensor, *, lr: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(rows, gradient) of touched rows with the L2 of the `since` steps since their last update
        (`since` is 1 for a row updated at the previous step). Default: the L2 gradient times `since`."""
        return rows, grad + tf.cast(2.0 * self.l2, grad.dtype) * rows * since

    def _dense_update(
        self,
        var: tf.Variable,
        grad: tf.Tensor,
        slots: Mapping[str, tf.Variable],
        *,
        lr: tf.Tensor,
        step: tf.Tensor,
    ) -> None:
        """Update every element of `var` and of its slots."""
        rows = tf.convert_to_tensor(var)
        slot_rows = {name: tf.convert_to_tensor(slot) for name, slot in slots.items() if name != LAST_STEP}
        new_rows, new_slot_rows = self._update_rows(
            rows, self._regularized(grad, rows), slot_rows, lr=lr, step=step
        )
        for name, value in new_slot_rows.items():
            slots[name].assign(value)
        if LAST_STEP in slots:  # every row was updated now
            slots[LAST_STEP].assign(tf.fill(tf.shape(slots[LAST_STEP]), tf.cast(step, tf.int64)))
        var.assign(new_rows)

    def _regularized(self, grad: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
        """`grad` plus the gradient of the L2 penalty `l2 * sum(rows**2)`."""
        if not self.l2:
            return grad
        return grad + tf.cast(2.0 * self.l2, grad.dtype) * rows

    def _check(self, name: str, value: Any, condition: str) -> float:
        return _check_number(type(self).__name__, name, value, condition)


class SparseSGD(SparseOptimizer):
    """Plain gradient descent on the touched rows: `w -= lr * g`.

    >>> optimizer = SparseSGD(learning_rate=0.1)

    Args:
        learning_rate: step size (default 0.01), > 0, or a callable schedule of the step.
        l2: L2 penalty on touched rows (default 0), >= 0.
        l2_mode: "touched" (default) or "every_step" (see `SparseOptimizer`).
    """

    kind = "sgd"

    def __init__(self, learning_rate: LearningRate = 0.01, *, l2: float = 0.0, l2_mode: str = "touched") -> None:
        super().__init__(learning_rate, l2=l2, l2_mode=l2_mode)

    def _catch_up(self, rows, grad, since, *, lr):
        # Under SGD an untouched row's step is the decay w *= 1 - 2 lr l2: apply the missed ones exactly.
        l2x2 = tf.cast(2.0 * self.l2, rows.dtype)
        rows = rows * tf.pow(1 - lr * l2x2, since - 1)
        return rows, grad + l2x2 * rows

    def _update_rows(self, rows, grad, slot_rows, *, lr, step):
        return rows - lr * grad, {}


class SparseAdagrad(SparseOptimizer):
    """Adagrad (Duchi et al. 2011) on the touched rows: `n += g**2; w -= lr * g / (sqrt(n) + epsilon)`.

    Each coordinate's step shrinks with the gradients it has seen, so frequent ids settle while rare
    ids keep learning: the usual choice for CTR embeddings.

    >>> optimizer = SparseAdagrad(learning_rate=0.05)

    Args:
        learning_rate: step size (default 0.01), > 0, or a callable schedule of the step.
        initial_accumulator_value: starting value of the accumulator `n` (default 0.1), >= 0.
        epsilon: added to `sqrt(n)` for stability (default 1e-7), > 0.
        l2: L2 penalty on touched rows (default 0), >= 0.
        l2_mode: "touched" (default) or "every_step" (see `SparseOptimizer`).
    """

    kind = "adagrad"

    def __init__(
        self,
        learning_rate: LearningRate = 0.01,
        *,
        initial_accumulator_value: float = 0.1,
        epsilon: float = 1e-7,
        l2: float = 0.0,
        l2_mode: str = "touched",
    ) -> None:
        super().__init__(learning_rate, l2=l2, l2_mode=l2_mode)
        self.initial_accumulator_value = self._check(
            "initial_accumulator_value", initial_accumulator_value, ">= 0"
        )
        self.epsilon = self._check("epsilon", epsilon, "> 0")

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "initial_accumulator_value": self.initial_accumulator_value,
            "epsilon": self.epsilon,
        }

    def _slot_initial_values(self) -> dict[str, float]:
        return {"accumulator": self.initial_accumulator_value}

    def _update_rows(self, rows, grad, slot_rows, *, lr, step):
        accumulator = slot_rows["accumulator"] + tf.square(grad)
        rows = rows - lr * grad / (tf.sqrt(accumulator) + tf.cast(self.epsilon, rows.dtype))
        return rows, {"accumulator": accumulator}


class SparseFtrl(SparseOptimizer):
    """FTRL-Proximal (McMahan et al. 2013, "Ad Click Prediction: a View from the Trenches").

    Per coordinate, with accumulator `n` and linear term `z`:

        sigma = (sqrt(n + g**2) - sqrt(n)) / lr
        z += g - sigma * w
        n += g**2
        w = 0                                                          if |z| <= l1
        w = -(z - sign(z) * l1) / ((beta + sqrt(n)) / lr + 2 * l2)     otherwise

    `l1` makes weights exactly zero (a sparse model); this is the paper's algorithm 1 with its
    lambda_1 = `l1` and lambda_2 = `2 * l2`, and TensorFlow's FTRL with `learning_rate_power=-0.5`.

    Starting values are kept: each weight is recomputed from `z` and `n`, so at a coordinate's first
    update (its accumulator still at `initial_accumulator_value`) `z` is first set to the value whose
    solution is the current weight, `z = -w * quadratic - sign(w) * l1`. An output bias started at the
    base rate, a warm-started or an initialized weight therefore moves from where it is, instead of
    being recomputed from a zero `z` (TensorFlow's FTRL forgets most of it at the first step).

    >>> optimizer = SparseFtrl(learning_rate=0.05, l1=1.0, l2=0.1)

    Args:
        learning_rate: the paper's alpha (default 0.05), > 0, or a callable schedule of the step.
        l1: L1 penalty `l1 * sum(|w|)`, >= 0 (default 0). Larger gives more exact zeros.
        l2: L2 penalty `l2 * sum(w**2)` on touched rows, >= 0 (default 0), solved in closed form.
        l2_mode: accepted for a uniform interface and ignored (the closed form covers every step).
        beta: the paper's beta (default 0), >= 0; smooths the first steps of rare coordinates.
        initial_accumulator_value: starting value of `n` (default 0.1), > 0.
    """

    kind = "ftrl"

    def __init__(
        self,
        learning_rate: LearningRate = 0.05,
        *,
        l1: float = 0.0,
        l2: float = 0.0,
        l2_mode: str = "touched",
        beta: float = 0.0,
        initial_accumulator_value: float = 0.1,
    ) -> None:
        super().__init__(learning_rate, l2=l2, l2_mode=l2_mode)
        self.l1 = self._check("l1", l1, ">= 0")
        self.beta = self._check("beta", beta, ">= 0")
        # n = 0 would make sigma divide by zero for a zero gradient.
        self.initial_accumulator_value = self._check(
            "initial_accumulator_value", initial_accumulator_value, "> 0"
        )

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "l1": self.l1,
            "beta": self.beta,
            "initial_accumulator_value": self.initial_accumulator_value,
        }

    def _slot_initial_values(self) -> dict[str, float]:
        return {"accumulator": self.initial_accumulator_value, "linear": 0.0}

    _l2_in_gradient = False  # l2 enters the closed-form solution below, over the whole history: no catch-up

    def _regularized(self, grad, rows):
        return grad  # l2 enters the closed-form solution below, not the gradient

    def adopt(self, var: tf.Variable) -> None:
        """Set `z` of every row to the value whose solution is its current weight (the class docstring's
        `z = -w * quadratic - sign(w) * l1`, at the next step's rate): FTRL recomputes a weight from `z` at
        each update, which would otherwise undo an assigned weight on its row's next update."""
        slots = self.slots.get(_variable_key(var))
        if not slots:
            return
        w = tf.convert_to_tensor(var)
        dtype = w.dtype
        lr = tf.cast(self.current_learning_rate(), dtype)
        quadratic = (tf.cast(self.beta, dtype) + tf.sqrt(tf.convert_to_tensor(slots["accumulator"]))) / lr \
            + tf.cast(2.0 * self.l2, dtype)
        slots["linear"].assign(-w * quadratic - tf.sign(w) * tf.cast(self.l1, dtype))

    def _update_rows(self, rows, grad, slot_rows, *, lr, step):
        dtype = rows.dtype
        accumulator = slot_rows["accumulator"]
        l1 = tf.cast(self.l1, dtype)
        beta, l2x2 = tf.cast(self.beta, dtype), tf.cast(2.0 * self.l2, dtype)
        # A coordinate not updated yet: the z whose solution is its current weight (see the class docstring).
        fresh = tf.equal(accumulator, tf.cast(self.initial_accumulator_value, dtype))
        start_z = -rows * ((beta + tf.sqrt(accumulator)) / lr + l2x2) - tf.sign(rows) * l1
        linear = tf.where(fresh, start_z, slot_rows["linear"])
        new_accumulator = accumulator + tf.square(grad)
        sqrt_new = tf.sqrt(new_accumulator)
        linear = linear + grad - (sqrt_new - tf.sqrt(accumulator)) / lr * rows
        quadratic = (beta + sqrt_new) / lr + l2x2
        solution = (tf.sign(linear) * l1 - linear) / quadratic
        rows = tf.where(tf.abs(linear) > l1, solution, tf.zeros_like(rows))
        return rows, {"accumulator": new_accumulator, "linear": linear}


class Adam(SparseOptimizer):
    """Dense Adam (Kingma & Ba 2015): every row moves every step, touched or not.

    With `t` the 1-based step:

        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g**2
        w -= lr * sqrt(1 - beta_2**t) / (1 - beta_1**t) * m / (sqrt(v) + epsilon)

    (the paper's "efficient" form with epsilon after the bias correction, as in TensorFlow and Keras).
    A sparse gradient is summed into a dense one, so untouched rows get g = 0 and still move while their
    moments are nonzero. This is the reference; for big tables use `LazyAdam`.

    >>> optimizer = Adam(learning_rate=0.001)

    Args:
        learning_rate: step size (default 0.001), > 0, or a callable schedule of the step.
        beta_1: decay of the first moment (default 0.9), in [0, 1).
        beta_2: decay of the second moment (default 0.999), in [0, 1).
        epsilon: added to `sqrt(v)` for stability (default 1e-7), > 0.
        l2: L2 penalty (default 0), >= 0; Adam applies it to every row.
        l2_mode: accepted for a uniform interface; dense Adam penalizes every row at every step anyway.
    """

    kind = "adam"
    dense_only = True

    def __init__(
        self,
        learning_rate: LearningRate = 0.001,
        *,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        l2: float = 0.0,
        l2_mode: str = "touched",
    ) -> None:
        super().__init__(learning_rate, l2=l2, l2_mode=l2_mode)
        self.beta_1 = self._check("beta_1", beta_1, "in [0, 1)")
        self.beta_2 = self._check("beta_2", beta_2, "in [0, 1)")
        self.epsilon = self._check("epsilon", epsilon, "> 0")

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
        }

    def _slot_initial_values(self) -> dict[str, float]:
        return {"m": 0.0, "v": 0.0}

    def _update_rows(self, rows, grad, slot_rows, *, lr, step):
        dtype = rows.dtype
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        m = beta_1 * slot_rows["m"] + (1 - beta_1) * grad
        v = beta_2 * slot_rows["v"] + (1 - beta_2) * tf.square(grad)
        corrected_lr = lr * tf.sqrt(1 - tf.pow(beta_2, step)) / (1 - tf.pow(beta_1, step))
        rows = rows - corrected_lr * m / (tf.sqrt(v) + tf.cast(self.epsilon, dtype))
        return rows, {"m": m, "v": v}

    def _dense_update(self, var, grad, slots, *, lr, step):
        # The fused kernel is the same math as `_update_rows` in one pass over memory (~3x faster). It
        # needs resource handles, which a ShardedVariable (or a slot made sharded) does not have.
        if not all(hasattr(v, "handle") for v in (var, slots["m"], slots["v"])):
            return super()._dense_update(var, grad, slots, lr=lr, step=step)
        dtype = var.dtype
        if self.l2:
            grad = self._regularized(grad, tf.convert_to_tensor(var))
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=var.handle,
            m=slots["m"].handle,
            v=slots["v"].handle,
            beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step),
            lr=lr,
            beta1=beta_1,
            beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype),
            grad=grad,
        )
        if LAST_STEP in slots:  # every row was updated now
            slots[LAST_STEP].assign(tf.fill(tf.shape(slots[LAST_STEP]), tf.cast(step, tf.int64)))


class LazyAdam(Adam):
    """Adam on the touched rows only: their moments and weights update, every other row is left alone.

    The touched rows follow `Adam`'s formulas, bias correction included, with `t` the global step
    (`iterations + 1`), not a per-row count. A row seen every step therefore moves exactly as under
    `Adam`; a rare row keeps its moments while absent instead of decaying them. Dense gradients get
    plain Adam.

    >>> optimizer = LazyAdam(learning_rate=0.001)

    Args: as `Adam`; `l2` acts on the touched rows only, or (`l2_mode="every_step"`) on every row,
    caught up when it is next touched (see `SparseOptimizer`).
    """

    kind = "lazyadam"
    dense_only = False


class OptimizerGroups(tf.Module):
    """Route each variable to one of several optimizers: FTRL for linear weights, LazyAdam for embeddings...

    Every group keeps its own settings, learning rate, slots and `iterations`; one `apply_gradients`
    call steps every group once (a group with no variable in the call still counts the step).

    >>> groups = OptimizerGroups(
    ...     {"linear": SparseFtrl(learning_rate=0.05, l1=1.0), "embedding": LazyAdam(0.001)},
    ...     assign={"linear*": "linear", "*": "embedding"},   # first matching pattern wins
    ... )

    Args:
        optimizers: group name -> optimizer; at least one.
        assign: either a mapping from glob pattern (matched against the variable's name without ":0",
            `fnmatch` syntax, case-sensitive) to group name, tried in order with the first match winning;
            or a callable `variable -> group name`. Only the mapping form can be written as JSON.

    Raises:
        ConfigError: no optimizer, a value that is not a `SparseOptimizer`, one optimizer object in two
            groups, or an assignment to a group that does not exist. A variable that no pattern matches
            raises when it is first seen.
    """

    def __init__(
        self,
        optimizers: Mapping[str, SparseOptimizer],
        *,
        assign: Callable[[tf.Variable], str] | Mapping[str, str],
    ) -> None:
        super().__init__()
        if not optimizers:
            raise ConfigError(
                "The 'optimizers' parameter of OptimizerGroups must name at least one group. Got {} instead."
            )
        owner_of: dict[int, str] = {}
        for group, optimizer in optimizers.items():
            if not isinstance(optimizer, SparseOptimizer):
                raise ConfigError(
                    f"The optimizer of group {group!r} must be a SparseOptimizer (see make_optimizer). "
                    f"Got {optimizer!r} instead."
                )
            if id(optimizer) in owner_of:  # it would step twice per call
                raise ConfigError(
                    f"Groups {owner_of[id(optimizer)]!r} and {group!r} share one optimizer object; "
                    f"give each group its own (make_optimizer twice), or route both to one group."
                )
            owner_of[id(optimizer)] = group
        if isinstance(assign, Mapping):
            for pattern, group in assign.items():
                if group not in optimizers:
                    raise ConfigError(
                        f"Pattern {pattern!r} assigns to group {group!r}, which does not exist. "
                        f"Groups: {', '.join(optimizers)}."
                    )
            # A tuple of pairs: keeps pattern order and is not tracked as checkpoint state.
            self._patterns: tuple[tuple[str, str], ...] | None = tuple(assign.items())
            self._assign_fn = None
        elif callable(assign):
            self._patterns = None
            self._assign_fn = assign
        else:
            raise ConfigError(
                "The 'assign' parameter of OptimizerGroups must be a mapping of name pattern to group or "
                f"a callable variable -> group. Got {assign!r} instead."
            )
        self.optimizers: dict[str, SparseOptimizer] = dict(optimizers)

    @property
    def iterations(self) -> tf.Variable:
        """The step counter (every group's counter advances together; this is the first group's)."""
        return next(iter(self.optimizers.values())).iterations

    def group_of(self, var: tf.Variable) -> str:
        """The name of the group `var` is routed to."""
        if self._patterns is not None:
            name = _variable_key(var)
            for pattern, group in self._patterns:
                if fnmatch.fnmatchcase(name, pattern):
                    return group
            raise ConfigError(
                f"Variable {name!r} matches no pattern of OptimizerGroups "
                f"({', '.join(p for p, _ in self._patterns)}). Add a pattern for it, or '*' as a default."
            )
        group = self._assign_fn(var)
        if group not in self.optimizers:
            raise ConfigError(
                f"The assign callable routed variable {_variable_key(var)!r} to group {group!r}, which "
                f"does not exist. Groups: {', '.join(self.optimizers)}."
            )
        return group

    def adopt(self, var: tf.Variable) -> None:
        """`var` was assigned from outside: its group's optimizer makes its slots agree (`SparseOptimizer.adopt`)."""
        self.optimizers[self.group_of(var)].adopt(var)

    def build(self, var_list: Iterable[tf.Variable]) -> None:
        """Make the slots of each variable in its group's optimizer."""
        routed = self._route((None, var) for var in var_list)
        for group, optimizer in self.optimizers.items():
            optimizer.build([var for _, var in routed[group]])

    def apply_gradients(self, grads_and_vars: Iterable[tuple[Gradient | None, tf.Variable]]) -> None:
        """Apply one step: each pair goes to its group's optimizer; every group's `iterations` advances.

        Raises:
            TrainingError: every gradient is None.
        """
        pairs = [(grad, var) for grad, var in grads_and_vars if grad is not None]
        if not pairs:
            raise TrainingError(
                "No gradient to apply: every gradient is None, so the loss does not depend on any of "
                "the variables given. Compute the loss from them inside the tf.GradientTape."
            )
        routed = self._route(pairs)
        for group, optimizer in self.optimizers.items():
            optimizer._apply(routed[group])

    def get_config(self) -> dict[str, Any]:
        """`{"optimizers": {group: {"name": ..., "config": {...}}}, "assign": mapping or callable}`."""
        return {
            "optimizers": {
                group: {"name": optimizer.kind, "config": optimizer.get_config()}
                for group, optimizer in self.optimizers.items()
            },
            "assign": dict(self._patterns) if self._patterns is not None else self._assign_fn,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> OptimizerGroups:
        """Make groups from `get_config()`'s output."""
        optimizers = {
            group: make_optimizer(spec["name"], **spec["config"])
            for group, spec in config["optimizers"].items()
        }
        return cls(optimizers, assign=config["assign"])

    def _route(self, pairs):
        routed: dict[str, list] = {group: [] for group in self.optimizers}
        for grad, var in pairs:
            routed[self.group_of(var)].append((grad, var))
        return routed


_OPTIMIZERS: dict[str, type[SparseOptimizer]] = {
    cls.kind: cls for cls in (SparseSGD, SparseAdagrad, SparseFtrl, Adam, LazyAdam)
}
assert tuple(sorted(_OPTIMIZERS)) == OPTIMIZER_NAMES, "optimizer_settings.OPTIMIZER_NAMES must list every optimizer"


def optimizer_names() -> list[str]:
    """The names `make_optimizer` accepts, sorted (`optimizer_settings.OPTIMIZER_NAMES`, TensorFlow-free)."""
    return list(OPTIMIZER_NAMES)


def make_optimizer(name: str, **kwargs: Any) -> SparseOptimizer:
    """Make an optimizer by name: "sgd", "adagrad", "ftrl", "adam" or "lazyadam" (case, "_", "-" ignored).

    >>> make_optimizer("ftrl", learning_rate=0.05, l1=1.0)

    Raises:
        ConfigError: unknown name (the message lists the valid ones) or unknown / out-of-range setting.
    """
    cls = _OPTIMIZERS.get(normalize_optimizer_name(str(name)))
    if cls is None:
        check_optimizer_settings("make_optimizer", name, {})  # raises, suggesting the nearest name
    return cls.from_config(kwargs)


def _sum_rows(values: tf.Tensor, rows: tf.Tensor, num_rows: Any) -> tf.Tensor:
    """`out[r]` = the sum of the `values[i]` with `rows[i] == r`; shape `[num_rows, *values.shape[1:]]`.

    Equal to `tf.math.unsorted_segment_sum(values, rows, num_rows)`, computed as a sparse 0/1 matrix
    times `values`, which TensorFlow's CPU kernels run 2-3x faster (measured on 160k x 16 values).
    """
    count = tf.shape(rows, out_type=tf.int64)[0]
    num_rows = tf.cast(num_rows, tf.int64)
    summing = tf.SparseTensor(
        indices=tf.stack([tf.cast(rows, tf.int64), tf.range(count)], axis=1),
        values=tf.ones([count], values.dtype),
        dense_shape=tf.stack([num_rows, count]),
    )
    row_shape = tf.shape(values, out_type=tf.int64)[1:]
    flat = tf.reshape(values, tf.stack([count, tf.reduce_prod(row_shape)]))  # not -1: count may be 0
    summed = tf.sparse.sparse_dense_matmul(summing, flat)
    return tf.reshape(summed, tf.concat([[num_rows], row_shape], axis=0))


def _variable_key(var: tf.Variable) -> str:
    """The slot key of a variable: its name without the ":0" output suffix."""
    name = var.name
    return name[:-2] if name.endswith(":0") else name


_CONDITIONS: dict[str, Callable[[float], bool]] = {
    "> 0": lambda x: x > 0,
    ">= 0": lambda x: x >= 0,
    "in [0, 1)": lambda x: 0 <= x < 1,
}


def _check_number(owner: str, name: str, value: Any, condition: str) -> float:
    """`value` as a float if it is a finite real number meeting `condition`; else raise ConfigError."""
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and _CONDITIONS[condition](value)
    )
    if not ok:
        raise ConfigError(f"The {name!r} parameter of {owner} must be {condition}. Got {value!r} instead.")
    return float(value)


def _check_learning_rate(owner: str, value: Any) -> LearningRate:
    if callable(value):
        return value
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ConfigError(
            f"The 'learning_rate' parameter of {owner} must be a float > 0 or a callable schedule of the "
            f"step. Got {value!r} instead."
        )
    return _check_number(owner, "learning_rate", value, "> 0")
