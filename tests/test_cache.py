"""shmreg.Cache: a TTL cache shared by processes, with eviction and
cross-process single flight.

- Single flight: 8 real processes, released together, call ``get_or_set``
  on one missing key: the factory runs once (counted in a separate table
  with ``update_counter``).  The computing process SIGKILLed mid-factory: a
  waiter takes over and the factory runs exactly once more.  A factory that
  raises: only that caller sees the exception, a waiter computes instead,
  and the key is not poisoned.
- ``memoize`` across processes (different ``PYTHONHASHSEED``, different
  dict insertion orders: one key, one computation), ``cache_clear``,
  ``key=``.
- Eviction: a cache filled far past its capacity and memory keeps working
  (never ``TableFullError`` from ``set``, stays within its memory, passes
  ``check()``); CLOCK keeps what is read; exact eviction counts when each
  new entry evicts exactly one; ``set``'s forcible flag; ``safe_set`` and
  ``add`` never evict.
- TTL with an injected clock: default and per-set ttl, ``touch``,
  ``get_stale``, ``expire()``; expired entries go before live ones.
- Exact hit/miss/set counters; bad input.
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
from shmreg import Cache
from _helpers import unique_name, wait_until

N_PROCS = 8


# --------------------------------------------------------------------------
# Fixtures and child processes
# --------------------------------------------------------------------------


def _unlink_quietly(name: str) -> None:
    try:
        shmreg.unlink(name)
    except shmreg.TableNotFoundError:
        pass


@pytest.fixture
def cache_name():
    """A fresh cache name; the cache and its flights table are unlinked after."""
    name = unique_name("cache")
    yield name
    _unlink_quietly(name)
    _unlink_quietly(f"{name}--flights")


@pytest.fixture
def counter_table():
    """A separate (non-evicting) table the children count factory calls in."""
    name = unique_name("ctr")
    t = shmreg.Table.create(name, capacity=1000, memory=1 << 20)
    yield t
    t.close()
    _unlink_quietly(name)


class FakeClock:
    """Monotonic seconds that only move when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Child:
    """A Python child talking JSON lines on its pipes (no threads)."""

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

    def readline(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"child {self.pid}: no line within {timeout} s "
                                     f"(stderr: {self._stderr()})")
            r, _, _ = select.select([self.p.stdout], [], [], left)
            if not r:
                continue
            data = os.read(self.p.stdout.fileno(), 1 << 16)
            if not data:
                self.p.wait(timeout=10)
                raise AssertionError(f"child {self.pid} exited ({self.p.returncode}) "
                                     f"without a line: {self._stderr()}")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def read_json(self, timeout: float = 30.0):
        return json.loads(self.readline(timeout))

    def send(self, line: str = "go") -> None:
        self.p.stdin.write(line.encode() + b"\n")

    def _stderr(self) -> str:
        if self.p.poll() is None:
            return "(still running)"
        return self.p.stderr.read().decode(errors="replace")[-3000:]

    def finish(self, timeout: float = 30.0) -> int:
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(timeout=10)
            raise AssertionError(f"child {self.pid} did not exit within {timeout} s")
        err = self.p.stderr.read().decode(errors="replace")
        self.p.stdout.close()
        self.p.stderr.close()
        if rc not in (0, -signal.SIGKILL):
            raise AssertionError(f"child {self.pid} exited with {rc}: {err}")
        return rc

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(timeout=10)


@pytest.fixture
def children():
    """Start children; any still running at the end is killed."""
    started: list[Child] = []

    def start(code: str, *args: str, env: dict | None = None) -> Child:
        c = Child(code, *args, env=env)
        started.append(c)
        return c

    yield start
    for c in started:
        if c.p.poll() is None:
            c.kill()
        for f in (c.p.stdin, c.p.stdout, c.p.stderr):
            if not f.closed:
                f.close()


def release_together(procs: list[Child]) -> None:
    """Barrier: every child has said 'ready'; then all are sent 'go' at once."""
    for c in procs:
        assert c.readline() == "ready"
    for c in procs:
        c.send("go")



