"""The trainer's defaults and its answers to bad input, for real: held-out validation, the best
checkpoint restored, learning rates that follow the batch size, negative sampling calibrated back,
TensorFlow-free settings, full disks and leftovers of kill -9."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctrflow.errors import ConfigError
from ctrflow.models.registry import ModelConfig
from ctrflow.train.config import DEFAULT_LEARNING_RATES, GroupOptimizer, TrainConfig
from ctrflow.train.evaluate import evaluate
from ctrflow.train.loop import train

from conftest import REPO, cli_in_process


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctrflow", *args], capture_output=True, text=True, cwd=REPO, timeout=600, **kw)


def test_no_valid_holds_out_the_latest_rows_by_time_and_says_so(tmp_path, synthetic_shards):
    train_dir, _, _ = synthetic_shards
    s = train(train_dir, tmp_path / "r", TrainConfig(model=ModelConfig("lr"), batch_size=1024, max_steps=30))
    assert s.valid_source == "held_out_by_time" and "latest 10% of rows by time column 'day'" in s.valid_note
    assert s.valid is not None and s.valid["rows"] == 6_000 and s.examples == 30 * 1024
    from ctrflow.data.shards import load_manifest, read_shard

    times = {k: np.concatenate([read_shard(p).time for p in load_manifest(tmp_path / "r" / "holdout" / k).shard_paths()])
             for k in ("train", "valid")}
    assert len(times["train"]) == 54_000 and times["valid"].min() >= times["train"].max()  # the latest rows, none trained on
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["validation"]["source"] == "held_out_by_time"


def test_without_a_time_column_a_seeded_random_share_is_held_out(tmp_path, criteo_file):
    from ctrflow.data.convert import ConvertOptions, convert

    convert(criteo_file, tmp_path / "c", schema="criteo", options=ConvertOptions(workers=1))
    cfg = TrainConfig(model=ModelConfig("lr"), batch_size=256, max_steps=3, holdout_fraction=0.2)
    a = train(tmp_path / "c", tmp_path / "a", cfg)
    b = train(tmp_path / "c", tmp_path / "b", cfg)
    assert a.valid_source == "held_out_random" and "seeded random 20%" in a.valid_note and "no time column" in a.valid_note
    assert a.valid["logloss"] == b.valid["logloss"]  # same seed, same rows held out


def test_epochs_run_until_early_stopping_and_the_best_checkpoint_is_restored(tmp_path, synthetic_shards):
    train_dir, test_dir, _ = synthetic_shards
    # A fast embedding rate overfits 60k rows after the first epoch or two: the best is not the last.
    cfg = TrainConfig(model=ModelConfig("fm", embedding_dim=8), batch_size=1024, learning_rate=0.03, early_stopping_patience=2,
                      holdout_fraction=0.0)
    s = train(train_dir, tmp_path / "r", cfg, valid=test_dir)
    valids = [h for h in s.history if h["kind"] == "valid"]
    assert s.stopped_early and 2 < s.epochs < 10 and len(valids) == s.epochs
    best = min(valids, key=lambda h: h["logloss"])
    assert s.restored_best and s.best_step == best["step"] != valids[-1]["step"]
    assert valids[-1]["logloss"] > best["logloss"]
    ev = evaluate(tmp_path / "r", test_dir)  # the run's final checkpoint is the best one
    assert ev["checkpoint"].endswith(f"ckpt-best-{s.steps}")
    assert ev["logloss"] == pytest.approx(best["logloss"], abs=1e-6) == pytest.approx(s.valid["logloss"], abs=1e-6)
    again = train(train_dir, tmp_path / "r", cfg, valid=test_dir)  # a rerun of a finished run changes nothing
    assert again.steps == s.steps and evaluate(tmp_path / "r", test_dir)["logloss"] == pytest.approx(ev["logloss"], abs=1e-7)


def test_learning_rates_follow_the_batch_size():
    base = TrainConfig(model=ModelConfig("fm"))
    assert base.learning_rate is None and base.reference_batch_size == base.batch_size == 4096
    for g, rate in DEFAULT_LEARNING_RATES["lazyadam"].items():
        assert TrainConfig(model=ModelConfig("fm"), batch_size=4096).effective_learning_rate(g) == pytest.approx(rate)
        assert TrainConfig(model=ModelConfig("fm"), batch_size=1024).effective_learning_rate(g) == pytest.approx(rate / 2)
        assert TrainConfig(model=ModelConfig("fm"), batch_size=16384).effective_learning_rate(g) == pytest.approx(2 * rate)
    lin = TrainConfig(model=ModelConfig("fm"), optimizer="sgd", learning_rate=0.1, batch_size=1024, lr_scaling="linear")
    assert lin.effective_learning_rate("dense") == pytest.approx(0.025)
    assert TrainConfig(learning_rate=0.1, batch_size=8, lr_scaling="none").effective_learning_rate("linear") == 0.1


@pytest.mark.slow
def test_negative_sampling_is_corrected_in_evaluate_and_export(tmp_path, synthetic_shards):
    import tensorflow as tf

    from ctrflow.data.pipeline import PipelineOptions, open_batches
    from ctrflow.export import export

    train_dir, test_dir, _ = synthetic_shards
    # Defaults otherwise (held-out split, early stopping), the rates of batch 4096 at batch 1024 (small data):
    # the correction is exact for a model calibrated per example on the sampled data; an under-fit one is
    # less spread than the truth and, the correction being convex, comes out low (measured: 0.93 trained
    # to early stopping; the same model without sampling: 1.02; BENCHMARKS.md).
    cfg = TrainConfig(model=ModelConfig("lr"), batch_size=1024, lr_scaling="none", negative_sampling_rate=0.2)
    s = train(train_dir, tmp_path / "r", cfg)
    assert s.negative_sampling_rate == 0.2 and json.loads((tmp_path / "r" / "run.json").read_text())["negative_sampling_rate"] == 0.2
    assert s.examples < 0.35 * s.epochs * 54_000  # about 20% of the negatives (and every positive) were trained on
    ev = evaluate(tmp_path / "r", test_dir)
    assert 0.85 < ev["calibration"] < 1.15, ev["calibration"]  # uncorrected it would be ~3.5
    exp = export(tmp_path / "r", tmp_path / "models")
    loaded = tf.saved_model.load(exp.path).signatures["predict_ids"]
    with open_batches(test_dir, PipelineOptions(batch_size=20_000, shuffle=False)) as b:
        batch = next(iter(b))
    out = loaded(ids=tf.constant(batch.ids), numeric=tf.constant(batch.numeric))
    served = float(out["probabilities"].numpy().mean())
    base_rate = float(batch.label.mean())
    assert served == pytest.approx(base_rate, rel=0.15), (served, base_rate)
    uncorrected = float(tf.sigmoid(out["logits"] - np.log(0.2)).numpy().mean())  # what the sampled model says
    assert uncorrected > 2.5 * base_rate  # the correction is what calibrates it


def test_bad_settings_are_refused_at_construction_with_the_nearest_name():
    for rate in (0, -0.1, 1.5, float("nan"), True):
        with pytest.raises(ConfigError, match="'negative_sampling_rate' parameter of TrainConfig must be a number in \\(0, 1\\]"):
            TrainConfig(negative_sampling_rate=rate)
    with pytest.raises(ConfigError, match="Got 'lazyadm' instead. Did you mean 'lazyadam'"):
        TrainConfig(optimizer="lazyadm")
    with pytest.raises(ConfigError, match="must be one of 'l1', 'beta', 'initial_accumulator_value'. Got 'betta' instead. Did you mean 'beta'"):
        GroupOptimizer("ftrl", 0.1, {"betta": 1.0})  # an optimizer's own settings: checked here, not when training starts
    with pytest.raises(ConfigError, match="'beta_1' parameter of GroupOptimizer \\(adam\\) must be a number in \\[0, 1\\)"):
        TrainConfig(optimizer_groups={"dense": {"name": "adam", "learning_rate": 0.01, "extra": {"beta_1": 1.0}}})
    with pytest.raises(ConfigError, match="'batch_size' parameter of TrainConfig must be an int >= 1. Got '64'"):
        TrainConfig(batch_size="64")
    with pytest.raises(ConfigError, match="Unknown TrainConfig keys 'learning_rat' \\(did you mean 'learning_rate'"):
        TrainConfig.from_dict({"learning_rat": 0.1})


def test_l2_mode_is_checked_and_reaches_every_groups_optimizer():
    from ctrflow.train.core import make_optimizers

    with pytest.raises(ConfigError, match="'l2_mode' parameter of TrainConfig must be one of .*Got 'every_stp' instead. Did you mean 'every_step'"):
        TrainConfig(l2_mode="every_stp")
    for mode in ("touched", "every_step"):
        cfg = TrainConfig.from_dict(TrainConfig(model=ModelConfig("fm"), l2_mode=mode).to_dict())
        groups = make_optimizers(cfg, {"linear": [object()], "embedding": [object()]}, lambda v: "linear")
        assert {o.l2_mode for o in groups.optimizers.values()} == {mode} and cfg.l2_mode == mode


def test_a_run_recorded_before_l2_mode_existed_reads_as_touched(tmp_path):
    """Its checkpoints have no `last_step` slots: continuing it (continuous training, a resume) must rebuild "touched"."""
    from ctrflow.train.core import RUN_FILE, load_run_info

    d = TrainConfig(model=ModelConfig("fm")).to_dict()
    del d["l2_mode"]
    (tmp_path / RUN_FILE).write_text(json.dumps({"config": d}))
    assert TrainConfig.from_dict(load_run_info(tmp_path)["config"]).l2_mode == "touched"
    assert TrainConfig().l2_mode == "every_step"  # while new runs get the measured default


@pytest.mark.slow
def test_cli_bad_input_answers_error_exit_2_and_writes_nothing(tmp_path, synthetic_shards):
    train_dir, _, _ = synthetic_shards
    for args, message in (
        (["--model", "fmm"], "Did you mean 'fm'?"),
        (["--model", "fm", "--optimizer", "adagard"], "Did you mean 'adagrad'?"),
        (["--model", "fm", "--negative-sampling-rate", "0"], "must be a number in (0, 1]. Got 0.0 instead"),
        (["--model", "fm", "--negative-sampling-rate", "1.5"], "must be a number in (0, 1]. Got 1.5 instead"),
    ):
        r = cli("train", "--data", str(train_dir), "--out", str(tmp_path / "never"), *args, "--json")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert json.loads(r.stdout.splitlines()[-1])["type"] == "ConfigError"
        assert not (tmp_path / "never").exists()


def test_warm_start_across_model_kinds_is_refused_before_anything_is_written(tmp_path, synthetic_shards):
    train_dir, _, _ = synthetic_shards
    train(train_dir, tmp_path / "lr", TrainConfig(model=ModelConfig("lr"), batch_size=1024, max_steps=3, holdout_fraction=0.0))
    with pytest.raises(ConfigError, match="cannot warm start a fm model from .*lr: it holds a lr model"):
        train(train_dir, tmp_path / "fm", TrainConfig(model=ModelConfig("fm"), batch_size=1024, max_steps=3), warm_start=tmp_path / "lr")
    assert not (tmp_path / "fm").exists()


@pytest.mark.slow
def test_config_file_yaml_numbers_and_file_line_errors(tmp_path, synthetic_shards):
    train_dir, _, _ = synthetic_shards
    (tmp_path / "c.yaml").write_text("model: {kind: lr}\nlearning_rate: 1e-3\nbatch_size: 4096\nmax_steps: 2\nholdout_fraction: 0\n")
    assert TrainConfig.load(tmp_path / "c.yaml").learning_rate == 0.001
    # The run in this process (a new one imports TensorFlow); the bad file's answer below comes from a real process.
    r = cli_in_process("train", "--data", train_dir, "--out", tmp_path / "r", "--config", tmp_path / "c.yaml", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["learning_rates"]["linear"] == pytest.approx(0.001)
    (tmp_path / "bad.yaml").write_text("model: {kind: lr}\nlearning_rate: [1e-3\nbatch_size: 1024\n")
    r = cli("train", "--data", str(train_dir), "--out", str(tmp_path / "r2"), "--config", str(tmp_path / "bad.yaml"))
    assert r.returncode == 2 and f"{tmp_path / 'bad.yaml'}:3:" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_settings_modules_do_not_import_tensorflow():
    """Settings are checked where they are written (a config file, a notebook) without loading TensorFlow."""
    mods = ["ctrflow.train.config", "ctrflow.train.optimizer_settings", "ctrflow.models.registry", "ctrflow.models",
            "ctrflow.validation", "ctrflow.configfile", "ctrflow.schema"]
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {mods!r}]; "
            "from ctrflow.train.config import TrainConfig; TrainConfig(); "
            "print('tensorflow' in sys.modules, 'ctrflow.train.optimizers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.stdout.split() == ["False", "False"], r.stderr


def _full_disk(tmp_path: Path) -> tuple[Path, dict]:
    """A folder on a 64 KiB tmpfs (root), else a process limit on file size: writes fail at once."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                            capture_output=True).returncode == 0:
        (mnt / "filler").write_bytes(b"\0" * (60 << 10))
        return mnt, {}
    import resource

    return mnt, {"preexec_fn": lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))}


