"""Hardening of the core: closing a table that is in use, corrupted lock
words, wrong exception types on corrupt data, leaks of mappings, threads and
pidfds, derived counts the checker must verify, and what a key's type means.

Anything that could crash the interpreter runs in a child process, so a
segfault fails the test instead of killing the run; anything that could
hang has a timeout.
"""

from __future__ import annotations

import enum
import mmap
import os
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest

import shmreg
from shmreg import _core
from _helpers import run_py, spawn_py, wait_until

L = _core.LAYOUT
SHARD = _core.SHARD_STRUCT_SIZE


def _poke(path: str, off: int, value: int, fmt: str = "<I") -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0) as mm:
            struct.pack_into(fmt, mm, off, value)
    finally:
        os.close(fd)


def _peek(path: str, off: int, fmt: str = "<I") -> int:
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _shards_off() -> int:
    return _core.HEADER_SIZE + _core.NPROCS * 128


def _missing_tid() -> int:
    """A thread id that no thread on this host has."""
    tid = 0x3FFFFFF0
    while os.path.exists(f"/proc/{tid}"):
        tid -= 1
    return tid


def _corrupt_every_shard_lock(t: shmreg.Table, word: int) -> None:
    for si in range(t.nshards):
        _poke(t.path, _shards_off() + si * SHARD + L["shard.lock"][0], word)


# --------------------------------------------------------------------------
# Closing a table that is in use never crashes the interpreter
# --------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_watcher_on_a_table_the_app_closes(table_name):
    # The watcher thread's cleanup used to write the unmapped header: SIGSEGV.
    r = run_py("""
        import sys, time, shmreg
        name = sys.argv[1]
        with shmreg.Table(name, capacity=100, memory=1 << 16) as t:
            w = shmreg.Watcher(t, interval=0.05).start()
            assert w.wait_active(5)
            t.set("mine", 1, owned=True)
            time.sleep(0.2)
        w._thread.join(5)
        assert not w._thread.is_alive()
        # The lease was handed back: another watcher can take it.
        with shmreg.Table.open(name) as t2:
            w2 = shmreg.Watcher(t2).start()
            assert w2.wait_active(5)
            w2.stop()
        print("ok")
    """, table_name)
    assert r.stdout.strip() == "ok"


@pytest.mark.timeout(60)
def test_close_while_another_thread_pickles_a_value(table_name):
    # Pickling runs Python code (__reduce__): close() from another thread in
    # the meantime used to unmap the segment under the writer.
    r = run_py("""
        import sys, threading, time, shmreg
        name = sys.argv[1]
        class Slow:
            def __init__(self, started):
                self.started = started
            def __reduce__(self):
                self.started.set()
                time.sleep(0.2)
                return (int, (5,))
        outcomes = []
        for _ in range(20):
            t = shmreg.Table(name, capacity=100, memory=1 << 16)
            started = threading.Event()
            def writer():
                try:
                    t.set("k", Slow(started))
                    outcomes.append("stored")
                except ValueError as e:
                    assert "closed" in str(e), e
                    outcomes.append("closed")
            th = threading.Thread(target=writer)
            th.start()
            started.wait(5)
            t.close()
            th.join(10)
            try:
                t.get("k")
            except ValueError:
                pass
            else:
                raise AssertionError("a closed table answered")
        print(sorted(set(outcomes)))
    """, table_name)
    assert "closed" in r.stdout


