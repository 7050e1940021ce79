"""shmreg's Redis/Valkey backend against plain redis-py on the same server.

    python -m pytest benchmarks/test_bench_redis.py -q --benchmark-columns=min,median,ops

One private server (``redis-server`` on PATH, or ``$SHMREG_REDIS_SERVER``),
one unix socket, no persistence.  Each benchmarked call runs 200 operations
on 200 keys (times are per 200 ops); groups put the backend next to the
plain redis-py command that does the same job:

- ``get``: ``Table.get`` (one EVALSHA: GET + owner check) vs ``GET``;
- ``set``: ``Table[k] = v`` (EVALSHA: SET + index + owner bookkeeping) vs ``SET``;
- ``update_counter`` vs ``INCRBY``; ``insert_new`` (a miss: stores) vs ``SET NX``;
- ``owned get``: a get of an owned entry (``GET``, then ``EXISTS`` of the
  owner's lease) and a ``Registry.lookup`` (one script: value, owner and
  lease) vs ``Table.get`` of a plain one.

``test_reap_latency`` measures across two simulated hosts how long a reader
on host B keeps seeing the entries of a process SIGKILLed on host A: with
A's watcher running (its pidfd fires, it deletes the lease), and with none
on A (B's watcher sees the lease expire: bounded by ``lease_ttl``).

The terminal summary prints the medians and ratios; benchmarks/RESULTS.md
keeps one run's.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

import _bench_common as bc

import shmreg

redis = pytest.importorskip("redis")

OPS, KEYS, VALUE = bc.REDIS_OPS, bc.REDIS_KEYS, bc.REDIS_VALUE
RESULTS: dict = {}


@pytest.fixture(scope="module")
def plain(server):
    c = redis.Redis(unix_socket_path=server.socket)
    for k in KEYS:
        c.set("plain:" + k, VALUE)
        c.set("plain:n:" + k, 0)
    return c


@pytest.fixture(scope="module")
def table(server):
    t = shmreg.Table("bench-redis", url=f"unix://{server.socket}?db=0")
    for k in KEYS:
        t[k] = VALUE
        t["n:" + k] = 0
        t.set("owned:" + k, VALUE, owned=True)
    yield t
    t.unlink()
    t.close()


def _run(benchmark, group: str, who: str, fn) -> None:
    benchmark.group = f"{group} (time per {OPS} ops)"
    benchmark.extra_info.update(ops_per_call=OPS, backend=who)
    benchmark(fn)
    st = benchmark.stats.stats
    RESULTS[(group, who)] = (st.min / OPS * 1e6, st.median / OPS * 1e6)


def test_get_plain(benchmark, plain):
    _run(benchmark, "get", "redis-py GET", lambda: [plain.get("plain:" + k) for k in KEYS])


def test_get_shmreg(benchmark, table):
    _run(benchmark, "get", "shmreg", lambda: [table.get(k) for k in KEYS])


def test_set_plain(benchmark, plain):
    _run(benchmark, "set", "redis-py SET", lambda: [plain.set("plain:" + k, VALUE) for k in KEYS])


def test_set_shmreg(benchmark, table):
    def loop():
        for k in KEYS:
            table[k] = VALUE
    _run(benchmark, "set", "shmreg", loop)


def test_counter_plain(benchmark, plain):
    _run(benchmark, "update_counter", "redis-py INCRBY",
         lambda: [plain.incrby("plain:n:" + k, 1) for k in KEYS])


def test_counter_shmreg(benchmark, table):
    _run(benchmark, "update_counter", "shmreg", lambda: [table.update_counter("n:" + k) for k in KEYS])


def test_insert_new_plain(benchmark, plain):
    def loop():
        plain.delete(*["plain:new:" + k for k in KEYS])     # (one command: not per op)
        for k in KEYS:
            plain.set("plain:new:" + k, VALUE, nx=True)
    _run(benchmark, "insert_new", "redis-py SET NX", loop)


def test_insert_new_shmreg(benchmark, table, plain):
    prefix = f"{{shmreg:{table.name}}}:k:snew:"

    def loop():
        # Remove the previous round's keys the same way (one DEL; the index
        # keeps stale members, which insert_new overwrites).
        plain.delete(*[prefix + k for k in KEYS])
        for k in KEYS:
            table.insert_new("new:" + k, VALUE)
    _run(benchmark, "insert_new", "shmreg", loop)


def test_owned_get_plain_entry(benchmark, table):
    _run(benchmark, "owned get", "shmreg get (not owned)", lambda: [table.get(k) for k in KEYS])


def test_owned_get_owned_entry(benchmark, table):
    _run(benchmark, "owned get", "shmreg get (owned)", lambda: [table.get("owned:" + k) for k in KEYS])


def test_owned_get_registry_lookup(benchmark, table):
    reg = shmreg.Registry(table.name, url=table.url)     # (the same table: its owned entries)
    _run(benchmark, "owned get", "Registry.lookup", lambda: [reg.lookup("owned:" + k) for k in KEYS])


def test_interleaved_ratios(plain, table):
    """The same pairs, each baseline and backend call alternating for 40
    rounds: on a loaded machine, drift hits both sides of a round alike, so
    the median of per-round ratios is the figure to quote."""
    reg = shmreg.Registry(table.name, url=table.url)
    newp = f"{{shmreg:{table.name}}}:k:snew:"

    def insert_plain():
        plain.delete(*["plain:new:" + k for k in KEYS])
        for k in KEYS:
            plain.set("plain:new:" + k, VALUE, nx=True)

    def insert_ours():
        plain.delete(*[newp + k for k in KEYS])
        for k in KEYS:
            table.insert_new("new:" + k, VALUE)

    def set_ours():
        for k in KEYS:
            table[k] = VALUE

    pairs = {
        "get": (lambda: [plain.get("plain:" + k) for k in KEYS], lambda: [table.get(k) for k in KEYS]),
        "set": (lambda: [plain.set("plain:" + k, VALUE) for k in KEYS], set_ours),
        "update_counter": (lambda: [plain.incrby("plain:n:" + k, 1) for k in KEYS],
                           lambda: [table.update_counter("n:" + k) for k in KEYS]),
        "insert_new": (insert_plain, insert_ours),
        "get (owned) vs get": (lambda: [table.get(k) for k in KEYS],
                               lambda: [table.get("owned:" + k) for k in KEYS]),
        "Registry.lookup vs get": (lambda: [table.get(k) for k in KEYS],
                                   lambda: [reg.lookup("owned:" + k) for k in KEYS]),
    }
    for name, (base, ours) in pairs.items():
        ratios, tb, to = [], [], []
        for _ in range(40):
            t0 = time.perf_counter()
            base()
            t1 = time.perf_counter()
            ours()
            t2 = time.perf_counter()
            tb.append(t1 - t0)
            to.append(t2 - t1)
            ratios.append((t2 - t1) / (t1 - t0))
        RESULTS[("interleaved", name)] = (min(tb) / OPS * 1e6, min(to) / OPS * 1e6,
                                          statistics.median(ratios))


OWNER = """if 1:
    import sys, time, shmreg
    t = shmreg.Table(sys.argv[1], url=sys.argv[2], lease_ttl=float(sys.argv[3]))
    t.set("job", "busy", owned=True)
    print("ok", flush=True)
    time.sleep(600)
