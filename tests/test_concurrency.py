"""Concurrency: exact counters, insert_new races, torn reads and threads.

Every worker is a real process (``fork`` start method) or a real thread;
every join has a timeout, and every table is unlinked by the fixtures.
"""

from __future__ import annotations

import array
import hashlib
import multiprocessing
import os
import random
import threading
import time
import traceback

import pytest

import shmreg

pytestmark = pytest.mark.timeout(120)

ctx = multiprocessing.get_context("fork")

JOIN_TIMEOUT = 60


def _join_all(procs, timeout=JOIN_TIMEOUT, check_codes=True):
    """Join every process (bounded); kill and fail on a straggler."""
    deadline = time.monotonic() + timeout
    stuck = []
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            stuck.append(p)
    for p in stuck:
        p.kill()
        p.join(5)
    assert not stuck, f"{len(stuck)} worker process(es) did not finish within {timeout} s"
    codes = [p.exitcode for p in procs]
    if check_codes:
        assert codes == [0] * len(procs), f"worker exit codes: {codes}"
    return codes


def _kill_all(procs):
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)


# --------------------------------------------------------------------------
# update_counter: exact under 8 processes
# --------------------------------------------------------------------------

N_PROCS = 8
N_INCR = 20_000


def _counter_worker(name, barrier, out_path):
    t = shmreg.Table.open(name)
    got = array.array("q")
    barrier.wait(30)
    for _ in range(N_INCR):
        got.append(t.update_counter("ctr"))
    t.close()
    with open(out_path, "wb") as f:
        got.tofile(f)


def test_update_counter_exact_across_processes(table_name, tmp_path):
    t = shmreg.Table.create(table_name, capacity=1000, memory=1 << 20)
    barrier = ctx.Barrier(N_PROCS)
    paths = [tmp_path / f"w{i}.bin" for i in range(N_PROCS)]
    procs = [ctx.Process(target=_counter_worker, args=(table_name, barrier, str(p)))
             for p in paths]
    try:
        for p in procs:
            p.start()
        _join_all(procs)
    finally:
        _kill_all(procs)

    assert t["ctr"] == N_PROCS * N_INCR
    # Every increment is atomic: the values returned to all callers together
    # are exactly 1..N (no duplicate, no gap), and increase within each process.
    seen = []
    for path in paths:
        got = array.array("q")
        with open(path, "rb") as f:
            got.frombytes(f.read())
        assert len(got) == N_INCR
        assert all(a < b for a, b in zip(got, got[1:]))
        seen.extend(got)
    seen.sort()
    assert seen == list(range(1, N_PROCS * N_INCR + 1))
    t.check()
    t.close()


# --------------------------------------------------------------------------
# insert_new: exactly one winner per key
# --------------------------------------------------------------------------

RACE_ROUNDS = 20


def _insert_new_worker(name, barrier, wid, out_path):
    t = shmreg.Table.open(name)
    results = []
    for r in range(RACE_ROUNDS):
        barrier.wait(30)  # everybody released at once: a real race per key
        results.append(t.insert_new(f"race-{r}", f"winner-{wid}"))
    t.close()
    with open(out_path, "w") as f:
        f.write("".join("1" if x else "0" for x in results))


def test_insert_new_race_has_exactly_one_winner(table_name, tmp_path):
    t = shmreg.Table.create(table_name, capacity=1000, memory=1 << 20)
    barrier = ctx.Barrier(N_PROCS)
    paths = [tmp_path / f"w{i}.txt" for i in range(N_PROCS)]
    procs = [ctx.Process(target=_insert_new_worker, args=(table_name, barrier, i, str(p)))
             for i, p in enumerate(paths)]
    try:
        for p in procs:
            p.start()
        _join_all(procs)
    finally:
        _kill_all(procs)

    results = [p.read_text() for p in paths]
    assert all(len(r) == RACE_ROUNDS for r in results)
    for r in range(RACE_ROUNDS):
        winners = [wid for wid in range(N_PROCS) if results[wid][r] == "1"]
        assert len(winners) == 1, f"round {r}: winners {winners}"
        assert t[f"race-{r}"] == f"winner-{winners[0]}"
    assert len(t) == RACE_ROUNDS
    t.check()
    t.close()


