"""Synthetic Criteo-shaped click logs drawn from a hidden ground-truth model (`ctrflow generate`).

Every row carries its true click probability (`true_ctr`), so the Bayes-optimal logloss of any slice
is known; with `days` > 1 the days are time-ordered and drift (fresh ids appear, effects move).

Recommended use: a quick, reproducible stand-in for real RTB logs in tests, benchmarks and demos.

    >>> from ctrflow.data.generate import GenerateOptions, generate
    >>> summary = generate("train.csv.gz", GenerateOptions(rows=1_000_000, seed=7, days=5))  # doctest: +SKIP
    >>> summary.mean_ctr, summary.bayes_logloss  # doctest: +SKIP
    (0.029813, 0.1021...)

The file has a header and the columns `SYNTHETIC_COLUMNS`: `day` (0..days-1, rows sorted by day,
equal rows per day ±1), `click` (0/1), `true_ctr` (6 significant digits), `I1..I13` (integer counts,
heavy-tailed, rarely negative, empty = missing), `C1..C26` (8 lowercase hex chars, empty = missing).
Same seed, same options (chunk size aside) → byte-identical file (with the same numpy build; another
CPU's exp/log could in principle move a last digit, an event far rarer than once per 10M rows).

The hidden model, as a model would have to learn it:
- categorical values are Zipf-distributed (exponent 1.1-1.3) over cardinalities from 3 to 2M;
- logit = bias_day + Σ_fields w(field, value) + Σ_pairs <v(f, a), v(g, b)> (FM-style, 8 field pairs,
  latent size 4) + nonlinear effects of log(1 + I) (saturating, threshold, bump, and one numeric × C17
  interaction) + effects of missingness; a handful of fields carry most of the signal;
- `bias_day` is calibrated (bisection on a fixed sample) so each day's mean CTR is ≈ 3%;
- drift: in the `drifts` fields, w and v for day d glide from one independent draw ("anchor") to the
  next over `DRIFT_PERIOD_DAYS`; in the `fresh_share` fields a share of rows take values from ids born
  on the last few days, so later days hold tokens day 0 never had.
Weights are never stored for large fields: they are a hash (splitmix64) of (seed, field, value id).
"""
from __future__ import annotations

import gzip
import hashlib
import itertools
import math
import os
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from ctrflow.atomic import replace_atomically
from ctrflow.errors import ConfigError
from ctrflow.validation import Choice, Int, check_fields

__all__ = [
    "SYNTHETIC_COLUMNS",
    "NUMERIC_FIELDS",
    "CATEGORICAL_FIELDS",
    "TARGET_CTR",
    "DRIFT_PERIOD_DAYS",
    "GenerateOptions",
    "GenerateSummary",
    "generate",
]

NUMERIC_FIELDS: tuple[str, ...] = tuple(f"I{i}" for i in range(1, 14))
CATEGORICAL_FIELDS: tuple[str, ...] = tuple(f"C{i}" for i in range(1, 27))
SYNTHETIC_COLUMNS: tuple[str, ...] = ("day", "click", "true_ctr", *NUMERIC_FIELDS, *CATEGORICAL_FIELDS)

TARGET_CTR = 0.03
"""Mean true CTR each day's bias is calibrated to."""

DRIFT_PERIOD_DAYS = 7
"""Days for a drifting weight to move from one independent draw to the next (correlation with day 0:
cos(pi/2 * d/7) for d <= 7, about 0 after)."""


