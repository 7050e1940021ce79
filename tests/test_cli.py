"""The command line, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import shmreg


def shmreg_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmreg", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_demo_passes():
    r = shmreg_cli("demo", "--workers", "3", "--seconds", "0.5")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "demo passed" in r.stdout
    assert "FAIL" not in r.stdout
    assert "died by SIGKILL" in r.stdout
    # The demo cleans up its table.
    assert not [n for n in shmreg.list_tables() if n.startswith("demo-")]


def test_stat_text_and_json(table):
    table["a"] = b"x" * 100
    table.update_counter("c")
    r = shmreg_cli("stat", table.name)
    assert r.returncode == 0, r.stderr
    assert "entries" in r.stdout and "capacity" in r.stdout
    r = shmreg_cli("stat", table.name, "--json")
    data = json.loads(r.stdout)
    assert data["entries"] == 2
    assert data["capacity"] == 10_000
    assert data["name"] == table.name


def test_stat_missing_table_is_one_line_error():
    r = shmreg_cli("stat", "no-such-table-here")
    assert r.returncode == 1
    assert r.stderr.strip() == "shmreg: no table named 'no-such-table-here'"
    assert "no-such-table-here" not in shmreg.list_tables()


def test_bad_name_and_help():
    r = shmreg_cli("stat", "../etc")
    assert r.returncode == 1 and "invalid table name" in r.stderr
    assert "Traceback" not in r.stderr
    for args in (["--help"], ["demo", "--help"], ["stat", "--help"]):
        r = shmreg_cli(*args)
        assert r.returncode == 0 and "usage: shmreg" in r.stdout
    assert shmreg_cli().returncode == 2
