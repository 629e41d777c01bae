"""The `ctrflow` command end to end in real subprocesses: --json summaries, exit codes, error lines."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, cli_in_process


def run(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctrflow", *args], capture_output=True, cwd=REPO, input=input, timeout=300)


def last_json(p: subprocess.CompletedProcess) -> dict:
    return json.loads(p.stdout.decode().strip().splitlines()[-1])


def test_generate_convert_verify_read_with_json(tmp_path):
    p = run("generate", "--rows", "20000", "--out", str(tmp_path / "g.csv"), "--seed", "3", "--json")
    assert p.returncode == 0, p.stderr.decode()
    g = last_json(p)
    assert g["rows"] == 20000 and 0.01 < g["mean_ctr"] < 0.06
    p = run("convert", str(tmp_path / "g.csv"), "--schema", "synthetic", "--out", str(tmp_path / "s"), "--json")
    assert p.returncode == 0, p.stderr.decode()
    c = last_json(p)
    assert c["rows"] == 20000 and c["rows_rejected"] == 0 and c["rows_per_s"] > 0
    v = last_json(run("verify", str(tmp_path / "s"), "--json"))
    assert v["ok"] and v["rows"] == 20000
    r = last_json(run("read", str(tmp_path / "s"), "--epochs", "2", "--json"))
    assert r["rows"] == 40000 and r["id_fields"] == 39 and r["numeric_fields"] == 13
    assert abs(r["ctr"] - g["mean_ctr"]) < 1e-9


def test_schema_show_and_infer(tmp_path):
    p = run("schema", "show", "criteo", "--json")
    assert p.returncode == 0 and "C26" in p.stdout.decode()
    assert last_json(p)["label"] == "label"
    (tmp_path / "x.csv").write_text("clicked,site,price\n0,a,1.5\n1,b,2\n")
    p = run("schema", "infer", str(tmp_path / "x.csv"), "--label", "clicked", "--out", str(tmp_path / "s.yaml"), "--json")
    assert p.returncode == 0 and (tmp_path / "s.yaml").exists()
    assert last_json(run("schema", "show", str(tmp_path / "s.yaml"), "--json"))["numeric"][0]["name"] == "price"


def test_errors_are_one_line_with_exit_2_and_a_json_error(tmp_path):
    p = run("schema", "show", "kriteo", "--json")
    assert p.returncode == 2 and p.stderr.decode().startswith("error: Unknown schema 'kriteo'")
    assert "Traceback" not in p.stderr.decode() and "error" in last_json(p)
    (tmp_path / "e.tsv").write_text("")
    p = run("convert", str(tmp_path / "e.tsv"), "--schema", "criteo", "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "empty file" in p.stderr.decode()


def test_verify_exit_code_1_names_the_damaged_shard(tmp_path):
    (tmp_path / "x.csv").write_text("clicked,site\n" + "".join(f"{i % 2},s{i % 7}\n" for i in range(500)))
    # The conversion in this process (a `ctrflow convert` process is the first test's): the command under test is verify.
    assert cli_in_process("convert", tmp_path / "x.csv", "--label", "clicked", "--out", tmp_path / "s").returncode == 0
    shard = next((tmp_path / "s").glob("part-*.ctrs"))
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF
    shard.write_bytes(raw)
    p = run("verify", str(tmp_path / "s"))
    assert p.returncode == 1 and shard.name in p.stdout.decode() and "checksum mismatch" in p.stdout.decode()
