"""Plain ``uvicorn --workers N`` (no gunicorn): shared tables, a worker
registry, reaping of dead workers and cleanup at shutdown, driven by the
ASGI lifespan of each worker.

In the app module (every uvicorn worker imports it)::

    import shmreg.uvicorn
    from shmreg.uvicorn import CacheSpec, TableSpec

    shmreg.uvicorn.configure(
        tables={"myapp-counters": TableSpec(capacity=10_000),
                "myapp-pages": CacheSpec(ttl=60, memory=64 << 20)},
        registry="myapp-workers",     # default: one of this server's own
        temporary=True,               # the last worker to stop unlinks the tables
    )

    async def app(scope, receive, send): ...   # your ASGI app
    app = shmreg.uvicorn.wrap(app)               # handles the lifespan events

    # uvicorn app:app --workers 4

With a framework that has its own lifespan (Starlette, FastAPI), call
:func:`start_worker` at its startup and :func:`stop_worker` at its shutdown
instead of :func:`wrap`.

What happens:

- worker startup (:func:`start_worker`): opens or creates the tables (the
  first worker creates, the others open; creation is atomic), registers the
  worker under ``worker:<pid>`` (an owned entry: it vanishes when the worker
  dies), and starts a :class:`~shmreg.Watcher` per table in a daemon thread.
  One watcher per table is active; the others stand by and take over when
  its worker dies.  uvicorn's supervisor is not Python code we can hook, so
  the *surviving workers* reap a dead one (``SIGKILL``, OOM) and log its
  post-mortem (``shmreg: worker 1234 died owning 2 entries in ...``).
- worker shutdown (:func:`stop_worker`): deletes what the worker owns (a
  graceful exit is not a death), and with ``temporary=True`` the last
  worker to stop - the one that finds the registry empty after leaving it -
  unlinks every table.  Without a registry, ``temporary`` unlinks a table
  only if no other live process holds a slot in it.

:func:`table`, :func:`cache` and :func:`registry` are
:mod:`shmreg.gunicorn`'s: this process's attached objects.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Awaitable, Callable, Iterable, Mapping

from shmreg import gunicorn as _g
from shmreg.gunicorn import (AUTO, CacheSpec, Settings, TableSpec, cache, registry, table,
                             worker_key)
from shmreg.trust import Trust
from shmreg.watcher import Watcher

__all__ = ["configure", "start_worker", "stop_worker", "wrap", "table", "cache", "registry",
           "worker_key", "TableSpec", "CacheSpec"]

_log = logging.getLogger("shmreg.uvicorn")
_watchers: list = []
_watch_interval: float | None = 1.0


class _Server:
    log = _log
    reexec_pid = 0
    pidfile = None


def default_registry_name() -> str:
    """``uvicorn-<app>-<hash>-workers``: a hash of the working directory and
    the server's command line (the same in every worker of one server: a
    ``spawn`` child gets its parent's ``sys.argv``)."""
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    return _g.default_registry_name(args[0] if args else None, sys.argv, server="uvicorn")


def configure(tables: Mapping[str, Any] | Iterable[str] = (), *, registry: str | None = AUTO,
              registry_capacity: int | None = None, temporary: bool = False,
              watch_interval: float | None = 1.0, registry_mode: int = 0o600,
              registry_trust: Trust | None = None) -> Settings:
    """Set what the workers share; call it at import of the app module.

    :param tables, registry, registry_capacity, temporary, registry_mode, registry_trust: as
        :func:`shmreg.gunicorn.configure` (``temporary``: the last worker to
        stop unlinks the tables).
    :param watch_interval: seconds between the workers' watcher sweeps;
        ``None``: no watchers.
    """
    global _watch_interval
    if registry == AUTO:
        registry = default_registry_name()
    _watch_interval = watch_interval
    return _g.configure(tables, registry=registry, registry_capacity=registry_capacity,
                        temporary=temporary, registry_mode=registry_mode,
                        registry_trust=registry_trust)


def start_worker() -> None:
    """This worker's startup: attach the tables, register, start watching.

    :raises StartupError: a table cannot be created or opened (the worker
        then fails its lifespan startup and uvicorn does not serve with it).
    """
    server = _Server()
    s = _g.settings()
    for name in [*s.tables, *([_g.registry_name()] if _g.registry_name() else [])]:
        try:
            _g._open_configured(name, s)
        except Exception as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise _g.StartupError(f"shmreg: cannot open or create table {name!r}: {why}") from None
    _g.post_fork(server, type("Worker", (), {"age": None, "ppid": os.getppid()})())
    if _watch_interval is None:
        return
    for name, t in _g._existing_tables(_log):
        _watchers.append(Watcher(t, on_death=_reporter(name), interval=_watch_interval).start())  # noqa: SHM101 - this process's threads


def _reporter(name: str) -> Callable[[int, list], None]:
    def on_death(pid: int, entries: list) -> None:
        shown = ", ".join(f"{k!r}={v!r}" for k, v in entries[:5])
        more = f" (+{len(entries) - 5} more)" if len(entries) > 5 else ""
        _log.warning("shmreg: worker %d died owning %d %s in %r: %s%s", pid, len(entries),
                     "entry" if len(entries) == 1 else "entries", name, shown, more)
    return on_death


def stop_worker() -> None:
    """This worker's shutdown: stop watching, delete what it owns, and (if
    ``temporary``) unlink the tables when it is the last worker."""
    for w in _watchers:
        w.stop(timeout=2.0)
    _watchers.clear()
    _g.worker_exit(_Server(), None)   # unregisters too: the registration is owned
    s = _g.settings()
    if not s.temporary:
        return
    me = os.getpid()
    reg = _g.registry_name()
    if reg is not None:
        try:
            if registry().count():
                return   # not the last worker
        except Exception:
            pass
    for name, t in _g._existing_tables(_log):
        others = {p["pid"] for p in t._proc_table() if p["alive"] and p["pid"] != me}
        if reg is None and others:
            continue
        try:
            t.unlink()
            _log.info("shmreg: unlinked table %r", name)
        except Exception:
            pass   # another last worker got there first
    _g._close_all()


ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


def wrap(app: ASGIApp) -> ASGIApp:
    """An ASGI app that answers the lifespan protocol itself - startup:
    :func:`start_worker`, shutdown: :func:`stop_worker` - and passes every
    other scope to ``app``.  (An app with a lifespan of its own should call
    those two from it instead.)"""

    async def wrapped(scope: dict, receive: Callable[[], Awaitable[dict]],
                      send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    start_worker()
                except Exception as e:
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    stop_worker()
                except Exception as e:
                    await send({"type": "lifespan.shutdown.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return

    return wrapped
