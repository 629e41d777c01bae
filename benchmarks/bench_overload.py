"""Overload sheds instead of queueing (issue 11, item 5): capacity, then 2x capacity for 10 s, then recovery.

1. Capacity: open-loop Poisson load (binary columnar, 100 candidates, `X-Deadline-Ms`) at rising rates,
   `--step-s` seconds each, until fewer than 90% are answered 200 within the deadline; capacity is the
   most requests/s so answered at any step (reported in requests/s and predictions/s).
2. Overload: 2x that rate for `--overload-s` seconds, then half of it for `--recovery-s` seconds, in one
   schedule. Reported: accepted (200) p50/p99 latency during the overload, 503s (shed) and 504s,
   goodput (answers 200 within the deadline, in predictions/s) as % of capacity, and recovery: the p99
   and success rate of the requests sent in the 2 s after the overload ends.
   Targets: accepted p99 under the deadline, goodput >= 90% of capacity, recovery at once.

The server runs in a child process (`ctrflow.bench.loadgen`'s), the generator here; both share the
machine's cores (and, on the project machine, other people's jobs): latency counts from each request's
*scheduled* send time, so the generator's own lag is charged to the server, never hidden. What each
side used is measured apart (`server_cores`, `generator_cores`: CPU seconds per second, from /proc,
per capacity step and during the overload); `--pin S:G` puts them on separate CPUs.

A/B: `--compare-tree DIR` runs a second server from the ctrflow package under DIR (e.g. `git archive
OLD ctrflow | tar -x -C DIR`) interleaved with this tree's, order reversed on odd repeats;
`--capacity-once` lets both sides of a repeat meet the same offered rate. `--workers 1,2` runs the
server with 1, then 2 worker processes (`ctrflow serve --workers`), interleaved the same way; without
`--capacity-once` each searches its own capacity (2x of what each can answer).

Usage: python benchmarks/bench_overload.py [--model-base-path DIR] [--deadline-ms 100] [--overload-s 10]
       [--recovery-s 3] [--step-s 3] [--repeat 1] [--rates 200,400,...] [--pin 1:0]
       [--compare-tree DIR [--capacity-once]] [--workers N[,M]] [--tf-threads INTRA[,INTER]] [--compare-no-shed]
       [--capacity-rps R]
Without --model-base-path a small FM on the synthetic schema (39 fields) is trained and exported first.
Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from ctrflow.bench import loadgen  # noqa: E402
from ctrflow.serving.batcher import BatchingOptions  # noqa: E402

CANDIDATES = 100


def _percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def _family(pid: int) -> list[int]:
    """`pid` and every process below it (a `--workers N` server: the supervisor and its workers)."""
    import psutil

    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return [pid]


def _cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system, every thread) used so far by process `pid` and the processes below it
    (None: this one)."""
    if pid is None:
        return time.process_time()
    total = 0.0
    for one in _family(pid):
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            if one == pid:
                return math.nan
            continue  # a worker that just ended
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process `pid` and of its workers (threads started later inherit it) onto `cpus`."""
    for one in _family(pid):
        try:
            tasks = list(Path(f"/proc/{one}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                os.sched_setaffinity(int(task.name), cpus)
            except OSError:  # a thread that just ended
                pass


# The `--workers N` server: `ctrflow.serving.workers.Supervisor` in a child process, imported from the tree
# under test (as `loadgen._ChildServer` does for one process), its port on stdout, stopped by closing stdin.
_WORKERS_CHILD = """
import json, sys
from ctrflow.serving.batcher import BatchingOptions
from ctrflow.serving.server import ServeOptions
from ctrflow.serving.workers import Supervisor
spec = json.loads(sys.argv[1])
sup = Supervisor(ServeOptions(model_base_path=spec["model_base_path"], model_name=spec["model_name"], port=0,
                              batching=BatchingOptions(**spec["batching"]), poll_interval_s=3600.0),
                 workers=spec["workers"]).start()
print(f"CTRFLOW_PORT {sup.port}", flush=True)
try:
    sys.stdin.read()
finally:
    sup.stop()
"""


class _WorkersChild:
    """`loadgen._ChildServer`'s interface (port, proc, close) for a server of N worker processes."""

    def __init__(self, base: str, name: str, batching: BatchingOptions, workers: int) -> None:
        import dataclasses
        import subprocess

        spec = {"model_base_path": base, "model_name": name, "batching": dataclasses.asdict(batching), "workers": workers}
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKERS_CHILD, json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        self.port = loadgen.child_port(self.proc, 300.0)
        if self.port is None:
            self.close()
            raise SystemExit(f"error: the {workers}-worker server for {base} did not start (exit {self.proc.poll()}).")

    def close(self) -> None:
        loadgen._ChildServer.close(self)  # the same stop: EOF on stdin, then wait, then kill


