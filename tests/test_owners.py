"""Owned entries and the Registry: an entry owned by a process vanishes the
moment that process dies, however it dies, with no watcher running.

Every owner here is a real process (a fresh interpreter, or an ``os.fork``
child) and every death a real SIGKILL or exit.  Liveness is tied to the
process, not the pid: a reused pid (other start time) is dead, a zombie is
dead, a stopped process is alive.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import shmreg
from shmreg import Registration, Registry, _proc
from _helpers import run_py, wait_until

# --------------------------------------------------------------------------
# Child processes: a fresh interpreter we can talk to line by line
# --------------------------------------------------------------------------


class Child:
    """A Python child with pipes on stdin/stdout/stderr, read without threads."""

    def __init__(self, code: str, *args: str, env: dict | None = None) -> None:
        full_env = dict(os.environ)
        full_env.pop("SHMREG_CRASH_AT", None)
        if env:
            full_env.update(env)
        self.p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, bufsize=0, env=full_env)
        self.pid = self.p.pid
        self._buf = b""
        self.lines: list[str] = []
        self._eof = False

    def _pump(self, timeout: float) -> None:
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

    def expect(self, prefix: str, timeout: float = 30) -> str:
        """Wait for (and consume) the next line starting with ``prefix``."""
        deadline = time.monotonic() + timeout
        while True:
            for i, line in enumerate(self.lines):
                if line.startswith(prefix):
                    del self.lines[: i + 1]
                    return line
            left = deadline - time.monotonic()
            if left <= 0 or (self._eof and not self.lines):
                self.kill()
                err = self.p.stderr.read().decode(errors="replace")
                raise AssertionError(f"child {self.pid}: no line {prefix!r} "
                                     f"(rc={self.p.returncode}); stdout={self.lines!r}\n{err}")
            self._pump(min(left, 0.5))

    def send(self, line: str = "") -> None:
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def kill(self) -> None:
        """SIGKILL and reap (no-op if already reaped)."""
        if self.p.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.p.wait(timeout=30)

    def finish(self, timeout: float = 30) -> tuple[int, str, str]:
        """Close stdin (the child's cue to exit), wait; return (rc, rest of
        stdout, stderr)."""
        out, err = self.p.communicate(timeout=timeout)
        return self.p.returncode, out.decode(errors="replace"), err.decode(errors="replace")


@pytest.fixture
def spawn():
    """Start children; every one still running at teardown is killed."""
    children: list[Child] = []

    def start(code: str, *args: str, env: dict | None = None) -> Child:
        c = Child(code, *args, env=env)
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




def wait_zombie(pid: int, timeout: float = 10) -> None:
    """Wait until our child ``pid`` has exited but is not reaped (waitable,
    WNOWAIT leaves it a zombie).  The /proc state shows "Z" earlier, as soon
    as the main thread exits, while other threads may still be exiting."""
    wait_until(lambda: os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None,
               timeout, f"child {pid} to exit")
    assert proc_state(pid) == "Z"


def proc_state(pid: int) -> str | None:
    """State letter from /proc/PID/stat (R, S, T, Z ...), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return data[data.rindex(b")") + 2:].split()[0].decode()


# Registers argv[2:] (value {"by": key}) for itself, then waits for stdin EOF.
REGISTER_CHILD = """
import sys, shmreg
reg = shmreg.Registry(sys.argv[1])
for key in sys.argv[2:]:
    reg.register(key, {"by": key, "pid": __import__("os").getpid()})
print("ready", flush=True)
sys.stdin.read()
"""

