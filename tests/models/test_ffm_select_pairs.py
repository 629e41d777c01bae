"""`ctrflow train --model ffm --ffm-select-pairs K`: stage 1 in OUT/stage1, stage 2 in OUT with exactly K pairs
on (the others' r exactly 0 in the checkpoint), and the result evaluates and exports like any FFM run."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ctrflow.data.convert import ConvertOptions, convert
from ctrflow.schema import CategoricalField, Schema

SCHEMA = Schema("s", "y", tuple(CategoricalField(c, 32) for c in "abcd"), (), columns=("y", "a", "b", "c", "d"))


@pytest.mark.slow
def test_two_stage_keeps_k_pairs_and_exports(tmp_path, capsys):
    import tensorflow as tf

    from ctrflow.cli import main
    from ctrflow.models.ffm import PAIR_WEIGHT_SCALE
    from ctrflow.train.checkpoints import latest_checkpoint

    rng = np.random.default_rng(0)
    x = rng.integers(0, 8, size=(3000, 4))
    logit = -1.0 + 1.5 * ((x[:, 0] % 2) == (x[:, 1] % 2)) - 0.5 * (x[:, 2] > 4)  # one interacting pair, (a, b)
    y = (rng.random(3000) < 1 / (1 + np.exp(-logit))).astype(int)
    csv = tmp_path / "d.csv"
    csv.write_text("y,a,b,c,d\n" + "".join(f"{t},{','.join(map(str, r))}\n" for t, r in zip(y, x)))
    convert(csv, tmp_path / "shards", schema=SCHEMA, options=ConvertOptions(workers=1))
    run = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "shards"), "--out", str(run), "--model", "ffm", "--ffm-select-pairs", "2",
            "--epochs", "2", "--batch-size", "256", "--holdout-fraction", "0.2"]
    assert main(args + ["--json"]) == 0
    capsys.readouterr()
    sel = json.loads((run / "pair_selection.json").read_text())
    assert sel["pairs"] == 6 and len(sel["kept"]) == 2 and ["a", "b"] in [p["pair"] for p in sel["kept"]]
    assert latest_checkpoint(run / "stage1") is not None
    reader = tf.train.load_checkpoint(latest_checkpoint(run))
    key = next(k for k in reader.get_variable_to_shape_map() if k.startswith("model/") and k.endswith("pairs/r/.ATTRIBUTES/VARIABLE_VALUE"))
    r = reader.get_tensor(key) * PAIR_WEIGHT_SCALE
    upper = r[np.triu_indices(4, 1)]
    assert (upper != 0).sum() == 2 and abs(r[0, 1]) > 0  # exactly K pairs on after training, (a, b) among them
    assert main(["export", str(run), "--model-base-path", str(tmp_path / "models" / "m"), "--json"]) == 0
    assert main(["evaluate", str(run), "--data", str(tmp_path / "shards"), "--reliability-png", "none", "--json"]) == 0
    capsys.readouterr()
    lr = ["train", "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "lr"), "--model", "lr", "--ffm-select-pairs", "2"]
    assert main(lr) == 2  # only FFM has pairs to select
    assert "--ffm-select-pairs selects FFM's field pairs" in capsys.readouterr().err and not (tmp_path / "lr").exists()
    # a rerun resumes stage 2 with the pairs it recorded (the run's config names them), not a fresh stage 1
    assert main(args + ["--epochs", "3", "--json"]) == 0
    capsys.readouterr()
    info = json.loads((run / "run.json").read_text())
    assert sorted(map(tuple, info["config"]["model"]["ffm_pairs"])) == sorted(tuple(p["pair"]) for p in sel["kept"])


def test_ffm_pairs_config_round_trip_and_bad_names():
    from ctrflow.data.batch import FeatureSpec
    from ctrflow.errors import ConfigError
    from ctrflow.models.registry import ModelConfig, make_model

    c = ModelConfig("ffm", ffm_dim=2, ffm_pairs=[["b", "a"], ["c", "d"]])
    assert c.ffm_pairs == (("b", "a"), ("c", "d")) and ModelConfig.from_dict(c.to_dict()) == c
    model = make_model(c, FeatureSpec(tuple("abcd"), (8, 8, 8, 8)))
    r = model.pairs.pair_weights.numpy()
    assert {(i, j) for i, j in zip(*np.triu_indices(4, 1)) if r[i, j] != 0} == {(0, 1), (2, 3)}
    with pytest.raises(ConfigError, match="'zz', which is not one of this model's fields"):
        make_model(ModelConfig("ffm", ffm_pairs=[("a", "zz")]), FeatureSpec(tuple("abcd"), (8, 8, 8, 8)))
    for bad in ([("a", "a")], [], [("a",)], "ab"):
        with pytest.raises(ConfigError, match="ffm_pairs"):
            ModelConfig("ffm", ffm_pairs=bad)
