"""`ctrflow tune --model ffm` searches what acts on FFM (`ffm_dim`, the pair-weight rate), not `embedding_dim`;
`ModelConfig.ffm_pair_rate` reaches the model, and run folders written before it read the default."""
from __future__ import annotations

import json

import pytest

from ctrflow.errors import ConfigError
from ctrflow.models.registry import PAIR_WEIGHT_SCALE, ModelConfig
from ctrflow.train.config import TrainConfig
from ctrflow.train.tune import SEARCH_SPACE, TuneOptions, _space_for, base_params, config_with, tune

from conftest import synthetic_split


def test_ffm_space_has_its_own_width_and_rate_and_trial_0_is_the_base():
    names = _space_for("ffm")
    assert "ffm_dim" in names and "ffm_pair_rate" in names and "embedding_dim" not in names
    assert "ffm_dim" not in _space_for("fm") and "ffm_pair_rate" not in _space_for("fwfm")  # fwfm's r learns at 1x
    base = TrainConfig(model=ModelConfig("ffm", ffm_dim=2, ffm_pair_rate=3.0))
    first = config_with(base, base_params(base, names), epochs=1)
    assert first.model == base.model and (first.l2, first.batch_size) == (base.l2, base.batch_size)
    moved = config_with(base, {"ffm_dim": 8, "ffm_pair_rate": 20.0}, epochs=2).model
    assert (moved.ffm_dim, moved.ffm_pair_rate, moved.embedding_dim) == (8, 20.0, base.model.embedding_dim)
    lo, hi, _ = SEARCH_SPACE["ffm_pair_rate"]
    assert lo <= PAIR_WEIGHT_SCALE <= hi and ModelConfig("ffm").ffm_dim in SEARCH_SPACE["ffm_dim"]  # the defaults are inside


def test_pair_rate_is_validated_defaulted_and_built_into_the_model():
    import numpy as np

    from ctrflow.data.batch import FeatureSpec
    from ctrflow.models.registry import make_model

    with pytest.raises(ConfigError, match="'ffm_pair_rate' parameter of ModelConfig"):
        ModelConfig("ffm", ffm_pair_rate=0)
    old = ModelConfig("ffm").to_dict()
    del old["ffm_pair_rate"]  # a run.json / best_config.yaml written before the field
    assert ModelConfig.from_dict(old).ffm_pair_rate == PAIR_WEIGHT_SCALE
    model = make_model(ModelConfig("ffm", ffm_dim=2, ffm_pair_rate=4.0), FeatureSpec(("a", "b", "c"), (10, 10, 10)))
    assert model.pairs.scale == 4.0
    np.testing.assert_allclose(model.pairs.r.numpy(), 0.25)  # stored r / rate, starting at r = 1
    np.testing.assert_allclose(model.pairs.pair_weights.numpy()[0, 1], 1.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """4k/1.5k synthetic rows, tables capped at 256 rows per field."""
    return synthetic_split(tmp_path_factory.mktemp("tune_ffm"), 4000, 1500, seed=5, cap=256)


@pytest.mark.slow
def test_ffm_tune_writes_its_chosen_width_and_rate_and_old_runs_still_resume(tiny, tmp_path):
    from ctrflow.data.pipeline import PipelineOptions, open_batches
    from ctrflow.models.registry import make_model
    from ctrflow.train.loop import train

    base = TrainConfig(model=ModelConfig("ffm"), batch_size=1024)
    out = tmp_path / "tuned"
    s = tune(tiny / "train", out, base, valid=tiny / "valid", options=TuneOptions(trials=2, max_epochs=1, seed=2))
    assert s.trials == 2 and set(s.best_params) >= {"ffm_dim", "ffm_pair_rate"} and "embedding_dim" not in s.best_params
    tsv = (out / "trials.tsv").read_text().splitlines()
    assert "ffm_dim" in tsv[0] and "ffm_pair_rate" in tsv[0] and "embedding_dim" not in tsv[0]
    best = TrainConfig.load(out / "best_config.yaml")
    assert best.model.ffm_dim == s.best_params["ffm_dim"]
    assert best.model.ffm_pair_rate == pytest.approx(s.best_params["ffm_pair_rate"])
    with open_batches(tiny / "train", PipelineOptions(batch_size=8, shuffle=False)) as b:
        spec = b.spec
    model = make_model(best.model, spec)  # the config trains the model it names: its width and its rate
    n = model.layout.n_fields
    assert model.embedding.table.dim == (n - 1) * best.model.ffm_dim
    assert model.pairs.scale == pytest.approx(best.model.ffm_pair_rate)

    # A run folder written before the field (no ffm_pair_rate in run.json) resumes as the model it was.
    run = tmp_path / "run"
    cfg = base.replace(max_steps=2, epochs=1)
    train(tiny / "train", run, cfg, valid=tiny / "valid")
    info = json.loads((run / "run.json").read_text())
    del info["config"]["model"]["ffm_pair_rate"]
    (run / "run.json").write_text(json.dumps(info))
    assert train(tiny / "train", run, cfg.replace(max_steps=3), valid=tiny / "valid").steps == 3
    # A warm start at another rate would read the parent's r / rate as other weights: refused, nothing written.
    other = ModelConfig.from_dict({**cfg.model.to_dict(), "ffm_pair_rate": 2.0})
    with pytest.raises(ConfigError, match="ffm_pair_rate"):
        train(tiny / "train", tmp_path / "warm", cfg.replace(model=other), valid=tiny / "valid", warm_start=run)
    assert not (tmp_path / "warm").exists()
