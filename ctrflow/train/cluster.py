"""Training clusters: the cluster file, TF_CONFIG, server tasks, and real local clusters on loopback ports.

A cluster is TensorFlow's parameter-server layout: `ps` tasks hold the (sharded) variables, `worker`
tasks run training steps, and one coordinator (`chief`) schedules the steps and writes checkpoints.
This module only places and supervises processes for distributed training (`ctrflow.train.distributed`);
its commands are `ctrflow cluster worker|ps|local` (ctrflow/cli.py).

A cluster file is JSON or YAML, either the plain cluster spec

    {"chief": ["10.0.0.1:2220"], "worker": ["10.0.0.2:2222", "10.0.0.3:2222"], "ps": ["10.0.0.4:2222"]}

or a `TF_CONFIG`-shaped object `{"cluster": {...}, "task": {"type": "worker", "index": 0}}`. `chief` is
optional: without it the coordinator listens on a free local port (fine when every task can reach it
by the name `localhost`, i.e. a one-machine cluster; name it on a real fleet).

Recommended use:
    ctrflow cluster ps --cluster cluster.json --index 0          # on each parameter-server machine
    ctrflow cluster worker --cluster cluster.json --index I      # on each worker machine
    ctrflow train --data D --out RUN --cluster cluster.json      # the coordinator

    ctrflow cluster local --workers 2 --ps 1 -- train --data D --out RUN   # all of it on this machine

`LocalCluster` (used by `cluster local`, the tests and the benchmarks) starts every server task as a
real process in its own process group, waits until each port answers, and on `close()` (also after
Ctrl-C, SIGTERM or an error) terminates every group, escalating to SIGKILL after a grace period; a
server it started also exits by itself when its launcher dies. Every wait here has a timeout.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ctrflow.atomic import atomic_write_json
from ctrflow.errors import ConfigError, CtrflowError
from ctrflow.validation import check_float, check_int

__all__ = [
    "TASK_TYPES",
    "SERVER_TASK_TYPES",
    "ClusterSpec",
    "load_cluster",
    "cluster_from_env",
    "tf_config",
    "check_port_free",
    "check_reachable",
    "serve",
    "LocalCluster",
    "run_local",
]

TASK_TYPES = ("chief", "worker", "ps")
SERVER_TASK_TYPES = ("worker", "ps")  # the tasks `ctrflow cluster worker|ps` starts
_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(?P<port>[0-9]{1,5})$")
_READY_LINE = "ctrflow cluster: {task} {index} serving at {address}"


@dataclass(frozen=True)
class ClusterSpec:
    """Addresses ("host:port") of a parameter-server cluster's tasks. Checked once, here.

    worker: training tasks, >= 1; each reads every len(worker)-th shard file of the data.
    ps: parameter servers, >= 1; big tables are split row-wise over them.
    chief: the coordinator, 0 or 1 address (none: it listens on a free local port).
    """

    worker: tuple[str, ...]
    ps: tuple[str, ...]
    chief: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for kind in TASK_TYPES:
            value = getattr(self, kind)
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise ConfigError(f"The '{kind}' tasks of a cluster must be a list of \"host:port\" addresses. Got {value!r} instead.")
            object.__setattr__(self, kind, tuple(value))
        if not self.worker:
            raise ConfigError("A cluster needs at least one 'worker' address (the tasks that run training steps). Got none.")
        if not self.ps:
            raise ConfigError("A cluster needs at least one 'ps' address (the parameter servers that hold the tables). Got none.")
        if len(self.chief) > 1:
            raise ConfigError(f"A cluster has at most one 'chief' (the coordinator). Got {len(self.chief)}: {list(self.chief)}.")
        seen: dict[tuple[str, int], str] = {}
        for kind, index, address in self.tasks():
            m = _ADDRESS.match(address) if isinstance(address, str) else None
            if m is None or not 1 <= int(m["port"]) <= 65535:
                raise ConfigError(
                    f"The address of {kind} {index} must be \"host:port\" with a port in 1..65535. Got {address!r} instead."
                )
            key = (_canonical_host(m["host"]), int(m["port"]))
            if key in seen:
                raise ConfigError(
                    f"Port conflict in the cluster: {kind} {index} and {seen[key]} both use {address}; give each task its own port."
                )
            seen[key] = f"{kind} {index}"

    def tasks(self) -> list[tuple[str, int, str]]:
        """(task type, index, address) of every task, chief first."""
        return [(kind, i, a) for kind in TASK_TYPES for i, a in enumerate(getattr(self, kind))]

    def address(self, task_type: str, index: int) -> str:
        """The address of one task; ConfigError names the valid range when there is no such task."""
        if task_type not in TASK_TYPES:
            raise ConfigError(f"Unknown task type {task_type!r}; task types are {list(TASK_TYPES)}.")
        tasks = getattr(self, task_type)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(tasks):
            raise ConfigError(
                f"The cluster has {len(tasks)} {task_type} task(s): the index must be in [0, {len(tasks)}). Got {index!r} instead."
            )
        return tasks[index]

    @property
    def num_workers(self) -> int:
        return len(self.worker)

    @property
    def num_ps(self) -> int:
        return len(self.ps)

    def to_dict(self) -> dict[str, list[str]]:
        """TensorFlow's cluster-spec dict (`tf.train.ClusterSpec(spec.to_dict())`)."""
        return {kind: list(getattr(self, kind)) for kind in TASK_TYPES if getattr(self, kind)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "the cluster") -> "ClusterSpec":
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: a cluster must be an object of task type -> addresses. Got {type(d).__name__} instead.")
        unknown = sorted(set(d) - set(TASK_TYPES))
        if unknown:
            raise ConfigError(
                f"{source}: unknown task type(s) {unknown}; a ctrflow cluster has {list(TASK_TYPES)} "
                "(parameter-server training: no 'evaluator' or 'master')."
            )
        try:
            return cls(**{k: d.get(k, ()) for k in TASK_TYPES})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def _canonical_host(host: str) -> str:
    host = host.strip("[]").lower()
    return "127.0.0.1" if host in ("localhost", "::1", "127.0.0.1") else host


