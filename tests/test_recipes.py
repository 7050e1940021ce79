"""shmreg.recipes with real processes: dedupe, batched counters, scoreboard, flags."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading

import pytest

import shmreg
from _helpers import spawn_py, unique_name
from shmreg.recipes import (Counters, Deduper, Flags, Flusher, Scoreboard, emit_once, flags_command,
                            parse_bool)
from shmreg.testing import wait_for


def finish(procs, timeout=60):
    """Wait for every child; fail with its output if one failed."""
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except BaseException:
            p.kill()
            p.communicate()
            raise
        assert p.returncode == 0, f"child failed ({p.returncode}):\n{out}\n{err}"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- 1. dedupe ------------------------------------------------------------------------

DEDUPE_CHILD = """
import sys
import shmreg
from shmreg.recipes import Deduper
from shmreg.testing import wait_for

name, clock_name, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
clock = shmreg.Table.open(clock_name)
t = shmreg.Table.open(name, clock=lambda: clock["now"])   # every process: the same fake clock
once = Deduper(t, window=10)
for r in range(rounds):
    wait_for(lambda: clock.get("round") == r, timeout=60, message=f"round {r}")
    for _ in range(25):
        for key in ("alert:a", "alert:b"):
            if once(key):
                t.update_counter(f"wins:{r}:{key}")
    t.update_counter(f"done:{r}")
"""


def test_dedupe_emits_exactly_once_per_window_across_processes(shm_table_factory):
    t, clock = shm_table_factory(), shm_table_factory()
    # (fake time, wins per key expected): a window is [first win, first win + 10).
    schedule = [(1000.0, 1), (1005.0, 0), (1009.999, 0), (1010.0, 1), (1015.0, 0), (1020.5, 1)]
    clock["now"] = schedule[0][0]
    n = 4
    procs = [spawn_py(DEDUPE_CHILD, t.name, clock.name, str(len(schedule))) for _ in range(n)]
    try:
        for r, (now, _) in enumerate(schedule):
            clock["now"] = now
            clock["round"] = r
            wait_for(lambda: t.get(f"done:{r}") == n, timeout=60, message=f"round {r} done")
    finally:
        finish(procs)
    for r, (now, expected) in enumerate(schedule):
        for key in ("alert:a", "alert:b"):
            assert t.get(f"wins:{r}:{key}", 0) == expected, (r, now, key)


def test_deduper_in_process_with_injected_clock(shm_table_factory):
    clock = FakeClock()
    t = shm_table_factory(clock=clock)
    once = Deduper(t, window=60)
    assert once("k") is True
    assert once("k") is False
    assert once("other") is True          # keys are independent
    clock.now += 30
    assert once.remaining("k") == pytest.approx(30)
    assert once("k") is False
    clock.now += 30
    assert once.remaining("k") == 0.0
    assert once("k") is True              # a new window
    assert once.reset("k") is True        # end it early
    assert once("k") is True
    # emit_once is the same thing, unbound; its own prefix keeps it apart.
    assert emit_once(t, "k", 60, prefix="other:") is True
    assert emit_once(t, "k", 60, prefix="other:") is False
    assert t.ttl("once:k") == pytest.approx(60)
    t["once:forever"] = 1                 # a marker without TTL (written by other means)
    assert once.remaining("forever") == float("inf")
    assert once("forever") is False


def test_dedupe_rejects_bad_arguments(shm_table):
    with pytest.raises(ValueError):
        Deduper(shm_table, window=0)
    with pytest.raises(ValueError):
        emit_once(shm_table, "k", -1)
    with pytest.raises(TypeError):
        emit_once(shm_table, 42, 1)       # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Deduper({}, window=1)             # type: ignore[arg-type]


# -- 2. batched counters -----------------------------------------------------------------

COUNTER_CHILD = """
import sys
import shmreg
from shmreg.recipes import Counters
from shmreg.testing import wait_for

