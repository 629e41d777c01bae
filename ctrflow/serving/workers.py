"""Every core: `Supervisor` runs N server processes ("workers") on one REST port (and one gRPC port).

Why processes, not threads: one server process is bound by its GIL — HTTP parsing, request decoding
and the batcher's Python side all run under it — so it tops out near one core whatever the machine has
(BENCHMARKS.md, "Every core"). N processes each run the whole stack: their own `ModelManager`, batcher,
event loop and TensorFlow runtime.

How the pieces stay one server:
- **One port.** Each worker listens on the same address with SO_REUSEPORT; the kernel spreads new
  connections over the listening workers evenly (a shared accept socket would let asyncio's accept loop
  take a whole burst of connections into one worker). The supervisor reserves the port first (a bound,
  non-listening socket, so port 0 works) and holds it until it stops. A worker still loading its models
  is not listening yet, so it gets no connection. gRPC binds the same way (SO_REUSEPORT is gRPC's
  default on Linux).
- **Hot reload.** Every worker's `ModelManager` polls the base paths and swaps on its own; each keeps
  serving the old version until the new one is loaded and warm, so no request fails during a swap.
  For up to one poll interval different workers may answer from different versions.
- **Metrics.** Workers run with PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode), so
  request counters and histograms are summed over the workers exactly, dead ones included; the families
  read at scrape time are published by each worker every `metrics.PUBLISH_INTERVAL_S` and merged by the worker
  that answers `/metrics` (`ctrflow.serving.metrics.MultiprocessMetrics`).
- **Readiness.** `start()` returns (and the commands print their port line) only when every worker
  serves; a restarted worker takes connections only once it serves.
- **Stop.** SIGTERM/SIGINT to the supervisor: it sends SIGTERM to every worker, each drains its
  in-flight requests (the server's graceful stop), then the supervisor exits.
- **Failures.** A worker that exits unexpectedly is logged and restarted (backing off when it keeps
  dying); workers die with the supervisor, even on kill -9 (PR_SET_PDEATHSIG + watchdog, the helper the
  converter's workers use).

A worker is `python -m ctrflow.serving.workers`: it reads its `_WorkerSpec` (pickled) on stdin, serves,
prints one JSON line on stdout once serving, and serves until SIGTERM. The supervisor itself never
imports TensorFlow.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ctrflow.errors import ConfigError, CtrflowError

__all__ = ["Supervisor", "default_workers", "listen_reuseport", "reuseport_transport", "run_supervised", "worker_count"]

log = logging.getLogger("ctrflow.serving")

_START_TIMEOUT_S = 600.0  # longest a worker may take to load its models and serve
_RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)  # wait before the n-th quick restart in a row
_QUICK_EXIT_S = 30.0  # a worker that dies sooner than this after starting counts as a quick restart


def default_workers() -> int:
    """The cores this process may run on (its CPU affinity), the default of `--workers 0`."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def worker_count(n: int) -> int:
    """The `--workers` flag of both serve commands: N >= 1 processes, 0 = one per core."""
    if n < 0:
        raise ConfigError(f"--workers must be >= 0 (0: one per core). Got {n}.")
    return n or default_workers()


def _reserve(host: str, port: int) -> socket.socket:
    """Hold host:port for the workers: a bound, non-listening SO_REUSEPORT socket.

    First a plain bind (no SO_REUSEPORT), so that a port another server of ours already serves is an
    error here rather than silently shared with it (SO_REUSEPORT lets any process of this user join)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    return listen_reuseport(host, port, listen=False)


def listen_reuseport(host: str, port: int, *, listen: bool = True) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT (listening unless `listen=False`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so (see ctrflow.serving.http).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


@functools.cache
def reuseport_transport() -> type:
    """`ctrflow.serving.http.HttpTransport` listening with SO_REUSEPORT, beside the other workers on its port.

    Built on first use, so that the supervisor, which imports this module, never imports the HTTP stack.
    """
    from ctrflow.serving.http import HttpTransport

    class ReusePortTransport(HttpTransport):
        def start(self, *, sock: socket.socket | None = None) -> int:
            return super().start(sock=sock or listen_reuseport(self.options.host, self.options.port))

    return ReusePortTransport


@dataclass(frozen=True)
class _WorkerSpec:
    """What a worker process needs: the server's options (ports already fixed) and how to start it."""

    options: Any  # ServeOptions, with port and grpc_port the supervisor reserved
    config_poll_s: float | None
    batching: Any
    index: int
    parent_pid: int