def test_train_on_a_full_disk_answers_error_exit_2_and_leaves_no_temp_file(tmp_path, synthetic_shards):
    import signal

    train_dir, _, _ = synthetic_shards
    mnt, popen = _full_disk(tmp_path)
    try:
        if popen:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited: a write past the limit fails with EFBIG
        r = cli("train", "--data", str(train_dir), "--out", str(mnt / "run"), "--model", "lr", "--max-steps", "2", "--json", **popen)
        assert r.returncode == 2 and r.stderr.startswith("error: cannot write") and "Traceback" not in r.stderr, r.stderr
        assert json.loads(r.stdout.splitlines()[-1])["type"] == "TrainingError"
        assert not (mnt / "run").exists()  # a new run folder that could not be written is not left half made
    finally:
        if popen:
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        else:
            subprocess.run(["umount", str(mnt)], capture_output=True)


def test_checkpoint_temp_folders_left_by_kill_9_are_removed_on_the_next_run(tmp_path, synthetic_shards):
    train_dir, _, _ = synthetic_shards
    cfg = TrainConfig(model=ModelConfig("lr"), batch_size=1024, max_steps=4, holdout_fraction=0.0)
    train(train_dir, tmp_path / "r", cfg)
    ck = tmp_path / "r" / "checkpoints"
    for leftover in ("ckpt-7_temp", "ckpt-9_temp_abc123"):  # what a process killed inside manager.save() leaves
        (ck / leftover).mkdir()
        (ck / leftover / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"\0" * 4096)
    s = train(train_dir, tmp_path / "r", cfg.replace(max_steps=8))
    assert s.resumed_from_step == 4 and s.steps == 8
    assert not [p.name for p in ck.iterdir() if "_temp" in p.name]


def test_evaluate_reports_calibration_and_draws_a_reliability_diagram(tmp_path, trained_run):
    run, _, test_dir = trained_run
    png = tmp_path / "rel.png"
    ev = evaluate(run, test_dir, reliability_png=png)
    pts = ev["reliability"]
    assert len(pts) == 10 and sum(p["rows"] for p in pts) == ev["rows"] == 20_000
    assert all(a["predicted"] <= b["predicted"] for a, b in zip(pts, pts[1:]))  # bins ordered by prediction
    assert pts[-1]["observed"] > pts[0]["observed"]  # a model that ranks: the top bin clicks more
    assert 0 <= ev["calibration_error"] < 0.05 and png.read_bytes()[:4] == b"\x89PNG"
    # In this process: real `ctrflow evaluate` processes are test_faults.py's (bad input) and test_damaged_checkpoint.py's.
    r = cli_in_process("evaluate", run, "--data", test_dir, "--json", "--quiet")
    assert r.returncode == 0 and (run / "reliability.png").exists(), r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["calibration"] == pytest.approx(ev["calibration"])