"""

WATCH = """if 1:
    import sys, shmreg
    w = shmreg.Watcher(sys.argv[1], url=sys.argv[2], lease_ttl=float(sys.argv[3]),
                       on_death=None, interval=0.1)
    w.start(); w.wait_active(30)
    print("active", flush=True)
    sys.stdin.read()
"""


def _spawn(code: str, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, **env})


@pytest.mark.parametrize("watcher_on_a", [True, False], ids=["watcher-on-A", "no-watcher-on-A"])
def test_reap_latency(server, watcher_on_a):
    """SIGKILL -> a reader on host B stops seeing the entry (p50 over 15)."""
    url = f"unix://{server.socket}?db=0"
    lease = "2.0"
    host_a = {"SHMREG_HOST_ID": "bench-A"}
    name = f"bench-reap-{watcher_on_a}"
    reader = shmreg.Table(name, url=url)
    watchers = [_spawn(WATCH, {"SHMREG_HOST_ID": "bench-B"}, name, url, lease)]
    if watcher_on_a:
        watchers.append(_spawn(WATCH, host_a, name, url, lease))
    for w in watchers:
        assert w.stdout.readline().strip() == "active"
    samples = []
    try:
        for _ in range(15):
            p = _spawn(OWNER, host_a, name, url, lease)
            assert p.stdout.readline().strip() == "ok"
            assert reader.get("job") == "busy"
            t0 = time.perf_counter()
            os.kill(p.pid, signal.SIGKILL)
            while reader.get("job") is not None:
                if time.perf_counter() - t0 > 30:
                    raise AssertionError("entry never vanished")
            samples.append((time.perf_counter() - t0) * 1e3)
            p.wait(timeout=10)
            p.stdout.close()
            p.stdin.close()
    finally:
        for w in watchers:
            w.stdin.close()
            w.terminate()
            w.wait(timeout=10)
            w.stdout.close()
        reader.unlink()
        reader.close()
    RESULTS[("reap latency ms", "with watcher on A" if watcher_on_a else
             f"no watcher on A (lease_ttl {lease} s)")] = (statistics.median(samples), max(samples))


def test_zz_summary():
    """Print the medians and ratios (runs last in this file)."""
    lines = ["", f"Redis backend vs redis-py, us per op (min / median of calls of {OPS} ops):"]
    pairs = [("get", "redis-py GET", "shmreg"), ("set", "redis-py SET", "shmreg"),
             ("update_counter", "redis-py INCRBY", "shmreg"),
             ("insert_new", "redis-py SET NX", "shmreg"),
             ("owned get", "shmreg get (not owned)", "shmreg get (owned)"),
             ("owned get", "shmreg get (not owned)", "Registry.lookup")]
    for group, base, ours in pairs:
        if (group, base) in RESULTS and (group, ours) in RESULTS:
            (bmin, bmed), (omin, omed) = RESULTS[(group, base)], RESULTS[(group, ours)]
            lines.append(f"  {group:<15} {base:<24} {bmin:6.1f} / {bmed:6.1f}   {ours:<22} "
                         f"{omin:6.1f} / {omed:6.1f}   ratio {omin / bmin:.2f}x / {omed / bmed:.2f}x")
    lines.append("interleaved (baseline us/op min, backend us/op min, median per-round ratio):")
    for (group, who), v in RESULTS.items():
        if group == "interleaved":
            lines.append(f"  {who:<24} {v[0]:6.1f}  {v[1]:6.1f}   ratio {v[2]:.2f}x")
    for (group, who), v in RESULTS.items():
        if group == "reap latency ms":
            lines.append(f"  reap latency: {who:<34} p50 {v[0]:8.1f} ms   max {v[1]:8.1f} ms")
    print("\n".join(lines))
