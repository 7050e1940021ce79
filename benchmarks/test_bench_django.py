"""Django benchmarks: shmreg.django.ShmregCache against Django's own backends.

1. **Framework API** (one process): ``cache.get`` (hits) and ``cache.set``
   through ``django.core.cache.caches[alias]``, 1,000 keys per call, 64-byte
   str values, for ShmregCache, LocMemCache (per process: no sharing at
   all, the floor), FileBasedCache (shared through files) and RedisCache
   (``django.core.cache.backends.redis.RedisCache``, shared through a
   private redis-server on a unix socket, started here).  The redis peer is
   reported as missing, with the reason, if redis-server is not installed
   (``apt-get install redis-server``).

2. **A cached view under gunicorn** (examples/django_app, 4 sync workers):
   ``GET /item/<n>/`` for 200 keys, each page ``@cache_page`` cached and
   ~2 ms to render, loaded by wrk (``apt-get install wrk``) or a Python
   thread load generator, shmreg against LocMemCache, from an empty cache,
   then hot.  Reported: requests/s and how many times the view body ran
   (shared counter): with a per-process cache each worker renders each page
   itself, with shmreg one render serves every worker (except that
   ``@cache_page`` is not single flight: workers missing the same page at
   the same moment each render it, whatever the backend).

Run: ``python -m pytest benchmarks/test_bench_django.py -q -s``.  Not in CI;
ratios go to the terminal summary (and docs/django.md).
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import _bench_common as bc

import shmreg

django = pytest.importorskip("django", reason="pip install -e '.[django]'")
from django.conf import settings  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "django_app")
N_KEYS = 1000
VALUE = "v" * 64
# Nothing starts at import (pytest imports the module to collect it even when
# none of its benchmarks is selected): the directory, redis-server and the
# table are made by the ``peers`` fixture, and removed by it.
_TMP = os.path.join(tempfile.gettempdir(), f"shmreg-bench-django-{os.getpid()}")
SHMREG_TABLE = bc.unique_table_name("django")
_redis: bc.RedisServer | None = None
_redis_missing = None if bc.redis_server_binary() else \
    "redis-server is not installed (apt-get install redis-server)"
API: dict = {}
_REDIS_SOCKET = os.path.join(_TMP, "redis.sock")

_caches = {
    "shmreg": {"BACKEND": "shmreg.django.ShmregCache", "LOCATION": SHMREG_TABLE,
               "OPTIONS": {"MAX_ENTRIES": 10_000, "memory": 16 << 20}},
    "locmem": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache",
               "OPTIONS": {"MAX_ENTRIES": 10_000}},
    "filebased": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
                  "LOCATION": os.path.join(_TMP, "filecache"), "OPTIONS": {"MAX_ENTRIES": 10_000}},
}
if _redis_missing is None:
    _caches["redis"] = {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                        "LOCATION": f"unix://{_REDIS_SOCKET}"}
_caches["default"] = _caches["shmreg"]
if not settings.configured:
    settings.configure(CACHES=_caches, INSTALLED_APPS=[], USE_TZ=True)
    django.setup()

from django.core.cache import caches  # noqa: E402

PEERS = ["shmreg", "locmem", "filebased", "redis"]
KEYS = [f"bench:{i:06d}" for i in range(N_KEYS)]


@pytest.fixture(scope="module", autouse=True)
def peers():
    """The peers' resources: a scratch directory and a private redis-server."""
    global _redis, _redis_missing
    os.makedirs(_TMP, exist_ok=True)
    if _redis_missing is None:
        try:
            _redis = bc.RedisServer(_TMP).start()
        except Exception as e:  # noqa: BLE001 - reported as the peer's absence
            _redis_missing = f"redis-server did not start: {e}"
    try:
        yield
    finally:
        if _redis is not None:
            _redis.stop()
        for name in (SHMREG_TABLE, SHMREG_TABLE + "--flights"):
            try:
                shmreg.unlink(name)
            except shmreg.TableNotFoundError:
                pass
        shutil.rmtree(_TMP, ignore_errors=True)
        _summarize()


def _summarize() -> None:
    if not API:
        return
    lines = ["", "Django cache API, ns per operation: min and median of the rounds, "
             "and their ratios to shmreg (min is the least disturbed by other load):"]
    for op in ("get", "set"):
        base = API.get(("shmreg", op))
        for peer in PEERS:
            v = API.get((peer, op))
            if v is None or base is None:
                lines.append(f"  {op:4s} {peer:10s}  -  ({_redis_missing})")
            else:
                lines.append(f"  {op:4s} {peer:10s} min {v[0]:10,.0f} ns x{v[0] / base[0]:7.2f}   "
                             f"median {v[1]:10,.0f} ns x{v[1] / base[1]:7.2f}")
    bc.NOTES.extend(lines)


def _backend(peer: str):
    if peer not in _caches or (peer == "redis" and _redis is None):
        pytest.skip(_redis_missing or f"{peer} not configured")
    return caches[peer]


