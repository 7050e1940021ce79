"""`Registry`: Elixir-Registry / ETS-style process registration over a table.

A registration is an entry owned by a process.  It vanishes when that process
dies, however it dies, with or without a watcher running: a lookup checks the
owner's liveness (for a process that registered itself, one load of its
liveness mutex, no syscall).
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from shmreg import _proc
from shmreg._core import MISSING, Registration
from shmreg.errors import AlreadyRegisteredError
from shmreg.table import Table, backend_options
from shmreg.trust import Trust

__all__ = ["Registry", "Registration"]


class Registry:
    """Unique-key process registry shared by every process on the host.

    :param name: table name (the registry's own table; opened or created).
    :param capacity: registrations it is sized for (when it creates the table).
    :param memory: item bytes (when it creates the table).
    :param mode: file mode when it creates the table, the sharing accepted
        when it opens one (default ``0o600``); see :class:`~shmreg.Table`.
    :param trust: other users and groups whose table it accepts
        (:class:`~shmreg.Trust`; default none).
    :param url: a Redis/Valkey URL: the registry lives on that server,
        shared by every host (a registration lasts as long as its process's
        lease there; see ``docs/redis.md``).
    :param lease_ttl: with ``url``: seconds a registering process stays
        registered without a heartbeat.

    >>> reg = Registry("doc-workers", capacity=1000)
    >>> reg.register("worker:1", {"port": 8001})
    >>> reg.whereis("worker:1") == os.getpid()
    True
    >>> reg.table.unlink()
    """

    def __init__(self, name: str, *, capacity: int | None = None, memory: int | None = None,
                 mode: int = 0o600, trust: Trust | None = None, url: str | None = None,
                 lease_ttl: float | None = None) -> None:
        self.table = Table(name, capacity=capacity, memory=memory, mode=mode, trust=trust,
                           **backend_options(url, lease_ttl))
        # The two hot reads go straight to the C implementation (no Python
        # frame in between); the methods below document them.
        self.lookup = self.table._registration  # type: ignore[method-assign]
        self.whereis = self.table._whereis  # type: ignore[method-assign]

    def close(self) -> None:
        """Close the underlying table (registrations stay: they belong to processes)."""
        self.table.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<shmreg.Registry {self.table.name!r}>"

    def _owner_for(self, pid: int | None) -> int:
        if pid is None or pid == os.getpid():
            return self.table._self_owner()
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise TypeError(f"pid must be an int, not {type(pid).__name__}")
        start = _proc.start_time(pid)
        if start is None or not _proc.is_alive(pid, start):
            raise ProcessLookupError(f"no live process with pid {pid}")
        return self.table._claim(pid, start, False)

    def register(self, key: Any, value: Any = None, *, pid: int | None = None) -> None:
        """Register ``key`` for the calling process (or the live process ``pid``).

        A key held by a dead process is taken over silently.

        :raises AlreadyRegisteredError: a live process holds ``key`` (the
            caller included); ``.pid`` names it.
        :raises ProcessLookupError: ``pid`` is not a live process.
        """
        owner = self._owner_for(pid)
        while True:
            if self.table._insert_new_for(key, value, owner):
                return
            held = self.table._get_owned(key, MISSING)
            if held is MISSING:
                continue  # released between our insert and our look: try again
            raise AlreadyRegisteredError(key, self.table._owner_pid(held[1]) if held[1] else None)

    def lookup(self, key: Any) -> Registration | None:
        """The live registration of ``key``, or None.  Never returns a
        registration whose owner is dead; costs no syscall when the owner
        registered itself."""
        return self.table._registration(key)

    def whereis(self, key: Any) -> int | None:
        """Pid of the live process registered under ``key``, or None."""
        return self.table._whereis(key)

    def unregister(self, key: Any) -> bool:
        """Remove the calling process's registration of ``key``; True if it
        had one (another process's registration is left alone)."""
        owner = self.table._self_owner_id
        return bool(owner) and self.table._delete_owned(key, owner)

    def keys(self, pid: int | None = None) -> list:
        """Keys registered by ``pid`` (default: the calling process)."""
        return [k for k, _ in self.table.select(owner=os.getpid() if pid is None else pid)]

    def count(self) -> int:
        """Number of live registrations."""
        return len(self.table)

    def items(self) -> list:
        """All live ``(key, Registration)`` pairs."""
        return list(self._items())

    def _items(self) -> Iterator[tuple]:
        pids = {p["owner"]: p["pid"] for p in self.table._proc_table()}
        for si in range(self.table.nshards):
            for key, value, _exp, owner in self.table._shard_entries(si, 4):
                if owner in pids:
                    yield key, Registration(pids[owner], value)
