"""`Cache`: one TTL cache for every worker process on the host.

What per-process caches (``functools.lru_cache``, ``cachetools``) cannot do:
every worker sees the same entries, and when a value is missing exactly one
worker computes it while the others wait for it (cross-process single
flight).  When memory or index slots run out, entries are evicted - expired
ones first, then by CLOCK (a reference bit readers set only when it is clear,
so reads stay lock-free) - instead of raising ``TableFullError``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import pickle
import time
from collections.abc import MutableMapping
from typing import Any, Callable, Iterator, TypeVar

from shmreg._core import MISSING
from shmreg.errors import TableNotFoundError
from shmreg.table import Table

__all__ = ["Cache"]

F = TypeVar("F", bound=Callable[..., Any])
_DEFAULT = object()


class Cache(MutableMapping):
    """A TTL cache in shared memory with eviction and cross-process single flight.

    :param name: table name (opened, or created if missing).
    :param ttl: default time to live in seconds for ``set`` (``None``: entries
        never expire unless a ``ttl`` is given).
    :param capacity: entries the table is sized for (when it creates it).
    :param memory: bytes for keys and values (when it creates it).
    :param clock: for tests: monotonic seconds, instead of CLOCK_MONOTONIC.

    >>> cache = Cache("doc-cache", ttl=60)
    >>> cache.get_or_set("answer", lambda: 6 * 7)
    42
    >>> cache["answer"]
    42
    >>> cache.unlink()
    """

    def __init__(self, name: str, *, ttl: float | None = 300.0, capacity: int | None = None,
                 memory: int | None = None, clock: Callable[[], float] | None = None) -> None:
        self.default_ttl = self._check_ttl(ttl)
        self.table = Table(name, capacity=capacity, memory=memory, clock=clock, _clock_bits=True)
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
            with Table.open(self._flights_name()) as flights:
                flights.unlink()
        except TableNotFoundError:
            pass

    def __enter__(self) -> "Cache":
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

    def get(self, key: Any, default: Any = None) -> Any:  # replaced per instance by table.get
        """The cached value of ``key``, or ``default`` (a miss)."""
        return self.table.get(key, default)

    def __getitem__(self, key: Any) -> Any:
        return self.table[key]

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

    def set(self, key: Any, value: Any, *, ttl: float | None = None) -> bool:
        """Store ``value`` (``ttl`` seconds, default the cache's), evicting
        if there is no room.  Returns True if *live* entries had to be evicted
        to make room (``lua_shared_dict``'s ``forcible``).

        :raises ValueTooLargeError: the item can never fit.
        """
        _stored, evicted = self.table._cache_put(key, value, self._ttl(ttl), False, True)
        self.sets += 1
        return evicted > 0

    def __setitem__(self, key: Any, value: Any) -> None:
        self.set(key, value)

    def safe_set(self, key: Any, value: Any, *, ttl: float | None = None) -> None:
        """Like :meth:`set`, but never evicts a live entry.
        :raises TableFullError: no room without evicting."""
        self.table._cache_put(key, value, self._ttl(ttl), False, False)
        self.sets += 1

    def add(self, key: Any, value: Any, *, ttl: float | None = None) -> bool:
        """Store only if ``key`` is absent (or expired); never evicts a live
        entry.  Returns whether it stored.  :raises TableFullError: no room."""
        stored, _ = self.table._cache_put(key, value, self._ttl(ttl), True, False)
        if stored:
            self.sets += 1
        return stored

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

    def stats(self) -> dict:
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
        }

    # -- single flight -----------------------------------------------------------

    def _flights_name(self) -> str:
        return f"{self.name}--flights"

    def _flight_table(self) -> Table:
        # A separate, non-evicting table: a flight marker must never be
        # evicted by cache pressure (two workers would then compute).
        if self._flights is None:
            cap = max(4096, min(self.table.capacity, 1 << 16))
            self._flights = Table(self._flights_name(), capacity=cap, memory=max(4 << 20, 128 * cap))
        return self._flights

    def get_or_set(self, key: Any, factory: Callable[[], Any], *, ttl: float | None = None,
                   timeout: float = 30.0) -> Any:
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
            return v
        # This call counts as the one miss above, however often it polls.
        counted = self.table._hits, self.table._misses
        try:
            return self._single_flight(key, factory, ttl, timeout)
        finally:
            self._uncount(*counted)

    def _single_flight(self, key: Any, factory: Callable[[], Any], ttl: float | None,
                       timeout: float) -> Any:
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
                    return v
                finally:
                    # Only our own mark: after a timeout another process may
                    # have marked the key since.
                    flights._delete_owned(key, flights._self_owner_id)
            v = self.table.get(key, MISSING)
            if v is not MISSING:
                return v
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no value for {key!r} within {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    # -- memoize -----------------------------------------------------------------

    def memoize(self, ttl: float | None = None, key: Callable[..., Any] | None = None
                ) -> Callable[[F], F]:
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
        def decorate(fn: F) -> F:
            prefix = f"memo:{fn.__module__}.{fn.__qualname__}:"

            def cache_key(*args: Any, **kwargs: Any) -> str:
                if key is not None:
                    return prefix + str(key(*args, **kwargs))
                blob = pickle.dumps(_canonical((args, kwargs)), protocol=4)
                return prefix + hashlib.blake2b(blob, digest_size=16).hexdigest()

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                return self.get_or_set(cache_key(*args, **kwargs), lambda: fn(*args, **kwargs), ttl=ttl)

            def cache_clear() -> int:
                doomed = [k for k, _ in self.table.select(prefix=prefix)]
                return sum(self.table.delete(k) for k in doomed)

            wrapper.cache_clear = cache_clear  # type: ignore[attr-defined]
            wrapper.cache_key = cache_key  # type: ignore[attr-defined]
            return wrapper  # type: ignore[return-value]
        return decorate


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

