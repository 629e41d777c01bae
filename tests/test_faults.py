"""Fault injection with real processes: kill -9 mid-convert, a full disk, giant lines, garbage and
truncated files, and every CLI command on bad input. What must hold: no orphan process, nothing
partial left behind, one `error: ...` line and exit 2 (a JSON error object last under --json), and
never a traceback on the user's terminal."""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from conftest import REPO, cli_in_process

PY = sys.executable


def ctrflow(*args: str, input: bytes | None = None, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "ctrflow", *args], capture_output=True, cwd=REPO, input=input, timeout=timeout,
                          env={**os.environ, **(env or {})})


def assert_clean_error(p: subprocess.CompletedProcess, *, json_mode: bool, what: str = "", code: int = 2) -> dict | None:
    """Exit `code`, one `error:` line on stderr, no traceback; with --json a JSON error object last on stdout."""
    err, out = p.stderr.decode(errors="replace"), p.stdout.decode(errors="replace")
    assert "Traceback" not in err and "Traceback" not in out, f"{what}: traceback reached the user:\n{err[-3000:]}"
    assert p.returncode == code, f"{what}: exit {p.returncode}, wanted {code}\nstderr: {err[-2000:]}\nstdout: {out[-500:]}"
    assert any(line.startswith("error: ") for line in err.splitlines()), f"{what}: no 'error:' line in\n{err[-2000:]}"
    if json_mode:
        lines = out.strip().splitlines()
        assert lines, f"{what}: --json printed nothing"
        obj = json.loads(lines[-1])
        assert isinstance(obj, dict) and obj.get("error"), f"{what}: last stdout line is not a JSON error: {lines[-1]!r}"
        return obj
    return None


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    """A synthetic log of ~7 MB (45k rows) with a few malformed rows: several 1 MiB blocks."""
    from ctrflow.data.generate import GenerateOptions, generate

    root = tmp_path_factory.mktemp("faultlogs")
    generate(root / "g.csv", GenerateOptions(rows=45_000, seed=4))
    with open(root / "g.csv", "ab") as f:
        f.write(b"2,not,a,row\n" * 5)
    return root / "g.csv"


# --- kill -9 ----------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("point", ["workers_started", "blocks_staged"])
def test_kill_9_mid_convert_leaves_no_orphan_workers_and_the_next_run_cleans_up(tmp_path, logs, point):
    out = tmp_path / "shards"
    proc = subprocess.Popen([PY, "-m", "ctrflow", "convert", str(logs), "--schema", "synthetic", "--out", str(out),
                             "--workers", "2", "--block-mb", "1", "--quiet"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    partial = out.with_name(f"{out.name}.partial-{proc.pid}")
    staging = partial / ".staging"
    try:
        def reached() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"convert ended before {point}: {proc.stderr.read().decode()[-2000:]}")
            if point == "workers_started":
                return partial.is_dir() and len([c for c in _children(proc.pid) if _alive(c)]) >= 2
            return staging.is_dir() and any(staging.glob("part-*/label.npy"))

        _wait_for(reached, 120, point)
        workers = [c for c in _children(proc.pid) if _alive(c)]
        assert workers, "no worker processes seen"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    _wait_for(lambda: not any(_alive(w) for w in workers), 15, f"workers {workers} to die with their parent")
    assert partial.is_dir() and not out.exists()  # the dead run's leftovers: what the next run must remove
    # The next run (in this process: the command's cleanup, not another TensorFlow import) removes them.
    p = cli_in_process("convert", logs, "--schema", "synthetic", "--out", out, "--workers", "1", "--json", "--quiet")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.splitlines()[-1])["rows"] == 45_000
    assert not partial.exists() and sorted(x.name for x in tmp_path.iterdir()) == ["shards"]


