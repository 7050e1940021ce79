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
        registry="myapp-workers",   # None: no worker registry; default: one per app
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

What the hooks do (each logs through gunicorn's logger; only ``on_starting``
raises, and only to stop gunicorn from serving with tables it cannot have):

- ``on_starting`` (arbiter, before any fork): opens or creates every
  configured table and the registry, so every worker attaches the same
  segments with the configured geometry.  A configuration that cannot be
  satisfied stops gunicorn here (exit status 1, ``Error: shmreg: ...`` on
  stderr, nothing left in ``/dev/shm``): the tables to create add up to more
  than the free space of the segment filesystem (Docker's default
  ``/dev/shm`` is 64 MiB: ``--shm-size``), or one cannot be created or
  opened.  ``configure(required=False)`` degrades instead: gunicorn serves,
  and :func:`table`/:func:`cache` raise :class:`UnavailableError` (a
  ``RuntimeError``, so the app can catch it) for the tables that are
  missing.  An existing table whose geometry differs from the configured one
  is kept and logged as a warning naming both (``configure(strict=True)``:
  stops gunicorn instead).
- ``post_fork`` (in the new worker): attaches the tables and registers the
  worker in the registry under ``worker:<pid>`` (:func:`worker_key`) with
  ``{"pid", "age", "ppid", "booted_at"}``.  The registration is owned by the
  worker: it vanishes from every lookup the moment the worker dies.
- ``worker_exit`` (in a worker that exits through Python: graceful shutdown,
  ``max_requests`` restart, timeout): deletes what the worker owns, so its
  exit is not reported as a death.
- ``child_exit`` (arbiter, after it reaped a worker): deletes everything the
  dead worker still owned in every configured table, the registry and the
  caches' single-flight tables, synchronously, and logs what it owned (a
  post-mortem warning: ``shmreg: worker 1234 exited owning 2 entries:
  ...``; a worker that owned nothing any more is logged at DEBUG only).
- ``on_exit`` (arbiter, last): with ``temporary=True`` unlinks every table
  that exists (it never creates one; a table in which another live process
  still holds a slot, e.g. the workers of a new master after a ``USR2``
  upgrade, is left alone).

Your own hooks: define them after the star import and call ours, e.g.
``def post_fork(server, worker): shmreg.gunicorn.post_fork(server, worker); ...``.

Without :func:`configure`, the settings come from the environment:
``SHMREG_GUNICORN_TABLES`` (comma separated ``name[:table|cache][:key=value]...``,
e.g. ``counters,pages:cache:ttl=60:capacity=50000``),
``SHMREG_GUNICORN_REGISTRY`` (default: one per app, see below; empty: none) and
``SHMREG_GUNICORN_TEMPORARY`` (``1``/``true``/``yes``).

The default registry name is :func:`default_registry_name`: ``gunicorn-<proc
name>-<hash>-workers``, the hash over the working directory, the
``proc_name`` (default: the WSGI app, e.g. ``app:application``) and the bind
addresses, so two apps on one host never share a registry while a ``USR2``
upgrade of the same app does.  The arbiter logs the name; code outside
gunicorn that must find the registry should name it with ``registry=``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Union

from shmreg import _core, _segment
from shmreg.cache import Cache
from shmreg.errors import (AlreadyRegisteredError, ConfigMismatchError, ConfigMismatchWarning,
                           Error, TableNotFoundError)
from shmreg.registry import Registry
from shmreg.table import DEFAULT_CAPACITY, Table, default_limits, default_memory
from shmreg.trust import Trust

# Exactly the names gunicorn looks up as settings: a star import installs them.
__all__ = ["on_starting", "post_fork", "worker_exit", "child_exit", "on_exit"]

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

#: ``configure(registry=AUTO)`` (the default): a registry name of this app's
#: own, :func:`default_registry_name`.
AUTO = "<auto>"


class StartupError(Error, RuntimeError):
    """The configured tables cannot be had: raised by ``on_starting`` so that
    gunicorn exits (a ``RuntimeError``: gunicorn prints it and exits 1)."""


class UnavailableError(Error, RuntimeError):
    """``configure(required=False)``: this table could not be created at
    start; the app may catch this and serve without it."""


