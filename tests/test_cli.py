"""The command line, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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


COMMANDS = ("ls", "stat", "dump", "get", "set", "del", "watch", "reap", "check", "top",
            "destroy", "demo", "bench")


def test_every_command_has_help_with_exit_codes(capsys):
    from shmreg.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    for cmd in COMMANDS:
        assert f"    {cmd} " in top or f"    {cmd}\n" in top, cmd
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: shmreg {cmd}"), out
        assert "exit codes: 0 ok, 1 error" in out and "4 destroy refused" in out


def test_unknown_command_and_missing_arguments_are_usage_errors():
    for args in (["nosuch"], ["get"], ["get", "t"], ["set", "t", "k"], ["dump"], ["reap", "t", "x"]):
        r = shmreg_cli(*args)
        assert r.returncode == 2 and "usage: shmreg" in r.stderr, args


def test_json_encoding_of_values():
    import base64
    from shmreg.cli import to_json

    assert to_json("s") == "s" and to_json(3) == 3 and to_json(None) is None and to_json(True) is True
    assert to_json(2.5) == 2.5 and to_json(float("-inf")) == {"float": "-inf"}
    assert to_json(b"\x00\xff") == {"bytes_b64": base64.b64encode(b"\x00\xff").decode()}
    assert to_json([1, {"a": b"x"}]) == [1, {"a": {"bytes_b64": "eA=="}}]
    assert to_json({1: 2}) == {"repr": "{1: 2}", "type": "dict"}
    assert to_json((1,)) == {"repr": "(1,)", "type": "tuple"}
    assert to_json(shmreg.Registration(5, "v"))["type"] == "shmreg._core.Registration"
    json.dumps(to_json([float("nan"), {1, 2}, b"", {"k": (1,)}]), allow_nan=False)
