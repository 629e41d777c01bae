"""The REST front end: today's stack vs the candidates, at the same offered load, in one run.

Stacks, each a server in its own child process (so its CPU is measured alone, from the OS):
- `old`: the hand-framed HTTP/1.1 on asyncio streams, from git history (`--old-ref`, default the
  commit before the transport change), extracted with `git archive` into a temporary folder;
- `uvicorn`: ctrflow's server as it is (uvicorn + httptools under a bare ASGI app, strict framing);
- `aiohttp`: the same routes under aiohttp's server (a bench-only adapter, defined here);
- `git:REF`: ctrflow's server as it was at commit REF (e.g. before a change to the transport).
Each gets the same open-loop Poisson schedule (same seed) of 100-candidate requests, binary columnar
then JSON `instances`, from `ctrflow.bench.loadgen`. Reported: p50/p99 latency, CPU µs per prediction.

Usage: python benchmarks/bench_serving.py [--model-base-path DIR] [--columnar-rate 400] [--json-rate 100]
       [--duration-s 8] [--repeat 2] [--stacks old,uvicorn,aiohttp,git:REF] [--old-ref 54512f2] [--paired N]
       [--loop-cpu N] [--idle-s S]

`--paired N` adds a measure that a shared, noisy machine cannot skew one way: every stack runs at once
and N serial requests per body go to each in turn (the order alternating), so all stacks see the same
background load at the same moments; reported: server CPU per request and per prediction, and each
stack's ratio to the first one (no batching across requests here: one request, one model call). A third
body, `transport`, is a 20 KB POST to a route that does not exist (404): the HTTP transport's own cost
(5 N requests: the OS counts CPU in 10 ms ticks).

`--loop-cpu N` measures the transport alone more finely, for the stacks built on `HttpTransport`
(`uvicorn`, `git:REF`): in one process, N serial 20 KB POSTs to a handle that answers 404, CPU of the
serving loop's thread only (`time.thread_time`), `--repeat-loop-cpu` rounds.
Without --model-base-path a small FM on the synthetic schema (39 fields) is trained and exported first.
Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OLD_REF = "54512f2"  # the last commit with the hand-framed server (ctrflow/serving/http.py on asyncio streams)


def build_model(root: Path) -> Path:
    from ctrflow.data.convert import ConvertOptions, convert
    from ctrflow.data.generate import GenerateOptions, generate
    from ctrflow.export import export
    from ctrflow.models.registry import ModelConfig
    from ctrflow.schema import PRESETS
    from ctrflow.train.config import TrainConfig
    from ctrflow.train.loop import train

    generate(root / "train.csv", GenerateOptions(rows=20_000, seed=5))
    convert(root / "train.csv", root / "shards", schema=PRESETS["synthetic"].capped(1 << 16), options=ConvertOptions(workers=1))
    train(root / "shards", root / "run", TrainConfig(model=ModelConfig("fm", embedding_dim=8), batch_size=1024, max_steps=30))
    export(root / "run", root / "models" / "ctr")
    return root / "models" / "ctr"


class Child:
    """A server in a child process that prints `CTRFLOW_PORT n` and stops when its stdin closes."""

    def __init__(self, argv: list[str], pythonpath: str, timeout_s: float = 180.0) -> None:
        env = {**os.environ, "PYTHONPATH": pythonpath, "TF_CPP_MIN_LOG_LEVEL": "3"}
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, text=True, cwd=pythonpath)
        from ctrflow.bench.loadgen import child_port

        self.port = child_port(self.proc, timeout_s)
        if self.port is None:
            self.close()
            raise RuntimeError(f"{argv}: the child server did not start (exit code {self.proc.poll()})")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(30)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait(10)


def spec_json(base: Path) -> str:
    return json.dumps({"model_base_path": str(base), "model_name": "ctr",
                       "batching": {"max_batch_size": 4096, "batch_timeout_ms": 2.0}})


def start_stack(stack: str, base: Path, old_tree: Path | dict[str, Path] | None) -> Child:
    if stack == "old" or stack.startswith("git:"):  # a tree extracted from git history
        tree = old_tree[stack] if isinstance(old_tree, dict) else old_tree
        return Child([sys.executable, "-m", "ctrflow.bench.loadgen", "--child-server", spec_json(base)], str(tree))
    if stack == "uvicorn":
        return Child([sys.executable, "-m", "ctrflow.bench.loadgen", "--child-server", spec_json(base)], str(REPO))
    if stack == "aiohttp":
        return Child([sys.executable, str(Path(__file__).resolve()), "--child-aiohttp", spec_json(base)], str(REPO))
    raise SystemExit(f"unknown stack {stack!r}; use old, uvicorn, aiohttp, git:REF")


def child_aiohttp(spec: str) -> None:
    """ctrflow's routes and life cycle under aiohttp's server instead of uvicorn (bench only)."""
    from aiohttp import web

    from ctrflow.serving.batcher import BatchingOptions
    from ctrflow.serving.rest import RestRequest
    from ctrflow.serving.server import ServeOptions, Server

    s = json.loads(spec)
    server = Server(ServeOptions(model_base_path=s["model_base_path"], model_name=s["model_name"], port=0,
                                 batching=BatchingOptions(**s["batching"]), poll_interval_s=3600.0))
    server.manager.start()

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        r = await server.routes.handle(RestRequest(request.method, request.path, headers, body, request.query_string))
        out = web.Response(status=r.status, body=r.body)
        out.headers["Content-Type"] = r.content_type.decode()
        for k, v in r.headers:
            out.headers[k.decode()] = v.decode()
        return out

    async def main() -> None:
        app = web.Application(client_max_size=8 << 20)
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        print(f"CTRFLOW_PORT {port}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        server.manager.close()


def child_transport(n: int) -> None:
    """The HTTP transport alone, in this process: `HttpTransport` with a handle that answers 404, N serial
    20 KB POSTs from a client process; prints the serving loop thread's CPU per request (`time.thread_time`
    on that thread, so neither the client nor other threads count). Runs the ctrflow of PYTHONPATH."""
    sys.path.insert(0, os.environ["PYTHONPATH"])
    import time
    import types

    from ctrflow.serving.http import HttpTransport
    from ctrflow.serving.rest import RestResponse

    options = types.SimpleNamespace(host="127.0.0.1", port=0, max_header_bytes=16384, max_body_bytes=8 << 20,
                                    max_buffered_body_bytes=256 << 20, max_connections=1000, head_timeout_s=10.0,
                                    body_timeout_s=30.0, drain_timeout_s=30.0, keep_alive_timeout_s=75.0)

    async def handle(request: object) -> RestResponse:
        return RestResponse(404, b'{"error": "no such route"}')

    transport = HttpTransport(options, handle)
    port = transport.start()
    client = ("import http.client\n"
              f"c = http.client.HTTPConnection('127.0.0.1', {port})\n"
              "for i in range(int(__import__('sys').argv[1])):\n"
              "    c.request('POST', '/v1/no-such-route', body=b'x' * 20480, headers={'Content-Type': 'application/octet-stream'})\n"
              "    r = c.getresponse(); r.read(); assert r.status == 404, r.status\n")

    async def thread_time() -> float:
        return time.thread_time()

    subprocess.run([sys.executable, "-c", client, "300"], check=True)  # warm
    t0 = transport.run(thread_time())
    subprocess.run([sys.executable, "-c", client, str(n)], check=True)
    print(json.dumps({"loop_cpu_us_per_request": 1e6 * (transport.run(thread_time()) - t0) / n}), flush=True)
    transport.stop(1)


def run_loop_cpu(args: argparse.Namespace, stacks: list[str], trees: dict[str, Path]) -> list[dict]:
    """`child_transport` for every stack built on `HttpTransport` (not `old`, whose server differs), in turn."""
    out = []
    for round_ in range(args.repeat_loop_cpu):
        for stack in stacks:
            if stack not in ("uvicorn",) and not stack.startswith("git:"):
                continue
            tree = str(REPO) if stack == "uvicorn" else str(trees[stack])
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child-transport", str(args.loop_cpu)],
                                  env={**os.environ, "PYTHONPATH": tree}, capture_output=True, text=True, check=True)
            out.append({"stack": stack, "round": round_, "requests": args.loop_cpu,
                        **json.loads(proc.stdout.strip().splitlines()[-1])})
    return out


def run_idle(args: argparse.Namespace, base: Path, stacks: list[str], trees: dict[str, Path]) -> list[dict]:
    """CPU of each stack's server while it serves nothing (timers, probes, pollers), all started at once."""
    import time

    import psutil

    children = [start_stack(stack, base, trees) for stack in stacks]
    try:
        time.sleep(3)  # past start-up
        procs = [psutil.Process(c.proc.pid) for c in children]
        cpu0 = [sum(p.cpu_times()[:2]) for p in procs]
        time.sleep(args.idle_s)
        return [{"stack": stack, "idle_cpu_ms_per_s": (sum(p.cpu_times()[:2]) - c0) / args.idle_s * 1e3}
                for stack, p, c0 in zip(stacks, procs, cpu0)]
    finally:
        for c in children:
            c.close()


