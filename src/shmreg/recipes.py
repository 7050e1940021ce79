"""Recipes: small patterns every multi-process service ends up writing,
built on one shared :class:`~shmreg.Table`.

* :func:`emit_once` / :class:`Deduper` - do something at most once per key
  per time window across all workers (alerts, log lines, webhooks).
* :class:`Counters` + :class:`Flusher` - workers count into the table, one
  flusher reports and resets the totals every interval; an increment that
  races with a flush lands in this flush or the next, never nowhere.
* :class:`Scoreboard` - what each worker is doing right now (an owned row
  per process, a stack of spans), a status page, and a post-mortem of a
  worker that died mid-request.
* :class:`Flags` - feature flags every worker sees on its next read, and
  :func:`flags_command` behind the ``shmreg flag`` command.

Each recipe takes a table and a key ``prefix`` (so several recipes, or
several instances, can share one table); recipe keys are ``str``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from typing import Any, Callable, Iterator

from shmreg._core import MISSING
from shmreg.table import Table
from shmreg.trust import Trust

__all__ = [
    "emit_once", "Deduper",
    "Counters", "Flusher",
    "Scoreboard",
    "Flags", "flags_command", "parse_bool",
]

log = logging.getLogger("shmreg.recipes")


def _key(prefix: str, name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"recipe keys are str, not {type(name).__name__}")
    return prefix + name


def _check_table(table: Any) -> Table:
    if not isinstance(table, Table):
        raise TypeError(f"expected a shmreg.Table, not {type(table).__name__}")
    return table


# -- 1. dedupe ---------------------------------------------------------------------


def emit_once(table: Table, key: str, window: float, *, prefix: str = "once:") -> bool:
    """True for exactly one caller, in any process, per ``key`` per ``window``
    seconds; False for every other caller until the window is over.

    The window starts at the winning call (an ``insert_new`` of a marker with
    ``ttl=window``); the first call after it expires wins the next window.
    Expired markers are replaced in place by the next winner; markers of keys
    never seen again are freed by a :class:`~shmreg.Watcher` sweep or
    ``table.purge_expired()``.  TTLs follow the table's clock (``clock=``).

    >>> if emit_once(t, f"disk-full:{host}", window=300):
    ...     alert(f"{host}: disk full")      # once per 5 minutes, fleet-wide
    """
    if not window > 0:
        raise ValueError("window must be > 0 seconds")
    return table.insert_new(_key(prefix, key), os.getpid(), ttl=float(window))


class Deduper:
    """:func:`emit_once` with the table, window and prefix bound.

    :param table: the shared table.
    :param window: seconds during which a key fires at most once.
    :param prefix: key prefix of the markers (default ``"once:"``).

    >>> once = Deduper(t, window=60)
    >>> once("payment-failed:42")       # first caller on the host in this minute
    True
    >>> once("payment-failed:42")
    False
    >>> once.remaining("payment-failed:42") <= 60
    True
    """

    def __init__(self, table: Table, window: float, *, prefix: str = "once:") -> None:
        if not window > 0:
            raise ValueError("window must be > 0 seconds")
        self.table = _check_table(table)
        self.window = float(window)
        self.prefix = prefix

    def __call__(self, key: str) -> bool:
        """True if this caller won ``key``'s current window (see :func:`emit_once`)."""
        return self.table.insert_new(_key(self.prefix, key), os.getpid(), ttl=self.window)

    first = __call__

    def remaining(self, key: str) -> float:
        """Seconds until ``key`` can fire again (0.0 if it can now; ``inf``
        if its marker was stored without a TTL by other means)."""
        try:
            left = self.table.ttl(_key(self.prefix, key))
        except KeyError:
            return 0.0
        return math.inf if left is None else max(0.0, left)

    def reset(self, key: str) -> bool:
        """End ``key``'s window now (the next call fires); True if one was open."""
        return self.table.delete(_key(self.prefix, key))


# -- 2. batched counters ---------------------------------------------------------------


