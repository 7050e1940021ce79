"""shmreg.django.ShmregCache against the real Django.

The contract checked is Django's cache API as Django's own test-suite
(``tests/cache/tests.py``, BaseCacheTests) states it; these tests are written
for shmreg, and ``tests/django_upstream/run_upstream_cache_tests.py`` runs
Django's suite itself against the backend.  Then what only a shared cache
can show: real processes sharing one cache (set here, read there; ``incr``
from 4 processes x 5,000 is exact), expiry, fork after the backend was
created, and the example Django app under a real gunicorn with 3 workers
sharing cached views, a single-flight ``get_or_set`` and sessions.
"""

from __future__ import annotations

import asyncio
import http.cookies
import os
import pickle
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

import shmreg
from _gunicorn_server import GunicornServer
from _helpers import run_py, spawn_py, unique_name, wait_until

import _django_settings  # noqa: E402

DEFAULT_TABLE = _django_settings.configure()

# (Not django.core.cache.cache: a module-level proxy would open the default
# table when pytest inspects the module at collection.)
from django.core.cache import CacheKeyWarning, caches  # noqa: E402
from django.core.cache.backends.base import BaseCache  # noqa: E402

from shmreg.django import ShmregCache  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "django_app")

pytestmark = pytest.mark.timeout(120)


def teardown_module(module):
    _django_settings.cleanup()


@pytest.fixture
def make():
    """``make(**params)``: a ShmregCache on a fresh table (unlinked afterwards);
    ``make(location=..., ...)`` shares an existing one."""
    names = []

    def build(location: str | None = None, **params):
        if location is None:
            location = unique_name("dj")
            names.append(location)
        return ShmregCache(location, params)

    yield build
    for name in names:
        for n in (name, name + "--flights"):
            try:
                shmreg.unlink(n)
            except shmreg.TableNotFoundError:
                pass


@pytest.fixture
def c(make):
    return make(OPTIONS={"MAX_ENTRIES": 4096, "memory": 4 << 20})


class Unpicklable:
    def __getstate__(self):
        raise pickle.PickleError("no")


# -- the API, as Django states it ------------------------------------------------

def test_set_get_add_delete(c):
    c.set("key", "value")
    assert c.get("key") == "value"
    assert c.get("missing") is None and c.get("missing", "bang!") == "bang!"
    c.set("none", None)
    assert c.get("none", "default") is None        # a cached None is not a miss
    assert c.add("key", "other") is False and c.get("key") == "value"
    assert c.add("fresh", 1) is True and c.get("fresh") == 1
    assert c.delete("key") is True and c.delete("key") is False
    assert c.get("key") is None
    assert c.has_key("none") and "none" in c and "nothing" not in c


def test_values_round_trip(c):
    values = {"str": "Iñtërnâtiônàlizætiøn", "int": 42, "big": 1 << 80, "float": 1.5,
              "bool": True, "bytes": b"\x00\xff", "list": [1, 2], "tuple": (1, 2),
              "dict": {"A": 1}, "function": test_values_round_trip, "class": Unpicklable}
    for key, value in values.items():
        c.set(key, value)
        got = c.get(key)
        assert got == value and type(got) is type(value)


def test_many(c):
    assert c.set_many({"a": "a", "b": "b", "c": None}) == []
    assert c.get_many(["a", "c", "e"]) == {"a": "a", "c": None}
    assert c.get_many(iter(["a", "b"])) == {"a": "a", "b": "b"}
    assert c.delete_many(["a", "b"]) is None
    assert c.get_many(["a", "b", "c"]) == {"c": None}
    assert c.set_many({}) == []
    c.clear()
    assert c.get("c", "gone") == "gone"


def test_incr_decr(c):
    c.set("answer", 41)
    assert c.incr("answer") == 42 and c.get("answer") == 42
    assert c.incr("answer", 10) == 52
    assert c.decr("answer", 10) == 42 and c.decr("answer") == 41
    assert c.incr("answer", -1) == 40
    c.set("f", 1.5)
    assert c.incr("f") == 2.5
    with pytest.raises(ValueError, match="not found"):
        c.incr("does_not_exist")
    with pytest.raises(ValueError):
        c.decr("does_not_exist", -1)
    assert c.get("does_not_exist") is None               # incr never creates
    c.set("null", None)
    with pytest.raises(TypeError):
        c.incr("null")
    c.set("s", "text")
    with pytest.raises(TypeError):
        c.decr("s")


