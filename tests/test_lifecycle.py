"""Segment lifecycle across processes: spawn/fork/forkserver children, names,
orphaned init files, and a full shared-memory filesystem."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys

import pytest

import shmreg
from _helpers import mounted_tmpfs, run_py, unique_name


def _child_attach_and_exit(name: str) -> None:
    t = shmreg.Table.open(name)
    t["child"] = os.getpid()
    # No close(), no unlink: a child exiting must leave the segment alone.


def _pool_init(name: str) -> None:
    global _pool_table
    _pool_table = shmreg.Table.open(name)


def _pool_work(i: int) -> int:
    for _ in range(100):
        _pool_table.update_counter("n")
    _pool_table[f"w{i}"] = os.getpid()
    return os.getpid()


def _bump_via_pickled_table(t: "shmreg.Table") -> None:
    t.update_counter("pickled")


@pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
def test_child_exit_does_not_unlink(table, method):
    ctx = mp.get_context(method)
    p = ctx.Process(target=_child_attach_and_exit, args=(table.name,))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert table.name in shmreg.list_tables()
    assert table["child"] == p.pid
    # A brand-new process still finds it by name.
    out = run_py("import shmreg, sys; print(shmreg.Table.open(sys.argv[1])['child'])", table.name)
    assert int(out.stdout) == p.pid


@pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
def test_pool_shares_one_table(table, method):
    ctx = mp.get_context(method)
    with ctx.Pool(4, initializer=_pool_init, initargs=(table.name,)) as pool:
        pids = pool.map(_pool_work, range(16), chunksize=1)
    assert table["n"] == 1600
    assert all(table[f"w{i}"] == pid for i, pid in enumerate(pids))
    table.check()


def test_table_pickles_by_name(table):
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_bump_via_pickled_table, args=(table,))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert table["pickled"] == 1


def test_fork_children_keep_working(table):
    table["before"] = 1
    pids = []
    for i in range(4):
        pid = os.fork()
        if pid == 0:  # child: use the inherited mapping
            try:
                for _ in range(1000):
                    table.update_counter("forked")
                table[f"child{i}"] = table["before"] + i
                os._exit(0)
            except BaseException:
                os._exit(1)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert table["forked"] == 4000
    assert [table[f"child{i}"] for i in range(4)] == [1, 2, 3, 4]
    table.check()


def test_create_race_between_processes(table_name):
    code = """
        import shmreg, sys
        t = shmreg.Table(sys.argv[1], capacity=1000, memory=1 << 20)
        print(t.update_counter("openers"))
    """
    procs = [subprocess.Popen([sys.executable, "-c", code.replace("\n        ", "\n"), table_name],
                              stdout=subprocess.PIPE, text=True) for _ in range(6)]
    outs = sorted(int(p.communicate(timeout=60)[0]) for p in procs)
    assert outs == [1, 2, 3, 4, 5, 6]
    assert shmreg.Table.open(table_name).capacity == 1000


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this platform (macOS)")
def test_tables_live_in_dev_shm_by_default(monkeypatch):
    # The one test about /dev/shm itself: every other test uses this
    # session's own SHMREG_DIR (tests/conftest.py).
    monkeypatch.delenv("SHMREG_DIR")
    name = unique_name("devshm")
    assert shmreg._segment.segment_dir() == "/dev/shm"
    with shmreg.Table.create(name, capacity=100, memory=1 << 16) as t:
        try:
            assert t.path == f"/dev/shm/shmreg.{name}" and os.path.isfile(t.path)
            assert name in shmreg.list_tables()
        finally:
            t.unlink()
    assert not os.path.exists(f"/dev/shm/shmreg.{name}")


def test_orphaned_init_file_is_swept(table_name):
    d = shmreg._segment.segment_dir()
    # An init file left by a creator that died (pid 1 is never us, and pid
    # 2**22+1 is above pid_max, so it is dead).
    orphan = os.path.join(d, f".shmreg-init.{table_name}.{2**22 + 1}.abcd")
    with open(orphan, "wb") as f:
        f.write(b"half-built")
    shmreg.Table.create(table_name, capacity=100, memory=1 << 16).close()
    assert not os.path.exists(orphan)
    assert table_name in shmreg.list_tables()
    assert not any(n.startswith(".") for n in shmreg.list_tables())


def test_unlinked_table_keeps_working_for_attached(table):
    table["x"] = 1
    table.unlink()
    assert table.name not in shmreg.list_tables()
    table["y"] = 2
    assert table["x"] + table["y"] == 3
    with pytest.raises(shmreg.TableNotFoundError):
        shmreg.Table.open(table.name)


def test_segment_mode_is_private(table):
    assert os.stat(table.path).st_mode & 0o777 == 0o600


@pytest.fixture
def tiny_tmpfs():
    """A 2 MiB tmpfs (root, which CI has)."""
    with mounted_tmpfs("2m", "shmreg-tiny-") as d:
        yield d


def test_tiny_tmpfs_fails_cleanly(tiny_tmpfs):
    code = """
        import shmreg, sys
        small = shmreg.Table.create("fits", capacity=100, memory=64 << 10)
        small["k"] = b"v" * 1000
        try:
            shmreg.Table.create("too-big", capacity=10_000, memory=16 << 20)
        except shmreg.NoSpaceError as e:
            assert isinstance(e, OSError)
            print("NoSpaceError:", e)
        else:
            raise SystemExit("expected NoSpaceError")
        assert shmreg.list_tables() == ["fits"], shmreg.list_tables()
        assert small["k"] == b"v" * 1000
        small.check()
    """
    r = run_py(code, env={"SHMREG_DIR": tiny_tmpfs})
    assert r.returncode == 0  # not -SIGBUS
    assert "no room for table 'too-big'" in r.stdout
    # Nothing half-built is left behind.
    assert sorted(os.listdir(tiny_tmpfs)) == ["shmreg.fits"]