class _Meter:
    """CPU of the server (child process) and of the generator (this process) between marks, plus the
    generator loop's own lag (a 5 ms probe): what the two sides of one box spent, measured apart."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.marks: list[tuple[float, float, float]] = []  # (wall, server cpu, generator cpu)
        self.gen_lag: list[float] = []

    def mark(self) -> None:
        self.marks.append((time.monotonic(), _cpu_s(self.server_pid), _cpu_s()))

    def cores(self, a: int = 0, b: int = -1) -> tuple[float, float]:
        (w0, s0, g0), (w1, s1, g1) = self.marks[a], self.marks[b]
        wall = max(w1 - w0, 1e-9)
        return (s1 - s0) / wall, (g1 - g0) / wall

    async def probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:  # cancelled by _drive when the schedule is done
            asked = loop.time() + 0.005
            await asyncio.sleep(0.005)
            self.gen_lag.append(max(0.0, loop.time() - asked))


async def _drive(port: int, requests: list[bytes], times: np.ndarray, connections: int,
                 limit_s: float, meter: _Meter | None = None,
                 mark_at: tuple[float, ...] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Send request i (`requests[i % len]`: head and body joined ahead of time) at start + times[i] (open
    loop); (status per request, latency s from its scheduled time, the generator's own lag s in starting
    it). `meter` is marked at the start, at each offset of `mark_at`, and once every answer is in. The
    client is `loadgen._OpenLoopHttp` (no task, future or timer per request: the generator shares the
    server's cores, so what it spends at 2x is taken from the server)."""
    loop = asyncio.get_running_loop()
    status = np.zeros(len(times), np.int32)  # 0: no answer (client timeout, connection error)
    latency = np.full(len(times), np.nan)
    lag = np.zeros(len(times))
    prober = None

    def done(i: int, code: int, at: float, now: float, kind: str) -> None:
        status[i] = code
        latency[i] = now - at

    client = loadgen._OpenLoopHttp("127.0.0.1", port, connections, requests, limit_s, done)
    start = loop.time() + 0.05
    if meter is not None:
        loop.call_at(start, meter.mark)
        for offset in mark_at:
            loop.call_at(start + offset, meter.mark)
        prober = loop.create_task(meter.probe())
    try:
        async for i, at in loadgen.on_schedule(times, start):
            lag[i] = max(0.0, loop.time() - at)
            client.fire(i, at)
        await client.drain(limit_s + 5)
    finally:
        client.close()
    if meter is not None:
        meter.mark()
        prober.cancel()
    return status, latency, lag


def _scrape(port: int) -> dict[str, float]:
    from ctrflow.serving.metrics import parse_metrics

    code, body = asyncio.run(loadgen._http_get("127.0.0.1", port, "/metrics", timeout_s=30.0))
    return parse_metrics(body.decode()) if code == 200 else {}


def _counter(before: dict[str, float], after: dict[str, float], name: str) -> float:
    keys = [k for k in after if k.startswith(name + "{") or k == name]
    return sum(after[k] - before.get(k, 0.0) for k in keys)


def find_capacity(port: int, requests, rates: list[float], step_s: float, deadline_ms: float,
                  connections: int, seed: int, server_pid: int | None = None) -> tuple[float, list[dict]]:
    """Capacity: the most requests/s answered 200 within the deadline at any of the rising `rates`
    (which stop one step after the good share falls under 90%: past capacity)."""
    steps, capacity = [], 0.0
    for rate in rates:
        times = loadgen.arrival_times(rate, step_s, seed)
        meter = _Meter(server_pid)
        status, latency, _ = asyncio.run(_drive(port, requests, times, connections, max(2.0, 20 * deadline_ms / 1e3),
                                                meter, (step_s,)))
        server_cores, generator_cores = meter.cores(0, 1)
        good = (status == 200) & (latency <= deadline_ms / 1e3)
        ok_lat = latency[status == 200] * 1e3
        row = {"rate_rps": rate, "requests": int(len(times)), "good_fraction": float(good.mean()) if len(good) else 0.0,
               "good_rps": float(good.sum()) / step_s,
               "p50_ms": _percentile(ok_lat, 50), "p99_ms": _percentile(ok_lat, 99),
               "shed_503": int((status == 503).sum()), "timeouts_504": int((status == 504).sum()),
               "server_cores": server_cores, "generator_cores": generator_cores,
               "generator_loop_lag_p99_ms": _percentile(np.asarray(meter.gen_lag) * 1e3, 99)}
        steps.append(row)
        print(f"  capacity step {rate:7.0f} req/s: {row['good_fraction']:.1%} good ({row['good_rps']:.0f}/s), "
              f"p99 {row['p99_ms']:.1f} ms, {row['shed_503']} x 503, {row['timeouts_504']} x 504; CPU cores: "
              f"server {server_cores:.2f}, generator {generator_cores:.2f} (its loop lag p99 "
              f"{row['generator_loop_lag_p99_ms']:.1f} ms)", flush=True)
        capacity = max(capacity, row["good_rps"])
        if row["good_fraction"] < 0.9:
            break
    return capacity, steps