def test_incr_keeps_expiry(c):
    c.set("n", 1, timeout=1000)
    key = c.make_key("n")
    before = c._table.ttl(key)
    assert c.incr("n") == 2 and c.decr("n", 5) == -3
    after = c._table.ttl(key)
    assert before - 5 < after <= before
    c.set("forever", 1, timeout=None)
    c.incr("forever")
    assert c._table.ttl(c.make_key("forever")) is None


def test_timeouts(c):
    c.set("forever", "eggs", None)
    assert c._table.ttl(c.make_key("forever")) is None
    c.set("long", "x", 60 * 60 * 24 * 30 + 1)               # no memcached 30-day rule
    assert c.get("long") == "x"
    c.set("float", "spam", 100.2)
    assert c.get("float") == "spam"
    # 0 or negative: not cached, and the previous value goes too.
    c.set("zero", "old")
    c.set("zero", "new", 0)
    assert c.get("zero") is None
    c.set("neg", "old")
    c.set("neg", "new", -1)
    assert c.get("neg") is None
    assert c.add("add0", "ham", 0) is True and c.get("add0") is None
    c.set("taken", 1)
    assert c.add("taken", 2, -5) is False and c.get("taken") == 1
    c.set_many({"m1": 1, "m2": 2}, 0)
    assert c.get_many(["m1", "m2"]) == {}
    # The default timeout comes from TIMEOUT.
    c.set("default", 1)
    assert 299 < c._table.ttl(c.make_key("default")) <= 300


def test_touch(c):
    c.set("k", "v", timeout=1)
    assert c.touch("k", 100) is True
    assert 99 < c._table.ttl(c.make_key("k")) <= 100
    assert c.touch("k", None) is True and c._table.ttl(c.make_key("k")) is None
    assert c.touch("k") is True and 299 < c._table.ttl(c.make_key("k")) <= 300
    assert c.touch("k", 0) is True and c.get("k") is None
    assert c.touch("nonexistent") is False


def test_default_timeout_none_and_options(make):
    forever = make(TIMEOUT=None)
    forever.set("k", 1)
    assert forever._table.ttl(forever.make_key("k")) is None
    sized = make(OPTIONS={"MAX_ENTRIES": 5000, "memory": 2 << 20})
    assert sized._table.capacity >= 5000


def test_expiry(c):
    c.set("short", "x", timeout=1)
    c.set_many({"m": 1}, timeout=1)
    c.set("n", 1, timeout=1)
    c.incr("n")                                   # does not make it permanent
    assert c.has_key("short") and c.get("m") == 1
    wait_until(lambda: not c.has_key("short") and c.get("m") is None and c.get("n") is None,
               10, "entries to expire")
    assert c.add("short", "again") is True          # an expired key is free
    assert c.touch("m") is False


def test_versioning(make):
    loc = unique_name("djv")
    try:
        v1, v2 = make(location=loc), make(location=loc, VERSION=2)
        v1.set("answer", 42)
        assert v1.get("answer", version=2) is None and v2.get("answer") is None
        assert v2.get("answer", version=1) == 42
        v2.set("answer", 37)
        assert v1.get("answer", version=2) == 37 and v1.get("answer") == 42
        assert v1.incr("answer", version=2) == 38 and v2.get("answer") == 38
        assert v1.incr_version("answer") == 2 and v2.get("answer") == 42
        assert v1.get("answer") is None
        assert v2.decr_version("answer") == 1 and v1.get("answer") == 42
        with pytest.raises(ValueError):
            v1.incr_version("does_not_exist")
        assert v1.get_many(["answer"], version=1) == {"answer": 42}
        assert v1.delete("answer", version=1) is True
    finally:
        shmreg.unlink(loc)


def custom_key_func(key, key_prefix, version):
    return "CUSTOM-" + "-".join([key_prefix, str(version), key])


