"""`ctrflow tune`: a real Optuna search over real (tiny) training runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ctrflow.errors import ConfigError
from ctrflow.models.registry import ModelConfig
from ctrflow.train.config import TrainConfig
from ctrflow.train.tune import TuneOptions, config_with, tune

from conftest import cli_in_process, synthetic_split


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """8k/3k synthetic rows, tables capped at 1024 rows: a trial epoch takes about a second."""
    return synthetic_split(tmp_path_factory.mktemp("tune"), 8000, 3000, seed=3, cap=1024)


BASE = TrainConfig(model=ModelConfig("fm", embedding_dim=4), optimizer="lazyadam", learning_rate=0.003)


@pytest.mark.slow
def test_two_trials_write_a_best_config_that_trains(tiny, tmp_path):
    from ctrflow.train.loop import train

    out = tmp_path / "tuned"
    s = tune(tiny / "train", out, BASE, valid=tiny / "valid", options=TuneOptions(trials=2, max_epochs=2, seed=1))
    assert s.trials == 2 and s.best_epochs >= 1
    assert sorted(p.name for p in out.iterdir()) == ["best_config.yaml", "summary.json", "trials.md", "trials.png", "trials.tsv"]
    assert (out / "trials.png").stat().st_size > 5000  # a drawn figure, not empty axes
    rows = (out / "trials.tsv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("trial\tstate\tbest_valid_logloss")
    best = TrainConfig.load(out / "best_config.yaml")
    assert best.model.kind == "fm" and best.epochs == s.best_epochs
    assert best.learning_rate == pytest.approx(s.best_params["learning_rate"])
    assert best.model.embedding_dim == s.best_params["embedding_dim"]
    assert best.optimizer_groups["linear"].learning_rate == pytest.approx(s.best_params["linear_learning_rate"])
    # the search's figure is the best trial's: retraining its config reproduces that validation logloss
    r = train(tiny / "train", tmp_path / "retrain", best.replace(max_steps=None), valid=tiny / "valid")
    assert r.valid["logloss"] == pytest.approx(s.best_valid_logloss, rel=0.02)
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]  # no work left behind
    assert json.loads((out / "summary.json").read_text())["best_trial"] == s.best_trial


@pytest.mark.slow
def test_budget_too_small_for_one_trial_writes_nothing(tiny, tmp_path):
    out = tmp_path / "tuned"
    with pytest.raises(ConfigError, match="too small for one trial"):
        tune(tiny / "train", out, BASE, valid=tiny / "valid", options=TuneOptions(trials=3, budget_minutes=0.0005))
    assert list(tmp_path.iterdir()) == []


def test_options_and_space_are_checked():
    with pytest.raises(ConfigError, match="'budget_minutes' parameter of TuneOptions"):
        TuneOptions(budget_minutes=0)
    with pytest.raises(ConfigError, match="'trials'"):
        TuneOptions(trials=0)
    c = config_with(TrainConfig(model=ModelConfig("deepfm")), {"learning_rate": 0.01, "dropout": 0.3, "batch_size": 1024,
                                                                "linear_learning_rate": 0.05}, epochs=3)
    assert (c.model.dropout, c.batch_size, c.epochs, c.learning_rate) == (0.3, 1024, 3, 0.01)
    assert c.optimizer_groups["linear"].learning_rate == 0.05
    assert TrainConfig.from_dict(c.to_dict()) == c
    # the search's first trial is the config tuned from, as it is: same rates, L2, batch, model settings
    from ctrflow.train.tune import _space_for, base_params

    base = TrainConfig(model=ModelConfig("deepfm", dropout=0.2, min_count=5))
    first = config_with(base, base_params(base, _space_for("deepfm")), epochs=1)
    assert (first.l2, first.batch_size, first.model) == (base.l2, base.batch_size, base.model)
    assert [first.effective_learning_rate(g) for g in ("linear", "embedding", "dense")] == \
        [base.effective_learning_rate(g) for g in ("linear", "embedding", "dense")]
    assert base_params(TrainConfig(model=ModelConfig("lr"), l2=1.0), _space_for("lr"))["l2"] == 1e-3  # clipped into the space


@pytest.mark.slow
def test_cli_tune_without_valid_holds_out_the_latest_rows(tiny, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "ctrflow", "tune", "--data", str(tiny / "train"),
           "--model", "lr", "--trials", "1", "--max-epochs", "1", "--out", str(out), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["trials"] == 1 and Path(d["best_config"]).exists() and d["model"] == "lr"
    assert "the latest 10% of rows by time column" in r.stdout and "800 rows held out" in r.stdout
    r = cli_in_process(*cmd[3:])  # the same command again, in this process: refused, the output folder exists
    assert r.returncode == 2 and "exists" in r.stderr and "Traceback" not in r.stderr