class Counters:
    """Named counters that workers increment and one flusher drains.

    Increments are ``update_counter`` calls (atomic, exact, lock-free for
    everyone else).  :meth:`flush` *takes* each counter (atomic read and
    delete) and reports what it took: an increment that lands after the take
    re-creates the counter from 0 and is reported by the next flush, so
    ``sum(all reports) + pending()`` is always exactly the number of
    increments.  Several flushers at once are safe too (each take is
    disjoint).  If ``report`` raises, what was taken is added back.

    The one loss window: a flusher process killed between its take and the
    end of ``report`` loses that batch (at-most-once reporting).

    :param table: the shared table.
    :param prefix: key prefix of the counters (default ``"count:"``).

    >>> counters = Counters(t)
    >>> counters.incr("requests")
    1
    >>> counters.incr("bytes", 512)
    512
    >>> sent = []
    >>> counters.flush(sent.append) == {"requests": 1, "bytes": 512} == sent[0]
    True
    >>> counters.pending()
    {}
    """

    def __init__(self, table: Table, *, prefix: str = "count:") -> None:
        self.table = _check_table(table)
        self.prefix = prefix

    def incr(self, name: str, n: int = 1) -> int:
        """Add ``n`` to counter ``name``; returns its unflushed total."""
        return self.table.update_counter(_key(self.prefix, name), n)

    def pending(self) -> dict[str, int]:
        """Unflushed totals (a snapshot, shard by shard; not a reset)."""
        cut = len(self.prefix)
        return {k[cut:]: v for k, v in self.table.select(self.prefix)
                if isinstance(v, int) and not isinstance(v, bool)}

    def flush(self, report: Callable[[dict[str, int]], Any] | None = None) -> dict[str, int]:
        """Take every counter, call ``report(totals)`` (skipped when nothing
        was counted) and return the totals.  Counters that were zero are
        removed but not reported.  If ``report`` raises, the totals are added
        back (nothing lost, reported again next time) and the exception
        propagates."""
        cut = len(self.prefix)
        taken: dict[str, int] = {}
        for key in [k for k, v in self.table.select(self.prefix)
                    if isinstance(v, int) and not isinstance(v, bool)]:
            value = self.table.take(key, None)
            if value is None:
                continue  # taken by a concurrent flusher
            if not isinstance(value, int) or isinstance(value, bool):
                self.table.set(key, value)  # not ours to count
                continue
            if value:
                taken[key[cut:]] = taken.get(key[cut:], 0) + value
        if taken and report is not None:
            try:
                report(dict(taken))
            except BaseException:
                self.restore(taken)
                raise
        return taken

    def restore(self, totals: dict[str, int]) -> None:
        """Add ``totals`` back (undo a flush whose report could not be delivered)."""
        for name, value in totals.items():
            self.table.update_counter(_key(self.prefix, name), value)


