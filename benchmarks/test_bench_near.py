"""The near cache (``Cache(name, url=..., near=True)``) against its peers.

    python -m pytest benchmarks/test_bench_near.py -q -s --benchmark-columns=min,median,ops

One private server (``redis-server`` on PATH, or ``$SHMREG_REDIS_SERVER``)
on a unix socket.  Each benchmarked call reads 200 keys (times are per 200
reads); the group puts side by side, in the same run:

- ``near hit``: ``Cache(url=..., near=True).get`` of entries the near table holds;
- ``local Cache.get``: a shared-memory :class:`~shmreg.Cache` (the target:
  a near hit within 2x of it);
- ``Cache.get on Redis``: the same cache without the near table (one ``GET``);
- ``redis-py GET``: plain redis-py on the same server.

``test_invalidation_latency``: host B (its own ``SHMREG_DIR`` and host id)
runs the agent in a child process; host A writes a key that B's near table
holds and the clock runs until the entry is gone from B's table (write
start to eviction; the write's own round trip is part of it).  p50/p99 of
300 writes.

The summary prints microseconds per read and the ratios.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

import _bench_common as bc

import shmreg

redis = pytest.importorskip("redis")

OPS, KEYS, VALUE = bc.REDIS_OPS, bc.REDIS_KEYS, bc.REDIS_VALUE
RESULTS: dict = {}


@pytest.fixture(scope="module")
def url(server):
    return f"unix://{server.socket}?db=0"


@pytest.fixture(scope="module")
def near(url):
    c = shmreg.Cache("bench-near", url=url, near=True, ttl=3600)
    for k in KEYS:
        c.set(k, VALUE)
    c.table.start()
    deadline = time.monotonic() + 10
    while c.table.near_stats()["near_state"] != "ready":
        assert time.monotonic() < deadline, "the near cache never became ready"
        time.sleep(0.01)
    while len(c.table.near) < OPS:           # fill (a fill racing a write's invalidation retries)
        assert time.monotonic() < deadline, "the near table never filled"
        for k in KEYS:
            c.get(k)
        time.sleep(0.05)
    yield c
    c.unlink()
    c.close()


def _run(benchmark, who: str, fn) -> None:
    benchmark.group = f"cache read (time per {OPS} reads)"
    benchmark.extra_info.update(ops_per_call=OPS, backend=who)
    benchmark(fn)
    st = benchmark.stats.stats
    RESULTS[who] = (st.min / OPS * 1e6, st.median / OPS * 1e6)


def test_near_hit(benchmark, near):
    get = near.get
    hits = near.stats()["near_hits"]
    _run(benchmark, "near hit", lambda: [get(k) for k in KEYS])
    assert near.stats()["near_hits"] > hits   # they were near hits


def test_local_cache_get(benchmark):
    c = shmreg.Cache(bc.unique_table_name("near-local"), ttl=3600)
    try:
        for k in KEYS:
            c.set(k, VALUE)
        get = c.get
        _run(benchmark, "local Cache.get", lambda: [get(k) for k in KEYS])
    finally:
        c.unlink()
        c.close()


def test_redis_cache_get(benchmark, url, near):
    c = shmreg.Cache("bench-near", url=url, ttl=3600)
    get = c.get
    _run(benchmark, "Cache.get on Redis", lambda: [get(k) for k in KEYS])
    c.close()


def test_redis_py_get(benchmark, server, near):
    r = redis.Redis(unix_socket_path=server.socket)
    ks = [near.table._t._ek(k) for k in KEYS]
    _run(benchmark, "redis-py GET", lambda: [r.get(k) for k in ks])
    r.close()


AGENT = """
    import sys, time, shmreg
    c = shmreg.Cache(sys.argv[1], url=sys.argv[2], near=True, ttl=3600)
    c.table.start()
    print("started", flush=True)
    sys.stdin.read()
    """


def test_invalidation_latency(url):
    name = bc.unique_table_name("near-lat")
    host_b = tempfile.mkdtemp(prefix="shmreg-bench-hostB-")
    env = {**os.environ, "SHMREG_DIR": host_b, "SHMREG_HOST_ID": "bench-host-B"}
    agent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(AGENT), name, url],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    writer = shmreg.Cache(name, url=url, ttl=3600)            # host A
    try:
        assert agent.stdout.readline().strip() == "started"
        old = os.environ.get("SHMREG_DIR")
        os.environ["SHMREG_DIR"] = host_b                    # a reader on host B
        try:
            reader = shmreg.Cache(name, url=url, near=True, ttl=3600)
        finally:
            if old is None:
                del os.environ["SHMREG_DIR"]
            else:
                os.environ["SHMREG_DIR"] = old
        deadline = time.monotonic() + 10
        while reader.table.near_stats()["near_state"] != "ready":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        nget = reader.table.near.get
        samples, writes = [], []
        for i in range(300):
            writer.set("lat", i)
            deadline = time.monotonic() + 5
            while nget("lat") != i:                          # B holds version i
                assert time.monotonic() < deadline, "B never filled"
                reader.get("lat")
            t0 = time.perf_counter()
            writer.set("lat", -i)
            t1 = time.perf_counter()
            while nget("lat") is not None:
                pass
            samples.append(time.perf_counter() - t0)
            writes.append(t1 - t0)
        samples.sort()
        RESULTS["invalidation"] = (samples[len(samples) // 2] * 1e3,
                                   samples[int(len(samples) * 0.99)] * 1e3,
                                   statistics.median(writes) * 1e3)
        reader.close()
    finally:
        agent.communicate(input="", timeout=30)
        writer.unlink()
        writer.close()
        shutil.rmtree(host_b, ignore_errors=True)


WRITER = """
    import sys, time, redis
    r = redis.Redis(unix_socket_path=sys.argv[1])
    prefix, seconds = sys.argv[2].encode(), float(sys.argv[3])
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        p = r.pipeline(transaction=False)
        for i in range(500):
            p.set(prefix + b"s%d" % ((n + i) % 100000), b"x")
        p.execute()
        n += 500
    print(n, flush=True)
    """


def test_agent_keeps_up_with_a_fast_writer(server, url):
    """A writer pipelining plain SETs on the table's keys at full speed for
    3 s: the agent must handle every invalidation without missing a
    heartbeat (no flush)."""
    c = shmreg.Cache(bc.unique_table_name("near-rate"), url=url, near=True)
    try:
        deadline = time.monotonic() + 10
        while c.table.near_stats()["near_state"] != "ready":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        before = c.table.near_stats()
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(WRITER), server.socket,
                              c.table._t._kp.decode(), "3"],
                             capture_output=True, text=True, timeout=60, check=True)
        writes = int(out.stdout.split()[0])
        time.sleep(0.5)
        after = c.table.near_stats()
        RESULTS["agent rate"] = (writes / 3, after["near_invalidations"] - before["near_invalidations"],
                                 after["near_flushes"] - before["near_flushes"])
    finally:
        c.unlink()
        c.close()


def test_zz_summary():
    """Print the medians and ratios (runs last in this file)."""
    lines = ["", f"near cache reads, us per read (min / median of calls of {OPS}):"]
    for who, v in RESULTS.items():
        if who not in ("invalidation", "agent rate"):
            mn, med = v
            lines.append(f"  {who:<22} {mn:8.3f} / {med:8.3f}")
    if "near hit" in RESULTS:
        nh = RESULTS["near hit"]
        for peer in ("local Cache.get", "Cache.get on Redis", "redis-py GET"):
            if peer in RESULTS:
                p = RESULTS[peer]
                lines.append(f"  near hit / {peer:<20} {nh[0] / p[0]:7.3f}x (min)  "
                             f"{nh[1] / p[1]:7.3f}x (median)")
    if "invalidation" in RESULTS:
        p50, p99, w = RESULTS["invalidation"]
        lines.append(f"  invalidation, write on A to eviction on B: p50 {p50:.3f} ms, "
                     f"p99 {p99:.3f} ms (the write itself: {w:.3f} ms median)")
    if "agent rate" in RESULTS:
        rate, inv, fl = RESULTS["agent rate"]
        lines.append(f"  agent vs a pipelined writer: {rate:,.0f} writes/s for 3 s, "
                     f"{inv:,} keys invalidated, {fl} flushes")
    print("\n".join(lines))
    bc.NOTES.extend(lines)