@dataclass(frozen=True)
class GenerateOptions:
    """How many rows to write, over how many days, from which hidden model.

    Args:
        rows: total rows written, >= 1, split over `days` as evenly as possible (±1 row).
        seed: picks the hidden model and every draw, 0 <= seed < 2**64. Default 0. Same seed →
            byte-identical file; the model of day d does not depend on `rows` or `days`.
        days: time-ordered days, 1 <= days <= rows. Default 1 (no drift visible).
        chunk_rows: rows generated and written per step, >= 1. Default 65,536 (peak memory about
            160 MiB above the interpreter's, whatever `rows`). Bounds memory, never changes the file.
        split: "train" or "test": other rows drawn from the same hidden model (same seed and days), so
            a held-out set never repeats a training row. Default "train".
    """

    rows: int
    seed: int = 0
    days: int = 1
    chunk_rows: int = 65536
    split: str = "train"

    def __post_init__(self) -> None:
        check_fields(self, {
            "rows": Int(low=1), "seed": Int(low=0, high=2**64 - 1), "days": Int(low=1), "chunk_rows": Int(low=1),
            "split": Choice(tuple(sorted(_SPLITS))),
        })
        if self.days > self.rows:
            raise ConfigError(
                f"The 'days' parameter of GenerateOptions must be <= rows ({self.rows}) so that every "
                f"day has a row. Got {self.days} instead."
            )


@dataclass(frozen=True)
class GenerateSummary:
    """What `generate` wrote.

    bayes_logloss is the mean over rows of the logloss of `true_ctr` against the drawn click: the
    best logloss any model can expect on this file.
    """

    path: str  # the file written
    rows: int  # rows written (= options.rows)
    clicks: int  # rows with click == 1
    days: int  # days written, 0..days-1
    seed: int  # the seed of the hidden model and the draws
    mean_ctr: float  # clicks / rows
    bayes_logloss: float  # nats per row; compare a model's logloss on this file against it
    seconds: float  # wall time of the whole call

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def generate(
    out: str | os.PathLike[str],
    options: GenerateOptions,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> GenerateSummary:
    """Write `options.rows` synthetic rows to `out` (gzip when it ends in `.gz`) and summarize them.

    The file appears at `out` only once complete (written to a temporary file beside it, then renamed);
    if anything raises — including `on_progress` — no file is left at `out` and an existing one is kept.

    Args:
        out: destination path; its folder must exist.
        options: rows, seed, days, chunk size.
        on_progress: called as on_progress(rows_done, rows_total) after each chunk is generated (its
            writing goes on in the background); raising from it aborts the call.

    Raises:
        ConfigError: `out` is a folder or its folder does not exist.
    """
    started = time.perf_counter()
    path = Path(out)
    if path.is_dir():
        raise ConfigError(
            f"The 'out' argument of generate must be a file path. Got the folder {str(path)!r} instead."
        )
    if not path.parent.is_dir():
        raise ConfigError(f"The folder of 'out' does not exist: {str(path.parent)!r}. Create it first.")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    clicks, logloss_sum, rows_done = 0, 0.0, 0
    try:
        # Formatting, compressing and writing run on one background thread (they release the GIL), so
        # they overlap with drawing the next chunk; at most _CHUNKS_IN_FLIGHT chunks wait in memory.
        with _CsvFile(tmp, gzipped=path.name.endswith(".gz")) as csv_file, ThreadPoolExecutor(1) as writer:
            pending: deque[Future[None]] = deque()
            for day in range(options.days):
                model = _DayModel(options.seed, day)
                day_rows = options.rows // options.days + (day < options.rows % options.days)
                for first in range(0, day_rows, options.chunk_rows):
                    chunk = model.chunk(first, min(options.chunk_rows, day_rows - first), _SPLITS[options.split])
                    pending.append(writer.submit(csv_file.write, chunk.table))
                    while len(pending) > _CHUNKS_IN_FLIGHT:
                        pending.popleft().result()
                    clicks += chunk.clicks
                    logloss_sum += chunk.logloss_sum
                    rows_done += chunk.table.num_rows
                    if on_progress is not None:
                        on_progress(rows_done, options.rows)
            while pending:
                pending.popleft().result()
            csv_file.commit()
        replace_atomically(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return GenerateSummary(
        path=str(path),
        rows=rows_done,
        clicks=clicks,
        days=options.days,
        seed=options.seed,
        mean_ctr=clicks / rows_done,
        bayes_logloss=logloss_sum / rows_done,
        seconds=time.perf_counter() - started,
    )


# ---------------------------------------------------------------------------------------------------
# Implementation details follow: the field table, hashing, sampling, the hidden model, CSV assembly.
# ---------------------------------------------------------------------------------------------------


class _CsvFile:
    """The temporary CSV file: header, Arrow's CSV writer, optional gzip; `commit` makes it durable."""

    def __init__(self, path: Path, *, gzipped: bool) -> None:
        self._raw = open(path, "wb")
        try:
            # filename="" and mtime=0 keep the gzip header free of the temporary name and of the clock.
            self._sink = (
                gzip.GzipFile(filename="", fileobj=self._raw, mode="wb", compresslevel=_GZIP_LEVEL, mtime=0)
                if gzipped
                else self._raw
            )
            # Our own header: Arrow's would quote the names.
            self._sink.write((",".join(SYNTHETIC_COLUMNS) + "\n").encode())
            self._writer = pacsv.CSVWriter(self._sink, _ARROW_SCHEMA, write_options=_WRITE_OPTIONS)
        except BaseException:
            self._raw.close()
            raise

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table)

    def commit(self) -> None:
        """Flush everything to disk, so that once renamed the file is complete even after a crash."""
        self._writer.close()
        if self._sink is not self._raw:
            self._sink.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())

    def __enter__(self) -> _CsvFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._raw.close()  # after commit, or abandoned: the caller deletes the temporary file


