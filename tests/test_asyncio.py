"""The asyncio face of shmreg.Cache (aget, aset, adelete, aadd, atouch,
aget_or_set) and the example ASGI app under gunicorn with uvicorn workers.

The central claim - waiting for another process's computation never blocks
the event loop - is proven without timing: the other process finishes its
computation only when a ticker task on our loop tells it to, so a blocked
loop could never get its value (the wait would time out instead).
"""

from __future__ import annotations

import asyncio
import os
import signal

import psutil
import pytest

import shmreg
from _gunicorn_server import GunicornServer
from _helpers import spawn_py, unique_name, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "asgi_app")

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cache(table_name):
    c = shmreg.Cache(table_name, ttl=60, capacity=4096, memory=4 << 20)
    yield c
    c.close()
    c.unlink()


def test_async_reads_and_writes(cache):
    async def main():
        assert await cache.aget("k") is None and await cache.aget("k", "d") == "d"
        assert await cache.aset("k", {"v": 1}) is False       # nothing evicted
        assert await cache.aget("k") == {"v": 1}
        assert await cache.aadd("k", 2) is False and await cache.aadd("new", 2) is True
        assert await cache.atouch("k", 5) is True and 4 < cache.table.ttl("k") <= 5
        assert await cache.atouch("absent") is False
        assert await cache.adelete("k") is True and await cache.adelete("k") is False
        await cache.aset("short", 1, ttl=1)
        assert 0 < cache.table.ttl("short") <= 1

    asyncio.run(main())


def test_aget_or_set_factories(cache):
    runs = []

    async def coro_factory():
        runs.append("coro")
        await asyncio.sleep(0)
        return "from-coro"

    def plain_factory():
        runs.append("plain")
        return "from-plain"

    async def main():
        assert await cache.aget_or_set("a", coro_factory) == "from-coro"
        assert await cache.aget_or_set("a", coro_factory) == "from-coro"
        assert await cache.aget_or_set("b", plain_factory) == "from-plain"
        assert await cache.aget_or_set("c", lambda: coro_factory()) == "from-coro"
        assert cache.table.ttl("a") is not None and 59 < cache.table.ttl("a") <= 60
        await cache.aget_or_set("d", plain_factory, ttl=5)
        assert 4 < cache.table.ttl("d") <= 5

    asyncio.run(main())
    assert runs == ["coro", "plain", "coro", "plain"]
    with pytest.raises(ValueError):
        asyncio.run(cache.aget_or_set("e", plain_factory, ttl=-1))


def test_aget_or_set_concurrent_tasks_compute_once(cache):
    runs = []

    async def slow():
        runs.append(1)
        await asyncio.sleep(0.2)
        return "v"

    async def main():
        return await asyncio.gather(*(cache.aget_or_set("k", slow) for _ in range(10)))

    assert asyncio.run(main()) == ["v"] * 10
    assert runs == [1]


def test_aget_or_set_failure_does_not_poison(cache):
    async def boom():
        raise RuntimeError("factory failed")

    async def ok():
        return "ok"

    async def main():
        with pytest.raises(RuntimeError, match="factory failed"):
            await cache.aget_or_set("k", boom)
        return await cache.aget_or_set("k", ok, timeout=1)

    assert asyncio.run(main()) == "ok"


def test_cancelled_computation_releases_the_key(cache):
    async def forever():
        await asyncio.Event().wait()

    async def quick():
        return "second"

    async def main():
        task = asyncio.ensure_future(cache.aget_or_set("k", forever))
        await asyncio.sleep(0.05)
        assert "k" in cache._flight_table()           # it holds the mark
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert "k" not in cache._flight_table()
        return await cache.aget_or_set("k", quick, timeout=2)

    assert asyncio.run(main()) == "second"


def test_aget_or_set_times_out_without_blocking(cache):
    # Another holder of the mark that never finishes: the waiter times out.
    flights = cache._flight_table()
    flights.insert_new("k", os.getpid(), ttl=30)      # not owned: stays until deleted
    ticks = []

    async def ticker():
        while True:
            ticks.append(1)
            await asyncio.sleep(0.01)

    async def main():
        t = asyncio.ensure_future(ticker())
        try:
            with pytest.raises(TimeoutError):
                await cache.aget_or_set("k", lambda: "never", timeout=0.3)
        finally:
            t.cancel()

    asyncio.run(main())
    flights.delete("k")
    assert len(ticks) > 1