class _Worker:
    """One worker process and what the supervisor knows about it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.ready: dict[str, Any] | None = None
        self.quick_restarts = 0
        self.restart_at = 0.0  # when a dead worker is due to be started again
        self.restarting = False  # a restart thread is starting it


class Supervisor:
    """N worker processes serving `options` on one port; `start()` returns once all serve, `stop()` drains them.

    Example:
        sup = Supervisor(ServeOptions(model_base_path="models/ctr", port=0), workers=2).start()
        print(sup.url)   # every worker answers here
        sup.stop()
    """

    def __init__(self, options: Any, workers: int, *, config_poll_s: float | None = None,
                 batching: Any = "options") -> None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ConfigError(f"The 'workers' parameter of Supervisor must be an integer >= 1. Got {workers!r} instead.")
        if sys.platform != "linux":
            raise ConfigError("Several server workers need Linux (SO_REUSEPORT, PR_SET_PDEATHSIG); use workers=1.")
        self.options = options
        self.workers = workers
        self._config_poll_s = config_poll_s
        self._batching = batching
        self._reserved: list[socket.socket] = []
        self._workers = [_Worker(i) for i in range(workers)]
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="ctrflow-workers-spawner")  # lives until stop()
        self.metrics_dir: str | None = None
        self.port: int | None = None
        self.grpc_port: int | None = None
        self.restarts = 0

    # ---- what the commands print ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = self.options.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    @property
    def models(self) -> dict[str, list[int]]:
        """{model: versions} as the first worker reported when it started serving."""
        first = self._workers[0].ready or {}
        return dict(first.get("models", {}))

    def pids(self) -> list[int]:
        """Process ids of the workers running now."""
        with self._lock:
            return [w.proc.pid for w in self._workers if w.proc is not None and w.proc.poll() is None]

    def ready(self) -> bool:
        """True when every worker serves."""
        with self._lock:
            return all(w.ready is not None and w.proc is not None and w.proc.poll() is None for w in self._workers)

    # ---- life cycle -----------------------------------------------------------------------------------

    def start(self) -> Supervisor:
        """Reserve the ports, start every worker and wait until all serve (a worker that fails to start
        fails the start, with its exit code)."""
        self._check_config()
        host = self.options.host
        try:
            rest = _reserve(host, self.options.port)
        except OSError as e:
            raise ConfigError(f"Cannot listen on {host}:{self.options.port}: {e}") from None
        self._reserved.append(rest)
        self.port = rest.getsockname()[1]
        if self.options.grpc_port is not None:
            try:
                grpc_sock = _reserve(host, self.options.grpc_port)
            except OSError as e:
                self._close_reserved()
                raise ConfigError(f"Cannot listen for gRPC on {host}:{self.options.grpc_port}: {e}") from None
            self._reserved.append(grpc_sock)
            self.grpc_port = grpc_sock.getsockname()[1]
        self.metrics_dir = tempfile.mkdtemp(prefix="ctrflow-metrics-")
        try:
            for w in self._workers:
                self._spawn(w)
            for w in self._workers:
                self._wait_ready(w, _START_TIMEOUT_S)
        except BaseException:
            self.stop(grace_s=1.0)
            raise
        self._publish_workers()
        self._monitor = threading.Thread(target=self._watch, name="ctrflow-workers-monitor", daemon=True)
        self._monitor.start()
        log.info("serving with %d workers (pids %s) on %s", self.workers, self.pids(), self.url)
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every worker (each finishes its in-flight requests), wait, then clean up. Idempotent."""
        if self._stopping.is_set() and not self._reserved:
            return
        self._stopping.set()
        with self._lock:
            procs = [w.proc for w in self._workers if w.proc is not None]
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except OSError:
                    pass
        deadline = time.monotonic() + grace_s + 30.0  # the server's own stop: grace, then model closing
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in time; killing it", p.pid)
                p.kill()
                p.wait(10)
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(5)
        self._spawner.shutdown(wait=False)
        self._close_reserved()
        if self.metrics_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until `stop()` began; True if it did."""
        return self._stopping.wait(timeout_s)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- internals ------------------------------------------------------------------------------------

    def _check_config(self) -> None:
        """Read the model config here once, so a mistake is one error before any worker starts."""
        if self.options.model_config_file:
            from ctrflow.serving.config import load_model_config

            batching = self.options.batching if self._batching == "options" else self._batching
            load_model_config(self.options.model_config_file, batching=batching)
        else:
            self.options.model_specs()

    def _close_reserved(self) -> None:
        for s in self._reserved:
            s.close()
        self._reserved.clear()

    def _spawn(self, w: _Worker) -> None:
        options = dataclasses.replace(self.options, port=self.port, grpc_port=self.grpc_port)
        spec = _WorkerSpec(options, self._config_poll_s, self._batching, w.index, os.getpid())
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir), "CTRFLOW_WORKER_INDEX": str(w.index)}
        # Own process group: Ctrl-C reaches the supervisor only, which then stops the workers in order.
        # Started from the one spawner thread: PR_SET_PDEATHSIG fires when the *thread* that forked a
        # worker ends, so a worker started from a short-lived (restart) thread would be killed with it.
        proc = self._spawner.submit(subprocess.Popen, [sys.executable, "-m", "ctrflow.serving.workers"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, process_group=0).result()
        try:
            assert proc.stdin is not None
            proc.stdin.write(pickle.dumps(spec))
            proc.stdin.close()
        except OSError:
            pass  # it died at once; its exit is reported by _wait_ready / the monitor
        with self._lock:
            w.proc, w.ready, w.started_at = proc, None, time.monotonic()
            late = self._stopping.is_set()  # stop() began while this one started: it did not see it
        if late:
            proc.send_signal(signal.SIGTERM)

    def _wait_ready(self, w: _Worker, timeout_s: float) -> None:
        """Read the worker's one JSON line; raise if it exits or stays silent."""
        proc = w.proc
        assert proc is not None and proc.stdout is not None
        line = _read_ready_line(proc, timeout_s)
        if line is None:
            code = proc.poll()
            if code is None:
                proc.kill()
                proc.wait(10)
            raise CtrflowError(f"Server worker {w.index} did not start (exit code {proc.poll()}); see its log above.")
        with self._lock:
            w.ready = line

    def _publish_workers(self) -> None:
        """Tell every worker's metrics which processes are the live workers (`workers.json`)."""
        from ctrflow.atomic import atomic_write_json

        if self.metrics_dir and os.path.isdir(self.metrics_dir):
            atomic_write_json(os.path.join(self.metrics_dir, "workers.json"),
                              {"expected": self.workers, "pids": self.pids(), "restarts": self.restarts})

    def _watch(self) -> None:
        """Restart workers that exit while the supervisor is not stopping (each restart on its own thread)."""
        from ctrflow.serving.metrics import MultiprocessMetrics

        while not self._stopping.wait(0.2):
            for w in self._workers:
                proc = w.proc
                if proc is None:
                    if not w.restarting and time.monotonic() >= w.restart_at:
                        w.restarting = True
                        threading.Thread(target=self._restart, args=(w,), name=f"ctrflow-worker-{w.index}-restart",
                                         daemon=True).start()
                    continue
                if w.ready is None:
                    continue  # starting: its restart thread watches it
                code = proc.poll()
                if code is None or self._stopping.is_set():
                    continue
                lived = time.monotonic() - w.started_at
                w.quick_restarts = w.quick_restarts + 1 if lived < _QUICK_EXIT_S else 0
                delay = _RESTART_BACKOFF_S[min(w.quick_restarts, len(_RESTART_BACKOFF_S)) - 1] if w.quick_restarts else 0.0
                log.error("server worker %d (pid %d) exited with %s after %.1f s; restarting it%s", w.index, proc.pid,
                          _exit_text(code), lived, f" in {delay:.1f} s" if delay else "")
                MultiprocessMetrics.retire(str(self.metrics_dir), proc.pid)
                with self._lock:
                    w.proc, w.ready, w.restart_at = None, None, time.monotonic() + delay
                self._publish_workers()

    def _restart(self, w: _Worker) -> None:
        try:
            if self._stopping.is_set():
                return
            self.restarts += 1
            try:
                self._spawn(w)
            except RuntimeError:  # the spawner is shut: stop() won the race
                return
            try:
                self._wait_ready(w, _START_TIMEOUT_S)
            except CtrflowError as e:
                if self._stopping.is_set():
                    return
                log.error("%s", e)
                with self._lock:
                    w.proc, w.ready = None, None
                    w.quick_restarts += 1
                    w.restart_at = time.monotonic() + _RESTART_BACKOFF_S[min(w.quick_restarts, len(_RESTART_BACKOFF_S)) - 1]
                return
            log.info("server worker %d restarted (pid %d)", w.index, w.proc.pid if w.proc else -1)
            self._publish_workers()
        finally:
            w.restarting = False


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def _read_ready_line(proc: subprocess.Popen, timeout_s: float) -> dict[str, Any] | None:
    """The worker's JSON ready line, or None if it exits first or the time runs out (bounded in lines)."""
    import selectors

    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    buffer = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline and len(buffer) < 1 << 20:
            if not sel.select(min(1.0, max(0.0, deadline - time.monotonic()))):
                if proc.poll() is not None:
                    return None
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                return None
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if isinstance(doc, dict) and doc.get("ctrflow_worker") == "serving":
                    return doc
    return None


