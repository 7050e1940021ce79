"""shmreg.mp: one table per pool worker under fork, spawn and forkserver."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os

import pytest

import shmreg
import shmreg.mp
from _helpers import unique_name
from shmreg.testing import wait_for

METHODS = [m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()]
WORKERS = 3
TASKS = 12
PER_TASK = 400

# Python >= 3.12 warns when forking a multi-threaded process (this test
# process may own entries, hence run an owner thread); the fork is the point.
fork_ok = pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning")


# -- worker functions (module level: picklable by reference for spawn/forkserver) --------


def _count(n: int) -> int:
    t = shmreg.mp.table()
    # Hold the first WORKERS tasks until WORKERS of them run at once: they
    # are then in WORKERS distinct processes, racing on the same counters.
    t.update_counter("started")
    wait_for(lambda: t.get("started", 0) >= WORKERS, timeout=60, message="all workers started")
    for _ in range(n):
        t.update_counter("hits")
    t.update_counter(f"by:{os.getpid()}", n)
    return os.getpid()


def _own(key: str) -> tuple:
    t = shmreg.mp.table()
    t.set(key, "mine", owned=True)
    return os.getpid(), t.owner(key), t is shmreg.mp.table(), id(t)


def _not_attached() -> str:
    try:
        shmreg.mp.table()
    except RuntimeError as exc:
        return str(exc)
    return "attached?!"


# -- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [pytest.param(m, marks=fork_ok) for m in METHODS])
def test_pool_workers_share_one_table_with_exact_counters(method, shm_table):
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(WORKERS, initializer=shmreg.mp.attach, initargs=(shm_table.name,)) as pool:
        pids = pool.map(_count, [PER_TASK] * TASKS, chunksize=1)
    assert len(set(pids)) == WORKERS
    assert os.getpid() not in pids
    assert shm_table["hits"] == TASKS * PER_TASK
    per_worker = {int(k[3:]): v for k, v in shm_table.select("by:")}
    assert set(per_worker) == set(pids)
    assert per_worker == {pid: pids.count(pid) * PER_TASK for pid in set(pids)}
    shm_table.check()


@fork_ok
def test_fork_children_of_an_attached_parent_reattach(shm_table):
    """No initializer: fork workers inherit the parent's attachment and
    re-attach on first use as processes of their own (their own owner slot:
    owned entries are theirs, and vanish with them)."""
    parent_table = shmreg.mp.attach(shm_table.name)
    try:
        assert shmreg.mp.table() is parent_table
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(2) as pool:
            results = pool.map(_own, [f"owned:{i}" for i in range(6)], chunksize=1)
            for pid, owner, stable, table_id in results:
                assert owner == pid != os.getpid()     # owned by the worker, not the parent
                assert stable                          # table() is stable within a worker
                assert table_id != id(parent_table)    # re-attached, not the inherited object
            assert {k for k, _ in shm_table.select("owned:")} == {f"owned:{i}" for i in range(6)}
            assert list(shm_table.select(owner=os.getpid())) == []
        # Pool exit terminates the workers: their owned entries vanish.
        wait_for(lambda: not list(shm_table.select("owned:")), timeout=30,
                 message="the dead workers' entries to vanish")
        assert shmreg.mp.table() is parent_table       # the parent keeps its own
    finally:
        shmreg.mp.detach()


@pytest.mark.parametrize("method", [pytest.param(m, marks=fork_ok) for m in METHODS])
def test_process_pool_executor_with_pool_kwargs(method, shm_table):
    ctx = multiprocessing.get_context(method)
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx,
                                                **shmreg.mp.pool_kwargs(shm_table.name)) as ex:
        results = list(ex.map(_own, ["a", "b", "c"]))
        assert all(owner == pid for pid, owner, _, _ in results)
        assert sorted(k for k, _ in shm_table.select()) == ["a", "b", "c"]


def test_spawn_worker_without_attach_gets_a_clear_error():
    shmreg.mp.detach()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        msg = pool.apply(_not_attached)
    assert "shmreg.mp.attach" in msg
    assert _not_attached() == msg


def test_attach_opens_never_creates():
    name = unique_name("mp")
    try:
        with pytest.raises(shmreg.TableNotFoundError):
            shmreg.mp.attach(name)
        assert name not in shmreg.list_tables()
    finally:
        try:
            shmreg.unlink(name)
        except shmreg.TableNotFoundError:
            pass


def test_attach_is_idempotent_and_detach_forgets(shm_table_factory):
    a, b = shm_table_factory(), shm_table_factory()
    try:
        t1 = shmreg.mp.attach(a.name)
        assert shmreg.mp.attach(a.name) is t1
        t2 = shmreg.mp.attach(b.name)
        assert t2.name == b.name and shmreg.mp.table() is t2
        assert not t1.closed           # a replaced table may still be in use: not closed
        shmreg.mp.detach()
        assert t2.closed
        with pytest.raises(RuntimeError):
            shmreg.mp.table()
        t1.close()
    finally:
        shmreg.mp.detach()
