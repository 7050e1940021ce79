"""The backend interface: what `Table`, `Registry`, `Cache`, `Watcher` and the
recipes ask of the engine under a table.

Two engines implement it: :class:`shmreg._core.CoreTable` (shared memory on
this host) and :class:`shmreg.backends.redis.RedisCore` (a Redis/Valkey
server or cluster).  :class:`shmreg._surface.TableSurface` adds the rest of
the dict/ETS surface on top of these primitives, once for both.

Owner ids are opaque and hashable: ``int`` (a process slot and generation)
locally, ``str`` (a lease token) on Redis.  ``0``/``None``/``""`` mean "not
owned".  A "shard" is the unit a traversal is consistent within; a backend
with one namespace (Redis) has one.
"""

from __future__ import annotations

from typing import Any, Hashable, Protocol, runtime_checkable

__all__ = ["TableBackend"]


@runtime_checkable
class TableBackend(Protocol):
    """Primitives every table engine provides (see the module docstring)."""

    name: str
    allow_pickle: bool
    _hits: int
    _misses: int

    # -- public dict/ETS operations (documented on the local Table) ----------
    def get(self, key: Any, default: Any = None) -> Any: ...

    def __getitem__(self, key: Any) -> Any: ...

    def __setitem__(self, key: Any, value: Any) -> None: ...

    def __delitem__(self, key: Any) -> None: ...

    def __contains__(self, key: Any) -> bool: ...

    def __len__(self) -> int: ...

    def set(self, key: Any, value: Any, *, ttl: float | None = None, owned: bool = False) -> None: ...

    def insert_new(self, key: Any, value: Any, *, ttl: float | None = None,
                   owned: bool = False) -> bool: ...

    def setdefault(self, key: Any, default: Any = None) -> Any: ...

    def delete(self, key: Any) -> bool: ...

    def take(self, key: Any, default: Any = ...) -> Any: ...

    def update_counter(self, key: Any, incr: int = 1, *, default: int = 0,
                       ttl: float | None = None) -> int: ...

    def expire(self, key: Any, ttl: float | None) -> bool: ...

    def purge_expired(self) -> int: ...

    def _compact(self, force: bool) -> int:
        """Give memory back (the watcher's sweep calls it); bytes freed."""

    def clear(self) -> None: ...

    def close(self) -> None: ...

    @property
    def closed(self) -> bool: ...
    @property
    def nshards(self) -> int: ...

    # -- reads for the layers above -------------------------------------------
    def _get_raw(self, key: Any) -> tuple[int, bytes] | None:
        """``(value type, encoded bytes)`` for ``_core.decode_raw``, or None."""

    def _cas_raw(self, key: Any, vtype: int, raw: bytes, new: Any) -> bool:
        """Store ``new`` if the value is still exactly ``(vtype, raw)``."""

    def _get_owned(self, key: Any, default: Any = None) -> Any:
        """``(value, owner id)`` of a live entry, or ``default``."""

    def _get_stale(self, key: Any, default: Any = None) -> Any:
        """``(value, expires_ns)`` even if expired (where the engine keeps
        expired entries), or ``default``."""

    def _ttl_ns(self, key: Any) -> int:
        """Remaining ns, -1 for none; KeyError if absent."""

    def _owner_of(self, key: Any) -> Hashable:
        """Owner id of a live entry (falsy: not owned); KeyError if absent."""

    def _registration(self, key: Any) -> Any:
        """``Registration(pid, value)`` of a live owned entry, or None."""

    def _whereis(self, key: Any) -> int | None:
        """Pid of the live owner of ``key``, or None."""

    def _shard_entries(self, si: int, what: int, prefix: Any = None) -> list:
        """Live entries of shard ``si``: ``what`` 0 keys, 1 values, 3
        ``(key, value)``, 4 ``(key, value, expires_ns, owner id)``."""

    # -- writes for the layers above -------------------------------------------
    def _cache_put(self, key: Any, value: Any, ttl: float | None, only_new: bool,
                   evict: bool) -> tuple[bool, int]:
        """``(stored, live entries evicted)``."""

    def _insert_new_for(self, key: Any, value: Any, owner: Hashable) -> bool:
        """``insert_new`` owned by ``owner``."""

    def _delete_owned(self, key: Any, owner: Hashable) -> bool:
        """Delete ``key`` only if ``owner`` holds it."""

    # -- owners -----------------------------------------------------------------
    def _self_owner(self) -> Hashable:
        """This process's owner id, claimed on first use."""

    def _claim(self, pid: int, start: int, own_process: bool) -> Hashable:
        """An owner id for (live) process ``pid`` started at ``start``."""

    def _release(self, owner: Hashable) -> bool:
        """Forget a dead owner (after its entries were reaped)."""

    def _owner_alive(self, owner: Hashable) -> bool: ...

    def _owner_pid(self, owner: Hashable) -> int | None: ...

    def _proc_table(self) -> list:
        """Known owners: dicts with ``owner, pid, start_time, kind, alive``
        (and ``local``: False for another host's process, which no pidfd
        here can watch)."""

    def _reap(self, owner: Hashable, collect: bool, delete: bool = True) -> tuple[int, list | None]:
        """Delete (or only collect) the entries of dead ``owner`` (0: of
        every dead owner); ``(count, [(key, value, expires_ns, owner)])``."""

    def _reap_stale(self) -> int:
        """Delete the entries of owners no longer in the process table (left
        over), never those of a dead owner still in it: the watcher's sweep,
        which must not take a death from ``on_death``."""

    # -- the watcher lease --------------------------------------------------------
    def _lease(self, timeout_ms: int) -> bool:
        """Become the active watcher (of this table; on Redis, of this host)."""

    def _unlease(self) -> None: ...

    def _lease_holder(self) -> int | None: ...
