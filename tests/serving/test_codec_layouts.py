"""A whole columnar body's remembered layout (rows, size and every header byte) is only a shortcut: a
body of the same rows and size whose headers differ anywhere takes the checked path and is named."""
from __future__ import annotations

import numpy as np
import pytest

from ctrflow.client.columnar import encode_columnar
from ctrflow.serving import codec
from ctrflow.serving.codec import _BODIES, RequestError, _decode_columnar_checked, decode_columnar

CATS, NUMS = ("C1", "C2"), ("I1",)


@pytest.fixture(autouse=True)
def fresh_caches():
    """Each test starts from empty layout caches (they are module-global)."""
    for cache in (codec._BODIES, codec._BUILT, codec._LAYOUTS):
        cache.clear()


def test_same_size_bodies_with_other_headers_are_not_taken_for_a_remembered_one():
    good = encode_columnar({"C1": ["ab", "c"], "C2": ["", "xyz"], "I1": [1.5, None]}, CATS, NUMS)
    for _ in range(4):  # checked, header by header (twice: noted, then remembered), then the whole-body shortcut
        out, rows = decode_columnar(good, CATS, NUMS)
        want, _ = _decode_columnar_checked(good, CATS, NUMS, {})
        assert rows == 2 and list(out) == list(want)
        assert all(out[k].dtype == want[k].dtype and out[k].tobytes() == want[k].tobytes() for k in want)
    assert len(_BODIES[(CATS, NUMS)][(2, len(good))][1]) == 1
    # Same rows and size, other widths (C1 3 wide, C2 2 wide): decoded by its own headers.
    swapped = encode_columnar({"C1": ["abc", "c"], "C2": ["", "xy"], "I1": [1.5, None]}, CATS, NUMS)
    assert len(swapped) == len(good)
    out, _ = decode_columnar(swapped, CATS, NUMS)
    assert out["C1"].tolist() == [b"abc", b"c"] and out["C2"].tolist() == [b"", b"xy"]
    # Same size, one header byte off: a name, a kind, the row count.
    c2 = good.index(b"C2")
    for body, message in [
        (good[:c2] + b"C3" + good[c2 + 2:], "Unknown feature 'C3'"),
        (good[:c2 + 2] + b"f" + good[c2 + 3:], "has kind 'f'"),
        (good[:8] + b"\x03\0\0\0" + good[12:], "ends inside|after its last column"),
    ]:
        assert len(body) == len(good)
        with pytest.raises(RequestError, match=message):
            decode_columnar(body, CATS, NUMS)
    out, _ = decode_columnar(bytearray(good), CATS, NUMS)  # and the good body is still read right
    assert out["C2"].tolist() == [b"", b"xyz"] and np.isnan(out["I1"][1])


def test_widths_that_vary_per_request_build_no_layout_and_decode_right():
    """Two layouts of one size alternating (a field's width moves per request): each is noted, neither is
    built (no index per body), every body decodes as the checked path does; a repeat then builds one."""
    a = encode_columnar({"C1": ["abc", "c"], "C2": ["", "xy"], "I1": [1.0, 2.0]}, CATS, NUMS)
    b = encode_columnar({"C1": ["ab", "c"], "C2": ["", "xyz"], "I1": [3.0, 4.0]}, CATS, NUMS)
    assert len(a) == len(b)
    for body in (a, b) * 3:
        out, _ = decode_columnar(body, CATS, NUMS)
        want, _ = _decode_columnar_checked(body, CATS, NUMS, {})
        assert all(out[k].tobytes() == want[k].tobytes() for k in want)
    assert _BODIES[(CATS, NUMS)][(2, len(a))][1] == [] and codec._BUILT.get((CATS, NUMS), 0) == 0
    decode_columnar(b, CATS, NUMS)
    assert len(_BODIES[(CATS, NUMS)][(2, len(a))][1]) == 1
