"""The Watcher: reaps the entries of dead owner processes as they die, one
active watcher per table with standbys taking over, and ``shmreg watch``.

Owners and watchers are real processes killed with real SIGKILLs; every
wait is a poll with a deadline (the deadlines bound the test, they are not
what it measures).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import shmreg
from _helpers import wait_until
from shmreg import Watcher

# How long another process may take to notice a death, reap or take over:
# a bound, not a measurement (it costs nothing when things are quick, and a
# loaded CI machine running Python 3.9 is not).
REACT = 30


class Child:
    """A child process with pipes, its stdout read line by line without threads."""

    def __init__(self, argv: list[str]) -> None:
        env = dict(os.environ)
        env.pop("SHMREG_CRASH_AT", None)
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, bufsize=0, env=env)
        self.pid = self.p.pid
        self._buf = b""
        self.lines: list[str] = []     # every line so far (never consumed)
        self._eof = False

    def pump(self, timeout: float = 0) -> None:
        if self._eof:
            time.sleep(min(timeout, 0.01))
            return
        r, _, _ = select.select([self.p.stdout], [], [], max(timeout, 0))
        if not r:
            return
        data = os.read(self.p.stdout.fileno(), 1 << 16)
        if not data:
            self._eof = True
            return
        self._buf += data
        *done, self._buf = self._buf.split(b"\n")
        self.lines.extend(x.decode() for x in done)

    def wait_line(self, prefix: str, timeout: float = 30, start: int = 0) -> int:
        """Index of the first line at or after ``start`` beginning with ``prefix``."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(start, len(self.lines)):
                if self.lines[i].startswith(prefix):
                    return i
            left = deadline - time.monotonic()
            if left <= 0 or self._eof:
                self.kill()
                err = self.p.stderr.read().decode(errors="replace")
                raise AssertionError(f"pid {self.pid}: no line {prefix!r} "
                                     f"(rc={self.p.returncode}); stdout={self.lines!r}\n{err}")
            self.pump(min(left, 0.2))

    def kill(self) -> None:
        if self.p.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.p.wait(timeout=30)

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        """Wait for exit; return (rc, stderr); the rest of stdout joins ``lines``."""
        out, err = self.p.communicate(timeout=timeout)
        data = self._buf + out
        self._buf = b""
        self.lines.extend(x.decode() for x in data.split(b"\n") if x)
        return self.p.returncode, err.decode(errors="replace")


@pytest.fixture
def spawn():
    children: list[Child] = []

    def start(argv: list[str]) -> Child:
        c = Child(argv)
        children.append(c)
        return c

    yield start
    for c in children:
        c.kill()
        for f in (c.p.stdin, c.p.stdout, c.p.stderr):
            try:
                f.close()
            except OSError:
                pass




OWNER = """
import json, sys, shmreg
t = shmreg.Table.open(sys.argv[1])
for k, v in json.loads(sys.argv[2]).items():
    t.set(k, v, owned=True)
t.set("plain:" + sys.argv[1], "unowned")
print("ready", flush=True)
sys.stdin.read()
"""


def owner(spawn, name: str, entries: dict) -> Child:
    c = spawn([sys.executable, "-c", textwrap.dedent(OWNER), name, json.dumps(entries)])
    c.wait_line("ready")
    return c


def watch_cli(spawn, name: str, *extra: str) -> Child:
    return spawn([sys.executable, "-m", "shmreg", "watch", name, *extra])


def test_watcher_reaps_killed_owner_with_post_mortem(table, spawn):
    seen = []

    def on_death(pid, entries):
        # Called before the delete: the entries are still in memory.
        seen.append((pid, sorted(entries), table.stats()["owned"]))

    w = Watcher(table.name, on_death=on_death, interval=0.2)
    w.start()
    try:
        assert w.wait_active(10)
        assert table.stats()["watcher_pid"] == os.getpid()
        victim_entries = {f"job:{i}": {"n": i, "blob": "x" * i} for i in range(6)}
        victim = owner(spawn, table.name, victim_entries)
        bystander = owner(spawn, table.name, {"other": 1})
        assert table.stats()["owned"] == 7
        os.kill(victim.pid, signal.SIGKILL)
        victim.p.wait(timeout=10)
        wait_until(lambda: seen, REACT, "on_death")
        wait_until(lambda: table.stats()["owned"] == 1, REACT, "the entries to be reaped")
        wait_until(lambda: all(p["pid"] != victim.pid for p in table._proc_table()), REACT,
                   "the dead slot to be freed")
        assert seen == [(victim.pid, sorted(victim_entries.items()), 7)]
        assert w.reaped_processes == 1 and w.reaped_entries == 6
        assert table["other"] == 1 and table.owner("other") == bystander.pid
        assert table["plain:" + table.name] == "unowned"
        assert table.reap(victim.pid) == 0       # already done
        table.check()
    finally:
        w.stop()
    assert not w.active and table.stats()["watcher_pid"] is None