class Flusher:
    """A daemon thread that calls ``counters.flush(report)`` every
    ``interval`` seconds, and once more on :meth:`stop`.

    A failing ``report`` is logged (``shmreg.recipes`` logger) and its totals
    stay in the table for the next round.  Run one per host (e.g. in the
    gunicorn arbiter or a sidecar); more are safe, just pointless.

    >>> def to_statsd(totals):
    ...     for name, n in totals.items():
    ...         statsd.incr(name, n)
    >>> with Flusher(Counters(t), to_statsd, interval=10):
    ...     serve_forever()
    """

    def __init__(self, counters: Counters, report: Callable[[dict[str, int]], Any], *,
                 interval: float = 10.0) -> None:
        if not interval > 0:
            raise ValueError("interval must be > 0 seconds")
        self.counters = counters
        self.report = report
        self.interval = float(interval)
        self.flushes = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def flush(self) -> dict[str, int]:
        """Flush now (in the calling thread); errors are logged, not raised."""
        try:
            totals = self.counters.flush(self.report)
        except Exception:
            self.errors += 1
            log.exception("counter flush failed; totals kept for the next one")
            return {}
        self.flushes += 1
        return totals

    def start(self) -> "Flusher":
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("flusher already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="shmreg-flusher", daemon=True)
        self._thread.start()
        return self

    def stop(self, *, final_flush: bool = True, timeout: float = 10.0) -> None:
        """Stop the thread, then flush once more (unless ``final_flush=False``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if final_flush:
            self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def __enter__(self) -> "Flusher":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- 3. scoreboard ------------------------------------------------------------------


class Scoreboard:
    """What every worker is doing, for a status page and for post-mortems.

    Each process publishes one row, an entry *owned* by it under
    ``prefix + str(pid)``: its stack of open spans (name and start time,
    Unix seconds) and whatever ``info`` it published.  When the process dies
    the row disappears from :meth:`rows` at once, however it died; a
    :class:`~shmreg.Watcher` with ``on_death=scoreboard.post_mortem()``
    first reports what it was doing.

    Spans are per process (threads of one worker share the stack; a span is
    removed by identity, so interleaved threads do not pop each other's).  A
    ``fork`` child starts with an empty row (no spans, no info) of its own.

    >>> board = Scoreboard(t)
    >>> board.publish(role="web")
    >>> with board.span("GET /report"):
    ...     with board.span("db.query"):
    ...         board.rows()[0]["stack"]
    ['GET /report', 'db.query']
    >>> with Watcher(t, on_death=board.post_mortem()):   # logs "worker 123 died in: GET /x > db.query"
    ...     serve_forever()
    """

    def __init__(self, table: Table, *, prefix: str = "scoreboard:") -> None:
        self.table = _check_table(table)
        self.prefix = prefix
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._spans: list[list] = []
        self._info: dict[str, Any] = {}

    def _mine(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's spans are not ours
            self._pid, self._spans, self._info = os.getpid(), [], {}

    def _write(self) -> None:
        row = {"pid": self._pid, "spans": [tuple(s) for s in self._spans],
               "info": dict(self._info), "updated": time.time()}
        self.table.set(_key(self.prefix, str(self._pid)), row, owned=True)

    def publish(self, **info: Any) -> None:
        """Merge ``info`` (picklable values) into this process's row and
        write it (creating the row on first use)."""
        with self._lock:
            self._mine()
            self._info.update(info)
            self._write()

    @contextlib.contextmanager
    def span(self, name: str, **info: Any) -> Iterator[None]:
        """Push ``name`` on this process's stack for the ``with`` block (two
        owned writes: one on entry, one on exit).  ``info`` is merged into the
        row as with :meth:`publish`."""
        entry = [str(name), time.time()]
        with self._lock:
            self._mine()
            self._spans.append(entry)
            self._info.update(info)
            self._write()
        try:
            yield
        finally:
            with self._lock:
                self._mine()
                for i in range(len(self._spans) - 1, -1, -1):
                    if self._spans[i] is entry:
                        del self._spans[i]
                        break
                self._write()

    def stack(self) -> list[str]:
        """Names of this process's open spans, outermost first."""
        with self._lock:
            self._mine()
            return [s[0] for s in self._spans]

    def withdraw(self) -> bool:
        """Delete this process's row (e.g. at a graceful shutdown)."""
        with self._lock:
            self._mine()
            self._spans, self._info = [], {}
            return self.table.delete(_key(self.prefix, str(self._pid)))

    @staticmethod
    def _row(value: Any) -> dict | None:
        if not isinstance(value, dict) or "pid" not in value:
            return None
        row = dict(value)
        row["stack"] = [s[0] for s in row.get("spans", ())]
        return row

    def rows(self) -> list[dict]:
        """Rows of the live processes, by pid: ``{"pid", "stack" (span
        names), "spans" ((name, started) pairs), "info", "updated"}``."""
        out = [r for _, v in self.table.select(self.prefix) if (r := self._row(v)) is not None]
        return sorted(out, key=lambda r: r["pid"])

    def row(self, pid: int) -> dict | None:
        """The row of live process ``pid``, or None."""
        return self._row(self.table.get(_key(self.prefix, str(pid))))

    def post_mortem(self, handler: Callable[[int, dict], Any] | None = None
                    ) -> Callable[[int, list], None]:
        """An ``on_death`` callback for a :class:`~shmreg.Watcher` on this
        table: calls ``handler(pid, row)`` with the dead process's last row
        (what it was doing when it died; ``row["stack"]``), before the row is
        reaped.  Default handler: one warning on the ``shmreg.recipes``
        logger.  Processes without a row are ignored."""
        handler = handler or _log_post_mortem
        key = self.prefix

        def on_death(pid: int, entries: list) -> None:
            for k, v in entries:
                if k == key + str(pid) and (row := self._row(v)) is not None:
                    handler(pid, row)
        return on_death


def _log_post_mortem(pid: int, row: dict) -> None:
    doing = " > ".join(row["stack"]) or "(idle)"
    log.warning("worker %d died in: %s %s", pid, doing, row.get("info") or "")


# -- 4. feature flags -----------------------------------------------------------------

_TRUE = {"1", "true", "on", "yes", "enable", "enabled"}
_FALSE = {"0", "false", "off", "no", "disable", "disabled"}


def parse_bool(text: str) -> bool:
    """``on/off``, ``true/false``, ``yes/no``, ``1/0``, ``enable(d)/disable(d)``
    (any case) to a bool.  :raises ValueError: anything else."""
    t = str(text).strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError(f"not a boolean: {text!r} (use on/off, true/false, yes/no, 1/0)")


class Flags:
    """Feature flags in a shared table: a flip is seen by every worker on its
    next read (no cache, no restart; a read is one lock-free lookup).

    A flag is a ``bool`` stored under ``prefix + name``; an unset flag reads
    as the ``default`` given to :meth:`enabled`.  A value stored by other
    means (``shmreg set TABLE flag:x on`` stores a ``str``) is understood
    too: strings through :func:`parse_bool`, numbers by truth.

    >>> flags = Flags(t)
    >>> flags.enabled("new-ui")
    False
    >>> flags.set("new-ui", True)       # every worker, on its next read
    >>> flags.enabled("new-ui")
    True
    >>> flags.all()
    {'new-ui': True}
    """

    def __init__(self, table: Table, *, prefix: str = "flag:") -> None:
        self.table = _check_table(table)
        self.prefix = prefix

    def enabled(self, name: str, default: bool = False) -> bool:
        """Is flag ``name`` on?  ``default`` when unset or unreadable."""
        return _as_flag(self.table.get(_key(self.prefix, name), MISSING), default)

    __getitem__ = enabled

    def set(self, name: str, on: bool = True) -> None:
        """Turn flag ``name`` on or off for every process."""
        if not isinstance(on, bool):
            raise TypeError(f"a flag is a bool, not {type(on).__name__}")
        self.table.set(_key(self.prefix, name), on)

    def enable(self, name: str) -> None:
        self.set(name, True)

    def disable(self, name: str) -> None:
        self.set(name, False)

    def unset(self, name: str) -> bool:
        """Forget flag ``name`` (reads fall back to their default); True if it was set."""
        return self.table.delete(_key(self.prefix, name))

    def all(self) -> dict[str, bool]:
        """Every set flag, by name."""
        cut = len(self.prefix)
        pairs = sorted(self.table.select(self.prefix), key=lambda kv: kv[0])
        return {k[cut:]: _as_flag(v, False) for k, v in pairs}


def _as_flag(value: Any, default: bool) -> bool:
    if value is MISSING:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, (str, bytes)):
        try:
            return parse_bool(value.decode() if isinstance(value, bytes) else value)
        except (ValueError, UnicodeDecodeError):
            return default
    if isinstance(value, (int, float)):
        return bool(value)
    return default


