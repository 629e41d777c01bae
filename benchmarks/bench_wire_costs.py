"""The HTTP path's own per-request costs (issue 11, items 1 and 5), each measured both ways, interleaved, in one run.

1. `decode`: `decode_columnar` of this tree against the one under `--old-tree DIR` (e.g. `git -C /work/main
   archive main | tar -x -C DIR`), on the same 100 x 39 bodies (CPU µs per request).
2. `strings`: the raw binary path's server-side work per batch of K requests (decode -> prepare -> concatenate
   -> `Predictor._compute`) with the strings as Python objects (today's route), against 'S' columns kept as they are and handed to TensorFlow by
   `ctrflow.serving.strings.bytes_tensor` (what `_notes/wire-needs.md` asks of the predictor and batcher);
   scores checked equal. CPU µs per prediction.
3. `generator`: the load generator's own CPU per request against one child server at `--rate`: the former
   client (`_HttpPool`, a task per request; `wait_for` as bench_overload had it) against `_OpenLoopHttp`.
4. `loop`: the HTTP server's event-loop thread's own CPU per `:predict_ids` request (100 candidates), this
   tree's server against the one under `--old-tree`: both child processes run at once (pinned to
   `--server-cpu`), driven closed-loop by `--connections` keep-alive connections from this process (pinned
   to the other cores) in alternating slices (old, new, new, old, ...) of `--requests` answers per round
   each; the loop thread's CPU and the whole server's from the kernel's per-thread run time
   (/proc/PID/task/TID/schedstat, ns).

Usage: python benchmarks/bench_wire_costs.py --model-base-path DIR [--old-tree DIR] [--parts decode,strings,generator,loop]
       [--rounds 3] [--rate 800] [--seconds 5] [--requests 3000] [--connections 8] [--server-cpu 1]
Pin it (`taskset -c 1`) for parts 1-2 on a shared machine. Prints a table per part, then one JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctrflow.bench import loadgen  # noqa: E402
from ctrflow.client.columnar import COLUMNAR_CONTENT_TYPE, encode_columnar  # noqa: E402
from ctrflow.serving.codec import decode_columnar  # noqa: E402


# ---- the generators' former client (a task per request), kept here only to compare against ----


class _HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection of `_HttpPool`: one request at a time, the answer framed by its
    Content-Length. A Protocol, not streams: one loop future per request and no reader buffer objects,
    so the generator's own CPU per request stays small beside the server's on a shared machine."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = b""
        self._answer: asyncio.Future[tuple[int, bytes, bool]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes) -> asyncio.Future[tuple[int, bytes, bool]]:
        """Write one request; the future resolves to (status, body, server closes the connection)."""
        self._answer = answer = asyncio.get_running_loop().create_future()
        self._buf = b""
        self.transport.write(data)
        return answer

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self._buf = buf
            return
        head = buf[:end].lower()
        length, at = 0, head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17: stop if stop > 0 else len(head)])
        if len(buf) < end + 4 + length:
            self._buf = buf
            return
        self._buf = b""
        answer, self._answer = self._answer, None
        close = b"\r\nconnection: close" in head
        if answer is not None and not answer.done():
            answer.set_result((int(buf[9:12]), buf[end + 4: end + 4 + length], close))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        answer, self._answer = self._answer, None
        if answer is not None and not answer.done():
            answer.set_exception(asyncio.IncompleteReadError(self._buf, None))


class _HttpPool:
    """At most `size` keep-alive connections; a request waits for a free one (that wait counts as latency).

    Releasing is synchronous, so a request cancelled by its timeout still gives its slot back (and its
    connection, which may still receive that answer, is closed rather than reused).
    """

    def __init__(self, host: str, port: int, size: int) -> None:
        self._host, self._port = host, port
        self._idle: list[_HttpConnection] = []
        self._slots = asyncio.Semaphore(size)

    async def request(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        await self._slots.acquire()
        conn = None
        reusable = False
        try:
            while self._idle and conn is None:  # bounded by the idle list
                conn = self._idle.pop()
                if conn.closed:
                    conn = None
            if conn is None:
                _, conn = await asyncio.get_running_loop().create_connection(_HttpConnection, self._host, self._port)
            status, payload, close = await conn.send(head + body)
            reusable = not close and not conn.closed
            return status, payload
        finally:
            if conn is not None:
                if reusable:
                    self._idle.append(conn)
                elif conn.transport is not None:
                    conn.transport.close()
            self._slots.release()

    async def close(self) -> None:
        for conn in self._idle:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()


def _rows(base: str, n: int) -> tuple[loadgen._Features, dict]:
    from ctrflow.data.generate import GenerateOptions, generate

    features, _, _ = loadgen._model_info(base)
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp) / "rows.csv", GenerateOptions(rows=n, seed=3, split="test"))
        return features, loadgen._read_rows(Path(tmp) / "rows.csv", features, None)


def _bodies(features, cols, count: int) -> list[bytes]:
    return [encode_columnar({k: v[i * 100:(i + 1) * 100] for k, v in cols.items()}, features.categorical, features.numeric)
            for i in range(count)]


def part_decode(base: str, old_tree: str, rounds: int) -> dict:
    spec = importlib.util.spec_from_file_location("_old_codec", Path(old_tree) / "ctrflow/serving/codec.py")
    old = importlib.util.module_from_spec(spec)
    sys.modules["_old_codec"] = old
    spec.loader.exec_module(old)
    features, cols = _rows(base, 3000)
    bodies = _bodies(features, cols, 30)
    cat, num = features.categorical, features.numeric

    def cpu(fn) -> float:
        for b in bodies:
            fn(b, cat, num)
        t = time.process_time()
        for _ in range(200):
            for b in bodies:
                fn(b, cat, num)
        return (time.process_time() - t) / (200 * len(bodies)) * 1e6

    out = [{"old_us": cpu(old.decode_columnar), "new_us": cpu(decode_columnar)} for _ in range(rounds)]
    for r in out:
        print(f"  decode_columnar, 100 x {len(cat) + len(num)}: old {r['old_us']:6.1f}  new {r['new_us']:6.1f} µs/request")
    return {"rounds": out}


def part_strings(base: str, rounds: int) -> dict:
    import tensorflow as tf

    from ctrflow.serving import predictor as P
    from ctrflow.serving.strings import bytes_tensor

    _, _, folder = loadgen._model_info(base)
    p = P.Predictor.load(folder)
    features, cols = _rows(base, 4000)
    bodies = _bodies(features, cols, 40)

    def compute_s(inputs):  # `_compute`'s packed branch, strings through bytes_tensor
        strings = np.stack([inputs[k] for k in p.categorical_names])
        numbers = np.stack([inputs[k] for k in p.numeric_names])
        out = p._packed_signature(strings=bytes_tensor(strings), numbers=tf.constant(numbers, tf.float64))
        return np.stack([out[k].numpy() for k in p._outputs], axis=1)

    def run(k: int, s_path: bool):
        decoded = [decode_columnar(b, p.categorical_names, p.numeric_names)[0] for b in bodies[:k]]
        if s_path:
            prepared = [{n: c if n in p._cat_set else P._numeric(n, c) for n, c in d.items()} for d in decoded]
        else:  # the object route, whichever way this tree's `prepare` hands 'S' columns on
            prepared = [{n: c.astype(object) if c.dtype.kind == "S" else c for n, c in p.prepare(d).items()} for d in decoded]
        batch = {n: np.concatenate([q[n] for q in prepared]) for n in p.feature_names}
        return compute_s(batch) if s_path else p._compute(batch)

    if p._packed_signature is None:
        raise SystemExit("error: this export has no serving_packed signature (re-export it): part 'strings' compares its raw path.")
    sizes = (2, 5, 10, 20, 40)
    for k in sizes:
        if not np.array_equal(run(k, False), run(k, True)):
            raise SystemExit(f"error: the two ways scored a batch of {k * 100} rows differently.")
    out = []
    for r in range(rounds):
        for k in sizes:
            reps = max(3, 200 // k)
            row = {"round": r, "batch_rows": k * 100}
            for name, s_path in (("current_us", False), ("s_path_us", True)) if r % 2 == 0 else (("s_path_us", True), ("current_us", False)):
                t = time.process_time()
                for _ in range(reps):
                    run(k, s_path)
                row[name] = (time.process_time() - t) / (reps * k * 100) * 1e6
            out.append(row)
            print(f"  round {r} batch {k * 100:5d}: current {row['current_us']:6.2f}  'S' path {row['s_path_us']:6.2f} µs/pred "
                  f"({(row['current_us'] - row['s_path_us']) * 100:+5.0f} µs per 100-row request)")
    p.close()
    return {"rounds": out}


def part_generator(base: str, rate: float, seconds: float, rounds: int) -> dict:
    features, schema, _ = loadgen._model_info(base)
    name = Path(base).name
    options = loadgen.LoadOptions(model_base_path=base, protocol="columnar", candidates=100, rate_rps=rate, duration_s=seconds,
                                  timeout_ms=100, distinct_bodies=64)
    with tempfile.TemporaryDirectory() as tmp:
        bodies = loadgen._bodies(options, loadgen._sample_data(options, features, schema, Path(tmp)), features)
    heads = [(f"POST /v1/models/{name}:predict_columnar HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {COLUMNAR_CONTENT_TYPE}\r\n"
              f"Content-Length: {len(b)}\r\nX-Deadline-Ms: 100\r\n\r\n").encode() for b in bodies]
    child = loadgen._ChildServer(base, name, options.batching)

    async def pool_tasks(times, port, wait_for: bool):
        pool = _HttpPool("127.0.0.1", port, 512 if wait_for else options.connections)

        async def send(i):
            k = i % len(bodies)
            request = pool.request(heads[k], bodies[k])
            status, _ = await (asyncio.wait_for(request, 2.0) if wait_for else request)
            return str(status)

        tally = await loadgen._drive(options, times, send)
        await pool.close()
        return tally

    async def open_loop(times, port):
        return await loadgen._drive_http(options, times, [h + b for h, b in zip(heads, bodies)], "127.0.0.1", port)

    ways = {"task per request + wait_for (bench_overload before)": lambda t: pool_tasks(t, child.port, True),
            "task per request (bench serve before)": lambda t: pool_tasks(t, child.port, False),
            "_OpenLoopHttp (now)": lambda t: open_loop(t, child.port)}
    out = []
    try:
        for r in range(rounds):
            for label in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
                times = loadgen.arrival_times(rate, seconds, r)
                t0 = os.times()
                tally, _ = asyncio.run(ways[label](times))
                t1 = os.times()
                user, system = t1.user - t0.user, t1.system - t0.system
                row = {"round": r, "client": label, "sent": tally.sent, "ok": int(tally.ok.sum()),
                       "user_us_per_request": user / max(1, tally.sent) * 1e6, "sys_us_per_request": system / max(1, tally.sent) * 1e6}
                out.append(row)
                print(f"  round {r} {label:<52}: {row['user_us_per_request'] + row['sys_us_per_request']:6.1f} µs/request "
                      f"(user {row['user_us_per_request']:5.1f}, sys {row['sys_us_per_request']:5.1f}), {row['ok']}/{row['sent']} answered 200")
                time.sleep(0.5)
    finally:
        child.close()
    return {"rate_rps": rate, "rounds": out}


_LOOP_CHILD = """
import json, sys, threading
from ctrflow.serving.batcher import BatchingOptions
from ctrflow.serving.server import ServeOptions, serve
spec = json.loads(sys.argv[1])
server = serve(ServeOptions(model_base_path=spec["base"], model_name=spec["name"], port=0, poll_interval_s=3600.0,
                            batching=BatchingOptions(**spec["batching"])))