@pytest.mark.timeout(60)
def test_event_loop_runs_while_another_process_computes(cache):
    """The child computes until our ticker releases it: if the wait blocked
    the loop, the ticker could not run and the child would never finish."""
    child = spawn_py(f"""
import sys, time
import shmreg
cache = shmreg.Cache({cache.name!r})
def compute():
    cache.table.set("computing", True)
    deadline = time.monotonic() + 30
    while cache.table.get("release") is None:
        if time.monotonic() > deadline:
            sys.exit("never released")
        time.sleep(0.005)
    return "from-child"
print(cache.get_or_set("k", compute))
""")
    try:
        wait_until(lambda: cache.table.get("computing") is True, 20, "the child to start computing")
        ran_here = []
        ticks = []

        async def ticker():
            while True:
                ticks.append(1)
                if len(ticks) == 10:
                    cache.table.set("release", True)
                await asyncio.sleep(0.005)

        async def main():
            t = asyncio.ensure_future(ticker())
            try:
                return await cache.aget_or_set("k", lambda: ran_here.append(1) or "from-parent",
                                               timeout=20)
            finally:
                t.cancel()

        assert asyncio.run(main()) == "from-child"
        assert ran_here == [] and len(ticks) >= 10
        out, err = child.communicate(timeout=20)
        assert child.returncode == 0, err
        assert out.strip() == "from-child"
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate(timeout=10)


def test_django_backend_aget_or_set_waits_on_another_process(table_name):
    """The same through Django's async cache API."""
    import _django_settings

    _django_settings.configure()
    from shmreg.django import ShmregCache

    dj = ShmregCache(table_name, {})
    key = dj.make_key("k")
    cache = dj.shmreg_cache
    cache._flight_table().insert_new(key, os.getpid(), ttl=30)   # "another process" computes
    ticks = []

    async def ticker():
        while True:
            ticks.append(1)
            if len(ticks) == 5:
                cache.set(key, "computed elsewhere")
            await asyncio.sleep(0.005)

    async def main():
        t = asyncio.ensure_future(ticker())
        try:
            async def mine():
                return "mine"
            return await dj.aget_or_set("k", mine)
        finally:
            t.cancel()

    try:
        assert asyncio.run(main()) == "computed elsewhere"
    finally:
        cache._flight_table().delete(key)
        cache.unlink()


# -- gunicorn with uvicorn workers ----------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    prefix = unique_name("asg") + "-"
    env = {"SHMREG_ASGI_PREFIX": prefix, "SHMREG_ASGI_BIND": "127.0.0.1:0",
           "SHMREG_ASGI_WORKERS": "2", "SHMREG_ASGI_DELAY": "0.5",
           "PYTHONPATH": os.pathsep.join([EXAMPLE, os.environ.get("PYTHONPATH", "")])}
    s = GunicornServer(os.path.join(EXAMPLE, "gunicorn.conf.py"), cwd=EXAMPLE, env=env,
                       prefix=prefix, registry=prefix + "workers", workers=2,
                       log_path=tmp_path_factory.mktemp("asgunicorn") / "gunicorn.log")
    try:
        yield s.start()
    finally:
        s.stop()


@pytest.mark.timeout(120)
def test_uvicorn_workers_share_the_cache(server):
    from concurrent.futures import ThreadPoolExecutor

    def get(path):
        return server.request(path)

    with ThreadPoolExecutor(8) as ex:
        computing = [ex.submit(get, "/compute/5") for _ in range(6)]
        # While /compute waits, every worker keeps answering other requests.
        ticks = [ex.submit(get, "/") for _ in range(6)]
        assert all(f.result(timeout=60)[0]["x-served-by"] for f in ticks)
        values = {f.result(timeout=60)[1]["value"] for f in computing}
    assert len(values) == 1
    assert server.request("/stats")[1]["compute"] == 1

    # Kill the worker that answered: another one serves the value from the cache.
    _, body = server.request("/compute/5")
    pid = body["pid"]
    os.kill(pid, signal.SIGKILL)

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_until(gone, 30, f"worker {pid} to exit")
    headers, again = server.request("/compute/5")
    assert again["value"] == body["value"] and again["pid"] != pid
    assert server.request("/stats")[1]["compute"] == 1