class _Categorical(NamedTuple):
    name: str
    cardinality: int  # distinct ids before any fresh id is born
    zipf_exponent: float
    missing_rate: float
    weight_scale: float  # std of the linear weight of one value
    fresh_share: float  # share of rows whose value is a recently born id (0: the id set never grows)
    drifts: bool  # whether w (and v) move with the day


# Roughly Criteo's cardinalities and missing rates (C19/C20/C22/C25/C26 often empty). Signal sits mostly
# in a few small-to-mid fields (C2, C6, C14, C17, C23, C13, C1) and in the pairs below.
_CATEGORICAL: tuple[_Categorical, ...] = (
    _Categorical("C1", 1_460, 1.20, 0.00, 0.35, 0.00, True),
    _Categorical("C2", 583, 1.15, 0.00, 0.50, 0.05, True),
    _Categorical("C3", 2_000_000, 1.10, 0.03, 0.25, 0.15, True),
    _Categorical("C4", 800_000, 1.10, 0.03, 0.10, 0.10, True),
    _Categorical("C5", 305, 1.30, 0.00, 0.15, 0.00, False),
    _Categorical("C6", 24, 1.20, 0.12, 0.40, 0.00, False),
    _Categorical("C7", 12_517, 1.15, 0.00, 0.30, 0.05, True),
    _Categorical("C8", 633, 1.30, 0.00, 0.10, 0.00, False),
    _Categorical("C9", 3, 1.30, 0.00, 0.30, 0.00, False),
    _Categorical("C10", 40_000, 1.10, 0.00, 0.10, 0.05, True),
    _Categorical("C11", 5_683, 1.15, 0.00, 0.15, 0.00, False),
    _Categorical("C12", 1_500_000, 1.10, 0.03, 0.10, 0.10, True),
    _Categorical("C13", 3_194, 1.15, 0.00, 0.35, 0.03, True),
    _Categorical("C14", 27, 1.20, 0.00, 0.40, 0.00, False),
    _Categorical("C15", 14_992, 1.15, 0.00, 0.10, 0.00, False),
    _Categorical("C16", 1_000_000, 1.10, 0.03, 0.20, 0.15, True),
    _Categorical("C17", 10, 1.20, 0.00, 0.45, 0.00, False),
    _Categorical("C18", 5_652, 1.20, 0.00, 0.10, 0.00, False),
    _Categorical("C19", 2_173, 1.20, 0.44, 0.10, 0.00, False),
    _Categorical("C20", 4, 1.30, 0.44, 0.30, 0.00, False),
    _Categorical("C21", 1_200_000, 1.10, 0.03, 0.10, 0.10, True),
    _Categorical("C22", 18, 1.30, 0.76, 0.10, 0.00, False),
    _Categorical("C23", 15, 1.20, 0.00, 0.40, 0.00, False),
    _Categorical("C24", 100_000, 1.10, 0.03, 0.15, 0.05, True),
    _Categorical("C25", 105, 1.25, 0.44, 0.20, 0.00, False),
    _Categorical("C26", 60_000, 1.10, 0.44, 0.10, 0.05, True),
)
_CAT_INDEX = {f.name: i for i, f in enumerate(_CATEGORICAL)}