@pytest.mark.timeout(60)
def test_close_from_the_clock_callback_and_from_many_threads(table_name):
    # A custom clock runs Python in the middle of a read or a write; here it
    # closes the table.  Then: random operations in 6 threads while another
    # closes and reopens handles in a loop.
    r = run_py("""
        import random, sys, threading, time, shmreg
        name = sys.argv[1]
        holder = {}
        def clock():
            holder["t"].close()
            return time.monotonic()
        t = shmreg.Table(name, capacity=1000, memory=1 << 20, clock=clock)
        holder["t"] = t
        t2 = shmreg.Table.open(name)
        t2.set("x", 1, ttl=60)
        for op in (lambda: t.get("x"), lambda: t.set("y", 2, ttl=5), lambda: t.update_counter("c")):
            try:
                op()
            except ValueError:
                pass
            t = holder["t"] = shmreg.Table(name, clock=clock)
        stop = time.monotonic() + 2.0
        handles = [shmreg.Table.open(name) for _ in range(3)]
        def worker(seed):
            rng = random.Random(seed)
            while time.monotonic() < stop:
                h = rng.choice(handles)
                try:
                    k = rng.randrange(50)
                    op = rng.randrange(6)
                    if op == 0: h.set(k, b"v" * rng.randrange(300), ttl=rng.choice([None, 1.0]))
                    elif op == 1: h.get(k)
                    elif op == 2: h.update_counter(f"c{k}")
                    elif op == 3: h.delete(k)
                    elif op == 4: len(h); h.items()
                    else: h.set(f"o{k}", k, owned=True)
                except ValueError as e:
                    assert "closed" in str(e), e
        def closer():
            rng = random.Random(0)
            while time.monotonic() < stop:
                i = rng.randrange(3)
                handles[i].close()
                handles[i] = shmreg.Table.open(name)
        ths = [threading.Thread(target=worker, args=(i,)) for i in range(6)] + [threading.Thread(target=closer)]
        for th in ths: th.start()
        for th in ths: th.join(30)
        shmreg.Table.open(name).check()
        print("ok")
    """, table_name, timeout=60)
    assert r.stdout.strip().endswith("ok")


