"""`Table`: the dict-like, ETS-style surface over the Cython core."""

from __future__ import annotations

import contextlib
import inspect
from abc import ABCMeta
import os
import secrets
import warnings
import weakref
from typing import Any, Callable, Iterator

from shmreg import _core, _segment
from shmreg._surface import TableSurface
from shmreg.errors import (ConfigMismatchError, ConfigMismatchWarning, CorruptTableError,
                           TableExistsError, TableNotFoundError)
from shmreg.trust import Trust, check_mode, check_trust

__all__ = ["Table", "DEFAULT_CAPACITY", "default_memory", "unlink", "list_tables", "temporary"]

#: Entries a pre-sized table holds when only ``memory`` is given.
DEFAULT_CAPACITY = 65_536

#: The smallest memory limit of a table made without sizes.
MIN_DEFAULT_MEMORY = 64 << 20


def default_limits(directory: str | None = None) -> tuple[int, int]:
    """``(capacity, memory)`` limits of a table made without sizes: half of
    the filesystem holding the segments (at least 64 MiB, at most what 64
    shards address), and one entry per 64 bytes of that.  The table starts
    small and grows towards them; only what it uses is allocated."""
    try:
        st = os.statvfs(directory or _segment.segment_dir())
        fs = st.f_blocks * st.f_frsize
    except OSError:
        fs = 0
    memory = min(max(MIN_DEFAULT_MEMORY, fs // 2), 64 * 0xFFFFF000)
    return memory // 64, memory


def default_memory(capacity: int) -> int:
    """Item bytes reserved when ``memory`` is not given: 256 bytes per entry,
    at least 16 MiB (so a 64 KiB value always fits a default table)."""
    return max(16 << 20, 256 * capacity)


_live_tables: "weakref.WeakSet[Table]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # Read counters and the owner slot are per process: a forked child starts
    # its own (its entries must not live on through the parent's slot).  The
    # core resets its mappings itself; this is also the entry point for
    # servers that fork from C (uWSGI), where no at-fork hook runs.
    for t in list(_live_tables):
        t._hits = t._misses = t._read_retries = t._lock_fallbacks = 0
    _core._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def backend_options(url: str | None, lease_ttl: float | None = None) -> dict:
    """The keyword options that select a table's backend, for the layers that
    open tables on a caller's behalf (Registry, Cache, Watcher): none for
    the local one, ``url`` (and ``lease_ttl``) for Redis/Valkey."""
    if url is None:
        if lease_ttl is not None:
            raise ValueError("lease_ttl applies to a Redis/Valkey table (url=...)")
        return {}
    return {"url": url} if lease_ttl is None else {"url": url, "lease_ttl": lease_ttl}


def _reopen(name: str, mode: int, trust: Trust | None) -> "Table":
    # How a pickled Table comes back in a spawn/forkserver child.
    return Table.open(name, mode=mode, trust=trust)




class Table(TableSurface, _core.CoreTable, metaclass=ABCMeta):
    """A hash table in shared memory, attached by name from any process of
    this user on this host.

    ``Table(name)`` opens the table, creating it if missing;
    :meth:`create` insists on a new one and :meth:`open` on an existing one.
    ``Table(name)`` with no sizes starts small (well under a megabyte) and
    grows as entries arrive, shard by shard, without blocking readers or
    remapping, up to half the filesystem holding it; only what it uses is
    allocated.  ``capacity``/``memory`` are limits: given, the table is
    pre-sized to them (``grow=True``: it starts small and grows to them),
    and never grows past them.  :meth:`compact` gives memory back after mass
    deletes.  Limits are fixed at creation; opening an existing table keeps
    them and warns (:class:`ConfigMismatchWarning`) about options that
    differ.

    Keys are ``str``, ``bytes`` or ``int`` (the type is part of the key:
    ``1`` and ``"1"`` differ; a subclass counts as its base type, as in a
    dict: ``True`` is the key ``1``, and keys read back as the base type).
    Values are ``bytes``, ``str``, ``int``, ``float``, ``bool``, ``None``
    natively and anything picklable through
    pickle; they read back equal and of the same type.

    Concurrency: single-key operations are atomic and isolated in every
    process; reads never take a lock; a traversal (``keys()``, ``items()``,
    ``select()``) is consistent shard by shard, not one snapshot.

    :param capacity: most entries the table holds (default: a limit from the
        filesystem's size, see :func:`default_limits`; with ``memory`` only:
        65,536).  Beyond it, a write raises :class:`TableFullError` (a
        ``Cache`` evicts).
    :param memory: most bytes of keys and values (default: see
        :func:`default_limits`; with ``capacity`` only: ``default_memory``).
    :param grow: start small and grow to the limits (default: only when
        neither ``capacity`` nor ``memory`` is given; else pre-sized).  A
        full filesystem during growth raises :class:`NoSpaceError` and
        leaves the table intact.
    :param shards: power of two, default chosen from capacity and memory.
    :param mode: file mode of the segment when this call creates it, and the
        sharing this call accepts when it opens one (default ``0o600``: this
        user only; ``0o660``: also your group; ``0o666``: every user).
    :param trust: other users and groups whose tables you accept (see
        :class:`~shmreg.Trust`); default: none.  A segment that is not a
        regular file, is owned by someone else, or is writable beyond
        ``mode`` raises :class:`~shmreg.UntrustedTableError`.  Pickled
        values of a table others can write come back as opaque
        :class:`~shmreg.PickledValue` unless ``Trust(unpickle=True)``.
    :param clock: for tests: a callable returning monotonic seconds, used
        for TTLs instead of ``CLOCK_MONOTONIC``.
    :param url: a Redis/Valkey URL: the table lives on that server (or
        Cluster) instead, shared across hosts, with the same surface; see
        :class:`shmreg.backends.redis.RedisTable` and ``docs/redis.md``.
    :param strict: an existing table whose geometry differs from an explicit
        ``capacity``/``memory``/``shards`` raises :class:`ConfigMismatchError`
        instead of warning (:class:`ConfigMismatchWarning`, the default).

    >>> with Table("doc-example", capacity=1000) as t:
    ...     t["a"] = 1
    ...     t.update_counter("a", 5)
    ...     t.unlink()
    6
    """

    def __new__(cls, name: str, *args: Any, url: str | None = None, **options: Any) -> "Table":
        # ``url=`` selects the Redis/Valkey backend: the same surface
        # (TableSurface) over RedisCore, registered as a virtual subclass
        # so isinstance(t, Table) holds for both.
        if url is not None:
            from shmreg.backends.redis import RedisTable
            return RedisTable(name, *args, url=url, **options)  # type: ignore[return-value]
        return super().__new__(cls)

    def __init__(self, name: str, *, capacity: int | None = None, memory: int | None = None,
                 shards: int | None = None, grow: bool | None = None, mode: int = 0o600,
                 trust: Trust | None = None,
                 clock: Callable[[], float] | None = None, strict: bool = False,
                 _how: str = "auto", _clock_bits: bool = False) -> None:
        self.name = _segment.check_name(name)
        #: The sharing accepted at open (and the mode given at creation).
        self.mode = check_mode(mode)
        #: The :class:`~shmreg.Trust` this table was opened with (None: nobody else).
        self.trust = trust
        checked = check_trust(trust)
        if capacity is not None and (not isinstance(capacity, int) or isinstance(capacity, bool)):
            raise TypeError("capacity must be an int")
        if memory is not None and (not isinstance(memory, int) or isinstance(memory, bool)):
            raise TypeError("memory must be an int")
        if clock is not None and not callable(clock):
            raise TypeError("clock must be callable")
        while True:
            if _how in ("auto", "open"):
                try:
                    fd, unpickle = _segment.open_fd(name, mode=mode, trust=checked)
                except TableNotFoundError:
                    if _how == "open":
                        raise
                else:
                    try:
                        self._attach(fd, clock)
                    finally:
                        os.close(fd)
                    self.allow_pickle = unpickle
                    break
            if capacity is None and memory is None:
                cap, mem = default_limits()
            else:
                cap = DEFAULT_CAPACITY if capacity is None else capacity
                mem = default_memory(cap) if memory is None else memory
            grows = (capacity is None and memory is None) if grow is None else bool(grow)
            plan = _core.plan_layout(cap, mem, shards, grows)
            try:
                _segment.create(name, plan, mode, _clock_bits)
            except TableExistsError:
                if _how == "create":
                    raise
                continue  # lost a creation race: open the winner's table
            _how = "open"
        _live_tables.add(self)
        _check_config(self, capacity, memory, shards, _clock_bits, strict)

    @classmethod
    def create(cls, name: str, **options: Any) -> "Table":
        """Create a new table; :raises TableExistsError: the name is taken."""
        return cls(name, _how="create", **options)

    @classmethod
    def open(cls, name: str, *, mode: int = 0o600, trust: Trust | None = None,
             clock: Callable[[], float] | None = None, **options: Any) -> "Table":
        """Open an existing table (``mode`` and ``trust`` as for :class:`Table`;
        ``url=`` a Redis/Valkey one, which must hold entries or a marker).

        :raises TableNotFoundError: there is none.
        :raises UntrustedTableError: its segment is not one to trust.
        """
        return cls(name, mode=mode, trust=trust, clock=clock, _how="open", **options)

    @staticmethod
    def temporary(label: str = "", **options: Any) -> "contextlib.AbstractContextManager[Table]":
        """A new table that is unlinked (and closed) when the ``with`` block
        exits, however it exits; see :func:`temporary`."""
        return temporary(label, **options)

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Unmap the table from this process (idempotent; does not unlink)."""
        self._close()

    def unlink(self) -> None:
        """Remove the table's name; attached processes keep working until they close."""
        unlink(self.name, trust=self.trust)

    def __enter__(self) -> "Table":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self):
        # Pickled for a spawn/forkserver child: the child attaches by name.
        return (_reopen, (self.name, self.mode, self.trust))

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self)} entries"
        return f"<shmreg.Table {self.name!r} {state}>"

    @property
    def path(self) -> str:
        """Filesystem path of the segment."""
        return _segment.path_of(self.name)

    @property
    def capacity(self) -> int:
        """The most entries the table holds (its limit, fixed at creation)."""
        return self._header()["capacity"]

    @property
    def memory(self) -> int:
        """The most bytes of keys and values the table holds (its limit, spread
        evenly over the shards; fixed at creation)."""
        return self._header()["memory"]

    # -- introspection ---------------------------------------------------------

    def compact(self, *, force: bool = False) -> int:
        """Give memory back after deletes: shrink each index that is under a
        quarter full, move the entries at the end of each arena that is at
        least half free into the holes below, and return the freed pages to
        the filesystem.  Shard by shard, each under its own lock; readers
        never block.  ``force``: every shard, however full.  A watcher's
        sweep compacts the mostly empty shards by itself.  Returns the bytes
        given back."""
        return self._compact(force)

    def stats(self) -> dict:
        """Geometry, usage and counters.

        Shared counters (sets, deletes, repairs ...) are kept by writers under
        their shard lock and are exact.  ``reads_hit``/``reads_missed`` count
        the reads of every process, sampled: a reader adds 64 once per 64 of
        its own hits (misses), so each process contributes up to 63 less than
        it did.  ``hits``, ``misses``, ``read_retries`` and
        ``lock_fallbacks`` are this process's, exact.

        Memory: ``bytes_used`` is what live items take, ``arena_allocated``
        the item memory allocated for them, ``bytes_allocated`` what the
        segment holds in the filesystem (items, indexes, header),
        ``bytes_reserved`` the address space reserved for the table at its
        limits (the file's size, sparse).  ``growth_events`` /
        ``shrink_events`` count index and arena steps up and down.
        """
        h = self._header()
        s = self._shard_stats()
        arena_total = h["arena_size"] * h["nshards"]
        try:
            allocated = os.stat(self.path).st_blocks * 512
        except (OSError, AttributeError):
            allocated = None
        return {
            "name": self.name,
            "entries": len(self),
            "capacity": h["capacity"],
            "memory": h["memory"],
            "segment_bytes": h["total_size"] if allocated is None else allocated,
            "shards": h["nshards"],
            "grows": h["grows"],
            "index_slots": s["index_slots"],
            "max_index_slots": h["slots_per_shard"] * h["nshards"],
            "bytes_used": s["bytes_used"],
            "bytes_free": arena_total - s["bytes_used"],
            "bytes_allocated": allocated,
            "bytes_reserved": h["total_size"],
            "arena_allocated": s["arena_allocated"],
            "max_item_bytes": h["arena_size"],
            "growth_events": s["grows"],
            "shrink_events": s["shrinks"],
            "compaction_moves": s["moves"],
            "nospace_errors": s["nospace"],
            "tombstones": s["tombstones"],
            "with_ttl": s["with_ttl"],
            "owned": s["owned"],
            "owner_processes": sum(1 for p in self._proc_table() if p["alive"]),
            "watcher_pid": self._lease_holder(),
            "sets": s["sets"],
            "deletes": s["deletes"],
            "repairs": s["repairs"],
            "index_rebuilds": s["index_rebuilds"],
            "coalesces": s["coalesces"],
            "full_errors": s["full"],
            "evictions": s["evictions"],
            "expirations": s["expirations"],
            "reads_hit": s["sampled_hits"],
            "reads_missed": s["sampled_misses"],
            "hits": self._hits,
            "misses": self._misses,
            "read_retries": self._read_retries,
            "lock_fallbacks": self._lock_fallbacks,
            "creator_pid": h["creator_pid"],
            "layout": h["layout"],
        }

    def check(self, *, repair: bool = False) -> list | None:
        """Verify every invariant of every shard (each under its lock): index
        <-> items, allocator accounting and free lists, every derived count,
        no odd seq without a lock holder, and every lock word sane.

        A lock word that names a thread which does not exist (or is not a
        valid robust mutex) is corruption: reported within about a second,
        never waited on forever.  With ``repair=True`` such locks are first
        reinitialised and what they guarded repaired (a lock held by a live
        thread, even a stopped one, is never touched); the names of the
        repaired locks are returned (None without ``repair``).

        :raises CorruptTableError: naming the first broken invariant.
        """
        repaired = self._repair_locks() if repair else []
        problems = self._lock_problems()
        if problems:
            raise CorruptTableError(problems[0] + "; `shmreg check --repair` "
                                    "(Table.check(repair=True)) reinitialises it")
        for si in range(self.nshards):
            msg = self._check_shard(si)
            if msg:
                raise CorruptTableError(msg)
        return repaired if repair else None


