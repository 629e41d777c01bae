#!/usr/bin/env bash
# The end-to-end job on built-in data: generate → convert → verify → read → train → evaluate → export → serve.
# Run through `make demo`, which creates .venv and installs first.
set -euo pipefail
OUT=${1:-demo-out}
CTR=".venv/bin/ctrflow"
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

step "1. generate synthetic RTB logs (hidden model, known true CTR) and a held-out test split"
$CTR generate --rows 200000 --seed 1 --out "$OUT/train.csv"
$CTR generate --rows 50000 --seed 1 --split test --out "$OUT/test.csv"

step "2. convert to binary shards (the test split reuses train's hashing and boundaries)"
$CTR convert "$OUT/train.csv" --schema synthetic --max-buckets 65536 --out "$OUT/shards/train" --overwrite
$CTR convert "$OUT/test.csv" --like "$OUT/shards/train" --out "$OUT/shards/test" --overwrite

step "3. verify checksums and row counts"
$CTR verify "$OUT/shards/train"

step "4. read ready batches (2 epochs, shuffled) — and the same shards piped through stdin"
$CTR read "$OUT/shards/train" --epochs 2
cat "$OUT"/shards/test/part-*.ctrs | $CTR read - --json | tail -n 1

step "5. train DeepFM (LazyAdam on embeddings, FTRL on the linear part); rerunning resumes"
rm -rf "$OUT/runs/deepfm"
$CTR train --data "$OUT/shards/train" --valid "$OUT/shards/test" --out "$OUT/runs/deepfm" --model deepfm \
  --embedding-dim 8 --hidden 64,32 --batch-size 1024 --learning-rate 0.003 \
  --linear-optimizer ftrl --linear-learning-rate 0.05 --epochs 1

step "6. evaluate (with the Bayes-optimal logloss the synthetic data makes known)"
$CTR evaluate "$OUT/runs/deepfm" --data "$OUT/shards/test"

step "7. export a slim SavedModel (no optimizer slots), TF Serving layout"
rm -rf "$OUT/models"
$CTR export "$OUT/runs/deepfm" --model-base-path "$OUT/models/ctr"