@dataclass(frozen=True)
class Settings:
    """The effective configuration (see :func:`configure`)."""

    tables: Mapping[str, Spec]
    registry: str | None = AUTO
    registry_capacity: int | None = None
    temporary: bool = False
    required: bool = True
    strict: bool = False
    overcommit: bool = False
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


def configure(tables: Mapping[str, Any] | Iterable[str] = (), *, registry: str | None = AUTO,
              registry_capacity: int | None = None, temporary: bool = False,
              required: bool = True, strict: bool = False, overcommit: bool = False,
              registry_mode: int = 0o600, registry_trust: Trust | None = None) -> Settings:
    """Set what the hooks manage; call it in ``gunicorn.conf.py``.

    :param tables: ``{name: TableSpec(...) | CacheSpec(...) | "table" |
        "cache" | None}``, or an iterable of names (plain tables, default
        geometry).
    :param registry: name of the worker registry table; ``None`` for none;
        default :data:`AUTO`: :func:`default_registry_name`, one per app.
    :param registry_capacity: registrations it is sized for (default 1,024,
        in 1 MiB).
    :param temporary: unlink every table when the arbiter exits.
    :param required: a table that cannot be created or opened stops gunicorn
        at start (default); ``False``: log it, serve anyway, and let
        :func:`table`/:func:`cache` raise :class:`UnavailableError` for it.
    :param strict: an existing table whose geometry differs from its spec
        stops gunicorn (default: a warning naming both, the table is kept).
    :param overcommit: allow tables whose sizes add up to more than the free
        space of the segment filesystem (default: refused at start).
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
    if registry is not None and registry != AUTO:
        _segment.check_name(registry)
        if registry in specs:
            raise ValueError(f"{registry!r} is both the registry and a configured table")
    _configured = Settings(specs, registry, registry_capacity, bool(temporary), bool(required),
                           bool(strict), bool(overcommit), registry_mode, registry_trust)
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
        reg = env.get("SHMREG_GUNICORN_REGISTRY", AUTO) or None
        if reg is not None and reg != AUTO:
            _segment.check_name(reg)
        _from_env = Settings(_parse_env_tables(env.get("SHMREG_GUNICORN_TABLES", "")), reg, None,
                             env.get("SHMREG_GUNICORN_TEMPORARY", "").lower() in ("1", "true", "yes"))
    return _from_env


def default_registry_name(proc_name: str | None = None, bind: Iterable[str] = (),
                          cwd: str | None = None, *, server: str = "gunicorn") -> str:
    """The registry name used when none is configured:
    ``<server>-<proc_name>-<8 hex digits>-workers``, the digits a hash of
    ``cwd`` (default: the current directory), ``proc_name`` and the ``bind``
    addresses.  Two apps on one host differ in at least one of them.

    >>> default_registry_name("app:application", ["127.0.0.1:8000"], cwd="/srv/shop")
    'gunicorn-app_application-5effca39-workers'
    """
    proc = proc_name or server
    ident = "\0".join([cwd or os.getcwd(), proc, *sorted(bind)])
    digest = hashlib.blake2b(ident.encode(), digest_size=4).hexdigest()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", proc).strip("._-")[:60] or "app"
    return f"{server}-{slug}-{digest}-workers"


_registry_name: str | None = None   # resolved in the arbiter (on_starting); inherited by fork


def registry_name(server: Any = None) -> str | None:
    """The registry table's name in force (None: no registry).  With the
    default :data:`AUTO`, :func:`default_registry_name` of the gunicorn
    ``server``'s ``proc_name`` and bind addresses (resolved once, in the
    arbiter; the workers inherit it)."""
    global _registry_name
    reg = settings().registry
    if reg != AUTO:
        return reg
    if _registry_name is None or server is not None:
        cfg = getattr(server, "cfg", None)
        proc = getattr(cfg, "proc_name", None)
        bind = getattr(cfg, "bind", None) or []
        _registry_name = default_registry_name(proc, [str(b) for b in bind])
    return _registry_name


# -- per-process attached objects ------------------------------------------------

# Tables on_starting could not have, with why (required=False): inherited by
# the workers, which raise UnavailableError instead of creating them.
_unavailable: dict[str, str] = {}

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
    if name in _unavailable:
        raise UnavailableError(f"shmreg table {name!r} is unavailable: {_unavailable[name]}")
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
    name = registry_name()
    if name is None:
        raise RuntimeError("no registry configured (configure(registry=None))")
    cap, mem = _registry_geometry(s)
    return _attach("registry", name, lambda: Registry(
        name, capacity=cap, memory=mem, mode=s.registry_mode, trust=s.registry_trust))


def _registry_geometry(s: Settings) -> tuple[int, int]:
    # One small entry per worker: 1,024 registrations in 1 MiB unless configured.
    cap = s.registry_capacity or 1024
    return cap, max(1 << 20, 512 * cap)


def _sharing(name: str) -> dict:
    """``mode``/``trust`` a managed table is opened with: its spec's (a
    cache's single-flight table: the cache's), the registry's."""
    s = settings()
    spec = s.tables.get(name)
    if spec is None and name.endswith("--flights"):
        spec = s.tables.get(name[:-len("--flights")])
    if spec is not None:
        return {"mode": spec.mode, "trust": spec.trust}
    if name == registry_name():
        return {"mode": s.registry_mode, "trust": s.registry_trust}
    return {"mode": 0o600, "trust": None}


