"""Waits the near-cache tests share (tests/test_near*.py, test_redis_tls_acl.py)."""

from __future__ import annotations

from _helpers import wait_until


def synced(cache) -> None:
    """Wait until the agent handled the invalidations of every write
    acknowledged so far: two heartbeat round trips (the server queues a
    write's invalidation before its reply, and the heartbeat's reply comes
    after it on the agent's connection)."""
    h = cache.table.ctl.get("heartbeats", 0)
    wait_until(lambda: cache.table.ctl.get("heartbeats", 0) >= h + 2, 10, "two heartbeats")


def filled(cache, key, value, read=None) -> None:
    """Read ``key`` until it returns ``value`` and the near table holds it
    (``value`` itself, read through ``cache.get``; some copy of it, read
    through a framework's ``read``, which stores its own encoding), once
    earlier writes' invalidations are handled (one arriving after a fill
    deletes it, correctly: the fill cannot tell it is about an older write)."""
    if read is None:
        read, held = cache.get, (lambda v: v == value)
    else:
        held = (lambda v: v is not None)
    synced(cache)
    wait_until(lambda: read(key) == value and held(cache.table.near.get(key)), 10,
               f"{key!r} to be filled")


def served_near(cache, key, value, read=None) -> None:
    """:func:`filled`, then one more read is counted as a near hit."""
    read = read or cache.get
    filled(cache, key, value, read)
    before = cache.stats()["near_hits"]
    assert read(key) == value
    assert cache.stats()["near_hits"] > before