def overload(port: int, requests, capacity_rps: float, deadline_ms: float, overload_s: float, recovery_s: float,
             connections: int, seed: int, server_pid: int | None = None) -> dict:
    """2x capacity for overload_s, then 0.5x for recovery_s, in one open-loop schedule."""
    over = loadgen.arrival_times(2 * capacity_rps, overload_s, seed)
    after = overload_s + loadgen.arrival_times(0.5 * capacity_rps, recovery_s, seed + 1)
    times = np.concatenate([over, after])
    before = _scrape(port)
    meter = _Meter(server_pid)
    status, latency, lag = asyncio.run(_drive(port, requests, times, connections, max(2.0, 20 * deadline_ms / 1e3),
                                              meter, (overload_s,)))
    server_cores, generator_cores = meter.cores(0, 1)
    metrics = _scrape(port)
    budget = deadline_ms / 1e3
    in_over = times < overload_s
    s, lat = status[in_over], latency[in_over]
    accepted = lat[s == 200] * 1e3
    good = int(((s == 200) & (lat <= budget)).sum())
    window = (times >= overload_s) & (times < overload_s + 2.0)
    rec_ok = latency[window & (status == 200)] * 1e3
    goodput = good * CANDIDATES / overload_s
    return {
        "offered_rps": 2 * capacity_rps, "requests": int(in_over.sum()), "accepted": int((s == 200).sum()),
        "accepted_p50_ms": _percentile(accepted, 50), "accepted_p99_ms": _percentile(accepted, 99),
        "accepted_late": int((accepted > deadline_ms).sum()),
        "shed_503": int((s == 503).sum()), "timeouts_504": int((s == 504).sum()),
        "other": int(((s != 200) & (s != 503) & (s != 504)).sum()),
        "goodput_predictions_per_s": goodput,
        "goodput_vs_capacity": goodput / (capacity_rps * CANDIDATES) if capacity_rps else math.nan,
        "recovery_requests": int(window.sum()), "recovery_ok_fraction": float((status[window] == 200).mean()) if window.any() else math.nan,
        "recovery_p99_ms": _percentile(rec_ok, 99),
        # The generator's own lag in starting requests (it shares the cores): part of every latency above.
        "generator_lag_p99_ms": _percentile(lag[in_over] * 1e3, 99),
        # CPU cores each side used during the overload (server: the child process; generator: this one).
        "server_cores": server_cores, "generator_cores": generator_cores,
        "generator_loop_lag_p99_ms": _percentile(np.asarray(meter.gen_lag) * 1e3, 99),
        "server_shed": _counter(before, metrics, "ctrflow_batcher_shed_total"),
        "server_expired": _counter(before, metrics, "ctrflow_batcher_expired_total"),
        "server_loop_lag_s_after": metrics.get("ctrflow_http_loop_lag_seconds", math.nan),
    }


