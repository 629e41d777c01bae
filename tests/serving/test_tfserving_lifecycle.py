"""Version life cycle the TF Serving way: recorded warmup requests, plain SavedModels, the accepted schema
kept across restarts, and the `ctrflow-model-server` console script with TF Serving's flags."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import serving_fixtures as sf
from ctrflow.serving.models import ACCEPTED_SCHEMA_FILE, ManagerOptions, ModelManager, ModelSpec
from serving_fixtures import Client, columns


@pytest.fixture(scope="module")
def model():
    return sf.small_model()


def test_export_writes_prediction_log_warmup_records_that_the_server_replays(tmp_path, model):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    from ctrflow.serving.predictor import Predictor

    _, version_dir, _ = model
    warmup = version_dir / "assets.extra" / "tf_serving_warmup_requests"
    records = [prediction_log_pb2.PredictionLog.FromString(r) for r in tf.data.TFRecordDataset(str(warmup)).as_numpy_iterator()]
    assert [r.predict_log.request.model_spec.signature_name for r in records] == ["serving_default"] * 3 + ["predict_ids"]
    assert records[0].predict_log.request.inputs["I1"].dtype == 2  # DT_DOUBLE, what serving_default takes
    with Predictor.load(version_dir) as p:
        assert p.warmup() == 4
    # A broken warmup file is a broken export: the version is refused with the reason, as in TF Serving.
    bad = sf.copy_version(version_dir, tmp_path / "ctr", 1)
    (bad / "assets.extra" / "tf_serving_warmup_requests").write_bytes(b"not a tfrecord file at all")
    with ModelManager([ModelSpec("ctr", str(tmp_path / "ctr"), batching=None)], ManagerOptions()) as m:
        m.start(watch=False)
        (status,) = m.status("ctr")
        assert status.state == "END" and "warmup" in status.error_message


def test_plain_savedmodel_without_signatures_is_refused_with_the_reason(tmp_path):
    sf.plain_saved_model(tmp_path / "m", 1, with_signature=False)
    with ModelManager([ModelSpec("m", str(tmp_path / "m"), batching=None)], ManagerOptions()) as m:
        m.start(watch=False)
        (status,) = m.status("m")
        assert status.state == "END" and "no serving signature" in status.error_message


def test_accepted_schema_survives_a_restart_and_refuses_the_version_a_reload_refused(tmp_path, model):
    _, version_dir, rows = model
    base = tmp_path / "ctr"
    sf.copy_version(version_dir, base, 1)
    spec = ModelSpec("ctr", str(base), batching=None)
    with ModelManager([spec], ManagerOptions(warmup=False)) as m:
        m.start(watch=False)
        assert m.versions("ctr") == [1]
    state = json.loads((base / ACCEPTED_SCHEMA_FILE).read_text())
    assert state["features"]["categorical"][0] == "C1" and state["accepted_version"] == 1
    # While stopped, a version with other features appears; before, only the in-memory version was compared.
    other = sf.copy_version(version_dir, base, 2)
    info = json.loads((other / "ctrflow.json").read_text())
    info["schema"]["categorical"][0]["name"] = "site"
    info["schema"]["columns"] = ["site" if c == "C1" else c for c in info["schema"]["columns"]]
    (other / "ctrflow.json").write_text(json.dumps(info))
    with ModelManager([spec], ManagerOptions(warmup=False)) as m:
        m.start(watch=False)
        assert m.versions("ctr") == [1]
        status = {s.version: s for s in m.status("ctr")}
        assert status[2].state == "END" and "this model line accepted" in status[2].error_message
        with m.lease("ctr") as p:
            assert len(p.predict(columns(rows[:2]))) == 2
    # allow_schema_change accepts it, and the line remembers the new schema.
    with ModelManager([ModelSpec("ctr", str(base), batching=None, allow_schema_change=True)], ManagerOptions(warmup=False)) as m:
        m.start(watch=False)
        assert m.versions("ctr") == [2]
    assert json.loads((base / ACCEPTED_SCHEMA_FILE).read_text())["features"]["categorical"][0] == "site"


@pytest.mark.slow
def test_ctrflow_model_server_takes_tf_servings_flags(tmp_path, model):
    _, version_dir, rows = model
    sf.copy_version(version_dir, tmp_path / "ctr", 1)
    params = tmp_path / "batching.config"
    params.write_text("max_batch_size { value: 128 }\nbatch_timeout_micros { value: 1000 }\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [sys.executable, "-m", "ctrflow.serving.model_server", "--host=127.0.0.1", "--port=0", "--rest_api_port=0",
           "--model_name=ctr", f"--model_base_path={tmp_path / 'ctr'}", "--enable_batching",
           f"--batching_parameters_file={params}", "--tensorflow_intra_op_parallelism=1",
           "--tensorflow_inter_op_parallelism=2", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-2000:]
        where = json.loads(line)
        assert where["models"] == {"ctr": [1]}
        status, _, body = Client(f"http://127.0.0.1:{where['rest_api_port']}").post("/v1/models/ctr:predict", {"instances": rows[:3]})
        assert status == 200 and len(json.loads(body)["predictions"]) == 3
        import grpc
        from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{where['port']}") as ch:
            st = model_service_pb2_grpc.ModelServiceStub(ch).GetModelStatus(
                get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "ctr"}), timeout=30)
        assert [s.state for s in st.model_version_status] == [30]  # AVAILABLE
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "TensorFlow threads: intra-op 1, inter-op 2" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    bad = subprocess.run([sys.executable, "-m", "ctrflow.serving.model_server", "--model_name=x"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "error: Give exactly one of --model_base_path" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "ctrflow.serving.model_server", "--tensorflow_session_parallelism=2"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "tensorflow_session_parallelism" in bad.stderr
