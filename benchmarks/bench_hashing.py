"""Client hashing benchmark: values/s of the numpy SipHash hasher (ctrflow.client.hashing) vs TensorFlow.

Claim measured (issue 11, item 1): a bidder can compute the converter's ids itself, fast, without
TensorFlow. For string columns of a few typical length mixes, one core:
- `client`: `hash_bucket_ids` on a Python list of str (what a bidder holds), UTF-8 via pyarrow included;
- `tf_converter`: `ctrflow.data.transforms.hash_values` on a numpy object array of bytes (the converter's
  path: tf.constant + to_hash_bucket_strong + empty mask);
- `tf_kernel`: `tf.strings.to_hash_bucket_strong` alone on a ready tf.string tensor (the kernel's floor).
Every run first checks that the client's ids equal the converter's.
Also: one 100-candidate request of the synthetic preset (39 fields) and a 4000-row batch through
`FeatureHasher.transform`, with the numpy backend and with backend="tensorflow" (one graph call).

Usage: python benchmarks/bench_hashing.py [--values 200000] [--repeats 3]
Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctrflow.client.hashing import FeatureHasher, hash_bucket_ids  # noqa: E402
from ctrflow.data.transforms import Transforms, field_hash_key, hash_values  # noqa: E402
from ctrflow.schema import PRESETS  # noqa: E402


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _strings(n: int, lo: int, hi: int, rng: np.random.Generator) -> list[str]:
    alphabet = np.array(list("0123456789abcdef"))
    lens = rng.integers(lo, hi + 1, n)
    flat = "".join(rng.choice(alphabet, int(lens.sum())))
    ends = np.cumsum(lens)
    return [flat[e - k:e] for e, k in zip(ends, lens)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--values", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import tensorflow as tf

    rng = np.random.default_rng(0)
    key, buckets = field_hash_key(0, "C1"), 1 << 20
    mixes = {"8 hex chars (Criteo)": (8, 8), "0-24 chars": (0, 24), "30-100 chars (UA/URL)": (30, 100)}
    rows, result = [], {"values": args.values, "mixes": {}}
    for label, (lo, hi) in mixes.items():
        vals = _strings(args.values, lo, hi, rng)
        as_bytes = np.array([v.encode() for v in vals], dtype=object)
        want = hash_values(as_bytes, buckets, key)
        assert np.array_equal(hash_bucket_ids(vals, buckets, key), want), "client ids differ from the converter's"
        tensor = tf.constant(as_bytes)
        t_client = _best(lambda: hash_bucket_ids(vals, buckets, key), args.repeats)
        t_conv = _best(lambda: hash_values(as_bytes, buckets, key), args.repeats)
        t_kernel = _best(lambda: tf.strings.to_hash_bucket_strong(tensor, buckets - 1, key=list(key)).numpy(), args.repeats)
        m = {k: args.values / t for k, t in (("client", t_client), ("tf_converter", t_conv), ("tf_kernel", t_kernel))}
        result["mixes"][label] = {k: round(v) for k, v in m.items()}
        rows.append((label, m["client"], m["tf_converter"], m["tf_kernel"]))

    schema = PRESETS["synthetic"]
    hasher = FeatureHasher(schema, Transforms({f.name: tuple(np.linspace(0.5, 9.5, 31)) for f in schema.numeric}))
    req = {f.name: _strings(100, 8, 8, rng) for f in schema.categorical}
    req.update({f.name: rng.exponential(50, 100) for f in schema.numeric})
    t_req = _best(lambda: hasher.transform(req), max(args.repeats, 20))
    result["request_100x39_ms"] = round(t_req * 1e3, 3)
    tf_hasher = FeatureHasher(hasher.schema, hasher.transforms, backend="tensorflow")
    assert np.array_equal(tf_hasher.ids(req), hasher.ids(req)), "the TensorFlow backend's ids differ"
    t_req_tf = _best(lambda: tf_hasher.transform(req), max(args.repeats, 20))
    result["request_100x39_ms_tf_backend"] = round(t_req_tf * 1e3, 3)
    big = {k: (v * 40 if isinstance(v, list) else np.tile(v, 40)) for k, v in req.items()}
    t_big = _best(lambda: hasher.transform(big), args.repeats)
    t_big_tf = _best(lambda: tf_hasher.transform(big), args.repeats)
    result["batch_4000x39_values_per_s"] = {"numpy": round(4000 * 26 / t_big), "tensorflow": round(4000 * 26 / t_big_tf)}

    print(f"{'values/s (one core)':<26}{'client numpy':>14}{'tf converter':>14}{'tf kernel':>14}")
    for label, a, b, c in rows:
        print(f"{label:<26}{a:>14,.0f}{b:>14,.0f}{c:>14,.0f}")
    print(f"one request, 100 candidates x 39 fields (26 hashed + 13 discretized): {t_req * 1e3:.2f} ms numpy, "
          f"{t_req_tf * 1e3:.2f} ms with backend='tensorflow'")
    print(f"4000 rows x 39 fields, hashed values/s: numpy {4000 * 26 / t_big:,.0f}, tensorflow {4000 * 26 / t_big_tf:,.0f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