@pytest.mark.parametrize("peer", PEERS)
def test_django_get(benchmark, peer):
    c = _backend(peer)
    c.set_many({k: VALUE for k in KEYS}, timeout=3600)
    get = c.get

    def run():
        for k in KEYS:
            get(k)

    benchmark.group = "django cache.get (hit), 1,000 keys"
    benchmark.pedantic(run, rounds=30 if peer != "filebased" else 5, iterations=1, warmup_rounds=1)
    assert get(KEYS[0]) == VALUE
    API[(peer, "get")] = (benchmark.stats.stats.min * 1e9 / N_KEYS,
                          benchmark.stats.stats.median * 1e9 / N_KEYS)


@pytest.mark.parametrize("peer", PEERS)
def test_django_set(benchmark, peer):
    c = _backend(peer)
    set_ = c.set

    def run():
        for k in KEYS:
            set_(k, VALUE, 3600)

    benchmark.group = "django cache.set, 1,000 keys"
    benchmark.pedantic(run, rounds=30 if peer != "filebased" else 5, iterations=1, warmup_rounds=1)
    API[(peer, "set")] = (benchmark.stats.stats.min * 1e9 / N_KEYS,
                          benchmark.stats.stats.median * 1e9 / N_KEYS)


# -- the cached view under gunicorn ----------------------------------------------------

WORKERS = 4
ITEMS = 200
SECONDS = 5
LUA = """
request = function()
  return wrk.format("GET", "/item/" .. math.random(1, %d) .. "/")
end
""" % ITEMS


def _python_load(port: int, seconds: float, threads: int = 8) -> tuple:
    import random

    done = [0]
    errors = [0]
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def worker():
        rnd = random.Random()
        n = e = 0
        while time.monotonic() < stop:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                conn.request("GET", f"/item/{rnd.randint(1, ITEMS)}/")
                r = conn.getresponse()
                r.read()
                n += r.status == 200
                e += r.status != 200
            finally:
                conn.close()
        with lock:
            done[0] += n
            errors[0] += e

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return done[0] / (time.monotonic() - t0), errors[0]


def _load(port: int, seconds: float) -> tuple:
    wrk = shutil.which("wrk")
    if not wrk or os.environ.get("SHMREG_BENCH_NO_WRK"):
        return _python_load(port, seconds)
    script = os.path.join(_TMP, "items.lua")
    with open(script, "w") as f:
        f.write(LUA)
    out = subprocess.run([wrk, "-t2", "-c8", f"-d{seconds}s", "-s", script,
                          f"http://127.0.0.1:{port}"], capture_output=True, text=True,
                         timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, int(m.group(1)) if m else 0


def _serve(kind: str, tmp) -> dict:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from _gunicorn_server import GunicornServer

    prefix = bc.unique_table_name(f"djb{kind}") + "-"
    env = {"SHMREG_DJANGO_PREFIX": prefix, "SHMREG_DJANGO_BIND": "127.0.0.1:0",
           "SHMREG_DJANGO_WORKERS": str(WORKERS), "SHMREG_DJANGO_CACHE": kind,
           "PYTHONPATH": EXAMPLE}
    s = GunicornServer(os.path.join(EXAMPLE, "gunicorn.conf.py"), cwd=EXAMPLE, env=env,
                       prefix=prefix, registry=prefix + "workers", workers=WORKERS,
                       log_path=tmp / f"gunicorn-{kind}.log")
    try:
        s.start()
        cold_rps, cold_err = _load(s.port, SECONDS)
        cold_renders = s.request("/stats/")[1].get("item", 0)
        hot_rps, hot_err = _load(s.port, SECONDS)
        renders = s.request("/stats/")[1].get("item", 0)
        return {"cold_rps": cold_rps, "hot_rps": hot_rps, "cold_renders": cold_renders,
                "renders": renders, "errors": cold_err + hot_err}
    finally:
        s.stop()


@pytest.mark.timeout(300)
def test_django_cached_view_under_gunicorn(tmp_path):
    pytest.importorskip("gunicorn")
    results = {kind: _serve(kind, tmp_path) for kind in ("shmreg", "locmem")}
    s, l = results["shmreg"], results["locmem"]
    assert s["errors"] == 0 and l["errors"] == 0
    # No bound on renders: @cache_page is not single flight, so workers that
    # miss the same page at the same moment each render it (with any backend).
    bc.NOTES.extend([
        "",
        f"Django cached view (/item/<1..{ITEMS}>/, @cache_page, ~2 ms render), gunicorn "
        f"{WORKERS} sync workers, {SECONDS} s cold then {SECONDS} s hot, "
        f"load: {'wrk -t2 -c8' if shutil.which('wrk') else 'python threads'}:",
        f"  shmreg:  cold {s['cold_rps']:8,.0f} req/s, hot {s['hot_rps']:8,.0f} req/s, "
        f"view body ran {s['renders']} times",
        f"  locmem:  cold {l['cold_rps']:8,.0f} req/s, hot {l['hot_rps']:8,.0f} req/s, "
        f"view body ran {l['renders']} times",
        f"  shmreg / locmem: cold x{s['cold_rps'] / l['cold_rps']:.2f}, "
        f"hot x{s['hot_rps'] / l['hot_rps']:.2f}, renders x{s['renders'] / max(1, l['renders']):.2f}",
    ])
