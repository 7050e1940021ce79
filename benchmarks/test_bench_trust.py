"""What the trust model and ``ttl=inf`` cost: ``Table.set`` (a thin Python
override that maps ``ttl=inf`` to "never") against the core's ``set`` it
calls, and ``Table.open`` (``O_NOFOLLOW`` + ``fstat`` + owner/mode checks)
against a bare ``os.open`` + ``os.fstat`` of the same file.  Times are per
1,000 operations; compare the rows of one group (same run, same machine).
Reads (``get``, ``[]``, ``in``) are not wrapped: they cost what they did.
"""

from __future__ import annotations

import os

import pytest

import _bench_common as bc

import shmreg
from shmreg import _core

KEYS = [f"key-{i:06d}" for i in range(1000)]


@pytest.fixture(scope="module")
def table():
    t = shmreg.Table.create(bc.unique_table_name("trust"), capacity=10_000, memory=8 << 20)
    yield t
    t.unlink()
    t.close()


@pytest.mark.parametrize("how", ["Table.set", "CoreTable.set"])
@pytest.mark.parametrize("ttl", [None, 60.0])
def test_set_x1000(benchmark, table, how, ttl):
    benchmark.group = f"set ttl={ttl} (time per 1000 ops)"
    fn = table.set if how == "Table.set" else _core.CoreTable.set.__get__(table)

    def loop():
        for k in KEYS:
            fn(k, 1, ttl=ttl)

    benchmark(loop)


@pytest.mark.parametrize("how", ["Table.open", "os.open+fstat"])
def test_open_x100(benchmark, table, how):
    benchmark.group = "open (time per 100 opens)"
    path = table.path

    def loop():
        for _ in range(100):
            if how == "Table.open":
                shmreg.Table.open(table.name).close()
            else:
                fd = os.open(path, os.O_RDWR)
                os.fstat(fd)
                os.close(fd)

    benchmark(loop)
