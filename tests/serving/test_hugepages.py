"""Huge pages for the served tables: the option is validated and reported, scores are bitwise the same, and
platforms without transparent huge pages fall back without raising."""
from __future__ import annotations

import numpy as np
import pytest

import serving_fixtures as sf
from ctrflow.errors import ConfigError
from ctrflow.serving import hugepages
from ctrflow.serving.hugepages import advise_variables, thp_mode
from ctrflow.serving.predictor import Predictor
from ctrflow.serving.server import ServeOptions

THP = thp_mode() in ("always", "madvise")


@pytest.mark.slow  # two loads of the shared tiny model (built once per test process)
def test_scores_are_bitwise_the_same_on_and_off_and_the_status_says_what_happened():
    folder = sf.small_model()[1]
    on, off = Predictor.load(folder, huge_pages="auto"), Predictor.load(folder, huge_pages="off")
    try:
        rng = np.random.default_rng(0)
        ids = (rng.random((300, len(on._id_limits))) * on._id_limits).astype(np.int32)
        numeric = rng.random((300, len(on.numeric_names))).astype(np.float32)
        a, b = on.compute_ids(ids, numeric), off.compute_ids(ids, numeric)
        assert a.tobytes() == b.tobytes()
        assert off.huge_pages.to_dict() == {"mode": "off", "status": "off", "variables": 0, "advised_mb": 0.0, "huge_mb": 0.0}
        assert on.huge_pages.mode == "auto"
        if THP:  # the tiny FM's table (~2.6 MB) is the one variable of at least 1 MB
            assert on.huge_pages.variables >= 1 and on.huge_pages.advised_bytes >= 2 << 20, on.huge_pages
            assert on.huge_pages.status.startswith(("collapsed", "advised")), on.huge_pages
        else:
            assert on.huge_pages.status.startswith("unsupported"), on.huge_pages
    finally:
        on.close()
        off.close()


def test_a_bad_option_is_refused_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="'mode' parameter of HugePages must be one of 'auto', 'off'"):
        Predictor.load(tmp_path / "missing", huge_pages="on")
    with pytest.raises(ConfigError, match="huge_pages"):
        ServeOptions(model_base_path=str(tmp_path), huge_pages="yes")
    from ctrflow.cli import build_parser

    assert build_parser().parse_args(["serve", "--model-base-path", "m", "--huge-pages", "off"]).huge_pages == "off"
    assert build_parser().parse_args(["serve", "--model-base-path", "m"]).huge_pages == "auto"


def test_fallbacks_do_not_raise_and_keep_the_values(tmp_path, monkeypatch):
    import tensorflow as tf

    module = tf.Module()
    module.table = tf.Variable(np.arange(3 << 18, dtype=np.float32).reshape(-1, 4))  # 3 MB
    module.small = tf.Variable(np.ones(16, np.float32))
    before = module.table.numpy()
    got = advise_variables(module, "auto")
    if THP:
        assert got.variables == 1 and got.status.startswith(("collapsed", "advised")), got
    np.testing.assert_array_equal(module.table.numpy(), before)

    assert advise_variables(tf.Module(), "auto").status.startswith("off")  # nothing large enough
    monkeypatch.setenv(hugepages.ENV_OFF, "off")
    assert advise_variables(module, "auto").status == "off (CTRFLOW_HUGE_PAGES=off)"
    monkeypatch.delenv(hugepages.ENV_OFF)
    never = tmp_path / "enabled"
    never.write_text("always madvise [never]\n")
    monkeypatch.setattr(hugepages, "_THP_ENABLED", str(never))  # a kernel with THP off
    assert advise_variables(module, "auto").status == "unsupported: transparent huge pages are 'never' on this kernel"
    monkeypatch.setattr(hugepages, "_THP_ENABLED", str(tmp_path / "absent"))  # no THP at all (not Linux)
    assert advise_variables(module, "auto").status.startswith("unsupported")
    np.testing.assert_array_equal(module.table.numpy(), before)