def test_a_live_conversions_partial_folder_is_kept(tmp_path):
    from ctrflow.data.convert import remove_stale_partials

    out = tmp_path / "s"
    sleeper = subprocess.Popen([PY, "-c", "import time; time.sleep(30)"])
    try:
        live, dead = out.with_name(f"s.partial-{sleeper.pid}"), out.with_name("s.partial-999999999")
        live.mkdir()
        dead.mkdir()
        (dead / "part-00000.ctrs").write_bytes(b"x")
        assert remove_stale_partials(out) == [str(dead)]
        assert live.is_dir() and not dead.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# --- full disk --------------------------------------------------------------------------------------
_ENOSPC_SITE = '''
import errno, os
import numpy
import ctrflow.data.shards as shards

def _full(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

_save, _calls = numpy.save, [0]

def _save_some(*a, **k):  # the first blocks fit, then the disk is full
    _calls[0] += 1
    if _calls[0] > int(os.environ.get("CTRFLOW_TEST_FULL_AFTER", "0")):
        _full()
    return _save(*a, **k)

numpy.save = _save_some
shards._write_to = _full
'''


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "3m"):
    """A real 3 MB tmpfs at `folder` when this process may mount one (root), else None (use injection)."""
    folder.mkdir()
    mounted = shutil.which("mount") and os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode == 0
    try:
        yield folder if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.mark.slow