def _documented_signature() -> "inspect.Signature":
    # Table(name, ...) as users call it: __init__'s options plus url= (which
    # __new__ takes to pick the backend), not __new__'s (*args, **options).
    sig = inspect.signature(Table.__init__)
    params = [p for p in sig.parameters.values() if p.name != "self" and not p.name.startswith("_")]
    url = inspect.Parameter("url", inspect.Parameter.KEYWORD_ONLY, default=None,
                            annotation="str | None")
    return sig.replace(parameters=[*params, url], return_annotation=inspect.Signature.empty)


Table.__signature__ = _documented_signature()  # type: ignore[attr-defined]


def _check_config(t: Table, capacity: int | None, memory: int | None, shards: int | None,
                  clock_bits: bool, strict: bool) -> None:
    """Warn (or raise, if ``strict``) when an existing table's geometry is not
    what the caller asked for: its creator's options win, silently otherwise."""
    h = t._header()
    wrong = []
    for what, asked, actual in (("capacity", capacity, h["capacity"]), ("memory", memory, h["memory"]),
                                ("shards", shards, h["nshards"])):
        if asked is not None and asked != actual:
            wrong.append(f"{what} {actual:,} (asked for {asked:,})")
    if clock_bits and not h["clock_bits"]:
        wrong.append("no eviction (created as a plain Table: a Cache on it raises "
                     "TableFullError when full instead of evicting)")
    if not wrong:
        return
    msg = (f"table {t.name!r} already exists with {'; '.join(wrong)}: the existing table's "
           f"geometry is kept (created by pid {h['creator_pid']}); to apply yours, remove it "
           f"first (`shmreg destroy {t.name}` or shmreg.unlink({t.name!r})) and open it again")
    if strict:
        t.close()
        raise ConfigMismatchError(msg)
    warnings.warn(ConfigMismatchWarning(msg), stacklevel=3)


