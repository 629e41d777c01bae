"""The tail during a hot reload: p99/p99.9 of a steady run vs a run where a new version is swapped in.

Claim measured (issue 10 item 4): loading and warming a new version must not slow the one serving;
target p99.9 over a run with a swap <= 2x a steady run's, zero errors. Each run starts its own
`ctrflow serve` child process (REST, batching on), drives it open loop (`ctrflow.bench.loadgen`:
Poisson arrivals, latency from the scheduled send time) with binary columnar bodies, and in the swap
run publishes a copy of the version (built aside, renamed in) at `--swap-at-s`.

    python benchmarks/bench_reload.py --model-base-path models/ctr            # 300 req/s x 100, 20 s, swap at 8 s
    python benchmarks/bench_reload.py --model-base-path models/ctr --rate 150 --duration 10 --swap-at-s 4

Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _newest(base: Path) -> Path:
    versions = sorted(int(p.name) for p in base.iterdir() if p.name.isdigit() and (p / "saved_model.pb").exists())
    if not versions:
        raise SystemExit(f"error: {base} holds no version folder")
    return base / str(versions[-1])


def _publish(source: Path, base: Path, version: int) -> None:
    tmp = base / f".copy-{version}"
    shutil.copytree(source, tmp)
    info = json.loads((tmp / "ctrflow.json").read_text())
    info["version"] = version
    (tmp / "ctrflow.json").write_text(json.dumps(info))
    tmp.rename(base / str(version))


def run_once(source: Path, *, swap_at_s: float | None, rate: float, candidates: int, duration: float,
             extra_flags: list[str]) -> dict:
    from ctrflow.bench.loadgen import LoadOptions, run_load

    with tempfile.TemporaryDirectory(prefix="ctrflow-reload-") as tmp:
        base = Path(tmp) / "ctr"
        base.mkdir()
        _publish(source, base, 1)
        cmd = [sys.executable, "-m", "ctrflow", "serve", "--model-base-path", str(base), "--port", "0",
               "--poll-interval-s", "0.5", "--json", "--quiet", *extra_flags]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=tmp,  # cwd: not this checkout on sys.path
                                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        try:
            line = proc.stdout.readline()
            if not line:
                raise SystemExit("error: the server did not start")
            url = json.loads(line)["url"]
            swapped = {}
            timer = None
            if swap_at_s is not None:
                def swap() -> None:
                    swapped["at"] = time.monotonic()
                    _publish(source, base, 2)
                timer = threading.Timer(swap_at_s, swap)
            opts = LoadOptions(url=url, model_name="ctr", protocol="columnar", rate_rps=rate, candidates=candidates,
                               duration_s=duration, timeout_ms=1000.0)
            if timer is not None:
                timer.start()
            report = run_load(opts)
            if timer is not None:
                timer.join()
            result = report.results[0]
            return {"run": "swap" if swap_at_s is not None else "steady", "ok": result.ok,
                    "errors": result.errors + result.timeouts + result.rejected + result.dropped,
                    "latency_ms": result.latency_ms, "server_cpu_s": result.server_cpu_s}
        finally:
            proc.terminate()
            proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-base-path", required=True, help="an export's base path (its newest version is served)")
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--swap-at-s", type=float, default=8.0)
    ap.add_argument("--repeat", type=int, default=1, help="steady/swap pairs, alternating")
    args = ap.parse_args()
    source = _newest(Path(args.model_base_path))
    runs = []
    for _ in range(args.repeat):
        for swap in (None, args.swap_at_s):
            runs.append(run_once(source, swap_at_s=swap, rate=args.rate, candidates=args.candidates,
                                 duration=args.duration, extra_flags=[]))
    print(f"{'run':8} {'ok':>7} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'max ms':>8}")
    for r in runs:
        lat = r["latency_ms"]
        print(f"{r['run']:8} {r['ok']:7d} {r['errors']:6d} {lat['p50']:8.2f} {lat['p99']:8.2f} {lat['p99.9']:9.2f} {lat['max']:8.2f}")
    steady = [r for r in runs if r["run"] == "steady"]
    swaps = [r for r in runs if r["run"] == "swap"]
    # Each swap run against the steady run just before it (a shared machine drifts between pairs),
    # and the worst case: the slowest swap run over the fastest steady run.
    pairs = [w["latency_ms"]["p99.9"] / max(s["latency_ms"]["p99.9"], 1e-9) for s, w in zip(steady, swaps)]
    worst = max(w["latency_ms"]["p99.9"] for w in swaps) / max(min(s["latency_ms"]["p99.9"] for s in steady), 1e-9)
    print("p99.9 swap / steady, per pair: " + ", ".join(f"{r:.2f}" for r in pairs) + f"; worst case {worst:.2f} (target <= 2)")
    print(json.dumps({"bench": "reload", "rate_rps": args.rate, "candidates": args.candidates, "duration_s": args.duration,
                      "swap_at_s": args.swap_at_s, "runs": runs, "p999_swap_over_steady_pairs": pairs,
                      "p999_swap_over_steady_worst": worst}))


if __name__ == "__main__":
    main()