# Does nothing with tables: a live process to register by pid.
IDLE_CHILD = """
import sys
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def reg(table_name):
    r = Registry(table_name, capacity=2000, memory=2 << 20)
    yield r
    r.close()


# --------------------------------------------------------------------------
# Registry basics and the seed behaviour
# --------------------------------------------------------------------------


def test_register_and_lookup_self(reg):
    assert reg.register("me", {"port": 8001}) is None
    assert reg.lookup("me") == Registration(os.getpid(), {"port": 8001})
    assert reg.whereis("me") == os.getpid()
    assert "me" in reg.table and reg.table["me"] == {"port": 8001}
    assert reg.table.owner("me") == os.getpid()
    assert reg.lookup("nobody") is None and reg.whereis("nobody") is None
    assert reg.keys() == ["me"] and reg.count() == 1
    assert reg.items() == [("me", Registration(os.getpid(), {"port": 8001}))]


def test_killed_child_registrations_vanish_without_watcher(reg, spawn):
    t = reg.table
    reg.register("mine", "parent")
    t["plain"] = "unowned"
    c = spawn(REGISTER_CHILD, t.name, "svc:a", "svc:b", "svc:c")
    c.expect("ready")
    # While it lives: visible everywhere.
    for k in ("svc:a", "svc:b", "svc:c"):
        assert reg.lookup(k) == Registration(c.pid, {"by": k, "pid": c.pid})
        assert reg.whereis(k) == c.pid and k in t
    assert sorted(reg.keys(c.pid)) == ["svc:a", "svc:b", "svc:c"]
    assert sorted(k for k, _ in t.select(owner=c.pid)) == ["svc:a", "svc:b", "svc:c"]
    assert reg.count() == len(t) == 5
    assert len(reg.items()) == 4          # registrations only: "plain" is not one

    c.kill()
    assert c.p.returncode == -signal.SIGKILL
    assert t.stats()["watcher_pid"] is None   # nobody reaps: reads alone must hide them
    for k in ("svc:a", "svc:b", "svc:c"):
        assert reg.lookup(k) is None
        assert reg.whereis(k) is None
        assert k not in t
        assert t.get(k, "absent") == "absent"
        with pytest.raises(KeyError):
            t[k]
        with pytest.raises(KeyError):
            t.owner(k)
    assert reg.keys(c.pid) == []
    assert list(t.select(owner=c.pid)) == []
    assert list(t.select(prefix="svc:")) == []
    assert [k for k, _ in reg.items()] == ["mine"]
    assert sorted(t.keys(), key=str) == ["mine", "plain"]
    assert sorted(dict(t.items())) == ["mine", "plain"]
    assert reg.count() == len(t) == 2
    assert t.stats()["owned"] == 4        # still in memory (not reaped) ...
    assert t.stats()["owner_processes"] == 1   # ... but its process is known dead
    # Our own registration is untouched.
    assert reg.lookup("mine") == Registration(os.getpid(), "parent")

    # A new process takes the keys over silently.
    c2 = spawn(REGISTER_CHILD, t.name, "svc:a", "svc:b")
    c2.expect("ready")
    assert reg.lookup("svc:a") == Registration(c2.pid, {"by": "svc:a", "pid": c2.pid})
    assert reg.whereis("svc:b") == c2.pid
    assert reg.lookup("svc:c") is None
    t.check()
    c2.kill()


def test_already_registered(reg, spawn):
    c = spawn(REGISTER_CHILD, reg.table.name, "held")
    c.expect("ready")
    with pytest.raises(shmreg.AlreadyRegisteredError) as ei:
        reg.register("held", "mine")
    assert ei.value.pid == c.pid and ei.value.key == "held"
    assert isinstance(ei.value, shmreg.Error)
    assert reg.whereis("held") == c.pid        # unchanged
    # The caller itself is a live holder too.
    reg.register("own", 1)
    with pytest.raises(shmreg.AlreadyRegisteredError) as ei:
        reg.register("own", 2)
    assert ei.value.pid == os.getpid()
    assert reg.lookup("own") == Registration(os.getpid(), 1)
    # Once the holder is dead the key is free for us.
    c.kill()
    reg.register("held", "mine")
    assert reg.lookup("held") == Registration(os.getpid(), "mine")


def test_register_by_pid(reg, spawn):
    t = reg.table
    c = spawn(IDLE_CHILD)
    c.expect("ready")
    reg.register("foreign", "v", pid=c.pid)
    assert reg.lookup("foreign") == Registration(c.pid, "v")
    assert reg.keys(c.pid) == ["foreign"]
    assert reg.keys() == []                    # not ours
    assert reg.unregister("foreign") is False  # only the holder's own unregister works
    assert reg.whereis("foreign") == c.pid
    slots = [p for p in t._proc_table() if p["pid"] == c.pid]
    assert len(slots) == 1 and slots[0]["kind"] == "pid" and slots[0]["alive"]
    with pytest.raises(shmreg.AlreadyRegisteredError) as ei:
        reg.register("foreign", "other")
    assert ei.value.pid == c.pid
    c.kill()
    assert reg.lookup("foreign") is None and "foreign" not in t
    assert [p["alive"] for p in t._proc_table() if p["pid"] == c.pid] == [False]
    # A dead pid cannot be registered.
    with pytest.raises(ProcessLookupError):
        reg.register("ghost", pid=c.pid)
    assert "ghost" not in t
    with pytest.raises(TypeError):
        reg.register("bad", pid="123")


def test_unregister_only_own(reg, spawn):
    c = spawn(REGISTER_CHILD, reg.table.name, "theirs")
    c.expect("ready")
    reg.register("mine", 1)
    assert reg.unregister("theirs") is False
    assert reg.whereis("theirs") == c.pid
    assert reg.unregister("mine") is True
    assert reg.lookup("mine") is None and "mine" not in reg.table
    assert reg.unregister("mine") is False
    assert reg.unregister("never") is False
    # An unowned entry of the same name is not a registration of ours either.
    reg.table["plain"] = 1
    assert reg.unregister("plain") is False and reg.table["plain"] == 1
    reg.register("mine", 2)                    # free again
    assert reg.lookup("mine") == Registration(os.getpid(), 2)


def test_keys_items_count(reg, spawn):
    c = spawn(REGISTER_CHILD, reg.table.name, "c1", "c2")
    c.expect("ready")
    for i in range(3):
        reg.register(f"p{i}", i)
    assert sorted(reg.keys()) == ["p0", "p1", "p2"]
    assert sorted(reg.keys(os.getpid())) == ["p0", "p1", "p2"]
    assert sorted(reg.keys(c.pid)) == ["c1", "c2"]
    assert reg.keys(c.pid + 10_000_000) == []
    assert reg.count() == 5
    items = dict(reg.items())
    assert items == {
        "p0": Registration(os.getpid(), 0), "p1": Registration(os.getpid(), 1),
        "p2": Registration(os.getpid(), 2),
        "c1": Registration(c.pid, {"by": "c1", "pid": c.pid}),
        "c2": Registration(c.pid, {"by": "c2", "pid": c.pid}),
    }
    c.kill()
    assert reg.count() == 3
    assert sorted(k for k, _ in reg.items()) == ["p0", "p1", "p2"]
    assert reg.keys(c.pid) == []


# --------------------------------------------------------------------------
# What counts as alive: pid reuse, zombies, stopped processes
# --------------------------------------------------------------------------


def test_pid_reuse_is_dead(table):
    me = os.getpid()
    real = _proc.start_time(me)
    assert real is not None
    wrong = table._claim(me, real + 12345, False)
    assert table._insert_new_for("reused", "stale", wrong) is True
    assert not table._owner_alive(wrong)
    assert "reused" not in table and table.get("reused") is None
    assert len(table) == 0 and table.keys() == []
    assert list(table.select(owner=me)) == []
    assert [p["alive"] for p in table._proc_table() if p["owner"] == wrong] == [False]
    # The same pid with the right start time is alive: the control.
    right = table._claim(me, real, False)
    assert right != wrong and table._owner_alive(right)
    assert table._insert_new_for("current", "fresh", right) is True
    assert table["current"] == "fresh" and table.owner("current") == me
    # The stale entry does not block a new insert of its key.
    assert table._insert_new_for("reused", "new", right) is True
    assert table["reused"] == "new"
    with Registry(table.name) as reg:
        assert reg.lookup("reused") == Registration(me, "new")
    table.check()


def test_pid_reuse_stale_entry_is_reaped(table):
    me = os.getpid()
    start = _proc.start_time(me)
    stale = table._claim(me, start + 1, False)      # an earlier process with our pid
    current = table._claim(me, start, False)        # us
    for i in range(5):
        assert table._insert_new_for(f"s{i}", i, stale)
    assert table._insert_new_for("c", "current", current)
    assert table.keys() == ["c"] and table.stats()["owned"] == 6
    # reap(pid) deletes the dead incarnation's entries, never the live one's.
    assert table.reap(me) == 5
    assert table.reap(me) == 0
    assert table["c"] == "current" and table.owner("c") == me
    assert table.stats()["owned"] == 1
    assert [p["owner"] for p in table._proc_table()] == [current]
    # reap_dead() finds stale slots too.
    stale = table._claim(me, start + 2, False)
    assert table._insert_new_for("s0", 0, stale)
    assert table.reap_dead() == 1
    assert table["c"] == "current" and table.stats()["owned"] == 1
    table.check()


def test_zombie_registered_by_pid_is_dead(reg, spawn):
    c = spawn(IDLE_CHILD)
    c.expect("ready")
    reg.register("z", "v", pid=c.pid)
    assert reg.lookup("z") == Registration(c.pid, "v")   # (caches a pidfd in reg.table)
    c.p.stdin.close()                                      # the child exits; nobody waits
    wait_zombie(c.pid)
    assert reg.lookup("z") is None
    assert "z" not in reg.table
    with Registry(reg.table.name) as other:               # no cached pidfd: /proc says Z
        assert other.lookup("z") is None
        assert other.whereis("z") is None
    assert proc_state(c.pid) == "Z"                        # still unreaped while we looked
    assert reg.table.reap(c.pid) == 1
    c.p.wait(timeout=10)


def test_zombie_self_registered_is_dead(reg, spawn):
    c = spawn(REGISTER_CHILD, reg.table.name, "zs:1", "zs:2")
    c.expect("ready")
    assert reg.whereis("zs:1") == c.pid
    c.p.stdin.close()
    wait_zombie(c.pid)
    assert c.p.returncode is None
    assert reg.lookup("zs:1") is None and reg.lookup("zs:2") is None
    assert reg.count() == 0 and reg.keys(c.pid) == []
    assert [p["alive"] for p in reg.table._proc_table() if p["pid"] == c.pid] == [False]
    assert proc_state(c.pid) == "Z"
    assert reg.table.reap(c.pid) == 2
    c.p.wait(timeout=10)


def test_stopped_process_is_alive(reg, spawn):
    t = reg.table
    c = spawn(REGISTER_CHILD, t.name, "st:1")
    c.expect("ready")
    foreign = spawn(IDLE_CHILD)
    foreign.expect("ready")
    reg.register("st:2", "by-pid", pid=foreign.pid)
    try:
        for p in (c, foreign):
            os.kill(p.pid, signal.SIGSTOP)
        for p in (c, foreign):
            wait_until(lambda: proc_state(p.pid) == "T", what="child to stop")
        assert reg.whereis("st:1") == c.pid
        assert reg.lookup("st:2") == Registration(foreign.pid, "by-pid")
        assert t.reap(c.pid) == 0 and t.reap(foreign.pid) == 0
        assert t.reap_dead() == 0
        assert reg.count() == 2 and t.stats()["owner_processes"] == 2
        with pytest.raises(shmreg.AlreadyRegisteredError):
            reg.register("st:1")
    finally:
        for p in (c, foreign):
            os.kill(p.pid, signal.SIGCONT)
    for p in (c, foreign):
        wait_until(lambda: proc_state(p.pid) not in ("T", "t"), what="child to continue")
    assert reg.whereis("st:1") == c.pid and reg.whereis("st:2") == foreign.pid
    c.kill()
    foreign.kill()
    assert reg.count() == 0


# --------------------------------------------------------------------------
# fork: each child is its own owner
# --------------------------------------------------------------------------

FORK_SCRIPT = """
import json, os, signal, sys
import shmreg
t = shmreg.Table.open(sys.argv[1])
me = os.getpid()
t.set("parent", "p", owned=True)
out = {"parent_pid": me, "parent_owner": t._self_owner_id}