# FM-style interactions: one latent vector per (field, value), shared by every pair the field is in,
# so an FM can represent them exactly and a linear model cannot represent them at all.
_LATENT_SIZE = 4
_VECTOR_SCALE = {
    "C1": 0.48, "C2": 0.52, "C6": 0.52, "C7": 0.48, "C9": 0.48, "C13": 0.48,
    "C14": 0.52, "C17": 0.52, "C20": 0.48, "C23": 0.52, "C25": 0.48,
}  # fmt: skip  # strong enough that pairwise models beat a tuned LR clearly (tests/train/test_loop.py)
_PAIRS: tuple[tuple[str, str], ...] = (
    ("C2", "C6"), ("C2", "C14"), ("C6", "C17"), ("C13", "C23"),
    ("C1", "C20"), ("C9", "C25"), ("C7", "C14"), ("C17", "C23"),
)  # fmt: skip

_FRESH_CARDINALITY_DIVISOR = 50  # ids born per day = max(8, cardinality // 50)
_FRESH_AGE_DECAY = 0.5  # P(fresh id born a days ago) ∝ 0.5**a: new ids stay in use a few days


class _Numeric(NamedTuple):
    name: str
    median: float  # median count before flooring
    log_spread: float  # std of log(count) (unit-variance logistic noise: heavier tails than lognormal)
    activity_loading: float  # correlation with the row's shared "activity" latent
    missing_rate: float
    negative_rate: float  # share of rows with a small negative value (-1..-3), like Criteo's I2


_NUMERIC: tuple[_Numeric, ...] = (
    _Numeric("I1", 1.0, 1.2, 0.6, 0.45, 0.0),
    _Numeric("I2", 3.0, 1.8, 0.3, 0.00, 0.02),
    _Numeric("I3", 6.0, 1.4, 0.5, 0.21, 0.0),
    _Numeric("I4", 4.0, 0.9, 0.6, 0.22, 0.0),
    _Numeric("I5", 2_800.0, 1.6, 0.2, 0.025, 0.0),
    _Numeric("I6", 33.0, 1.5, 0.4, 0.22, 0.0),
    _Numeric("I7", 3.0, 1.5, 0.5, 0.04, 0.0),
    _Numeric("I8", 7.0, 1.0, 0.3, 0.0005, 0.0),
    _Numeric("I9", 38.0, 1.3, 0.4, 0.04, 0.0),
    _Numeric("I10", 0.7, 0.8, 0.5, 0.45, 0.0),
    _Numeric("I11", 1.0, 1.2, 0.6, 0.04, 0.0),
    _Numeric("I12", 0.3, 1.5, 0.5, 0.76, 0.0),
    _Numeric("I13", 4.0, 1.1, 0.5, 0.21, 0.0),
)
_MAX_COUNT = 2**31 - 1