def test_prefix_and_key_function(make):
    loc = unique_name("djp")
    try:
        plain = make(location=loc)
        prefixed = make(location=loc, KEY_PREFIX="pre")
        custom = make(location=loc, KEY_FUNCTION=custom_key_func)
        by_path = make(location=loc, KEY_FUNCTION=f"{__name__}.custom_key_func")
        plain.set("k", "plain")
        assert prefixed.has_key("k") is False
        prefixed.set("k", "prefixed")
        assert plain.get("k") == "plain" and prefixed.get("k") == "prefixed"
        custom.set("k2", "custom")
        assert plain.get("k2") is None and by_path.get("k2") == "custom"
        assert "CUSTOM--1-k2" in plain._table
        # One table: clear() empties every prefix (as with Redis' flushdb).
        plain.clear()
        assert prefixed.get("k") is None and custom.get("k2") is None
    finally:
        shmreg.unlink(loc)


def test_key_validation_warnings(c):
    key = "key with spaces and 清"
    ops = [("add", [key, 1]), ("get", [key]), ("set", [key, 1]), ("touch", [key]),
           ("delete", [key]), ("get_many", [[key, "b"]]), ("set_many", [{key: 1}]),
           ("delete_many", [[key, "b"]]), ("has_key", [key]), ("get_or_set", [key, 1])]
    for op, args in ops:
        with pytest.warns(CacheKeyWarning, match="memcached"):
            getattr(c, op)(*args)
    with pytest.warns(CacheKeyWarning, match="memcached"):
        c.incr(key)                      # it exists (get_or_set above stored 1)
    with pytest.warns(CacheKeyWarning, match="longer than 250"):
        c.set("a" * 251, 1)


def test_pickling_errors_surface_as_pickle_raises(c):
    with pytest.raises(pickle.PickleError):
        c.set("unpicklable", Unpicklable())
    with pytest.raises(pickle.PickleError):
        c.add("unpicklable", Unpicklable())
    with pytest.raises(TypeError, match="pickle"):
        c.set("lock", threading.Lock())              # what pickle.dumps raises for it
    assert c.get("unpicklable") is None and c.get("lock") is None


def test_oversized_set_leaves_no_stale_value(make):
    c = make(OPTIONS={"MAX_ENTRIES": 1000, "memory": 1 << 20})
    big = b"x" * (4 << 20)
    c.set("k", "small")
    c.set("k", big)                           # memcached-like: no exception, key gone
    assert c.get("k") is None
    c.set("k2", "small")
    assert c.set_many({"k2": big, "ok": 1}) == ["k2"]
    assert c.get("k2") is None and c.get("ok") == 1
    assert c.add("k3", big) is False and c.get("k3") is None
    assert c.get_or_set("k4", lambda: big) == big and c.get("k4") is None


def test_get_or_set(c):
    assert c.get_or_set("projector", 42) == 42 and c.get("projector") == 42
    assert c.get_or_set("projector", 7) == 42
    assert c.get_or_set("null", None) is None and c.get("null", "default") is None
    calls = []
    assert c.get_or_set("cb", lambda: calls.append(1) or "value") == "value"
    assert c.get_or_set("cb", lambda: calls.append(1) or "other") == "value"
    assert calls == [1]
    assert c.get_or_set("nullcb", lambda: None) is None and c.has_key("nullcb")
    assert c.get_or_set("brian", 1979, version=2) == 1979 and c.get("brian") is None
    with pytest.raises(TypeError, match="default"):
        c.get_or_set("brian")
    assert c.get_or_set("zero", lambda: "v", timeout=0) == "v" and c.get("zero") is None
    with pytest.raises(RuntimeError):
        c.get_or_set("boom", lambda: (_ for _ in ()).throw(RuntimeError("x")))
    assert c.get_or_set("boom", lambda: "recovered") == "recovered"   # not poisoned


def test_get_or_set_computes_once_across_threads(c):
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.3)
        return "v"

    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(lambda _: c.get_or_set("slow", slow), range(6)))
    assert results == ["v"] * 6 and calls == [1]


