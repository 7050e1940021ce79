"""Celery integration: shared tables, a pool-process registry and reaping for
``celery worker --pool=prefork``.

In the module that defines the Celery app::

    from celery import Celery
    import shmreg.celery
    from shmreg.gunicorn import CacheSpec, TableSpec

    app = Celery("tasks", broker=...)
    shmreg.celery.configure(
        app,
        tables={"jobs": TableSpec(capacity=10_000), "pages": CacheSpec(ttl=60)},
        registry="celery-pool",     # None: no registry
    )

    @app.task
    def count(n):
        return shmreg.celery.table("jobs").update_counter("done", n)

What the signal handlers do (each logs and never raises, so a shmreg
problem cannot stop the worker):

- ``worker_init`` (the main worker process, before the pool starts): opens
  or creates every table, so every pool process attaches the same segments
  with the configured geometry, and starts one :class:`~shmreg.Watcher`
  per table in a thread.  The watchers are what reaps a pool process that
  died (Celery replaces pool processes after ``max_tasks_per_child``, a
  crash or a SIGKILL, and tells nobody): they learn of the death from the
  kernel (``pidfd``/``kqueue``), delete what it owned and log a post-mortem.
- ``worker_process_init`` (each pool process, after fork): attaches the
  tables and registers the process as ``pool:<pid>`` with
  ``{"pid", "ppid", "hostname", "started"}``, an entry the process owns, so
  it vanishes from every lookup the moment the process dies.
- ``worker_process_shutdown`` (a pool process exiting cleanly): unregisters.
- ``worker_shutdown`` (main process, last): stops the watchers; with
  ``temporary=True`` unlinks the tables no other live process uses.

:func:`table`, :func:`cache` and :func:`registry` return this process's
attached object, made once per process, so tasks can call them per task.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from celery import signals  # the real Celery: absolute imports never see this module

from shmreg import _segment
from shmreg.cache import Cache
from shmreg.errors import AlreadyRegisteredError, TableNotFoundError
from shmreg.gunicorn import CacheSpec, TableSpec
from shmreg.registry import Registry
from shmreg.table import Table
from shmreg.watcher import Watcher

__all__ = ["configure", "settings", "table", "cache", "registry", "pool_key", "watchers",
           "Settings", "TableSpec", "CacheSpec"]

_log = logging.getLogger("shmreg.celery")


@dataclass(frozen=True)
class Settings:
    """The effective configuration (see :func:`configure`)."""

    tables: Mapping[str, Any]
    registry: Optional[str] = "celery-pool"
    watch: bool = True
    temporary: bool = False


_settings: Optional[Settings] = None
_connected = False
_lock = threading.RLock()
_objects: dict = {}
_watchers: list = []


def _spec(name: str, spec: Any) -> Any:
    _segment.check_name(name)
    if spec is None or spec == "table":
        return TableSpec()
    if spec == "cache":
        return CacheSpec()
    if isinstance(spec, (TableSpec, CacheSpec)):
        return spec
    raise TypeError(f"table {name!r}: expected a TableSpec, a CacheSpec, 'table', 'cache' "
                    f"or None, not {spec!r}")


def configure(app: Any = None, tables: Mapping[str, Any] | Iterable[str] = (), *,
              registry: Optional[str] = "celery-pool", watch: bool = True,
              temporary: bool = False) -> Settings:
    """Set the tables the pool processes share and connect the signal handlers.

    :param app: the Celery app (only checked; Celery's worker signals are
        global, so handlers apply to the worker that runs in this process).
    :param tables: ``{name: TableSpec(...) | CacheSpec(...) | "table" |
        "cache" | None}``, or an iterable of names (plain tables).
    :param registry: name of the pool-process registry table; ``None``: none.
    :param watch: run a :class:`~shmreg.Watcher` per table in the main
        worker process (reaps dead pool processes at once).  Without it the
        entries of a dead process are still invisible to every read; their
        memory is freed by whoever reaps later.
    :param temporary: unlink the tables when the worker shuts down.
    :raises TypeError, ValueError: a bad name or spec (at import, so the
        worker refuses to start instead of failing later).
    """
    global _settings, _connected
    if app is not None and not hasattr(app, "tasks"):
        raise TypeError(f"app must be a Celery app, not {type(app).__name__}")
    if isinstance(tables, str):
        raise TypeError("tables must be a mapping or an iterable of names, not a str")
    items = tables.items() if isinstance(tables, Mapping) else ((n, None) for n in tables)
    specs = {name: _spec(name, spec) for name, spec in items}
    if registry is not None:
        _segment.check_name(registry)
        if registry in specs:
            raise ValueError(f"{registry!r} is both the registry and a configured table")
    with _lock:
        _settings = Settings(specs, registry, bool(watch), bool(temporary))
        if not _connected:
            signals.worker_init.connect(_on_worker_init, weak=False)
            signals.worker_process_init.connect(_on_process_init, weak=False)
            signals.worker_process_shutdown.connect(_on_process_shutdown, weak=False)
            signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)
            _connected = True
    return _settings


def settings() -> Settings:
    """The configuration in force.  :raises RuntimeError: not configured."""
    if _settings is None:
        raise RuntimeError("shmreg.celery.configure() has not been called")
    return _settings


# -- per-process objects ---------------------------------------------------------


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.RLock()
    _objects.clear()      # the pool process attaches its own objects
    _watchers.clear()     # the parent's watcher threads do not exist here


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _attach(kind: str, name: str, make: Any) -> Any:
    obj = _objects.get((kind, name))
    if obj is not None:
        return obj
    with _lock:
        obj = _objects.get((kind, name))
        if obj is None:
            obj = _objects[(kind, name)] = make()  # noqa: SHM101 - per-process handles on shared tables
        return obj


def table(name: str) -> Table:
    """This process's :class:`~shmreg.Table` ``name`` (for a configured cache:
    the cache's table), opened or created once per process."""
    spec = _settings.tables.get(name) if _settings is not None else None
    if isinstance(spec, CacheSpec):
        return cache(name).table
    return _attach("table", name, lambda: Table(name, capacity=getattr(spec, "capacity", None),
                                                 memory=getattr(spec, "memory", None),
                                                 shards=getattr(spec, "shards", None),
                                                 mode=getattr(spec, "mode", 0o600)))


