"""Shared fixtures: unique table names that are always unlinked, and a
segment directory of this test session's own."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

import shmreg
from _helpers import unique_name

_saved_dir: list = []


def pytest_configure(config):
    """Give this session its own segment directory (``SHMREG_DIR``, inherited
    by every child process): concurrent test runs on one host never see each
    other's tables, and no test depends on what else is in ``/dev/shm``.
    On a tmpfs like the real one, sticky and world-writable like ``/dev/shm``
    so tests running throwaway users can create tables in it too."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    d = tempfile.mkdtemp(prefix="shmreg-tests-", dir=base)
    os.chmod(d, 0o1777)
    _saved_dir.append((os.environ.get("SHMREG_DIR"), d))
    os.environ["SHMREG_DIR"] = d


def pytest_unconfigure(config):
    if not _saved_dir:
        return
    old, d = _saved_dir.pop()
    if old is None:
        os.environ.pop("SHMREG_DIR", None)
    else:
        os.environ["SHMREG_DIR"] = old
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def table_name():
    """A fresh table name; whatever table gets that name is unlinked afterwards."""
    name = unique_name()
    yield name
    try:
        shmreg.unlink(name)
    except shmreg.TableNotFoundError:
        pass


@pytest.fixture
def table(table_name):
    """A small fresh table (capacity 10,000, 4 MiB)."""
    t = shmreg.Table.create(table_name, capacity=10_000, memory=4 << 20)
    yield t
    t.close()


# -- Redis/Valkey servers for tests/test_redis*.py (see _redis_servers.py) -----------

@pytest.fixture(scope="session")
def redis_server():
    """One real server for the session (unix socket + loopback port)."""
    from _redis_servers import Server

    s = Server()
    try:
        yield s.start()
    finally:
        s.cleanup()


@pytest.fixture(scope="session")
def redis_cluster():
    """A real 3-master Cluster for the session."""
    from _redis_servers import Cluster

    c = Cluster()
    try:
        yield c.start()
    finally:
        c.cleanup()
