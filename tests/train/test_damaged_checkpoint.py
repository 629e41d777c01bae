"""A run whose checkpoint files were deleted or cut short on disk: `evaluate` and `train --warm-start` answer
with one `error:` line naming the checkpoint and the file, exit 2, no traceback (was an unexpected OpError
or IndexError, exit 1)."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_missing_or_truncated_checkpoint_data_is_one_error_line_for_evaluate_and_warm_start(tmp_path, trained_run):
    run, train_dir, test_dir = trained_run
    missing, truncated = tmp_path / "missing", tmp_path / "truncated"
    for damaged in (missing, truncated):
        shutil.copytree(run, damaged, ignore=shutil.ignore_patterns("tensorboard", "*.png"))
    [gone] = (missing / "checkpoints").glob("ckpt-*.data-00000-of-00001")
    gone.unlink()
    [cut] = (truncated / "checkpoints").glob("ckpt-*.data-00000-of-00001")
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    commands = {  # side by side: each imports TensorFlow before it reaches the checkpoint
        "evaluate": ["evaluate", str(missing), "--data", str(test_dir), "--json"],
        "warm start": ["train", "--data", str(train_dir), "--out", str(tmp_path / "warm"), "--model", "fm", "--embedding-dim", "8",
                       "--batch-size", "1024", "--epochs", "1", "--warm-start", str(truncated), "--json", "--quiet"],
    }
    procs = {k: subprocess.Popen([sys.executable, "-m", "ctrflow", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for k, args in commands.items()}
    out = {k: (p.communicate(timeout=300), p.returncode) for k, p in procs.items()}
    for what, ((stdout, stderr), code), ckpt, why in (("evaluate", out["evaluate"], gone, f"its data file {gone.name} is missing"),
                                                     ("warm start", out["warm start"], cut, "truncated or damaged")):
        assert code == 2, f"{what}: exit {code}\n{stderr[-2000:]}"
        assert "Traceback" not in stderr and "Traceback" not in stdout, stderr[-2000:]
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, stderr[-2000:]
        name = ckpt.name.split(".data-")[0]
        assert str(ckpt.parent / name) in errors[0] and why in errors[0], errors[0]
        assert '"type": "CheckpointError"' in stdout.strip().splitlines()[-1]
    assert "cannot warm start" in out["warm start"][0][1]
    assert not (tmp_path / "warm" / "checkpoints").exists() or not list((tmp_path / "warm" / "checkpoints").glob("ckpt-*"))