def test_on_death_exception_does_not_stop_reaping(table, spawn):
    calls = []

    def on_death(pid, entries):
        calls.append(pid)
        raise RuntimeError("callback bug")

    with Watcher(table, on_death=on_death, interval=0.2) as w:
        assert w.wait_active(10)
        c1 = owner(spawn, table.name, {"a": 1})
        c1.kill()
        wait_until(lambda: table.stats()["owned"] == 0, REACT, "the first reap")
        c2 = owner(spawn, table.name, {"b": 2})
        c2.kill()
        wait_until(lambda: table.stats()["owned"] == 0 and len(calls) == 2, REACT, "the second reap")
        assert calls == [c1.pid, c2.pid]
        assert w.active


def test_sweep_leaves_a_dead_owner_still_in_the_process_table_to_on_death(table):
    """The sweep reaps what it read as dead with on_death, then the leftovers
    of recycled slots.  An owner dying between the two must not be taken by
    the second step (a CI run lost an on_death that way, on Redis): only
    owners that lost their process slot are leftovers."""
    from shmreg import _proc

    me = os.getpid()
    start = _proc.start_time(me)
    dead = table._claim(me, start + 1, False)      # an incarnation that is not us: dead
    assert table._insert_new_for("job", "running", dead)
    assert not table._owner_alive(dead)
    assert table._reap(0, True, False)[0] == 1     # what _reap(0) would take (collect only)
    assert table._reap_stale() == 0                # still in the process table: not a leftover
    assert table.stats()["owned"] == 1
    seen = []
    w = Watcher(table, on_death=lambda pid, entries: seen.append((pid, entries)))
    assert w.sweep() == 1
    assert seen == [(me, [("job", "running")])]
    assert table.stats()["owned"] == 0
    # A slot freed without a reap (its entries left over) is stale.
    gone = table._claim(me, start + 2, False)
    assert table._insert_new_for("left", 1, gone)
    assert table._release(gone)
    assert table.stats()["owned"] == 1
    assert table._reap_stale() == 1
    assert table.stats()["owned"] == 0 and "left" not in table
    table.check()


def test_sweep_purges_expired_entries(table):
    table.set("short", 1, ttl=0.3)
    table.set("long", 2, ttl=120)
    table["keep"] = 3
    wait_until(lambda: table.get("short") is None, 10, "the ttl to expire")
    assert table.stats()["with_ttl"] == 2          # expired, but nobody purged it yet
    with Watcher(table.name, interval=0.1) as w:
        assert w.wait_active(10)
        wait_until(lambda: table.stats()["with_ttl"] == 1, REACT, "the sweep to purge")
    assert table["long"] == 2 and table["keep"] == 3
    assert table.stats()["entries"] == 2
    table.check()


def test_stop_releases_the_lease(table_name, spawn):
    t = shmreg.Table.create(table_name, capacity=1000, memory=1 << 20)
    w1 = Watcher(table_name, interval=0.2).start()
    assert w1.wait_active(10)                   # before w2 starts: w1 wins the lease
    w2 = Watcher(table_name, interval=0.2).start()
    try:
        assert not w2.wait_active(0.5)           # one active per table, even in one process
        assert t.stats()["watcher_pid"] == os.getpid()
        w1.stop()
        assert not w1.active
        assert w2.wait_active(REACT)
        # Another process can take over once w2 stops too.
        cli = watch_cli(spawn, table_name, "--interval", "0.2")
        cli.wait_line("watching")
        assert t.stats()["watcher_pid"] == os.getpid()
        w2.stop()
        cli.wait_line("active", timeout=REACT)
        assert t.stats()["watcher_pid"] == cli.pid
        # ... and the takeover is real: it reaps.
        c = owner(spawn, table_name, {"k": "v"})
        c.kill()
        cli.wait_line(f"pid {c.pid} died owning 1 entries", timeout=REACT)
        wait_until(lambda: t.stats()["owned"] == 0, REACT, "the reap")
        cli.p.send_signal(signal.SIGTERM)
        rc, err = cli.finish()
        assert rc == 0, err
        assert t.stats()["watcher_pid"] is None
        # A watcher can be started again after stop().
        w1.start()
        assert w1.wait_active(REACT)
    finally:
        w1.stop()
        w2.stop()
        t.close()


def test_cli_watch_post_mortem_and_signals(table, spawn):
    for sig in (signal.SIGTERM, signal.SIGINT):
        cli = watch_cli(spawn, table.name, "--interval", "0.2")
        cli.wait_line("active", timeout=15)
        entries = {"worker:7": "busy", "job:42": [1, 2]}
        c = owner(spawn, table.name, entries)
        c.kill()
        i = cli.wait_line(f"pid {c.pid} died owning 2 entries", timeout=REACT)
        cli.wait_line("  'worker:7': 'busy'", start=i)
        cli.wait_line("  'job:42': [1, 2]", start=i)
        wait_until(lambda: table.stats()["owned"] == 0, REACT, "the reap")
        cli.p.send_signal(sig)
        rc, err = cli.finish()
        assert rc == 0, f"{sig!r}: rc={rc}\n{err}"
        assert "Traceback" not in err
        assert cli.lines[-1] == "stopped: reaped 2 entries of 1 dead processes"
        assert table.stats()["watcher_pid"] is None