_CHUNKS_IN_FLIGHT = 2  # chunks generated but not yet written: bounds memory
_GZIP_LEVEL = 1  # ~3.5x faster than level 6 for ~13% more bytes (random hex compresses poorly anyway)
_CALIBRATION_ROWS = 65_536  # 16k left ±5% CTR error on heavy-tailed seeds; 64k is within ±0.5%
_TABLE_MAX_IDS = 1 << 17  # fields with at most this many ids get per-day weight tables
_MISSING_ID = 0xFFFF_FFFF  # value id standing for "missing" in weight hashes (real ids stay below it)
_LOGIT_CLIP = 13.0  # keeps true_ctr strictly inside (0, 1) after rounding to 6 digits

# Row-key namespaces (bits 62-63): the written rows and the calibration sample never share draws.
_ROWS, _CALIBRATION, _TEST_ROWS = 0, 1, 2
_SPLITS = {"train": _ROWS, "test": _TEST_ROWS}

# ----- hashing: splitmix64 on uint64 arrays (numpy integer arithmetic wraps, which we rely on) -----

_MASK64 = (1 << 64) - 1
_GOLDEN_INT = 0x9E3779B97F4A7C15
_GOLDEN = np.uint64(_GOLDEN_INT)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_LOGISTIC_TO_UNIT = math.sqrt(3.0) / math.pi  # logistic(0, 1) has variance pi^2 / 3


def _mix_int(x: int) -> int:
    z = (x + _GOLDEN_INT) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _key(seed: int, *parts: str | int) -> int:
    """A 64-bit key for (seed, parts...), stable across runs and platforms (no salted `hash`)."""
    h = _mix_int(seed)
    for part in parts:
        if isinstance(part, str):
            part = int.from_bytes(hashlib.blake2b(part.encode(), digest_size=8).digest(), "little")
        h = _mix_int(h ^ part)
    return h


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 output for states `x` (uint64 array); returns a new array."""
    z = x + _GOLDEN
    z ^= z >> _S30
    z *= _M1
    z ^= z >> _S27
    z *= _M2
    z ^= z >> _S31
    return z


def _uniform53(h: np.ndarray) -> np.ndarray:
    """Uniform in (0, 1) from the top 53 bits."""
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _uniform16(h: np.ndarray, part: int) -> np.ndarray:
    """Uniform in (0, 1) from 16-bit part 0..3 of each hash (for draws that need little precision)."""
    return (((h >> np.uint64(16 * part)) & np.uint64(0xFFFF)).astype(np.float64) + 0.5) * 2.0**-16


def _logistic(u: np.ndarray) -> np.ndarray:
    """Unit-variance logistic from uniforms: normal-like, with somewhat heavier tails."""
    return np.log(u / (1.0 - u)) * _LOGISTIC_TO_UNIT


def _zipf_rank(u: np.ndarray, n: int, exponent: float) -> np.ndarray:
    """0-based Zipf ranks in [0, n) by inverting the continuous power law (P(r) ∝ ∫_r^{r+1} x^-s dx)."""
    a = 1.0 - (n + 1.0) ** (1.0 - exponent)
    x = (1.0 - u * a) ** (1.0 / (1.0 - exponent))
    return np.clip(x.astype(np.int64) - 1, 0, n - 1)


def _fmix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer: a bijection, so distinct ids of a field get distinct tokens."""
    x = x ^ (x >> np.uint32(16))
    x *= np.uint32(0x85EBCA6B)
    x ^= x >> np.uint32(13)
    x *= np.uint32(0xC2B2AE35)
    x ^= x >> np.uint32(16)
    return x


# ----- per-row draws -----


class _Draws(NamedTuple):
    """The random part of a block of rows, before the hidden model is applied."""

    cat_ids: list[np.ndarray]  # uint64 value id per categorical field, _MISSING_ID where missing
    counts: list[np.ndarray]  # int64 per numeric field (meaningless where missing)
    num_missing: list[np.ndarray]  # bool per numeric field
    click_u: np.ndarray  # uniform in (0, 1): click = click_u < true_ctr


