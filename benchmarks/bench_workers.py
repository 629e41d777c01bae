"""Every core: one server process vs N worker processes on one port, in one run.

Both servers (`ctrflow serve --workers 1` and `--workers N`) are started side by side on the same model
and get the same open-loop Poisson schedule (binary columnar, 100 candidates per request) at rising
rates, alternating 1 and N at each rate so that the noise of a shared machine hits both alike. Reported
per server: the highest predictions/s with p99 <= the latency bound, server CPU µs per prediction (from
/metrics: the sum over the workers), and memory from /proc/PID/smaps_rollup (RSS, PSS, private) of
every server process, hence the memory one extra worker costs.

Usage: python benchmarks/bench_workers.py --model-base-path DIR [--workers 2] [--rates 200,400,...]
       [--duration-s 5] [--p99-ms 20]
Every rate is run for both (until a server answers under half of what was sent); also reported: the
peak predictions/s at any p99 (capacity), for machines too busy to hold p99 <= 20 ms at all.
Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def memory(pid: int) -> dict[str, int]:
    """kB figures of /proc/PID/smaps_rollup: Rss, Pss, Private_Clean + Private_Dirty, Shared_Clean."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                out[parts[0][:-1]] = int(parts[1])
    return {"rss_kb": out.get("Rss", 0), "pss_kb": out.get("Pss", 0),
            "private_kb": out.get("Private_Clean", 0) + out.get("Private_Dirty", 0),
            "shared_clean_kb": out.get("Shared_Clean", 0)}