# 1. A child that writes owned entries and is killed: its entries die, ours live.
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    t.set("child", "c", owned=True)
    t.insert_new("child-new", "n", owned=True)
    t.set("child-plain", "u")
    info = {"pid": os.getpid(), "owner_child": t.owner("child"), "owner_parent": t.owner("parent"),
            "owner_id": t._self_owner_id}
    os.write(w, json.dumps(info).encode())
    os.close(w)
    signal.pause()
os.close(w)
data = b""
while not data.endswith(b"}"):
    data += os.read(r, 4096)
out["child"] = json.loads(data)
out["while_child_lives"] = {"child": t.get("child"), "owner": t.owner("child"),
                            "slots": sorted(p["pid"] for p in t._proc_table() if p["alive"])}
os.kill(pid, signal.SIGKILL)
os.waitpid(pid, 0)
out["after_child_death"] = {k: t.get(k, "<absent>") for k in ("parent", "child", "child-new", "child-plain")}
out["parent_owner_after"] = t.owner("parent")
out["select_child"] = list(t.select(owner=pid))

# 2. A child that outlives us: its entries must survive our death.
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    fd = os.open(os.devnull, os.O_RDWR)
    os.dup2(fd, 0); os.dup2(fd, 1); os.dup2(fd, 2)   # do not hold the test's pipes open
    os.close(r)
    t.set("orphan", "o", owned=True)
    os.write(w, b"x")
    os.close(w)
    signal.pause()
