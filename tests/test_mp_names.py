"""shmreg.mp with real pools: a mistyped table name fails in the parent
before any worker starts, a table gone by the time workers start fails the
tasks (not the initializer, which a Pool would restart forever), and a
worker attaches several tables."""

from __future__ import annotations

import multiprocessing
import os

import pytest

import shmreg
import shmreg.mp

# Python >= 3.12 warns when forking a multi-threaded process; the fork is the point.
fork_ok = pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning")
METHODS = [pytest.param(m, marks=fork_ok) for m in ("fork", "spawn")
           if m in multiprocessing.get_all_start_methods()]


def _square_into_results(x: int) -> int:
    shmreg.mp.table().update_counter("jobs:done")
    shmreg.mp.table(shmreg.mp.table().get("results-name"))[x] = x * x
    return os.getpid()


def _first_table_name(_: int) -> str:
    return shmreg.mp.table().name


@pytest.mark.timeout(30)
def test_mistyped_name_fails_in_the_parent_with_a_suggestion(shm_table):
    typo = shm_table.name[:-1] + "x"
    with pytest.raises(shmreg.TableNotFoundError, match=f"no table named {typo!r} "
                                                        rf"\(did you mean {shm_table.name!r}\?\)"):
        multiprocessing.get_context("spawn").Pool(2, **shmreg.mp.pool_kwargs(typo))
    assert typo not in shmreg.list_tables()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
def test_table_gone_before_the_workers_start_fails_the_tasks_not_forever(method, shm_table_factory):
    t = shm_table_factory()
    kwargs = shmreg.mp.pool_kwargs(t.name)     # exists now...
    shmreg.unlink(t.name)                      # ...not when the workers attach
    with multiprocessing.get_context(method).Pool(2, **kwargs) as pool:
        result = pool.map_async(_first_table_name, range(4))
        with pytest.raises(shmreg.TableNotFoundError, match=t.name):
            result.get(timeout=30)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
def test_workers_attach_several_tables(method, shm_table_factory):
    jobs, results = shm_table_factory(), shm_table_factory()
    jobs["results-name"] = results.name
    with multiprocessing.get_context(method).Pool(2, **shmreg.mp.pool_kwargs(jobs.name, results.name)) as pool:
        pids = pool.map(_square_into_results, range(20), chunksize=2)
    assert os.getpid() not in pids
    assert jobs["jobs:done"] == 20
    assert dict(results.items()) == {x: x * x for x in range(20)}


def test_table_names_only_what_was_attached(shm_table_factory):
    a, b = shm_table_factory(), shm_table_factory()
    try:
        assert shmreg.mp.attach(a.name, b.name).name == a.name
        assert shmreg.mp.table(b.name).name == b.name
        assert set(shmreg.mp.tables()) == {a.name, b.name}
        with pytest.raises(RuntimeError, match="is not attached"):
            shmreg.mp.table("other")
        with pytest.raises(TypeError):
            shmreg.mp.pool_kwargs()
    finally:
        shmreg.mp.detach()


def _modes_of_attached(_: int) -> list:
    return sorted((name, t.mode) for name, t in shmreg.mp.tables().items())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
def test_several_shared_tables_attach_with_their_sharing(method, table_name):
    # Several names and the trust model's mode together: the check in the
    # parent and every worker's attach accept the group-writable tables.
    other = table_name + "-b"
    a = shmreg.Table.create(table_name, mode=0o660, capacity=100, memory=1 << 16)
    b = shmreg.Table.create(other, mode=0o660, capacity=100, memory=1 << 16)
    try:
        with pytest.raises(shmreg.UntrustedTableError):
            shmreg.mp.pool_kwargs(a.name, b.name)          # default sharing: refused in the parent
        with pytest.raises(shmreg.TableNotFoundError, match="did you mean"):
            shmreg.mp.pool_kwargs(a.name, other[:-1] + "x", mode=0o660)
        kwargs = shmreg.mp.pool_kwargs(a.name, b.name, mode=0o660)
        with multiprocessing.get_context(method).Pool(2, **kwargs) as pool:
            got = pool.map(_modes_of_attached, range(4))
        assert got == [sorted([(a.name, 0o660), (b.name, 0o660)])] * 4
    finally:
        for t in (a, b):
            t.unlink()
            t.close()