def test_get_or_set_computes_itself_after_waiting_too_long(make):
    c = make(OPTIONS={"SINGLE_FLIGHT_TIMEOUT": 0.2})
    key = c.make_key("k")
    flights = c.shmreg_cache._flight_table()
    flights.insert_new(key, 1, ttl=30)       # another process "computes" and never ends
    try:
        assert c.get_or_set("k", lambda: "mine") == "mine" and c.get("k") == "mine"
        c.delete("k")

        async def mine():
            return "async mine"

        assert asyncio.run(c.aget_or_set("k", mine)) == "async mine"
        assert c.get("k") == "async mine"
        c.delete("k")

        def raises_timeout():
            raise TimeoutError("from the factory")

        flights.delete(key)                  # our own factory's TimeoutError is its own
        with pytest.raises(TimeoutError, match="from the factory"):
            c.get_or_set("k", raises_timeout)
    finally:
        flights.delete(key)


def test_close_is_cheap_and_leaves_cache_usable(c):
    c.set("k", 1)
    for _ in range(3):
        c.close()
    assert c.get("k") == 1
    c.set("k", 2)
    assert c.get("k") == 2
    # Django closes the caches after every request (request_finished).
    from django.core import signals
    cache = caches["default"]
    cache.set("k", "v")
    signals.request_finished.send(sender=None)
    assert cache.get("k") == "v"
    cache.delete("k")


