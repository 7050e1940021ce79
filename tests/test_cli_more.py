"""The rest of the command line (ls, stat --prometheus, dump, get/set/del,
reap, check, top, destroy, bench), each run as a real ``python -m shmreg``
subprocess against real tables and real owner / watcher processes."""

from __future__ import annotations

import base64
import json
import math
import mmap
import os
import queue
import re
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest

import shmreg
from shmreg import _core, _segment, metrics
from _helpers import run_py, spawn_py

HELP_COMMANDS = ("ls", "stat", "dump", "get", "set", "del", "watch", "reap", "check", "top",
                 "destroy", "demo", "bench")

REQUIRED_METRICS = {
    "shmreg_entries": "gauge", "shmreg_bytes_used": "gauge", "shmreg_bytes_free": "gauge",
    "shmreg_capacity": "gauge", "shmreg_sets_total": "counter", "shmreg_deletes_total": "counter",
    "shmreg_evictions_total": "counter", "shmreg_expirations_total": "counter",
    "shmreg_reads_hit_total": "counter", "shmreg_reads_missed_total": "counter",
    "shmreg_repairs_total": "counter", "shmreg_owner_processes": "gauge",
    "shmreg_watcher_active": "gauge",
}
SAMPLE_RE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)\{table="((?:[^"\\]|\\.)*)"\} (\S+)\Z')

# Owner child: claims a slot with an owned entry, reports, then waits on stdin.
OWNER = r"""
import sys, shmreg
t = shmreg.Table.open(sys.argv[1])
for i in range(int(sys.argv[2])):
    t.set(f"{sys.argv[3]}:{i}", i, owned=True)
print("ready", flush=True)
sys.stdin.readline()
"""

# Writer child: an owned entry, then update_counter in a loop until killed.
WRITER = r"""
import sys, shmreg
t = shmreg.Table.open(sys.argv[1])
t.set("writer", "busy", owned=True)
t.update_counter("n")
print("ready", flush=True)
while True:
    t.update_counter("n")
    t.get("n"); t.get("absent")
"""


def cli_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.pop("SHMREG_CRASH_AT", None)
    if extra:
        env.update(extra)
    return env


def shmreg_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmreg", *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(env))