tid = next(t.native_id for t in threading.enumerate() if t.name == "ctrflow-http")
print("LOOP", server.port, tid, flush=True)
sys.stdin.read()
server.stop()
"""


def _run_ns(pid: int, tid: int | None = None) -> int:
    """On-CPU time of one thread of `pid` (or of all its threads), ns, from the scheduler's own account."""
    tids = [tid] if tid is not None else [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    total = 0
    for t in tids:
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended meanwhile
    return total


async def _closed_loop(port: int, requests: list[bytes], n: int, connections: int) -> dict[int, int]:
    """`n` requests over `connections` keep-alive connections, each sending its next one when answered."""
    statuses: dict[int, int] = {}
    left = [n]

    async def one(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        while left[0] > 0:
            left[0] -= 1
            writer.write(requests[i % len(requests)])
            i += connections
            head = await reader.readuntil(b"\r\n\r\n")
            at = head.lower().find(b"content-length:")
            length = int(head[at + 15:head.find(b"\r\n", at)])
            await reader.readexactly(length)
            status = int(head[9:12])
            statuses[status] = statuses.get(status, 0) + 1
        writer.close()

    await asyncio.gather(*(one(k) for k in range(connections)))
    return statuses


def _start_loop_child(tree: str, spec: str, server_cpu: int | None) -> tuple[Any, int, int]:
    import subprocess

    env = {**os.environ, "PYTHONPATH": tree, "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, "-c", _LOOP_CHILD, spec]
    if server_cpu is not None:
        cmd = ["taskset", "-c", str(server_cpu), *cmd]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                            text=True, cwd=tree)
    line = ""
    for _ in range(100):
        line = proc.stdout.readline()
        if line.startswith("LOOP ") or not line:
            break
    if not line.startswith("LOOP "):
        _stop_child(proc)
        raise SystemExit(f"error: the server of {tree} did not start (exit code {proc.poll()}).")
    _, port, tid = line.split()
    return proc, int(port), int(tid)


def _stop_child(proc: Any) -> None:
    import subprocess

    try:
        proc.stdin.close()
        proc.wait(30)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait(10)


def part_loop(base: str, old_tree: str, rounds: int, n: int, connections: int, server_cpu: int | None,
              slices: int = 10) -> dict:
    """Both servers run at once; each round drives them in `slices` alternating slices of n/slices requests
    (old, new, new, old, ...), so both see the same moments of a shared machine."""
    features, schema, folder = loadgen._model_info(base)
    name = Path(base).name
    options = loadgen.LoadOptions(model_base_path=base, protocol="ids", candidates=100, distinct_bodies=64)
    with tempfile.TemporaryDirectory() as tmp:
        bodies = loadgen._bodies(options, loadgen._sample_data(options, features, schema, Path(tmp)), features, folder)
    from ctrflow.client.ids import IDS_CONTENT_TYPE

    requests = [(f"POST /v1/models/{name}:predict_ids HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {IDS_CONTENT_TYPE}\r\n"
                 f"Content-Length: {len(b)}\r\nX-Deadline-Ms: 1000\r\n\r\n").encode() + b for b in bodies]
    batching = {"max_batch_size": 4096, "batch_timeout_ms": 2.0, "num_batch_threads": 1}
    spec = json.dumps({"base": base, "name": name, "batching": batching})
    trees = {"old": str(Path(old_tree).resolve()), "new": str(REPO)}
    if server_cpu is not None:
        others = sorted(os.sched_getaffinity(0) - {server_cpu})
        if others:
            os.sched_setaffinity(0, others)
    servers = {}
    out = []
    per_slice = max(1, n // slices)
    try:
        for label, tree in trees.items():
            servers[label] = _start_loop_child(tree, spec, server_cpu)
        for proc, port, _ in servers.values():
            asyncio.run(_closed_loop(port, requests, 500, connections))  # warm-up: cost model, caches
        for r in range(rounds):
            acc = {label: {"loop_ns": 0, "server_ns": 0, "s": 0.0, "statuses": {}} for label in trees}
            for k in range(slices):
                order = ("old", "new") if (r + k) % 2 == 0 else ("new", "old")
                for label in order:
                    proc, port, tid = servers[label]
                    a = acc[label]
                    loop0, all0, t0 = _run_ns(proc.pid, tid), _run_ns(proc.pid), time.perf_counter()
                    statuses = asyncio.run(_closed_loop(port, requests, per_slice, connections))
                    loop1, all1, t1 = _run_ns(proc.pid, tid), _run_ns(proc.pid), time.perf_counter()
                    a["loop_ns"] += loop1 - loop0
                    a["server_ns"] += all1 - all0
                    a["s"] += t1 - t0
                    for code, c in statuses.items():
                        a["statuses"][code] = a["statuses"].get(code, 0) + c
            m = per_slice * slices
            row = {"round": r, "requests_each": m, "load_average": os.getloadavg()[0]}
            for label, a in acc.items():
                row[label] = {"loop_us_per_request": round(a["loop_ns"] / m / 1e3, 1),
                              "server_us_per_request": round(a["server_ns"] / m / 1e3, 1),
                              "req_per_s": round(m / a["s"], 1), "statuses": a["statuses"]}
            row["loop_new_over_old"] = round(row["new"]["loop_us_per_request"] / row["old"]["loop_us_per_request"], 3)
            out.append(row)
            print(f"  round {r}: loop thread old {row['old']['loop_us_per_request']:6.1f}  new {row['new']['loop_us_per_request']:6.1f} "
                  f"µs/request (new/old {row['loop_new_over_old']:.3f}); server old {row['old']['server_us_per_request']:7.1f}  "
                  f"new {row['new']['server_us_per_request']:7.1f}; statuses old {row['old']['statuses']} new {row['new']['statuses']}; "
                  f"load {row['load_average']:.1f}", flush=True)
    finally:
        for proc, _, _ in servers.values():
            _stop_child(proc)
    return {"connections": connections, "server_cpu": server_cpu, "batching": batching, "slices": slices, "rounds": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--model-base-path", required=True)
    ap.add_argument("--old-tree", help="a ctrflow checkout to compare decode_columnar with (part 'decode')")
    ap.add_argument("--parts", default="decode,strings,generator")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=800.0)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--requests", type=int, default=3000, help="part 'loop': answers measured per server")
    ap.add_argument("--connections", type=int, default=8, help="part 'loop': closed-loop connections")
    ap.add_argument("--server-cpu", type=int, default=None, help="part 'loop': pin each server to this core (this process: the others)")
    args = ap.parse_args(argv)
    base = str(Path(args.model_base_path).resolve())
    parts = [p for p in args.parts.split(",") if p]
    result: dict = {"benchmark": "wire_costs", "model": base, "load_average": os.getloadavg()[0]}
    if "decode" in parts:
        if not args.old_tree:
            raise SystemExit("error: part 'decode' needs --old-tree DIR (the code to compare with).")
        print("decode_columnar (CPU µs per 100-row request, 30 bodies):")
        result["decode"] = part_decode(base, args.old_tree, args.rounds)
    if "strings" in parts:
        print("raw binary path, server side (decode -> prepare -> concatenate -> _compute), CPU µs per prediction:")
        result["strings"] = part_strings(base, args.rounds)
    if "generator" in parts:
        print(f"load generator's own CPU per request at {args.rate:g} req/s against one child server:")
        result["generator"] = part_generator(base, args.rate, args.seconds, args.rounds)
    if "loop" in parts:
        if not args.old_tree:
            raise SystemExit("error: part 'loop' needs --old-tree DIR (the server to compare with).")
        print(f"event-loop thread CPU per :predict_ids request (closed loop, {args.connections} connections):")
        result["loop"] = part_loop(base, args.old_tree, args.rounds, args.requests, args.connections, args.server_cpu)
    result["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
