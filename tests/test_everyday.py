"""Everyday-use guards through the public API: a table opened with options
that do not match it says so, temporary tables disappear however the block
exits, and Cache.stats() offers host-wide hits and misses."""

from __future__ import annotations

import warnings

import pytest

import shmreg
from _helpers import run_py, unique_name


def test_opening_with_other_geometry_warns_naming_both_values(table_name):
    with shmreg.Table.create(table_name, capacity=1000, memory=1 << 20) as t:
        t["kept"] = 1
    with pytest.warns(shmreg.ConfigMismatchWarning) as caught:
        t2 = shmreg.Table(table_name, capacity=5000, memory=2 << 20, shards=1)
    msg = str(caught[0].message)
    assert "capacity 1,000 (asked for 5,000)" in msg
    assert "memory 1,048,576 (asked for 2,097,152)" in msg
    assert "shards 4 (asked for 1)" in msg
    assert f"shmreg destroy {table_name}" in msg
    assert caught[0].filename == __file__          # points at the caller's line
    assert t2.capacity == 1000 and t2["kept"] == 1  # the existing table, untouched
    t2.close()


def test_matching_or_unspecified_options_are_silent(table_name):
    with shmreg.Table.create(table_name, capacity=1000, memory=1 << 20):
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kw in ({}, {"capacity": 1000}, {"memory": 1 << 20, "shards": 4}):
            shmreg.Table(table_name, **kw).close()
        shmreg.Table.open(table_name).close()


def test_strict_raises_and_does_not_attach(table_name):
    with shmreg.Table.create(table_name, capacity=1000, memory=1 << 20):
        pass
    with pytest.raises(shmreg.ConfigMismatchError, match=r"capacity 1,000 \(asked for 10\)"):
        shmreg.Table(table_name, capacity=10, strict=True)
    assert issubclass(shmreg.ConfigMismatchError, ValueError)


def test_a_cache_on_a_plain_table_warns_that_it_cannot_evict(table_name):
    with shmreg.Table.create(table_name, capacity=1000, memory=1 << 20):
        pass
    with pytest.warns(shmreg.ConfigMismatchWarning, match="no eviction"):
        c = shmreg.Cache(table_name, ttl=60)
    c.close()


def test_temporary_table_is_unlinked_however_the_block_exits():
    with shmreg.temporary("ok", capacity=100, memory=1 << 16) as t:
        t["x"] = 1
        name = t.name
        assert name in shmreg.list_tables()
        # another process attaches by name
        assert run_py("import shmreg, sys; print(shmreg.Table.open(sys.argv[1])['x'])",
                      name).stdout == "1\n"
    assert name not in shmreg.list_tables() and t.closed

    with pytest.raises(ZeroDivisionError):
        with shmreg.Table.temporary(capacity=100, memory=1 << 16) as t:
            name = t.name
            1 / 0
    assert name not in shmreg.list_tables()

    with shmreg.temporary(capacity=100, memory=1 << 16) as t:
        t.unlink()                      # unlinked inside the block: no error on exit
    with pytest.raises(ValueError):
        shmreg.temporary("no/slash").__enter__()


def test_two_temporary_tables_never_share_a_name():
    with shmreg.temporary(capacity=100, memory=1 << 16) as a, \
            shmreg.temporary(capacity=100, memory=1 << 16) as b:
        assert a.name != b.name
        assert shmreg.table.temporary_creator(a.name)[0] == __import__("os").getpid()
        assert not shmreg.table.temporary_orphaned(a.name)
    assert shmreg.table.temporary_creator("jobs") is None


def test_cache_stats_host_wide_hits_and_misses(table_name):
    with shmreg.Cache(table_name, ttl=60, capacity=1000, memory=1 << 20) as c:
        c.set("k", "v")
        # another process: 640 hits, 128 misses (multiples of the 64-read sample)
        run_py("""
            import shmreg, sys
            c = shmreg.Cache(sys.argv[1], ttl=60)
            for _ in range(640): c.get("k")
            for _ in range(128): c.get("nope")
        """, table_name)
        for _ in range(64):
            c.get("k")
        st = c.stats()
        assert (st["hits"], st["misses"]) == (64, 0)                # this process
        assert (st["host_hits"], st["host_misses"]) == (704, 128)  # every process
        c.unlink()


def test_pool_example_runs_and_leaves_no_table(tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    before = set(shmreg.list_tables())
    r = subprocess.run([sys.executable, os.path.join(root, "examples", "pool_jobs.py")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"1000 jobs, sum of squares {sum(n * n for n in range(1000))}\n"
    assert not {n for n in set(shmreg.list_tables()) - before if n.startswith("tmp-")}