def worker_key(pid: int | None = None) -> str:
    """Registry key of the worker ``pid`` (default: this process)."""
    return f"worker:{os.getpid() if pid is None else pid}"


def _managed_names() -> list:
    """Every table the hooks manage: the configured ones, the caches'
    single-flight companions, the registry."""
    s = settings()
    out = []
    for name, spec in s.tables.items():
        out.append(name)
        if isinstance(spec, CacheSpec):
            out.append(f"{name}--flights")   # Cache._flights_name()
    reg = registry_name()
    if reg is not None:
        out.append(reg)
    return out


def _segment_size(capacity: int | None, memory: int | None, shards: int | None = None) -> int:
    """Bytes a managed table allocates when it is created (a table without
    sizes starts small and grows; a pre-sized one allocates it all)."""
    if capacity is None and memory is None:
        cap, mem = default_limits()
        plan = _core.plan_layout(cap, mem, shards, True)
    else:
        cap = DEFAULT_CAPACITY if capacity is None else capacity
        plan = _core.plan_layout(cap, default_memory(cap) if memory is None else memory, shards)
    return sum(length for _, length in plan["extents"])


def _planned_sizes(s: Settings) -> dict:
    """{name: segment bytes} of every managed table, as configured."""
    sizes = {}
    for name, spec in s.tables.items():
        try:
            sizes[name] = _segment_size(spec.capacity, spec.memory, getattr(spec, "shards", None))
        except ValueError as e:   # a geometry no table can have
            raise StartupError(f"shmreg: table {name!r}: {e}") from None
        if isinstance(spec, CacheSpec):
            # Cache._flight_table()'s geometry.
            cap = max(4096, min(DEFAULT_CAPACITY if spec.capacity is None else spec.capacity, 1 << 16))
            sizes[f"{name}--flights"] = _segment_size(cap, max(4 << 20, 128 * cap))
    reg = registry_name()
    if reg is not None:
        sizes[reg] = _segment_size(*_registry_geometry(s))
    return sizes


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def check_space(s: Settings | None = None, existing: Iterable[str] | None = None) -> None:
    """Refuse a configuration whose tables to create add up to more than the
    free space of the segment filesystem (unless ``overcommit``).

    :raises StartupError: naming what is needed, what is free, and the fix.
    """
    s = settings() if s is None else s
    if s.overcommit:
        return
    have = set(_segment.list_tables(all_users=True) if existing is None else existing)
    sizes = {n: b for n, b in _planned_sizes(s).items() if n not in have}
    if not sizes:
        return
    need = sum(sizes.values())
    directory = _segment.segment_dir()
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if need <= free:
        return
    biggest = ", ".join(f"{n!r} {_mib(b)}" for n, b in sorted(sizes.items(), key=lambda kv: -kv[1])[:4])
    raise StartupError(
        f"shmreg: the configured tables need {_mib(need)} in {directory} but only {_mib(free)} "
        f"is free (of {_mib(st.f_blocks * st.f_frsize)}): {biggest}.  Enlarge it (docker run "
        f"--shm-size=256m; Kubernetes: an emptyDir with medium Memory on /dev/shm), give the "
        f"tables less capacity/memory, or configure(overcommit=True).")


