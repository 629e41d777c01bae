"""TensorFlow's thread pools from the serving entry points: TF Serving's --tensorflow_*_op_parallelism flags
and `ctrflow serve --intra-op-threads/--inter-op-threads` (0: TensorFlow chooses); the running server's
use of them is checked in test_tfserving_lifecycle's model-server test."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each case starts a Python process

ENV = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), TF_CPP_MIN_LOG_LEVEL="2")


@pytest.mark.parametrize("cmd", [
    ["-m", "ctrflow.serving.model_server", "--model_base_path=/nonexistent", "--tensorflow_intra_op_parallelism=-1"],
    ["-m", "ctrflow.serving.model_server", "--model_base_path=/nonexistent", "--tensorflow_inter_op_parallelism=two"],
    ["-m", "ctrflow.cli", "serve", "--model-base-path=/nonexistent", "--inter-op-threads=-3"],
])
def test_bad_thread_counts_are_refused(cmd):
    bad = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=ENV, timeout=120)
    assert bad.returncode == 2 and "error: " in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert "op_threads" in bad.stderr or "op_parallelism" in bad.stderr


def test_thread_counts_reach_tensorflow_before_it_runs():
    code = textwrap.dedent("""
        import tensorflow as tf
        from ctrflow.errors import ConfigError
        from ctrflow.serving.server import apply_tf_threads
        apply_tf_threads(0, 0)  # TensorFlow's choice: nothing set
        print(tf.config.threading.get_intra_op_parallelism_threads(), tf.config.threading.get_inter_op_parallelism_threads())
        apply_tf_threads(1, 2)
        print(tf.config.threading.get_intra_op_parallelism_threads(), tf.config.threading.get_inter_op_parallelism_threads())
        tf.constant(1.0) + 1.0  # TensorFlow now runs: the same sizes pass, other sizes are refused
        apply_tf_threads(1, 2)
        try:
            apply_tf_threads(3, 0)
        except ConfigError as e:
            print("refused:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[:2] == ["0 0", "1 2"]
    assert lines[2].startswith("refused: cannot set TensorFlow's intra-op threads to 3")
