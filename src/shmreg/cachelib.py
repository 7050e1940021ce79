"""cachelib / Flask-Caching backend: one cache for every worker process on the host.

With cachelib::

    from shmreg.cachelib import ShmregCache
    cache = ShmregCache("myapp-cache", default_timeout=300)
    cache.set("k", {"a": 1}); cache.get("k"); cache.inc("hits")

With Flask-Caching (it instantiates the class named by ``CACHE_TYPE`` with
``CACHE_ARGS`` and ``CACHE_OPTIONS`` plus ``default_timeout`` from
``CACHE_DEFAULT_TIMEOUT``)::

    app.config.update(
        CACHE_TYPE="shmreg.cachelib.ShmregCache",
        CACHE_DEFAULT_TIMEOUT=300,
        CACHE_OPTIONS={"name": "myapp-cache", "key_prefix": "myapp:",
                       "capacity": 100_000, "memory": 64 << 20},
    )
    cache = flask_caching.Cache(app)

The semantics are cachelib's (as its Redis backend has them): ``timeout=0``
means never expire, ``None`` the default timeout; ``inc``/``dec`` are atomic
across processes, start a missing key at ``delta`` and keep an existing
entry's expiry; ``clear()`` with a ``key_prefix`` removes only that prefix.
A full table evicts (expired entries first, then CLOCK) instead of failing.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from typing import Any, Callable, Union

from cachelib.base import BaseCache

from shmreg import _core
from shmreg.cache import Cache, shared_cache
from shmreg.errors import TableFullError, ValueTooLargeError

__all__ = ["ShmregCache"]

_log = logging.getLogger("shmreg.cachelib")
_MISSING = _core.MISSING
Timeout = Union[int, float, dt.timedelta, None]


class ShmregCache(BaseCache):
    """cachelib ``BaseCache`` over a shared-memory :class:`shmreg.Cache`.

    :param name: the table's name (opened, or created if missing).
    :param default_timeout: seconds (or a ``timedelta``) for ``set`` without
        a timeout; 0: never expire.
    :param key_prefix: prepended to every key (a str, or a callable returning one).
    :param capacity: entries the table is sized for (when this creates it).
    :param memory: bytes for keys and values (when this creates it).
    :param url: a Redis/Valkey URL: the cache lives on that server, shared by
        every host (Flask-Caching: ``CACHE_OPTIONS={"url": ...}``).
    :param near: with ``url``: keep hot entries in this host's near cache,
        kept coherent by the server (docs/near-cache.md).
    :param ignore_delete_many_errors: accepted for cachelib/Flask-Caching
        compatibility; ``delete_many`` cannot fail here (a key absent
        afterwards counts as deleted).

    Every instance in a process on the same ``name`` shares one attached
    table; instances in other processes see the same entries.

    >>> c = ShmregCache("doc-cachelib", default_timeout=60)
    >>> c.set("answer", 42)
    True
    >>> c.inc("answer")
    43
    >>> c.shmreg_cache.unlink()
    """

    def __init__(self, name: str = "cachelib", default_timeout: Timeout = 300,
                 key_prefix: str | Callable[[], str] = "", *flask_caching_call: Any,
                 capacity: int | None = None, memory: int | None = None,
                 url: str | None = None, near: bool | dict = False,
                 ignore_delete_many_errors: bool = True) -> None:
        if flask_caching_call and hasattr(name, "extensions") and isinstance(default_timeout, dict):
            # Flask-Caching before 2.5 calls a CACHE_TYPE class that is not
            # its own BaseCache as a factory: (app, config, args, options).
            args, options = key_prefix, flask_caching_call[0]
            self.__init__(*args, **options)  # type: ignore[misc]
            return
        if flask_caching_call:
            raise TypeError("ShmregCache() takes at most 3 positional arguments "
                            "(name, default_timeout, key_prefix)")
        super().__init__(default_timeout=0)   # (older cachelib has no other argument)
        self.ignore_delete_many_errors = ignore_delete_many_errors
        self.default_timeout = self._seconds(300 if default_timeout is None else default_timeout)
        self.key_prefix = key_prefix
        self._cache: Cache[Any] = shared_cache(name, capacity=capacity, memory=memory,
                                               url=url, near=near)
        self._table = self._cache.table

    # -- keys and timeouts ------------------------------------------------------------

    def _key(self, key: Any) -> str:
        if callable(key):
            key = key()
        prefix = self.key_prefix() if callable(self.key_prefix) else self.key_prefix
        return f"{prefix}{key}"

    @staticmethod
    def _seconds(timeout: Any) -> float:
        # Sub-second timeouts are honoured (cachelib's own _to_seconds rounds
        # floats up and warns): the table keeps nanoseconds.
        if isinstance(timeout, dt.timedelta):
            return timeout.total_seconds()
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout):
            raise TypeError(f"timeout must be a number of seconds or a timedelta, not {timeout!r}")
        return float(timeout)

    def _normalize_timeout(self, timeout: Timeout) -> float:  # type: ignore[override]
        return self.default_timeout if timeout is None else self._seconds(timeout)

    def _ttl(self, timeout: Timeout) -> float | None:
        """Seconds to live: None forever (cachelib's 0); <= -0 already expired."""
        seconds = self._normalize_timeout(timeout)
        return None if seconds == 0 else seconds

    # -- the BaseCache interface ------------------------------------------------------

    def get(self, key: str) -> Any:
        """The value of ``key``, or None."""
        return self._table.get(self._key(key))

    def has(self, key: str) -> bool:
        """Whether ``key`` is cached (and not expired)."""
        return self._key(key) in self._table

    def get_many(self, *keys: str) -> list[Any]:
        """The values of ``keys``, in order (None where missing)."""
        get = self._table.get
        return [get(self._key(k)) for k in keys]

    def _put(self, key: str, value: Any, timeout: Timeout, only_new: bool) -> bool:
        ttl = self._ttl(timeout)
        if ttl is not None and ttl < 0:
            if only_new:
                return self._table.get(key, _MISSING) is _MISSING
            self._table.delete(key)
            return True
        try:
            stored, _ = self._table._cache_put(key, value, ttl, only_new, True)
        except TypeError as e:
            # cachelib: "Pickling errors, however, will raise a subclass of
            # pickle.PickleError" - surface what pickle raised.
            if isinstance(e.__cause__, Exception):
                raise e.__cause__ from None
            raise
        except ValueTooLargeError:
            self._table.delete(key)      # a failed set leaves no stale value
            _log.warning("shmreg: value for cache key %r is too large for table %r; not cached",
                         key, self._table.name)
            return False
        return bool(stored)

    def set(self, key: str, value: Any, timeout: Timeout = None) -> bool:
        """Store ``value`` (``timeout`` seconds; 0: forever; None: the default).
        False if the value can never fit the table (the old value is removed)."""
        return self._put(self._key(key), value, timeout, False)

    def add(self, key: str, value: Any, timeout: Timeout = None) -> bool:
        """Store only if ``key`` is absent; whether it did (atomic across processes)."""
        return self._put(self._key(key), value, timeout, True)

    def set_many(self, mapping: dict[str, Any], timeout: Timeout = None) -> list[Any]:
        """Store every item; returns the keys that were stored."""
        return [k for k, v in mapping.items() if self._put(self._key(k), v, timeout, False)]

    def delete(self, key: str) -> bool:
        """Remove ``key``; whether it was there."""
        return self._table.delete(self._key(key))

    def delete_many(self, *keys: str) -> list[Any]:
        """Remove ``keys``; returns them all (a key absent afterwards counts
        as deleted, so there are no failures to report)."""
        for key in keys:
            self._table.delete(self._key(key))
        return list(keys)

    def clear(self) -> bool:
        """Remove this cache's entries: those under ``key_prefix`` if there is
        one (other users of the table keep theirs), else every entry."""
        prefix = self.key_prefix() if callable(self.key_prefix) else self.key_prefix
        if not prefix:
            self._table.clear()
            return True
        for key, _ in list(self._table.select(prefix=prefix)):
            self._table.delete(key)
        return True

    def inc(self, key: str, delta: int = 1) -> int | None:
        """Add ``delta`` atomically (across processes) and return the new value;
        a missing key starts at ``delta`` (default timeout), an existing one
        keeps its expiry.  :raises TypeError: the value is not a number."""
        k = self._key(key)
        table = self._table
        ttl = self._ttl(None)
        while True:
            try:
                # The int fast path: one locked step, keeps the expiry.
                return table.update_counter(k, delta, ttl=ttl)
            except (TypeError, OverflowError):
                pass                                   # a float, None, or past 64 bits
            except TableFullError:
                if table._cache_put(k, delta, ttl, True, True)[0]:   # evict to make room
                    return delta
                continue
            raw = table._get_raw(k)
            if raw is None:
                continue                               # deleted meanwhile: start over
            current = _core.decode_raw(raw[0], raw[1], table.allow_pickle)
            new = (current or 0) + delta
            if table._cas_raw(k, raw[0], raw[1], new):
                return new  # type: ignore[no-any-return]

    def dec(self, key: str, delta: int = 1) -> int | None:
        """Subtract ``delta`` (see :meth:`inc`)."""
        return self.inc(key, -delta)

    # -- shmreg extras ----------------------------------------------------------------

    @property
    def shmreg_cache(self) -> Cache[Any]:
        """The underlying :class:`shmreg.Cache` (``get_or_set`` single flight,
        stats, unlink)."""
        return self._cache