class Served:
    """`ctrflow serve --workers N` in a child process, on a free loopback port."""

    def __init__(self, base: str, workers: int, timeout_s: float = 600.0) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
        self.workers = workers
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ctrflow", "serve", "--model-base-path", base, "--port", "0", "--workers", str(workers),
             "--poll-interval-s", "3600", "--json", "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
        deadline = time.monotonic() + timeout_s
        self.status = None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                self.status = json.loads(line)
                break
        if self.status is None:
            self.close()
            raise SystemExit(f"the server with {workers} workers did not start")
        self.url = self.status["url"]

    def pids(self) -> list[int]:
        import psutil

        children = psutil.Process(self.proc.pid).children()
        return [self.proc.pid] + [c.pid for c in children]

    def memory(self) -> dict[str, object]:
        per = {pid: memory(pid) for pid in self.pids()}
        total = {k: sum(m[k] for m in per.values()) for k in ("rss_kb", "pss_kb", "private_kb")}
        return {"processes": per, **total}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-base-path", required=True)
    p.add_argument("--model-name", default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rates", default="200,400,600,800,1000,1300,1600,2000")
    p.add_argument("--duration-s", type=float, default=5.0)
    p.add_argument("--p99-ms", type=float, default=20.0)
    p.add_argument("--candidates", type=int, default=100)
    args = p.parse_args()
    from ctrflow.bench.loadgen import LoadOptions, run_load

    name = args.model_name or Path(args.model_base_path).name
    servers = {1: Served(args.model_base_path, 1), args.workers: Served(args.model_base_path, args.workers)}
    runs: dict[int, list[dict]] = {n: [] for n in servers}
    try:
        time.sleep(2)
        mem = {n: s.memory() for n, s in servers.items()}
        over = {n: False for n in servers}
        for rate in [float(r) for r in args.rates.split(",")]:
            for n, s in servers.items():
                if over[n]:
                    continue
                opts = LoadOptions(url=s.url, model_name=name, protocol="columnar", rate_rps=rate,
                                   candidates=args.candidates, duration_s=args.duration_s, timeout_ms=100.0, seed=1)
                r = run_load(opts).results[0]
                row = {"rate": rate, "predictions_per_s": r.predictions_per_s, "p99_ms": r.latency_ms.get("p99"),
                       "p50_ms": r.latency_ms.get("p50"), "cpu_us_per_prediction": r.cpu_s_per_million_predictions,
                       "server_cores": None if r.server_cpu_s is None else r.server_cpu_s / r.duration_s,
                       "mean_batch_rows": r.mean_batch_rows, "ok": r.ok, "sent": r.sent, "errors": r.errors + r.timeouts + r.rejected + r.dropped}
                runs[n].append(row)
                print(f"workers {n}  rate {rate:6.0f}  {row['predictions_per_s']:9.0f} pred/s  p50 {row['p50_ms']:6.1f} ms  "
                      f"p99 {row['p99_ms']:6.1f} ms  CPU {row['cpu_us_per_prediction'] or float('nan'):5.1f} µs/pred  "
                      f"batch {row['mean_batch_rows'] or float('nan'):6.0f} rows  "
                      f"server {row['server_cores'] or float('nan'):4.2f} cores  "
                      f"failed {row['errors']}", flush=True)
                if row["ok"] < 0.5 * row["sent"]:  # far past capacity: higher rates only queue
                    over[n] = True
            if all(over.values()):
                break
        mem_after = {n: s.memory() for n, s in servers.items()}
    finally:
        for s in servers.values():
            s.close()

    def best(n: int) -> dict | None:
        good = [r for r in runs[n] if r["p99_ms"] is not None and r["p99_ms"] <= args.p99_ms and not r["errors"]]
        return max(good, key=lambda r: r["predictions_per_s"]) if good else None

    def peak(n: int) -> dict:
        return max(runs[n], key=lambda r: r["predictions_per_s"])

    summary = {}
    for n in servers:
        b = best(n)
        summary[n] = {"best": b, "peak": peak(n), "pss_mb": mem_after[n]["pss_kb"] / 1024, "rss_mb": mem_after[n]["rss_kb"] / 1024,
                      "private_mb": mem_after[n]["private_kb"] / 1024}
    n = args.workers
    extra = {k: (summary[n][k] - summary[1][k]) / max(1, n - 1) for k in ("pss_mb", "rss_mb", "private_mb")}
    print()
    print(f"{'':28s} {'1 process':>12s} {f'{n} workers':>12s} {'ratio':>8s}")
    b1, bn = summary[1]["best"], summary[n]["best"]
    if b1 and bn:
        print(f"{'pred/s at p99<=%gms' % args.p99_ms:28s} {b1['predictions_per_s']:12.0f} {bn['predictions_per_s']:12.0f} "
              f"{bn['predictions_per_s'] / b1['predictions_per_s']:8.2f}")
        c1, cn = b1["cpu_us_per_prediction"], bn["cpu_us_per_prediction"]
        if c1 and cn:
            print(f"{'CPU µs/prediction (there)':28s} {c1:12.1f} {cn:12.1f} {cn / c1:8.2f}")
    p1, pn = summary[1]["peak"], summary[n]["peak"]
    print(f"{'peak pred/s (any p99)':28s} {p1['predictions_per_s']:12.0f} {pn['predictions_per_s']:12.0f} "
          f"{pn['predictions_per_s'] / p1['predictions_per_s']:8.2f}")
    for label, r1, rn in (("p99 ms at that peak", p1["p99_ms"], pn["p99_ms"]),
                          ("CPU µs/prediction (peak)", p1["cpu_us_per_prediction"], pn["cpu_us_per_prediction"])):
        if r1 and rn:
            print(f"{label:28s} {r1:12.1f} {rn:12.1f} {rn / r1:8.2f}")
    for k in ("pss_mb", "rss_mb", "private_mb"):
        print(f"{k + ' (all processes)':28s} {summary[1][k]:12.0f} {summary[n][k]:12.0f}   extra worker: {extra[k]:.0f} MB")
    print(json.dumps({"workers": n, "runs": {str(k): v for k, v in runs.items()}, "summary": {str(k): v for k, v in summary.items()},
                      "extra_worker_mb": extra, "memory_before_load": {str(k): v for k, v in mem.items()}}, default=str))


if __name__ == "__main__":
    main()
