"""The framework backends on a Redis/Valkey server, with the near cache:
Django's cache (``OPTIONS={"URL": ..., "NEAR": True}``) and cachelib /
Flask-Caching (``ShmregCache(url=..., near=True)``) sit on ``Cache`` and get
both by passing the options through.  Against the real server the fixtures
start; another client's writes invalidate the near copies."""

from __future__ import annotations

import pytest

import shmreg
from _helpers import unique_name, wait_until
from _near_helpers import served_near

redis = pytest.importorskip("redis")   # the test extra installs it: never skipped in CI

import _django_settings  # noqa: E402

_django_settings.configure()

from shmreg.cachelib import ShmregCache as CachelibCache  # noqa: E402
from shmreg.django import ShmregCache as DjangoCache  # noqa: E402


def _near_ready(cache: shmreg.Cache) -> None:
    cache.table.start()
    wait_until(lambda: cache.table.near_stats()["near_state"] == "ready", 10, "the near cache")


def test_django_cache_on_a_server_with_a_near_cache(redis_server):
    name = unique_name("dj-near")
    dj = DjangoCache(name, {"TIMEOUT": 60, "OPTIONS": {"URL": redis_server.url, "NEAR": True}})
    other = shmreg.Cache(name, url=redis_server.url, ttl=60)     # another host's writer
    try:
        cache = dj.shmreg_cache
        assert cache.table.url == redis_server.url
        _near_ready(cache)
        key = dj.make_key("page")                  # what Django stores under
        dj.set("page", {"html": "<p>1</p>"})
        served_near(cache, key, {"html": "<p>1</p>"}, read=lambda _k: dj.get("page"))
        assert dj.add("page", "no") is False
        dj.set("n", 1)
        assert dj.incr("n", 5) == 6
        assert dj.get_or_set("computed", lambda: "made") == "made"
        # Another host's write reaches this host's readers through the
        # server's invalidation, never a stale near copy for long.
        other.set(key, {"html": "<p>2</p>"})
        wait_until(lambda: dj.get("page") == {"html": "<p>2</p>"}, 5, "the other host's write")
        wait_until(lambda: cache.stats()["near_invalidations"] >= 1, 5, "a counted invalidation")
        dj.delete("page")
        assert dj.get("page") is None
    finally:
        other.close()
        dj.shmreg_cache.unlink()
        dj.shmreg_cache.close()       # (its agent thread and connection with it)


def test_cachelib_cache_on_a_server_with_a_near_cache(redis_server):
    name = unique_name("cl-near")
    cl = CachelibCache(name, default_timeout=60, url=redis_server.url, near=True)
    other = shmreg.Cache(name, url=redis_server.url, ttl=60)
    try:
        cache = cl.shmreg_cache
        _near_ready(cache)
        assert cl.set("answer", 41)
        served_near(cache, "answer", 41, read=cl.get)
        assert cl.inc("answer") == 42
        wait_until(lambda: cl.get("answer") == 42, 5, "the new value")
        other.set("answer", 7)                     # another host writes
        wait_until(lambda: cl.get("answer") == 7, 5, "the other host's write")
        assert cl.delete("answer") and cl.get("answer") is None
        assert cl.has("answer") is False
    finally:
        other.close()
        cl.shmreg_cache.unlink()
        cl.shmreg_cache.close()


def test_near_without_url_is_refused():
    with pytest.raises(ValueError, match="url"):
        CachelibCache(unique_name("cl-no-url"), near=True)
