"""Shared setup for the cache benchmarks (pytest suite and report.py).

**Hit latency.**  The data set of the other benchmarks (100,000 entries,
16-byte keys, 64-byte values; the same 1,000 hit keys) in each cache, and
1,000 ``get`` hits per timed call:

- ``shmreg Cache.get``: :class:`shmreg.Cache` (ttl 1 h, capacity 110,000),
  shared by every process on the host;
- ``shmreg Cache.get_or_set``: the same call through ``get_or_set`` (a hit:
  the factory is never called);
- ``shmreg Table.get``: the plain table underneath, for reference (the
  speed benchmarks' table when the session has one);
- ``cachetools TTLCache``: ``TTLCache(maxsize=110_000, ttl=3600).get``, a
  per-process cache (every worker would hold and fill its own copy);
- ``diskcache``: ``diskcache.Cache`` (SQLite + files) in a tmp dir, shared
  between processes through the file system;
- ``redis``: ``GET`` through redis-py on a unix socket (the session's
  private server; entries without a TTL - a GET costs the same).

**Single flight.**  ``SF_PROCS`` (8) worker processes each need the same
``SF_KEYS`` (20) keys, whose factory takes ``SF_DELAY`` (50 ms,
``time.sleep``: a slow query).  Compared: every process caching for itself
(a ``cachetools.TTLCache`` each: every process computes every key, 8 x 20
factory calls) against one :class:`shmreg.Cache` and ``get_or_set`` (each
key computed once, 20 calls; concurrent callers wait for it).  Two access
orders: ``same`` (every worker walks the keys in the same order, so they
queue behind one computation at a time) and ``staggered`` (worker *i*
starts at key ``i * 20 / 8``, as workers serving different requests do:
the computations spread over the workers).  Workers start behind a barrier
(spawned, ready, then released together); the wall time runs from the
release until the last worker is done.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import shmreg

import _bench_common as bc
from _bench_registry import _Lines

CACHE_TTL = 3600.0
CACHE_CAPACITY = bc.TABLE_CAPACITY

#: backend id -> what its hit loop times
HIT_BACKENDS = {
    "shmreg-cache": "shmreg `Cache.get`",
    "shmreg-get_or_set": "shmreg `Cache.get_or_set` (hit)",
    "shmreg-table": "shmreg `Table.get` (no cache layer, reference)",
    "cachetools": "cachetools `TTLCache.get` (per process)",
    "diskcache": "diskcache `Cache.get` (SQLite, tmp dir)",
    "redis": "redis-py `GET`, unix socket",
}

SF_PROCS = 8
SF_KEYS = 20
SF_DELAY = 0.05
SF_MODES = ("per-process", "shmreg")
SF_ORDERS = ("same", "staggered")

#: Filled in by the pytest benchmarks for the terminal summary:
#: ``HITS[backend] -> ns/op`` (median), ``HITS_MIN`` (fastest call),
#: ``SINGLE_FLIGHT[(mode, order)] -> single_flight() dict``.
HITS: dict = {}
HITS_MIN: dict = {}
SINGLE_FLIGHT: dict = {}


# -- hit latency ----------------------------------------------------------------

def make_shmreg_cache(ds: bc.Dataset, name: str) -> "shmreg.Cache":
    cache = shmreg.Cache(name, ttl=CACHE_TTL, capacity=CACHE_CAPACITY)
    try:
        for k, v in ds.items():
            assert cache.set(k, v) is False, "the cache had to evict while loading"
        assert len(cache) == ds.n
    except BaseException:
        cache.close()
        cache.unlink()
        raise
    return cache


def make_ttlcache(ds: bc.Dataset):
    from cachetools import TTLCache
    c = TTLCache(maxsize=CACHE_CAPACITY, ttl=CACHE_TTL)
    for k, v in ds.items():
        c[k] = v
    assert len(c) == ds.n
    return c


def make_diskcache(ds: bc.Dataset, path: str):
    import diskcache
    c = diskcache.Cache(path)
    with c.transact():
        for k, v in ds.items():
            c.set(k, v, expire=CACHE_TTL)
    assert len(c) == ds.n
    return c


def hit_loop(backend: str, store, ds: bc.Dataset):
    """A zero-argument function doing ``bc.OPS`` hits on ``store``."""
    hits = ds.hit_keys
    if backend == "shmreg-get_or_set":
        gos = store.get_or_set

        def factory():
            raise AssertionError("a hit must not call the factory")

        def run():
            for k in hits:
                gos(k, factory)
        return run
    get = store.get

    def run():
        for k in hits:
            get(k)
    return run


def check_hits(backend: str, store, ds: bc.Dataset) -> None:
    """Every timed key is a hit holding the data set's value (so a broken
    loop cannot produce a fast number).  The speed benchmarks' stores may
    hold the overwrite value instead (their set loop ran first)."""
    want = dict(zip(ds.keys, ds.values))
    new = dict(ds.set_pairs)
    get = store.get
    for k in ds.hit_keys:
        assert get(k) in (want[k], new[k]), (backend, k)
    hit_loop(backend, store, ds)()


# -- single flight ----------------------------------------------------------------

_SF_WORKER = r"""
import json, os, sys, time
mode, order, name = sys.argv[1], sys.argv[2], sys.argv[3]
idx, nprocs, nkeys, delay = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
keys = [f"sf:{k}" for k in range(nkeys)]
if order == "staggered":
    shift = idx * nkeys // nprocs
    keys = keys[shift:] + keys[:shift]
