"""Continuous training for real: drifting synthetic days land in a folder, get trained, gated, published."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ctrflow.errors import ConfigError
from ctrflow.export import EXPORT_INFO, find_versions
from ctrflow.models.registry import ModelConfig
from ctrflow.train.config import TrainConfig
from ctrflow.continuous import (
    DECISIONS_FILE,
    ContinuousOptions,
    StateLock,
    StateLockedError,
    continuous_train,
    read_decisions,
    status,
)

from conftest import REPO, criteo_rows

# Names out of alphabetical order on purpose: slices must be taken by their manifest's time range.
DAYS = ("mon", "tue", "wed", "thu", "fri")
ROWS_PER_DAY = 6000
CFG = TrainConfig(model=ModelConfig("fm", embedding_dim=4), batch_size=512, learning_rate=0.01, checkpoint_every_steps=3,
                  l2=0.0, lr_scaling="none")  # the settings these tests were written for
# Slices of 6k rows teach little: a generous tolerance keeps these tests about the mechanics. The
# divergence test uses a learning rate that turns the loss NaN, which no tolerance lets through.
OPTS = ContinuousOptions(tolerance=0.5, reset_stale_after_slices=1)


@pytest.fixture(scope="module")
def days(tmp_path_factory) -> Path:
    """Five drifting synthetic days, each converted (`like` the first) into its own shard folder."""
    from ctrflow.data.convert import ConvertOptions, convert
    from ctrflow.data.generate import GenerateOptions, generate
    from ctrflow.schema import PRESETS

    root = tmp_path_factory.mktemp("days")
    generate(root / "all.csv", GenerateOptions(rows=ROWS_PER_DAY * len(DAYS), seed=5, days=len(DAYS)))
    header, *rows = (root / "all.csv").read_text().splitlines(keepends=True)
    for d, name in enumerate(DAYS):
        (root / f"{name}.csv").write_text(header + "".join(r for r in rows if r.startswith(f"{d},")))
        kw = {"schema": PRESETS["synthetic"].capped(1 << 10)} if d == 0 else {"like": root / "slices" / DAYS[0]}
        convert(root / f"{name}.csv", root / "slices" / name, options=ConvertOptions(workers=1), **kw)
    return root / "slices"


def _land(days: Path, incoming: Path, *names: str) -> None:
    incoming.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copytree(days / n, incoming / n)


def _bad_slices(days: Path, incoming: Path, tmp: Path) -> None:
    """Another schema, a damaged shard, an unreadable manifest, an empty slice."""
    from ctrflow.data.convert import ConvertOptions, convert
    from ctrflow.schema import PRESETS

    (tmp / "criteo.tsv").write_text("\n".join(criteo_rows(1500)) + "\n")
    convert(tmp / "criteo.tsv", incoming / "bad-schema", schema=PRESETS["criteo"].capped(1 << 10), options=ConvertOptions(workers=1))
    shutil.copytree(days / "tue", incoming / "broken")  # same time range as tue; sorts before it by name
    shard = next((incoming / "broken").glob("part-*.ctrs"))
    shard.write_bytes(shard.read_bytes()[:-4096])
    (incoming / "garbled").mkdir()
    (incoming / "garbled" / "manifest.json").write_text("{not json")
    shutil.copytree(days / "wed", incoming / "empty")
    man = json.loads((incoming / "empty" / "manifest.json").read_text())
    for s in man["shards"]:
        (incoming / "empty" / s["file"]).unlink()
    (incoming / "empty" / "manifest.json").write_text(json.dumps({**man, "rows": 0, "shards": [], "time_range": None}))


@pytest.fixture(scope="module")
def followed(days, tmp_path_factory):
    """One `once` pass over mon..wed plus every kind of bad slice: (root, summary)."""
    root = tmp_path_factory.mktemp("followed")
    _land(days, root / "incoming", "mon", "tue", "wed")
    _bad_slices(days, root / "incoming", root)
    summary = continuous_train(root / "incoming", root / "models" / "ctr", root / "state", CFG, OPTS, once=True)
    return root, summary


def _copy(root: Path, to: Path) -> Path:
    for part in ("incoming", "models", "state"):
        shutil.copytree(root / part, to / part)
    return to


def test_once_takes_slices_in_time_order_publishes_and_logs_every_decision(followed):
    root, summary = followed
    log = read_decisions(root / "state")
    assert [(d["slice"], d["decision"]) for d in log] == [
        ("garbled", "quarantined"), ("mon", "published"), ("broken", "quarantined"), ("tue", "published"),
        ("wed", "published"), ("bad-schema", "rejected"), ("empty", "quarantined"),
    ]
    assert [d.slice for d in summary.decisions] == [d["slice"] for d in log]
    by = {d["slice"]: d for d in log}
    assert [by[n]["version"] for n in ("mon", "tue", "wed")] == [1, 2, 3]
    assert find_versions(root / "models" / "ctr") == [1, 2, 3]
    for v, n in enumerate(("mon", "tue", "wed"), start=1):
        info = json.loads((root / "models" / "ctr" / str(v) / EXPORT_INFO).read_text())
        assert Path(info["run"]) == root / "state" / "runs" / n
    # Each candidate warm-starts from the line: the previous published run (or its stale-row reset copy).
    assert by["mon"]["warm_start"] is None and by["tue"]["warm_start"] == "runs/mon"
    assert by["wed"]["warm_start"] in ("runs/tue", "work/wed/warm")
    assert by["tue"]["published"]["logloss"] > 0 and by["tue"]["candidate"]["rows"] == by["tue"]["rows_gate"]
    assert by["mon"]["rows_train"] + by["mon"]["rows_gate"] == ROWS_PER_DAY and by["mon"]["rows_gate"] == ROWS_PER_DAY // 10
    assert "schema" in by["bad-schema"]["reason"] and "damaged" in by["broken"]["reason"]
    assert "unreadable" in by["garbled"]["reason"] and "only 0 rows" in by["empty"]["reason"]
    for n in ("broken", "garbled", "empty"):
        assert (root / "state" / "quarantine" / n).is_dir() and not (root / "incoming" / n).exists()
    st = status(root / "state")
    assert (st["published_version"], st["published"], st["rejected"], st["quarantined"]) == (3, 3, 1, 3)
    assert st["line_run"] == str(root / "state" / "runs" / "wed") and st["running_pid"] is None
    saved = json.loads((root / "state" / "state.json").read_text())
    assert saved["published_version"] == 3 and saved["line_run"] == "runs/wed"
    assert not list((root / "state" / "work").iterdir())  # splits are dropped once decided


def test_reset_stale_rows_returns_them_to_their_initial_values(followed):
    from ctrflow.data import shards
    from ctrflow.train.loop import build_model_from_run, load_run_info, restore_latest

    root, _ = followed
    log = {d["slice"]: d for d in read_decisions(root / "state")}
    weights, touched = {}, {}
    for n in ("mon", "tue", "wed"):
        run = root / "state" / "runs" / n
        model = build_model_from_run(load_run_info(run))
        restore_latest(run, model)
        weights[n] = model.linear.table.tables[0].numpy()[:, 0]
        lay = model.layout
        # The rows the slice trained on: its first rows_train rows (a synthetic day has one time value).
        ids = np.concatenate([shards.read_shard(p).ids for p in shards.load_manifest(root / "incoming" / n).shard_paths()])
        ids = ids[: log[n]["rows_train"]]
        rows = np.zeros(len(weights[n]), bool)
        for off, c in zip(lay.offsets, lay.id_columns):
            rows[off + ids[:, c]] = True
        touched[n] = rows
    stale = touched["mon"] & ~touched["tue"]  # with K = 1: untouched by the last line slice before wed
    assert log["wed"]["reset_rows"] == stale.sum() > 0 and log["wed"]["warm_start"] == "work/wed/warm"
    assert np.count_nonzero(weights["tue"][stale]) > 0.9 * stale.sum()  # learned on mon, kept through tue
    assert np.all(weights["wed"][stale & ~touched["wed"]] == 0.0)  # reset to the linear init, then left alone
    with np.load(root / "state" / "touched.npz") as z:
        assert list(z["applied"]) == ["mon", "tue", "wed"]


def test_diverging_candidate_is_rejected_and_the_previous_version_stays(followed, days, tmp_path):
    root = _copy(followed[0], tmp_path)
    opts = ContinuousOptions(tolerance=0.5)
    _land(days, root / "incoming", "thu")
    boom = CFG.replace(optimizer="sgd", learning_rate=1e30)
    s = continuous_train(root / "incoming", root / "models" / "ctr", root / "state", boom, opts, once=True)
    [d] = s.decisions
    assert (d.slice, d.decision, d.version) == ("thu", "rejected", None) and d.reason.startswith("diverged: the loss became n")
    assert find_versions(root / "models" / "ctr") == [1, 2, 3] and s.published_version == 3
    _land(days, root / "incoming", "fri")
    s = continuous_train(root / "incoming", root / "models" / "ctr", root / "state", CFG, opts, once=True)
    [d] = s.decisions
    assert (d.slice, d.decision, d.version, d.warm_start) == ("fri", "published", 4, "runs/wed")  # not thu's run
    assert d.published["logloss"] > 0
    with pytest.raises(ConfigError, match="other shapes.*embedding_dim: 4 there, 8 here"):
        continuous_train(root / "incoming", root / "models" / "ctr", root / "state",
                         CFG.replace(model=ModelConfig("fm", embedding_dim=8)), opts, once=True)


def test_crash_between_export_and_log_is_reconciled_without_a_second_version(followed, tmp_path):
    root = _copy(followed[0], tmp_path)
    state, base = root / "state", root / "models" / "ctr"
    lines = (state / DECISIONS_FILE).read_text().splitlines(keepends=True)
    wed_at = next(i for i, l in enumerate(lines) if json.loads(l)["slice"] == "wed")
    # As if killed after wed's export, mid-append of its decision, with an export of a dead process half-written.
    (state / DECISIONS_FILE).write_text("".join(lines[:wed_at]) + '{"slice": "wed", "deci')
    dead = subprocess.Popen(["true"])
    dead.wait()
    (base / f".tmp-4-{dead.pid}").mkdir()
    summary_mtime = (state / "runs" / "wed" / "summary.json").stat().st_mtime_ns
    s = continuous_train(root / "incoming", base, state, CFG, OPTS, once=True)
    assert [(d.slice, d.decision, d.version) for d in s.decisions] == [("wed", "published", 3), ("bad-schema", "rejected", None)]
    assert find_versions(base) == [1, 2, 3] and not (base / f".tmp-4-{dead.pid}").exists()
    assert (state / "runs" / "wed" / "summary.json").stat().st_mtime_ns == summary_mtime  # not trained again
    assert all(json.loads(l) for l in (state / DECISIONS_FILE).read_text().splitlines())


def test_a_second_instance_on_the_same_state_refuses_naming_the_holder(followed, tmp_path):
    root = _copy(followed[0], tmp_path)
    with StateLock(root / "state"):
        with pytest.raises(StateLockedError, match=rf"in use by another `ctrflow continuous` \(pid {os.getpid()}\)"):
            continuous_train(root / "incoming", root / "models" / "ctr", root / "state", CFG, OPTS, once=True)
        assert status(root / "state")["running_pid"] == os.getpid()
    continuous_train(root / "incoming", root / "models" / "ctr", root / "state", CFG, OPTS, once=True)  # free again


def test_polling_follower_publishes_what_lands_and_a_watching_server_hot_reloads_it(followed, days, tmp_path):
    from ctrflow.data import shards
    from ctrflow.serving.models import ManagerOptions, ModelManager, ModelSpec

    root = _copy(followed[0], tmp_path)
    base = root / "models" / "ctr"
    manager = ModelManager([ModelSpec("ctr", str(base), batching=None)], ManagerOptions(poll_interval_s=0.1, warmup=False))
    manager.start()
    try:
        assert manager.versions("ctr") == [3]
        _land(days, root / "incoming", "thu")
        (root / "incoming" / "fri.partial-123").mkdir()  # a conversion in progress is not a slice
        opts = ContinuousOptions(tolerance=0.5, poll_seconds=0.05, max_polls=2)
        s = continuous_train(root / "incoming", base, root / "state", CFG, opts)
        assert s.polls == 2 and [(d.slice, d.version) for d in s.decisions] == [("thu", 4)]
        deadline = time.time() + 60
        while manager.versions("ctr") != [4] and time.time() < deadline:
            time.sleep(0.05)
        assert manager.versions("ctr") == [4] and not [st for st in manager.status("ctr") if st.state == "END"]
        batch = shards.read_shard(next((root / "incoming" / "thu").glob("part-*.ctrs")))
        with manager.lease("ctr") as predictor:
            p = predictor.predict_ids(np.array(batch.ids[:64]), np.array(batch.numeric[:64]))
        assert p.shape == (64,) and np.all((p > 0) & (p < 1))
    finally:
        manager.close()


@pytest.mark.slow
def test_kill_9_at_random_points_then_rerun_trains_each_slice_once_and_never_shows_a_partial_version(days, tmp_path):
    _land(days, tmp_path / "incoming", "mon", "tue", "wed")
    base, state = tmp_path / "models" / "ctr", tmp_path / "state"
    script = (
        "import json, sys\n"
        "from ctrflow.train.config import TrainConfig\n"
        "from ctrflow.continuous import ContinuousOptions, continuous_train\n"
        "continuous_train(sys.argv[1], sys.argv[2], sys.argv[3], TrainConfig.from_dict(json.loads(sys.argv[4])),\n"
        "                 ContinuousOptions(tolerance=0.5), once=True)\n"
    )
    cmd = [sys.executable, "-c", script, str(tmp_path / "incoming"), str(base), str(state), json.dumps(CFG.to_dict())]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    runs = state / "runs"

    def exporting() -> bool:
        return base.exists() and any(p.name.startswith(".tmp-") for p in base.iterdir())

    def checkpointed(name: str):
        return lambda: (runs / name / "checkpoints" / "checkpoint").exists()

    def versions_exceed(n: int):
        return lambda: len(find_versions(base)) > n

    # Kill points, each with a random delay of at most `jitter` s after it is seen: mid-training (a
    # checkpoint written), mid-export (its temp folder exists), right after a version appeared (before or
    # after its decision is logged), then mid-training and mid-export of the next slice.
    milestones = [(checkpointed("mon"), 0.3), (exporting, 0.0), (versions_exceed(0), 0.02),
                  (checkpointed("tue"), 0.3), (exporting, 0.0)]
    rng = np.random.default_rng(7)
    kills = 0
    for reached, jitter in milestones:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and not reached() and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, jitter))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait()
        visible = sorted(int(p.name) for p in base.iterdir() if not p.name.startswith(".")) if base.exists() else []
        assert visible == find_versions(base)  # every visible version folder is complete
    # The rerun that finishes the job, in this process (a sixth process would import TensorFlow again): what
    # it must reconcile is on disk, left by the killed ones.
    continuous_train(tmp_path / "incoming", base, state, CFG, ContinuousOptions(tolerance=0.5), once=True)
    assert kills >= 4
    log = read_decisions(state)
    assert [(d["slice"], d["decision"], d["version"]) for d in log] == [("mon", "published", 1), ("tue", "published", 2), ("wed", "published", 3)]
    assert find_versions(base) == [1, 2, 3] and not list(base.glob(".tmp-*"))
    assert [d["warm_start"] for d in log] == [None, "runs/mon", "runs/tue"]
    for d in log:
        info = json.loads((base / str(d["version"]) / EXPORT_INFO).read_text())
        assert Path(info["run"]).name == d["slice"]
        summary = json.loads((state / d["run"] / "summary.json").read_text())
        assert summary["examples"] == d["rows_train"]  # one pass over the slice: no batch trained twice
        steps = [json.loads(l)["step"] for l in (state / d["run"] / "history.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps))


def test_bad_options_are_named():
    with pytest.raises(ConfigError, match="'tolerance' parameter of ContinuousOptions must be a number >= 0. Got -0.1"):
        ContinuousOptions(tolerance=-0.1)
    with pytest.raises(ConfigError, match="'holdout_fraction'.*Got 0.9"):
        ContinuousOptions(holdout_fraction=0.9)
    with pytest.raises(ConfigError, match="'reset_stale_after_slices'.*Got 0"):
        ContinuousOptions(reset_stale_after_slices=0)
    with pytest.raises(ConfigError, match="'poll_seconds'"):
        ContinuousOptions(poll_seconds=0)