def shmreg_many(commands: list, env: dict | None = None, timeout: float = 60) -> list:
    """Run several CLI commands concurrently; results in order."""
    procs = [subprocess.Popen([sys.executable, "-m", "shmreg", *c], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=cli_env(env)) for c in commands]
    out = []
    try:
        for c, p in zip(commands, procs):
            o, e = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(c, p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    return out


def one_line_error(r: subprocess.CompletedProcess, code: int = 1) -> str:
    assert r.returncode == code, (r.args, r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shmreg: "), (r.args, r.stderr)
    return lines[0]


def wait_ready(p: subprocess.Popen, word: str = "ready", timeout: float = 30) -> None:
    """Read ``p``'s stdout (in a thread) until a line contains ``word``."""
    if not hasattr(p, "lines_q"):
        p.lines_q = queue.Queue()

        def pump():
            for line in p.stdout:
                p.lines_q.put(line)
            p.lines_q.put(None)
        p.pump = threading.Thread(target=pump, daemon=True)
        p.pump.start()
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        try:
            line = p.lines_q.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no {word!r} within {timeout}s; got {seen}") from None
        if line is None:
            raise AssertionError(f"exited ({p.wait(10)}) before {word!r}; got {seen}")
        seen.append(line)
        if word in line:
            return


def finish(p: subprocess.Popen, kill: bool = True) -> None:
    if p.poll() is None:
        if kill:
            p.kill()
        p.wait(10)
    if hasattr(p, "pump"):
        p.pump.join(10)  # it reads stdout until EOF
    for f in (p.stdin, p.stdout, p.stderr):
        if f:
            f.close()


def spawn_owner(name: str, n: int = 1, tag: str = "owned") -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", OWNER, name, str(n), tag], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    wait_ready(p)
    return p


def parse_prometheus(text: str) -> dict:
    """Check the exposition format line by line; return {(metric, table): value}
    and the declared types."""
    assert text.endswith("\n")
    types, helps, samples = {}, set(), {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in helps, f"HELP twice for {name}"
            helps.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("gauge", "counter") and name not in types
            types[name] = kind
        else:
            m = SAMPLE_RE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, table, value = m.groups()
            assert name in types and name in helps, f"sample before HELP/TYPE: {line!r}"
            if types[name] == "counter":
                assert name.endswith("_total")
            samples[(name, table)] = float(value)
    return {"types": types, "samples": samples}


# -- ls ------------------------------------------------------------------------------------

def test_ls_text_json_prometheus_in_a_private_dir(tmp_path, monkeypatch):
    """A private segment directory holds exactly what the test made: two
    tables (one with an owned entry of this live process and an active
    watcher) and a file that is not a table."""
    monkeypatch.setenv("SHMREG_DIR", str(tmp_path))
    env = {"SHMREG_DIR": str(tmp_path)}
    r = shmreg_cli("ls", "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout) == []
    a = shmreg.Table.create("ls-a", capacity=100, memory=1 << 16)
    b = shmreg.Table.create("ls-b", capacity=1000, memory=1 << 18)
    (tmp_path / "shmreg.junk").write_bytes(b"not a table" * 100)
    w = shmreg.Watcher(b, on_death=None, interval=0.2).start()
    try:
        assert w.wait_active(10)
        for i in range(25):
            a[f"k{i}"] = i
        b.set("mine", "x", owned=True)
        text, js, prom = shmreg_many([["ls"], ["ls", "--json"], ["ls", "--prometheus"]], env=env)
        assert text.returncode == 0, text.stderr
        lines = text.stdout.splitlines()
        assert lines[0].split() == ["NAME", "ENTRIES", "CAPACITY", "LOAD", "SIZE", "USED",
                                    "OWNERS", "WATCHER"]
        row_a = next(line.split() for line in lines if line.startswith("ls-a "))
        assert row_a[1:4] == ["25", "100", "25.0%"] and row_a[-1] == "-"
        row_b = next(line.split() for line in lines if line.startswith("ls-b "))
        assert row_b[1] == "1" and row_b[-2] == "1" and row_b[-1] == str(os.getpid())
        assert any(line.startswith("junk ") and "IncompatibleTableError" in line for line in lines)

        assert js.returncode == 0, js.stderr
        rows = {row["name"]: row for row in json.loads(js.stdout)}
        assert set(rows) == {"ls-a", "ls-b", "junk"}
        assert rows["ls-a"]["entries"] == 25 and rows["ls-a"]["load_factor"] == 0.25
        assert rows["ls-a"]["owner_processes"] == 0 and rows["ls-a"]["watcher_pid"] is None
        assert rows["ls-a"]["segment_bytes"] == os.stat(tmp_path / "shmreg.ls-a").st_blocks * 512
        assert rows["ls-b"]["owner_pids"] == [os.getpid()]
        assert rows["ls-b"]["watcher_pid"] == os.getpid() and rows["ls-b"]["watcher_active"]
        assert "error" in rows["junk"] and "entries" not in rows["junk"]

        assert prom.returncode == 0, prom.stderr
        parsed = parse_prometheus(prom.stdout)
        assert parsed["samples"][("shmreg_entries", "ls-a")] == 25
        assert parsed["samples"][("shmreg_watcher_active", "ls-b")] == 1
        assert parsed["samples"][("shmreg_watcher_active", "ls-a")] == 0
        assert not any(t == "junk" for _, t in parsed["samples"])
    finally:
        w.stop()
        a.close()
        b.close()
    assert sorted(os.listdir(tmp_path)) == ["shmreg.junk", "shmreg.ls-a", "shmreg.ls-b"]


# -- stat --prometheus ------------------------------------------------------------------------

def test_stat_prometheus_matches_stats(table):
    for i in range(50):
        table[f"k{i}"] = b"v" * i
    for i in range(10):
        del table[f"k{i}"]
    for _ in range(3):
        for i in range(10, 50):
            table[f"k{i}"]          # 120 hits: 64 counted (sampled)
    for i in range(70):
        table.get(f"absent{i}")   # 70 misses: 64 counted
    r = shmreg_cli("stat", table.name, "--prometheus")
    assert r.returncode == 0, r.stderr
    parsed = parse_prometheus(r.stdout)
    assert parsed["types"].items() >= REQUIRED_METRICS.items()
    s = {name: v for (name, t), v in parsed["samples"].items() if t == table.name}
    assert set(s) == set(parsed["types"])
    st = table.stats()
    assert s["shmreg_entries"] == 40 == st["entries"]
    assert s["shmreg_capacity"] == 10_000
    assert s["shmreg_sets_total"] == 50 and s["shmreg_deletes_total"] == 10
    assert s["shmreg_bytes_used"] == st["bytes_used"] and s["shmreg_bytes_free"] == st["bytes_free"]
    assert s["shmreg_reads_hit_total"] == 64 and s["shmreg_reads_missed_total"] == 64
    assert s["shmreg_owner_processes"] == 0 and s["shmreg_watcher_active"] == 0
    # --json and --prometheus together is a usage error.
    assert shmreg_cli("stat", table.name, "--json", "--prometheus").returncode == 2


def test_prometheus_text_of_several_tables(table, table_name):
    with shmreg.Table.create(table_name + "-2", capacity=100, memory=1 << 16) as t2:
        try:
            t2["x"] = 1
            parsed = parse_prometheus(metrics.prometheus_text([table, t2]))
        finally:
            t2.unlink()
    assert parsed["samples"][("shmreg_entries", table.name)] == 0
    assert parsed["samples"][("shmreg_entries", table_name + "-2")] == 1
    assert metrics.prometheus_text({"name": 'a"b\\', **{m[2]: 0 for m in metrics.METRICS}}
                                   ).splitlines()[2] == 'shmreg_entries{table="a\\"b\\\\"} 0'


# -- dump ---------------------------------------------------------------------------------------

def test_dump_text_and_json(table):
    table["user:1"] = {"name": "ann", "tags": ["a"]}
    table["user:2"] = "bob"
    table.set("session", b"\x00\xffraw", ttl=100)
    table[7] = (1, 2)
    table[b"\x01bin"] = float("inf")
    table["mine"] = "x"
    table.set("mine", "owned by the test process", owned=True)
    text, js, pre, own, lim, bpre = shmreg_many([
        ["dump", table.name], ["dump", table.name, "--json"],
        ["dump", table.name, "--prefix", "user:", "--json"],
        ["dump", table.name, "--owner", str(os.getpid()), "--json"],
        ["dump", table.name, "--limit", "2"],
        ["dump", table.name, "--bytes-prefix", "01", "--json"]])
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines() == [
        "7: (1, 2)",
        "'mine': 'owned by the test process'  (owner %d)" % os.getpid(),
        text.stdout.splitlines()[2],
        "'user:1': {'name': 'ann', 'tags': ['a']}",
        "'user:2': 'bob'",
        "b'\\x01bin': inf",
    ]
    assert re.fullmatch(r"'session': b'\\x00\\xffraw'  \(ttl (\d+\.\d)s\)", text.stdout.splitlines()[2])
    ttl = float(re.search(r"ttl (\S+)s", text.stdout).group(1))
    assert 90 < ttl <= 100

    data = json.loads(js.stdout)
    assert data["total"] == 6 and not data["truncated"] and data["table"] == table.name
    by_key = {json.dumps(e["key"]): e for e in data["entries"]}
    assert by_key['"user:1"']["value"] == {"name": "ann", "tags": ["a"]}
    sess = by_key['"session"']
    assert base64.b64decode(sess["value"]["bytes_b64"]) == b"\x00\xffraw"
    assert 90 < sess["ttl"] <= 100 and sess["owner"] is None
    assert by_key["7"]["value"] == {"repr": "(1, 2)", "type": "tuple"}
    binkey = json.dumps({"bytes_b64": base64.b64encode(b"\x01bin").decode()})
    assert by_key[binkey]["value"] == {"float": "inf"}
    assert by_key['"mine"']["owner"] == os.getpid() and by_key['"mine"']["ttl"] is None

    assert [e["key"] for e in json.loads(pre.stdout)["entries"]] == ["user:1", "user:2"]
    assert [e["key"] for e in json.loads(own.stdout)["entries"]] == ["mine"]
    assert len(lim.stdout.splitlines()) == 2 and "4 more entries" in lim.stderr
    assert [e["value"] for e in json.loads(bpre.stdout)["entries"]] == [{"float": "inf"}]


def test_dump_owner_that_is_dead_shows_nothing(table):
    p = spawn_owner(table.name, 3)
    try:
        r = shmreg_cli("dump", table.name, "--owner", str(p.pid), "--json")
        assert [e["key"] for e in json.loads(r.stdout)["entries"]] == ["owned:0", "owned:1", "owned:2"]
        assert all(e["owner"] == p.pid for e in json.loads(r.stdout)["entries"])
    finally:
        finish(p)
    r, r2 = shmreg_many([["dump", table.name, "--owner", str(p.pid), "--json"], ["dump", table.name]])
    assert json.loads(r.stdout)["entries"] == [] and r2.stdout == ""


# -- get / set / del ----------------------------------------------------------------------------

def test_set_get_del_with_types(table):
    n = table.name
    results = shmreg_many([
        ["set", n, "s", "12"], ["set", n, "i", "12", "--int"], ["set", n, "f", "2.5", "--float"],
        ["set", n, "j", '{"a": [1, null, true]}', "--json"], ["set", n, "b", "00ff41", "--bytes"],
        ["set", n, "--int-key", "7", "seven"], ["set", n, "--bytes-key", "6b6579", "bytes key"],
        ["set", n, "t", "soon", "--ttl", "100"]])
    for r in results:
        assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (r.args, r.stderr)
    assert table["s"] == "12" and type(table["s"]) is str
    assert table["i"] == 12 and type(table["i"]) is int
    assert table["f"] == 2.5
    assert table["j"] == {"a": [1, None, True]}
    assert table["b"] == b"\x00\xffA"
    assert table[7] == "seven" and "7" not in table
    assert table[b"key"] == "bytes key"
    assert 90 < table.ttl("t") <= 100

    gs, gi, gb, gj, gk, gt, miss = shmreg_many([
        ["get", n, "s"], ["get", n, "i"], ["get", n, "b"], ["get", n, "j", "--json"],
        ["get", n, "--int-key", "7", "--json"], ["get", n, "t", "--json"], ["get", n, "7"]])
    assert gs.stdout == "12\n" and gi.stdout == "12\n" and gb.stdout == "b'\\x00\\xffA'\n"
    assert json.loads(gj.stdout) == {"key": "j", "value": {"a": [1, None, True]}, "ttl": None,
                                     "owner": None}
    assert json.loads(gk.stdout)["key"] == 7 and json.loads(gk.stdout)["value"] == "seven"
    assert 90 < json.loads(gt.stdout)["ttl"] <= 100
    assert one_line_error(miss) == (f"shmreg: no key '7' in table {n!r} (an int key 7 exists: "
                                    "add --int-key)") and miss.stdout == ""

    d1 = shmreg_cli("del", n, "s")
    d2, bad_int, bad_hex, bad_ttl, bad_json, two_types = shmreg_many([
        ["del", n, "s"], ["set", n, "x", "zz", "--int"],
        ["set", n, "--bytes-key", "xyz", "v"], ["set", n, "x", "v", "--ttl", "-1"],
        ["set", n, "x", "{", "--json"], ["set", n, "x", "1", "--int", "--float"]])
    assert d1.returncode == 0 and "s" not in table
    assert one_line_error(d2) == f"shmreg: no key 's' in table {n!r}"
    for r in (bad_int, bad_hex, bad_ttl, bad_json, two_types):
        assert r.returncode == 2 and "usage: shmreg set" in r.stderr and "Traceback" not in r.stderr
    assert "x" not in table


# -- reap -----------------------------------------------------------------------------------------

def test_reap_by_pid_and_all_dead(table):
    a, b = spawn_owner(table.name, 3, "a"), spawn_owner(table.name, 2, "b")
    table.set("mine", 1, owned=True)
    live = shmreg_cli("reap", table.name, str(a.pid), "--json")
    assert json.loads(live.stdout) == {"table": table.name, "pid": a.pid, "alive": True, "reaped": 0}
    for p in (a, b):
        finish(p)
    assert table.stats()["owned"] == 6   # dead owners' entries are invisible, not yet freed
    r1, = shmreg_many([["reap", table.name, str(a.pid), "--json"]])
    assert json.loads(r1.stdout) == {"table": table.name, "pid": a.pid, "alive": False, "reaped": 3}
    again, alld = shmreg_many([["reap", table.name, str(a.pid)], ["reap", table.name, "--json"]])
    assert again.stdout == f"reaped 0 entries of pid {a.pid}\n"
    assert json.loads(alld.stdout) == {"table": table.name, "pid": None, "dead_processes": 1, "reaped": 2}
    assert table.stats()["owned"] == 1 and table["mine"] == 1
    me = shmreg_cli("reap", table.name, str(os.getpid()))
    assert "it is alive: nothing reaped" in me.stdout and table["mine"] == 1
    forced = shmreg_cli("reap", table.name, str(os.getpid()), "--force")
    assert forced.stdout == f"reaped 1 entries of pid {os.getpid()}\n" and "mine" not in table
    bad = shmreg_cli("reap", table.name, "notapid")
    assert bad.returncode == 2


# -- check ---------------------------------------------------------------------------------------

SHARDS_OFF = _core.LAYOUT["header.shards_off"][0]   # (engine/shm_layout.h)
SHARD_USED_OFFSET = _core.LAYOUT["shard.used"][0]


def test_check_ok_then_corrupt_exits_3(table_name):
    with shmreg.Table.create(table_name, capacity=64, memory=1 << 14, shards=1) as t:
        t["a"] = b"x" * 10
        t["b"] = "y"
    ok, okj = shmreg_many([["check", table_name], ["check", table_name, "--json"]])
    assert ok.returncode == 0 and ok.stdout.startswith(f"ok: table {table_name!r} passed")
    assert json.loads(okj.stdout) == {"table": table_name, "ok": True, "entries": 2, "shards": 1}
    with open(_segment.path_of(table_name), "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        (shards_off,) = struct.unpack_from("<Q", mm, SHARDS_OFF)
        struct.pack_into("<Q", mm, shards_off + SHARD_USED_OFFSET, 12345)
    bad, badj = shmreg_many([["check", table_name], ["check", table_name, "--json"]])
    line = one_line_error(bad, 3)
    assert line.startswith(f"shmreg: table {table_name!r} is corrupt: ") and "12345" in line
    assert bad.stdout == ""
    data = json.loads(badj.stdout)
    assert badj.returncode == 3 and data["ok"] is False and "12345" in data["error"]


# -- top ------------------------------------------------------------------------------------------

def test_top_renders_plain_frames_without_a_terminal(table):
    table["pre"] = 1
    w = spawn_py(WRITER, table.name)
    try:
        wait_ready(w)
        # Intervals long enough that the writer is sure to run in each one
        # on a loaded machine.
        two, once = shmreg_many([["top", table.name, "--frames", "2", "--interval", "0.6"],
                                 ["top", table.name, "--once", "--interval", "0.6"]])
    finally:
        finish(w)
    for r, n in ((two, 2), (once, 1)):
        assert r.returncode == 0, r.stderr
        assert "\x1b" not in r.stdout and r.stderr == ""
        frames = re.split(r"(?m)^(?=shmreg top - )", r.stdout)[1:]
        assert len(frames) == n, r.stdout
        for f in frames:
            assert f.startswith(f"shmreg top - table {table.name!r}")
            total = int(re.search(r"^ops/s +([\d,]+) total", f, re.M).group(1).replace(",", ""))
            assert total > 0, f          # the writer kept writing through every interval
            sets = int(re.search(r"sets ([\d,]+)", f).group(1).replace(",", ""))
            assert sets > 0
            assert re.search(r"^entries +3 of 10,000 ", f, re.M)
            assert f"owners     1 live: {w.pid}" in f
            assert "watcher    none" in f
            assert re.search(r"^hit ratio +\S+ now, [\d.]+% since creation", f, re.M)


def test_top_usage_errors(table):
    r1, r2, r3 = shmreg_many([["top", table.name, "--interval", "0"],
                              ["top", table.name, "--frames", "0"],
                              ["top", table.name, "--once", "--frames", "2"]])
    assert r1.returncode == r2.returncode == r3.returncode == 2


# -- destroy --------------------------------------------------------------------------------------

def test_destroy_refuses_while_in_use_then_force(table_name):
    shmreg.Table.create(table_name, capacity=100, memory=1 << 16).close()
    owner = spawn_owner(table_name, 2)
    watcher = None
    try:
        r = shmreg_cli("destroy", table_name)
        msg = one_line_error(r, 4)
        assert f"pid {owner.pid}" in msg and "--force" in msg
        assert table_name in shmreg.list_tables()
        finish(owner)                      # SIGKILL: a dead owner no longer counts
        watcher = subprocess.Popen([sys.executable, "-m", "shmreg", "watch", table_name,
                                    "--interval", "0.2"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=cli_env())
        wait_ready(watcher, "watching")
        wait_ready(watcher, "active")
        r = shmreg_cli("destroy", table_name, "--json")
        msg = one_line_error(r, 4)
        assert f"watcher pid {watcher.pid}" in msg and r.stdout == ""
        assert table_name in shmreg.list_tables()
        r = shmreg_cli("destroy", table_name, "--force", "--json")
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        assert data["destroyed"] == [table_name] and data["forced"] is True
        assert data["in_use_by"][table_name]["watcher_pid"] == watcher.pid
        assert table_name not in shmreg.list_tables()
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(10) == 0       # the watcher keeps its mapping and exits cleanly
    finally:
        finish(owner)
        if watcher is not None:
            finish(watcher)


def test_destroy_unused_table_and_cache_companion(table_name):
    """A Cache's flights table goes with it.  The process that ran the
    single flight has exited (while alive it holds a slot in the flights
    table, and destroy would refuse)."""
    try:
        run_py("""
            import sys, shmreg
            c = shmreg.Cache(sys.argv[1], capacity=100)
            assert c.get_or_set("k", lambda: 42) == 42
            c.close()
        """, table_name)
        assert {table_name, table_name + "--flights"} <= set(shmreg.list_tables())
        r = shmreg_cli("destroy", table_name)
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"destroyed {table_name!r}\ndestroyed {table_name + '--flights'!r}\n"
        assert not {table_name, table_name + "--flights"} & set(shmreg.list_tables())
    finally:
        if table_name + "--flights" in shmreg.list_tables():
            shmreg.unlink(table_name + "--flights")


# -- missing tables, bad names ----------------------------------------------------------------

def _name_commands(name: str) -> list:
    return [["stat", name], ["stat", name, "--prometheus"], ["dump", name], ["get", name, "k"],
            ["set", name, "k", "v"], ["del", name, "k"], ["reap", name], ["reap", name, "123"],
            ["check", name], ["top", name, "--once", "--interval", "0.05"], ["destroy", name],
            ["destroy", name, "--force"], ["watch", name]]


def test_missing_table_every_command_exits_1_and_creates_nothing(table_name):
    for r in shmreg_many(_name_commands(table_name)):
        # (plus " (did you mean ...?)" when tables with close names exist)
        assert one_line_error(r).startswith(f"shmreg: no table named {table_name!r}"), r.args
        assert r.stdout == "", r.args
    assert table_name not in shmreg.list_tables()
    assert not os.path.exists(_segment.path_of(table_name))


@pytest.mark.parametrize("name", ["../etc", "a/b", ".hidden", "x" * 201])
def test_bad_name_every_command_exits_1(name):
    before = set(shmreg.list_tables())
    for r in shmreg_many(_name_commands(name)):
        line = one_line_error(r)
        assert "table name" in line, (r.args, line)
    assert set(shmreg.list_tables()) <= before


# -- bench --------------------------------------------------------------------------------------

def _bench_tables() -> set:
    return {n for n in shmreg.list_tables() if n.startswith("bench-")}


def test_bench_quick_standard_peers_json_report_chart(tmp_path):
    before = _bench_tables()
    report, chart = tmp_path / "report.md", tmp_path / "chart.png"
    try:
        import matplotlib  # noqa: F401
        chart_args = ["--chart", str(chart)]
    except ImportError:   # bench --chart then refuses to run (test_cli_everyday)
        chart_args = []
    r = shmreg_cli("bench", "--quick", "--peers", "dict,shmreg,manager", "--json",
                   "--output", str(report), *chart_args, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert list(res["results"]) == ["dict", "shmreg", "manager"] and res["skipped"] == {}
    for peer, ops in res["results"].items():
        assert set(ops) == {"get-hit", "get-miss", "set", "update_counter"}
        assert all(v > 0 and math.isfinite(v) for v in ops.values()), (peer, ops)
    assert res["ratio_vs_dict"]["dict"] == {op: 1.0 for op in res["operations"]}
    assert res["quick"] and res["entries"] == 2000
    # progress on stderr, one line per step without a terminal
    steps = [line for line in r.stderr.splitlines() if line.startswith("[")]
    assert len(steps) == 16 and steps[-1].endswith("15/15 done")
    md = report.read_text()
    assert md.startswith("# shmreg benchmark")
    for peer in ("dict", "shmreg", "manager"):
        assert re.search(rf"^\| {peer} \| [\d,]+ \| [\d,]+ \| [\d,]+ \| [\d,]+ \|$", md, re.M), peer
    assert "## shmreg speed-up over each shared peer" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not chart.exists() and res["chart"] is None and res["chart_note"] is None
    else:
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and res["chart"] == str(chart)
        assert "![ops/s per peer and operation](chart.png)" in md
    assert _bench_tables() == before


def test_bench_quick_text_every_local_peer():
    r = shmreg_cli("bench", "--quick", "--no-servers", "--no-progress", timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0].startswith("shmreg bench (quick): 2,000 entries")
    rows = {line.split()[0]: line for line in lines[4:] if line and not line.startswith("skipped")}
    assert {"dict", "shmreg", "manager"} <= set(rows)
    assert re.search(r"\(1x\)", rows["dict"]) and rows["shmreg"].count("x)") == 4
    for mod, peer in (("lmdb", "lmdb"), ("diskcache", "diskcache"), ("UltraDict", "ultradict")):
        try:
            __import__(mod)
        except ImportError:
            assert f"skipped {peer}: " in r.stdout
        else:
            assert peer in rows
    assert "redis" not in r.stdout and "memcached" not in r.stdout


def test_bench_usage_errors():
    r1, r2 = shmreg_many([["bench", "--peers", "dict,nosuch"], ["bench", "--quick", "--ops", "0"]])
    assert r1.returncode == 2 and "unknown peer 'nosuch'" in r1.stderr
    assert r2.returncode == 2


def test_flag_command_flips_what_workers_read(table):
    from shmreg.recipes import Flags

    flags = Flags(table)
    assert not flags.enabled("new-ui")
    r = shmreg_cli("flag", table.name, "new-ui", "on")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["new-ui", "on"]
    assert flags.enabled("new-ui")            # seen on the next read
    r = shmreg_cli("flag", table.name, "--json")
    assert json.loads(r.stdout) == {"new-ui": True}
    assert shmreg_cli("flag", table.name, "new-ui", "off").returncode == 0
    assert not flags.enabled("new-ui")
    assert shmreg_cli("flag", table.name, "new-ui", "maybe").returncode == 2
    assert shmreg_cli("flag", table.name, "new-ui", "unset").returncode == 1  # gone: nothing to show
    assert json.loads(shmreg_cli("flag", table.name, "--json").stdout) == {}
    r = shmreg_cli("flag", "no-such-flags-table")
    assert r.returncode == 1 and "no-such-flags-table" not in shmreg.list_tables()