calls = 0

def compute(k):
    global calls
    calls += 1
    time.sleep(delay)            # a slow query
    return "value of " + k

if mode == "per-process":
    from cachetools import TTLCache
    local = TTLCache(maxsize=1024, ttl=300)

    def need(k):
        v = local.get(k)
        if v is None:
            v = local[k] = compute(k)
        return v
else:
    import shmreg
    cache = shmreg.Cache(name, ttl=300)

    def need(k):
        return cache.get_or_set(k, lambda: compute(k), timeout=60)

print("ready", flush=True)
sys.stdin.readline()
t0 = time.perf_counter()
ok = all(need(k) == "value of " + k for k in keys)
elapsed = time.perf_counter() - t0
print(json.dumps({"calls": calls, "elapsed": elapsed, "ok": ok}), flush=True)
"""


def single_flight(mode: str, order: str, nprocs: int = SF_PROCS, nkeys: int = SF_KEYS,
                  delay: float = SF_DELAY, timeout: float = 60.0) -> dict:
    """Run the scenario once (see the module doc); returns factory calls,
    wall time (release to last worker done) and per-worker figures."""
    name = bc.unique_table_name("sf")
    cache = shmreg.Cache(name, ttl=300, capacity=1000) if mode == "shmreg" else None
    env = dict(os.environ)
    env.pop("SHMREG_CRASH_AT", None)
    procs: list = []
    readers: list = []
    try:
        for i in range(nprocs):
            p = subprocess.Popen([sys.executable, "-c", _SF_WORKER, mode, order, name, str(i),
                                  str(nprocs), str(nkeys), str(delay)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env=env)
            procs.append(p)
            readers.append(_Lines(p.stdout))
        for r in readers:
            line = r.readline(timeout, "single-flight worker ready")
            if line != "ready":
                raise RuntimeError(f"worker said {line!r}")
        t0 = time.perf_counter()
        for p in procs:
            p.stdin.write(b"go\n")
            p.stdin.flush()
        results = [json.loads(r.readline(timeout, "single-flight worker result")) for r in readers]
        wall = time.perf_counter() - t0
        for p in procs:
            p.stdin.close()
            p.wait(timeout=timeout)
            if p.returncode != 0:
                raise RuntimeError(f"worker exited with {p.returncode}: {p.stderr.read()!r}")
        if cache is not None:
            assert len(cache) == nkeys
            cache.table.check()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None and not f.closed:
                    f.close()
        for r in readers:
            r.close()
        if cache is not None:
            cache.close()
            cache.unlink()
    calls = [r["calls"] for r in results]
    return {"mode": mode, "order": order, "procs": nprocs, "keys": nkeys, "factory_s": delay,
            "factory_calls": sum(calls), "calls_per_proc": calls,
            "expected_calls": nkeys * (nprocs if mode == "per-process" else 1),
            "all_values_ok": all(r["ok"] for r in results), "wall_s": wall,
            "worker_s_max": max(r["elapsed"] for r in results),
            "worker_s_mean": sum(r["elapsed"] for r in results) / nprocs,
            "factory_s_total": sum(calls) * delay, "cpus": os.cpu_count()}


# -- formatting -------------------------------------------------------------------

def markdown_hits_table(ns: dict, ns_min: dict | None = None) -> str:
    """``ns[backend] -> ns/op`` as Markdown, with shmreg ``Cache.get``
    compared to each ("2.0x faster" = half the time)."""
    base = ns.get("shmreg-cache")
    head = "| cache | ns/op | shmreg Cache.get vs it |"
    rule = "|---|---:|---:|"
    if ns_min:
        head += " min ns/op |"
        rule += "---:|"
    lines = [head, rule]
    for b, what in HIT_BACKENDS.items():
        if b not in ns:
            continue
        rel = "-" if b == "shmreg-cache" else bc._versus(base, ns[b])
        row = f"| {what} | {ns[b]:,.0f} | {rel} |"
        if ns_min:
            row += f" {ns_min[b]:,.0f} |" if b in ns_min else " n/a |"
        lines.append(row)
    return "\n".join(lines)


def markdown_single_flight_table(results: dict) -> str:
    """``results[(mode, order)] -> single_flight() dict`` as Markdown, with
    per-process / shmreg ratios per order."""
    lines = ["| order | caching | factory calls | wall s (release to last done) | "
             "slowest worker s | mean worker s |",
             "|---|---|---:|---:|---:|---:|"]
    for order in SF_ORDERS:
        for mode in SF_MODES:
            r = results.get((mode, order))
            if r is None:
                continue
            what = ("a TTLCache per process" if mode == "per-process"
                    else "one shmreg.Cache, get_or_set")
            lines.append(f"| {order} | {what} | {r['factory_calls']} | {r['wall_s']:.3f} | "
                         f"{r['worker_s_max']:.3f} | {r['worker_s_mean']:.3f} |")
    for order in SF_ORDERS:
        a, b = results.get(("per-process", order)), results.get(("shmreg", order))
        if a and b:
            lines.append("")
            lines.append(f"{order} order: per-process caching made {a['factory_calls'] / b['factory_calls']:.1f}x "
                         f"the factory calls and took {a['wall_s'] / b['wall_s']:.2f}x the wall time "
                         "of the shared cache.")
    return "\n".join(lines)