# --------------------------------------------------------------------------
# Corrupted lock words: bounded detection, reported, repairable
# --------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_corrupt_shard_lock_word_is_an_error_not_a_hang(table_name):
    t = shmreg.Table.create(table_name, capacity=1000, memory=1 << 20)
    t["a"] = 1
    t.set("o", 1, owned=True)
    _corrupt_every_shard_lock(t, _missing_tid())
    for op in (lambda: t.set("b", 2), lambda: t.update_counter("n"),
               lambda: t.set("p", 1, owned=True), lambda: t.delete("a"), t.check):
        with pytest.raises(shmreg.CorruptTableError, match="does not exist"):
            op()
    assert t.get("a") == 1          # reads never lock
    r = subprocess.run([sys.executable, "-m", "shmreg", "check", table_name],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 3 and "does not exist" in r.stderr and "--repair" in r.stderr
    r = subprocess.run([sys.executable, "-m", "shmreg", "check", "--repair", table_name],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("repaired: shard") == t.nshards
    t["b"] = 2
    assert t.update_counter("n") == 1 and t["a"] == 1 and t["o"] == 1
    assert t.check() is None
    t.close()


@pytest.mark.timeout(60)
def test_corrupt_process_table_lock_and_invalid_mutex_kind(table_name):
    t = shmreg.Table.create(table_name, capacity=1000, memory=1 << 20)
    _poke(t.path, L["header.procs_lock"][0], _missing_tid())
    with pytest.raises(shmreg.CorruptTableError, match="process table"):
        t.set("o", 1, owned=True)
    with pytest.raises(shmreg.CorruptTableError, match="process table"):
        t.check()
    assert t.check(repair=True) == ["the process table"]
    t.set("o", 1, owned=True)
    assert t.owner("o") == os.getpid()
    # The mutex type field (glibc: 4 bytes at offset 16) is not a robust mutex
    # any more: a clear error, not a bare OSError.
    _poke(t.path, _shards_off() + L["shard.lock"][0] + 16, 12345)
    with pytest.raises(shmreg.CorruptTableError, match="not a valid robust mutex"):
        t.check()
    assert t.check(repair=True) == ["shard 0"]
    assert t.check() is None
    t.close()


@pytest.mark.timeout(90)
def test_stopped_lock_holder_is_never_robbed_by_repair(table_name):
    t = shmreg.Table.create(table_name, capacity=100, memory=1 << 20, shards=1)
    t["a"] = 1
    child = spawn_py("""
        import sys, shmreg
        t = shmreg.Table.open(sys.argv[1])
        print("ready", flush=True)
        t["a"] = 2          # stops itself at set:written, shard lock held
        print("done", flush=True)
    """, table_name, env={"SHMREG_CRASH_AT": "set:written", "SHMREG_CRASH_SIGNAL": "STOP"})
    try:
        assert child.stdout.readline().strip() == "ready"
        wait_until(lambda: _state(child.pid) == "T", 30, "child stopped holding the lock")
        word = _peek(t.path, _shards_off() + L["shard.lock"][0])
        assert word & 0x3FFFFFFF, "the stopped child holds the shard lock"
        # Not a problem, not repaired: a stopped process is alive.
        assert t._lock_problems() == []
        assert t._repair_locks() == []
        # (A waiter may have set the futex's waiters bit; the holder is the same.)
        assert _peek(t.path, _shards_off() + L["shard.lock"][0]) & 0x3FFFFFFF == word & 0x3FFFFFFF
        # A writer waits for it (well past the abandon bound) instead of failing.
        result = []
        th = threading.Thread(target=lambda: result.append(t.update_counter("n")))
        th.start()
        th.join(2.5)
        assert th.is_alive() and not result
        os.kill(child.pid, signal.SIGCONT)
        th.join(30)
        assert result == [1]
        assert child.stdout.readline().strip() == "done"
        assert child.wait(30) == 0
        assert t["a"] == 2 and t.check() is None and t.stats()["repairs"] == 0
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGCONT)
        child.kill()
        child.wait()
        child.stdout.close()
        child.stderr.close()
        t.close()


# --------------------------------------------------------------------------
# Corrupt data raises CorruptTableError, not UnicodeDecodeError / ValueError
# --------------------------------------------------------------------------

def _item_offsets(t: shmreg.Table):
    """Absolute offsets of the items, by walking each shard's live index."""
    out = []
    with open(t.path, "rb") as f:
        data = f.read()
    for index, slots, arena, _cap in t._shard_regions():
        for i in range(slots):
            (slot,) = struct.unpack_from("<Q", data, index + 8 * i)
            off = slot & 0xFFFFFFFF
            if off > 1:
                out.append(arena + off - 8)
    return out


@pytest.mark.parametrize("what", ["str key", "str value", "big int key"])
def test_corrupt_text_is_corrupt_table_error(table_name, what):
    t = shmreg.Table.create(table_name, capacity=100, memory=1 << 16, shards=1)
    if what == "str key":
        t["k\u00e9y"] = 1
    elif what == "str value":
        t[b"k"] = "val\u00e9"
    else:
        t[10 ** 30] = 1
    (item,) = _item_offsets(t)
    klen = _peek(t.path, item + L["item.klen"][0], "<H")
    vlen = _peek(t.path, item + L["item.vlen"][0])
    if what == "str value":
        _poke(t.path, item + 24, 0xFF, "<B")               # first value byte
    else:
        _poke(t.path, item + 24 + vlen + klen - 1, 0xFF, "<B")   # last key byte
    with pytest.raises(shmreg.CorruptTableError):
        t.items()
    if what == "str value":
        with pytest.raises(shmreg.CorruptTableError):
            t[b"k"]
    t.close()


# --------------------------------------------------------------------------
# Derived counts: check() verifies every one
# --------------------------------------------------------------------------

@pytest.mark.parametrize("field,message", [("nowned", "owned entries"), ("nttl", "ttl"),
                                           ("count", "count"), ("tombs", "tombstones")])
def test_check_verifies_every_derived_count(table_name, field, message):
    t = shmreg.Table.create(table_name, capacity=100, memory=1 << 16, shards=1)
    t.set("o", 1, owned=True)
    t.set("e", 1, ttl=60)
    t["x"] = 1
    assert t.check() is None
    off = _shards_off() + L[f"shard.{field}"][0]
    _poke(t.path, off, _peek(t.path, off) + 1)
    with pytest.raises(shmreg.CorruptTableError, match=message):
        t.check()
    t.close()


# --------------------------------------------------------------------------
# Leaks: mappings, liveness threads, pidfds
# --------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_closed_unlinked_tables_release_memory_and_threads():
    # Measured from inside the process (other processes may use the same
    # filesystem meanwhile): the segments it still maps or holds open.
    r = run_py("""
        import os, shmreg
        def held():
            n = 0
            with open("/proc/self/maps") as f:
                for line in f:
                    if "/shmreg." in line:
                        lo, hi = line.split()[0].split("-")
                        n += int(hi, 16) - int(lo, 16)
            for fd in os.listdir("/proc/self/fd"):
                try:
                    if "/shmreg." in os.readlink(f"/proc/self/fd/{fd}"):
                        n += os.fstat(int(fd)).st_size
                except OSError:
                    pass
            return n
        def threads():
            return len(os.listdir("/proc/self/task"))
        base_threads = threads()
        peak = 0
        for i in range(100):
            name = f"leak-{os.getpid()}-{i}"
            t = shmreg.Table(name)                  # default size: ~17 MiB
            t.set("mine", i, owned=True)            # starts a liveness thread
            peak = max(peak, held())
            if i % 2:
                t.unlink(); t.close()
            else:
                t.close(); shmreg.unlink(name)
        print(held(), threads() - base_threads, peak)
    """, timeout=120)
    held, extra_threads, peak = map(int, r.stdout.split())
    assert peak > 16 << 20          # (the measure sees a default table)
    assert held == 0, f"{held} bytes of unlinked segments still mapped or open"
    assert extra_threads == 0


@pytest.mark.timeout(60)
def test_closed_but_named_table_keeps_owned_entries_alive(table_name):
    # The other side of the leak fix: closing without unlinking must not
    # kill this process's owned entries for other processes.
    t = shmreg.Table.create(table_name, capacity=100, memory=1 << 16)
    t.set("mine", 1, owned=True)
    t.close()
    r = run_py("""
        import sys, shmreg
        print(shmreg.Table.open(sys.argv[1]).get("mine"))
    """, table_name)
    assert r.stdout.strip() == "1"
    with shmreg.Table.open(table_name) as again:     # reuses the kept mapping
        assert again.owner("mine") == os.getpid()


def _pidfds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]":
                n += 1
        except OSError:
            pass
    return n