# --------------------------------------------------------------------------
# Single flight across processes
# --------------------------------------------------------------------------

# argv: cache name, counter table name, mode, number of callers.
# The factory counts its calls in the counter table ("calls"); it waits until
# every caller has arrived (so all of them are inside get_or_set while it
# runs), then, by mode:
#   plain: sleeps a little and returns;
#   kill:  first call: records its pid under "started" and sleeps (the test
#          SIGKILLs it); later calls return at once;
#   raise: first call: records "started", sleeps a little, raises.
# Each child prints its result as JSON, then waits for a second "go": a
# child whose call raised then calls get_or_set again (its factory counts
# "calls_after"), and prints that result.
SINGLE_FLIGHT_CHILD = r"""
import json, os, sys, time
import shmreg
name, ctr_name, mode, ncallers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cache = shmreg.Cache(name, ttl=None)
ctr = shmreg.Table.open(ctr_name)

def factory():
    n = ctr.update_counter("calls")
    deadline = time.monotonic() + 20
    while ctr.get("arrived", 0) < ncallers and time.monotonic() < deadline:
        time.sleep(0.005)
    if n == 1 and mode == "kill":
        ctr["started"] = os.getpid()
        time.sleep(120)
    if n == 1 and mode == "raise":
        ctr["started"] = os.getpid()
        time.sleep(0.3)
        raise RuntimeError("factory failed on purpose")
    if mode == "plain":
        time.sleep(0.3)
    return {"by": os.getpid(), "call": n, "blob": "x" * 1000}

print("ready", flush=True)
sys.stdin.readline()
ctr.update_counter("arrived")
out = {"pid": os.getpid()}
try:
    out["value"] = cache.get_or_set("the-key", factory, timeout=30)
except RuntimeError as e:
    out["error"] = str(e)
out["misses"], out["hits"] = cache.misses, cache.hits
print(json.dumps(out), flush=True)
sys.stdin.readline()
if "error" in out:
    def after():
        ctr.update_counter("calls_after")
        return "recomputed"
    out2 = {"value": cache.get_or_set("the-key", after, timeout=30)}
else:
    out2 = {}
print(json.dumps(out2), flush=True)
cache.close()
"""


def _start_callers(children, cache_name, counter_table, mode: str) -> list[Child]:
    # Create the cache here so that no child races to size it.
    Cache(cache_name, ttl=None, capacity=1000, memory=1 << 20).close()
    procs = [children(SINGLE_FLIGHT_CHILD, cache_name, counter_table.name, mode, str(N_PROCS))
             for _ in range(N_PROCS)]
    release_together(procs)
    return procs


def _no_flight_left(cache_name: str) -> None:
    flights = shmreg.Table.open(f"{cache_name}--flights")
    try:
        assert len(flights) == 0, flights.items()
        flights.check()
    finally:
        flights.close()


def test_single_flight_eight_processes_one_factory_call(children, cache_name, counter_table):
    procs = _start_callers(children, cache_name, counter_table, "plain")
    results = [c.read_json() for c in procs]
    for c in procs:
        c.send("go")
        assert c.read_json() == {}
        assert c.finish() == 0
    assert counter_table["calls"] == 1
    values = [r["value"] for r in results]
    assert all(v == values[0] for v in values), values
    assert values[0]["call"] == 1 and values[0]["by"] in {c.pid for c in procs}
    # Every caller went through get_or_set once; the factory waited for all
    # of them to arrive, so (barring a >0.3 s stall) all of them missed.
    assert all(r["hits"] + r["misses"] == 1 for r in results)
    assert sum(r["misses"] for r in results) >= 2, results
    with Cache(cache_name) as cache:
        assert cache["the-key"] == values[0]
        cache.table.check()
    _no_flight_left(cache_name)