def _cpus(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _parse_pin(text: str) -> tuple[set[int], set[int]]:
    server, sep, generator = text.partition(":")
    if not sep:
        raise SystemExit(f"error: --pin wants SERVER:GENERATOR CPU lists (e.g. 1:0). Got {text!r} instead.")
    return _cpus(server), _cpus(generator)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--model-base-path")
    ap.add_argument("--deadline-ms", type=float, default=100.0)
    ap.add_argument("--overload-s", type=float, default=10.0)
    ap.add_argument("--recovery-s", type=float, default=3.0)
    ap.add_argument("--step-s", type=float, default=3.0)
    ap.add_argument("--rates", default="200,300,400,500,600,800,1000,1200,1500,1800,2200,2600,3000")
    ap.add_argument("--connections", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--max-batch-size", type=int, default=4096)
    ap.add_argument("--batch-timeout-ms", type=float, default=2.0)
    ap.add_argument("--no-shed", action="store_true", help="turn deadline shedding off (the bounded queue stays)")
    ap.add_argument("--shed-budget-fraction", type=float, default=BatchingOptions().shed_budget_fraction)
    ap.add_argument("--capacity-rps", type=float, help="skip the capacity search: overload at 2x this rate")
    ap.add_argument("--pin", metavar="SERVER:GENERATOR",
                    help="CPU lists (e.g. 1:0 or 0-1:0): the server's threads on the first, this generator on the "
                         "second (os.sched_setaffinity), so capacity and overload run on the same CPU share")
    ap.add_argument("--compare-tree", metavar="DIR",
                    help="each repeat also runs the server from the ctrflow package under DIR (e.g. an older "
                         "commit's `git archive`), interleaved with this tree's, on the same schedule")
    ap.add_argument("--capacity-once", action="store_true",
                    help="search capacity only in the first run of each repeat; the others overload at 2x that, "
                         "so a pair meets the very same offered rate")
    ap.add_argument("--workers", default="1", metavar="N[,M...]",
                    help="server worker processes (`ctrflow serve --workers`); a list (e.g. 1,2) runs each in turn, "
                         "interleaved like --compare-tree, so 1 vs 2 workers meet the same offered rate")
    ap.add_argument("--tf-threads", metavar="INTRA[,INTER]",
                    help="TensorFlow threads of the server(s) (TF_NUM_INTRAOP/INTEROP_THREADS in their environment; "
                         "INTER defaults to INTRA), e.g. 1,2 so that two workers do not each spin two threads per call")
    ap.add_argument("--compare-no-shed", action="store_true",
                    help="each repeat runs shedding on, then off, on the same schedule (interleaved)")
    args = ap.parse_args(argv)
    if args.tf_threads:
        intra, _, inter = args.tf_threads.partition(",")
        if not intra.isdigit() or not (inter or intra).isdigit():
            raise SystemExit(f"error: --tf-threads wants INTRA[,INTER] thread counts (e.g. 1,2). Got {args.tf_threads!r} instead.")
        os.environ["TF_NUM_INTRAOP_THREADS"], os.environ["TF_NUM_INTEROP_THREADS"] = intra, inter or intra

    with tempfile.TemporaryDirectory(prefix="ctrflow-bench-overload-") as tmp:
        if args.model_base_path:
            base = Path(args.model_base_path).resolve()
        else:
            from bench_serving import build_model

            print("building a small FM on the synthetic schema ...", flush=True)
            base = build_model(Path(tmp))
        features, schema, _ = loadgen._model_info(str(base))
        options = loadgen.LoadOptions(model_base_path=str(base), protocol="columnar", candidates=CANDIDATES,
                                      timeout_ms=args.deadline_ms, distinct_bodies=128)
        bodies = loadgen._bodies(options, loadgen._sample_data(options, features, schema, Path(tmp)), features)
        name = base.name
        from ctrflow.client.columnar import COLUMNAR_CONTENT_TYPE

        heads = [(f"POST /v1/models/{name}:predict_columnar HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                  f"{COLUMNAR_CONTENT_TYPE}\r\nContent-Length: {len(b)}\r\nX-Deadline-Ms: {args.deadline_ms:g}\r\n\r\n").encode()
                 for b in bodies]
        requests = [h + b for h, b in zip(heads, bodies)]  # joined once: no copy of a body per request
        import gc

        gc.collect()
        gc.freeze()
        pin = _parse_pin(args.pin) if args.pin else None
        if pin:
            os.sched_setaffinity(0, pin[1])
        here = os.environ.get("PYTHONPATH", "")
        cwd = os.getcwd()
        workers = [int(x) for x in args.workers.split(",") if x.strip().isdigit()]
        if not workers or len(workers) != len([x for x in args.workers.split(",") if x]) or min(workers) < 1:
            raise SystemExit(f"error: --workers wants counts >= 1 (e.g. 1,2). Got {args.workers!r} instead.")
        modes = [("this", not args.no_shed, str(REPO), w) for w in workers]
        if args.compare_tree:
            modes += [("tree", not args.no_shed, str(Path(args.compare_tree).resolve()), w) for w in workers]
        if args.compare_no_shed:
            modes.append(("this", False, str(REPO), workers[0]))
        runs = []
        # Odd repeats run the modes in reverse order, so that neither side always goes first.
        order = ((r, i, m) for r in range(args.repeat) for i, m in enumerate(modes if r % 2 == 0 else modes[::-1]))
        for r, m_i, (label, shed, tree, n_workers) in order:
            # The child server (`python -m`, which puts its working directory first on sys.path) imports
            # ctrflow from `tree`: run it from there.
            os.environ["PYTHONPATH"] = tree
            os.chdir(tree)
            batching = BatchingOptions(max_batch_size=args.max_batch_size, batch_timeout_ms=args.batch_timeout_ms,
                                       shed_by_deadline=shed, shed_budget_fraction=args.shed_budget_fraction)
            child = loadgen._ChildServer(str(base), name, batching) if n_workers == 1 else \
                _WorkersChild(str(base), name, batching, n_workers)
            if pin:
                _pin(child.proc.pid, pin[0])
            try:
                warm = loadgen.arrival_times(100, 2.0, 99)
                asyncio.run(_drive(child.port, requests, warm, 64, 5.0))
                rates = [float(x) for x in args.rates.split(",") if x]
                if args.capacity_rps:
                    capacity, steps = args.capacity_rps, []
                elif args.capacity_once and m_i and runs[-1].get("capacity_rps"):
                    capacity, steps = runs[-1]["capacity_rps"], []
                else:
                    capacity, steps = find_capacity(child.port, requests, rates, args.step_s, args.deadline_ms,
                                                    args.connections, seed=r, server_pid=child.proc.pid)
                if not capacity:
                    print("no rate met the deadline: the machine is too busy to measure", flush=True)
                    runs.append({"code": label, "workers": n_workers, "shed_by_deadline": shed, "capacity_rps": 0.0,
                                 "steps": steps})
                    continue
                time.sleep(1.0)
                result = overload(child.port, requests, capacity, args.deadline_ms, args.overload_s,
                                  args.recovery_s, args.connections, seed=100 + r, server_pid=child.proc.pid)
                runs.append({"code": label, "workers": n_workers, "shed_by_deadline": shed, "capacity_rps": capacity,
                             "capacity_predictions_per_s": capacity * CANDIDATES, "steps": steps, **result})
            finally:
                child.close()
                os.environ["PYTHONPATH"] = here
                os.chdir(cwd)

    print()
    print(f"overload: 2x capacity for {args.overload_s:g} s, X-Deadline-Ms {args.deadline_ms:g}, {CANDIDATES} candidates, "
          f"binary columnar, shed_budget_fraction {args.shed_budget_fraction:g}")
    print(f"{'run':>3} {'code':>4} {'wk':>2} {'shed':>4} {'capacity':>9} {'offered':>8} {'acc p50':>8} {'acc p99':>8} {'late':>5} {'503':>6} {'504':>5} "
          f"{'goodput':>8} {'rec p99':>8} {'rec ok':>7} {'gen lag p99':>11} {'srv CPU':>7} {'gen CPU':>7}")
    for i, run in enumerate(runs):
        if "accepted" not in run:
            print(f"{i:>3} {run['code']:>4} {run['workers']:>2} {'on' if run['shed_by_deadline'] else 'off':>4} {'-':>9}")
            continue
        print(f"{i:>3} {run['code']:>4} {run['workers']:>2} {'on' if run['shed_by_deadline'] else 'off':>4} {run['capacity_rps']:>7.0f}/s {run['offered_rps']:>6.0f}/s {run['accepted_p50_ms']:>6.1f}ms "
              f"{run['accepted_p99_ms']:>6.1f}ms {run['accepted_late']:>5} {run['shed_503']:>6} {run['timeouts_504']:>5} "
              f"{run['goodput_vs_capacity']:>8.1%} {run['recovery_p99_ms']:>6.1f}ms {run['recovery_ok_fraction']:>7.1%} "
              f"{run['generator_lag_p99_ms']:>9.1f}ms {run['server_cores']:>7.2f} {run['generator_cores']:>7.2f}")
    print(json.dumps({"benchmark": "overload", "deadline_ms": args.deadline_ms, "candidates": CANDIDATES,
                      "overload_s": args.overload_s, "shed_budget_fraction": args.shed_budget_fraction, "cpus": os.cpu_count(), "pin": args.pin,
                      "tf_threads": args.tf_threads,
                      "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
