"""`Cache`: one TTL cache for every worker process on the host.

What per-process caches (``functools.lru_cache``, ``cachetools``) cannot do:
every worker sees the same entries, and when a value is missing exactly one
worker computes it while the others wait for it (cross-process single
flight).  When memory or index slots run out, entries are evicted - expired
ones first, then by CLOCK (a reference bit readers set only when it is clear,
so reads stay lock-free) - instead of raising ``TableFullError``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import math
import os
import pickle
import threading
import time
from typing import (TYPE_CHECKING, Any, Awaitable, Callable, Generic, Iterator, MutableMapping,
                    TypeVar, Union, overload)

from shmreg._core import MISSING
from shmreg.errors import TableNotFoundError
from shmreg.table import Table, backend_options
from shmreg.trust import Trust

__all__ = ["Cache", "shared_cache"]

T = TypeVar("T")
D = TypeVar("D")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
_DEFAULT = object()

if TYPE_CHECKING:
    # Only the type checker needs these (mypy knows typing_extensions even
    # when it is not installed): memoize keeps the wrapped signature.
    from typing_extensions import ParamSpec, Protocol

    P = ParamSpec("P")

    class Memoized(Protocol[P, R_co]):
        """A function memoized by :meth:`Cache.memoize`."""

        def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...
        def cache_clear(self) -> int: ...
        def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str: ...


class Cache(MutableMapping[Any, T], Generic[T]):
    """A TTL cache in shared memory with eviction and cross-process single flight.

    :param name: table name (opened, or created if missing).
    :param ttl: default time to live in seconds for ``set`` (``None`` or
        ``inf``: entries never expire unless a ``ttl`` is given).  Every
        method's ``ttl`` takes seconds, ``inf`` for "never expires" (as in
        :class:`~shmreg.Table`), or ``None`` for the cache's default;
        ``0``, negatives and ``nan`` raise ``ValueError``.
    :param capacity: entries the table is sized for (when it creates it).
    :param memory: bytes for keys and values (when it creates it).
    :param grow: start small and grow to the limits (as for
        :class:`~shmreg.Table`: the default when neither ``capacity`` nor
        ``memory`` is given).  A cache evicts only at its limit (or when the
        filesystem holding it is full).
    :param mode: file mode when it creates its tables, the sharing accepted
        when it opens them (default ``0o600``); see :class:`~shmreg.Table`.
    :param trust: other users and groups whose tables it accepts
        (:class:`~shmreg.Trust`; default none).  Applies to the cache's
        single-flight table too.
    :param clock: for tests: monotonic seconds, instead of CLOCK_MONOTONIC.
    :param url: a Redis/Valkey URL: the cache (and its single-flight marks)
        live on that server, shared by every host; one factory call
        cluster-wide per missing key.  The server does not evict for it:
        bound it with ttls (see ``docs/redis.md``).
    :param lease_ttl: with ``url``: how long a computing process that
        vanished (host down, partition) holds its single-flight mark.
    :param near: with ``url``: keep hot entries in a near cache on this
        host, one copy shared by every worker, kept coherent by the server's
        invalidations (``docs/near-cache.md``).  ``True``, or a dict with
        the local table's ``capacity`` and/or ``memory`` limits.

    >>> cache = Cache("doc-cache", ttl=60)
    >>> cache.get_or_set("answer", lambda: 6 * 7)
    42
    >>> cache["answer"]
    42
    >>> cache.unlink()

    ``Cache[T]`` is generic in the type of its values, for type checkers:
    ``pages: Cache[bytes] = Cache("pages")`` makes ``pages.get_or_set(...)``
    a ``bytes``.
    """

    def __init__(self, name: str, *, ttl: float | None = 300.0, capacity: int | None = None,
                 memory: int | None = None, grow: bool | None = None, mode: int = 0o600,
                 trust: Trust | None = None, clock: Callable[[], float] | None = None,
                 url: str | None = None, lease_ttl: float | None = None,
                 near: bool | dict = False) -> None:
        self.default_ttl = self._check_ttl(ttl)
        self._backend = backend_options(url, lease_ttl)
        self.table = Table(name, capacity=capacity, memory=memory, grow=grow, mode=mode,
                           trust=trust, clock=clock, _clock_bits=True, **self._backend)
        if near:
            from shmreg.backends.redis.near import near_table

            # (It has every Table method the cache uses; the rest falls through.)
            self.table = near_table(self.table, near)  # type: ignore[assignment]
        self._clock = clock
        self._flights: Table | None = None
        # Hits and misses are the table's per-process read counters (exact
        # for this process, no shared writes); the hot read goes straight to
        # the C implementation, which counts them.
        self.get = self.table.get  # type: ignore[method-assign]
        self.sets = 0

    # -- lifecycle -------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.table.name

    @property
    def hits(self) -> int:
        """Reads of this process that found a live entry."""
        return self.table._hits

    @property
    def misses(self) -> int:
        """Reads of this process that found nothing (or an expired entry)."""
        return self.table._misses

    def _uncount(self, hits: int, misses: int) -> None:
        self.table._hits, self.table._misses = hits, misses

    def close(self) -> None:
        """Close the cache's tables in this process (idempotent)."""
        self.table.close()
        if self._flights is not None:
            self._flights.close()

    def unlink(self) -> None:
        """Remove the cache (and its single-flight table) from the host."""
        self.table.unlink()
        try:
            with Table.open(self._flights_name(), mode=self.table.mode,
                            trust=self.table.trust, **self._backend) as flights:
                flights.unlink()
        except TableNotFoundError:
            pass

    def __enter__(self) -> "Cache[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<shmreg.Cache {self.name!r} ttl={self.default_ttl}>"

    # -- ttl handling ------------------------------------------------------------

    @staticmethod
    def _check_ttl(ttl: Any) -> float | None:
        if ttl is None or (isinstance(ttl, (int, float)) and math.isinf(ttl) and ttl > 0):
            return None
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds or None, not {ttl!r}")
        return float(ttl)

    def _ttl(self, ttl: Any) -> float | None:
        return self.default_ttl if ttl is None or ttl is _DEFAULT else self._check_ttl(ttl)

    # -- reads -------------------------------------------------------------------

    @overload
    def get(self, key: Any) -> T | None: ...
    @overload
    def get(self, key: Any, default: D) -> T | D: ...

    def get(self, key: Any, default: Any = None) -> Any:  # replaced per instance by table.get
        """The cached value of ``key``, or ``default`` (a miss)."""
        return self.table.get(key, default)

    def __getitem__(self, key: Any) -> T:
        return self.table[key]  # type: ignore[no-any-return]

    def __contains__(self, key: object) -> bool:
        # A membership test is not a cache read: keep the counters as they were.
        h, m = self.table._hits, self.table._misses
        try:
            return key in self.table
        finally:
            self._uncount(h, m)

    def get_stale(self, key: Any, default: Any = None) -> tuple[Any, bool] | Any:
        """``(value, is_stale)`` of ``key`` even after it expired (until it is
        purged or evicted), for serve-stale-while-recomputing; else ``default``.

        >>> value, stale = cache.get_stale("report", (None, True))
        """
        got = self.table._get_stale(key, MISSING)
        if got is MISSING:
            return default
        value, expires = got
        stale = expires != 0 and expires <= self._now_ns()
        if stale:   # found, but expired: a miss for the statistics
            self._uncount(self.table._hits - 1, self.table._misses + 1)
        return value, stale

    def _now_ns(self) -> int:
        return int(self._clock() * 1e9) if self._clock is not None else time.monotonic_ns()

    # -- writes ------------------------------------------------------------------

    def set(self, key: Any, value: T, *, ttl: float | None = None) -> bool:
        """Store ``value`` (``ttl`` seconds, default the cache's), evicting
        if there is no room.  Returns True if *live* entries had to be evicted
        to make room (``lua_shared_dict``'s ``forcible``).

        :raises ValueTooLargeError: the item can never fit.
        """
        _stored, evicted = self.table._cache_put(key, value, self._ttl(ttl), False, True)
        self.sets += 1
        return evicted > 0

    def __setitem__(self, key: Any, value: T) -> None:
        self.set(key, value)

    def safe_set(self, key: Any, value: T, *, ttl: float | None = None) -> None:
        """Like :meth:`set`, but never evicts a live entry.
        :raises TableFullError: no room without evicting."""
        self.table._cache_put(key, value, self._ttl(ttl), False, False)
        self.sets += 1

    def add(self, key: Any, value: T, *, ttl: float | None = None) -> bool:
        """Store only if ``key`` is absent (or expired); never evicts a live
        entry.  Returns whether it stored.  :raises TableFullError: no room."""
        stored, _ = self.table._cache_put(key, value, self._ttl(ttl), True, False)
        if stored:
            self.sets += 1
        return bool(stored)

    def delete(self, key: Any) -> bool:
        """Remove ``key``; True if it was cached."""
        return self.table.delete(key)

    def __delitem__(self, key: Any) -> None:
        if not self.table.delete(key):
            raise KeyError(key)

    def touch(self, key: Any, ttl: float | None = None) -> bool:
        """Give ``key`` a fresh ``ttl`` (default: the cache's); False if absent."""
        return self.table.expire(key, self._ttl(ttl))

    def expire(self) -> int:
        """Remove expired entries now (they are invisible already); returns
        how many."""
        return self.table.purge_expired()

    def clear(self) -> None:
        """Remove every entry."""
        self.table.clear()

    def __len__(self) -> int:
        return len(self.table)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.table)

    def stats(self) -> dict[str, int]:
        """Counters and usage.

        Per process (exact; a ``get_or_set`` counts once, however long it
        waits): ``hits``, ``misses``, ``sets``.  Host-wide (every process of
        the cache): ``host_hits`` and ``host_misses`` (sampled: each process
        adds 64 per 64 of its reads, so each contributes up to 63 less than
        it did; what a ``/status`` page wants), ``evictions``,
        ``expirations``, ``entries``, ``bytes_used``, ``bytes_free``.
        """
        s = self.table.stats()
        return {
            "hits": self.hits,
            "misses": self.misses,
            "sets": self.sets,
            "host_hits": s["reads_hit"],
            "host_misses": s["reads_missed"],
            "evictions": s["evictions"],
            "expirations": s["expirations"],
            "entries": s["entries"],
            "bytes_used": s["bytes_used"],
            "bytes_free": s["bytes_free"],
            **{k: v for k, v in s.items() if k.startswith("near_")},
        }

    # -- single flight -----------------------------------------------------------

    def _flights_name(self) -> str:
        return f"{self.name}--flights"

    def _flight_table(self) -> Table:
        # A separate, non-evicting table: a flight marker must never be
        # evicted by cache pressure (two workers would then compute).
        if self._flights is None:
            cap = max(4096, min(self.table.capacity, 1 << 16))
            self._flights = Table(self._flights_name(), capacity=cap, memory=max(4 << 20, 128 * cap),
                                  mode=self.table.mode, trust=self.table.trust, **self._backend)
        return self._flights

    def get_or_set(self, key: Any, factory: Callable[[], T], *, ttl: float | None = None,
                   timeout: float = 30.0) -> T:
        """The cached value of ``key``; if missing, compute it with ``factory()``
        in exactly one process while concurrent callers (any process) wait.

        The computing process marks the key with an entry *owned* by it: if
        it dies mid-factory the mark vanishes at once and the next waiter
        computes.  If ``factory`` raises, the exception goes to that caller
        only and is not cached: the key is not poisoned, the next waiter (or
        call) computes again.  Waiters poll with exponential backoff (0.5 ms
        up to 50 ms), so they do not burn a core.

        :raises TimeoutError: no value within ``timeout`` seconds.
        """
        self._ttl(ttl)  # bad ttl: fail before running the factory
        v = self.table.get(key, MISSING)
        if v is not MISSING:
            return v  # type: ignore[no-any-return]
        # This call counts as the one miss above, however often it polls.
        counted = self.table._hits, self.table._misses
        try:
            return self._single_flight(key, factory, ttl, timeout)
        finally:
            self._uncount(*counted)

    def _single_flight(self, key: Any, factory: Callable[[], T], ttl: float | None,
                       timeout: float) -> T:
        flights = self._flight_table()
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            # The mark's ttl bounds a computing process that hangs (alive, but
            # never finishing); ownership covers one that dies.
            if flights.insert_new(key, os.getpid(), ttl=max(timeout, 0.001), owned=True):
                try:
                    v = self.table.get(key, MISSING)  # computed while we raced for the mark?
                    if v is MISSING:
                        v = factory()
                        self.set(key, v, ttl=ttl)
                    return v  # type: ignore[no-any-return]
                finally:
                    # Only our own mark: after a timeout another process may
                    # have marked the key since.
                    flights._delete_owned(key, flights._self_owner_id)
            v = self.table.get(key, MISSING)
            if v is not MISSING:
                return v  # type: ignore[no-any-return]
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no value for {key!r} within {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    # -- asyncio -----------------------------------------------------------------
    # Reads and writes never wait for anything but a shard lock held for a few
    # microseconds, so the async face runs them inline (no thread hop).  Only
    # waiting for another process's computation is a real wait, and that one
    # sleeps with asyncio.sleep.

    async def aget(self, key: Any, default: Any = None) -> Any:
        """Async :meth:`get` (runs inline: it never blocks)."""
        return self.table.get(key, default)

    async def aset(self, key: Any, value: T, *, ttl: float | None = None) -> bool:
        """Async :meth:`set`."""
        return self.set(key, value, ttl=ttl)

    async def aadd(self, key: Any, value: T, *, ttl: float | None = None) -> bool:
        """Async :meth:`add`."""
        return self.add(key, value, ttl=ttl)

    async def adelete(self, key: Any) -> bool:
        """Async :meth:`delete`."""
        return self.delete(key)

    async def atouch(self, key: Any, ttl: float | None = None) -> bool:
        """Async :meth:`touch`."""
        return self.touch(key, ttl)

    async def aget_or_set(self, key: Any,
                          factory: Callable[[], Union[T, Awaitable[T]]], *,
                          ttl: float | None = None, timeout: float = 30.0) -> T:
        """Async :meth:`get_or_set`: the value of ``key``, computed once across
        processes if missing.  ``factory`` may be a coroutine function (or
        return an awaitable); a plain function runs inline on the loop, so
        hand CPU-heavy work to an executor inside an async factory.

        While another process (or task) computes the value, this coroutine
        waits with ``asyncio.sleep`` (0.5 ms doubling to 50 ms): the event
        loop keeps serving other tasks.  Cancelling the computing task
        releases its mark, and the next waiter computes.

        >>> async def render():
        ...     return "<html>"
        >>> page = await cache.aget_or_set("page:/", render, ttl=60)
        :raises TimeoutError: no value within ``timeout`` seconds.
        """
        self._ttl(ttl)
        v = self.table.get(key, MISSING)
        if v is not MISSING:
            return v  # type: ignore[no-any-return]
        counted = self.table._hits, self.table._misses
        try:
            return await self._single_flight_async(key, factory, ttl, timeout)
        finally:
            self._uncount(*counted)

    async def _single_flight_async(self, key: Any,
                                   factory: Callable[[], Union[T, Awaitable[T]]],
                                   ttl: float | None, timeout: float) -> T:
        # The same protocol as _single_flight; only the wait differs.
        flights = self._flight_table()
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            if flights.insert_new(key, os.getpid(), ttl=max(timeout, 0.001), owned=True):
                try:
                    v = self.table.get(key, MISSING)
                    if v is MISSING:
                        v = factory()
                        if inspect.isawaitable(v):
                            v = await v
                        self.set(key, v, ttl=ttl)
                    return v  # type: ignore[no-any-return]
                finally:
                    flights._delete_owned(key, flights._self_owner_id)
            v = self.table.get(key, MISSING)
            if v is not MISSING:
                return v  # type: ignore[no-any-return]
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no value for {key!r} within {timeout} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    # -- memoize -----------------------------------------------------------------

    def memoize(self, ttl: float | None = None, key: Callable[..., Any] | None = None
                ) -> Callable[[Callable[P, R]], Memoized[P, R]]:
        """Decorator: cache a function's results across processes.

        The cache key is the function's module and qualified name plus a
        digest of its arguments (canonical pickle: dict and set order do not
        matter), or ``key(*args, **kwargs)`` if given.  Calls go through
        :meth:`get_or_set`, so concurrent callers compute once.
        ``f.cache_clear()`` drops the function's entries; ``f.cache_key(...)``
        shows the key of a call.

        >>> @cache.memoize(ttl=60)
        ... def slow_square(x):
        ...     return x * x
        """
        def decorate(fn: Callable[P, R]) -> Memoized[P, R]:
            prefix = f"memo:{fn.__module__}.{fn.__qualname__}:"

            def cache_key(*args: Any, **kwargs: Any) -> str:
                if key is not None:
                    return prefix + str(key(*args, **kwargs))
                blob = pickle.dumps(_canonical((args, kwargs)), protocol=4)
                return prefix + hashlib.blake2b(blob, digest_size=16).hexdigest()

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                # The cache holds T, the function returns R: memoized values
                # share the table with other entries, so the types are apart.
                store: Cache[Any] = self
                return store.get_or_set(cache_key(*args, **kwargs), lambda: fn(*args, **kwargs),
                                        ttl=ttl)

            def cache_clear() -> int:
                doomed = [k for k, _ in self.table.select(prefix=prefix)]
                return sum(self.table.delete(k) for k in doomed)

            wrapper.cache_clear = cache_clear  # type: ignore[attr-defined]
            wrapper.cache_key = cache_key  # type: ignore[attr-defined]
            return wrapper  # type: ignore[return-value]
        return decorate


_shared: dict[tuple, Cache[Any]] = {}
_shared_lock = threading.Lock()


def shared_cache(name: str, *, capacity: int | None = None, memory: int | None = None,
                 url: str | None = None, near: bool | dict = False) -> Cache[Any]:
    """This process's one :class:`Cache` on table ``name`` (opened, or created
    with ``capacity``/``memory`` if missing), shared by every caller; with
    ``url``, on that Redis/Valkey server, and with ``near``, behind this
    host's near cache (see :class:`Cache`).

    For framework backends that make one backend object per thread or per
    request (Django, cachelib): they all use one attached table.  The cache
    has no default ttl (entries never expire unless a ``ttl`` is given), so
    callers pass their own on every write.  A forked child keeps using the
    handle it inherited (the mapping stays valid; per-process state is reset
    by the table's fork hook).
    """
    key = (name, url, bool(near))
    cache = _shared.get(key)
    if cache is None or cache.table.closed:
        with _shared_lock:
            cache = _shared.get(key)
            if cache is None or cache.table.closed:
                cache = Cache(name, ttl=None, capacity=capacity, memory=memory, url=url, near=near)
                _shared[key] = cache  # noqa: SHM101 - per-process handles on a shared table
    return cache


def _reset_shared_lock() -> None:
    # A fork while another thread held the lock would leave it held forever
    # in the child.
    global _shared_lock
    _shared_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_shared_lock)


def _canonical(obj: Any) -> Any:
    """A form of ``obj`` whose pickle does not depend on the process: sets
    and dicts get a sorted order (``hash()`` of str differs per process)."""
    if isinstance(obj, dict):
        return ("__dict__", tuple(sorted(((_canonical(k), _canonical(v)) for k, v in obj.items()),
                                         key=repr)))
    if isinstance(obj, (set, frozenset)):
        return ("__set__", tuple(sorted((_canonical(x) for x in obj), key=repr)))
    if isinstance(obj, (list, tuple)):
        return type(obj).__name__, tuple(_canonical(x) for x in obj)
    return obj

