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