def test_cli_watch_missing_table(table_name):
    r = subprocess.run([sys.executable, "-m", "shmreg", "watch", table_name],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("shmreg: ")
    assert table_name in r.stderr
    assert table_name not in shmreg.list_tables()


def test_watcher_failover_and_exactly_once(table, spawn):
    watchers = [watch_cli(spawn, table.name, "--interval", "0.2") for _ in range(3)]
    for w in watchers:
        w.wait_line("watching")
    by_pid = {w.pid: w for w in watchers}
    active = by_pid[wait_until(lambda: table.stats()["watcher_pid"], 10, "an active watcher")]
    active.wait_line("active", timeout=REACT)
    for w in watchers:
        w.pump()
    assert [w.pid for w in watchers if any(x.startswith("active") for x in w.lines)] == [active.pid]

    # A death while it is active: it reaps.
    c = owner(spawn, table.name, {"first": 1})
    c.kill()
    active.wait_line(f"pid {c.pid} died owning 1 entries", timeout=REACT)
    # (The post-mortem prints before the delete: let the reap finish, or the
    # kill below could land in between and the standby would report c again.)
    wait_until(lambda: table.stats()["owned"] == 0, REACT, "the reap of c")

    # Kill the active watcher, and an owner right after (before anyone took over).
    pre = owner(spawn, table.name, {"orphaned": 2})
    active.kill()
    pre.kill()
    standby = [w for w in watchers if w is not active]
    new_pid = wait_until(lambda: table.stats()["watcher_pid"] in {w.pid for w in standby}
                         and table.stats()["watcher_pid"], REACT, "a standby to take over")
    new = by_pid[new_pid]
    new.wait_line("active", timeout=REACT)
    new.wait_line(f"pid {pre.pid} died owning 1 entries", timeout=REACT)
    wait_until(lambda: table.stats()["owned"] == 0, REACT, "the reap")

    # Two watchers alive, many deaths: each reaped exactly once.
    owners = [owner(spawn, table.name, {f"w{i}:{j}": j for j in range(i % 4 + 1)}) for i in range(12)]
    for o in owners:
        o.kill()
    for o in owners:
        new.wait_line(f"pid {o.pid} died owning", timeout=REACT)
    wait_until(lambda: table.stats()["owned"] == 0, REACT, "every reap")
    for w in standby:
        w.p.send_signal(signal.SIGTERM)
    for w in standby:
        rc, err = w.finish()
        assert rc == 0, err
    deaths = [line for w in watchers for line in w.lines if " died owning " in line]
    dead_pids = [int(line.split()[1]) for line in deaths]
    expected = [c.pid, pre.pid] + [o.pid for o in owners]
    assert sorted(dead_pids) == sorted(expected), deaths
    for i, o in enumerate(owners):
        assert f"pid {o.pid} died owning {i % 4 + 1} entries" in deaths
    assert table.stats()["owner_processes"] == 0 and table._proc_table() == []
    table.check()


WATCHER_CHILD = """
import sys, shmreg
def on_death(pid, entries):
    print(f"death {pid} {len(entries)}", flush=True)
w = shmreg.Watcher(sys.argv[1], on_death=on_death, interval=0.1)
w.start()
w.wait_active()
print("active", flush=True)
sys.stdin.read()
w.stop()
"""


def test_failover_in_python_watchers_reaps_each_death_once(table, spawn):
    # Watchers as library users run them: Watcher(...).start() in a process.
    ws = [spawn([sys.executable, "-c", textwrap.dedent(WATCHER_CHILD), table.name]) for _ in range(2)]
    by_pid = {w.pid: w for w in ws}
    first = by_pid[wait_until(lambda: table.stats()["watcher_pid"], 10, "an active watcher")]
    first.wait_line("active", timeout=REACT)
    deaths_a = [owner(spawn, table.name, {f"a{i}": i}) for i in range(5)]
    for o in deaths_a:
        o.kill()
    for o in deaths_a:
        first.wait_line(f"death {o.pid} 1", timeout=REACT)
    # on_death runs before the delete: killing the watcher between the two
    # would make the standby report that death again (at-least-once, as
    # documented).  Exactly-once holds when no reap is in flight, so wait for
    # the deletes before killing the active watcher.
    wait_until(lambda: table.stats()["owned"] == 0, REACT, "the first watcher's reaps")
    first.kill()
    second = [w for w in ws if w is not first][0]
    second.wait_line("active", timeout=REACT)
    assert table.stats()["watcher_pid"] == second.pid
    deaths_b = [owner(spawn, table.name, {f"b{i}": i, f"bb{i}": i}) for i in range(5)]
    for o in deaths_b:
        o.kill()
    for o in deaths_b:
        second.wait_line(f"death {o.pid} 2", timeout=REACT)
    wait_until(lambda: table.stats()["owned"] == 0, REACT, "every reap")
    rc, err = second.finish()          # closes its stdin: it stops and exits
    assert rc == 0, err
    reported = [int(x.split()[1]) for w in ws for x in w.lines if x.startswith("death ")]
    assert sorted(reported) == sorted(o.pid for o in deaths_a + deaths_b)