name, wid, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = shmreg.Table.open(name)
counters = Counters(t)
for i in range(1, k + 1):
    if i % 500 == 0:
        # Make sure flushes really happen while we count: wait for one that
        # takes this very increment.  Read the flush count before counting,
        # so a flusher quick enough to take it before we look still counts
        # (read after, a flush could take our last increment unseen and we
        # would wait for one that nothing is left to trigger).
        seen = t.get("meta:flushes", 0)
    counters.incr("requests")
    counters.incr("bytes", wid + 1)
    if i % 500 == 0:
        wait_for(lambda: t.get("meta:flushes", 0) > seen, timeout=60, message="a flush")
t.update_counter("meta:done")
"""

FLUSHER_CHILD = """
import sys
import shmreg
from shmreg.recipes import Counters

name, n = sys.argv[1], int(sys.argv[2])
t = shmreg.Table.open(name)
counters = Counters(t)

def report(totals):
    # This second flusher reports into the table itself.
    for key, value in totals.items():
        t.update_counter(f"reported:{key}", value)
    t.update_counter("meta:flushes")

while t.get("meta:done", 0) < n:
    counters.flush(report)
"""


def test_batched_counters_lose_nothing_under_concurrent_flushes(shm_table):
    n, k = 3, 3000
    reports = []

    def report(totals):
        reports.append(totals)
        shm_table.update_counter("meta:flushes")

    counters = Counters(shm_table)
    flusher = Flusher(counters, report, interval=0.002).start()
    second = spawn_py(FLUSHER_CHILD, shm_table.name, str(n))
    workers = [spawn_py(COUNTER_CHILD, shm_table.name, str(w), str(k)) for w in range(n)]
    try:
        finish(workers)
    finally:
        flusher.stop(final_flush=False)
        finish([second])
    remainder = counters.pending()
    expected = {"requests": n * k, "bytes": sum(w + 1 for w in range(n)) * k}
    for name, total in expected.items():
        flushed_here = sum(r.get(name, 0) for r in reports)
        flushed_there = shm_table.get(f"reported:{name}", 0)
        assert flushed_here + flushed_there + remainder.get(name, 0) == total, name
    # Flushes really happened while the workers counted (each worker waited
    # for one after every 500 increments).
    assert shm_table["meta:flushes"] >= k // 500
    assert flusher.errors == 0
    # A last flush takes the remainder; nothing is left.
    last = counters.flush(reports.append)
    assert last == {name: v for name, v in remainder.items() if v}
    assert counters.pending() == {}
    shm_table.check()


def test_flush_report_failure_keeps_the_totals(shm_table, caplog):
    counters = Counters(shm_table)
    counters.incr("a", 5)

    def broken(totals):
        counters.incr("a")                # an increment racing the failing flush
        raise ConnectionError("statsd down")

    with pytest.raises(ConnectionError):
        counters.flush(broken)
    assert counters.pending() == {"a": 6}

    flusher = Flusher(counters, broken, interval=60)
    with caplog.at_level(logging.ERROR, logger="shmreg.recipes"):
        assert flusher.flush() == {}
    assert flusher.errors == 1 and flusher.flushes == 0
    assert "counter flush failed" in caplog.text
    assert counters.pending() == {"a": 7}

    got = []
    assert Counters(shm_table).flush(got.append) == {"a": 7}
    assert got == [{"a": 7}]
    assert counters.flush(got.append) == {} and len(got) == 1   # nothing: report not called


def test_counters_ignore_foreign_values_and_zeros(shm_table):
    counters = Counters(shm_table)
    shm_table["count:label"] = "not a counter"
    counters.incr("zero", 0)
    counters.incr("n", 2)
    assert counters.pending() == {"zero": 0, "n": 2}
    assert counters.flush() == {"n": 2}
    assert shm_table["count:label"] == "not a counter"
    assert "count:zero" not in shm_table


def test_flusher_thread_flushes_on_its_own_and_on_stop(shm_table):
    counters = Counters(shm_table)
    reports = []
    with Flusher(counters, reports.append, interval=0.005) as flusher:
        counters.incr("x", 3)
        wait_for(lambda: reports, timeout=30, message="a periodic flush")
        counters.incr("x", 4)
    assert sum(r["x"] for r in reports) == 7      # the exit flush took the rest
    assert flusher.flushes >= 2
    assert counters.pending() == {}
    with pytest.raises(ValueError):
        Flusher(counters, print, interval=0)


# -- 3. scoreboard ---------------------------------------------------------------------

SCOREBOARD_CHILD = """
import sys, time
import shmreg
from shmreg.recipes import Scoreboard