TEMP_PREFIX = "tmp-"


def temporary_name(label: str = "") -> str:
    """A fresh name for a temporary table: ``tmp-<pid>-<start time>-<random>[-label]``.
    The creator's pid and start time let ``shmreg ls``/``shmreg clean`` tell
    the orphans of dead creators."""
    from shmreg._proc import start_time

    pid = os.getpid()
    name = f"{TEMP_PREFIX}{pid}-{start_time(pid) or 0}-{secrets.token_hex(4)}"
    return _segment.check_name(f"{name}-{label}" if label else name)


def temporary_creator(name: str) -> tuple[int, int] | None:
    """``(pid, start_time)`` of the process that created temporary table
    ``name``, or None if ``name`` is not a temporary table's."""
    if not name.startswith(TEMP_PREFIX):
        return None
    parts = name[len(TEMP_PREFIX):].split("-", 3)
    if len(parts) < 3 or not (parts[0].isdigit() and parts[1].isdigit()) or len(parts[2]) != 8:
        return None
    return int(parts[0]), int(parts[1])


def temporary_orphaned(name: str) -> bool:
    """True if ``name`` is a temporary table whose creator process is gone."""
    from shmreg._proc import is_alive

    creator = temporary_creator(name)
    return creator is not None and not is_alive(creator[0], creator[1] or None)


