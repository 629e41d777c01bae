"""The training loop for real: models learn, runs resume after kill -9, bad states stop cleanly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ctrflow.errors import ConfigError, SchemaError, TrainingError
from ctrflow.models.registry import ModelConfig
from ctrflow.train.config import GroupOptimizer, TrainConfig
from ctrflow.train.evaluate import evaluate
from ctrflow.train.loop import train

from conftest import REPO

# The settings these tests were written for: one epoch, no held-out split, no L2, no early stopping
# (test_defaults.py covers the converging defaults).
SMALL = dict(batch_size=1024, learning_rate=0.003, checkpoint_every_steps=20, epochs=1, holdout_fraction=0.0, l2=0.0,
             early_stopping_patience=0, lr_scaling="none")


def cfg(kind="fm", **kw):
    return TrainConfig(model=ModelConfig(kind, embedding_dim=8, hidden=(64, 32)), **{**SMALL, **kw})


@pytest.mark.slow
def test_models_rank_lr_worse_than_fm_worse_than_deepfm_near_bayes(tmp_path):
    from ctrflow.data.convert import ConvertOptions, convert
    from ctrflow.data.generate import GenerateOptions, generate
    from ctrflow.schema import PRESETS

    generate(tmp_path / "train.csv", GenerateOptions(rows=300_000, seed=11))
    generate(tmp_path / "test.csv", GenerateOptions(rows=20_000, seed=11, split="test"))
    convert(tmp_path / "train.csv", tmp_path / "train", schema=PRESETS["synthetic"].capped(1 << 14), options=ConvertOptions(workers=1))
    convert(tmp_path / "test.csv", tmp_path / "test", like=tmp_path / "train", options=ConvertOptions(workers=1))
    results = {}
    fast_linear = {"linear": GroupOptimizer("lazyadam", 0.01)}
    settings = {  # each model at its own good learning rates (LR's weights learn fastest at 0.01)
        "lr": cfg("lr", learning_rate=0.01),
        "fm": cfg("fm", learning_rate=0.002, l2=1e-5, optimizer_groups=fast_linear),
        "deepfm": cfg("deepfm", learning_rate=0.003),
    }
    for kind, config in settings.items():
        train(tmp_path / "train", tmp_path / kind, config)
        results[kind] = evaluate(tmp_path / kind, tmp_path / "test")
    ll = {k: r["logloss"] for k, r in results.items()}
    bayes = results["fm"]["bayes_logloss"]
    assert ll["lr"] > ll["fm"] > ll["deepfm"], ll  # pairwise interactions are out of a linear model's reach
    assert min(ll.values()) - bayes < 0.04, (ll, bayes)  # the reported gap to the best possible
    assert all(r["auc"] > 0.7 for r in results.values())


def test_run_folder_holds_everything_and_evaluate_agrees(tmp_path, synthetic_shards):
    train_dir, test_dir, _ = synthetic_shards
    s = train(train_dir, tmp_path / "run", cfg("lr", log_every_steps=10), valid=test_dir)
    for name in ("run.json", "summary.json", "history.jsonl", "learning_curves.png", "tensorboard"):
        assert (tmp_path / "run" / name).exists(), name
    assert (tmp_path / "run" / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    hist = [json.loads(l) for l in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [h["kind"] for h in hist].count("train") >= 5 and hist[-1]["kind"] == "valid"
    ev = evaluate(tmp_path / "run", test_dir)
    assert ev["rows"] == 20_000 and abs(ev["logloss"] - s.valid["logloss"]) < 1e-6 and abs(ev["auc"] - s.valid["auc"]) < 1e-9


def test_per_group_optimizers_and_steps_per_call_match_single_steps(tmp_path, synthetic_shards):
    train_dir, _, _ = synthetic_shards
    groups = {"linear": GroupOptimizer("ftrl", 0.05, {"l1": 0.1}), "embedding": GroupOptimizer("adagrad", 0.05)}
    a = train(train_dir, tmp_path / "a", cfg("fm", optimizer="adam", optimizer_groups=groups, deterministic=True, max_steps=30))
    b = train(train_dir, tmp_path / "b", cfg("fm", optimizer="adam", optimizer_groups=groups, deterministic=True, max_steps=30, steps_per_call=5))
    assert a.steps == b.steps == 30
    ea, eb = evaluate(tmp_path / "a", train_dir), evaluate(tmp_path / "b", train_dir)
    assert ea["logloss"] == pytest.approx(eb["logloss"], abs=1e-6)


def test_same_seed_same_model(tmp_path, synthetic_shards):
    train_dir, test_dir, _ = synthetic_shards
    for name in ("a", "b"):
        train(train_dir, tmp_path / name, cfg("deepfm", deterministic=True, max_steps=25, seed=3))
    assert evaluate(tmp_path / "a", test_dir)["logloss"] == evaluate(tmp_path / "b", test_dir)["logloss"]


def test_resume_after_kill_continues_from_last_checkpoint(tmp_path, synthetic_shards):
    train_dir, test_dir, _ = synthetic_shards
    args = ["--data", str(train_dir), "--model", "fm", "--embedding-dim", "8", "--batch-size", "512", "--epochs", "2",
            "--checkpoint-every-steps", "15", "--deterministic", "--seed", "5", "--json", "--quiet"]
    # The uninterrupted reference run trains alongside the killed one and its rerun (two cores, not one).
    ref = subprocess.Popen([sys.executable, "-m", "ctrflow", "train", "--out", str(tmp_path / "ref"), *args],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    victim = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "ctrflow", "train", "--out", str(victim), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + 300
    state = victim / "checkpoints" / "checkpoint"  # names the latest once ckpt-45 is complete (its .index comes first)
    while time.time() < deadline and not (state.exists() and "ckpt-45" in state.read_text(errors="replace")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-epoch, between checkpoints
    proc.wait()
    again = subprocess.run([sys.executable, "-m", "ctrflow", "train", "--out", str(victim), *args],
                           capture_output=True, cwd=REPO, timeout=600)
    assert again.returncode == 0, again.stderr.decode()
    ref_out, ref_err = ref.communicate(timeout=600)
    assert ref.returncode == 0, ref_err.decode()
    s_ref, s_again = json.loads(ref_out.decode().splitlines()[-1]), json.loads(again.stdout.decode().splitlines()[-1])
    assert s_again["resumed_from_step"] >= 45 and s_again["steps"] == s_ref["steps"] and s_again["examples"] == s_ref["examples"]
    # The replayed batches and restored optimizer state make the resumed run equal to the uninterrupted one.
    assert evaluate(victim, test_dir)["logloss"] == pytest.approx(evaluate(tmp_path / "ref", test_dir)["logloss"], abs=1e-6)
    steps = [json.loads(l)["step"] for l in (victim / "history.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # no duplicated history from the redone steps


def test_a_checkpoint_not_in_the_index_is_never_restored(tmp_path, synthetic_shards):
    train_dir, _, _ = synthetic_shards
    train(train_dir, tmp_path / "r", cfg("lr", max_steps=20))
    ck = tmp_path / "r" / "checkpoints"
    (ck / "ckpt-999.index").write_bytes(b"half written")
    (ck / "ckpt-999.data-00000-of-00001").write_bytes(b"\0" * 10)
    s = train(train_dir, tmp_path / "r", cfg("lr", max_steps=40))
    assert s.resumed_from_step == 20 and s.steps == 40


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, synthetic_shards):
    train_dir, test_dir, _ = synthetic_shards
    train(train_dir, tmp_path / "r", cfg("fm", optimizer="sgd", learning_rate=0.01, max_steps=20))
    with pytest.raises(TrainingError, match="the loss became nan at step.*last good checkpoint .*ckpt-20 is kept"):
        train(train_dir, tmp_path / "r", cfg("fm", optimizer="sgd", learning_rate=1e30, max_steps=200))
    assert np.isfinite(evaluate(tmp_path / "r", test_dir)["logloss"])


def test_warm_start_and_mismatches(tmp_path, synthetic_shards):
    train_dir, test_dir, _ = synthetic_shards
    train(train_dir, tmp_path / "base", cfg("fm", epochs=1))
    fresh_ll = evaluate(tmp_path / "base", test_dir)["logloss"]
    w = train(train_dir, tmp_path / "warm", cfg("fm", max_steps=5), warm_start=tmp_path / "base")
    assert w.warm_started_from and w.warm_started_from.endswith("ckpt-59")
    assert evaluate(tmp_path / "warm", test_dir)["logloss"] < fresh_ll + 0.01
    with pytest.raises(TrainingError, match="model shapes differ.*embedding_dim: 8 there, 4 here"):
        train(train_dir, tmp_path / "bad", TrainConfig(model=ModelConfig("fm", embedding_dim=4), **SMALL), warm_start=tmp_path / "base")
    with pytest.raises(ConfigError, match="holds a .*fm.* model"):
        train(train_dir, tmp_path / "base", cfg("lr"))


def test_run_folder_from_another_schema_is_rejected(tmp_path, synthetic_shards, criteo_file):
    from ctrflow.data.convert import ConvertOptions, convert

    train_dir, _, _ = synthetic_shards
    train(train_dir, tmp_path / "r", cfg("lr", max_steps=3))
    convert(criteo_file, tmp_path / "criteo", schema="criteo", options=ConvertOptions(workers=1))
    with pytest.raises(SchemaError, match="another schema"):
        train(tmp_path / "criteo", tmp_path / "r", cfg("lr", max_steps=3))
    with pytest.raises(SchemaError, match="another schema"):
        evaluate(tmp_path / "r", tmp_path / "criteo")


def test_early_stopping_and_hogwild(tmp_path, synthetic_shards):
    train_dir, test_dir, _ = synthetic_shards
    s = train(train_dir, tmp_path / "es", cfg("fm", learning_rate=0.05, epochs=20, valid_every_steps=10, early_stopping_patience=2), valid=test_dir)
    assert s.stopped_early and s.steps < 20 * 59
    one = train(train_dir, tmp_path / "one", cfg("lr", learning_rate=0.01), valid=test_dir)
    hog = train(train_dir, tmp_path / "hw", cfg("lr", learning_rate=0.01, hogwild_threads=2), valid=test_dir)
    assert hog.steps == one.steps == 59 and hog.examples == 60_000
    # Lock-free updates cost a little quality (races on LazyAdam's moments), never divergence.
    assert hog.valid["auc"] > 0.6 and abs(hog.valid["auc"] - one.valid["auc"]) < 0.03
    assert abs(hog.valid["logloss"] - one.valid["logloss"]) < 0.012


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="'optimizer' parameter of TrainConfig must be one of .*Got 'adamw' instead. Did you mean 'adam'"):
        TrainConfig(optimizer="adamw")
    with pytest.raises(ConfigError, match="'batch_size' parameter of TrainConfig must be an int >= 1. Got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="kind"):
        ModelConfig("xgboost")
