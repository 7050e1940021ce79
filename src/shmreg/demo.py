"""`shmreg demo`: several worker processes share one table, one of them is
SIGKILLed in the middle of a write, and the table is proven intact.

Every number the report prints is read back from the shared table and
checked against what the workers were told to do.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time

import shmreg
from shmreg import _core

JOBS = 2000


def _worker(name: str, wid: int, seconds: float, go) -> None:
    t = shmreg.Table.open(name)
    go.wait()
    deadline = time.monotonic() + seconds
    n = 0
    job = wid
    while time.monotonic() < deadline:
        t.update_counter("hits")
        t.update_counter(f"worker:{wid}:ops")
        # Each job must be claimed by exactly one worker (ETS insert_new).
        if job < JOBS:
            t.insert_new(f"job:{job}", wid)
            job += 1
        t.set(f"session:{wid}:{n % 50}", {"worker": wid, "n": n}, ttl=0.5)
        n += 1
    t.close()


def _victim(name: str, go, kill_after: int) -> None:
    t = shmreg.Table.open(name)
    # An owned entry: it lives exactly as long as this process.
    t.set("worker:victim", {"pid": os.getpid(), "doing": "writing victim:* keys"}, owned=True)
    # The crash hook: SIGKILL ourselves inside our `kill_after`-th write, after
    # the new value is published and while the shard lock is held.
    _core._arm_crash_point(f"set:published:{kill_after}")
    go.wait()
    i = 0
    while True:
        t[f"victim:{i}"] = os.urandom(256)
        t["victim:done"] = i + 1   # committed writes so far
        i += 1


def _cache_user(name: str, go) -> None:
    cache = shmreg.Cache(name)
    go.wait()

    def expensive() -> str:
        cache.table.update_counter("factory-calls", ttl=60)
        time.sleep(0.3)
        return "the answer"

    cache.get_or_set("report", expensive)
    cache.close()


def run(workers: int = 4, seconds: float = 2.0, out=sys.stdout) -> int:
    """Run the demo; return 0 when every check passed."""
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    name = f"demo-{os.getpid()}"
    p = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    t = shmreg.Table.create(name, capacity=20_000, memory=16 << 20)
    ok = True

    def verdict(cond: bool, text: str) -> None:
        nonlocal ok
        ok &= bool(cond)
        p(f"  [{'ok' if cond else 'FAIL'}] {text}")

    try:
        p(f"shmreg demo: table {name!r} at {t.path}, {t.stats()['shards']} shards")
        p(f"starting {workers} workers for {seconds:.1f}s, plus one that will be kill -9'd mid-write")
        deaths = []
        watcher = shmreg.Watcher(t, on_death=lambda pid, entries: deaths.append((pid, dict(entries))),
                                 interval=0.2)
        watcher.start()
        go = ctx.Event()
        procs = [ctx.Process(target=_worker, args=(name, w, seconds, go)) for w in range(workers)]
        victim = ctx.Process(target=_victim, args=(name, go, 400))
        for pr in procs + [victim]:
            pr.start()
        time.sleep(0.2)
        go.set()
        victim.join(30)
        for pr in procs:
            pr.join(seconds + 30)
        p("")
        p("workers:")
        per = [t.get(f"worker:{w}:ops", 0) for w in range(workers)]
        for w, n in enumerate(per):
            p(f"  worker {w}: {n:,} rounds")
        total = t["hits"]
        verdict(total == sum(per),
                f"shared counter 'hits' = {total:,} = sum of every worker's rounds (update_counter is exact)")
        claimed = [t.get(f"job:{j}") for j in range(JOBS)]
        done = [c for c in claimed if c is not None]
        verdict(all(c in range(workers) for c in done),
                f"{len(done):,} jobs claimed, each by exactly one worker (insert_new)")

        p("")
        p("kill -9 in the middle of a write:")
        verdict(victim.exitcode == -signal.SIGKILL,
                f"victim pid {victim.pid} died by SIGKILL inside its write #400, holding a shard lock")
        committed = t.get("victim:done", 0)
        present = sum(1 for i in range(committed) if f"victim:{i}" in t)
        verdict(present == committed,
                f"all {committed} writes it committed before dying are there")
        t["after-crash"] = "the next writer repaired the shard and carried on"
        st = t.stats()
        verdict(st["repairs"] >= 1, f"shards repaired after the crash: {st['repairs']}")
        verdict("worker:victim" not in t,
                "its owned entry 'worker:victim' vanished with it (no cleanup code ran)")
        deadline = time.monotonic() + 5
        while not deaths and time.monotonic() < deadline:
            time.sleep(0.01)
        post = next((e for pid, e in deaths if pid == victim.pid), None)
        verdict(post is not None and post.get("worker:victim", {}).get("pid") == victim.pid,
                f"the watcher's post-mortem: pid {victim.pid} was {post and post['worker:victim']['doing']!r}")

        p("")
        p("cache single flight:")
        cname = f"{name}-cache"
        cache = shmreg.Cache(cname, ttl=60, capacity=1000, memory=1 << 20)
        go2 = ctx.Event()
        users = [ctx.Process(target=_cache_user, args=(cname, go2)) for _ in range(workers)]
        for u in users:
            u.start()
        t0 = time.monotonic()
        go2.set()
        for u in users:
            u.join(30)
        verdict(all(u.exitcode == 0 for u in users) and cache.table["factory-calls"] == 1,
                f"{workers} processes asked for the same missing key at once: the 0.3 s factory "
                f"ran {cache.table['factory-calls']} time(s), all done in {time.monotonic() - t0:.2f} s")
        cache.unlink()

        p("")
        p("TTL:")
        live = sum(1 for _ in t.select(prefix="session:"))
        p(f"  {live} sessions with a 0.5 s TTL right after the run")
        time.sleep(0.6)
        gone = sum(1 for _ in t.select(prefix="session:"))
        t.purge_expired()   # (the watcher's sweep may have done it already)
        verdict(gone == 0, f"0.6 s later none is visible, and the memory of "
                           f"{t.stats()['expirations']} expired entries has been reclaimed")

        p("")
        t.check()
        st = t.stats()
        verdict(True, f"check(): every invariant holds ({st['entries']:,} entries, "
                      f"{st['bytes_used']:,} bytes of items, {st['index_rebuilds']} index rebuilds)")
        p("")
        p("demo passed" if ok else "demo FAILED")
    finally:
        if "watcher" in locals():
            watcher.stop()
        t.close()
        shmreg.unlink(name)
    return 0 if ok else 1
