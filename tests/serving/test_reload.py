"""Hot reload: new versions swap in under load without failing a request; bad folders never replace good ones."""
from __future__ import annotations

import json
import threading
import time

import pytest

import serving_fixtures as sf
from ctrflow.errors import ConfigError, ModelNotFoundError
from ctrflow.serving.batcher import BatchingOptions
from ctrflow.serving.server import ServeOptions, serve
from ctrflow.serving.models import ManagerOptions, ModelManager, ModelNotReadyError, ModelSpec, load_model_config
from serving_fixtures import Client, columns


@pytest.fixture(scope="module")
def model():
    return sf.small_model()


def test_new_version_swaps_in_under_continuous_load_and_fails_no_request(tmp_path, model):
    from ctrflow.export import export

    run, version_dir, rows = model
    base = tmp_path / "ctr"
    sf.copy_version(version_dir, base, 1)
    server = serve(ServeOptions(model_base_path=str(base), port=0, poll_interval_s=0.1, drain_grace_s=10,
                                batching=BatchingOptions(max_batch_size=512, batch_timeout_ms=1.0)))
    stop = threading.Event()
    outcomes: list[tuple[int, str]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        c = Client(server.url)
        body = {"instances": rows[k * 10 : k * 10 + 10]}
        for _ in range(100_000):  # bounded; the test stops it long before
            if stop.is_set():
                break
            status, headers, data = c.post("/v1/models/ctr:predict", body)
            with lock:
                outcomes.append((status, headers.get("x-model-version", data.decode()[:200])))
        c.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        export(run, base)  # version 2, written aside and renamed into place like any export
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with lock:
                swapped = sum(1 for _, v in outcomes if v == "2")
            if swapped >= 20:
                break
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    try:
        failures = [o for o in outcomes if o[0] != 200]
        assert not failures, failures[:5]
        versions = [v for _, v in outcomes]
        assert versions[0] == "1" and versions[-1] == "2" and len(outcomes) > 50
        assert server.manager.versions("ctr") == [2]  # keep_versions=1: the old one is retired
        deadline = time.monotonic() + 15
        while any(s.state == "UNLOADING" for s in server.manager.status("ctr")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [s.state for s in server.manager.status("ctr")] == ["AVAILABLE"]
        for _ in range(100):  # a batch's counters land just after its callers are answered
            gauges = {g.name: g for g in server.manager.gauges()}["ctr"]
            if gauges.batcher["predictions"] >= 10 * len(outcomes):
                break
            time.sleep(0.02)
        assert gauges.swaps == 1 and gauges.batcher["predictions"] == 10 * len(outcomes)  # the old version's counts kept
    finally:
        server.stop()


def _manager(base, **spec):
    return ModelManager([ModelSpec("ctr", str(base), batching=None, **spec)], ManagerOptions(warmup=False))


def test_corrupt_half_copied_and_mismatched_versions_are_skipped_and_the_served_one_stays(tmp_path, model, caplog):
    _, version_dir, rows = model
    base = tmp_path / "ctr"
    sf.copy_version(version_dir, base, 1)
    manager = _manager(base).start(watch=False)
    try:
        assert manager.versions("ctr") == [1]
        # A version that is half copied (no variables yet), one whose graph is garbage, one with other features.
        half = base / "2"
        half.mkdir()
        (half / "saved_model.pb").write_bytes((version_dir / "saved_model.pb").read_bytes())
        (half / "ctrflow.json").write_text((version_dir / "ctrflow.json").read_text())
        corrupt = sf.copy_version(version_dir, base, 3)
        (corrupt / "saved_model.pb").write_bytes(b"\x00not a saved model")
        other = sf.copy_version(version_dir, base, 4)
        info = json.loads((other / "ctrflow.json").read_text())
        info["schema"]["categorical"][0]["name"] = "site"
        info["schema"]["columns"] = ["site" if c == "C1" else c for c in info["schema"]["columns"]]
        (other / "ctrflow.json").write_text(json.dumps(info))
        (base / ".tmp-5-123").mkdir()  # an export in progress: ignored, never reported
        with caplog.at_level("WARNING", logger="ctrflow.serving"):
            manager.poll_once()
        assert manager.versions("ctr") == [1]
        with manager.lease("ctr") as predictor:
            assert len(predictor.predict(columns(rows[:3]))) == 3
        status = {s.version: s for s in manager.status("ctr")}
        assert status[1].state == "AVAILABLE"
        assert status[2].state == "END" and "incomplete: missing variables" in status[2].error_message
        assert status[3].state == "END" and "cannot be loaded" in status[3].error_message
        assert status[4].state == "END" and "differ from the ones this model line accepted" in status[4].error_message
        assert 5 not in status
        assert sum("skipping version folder" in r.message for r in caplog.records) == 3
        # A failed folder is not retried while unchanged; once the copy completes it loads.
        caplog.clear()
        with caplog.at_level("WARNING", logger="ctrflow.serving"):
            manager.poll_once()
        assert not caplog.records
        for part in (version_dir / "variables").iterdir():
            (half / "variables").mkdir(exist_ok=True)
            (half / "variables" / part.name).write_bytes(part.read_bytes())
        for name in ("fingerprint.pb", "assets"):
            if (version_dir / name).is_file():
                (half / name).write_bytes((version_dir / name).read_bytes())
        info = json.loads((half / "ctrflow.json").read_text())
        info["version"] = 2
        (half / "ctrflow.json").write_text(json.dumps(info))
        manager.poll_once()
        # 4 (mismatch) and 3 (corrupt) still fail; 2 is now the newest loadable one and replaces 1.
        assert manager.versions("ctr") == [2]
    finally:
        manager.close()


def test_keep_versions_serves_the_newest_n_and_pins_work(tmp_path, model):
    _, version_dir, rows = model
    base = tmp_path / "ctr"
    for v in (1, 2, 3):
        sf.copy_version(version_dir, base, v)
    manager = _manager(base, keep_versions=2).start(watch=False)
    try:
        assert manager.versions("ctr") == [2, 3]
        with manager.lease("ctr") as p:
            assert p.path.name == "3"
        with manager.lease("ctr", 2) as p:
            assert p.path.name == "2"
        with pytest.raises(ModelNotFoundError, match="no version 1 loaded"):
            manager.acquire("ctr", 1)
        with pytest.raises(ModelNotFoundError, match="not served here"):
            manager.acquire("other")
        sf.copy_version(version_dir, base, 7)
        manager.poll_once()
        assert manager.versions("ctr") == [3, 7]
    finally:
        manager.close()


def test_a_lease_keeps_a_retired_version_open_until_it_is_returned(tmp_path, model):
    _, version_dir, rows = model
    base = tmp_path / "ctr"
    sf.copy_version(version_dir, base, 1)
    manager = ModelManager([ModelSpec("ctr", str(base), batching=BatchingOptions(batch_timeout_ms=0))],
                           ManagerOptions(warmup=False)).start(watch=False)
    try:
        old = manager.acquire("ctr")
        sf.copy_version(version_dir, base, 2)
        manager.poll_once()
        assert manager.versions("ctr") == [2]
        time.sleep(0.2)
        assert len(old.predictor.predict(columns(rows[:2]), timeout_ms=5000)) == 2  # still open for its holder
        manager.release(old)
        deadline = time.monotonic() + 10
        while manager.status("ctr")[-1].state == "UNLOADING" and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(Exception, match="closed"):
            old.predictor.predict(columns(rows[:2]))
    finally:
        manager.close()


def test_nothing_to_serve_is_not_ready_with_the_reason(tmp_path):
    (tmp_path / "empty").mkdir()
    manager = _manager(tmp_path / "empty").start(watch=False)
    try:
        assert not manager.ready()
        with pytest.raises(ModelNotReadyError, match="no version folder"):
            manager.acquire("ctr")
    finally:
        manager.close()


def test_model_config_file_is_validated_with_the_place_of_each_mistake(tmp_path):
    good = tmp_path / "m.yaml"
    good.write_text("models:\n  - {name: a, base_path: x, keep_versions: 2, batching: {max_batch_size: 64}}\n"
                    "  - {name: b, base_path: /abs/y, batching: false}\n")
    a, b = load_model_config(good)
    assert a.base_path == str(tmp_path / "x") and a.keep_versions == 2 and a.batching.max_batch_size == 64
    assert b.base_path == "/abs/y" and b.batching is None
    (tmp_path / "m.json").write_text(json.dumps({"models": [{"name": "a", "base_path": "x"}]}))
    assert load_model_config(tmp_path / "m.json")[0].name == "a"
    for text, message in [
        ("models: []\n", "non-empty 'models' list"),
        ("models:\n  - {name: a}\n", "'name' and 'base_path' are required"),
        ("models:\n  - {name: a, base_path: x, colour: red}\n", "unknown keys \\['colour'\\]"),
        ("models:\n  - {name: a, base_path: x, batching: {speed: 3}}\n", "unknown batching options"),
        ("models:\n  - {name: a, base_path: x}\n  - {name: a, base_path: y}\n", "more than once"),
        ("models:\n  - {name: 'a b', base_path: x}\n", "must start with a letter"),
        ("models:\n  - {name: a, base_path: x, keep_versions: 0}\n", "keep_versions"),
        ("models: [\n", "not valid YAML"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_model_config(bad)