os.close(w)
assert os.read(r, 1) == b"x"
out["orphan_pid"] = pid
print(json.dumps(out), flush=True)
"""


def test_fork_children_get_their_own_slot(table):
    r = run_py(FORK_SCRIPT, table.name, timeout=60)
    out = json.loads(r.stdout)
    parent, child, orphan = out["parent_pid"], out["child"], out["orphan_pid"]
    try:
        assert child["pid"] != parent
        assert child["owner_child"] == child["pid"]
        assert child["owner_parent"] == parent
        assert child["owner_id"] != out["parent_owner"]
        assert out["while_child_lives"] == {"child": "c", "owner": child["pid"],
                                            "slots": sorted([parent, child["pid"]])}
        assert out["after_child_death"] == {"parent": "p", "child": "<absent>",
                                            "child-new": "<absent>", "child-plain": "u"}
        assert out["parent_owner_after"] == parent
        assert out["select_child"] == []
        # The parent has exited now; the orphan it forked still lives.
        assert "parent" not in table
        assert table["orphan"] == "o" and table.owner("orphan") == orphan
        assert table.reap(orphan) == 0
        assert table.reap(parent) == 1
        assert table.reap(child["pid"]) == 2
    finally:
        try:
            os.kill(orphan, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # The orphan is not our child (we cannot wait for it): its death shows within a bound.
    wait_until(lambda: "orphan" not in table, what="the orphan's entry to vanish")
    # Its liveness lock is released while it exits, a moment before /proc
    # shows it as a zombie (or gone): wait for that, do not race it.
    wait_until(lambda: proc_state(orphan) in (None, "Z"), what="the orphan to finish exiting")
    assert table.reap(orphan) == 1
    assert table.stats()["owned"] == 0
    table.check()


# --------------------------------------------------------------------------
# reap(pid)
# --------------------------------------------------------------------------

OWNER_CHILD = """
import json, sys, shmreg
t = shmreg.Table.open(sys.argv[1])
for k, v in json.loads(sys.argv[2]).items():
    t.set(k, v, owned=True)