def test_single_flight_computer_killed_mid_factory_waiter_takes_over(children, cache_name,
                                                                     counter_table):
    procs = _start_callers(children, cache_name, counter_table, "kill")
    wait_until(lambda: "started" in counter_table, what="the first factory call to start")
    victim_pid = counter_table["started"]
    victim = next(c for c in procs if c.pid == victim_pid)
    os.kill(victim_pid, signal.SIGKILL)
    victim.kill()
    assert victim.p.returncode == -signal.SIGKILL
    survivors = [c for c in procs if c is not victim]
    results = [c.read_json() for c in survivors]
    for c in survivors:
        c.send("go")
        assert c.read_json() == {}
        assert c.finish() == 0
    # The killed call and exactly one more.
    assert counter_table["calls"] == 2
    values = [r["value"] for r in results]
    assert all(v == values[0] for v in values), values
    assert values[0]["call"] == 2
    assert values[0]["by"] in {c.pid for c in survivors}
    with Cache(cache_name) as cache:
        assert cache["the-key"] == values[0]
        cache.table.check()
    _no_flight_left(cache_name)


def test_single_flight_factory_raises_waiters_take_over(children, cache_name, counter_table):
    procs = _start_callers(children, cache_name, counter_table, "raise")
    results = {c.pid: c.read_json() for c in procs}
    raiser_pid = counter_table["started"]
    raised = [pid for pid, r in results.items() if "error" in r]
    # Only the caller whose factory raised sees the exception...
    assert raised == [raiser_pid]
    assert results[raiser_pid]["error"] == "factory failed on purpose"
    # ...every other caller gets the value a waiter computed (second call).
    values = [r["value"] for pid, r in results.items() if pid != raiser_pid]
    assert len(values) == N_PROCS - 1
    assert all(v == values[0] for v in values), values
    assert values[0]["call"] == 2 and values[0]["by"] != raiser_pid
    assert counter_table["calls"] == 2
    # The raiser's next call (after all others returned) finds the value.
    for c in procs:
        c.send("go")
    after = {c.pid: c.read_json() for c in procs}
    assert after[raiser_pid] == {"value": values[0]}
    assert counter_table.get("calls_after", 0) == 0
    for c in procs:
        assert c.finish() == 0
    _no_flight_left(cache_name)


def test_factory_exception_does_not_poison_the_key(cache_name):
    with Cache(cache_name, ttl=None) as cache:
        calls = []

        def bad():
            calls.append("bad")
            raise KeyError("nope")

        with pytest.raises(KeyError, match="nope"):
            cache.get_or_set("k", bad)
        assert "k" not in cache
        assert len(cache._flight_table()) == 0      # the mark is gone
        assert cache.get_or_set("k", lambda: calls.append("good") or 42) == 42
        assert cache.get_or_set("k", lambda: calls.append("again") or 0) == 42
        assert calls == ["bad", "good"]
        # A factory returning None caches None (None is a value, not a miss).
        assert cache.get_or_set("none", lambda: calls.append("none")) is None
        assert cache.get_or_set("none", lambda: calls.append("none2") or 1) is None
        assert calls == ["bad", "good", "none"]


def test_get_or_set_times_out_while_another_live_caller_computes(cache_name):
    with Cache(cache_name, ttl=None) as cache:
        # Someone (here: this very process, alive) holds the flight mark.
        assert cache._flight_table().insert_new("busy", 1, owned=True)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            cache.get_or_set("busy", lambda: pytest.fail("must not compute"), timeout=0.2)
        assert time.monotonic() - t0 >= 0.2
        cache._flight_table().delete("busy")
        assert cache.get_or_set("busy", lambda: "now", timeout=0.2) == "now"


# --------------------------------------------------------------------------
# memoize
# --------------------------------------------------------------------------

