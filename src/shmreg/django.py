"""Django cache backend: one cache for every worker process on the host.

In ``settings.py``::

    CACHES = {
        "default": {
            "BACKEND": "shmreg.django.ShmregCache",
            "LOCATION": "myapp-cache",          # the table's name
            "TIMEOUT": 300,
            "OPTIONS": {"MAX_ENTRIES": 100_000, "memory": 64 << 20},
        }
    }
    SESSION_ENGINE = "django.contrib.sessions.backends.cache"   # optional

Django's local-memory cache is private to each process: under gunicorn every
worker keeps (and computes) its own copy.  This backend keeps the entries in
a :class:`shmreg.Cache` table in shared memory instead, so a value set by one
worker is read by all of them, with no server to run.  The semantics are
Django's (see ``docs/django.md``): ``incr``/``decr`` are atomic across
processes and keep the entry's expiry, ``get_or_set`` with a callable
computes once across processes, ``close()`` (called after every request) is
free, and the ``a*`` methods run inline (no thread hop: nothing here blocks).

Differences from LocMemCache: memory is bounded by the table's geometry and
full tables evict by CLOCK (expired entries first), not by Django's
``CULL_FREQUENCY``; ``MAX_ENTRIES`` and ``memory`` size the table only when
this process creates it.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Iterable

from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache

from shmreg import _core
from shmreg.cache import Cache, shared_cache
from shmreg.errors import ValueTooLargeError

__all__ = ["ShmregCache"]

_log = logging.getLogger("shmreg.django")
_MISSING = _core.MISSING
_NOT_YET = object()


async def _call(factory: Any) -> Any:
    """``factory()``, awaited if it returns an awaitable."""
    value = factory()
    if inspect.isawaitable(value):
        value = await value
    return value


class ShmregCache(BaseCache):
    """Django cache backend over a shared-memory :class:`shmreg.Cache`.

    ``LOCATION`` is the table name (default ``"django-cache"``).  ``OPTIONS``:
    ``MAX_ENTRIES`` (entries the table holds at most) and ``memory`` (bytes
    for keys and values), both used only when the table is created (an
    existing table keeps its limits; without either the table grows as
    needed); ``SINGLE_FLIGHT_TIMEOUT`` (seconds a ``get_or_set`` waits for
    another process's computation before computing itself, default 30);
    ``URL`` (a Redis/Valkey URL: the cache lives on that server, shared by
    every host) and ``NEAR`` (with ``URL``: ``True`` keeps hot entries in
    this host's near cache, kept coherent by the server; see
    docs/near-cache.md).

    Django makes one backend object per thread (and per async context); they
    all share this process's one attached table, so a backend object costs a
    dict lookup, and :meth:`close` has nothing to release.
    """

    def __init__(self, location: str, params: dict[str, Any]) -> None:
        super().__init__(params)
        options = params.get("OPTIONS") or {}
        self._name = location or "django-cache"
        capacity = options.get("MAX_ENTRIES", options.get("max_entries"))
        memory = options.get("memory", options.get("MEMORY"))
        self._flight_timeout = float(options.get("SINGLE_FLIGHT_TIMEOUT", 30.0))
        url = options.get("URL", options.get("url"))
        near = options.get("NEAR", options.get("near", False))
        self._cache: Cache[Any] = shared_cache(self._name, capacity=capacity, memory=memory,
                                               url=url, near=near)
        self._table = self._cache.table

    # -- timeouts ------------------------------------------------------------------

    def _ttl(self, timeout: Any) -> float | None:
        """Seconds to live (None: forever; <= 0: already expired)."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None:
            return None
        return float(timeout)

    # -- writes --------------------------------------------------------------------

    def _put(self, key: str, value: Any, ttl: float | None, only_new: bool) -> bool:
        try:
            stored, _ = self._table._cache_put(key, value, ttl, only_new, True)
        except TypeError as e:
            # The core says "cannot store ... not picklable" and chains what
            # pickle raised; Django's backends pickle themselves, so callers
            # expect pickle's own exception (e.g. pickle.PickleError).
            if isinstance(e.__cause__, Exception):
                raise e.__cause__ from None
            raise
        except ValueTooLargeError:
            # As Django's memcached backends do: a value too big to cache must
            # not leave the previous value behind (cache_db sessions rely on
            # it), and the caller's request goes on.
            self._table.delete(key)
            _log.warning("shmreg: value for cache key %r is too large for table %r; not cached",
                         key, self._name)
            return False
        return stored

    def add(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT,
            version: int | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent (or expired); whether it did.

        Atomic across processes: of concurrent ``add`` calls exactly one wins.
        """
        key = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        if ttl is not None and ttl <= 0:
            # Django: an already-expired add "succeeds" if the key was free,
            # and stores nothing.
            return self._table.get(key, _MISSING) is _MISSING
        return self._put(key, value, ttl, True)

    def set(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT,
            version: int | None = None) -> None:
        """Store ``value`` under ``key`` for ``timeout`` seconds (None: forever;
        0 or negative: remove the key).  Evicts if the table is full."""
        key = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        if ttl is not None and ttl <= 0:
            self._table.delete(key)
            return
        self._put(key, value, ttl, False)

    def set_many(self, data: dict[Any, Any], timeout: Any = DEFAULT_TIMEOUT,
                 version: int | None = None) -> list[Any]:
        """Store every item; returns the keys that could not be stored."""
        ttl = self._ttl(timeout)
        failed = []
        for key, value in data.items():
            made = self.make_and_validate_key(key, version=version)
            if ttl is not None and ttl <= 0:
                self._table.delete(made)
            elif not self._put(made, value, ttl, False):
                failed.append(key)
        return failed

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        """Give ``key`` a new ``timeout``; False if it is absent."""
        key = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        if ttl is not None and ttl <= 0:
            return self._table.delete(key)
        return self._table.expire(key, ttl)

    def delete(self, key: Any, version: int | None = None) -> bool:
        """Remove ``key``; whether it was there."""
        key = self.make_and_validate_key(key, version=version)
        return self._table.delete(key)

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        """Remove every key in ``keys``."""
        for key in keys:
            self._table.delete(self.make_and_validate_key(key, version=version))

    def clear(self) -> None:
        """Remove every entry of the table (every alias and prefix sharing it)."""
        self._table.clear()

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        """Add ``delta`` to the value of ``key`` and return the result.

        Atomic across processes and threads, and the entry keeps its expiry.
        :raises ValueError: the key is absent.  :raises TypeError: its value
        does not support ``+ delta``.
        """
        key = self.make_and_validate_key(key, version=version)
        table = self._table
        while True:
            raw = table._get_raw(key)
            if raw is None:
                raise ValueError(f"Key '{key}' not found")
            new = _core.decode_raw(raw[0], raw[1], table.allow_pickle) + delta
            # Compare-and-swap on the stored bytes: the swap keeps the entry's
            # expiry, and it fails (we re-read) if another process changed or
            # removed the value since our read.  (A core "update_counter only
            # if present" would make this one locked step.)
            if table._cas_raw(key, raw[0], raw[1], new):
                return new

    def decr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        """Subtract ``delta`` (see :meth:`incr`)."""
        return self.incr(key, -delta, version=version)

    # -- reads ---------------------------------------------------------------------

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        """The cached value of ``key``, or ``default``."""
        key = self.make_and_validate_key(key, version=version)
        return self._table.get(key, default)

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        """``{key: value}`` for the keys that are cached."""
        out = {}
        get = self._table.get
        for key in keys:
            value = get(self.make_and_validate_key(key, version=version), _MISSING)
            if value is not _MISSING:
                out[key] = value
        return out

    def has_key(self, key: Any, version: int | None = None) -> bool:
        """Whether ``key`` is cached (and not expired)."""
        key = self.make_and_validate_key(key, version=version)
        return key in self._table

    def get_or_set(self, key: Any, default: Any, timeout: Any = DEFAULT_TIMEOUT,
                   version: int | None = None) -> Any:
        """The cached value of ``key``; if absent, store ``default`` (called
        first if callable) and return it.

        A callable ``default`` runs in exactly one process at a time per key:
        concurrent callers in every worker wait for its value instead of each
        computing it (see :meth:`shmreg.Cache.get_or_set`).  A caller that
        waited ``OPTIONS["SINGLE_FLIGHT_TIMEOUT"]`` seconds (default 30) for
        another process computes the value itself, as Django's backends do.
        """
        made = self.make_and_validate_key(key, version=version)
        value = self._table.get(made, _MISSING)
        if value is not _MISSING:
            return value
        ttl = self._ttl(timeout)
        if callable(default) and (ttl is None or ttl > 0):
            computed: list[Any] = []

            def compute() -> Any:
                computed.append(_NOT_YET)
                computed[0] = default()
                return computed[0]

            try:
                return self._cache.get_or_set(made, compute, ttl=ttl,
                                              timeout=self._flight_timeout)
            except ValueTooLargeError:
                if not computed or computed[0] is _NOT_YET:
                    raise
                self._table.delete(made)   # as in set(): no stale value left
                return computed[0]
            except TimeoutError:
                if computed:               # raised by default() itself
                    raise
                default = default()        # waited long enough: compute here
        elif callable(default):
            default = default()
        self.add(key, default, timeout=timeout, version=version)
        # Another process may have added first: its value wins, as in Django.
        return self.get(key, default, version=version)

    def close(self, **kwargs: Any) -> None:
        """Nothing to release: the table stays attached for the process's
        lifetime and is shared by every thread's backend object."""

    # -- async: the operations never block (no I/O, short shard locks), so they
    # run inline instead of through sync_to_async's thread hop.

    async def aadd(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT,
                   version: int | None = None) -> bool:
        """Async :meth:`add`."""
        return self.add(key, value, timeout, version)

    async def aget(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        """Async :meth:`get`."""
        return self.get(key, default, version)

    async def aset(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT,
                   version: int | None = None) -> None:
        """Async :meth:`set`."""
        self.set(key, value, timeout, version)

    async def atouch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT,
                     version: int | None = None) -> bool:
        """Async :meth:`touch`."""
        return self.touch(key, timeout, version)

    async def adelete(self, key: Any, version: int | None = None) -> bool:
        """Async :meth:`delete`."""
        return self.delete(key, version)

    async def aget_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        """Async :meth:`get_many`."""
        return self.get_many(keys, version)

    async def aget_or_set(self, key: Any, default: Any, timeout: Any = DEFAULT_TIMEOUT,
                          version: int | None = None) -> Any:
        """Async :meth:`get_or_set`: while another process computes the value,
        this waits with ``asyncio.sleep`` (the event loop keeps running); a
        callable ``default`` may be a coroutine function."""
        made = self.make_and_validate_key(key, version=version)
        value = self._table.get(made, _MISSING)
        if value is not _MISSING:
            return value
        ttl = self._ttl(timeout)
        if callable(default) and (ttl is None or ttl > 0):
            computed: list[Any] = []

            async def compute() -> Any:
                computed.append(_NOT_YET)
                computed[0] = await _call(default)
                return computed[0]

            try:
                return await self._cache.aget_or_set(made, compute, ttl=ttl,
                                                     timeout=self._flight_timeout)
            except ValueTooLargeError:
                if not computed or computed[0] is _NOT_YET:
                    raise
                self._table.delete(made)
                return computed[0]
            except TimeoutError:
                if computed:
                    raise
                default = await _call(default)
        elif callable(default):
            default = await _call(default)
        await self.aadd(key, default, timeout=timeout, version=version)
        return await self.aget(key, default, version=version)

    async def ahas_key(self, key: Any, version: int | None = None) -> bool:
        """Async :meth:`has_key`."""
        return self.has_key(key, version)

    async def aincr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        """Async :meth:`incr`."""
        return self.incr(key, delta, version)

    async def adecr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        """Async :meth:`decr`."""
        return self.decr(key, delta, version)

    async def aset_many(self, data: dict[Any, Any], timeout: Any = DEFAULT_TIMEOUT,
                        version: int | None = None) -> list[Any]:
        """Async :meth:`set_many`."""
        return self.set_many(data, timeout, version)

    async def adelete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        """Async :meth:`delete_many`."""
        self.delete_many(keys, version)

    async def aclear(self) -> None:
        """Async :meth:`clear`."""
        self.clear()

    async def aincr_version(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        """Async :meth:`incr_version`."""
        return self.incr_version(key, delta, version)

    async def adecr_version(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        """Async :meth:`decr_version`."""
        return self.decr_version(key, delta, version)

    async def aclose(self, **kwargs: Any) -> None:
        """Async :meth:`close` (nothing to release)."""

    # -- shmreg extras --------------------------------------------------------------

    @property
    def shmreg_cache(self) -> Cache[Any]:
        """The underlying :class:`shmreg.Cache` (stats, unlink, ...)."""
        return self._cache