def run_paired(args: argparse.Namespace, base: Path, stacks: list[str], old_tree: dict[str, Path], tmp: Path) -> list[dict]:
    """Every stack at once, serial requests alternating between them: CPU per request from the OS."""
    import http.client

    import psutil

    from ctrflow.bench.loadgen import LoadOptions, _bodies, _model_info, _sample_data

    features, schema, _ = _model_info(str(base))
    data = _sample_data(LoadOptions(model_base_path=str(base), seed=args.seed), features, schema, tmp)
    out = []
    for protocol, path, ctype, want in (("columnar", "/v1/models/ctr:predict_columnar", "application/x-ctrflow-columnar", 200),
                                        ("rest", "/v1/models/ctr:predict", "application/json", 200),
                                        ("transport", "/v1/no-such-route", "application/octet-stream", 404)):
        if protocol == "transport":  # the HTTP transport alone: a 20 KB body read, a 404 answered
            bodies = [b"x" * 20480]
        else:
            bodies = _bodies(LoadOptions(model_base_path=str(base), protocol=protocol, candidates=args.candidates,
                                         seed=args.seed, distinct_bodies=64), data, features)
        children = [start_stack(stack, base, old_tree) for stack in stacks]
        try:
            conns = [http.client.HTTPConnection("127.0.0.1", c.port, timeout=30) for c in children]
            procs = [psutil.Process(c.proc.pid) for c in children]

            def one(i: int, body: bytes) -> None:
                conns[i].request("POST", path, body=body, headers={"Content-Type": ctype, "X-Deadline-Ms": "1000"})
                r = conns[i].getresponse()
                r.read()
                if r.status != want:
                    raise RuntimeError(f"{stacks[i]} answered {r.status} on {path}, not {want}")

            for k in range(100):  # warm every stack
                for i in range(len(stacks)):
                    one(i, bodies[k % len(bodies)])
            # The OS counts CPU in 10 ms ticks: the cheap transport probe needs more requests to resolve.
            n = args.paired * (5 if protocol == "transport" else 1)
            cpu0 = [sum(p.cpu_times()[:2]) for p in procs]
            for k in range(n):
                order = range(len(stacks)) if k % 2 == 0 else reversed(range(len(stacks)))
                for i in order:
                    one(i, bodies[k % len(bodies)])
            cpu = [(sum(p.cpu_times()[:2]) - c0) / n * 1e6 for p, c0 in zip(procs, cpu0)]
            for conn in conns:
                conn.close()
        finally:
            for c in children:
                c.close()
        out.extend({"stack": stack, "protocol": protocol, "requests": n, "cpu_us_per_request": c,
                    "cpu_us_per_prediction": None if protocol == "transport" else c / args.candidates,
                    "ratio_to_first": c / cpu[0]}
                   for stack, c in zip(stacks, cpu))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-base-path")
    ap.add_argument("--stacks", default="old,uvicorn,aiohttp")
    ap.add_argument("--old-ref", default=OLD_REF)
    ap.add_argument("--columnar-rate", type=float, default=400.0)
    ap.add_argument("--json-rate", type=float, default=100.0)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--duration-s", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=2, help="rounds over the stacks, interleaved (a busy machine drifts)")
    ap.add_argument("--paired", type=int, default=0, help="N serial requests per body, alternating between stacks run at once")
    ap.add_argument("--loop-cpu", type=int, default=0,
                    help="N serial 20 KB POSTs to a 404 handle: the transport's loop-thread CPU per request, in-process")
    ap.add_argument("--repeat-loop-cpu", type=int, default=3)
    ap.add_argument("--idle-s", type=float, default=0.0, help="measure each server's CPU while idle for this long")
    ap.add_argument("--child-aiohttp", help=argparse.SUPPRESS)
    ap.add_argument("--child-transport", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_aiohttp:
        child_aiohttp(args.child_aiohttp)
        return
    if args.child_transport:
        child_transport(args.child_transport)
        return

    from ctrflow.bench.loadgen import LoadOptions, run_load

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        tmp = Path(tmp)
        base = Path(args.model_base_path).resolve() if args.model_base_path else build_model(tmp)
        stacks = args.stacks.split(",")
        old_tree: dict[str, Path] = {}
        for i, stack in enumerate(stacks):
            if stack == "old" or stack.startswith("git:"):
                ref = args.old_ref if stack == "old" else stack[4:]
                old_tree[stack] = tmp / f"tree{i}"
                old_tree[stack].mkdir()
                archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "ctrflow"], check=True, capture_output=True)
                subprocess.run(["tar", "-x", "-C", str(old_tree[stack])], input=archive.stdout, check=True)
        rows = []
        for round_ in range(args.repeat):
            for stack in stacks:
                child = start_stack(stack, base, old_tree)
                try:
                    for protocol, rate in (("columnar", args.columnar_rate), ("rest", args.json_rate)):
                        report = run_load(LoadOptions(
                            url=f"http://127.0.0.1:{child.port}", model_name="ctr", protocol=protocol, rate_rps=rate,
                            candidates=args.candidates, duration_s=args.duration_s, timeout_ms=100.0, seed=args.seed,
                            server_pid=child.proc.pid, connections=64))
                        r = report.results[0]
                        rows.append({"stack": stack, "round": round_, "protocol": protocol, "rate_rps": rate, "ok": r.ok,
                                     "sent": r.sent, "p50_ms": r.latency_ms["p50"], "p99_ms": r.latency_ms["p99"],
                                     "p99.9_ms": r.latency_ms["p99.9"], "errors": r.errors + r.timeouts + r.rejected,
                                     "cpu_us_per_prediction": r.cpu_s_per_million_predictions,
                                     "predictions_per_s": r.predictions_per_s, "mean_batch_rows": r.mean_batch_rows})
                finally:
                    child.close()
        paired = run_paired(args, base, stacks, old_tree, tmp) if args.paired else []
        loop_cpu = run_loop_cpu(args, stacks, old_tree) if args.loop_cpu else []
        idle = run_idle(args, base, stacks, old_tree) if args.idle_s else []
    summary = []
    for stack in stacks:
        for protocol in ("columnar", "rest"):
            mine = [r for r in rows if r["stack"] == stack and r["protocol"] == protocol]
            if not mine:  # --repeat 0: the paired measure only
                continue
            med = lambda k: statistics.median(r[k] for r in mine if r[k] is not None)  # noqa: E731
            summary.append({"stack": stack, "protocol": protocol, "runs": len(mine), "p50_ms": med("p50_ms"),
                            "p99_ms": med("p99_ms"), "cpu_us_per_prediction": med("cpu_us_per_prediction"),
                            "mean_batch_rows": med("mean_batch_rows"),
                            "errors": sum(r["errors"] for r in mine), "sent": sum(r["sent"] for r in mine)})
    head = f"{'stack':8s} {'round':>5s} {'protocol':9s} {'req/s':>6s} {'ok/sent':>11s} {'p50 ms':>7s} {'p99 ms':>7s} {'p99.9 ms':>8s} {'errors':>6s} {'CPU µs/pred':>11s}"
    print(head)
    for r in rows:
        print(f"{r['stack']:8s} {r['round']:5d} {r['protocol']:9s} {r['rate_rps']:6.0f} {r['ok']:>5d}/{r['sent']:<5d} {r['p50_ms']:7.2f} "
              f"{r['p99_ms']:7.2f} {r['p99.9_ms']:8.2f} {r['errors']:6d} {r['cpu_us_per_prediction'] or float('nan'):11.2f}")
    print()
    print(f"median over {args.repeat} rounds:")
    print(f"{'stack':8s} {'protocol':9s} {'p50 ms':>7s} {'p99 ms':>7s} {'CPU µs/pred':>11s} {'batch rows':>10s} {'errors/sent':>12s}")
    for r in summary:
        print(f"{r['stack']:8s} {r['protocol']:9s} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} {r['cpu_us_per_prediction']:11.2f} "
              f"{r['mean_batch_rows']:10.0f} "
              f"{r['errors']:>5d}/{r['sent']:<6d}")
    if paired:
        print()
        print(f"paired: {args.paired} serial requests per body to each stack in turn, all stacks running at once:")
        print(f"{'stack':8s} {'protocol':9s} {'CPU µs/req':>10s} {'CPU µs/pred':>11s} {'vs ' + stacks[0]:>9s}")
        for r in paired:
            print(f"{r['stack']:8s} {r['protocol']:9s} {r['cpu_us_per_request']:10.1f} {r['cpu_us_per_prediction'] or float('nan'):11.2f} "
                  f"{r['ratio_to_first']:9.3f}")
    if loop_cpu:
        print()
        print(f"transport alone, in-process: {args.loop_cpu} serial 20 KB POSTs to a 404 handle, serving loop thread's CPU:")
        for r in loop_cpu:
            print(f"{r['stack']:12s} round {r['round']}: {r['loop_cpu_us_per_request']:6.1f} µs/request")
    if idle:
        print()
        print(f"idle, {args.idle_s:g} s, all servers started at once:")
        for r in idle:
            print(f"{r['stack']:12s} {r['idle_cpu_ms_per_s']:6.1f} ms CPU / s")
    print(json.dumps({"benchmark": "serving_stacks", "candidates": args.candidates, "duration_s": args.duration_s,
                      "columnar_rate_rps": args.columnar_rate, "json_rate_rps": args.json_rate, "old_ref": args.old_ref,
                      "summary": summary, "results": rows, "paired": paired,
                      "loop_cpu": loop_cpu, "idle": idle}))


if __name__ == "__main__":
    main()
