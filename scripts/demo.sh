#!/usr/bin/env bash
# The end-to-end job on built-in data: generate → convert → verify → read (→ train → evaluate → export → serve
# as those layers land). Run through `make demo`, which creates .venv and installs first.
set -euo pipefail
OUT=${1:-demo-out}
CTR=".venv/bin/ctrflow"
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

step "1. generate synthetic RTB logs (hidden model, known true CTR)"
$CTR generate --rows 200000 --seed 1 --out "$OUT/train.csv"
$CTR generate --rows 50000 --seed 1 --split test --out "$OUT/test.csv"

step "2. convert to binary shards (test split reuses train's hashing and boundaries)"
$CTR convert "$OUT/train.csv" --schema synthetic --out "$OUT/shards/train" --overwrite
$CTR convert "$OUT/test.csv" --like "$OUT/shards/train" --out "$OUT/shards/test" --overwrite

step "3. verify checksums and row counts"
$CTR verify "$OUT/shards/train"

step "4. read ready batches (2 epochs, shuffled) — and the same shards piped through stdin"
$CTR read "$OUT/shards/train" --epochs 2
cat "$OUT"/shards/test/part-*.ctrs | $CTR read - --json | tail -n 1
