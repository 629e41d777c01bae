"""The training-state estimate (`ctrflow.train.memory`) against the state the trainer really builds, and the
refusal when it cannot fit: one `error:` line, exit 2, nothing written."""
from __future__ import annotations

from dataclasses import replace

import pytest

from ctrflow.data.batch import FeatureSpec
from ctrflow.errors import ConfigError
from ctrflow.models.registry import ModelConfig
from ctrflow.train.config import GroupOptimizer, TrainConfig
from ctrflow.train.memory import HEADROOM_BYTES, check_training_memory, estimate_training_state

from conftest import cli_in_process

SPEC = FeatureSpec(("site", "app", "hour", "n"), (3000, 500, 24, 8), ("n",), ("n",))  # 3 id fields + 1 normalized


def _built_bytes(config: TrainConfig, spec: FeatureSpec) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes of the tables and of their optimizer slots, as the trainer makes them (loop.Trainer's steps)."""
    from ctrflow.models.registry import make_model
    from ctrflow.train.core import make_optimizers

    model = make_model(config.model, spec)
    groups = model.variable_groups()
    group_of = {v.ref(): g for g, vs in groups.items() for v in vs}
    opt = make_optimizers(config, groups, lambda v: group_of[v.ref()])
    opt.build(model.trainable_variables)
    tables = {g: sum(v.shape.num_elements() * v.dtype.size for v in groups[g]) for g in ("linear", "embedding") if groups[g]}
    if getattr(model, "id_remap", None) is not None:
        tables["id_remap"] = model.id_remap.shape.num_elements() * model.id_remap.dtype.size
    slots = {}
    for g in tables:
        if g == "id_remap":
            continue
        names = {v.name[:-2] for v in groups[g]}
        o = opt.optimizers[g]
        slots[g] = sum(s.shape.num_elements() * s.dtype.size for k, d in o.slots.items() if k in names for s in d.values())
    return tables, slots


@pytest.mark.parametrize("config", [
    TrainConfig(model=ModelConfig("ffm", ffm_dim=3, min_count=2)),  # lazyadam everywhere, l2 every_step (+ last_step rows)
    TrainConfig(model=ModelConfig("deepfm", embedding_dim=8, table_mode="per_field", hidden=(8,)), l2=0.0,
                optimizer_groups={"linear": GroupOptimizer("ftrl", 0.1), "embedding": GroupOptimizer("adagrad", 0.05)}),
    TrainConfig(model=ModelConfig("lr"), optimizer="sgd", learning_rate=0.1),
], ids=["ffm-lazyadam", "deepfm-ftrl-adagrad-per-field", "lr-sgd"])
def test_estimate_is_what_the_trainer_builds(config):
    est = estimate_training_state(config, SPEC)
    tables, slots = _built_bytes(config, SPEC)
    assert est.tables == tables and est.slots == slots
    assert est.rows == 3000 + 500 + 24 + 1
    if config.model.kind == "ffm":  # (S - 1) x ffm_dim floats per row, S = 4 fields
        assert tables["embedding"] == est.rows * 3 * 3 * 4


def test_a_state_that_cannot_fit_is_refused_with_the_split_and_the_fixes():
    config = TrainConfig(model=ModelConfig("ffm"))
    big = FeatureSpec(("a", "b", "c"), (1 << 22, 1 << 22, 64))
    est = check_training_memory(config, big, available=64 << 30)  # fits in 64 GiB: returns the estimate
    assert est.peak < 64 << 30 and est.peak > est.state + HEADROOM_BYTES
    with pytest.raises(ConfigError) as e:
        check_training_memory(config, big, available=est.peak - 1)
    msg = str(e.value)
    for part in ("ffm model", "tables", "optimizer slots", "lazyadam", "available", "--max-buckets 2097152", "--ffm-dim 2 (now 4",
                 "--skip-memory-check"):
        assert part in msg, part
    capped = replace(big, id_buckets=(1 << 21, 1 << 21, 64))  # the cap it suggests does fit
    check_training_memory(config, capped, available=est.peak - 1)


@pytest.mark.slow
def test_cli_train_refuses_tables_that_cannot_fit(tmp_path):
    from ctrflow.data.convert import ConvertOptions, convert
    from ctrflow.data.generate import GenerateOptions, generate
    from ctrflow.schema import PRESETS

    s = PRESETS["synthetic"]
    huge = replace(s, categorical=tuple(replace(f, hash_buckets=1 << 28) for f in s.categorical))  # ~7e9 rows: petabytes
    generate(tmp_path / "t.csv", GenerateOptions(rows=500, seed=1))
    convert(tmp_path / "t.csv", tmp_path / "shards", schema=huge, options=ConvertOptions(workers=1))
    run = tmp_path / "run"
    # In this process (a new one imports TensorFlow first): the command's own answer; real `ctrflow train`
    # processes on bad input are test_faults.py's and test_defaults.py's.
    r = cli_in_process("train", "--data", tmp_path / "shards", "--out", run, "--model", "ffm")
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ffm model" in errors[0] and "--max-buckets" in errors[0], r.stderr
    assert "Traceback" not in r.stderr and not run.exists()
