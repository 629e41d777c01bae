"""Model quality on the shared real datasets (../shared/data): AUC and logloss of LR, FM and DeepFM.

- iPinYou: the given train split → the later test split (all 16 fields categorical: opaque tokens).
- TalkingData: ordered by click_time, first 80% → last 20% (label is_attributed; attributed_time dropped).

Few positives (iPinYou test: 50 clicks) make AUC noisy (±0.03 or more): these are sanity figures.
Usage: python benchmarks/bench_real.py [--data ../shared/data] [--out bench-out]
Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctrflow.data.convert import ConvertOptions, convert  # noqa: E402
from ctrflow.models.registry import ModelConfig  # noqa: E402
from ctrflow.schema import infer_schema  # noqa: E402
from ctrflow.train.config import TrainConfig  # noqa: E402
from ctrflow.train.evaluate import evaluate  # noqa: E402
from ctrflow.train.loop import train  # noqa: E402

IPINYOU = ["weekday", "hour", "useragent", "ip", "region", "city", "adexchange", "domain", "slotid", "slotwidth",
           "slotheight", "slotvisibility", "slotformat", "slotprice", "creative", "usertag"]
MODELS = {"lr": (0.01, 2), "fm": (0.003, 2), "deepfm": (0.003, 2)}  # learning rate, epochs


def _split_talkingdata(src: Path, out: Path) -> tuple[Path, Path]:
    with open(src) as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = sorted(reader, key=lambda r: r[header.index("click_time")])
    cut = int(len(rows) * 0.8)
    paths = []
    for name, part in (("td-train.csv", rows[:cut]), ("td-test.csv", rows[cut:])):
        p = out / name
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(part)
        paths.append(p)
    return paths[0], paths[1]


def _run(name: str, train_csv: Path, test_csv: Path, schema, out: Path) -> dict:
    tr, te = out / f"{name}-train", out / f"{name}-test"
    convert(train_csv, tr, schema=schema, options=ConvertOptions(workers=1, overwrite=True))
    convert(test_csv, te, like=tr, options=ConvertOptions(workers=1, overwrite=True))
    res = {}
    for kind, (lr, epochs) in MODELS.items():
        run = out / f"run-{name}-{kind}"
        shutil.rmtree(run, ignore_errors=True)
        cfg = TrainConfig(model=ModelConfig(kind, embedding_dim=8, hidden=(64, 32)), batch_size=512, learning_rate=lr,
                          epochs=epochs, l2=1e-5, checkpoint_every_steps=10**9)
        s = train(tr, run, cfg)
        e = evaluate(run, te)
        res[kind] = {"auc": e["auc"], "logloss": e["logloss"], "ne": e["ne"], "calibration": e["calibration"],
                     "test_rows": e["rows"], "test_positives": e["positives"], "examples_per_s": s.examples_per_s}
        shutil.rmtree(run, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    data, out = Path(args.data), REPO / args.out / "real"
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    if (data / "ipinyou" / "train.csv").exists():
        schema = infer_schema(data / "ipinyou" / "train.csv", label="click", categorical=IPINYOU)
        result["ipinyou"] = _run("ipinyou", data / "ipinyou" / "train.csv", data / "ipinyou" / "test.csv", schema, out)
    if (data / "talkingdata" / "train_sample.csv").exists():
        tr, te = _split_talkingdata(data / "talkingdata" / "train_sample.csv", out)
        schema = infer_schema(tr, label="is_attributed", categorical=["ip", "app", "device", "os", "channel"],
                              time="click_time", ignore=["attributed_time"])
        result["talkingdata"] = _run("talkingdata", tr, te, schema, out)
    print(f"{'dataset':<13}{'model':<8}{'AUC':>8}{'logloss':>10}{'NE':>8}{'calib':>8}{'test rows':>11}{'pos':>6}")
    for ds, models in result.items():
        for kind, m in models.items():
            print(f"{ds:<13}{kind:<8}{m['auc']:>8.4f}{m['logloss']:>10.5f}{m['ne']:>8.4f}{m['calibration']:>8.3f}"
                  f"{m['test_rows']:>11,}{m['test_positives']:>6}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