def test_one_table_per_process_across_django_thread_backends():
    objs = []

    def grab():
        objs.append(caches["default"])

    threads = [threading.Thread(target=grab) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    objs.append(caches["default"])
    assert len({id(o) for o in objs}) == 4           # Django: one backend per thread
    assert len({id(o._table) for o in objs}) == 1     # shmreg: one attached table
    objs[0].set("k", "from a thread")
    assert objs[-1].get("k") == "from a thread"
    objs[0].delete("k")


def test_async_methods(c):
    async def main():
        await c.aset("k", 1)
        assert await c.aget("k") == 1
        assert await c.aadd("k", 2) is False
        assert await c.aincr("k", 5) == 6 and await c.adecr("k") == 5
        assert await c.ahas_key("k") is True
        assert await c.atouch("k", 50) is True
        assert await c.aset_many({"a": 1, "b": 2}) == []
        assert await c.aget_many(["a", "b", "x"]) == {"a": 1, "b": 2}
        await c.adelete_many(["a"])
        assert await c.adelete("b") is True

        async def build():
            await asyncio.sleep(0)
            return "built"

        assert await c.aget_or_set("co", build) == "built"
        assert await c.aget_or_set("co", build) == "built"
        assert await c.aget_or_set("plain", lambda: "p") == "p"
        assert await c.aget_or_set("val", 3) == 3
        assert await c.aincr_version("k") == 2 and await c.adecr_version("k", version=2) == 1
        await c.aclose()
        await c.aclear()
        assert await c.aget("k") is None

    asyncio.run(main())
    # Each a* method is our own (inline), not BaseCache's thread hop.
    for name in ("aget", "aset", "aadd", "adelete", "aincr", "aget_or_set", "aget_many"):
        assert getattr(ShmregCache, name) is not getattr(BaseCache, name)


def test_cache_sessions_in_process():
    from django.contrib.sessions.backends.cache import SessionStore

    s = SessionStore()
    s["cart"] = [1, 2]
    s.save()
    again = SessionStore(session_key=s.session_key)
    assert again["cart"] == [1, 2]
    again.flush()
    assert SessionStore(session_key=s.session_key).get("cart") is None


# -- several processes -------------------------------------------------------------

CHILD_PRELUDE = f"""
from shmreg.django import ShmregCache
"""


def test_set_in_one_process_read_in_another(c):
    name = c._table.name
    run_py(CHILD_PRELUDE + f"""
c = ShmregCache({name!r}, {{"KEY_PREFIX": "p"}})
c.set("from-child", {{"pid": __import__("os").getpid()}}, 60)
c.set("counter", 10)
""")
    prefixed = ShmregCache(name, {"KEY_PREFIX": "p"})
    assert isinstance(prefixed.get("from-child")["pid"], int)
    assert prefixed.incr("counter") == 11
    c.set("from-parent", "hello")
    out = run_py(CHILD_PRELUDE + f"""
c = ShmregCache({name!r}, {{}})
print(c.get("from-parent"), c.incr("counter", 0, version=1) if c.has_key("counter") else "-")
""")
    assert out.stdout.split() == ["hello", "-"]      # the prefix keeps them apart


@pytest.mark.timeout(90)
def test_incr_from_4_processes_is_exact(c):
    name = c._table.name
    c.set("n", 0, timeout=3600)
    before = c._table.ttl(c.make_key("n"))
    code = CHILD_PRELUDE + f"""
c = ShmregCache({name!r}, {{}})
for _ in range(5000):
    c.incr("n")
c.decr("n", 0)
"""
    procs = [spawn_py(code) for _ in range(4)]
    for p in procs:
        _out, err = p.communicate(timeout=80)
        assert p.returncode == 0, err
    assert c.get("n") == 20_000
    assert before - 80 < c._table.ttl(c.make_key("n")) <= before     # expiry kept


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_after_backend_was_created(c):
    """gunicorn --preload: the backend is made in the parent, used in children."""
    c.set("from-parent", "p")
    c.set("n", 0)
    pids = []
    for i in range(3):
        pid = os.fork()
        if pid == 0:          # child: only os._exit, never back into pytest
            code = 1
            try:
                ok = c.get("from-parent") == "p"
                for _ in range(100):
                    c.incr("n")
                c.set(f"child-{i}", os.getpid())
                v = c.get_or_set(f"computed-{i}", lambda: os.getpid())
                code = 0 if ok and v == os.getpid() else 2
            finally:
                os._exit(code)
        pids.append(pid)
    for i, pid in enumerate(pids):
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert c.get(f"child-{i}") == pid and c.get(f"computed-{i}") == pid
    assert c.get("n") == 300


# -- the example app under a real gunicorn --------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    prefix = unique_name("djg") + "-"
    env = {"SHMREG_DJANGO_PREFIX": prefix, "SHMREG_DJANGO_BIND": "127.0.0.1:0",
           "SHMREG_DJANGO_WORKERS": "3", "SHMREG_DJANGO_DELAY": "0.3",
           "PYTHONPATH": os.pathsep.join([EXAMPLE, os.environ.get("PYTHONPATH", "")])}
    s = GunicornServer(os.path.join(EXAMPLE, "gunicorn.conf.py"), cwd=EXAMPLE, env=env,
                       prefix=prefix, registry=prefix + "workers", workers=3,
                       log_path=tmp_path_factory.mktemp("djgunicorn") / "gunicorn.log")
    try:
        yield s.start()
    finally:
        s.stop()


def counters(server) -> dict:
    return server.request("/stats/")[1]


def retire(server, pid: int) -> None:
    """Stop the worker ``pid`` (gunicorn starts a replacement): the next
    request is certainly served by another process."""
    os.kill(pid, signal.SIGKILL)     # it is idle: its writes were done before it answered

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_until(gone, 30, f"worker {pid} to exit")


@pytest.mark.timeout(120)
def test_gunicorn_workers_share_cached_views(server):
    # cache_page: rendered once; after the worker that rendered it is gone,
    # the others serve it from the shared cache.
    headers, first = server.request("/page/")
    assert first["rendered"] == 1 and headers["X-Served-By"] == str(first["pid"])
    retire(server, first["pid"])
    for _ in range(6):
        headers, body = server.request("/page/")
        assert body == first and headers["X-Served-By"] != str(first["pid"])
    assert counters(server)["page"] == 1

    # get_or_set with a callable: 9 concurrent requests on 3 workers, computed once.
    with ThreadPoolExecutor(9) as ex:
        bodies = [b for _, b in ex.map(lambda _: server.request("/compute/7/"), range(9))]
    assert len({b["value"] for b in bodies}) == 1
    assert len({b["pid"] for b in bodies}) >= 2          # the workers really shared it
    assert counters(server)["compute"] == 1
    wait_until(lambda: len(server.worker_pids()) == 3, 30, "the replacement worker")


@pytest.mark.timeout(120)
def test_gunicorn_workers_share_sessions(server):
    jar = http.cookies.SimpleCookie()
    served = []
    for n in range(1, 5):
        _, body = server.request("/session/", jar)
        assert body["n"] == n, f"request {n} of the session saw {body['n']}"
        assert body["pid"] not in served               # each by a different process
        served.append(body["pid"])
        retire(server, body["pid"])
    other = http.cookies.SimpleCookie()
    assert server.request("/session/", other)[1]["n"] == 1   # another client: its own session
    assert server.request("/session/", jar)[1]["n"] == 5
    wait_until(lambda: len(server.worker_pids()) == 3, 30, "the replacement workers")
