"""A call's row count: the packed signatures are field-major, so their rows are the last axis."""
import numpy as np

from ctrflow.export import CONTEXT_PACKED_SIGNATURE, PACKED_SIGNATURE, signature_rows


def test_rows_are_candidates_not_fields():
    per_field = {"C1": np.zeros(500, object), "I1": np.zeros(500)}
    assert signature_rows("serving_default", per_field) == 500
    packed = {"strings": np.zeros((26, 500), object), "numbers": np.zeros((13, 500))}
    assert signature_rows(PACKED_SIGNATURE, packed) == 500  # not 26: the row limit must see 500
    context = {"context_strings": np.zeros((13, 5), object), "context_numbers": np.zeros((7, 5)),
               "strings": np.zeros((13, 500), object), "numbers": np.zeros((6, 500)), "row": np.zeros(500, np.int32)}
    assert signature_rows(CONTEXT_PACKED_SIGNATURE, context) == 500
    assert signature_rows("serving_default", {"x": np.float32(1.0)}) == 1  # scalars only: one row