def _logger(server: Any) -> Any:
    return getattr(server, "log", None) or _log


# -- hooks ---------------------------------------------------------------------

# Tables the arbiter opened in on_starting, by name: child_exit and on_exit
# reuse them and open (never create) any other managed table.
_managed: dict[str, Table] = {}


def _existing_tables(log: Any) -> list:
    """(name, Table) of the managed tables that exist now; never creates one
    (the cleanup hooks must not bring a missing table into being)."""
    out = []
    for name in _managed_names():
        if name in _unavailable:
            continue   # reported by on_starting
        t = _managed.get(name)
        if t is None or t.closed:
            try:
                t = _managed[name] = Table.open(name, **_sharing(name))  # noqa: SHM101 - this process's handles
            except TableNotFoundError:
                continue
            except Exception:
                log.exception("shmreg: cannot open table %r", name)
                continue
        out.append((name, t))
    return out


def _open_configured(name: str, s: Settings) -> list:
    """Open or create ``name`` as configured; [(name, Table)] incl. a cache's
    single-flight table."""
    if name == registry_name():
        return [(name, registry().table)]
    if isinstance(s.tables[name], CacheSpec):
        c = cache(name)
        return [(name, c.table), (c._flights_name(), c._flight_table())]  # every worker attaches these
    return [(name, table(name))]


def _close_all() -> None:
    with _lock:
        for obj in _objects.values():
            try:
                obj.close()
            except Exception:
                pass
        _objects.clear()
    for t in _managed.values():
        t.close()
    _managed.clear()


def _stop(server: Any, created: list, message: str) -> None:
    """Undo what on_starting created and raise the StartupError that makes
    gunicorn exit 1 (its pidfile, written before on_starting, removed)."""
    _logger(server).error("%s", message)
    for name in created:
        try:
            _segment.unlink(name)   # just created by this process: its own file
        except Exception:
            pass
    _close_all()
    pidfile = getattr(server, "pidfile", None)
    if pidfile is not None:
        try:
            pidfile.unlink()
        except Exception:
            pass
    raise StartupError(message)


def on_starting(server: Any) -> None:
    """Arbiter, before the first fork: open or create every table.

    :raises StartupError: the configuration cannot be satisfied (see the
        module docs; ``required=False`` logs instead).
    """
    log = _logger(server)
    try:
        s = settings()
    except Exception as e:
        _stop(server, [], f"shmreg: invalid configuration: {type(e).__name__}: {e}")
        return
    _unavailable.clear()
    reg = registry_name(server)
    existing = set(_segment.list_tables(all_users=True))   # whoever owns them
    created: list = []
    try:
        check_space(s, existing)
    except StartupError as e:
        if s.required:
            _stop(server, created, str(e))
        log.error("%s (required=False: creating what fits)", e)
    if reg is not None:
        log.info("shmreg: worker registry %r", reg)
    for name in [*s.tables, *([reg] if reg is not None else [])]:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConfigMismatchWarning)
                opened = _open_configured(name, s)
            for w in caught:
                if s.strict and issubclass(w.category, ConfigMismatchWarning):
                    raise ConfigMismatchError(str(w.message))
                log.warning("shmreg: %s", w.message)
        except Exception as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            message = f"shmreg: cannot open or create table {name!r}: {why}"
            if s.required or isinstance(e, ConfigMismatchError):
                _stop(server, created, message)
            log.error("%s (required=False: serving without it)", message)
            _unavailable[name] = why  # noqa: SHM101 - set in the arbiter before the fork, inherited
            continue
        for n, t in opened:
            _managed[n] = t  # noqa: SHM101 - the arbiter's own handles on the shared tables
            if n not in existing:
                created.append(n)
        t = opened[0][1]
        log.info("shmreg: %s table %r (%d entries, capacity %d)",
                 "opened" if name in existing else "created", name, len(t), t.capacity)


