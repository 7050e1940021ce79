"""The shmreg exception tree.

Every error raised by shmreg derives from :class:`Error`; where a Python user
would naturally catch a builtin (``FileExistsError``, ``ValueError`` ...), the
shmreg class mixes that builtin in, so both ``except shmreg.Error`` and the
builtin work.
"""

from __future__ import annotations

__all__ = [
    "Error",
    "TableExistsError",
    "TableNotFoundError",
    "TableFullError",
    "ValueTooLargeError",
    "IncompatibleTableError",
    "CorruptTableError",
    "NoSpaceError",
    "AlreadyRegisteredError",
    "ConfigMismatchError",
    "ConfigMismatchWarning",
    "UntrustedTableError",
]


class Error(Exception):
    """Root of every shmreg error."""


class TableExistsError(Error, FileExistsError):
    """``Table.create`` found a table of that name already."""


class TableNotFoundError(Error, FileNotFoundError):
    """``Table.open`` found no table of that name."""


class TableFullError(Error):
    """No room for another entry (index slots or item memory) and nothing evictable."""


class ValueTooLargeError(Error, ValueError):
    """An item (key + value) larger than one shard's memory can ever hold."""


class IncompatibleTableError(Error):
    """The segment is not a shmreg table, not initialised, or of another layout version."""


class CorruptTableError(Error):
    """An invariant of the shared segment does not hold (see ``Table.check``)."""


class NoSpaceError(Error, OSError):
    """The shared-memory filesystem has no room for a new table of that size."""


class UntrustedTableError(Error, PermissionError):
    """The segment file of a table is not one this process agrees to use:
    not a regular file, owned by another user, or writable by others when
    no shared mode was asked for (see :class:`shmreg.Trust`).  The message
    names the file, its owner, its mode and the fix; ``.owner_uid`` and
    ``.mode`` hold the last two."""

    owner_uid: int | None = None
    mode: int | None = None

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class AlreadyRegisteredError(Error):
    """A live process already holds the key in a Registry; ``.pid`` names it."""

    def __init__(self, key, pid):
        super().__init__(f"{key!r} is already registered by pid {pid}")
        self.key = key
        self.pid = pid


class ConfigMismatchError(Error, ValueError):
    """An existing table's geometry or options differ from the ones asked for
    (raised instead of :class:`ConfigMismatchWarning` when asked: ``strict=True``)."""


class ConfigMismatchWarning(UserWarning):
    """An existing table was opened with options (capacity, memory, shards,
    eviction) other than the ones it was created with: the creator's win."""


class BackendUnavailableError(Error, ConnectionError):
    """The server behind a Redis/Valkey table cannot be reached (down,
    restarting, connection killed, timed out).  Whether a write that raised
    this was applied is unknown; writes that returned were acknowledged."""


class AccessDeniedError(Error, PermissionError):
    """The Redis/Valkey server refused this user: a wrong password or user
    name (``WRONGPASS``), or an ACL that does not let it run a command the
    table needs (``NOPERM``).  Not an outage: retrying will not help."""


class LeaseLostError(Error):
    """An owned write of a Redis/Valkey table was refused: this process's
    lease expired (it was paused or cut off longer than ``lease_ttl``), so it
    no longer owns anything and its entries were dropped (fencing).  The next
    owned write takes a new lease."""


class EvictionPolicyWarning(UserWarning):
    """The Redis/Valkey server may evict keys (``maxmemory-policy`` is not
    ``noeviction``): entries, leases and index could vanish silently."""
