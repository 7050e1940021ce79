"""`Watcher`: reaps the entries of dead owner processes the moment they die.

Death is learned from ``pidfd_open`` + ``poll`` on Linux (instant, and works
for processes that are not our children), ``kqueue`` ``NOTE_EXIT`` on macOS,
and a periodic sweep (liveness lock / start time / zombie check) that also
purges expired entries.  One watcher per table is active: it holds the
table's lease lock; standbys wait on it and the kernel hands the lock to one
of them (EOWNERDEAD) the moment the active watcher dies.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import threading
import time
from typing import Any, Callable

from shmreg import _proc
from shmreg.errors import BackendUnavailableError
from shmreg.table import Table, backend_options
from shmreg.trust import Trust

__all__ = ["Watcher"]

log = logging.getLogger("shmreg.watcher")

OnDeath = Callable[[int, list], Any]


def log_death(pid: int, entries: list) -> None:
    """Default ``on_death``: one log line naming what the process owned."""
    shown = ", ".join(f"{k!r}={v!r}" for k, v in entries[:5])
    more = f" (+{len(entries) - 5} more)" if len(entries) > 5 else ""
    log.warning("process %d died owning %d entries: %s%s", pid, len(entries), shown, more)


class _Poller:
    """Exit notifications for arbitrary pids (not only our children)."""

    def __init__(self) -> None:
        self._kq = select.kqueue() if hasattr(select, "kqueue") else None
        self._poll = select.poll() if self._kq is None else None
        self._fds: dict[int, int] = {}       # fd -> owner (Linux)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        if self._poll is not None:
            self._poll.register(self._wake_r, select.POLLIN)

    def watch(self, pid: int, owner: int) -> bool:
        """Start watching ``pid``; False if it is already gone."""
        if self._kq is not None:
            ev = select.kevent(pid, filter=select.KQ_FILTER_PROC, flags=select.KQ_EV_ADD | select.KQ_EV_ONESHOT,
                               fflags=select.KQ_NOTE_EXIT, udata=owner)
            try:
                self._kq.control([ev], 0, 0)
            except ProcessLookupError:
                return False
            return True
        if not hasattr(os, "pidfd_open"):
            return True  # no notifications: the sweep finds the death
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        self._fds[fd] = owner
        self._poll.register(fd, select.POLLIN)
        return True

    def unwatch_fd_of(self, owner: int) -> None:
        for fd, o in list(self._fds.items()):
            if o == owner:
                self._poll.unregister(fd)
                os.close(fd)
                del self._fds[fd]

    def wait(self, timeout: float) -> list:
        """Owners whose process exited, waiting at most ``timeout`` seconds."""
        if self._kq is not None:
            evs = self._kq.control([select.kevent(self._wake_r, filter=select.KQ_FILTER_READ)], 16, timeout)
            self._drain()
            return [e.udata for e in evs if e.filter == select.KQ_FILTER_PROC]
        out = []
        for fd, _ in self._poll.poll(timeout * 1000):
            if fd == self._wake_r:
                self._drain()
            elif fd in self._fds:
                out.append(self._fds[fd])
        return out

    def wake(self) -> None:
        os.write(self._wake_w, b"x")

    def _drain(self) -> None:
        try:
            while os.read(self._wake_r, 64):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._kq is not None:
            self._kq.close()


class Watcher:
    """Watch a table's owner processes and reap each one's entries when it dies.

    :param table_or_name: a :class:`Table` or the name of an existing one.
    :param on_death: ``on_death(pid, entries)`` is called with the dead
        process's ``(key, value)`` entries *before* they are deleted
        (post-mortem: what was that worker doing?).  Default: one log line.
        Not called for a process that owned nothing any more (already
        reaped elsewhere, or exited after deleting its entries).
        Exceptions it raises are logged; the entries are reaped regardless.
    :param interval: seconds between sweeps (liveness check of every owner,
        purge of expired entries, compaction of mostly empty shards).  Deaths are noticed between sweeps too,
        as they happen.
    :param mode: with a name: the sharing accepted (see :meth:`Table.open`).
    :param trust: with a name: other users and groups whose table is
        accepted (:class:`~shmreg.Trust`).  ``on_death`` then gets their
        pickled values as opaque :class:`~shmreg.PickledValue` unless
        ``Trust(unpickle=True)``.
    :param url: with a name: the table is a Redis/Valkey one.  Run one
        watcher per host: it reaps this host's dead processes the moment
        they die (deleting their leases, so every host stops seeing their
        entries) and any host's whose leases expired; ``on_death`` runs at
        least once per death (again if the watcher running it died).
    :param lease_ttl: with ``url``: as for the table.

    >>> with Watcher("jobs"):          # active (or standby) in a daemon thread
    ...     run_the_app()
    """

    def __init__(self, table_or_name: Table | str, *, on_death: OnDeath | None = log_death,
                 interval: float = 1.0, mode: int = 0o600, trust: Trust | None = None,
                 url: str | None = None, lease_ttl: float | None = None) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.table = table_or_name if isinstance(table_or_name, Table) else \
            Table.open(table_or_name, mode=mode, trust=trust, **backend_options(url, lease_ttl))
        self.on_death = on_death
        self.interval = interval
        self.reaped_processes = 0
        self.reaped_entries = 0
        self._stop = threading.Event()
        self._active = threading.Event()
        self._thread: threading.Thread | None = None
        self._poller: _Poller | None = None

    # -- lifecycle -------------------------------------------------------------

    @property
    def active(self) -> bool:
        """True while this watcher holds the table's lease (is the one reaping)."""
        return self._active.is_set()

    def start(self) -> "Watcher":
        """Run :meth:`run_forever` in a daemon thread; returns self."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("watcher already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self.run_forever, name=f"shmreg-watcher-{self.table.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching (and give the lease to a standby, if any)."""
        self._stop.set()
        if self._poller is not None:
            self._poller.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            self._thread = None

    def wait_active(self, timeout: float | None = None) -> bool:
        """Block until this watcher is the active one (or ``timeout``)."""
        return self._active.wait(timeout)

    def __enter__(self) -> "Watcher":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run_forever(self) -> None:
        """Wait for the lease (as a standby), then watch until :meth:`stop`
        (or until the table is closed under it: then it stops quietly and
        hands the lease on)."""
        if threading.current_thread() is not threading.main_thread() and hasattr(signal, "pthread_sigmask"):
            # Process-directed signals belong to the application's threads
            # (servers like uWSGI rely on which thread takes them); Python
            # runs its handlers in the main thread regardless.
            signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            while not self._stop.is_set():
                if self.table._lease(250):
                    break
            else:
                return
        except ValueError:
            if self.table.closed:
                return   # closed while standing by
            raise
        self._active.set()
        self._poller = _Poller()
        try:
            while True:
                try:
                    self._loop()
                    break
                except BackendUnavailableError as e:
                    # A Redis/Valkey table whose server is away: keep watching.
                    log.warning("watcher of %r: %s; retrying", self.table.name, e)
                    if self._stop.wait(0.5):
                        break
        except ValueError:
            if not self.table.closed:
                raise
            log.info("table %r was closed: watcher stops", self.table.name)
        finally:
            self._active.clear()
            self._poller.close()
            self._poller = None
            # Works on a closed table: the held lease keeps the mapping.
            self.table._unlease()

    # -- work --------------------------------------------------------------------

    def sweep(self) -> int:
        """Reap every dead owner, purge expired entries and compact the
        shards that are mostly empty (:meth:`Table.compact`) now; returns
        the number of entries deleted."""
        n = 0
        for p in self.table._proc_table():
            if not p["alive"]:
                n += self._reap(p)
        # Leftovers of recycled slots - not _reap(0): an owner that died
        # since the loop above read the process table would be reaped
        # without its on_death.
        n += self.table._reap_stale()
        n += self.table.purge_expired()
        self.table._compact(False)
        return n

    def _reap(self, p: dict) -> int:
        owner = p["owner"]
        if self.on_death is not None:
            _, records = self.table._reap(owner, True, False)
            if not records:
                # Nothing left: another hook (gunicorn's child_exit, a graceful
                # exit) reaped it first.  Not a death worth reporting.
                log.debug("process %d died; its entries were already reaped", p["pid"])
            else:
                try:
                    self.on_death(p["pid"], [(k, v) for k, v, _exp, _own in records])
                except Exception:
                    log.exception("on_death callback failed for pid %d", p["pid"])
        n, _ = self.table._reap(owner, False)
        self.table._release(owner)
        self.reaped_processes += 1
        self.reaped_entries += n
        return n

    def _loop(self) -> None:
        watched: dict[int, dict] = {}
        next_sweep = 0.0
        # New owners appear without telling us: look for them often (cheap:
        # one pass over the process table), reap deaths as they are signalled.
        rescan = min(self.interval, 0.05)
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_sweep:
                self.sweep()
                next_sweep = now + self.interval
            live = {p["owner"]: p for p in self.table._proc_table()}
            for owner in list(watched):
                if owner not in live:
                    self._poller.unwatch_fd_of(owner)
                    del watched[owner]
            for owner, p in live.items():
                if owner in watched:
                    continue
                if not p["alive"]:
                    self._reap(p)
                    continue
                if not p.get("local", True):
                    continue   # another host's process: its lease tells (the sweep)
                if not self._poller.watch(p["pid"], owner):
                    self._reap(p)
                    continue
                # The pid may have been reused before we opened it: the start
                # time tells (checked after opening, so there is no race).
                if p["kind"] == "pid" and _proc.start_time(p["pid"]) != p["start_time"]:
                    self._poller.unwatch_fd_of(owner)
                    self._reap(p)
                    continue
                watched[owner] = p
            for owner in self._poller.wait(rescan):
                p = watched.pop(owner, None)
                self._poller.unwatch_fd_of(owner)
                if p is not None and not self.table._owner_alive(owner):
                    self._reap(p)