# argv: cache name, counter table name, reverse (0/1).  The memoized
# function counts its calls in the counter table.  Prints the cache key,
# the result, and a digest of the *raw* pickle of the set argument (which
# depends on PYTHONHASHSEED) to show that canonicalisation was needed.
MEMO_CHILD = r"""
import hashlib, json, os, pickle, sys, time
import shmreg
name, ctr_name, reverse = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
cache = shmreg.Cache(name, ttl=None)
ctr = shmreg.Table.open(ctr_name)

@cache.memoize()
def report(n, options, tags):
    ctr.update_counter("calls")
    time.sleep(0.3)
    return {"n": n, "options": sorted(options.items()), "tags": sorted(tags), "by": os.getpid()}

pairs = [("alpha", 1), ("beta", [2, 3]), ("gamma", {"nested": {"z": 1, "a": 2}})]
if reverse:
    pairs.reverse()
options = dict(pairs)
words = [f"tag-{i}" for i in range(40)]
if reverse:
    words.reverse()
tags = set(words)
print("ready", flush=True)
sys.stdin.readline()
value = report(7, options, tags)
print(json.dumps({"key": report.cache_key(7, options, tags), "value": value,
                  "raw": hashlib.sha1(pickle.dumps((options, tags))).hexdigest()}), flush=True)
cache.close()
"""


def test_memoize_across_processes_one_computation_same_key(children, cache_name, counter_table):
    Cache(cache_name, ttl=None).close()
    procs = [children(MEMO_CHILD, cache_name, counter_table.name, str(i % 2),
                      env={"PYTHONHASHSEED": str(1 + i)})
             for i in range(4)]
    release_together(procs)
    results = [c.read_json() for c in procs]
    for c in procs:
        assert c.finish() == 0
    # The raw pickles differ (hash seeds, insertion orders)...
    assert len({r["raw"] for r in results}) > 1
    # ...but the cache key does not: one entry, one computation, one value.
    assert len({r["key"] for r in results}) == 1
    assert counter_table["calls"] == 1
    assert all(r["value"] == results[0]["value"] for r in results)
    with Cache(cache_name) as cache:
        assert list(cache) == [results[0]["key"]]
        assert results[0]["key"].startswith("memo:__main__.report:")


def test_memoize_distinct_args_clear_and_key_callable(cache_name):
    with Cache(cache_name, ttl=None) as cache:
        calls = []

        @cache.memoize()
        def square(x, *, scale=1):
            calls.append(("square", x, scale))
            return x * x * scale

        @cache.memoize(key=lambda user, **_: f"user-{user}")
        def profile(user, verbose=False):
            calls.append(("profile", user, verbose))
            return {"user": user}

        assert [square(i) for i in range(5)] == [0, 1, 4, 9, 16]
        assert [square(i) for i in range(5)] == [0, 1, 4, 9, 16]
        assert square(3, scale=2) == 18            # distinct kwargs: distinct entry
        assert len(calls) == 6
        assert len({square.cache_key(i) for i in range(5)} | {square.cache_key(3, scale=2)}) == 6
        # dict / set argument order does not matter in this process either
        assert square.cache_key({"a": 1, "b": 2}) == square.cache_key({"b": 2, "a": 1})
        assert square.cache_key({1, 2, 3}) == square.cache_key({3, 2, 1})
        assert square.cache_key([1, 2]) != square.cache_key((1, 2))

        # key=: the callable's result names the entry; the ignored kwarg shares it
        assert profile.cache_key(7) == "memo:" + profile.__module__ + "." + \
            profile.__qualname__ + ":user-7"
        assert profile(7) == {"user": 7}
        assert profile(7, verbose=True) == {"user": 7}
        assert calls.count(("profile", 7, False)) == 1 and ("profile", 7, True) not in calls
        assert cache[profile.cache_key(7)] == {"user": 7}

        cache["plain"] = "kept"
        assert len(cache) == 6 + 1 + 1
        # cache_clear drops exactly that function's entries
        assert square.cache_clear() == 6
        assert len(cache) == 2
        assert cache["plain"] == "kept" and profile.cache_key(7) in cache
        assert square.cache_clear() == 0
        assert square(2) == 4 and calls[-1] == ("square", 2, 1)   # recomputed
        assert profile.cache_clear() == 1
        assert set(cache) == {"plain", square.cache_key(2)}


# --------------------------------------------------------------------------
# Eviction
# --------------------------------------------------------------------------

SMALL = dict(capacity=200, memory=256 * 1024)


