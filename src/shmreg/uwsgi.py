"""uWSGI integration: shared tables, a worker registry and reaping, like
:mod:`shmreg.gunicorn`.

In the WSGI module uWSGI loads (``--wsgi-file app.py`` / ``--module app``)::

    import shmreg.uwsgi
    from shmreg.uwsgi import CacheSpec, TableSpec

    shmreg.uwsgi.setup(
        tables={
            "myapp-counters": TableSpec(capacity=10_000),
            "myapp-pages": CacheSpec(ttl=60, capacity=50_000, memory=64 << 20),
        },
        registry="myapp-workers",   # default: one of this app's own
    )

    def application(environ, start_response):
        shmreg.uwsgi.table("myapp-counters").update_counter("requests")
        ...

and run it with a master and (at least) these options::

    uwsgi --master --processes 4 --need-app --die-on-term --wsgi-file app.py ...

What :func:`setup` does, and when:

- at import, in the master (before the fork, unless ``--lazy-apps``):
  opens or creates every table, as gunicorn's ``on_starting`` does.  A
  configuration that cannot be satisfied (no room in ``/dev/shm``, a table
  that cannot be opened, a geometry mismatch with ``strict=True``) raises
  :class:`~shmreg.gunicorn.StartupError`: the app does not load, and with
  ``--need-app`` uWSGI exits instead of serving without it.
- ``uwsgidecorators.postfork``, in each new worker: resets what a fork
  must reset (uWSGI forks from C: Python's at-fork hooks only run with
  ``--py-call-osafterfork``), attaches the tables, registers the worker in
  the registry under ``worker:<pid>`` (``{"pid", "age", "ppid",
  "booted_at"}``, ``age`` being the uWSGI worker id), and starts a :class:`~shmreg.Watcher` per table in a
  daemon thread.
- worker death: uWSGI has no Python hook in the master for another
  process's death, so the *surviving workers* reap: one worker's watcher is
  active per table (it holds the table's lease), the others stand by, and
  the kernel hands the lease to a standby when the active one dies.  A
  worker killed with ``SIGKILL`` is reaped within milliseconds (its
  registration is invisible at once in any case) and its post-mortem goes
  to the uWSGI log: ``shmreg: worker 1234 died owning 2 entries in
  'myapp-workers': ...``.
- ``uwsgi.atexit``, in a worker that exits gracefully (reload,
  ``max-requests``, shutdown): deletes what it owns, so that exit is not
  reported as a death.

Tables persist until unlinked (there is no ``temporary`` here: uWSGI's
master runs no Python at exit); ``shmreg destroy NAME`` removes one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Any, Iterable, Iterator, Mapping

from shmreg import gunicorn as _g
from shmreg.gunicorn import (AUTO, CacheSpec, Settings, StartupError, TableSpec, UnavailableError,
                             cache, registry, table, worker_key)
from shmreg.trust import Trust
from shmreg.watcher import Watcher

__all__ = ["setup", "table", "cache", "registry", "worker_key", "TableSpec", "CacheSpec",
           "StartupError", "UnavailableError", "default_registry_name"]

_log = logging.getLogger("shmreg.uwsgi")
_watchers: list = []
_watch_interval: float | None = 1.0


class _UwsgiLog:
    """gunicorn's ``server.log`` interface, writing to the uWSGI log."""

    def _emit(self, level: int, msg: str, *args: Any, exc_info: bool = False) -> None:
        text = msg % args if args else msg
        try:
            import uwsgi
        except ImportError:
            _log.log(level, text, exc_info=exc_info)
            return
        if level >= logging.INFO:
            if exc_info:
                import traceback

                text += "\n" + traceback.format_exc().rstrip()
            uwsgi.log(text)

    def debug(self, msg: str, *args: Any) -> None:
        self._emit(logging.DEBUG, msg, *args)

    def info(self, msg: str, *args: Any) -> None:
        self._emit(logging.INFO, msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        self._emit(logging.WARNING, msg, *args)

    def error(self, msg: str, *args: Any) -> None:
        self._emit(logging.ERROR, msg, *args)

    def exception(self, msg: str, *args: Any) -> None:
        self._emit(logging.ERROR, msg, *args, exc_info=True)


class _Server:
    log = _UwsgiLog()
    reexec_pid = 0
    pidfile = None


_server = _Server()


def _opt(name: str) -> list:
    import uwsgi

    v = uwsgi.opt.get(name)
    vals = v if isinstance(v, list) else [] if v is None else [v]
    return [x.decode() if isinstance(x, bytes) else str(x) for x in vals]


def default_registry_name() -> str:
    """``uwsgi-<app>-<hash>-workers``: the app (``procname``, ``module`` or
    ``wsgi-file``) and a hash of the working directory, the app and the
    sockets, so two apps on one host never share a registry."""
    app = next(iter(_opt("procname") or _opt("module") or _opt("wsgi-file") or _opt("wsgi")), None)
    bind = [b for o in ("http-socket", "http", "socket", "uwsgi-socket", "https-socket")
            for b in _opt(o)]
    return _g.default_registry_name(app, bind, server="uwsgi")


def setup(tables: Mapping[str, Any] | Iterable[str] = (), *, registry: str | None = AUTO,
          registry_capacity: int | None = None, required: bool = True, strict: bool = False,
          overcommit: bool = False, watch_interval: float | None = 1.0,
          registry_mode: int = 0o600, registry_trust: Trust | None = None) -> Settings:
    """Configure and open the tables (in the master), and install the
    ``postfork`` and ``atexit`` hooks.  Call it once, at import of the WSGI
    module.

    :param tables, registry, registry_capacity, required, strict, overcommit,
        registry_mode, registry_trust: as :func:`shmreg.gunicorn.configure`.
    :param watch_interval: seconds between the workers' watcher sweeps;
        ``None``: no watchers (reap with ``shmreg watch`` or your own).
    :raises StartupError: the configuration cannot be satisfied.
    :raises RuntimeError: not running under uWSGI.
    """
    global _watch_interval
    try:
        import uwsgi
        import uwsgidecorators
    except ImportError:
        raise RuntimeError("shmreg.uwsgi.setup() runs inside uWSGI (the uwsgi module is "
                           "missing): use shmreg.Table/Cache directly elsewhere") from None
    if registry == AUTO:
        registry = default_registry_name()
    settings = _g.configure(tables, registry=registry, registry_capacity=registry_capacity,
                            required=required, strict=strict, overcommit=overcommit,
                            registry_mode=registry_mode, registry_trust=registry_trust)
    _watch_interval = watch_interval
    _g.on_starting(_server)
    uwsgidecorators.postfork(_postfork)
    previous = getattr(uwsgi, "atexit", None)

    def atexit() -> None:
        _worker_exit()
        if callable(previous):
            previous()

    uwsgi.atexit = atexit
    return settings


def _postfork() -> None:
    from shmreg import table as _table_mod

    import uwsgi

    # uWSGI forked from C: do what Python's at-fork hooks would have done.
    _table_mod._after_fork_in_child()
    _g._reset_after_fork()
    _watchers.clear()
    worker = type("Worker", (), {"age": uwsgi.worker_id(), "ppid": os.getppid()})()
    # uWSGI's signal handlers are C: they run in whichever thread the kernel
    # picks and only set a flag the main thread's event loop must see.  A
    # signal taken by one of our threads (the owner threads, the watchers)
    # would leave the worker deaf to a shutdown: start them with the
    # asynchronous signals blocked (threads inherit the mask).
    with _signals_blocked():
        _g.post_fork(_server, worker)
        tables = [t for _, t in _g._existing_tables(_server.log)]
        for t in tables:
            t._self_owner()   # the owner thread of a later owned write, created now
        if uwsgi.worker_id() == 0 or _watch_interval is None:
            return   # a mule or the spooler: no reaping duty
        for t in tables:
            try:
                _watchers.append(Watcher(t, on_death=_reporter(t.name), interval=_watch_interval).start())  # noqa: SHM101 - this process's threads
            except Exception:
                _server.log.exception("shmreg: worker %d cannot watch table %r", os.getpid(), t.name)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    names = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCHLD", "SIGALRM",
             "SIGPIPE", "SIGWINCH")
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {getattr(signal, n) for n in names if hasattr(signal, n)})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _reporter(name: str) -> Any:
    def on_death(pid: int, entries: list) -> None:
        shown = ", ".join(f"{k!r}={v!r}" for k, v in entries[:5])
        more = f" (+{len(entries) - 5} more)" if len(entries) > 5 else ""
        _server.log.warning("shmreg: worker %d died owning %d %s in %r: %s%s", pid, len(entries),
                            "entry" if len(entries) == 1 else "entries", name, shown, more)
    return on_death


def _worker_exit() -> None:
    for w in _watchers:
        w.stop(timeout=1.0)
    _g.worker_exit(_server, None)
