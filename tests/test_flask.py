"""shmreg.cachelib.ShmregCache against cachelib's contract and a real Flask app.

The behavioural reference is cachelib's own backend suite (pallets-eco/cachelib
``tests/common.py``, ``clear.py``, ``has.py``: set/get, set_many/get_many,
get_dict, delete/delete_many, add, inc/dec, expiration, has, clear); these
tests are written for shmreg after it, plus what only a shared cache shows:
processes sharing it (``inc`` from 4 processes x 5,000 exact), and the
Flask-Caching example app under a real gunicorn with 3 workers.
"""

from __future__ import annotations

import datetime as dt
import os
import pickle
import signal
import threading

import cachelib
import flask
import psutil
import pytest
from flask_caching import Cache as FlaskCache

import shmreg
from _gunicorn_server import GunicornServer
from _helpers import run_py, spawn_py, unique_name, wait_until
from shmreg.cachelib import ShmregCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "flask_app")

pytestmark = pytest.mark.timeout(120)

SAMPLE = {"bacon": "eggs", "sausage": "spam", "ham": [1, 2], "n": 42, "none_key": b"bytes",
          "unicode-ß": "Iñtërnâtiônàlizætiøn", "dict": {"a": {"b": 1}}}
NUMBERS = [0, 10, 1 << 40, -7]


@pytest.fixture
def make():
    names = []

    def build(name: str | None = None, **kw) -> ShmregCache:
        if name is None:
            name = unique_name("cl")
            names.append(name)
        kw.setdefault("capacity", 4096)
        kw.setdefault("memory", 4 << 20)
        return ShmregCache(name, **kw)

    yield build
    for name in names:
        for n in (name, name + "--flights"):
            try:
                shmreg.unlink(n)
            except shmreg.TableNotFoundError:
                pass


@pytest.fixture
def c(make):
    return make()


def test_is_a_cachelib_cache(c):
    assert isinstance(c, cachelib.BaseCache)


def test_set_get(c):
    for k, v in SAMPLE.items():
        assert c.set(k, v) is True
        assert c.get(k) == v
    assert c.get("missing") is None


def test_set_get_many_and_dict(c):
    assert c.set_many(SAMPLE) == list(SAMPLE)
    assert c.get_many(*SAMPLE) == list(SAMPLE.values())
    assert c.get_dict(*SAMPLE) == SAMPLE
    assert c.get_many("bacon", "nope") == ["eggs", None]


def test_delete_and_delete_many(c):
    for k, v in SAMPLE.items():
        c.set(k, v)
        assert c.delete(k) is True
        assert c.get(k) is None
    assert c.delete("bacon") is False
    c.set_many(SAMPLE)
    assert c.delete_many(*SAMPLE) == list(SAMPLE)
    assert not any(c.get_many(*SAMPLE))
    c.set("bacon", "spam")
    assert c.delete_many("eggs", "bacon") == ["eggs", "bacon"]     # absent counts as deleted
    assert c.get("bacon") is None


def test_add(c):
    c.set_many(SAMPLE)
    for k in SAMPLE:
        assert c.add(k, "updated") is False
    assert c.get_many(*SAMPLE) == list(SAMPLE.values())
    for k, v in SAMPLE.items():
        assert c.add(f"{k}-new", v) is True and c.get(f"{k}-new") == v


def test_inc_dec(c):
    for n in NUMBERS:
        assert c.get(f"{n}-inc") is None
        assert c.inc(f"{n}-inc", n) == n and c.get(f"{n}-inc") == n
        assert c.dec(f"{n}-dec", n) == -n and c.get(f"{n}-dec") == -n
        assert c.dec(f"{n}-inc", 5) == n - 5
    assert c.inc("plain") == 1 and c.inc("plain") == 2 and c.dec("plain") == 1
    c.set("float", 1.5)
    assert c.inc("float") == 2.5                 # not only ints
    c.set("big", (1 << 63) - 1)
    assert c.inc("big") == 1 << 63               # past int64: still exact
    c.set("text", "x")
    with pytest.raises(TypeError):
        c.inc("text")


def test_inc_keeps_expiry(c):
    c.set("n", 5, timeout=100)
    before = c._table.ttl("n")
    assert c.inc("n", 2) == 7
    assert before - 5 < c._table.ttl("n") <= before
    assert c.inc("fresh") == 1
    assert 299 < c._table.ttl("fresh") <= 300            # a new key: default timeout