@pytest.mark.parametrize("json_mode", [True])  # --json checks the stderr error line too, and the JSON error on top
def test_full_disk_during_convert_is_one_error_and_leaves_nothing(tmp_path, logs, json_mode):
    with small_disk(tmp_path / "disk") as disk:
        env = {}
        if disk is None:  # no tmpfs here: the converter's own writes fail with ENOSPC, in the subprocess only
            site = tmp_path / "site"
            site.mkdir()
            (site / "sitecustomize.py").write_text(_ENOSPC_SITE)
            env = {"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "CTRFLOW_TEST_FULL_AFTER": "12"}
            disk = tmp_path / "disk"
        out = disk / "shards"
        args = ["convert", str(logs), "--schema", "synthetic", "--out", str(out), "--block-mb", "1", "--workers", "1"]
        p = ctrflow(*args, *(["--json"] if json_mode else []), env=env)
        obj = assert_clean_error(p, json_mode=json_mode, what="full disk")
        assert "no space left on device" in p.stderr.decode()
        if obj:
            assert "no space left" in obj["error"]
        assert list(disk.iterdir()) == [], f"left behind: {list(disk.iterdir())}"  # no partial, no tmp, no rejects
        if os.path.ismount(disk):
            st = os.statvfs(disk)
            assert st.f_bfree == st.f_blocks  # the disk is empty again


# --- giant lines --------------------------------------------------------------------------------------
def _giant_line_file(path: Path, line_mb: int, gz: bool = False) -> None:
    head = b"y,c,x\n" + b"".join(b"%d,c%d,%d\n" % (i % 2, i % 5, i) for i in range(2000))
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(head)
        f.write(b"1,")
        chunk = b"z" * (1 << 20)
        for _ in range(line_mb):
            f.write(chunk)
        f.write(b",1\n")
        f.write(b"".join(b"%d,d%d,%d\n" % (i % 2, i % 5, i) for i in range(1000)))


@pytest.mark.parametrize("gz", [False, True])
def test_giant_line_is_a_reject_and_memory_stays_bounded(tmp_path, gz):
    from ctrflow.data.convert import _plan
    from ctrflow.schema import CategoricalField, NumericField, Schema

    path = tmp_path / ("giant.csv.gz" if gz else "giant.csv")
    _giant_line_file(path, 40, gz)
    schema = Schema("g", "y", (CategoricalField("c", 64),), (NumericField("x"),), columns=("y", "c", "x"))
    tracemalloc.start()
    blocks = [(b.first_line, b.too_long, b.end - b.start) for b in _plan([path], schema, 64 << 10, 1 << 20)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 24 << 20, f"planning a file with a 40 MB line held {peak / 2**20:.0f} MiB"
    long = [b for b in blocks if b[1]]
    assert len(long) == 1 and long[0][0] == 2002 and long[0][2] == (40 << 20) + 5
    yaml = tmp_path / "g.yaml"
    yaml.write_text("label: y\ncategorical: [c]\nnumeric: [x]\n")
    p = cli_in_process("convert", path, "--schema", yaml, "--out", tmp_path / "s", "--json", "--quiet")
    assert p.returncode == 0, p.stderr[-2000:]
    s = json.loads(p.stdout.splitlines()[-1])
    assert s["rows"] == 3000 and s["rejects"] == {"line_too_long": 1}
    rej = (tmp_path / "s" / "rejects.tsv").read_text().splitlines()
    assert len(rej) == 2 and rej[1].split("\t")[1:3] == ["2002", "line_too_long"] and len(rej[1]) < 1000


def test_line_and_field_limits_are_flags(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("y,c,x\n" + "".join(f"{i % 2},{'w' * (300 if i == 7 else 3)},{i}\n" for i in range(50)))
    yaml = tmp_path / "g.yaml"
    yaml.write_text("label: y\ncategorical: [c]\nnumeric: [x]\n")
    # In this process (each conversion in a new one imports TensorFlow for the hashing); the real process's
    # answer to a bad limit is the subprocess below.
    field, line = (cli_in_process("convert", path, "--schema", yaml, "--out", tmp_path / out, "--json", "--quiet", flag, limit)
                   for out, flag, limit in (("a", "--max-field-bytes", "100"), ("b", "--max-line-bytes", "200")))
    assert field.returncode == 0 and line.returncode == 0, field.stderr + line.stderr
    assert json.loads(field.stdout.splitlines()[-1])["rejects"] == {"field_too_long": 1}
    assert json.loads(line.stdout.splitlines()[-1])["rejects"] == {"line_too_long": 1}
    p = ctrflow("convert", str(path), "--schema", str(yaml), "--out", str(tmp_path / "c"), "--json", "--max-line-bytes", "-5")
    obj = assert_clean_error(p, json_mode=True, what="negative limit")
    assert "max_line_bytes" in obj["error"]


# --- garbage and truncated files ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def garbage(tmp_path_factory, logs) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("garbage")
    rnd = os.urandom(200_000)
    files = {"random.csv": rnd, "binary.csv.gz": gzip.compress(rnd), "binary_after_header.csv.gz": gzip.compress(b"day,click\n" + rnd)}
    full = gzip.compress(logs.read_bytes()[:3_000_000])
    files["truncated.csv.gz"] = full[: len(full) // 2]
    files["empty.csv"] = b""
    for name, data in files.items():
        (root / name).write_bytes(data)
    # A shard folder whose shard is random bytes, one whose manifest is, and one with a truncated shard.
    good = root / "good"
    from ctrflow.data.convert import ConvertOptions, convert

    convert(logs, good, schema="synthetic", options=ConvertOptions(workers=1))
    for kind in ("random_shard", "random_manifest", "truncated_shard"):
        d = root / kind
        shutil.copytree(good, d)
        shard = sorted(d.glob("*.ctrs"))[0]
        if kind == "random_shard":
            shard.write_bytes(os.urandom(shard.stat().st_size))
        elif kind == "truncated_shard":
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
        else:
            (d / "manifest.json").write_bytes(os.urandom(3000))
    return {p.name: p for p in root.iterdir()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["random.csv", "binary.csv.gz", "binary_after_header.csv.gz", "truncated.csv.gz", "empty.csv"])
def test_garbage_inputs_to_convert_and_schema_infer_are_clean_errors(tmp_path, garbage, name):
    p = ctrflow("convert", str(garbage[name]), "--schema", "synthetic", "--out", str(tmp_path / "s"), "--json")
    assert_clean_error(p, json_mode=True, what=f"convert {name}")
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob("s.partial-*"))
    p = ctrflow("schema", "infer", str(garbage[name]), "--label", "click", "--json")
    assert_clean_error(p, json_mode=True, what=f"schema infer {name}")


@pytest.mark.slow
def test_damaged_shard_folders_for_verify_and_read(garbage):
    for kind in ("random_shard", "truncated_shard"):
        p = ctrflow("verify", str(garbage[kind]), "--json")
        assert "Traceback" not in p.stderr.decode() and p.returncode == 1, p.stderr.decode()
        r = json.loads(p.stdout.decode().splitlines()[-1])
        assert not r["ok"] and r["damaged"]
        assert_clean_error(ctrflow("read", str(garbage[kind]), "--json"), json_mode=True, what=f"read {kind}")
    for cmd in ("verify", "read"):
        assert_clean_error(ctrflow(cmd, str(garbage["random_manifest"]), "--json"), json_mode=True, what=f"{cmd} manifest")
    p = ctrflow("read", "-", "--json", input=os.urandom(100_000))
    assert_clean_error(p, json_mode=True, what="read - of random bytes")
    p = ctrflow("read", "-", "--json", input=(sorted(garbage["good"].glob("*.ctrs"))[0].read_bytes()[:5000]))
    assert_clean_error(p, json_mode=True, what="read - of a truncated stream")


# --- every command on bad input ------------------------------------------------------------------------
def _leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(prefix, parser)]
    out = []
    for name, p in subs[0].choices.items():
        out += _leaf_commands(p, prefix + (name,))
    return out


def _bad_args(parser: argparse.ArgumentParser, garbage_file: Path) -> list[str]:
    """Every required argument filled: a garbage file for paths/strings, a valid number for numbers."""
    args: list[str] = []
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction,)) or not (a.required or not a.option_strings):
            continue
        if a.nargs == argparse.REMAINDER:
            value = ["--", "train", "--data", str(garbage_file), "--out", str(garbage_file.parent / "run")]
        elif a.choices:
            value = [str(next(iter(a.choices)))]
        elif a.type in (int, float):
            value = ["1"]
        else:
            value = [str(garbage_file)]
        args += ([a.option_strings[0]] if a.option_strings else []) + value
    return args


