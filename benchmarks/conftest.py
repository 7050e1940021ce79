"""Shared fixtures for the shmreg benchmarks (see _bench_common for the data
set and the backends).  Run:

    python -m pytest benchmarks -q --benchmark-columns=min,mean,median,ops

Times in the pytest-benchmark tables are per call of 1,000 operations
(so microseconds per call = nanoseconds per operation); the summary at the
end prints ns/op and ratios directly.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_common as bc  # noqa: E402

import shmreg  # noqa: E402


@pytest.fixture(scope="session")
def dataset() -> bc.Dataset:
    """100k entries (16-byte keys, 64-byte values) plus the 1,000-key op sets."""
    return bc.Dataset()


@pytest.fixture(scope="session")
def dict_store(dataset):
    return bc.make_dict(dataset)


@pytest.fixture(scope="session")
def shmreg_store(dataset):
    """A capacity-110k shmreg table holding the data set (unlinked at the end)."""
    name = bc.unique_table_name("ops")
    t = bc.make_shmreg(dataset, name)
    try:
        yield t
        t.check()
    finally:
        t.close()
        try:
            shmreg.unlink(name)
        except shmreg.TableNotFoundError:
            pass


@pytest.fixture(scope="session")
def lmdb_store(dataset, tmp_path_factory):
    """A py-lmdb environment in a tmp dir holding the data set."""
    pytest.importorskip("lmdb", reason="py-lmdb is not installed (pip install lmdb)")
    path = tmp_path_factory.mktemp("lmdb")
    env = bc.make_lmdb(dataset, str(path))
    yield env
    env.close()
    shutil.rmtree(path, ignore_errors=True)   # a 1 GiB (sparse) map file


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A private redis-server on a unix socket in a tmp dir (no persistence),
    stopped at the end of the session."""
    if bc.redis_server_binary() is None:
        pytest.skip("redis-server is not on PATH (apt-get install -y redis-server): "
                    "Redis benchmarks skipped")
    pytest.importorskip("redis", reason="redis-py is not installed (pip install redis)")
    server = bc.RedisServer(str(tmp_path_factory.mktemp("redis"))).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``server``: a Redis/Valkey server of one benchmark module's own
    (``$SHMREG_REDIS_SERVER``, else redis-server on PATH), on a unix socket
    in a tmp dir, stopped with the module."""
    pytest.importorskip("redis", reason="redis-py is not installed (pip install redis)")
    server = bc.RedisServer(str(tmp_path_factory.mktemp("redis-module")),
                            os.environ.get("SHMREG_REDIS_SERVER")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_store(dataset, redis_server):
    """A redis-py client of the private server, db 0 holding the data set."""
    client = redis_server.client()
    bc.fill_redis(dataset, client)
    floor = bc.redis_wire_floor_ns(redis_server.socket, dataset.hit_keys[0])
    bc.NOTES.extend([f"redis: one GET round trip on the unix socket without a client library: "
                     f"{floor:,.0f} ns (the floor under the redis-py numbers)", ""])
    yield client
    client.close()


def pytest_terminal_summary(terminalreporter):
    if not bc.RESULTS and not bc.NOTES:
        return
    tr = terminalreporter
    tr.section("shmreg benchmark summary")
    if bc.RESULTS:
        tr.write_line("ns per operation (median of the pytest-benchmark rounds / 1000):")
        tr.write_line("")
        for line in bc.markdown_ops_table(bc.RESULTS).splitlines():
            tr.write_line(line)
        tr.write_line("")
    for line in bc.NOTES:
        tr.write_line(line)
