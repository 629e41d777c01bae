"""`ctrflow-model-server`: a `tensorflow_model_server` stand-in that takes TF Serving's own flags.

    ctrflow-model-server --port=8500 --rest_api_port=8501 --model_name=ctr --model_base_path=/models/ctr
    ctrflow-model-server --model_config_file=/models/models.config --model_config_file_poll_wait_seconds=60 \
        --enable_batching --batching_parameters_file=/models/batching.config

Flags (TF Serving's names, `--flag=value` or `--flag value`; booleans also bare):
    --port                         gRPC port (default 8500)
    --rest_api_port                REST port (default 8501 here; TF Serving's 0 "no REST" is served on a
                                   free port, since ctrflow's REST front cannot be switched off)
    --rest_api_timeout_in_ms       deadline of REST/gRPC requests without their own (default none)
    --model_name, --model_base_path        one model (name default "default")
    --model_config_file            TF Serving's textproto ModelServerConfig (or ctrflow's YAML/JSON)
    --model_config_file_poll_wait_seconds  re-read the config every N s (0: never; default 0)
    --file_system_poll_wait_seconds        scan base paths for new versions every N s (default 1)
    --enable_batching              batch requests (default false, as TF Serving)
    --batching_parameters_file     textproto BatchingParameters (max_batch_size, batch_timeout_micros, ...)
    --enable_model_warmup          replay assets.extra/tf_serving_warmup_requests (default true)
    --host                         interface (ctrflow's addition; default 0.0.0.0 as TF Serving)
    --tensorflow_intra_op_parallelism  threads one TensorFlow op may use (0: TensorFlow chooses; default 0)
    --tensorflow_inter_op_parallelism  TensorFlow ops run at once (0: TensorFlow chooses; default 0)
    --workers                      server processes on the ports, each with its own models and batcher
                                   (ctrflow's addition; 0: one per core; default 1)

Unknown TF Serving flags (e.g. `--tensorflow_session_parallelism`) are refused with their name, so a
deployment never silently runs without a setting it relied on. `start_server` is shared with
`ctrflow serve`: it builds the `ModelManager` from the config (models and rollouts) and the
`ConfigWatcher` that re-reads it.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from typing import Any, Sequence

from ctrflow.errors import ConfigError, CtrflowError

__all__ = ["build_parser", "main", "start_server"]

log = logging.getLogger("ctrflow.serving")


def start_server(options: Any, *, config_poll_s: float | None = None, batching: Any = "options",
                 reuse_port: bool = False) -> tuple[Any, Any]:
    """Start a `Server` for `ServeOptions`, with the model config's rollouts in force and, when
    `config_poll_s` is set, a `ConfigWatcher` re-reading `options.model_config_file`. Returns
    (server, watcher or None); `server.stop()` then `watcher.close()` end them. `reuse_port`: one of
    several workers on the port (`ctrflow.serving.workers`)."""
    from ctrflow.serving.config import ConfigWatcher, apply_config, load_model_config
    from ctrflow.serving.models import ManagerOptions, ModelManager
    from ctrflow.serving.rollout import RolloutSet, parse_rollouts
    from ctrflow.serving.server import Server, apply_tf_threads

    apply_tf_threads(options.intra_op_threads, options.inter_op_threads)  # before any model loads
    watcher = None
    if batching == "options":  # textproto models are batched as the server's flags say
        batching = options.batching
    manager_options = ManagerOptions(poll_interval_s=options.poll_interval_s, warmup=options.warmup,
                                     drain_grace_s=options.drain_grace_s, huge_pages=options.huge_pages)
    if options.model_config_file:
        config = load_model_config(options.model_config_file, batching=batching)
        manager = ModelManager(list(config.models), manager_options)
        from pathlib import Path

        rollouts = parse_rollouts(config.rollouts, [s.name for s in config.models], source=config.source,
                                  base_dir=Path(config.source).parent)
        manager.set_rollouts(RolloutSet(rollouts))
        if config_poll_s:
            watcher = ConfigWatcher(options.model_config_file, lambda c: apply_config(manager, c), config_poll_s,
                                    batching=batching, current=config)
    else:
        if config_poll_s:
            raise ConfigError("--model_config_file_poll_wait_seconds needs --model_config_file.")
        manager = ModelManager(options.model_specs(), manager_options)
    server = Server(options, manager=manager, reuse_port=reuse_port).start()
    if watcher is not None:
        watcher.start()
    return server, watcher


def _bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # TF Serving prints usage and exits 1; we follow ctrflow: exit 2
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ctrflow-model-server", description="TF Serving compatible model server (ctrflow).",
                allow_abbrev=False)
    p.add_argument("--port", type=int, default=8500, help="gRPC port")
    p.add_argument("--rest_api_port", type=int, default=8501, help="REST port")
    p.add_argument("--rest_api_timeout_in_ms", type=int, default=0, help="request deadline (0: none)")
    p.add_argument("--host", default="0.0.0.0", help="interface to listen on (ctrflow's addition)")
    p.add_argument("--model_name", default="default")
    p.add_argument("--model_base_path", default="")
    p.add_argument("--model_config_file", default="")
    p.add_argument("--model_config_file_poll_wait_seconds", type=int, default=0)
    p.add_argument("--file_system_poll_wait_seconds", type=int, default=1)
    p.add_argument("--enable_batching", type=_bool, nargs="?", const=True, default=False)
    p.add_argument("--batching_parameters_file", default="")
    p.add_argument("--enable_model_warmup", type=_bool, nargs="?", const=True, default=True)
    p.add_argument("--tensorflow_intra_op_parallelism", type=int, default=0,
                   help="threads one TensorFlow op may use (0: TensorFlow chooses)")
    p.add_argument("--tensorflow_inter_op_parallelism", type=int, default=0,
                   help="TensorFlow ops run at once (0: TensorFlow chooses)")
    p.add_argument("--workers", type=int, default=1, help="server processes (ctrflow's addition; 0: one per core)")
    p.add_argument("--json", action="store_true", help="print where it listens as one JSON line")
    return p


def options_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """TF Serving's flags → (ServeOptions, batching for textproto models)."""
    from ctrflow.serving.batcher import BatchingOptions
    from ctrflow.serving.config import TF_SERVING_BATCHING_DEFAULTS, parse_batching_parameters
    from ctrflow.serving.server import ServeOptions

    if bool(args.model_base_path) == bool(args.model_config_file):
        raise ConfigError("Give exactly one of --model_base_path (one model) or --model_config_file (several).")
    if args.batching_parameters_file and not args.enable_batching:
        raise ConfigError("--batching_parameters_file needs --enable_batching (as in TF Serving).")
    batching: BatchingOptions | None = None
    if args.enable_batching:
        batching = parse_batching_parameters(args.batching_parameters_file) if args.batching_parameters_file \
            else TF_SERVING_BATCHING_DEFAULTS
    if args.file_system_poll_wait_seconds <= 0:
        raise ConfigError("--file_system_poll_wait_seconds must be > 0 here (new versions are found by polling).")
    rest_port = args.rest_api_port
    options = ServeOptions(
        model_base_path=args.model_base_path or None, model_name=args.model_name if args.model_base_path else None,
        model_config_file=args.model_config_file or None, host=args.host, port=rest_port, grpc_port=args.port,
        batching=batching, poll_interval_s=float(args.file_system_poll_wait_seconds),
        warmup=args.enable_model_warmup, intra_op_threads=args.tensorflow_intra_op_parallelism,
        inter_op_threads=args.tensorflow_inter_op_parallelism,
        default_timeout_ms=float(args.rest_api_timeout_in_ms) if args.rest_api_timeout_in_ms > 0 else None,
    )
    return options, batching


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        options, batching = options_from_args(args)
        from ctrflow.serving.workers import run_supervised, worker_count

        workers = worker_count(args.workers)
        if workers > 1:
            def announce(sup: Any) -> None:
                where = {"rest_api_port": sup.port, "port": sup.grpc_port, "models": sup.models, "workers": workers}
                print(json.dumps(where) if args.json else
                      f"Running gRPC ModelServer at {args.host}:{sup.grpc_port} ... Exporting HTTP/REST API at "
                      f"{args.host}:{sup.port} ... serving {where['models']} with {workers} workers", flush=True)

            return run_supervised(options, workers, config_poll_s=args.model_config_file_poll_wait_seconds or None,
                                  batching=batching, announce=announce)
        server, watcher = start_server(options, config_poll_s=args.model_config_file_poll_wait_seconds or None,
                                       batching=batching)
    except CtrflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = {"rest_api_port": server.port, "port": server.grpc_port,
             "models": {n: server.manager.versions(n) for n in server.manager.model_names}}
    print(json.dumps(where) if args.json else
          f"Running gRPC ModelServer at {args.host}:{server.grpc_port} ... Exporting HTTP/REST API at "
          f"{args.host}:{server.port} ... serving {where['models']}", flush=True)
    serve_until_signalled(server, watcher)
    return 0


def serve_until_signalled(server: Any, watcher: Any = None) -> None:
    """Block until SIGTERM or SIGINT, then stop the server (in-flight requests finish) and the config watcher."""
    from ctrflow.serving.server import freeze_heap

    freeze_heap()  # after loading: full collections over the loaded models were the tail (BENCHMARKS.md)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        if watcher is not None:
            watcher.close()


if __name__ == "__main__":
    raise SystemExit(main())
