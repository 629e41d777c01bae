"""Shared by the serving tests: one small real model (trained, exported), version folders, a live server.

Not a conftest.py: a second conftest module would shadow `tests/conftest.py` for `from conftest import`.
Each is built once per test process (cached here) and reached through a fixture in each test module.
"""
from __future__ import annotations

import atexit
import csv
import http.client
import json
import shutil
import tempfile
from pathlib import Path

CATS = tuple(f"C{i}" for i in range(1, 27))
NUMS = tuple(f"I{i}" for i in range(1, 14))


_CACHE: dict[str, object] = {}
_ROOT = Path(tempfile.mkdtemp(prefix="ctrflow-serving-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)


def small_model():
    """(run_dir, version_folder, rows): a tiny FM (20 steps) exported once; rows are raw serving instances."""
    if "model" not in _CACHE:
        _CACHE["model"] = _build_model()
    return _CACHE["model"]


def _build_model():
    from ctrflow.data.convert import ConvertOptions, convert
    from ctrflow.data.generate import GenerateOptions, generate
    from ctrflow.export import export
    from ctrflow.models.registry import ModelConfig
    from ctrflow.schema import PRESETS
    from ctrflow.train.config import TrainConfig
    from ctrflow.train.loop import train

    root = _ROOT / "model"
    root.mkdir()
    generate(root / "train.csv", GenerateOptions(rows=3000, seed=5))
    convert(root / "train.csv", root / "shards", schema=PRESETS["synthetic"].capped(1 << 12), options=ConvertOptions(workers=1))
    train(root / "shards", root / "run", TrainConfig(model=ModelConfig("fm", embedding_dim=4), batch_size=512, max_steps=20))
    summary = export(root / "run", root / "models" / "ctr")
    return root / "run", Path(summary.path), read_instances(root / "train.csv", 400)


def read_instances(path: Path, n: int) -> list[dict]:
    out = []
    with open(path) as f:
        for row in csv.DictReader(f):
            out.append({k: (v if k.startswith("C") else (float(v) if v else None)) for k, v in row.items() if k in CATS or k in NUMS})
            if len(out) == n:
                break
    return out


def copy_version(source: Path, base: Path, version: int) -> Path:
    """Publish a copy of an exported version folder as `base/<version>` (built aside, then renamed)."""
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".copy-{version}"
    shutil.copytree(source, tmp)
    info = json.loads((tmp / "ctrflow.json").read_text())
    info["version"] = version
    (tmp / "ctrflow.json").write_text(json.dumps(info))
    final = base / str(version)
    tmp.rename(final)
    return final


def columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in (*CATS, *NUMS)}


def grpc_ok() -> bool:
    from ctrflow.serving.grpc_server import grpc_available

    return grpc_available()


def server():
    """A live server (REST + gRPC when available) on loopback serving 'ctr' versions 1 and 2."""
    if "server" not in _CACHE:
        _CACHE["server"] = _start_server()
    return _CACHE["server"]


def _start_server():
    from ctrflow.serving.batcher import BatchingOptions
    from ctrflow.serving.server import ServeOptions, serve

    _, version_dir, _ = small_model()
    base = _ROOT / "served" / "ctr"
    copy_version(version_dir, base, 1)
    copy_version(version_dir, base, 2)
    options = ServeOptions(
        model_base_path=str(base), port=0, grpc_port=0 if grpc_ok() else None, keep_versions=2,
        batching=BatchingOptions(max_batch_size=1024, batch_timeout_ms=1.0), poll_interval_s=3600.0,
        max_body_bytes=1 << 20,
    )
    s = serve(options)
    atexit.register(s.stop)
    return s


class Client:
    """A keep-alive HTTP client for tests: `post(path, body|obj, headers)` → (status, headers, body)."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=timeout)

    def request(self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None):
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        self.conn.request(method, path, body=body, headers=headers or {})
        r = self.conn.getresponse()
        data = r.read()
        if r.getheader("Connection", "").lower() == "close":
            self.conn.close()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data

    def post(self, path: str, body: bytes | dict, headers: dict | None = None):
        return self.request("POST", path, body, headers)

    def get(self, path: str):
        return self.request("GET", path)

    def close(self) -> None:
        self.conn.close()


def rollout_server(root: Path, *, key: str, weights: tuple[int, int], log: str):
    """A live server with model lines `ctr` (versions 1 = stable, 2 = canary) and `next` (the shadow)
    and a rollout `ctr` split by `key` with `weights` and a request `log` (YAML flow mappings);
    returns (server, instance rows). The caller stops the server."""
    from ctrflow.serving.model_server import start_server
    from ctrflow.serving.server import ServeOptions

    _, version_dir, rows = small_model()
    for v in (1, 2):
        copy_version(version_dir, root / "ctr", v)
    copy_version(version_dir, root / "next", 1)
    cfg = root / "models.yaml"
    cfg.write_text(f"""
models:
  - {{name: ctr, base_path: {root / 'ctr'}, keep_versions: 2, labels: {{stable: 1, canary: 2}},
     batching: {{max_batch_size: 512, batch_timeout_ms: 1.0}}}}
  - {{name: next, base_path: {root / 'next'}, batching: false}}
rollouts:
  - name: ctr
    key: {key}
    arms: [{{model: ctr, label: stable, weight: {weights[0]}}}, {{model: ctr, label: canary, weight: {weights[1]}}}]
    shadow: {{model: next, fraction: 1.0}}
    log: {log}
""")
    server, _ = start_server(ServeOptions(model_config_file=str(cfg), port=0, grpc_port=0, poll_interval_s=3600))
    return server, rows


def plain_saved_model(base: Path, version: int = 1, *, with_signature: bool = True) -> Path:
    """A SavedModel without ctrflow.json (what any TensorFlow user exports): serving_default takes
    `x` float32 [n, 2] and `s` string [n], answers `y` = x0 + 2*x1 and `n` = len(s)."""
    import tensorflow as tf

    module = tf.Module()
    module.w = tf.Variable([1.0, 2.0])

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x"), tf.TensorSpec([None], tf.string, name="s")])
    def serve(x, s):
        return {"y": tf.reduce_sum(x * module.w, axis=1), "n": tf.strings.length(s)}

    module.serve = serve
    path = base / str(version)
    tmp = base / f".tmp-{version}"
    base.mkdir(parents=True, exist_ok=True)
    tf.saved_model.save(module, str(tmp), signatures={"serving_default": serve} if with_signature else {})
    tmp.rename(path)
    return path


class SlowPredictor:
    """A stand-in model behind a real batcher: each compute call waits on a gate (for 503/504 tests)."""

    def __init__(self, max_enqueued: int = 2, max_batch_size: int = 2) -> None:
        import threading

        import numpy as np

        from ctrflow.serving.batcher import AutoBatcher, BatchingOptions

        self._np = np
        self.version = 1
        self.categorical_names, self.numeric_names = ("C1",), ("I1",)
        self.feature_names = ("C1", "I1")
        self.gate = threading.Event()
        self.batcher = AutoBatcher(self._compute, BatchingOptions(max_batch_size=max_batch_size, batch_timeout_ms=0,
                                                                   max_enqueued=max_enqueued),
                                   name="slow")

    def _compute(self, inputs):
        self.gate.wait(10)
        return self._np.full(len(inputs["I1"]), 0.5, self._np.float32)

    async def apredict(self, features, *, timeout_ms=None):
        return await self.batcher.apredict({"I1": self._np.asarray(features["I1"], self._np.float64)}, timeout_ms=timeout_ms)

    def warmup(self):
        pass

    def stats(self):
        return self.batcher.stats().to_dict()

    def close(self):
        self.gate.set()
        self.batcher.close()


def slow_server(tmp_path: Path, slow: SlowPredictor, **options):
    """A real `Server` whose one model 'm' (version 1) is `slow`; options go to ServeOptions."""
    from ctrflow.serving.models import ManagerOptions, ModelManager, ModelSpec
    from ctrflow.serving.server import ServeOptions, Server

    version = tmp_path / "m" / "1"
    (version / "variables").mkdir(parents=True, exist_ok=True)
    for name in ("saved_model.pb", "ctrflow.json"):
        (version / name).write_text("{}")
    manager = ModelManager([ModelSpec("m", str(tmp_path / "m"))], ManagerOptions(), loader=lambda *a: slow)
    opts = ServeOptions(model_base_path=str(tmp_path / "m"), port=0, poll_interval_s=3600, **options)
    return Server(opts, manager=manager).start()