print("ready", flush=True)
sys.stdin.read()
"""


def test_reap(table, spawn):
    dead = spawn(OWNER_CHILD, table.name, json.dumps({f"d{i}": i for i in range(5)}))
    live = spawn(OWNER_CHILD, table.name, json.dumps({f"l{i}": i for i in range(3)}))
    dead.expect("ready")
    live.expect("ready")
    table["plain"] = 0
    assert table.stats()["owned"] == 8
    dead.kill()
    used = table.stats()["bytes_used"]
    assert table.reap(dead.pid) == 5
    assert table.reap(dead.pid) == 0          # idempotent
    assert table.stats()["owned"] == 3 and table.stats()["bytes_used"] < used
    assert not [p for p in table._proc_table() if p["pid"] == dead.pid]   # slot freed
    # A live pid is left alone unless forced.
    assert table.reap(live.pid) == 0
    assert sorted(k for k, _ in table.select(owner=live.pid)) == ["l0", "l1", "l2"]
    assert table.reap(live.pid, force=True) == 3
    assert table.stats()["owned"] == 0 and "l0" not in table
    assert [p["alive"] for p in table._proc_table() if p["pid"] == live.pid] == [True]
    assert table.reap(live.pid, force=True) == 0
    assert table.reap(os.getpid()) == 0       # no slot at all
    assert table["plain"] == 0                # unowned entries are never reaped
    with pytest.raises(TypeError):
        table.reap("1")
    table.check()


# --------------------------------------------------------------------------
# 50 owners killed at random while they write
# --------------------------------------------------------------------------

CHAOS_CHILD = """
import json, sys, shmreg
t = shmreg.Table.open(sys.argv[1])
i, iters = int(sys.argv[2]), int(sys.argv[3])     # iters 0: until killed
mine = {}