def test_timeouts_and_expiration(c):
    c.set("t0", "forever", timeout=0)
    assert c._table.ttl("t0") is None
    c.set("short", "v", timeout=1)
    c.set("td", "v", timeout=dt.timedelta(seconds=1))
    c.set_many({"m": 1}, timeout=1)
    assert c.get("short") == "v" and c.has("td")
    wait_until(lambda: c.get("short") is None and not c.has("td") and c.get("m") is None,
               10, "entries to expire")
    assert c.get("t0") == "forever"
    assert c.add("short", "again") is True
    c.set("gone", 1)
    assert c.set("gone", 2, timeout=-1) is True and c.get("gone") is None
    with pytest.raises(TypeError):
        c.set("bad", 1, timeout="soon")


def test_default_timeout(make):
    forever = make(default_timeout=0)
    assert forever.set("k", 1) and forever._table.ttl("k") is None
    c = make(default_timeout=dt.timedelta(minutes=1))
    c.set("k", 1)
    assert 59 < c._table.ttl("k") <= 60


def test_has(c):
    assert c.has("bacon") is False
    c.set("bacon", None)
    assert c.has("bacon") is True
    c.delete("bacon")
    assert c.has("bacon") is False


def test_key_prefix_and_clear(make):
    name = unique_name("clp")
    try:
        a = make(name, key_prefix="a:")
        b = make(name, key_prefix=lambda: "b:")
        plain = make(name)
        a.set("k", 1)
        b.set("k", 2)
        assert a.get("k") == 1 and b.get("k") == 2 and plain.get("a:k") == 1
        assert a.clear() is True
        assert a.get("k") is None and b.get("k") == 2          # only a's prefix
        assert plain.clear() is True and b.get("k") is None    # no prefix: everything
    finally:
        shmreg.unlink(name)


def test_callable_key(c):
    assert c.set(lambda: "spam", "sausages")
    assert c.get(lambda: "spam") == "sausages" and c.get("spam") == "sausages"


class Unpicklable:
    def __getstate__(self):
        raise pickle.PickleError("no")


def test_pickling_errors_raise_pickle_errors(c):
    with pytest.raises(pickle.PickleError):
        c.set("u", Unpicklable())
    with pytest.raises(pickle.PickleError):
        c.add("u", Unpicklable())
    assert c.get("u") is None


def test_oversized_set_fails_and_leaves_no_stale_value(make):
    c = make(capacity=1000, memory=1 << 20)
    c.set("k", "small")
    assert c.set("k", b"x" * (4 << 20)) is False
    assert c.get("k") is None
    assert c.set_many({"k": b"x" * (4 << 20), "ok": 1}) == ["ok"]


def test_instances_share_one_table_per_process(make):
    name = unique_name("cls")
    try:
        x, y = make(name), make(name)
        assert x._table is y._table
        x.set("k", "v")
        assert y.get("k") == "v"
    finally:
        shmreg.unlink(name)


# -- several processes -------------------------------------------------------------

CHILD = f"""
from shmreg.cachelib import ShmregCache
"""


def test_set_in_one_process_read_in_another(c):
    name = c._table.name
    c.set("from-parent", {"x": 1})
    out = run_py(CHILD + f"""
c = ShmregCache({name!r})
print(c.get("from-parent"))
c.set("from-child", [1, 2, 3], timeout=60)
""")
    assert out.stdout.strip() == "{'x': 1}"
    assert c.get("from-child") == [1, 2, 3]


@pytest.mark.timeout(90)
def test_inc_from_4_processes_is_exact(c):
    name = c._table.name
    code = CHILD + f"""
c = ShmregCache({name!r})
for _ in range(5000):
    c.inc("n")
"""
    procs = [spawn_py(code) for _ in range(4)]
    for p in procs:
        _out, err = p.communicate(timeout=80)
        assert p.returncode == 0, err
    assert c.get("n") == 20_000


# -- Flask-Caching -----------------------------------------------------------------