t = shmreg.Table.open(sys.argv[1])
board = Scoreboard(t)
board.publish(role="worker")
with board.span("GET /x"):
    with board.span("db.query", db="users"):
        time.sleep(120)   # killed here
"""


def test_scoreboard_post_mortem_of_a_killed_worker(shm_table):
    board = Scoreboard(shm_table)
    board.publish(role="status-page")            # this process has a row too
    deaths = []
    lock = threading.Lock()

    def handler(pid, row):
        with lock:
            deaths.append((pid, row))

    with shmreg.Watcher(shm_table, on_death=board.post_mortem(handler), interval=0.05) as watcher:
        assert watcher.wait_active(30)
        child = spawn_py(SCOREBOARD_CHILD, shm_table.name)
        try:
            row = wait_for(lambda: board.row(child.pid) if (board.row(child.pid) or {}).get("stack") == [
                "GET /x", "db.query"] else None, timeout=60, message="the child's span stack")
            assert row["info"] == {"role": "worker", "db": "users"}
            assert [r["pid"] for r in board.rows()] == sorted([os.getpid(), child.pid])
        finally:
            child.kill()
            child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL
        # Gone from the status page at once (an owned entry of a dead process) ...
        assert board.row(child.pid) is None
        assert [r["pid"] for r in board.rows()] == [os.getpid()]
        # ... and the watcher reported what it was doing when it died.
        wait_for(lambda: deaths, timeout=30, message="the post-mortem")
        wait_for(lambda: shm_table.stats()["owned"] == 1, timeout=30, message="the dead row reaped")
    assert len(deaths) == 1
    pid, row = deaths[0]
    assert pid == child.pid
    assert row["stack"] == ["GET /x", "db.query"]
    assert [name for name, _started in row["spans"]] == ["GET /x", "db.query"]
    assert row["info"] == {"role": "worker", "db": "users"}
    assert board.rows()[0]["info"] == {"role": "status-page"}
    board.withdraw()
    assert board.rows() == []


def test_scoreboard_spans_nest_and_pop_on_errors(shm_table):
    board = Scoreboard(shm_table)
    assert board.rows() == []
    with board.span("outer"):
        with pytest.raises(ZeroDivisionError):
            with board.span("inner"):
                assert board.stack() == ["outer", "inner"]
                assert board.row(os.getpid())["stack"] == ["outer", "inner"]
                1 / 0
        assert board.row(os.getpid())["stack"] == ["outer"]
    assert board.stack() == []
    assert board.rows()[0]["stack"] == []
    assert shm_table.owner(f"scoreboard:{os.getpid()}") == os.getpid()


def test_scoreboard_default_post_mortem_logs_and_ignores_rowless(shm_table, caplog):
    board = Scoreboard(shm_table)
    on_death = board.post_mortem()
    row = {"pid": 4242, "spans": [("GET /x", 1.0)], "info": {}, "updated": 1.0}
    with caplog.at_level(logging.WARNING, logger="shmreg.recipes"):
        on_death(4242, [("scoreboard:4242", row), ("other", 1)])
        on_death(4343, [("other", 1)])                   # no row: nothing
    assert caplog.messages == ["worker 4242 died in: GET /x "]


def _forked_child_stack(name: str) -> None:
    t = shmreg.Table.open(name)
    t["child-stack"] = repr(_board.stack())
    with _board.span("child-span"):
        t["child-row"] = _board.row(os.getpid())["stack"]


_board: Scoreboard | None = None


@pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning")
def test_scoreboard_fork_child_starts_with_an_empty_stack(shm_table):
    global _board
    _board = Scoreboard(shm_table)
    try:
        with _board.span("parent-span"):
            p = multiprocessing.get_context("fork").Process(target=_forked_child_stack,
                                                            args=(shm_table.name,))
            p.start()
            p.join(30)
            assert p.exitcode == 0
        assert shm_table["child-stack"] == "[]"
        assert shm_table["child-row"] == ["child-span"]
        assert _board.stack() == []
    finally:
        _board = None


# -- 4. feature flags -----------------------------------------------------------------

FLAGS_CHILD = """
import sys
import shmreg
from shmreg.recipes import Flags
from shmreg.testing import wait_for