def load_cluster(source: str | os.PathLike | Mapping[str, Any] | ClusterSpec) -> ClusterSpec:
    """A `ClusterSpec` from a cluster file (JSON or YAML), a dict, or a `ClusterSpec` (returned as is).

    Raises:
        ConfigError: unreadable file, unknown task types, bad or duplicate addresses, no worker or ps.
    """
    if isinstance(source, ClusterSpec):
        return source
    if isinstance(source, Mapping):
        data, name = source, "the cluster"
    else:
        from ctrflow.configfile import load_config_file

        name = str(source)
        data = load_config_file(source, what="cluster file")
    if isinstance(data, Mapping) and "cluster" in data:  # TF_CONFIG shape
        data = data["cluster"]
    return ClusterSpec.from_dict(data, source=name)


def cluster_from_env(environ: Mapping[str, str] | None = None) -> tuple[ClusterSpec, str, int] | None:
    """(cluster, task type, index) from the `TF_CONFIG` environment variable, or None when it is unset.

    Raises:
        ConfigError: TF_CONFIG is not JSON or names an unknown task.
    """
    raw = (os.environ if environ is None else environ).get("TF_CONFIG")
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({e}).") from None
    if not isinstance(data, Mapping) or "cluster" not in data:
        raise ConfigError(f"TF_CONFIG must be {{\"cluster\": {{...}}, \"task\": {{\"type\": ..., \"index\": ...}}}}. Got {raw[:200]!r} instead.")
    cluster = ClusterSpec.from_dict(data["cluster"], source="TF_CONFIG")
    task = data.get("task") or {"type": "chief", "index": 0}
    kind, index = task.get("type", "chief"), task.get("index", 0)
    if kind not in TASK_TYPES:
        raise ConfigError(f"TF_CONFIG task type {kind!r} is unknown; task types are {list(TASK_TYPES)}.")
    if kind != "chief" or cluster.chief:
        cluster.address(kind, index)  # validates the index
    return cluster, kind, int(index)


def tf_config(cluster: ClusterSpec, task_type: str, index: int) -> str:
    """The `TF_CONFIG` value for one task of `cluster`."""
    return json.dumps({"cluster": cluster.to_dict(), "task": {"type": task_type, "index": index}})


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def check_port_free(address: str) -> None:
    """Raise ConfigError at once when another process holds the port of `address` on this machine.

    TensorFlow's gRPC server binds every interface with SO_REUSEPORT, so two servers on one port would
    both start and split the connections between them; this check binds the port without that option
    (but with SO_REUSEADDR: lingering connections of a task that just died do not block its restart).
    """
    _, port = _split(address)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR: connections of a task that just died (TIME_WAIT) do not count; a listener does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            raise ConfigError(
                f"Port {port} ({address}) is already in use on this machine ({e.strerror}): stop the process "
                "holding it (an earlier task?) or give this task another port in the cluster file."
            ) from None