@pytest.fixture
def flask_app(make):
    name = unique_name("flask")
    app = flask.Flask("shmreg-test")
    app.config.update(CACHE_TYPE="shmreg.cachelib.ShmregCache", CACHE_DEFAULT_TIMEOUT=60,
                      CACHE_OPTIONS={"name": name, "key_prefix": "t:", "capacity": 4096,
                                     "memory": 4 << 20})
    cache = FlaskCache(app)
    runs = {"page": 0, "square": 0}

    @app.route("/page")
    @cache.cached(timeout=30)
    def page():
        runs["page"] += 1
        return f"page {runs['page']}"

    @cache.memoize(timeout=30)
    def square(n):
        runs["square"] += 1
        return n * n

    @app.route("/square/<int:n>")
    def square_view(n):
        return str(square(n))

    app.extensions["test"] = (cache, runs, square, name)
    yield app
    for n in (name, name + "--flights"):
        try:
            shmreg.unlink(n)
        except shmreg.TableNotFoundError:
            pass


def test_flask_caching_uses_the_backend(flask_app):
    cache, runs, square, name = flask_app.extensions["test"]
    backend = flask_app.extensions["cache"][cache]
    assert isinstance(backend, ShmregCache) and backend._table.name == name
    assert backend.default_timeout == 60
    client = flask_app.test_client()
    assert [client.get("/page").text for _ in range(3)] == ["page 1"] * 3
    assert [client.get("/square/7").text for _ in range(3)] == ["49"] * 3
    assert runs == {"page": 1, "square": 1}
    # The entries are in the shared table, under the key prefix.
    assert all(k.startswith("t:") for k in backend._table.keys())
    with flask_app.app_context():
        cache.delete_memoized(square, 7)
        assert cache.get("nothing") is None
        cache.set("x", {"y": 1})
        assert cache.get("x") == {"y": 1} and cache.has("x")
        assert cache.cache.inc("hits") == 1 and cache.cache.inc("hits") == 2
    assert client.get("/square/7").text == "49" and runs["square"] == 2
    with flask_app.app_context():
        cache.clear()
    assert client.get("/page").text == "page 2"


def test_flask_caching_is_shared_with_another_process(flask_app):
    cache, runs, _square, name = flask_app.extensions["test"]
    client = flask_app.test_client()
    client.get("/page")
    # Another process, with its own Flask app on the same table, serves the
    # cached page without running the view.
    out = run_py(CHILD + f"""
import flask
from flask_caching import Cache
app = flask.Flask("shmreg-test")
app.config.update(CACHE_TYPE="shmreg.cachelib.ShmregCache",
                  CACHE_OPTIONS={{"name": {name!r}, "key_prefix": "t:"}})
cache = Cache(app)
ran = []

@app.route("/page")
@cache.cached(timeout=30)
def page():
    ran.append(1)
    return "other process"

print(app.test_client().get("/page").text, len(ran))
""")
    assert out.stdout.split() == ["page", "1", "0"]


# -- the example app under a real gunicorn --------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    prefix = unique_name("flg") + "-"
    env = {"SHMREG_FLASK_PREFIX": prefix, "SHMREG_FLASK_BIND": "127.0.0.1:0",
           "SHMREG_FLASK_WORKERS": "3",
           "PYTHONPATH": os.pathsep.join([EXAMPLE, os.environ.get("PYTHONPATH", "")])}
    s = GunicornServer(os.path.join(EXAMPLE, "gunicorn.conf.py"), cwd=EXAMPLE, env=env,
                       prefix=prefix, registry=prefix + "workers", workers=3,
                       log_path=tmp_path_factory.mktemp("flgunicorn") / "gunicorn.log")
    try:
        yield s.start()
    finally:
        s.stop()


def _kill(server, pid: int) -> None:
    os.kill(pid, signal.SIGKILL)

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_until(gone, 30, f"worker {pid} to exit")


@pytest.mark.timeout(120)
def test_gunicorn_workers_share_flask_cache(server):
    headers, first = server.request("/page")
    assert first["rendered"] == 1
    _kill(server, first["pid"])              # the next requests: other workers
    for _ in range(5):
        headers, body = server.request("/page")
        assert body == first and headers["X-Served-By"] != str(first["pid"])
    _, sq = server.request("/square/12")
    _kill(server, sq["pid"])
    assert server.request("/square/12")[1]["square"] == 144
    stats = server.request("/stats")[1]
    assert stats["page"] == 1 and stats["square"] == 1

    # cache.inc from every worker, concurrently: exact.
    from concurrent.futures import ThreadPoolExecutor
    wait_until(lambda: len(server.worker_pids()) == 3, 30, "the replacement workers")
    with ThreadPoolExecutor(6) as ex:
        got = sorted(b["hits"] for _, b in ex.map(lambda _: server.request("/hits"), range(30)))
    assert got == list(range(1, 31))
