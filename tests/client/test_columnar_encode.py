"""encode_columnar on what a caller really passes: the converter's bytes for non-strings, bad columns named."""
from __future__ import annotations

import numpy as np
import pytest

from ctrflow.client.columnar import encode_columnar
from ctrflow.errors import ConfigError


def _strings(body: bytes, rows: int) -> list[bytes]:
    name_len = int.from_bytes(body[12:14], "little")
    width = int.from_bytes(body[16 + name_len:20 + name_len], "little")
    payload = body[20 + name_len:20 + name_len + rows * width]
    return [payload[i * width:(i + 1) * width].rstrip(b"\0") for i in range(rows)]


def test_non_string_categoricals_are_the_bytes_the_converter_hashes():
    """3.0 is "3" and True is "1" (JSON Lines, Parquet and FeatureHasher agree); "3.0" / "True" were other ids."""
    values = [3.0, True, 7, 1.5, np.float64(-0.0), None, "x"]
    body = encode_columnar({"c": values, "n": [1.0] * 7}, ["c"], ["n"])
    assert _strings(body, 7) == [b"3", b"1", b"7", b"1.5", b"0", b"", b"x"]


@pytest.mark.parametrize("features, message", [
    ({"c": ["a", "b"]}, "missing column 'n'"),
    ({"c": "ab", "n": [1.0, 2.0]}, "column 'c' must be one value per row.*Got a str instead"),
    ({"c": ["a", "b"], "n": np.ones((2, 3))}, r"column 'n' must be one value per row.*Got shape \(2, 3\) instead"),
    ({"c": ["a", "b"], "n": ["x", "y"]}, "numeric column 'n' must hold numbers"),
    ({"c": ["\ud800", "b"], "n": [1.0, 2.0]}, "column 'c' holds a value that is not valid text"),
])
def test_bad_columns_are_refused_naming_them(features, message):
    with pytest.raises(ConfigError, match=message):
        encode_columnar(features, ["c"], ["n"])
