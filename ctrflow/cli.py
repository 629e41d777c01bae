"""The `ctrflow` command: a thin layer that parses arguments, calls the API and reports.

Every command accepts `--json` (its last stdout line is then one JSON object summarizing the run) and
`--quiet`; work that takes a while shows a progress bar with a rate on stderr when stderr is a terminal.
Errors ctrflow raises on purpose print one line, `error: ...` (and `{"error": ...}` with --json), exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

from ctrflow.errors import CtrflowError

__all__ = ["main", "ProgressBar"]


class ProgressBar:
    """A one-line progress bar on stderr: done/total, rate and extra stats. Silent when not a TTY."""

    def __init__(self, unit: str = "rows", *, enabled: bool | None = None, min_interval_s: float = 0.1) -> None:
        self.unit = unit
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.min_interval_s = min_interval_s
        self._t0 = time.perf_counter()
        self._last = 0.0
        self._shown = False

    def __call__(self, done: int, total: int | None = None, **stats: Any) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last < self.min_interval_s and (total is None or done < total):
            return
        self._last = now
        elapsed = max(now - self._t0, 1e-9)
        rate = done / elapsed
        parts = []
        if total:
            frac = min(1.0, done / total)
            filled = int(frac * 24)
            parts.append(f"[{'#' * filled}{'.' * (24 - filled)}] {frac * 100:5.1f}%")
        parts.append(f"{done:,} {self.unit}")
        parts.append(f"{rate:,.0f} {self.unit}/s")
        parts += [f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()]
        parts.append(f"{elapsed:.1f}s")
        sys.stderr.write("\r" + "  ".join(parts) + "\x1b[K")
        sys.stderr.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _emit(args: argparse.Namespace, summary: dict[str, Any], human: str) -> None:
    if not args.quiet and human:
        print(human)
    if args.json:
        print(json.dumps(summary, default=str))


def _bar(args: argparse.Namespace, unit: str = "rows") -> ProgressBar:
    return ProgressBar(unit, enabled=False if args.quiet else None)


# --- commands ---------------------------------------------------------------------------------------
def _cmd_schema_show(args: argparse.Namespace) -> int:
    from ctrflow.schema import load_schema

    schema = load_schema(args.schema)
    _emit(args, schema.to_dict() | {"fingerprint": schema.fingerprint()}, schema.describe())
    return 0


def _split(s: str | None) -> list[str]:
    return [x for x in (s or "").split(",") if x]


def _infer(args: argparse.Namespace, path: str):
    """The inferred schema of `path` with the reason (and the overriding flag) of each column."""
    from ctrflow.schema import explain_schema

    return explain_schema(
        path, label=args.label, categorical=_split(args.categorical), numeric=_split(args.numeric),
        both=_split(args.both), time=args.time, weight=args.weight, ignore=_split(args.ignore), delimiter=args.delimiter,
    )


def _cmd_schema_infer(args: argparse.Namespace) -> int:
    if not args.label:
        raise CtrflowError("schema infer needs --label COL (the 0/1 label column).")
    inference = _infer(args, args.input)
    schema = inference.schema
    if args.out:
        schema.save(args.out)
    human = inference.describe() + (f"\nwrote {args.out}" if args.out else "")
    _emit(args, schema.to_dict() | {"fingerprint": schema.fingerprint(), "out": args.out, "inferred": inference.to_dict()}, human)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from ctrflow.data.generate import GenerateOptions, generate

    bar = _bar(args)
    try:
        s = generate(args.out, GenerateOptions(rows=args.rows, seed=args.seed, days=args.days, split=args.split), on_progress=bar)
    finally:
        bar.close()
    d = s.to_dict()
    _emit(args, d, f"wrote {s.rows:,} rows ({s.days} day(s), CTR {s.mean_ctr:.4f}, Bayes logloss {s.bayes_logloss:.5f}) "
                   f"to {s.path} in {s.seconds:.1f}s")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from ctrflow.data.convert import ConvertOptions, convert

    from ctrflow.schema import load_schema

    schema = args.schema
    inferred = None
    if schema is None and args.like is None:
        if not args.label:
            raise CtrflowError("convert needs --schema NAME|FILE, --like DIR, or --label COL to infer a schema from the header.")
        inferred = _infer(args, args.inputs[0])
        schema = inferred.schema
        if not args.quiet:
            print(inferred.describe(), flush=True)
    if args.max_buckets:
        if args.like:
            raise CtrflowError("--max-buckets changes the schema: it cannot be combined with --like.")
        schema = load_schema(schema).capped(args.max_buckets)
    opts = ConvertOptions(
        workers=args.workers, block_bytes=args.block_mb << 20,
        max_errors=None if args.max_errors < 0 else args.max_errors, overwrite=args.overwrite,
        max_line_bytes=args.max_line_bytes, max_field_bytes=args.max_field_bytes,
    )
    bar = _bar(args)
    try:
        s = convert(args.inputs, args.out, schema=schema, like=args.like, options=opts, on_progress=bar)
    finally:
        bar.close()
    human = (f"converted {s.rows:,} rows into {s.shards} shard(s) at {s.out} "
             f"({s.rows_per_s:,.0f} rows/s, {s.bytes / 1e6:.1f} MB)")
    if s.rows_rejected:
        human += f"\nrejected {s.rows_rejected:,} rows: {s.rejects}; each with file and line in {s.rejects_path}"
    _emit(args, s.to_dict() | ({"inferred": inferred.to_dict()} if inferred else {}), human)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from ctrflow.data.shards import verify

    r = verify(args.dir)
    lines = [f"{args.dir}: {r['shards']} shard(s), {r['rows']:,} of {r['expected_rows']:,} rows readable: "
             + ("OK" if r["ok"] else "DAMAGED")]
    lines += [f"  {d['file']}: {d['reason']}" for d in r["damaged"]]
    _emit(args, r | {"dir": args.dir}, "\n".join(lines))
    return 0 if r["ok"] else 1


def _cmd_read(args: argparse.Namespace) -> int:
    from ctrflow.data.pipeline import PipelineOptions, open_batches

    opts = PipelineOptions(batch_size=args.batch_size, epochs=args.epochs, shuffle=not args.no_shuffle, seed=args.seed)
    bar = _bar(args)
    t0 = time.perf_counter()
    positives = 0.0
    with open_batches(args.data, opts) as batches:
        total = batches.rows * args.epochs if batches.rows else None
        for b in batches:
            positives += float(b.label.sum())
            bar(batches.rows_yielded, total)
        rows, nb, spec = batches.rows_yielded, batches.batches_yielded, batches.spec
    bar.close()
    secs = time.perf_counter() - t0
    d = {"rows": rows, "batches": nb, "seconds": secs, "rows_per_s": rows / max(secs, 1e-9),
         "ctr": positives / max(rows, 1), "id_fields": len(spec.id_names), "numeric_fields": len(spec.numeric_names)}
    _emit(args, d, f"read {rows:,} rows in {nb} batches ({d['rows_per_s']:,.0f} rows/s), CTR {d['ctr']:.4f}, "
                   f"{d['id_fields']} id fields, {d['numeric_fields']} numeric fields")
    return 0


def _train_config(args: argparse.Namespace):
    """TrainConfig from --config FILE (if any), overridden by every flag given on the command line."""
    from ctrflow.models.registry import MODEL_KINDS, ModelConfig
    from ctrflow.train.config import GroupOptimizer, TrainConfig
    from ctrflow.validation import Choice

    base = TrainConfig.load(args.config) if args.config else TrainConfig()
    model = base.model.to_dict()
    if args.model is not None:
        Choice(tuple(sorted(MODEL_KINDS)))("ctrflow train", "--model", args.model)  # "Did you mean ...?"
    for flag, key in (("model", "kind"), ("embedding_dim", "embedding_dim"), ("dropout", "dropout"), ("table_mode", "table_mode"),
                      ("cross_layers", "cross_layers"), ("cross_structure", "cross_structure"), ("cross_rank", "cross_rank"),
                      ("ffm_dim", "ffm_dim"), ("min_count", "min_count"), ("cross_pairs", "cross_pairs"),
                      ("cross_buckets", "cross_buckets")):
        if getattr(args, flag) is not None:
            model[key] = getattr(args, flag)
    if args.cross_rank == 0:
        model["cross_rank"] = None  # full-rank cross layers
    if args.hidden is not None:
        model["hidden"] = [int(x) for x in args.hidden.split(",") if x]
    if args.batch_norm:
        model["batch_norm"] = True
    changes: dict[str, Any] = {"model": ModelConfig.from_dict(model)}
    for flag in ("optimizer", "learning_rate", "batch_size", "epochs", "steps_per_call", "seed", "max_steps", "l2", "l2_mode",
                 "valid_every_steps", "early_stopping_patience", "checkpoint_every_steps", "hogwild_threads",
                 "negative_sampling_rate", "reference_batch_size", "lr_scaling"):
        if getattr(args, flag, None) is not None:
            changes[flag] = getattr(args, flag)
    if args.seed is not None:
        changes["model"] = ModelConfig.from_dict({**model, "seed": args.seed})
    if args.deterministic:
        changes["deterministic"] = True
    if args.profile:
        changes["profile"] = True
    if args.command == "train" and args.holdout_fraction is not None:  # `continuous` has its own (the gate's)
        changes["holdout_fraction"] = args.holdout_fraction
    if getattr(args, "no_restore_best", False):
        changes["restore_best"] = False
    if getattr(args, "refit", None) is not None:  # train --refit / --no-refit (ctrflow.train.refit)
        changes["refit"] = args.refit
    groups = dict(base.optimizer_groups)
    for g in ("linear", "embedding", "dense"):
        name = getattr(args, f"{g}_optimizer")
        if name:
            lr = getattr(args, f"{g}_learning_rate") or changes.get("learning_rate", base.learning_rate) or TrainConfig._default_rate(name, g)
            groups[g] = GroupOptimizer(name, lr)
    changes["optimizer_groups"] = groups
    return base.replace(**changes)


def _cmd_train(args: argparse.Namespace) -> int:
    from ctrflow.train.loop import train

    config = _train_config(args)
    two_stage = args.ffm_select_pairs is not None or args.cross_select is not None
    if two_stage and (args.cluster or os.environ.get("TF_CONFIG") or args.warm_start):
        from ctrflow.errors import ConfigError

        flag = "--ffm-select-pairs" if args.ffm_select_pairs is not None else "--cross-select"
        raise ConfigError(f"{flag} trains both stages from scratch in this process: drop --cluster / --warm-start.")
    bar = _bar(args, "examples")
    try:
        if args.cluster or os.environ.get("TF_CONFIG"):  # this process coordinates a parameter-server cluster
            from ctrflow.train.distributed import DistributedOptions, train_distributed

            options = DistributedOptions(partitioner=args.partitioner, shards=args.shards)
            s = train_distributed(args.data, args.out, config, cluster=args.cluster, valid=args.valid,
                                  warm_start=args.warm_start, options=options, on_progress=bar)
        elif two_stage:  # two-stage FFM pairs / crosses (ctrflow.train.pair_selection)
            from ctrflow.train.pair_selection import train_two_stage

            s = train_two_stage(args.data, args.out, config, keep_pairs=args.ffm_select_pairs, cross_pairs=args.cross_select,
                                valid=args.valid, on_progress=bar)
        else:
            s = train(args.data, args.out, config, valid=args.valid, warm_start=args.warm_start, on_progress=bar,
                      check_memory=not args.skip_memory_check)
    finally:
        bar.close()
    d = s.to_dict()
    if s.valid:
        d.update({f"valid_{k}": v for k, v in s.valid.items() if isinstance(v, (int, float))})
    human = (f"trained {config.model.kind} for {s.steps:,} steps, {s.epochs} epoch(s) ({s.examples:,} examples, "
             f"{s.examples_per_s:,.0f} examples/s), train logloss {s.train_logloss:.5f}")
    human += f"\n{s.valid_note}"
    if s.valid:
        human += f"\nvalid: auc {s.valid['auc']:.4f}  logloss {s.valid['logloss']:.5f}  ne {s.valid['ne']:.4f}  calibration {s.valid['calibration']:.3f}"
        if s.restored_best:
            human += f" (the best validation, step {s.best_step}, restored)"
        elif s.stopped_early:
            human += " (stopped early)"
    if s.negative_sampling_rate < 1:
        human += f"\nnegatives kept with probability {s.negative_sampling_rate:g}: evaluate and export correct for it"
    if s.refit:
        r = s.refit
        human += (f"\nrefit of the per-id weights: {r['status']}" + (f" ({r['reason']})" if r.get("reason") else "")
                  + (f", lam {r['lam']:g}" + (f" (crosses {r['lam_cross']:g})" if r.get("lam_cross") is not None else "")
                     + f", {r['sweeps']} sweeps, valid logloss {r['valid_logloss_before']:.5f} -> "
                     f"{r['valid_logloss_after']:.5f}, {r['seconds']:.1f} s" if r.get("lam") is not None else ""))
    if s.resumed_from_step:
        human += f"\nresumed from step {s.resumed_from_step}"
    human += f"\nrun folder: {s.run} (learning_curves.png, history.jsonl, checkpoints/)"
    _emit(args, d, human)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ctrflow.train.evaluate import evaluate

    png = None if args.reliability_png == "none" else (args.reliability_png or os.path.join(args.run, "reliability.png"))
    r = evaluate(args.run, args.data, slice_by=args.slice_by, batch_size=args.batch_size, reliability_png=png)
    human = (f"{args.run} on {args.data}: rows {r['rows']:,}  auc {r['auc']:.4f}  logloss {r['logloss']:.5f}  "
             f"ne {r['ne']:.4f}  calibration {r['calibration']:.3f} (mean prediction / observed CTR)  "
             f"calibration error {r['calibration_error']:.5f} (per bin)")
    if "bayes_logloss" in r:
        human += f"\nBayes-optimal logloss {r['bayes_logloss']:.5f} (gap {r['logloss_gap']:.5f})"
    if png:
        human += f"\nreliability diagram: {png}"
    for k, m in list(r.get("slices", {}).items())[:50]:
        human += f"\n  {args.slice_by}={k}: rows {m['rows']:,} auc {m['auc']:.4f} logloss {m['logloss']:.5f}"
    _emit(args, r, human)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ctrflow.export import export

    s = export(args.run, args.model_base_path, version=args.version, embedding_dtype=args.embedding_dtype, overwrite=args.overwrite,
               context_fields=args.context_fields, pack_tables=args.pack_tables)
    _emit(args, s.to_dict(), f"exported version {s.version} to {s.path}: {s.export_bytes / 1e6:.1f} MB "
                             f"({s.export_vs_checkpoint:.0%} of the {s.checkpoint_bytes / 1e6:.1f} MB checkpoint)")
    return 0


def _batching(args: argparse.Namespace):
    from ctrflow.serving.batcher import BatchingOptions

    if getattr(args, "no_batching", False):
        return None
    return BatchingOptions(max_batch_size=args.max_batch_size, batch_timeout_ms=args.batch_timeout_ms,
                           num_batch_threads=args.num_batch_threads, max_enqueued=args.max_enqueued)


def _batching_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-batching", action="store_true", help="compute every request on its own")
    p.add_argument("--max-batch-size", type=int, default=4096, help="rows per compute call")
    p.add_argument("--batch-timeout-ms", type=float, default=2.0, help="longest a row waits for its batch to fill")
    p.add_argument("--num-batch-threads", type=int, default=1)
    p.add_argument("--max-enqueued", type=int, default=200_000, help="rows queued at most; beyond: 503 at once")


def _cmd_serve(args: argparse.Namespace) -> int:

    from ctrflow.serving.model_server import serve_until_signalled, start_server
    from ctrflow.serving.server import ServeOptions

    opts = ServeOptions(
        model_base_path=args.model_base_path, model_name=args.model_name, model_config_file=args.model_config,
        host=args.host, port=args.port, grpc_port=args.grpc_port, batching=_batching(args),
        keep_versions=args.keep_versions, poll_interval_s=args.poll_interval_s, warmup=not args.no_warmup,
        drain_grace_s=args.drain_grace_s, max_body_bytes=args.max_body_bytes,
        max_rows_per_request=args.max_rows_per_request, default_timeout_ms=args.default_timeout_ms,
        worker_threads=args.worker_threads, head_timeout_s=args.head_timeout_s, body_timeout_s=args.body_timeout_s,
        drain_timeout_s=args.drain_timeout_s, max_connections=args.max_connections,
        max_buffered_body_bytes=args.max_buffered_body_bytes, intra_op_threads=args.intra_op_threads,
        inter_op_threads=args.inter_op_threads, huge_pages=args.huge_pages,
    )
    config_poll_s = args.model_config_file_poll_wait_seconds or None
    from ctrflow.serving.workers import run_supervised, worker_count

    workers = worker_count(args.workers)
    if workers > 1:  # worker processes on one port (ctrflow.serving.workers)

        def announce(sup: Any) -> None:
            status = {"url": sup.url, "port": sup.port, "grpc_port": sup.grpc_port, "models": sup.models, "workers": workers}
            if not args.quiet:
                print(f"serving {status['models']} at {sup.url} with {workers} workers"
                      + (f", gRPC on port {sup.grpc_port}" if sup.grpc_port else ""), flush=True)
            if args.json:
                print(json.dumps(status, default=str), flush=True)

        return run_supervised(opts, workers, config_poll_s=config_poll_s, batching="options", announce=announce)
    server, watcher = start_server(opts, config_poll_s=config_poll_s)
    status = {"url": server.url, "port": server.port, "grpc_port": server.grpc_port, "models": {n: server.manager.versions(n) for n in server.manager.model_names}}
    if not args.quiet:
        print(f"serving {status['models']} at {server.url}" + (f", gRPC on port {server.grpc_port}" if server.grpc_port else ""), flush=True)
    if args.json:
        print(json.dumps(status, default=str), flush=True)
    serve_until_signalled(server, watcher)
    return 0


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from ctrflow.bench.loadgen import LoadOptions, run_load

    opts = LoadOptions(
        url=args.url, model_base_path=args.model_base_path, model_name=args.model_name, target=args.target,
        protocol=args.protocol, rate_rps=args.rate, candidates=args.candidates, duration_s=args.duration_s,
        timeout_ms=args.timeout_ms, connections=args.connections, max_in_flight=args.max_in_flight,
        compare_batching=args.compare_batching, batching=_batching(args), data=args.data, seed=args.seed,
        grpc_port=args.grpc_port, manifest=args.manifest,
    )
    report = run_load(opts)
    _emit(args, report.to_dict(), report.format_table())
    return 0


# --- parser -----------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON summary object as the last stdout line")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no human summary")


def _schema_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--label", help="label column (infers the schema from the CSV header)")
    p.add_argument("--categorical", help="comma-separated columns to treat as categorical")
    p.add_argument("--numeric", help="comma-separated columns to treat as numeric")
    p.add_argument("--both", help="comma-separated integer columns to hash by exact value AND discretize (mode: both)")
    p.add_argument("--time", help="time column (integers or date-times)")
    p.add_argument("--weight", help="example-weight column")
    p.add_argument("--ignore", help="comma-separated columns to drop")
    p.add_argument("--delimiter", help="field delimiter (default: tab for .tsv, else comma)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ctrflow", description="Train and serve CTR models on sparse ad data.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("schema", help="show or infer schemas")
    ssub = p.add_subparsers(dest="schema_command", required=True)
    q = ssub.add_parser("show", help="print a preset or a schema file")
    q.add_argument("schema", help="preset name (criteo, avazu, synthetic) or YAML/JSON file")
    _common(q)
    q.set_defaults(func=_cmd_schema_show)
    q = ssub.add_parser("infer", help="infer a schema from a CSV header and sample")
    q.add_argument("input")
    q.add_argument("--out", help="write the schema here (.yaml or .json)")
    _schema_flags(q)
    _common(q)
    q.set_defaults(func=_cmd_schema_infer)

    p = sub.add_parser("generate", help="write synthetic Criteo-shaped RTB logs with known true CTR")
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--out", required=True, help="CSV file (.gz for gzip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--days", type=int, default=1, help="time-ordered drifting days")
    p.add_argument("--split", choices=["train", "test"], default="train", help="test: other rows from the same hidden model")
    _common(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("convert", help="convert raw logs into binary shards")
    p.add_argument("inputs", nargs="+", help="CSV/TSV (.gz), Parquet or JSON Lines files")
    p.add_argument("--out", required=True, help="shard folder to create")
    p.add_argument("--schema", help="preset name or schema file")
    p.add_argument("--like", help="reuse the schema, hashing and boundaries of this earlier shard folder")
    p.add_argument("--max-errors", type=int, default=1000, help="abort after this many rejected rows (-1: no bound)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (0: automatic)")
    p.add_argument("--block-mb", type=int, default=32, help="MiB of text per block/shard")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--max-buckets", type=int, help="cap every categorical field's hash buckets (smaller tables)")
    p.add_argument("--max-line-bytes", type=int, default=1 << 20, help="reject longer lines (line_too_long); default 1 MiB")
    p.add_argument("--max-field-bytes", type=int, default=64 << 10, help="reject rows with a longer field (field_too_long)")
    _schema_flags(p)
    _common(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("verify", help="check a shard folder's checksums and row counts")
    p.add_argument("dir")
    _common(p)
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("read", help="read batches from shards (or - for stdin) and report throughput")
    p.add_argument("data", help="shard folder or - for a shard stream on stdin")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-shuffle", action="store_true")
    _common(p)
    p.set_defaults(func=_cmd_read)

    p = sub.add_parser("train", help="train a CTR model into a run folder (rerun to resume)")
    p.add_argument("--data", required=True, help="shard folder, or - for a shard stream on stdin")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--valid", help="validation shard folder")
    p.add_argument("--warm-start", help="initialize from another run's latest checkpoint")
    p.add_argument("--cluster", help="coordinate this parameter-server cluster (cluster file, JSON/YAML; or set TF_CONFIG)")
    p.add_argument("--partitioner", choices=["min_size", "fixed"], default="min_size",
                   help="with a cluster: how tables split over the ps (default min_size: shards of >= 256 KiB)")
    p.add_argument("--shards", type=int, default=0, help="with a cluster: most shards per table; 0 = one per ps")
    p.add_argument("--holdout-fraction", type=float,
                   help="without --valid: latest share of rows (by time) held out for validation (default 0.1; 0: none)")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="allocate the tables even if their estimated training state exceeds the memory available")
    p.add_argument("--ffm-select-pairs", type=int, metavar="K",
                   help="ffm, single process: train twice, the second time (from scratch, in OUT; the first in OUT/stage1) "
                        "with only the K field pairs whose term moves the logit most (about 2x the time; BENCHMARKS.md)")
    p.add_argument("--cross-select", type=int, metavar="K",
                   help="any model, single process: train an FFM first (in OUT/stage1), then this model (in OUT) with hashed "
                        "cross features of the K field pairs whose FFM term moves the logit most (about 2x the time)")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="after training, refit the per-id weights (linear, crosses, bias) to convergence on the full "
                        "L2-penalized training logloss, the rest frozen, L2 chosen on validation (BENCHMARKS.md)")
    _train_flags(p)
    _common(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="metrics of a run on shards")
    p.add_argument("run")
    p.add_argument("--data", required=True)
    p.add_argument("--slice-by", help="a field or the time column: metrics per value")
    p.add_argument("--batch-size", type=int, default=16384)
    p.add_argument("--reliability-png", help="where to draw the reliability diagram (default RUN/reliability.png; none: skip)")
    _common(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="export a run as a slim SavedModel version (TF Serving layout)")
    p.add_argument("run")
    p.add_argument("--model-base-path", required=True, help="MODELS/NAME; the version folder goes inside")
    p.add_argument("--version", type=int, help="default: newest existing version + 1")
    p.add_argument("--embedding-dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--pack-tables", choices=["auto", "on", "off"], default="auto",
                   help="serve from one table per id (the linear weight as the embedding row's last column): on, off, "
                        "or auto (the kinds where it measured faster; BENCHMARKS.md 'Packed tables')")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--context-fields", metavar="A,B,C", help="fields sent once per request in context + candidates "
                   "requests (adds the serving_context/predict_context signatures; default: the schema's context list, "
                   "'' for none; docs/context.md)")
    _common(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("serve", help="serve exported models over REST (TF Serving compatible) and gRPC, with hot reload")
    p.add_argument("--model-base-path", help="MODELS/NAME with integer version folders")
    p.add_argument("--model-name", help="default: the base path's folder name")
    p.add_argument("--model-config", help="TF Serving's textproto model_config_list, or YAML/JSON {models: [...], rollouts: [...]}")
    p.add_argument("--model-config-file-poll-wait-seconds", type=float, default=0,
                   help="re-read --model-config every N seconds (0: never)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--grpc-port", type=int, help="also serve gRPC PredictionService here")
    _batching_flags(p)
    p.add_argument("--keep-versions", type=int, default=1, help="newest versions served at once")
    p.add_argument("--poll-interval-s", type=float, default=1.0, help="how often base paths are scanned")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--drain-grace-s", type=float, default=30.0)
    p.add_argument("--max-body-bytes", type=int, default=8 << 20)
    p.add_argument("--max-rows-per-request", type=int, default=100_000)
    p.add_argument("--default-deadline-ms", "--default-timeout-ms", dest="default_timeout_ms", type=float, metavar="MS",
                   help="deadline of requests without X-Deadline-Ms (or a gRPC deadline), counted from their first "
                        "byte; default none")
    p.add_argument("--worker-threads", type=int, default=8)
    p.add_argument("--head-timeout-s", type=float, default=10.0, help="longest a request head may take to arrive (then 408)")
    p.add_argument("--body-timeout-s", type=float, default=30.0, help="longest a request body may take to arrive (then 408)")
    p.add_argument("--drain-timeout-s", type=float, default=30.0, help="longest a client may take to read an answer (then dropped)")
    p.add_argument("--max-connections", type=int, default=1000, help="open connections at most (beyond: 503)")
    p.add_argument("--max-buffered-body-bytes", type=int, default=256 << 20,
                   help="request body bytes buffered across all connections at most (beyond: 503)")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes on the port, each with its own models and batcher (0: one per core)")
    p.add_argument("--intra-op-threads", type=int, default=0, metavar="N",
                   help="threads one TensorFlow op may use, per process (TF Serving's --tensorflow_intra_op_parallelism; 0: TensorFlow chooses)")
    p.add_argument("--inter-op-threads", type=int, default=0, metavar="N",
                   help="TensorFlow ops run at once, per process (TF Serving's --tensorflow_inter_op_parallelism; 0: TensorFlow chooses)")
    p.add_argument("--huge-pages", choices=["auto", "off"], default="auto",
                   help="put the models' embedding tables on transparent huge pages where the kernel allows "
                        "(cheaper gathers, same scores; default auto)")
    _common(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("bench", help="load generators")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    q = bsub.add_parser("serve", help="open-loop Poisson load against a server or the in-process predictor")
    q.add_argument("--url", help="a running server (loopback only)")
    q.add_argument("--model-base-path", help="start the target(s) here from this base path")
    q.add_argument("--model-name")
    q.add_argument("--target", choices=["http", "inprocess"], default="http")
    q.add_argument("--protocol", choices=["rest", "columnar", "ids", "grpc", "context"], default="rest",
                   help="rest: JSON instances; columnar: binary raw columns; ids: binary ids body, hashed by the "
                        "client (the fast path); grpc: gRPC Predict on predict_ids (tensor_content); context: the "
                        "export's context fields once per request, compared with the same requests flat")
    q.add_argument("--grpc-port", type=int, help="with --url and --protocol grpc: the server's gRPC port")
    q.add_argument("--manifest", help="with --url and --protocol ids/grpc: the served version folder (to hash with)")
    q.add_argument("--rate", type=float, default=200.0, help="mean requests per second (Poisson)")
    q.add_argument("--candidates", type=int, default=100, help="candidate ads per request")
    q.add_argument("--duration-s", type=float, default=10.0)
    q.add_argument("--timeout-ms", type=float, default=100.0, help="per-request deadline")
    q.add_argument("--connections", type=int, default=64)
    q.add_argument("--max-in-flight", type=int, default=2048)
    q.add_argument("--compare-batching", action="store_true", help="run with batching on, then off")
    q.add_argument("--data", help="CSV to sample feature rows from (default: synthetic rows)")
    q.add_argument("--seed", type=int, default=0)
    _batching_flags(q)
    _common(q)
    q.set_defaults(func=_cmd_bench_serve)

    for extend in _EXTENSIONS:
        extend(sub)
    return parser


# Later layers (train, export, serve) register their commands here, keeping this module thin.
_EXTENSIONS: list[Callable[[Any], None]] = []


# --- continuous ------------------------------------------------------------------------------------
def _train_flags(p: argparse.ArgumentParser) -> None:
    """The model and optimizer flags `_train_config` reads (shared by `train` and `continuous`)."""
    p.add_argument("--model", help="lr|fm|fwfm|ffm|deepfm|dcnv2 (default deepfm; a misspelled name gets the nearest suggested)")
    p.add_argument("--optimizer", help="sgd|adagrad|ftrl|adam|lazyadam (all groups; default: measured per-group optimizers)")
    p.add_argument("--learning-rate", type=float,
                   help="every group's rate at --reference-batch-size rows (default: measured per-group rates)")
    for g in ("linear", "embedding", "dense"):
        p.add_argument(f"--{g}-optimizer", help=f"optimizer of the {g} group only")
        p.add_argument(f"--{g}-learning-rate", type=float)
    p.add_argument("--epochs", type=int, help="most epochs (default: until early stopping, at most 10, with validation; else 1)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--embedding-dim", type=int)
    p.add_argument("--hidden", help="DeepFM/DCN-v2 MLP widths, e.g. 256,128")
    p.add_argument("--dropout", type=float)
    p.add_argument("--batch-norm", action="store_true")
    p.add_argument("--table-mode", choices=["shared", "per_field"])
    p.add_argument("--cross-layers", type=int, help="dcnv2: number of cross layers (default 3)")
    p.add_argument("--cross-structure", help="dcnv2: stacked (default) or parallel")
    p.add_argument("--cross-rank", type=int, help="dcnv2: rank of the low-rank cross layers (default 64); 0 = full rank")
    p.add_argument("--ffm-dim", type=int, help="ffm: width of each field-aware vector (default 4; rows hold fields-1 of them)")
    p.add_argument("--min-count", type=int, help="ids seen fewer than K times in the training data share one row per field (0: off)")
    p.add_argument("--cross-pairs", help="any model: hashed cross features of these field pairs, a:b,c:d (one weight per id pair)")
    p.add_argument("--cross-buckets", type=int, help="rows of the hashed cross table (default 1048576)")
    p.add_argument("--l2", type=float)
    p.add_argument("--l2-mode", choices=["touched", "every_step"],
                   help="L2 on table rows only in the steps they are in, or at every step (caught up when next touched)")
    p.add_argument("--steps-per-call", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--deterministic", action="store_true", help="single-threaded, bit-for-bit repeatable")
    p.add_argument("--valid-every-steps", type=int)
    p.add_argument("--early-stopping-patience", type=int, help="validations without improvement before stopping (default 1; 0: off)")
    p.add_argument("--no-restore-best", action="store_true", help="end on the last checkpoint, not the best validation's")
    p.add_argument("--negative-sampling-rate", type=float,
                   help="keep each negative row with this probability, in (0, 1] (default 1); exports are corrected")
    p.add_argument("--reference-batch-size", type=int, help="the batch size learning rates are given for (default 4096)")
    p.add_argument("--lr-scaling", choices=["sqrt", "linear", "none"], help="rates follow the batch size (default sqrt)")
    p.add_argument("--checkpoint-every-steps", type=int)
    p.add_argument("--hogwild-threads", type=int)
    p.add_argument("--config", help="TrainConfig JSON/YAML; flags override it")
    p.add_argument("--profile", action="store_true", help="write a profiler trace to RUN/profile")


def _decision_line(d: dict[str, Any]) -> str:
    version = f" v{d['version']}" if d.get("version") is not None else ""
    secs = (d.get("seconds") or {}).get("total")
    return f"{d['slice']}: {d['decision']}{version} - {d['reason']}" + (f" ({secs:.1f} s)" if secs is not None else "")


def _cmd_continuous(args: argparse.Namespace) -> int:
    from ctrflow.errors import ConfigError
    from ctrflow.continuous import ContinuousOptions, continuous_train, status

    if args.action == "status":
        st = status(args.state)
        head = (f"{st['state']}: {st['slices']} slices decided ({st['published']} published, {st['rejected']} rejected, "
                f"{st['quarantined']} quarantined); published version {st['published_version']}, line {st['line_run']}"
                + (f"; running as pid {st['running_pid']}" if st["running_pid"] else "; not running"))
        _emit(args, st, "\n".join([head, *(_decision_line(d) for d in st["decisions"][-50:])]))
        return 0
    if not args.incoming or not args.model_base_path:
        raise ConfigError("`ctrflow continuous` needs --incoming DIR and --model-base-path MODELS/NAME "
                          "(or `ctrflow continuous status --state DIR`).")
    options = ContinuousOptions(
        tolerance=args.tolerance, holdout_fraction=args.holdout_fraction, poll_seconds=args.poll_seconds,
        max_polls=args.max_polls, reset_stale_after_slices=args.reset_stale_after_slices, keep_runs=args.keep_runs,
        embedding_dtype=args.embedding_dtype,
    )

    def show(d: Any) -> None:
        if not args.quiet:
            print(_decision_line(d.to_dict()), flush=True)

    try:
        s = continuous_train(args.incoming, args.model_base_path, args.state, _train_config(args), options,
                             once=args.once, on_event=show)
    except KeyboardInterrupt:
        print("stopped; rerun the same command to go on where it left off", file=sys.stderr)
        return 130
    d = s.to_dict()
    _emit(args, d, f"{len(s.decisions)} slice(s) decided ({d['published']} published, {d['rejected']} rejected, "
                   f"{d['quarantined']} quarantined); published version {s.published_version}")
    return 0


def _add_continuous(sub: Any) -> None:
    p = sub.add_parser("continuous", help="follow a folder of new shard sets: warm-start, gate, publish (or: status)")
    p.add_argument("action", nargs="?", choices=["run", "status"], default="run",
                   help="run (default): follow --incoming; status: print the decisions logged in --state")
    p.add_argument("--state", required=True, help="state folder: decisions.jsonl, runs/, lock (one process at a time)")
    p.add_argument("--incoming", help="folder whose sub-folders are shard sets (ctrflow convert --out incoming/NAME)")
    p.add_argument("--model-base-path", help="MODELS/NAME: each published version goes to <newest + 1>/ inside")
    p.add_argument("--once", action="store_true", help="process every ready slice, then exit")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="publish if gate logloss <= published logloss x (1 + tolerance) (default 0.01)")
    p.add_argument("--holdout-fraction", type=float, default=0.1, help="latest share of each slice held out as gate rows")
    p.add_argument("--poll-seconds", type=float, default=30.0, help="pause between scans without --once")
    p.add_argument("--max-polls", type=int, help="stop after this many scans (default: until Ctrl-C)")
    p.add_argument("--reset-stale-after-slices", type=int,
                   help="reset table rows no published slice touched in this many slices (default: never)")
    p.add_argument("--keep-runs", type=int, default=3, help="run folders kept besides the published line's")
    p.add_argument("--embedding-dtype", choices=["float32", "float16"], default="float32")
    _train_flags(p)
    _common(p)
    p.set_defaults(func=_cmd_continuous)


_EXTENSIONS.append(_add_continuous)


# --- cluster -----------------------------------------------------------------------------------------
def _cmd_cluster_serve(args: argparse.Namespace) -> int:
    from ctrflow.train.cluster import serve

    serve(args.cluster, args.task_type, args.index, threads=args.threads, exit_with_parent=args.exit_with_parent)  # until Ctrl-C / SIGTERM
    return 0


def _cmd_cluster_local(args: argparse.Namespace) -> int:
    from ctrflow.train.cluster import run_local

    command = args.coordinator[1:] if args.coordinator[:1] == ["--"] else args.coordinator
    try:
        _preflight(command)
    except CtrflowError as e:  # answered as the coordinator would have: in JSON when it was asked to
        return _fail(str(e), type(e).__name__, "--json" in command)
    return run_local([sys.executable, "-m", "ctrflow", *command], workers=args.workers, ps=args.ps, log_dir=args.log_dir)


def _preflight(command: Sequence[str]) -> None:
    """Check a coordinator command's arguments and input folders before a cluster is started for it:
    three processes importing TensorFlow take tens of seconds, too long to wait for a typo."""
    from ctrflow.errors import ConfigError

    if not command:
        return  # run_local names the missing command
    try:
        args = build_parser().parse_args(list(command))
    except _UsageError as e:
        raise ConfigError(f"the coordinator command `{' '.join(command)}`: {e}") from None
    if getattr(args, "command", None) == "train":
        from ctrflow.data.shards import load_manifest

        _train_config(args)
        for folder in (args.data, args.valid):
            if folder and folder != "-":
                load_manifest(folder)


def _add_cluster(sub: Any) -> None:
    p = sub.add_parser("cluster", help="parameter-server cluster tasks: a worker, a ps, or a whole local cluster")
    csub = p.add_subparsers(dest="cluster_command", required=True)
    for kind in ("worker", "ps"):
        q = csub.add_parser(kind, help=f"serve one {kind} task of a cluster file until Ctrl-C")
        q.add_argument("--cluster", required=True, help="cluster file (JSON/YAML)")
        q.add_argument("--index", type=int, required=True, help=f"this task's index among the file's {kind} tasks")
        q.add_argument("--threads", type=int, default=0, help="TensorFlow threads (0: TensorFlow's choice)")
        q.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)  # LocalCluster's tasks
        _common(q)
        q.set_defaults(func=_cmd_cluster_serve, task_type=kind)
    q = csub.add_parser("local", help="run a ctrflow command as the coordinator of a local cluster, then tear it down")
    q.add_argument("--workers", type=int, default=2)
    q.add_argument("--ps", type=int, default=1)
    q.add_argument("--log-dir", help="keep the tasks' logs (and the cluster file) here")
    q.add_argument("coordinator", metavar="command", nargs=argparse.REMAINDER, help="-- train --data D --out RUN ...")
    _common(q)
    q.set_defaults(func=_cmd_cluster_local)


_EXTENSIONS.append(_add_cluster)


# --- tune --------------------------------------------------------------------------------------------
def _cmd_tune(args: argparse.Namespace) -> int:
    from ctrflow.train.tune import TuneOptions, tune

    if not args.model and not args.config:
        raise CtrflowError("tune needs --model NAME (or --config FILE naming one).")
    options = TuneOptions(trials=args.trials, budget_minutes=args.budget_minutes, max_epochs=args.max_epochs,
                          seed=args.seed or 0)

    def show(rec: dict[str, Any]) -> None:
        if not args.quiet:
            v = [x for x in rec["valid_by_epoch"] if x == x]
            best = f"{min(v):.5f}" if v else "-"
            params = ", ".join(f"{k}={x:.3g}" if isinstance(x, float) else f"{k}={x}" for k, x in rec["params"].items())
            print(f"trial {rec['trial']}: {rec['state']}, valid logloss {best} in {len(v)} epoch(s), "
                  f"{rec['seconds']:.1f} s ({params})", flush=True)

    def note(text: str) -> None:
        if not args.quiet:
            print(text, flush=True)

    s = tune(args.data, args.out, _train_config(args), valid=args.valid, options=options, overwrite=args.overwrite,
             on_trial=show, on_note=note)
    human = (f"best: trial {s.best_trial}, valid logloss {s.best_valid_logloss:.5f} after {s.best_epochs} epoch(s) "
             f"({s.trials} trials: {s.completed} complete, {s.pruned} pruned{', stopped by the budget' if s.stopped_by_budget else ''}; "
             f"{s.seconds:.0f} s)\nbest config: {s.best_config} (ctrflow train --config {s.best_config} ...); "
             f"table and figure: {args.out}/trials.md, trials.png")
    _emit(args, s.to_dict(), human)
    return 0


def _add_tune(sub: Any) -> None:
    p = sub.add_parser("tune", help="search learning rates, embedding size, L2, dropout, batch size (Optuna, pruned, budgeted)")
    p.add_argument("--data", required=True, help="training shard folder")
    p.add_argument("--valid", help="validation shard folder (default: the latest 10%% of --data by time is held out)")
    p.add_argument("--out", required=True, help="folder to write: best_config.yaml, trials.md/.tsv, trials.png, summary.json")
    p.add_argument("--trials", type=int, default=20, help="most trials (default 20)")
    p.add_argument("--budget-minutes", type=float, help="wall-clock budget of the whole search")
    p.add_argument("--max-epochs", type=int, default=10, help="most epochs per trial (default 10, as train)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _train_flags(p)
    _common(p)
    p.set_defaults(func=_cmd_tune)


_EXTENSIONS.append(_add_tune)


class _UsageError(Exception):
    """Bad command-line arguments (argparse's own error, raised instead of exiting so --json can answer)."""

    def __init__(self, usage: str, message: str) -> None:
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # type: ignore[override]
        raise _UsageError(self.format_usage(), f"{self.prog}: {message}")


_OS_ERRORS = {  # errno name → what the user can do about it
    "ENOSPC": "no space left on device", "EDQUOT": "disk quota exceeded", "EROFS": "read-only file system",
    "EACCES": "permission denied", "EPERM": "operation not permitted", "ENOENT": "no such file or folder",
    "EISDIR": "is a folder, not a file", "ENOTDIR": "not a folder", "EMFILE": "too many open files",
    "ENOMEM": "out of memory", "EIO": "input/output error (failing disk?)",
}


def _os_error_message(e: OSError) -> str:
    """One line for an OSError: what happened, to which path, with nothing partial published (writes are atomic)."""
    import errno as _errno

    name = _errno.errorcode.get(e.errno or -1, "")
    what = _OS_ERRORS.get(name, e.strerror or str(e) or type(e).__name__)
    where = " ".join(str(x) for x in (e.filename, e.filename2) if x)
    hint = {"ENOSPC": "; free some space and rerun (nothing partial was published)",
            "EDQUOT": "; free some space and rerun (nothing partial was published)",
            "EACCES": "; check the path's owner and mode"}.get(name, "")
    return f"{what}{' (' + name + ')' if name else ''}{': ' + where if where else ''}{hint}"


def _fail(message: str, kind: str, json_mode: bool, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    if json_mode:
        print(json.dumps({"error": message, "type": kind}))
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Every failure a user can cause (bad arguments, bad input, a full disk) prints one
    `error: ...` line on stderr (and `{"error": ...}` as the last stdout line with --json) and exits 2;
    an unexpected failure (a bug) prints one line too and exits 1. No traceback reaches the user
    unless CTRFLOW_TRACEBACK=1."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = list(sys.argv[1:] if argv is None else argv)
    json_mode = "--json" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        sys.stderr.write(e.usage)
        return _fail(str(e), "UsageError", json_mode)
    json_mode = bool(getattr(args, "json", False))
    try:
        from ctrflow._tf import install_quiet_hook

        install_quiet_hook()  # TensorFlow loads when a command first needs it, without its banner
        return int(args.func(args) or 0)
    except CtrflowError as e:
        return _fail(str(e), type(e).__name__, json_mode)
    except OSError as e:
        return _fail(_os_error_message(e), "OSError", json_mode)
    except UnicodeDecodeError as e:  # a file given as text (a config, a schema) holds binary data
        return _fail(f"a file given to {args.command} is not UTF-8 text ({e.reason} at byte {e.start}); "
                     "check the paths passed", "InputError", json_mode)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, or a lower layer's error not mapped yet: one line, not a traceback
        if os.environ.get("CTRFLOW_TRACEBACK") == "1":
            raise
        text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        if "No space left on device" in str(e):
            return _fail(f"no space left on device (ENOSPC): {text}", "OSError", json_mode)
        return _fail(f"unexpected {type(e).__name__}: {text} (a bug: rerun with CTRFLOW_TRACEBACK=1 and report it)",
                     type(e).__name__, json_mode, code=1)


if __name__ == "__main__":
    sys.exit(main())