t = shmreg.Table.open(sys.argv[1])
flags = Flags(t)
for step in range(1, 4):
    wait_for(lambda: t.get("step") == step, timeout=60, message=f"step {step}")
    t[f"seen:{step}"] = flags.enabled("new-ui")
    t[f"seen-beta:{step}"] = flags.enabled("beta", default=True)
"""


def test_flags_flipped_in_one_process_are_seen_by_another(shm_table):
    flags = Flags(shm_table)
    child = spawn_py(FLAGS_CHILD, shm_table.name)
    try:
        steps = [
            (lambda: flags.set("new-ui", True), True, True),                  # beta unset: default
            (lambda: flags.set("new-ui", False), False, True),
            (lambda: (flags_command(shm_table.name, "new-ui", "on"),
                      flags_command(shm_table.name, "beta", "off")), True, False),  # the CLI path
        ]
        for step, (flip, new_ui, beta) in enumerate(steps, 1):
            flip()
            shm_table["step"] = step
            wait_for(lambda: f"seen-beta:{step}" in shm_table, timeout=60, message=f"child step {step}")
            assert shm_table[f"seen:{step}"] is new_ui, step
            assert shm_table[f"seen-beta:{step}"] is beta, step
    finally:
        finish([child])
    assert flags.all() == {"beta": False, "new-ui": True}


def test_flags_api_and_command(shm_table):
    flags = Flags(shm_table)
    assert flags.enabled("x") is False and flags.enabled("x", default=True) is True
    flags.enable("x")
    assert flags["x"] is True
    flags.disable("x")
    assert flags.enabled("x", default=True) is False
    with pytest.raises(TypeError):
        flags.set("x", "yes")                         # type: ignore[arg-type]
    # Values written by other means (e.g. `shmreg set TABLE flag:y on`).
    shm_table["flag:y"] = "on"
    shm_table["flag:z"] = "bogus"
    shm_table["flag:n"] = 0
    assert flags.enabled("y") is True
    assert flags.enabled("z", default=True) is True and flags.enabled("z") is False
    assert flags.enabled("n", default=True) is False
    assert flags.all() == {"n": False, "x": False, "y": True, "z": False}
    assert flags.unset("x") is True and flags.unset("x") is False

    assert flags_command(shm_table.name, "w", "ON") == {"w": True}
    assert flags_command(shm_table.name, "w") == {"w": True}
    assert flags_command(shm_table.name, "w", "unset") == {}
    assert flags_command(shm_table.name, "missing") == {}
    assert flags_command(shm_table.name) == flags.all()
    with pytest.raises(ValueError):
        flags_command(shm_table.name, "w", "maybe")
    with pytest.raises(ValueError):
        flags_command(shm_table.name, None, "on")
    name = unique_name("flags")
    with pytest.raises(shmreg.TableNotFoundError):
        flags_command(name, "w", "on")
    assert name not in shmreg.list_tables()           # never created


@pytest.mark.parametrize("text, value", [("on", True), ("Yes", True), ("1", True), ("enabled", True),
                                         ("off", False), ("FALSE", False), ("0", False), ("no", False)])
def test_parse_bool(text, value):
    assert parse_bool(text) is value


def test_parse_bool_rejects_other_words():
    with pytest.raises(ValueError, match="not a boolean"):
        parse_bool("maybe")