def cache(name: str) -> Cache:
    """This process's :class:`~shmreg.Cache` ``name``, made once per process.

    :raises ValueError: ``name`` is configured as a plain table."""
    spec = _settings.tables.get(name) if _settings is not None else None
    if isinstance(spec, TableSpec):
        raise ValueError(f"{name!r} is configured as a table, not a cache")
    spec = spec or CacheSpec()
    return _attach("cache", name, lambda: Cache(name, ttl=spec.ttl, capacity=spec.capacity,
                                                memory=spec.memory))


def registry() -> Registry:
    """This process's pool-process :class:`~shmreg.Registry`.

    :raises RuntimeError: not configured, or configured with ``registry=None``."""
    s = settings()
    if s.registry is None:
        raise RuntimeError("no registry configured (configure(registry=None))")
    return _attach("registry", s.registry, lambda: Registry(s.registry))


def pool_key(pid: Optional[int] = None) -> str:
    """Registry key of the pool process ``pid`` (default: this process)."""
    return f"pool:{os.getpid() if pid is None else pid}"


def watchers() -> list:
    """The :class:`~shmreg.Watcher` objects running in this (main worker) process."""
    return list(_watchers)


def _all_tables() -> list:
    s = settings()
    out = []
    for name, spec in s.tables.items():
        if isinstance(spec, CacheSpec):
            c = cache(name)
            out.append(c.table)
            out.append(c._flight_table())
        else:
            out.append(table(name))
    if s.registry is not None:
        out.append(registry().table)
    return out


def _post_mortem(table_name: str):
    def on_death(pid: int, entries: list) -> None:
        shown = ", ".join(f"{k!r}={v!r}" for k, v in entries[:5])
        more = f" (+{len(entries) - 5} more)" if len(entries) > 5 else ""
        # A recycled pool process that owned nothing is routine; one that
        # died owning entries (in the middle of something) is a post-mortem.
        _log.log(logging.WARNING if entries else logging.INFO,
                 "shmreg: pool process %d died owning %d entries in %r%s%s", pid, len(entries),
                 table_name, (": " + shown) if shown else "", more)
        _fold_prometheus(table_name, pid)
    return on_death


def _fold_prometheus(table_name: str, pid: int) -> None:
    # If this table holds shmreg.prometheus metrics, fold the dead process's
    # min/max/mostrecent gauges now rather than at the next scrape.
    import sys

    sp = sys.modules.get("shmreg.prometheus")
    if sp is None:
        return
    t = sp.enabled()
    if t is not None and t.name == table_name:
        try:
            sp.mark_process_dead(pid, t, reap=False)   # the watcher reaps
        except Exception:
            _log.exception("shmreg: cannot fold the metrics of pool process %d", pid)


# -- signal handlers ---------------------------------------------------------------


def _on_worker_init(sender: Any = None, **kwargs: Any) -> None:
    try:
        tables = _all_tables()
    except Exception:
        _log.exception("shmreg: cannot open the configured tables")
        return
    try:
        import shmreg.prometheus as sp  # noqa: F401  (only if prometheus_client is there)
        metrics = sp.enabled()
    except ImportError:
        metrics = None
    if metrics is not None and all(t.name != metrics.name for t in tables):
        tables.append(metrics)
    if not settings().watch:
        return
    for t in tables:
        try:
            _watchers.append(Watcher(t, on_death=_post_mortem(t.name)).start())  # noqa: SHM101 - this process's threads
        except Exception:
            _log.exception("shmreg: cannot start a watcher on %r", t.name)


def _on_process_init(sender: Any = None, **kwargs: Any) -> None:
    pid = os.getpid()
    try:
        _all_tables()     # attach now, not in the first task
        s = settings()
        if s.registry is None:
            return
        value = {"pid": pid, "ppid": os.getppid(), "hostname": socket.gethostname(),
                 "started": time.time()}
        try:
            registry().register(pool_key(pid), value)
        except AlreadyRegisteredError as e:
            _log.warning("shmreg: %r is already registered by live pid %s", pool_key(pid), e.pid)
    except Exception:
        _log.exception("shmreg: worker_process_init failed in pool process %d", pid)


def _on_process_shutdown(sender: Any = None, **kwargs: Any) -> None:
    try:
        if settings().registry is not None:
            registry().unregister(pool_key())
    except Exception:
        _log.exception("shmreg: worker_process_shutdown failed in pool process %d", os.getpid())


def _on_worker_shutdown(sender: Any = None, **kwargs: Any) -> None:
    try:
        for w in _watchers:
            w.stop()
            w.sweep()      # the pool is gone by now: reap what it left
        _watchers.clear()
        if not settings().temporary:
            return
        me = os.getpid()
        for t in _all_tables():
            try:
                others = sorted({p["pid"] for p in t._proc_table() if p["alive"] and p["pid"] != me})
                if others:
                    _log.warning("shmreg: not unlinking %r: live processes %s hold slots in it",
                                 t.name, others)
                    continue
                t.unlink()
            except TableNotFoundError:
                pass
        with _lock:
            _objects.clear()
    except Exception:
        _log.exception("shmreg: worker_shutdown failed")