def _draw_rows(seed: int, day: int, first: int, n: int, namespace: int) -> _Draws:
    """Draws of rows first..first+n-1 of `day`: a pure function of (seed, day, row), never of chunking."""
    row_keys = np.arange(first, first + n, dtype=np.uint64) | np.uint64((namespace << 62) | (day << 32))
    row_state = _mix(row_keys ^ np.uint64(_key(seed, "rows")))
    stream = itertools.count(1)

    def draw() -> np.ndarray:  # the next splitmix64 output of every row's own stream
        return _mix(row_state + np.uint64((next(stream) * _GOLDEN_INT) & _MASK64))

    click_u = _uniform53(draw())
    activity = _logistic(_uniform53(draw()))

    cat_ids = []
    for field in _CATEGORICAL:
        u_rank = _uniform53(draw())
        other = draw()
        ids = _zipf_rank(u_rank, field.cardinality, field.zipf_exponent).astype(np.uint64)
        if field.fresh_share > 0.0:
            fresh = _uniform16(other, 1) < field.fresh_share
            if fresh.any():
                fresh_card = _fresh_cardinality(field)
                u_age = _uniform16(other, 2)[fresh]
                age = np.minimum(np.floor(np.log(u_age) / math.log(_FRESH_AGE_DECAY)), day).astype(np.int64)
                born = day - age
                rank = _zipf_rank(u_rank[fresh], fresh_card, field.zipf_exponent)
                ids[fresh] = (field.cardinality + born * fresh_card + rank).astype(np.uint64)
        if field.missing_rate > 0.0:
            ids[_uniform16(other, 0) < field.missing_rate] = _MISSING_ID
        cat_ids.append(ids)

    counts, num_missing = [], []
    for field in _NUMERIC:
        h = draw()
        noise = _logistic(((h >> np.uint64(32)).astype(np.float64) + 0.5) * 2.0**-32)
        rho = field.activity_loading
        z = rho * activity + math.sqrt(1.0 - rho * rho) * noise
        count = np.floor(np.minimum(field.median * np.exp(field.log_spread * z), _MAX_COUNT)).astype(np.int64)
        if field.negative_rate > 0.0:
            u_neg = _uniform16(h, 1)
            negative = u_neg < field.negative_rate
            count[negative] = -1 - np.floor(3.0 * u_neg[negative] / field.negative_rate).astype(np.int64)
        counts.append(count)
        num_missing.append(_uniform16(h, 0) < field.missing_rate)
    return _Draws(cat_ids, counts, num_missing, click_u)


