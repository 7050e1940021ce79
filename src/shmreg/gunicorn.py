"""gunicorn integration: shared tables, a worker registry and reaping for prefork servers.

In ``gunicorn.conf.py``::

    from shmreg.gunicorn import *          # installs on_starting, post_fork, child_exit, on_exit
    from shmreg.gunicorn import CacheSpec, TableSpec, configure

    configure(
        tables={
            "myapp-counters": TableSpec(capacity=10_000),
            "myapp-scoreboard": TableSpec(capacity=1_000, memory=1 << 20),
            "myapp-pages": CacheSpec(ttl=60, capacity=50_000, memory=64 << 20),
        },
        registry="myapp-workers",   # None: no worker registry
        temporary=True,             # unlink every table when gunicorn exits
    )

In the application (any module the workers import)::

    import shmreg.gunicorn

    def handler(request):
        shmreg.gunicorn.table("myapp-counters").update_counter("requests")
        page = shmreg.gunicorn.cache("myapp-pages").get_or_set(key, render)

:func:`table`, :func:`cache` and :func:`registry` return this process's
attached object, made once per process (a forked child attaches anew), so
calling them per request costs a dict lookup.

What the hooks do (each logs through gunicorn's logger and never raises: a
failure is logged and gunicorn goes on):

- ``on_starting`` (arbiter, before any fork): opens or creates every
  configured table and the registry, so every worker attaches the same
  segments with the configured geometry.
- ``post_fork`` (in the new worker): attaches the tables and registers the
  worker in the registry under ``worker:<pid>`` (:func:`worker_key`) with
  ``{"pid", "age", "ppid", "booted_at"}``.  The registration is owned by the
  worker: it vanishes from every lookup the moment the worker dies.
- ``child_exit`` (arbiter, after it reaped a worker): deletes everything the
  dead worker owned in every configured table, the registry and the caches'
  single-flight tables, synchronously, and logs what it owned (a
  post-mortem line: ``shmreg: worker 1234 exited owning 2 entries: ...``).
- ``on_exit`` (arbiter, last): with ``temporary=True`` unlinks every table
  (a table in which another live process still holds a slot, e.g. the
  workers of a new master after a ``USR2`` upgrade, is left alone).

Your own hooks: define them after the star import and call ours, e.g.
``def post_fork(server, worker): shmreg.gunicorn.post_fork(server, worker); ...``.

Without :func:`configure`, the settings come from the environment:
``SHMREG_GUNICORN_TABLES`` (comma separated ``name[:table|cache][:key=value]...``,
e.g. ``counters,pages:cache:ttl=60:capacity=50000``),
``SHMREG_GUNICORN_REGISTRY`` (default ``workers``; empty: none) and
``SHMREG_GUNICORN_TEMPORARY`` (``1``/``true``/``yes``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Union

from shmreg import _segment
from shmreg.cache import Cache
from shmreg.errors import AlreadyRegisteredError, TableNotFoundError
from shmreg.registry import Registry
from shmreg.table import Table
from shmreg.trust import Trust

# Exactly the names gunicorn looks up as settings: a star import installs them.
__all__ = ["on_starting", "post_fork", "child_exit", "on_exit"]

_log = logging.getLogger("shmreg.gunicorn")


@dataclass(frozen=True)
class TableSpec:
    """A plain :class:`shmreg.Table` (geometry used when it is created;
    ``mode`` and ``trust`` as for :class:`shmreg.Table`)."""

    capacity: int | None = None
    memory: int | None = None
    shards: int | None = None
    mode: int = 0o600
    trust: Trust | None = None


@dataclass(frozen=True)
class CacheSpec:
    """A :class:`shmreg.Cache` (``ttl`` is its default time to live)."""

    ttl: float | None = 300.0
    capacity: int | None = None
    memory: int | None = None
    mode: int = 0o600
    trust: Trust | None = None


Spec = Union[TableSpec, CacheSpec]


@dataclass(frozen=True)
class Settings:
    """The effective configuration (see :func:`configure`)."""

    tables: Mapping[str, Spec]
    registry: str | None = "workers"
    registry_capacity: int | None = None
    temporary: bool = False
    registry_mode: int = 0o600
    registry_trust: Trust | None = None


_configured: Settings | None = None
_from_env: Settings | None = None


def _spec(name: str, spec: Any) -> Spec:
    _segment.check_name(name)
    if spec is None or spec == "table":
        return TableSpec()
    if spec == "cache":
        return CacheSpec()
    if isinstance(spec, (TableSpec, CacheSpec)):
        return spec
    raise TypeError(f"table {name!r}: expected a TableSpec, a CacheSpec, 'table', 'cache' "
                    f"or None, not {spec!r}")


def configure(tables: Mapping[str, Any] | Iterable[str] = (), *, registry: str | None = "workers",
              registry_capacity: int | None = None, temporary: bool = False,
              registry_mode: int = 0o600, registry_trust: Trust | None = None) -> Settings:
    """Set what the hooks manage; call it in ``gunicorn.conf.py``.

    :param tables: ``{name: TableSpec(...) | CacheSpec(...) | "table" |
        "cache" | None}``, or an iterable of names (plain tables, default
        geometry).
    :param registry: name of the worker registry table; ``None`` for none.
    :param registry_capacity: registrations it is sized for (default: the
        table default).
    :param temporary: unlink every table when the arbiter exits.
    :param registry_mode: ``mode`` of the registry table (see :class:`shmreg.Table`).
    :param registry_trust: :class:`shmreg.Trust` for the registry table
        (tables and caches take theirs in their spec).
    :raises ValueError, TypeError: an invalid name or spec (at config load,
        so gunicorn refuses to start instead of failing later).
    """
    global _configured
    if isinstance(tables, str):
        raise TypeError("tables must be a mapping or an iterable of names, not a str")
    items = tables.items() if isinstance(tables, Mapping) else ((n, None) for n in tables)
    specs = {name: _spec(name, spec) for name, spec in items}
    if registry is not None:
        _segment.check_name(registry)
        if registry in specs:
            raise ValueError(f"{registry!r} is both the registry and a configured table")
    _configured = Settings(specs, registry, registry_capacity, bool(temporary),
                           registry_mode, registry_trust)
    return _configured


def _parse_env_tables(text: str) -> dict:
    specs: dict[str, Spec] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, *opts = item.split(":")
        kind = "table"
        if opts and opts[0] in ("table", "cache"):
            kind = opts.pop(0)
        kw: dict[str, Any] = {}
        for opt in opts:
            key, sep, val = opt.partition("=")
            if not sep:
                raise ValueError(f"SHMREG_GUNICORN_TABLES: bad option {opt!r} in {item!r}")
            kw[key] = (None if val.lower() == "none" else float(val)) if key == "ttl" else int(val, 0)
        specs[name] = _spec(name, CacheSpec(**kw) if kind == "cache" else TableSpec(**kw))
    return specs


def settings() -> Settings:
    """The configuration in force: :func:`configure`'s, else the environment's."""
    global _from_env
    if _configured is not None:
        return _configured
    if _from_env is None:
        env = os.environ
        reg = env.get("SHMREG_GUNICORN_REGISTRY", "workers") or None
        if reg is not None:
            _segment.check_name(reg)
        _from_env = Settings(_parse_env_tables(env.get("SHMREG_GUNICORN_TABLES", "")), reg, None,
                             env.get("SHMREG_GUNICORN_TEMPORARY", "").lower() in ("1", "true", "yes"))
    return _from_env


# -- per-process attached objects ------------------------------------------------

# One object per (kind, name) per process.  The fast path is one dict lookup
# and a ``closed`` check (the helpers run on every request); a forked child
# starts empty (at-fork hook, or the pid check where there is no such hook).
_lock = threading.RLock()
_objects: dict[tuple[str, str], Any] = {}
_objects_pid = os.getpid()
_HAS_AT_FORK = hasattr(os, "register_at_fork")


def _reset_after_fork() -> None:
    global _lock, _objects_pid
    _lock = threading.RLock()          # the parent's may have been held by another thread
    _objects.clear()                   # the child attaches its own objects
    _objects_pid = os.getpid()


if _HAS_AT_FORK:
    os.register_at_fork(after_in_child=_reset_after_fork)


def _closed(obj: Any) -> bool:
    return (obj.table if isinstance(obj, (Cache, Registry)) else obj).closed


def _attach(kind: str, name: str, make: Any) -> Any:
    if not _HAS_AT_FORK and _objects_pid != os.getpid():
        _reset_after_fork()
    with _lock:
        obj = _objects.get((kind, name))
        if obj is None or _closed(obj):
            obj = _objects[(kind, name)] = make()  # noqa: SHM101 - per-process handles on shared tables
        return obj


def _make_table(name: str) -> Table:
    spec = settings().tables.get(name)
    if spec is None:
        return Table(name)
    return Table(name, capacity=spec.capacity, memory=spec.memory, shards=spec.shards, mode=spec.mode,
                 trust=spec.trust)


def table(name: str) -> Table:
    """This process's :class:`~shmreg.Table` ``name`` (for a configured cache:
    the cache's table), opened or created once per process with the
    configured geometry."""
    t = _objects.get(("table", name))
    if t is not None and not t.closed and _HAS_AT_FORK:
        return t
    if isinstance(settings().tables.get(name), CacheSpec):
        return _attach("table", name, lambda: cache(name).table)
    return _attach("table", name, lambda: _make_table(name))


def _make_cache(name: str) -> Cache:
    spec = settings().tables.get(name)
    if spec is None:
        return Cache(name)
    if isinstance(spec, TableSpec):
        raise ValueError(f"{name!r} is configured as a table, not a cache")
    return Cache(name, ttl=spec.ttl, capacity=spec.capacity, memory=spec.memory, mode=spec.mode,
                 trust=spec.trust)


def cache(name: str) -> Cache:
    """This process's :class:`~shmreg.Cache` ``name``, opened or created once
    per process with the configured ttl and geometry.

    :raises ValueError: ``name`` is configured as a plain table.
    """
    c = _objects.get(("cache", name))
    if c is not None and not c.table.closed and _HAS_AT_FORK:
        return c
    return _attach("cache", name, lambda: _make_cache(name))


def registry() -> Registry:
    """This process's worker :class:`~shmreg.Registry`.

    :raises RuntimeError: no registry is configured.
    """
    s = settings()
    if s.registry is None:
        raise RuntimeError("no registry configured (configure(registry=None))")
    return _attach("registry", s.registry, lambda: Registry(
        s.registry, capacity=s.registry_capacity, mode=s.registry_mode, trust=s.registry_trust))


def worker_key(pid: int | None = None) -> str:
    """Registry key of the worker ``pid`` (default: this process)."""
    return f"worker:{os.getpid() if pid is None else pid}"


def _all_tables() -> list:
    """(label, Table) of everything the hooks manage, in this process."""
    s = settings()
    out = []
    for name, spec in s.tables.items():
        if isinstance(spec, CacheSpec):
            c = cache(name)
            out.append((name, c.table))
            out.append((c._flights_name(), c._flight_table()))
        else:
            out.append((name, table(name)))
    if s.registry is not None:
        out.append((s.registry, registry().table))
    return out


def _logger(server: Any) -> Any:
    return getattr(server, "log", None) or _log


# -- hooks ---------------------------------------------------------------------


def on_starting(server: Any) -> None:
    """Arbiter, before the first fork: open or create every table."""
    log = _logger(server)
    try:
        s = settings()
    except Exception:
        log.exception("shmreg: invalid configuration; no shared tables")
        return
    names = list(s.tables) + ([s.registry] if s.registry else [])
    existing = set(_segment.list_tables())
    for name in names:
        try:
            if name == s.registry:
                t = registry().table
            elif isinstance(s.tables[name], CacheSpec):
                c = cache(name)
                c._flight_table()   # created now: every worker attaches the same one
                t = c.table
            else:
                t = table(name)
            log.info("shmreg: %s table %r (%d entries, capacity %d)",
                     "opened" if name in existing else "created", name, len(t), t.capacity)
        except Exception:
            log.exception("shmreg: cannot open or create table %r", name)


def post_fork(server: Any, worker: Any) -> None:
    """Worker, after fork: attach the tables, register the worker."""
    log = _logger(server)
    pid = os.getpid()
    try:
        s = settings()
        for name in s.tables:
            try:
                (cache if isinstance(s.tables[name], CacheSpec) else table)(name)
            except Exception:
                log.exception("shmreg: worker %d cannot attach table %r", pid, name)
        if s.registry is None:
            return
        value = {"pid": pid, "age": getattr(worker, "age", None), "ppid": getattr(worker, "ppid", None),
                 "booted_at": time.time()}
        try:
            registry().register(worker_key(pid), value)
        except AlreadyRegisteredError as e:
            log.warning("shmreg: %r is already registered by live pid %s", worker_key(pid), e.pid)
    except Exception:
        log.exception("shmreg: post_fork failed in worker %d", pid)


def _reap_pid(t: Table, pid: int) -> tuple[int, list]:
    """Delete what the dead process ``pid`` owned in ``t``; (count, [(key, value)])."""
    n = 0
    records: list = []
    for p in t._proc_table():
        if p["pid"] != pid or p["alive"]:
            continue
        count, recs = t._reap(p["owner"], True)
        n += count
        records.extend((k, v) for k, v, _exp, _own in recs)
        t._release(p["owner"])
    return n, records


def child_exit(server: Any, worker: Any) -> None:
    """Arbiter, after a worker exited: reap it in every table, log a post-mortem."""
    log = _logger(server)
    pid = getattr(worker, "pid", None)
    try:
        if not isinstance(pid, int):
            return
        total = 0
        parts = []
        for name, t in _all_tables():
            try:
                n, records = _reap_pid(t, pid)
            except Exception:
                log.exception("shmreg: cannot reap worker %d in table %r", pid, name)
                continue
            total += n
            if records:
                shown = ", ".join(f"{k!r}={v!r}" for k, v in records[:5])
                more = f" (+{len(records) - 5} more)" if len(records) > 5 else ""
                parts.append(f"{name!r}: {shown}{more}")
        log.info("shmreg: worker %d exited owning %d %s%s", pid, total,
                 "entry" if total == 1 else "entries", (": " + "; ".join(parts)) if parts else "")
    except Exception:
        log.exception("shmreg: child_exit failed for worker %s", pid)


def on_exit(server: Any) -> None:
    """Arbiter, last: unlink the tables if ``temporary``."""
    log = _logger(server)
    try:
        s = settings()
        if not s.temporary:
            return
        if getattr(server, "reexec_pid", 0):
            log.info("shmreg: a new master (pid %s) runs on: tables kept", server.reexec_pid)
            return
        me = os.getpid()
        for name, t in _all_tables():
            try:
                others = sorted({p["pid"] for p in t._proc_table() if p["alive"] and p["pid"] != me})
                if others:
                    log.warning("shmreg: not unlinking %r: live processes %s hold slots in it",
                                name, others)
                    continue
                t.unlink()
                log.info("shmreg: unlinked table %r", name)
            except TableNotFoundError:
                pass
            except Exception:
                log.exception("shmreg: cannot unlink table %r", name)
        with _lock:
            for obj in _objects.values():
                try:
                    obj.close()
                except Exception:
                    pass
            _objects.clear()
    except Exception:
        log.exception("shmreg: on_exit failed")
