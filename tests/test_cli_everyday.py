"""The command line as a new user meets it: typos, wrong key types, empty
flag tables, a chart without matplotlib, orphaned temporary tables, and
``shmreg watch`` staying quiet about workers another hook already reaped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import shmreg
from _helpers import spawn_py, unique_name, wait_until

pytestmark = pytest.mark.timeout(120)


def cli(*args: str, env: dict | None = None, cwd: str | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    full.pop("SHMREG_CRASH_AT", None)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "shmreg", *args], capture_output=True, text=True,
                          timeout=timeout, env=full, cwd=cwd)


def test_mistyped_table_name_suggests_the_close_ones(tmp_path, monkeypatch):
    # A directory of our own: other tests' tables must not be suggested too.
    monkeypatch.setenv("SHMREG_DIR", str(tmp_path))
    with shmreg.Table.create("orders", capacity=100, memory=1 << 16), \
            shmreg.Table.create("orders-archive", capacity=100, memory=1 << 16):
        for cmd in (["stat", "ordres"], ["get", "ordres", "k"], ["dump", "ordres"], ["destroy", "ordres"]):
            r = cli(*cmd)
            assert r.returncode == 1 and "Traceback" not in r.stderr
            assert r.stderr.strip() == "shmreg: no table named 'ordres' (did you mean 'orders'?)"
        r = cli("stat", "order")
        assert r.stderr.strip() == "shmreg: no table named 'order' (did you mean 'orders'?)"
        r = cli("stat", "orders-archiv")
        assert r.stderr.strip() == ("shmreg: no table named 'orders-archiv' (did you mean "
                                    "'orders-archive' or 'orders'?)")
        r = cli("stat", "zzzz-nothing-like-it")
        assert r.stderr.strip() == "shmreg: no table named 'zzzz-nothing-like-it'"
        assert sorted(shmreg.list_tables()) == ["orders", "orders-archive"]
        shmreg.unlink("orders")
        shmreg.unlink("orders-archive")


def test_a_subcommands_bad_option_prints_that_subcommands_usage(table):
    for cmd, usage in ((["get", table.name, "k", "--bogus"], "usage: shmreg get"),
                       (["ls", "--nope"], "usage: shmreg ls"),
                       (["flag", table.name, "a", "on", "extra"], "usage: shmreg flag")):
        r = cli(*cmd)
        assert r.returncode == 2, r
        assert r.stderr.startswith(usage), r.stderr
        assert "unrecognized arguments" in r.stderr


def test_get_and_del_of_a_missing_str_key_hint_at_the_key_type(table):
    table[7] = "seven"
    table[b"raw"] = "bytes"
    r = cli("get", table.name, "7")
    assert r.returncode == 1
    assert r.stderr.strip() == (f"shmreg: no key '7' in table {table.name!r} "
                                "(an int key 7 exists: add --int-key)")
    assert cli("get", table.name, "--int-key", "7").stdout == "seven\n"
    r = cli("del", table.name, "raw")
    assert "a bytes key b'raw' exists: add --bytes-key with 726177" in r.stderr
    assert table[b"raw"] == "bytes" and table[7] == "seven"   # nothing deleted
    r = cli("get", table.name, "8")
    assert r.stderr.strip() == f"shmreg: no key '8' in table {table.name!r}"


def test_flag_on_a_table_without_flags_says_so(table):
    r = cli("flag", table.name)
    assert r.returncode == 0 and r.stdout == ""
    assert f"no flags in table {table.name!r} (no key starts with 'flag:'" in r.stderr
    assert cli("flag", table.name, "new-ui", "on").returncode == 0
    assert cli("flag", table.name).stdout == "new-ui  on\n"


def test_bench_chart_without_matplotlib_fails_at_once_with_a_working_hint(tmp_path):
    # A matplotlib that cannot be imported, as on a machine without it.
    fake = tmp_path / "nompl" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    r = cli("bench", "--quick", "--chart", str(tmp_path / "c.png"), env={"PYTHONPATH": str(fake.parent)},
            cwd=str(elsewhere))
    assert r.returncode == 1, r
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1   # no benchmark ran (no progress)
    line = r.stderr.strip()
    assert line.startswith("shmreg: --chart needs matplotlib, which is not installed: pip install ")
    assert line.endswith("(or: pip install matplotlib)")
    assert not (tmp_path / "c.png").exists()
    # The hint names where this shmreg came from: a checkout's path (not on
    # any index) with its pyproject.toml there, or the index's 'shmreg[plot]'.
    from importlib.metadata import distribution

    target = line.split("pip install ", 1)[1].split(" (or:")[0]
    if "dir_info" in (distribution("shmreg").read_text("direct_url.json") or ""):
        path = target.removeprefix("-e ").strip("'").removesuffix("[plot]")
        assert os.path.isfile(os.path.join(elsewhere, path, "pyproject.toml")), target
    else:
        assert target == "'shmreg[plot]'"


def test_ls_marks_orphaned_temporary_tables_and_clean_removes_them():
    child = spawn_py("""
        import shmreg, sys, time
        with shmreg.temporary("batch", capacity=100, memory=1 << 16) as t:
            print(t.name, flush=True)
            time.sleep(60)
    """)
    try:
        name = child.stdout.readline().strip()
        assert name.startswith(f"tmp-{child.pid}-") and name.endswith("-batch")
        with shmreg.temporary("alive", capacity=100, memory=1 << 16) as mine:
            r = cli("ls")
            line = next(x for x in r.stdout.splitlines() if x.startswith(name))
            assert "creator is gone" not in line      # its creator is alive
            child.kill()
            child.wait(timeout=10)
            r = cli("ls")
            line = next(x for x in r.stdout.splitlines() if x.startswith(name))
            assert line.endswith("orphan: its creator is gone (shmreg clean)")
            mine_line = next(x for x in r.stdout.splitlines() if x.startswith(mine.name))
            assert "creator is gone" not in mine_line
            assert cli("clean", "--dry-run").stdout == f"would remove {name!r}\n"
            assert name in shmreg.list_tables()
            r = cli("clean")
            assert r.returncode == 0 and r.stdout == f"removed {name!r}\n"
            assert name not in shmreg.list_tables() and mine.name in shmreg.list_tables()
            assert cli("clean").stdout == "no orphaned temporary tables\n"
        assert mine.name not in shmreg.list_tables()   # the block unlinked it
    finally:
        child.kill()
        child.communicate(timeout=10)   # reaps it and closes its pipes
        for n in shmreg.list_tables():
            if n.startswith(f"tmp-{child.pid}-"):
                shmreg.unlink(n)


def test_watch_reports_deaths_not_workers_already_reaped(table):
    watch = subprocess.Popen([sys.executable, "-m", "shmreg", "watch", table.name, "--interval", "0.2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: table.stats()["watcher_pid"] == watch.pid, 20, "the watcher to be active")
        # A worker that deletes what it owns before exiting (gunicorn's
        # worker_exit), and one that dies owning an entry.
        tidy = spawn_py("""
            import shmreg, sys
            t = shmreg.Table.open(sys.argv[1])
            t.set("tidy", 1, owned=True)
            t.reap(__import__("os").getpid(), force=True)
            print("done", flush=True)
            sys.stdin.read() if False else None
        """, table.name)
        assert tidy.communicate(timeout=30)[0].strip() == "done"
        crash = spawn_py("""
            import os, shmreg, signal, sys
            t = shmreg.Table.open(sys.argv[1])
            t.set("crash", 2, owned=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """, table.name)
        crash.communicate(timeout=30)
        wait_until(lambda: table._proc_table() == [], 20, "both slots reaped and released")
        watch.send_signal(signal.SIGTERM)
        out, err = watch.communicate(timeout=20)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(timeout=10)
    assert watch.returncode == 0, err
    assert f"pid {crash.pid} died owning 1 entries\n  'crash': 2\n" in out
    assert f"pid {tidy.pid}" not in out, out
    assert "owning 0 entries" not in out