# --------------------------------------------------------------------------
# Torn reads: values carry their own checksum
# --------------------------------------------------------------------------

N_KEYS = 50
TORN_SECONDS = 2.5
_POOL = os.urandom(1 << 17)


def make_checked_value(rng: random.Random) -> bytes:
    """A value of 1 B .. 64 KiB that proves its own integrity.

    From 20 bytes: a 16-byte blake2b digest of the payload, then the payload
    (a random slice of a random pool, so two values almost never agree).
    Shorter: one random byte repeated (a mix of two values shows two bytes).
    """
    r = rng.random()
    if r < 0.1:
        n = rng.randint(1, 19)
        return bytes([rng.randrange(256)]) * n
    n = rng.randint(20, 1024) if r < 0.5 else rng.randint(1025, 65536)
    start = rng.randrange(len(_POOL) - n + 16 + 1)
    payload = _POOL[start:start + n - 16]
    return hashlib.blake2b(payload, digest_size=16).digest() + payload


def value_ok(v) -> bool:
    if type(v) is not bytes or not v:
        return False
    if len(v) >= 20:
        return hashlib.blake2b(v[16:], digest_size=16).digest() == v[:16]
    return v.count(v[:1]) == len(v)


def _torn_writer(name, seed, deadline, conn):
    try:
        t = shmreg.Table.open(name)
        rng = random.Random(seed)
        writes = 0
        while time.monotonic() < deadline:
            k = f"key-{rng.randrange(N_KEYS)}"
            if rng.random() < 0.05:
                t.delete(k)
            else:
                t.set(k, make_checked_value(rng))
            writes += 1
        conn.send({"writes": writes})
    except BaseException:
        conn.send({"error": traceback.format_exc()})


def _read_loop(t, deadline, stats, how):
    """Read every key, through get() or through items() snapshots, verifying
    every value seen."""
    keys = [f"key-{i}" for i in range(N_KEYS)]
    digests = set()

    def seen(k, v):
        if value_ok(v):
            stats["verified"] += 1
            digests.add(v[:16])
        else:
            stats["bad"] += 1
            if len(stats["bad_samples"]) < 5:
                stats["bad_samples"].append((k, len(v) if isinstance(v, bytes) else repr(v)[:80]))

    while time.monotonic() < deadline:
        if how == "get":
            for k in keys:
                v = t.get(k)
                if v is None:
                    stats["misses"] += 1
                else:
                    seen(k, v)
        else:
            for k, v in t.items():
                seen(k, v)
    stats["distinct"] = len(digests)


def _new_stats():
    return {"verified": 0, "bad": 0, "misses": 0, "distinct": 0, "bad_samples": []}


def _torn_reader(name, deadline, how, conn):
    try:
        t = shmreg.Table.open(name)
        stats = _new_stats()
        _read_loop(t, deadline, stats, how)
        stats["retries"] = t.stats()["read_retries"]
        conn.send(stats)
    except BaseException:
        conn.send({"error": traceback.format_exc()})


def _torn_reader_threads(name, deadline, how, nthreads, conn):
    """One process, one shared Table object, several reader threads."""
    try:
        t = shmreg.Table.open(name)
        all_stats = [_new_stats() for _ in range(nthreads)]
        errors = []

        def run(s):
            try:
                _read_loop(t, deadline, s, how)
            except BaseException:
                errors.append(traceback.format_exc())

        threads = [threading.Thread(target=run, args=(s,)) for s in all_stats]
        for th in threads:
            th.start()
        for th in threads:
            th.join(deadline - time.monotonic() + 30)
        if errors or any(th.is_alive() for th in threads):
            conn.send({"error": "".join(errors) or "reader thread did not finish"})
            return
        for s in all_stats:
            conn.send(s)
    except BaseException:
        conn.send({"error": traceback.format_exc()})


