"""Tables that grow: no sizing, memory proportional to the data (issue 11).

A table made without sizes starts small and grows shard by shard (index
and arena) while readers of other processes keep reading; a full
filesystem during growth is a NoSpaceError that leaves the table intact;
processes attached before a growth (and fork/spawn children, the CLI) see
every new entry; deletes followed by compaction give the memory back; and
writers SIGKILLed in the middle of all that lose nothing they committed.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import pytest

import shmreg
from _helpers import run_py, spawn_py, stop_process_tree


def allocated(t: shmreg.Table) -> int:
    """Bytes the segment holds in its filesystem."""
    return os.stat(t.path).st_blocks * 512


def value_of(key: str) -> bytes:
    """A checksummed value of a size between 1 and 300 bytes that follows
    from the key: a reader can verify any value it reads."""
    d = hashlib.blake2b(key.encode(), digest_size=16).digest()
    n = 1 + d[0] + d[1] % 45
    return (d * (n // 16 + 1))[:n]


def test_default_table_starts_small_and_grows(table_name):
    with shmreg.Table(table_name) as t:
        s0 = t.stats()
        assert s0["grows"] and s0["entries"] == 0
        assert allocated(t) < 1 << 20, "an empty default table holds under a MiB"
        assert s0["bytes_reserved"] > 1 << 26   # its limits are reserved, not allocated
        for i in range(100_000):
            t[f"key-{i:012d}"] = b"v" * 64
        s1 = t.stats()
        assert s1["entries"] == 100_000 and s1["growth_events"] > 64
        assert s1["index_slots"] > s0["index_slots"] and s1["arena_allocated"] > s0["arena_allocated"]
        # Resident memory follows the data: about 120 bytes per 104-byte item.
        assert allocated(t) / 100_000 < 140
        t.check()
        for i in range(0, 100_000, 997):
            assert t[f"key-{i:012d}"] == b"v" * 64
        t.unlink()


def test_presized_table_allocates_up_front_and_never_grows(table_name):
    with shmreg.Table(table_name, capacity=1000, memory=1 << 20) as t:
        s = t.stats()
        assert not s["grows"] and s["index_slots"] == s["max_index_slots"]
        assert s["arena_allocated"] == s["memory"] or s["arena_allocated"] >= 1 << 20
        with pytest.raises(shmreg.TableFullError):
            for i in range(5000):
                t[i] = i
        assert t.stats()["growth_events"] == 0
        t.check()
        t.unlink()


def test_growing_table_stops_at_its_limit(table_name):
    with shmreg.Table(table_name, capacity=2000, memory=1 << 20, grow=True) as t:
        assert t.stats()["index_slots"] < t.stats()["max_index_slots"]
        n = 0
        with pytest.raises(shmreg.TableFullError):
            for n in range(10_000):
                t[n] = n
        assert 2000 <= n < 10_000
        s = t.stats()
        assert s["growth_events"] > 0 and s["index_slots"] == s["max_index_slots"]
        t.check()
        t.unlink()


def test_a_growing_cache_evicts_only_at_its_limit(table_name):
    cache = shmreg.Cache(table_name, capacity=3000, memory=1 << 20, grow=True)
    try:
        for i in range(2000):
            cache.set(i, b"x" * 20)
        assert cache.table.stats()["evictions"] == 0 and len(cache.table) == 2000
        for i in range(2000, 20_000):
            cache.set(i, b"x" * 20)
        assert cache.table.stats()["evictions"] > 0
        # The limit: capacity, with the index's room for an uneven spread.
        s = cache.table.stats()
        assert 3000 <= len(cache.table) <= s["max_index_slots"] * 0.9
        assert s["index_slots"] == s["max_index_slots"]
        cache.table.check()
    finally:
        cache.table.unlink()
        cache.close()


def test_old_attachments_fork_and_spawn_children_and_cli_see_growth(table_name):
    t = shmreg.Table(table_name)
    # A process attached before the growth: it waits while this one grows
    # the table from empty, then reads.
    p = subprocess.Popen([sys.executable, "-c", (
        "import shmreg, sys\n"
        "t = shmreg.Table.open(sys.argv[1])\n"
        "print(len(t), t.stats()['index_slots'], flush=True)\n"
        "sys.stdin.readline()\n"
        "missing = [i for i in range(0, 200_000, 13) if t.get(f'k{i}') != ('v%d' % i) * 3]\n"
        "print(len(t), len(missing), t.stats()['index_slots'], flush=True)\n"), table_name],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = p.stdout.readline().split()
        assert first[0] == "0", first
        slots0 = int(first[1])
        for i in range(200_000):
            t[f"k{i}"] = ("v%d" % i) * 3
        p.stdin.write("go\n")
        p.stdin.flush()
        n, missing, slots1 = map(int, p.stdout.readline().split())
        assert p.wait(60) == 0, p.stderr.read()
        assert (n, missing) == (200_000, 0) and slots1 > slots0
        # A fork child (of this process, attached before) and a spawn child.
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        c = ctx.Process(target=_count_and_check, args=(t, q))
        c.start()
        assert q.get(timeout=60) == (200_000, 0)
        c.join(30)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        c = ctx.Process(target=_count_and_check, args=(t, q))
        c.start()
        assert q.get(timeout=60) == (200_000, 0)
        c.join(30)
        # The CLI.
        out = subprocess.run([sys.executable, "-m", "shmreg", "get", table_name, "k199999"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "v199999" in out.stdout, out.stderr
        out = subprocess.run([sys.executable, "-m", "shmreg", "stat", table_name],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "200,000" in out.stdout.replace("200000", "200,000"), out.stdout
        assert "allocated" in out.stdout, out.stdout
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        for f in (p.stdin, p.stdout, p.stderr):
            f.close()
        t.unlink()
        t.close()


def _count_and_check(t, q):
    missing = sum(1 for i in range(0, 200_000, 7) if t.get(f"k{i}") != ("v%d" % i) * 3)
    q.put((len(t), missing))


def test_compaction_gives_memory_back(table_name):
    with shmreg.Table(table_name) as t:
        for i in range(200_000):
            t[f"key-{i:09d}"] = value_of(str(i))
        full = allocated(t)
        keep = set(range(0, 200_000, 20))
        for i in range(200_000):
            if i not in keep:
                del t[f"key-{i:09d}"]
        assert allocated(t) > full * 0.9    # deletes alone give nothing back
        released = t.compact()
        after = allocated(t)
        assert released > 0 and after < full * 0.25, (full, after, released)
        s = t.stats()
        assert s["shrink_events"] > 0 and s["compaction_moves"] > 0
        t.check()
        assert len(t) == len(keep)
        for i in keep:
            assert t[f"key-{i:09d}"] == value_of(str(i))
        # And it grows again.
        for i in range(50_000):
            t[f"again-{i}"] = i
        t.check()
        assert t["again-49999"] == 49999
        t.unlink()


def test_the_watcher_sweep_compacts_mostly_empty_shards(table_name):
    with shmreg.Table(table_name) as t:
        for i in range(100_000):
            t[i] = b"x" * 100
        full = allocated(t)
        for i in range(100_000):
            if i % 50:
                del t[i]
        w = shmreg.Watcher(t, interval=0.05)
        w.sweep()
        assert allocated(t) < full / 3
        t.check()
        assert all(t[i] == b"x" * 100 for i in range(0, 100_000, 50))
        t.unlink()


# -- a full filesystem while growing -----------------------------------------------------------

@pytest.fixture
def small_tmpfs():
    """An 8 MiB tmpfs; needs CAP_SYS_ADMIN (root), which CI has."""
    d = tempfile.mkdtemp(prefix="shmreg-grow-")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", d],
                       capture_output=True, text=True)
    if r.returncode != 0:
        os.rmdir(d)
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", "-l", d], check=True)
    os.rmdir(d)


@pytest.mark.timeout(120)
def test_nospace_while_growing_is_an_error_and_the_table_stays_intact(small_tmpfs):
    code = r"""
        import os, shmreg, sys
        c = shmreg.Cache("cache", grow=True)    # made first: it must find room to grow later
        p = shmreg.Table("presized", capacity=2000, memory=1 << 19)   # all allocated at creation
        t = shmreg.Table("grows")
        n = 0
        try:
            while True:
                t[f"k{n}"] = ("%d|" % n) * 20
                n += 1
        except shmreg.NoSpaceError as e:
            assert isinstance(e, OSError) and "full" in str(e), e
        assert n > 10_000, n
        t.check()
        assert len(t) == n
        assert all(t[f"k{i}"] == ("%d|" % i) * 20 for i in range(n))
        assert t.stats()["nospace_errors"] > 0
        # A pre-sized table never needs more than it has: churn that
        # rebuilds its index many times works on the full filesystem.
        for i in range(30_000):
            p[f"p{i}"] = b"p" * 40
            if i >= 1500:
                del p[f"p{i - 1500}"]
        assert p.stats()["index_rebuilds"] > 0 and len(p) == 1500
        p.check()
        # Another process sees the same, intact table.
        for i in range(0, n, 101):
            assert t.get(f"k{i}") is not None
        # Room comes back after deletes and compaction; writes work again.
        for i in range(0, n, 2):
            del t[f"k{i}"]
        assert t.compact() > 0
        for i in range(1000):
            t[f"again{i}"] = i
        t.check()
        # A cache on a full filesystem evicts to make room; only a shard
        # that has nothing left to give back (its first page, full of
        # tombstones) refuses with NoSpaceError.  Either way it stays intact.
        refused = 0
        for i in range(100_000):
            try:
                c.set(f"c{i}", b"y" * 50)
            except shmreg.NoSpaceError:
                refused += 1
        s = c.table.stats()
        assert s["evictions"] > 0 and refused < 50_000, (s["evictions"], refused)
        c.table.check()
        assert c.get("c99999") in (None, b"y" * 50)
        print("ok", n)
    """
    proc = run_py(code, env={"SHMREG_DIR": small_tmpfs}, timeout=110, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stdout + proc.stderr


# -- growth under SIGKILLed writers and verifying readers --------------------------------------

WRITER = r"""
import hashlib, os, sys
import shmreg
name, wid, start, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def value_of(key):
    d = hashlib.blake2b(key.encode(), digest_size=16).digest()
    n = 1 + d[0] + d[1] % 45
    return (d * (n // 16 + 1))[:n]

t = shmreg.Table.open(name)
for i in range(start, stop):
    k = f"{wid}-{i}"
    t[k] = value_of(k)
    if i % 500 == 499:
        t[f"progress-{wid}"] = i + 1       # every key below is committed
t[f"progress-{wid}"] = stop
"""

READER = r"""
import hashlib, random, sys
import shmreg
name, wids = sys.argv[1], sys.argv[2].split(",")

def value_of(key):
    d = hashlib.blake2b(key.encode(), digest_size=16).digest()
    n = 1 + d[0] + d[1] % 45
    return (d * (n // 16 + 1))[:n]

t = shmreg.Table.open(name)
rng = random.Random()
checked = bad = 0
while t.get("stop") is None:
    wid = rng.choice(wids)
    done = t.get(f"progress-{wid}", 0)
    for _ in range(200):
        if done == 0:
            break
        k = f"{wid}-{rng.randrange(done)}"
        v = t.get(k)
        checked += 1
        if v != value_of(k):
            bad += 1
            print("BAD", k, v, flush=True)
print("checked", checked, "bad", bad, flush=True)
"""


@pytest.mark.timeout(600)
@pytest.mark.parametrize("total", [pytest.param(1_000_000, id="1M"),
                                   pytest.param(4_000_000, id="4M", marks=pytest.mark.slow)])
def test_growth_under_sigkilled_writers_and_verifying_readers(table_name, total):
    t = shmreg.Table(table_name)
    wids = ["a", "b"]
    per = total // len(wids)
    rng = random.Random(1234)
    readers = [spawn_py(READER, table_name, ",".join(wids)) for _ in range(2)]
    kills = 0
    try:
        for wid in wids:
            while True:
                start = t.get(f"progress-{wid}", 0)
                if start >= per:
                    break
                w = spawn_py(WRITER, table_name, wid, str(start), str(per))
                # Kill it at a random moment (until enough kills happened).
                if kills < 12:
                    try:
                        w.wait(timeout=rng.uniform(0.2, 1.5))
                    except subprocess.TimeoutExpired:
                        w.send_signal(signal.SIGKILL)
                        kills += 1
                out, err = w.communicate(timeout=300)
                assert w.returncode in (0, -signal.SIGKILL), err
        t["stop"] = 1
        for r in readers:
            out, err = r.communicate(timeout=60)
            assert r.returncode == 0, err
            assert "bad 0" in out and "BAD" not in out, out
            assert int(out.split()[1]) > 1000, out
        assert kills >= 5
        # Nothing committed was lost, every value is intact, check() passes.
        t.check()
        for wid in wids:
            assert t[f"progress-{wid}"] == per
            for i in range(per):
                k = f"{wid}-{i}"
                assert t[k] == value_of(k), k
        assert len(t) == total + len(wids) + 1
        assert t.stats()["growth_events"] > 100
    finally:
        t["stop"] = 1
        for r in readers:
            stop_process_tree(r)
        t.unlink()
        t.close()
