"""The near cache: hot entries of a Redis/Valkey cache kept in a local
shmreg table shared by every worker of the host (``Cache(name, url=...,
near=True)``).

How it stays coherent (the full argument is in ``docs/near-cache.md``):

- One *agent* per host (a thread in one of the workers, elected through an
  owned entry of a small local control table) holds a RESP3 ``CLIENT
  TRACKING ON BCAST PREFIX`` connection to the master of the table's slot
  and deletes each invalidated key from the near table
  (:mod:`shmreg.backends.redis.near_agent`).
- Every near entry is *owned by the agent process*: if it dies, every
  entry vanishes for every reader at once (the local engine's owner check
  on each read), so a hit needs one local read and nothing else.
- While the agent is not sure it sees every invalidation it keeps the
  near table empty and the ``ready`` control entry absent; readers then go
  to the server and do not fill.
- A fill inserts a unique *placeholder* first, reads the server, and swaps
  the value in with compare-and-swap: an invalidation that arrives between
  the two deletes the placeholder and the swap fails, so a fill never
  installs a value a write overtook.  Local writes go to the server and
  then drop the local copy.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
from typing import Any, Iterator

from shmreg._core import MISSING
from shmreg.backends.redis import codec
from shmreg.errors import TableFullError, TableNotFoundError

__all__ = ["NearTable", "near_status"]

#: Every placeholder starts with these bytes; a server value that starts with
#: them is served but never installed, so no installed value looks like one.
MAGIC = b"\x00shmreg-near-fill\x00"
_PH = struct.Struct("<Id")
#: A placeholder older than this (its filler died mid-fill) is deleted by
#: the next reader that meets it.
FILL_TIMEOUT = 5.0
_OWNER_MASK = 0xFFFFFFFF
#: Seconds a near copy expires before the server's copy.
TTL_MARGIN = 0.025


def near_names(name: str, url: str) -> tuple[str, str]:
    """Local names of the near table and its control table for cache
    ``name`` on ``url`` (the URL's digest keeps two servers' caches apart)."""
    digest = hashlib.blake2b(url.encode(), digest_size=4).hexdigest()
    base = f"{name}--near-{digest}"
    return base, base + "-ctl"


class NearTable:
    """A Redis/Valkey table seen through this host's near cache.

    Made by :class:`~shmreg.Cache` for ``near=True``; has the table methods
    the cache uses.  Reads try the local near table first; misses read the
    server and fill; writes go to the server and drop the local copy.
    Everything else is the Redis table's (attribute access falls through).

    :param table: the :class:`~shmreg.backends.redis.RedisTable`.
    :param capacity: entry limit of the local near table (default: the
        local engine's).
    :param memory: byte limit of the local near table (default: the local
        engine's).
    """

    def __init__(self, table: Any, *, capacity: int | None = None,
                 memory: int | None = None) -> None:
        from shmreg.table import Table

        self._t = table
        self.near_name, self.ctl_name = near_names(table.name, table.url)
        self.near = Table(self.near_name, capacity=capacity, memory=memory, mode=table.mode,
                          trust=table.trust)
        self.ctl = Table(self.ctl_name, mode=table.mode, trust=table.trust)
        self._cget = self.ctl.get
        # get(key, default=None): the hit path, a closure (see _hot_get).
        self.get = _hot_get(self.near.get, self._miss)
        self._placeholders_seen = 0  # near-table hits that were placeholders (misses)
        self.near_misses = 0     # reads that went to the server
        self.near_fills = 0      # values this process installed
        self.near_bypassed = 0   # misses served while the near cache was off
        self.near_full = 0       # fills skipped: the near table was full
        self._agent: Any = None
        self._agent_pid = 0
        self._guard = threading.Lock()
        # Stand as a candidate at once (a forked child starts its own
        # candidate on its first miss).
        self._ensure_candidate()

    # -- the candidate/agent thread of this process ---------------------------------

    def _ensure_candidate(self) -> None:
        if self._agent_pid != os.getpid():
            from shmreg.backends.redis.near_agent import Agent

            with self._guard:
                if self._agent_pid != os.getpid():
                    self._guard = threading.Lock()   # (a forked child's copy may be held)
                    self._agent = Agent(self)
                    self._agent.start()
                    self._agent_pid = os.getpid()

    def start(self) -> "NearTable":
        """Stand as a candidate for this host's agent (done when the cache is
        opened, and in a forked child on its first miss)."""
        self._ensure_candidate()
        return self

    # -- reads ---------------------------------------------------------------------

    @property
    def near_hits(self) -> int:
        """Reads of this process served by the near table (the local
        table's own C hit counter, less the placeholders it met)."""
        return self.near._hits - self._placeholders_seen

    def __getitem__(self, key: Any) -> Any:
        v = self.get(key, MISSING)
        if v is MISSING:
            raise KeyError(key)
        return v

    def __contains__(self, key: Any) -> bool:
        return self.get(key, MISSING) is not MISSING

    def _miss(self, key: Any, default: Any, seen: Any) -> Any:
        self.near_misses += 1
        self._ensure_candidate()
        if seen is not MISSING:           # somebody's placeholder
            self._placeholders_seen += 1
            _clear_stale_placeholder(self.near, key, seen)
            return self._t.get(key, default)
        ready = self._cget("ready")
        if ready is None:                 # no agent, or tracking not established
            self.near_bypassed += 1
            return self._t.get(key, default)
        ph = MAGIC + _PH.pack(os.getpid(), time.time()) + os.urandom(8)
        try:
            mine = self.near._insert_new_for(key, ph, ready & _OWNER_MASK)
        except TableFullError:
            self.near_full += 1
            mine = False
        t0 = time.monotonic()
        r = self._t._read(key)            # [stored, owner token, pttl] of the server
        if r is None:
            if mine:
                self.near.delete(key)
            return default
        stored, owner, pttl = r
        value = self._t._decode(stored)
        if mine:
            self._install(key, ph, value, stored, owner, pttl, t0, ready)
        return value

    def _install(self, key: Any, ph: bytes, value: Any, stored: bytes, owner: Any, pttl: Any,
                 t0: float, ready: int) -> None:
        near = self.near
        if owner or (stored[:1] == b"\x05" and stored[1:].startswith(MAGIC)):
            near.delete(key)              # owned (lease-bound) entries stay on the server
            return
        if isinstance(pttl, int) and pttl >= 0:
            # The local copy expires no later than the server's: its ttl
            # counts from before the read was sent, less a margin for the
            # server's cached clock (it may run a few ms behind).
            left = pttl / 1000 - (time.monotonic() - t0) - TTL_MARGIN
            if left <= 0 or not near.expire(key, left):
                near.delete(key)
                return
        try:
            swapped = near._cas_raw(key, codec.VT_BYTES, ph, value)
        except TableFullError:
            self.near_full += 1
            swapped = False
        if not swapped:
            # An invalidation deleted the placeholder (or another filler's
            # replaced it): leave whatever is there now.
            return
        if self._cget("ready") != ready:
            # Tracking went down (or another agent took over) during the
            # fill: this value may already be behind a write nobody saw.
            near.delete(key)
            return
        self.near_fills += 1

    # -- writes: to the server, then drop the local copy ----------------------------

    def _drop(self, key: Any) -> None:
        try:
            self.near.delete(key)
        except TypeError:
            pass    # a key the server refused too

    def clear(self) -> None:
        """Delete every entry on the server, then every local copy."""
        try:
            self._t.clear()
        finally:
            self.near.clear()

    def __setitem__(self, key: Any, value: Any) -> None:
        try:
            self._t[key] = value
        finally:
            self._drop(key)

    def __delitem__(self, key: Any) -> None:
        try:
            del self._t[key]
        finally:
            self._drop(key)

    def __len__(self) -> int:
        return len(self._t)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._t)

    def __getattr__(self, name: str) -> Any:
        # Everything not redefined here is the server table's.  Write
        # methods are wrapped once (below); reads the cache layer does not
        # use go straight to the server.
        return getattr(self._t, name)

    # -- counters the Cache reads (hits are near hits plus server hits) -------------

    @property
    def _hits(self) -> int:
        return self.near_hits + self._t._hits

    @_hits.setter
    def _hits(self, n: int) -> None:
        self._t._hits = n - self.near_hits

    @property
    def _misses(self) -> int:
        return self._t._misses

    @_misses.setter
    def _misses(self, n: int) -> None:
        self._t._misses = n

    # -- lifecycle and stats ----------------------------------------------------------

    def close(self) -> None:
        """Stop this process's agent thread (giving the role up), close the
        local tables and the server table."""
        agent, self._agent = self._agent, None
        if agent is not None and self._agent_pid == os.getpid():
            agent.stop()
        self._agent_pid = 0
        self.near.close()
        self.ctl.close()
        self._t.close()

    def unlink(self) -> None:
        """Delete the table on the server and this host's near tables."""
        from shmreg.table import unlink

        self._t.unlink()
        self.near.clear()
        for n in (self.near_name, self.ctl_name):
            try:
                unlink(n)
            except TableNotFoundError:
                pass

    def near_stats(self) -> dict:
        """Near-cache counters: this process's hits, misses, fills, bypassed
        reads; the host's invalidations, flushes, agent pid and state."""
        st = near_status_of(self.ctl)
        return {
            "near_hits": self.near_hits,
            "near_misses": self.near_misses,
            "near_fills": self.near_fills,
            "near_bypassed": self.near_bypassed,
            "near_full": self.near_full,
            "near_entries": len(self.near),
            **st,
        }

    def stats(self) -> dict:
        """The server table's :meth:`~shmreg.backends.redis.RedisTable.stats`
        plus :meth:`near_stats`."""
        return {**self._t.stats(), **self.near_stats()}

    def __repr__(self) -> str:
        return f"<shmreg near cache of {self._t!r}>"


def _hot_get(nget: Any, miss: Any) -> Any:
    # The hit path as a closure over the near table's C ``get`` (no
    # attribute lookups, no Python counter: the C table counts the hits).
    def get(key: Any, default: Any = None, _missing: Any = MISSING, _bytes: Any = bytes,
            _magic: bytes = MAGIC) -> Any:
        """The value of ``key``: from the near table if it holds it, else from
        the server (filling the near table when the agent is ready)."""
        v: Any = nget(key, _missing)
        if v is not _missing and (v.__class__ is not _bytes or not v.startswith(_magic)):
            return v
        return miss(key, default, v)
    return get


def _wrap_write(name: str) -> Any:
    def write(self: NearTable, key: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._t, name)(key, *args, **kwargs)
        finally:
            self._drop(key)
    write.__name__ = name
    write.__doc__ = f"The server table's ``{name}``, then drop the local copy of ``key``."
    return write


for _name in ("set", "insert_new", "setdefault", "delete", "take", "pop", "update_counter",
              "expire", "compare_and_swap", "_cache_put", "_cas_raw", "_insert_new_for",
              "_delete_owned"):
    setattr(NearTable, _name, _wrap_write(_name))


def _clear_stale_placeholder(near: Any, key: Any, ph: Any) -> None:
    try:
        pid, t = _PH.unpack_from(ph, len(MAGIC))
    except struct.error:
        near.delete(key)
        return
    if time.time() - t > FILL_TIMEOUT:
        # Its filler died (or hung) mid-fill: without this the key could
        # never be filled again while the agent lives.
        near.delete(key)


STATES = {0: "no agent", 1: "down", 2: "ready"}


def near_status_of(ctl: Any) -> dict:
    """The host-wide near-cache state in control table ``ctl``."""
    reg = ctl._registration("agent")
    ready = ctl.get("ready")
    state = "ready" if ready is not None else ("down" if reg is not None else "no agent")
    return {
        "near_state": state,
        "near_agent_pid": reg.pid if reg is not None else None,
        "near_epoch": (ready >> 32) if ready is not None else ctl.get("epoch", 0),
        "near_invalidations": ctl.get("invalidations", 0),
        "near_flushes": ctl.get("flushes", 0),
        "near_last_doubt": ctl.get("last_doubt"),
        "near_heartbeats": ctl.get("heartbeats", 0),
    }


def near_status(name: str, url: str) -> dict | None:
    """This host's near-cache state of cache ``name`` on ``url`` (None if no
    process of this host has used it)."""
    from shmreg.table import Table

    try:
        with Table.open(near_names(name, url)[1]) as ctl:
            return near_status_of(ctl)
    except TableNotFoundError:
        return None


def near_table(table: Any, near: Any) -> NearTable:
    """``table`` behind a near cache, for ``Cache(..., near=...)``.

    :raises ValueError: ``table`` is not on a Redis/Valkey server, or
        ``near`` is neither True nor a dict of ``capacity``/``memory``.
    """
    if getattr(table, "url", None) is None or not hasattr(table, "_kp"):
        table.close()
        raise ValueError("near=True needs url=: a near cache sits in front of a Redis/Valkey "
                         "server (a local Cache is near already)")
    if near is True:
        return NearTable(table)
    if isinstance(near, dict) and set(near) <= {"capacity", "memory"}:
        return NearTable(table, **near)
    table.close()
    raise ValueError(f"near must be True or a dict with 'capacity'/'memory', not {near!r}")


#: ``(metric name, type, near_status key, help)`` of the Prometheus text.
NEAR_METRICS: tuple = (
    ("shmreg_near_ready", "gauge", "near_state",
     "1 if this host's near cache serves (tracking established), else 0."),
    ("shmreg_near_epoch", "counter", "near_epoch",
     "Times this host's agent (re)established tracking."),
    ("shmreg_near_invalidations_total", "counter", "near_invalidations",
     "Keys this host's agent evicted on the server's invalidations."),
    ("shmreg_near_flushes_total", "counter", "near_flushes",
     "Times this host's near table was emptied in doubt (connection lost, late heartbeat...)."),
    ("shmreg_near_heartbeats_total", "counter", "near_heartbeats",
     "Heartbeat round trips of this host's agent."),
)


def host_near_status(table: Any) -> dict:
    """This host's near-cache status of Redis table ``table`` (``{}`` if it
    is a local table, or no process of this host used a near cache on it)."""
    url = getattr(table, "url", None)
    if url is None:
        return {}
    return near_status(table.name, url) or {}


def near_prometheus_text(table: Any) -> str:
    """This host's near-cache metrics of ``table`` in the Prometheus text
    format (labelled ``table=NAME``), or ``""`` when it has none."""
    st = host_near_status(table)
    if not st:
        return ""
    label = table.name.replace("\\", "\\\\").replace('"', '\\"')
    lines = []
    for name, kind, key, help_ in NEAR_METRICS:
        v = st[key]
        v = int(v == "ready") if key == "near_state" else int(v or 0)
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f'{name}{{table="{label}"}} {v}']
    return "\n".join(lines) + "\n"
