#!/usr/bin/env bash
# Continuous training in miniature: drifting synthetic days land one by one in a folder; each is trained
# (warm-started from the last published model), gated on its latest 10 %, and published as a new version.
# Bad slices are rejected or quarantined and the loop goes on. Run after `make install` (or `make demo`).
set -euo pipefail
OUT=${1:-demo-out/continuous}
CTR=".venv/bin/ctrflow"
MODEL=(--model fm --embedding-dim 8 --batch-size 1024 --learning-rate 0.003)
rm -rf "$OUT"
mkdir -p "$OUT/incoming"
step() { printf '\n== %s\n' "$*"; }
land() {  # convert day $1 straight into incoming/ (convert renames a complete folder into place)
  $CTR convert "$OUT/day-$1.csv" --like "$OUT/incoming/day-0" --out "$OUT/incoming/day-$1" --quiet
}

step "1. four drifting synthetic days (fresh ids appear, effects move), one CSV per day"
$CTR generate --rows 240000 --days 4 --seed 2 --out "$OUT/days.csv" --quiet
awk -F, -v out="$OUT" 'NR == 1 { h = $0; next }
  { f = out "/day-" $1 ".csv"; if (!(f in seen)) { print h > f; seen[f] = 1 } print > f }' "$OUT/days.csv"

step "2. days 0 and 1 land; continuous --once trains, gates and publishes each, oldest first"
$CTR convert "$OUT/day-0.csv" --schema synthetic --max-buckets 65536 --out "$OUT/incoming/day-0" --quiet
land 1
$CTR continuous --incoming "$OUT/incoming" --model-base-path "$OUT/models/ctr" --state "$OUT/state" --once "${MODEL[@]}"

step "3. bad input lands with day 2: another schema (rejected), a damaged copy (quarantined)"
$CTR convert "$OUT/day-2.csv" --schema synthetic --max-buckets 1024 --out "$OUT/incoming/other-schema" --quiet
land 2
cp -r "$OUT/incoming/day-2" "$OUT/incoming/day-2-damaged"
shard=$(ls "$OUT"/incoming/day-2-damaged/part-*.ctrs | head -n 1)
truncate -s -4096 "$shard"

step "4. the follower polls; day 3 lands while it runs; a second follower on the same state is refused"
$CTR continuous --incoming "$OUT/incoming" --model-base-path "$OUT/models/ctr" --state "$OUT/state" \
  --poll-seconds 2 --max-polls 40 "${MODEL[@]}" &
follower=$!
sleep 3
$CTR continuous --incoming "$OUT/incoming" --model-base-path "$OUT/models/ctr" --state "$OUT/state" --once "${MODEL[@]}" \
  || echo "(refused, as it should be)"
land 3
for _ in $(seq 60); do  # until day 3 is decided
  grep -q '"slice": "day-3"' "$OUT/state/decisions.jsonl" 2>/dev/null && break
  sleep 2
done
kill -TERM "$follower" 2>/dev/null || true  # any point is safe: a rerun goes on where it stopped
wait "$follower" || true

step "5. the decisions, and the published versions a server on models/ctr picks up"
$CTR continuous status --state "$OUT/state"
ls "$OUT/models/ctr"