def _fresh_cardinality(field: _Categorical) -> int:
    return max(8, field.cardinality // _FRESH_CARDINALITY_DIVISOR)


# ----- the hidden model of one day -----


class _Chunk(NamedTuple):
    table: pa.Table
    clicks: int
    logloss_sum: float


class _DayModel:
    """The hidden model of one day: weights (hashed, or tabled for small fields) and a calibrated bias."""

    def __init__(self, seed: int, day: int) -> None:
        self.seed = seed
        self.day = day
        anchor, step = divmod(day, DRIFT_PERIOD_DAYS)
        angle = 0.5 * math.pi * step / DRIFT_PERIOD_DAYS
        # Drift glides between independent anchors: cos/sin weights keep every weight's variance fixed.
        self._drift = ((anchor, math.cos(angle)), (anchor + 1, math.sin(angle))) if step else ((anchor, 1.0),)
        self._token_keys = [np.uint32(_key(seed, "token", f.name) & 0xFFFF_FFFF) for f in _CATEGORICAL]
        self._tables: dict[str, tuple[np.ndarray, int]] = {}
        for field in _CATEGORICAL:
            n_ids = self._id_count(field)
            if n_ids <= _TABLE_MAX_IDS:
                all_ids = np.append(np.arange(n_ids, dtype=np.uint64), np.uint64(_MISSING_ID))
                self._tables[field.name] = (self._linear(field, all_ids), n_ids)
                if field.name in _VECTOR_SCALE:
                    self._tables[field.name + "/v"] = (self._vectors(field, all_ids), n_ids)
        # C17's values set the slope of I13's effect; stable over days. Index `cardinality` = missing.
        c17_ids = np.arange(_CATEGORICAL[_CAT_INDEX["C17"]].cardinality + 1, dtype=np.uint64)
        self._c17_slope = _logistic(_uniform53(_mix(c17_ids ^ np.uint64(_key(seed, "slope", "C17")))))
        self.bias = 0.0  # logit() adds self.bias: calibrate from zero
        sample = _draw_rows(seed, day, 0, _CALIBRATION_ROWS, _CALIBRATION)
        self.bias = _calibrate_bias(self.logit(sample), TARGET_CTR)

    def _id_count(self, field: _Categorical) -> int:
        """Ids that can occur on this day: the base ids plus those born on days 0..day."""
        born_days = self.day + 1 if field.fresh_share > 0.0 else 0
        return field.cardinality + born_days * _fresh_cardinality(field)

    def _drifted(
        self, field: _Categorical, ids: np.ndarray, purpose: str, draw: Callable[[np.ndarray], np.ndarray]
    ) -> np.ndarray:
        anchors = self._drift if field.drifts else ((0, 1.0),)
        total = None
        for anchor, weight in anchors:
            value = draw(_mix(ids ^ np.uint64(_key(self.seed, purpose, field.name, anchor)))) * weight
            total = value if total is None else total + value
        return total

    def _linear(self, field: _Categorical, ids: np.ndarray) -> np.ndarray:
        return self._drifted(field, ids, "linear", lambda h: _logistic(_uniform53(h))) * field.weight_scale

    def _vectors(self, field: _Categorical, ids: np.ndarray) -> np.ndarray:
        def draw(h: np.ndarray) -> np.ndarray:
            return np.stack([_logistic(_uniform16(h, part)) for part in range(_LATENT_SIZE)], axis=1)

        return self._drifted(field, ids, "vector", draw) * _VECTOR_SCALE[field.name]

    def _lookup(self, field: _Categorical, ids: np.ndarray, kind: str) -> np.ndarray:
        key = field.name if kind == "linear" else field.name + "/v"
        if key in self._tables:
            table, n_ids = self._tables[key]
            return table[np.where(ids == _MISSING_ID, n_ids, ids).astype(np.int64)]
        return self._linear(field, ids) if kind == "linear" else self._vectors(field, ids)

    def logit(self, draws: _Draws) -> np.ndarray:
        z = np.full(len(draws.click_u), self.bias)
        vectors = {}
        for field, ids in zip(_CATEGORICAL, draws.cat_ids):
            z += self._lookup(field, ids, "linear")
            if field.name in _VECTOR_SCALE:
                vectors[field.name] = self._lookup(field, ids, "vector")
        for a, b in _PAIRS:
            z += np.einsum("ij,ij->i", vectors[a], vectors[b])
        c17_ids = np.minimum(draws.cat_ids[_CAT_INDEX["C17"]], len(self._c17_slope) - 1).astype(np.int64)
        z += _numeric_effects(draws, self._c17_slope[c17_ids])
        return np.clip(z, -_LOGIT_CLIP, _LOGIT_CLIP)

    def chunk(self, first: int, n: int, namespace: int = _ROWS) -> _Chunk:
        draws = _draw_rows(self.seed, self.day, first, n, namespace)
        ctr = _round_significant(1.0 / (1.0 + np.exp(-self.logit(draws))))
        click = draws.click_u < ctr
        logloss = -np.sum(np.log(np.where(click, ctr, 1.0 - ctr)))
        columns = [pa.array(np.full(n, self.day, dtype=np.int32)), pa.array(click.astype(np.int8))]
        columns += [pa.array(ctr)]
        columns += [pa.array(c, mask=m) for c, m in zip(draws.counts, draws.num_missing)]
        columns += [self._tokens(i, ids) for i, ids in enumerate(draws.cat_ids)]
        return _Chunk(pa.Table.from_arrays(columns, schema=_ARROW_SCHEMA), int(click.sum()), float(logloss))

    def _tokens(self, field_index: int, ids: np.ndarray) -> pa.Array:
        """8-hex-char tokens (a keyed bijection of the id) as an Arrow string array, null where missing."""
        n = len(ids)
        missing = ids == _MISSING_ID
        tokens = _fmix32(ids.astype(np.uint32) ^ self._token_keys[field_index])
        text = _HEX4[np.stack([tokens >> np.uint32(16), tokens & np.uint32(0xFFFF)], axis=1)]
        offsets = np.arange(0, 8 * n + 1, 8, dtype=np.int32)
        validity = None
        if missing.any():
            validity = pa.py_buffer(np.packbits(~missing, bitorder="little"))
        return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(text), validity)