def check_reachable(cluster: ClusterSpec, *, timeout_s: float = 30.0, task_types: Sequence[str] = SERVER_TASK_TYPES) -> None:
    """Wait until every task of `task_types` accepts TCP connections, at most `timeout_s` seconds in all.

    Raises:
        ConfigError: a host name does not resolve (at once), or tasks still unreachable at the deadline
            (the message names each one and how to start it).
    """
    deadline = time.monotonic() + timeout_s
    pending = [(k, i, a) for k, i, a in cluster.tasks() if k in task_types]
    for kind, index, address in pending:
        host, _ = _split(address)
        try:
            socket.getaddrinfo(host, None)
        except OSError as e:
            raise ConfigError(f"{kind} {index}: cannot resolve host {host!r} of {address} ({e.strerror or e}).") from None
    while True:
        pending = [(k, i, a) for k, i, a in pending if not _answers(a, timeout_s=min(1.0, max(0.05, deadline - time.monotonic())))]
        if not pending:
            return
        if time.monotonic() >= deadline:
            names = ", ".join(f"{k} {i} at {a}" for k, i, a in pending)
            raise ConfigError(
                f"Cannot reach {names} within {timeout_s:g} s. Start each with `ctrflow cluster <type> --cluster FILE "
                "--index I` on its machine, or check the addresses and the firewall."
            )
        time.sleep(0.2)


def _answers(address: str, *, timeout_s: float) -> bool:
    host, port = _split(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


# --- server tasks -------------------------------------------------------------------------------------
def serve(
    cluster: ClusterSpec | str | os.PathLike,
    task_type: str,
    index: int,
    *,
    exit_with_parent: bool = False,
    threads: int = 0,
) -> None:
    """Run one server task (`worker` or `ps`) of `cluster` until SIGTERM or SIGINT (then exit 0).

    The task prints one line, `ctrflow cluster: <type> <index> serving at <address>`, once it listens.

    Args:
        exit_with_parent: also exit when the process that started this one dies (local clusters).
        threads: TensorFlow inter- and intra-op threads of this task; 0 lets TensorFlow choose.

    Raises:
        ConfigError: not a server task type, index out of range, or the port is taken (at once).
    """
    cluster = load_cluster(cluster)
    if task_type not in SERVER_TASK_TYPES:
        raise ConfigError(f"`ctrflow cluster` starts {' or '.join(SERVER_TASK_TYPES)} tasks. Got {task_type!r} instead "
                          "(the coordinator is `ctrflow train ... --cluster FILE`).")
    address = cluster.address(task_type, index)
    check_port_free(address)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    parent = os.getppid()
    from ctrflow._tf import quiet_import

    tf = quiet_import()

    config = None
    if threads:
        config = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=threads, intra_op_parallelism_threads=threads)
    try:
        tf.distribute.Server(tf.train.ClusterSpec(cluster.to_dict()), job_name=task_type, task_index=index,
                             protocol="grpc", config=config, start=True)
    except (tf.errors.OpError, ValueError) as e:
        raise ConfigError(f"{task_type} {index} cannot serve at {address}: {str(e).strip()[:300]}") from None
    print(_READY_LINE.format(task=task_type, index=index, address=address), flush=True)
    while not stop.wait(0.5):
        if exit_with_parent and os.getppid() != parent:
            break
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # a gRPC server has no clean stop; its threads would keep a normal exit waiting


# --- local clusters -------------------------------------------------------------------------------------
def _free_ports(n: int, host: str) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    keep = [l for l in text if "oneDNN" not in l and "cpu_feature_guard" not in l and "To enable the following" not in l
            and "absl::InitializeLog" not in l]
    return "\n".join(keep[-lines:])