def test_filled_far_past_capacity_keeps_working_and_keeps_hot_keys(cache_name):
    rng = random.Random(7)
    memory = SMALL["memory"]
    with Cache(cache_name, ttl=None, **SMALL) as cache:
        hot = [f"hot-{i}" for i in range(20)]
        hot_value = b"h" * 100
        for k in hot:
            cache.set(k, hot_value)
        forcible = hot_misses = hot_reads = 0
        for i in range(20_000):
            value = bytes([i % 251]) * rng.choice([8, 64, 500, 2000, 6000])
            forcible += cache.set(f"cold-{i}", value)        # never TableFullError
            assert cache.get(f"cold-{i}") == value           # what was just set is there
            if i % 10 == 0:
                for k in hot:                                # the hot set is read all along
                    hot_reads += 1
                    if cache.get(k) is None:
                        hot_misses += 1
                        cache.set(k, hot_value)
            if i % 1000 == 0:
                st = cache.stats()
                assert st["bytes_used"] <= memory, st
        st = cache.stats()
        assert st["bytes_used"] <= memory and st["bytes_used"] + st["bytes_free"] <= memory
        assert st["evictions"] > 10_000, st
        assert forcible > 1000
        assert st["entries"] == len(cache) < 300
        cache.table.check()
        # CLOCK: what is read keeps its place.  Reads of the hot set miss
        # rarely (~0.1% here) and nearly all of it is there at the end,
        # while almost none of the 20,000 cold entries is.
        assert hot_misses <= hot_reads * 0.05, (hot_misses, hot_reads)
        survivors = sum(k in cache for k in hot)
        assert survivors >= 15, survivors
        cold_left = sum(f"cold-{i}" in cache for i in range(20_000))
        assert cold_left / 20_000 < 0.02


def test_every_set_under_memory_pressure_is_readable(cache_name):
    # Small and large values, a quarter with a short ttl, the clock moving:
    # sets that purge expired entries and evict live ones to make room must
    # leave the index whole - each value readable right after its set.
    clock = FakeClock()
    rng = random.Random(11)
    with Cache(cache_name, ttl=None, clock=clock, **SMALL) as cache:
        for i in range(5000):
            value = bytes([i % 251]) * rng.choice([8, 40, 3000, 6000])
            cache.set(i, value, ttl=1.0 if i % 4 == 0 else None)
            assert cache.get(i) == value, f"set #{i} ({len(value)} bytes) is not readable"
            clock.advance(0.01)
            if i % 500 == 0:
                cache.table.check()
        st = cache.stats()
        assert st["evictions"] > 0 and st["expirations"] > 0
        cache.table.check()


def _fill_until_forcible(cache, value, start: int = 0) -> int:
    """Set keys start, start+1, ... until a set evicts; returns that key."""
    i = start
    while not cache.set(i, value):
        i += 1
        assert i - start < 100_000
    return i


