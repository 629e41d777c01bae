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

step "5. train DeepFM with the defaults: the latest 10% by time held out, epochs until early stopping, best kept"
rm -rf "$OUT/runs/deepfm"
$CTR train --data "$OUT/shards/train" --out "$OUT/runs/deepfm" --model deepfm

step "6. evaluate (with the Bayes-optimal logloss the synthetic data makes known)"
$CTR evaluate "$OUT/runs/deepfm" --data "$OUT/shards/test"

step "7. export a slim SavedModel (no optimizer slots), TF Serving layout"
rm -rf "$OUT/models"
$CTR export "$OUT/runs/deepfm" --model-base-path "$OUT/models/ctr"

step "8. serve it (REST, TF Serving compatible) on a free port, score a few requests, run a short load test"
$CTR serve --model-base-path "$OUT/models/ctr" --port 0 --json --quiet > "$OUT/serve.json" 2> "$OUT/serve.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do grep -q "\"url\"" "$OUT/serve.json" 2>/dev/null && break; kill -0 $SERVER 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }; sleep 0.5; done
URL=$(.venv/bin/python -c "import json,sys; print(json.loads(open(sys.argv[1]).readline())['url'])" "$OUT/serve.json")
echo "server at $URL"
.venv/bin/python - "$URL" "$OUT/test.csv" <<'PY'
import csv, json, sys, urllib.request
url, path = sys.argv[1], sys.argv[2]
rows = []
with open(path) as f:
    for r in csv.DictReader(f):
        rows.append({k: (v if k.startswith("C") else (float(v) if v else None)) for k, v in r.items() if k not in ("day", "click", "true_ctr")})
        if len(rows) == 5:
            break
req = urllib.request.Request(f"{url}/v1/models/ctr:predict", data=json.dumps({"instances": rows}).encode(),
                             headers={"Content-Type": "application/json"})
print("predictions:", json.loads(urllib.request.urlopen(req, timeout=30).read())["predictions"])
print("status:", json.loads(urllib.request.urlopen(f"{url}/v1/models/ctr", timeout=30).read()))
PY
$CTR bench serve --url "$URL" --model-name ctr --protocol columnar --rate 100 --candidates 100 --duration-s 5 --data "$OUT/test.csv"
kill -TERM $SERVER; wait $SERVER || true
trap - EXIT
echo "server stopped cleanly"

step "9. continuous training in miniature: drifting days land, get trained, gated and published"
bash scripts/demo_continuous.sh "$OUT/continuous"