class LocalCluster:
    """A real cluster of server processes on loopback ports: `ps` and `worker` tasks, plus a chief port.

    Example:
        with LocalCluster(workers=2, ps=1) as cluster:
            subprocess.run([sys.executable, "-m", "ctrflow", "train", ...], env=cluster.coordinator_env())
            cluster.kill("worker", 1)          # SIGKILL, a real crash
            cluster.restart("worker", 1)       # the same address again

    Each task is a process group of its own (Ctrl-C at a terminal reaches only the launcher, which then
    tears everything down in order) and exits by itself when this process dies. Logs go to
    `log_dir/<type>-<index>.log` (a temp folder by default, removed on close).

    Args:
        workers, ps: task counts, >= 1.
        host: the address every task listens on, a loopback address by default.
        log_dir: keep the task logs (and the cluster file) here.
        ready_timeout_s: how long `start()` waits for every task to listen (TensorFlow's import is slow
            on a busy machine), > 0.
        threads: TensorFlow threads per task (0: TensorFlow's choice).
    """

    def __init__(
        self,
        workers: int = 2,
        ps: int = 1,
        *,
        host: str = "127.0.0.1",
        log_dir: str | os.PathLike | None = None,
        ready_timeout_s: float = 90.0,
        threads: int = 0,
        python: str = sys.executable,
    ) -> None:
        workers, ps = check_int("LocalCluster", "workers", workers, 1), check_int("LocalCluster", "ps", ps, 1)
        ready_timeout_s = check_float("LocalCluster", "ready_timeout_s", ready_timeout_s, 0.0, low_open=True)
        self.workers, self.ps, self.host = workers, ps, host
        self.ready_timeout_s = ready_timeout_s
        self.threads = threads
        self.python = python
        self._own_dir = log_dir is None
        self.log_dir = Path(tempfile.mkdtemp(prefix="ctrflow-cluster-")) if log_dir is None else Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.cluster: ClusterSpec | None = None
        self.cluster_file = self.log_dir / "cluster.json"
        self._procs: dict[tuple[str, int], subprocess.Popen] = {}

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self, attempts: int = 3) -> "LocalCluster":
        """Start every task and wait until each listens. Ports are picked free; a port taken meanwhile
        by another program is retried with new ports (up to `attempts` times)."""
        for attempt in range(attempts):
            ports = _free_ports(1 + self.ps + self.workers, self.host)
            addr = [f"{self.host}:{p}" for p in ports]
            self.cluster = ClusterSpec(chief=(addr[0],), ps=tuple(addr[1 : 1 + self.ps]), worker=tuple(addr[1 + self.ps :]))
            atomic_write_json(self.cluster_file, self.cluster.to_dict())
            for kind, index, _ in self.cluster.tasks():
                if kind != "chief":
                    self._spawn(kind, index)
            try:
                self.wait_ready(self.ready_timeout_s)
                return self
            except _PortTaken:
                self.stop()
                if attempt == attempts - 1:
                    raise ConfigError(f"could not find free loopback ports for a local cluster after {attempts} attempts.") from None
            except BaseException:
                self.stop()
                raise
        return self

    def _spawn(self, kind: str, index: int) -> None:
        log = open(self.log_dir / f"{kind}-{index}.log", "ab")
        cmd = [self.python, "-m", "ctrflow", "cluster", kind, "--cluster", str(self.cluster_file), "--index", str(index),
               "--exit-with-parent"]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), *filter(None, [env.get("PYTHONPATH")])])
        try:
            self._procs[(kind, index)] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                          env=env, start_new_session=True)
        finally:
            log.close()

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until every task listens; raise ConfigError (with its log) if one exits or the time runs out."""
        assert self.cluster is not None
        deadline = time.monotonic() + timeout_s
        pending = [(k, i, a) for k, i, a in self.cluster.tasks() if (k, i) in self._procs]
        while pending:
            still = []
            for kind, index, address in pending:
                proc = self._procs[(kind, index)]
                if proc.poll() is not None:
                    log = _tail(self.log_dir / f"{kind}-{index}.log")
                    if "already in use" in log:
                        raise _PortTaken(address)
                    raise ConfigError(f"{kind} {index} ({address}) exited with code {proc.returncode} while starting:\n{log}")
                if not _answers(address, timeout_s=0.2):
                    still.append((kind, index, address))
            pending = still
            if pending and time.monotonic() > deadline:
                names = ", ".join(f"{k} {i}" for k, i, _ in pending)
                raise ConfigError(f"{names} did not start listening within {timeout_s:g} s (see {self.log_dir}).")
            if pending:
                time.sleep(0.1)

    def coordinator_env(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """An environment for the coordinator process: `environ` (default os.environ) plus TF_CONFIG."""
        assert self.cluster is not None, "start() the cluster first"
        env = dict(os.environ if environ is None else environ)
        env["TF_CONFIG"] = tf_config(self.cluster, "chief", 0)
        return env

    # -- faults -------------------------------------------------------------------------------------
    def pid(self, task_type: str, index: int) -> int:
        return self._procs[(task_type, index)].pid

    def alive(self, task_type: str, index: int) -> bool:
        proc = self._procs.get((task_type, index))
        return proc is not None and proc.poll() is None

    def kill(self, task_type: str, index: int, sig: int = signal.SIGKILL, *, timeout_s: float = 10.0) -> None:
        """Send `sig` (SIGKILL: a real crash) to one task's process group and wait for it to exit."""
        proc = self._procs[(task_type, index)]
        _signal_group(proc, sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=timeout_s)

    def restart(self, task_type: str, index: int, *, timeout_s: float | None = None) -> None:
        """Start a killed task again at its old address and wait until it listens."""
        if self.alive(task_type, index):
            raise ConfigError(f"{task_type} {index} is still running; kill it first.")
        assert self.cluster is not None
        address = self.cluster.address(task_type, index)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the dead process's socket may linger a moment
            try:
                check_port_free(address)
                break
            except ConfigError:
                time.sleep(0.1)
        self._spawn(task_type, index)
        self.wait_ready(self.ready_timeout_s if timeout_s is None else timeout_s)

    def log_tail(self, task_type: str, index: int, lines: int = 15) -> str:
        return _tail(self.log_dir / f"{task_type}-{index}.log", lines)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every task's process group, SIGKILL what is left after `grace_s`; reap every process."""
        procs = list(self._procs.values())
        for proc in procs:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in procs:
            _signal_group(proc, signal.SIGKILL)  # the group too: nothing a task started survives it
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        if self.cluster is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PortTaken(CtrflowError):
    pass


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the pid
    except (ProcessLookupError, PermissionError):
        pass