def run_supervised(options: Any, workers: int, *, config_poll_s: float | None, batching: Any,
                   announce: Any) -> int:
    """What the serve commands do with --workers N > 1: start, `announce(supervisor)`, serve until SIGTERM/SIGINT.

    A start failure raises (CtrflowError), for the command's own error line."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sup = Supervisor(options, workers, config_poll_s=config_poll_s, batching=batching).start()  # errors: the caller's
    try:
        announce(sup)
        while not stop.wait(0.5):
            pass
    finally:
        sup.stop(grace_s=5.0)
    return 0


# ---- the worker process ------------------------------------------------------------------------------

def _worker_main() -> int:
    spec: _WorkerSpec = pickle.load(sys.stdin.buffer)
    from ctrflow.processes import die_with_parent  # PR_SET_PDEATHSIG + watchdog, as the converter's workers

    die_with_parent(spec.parent_pid)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s %(name)s[worker {spec.index}]: %(message)s")
    from ctrflow._tf import quiet_import
    from ctrflow.serving.model_server import serve_until_signalled, start_server

    quiet_import()

    try:
        server, watcher = start_server(spec.options, config_poll_s=spec.config_poll_s, batching=spec.batching,
                                       reuse_port=True)
    except CtrflowError as e:
        print(f"error: worker {spec.index}: {e}", file=sys.stderr)
        return 2
    models = {n: server.manager.versions(n) for n in server.manager.model_names}
    print(json.dumps({"ctrflow_worker": "serving", "pid": os.getpid(), "index": spec.index, "port": server.port,
                      "grpc_port": server.grpc_port, "models": models}), flush=True)
    os.dup2(2, 1)  # nobody reads our stdout pipe from now on: later prints go to the log
    serve_until_signalled(server, watcher)
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker_main())
