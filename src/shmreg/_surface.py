"""`TableSurface`: the pure-Python part of the table API, shared by every backend.

Everything here is written over the backend primitives that
:class:`shmreg.backends.base.TableBackend` lists (``_shard_entries``,
``_get_raw``/``_cas_raw``, ``_proc_table``, ``_reap`` ...), so the local
shared-memory :class:`~shmreg.Table` and the Redis/Valkey table
(:mod:`shmreg.backends.redis`) get the same dict/ETS surface from one copy.
(Moved here verbatim from ``table.py``.)
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

from shmreg import _core
from shmreg._core import MISSING

__all__ = ["TableSurface"]


class TableSurface:
    """Mixin: dict protocol and ETS operations over the backend primitives."""

    # -- dict protocol ---------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        for si in range(self.nshards):
            yield from self._shard_entries(si, 0)

    def keys(self) -> list:
        """All keys, as a list (built shard by shard)."""
        return [k for si in range(self.nshards) for k in self._shard_entries(si, 0)]

    def values(self) -> list:
        """All values, as a list (built shard by shard)."""
        return [v for si in range(self.nshards) for v in self._shard_entries(si, 1)]

    def items(self) -> list:
        """All ``(key, value)`` pairs, as a list (built shard by shard)."""
        return [kv for si in range(self.nshards) for kv in self._shard_entries(si, 3)]

    def pop(self, key: Any, default: Any = MISSING) -> Any:
        """Remove ``key`` and return its value (atomic); KeyError if absent
        and no ``default``."""
        return self.take(key, default)

    def update(self, other: Mapping | Iterable = (), /, **kwargs: Any) -> None:
        """Store every pair of ``other`` and ``kwargs`` (each store atomic, the
        whole update not)."""
        pairs = other.items() if isinstance(other, Mapping) else other
        for k, v in pairs:
            self[k] = v
        for k, v in kwargs.items():
            self[k] = v

    # -- ETS operations --------------------------------------------------------

    def compare_and_swap(self, key: Any, expected: Any, new: Any) -> bool:
        """Replace the value of ``key`` with ``new`` if it currently equals
        ``expected`` (``==``); return whether it did.  Absent key: False.

        >>> t.set("state", "idle")
        >>> t.compare_and_swap("state", "idle", "busy")
        True
        >>> t.compare_and_swap("state", "idle", "busy")
        False
        """
        while True:
            raw = self._get_raw(key)
            if raw is None or _core.decode_raw(raw[0], raw[1], self.allow_pickle) != expected:
                return False
            if self._cas_raw(key, raw[0], raw[1], new):
                return True
            # Changed between our read and our lock: judge the new value.

    def ttl(self, key: Any) -> float | None:
        """Seconds until ``key`` expires, or None if it never does.
        :raises KeyError: absent or expired."""
        ns = self._ttl_ns(key)
        return None if ns < 0 else ns / 1e9

    def select(self, prefix: str | bytes | None = None, owner: int | None = None
               ) -> Iterator[tuple]:
        """Iterate ``(key, value)`` pairs, optionally only keys starting with
        ``prefix`` (same type as the keys: ``str`` or ``bytes``) and only
        entries owned by the live process ``owner`` (a pid).  Shard by shard,
        like ``items()``."""
        if prefix is not None and not isinstance(prefix, (str, bytes)):
            raise TypeError(f"prefix must be str or bytes, not {type(prefix).__name__}")
        if owner is None:
            for si in range(self.nshards):
                yield from self._shard_entries(si, 3, prefix)
            return
        owners = self._owner_ids(owner)
        if not owners:
            return
        for si in range(self.nshards):
            for key, value, _exp, own in self._shard_entries(si, 4, prefix):
                if own in owners:
                    yield key, value

    def owner(self, key: Any) -> int | None:
        """Pid of the live process that owns ``key``; None if the entry is not
        owned.  :raises KeyError: absent (or its owner is dead)."""
        owner = self._owner_of(key)      # (never decodes, so never unpickles, the value)
        return self._owner_pid(owner) if owner else None

    def _owner_ids(self, pid: int) -> set:
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise TypeError(f"owner must be a pid (int), not {type(pid).__name__}")
        return {p["owner"] for p in self._proc_table() if p["pid"] == pid and p["alive"]}

    def reap(self, pid: int, *, force: bool = False) -> int:
        """Delete the entries owned by process ``pid`` and return how many.

        Idempotent: 0 when a watcher (or an earlier call) already reaped them.
        A live ``pid`` is left alone (returns 0) unless ``force``: then its
        entries are deleted but it keeps its slot.  Entries of a dead owner
        are already invisible to every read; reaping frees their memory.
        """
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise TypeError(f"pid must be an int, not {type(pid).__name__}")
        n = 0
        for p in self._proc_table():
            if p["pid"] != pid or (p["alive"] and not force):
                continue
            n += self._reap(p["owner"], False)[0]
            self._release(p["owner"])
        return n

    def reap_dead(self) -> int:
        """Delete every entry whose owner is dead (including owners whose pid
        is no longer known), free their process slots; return how many."""
        n = 0
        for p in self._proc_table():
            if not p["alive"]:
                n += self._reap(p["owner"], False)[0]
                self._release(p["owner"])
        return n + self._reap(0, False)[0]