class _Interrupted(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def run_local(
    command: Sequence[str],
    *,
    workers: int = 2,
    ps: int = 1,
    log_dir: str | os.PathLike | None = None,
    ready_timeout_s: float = 90.0,
    grace_s: float = 10.0,
    threads: int = 0,
) -> int:
    """Start a local cluster, run `command` as its coordinator (with TF_CONFIG set), tear it all down.

    Returns the coordinator's exit code (128 + signal number when this launcher was interrupted).
    On Ctrl-C / SIGTERM the coordinator gets SIGINT first (it may finish writing a checkpoint), then,
    after `grace_s` seconds, SIGKILL; every server task is stopped in all cases, and the task logs are
    printed when the coordinator fails.
    """
    if not command:
        raise ConfigError("`ctrflow cluster local` needs a coordinator command after `--`, e.g. `-- train --data D --out RUN`.")
    previous = {}

    def on_signal(signum, _frame):
        raise _Interrupted(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, on_signal)
    cluster = LocalCluster(workers, ps, log_dir=log_dir, ready_timeout_s=ready_timeout_s, threads=threads)
    coordinator: subprocess.Popen | None = None
    try:
        cluster.start()
        print(f"ctrflow cluster local: {ps} ps + {workers} worker(s) ready ({cluster.cluster_file})", file=sys.stderr, flush=True)
        coordinator = subprocess.Popen(list(command), env=cluster.coordinator_env(), start_new_session=True)
        code = coordinator.wait()
        if code != 0:
            for kind, index, _ in cluster.cluster.tasks() if cluster.cluster else []:
                if kind != "chief" and not cluster.alive(kind, index):
                    print(f"--- {kind} {index} exited; its log ends with:\n{cluster.log_tail(kind, index)}", file=sys.stderr)
        return code
    except _Interrupted as e:
        if coordinator is not None and coordinator.poll() is None:
            _signal_group(coordinator, signal.SIGINT)
            try:
                coordinator.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        return 128 + e.signum
    finally:
        # From here on, signals must not interrupt the teardown itself.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        if coordinator is not None and coordinator.poll() is None:
            _signal_group(coordinator, signal.SIGKILL)
            coordinator.wait(timeout=10)
        cluster.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
