"""`bytes_tensor` builds the same tf.string tensor as `tf.constant` on the values as Python bytes."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from ctrflow.serving.strings import bytes_tensor, fixed_width


@pytest.mark.parametrize("width", [1, 8, 200])
def test_bytes_tensor_equals_tf_constant_on_objects(width):
    rng = np.random.default_rng(width)
    values = [bytes(rng.integers(0, 256, rng.integers(0, width + 1)).astype(np.uint8)) for _ in range(3 * 50)]
    values[:6] = [b"", b"\x00", b"a\x00b", b"\xff\xfe", b"\xed\xa0\x80", b"x" * width]  # NULs, non-UTF-8, full width
    matrix = np.array(values, dtype=f"S{width}").reshape(3, 50)
    got = bytes_tensor(matrix)
    want = tf.constant(matrix.astype(object), tf.string)
    assert got.shape == want.shape and got.dtype == tf.string
    assert got.numpy().tolist() == want.numpy().tolist()
    # Strided input (a column slice) and differently wide columns stacked, as a batch stacks them.
    assert bytes_tensor(matrix[:, ::2]).numpy().tolist() == matrix[:, ::2].astype(object).tolist()
    stacked = np.stack([np.array([b"ab", b""], "S2"), np.array([b"abcd", b"c"], "S4")])
    assert bytes_tensor(stacked).numpy().tolist() == [[b"ab", b""], [b"abcd", b"c"]]


def test_fixed_width_only():
    assert fixed_width(np.array([b"a"], "S1"))
    assert not fixed_width(np.array(["a"], object)) and not fixed_width(np.array(["a"])) and not fixed_width([b"a"])
    with pytest.raises(TypeError, match="'S' array"):
        bytes_tensor(np.array(["a"], object))


def test_columns_tensor_keeps_each_columns_width_and_values():
    """Columns of different widths (one very wide value) give the values as objects would, and the blob
    handed to TensorFlow is the columns' own bytes, not every column padded to the widest."""
    from ctrflow.serving.strings import columns_tensor

    narrow = np.array([b"a", b"", b"bc\x00d"], dtype="S4")
    wide = np.array([b"x" * 4096, b"y", b"\xff\x00"], dtype="S4096")
    got = columns_tensor([narrow, wide, narrow]).numpy().tolist()
    assert got == [narrow.astype(object).tolist(), wide.astype(object).tolist(), narrow.astype(object).tolist()]
