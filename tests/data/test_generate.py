"""Tests for ctrflow/data/generate.py: the synthetic Criteo-shaped logs and their hidden model."""
from __future__ import annotations

import gzip
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pytest

from ctrflow.data.generate import SYNTHETIC_COLUMNS, GenerateOptions, GenerateSummary, generate
from ctrflow.errors import ConfigError

NUMERIC = [f"I{i}" for i in range(1, 14)]
CATEGORICAL = [f"C{i}" for i in range(1, 27)]


def read(path: Path) -> pa.Table:
    types = {"day": pa.int64(), "click": pa.int64(), "true_ctr": pa.float64()}
    types |= {name: pa.int64() for name in NUMERIC} | {name: pa.string() for name in CATEGORICAL}
    options = pacsv.ConvertOptions(column_types=types, strings_can_be_null=True)
    return pacsv.read_csv(path, convert_options=options)


@pytest.fixture(scope="module")
def one_day(tmp_path_factory: pytest.TempPathFactory) -> tuple[GenerateSummary, pa.Table, Path]:
    path = tmp_path_factory.mktemp("one_day") / "synthetic.csv"
    summary = generate(path, GenerateOptions(rows=100_000, seed=0))
    return summary, read(path), path


@pytest.fixture(scope="module")
def eight_days(tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    path = tmp_path_factory.mktemp("eight_days") / "synthetic.csv"
    generate(path, GenerateOptions(rows=96_003, seed=1, days=8))
    return read(path)


def column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


# ----- determinism -----


def test_same_seed_gives_byte_identical_files_whatever_the_chunk_size(tmp_path: Path) -> None:
    contents = []
    for chunk_rows in (65536, 1000, 777):
        path = tmp_path / f"chunk{chunk_rows}.csv"
        generate(path, GenerateOptions(rows=3000, seed=5, days=2, chunk_rows=chunk_rows))
        contents.append(path.read_bytes())
    assert contents[0] == contents[1] == contents[2]


def test_different_seeds_give_different_files(tmp_path: Path) -> None:
    generate(tmp_path / "a.csv", GenerateOptions(rows=1000, seed=1))
    generate(tmp_path / "b.csv", GenerateOptions(rows=1000, seed=2))
    a, b = read(tmp_path / "a.csv"), read(tmp_path / "b.csv")
    assert not np.array_equal(column(a, "true_ctr"), column(b, "true_ctr"))
    # Tokens are keyed by the seed too: the most frequent C9 value (3 values) is spelled differently.
    assert set(column(a, "C9")).isdisjoint(set(column(b, "C9")))


# ----- shape of the file -----


def test_header_lists_the_synthetic_columns_in_order(one_day) -> None:
    _, table, path = one_day
    assert path.read_text().split("\n", 1)[0] == ",".join(SYNTHETIC_COLUMNS)
    assert SYNTHETIC_COLUMNS == ("day", "click", "true_ctr", *NUMERIC, *CATEGORICAL)
    assert table.column_names == list(SYNTHETIC_COLUMNS)
    assert table.num_rows == 100_000


def test_values_have_the_documented_types(one_day) -> None:
    _, table, path = one_day
    assert set(column(table, "day")) == {0}
    assert set(column(table, "click")) == {0, 1}
    for name in CATEGORICAL:
        tokens = table.column(name).drop_null()
        assert pc.all(pc.match_substring_regex(tokens, r"^[0-9a-f]{8}$")).as_py(), name
    # Numerics are plain integers (or empty), never floats.
    body = path.read_text().split("\n", 200)[1:200]
    for line in body:
        fields = line.split(",")
        assert all(re.fullmatch(r"-?\d*", value) for value in fields[3:16]), line


def test_true_ctr_is_written_with_six_significant_digits(one_day) -> None:
    _, _, path = one_day
    for line in path.read_text().split("\n", 2000)[1:2000]:
        text = line.split(",")[2]
        digits = text.replace(".", "").lstrip("0")
        assert 1 <= len(digits) <= 6 and float(text) > 0, text


# ----- the hidden model -----


def test_mean_ctr_is_near_three_percent(one_day) -> None:
    summary, table, _ = one_day
    assert 0.027 < float(np.mean(column(table, "true_ctr"))) < 0.033
    assert 0.027 < summary.mean_ctr < 0.033


def test_clicks_are_drawn_from_true_ctr(one_day) -> None:
    _, table, _ = one_day
    ctr, click = column(table, "true_ctr"), column(table, "click")
    assert ctr.min() > 0.0 and ctr.max() < 1.0
    standard_error = math.sqrt(np.sum(ctr * (1 - ctr))) / len(ctr)
    assert abs(click.mean() - ctr.mean()) < 4 * standard_error
    # The signal is real: the top decile of true_ctr clicks far more than the bottom decile.
    order = np.argsort(ctr)
    tenth = len(ctr) // 10
    assert click[order[-tenth:]].mean() > 10 * click[order[:tenth]].mean()


def test_bayes_logloss_is_clearly_better_than_the_base_rate(one_day) -> None:
    summary, _, _ = one_day
    p = summary.mean_ctr
    base_rate_logloss = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert 0.6 < summary.bayes_logloss / base_rate_logloss < 0.9


def test_reported_summary_matches_the_file(one_day) -> None:
    summary, table, path = one_day
    ctr, click = column(table, "true_ctr"), column(table, "click")
    logloss = -np.mean(np.where(click == 1, np.log(ctr), np.log(1 - ctr)))
    assert summary.bayes_logloss == pytest.approx(logloss, rel=1e-9)
    assert summary.clicks == int(click.sum())
    assert summary.mean_ctr == pytest.approx(click.mean())
    assert (summary.rows, summary.days, summary.seed, summary.path) == (100_000, 1, 0, str(path))
    assert summary.to_dict()["bayes_logloss"] == summary.bayes_logloss


def test_numerics_are_heavy_tailed_sometimes_negative_and_often_missing(one_day) -> None:
    _, table, _ = one_day
    null_share = {name: table.column(name).null_count / table.num_rows for name in NUMERIC}
    assert 0.40 < null_share["I1"] < 0.50 and 0.70 < null_share["I12"] < 0.82
    assert null_share["I2"] == 0.0
    i2 = column(table, "I2")
    assert 0 < np.mean(i2 < 0) < 0.05 and i2.min() >= -3
    i5 = table.column("I5").drop_null().to_numpy()
    assert i5.max() > 100 * np.median(i5)


def test_some_categorical_fields_are_often_missing(one_day) -> None:
    _, table, _ = one_day
    null_share = {name: table.column(name).null_count / table.num_rows for name in CATEGORICAL}
    assert null_share["C1"] == 0.0
    assert 0.70 < null_share["C22"] < 0.82
    assert sum(share > 0.3 for share in null_share.values()) >= 4


def test_categorical_values_are_zipf_distributed_over_a_wide_range_of_cardinalities(one_day) -> None:
    _, table, _ = one_day
    distinct = {name: len(pc.unique(table.column(name).drop_null())) for name in CATEGORICAL}
    assert distinct["C9"] == 3 and distinct["C20"] == 4 and distinct["C6"] <= 24
    assert distinct["C3"] > 20_000  # of 100k rows: a long tail of rare values
    counts = pc.value_counts(table.column("C3").drop_null()).field("counts").to_numpy()
    top_share = counts.max() / counts.sum()
    assert top_share > 0.03  # a few values dominate...
    assert np.mean(counts == 1) > 0.5  # ...while most values are seen once
    c9 = pc.value_counts(table.column("C9")).field("counts").to_numpy()
    assert c9.max() / c9.sum() > 0.4


# ----- days and drift -----


def test_days_are_sorted_and_balanced(eight_days) -> None:
    day = column(eight_days, "day")
    assert np.all(np.diff(day) >= 0)
    assert np.bincount(day).tolist() == [12_001] * 3 + [12_000] * 5


def test_later_days_bring_tokens_never_seen_on_day_0(eight_days) -> None:
    day = column(eight_days, "day")

    def unseen_share(name: str, later: int) -> float:
        values = column(eight_days, name)
        seen = set(values[day == 0]) - {None}
        later_values = [v for v in values[day == later] if v is not None]
        return sum(v not in seen for v in later_values) / len(later_values)

    # C2 (583 values) is nearly covered by day 0, yet ids born on later days keep showing up; C5 (no
    # fresh ids) holds no surprise.
    assert 0.01 < unseen_share("C2", 1) < unseen_share("C2", 2) < unseen_share("C2", 7)
    assert unseen_share("C2", 7) > 0.03
    assert unseen_share("C5", 7) < 0.002


def test_effects_drift_so_frequent_tokens_change_their_ctr(eight_days) -> None:
    day, ctr = column(eight_days, "day"), column(eight_days, "true_ctr")
    logit = np.log(ctr / (1 - ctr))
    first, last = day == 0, day == 7

    def lift_change(name: str) -> float:
        """RMS over the 5 most frequent tokens of the change in (token mean logit - day mean logit)."""
        values = column(eight_days, name)
        changes = []
        for token, _ in Counter(values).most_common(5):
            lift = [logit[rows & (values == token)].mean() - logit[rows].mean() for rows in (first, last)]
            changes.append(lift[1] - lift[0])
        return math.sqrt(np.mean(np.square(changes)))

    for drifting in ("C1", "C2", "C13"):
        assert lift_change(drifting) > 0.25, drifting
    for stable in ("C5", "C8"):
        assert lift_change(stable) < 0.15, stable
    # The mean CTR stays near 3% every day: each day's bias is recalibrated.
    for d in range(8):
        assert 0.026 < ctr[day == d].mean() < 0.034


# ----- files -----


def test_gzip_output_holds_the_same_csv(tmp_path: Path) -> None:
    options = GenerateOptions(rows=2000, seed=3, days=2, chunk_rows=500)
    generate(tmp_path / "plain.csv", options)
    generate(tmp_path / "packed.csv.gz", options)
    assert gzip.decompress((tmp_path / "packed.csv.gz").read_bytes()) == (tmp_path / "plain.csv").read_bytes()
    assert read(tmp_path / "packed.csv.gz").num_rows == 2000


def test_success_leaves_only_the_output_file(tmp_path: Path) -> None:
    generate(tmp_path / "out.csv", GenerateOptions(rows=10))
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_failure_midway_leaves_no_file_behind(tmp_path: Path) -> None:
    def fail_after_first_chunk(done: int, total: int) -> None:
        raise RuntimeError("stop")

    options = GenerateOptions(rows=5000, chunk_rows=1000)
    with pytest.raises(RuntimeError, match="stop"):
        generate(tmp_path / "out.csv", options, on_progress=fail_after_first_chunk)
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_an_existing_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "out.csv.gz"
    path.write_bytes(b"previous run")

    def fail(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(path, GenerateOptions(rows=5000, chunk_rows=1000), on_progress=fail)
    assert path.read_bytes() == b"previous run"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv.gz"]


def test_progress_counts_rows_up_to_the_total(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    options = GenerateOptions(rows=2500, days=2, chunk_rows=1000)
    generate(tmp_path / "out.csv", options, on_progress=lambda *progress: calls.append(progress))
    assert calls == [(1000, 2500), (1250, 2500), (2250, 2500), (2500, 2500)]


def test_a_single_row_is_enough(tmp_path: Path) -> None:
    summary = generate(tmp_path / "one.csv", GenerateOptions(rows=1))
    assert summary.rows == 1 and read(tmp_path / "one.csv").num_rows == 1


# ----- validation -----


@pytest.mark.parametrize(
    ("settings", "received"),
    [
        ({"rows": 0}, "0"),
        ({"rows": 10, "days": 0}, "0"),
        ({"rows": 10, "chunk_rows": 0}, "0"),
        ({"rows": 10, "seed": -1}, "-1"),
        ({"rows": 10, "seed": 2**64}, str(2**64)),
        ({"rows": 2.5}, "2.5"),
        ({"rows": True}, "True"),
        ({"rows": 3, "days": 4}, "4"),
    ],
)
def test_bad_options_are_rejected_with_the_value_received(settings: dict, received: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"Got {received} instead")):
        GenerateOptions(**settings)


def test_output_folder_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        generate(tmp_path / "missing" / "out.csv", GenerateOptions(rows=10))
    with pytest.raises(ConfigError, match="folder"):
        generate(tmp_path, GenerateOptions(rows=10))


def test_test_split_draws_other_rows_from_the_same_model(tmp_path):
    a = generate(tmp_path / "a.csv", GenerateOptions(rows=20_000, seed=4))
    b = generate(tmp_path / "b.csv", GenerateOptions(rows=20_000, seed=4, split="test"))
    rows_a = set((tmp_path / "a.csv").read_text().splitlines()[1:])
    rows_b = set((tmp_path / "b.csv").read_text().splitlines()[1:])
    assert len(rows_a & rows_b) < 10  # duplicates only by chance (identical popular rows)
    assert abs(a.mean_ctr - b.mean_ctr) < 0.006 and abs(a.bayes_logloss - b.bayes_logloss) < 0.01
    with pytest.raises(ConfigError, match="'split' parameter of GenerateOptions must be one of"):
        GenerateOptions(rows=10, split="valid")