def test_memory_bound_clock_keeps_read_entries_and_counts_exactly(cache_name):
    # Plenty of index slots, 64 KiB of memory (one shard): equal-sized
    # entries, so each new one evicts exactly one.
    with Cache(cache_name, ttl=None, capacity=2000, memory=64 * 1024) as cache:
        assert cache.table._header()["nshards"] == 1
        value = bytes(200)
        first = _fill_until_forcible(cache, value)
        assert cache.stats()["evictions"] == 1
        keys = sorted(cache)
        n = len(keys)
        assert n == first              # one out for the one that came in
        hot = set(random.Random(1).sample(keys, n // 3))
        for k in hot:
            assert cache.get(k) == value
        for j in range(n // 3):
            assert cache.set(100_000 + j, value) is True
        assert cache.stats()["evictions"] == 1 + n // 3
        assert len(cache) == n
        # Every read entry got its second chance: the victims were all
        # unread (old ones, or new ones the hand reached first).
        assert all(k in cache for k in hot)
        unread = [k for k in keys if k not in hot] + [100_000 + j for j in range(n // 3)]
        assert sum(k in cache for k in unread) == n - len(hot)
        cache.table.check()


def test_index_bound_eviction_counts_exactly(cache_name):
    # Tiny values, one shard: the index (max_fill entries) is the limit.  A
    # new key at capacity evicts a batch of max(1, max_fill // 32) live
    # entries (so the index rebuild that follows is amortised over that many
    # inserts instead of running on every one); set() says True exactly for
    # the sets that evicted, and the counter is exact.
    with Cache(cache_name, ttl=None, **SMALL) as cache:
        h = cache.table._header()
        assert h["nshards"] == 1
        cap = h["max_fill"]
        batch = max(1, cap // 32)
        for i in range(cap):
            assert cache.set(i, b"v") is False               # room: nothing evicted
        assert cache.stats()["evictions"] == 0
        assert cache.set(0, b"overwritten") is False         # an overwrite needs no room
        forcible = 0
        for n, i in enumerate(range(cap, cap + 100), 1):
            before = cache.stats()["evictions"]
            evicted_live = cache.set(i, b"v")
            after = cache.stats()["evictions"]
            assert evicted_live is (after > before)
            assert after - before in (0, batch)
            forcible += evicted_live
            # every insert adds one entry, every eviction removes one
            assert len(cache) == cap + n - after
            assert cap - batch <= len(cache) <= cap
            assert i in cache
        st = cache.stats()
        assert st["evictions"] == cap + 100 - len(cache) and st["expirations"] == 0
        assert 100 // batch <= forcible <= 100 // batch + 2   # a batch per `batch` inserts
        assert st["entries"] == len(cache)
        cache.table.check()


def test_index_bound_clock_keeps_read_entries(cache_name):
    # The same CLOCK promise when the index, not memory, is the limit: read
    # a third of the entries, then add a third as many new ones: the read
    # entries get a second chance (their bits survive the index rebuilds), so
    # (nearly) all of them survive, while unread ones go.
    with Cache(cache_name, ttl=None, **SMALL) as cache:
        cap = cache.table._header()["max_fill"]
        for i in range(cap):
            cache.set(i, b"v")
        hot = set(random.Random(1).sample(range(cap), cap // 3))
        for k in hot:
            assert cache.get(k) == b"v"
        for j in range(cap // 3):
            cache.set(10_000 + j, b"n")
        assert cache.stats()["evictions"] >= cap // 3
        lost = sorted(k for k in hot if k not in cache)
        assert len(lost) <= len(hot) // 20, \
            f"{len(lost)} of {len(hot)} read entries evicted, while unread ones were there"
        cache.table.check()


def test_safe_set_and_add_never_evict(cache_name):
    with Cache(cache_name, ttl=None, **SMALL) as cache:
        cap = cache.table._header()["max_fill"]
        for i in range(cap):
            cache.safe_set(i, b"v")
        with pytest.raises(shmreg.TableFullError):
            cache.safe_set("one-more", b"v")
        with pytest.raises(shmreg.TableFullError):
            cache.add("one-more", b"v")
        assert cache.add(5, b"other") is False               # exists: refused, not replaced
        assert cache[5] == b"v"
        cache.safe_set(5, b"replaced")                       # an overwrite fits
        assert cache[5] == b"replaced"
        st = cache.stats()
        assert st["evictions"] == 0 and len(cache) == cap and "one-more" not in cache
        # Memory-bound too: fill the memory with 5 KB values.
        cache.clear()
        i = 0
        while True:
            try:
                cache.safe_set(f"m{i}", bytes(5000))
            except shmreg.TableFullError:
                break
            i += 1
        assert 40 < i < 60 and len(cache) == i
        with pytest.raises(shmreg.TableFullError):
            cache.add("big", bytes(5000))
        assert cache.add("m1", b"x") is False and cache["m1"] == bytes(5000)
        assert cache.stats()["evictions"] == 0 and len(cache) == i
        assert cache.set("big", bytes(5000)) is True         # set does evict
        assert cache["big"] == bytes(5000) and cache.stats()["evictions"] >= 1
        cache.table.check()


# --------------------------------------------------------------------------
# TTL with an injected clock
# --------------------------------------------------------------------------


def test_ttl_default_per_set_touch_and_get_stale(cache_name):
    clock = FakeClock()
    with Cache(cache_name, ttl=10, clock=clock) as cache:
        cache.set("default", 1)
        cache.set("long", 2, ttl=100)
        cache.set("short", 3, ttl=0.5)
        cache["item"] = 4                                    # __setitem__: default ttl
        cache.set("touched", 5)
        assert cache.table.ttl("default") == pytest.approx(10)
        assert cache.table.ttl("long") == pytest.approx(100)
        assert cache.get_stale("short") == (3, False)
        clock.advance(0.6)
        assert cache.get("short") is None and "short" not in cache
        assert cache.get_stale("short") == (3, True)
        assert cache.get_stale("absent", "dflt") == "dflt"
        assert cache.add("short", 33, ttl=0.5) is True        # expired counts as absent
        assert cache.get_stale("short") == (33, False)
        clock.advance(0.6)                                   # t = 1.2: expired again
        clock.advance(8.0)                                   # t = 9.2
        assert cache.touch("touched") is True                # now + 10
        assert cache.touch("short") is False                 # expired: nothing to renew
        assert cache.touch("absent") is False
        clock.advance(1.5)                                   # t = 10.7
        assert cache.get("default") is None and cache.get("item") is None
        with pytest.raises(KeyError):
            cache["default"]
        assert cache.get_stale("default") == (1, True)
        assert cache["touched"] == 5 and cache["long"] == 2
        assert cache.touch("touched", ttl=1) is True
        clock.advance(1.01)
        assert cache.get("touched") is None
        assert sorted(cache) == ["long"] and len(cache) == 1

        before = cache.stats()["expirations"]
        assert cache.expire() == 4                           # default, item, short, touched
        assert cache.stats()["expirations"] == before + 4
        assert cache.get_stale("default") is None            # purged: not even stale
        assert cache.expire() == 0
        clock.advance(100)
        assert cache.expire() == 1 and len(cache) == 0


def test_ttl_none_never_expires_and_inf_means_none(cache_name):
    clock = FakeClock()
    with Cache(cache_name, ttl=None, clock=clock) as cache:
        cache.set("forever", 1)
        cache.set("inf", 2, ttl=float("inf"))
        cache.set("five", 3, ttl=5)
        clock.advance(1e6)
        assert cache["forever"] == 1 and cache["inf"] == 2 and "five" not in cache
        assert cache.get_stale("forever") == (1, False)
        assert cache.table.ttl("forever") is None


def test_expired_entries_are_evicted_before_live_ones(cache_name):
    clock = FakeClock()
    with Cache(cache_name, ttl=None, clock=clock, **SMALL) as cache:
        cap = cache.table._header()["max_fill"]
        short = set(range(0, cap, 3))
        for i in range(cap):
            cache.set(i, b"v", ttl=5 if i in short else None)
        clock.advance(10)
        # Room for len(short) new keys without evicting anything live.
        for j in range(len(short)):
            assert cache.set(f"new-{j}", b"n") is False
        st = cache.stats()
        assert st["evictions"] == 0 and st["expirations"] == len(short)
        assert all(i in cache for i in range(cap) if i not in short)
        assert len(cache) == cap
        assert cache.set("one-too-many", b"n") is True
        # (index-bound eviction takes a batch of 1/32 of the shard at once)
        assert cache.stats()["evictions"] == max(1, cap // 32)

    # Memory-bound: big entries, a third of them expire.
    clock2 = FakeClock()
    name2 = cache_name + "-mem"
    try:
        with Cache(name2, ttl=None, clock=clock2, capacity=2000, memory=64 * 1024) as cache:
            value = bytes(1000)
            i = 0
            while True:
                try:
                    cache.safe_set(i, value, ttl=5 if i % 3 == 0 else None)
                except shmreg.TableFullError:
                    break
                i += 1
            n = i
            live = [k for k in range(n) if k % 3]
            clock2.advance(10)
            for j in range(n - len(live)):
                assert cache.set(f"new-{j}", value) is False, j
            assert cache.stats()["evictions"] == 0
            assert all(k in cache for k in live)
            assert cache.set("one-too-many", value) is True
            cache.table.check()
    finally:
        _unlink_quietly(name2)
        _unlink_quietly(name2 + "--flights")


# --------------------------------------------------------------------------
# Counters
# --------------------------------------------------------------------------


def test_hit_miss_set_counters_are_exact(cache_name):
    clock = FakeClock()
    with Cache(cache_name, ttl=10, clock=clock) as cache:
        expect = {"hits": 0, "misses": 0, "sets": 0}

        def check():
            st = cache.stats()
            assert {k: st[k] for k in expect} == expect

        check()
        cache.set("a", 1); cache["b"] = 2; cache.safe_set("c", 3)
        expect["sets"] += 3; check()
        assert cache.add("a", 9) is False; check()           # refused: not a set
        assert cache.add("d", 4) is True
        expect["sets"] += 1; check()
        cache.get("a"); cache["b"]; cache.get("zz"); cache.get("zz", 0)
        expect["hits"] += 2; expect["misses"] += 2; check()
        with pytest.raises(KeyError):
            cache["zz"]
        expect["misses"] += 1; check()
        "a" in cache; cache.touch("a"); len(cache); list(cache)   # noqa: B015 - not reads
        check()
        assert cache.get_or_set("a", lambda: 0) == 1         # hit
        expect["hits"] += 1; check()
        assert cache.get_or_set("e", lambda: 5) == 5         # miss + its set
        expect["misses"] += 1; expect["sets"] += 1; check()
        assert cache.get_stale("e") == (5, False)
        expect["hits"] += 1; check()
        clock.advance(20)
        assert cache.get_stale("e") == (5, True)             # stale: a miss
        assert cache.get_stale("nope") is None               # absent: a miss
        expect["misses"] += 2; check()
        cache.delete("a"); cache.expire(); cache.clear()
        check()

        @cache.memoize()
        def f(x):
            return x

        f(1); f(1); f(2)
        expect["hits"] += 1; expect["misses"] += 2; expect["sets"] += 2; check()
        # A second Cache object on the same table counts on its own.
        with Cache(cache_name, clock=clock) as other:
            assert other.get(f.cache_key(1)) == 1
            assert other.stats()["hits"] == 1 and other.stats()["sets"] == 0
        check()


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [0, -1, 0.0, -0.5, float("nan"), float("-inf"), "5", b"5", [1], True])
def test_bad_ttl_is_value_error(cache_name, ttl):
    with pytest.raises(ValueError):
        Cache(cache_name, ttl=ttl)
    with pytest.raises(shmreg.TableNotFoundError):           # nothing was created
        shmreg.Table.open(cache_name)
    with Cache(cache_name) as cache:
        cache.set("k", 1)
        for call in (lambda: cache.set("k", 2, ttl=ttl), lambda: cache.safe_set("k", 2, ttl=ttl),
                     lambda: cache.add("new", 2, ttl=ttl), lambda: cache.touch("k", ttl=ttl)):
            with pytest.raises(ValueError):
                call()
        assert cache["k"] == 1 and "new" not in cache and cache.stats()["sets"] == 1


def test_value_too_large(cache_name):
    with Cache(cache_name, ttl=None, **SMALL) as cache:
        cache.set("small", 1)
        huge = bytes(SMALL["memory"] + 1)
        for call in (cache.set, cache.safe_set, cache.add):
            with pytest.raises(shmreg.ValueTooLargeError):
                call("huge", huge)
        with pytest.raises(ValueError):                      # ValueTooLargeError is a ValueError
            cache["huge"] = huge
        with pytest.raises(shmreg.ValueTooLargeError):
            cache.get_or_set("huge", lambda: huge)
        assert "huge" not in cache and cache["small"] == 1
        assert cache.stats()["evictions"] == 0               # nothing was evicted for it
        assert len(cache._flight_table()) == 0
        cache.table.check()