def flags_command(table_name: str, name: str | None = None, value: str | bool | None = None, *,
                  prefix: str = "flag:", mode: int = 0o600, trust: Trust | None = None,
                  url: str | None = None) -> dict[str, bool]:
    """What a ``shmreg flag TABLE [NAME [on|off|unset]]`` command does:
    with ``value``, set (or ``"unset"``) flag ``name``; return the flags
    (all, or just ``name``).  Opens the table, never creates it.

    ``mode``, ``trust`` and ``url`` (a Redis/Valkey table): as for :meth:`Table.open`.

    :raises TableNotFoundError: no table ``table_name``.
    :raises ValueError: ``value`` is not a boolean word (see :func:`parse_bool`).

    >>> flags_command("app", "new-ui", "on")
    {'new-ui': True}
    >>> flags_command("app")
    {'new-ui': True, 'dark-mode': False}
    """
    if value is not None and name is None:
        raise ValueError("a value needs a flag name")
    with Table.open(table_name, mode=mode, trust=trust, **({"url": url} if url else {})) as t:
        flags = Flags(t, prefix=prefix)
        if name is None:
            return flags.all()
        if isinstance(value, str) and value.strip().lower() == "unset":
            flags.unset(name)
        elif value is not None:
            flags.set(name, value if isinstance(value, bool) else parse_bool(value))
        k = _key(prefix, name)
        current = t.get(k, MISSING)
        return {} if current is MISSING else {name: _as_flag(current, False)}
