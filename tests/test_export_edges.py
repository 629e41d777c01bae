"""Export on what a user's disk really holds: a damaged run, a file in the way, a killed export's leftovers."""
from __future__ import annotations

import shutil
import pytest

from ctrflow.errors import CheckpointError, ConfigError
from ctrflow.export import export, find_versions


@pytest.mark.slow
def test_export_refuses_bad_places_in_one_line_and_cleans_a_dead_exports_temp(tmp_path, trained_run):
    run = trained_run[0]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="afile is a file: the model base path"):
        export(run, tmp_path / "afile")
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged, ignore=shutil.ignore_patterns("tensorboard", "*.png"))
    for p in (damaged / "checkpoints").glob("*.data-*"):
        p.unlink()
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*damaged/checkpoints/ckpt-40: its data file "
                                              r"ckpt-40\.data-00000-of-00001 is missing"):
        export(damaged, tmp_path / "m")
    dead = 999999999  # above any pid_max: no process runs under it
    (tmp_path / "m" / f".tmp-1-{dead}" / "variables").mkdir(parents=True)  # what a kill -9 mid-export leaves
    (tmp_path / "m" / f".old-2-{dead}").mkdir()  # ... and one between an overwrite's two renames: version 2 itself
    (tmp_path / "m" / f".old-2-{dead}" / "saved_model.pb").write_text("v2")
    (tmp_path / "m" / f".old-2-{dead}" / "ctrflow.json").write_text("{}")
    (tmp_path / "m" / "1").mkdir()
    (tmp_path / "m" / "1" / "saved_model.pb").write_text("old")
    (tmp_path / "m" / "1" / "ctrflow.json").write_text("{}")
    assert export(run, tmp_path / "m", version=1, overwrite=True).version == 1  # swapped in, the old one removed
    assert (tmp_path / "m" / "1" / "saved_model.pb").read_bytes() != b"old"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "2"] and find_versions(tmp_path / "m") == [1, 2]
    assert (tmp_path / "m" / "2" / "saved_model.pb").read_text() == "v2"