def post_fork(server: Any, worker: Any) -> None:
    """Worker, after fork: attach the tables, register the worker."""
    log = _logger(server)
    pid = os.getpid()
    try:
        s = settings()
        for name in s.tables:
            try:
                with warnings.catch_warnings():
                    # A geometry mismatch was logged once, by on_starting: not once per worker.
                    warnings.simplefilter("ignore", ConfigMismatchWarning)
                    (cache if isinstance(s.tables[name], CacheSpec) else table)(name)
            except UnavailableError:
                pass   # logged once by on_starting; the app gets the error on use
            except Exception:
                log.exception("shmreg: worker %d cannot attach table %r", pid, name)
        if registry_name() is None or registry_name() in _unavailable:
            return
        value = {"pid": pid, "age": getattr(worker, "age", None), "ppid": getattr(worker, "ppid", None),
                 "booted_at": time.time()}
        try:
            registry().register(worker_key(pid), value)
        except AlreadyRegisteredError as e:
            log.warning("shmreg: %r is already registered by live pid %s", worker_key(pid), e.pid)
    except Exception:
        log.exception("shmreg: post_fork failed in worker %d", pid)


def worker_exit(server: Any, worker: Any) -> None:
    """Worker, exiting through Python (graceful stop, ``max_requests``,
    timeout): delete what it owns, so its exit is not reported as a death."""
    pid = os.getpid()
    try:
        with _lock:
            objs = list(_objects.values())
        for obj in objs:
            tables = [obj.table] if isinstance(obj, (Cache, Registry)) else [obj]
            if isinstance(obj, Cache) and obj._flights is not None:
                tables.append(obj._flights)
            for t in tables:
                if not t.closed:
                    t.reap(pid, force=True)
    except Exception:
        _logger(server).exception("shmreg: worker_exit failed in worker %d", pid)


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
    """Arbiter, after a worker exited: reap it in every table; log a
    post-mortem if it still owned entries (it died: a graceful exit deleted
    them in :func:`worker_exit`)."""
    log = _logger(server)
    pid = getattr(worker, "pid", None)
    try:
        if not isinstance(pid, int):
            return
        total = 0
        parts = []
        for name, t in _existing_tables(log):
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
        (log.warning if total else log.debug)(
            "shmreg: worker %d exited owning %d %s%s", pid, total,
            "entry" if total == 1 else "entries", (": " + "; ".join(parts)) if parts else "")
    except Exception:
        log.exception("shmreg: child_exit failed for worker %s", pid)


def _wait_for_own_workers(pids: list, me: int, timeout: float = 5.0) -> bool:
    """Wait (bounded) for those of ``pids`` that are this arbiter's children
    to die: gunicorn SIGKILLs the workers that outlived the graceful timeout
    just before ``on_exit``, and a killed process takes a moment to be dead.
    True if there were any."""
    import psutil

    from shmreg._proc import is_alive

    mine = []
    for pid in pids:
        try:
            if psutil.Process(pid).ppid() == me:
                mine.append(pid)
        except psutil.Error:
            continue
    deadline = time.monotonic() + timeout
    while any(is_alive(pid) for pid in mine) and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(mine)


def on_exit(server: Any) -> None:
    """Arbiter, last: unlink the tables that exist if ``temporary`` (never
    creates one)."""
    log = _logger(server)
    try:
        s = settings()
        if not s.temporary:
            return
        if getattr(server, "reexec_pid", 0):
            log.info("shmreg: a new master (pid %s) runs on: tables kept", server.reexec_pid)
            return
        me = os.getpid()
        for name, t in _existing_tables(log):
            try:
                others = sorted({p["pid"] for p in t._proc_table() if p["alive"] and p["pid"] != me})
                if others:
                    # Look again whatever the wait found: gunicorn's SIGCHLD
                    # handler may have reaped (and child_exit released) a
                    # killed worker in the meantime - it is then no child of
                    # ours to wait for, and no longer alive either.
                    _wait_for_own_workers(others, me)
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
        _close_all()
    except Exception:
        log.exception("shmreg: on_exit failed")