EXTRA_BAD = {  # commands whose required arguments alone are not "bad input" enough
    ("generate",): ["--rows", "0"],  # its required arguments are all valid values otherwise
    # A model base path that does not exist yet is served as "no version yet" (TF Serving's behaviour),
    # so serve's bad input is a garbage model config.
    ("serve",): ["--model-config", "{g}", "--port", "0"],
    ("bench", "serve"): ["--model-base-path", "{g}", "--duration-s", "1", "--target", "inprocess"],
}


def _all_commands() -> list[tuple[str, ...]]:
    from ctrflow.cli import build_parser  # no TensorFlow import: cheap at collection

    return [path for path, _ in _leaf_commands(build_parser())]


def test_the_command_list_is_complete():
    names = {" ".join(p) for p in _all_commands()}
    assert {"schema show", "schema infer", "generate", "convert", "verify", "read", "train", "evaluate", "export",
            "serve", "bench serve"} <= names, names


@pytest.mark.slow
@pytest.mark.parametrize("command", _all_commands(), ids=" ".join)
def test_every_cli_command_answers_bad_input_with_one_error_line(tmp_path, command):
    from ctrflow.cli import build_parser

    g = tmp_path / "garbage.bin"
    g.write_bytes(os.urandom(4096))
    parser = dict(_leaf_commands(build_parser()))[command]
    assert any(a.option_strings == ["--json"] for a in parser._actions), f"{' '.join(command)} has no --json flag"
    args = [*command, *_bad_args(parser, g), *[x.format(g=g) for x in EXTRA_BAD.get(command, [])]]
    p = ctrflow(*args, "--json", timeout=150)
    assert_clean_error(p, json_mode=True, what="ctrflow " + " ".join(args))


def test_bad_arguments_answer_like_bad_input():
    assert_clean_error(ctrflow("convert", "--json"), json_mode=True, what="missing arguments")
    assert_clean_error(ctrflow("read", "x", "--batch-size", "many"), json_mode=False, what="a word for a number")
