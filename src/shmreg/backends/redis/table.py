"""`RedisTable`: the `Table` surface on a Redis/Valkey server or Cluster."""

from __future__ import annotations

import time
from typing import Any, Callable

from shmreg import _segment
from shmreg._surface import TableSurface
from shmreg.backends.redis.connection import (check_eviction_policy, connect, redact, redis,
                                              require_redis, unavailable)
from shmreg.backends.redis.core import RedisCore
from shmreg.errors import CorruptTableError, TableExistsError, TableNotFoundError
from shmreg.trust import Trust

__all__ = ["RedisTable", "list_tables"]

DEFAULT_LEASE_TTL = 10.0


class RedisTable(TableSurface, RedisCore):
    """A table on a Redis/Valkey server: ``shmreg.Table(name, url=...)``.

    The same dict/ETS surface as the shared-memory :class:`~shmreg.Table`
    (``isinstance(t, shmreg.Table)`` holds), shared by every process of
    every host that reaches the server.  Each operation is one script run
    atomically on the server; all keys of a table share one hash tag, so
    each script touches one Cluster slot.  Differences from a local table
    are listed in ``docs/redis.md`` (TTLs in server milliseconds, owned
    entries live as long as their process's *lease*, no eviction, no
    ``get_stale`` past expiry, pickled values trusted by default).

    :param url: ``redis://``, ``rediss://``, ``unix://``,
        ``redis+cluster://`` or ``redis+sentinel://`` (see
        :func:`shmreg.backends.redis.connection.connect`).
    :param lease_ttl: seconds an owner process stays "alive" without a
        heartbeat (renewed every third of it).  A process paused longer
        loses its entries and its owned writes fail
        (:class:`~shmreg.LeaseLostError`).  A host without a watcher
        loses a dead process's entries after at most this long.
    :param unpickle: unpickle pickled values read from the server (default
        True, as redis-py based caches do).  Whoever can write to the
        server can then run code in your processes; ``False`` returns them
        as :class:`~shmreg.PickledValue`.
    :param capacity: accepted for compatibility; a hint only (the
        server's ``maxmemory`` is the limit).  ``memory``, ``shards``,
        ``grow``, ``mode`` and ``trust`` are accepted and ignored.
    """

    def __init__(self, name: str, *, url: str, capacity: int | None = None,
                 memory: int | None = None, shards: int | None = None,
                 grow: bool | None = None, mode: int = 0o600,
                 trust: Trust | None = None, clock: Callable[[], float] | None = None,
                 strict: bool = False, lease_ttl: float = DEFAULT_LEASE_TTL,
                 unpickle: bool = True, _how: str = "auto", _clock_bits: bool = False) -> None:
        require_redis()
        self.name = _segment.check_name(name)
        self.url = url
        self.mode = mode
        self.trust = trust
        if clock is not None:
            raise ValueError("a Redis/Valkey table's TTLs run on the server's clock: clock= "
                             "is for local tables")
        if isinstance(lease_ttl, bool) or not isinstance(lease_ttl, (int, float)) or not lease_ttl >= 0.1:
            raise ValueError(f"lease_ttl must be at least 0.1 seconds, not {lease_ttl!r}")
        self.allow_pickle = bool(unpickle)
        self._capacity = capacity
        self._setup(connect(url), name, lease_ttl)
        check_eviction_policy(self._client, url)
        meta = self._p + ":meta"
        try:
            if _how == "open":
                if not self._client.exists(meta):
                    raise TableNotFoundError(f"no table {name!r} on {redact(url)}")
            else:
                created = self._client.hsetnx(meta, "created_ms", int(time.time() * 1000))
                if not created and _how == "create":
                    raise TableExistsError(f"table {name!r} already exists on {redact(url)}")
        except redis.exceptions.RedisError as e:
            raise unavailable(url, e) from e

    @classmethod
    def create(cls, name: str, **options: Any) -> "RedisTable":
        """Create a new table; :raises TableExistsError: the name is taken on that server."""
        return cls(name, _how="create", **options)

    @classmethod
    def open(cls, name: str, **options: Any) -> "RedisTable":
        """Open an existing table; :raises TableNotFoundError: none on that server."""
        return cls(name, _how="open", **options)

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Stop using the table in this process (idempotent): drops this
        process's leases, so its owned entries vanish."""
        self._close()

    def unlink(self) -> None:
        """Delete the table and every entry from the server (other handles
        then see an empty table; it is recreated by the next ``Table()``)."""
        self._run(self._s.drop_table, self._p + ":meta")

    def __enter__(self) -> "RedisTable":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple:
        # Pickled for a spawn/forkserver child: the child reconnects by URL.
        return (_reopen, (self.name, self.url, self.lease_ttl, self.allow_pickle))

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<shmreg.Table {self.name!r} on {redact(self.url)} {state}>"

    @property
    def path(self) -> str:
        """Where the table lives: its URL and key prefix."""
        return f"{redact(self.url)} {self._p}"

    @property
    def capacity(self) -> int:
        """The capacity hint given at open (a default if none): the server's
        memory is the real limit."""
        from shmreg.table import DEFAULT_CAPACITY

        return self._capacity or DEFAULT_CAPACITY

    # -- introspection ---------------------------------------------------------

    def compact(self, *, force: bool = False) -> int:
        """Nothing to do: the server manages its memory (returns 0)."""
        return self._compact(force)

    def stats(self) -> dict:
        """Usage and this process's counters.  ``bytes_used``/``bytes_free``
        are not tracked per table (0): the server's memory is shared by its
        tables, see ``server_used_memory`` and ``server_maxmemory``."""
        try:
            mem = self._client.info("memory")
        except redis.exceptions.RedisError as e:
            raise unavailable(self.url, e) from e
        if mem and all(isinstance(v, dict) for v in mem.values()):   # cluster: per node
            mem = next(iter(mem.values()))
        procs = self._proc_table()
        return {
            "name": self.name,
            "backend": "redis",
            "url": self.url,
            "entries": len(self),
            "capacity": self.capacity,
            "owner_processes": sum(1 for p in procs if p["alive"]),
            "dead_owner_processes": sum(1 for p in procs if not p["alive"]),
            "watcher_pid": self._lease_holder(),
            "lease_ttl": self.lease_ttl,
            "bytes_used": 0,
            "bytes_free": 0,
            "server_used_memory": mem.get("used_memory"),
            "server_maxmemory": mem.get("maxmemory"),
            "evictions": 0,
            "expirations": 0,
            "reads_hit": self._hits,
            "reads_missed": self._misses,
            "hits": self._hits,
            "misses": self._misses,
            "read_retries": 0,
            "lock_fallbacks": 0,
        }

    def check(self, *, repair: bool = False) -> list | None:
        """Verify that the index names only keys of this table and that every
        owned entry's owner is known.  :raises CorruptTableError: the first
        problem found.  ``repair`` is accepted for symmetry (nothing to repair
        locally: returns [])."""
        for key in self._shard_entries(0, 0):   # decoding every key checks its form
            pass
        known = {p["owner"] for p in self._proc_table()}
        try:
            owners = self._client.hvals(self._p + ":own")
        except redis.exceptions.RedisError as e:
            raise unavailable(self.url, e) from e
        for o in owners:
            if o.decode("ascii", "replace") not in known:
                raise CorruptTableError(f"table {self.name!r}: an entry is owned by unknown "
                                        f"lease {o!r:.40}")
        return [] if repair else None


def _reopen(name: str, url: str, lease_ttl: float, unpickle: bool) -> RedisTable:
    return RedisTable.open(name, url=url, lease_ttl=lease_ttl, unpickle=unpickle)


def list_tables(url: str) -> list:
    """Names of the shmreg tables on the server (or Cluster) at ``url``, sorted."""
    client = connect(url)
    try:
        keys = list(client.scan_iter(match="{shmreg:*}:meta", count=1000))
    except redis.exceptions.RedisError as e:
        raise unavailable(url, e) from e
    names = set()
    for k in keys:
        k = k.decode("utf-8", "replace") if isinstance(k, bytes) else k
        if k.startswith("{shmreg:") and k.endswith("}:meta"):
            names.add(k[len("{shmreg:"):-len("}:meta")])
    return sorted(names)