@pytest.mark.timeout(120)
def test_pidfds_of_dead_registered_processes_are_closed(table_name):
    reg = shmreg.Registry(table_name, capacity=1000)
    before = _pidfds()
    children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(30)]
    try:
        for i, c in enumerate(children):
            reg.register(f"w{i}", i, pid=c.pid)
        assert all(reg.whereis(f"w{i}") == c.pid for i, c in enumerate(children))
        assert _pidfds() - before == len(children)      # one cached pidfd each
        for c in children:
            c.kill()
            c.wait()
        assert all(reg.whereis(f"w{i}") is None for i in range(len(children)))
        assert _pidfds() == before                     # closed when the death was seen
        assert reg.table.reap_dead() == len(children)
        assert _pidfds() == before
    finally:
        for c in children:
            c.kill()
            c.wait()
        reg.close()


# --------------------------------------------------------------------------
# Key types: behaviour and docs agree (subclasses count as their base type)
# --------------------------------------------------------------------------

class Color(enum.IntEnum):
    RED = 1


class Tag(str, enum.Enum):
    A = "a"


def test_key_subclasses_are_their_base_type(table):
    table[1] = "one"
    assert table[True] == "one" and table[Color.RED] == "one"
    table[Color.RED] = "red"
    assert table[1] == "red" and len(table) == 1
    (k,) = table.keys()
    assert type(k) is int
    table[Tag.A] = 1
    assert table["a"] == 1 and "a" in table.keys()
    assert "1" not in table and b"a" not in table