@pytest.mark.parametrize("readers, how", [
    ("processes", "get"),      # lock-free point reads, one Table per process
    ("threads", "get"),        # reader threads sharing one Table object
    ("processes", "items"),    # lock-free shard snapshots (traversal)
])
def test_no_torn_reads(table_name, readers, how):
    t = shmreg.Table.create(table_name, capacity=1024, memory=64 << 20, shards=4)
    rng = random.Random(1234)
    for i in range(N_KEYS):
        t.set(f"key-{i}", make_checked_value(rng))
    deadline = time.monotonic() + TORN_SECONDS
    procs, conns = [], []

    def spawn(target, *args):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=target, args=(*args, child))
        procs.append(p)
        conns.append(parent)
        p.start()
        child.close()

    n_readers = 3
    try:
        for w in range(3):
            spawn(_torn_writer, table_name, 100 + w, deadline)
        if readers == "processes":
            for _ in range(n_readers):
                spawn(_torn_reader, table_name, deadline, how)
        else:
            spawn(_torn_reader_threads, table_name, deadline, how, n_readers)
        reports = []
        for c in conns:
            while c.poll(TORN_SECONDS + JOIN_TIMEOUT):
                try:
                    reports.append(c.recv())
                except EOFError:
                    break
        codes = _join_all(procs, check_codes=False)
    finally:
        _kill_all(procs)

    errors = [r["error"] for r in reports if "error" in r]
    assert not errors, "\n".join(errors)
    assert codes == [0] * len(procs), (
        f"worker exit codes {codes} (writers first; -11 = SIGSEGV while reading)")
    writes = sum(r["writes"] for r in reports if "writes" in r)
    reader_reports = [r for r in reports if "verified" in r]
    assert len(reader_reports) == n_readers
    assert writes > 100, f"writers made only {writes} writes"
    bad = sum(r["bad"] for r in reader_reports)
    samples = [s for r in reader_reports for s in r["bad_samples"]]
    assert bad == 0, f"{bad} torn/corrupt values read, e.g. {samples}"
    for r in reader_reports:
        # Each reader really read while the values changed under it.
        assert r["verified"] > 500, r
        assert r["distinct"] > 20, r
    for i in range(N_KEYS):
        v = t.get(f"key-{i}")
        assert v is None or value_ok(v)
    t.check()
    t.close()


# --------------------------------------------------------------------------
# Threads sharing one Table object
# --------------------------------------------------------------------------

N_THREADS = 8
THREAD_ITERS = 3000
N_ONCE = 100


def test_threads_share_one_table(table_name):
    # 16 keys of up to 64 KiB each: room for all of them in any one shard.
    table = shmreg.Table.create(table_name, capacity=1000, memory=16 << 20, shards=4)
    errors = []
    once_wins = [[] for _ in range(N_THREADS)]
    start = threading.Barrier(N_THREADS)

    def worker(tid):
        try:
            rng = random.Random(tid)
            start.wait(30)
            for i in range(THREAD_ITERS):
                table.update_counter("shared")
                table.update_counter(f"group-{tid % 4}", 3)
                k = f"k{rng.randrange(16)}"  # overlapping keys
                table.set(k, make_checked_value(rng))
                v = table.get(k)
                if v is not None and not value_ok(v):
                    errors.append(f"bad value under {k}: {len(v)} bytes")
                if i % 3 == 0:
                    table.delete(f"k{rng.randrange(16)}")
                if i % 30 == 0:
                    j = i // 30
                    if table.insert_new(f"once-{j}", tid):
                        once_wins[tid].append(j)
        except BaseException:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(N_THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(JOIN_TIMEOUT)
    assert not any(th.is_alive() for th in threads), "a worker thread hung"
    assert not errors, "\n".join(errors[:3])

    assert table["shared"] == N_THREADS * THREAD_ITERS
    for g in range(4):
        # two threads per group, 3 per iteration each
        assert table[f"group-{g}"] == 2 * 3 * THREAD_ITERS
    n_once = THREAD_ITERS // 30
    wins = sorted(j for w in once_wins for j in w)
    assert wins == list(range(n_once)), "each insert_new key must have exactly one winner"
    for j in range(n_once):
        winner = [tid for tid in range(N_THREADS) if j in once_wins[tid]]
        assert table[f"once-{j}"] == winner[0]
    for k in range(16):
        v = table.get(f"k{k}")
        assert v is None or value_ok(v)
    table.check()
    table.close()