def _numeric_effects(draws: _Draws, c17_slope: np.ndarray) -> np.ndarray:
    """Nonlinear effects of x = log(1 + count): what discretized numerics (or an MLP) must recover.
    Where a field is missing its effect is a constant instead: missingness itself is informative."""
    x, missing = {}, {}
    for field, count, absent in zip(_NUMERIC, draws.counts, draws.num_missing):
        x[field.name] = np.sign(count) * np.log1p(np.abs(count))
        missing[field.name] = absent

    def effect(name: str, when_present: np.ndarray, when_missing: float) -> np.ndarray:
        return np.where(missing[name], when_missing, when_present)

    z = effect("I1", 0.5 * np.tanh(x["I1"] - 0.7), -0.2)  # saturating
    z += effect("I3", 0.3 * (x["I3"] < 1.2), 0.0)  # threshold
    z += effect("I5", -0.35 * np.tanh(1.5 * (x["I5"] - 8.5)), 0.3)  # steep step near count ~5k
    z += effect("I7", 0.35 * np.exp(-((x["I7"] - 1.6) ** 2)), 0.0)  # bump: middle values click most
    z += effect("I11", 0.25 * np.minimum(x["I11"], 1.8), 0.0)  # saturating
    z += effect("I13", 0.25 * c17_slope * (np.minimum(x["I13"], 4.0) - 1.5), 0.0)  # numeric × C17
    return z


def _calibrate_bias(logit: np.ndarray, target: float) -> float:
    """The bias b with mean(sigmoid(logit + b)) == target, by bisection (deterministic)."""
    low, high = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (low + high)
        if np.mean(1.0 / (1.0 + np.exp(-(logit + mid)))) < target:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


def _round_significant(p: np.ndarray, digits: int = 6) -> np.ndarray:
    """p rounded to `digits` significant digits, as the double nearest that decimal (so Arrow writes
    exactly those digits): the integer mantissa divided by an exact power of ten is correctly rounded."""
    scale = 10.0 ** (digits - 1 - np.floor(np.log10(p)))
    return np.rint(p * scale) / scale


# _HEX4[i] holds the 4 ASCII bytes of f"{i:04x}": a token is two lookups instead of eight.
_HEX4 = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[
    (np.arange(1 << 16)[:, None] >> np.array([12, 8, 4, 0])) & 15
].view(np.uint32).ravel()
_ARROW_SCHEMA = pa.schema(
    [("day", pa.int32()), ("click", pa.int8()), ("true_ctr", pa.float64())]
    + [(name, pa.int64()) for name in NUMERIC_FIELDS]
    + [(name, pa.string()) for name in CATEGORICAL_FIELDS]
)
_WRITE_OPTIONS = pacsv.WriteOptions(include_header=False, quoting_style="none")
