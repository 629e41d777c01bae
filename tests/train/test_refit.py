"""The refit of the per-id weights (ctrflow.train.refit): it lowers the penalized training objective to a point
where its gradient vanishes, and `train --refit` saves it as the run's checkpoint and records the L2 it chose."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ctrflow.train.refit import Params, RefitData, RefitOptions, gradient, objective, refit


def _problem(seed: int = 0, rows: int = 4000) -> tuple[RefitData, Params]:
    """Two id fields (rows 0..49, 50..79), one numeric (row 80), an id x id cross and an id x numeric cross in a
    small table (collisions between the two pairs), labels from a known logit, a frozen offset."""
    rng = np.random.default_rng(seed)
    a, b = rng.zipf(1.5, rows) % 50, rng.integers(0, 30, rows)
    x = rng.normal(size=rows)
    buckets = 97
    c1, c2 = (a * 31 + b * 7) % buckets, (a * 13 + 5) % buckets
    truth = 0.8 * np.sin(a) + 0.5 * np.cos(b) + 0.7 * x + 1.2 * ((a + b) % 3 == 0) + 0.4 * np.sin(a) * x - 2.0
    offset = rng.normal(scale=0.3, size=rows)
    y = (rng.random(rows) < 1 / (1 + np.exp(-(truth + offset)))).astype(np.float64)
    d = RefitData(offset=offset, id_rows=np.stack([a, 50 + b], 1).astype(np.int32), values=x[:, None],
                  cross_rows=np.stack([c1, c2], 1).astype(np.int32), cross_x=np.stack([np.ones(rows), x], 1),
                  label=y, weight=rng.uniform(0.5, 1.5, rows), pair_fields=[(0, 1), (0, None)], pair_numeric=[None, 0])
    start = Params(rng.normal(scale=0.1, size=81), np.array([80]), rng.normal(scale=0.1, size=buckets), -1.0)
    return d, start


def test_refit_lowers_the_objective_to_where_its_gradient_vanishes():
    d, start = _problem()
    lam = 3.0
    fitted, res = refit(d, None, start, RefitOptions(lams=(lam,), max_sweeps=300, tol=1e-13))
    assert res.lam == lam and res.objective_after < res.objective_before - 10
    assert res.objective_after == pytest.approx(objective(d, fitted, lam))
    g = gradient(d, fitted, lam)
    g0 = gradient(d, start, lam)
    size = lambda p: max(np.abs(p.linear).max(), np.abs(p.cross).max(), abs(p.bias))  # noqa: E731
    assert size(g) < 1e-3 * size(g0), (size(g), size(g0))
    # the gradient itself against central differences of the objective, on a few weights of each kind
    for kind, i in (("linear", 3), ("linear", 55), ("linear", 80), ("cross", int(d.cross_rows[0, 0])), ("cross", int(d.cross_rows[0, 1]))):
        p, m = fitted.copy(), fitted.copy()
        getattr(p, kind)[i] += 1e-4
        getattr(m, kind)[i] -= 1e-4
        fd = (objective(d, p, lam) - objective(d, m, lam)) / 2e-4
        assert getattr(gradient(d, start, lam), kind)[i] != 0.0
        assert fd == pytest.approx(getattr(g, kind)[i], abs=2e-3)


def test_lam_is_chosen_on_valid_and_a_grid_is_checked():
    from ctrflow.errors import ConfigError

    d, start = _problem(0)
    v, _ = _problem(1)
    _, res = refit(d, v, start, RefitOptions(lams=(100.0, 10.0, 1.0, 0.1)))
    *search, final = res.grid  # the walk's fits, then the chosen point's to convergence
    chosen = min(search, key=lambda g: g["valid_logloss"])
    assert (res.lam, res.lam_cross) == (chosen["lam"], chosen["lam_cross"]) == (final["lam"], final["lam_cross"])
    assert res.valid_logloss_after == final["valid_logloss"]
    assert len({g["lam_cross"] / g["lam"] for g in res.grid}) > 1  # the crosses' own L2 was walked too
    with pytest.raises(ConfigError, match="lams"):
        RefitOptions(lams=(1.0, -2.0))


@pytest.mark.slow
def test_train_refit_saves_the_refit_as_the_runs_checkpoint(tmp_path):
    from conftest import cli_in_process, synthetic_split

    from ctrflow.train.checkpoints import restore_latest
    from ctrflow.train.core import build_model_from_run, load_run_info
    from ctrflow.train.refit import collect, gradient, read_params

    data = synthetic_split(tmp_path, 4000, 1500, seed=3, cap=512)
    run = tmp_path / "run"
    args = ["train", "--data", data / "train", "--valid", data / "valid", "--out", run, "--model", "lr", "--epochs", "1",
            "--cross-pairs", "C1:C2,C3:I1", "--cross-buckets", "4096", "--refit", "--json"]
    r = cli_in_process(*args)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    fit = s["refit"]
    assert fit["status"] in ("refit", "kept") and fit["lam"] in RefitOptions().lams
    assert fit["objective_after"] < fit["objective_before"]
    rerun = cli_in_process(*args[:-1])  # a rerun of the finished run: nothing to do, the record stands
    assert rerun.returncode == 0 and f"refit of the per-id weights: {fit['status']}" in rerun.stdout, rerun.stdout
    if fit["status"] == "refit":
        assert "ckpt-refit" in fit["checkpoint"] and s["checkpoint"] == fit["checkpoint"]
        assert s["valid_logloss"] == pytest.approx(fit["valid_logloss_after"], rel=1e-4)
        assert s["best_valid_logloss"] == s["valid_logloss"]  # the run's best now: a continued run compares against it
        assert (run / "checkpoints" / "best" / "checkpoint").exists()
        import tensorflow as tf

        info = load_run_info(run)
        model = build_model_from_run(info)
        assert restore_latest(run, model) == fit["checkpoint"]
        size = lambda g: max(np.abs(g.linear).max(), np.abs(g.cross).max(), abs(g.bias))  # noqa: E731
        after = size(gradient(collect(model, data / "train"), read_params(model), fit["lam"], fit["lam_cross"]))
        trained = tf.train.get_checkpoint_state(str(run / "checkpoints")).all_model_checkpoint_paths[-2]  # the one before
        tf.train.Checkpoint(model=model).read(trained).expect_partial()
        before = size(gradient(collect(model, data / "train"), read_params(model), fit["lam"], fit["lam_cross"]))
        assert after < 0.02 * before, (after, before)
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert any(h["kind"] == "refit" and h.get("lam") == fit["lam"] for h in history)


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "lazyadam", "ftrl"])
def test_the_runs_optimizer_moves_on_from_assigned_weights(kind):
    """After `adopt`, a step moves an assigned weight as it would any weight (FTRL, which recomputes a weight from
    its slots, moved it back to the value it had trained: a resumed FTRL run undid the refit)."""
    import tensorflow as tf

    from ctrflow.train.optimizers import make_optimizer

    grad = lambda g: tf.IndexedSlices(tf.constant(g, tf.float32), tf.constant([0, 2]), tf.constant([4, 1]))  # noqa: E731
    moved = []
    for assign in (False, True):
        var = tf.Variable(np.zeros((4, 1), np.float32), name=f"w_{kind}_{assign}")
        opt = make_optimizer(kind, learning_rate=0.1, l2=0.01)
        opt.apply_gradients([(grad([[0.5], [-0.3]]), var)])
        new = np.array([[1.5], [0.0], [-0.7], [2.0]], np.float32)
        var.assign(new if assign else var.numpy())
        if assign:
            opt.adopt(var)
        before = var.numpy()
        opt.apply_gradients([(grad([[0.0], [0.0]]) if kind == "ftrl" else grad([[0.2], [0.1]]), var)])
        moved.append(var.numpy() - before)
        if assign:
            np.testing.assert_allclose(var.numpy()[[1, 3]], new[[1, 3]])  # rows not updated keep it
    if kind == "ftrl":  # no gradient: the weight stays where it was put
        np.testing.assert_allclose(moved[1], 0.0, atol=1e-6)
    else:  # the step does not depend on where the weight is (no L2 in it for touched rows: l2 small, checked loosely)
        np.testing.assert_allclose(moved[1], moved[0], atol=0.02)


def test_a_zero_weight_split_is_refused():
    from ctrflow.errors import ConfigError

    d, start = _problem(0, rows=500)
    v, _ = _problem(1, rows=200)
    v.weight[:] = 0.0
    with pytest.raises(ConfigError, match="validation rows' weights sum to 0"):
        refit(d, v, start, RefitOptions(lams=(1.0,)))


@pytest.mark.slow
def test_collect_and_write_params_agree_with_the_models_logit(tmp_path):
    """Weights written by `write_params` give the logit `logits` computes from `collect`'s rows: the refit's layout
    (per-field or shared tables, rare-id remap, a normalized numeric, hashed crosses) is the model's."""
    import dataclasses

    import tensorflow as tf
    from conftest import synthetic_split

    from ctrflow.data.pipeline import PipelineOptions, open_batches
    from ctrflow.models import ModelConfig, make_model
    from ctrflow.train.refit import collect, logits, read_params, write_params

    data = synthetic_split(tmp_path, 600, 10, seed=1, cap=64) / "train"
    with open_batches(data, PipelineOptions(batch_size=1024, shuffle=False)) as b:
        spec = dataclasses.replace(b.spec, normalized_numeric=("I1",))
    for config in (dict(kind="fm", table_mode="per_field", min_count=2, embedding_dim=4),
                   dict(kind="ffm", table_mode="shared", ffm_dim=2, cross_pairs=(("C1", "C2"), ("C3", "I1")), cross_buckets=257)):
        model = make_model(ModelConfig(**config), spec)
        rng = np.random.default_rng(0)
        for v in model.trainable_variables:
            v.assign(rng.normal(0.0, 0.3, v.shape).astype(np.float32))
        if config.get("min_count"):
            model.set_id_counts([rng.integers(0, 4, n) for n in spec.id_buckets])
        d = collect(model, data)
        th = read_params(model)
        th.linear += rng.normal(0.0, 0.5, th.linear.shape)
        th.cross += rng.normal(0.0, 0.5, th.cross.shape)
        th.bias += 0.3
        write_params(model, th)
        with open_batches(data, PipelineOptions(batch_size=1024, shuffle=False)) as batches:
            served = np.concatenate([model(tf.constant(b.ids), tf.constant(b.numeric), training=False).numpy() for b in batches])
        assert len(served) == d.rows and len(th.cross) == (257 if config["kind"] == "ffm" else 0)
        np.testing.assert_allclose(logits(d, th), served, atol=1e-4, err_msg=config["kind"])


@pytest.mark.slow
def test_a_refit_that_fails_leaves_the_finished_training_as_it_was(tmp_path):
    """An error inside the refit (here: its validation folder is gone) is recorded as skipped with the reason; the
    trained model stays the run's latest checkpoint and its weights are untouched."""
    from ctrflow.data.batch import FeatureSpec
    from ctrflow.models import ModelConfig
    from ctrflow.train.config import TrainConfig
    from ctrflow.train.loop import Trainer
    from ctrflow.train.refit import read_params, refit_after_training

    config = TrainConfig(model=ModelConfig("lr"), refit=True)
    trainer = Trainer(tmp_path / "run", config, FeatureSpec(("a", "b"), (8, 8)))
    saved = trainer.save()
    before = read_params(trainer.model)
    records = []
    out = refit_after_training(trainer.model, trainer.checkpoints, tmp_path / "train", tmp_path / "gone", config, step=0,
                               examples=0, record=records.append, predict=trainer.predict, optimizer=trainer.optimizer)
    assert out["status"] == "skipped" and out["reason"].startswith("failed ("), out
    assert records[-1]["status"] == "skipped" and trainer.checkpoints.latest == saved
    np.testing.assert_array_equal(read_params(trainer.model).linear, before.linear)
