"""Shared fixtures: small hand-written logs, the shared real datasets (skipped when absent)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CTRFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_file(*parts: str) -> Path:
    """A file of ../shared/data, or a clean skip when the folder is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.is_file():
        pytest.skip(f"shared dataset {p} not present")
    return p


def criteo_rows(n: int, seed: int = 0) -> list[str]:
    """n Criteo-format TSV lines (label, I1..I13, C1..C26) with missing values and repeats."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        label = str(int(rng.random() < 0.2))
        ints = ["" if rng.random() < 0.1 else str(int(rng.pareto(1.5) * 3) - (1 if rng.random() < 0.05 else 0)) for _ in range(13)]
        cats = ["" if rng.random() < 0.05 else f"{int(rng.zipf(1.3)) % 5000:08x}" for _ in range(26)]
        lines.append("\t".join([label, *ints, *cats]))
    return lines


@pytest.fixture
def criteo_file(tmp_path: Path) -> Path:
    p = tmp_path / "day0.tsv"
    p.write_text("\n".join(criteo_rows(3000)) + "\n")
    return p


def synthetic_split(root: Path, train_rows: int, valid_rows: int, *, seed: int, cap: int) -> Path:
    """`root`/train and `root`/valid: synthetic shards (tables capped at `cap` rows per field), valid hashed like train."""
    from ctrflow.data.convert import ConvertOptions, convert
    from ctrflow.data.generate import GenerateOptions, generate
    from ctrflow.schema import PRESETS

    generate(root / "train.csv", GenerateOptions(rows=train_rows, seed=seed))
    generate(root / "valid.csv", GenerateOptions(rows=valid_rows, seed=seed, split="test"))
    convert(root / "train.csv", root / "train", schema=PRESETS["synthetic"].capped(cap), options=ConvertOptions(workers=1))
    convert(root / "valid.csv", root / "valid", like=root / "train", options=ConvertOptions(workers=1))
    return root


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """(train_dir, test_dir, generate summary): 60k/20k synthetic rows from one hidden model, small tables."""
    from ctrflow.data.convert import ConvertOptions, convert
    from ctrflow.data.generate import GenerateOptions, generate
    from ctrflow.schema import PRESETS

    root = tmp_path_factory.mktemp("synthetic")
    g = generate(root / "train.csv", GenerateOptions(rows=60_000, seed=11))
    generate(root / "test.csv", GenerateOptions(rows=20_000, seed=11, split="test"))
    schema = PRESETS["synthetic"].capped(1 << 14)
    convert(root / "train.csv", root / "train", schema=schema, options=ConvertOptions(workers=1, block_bytes=2 << 20))
    convert(root / "test.csv", root / "test", like=root / "train", options=ConvertOptions(workers=1))
    return root / "train", root / "test", g


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, synthetic_shards):
    """A small FM run (LazyAdam, 40 steps) on the synthetic shards: (run_dir, train_dir, test_dir)."""
    from ctrflow.models.registry import ModelConfig
    from ctrflow.train.config import TrainConfig
    from ctrflow.train.loop import train

    train_dir, test_dir, _ = synthetic_shards
    run = tmp_path_factory.mktemp("runs") / "fm"
    train(train_dir, run, TrainConfig(model=ModelConfig("fm", embedding_dim=8), batch_size=1024, learning_rate=0.003, max_steps=40))
    return run, train_dir, test_dir


@pytest.fixture(scope="session")
def local_cluster():
    """One real local cluster (1 ps + 2 worker processes) shared by every cluster test of the session:
    each start costs three TensorFlow imports. A test that kills a task restarts it (see `cluster_ready`)."""
    from ctrflow.train.cluster import LocalCluster

    with LocalCluster(workers=2, ps=1) as c:
        yield c


def cluster_ready(cluster):
    """`cluster` with every task running: one a failed test left killed is started again at its address."""
    for kind, count in (("ps", cluster.ps), ("worker", cluster.workers)):
        for index in range(count):
            if not cluster.alive(kind, index):
                cluster.restart(kind, index)
    return cluster


def raw_rows(csv_path: Path, n: int) -> list[dict]:
    """The first n rows of a synthetic CSV as serving instances (named raw features, None = missing)."""
    import csv

    out = []
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            out.append({k: (v if k.startswith("C") else (float(v) if v else None)) for k, v in row.items()
                        if k not in ("day", "click", "true_ctr")})
            if len(out) == n:
                break
    return out


def cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """`ctrflow ARGS` run by `ctrflow.cli.main` in this process: its exit code, stdout and stderr (text) as a
    subprocess would give them, without a new process importing TensorFlow (~5 s of CPU each). For what a
    command does; a real process's exit code and tracebacks are checked by at least one subprocess test per
    command (test_cli.py, test_faults.py and the command's own tests)."""
    import contextlib
    import io

    from ctrflow.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(["ctrflow", *args], code, out.getvalue(), err.getvalue())
