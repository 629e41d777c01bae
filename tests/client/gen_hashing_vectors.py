"""Regenerate docs/hashing_test_vectors.json from the converter's own functions (TensorFlow's op).

    PYTHONPATH=. python tests/client/gen_hashing_vectors.py

Run it only when the spec version changes: the vectors are the contract other-language hashers test
against, and tests/client/test_hashing.py checks that the converter still produces them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ctrflow.data.transforms import discretize, field_hash_key, hash_values, log_transform

OUT = Path(__file__).resolve().parents[2] / "docs" / "hashing_test_vectors.json"

VALUES = (
    ["abcdefghijklmnopq"[:n] for n in range(18)]  # lengths 0..17: every SipHash packet edge
    + ["x" * 63, "y" * 64, "z" * 65, "0123456789" * 20]  # > 64 bytes
    + ["é", "naïve café", "中文域名.cn", "😀", "a😀b", "Ünïcödé-" * 10]  # 2-, 3-, 4-byte UTF-8
    + ["3", "3.0", "-1", " ", "a b", "A", "a", "\t", "null", "0"]
)
FIELDS = [  # (hash_seed, field name, hash_buckets)
    (0, "site", 1 << 20),
    (0, "C1", 16),
    (42, "user_agent", 1000003),
    (7, "é-field", 2),
    (123456789, "app", 2147483647),
]
NUMERIC = [  # (transform, boundaries (float32), raw values; None = missing)
    ("log", [0.5, 1.0986123, 2.0, 4.5], [None, 0.0, 0.5, 1.0, 2.0, 3.0, -2.0, 100.0, 1e9, 0.6487213]),
    ("identity", [-1.0, 0.0, 1.0], [None, -5.0, -1.0, -0.5, 0.0, 0.25, 1.0, 7.0]),
    ("log", [], [None, 1.0, -1.0]),
]


def main() -> int:
    cases = []
    for seed, name, buckets in FIELDS:
        key = field_hash_key(seed, name)
        ids = hash_values(np.array([v.encode() for v in VALUES], dtype=object), buckets, key)
        for v, i in zip(VALUES, ids):
            cases.append({"hash_seed": seed, "field": name, "buckets": buckets, "key": [key[0], key[1]],
                          "value": v, "utf8_hex": v.encode().hex(), "id": int(i)})
    numeric = []
    for transform, bounds, raw in NUMERIC:
        x = np.array([np.nan if v is None else v for v in raw], np.float64)
        t = (log_transform(x) if transform == "log" else x).astype(np.float32)
        b = np.asarray(bounds, np.float32)
        ids = discretize(t, b)
        for v, tv, i in zip(raw, t, ids):
            numeric.append({"transform": transform, "boundaries": [float(q) for q in b], "value": v,
                            "numeric": None if np.isnan(tv) else float(tv), "id": int(i)})
    doc = {"spec": "ctrflow-hash-1", "generated_by": "tests/client/gen_hashing_vectors.py (ctrflow.data.transforms)",
           "categorical": cases, "numeric": numeric}
    OUT.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} categorical and {len(numeric)} numeric vectors to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