def step(j):
    k = f"o{i}:{j % 40}"
    v = f"{i}-{j}" * (1 + j % 5)
    t.set(k, v, owned=True)
    mine[k] = v
    k = f"n{i}:{j % 60}"
    if t.insert_new(k, [i, j], owned=True):
        mine[k] = [i, j]
    if j % 3 == 0:
        k = f"n{i}:{(j * 7) % 60}"
        if t.delete(k):
            del mine[k]
    t.update_counter("ctr")
    t.update_counter(f"c{i}")
    t.set(f"u{i}:{j % 10}", j)

step(0)
print("ready", flush=True)
sys.stdin.readline()
j = 1
while iters == 0 or j <= iters:
    step(j)
    j += 1
print("mine " + json.dumps(sorted(mine.items())), flush=True)
sys.stdin.read()
"""


def test_fifty_owners_killed_at_random(table_name, spawn):
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    ctx = f"(seed {seed})"
    n, iters = 50, 1500
    t = shmreg.Table.create(table_name, capacity=40_000, memory=16 << 20)
    victims = set(rnd.sample(range(n), 35))
    kids = [spawn(CHAOS_CHILD, table_name, str(i), "0" if i in victims else str(iters))
            for i in range(n)]
    for c in kids:
        c.expect("ready", timeout=60)
    assert t.stats()["owner_processes"] == n
    for c in kids:
        c.send("go")
    order = sorted(victims, key=lambda _: rnd.random())
    for i in order:
        time.sleep(rnd.uniform(0, 0.02))
        os.kill(kids[i].pid, signal.SIGKILL)
    for i in order:
        kids[i].p.wait(timeout=30)
        assert kids[i].p.returncode == -signal.SIGKILL, ctx

    # Invisible at once, no reaping: every owned entry of every dead owner.
    for i in victims:
        pid = kids[i].pid
        assert list(t.select(owner=pid)) == [], ctx
        assert list(t.select(prefix=f"o{i}:")) == [], ctx
        assert list(t.select(prefix=f"n{i}:")) == [], ctx
        assert f"o{i}:0" not in t and t.get(f"o{i}:1") is None, ctx
        assert t[f"u{i}:0"] % 10 == 0, ctx     # its unowned entries stay
        assert t[f"c{i}"] >= 1, ctx

    survivors = [i for i in range(n) if i not in victims]
    mirrors = {}
    for i in survivors:
        line = kids[i].expect("mine ", timeout=60)
        mirrors[i] = {k: v for k, v in json.loads(line[5:])}

    def check_survivors():
        for i in survivors:
            pid = kids[i].pid
            assert dict(t.select(owner=pid)) == mirrors[i], f"survivor {i} {ctx}"
            for k, v in mirrors[i].items():
                assert t[k] == v and t.owner(k) == pid, f"{k} {ctx}"
            assert t[f"c{i}"] == iters + 1, ctx
            assert {k: t[k] for k in t.keys() if isinstance(k, str) and k.startswith(f"u{i}:")} \
                == {f"u{i}:{r}": iters - (iters - r) % 10 for r in range(10)}, ctx

    live_owned = sum(len(m) for m in mirrors.values())
    check_survivors()
    owned_keys = [k for k in t.keys() if k[0] in "on"]
    assert len(owned_keys) == live_owned, ctx
    assert {k for k in owned_keys} == {k for m in mirrors.values() for k in m}, ctx
    unowned = [k for k in t.keys() if k[0] not in "on"]
    assert {"ctr"} | {f"c{i}" for i in range(n)} | {f"u{i}:0" for i in range(n)} <= set(unowned), ctx
    assert len(t) == live_owned + len(unowned), ctx
    assert t["ctr"] >= len(survivors) * (iters + 1) + len(victims), ctx
    assert t.stats()["owner_processes"] == len(survivors), ctx

    # Locking every shard repairs whatever a victim left half done.
    t.check()
    before = t.stats()
    assert before["owned"] >= live_owned, ctx
    dead_owned = before["owned"] - live_owned
    vs = sorted(victims)
    reaped = sum(t.reap(kids[i].pid) for i in vs[: len(vs) // 2])
    reaped += t.reap_dead()
    assert reaped == dead_owned, ctx
    after = t.stats()
    assert after["owned"] == live_owned, ctx
    assert after["bytes_used"] < before["bytes_used"], ctx
    assert after["owner_processes"] == len(survivors), ctx
    assert all(t.reap(kids[i].pid) == 0 for i in vs), ctx       # idempotent
    assert all(t.reap(kids[i].pid) == 0 for i in survivors), ctx  # live: untouched
    assert len(t._proc_table()) == len(survivors), ctx
    t.check()
    check_survivors()
    for i in survivors:
        rc, _, err = kids[i].finish()
        assert rc == 0, err
    t.close()


# --------------------------------------------------------------------------
# Killed while registering
# --------------------------------------------------------------------------

CRASH_REGISTER = """
import sys, shmreg
reg = shmreg.Registry(sys.argv[1])
reg.register("svc", sys.argv[2])
print("registered", flush=True)
"""


@pytest.mark.parametrize("point,held", [
    ("set:allocated", False), ("set:written", False), ("set:published", False),
    ("set:allocated", True), ("set:written", True), ("set:published", True), ("set:freed", True),
])
def test_killed_while_registering_leaves_no_half_entry(reg, spawn, point, held):
    t = reg.table
    if held:   # the key is held by a dead process: the register is a takeover (a replace)
        a = spawn(REGISTER_CHILD, t.name, "svc")
        a.expect("ready")
        a.kill()
    t["neighbour"] = "n"
    b = spawn(CRASH_REGISTER, t.name, "value-of-b" * 20, env={"SHMREG_CRASH_AT": point})
    rc, out, err = b.finish()
    assert rc == -signal.SIGKILL, f"crash point {point} not reached: rc={rc}\n{err}"
    assert out == ""          # never reported success

    # Invisible, whatever state the write was in.
    assert reg.lookup("svc") is None and reg.whereis("svc") is None
    assert "svc" not in t and reg.count() == 1 and t["neighbour"] == "n"
    # What is physically there: nothing, or a complete registration of b.
    b_slots = [p for p in t._proc_table() if p["pid"] == b.pid]
    assert len(b_slots) == 1 and not b_slots[0]["alive"]
    _, recs = t._reap(b_slots[0]["owner"], True, False)
    if point in ("set:published", "set:freed"):
        assert [(k, v) for k, v, _e, _o in recs] == [("svc", "value-of-b" * 20)]
    else:
        assert recs == []
    t.check()
    # Anyone can register it now.
    reg.register("svc", "mine")
    assert reg.lookup("svc") == Registration(os.getpid(), "mine")
    t.reap_dead()
    assert t.stats()["owned"] == 1
    t.check()