@contextlib.contextmanager
def temporary(label: str = "", **options: Any) -> Iterator[Table]:
    """A new table, unlinked (and closed) when the ``with`` block exits.

    Tables persist until they are unlinked: a script that crashes before its
    ``unlink()`` leaves its table behind.  A temporary table is named
    ``tmp-<pid>-<start time>-<random>[-label]``, so if its creator dies
    before the block exits (``SIGKILL``), ``shmreg ls`` marks it an orphan
    and ``shmreg clean`` removes it.  Other processes attach by ``t.name``.

    :param label: appended to the name (letters, digits, ``_.-``).
    :param options: ``capacity``, ``memory``, ``shards``, ``mode``, ``trust`` ... as for
        :class:`Table`.

    >>> with shmreg.temporary("batch", capacity=1000) as t:
    ...     t["done"] = 0
    ...     t.name.startswith("tmp-")
    True
    """
    t = Table.create(temporary_name(label), **options)
    try:
        yield t
    finally:
        try:
            t.unlink()
        except TableNotFoundError:
            pass
        t.close()


def unlink(name: str, *, trust: Trust | None = None) -> None:
    """Remove table ``name`` (see :meth:`Table.unlink`).

    :raises TableNotFoundError: no such table.
    :raises UntrustedTableError: the file is another user's, not named in ``trust``.
    """
    _segment.unlink(name, trust=check_trust(trust))
    # A closed table kept mapped only for this process's liveness lock can
    # go now that nobody new can attach.
    _core._release_unlinked()


def list_tables(*, all_users: bool = False) -> list:
    """Names of your tables on this host (segment files owned by your
    effective uid), sorted; with ``all_users``, every user's (including
    files at a table's name that are not tables)."""
    return _segment.list_tables(all_users=all_users)
