"""ctrflow.atomic: what a reader finds under the final name is complete, and text is UTF-8 under any locale."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def test_text_mode_writes_utf8_under_an_ascii_locale(tmp_path):
    """The rejects file (atomic_writer "w") crashed the end of a conversion on the first non-ASCII row."""
    code = ("import sys; from ctrflow.atomic import atomic_writer\n"
            "with atomic_writer(sys.argv[1], 'w') as f: f.write('caf\\u00e9 \\u4e2d')\n")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.tsv")], env=env, capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr.decode()[-500:]
    assert (tmp_path / "r.tsv").read_bytes() == "café 中".encode() and os.listdir(tmp_path) == ["r.tsv"]
