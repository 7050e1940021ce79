"""Tables for the worker processes of a ``multiprocessing`` pool.

A ``Pool`` (or ``ProcessPoolExecutor``) initializer attaches each worker to
one or more tables once; tasks get them with :func:`table`::

    import multiprocessing, shmreg, shmreg.mp

    def work(job):
        shmreg.mp.table().update_counter("jobs:done")          # the first table
        shmreg.mp.table("results")[job] = job * job             # any attached one

    if __name__ == "__main__":
        shmreg.Table("jobs"); shmreg.Table("results")           # the parent creates them
        with multiprocessing.Pool(4, **shmreg.mp.pool_kwargs("jobs", "results")) as pool:
            pool.map(work, range(1000))

:func:`pool_kwargs` opens every table in the parent first, so a mistyped
name fails there, at once (``TableNotFoundError``, with the close names that
do exist), instead of in every worker's initializer, which a ``Pool``
restarts forever.  Should a table vanish between that check and a worker's
start, the worker does not fail its initializer either: its first
:func:`table` call raises the error, in the task, and ``map`` returns it.

Works under every start method: ``spawn``/``forkserver`` workers run the
initializer in a fresh interpreter; a ``fork`` child of a process that
already attached notices the pid change and attaches again on its first
:func:`table` call (a process of its own: its own owner slot, its own read
counters), so even a pool without an initializer works after the parent
called :func:`attach`.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any

from shmreg._names import did_you_mean
from shmreg.errors import TableNotFoundError
from shmreg.table import Table
from shmreg.trust import Trust

__all__ = ["attach", "table", "tables", "detach", "pool_kwargs"]

_lock = threading.Lock()
_names: tuple = ()                 # what this process (or an ancestor) attached
_tables: dict[str, Table] = {}     # opened by _pid
_pid: int | None = None
_error: BaseException | None = None   # a pool worker's failed attach, raised by table()
_options: dict[str, Any] = {}         # the mode/trust the attached set was opened with


def _open(name: str, mode: int = 0o600, trust: Trust | None = None) -> Table:
    try:
        return Table.open(name, mode=mode, trust=trust)
    except TableNotFoundError as e:
        raise TableNotFoundError(e.errno, f"no table named {name!r}{did_you_mean(name)}",
                                 e.filename) from None


def attach(*names: str, mode: int = 0o600, trust: Trust | None = None) -> Table:
    """Attach this process to the existing tables ``names`` and return the
    first (a ``Pool`` initializer: ``Pool(initializer=shmreg.mp.attach,
    initargs=(name, ...))``).  ``mode`` and ``trust``: as for
    :meth:`Table.open` (tables shared with other users; :func:`pool_kwargs`
    passes them on).

    Opens, never creates: a worker must not create a table of its own under a
    typo'd name.  Calling it again with the same names returns the same
    tables; other names replace the attached set (tables opened before are
    not closed: code of this process may still use them).

    :raises TableNotFoundError: a table does not exist (naming close matches).
    :raises TypeError: no name given.

    >>> shmreg.mp.attach("jobs").name
    'jobs'
    """
    global _names, _tables, _pid, _error, _options
    if not names:
        raise TypeError("attach() needs at least one table name")
    pid = os.getpid()
    options = {"mode": mode, "trust": trust}
    with _lock:
        # Handles opened under other sharing options are not reused.
        have = dict(_tables) if _pid == pid and _options == options else {}
    opened = {}
    for name in dict.fromkeys(names):
        t = have.get(name)
        opened[name] = t if t is not None and not t.closed else _open(name, mode, trust)
    with _lock:
        _names, _tables, _pid, _error, _options = tuple(opened), opened, pid, None, options
    return opened[names[0]]


def _pool_initializer(*names: str, mode: int = 0o600, trust: Trust | None = None) -> None:
    # An initializer that raises makes a Pool start a new worker, which
    # raises again, forever: keep the error for the first task instead.
    global _error
    try:
        attach(*names, mode=mode, trust=trust)
    except Exception as e:
        _error = e


def table(name: str | None = None) -> Table:
    """The attached table ``name`` (default: the first one attached).

    In a ``fork`` child of an attached process, re-attaches first (by name).
    :raises RuntimeError: :func:`attach` was never called in this process or
        an ancestor, or ``name`` is not among the attached tables.
    :raises TableNotFoundError: this pool worker could not attach.

    >>> shmreg.mp.table().update_counter("hits")
    1
    """
    if _pid == os.getpid():
        t = _tables.get(name if name is not None else (_names[0] if _names else ""))
        if t is not None:
            return t
    if _error is not None:
        raise _error
    with _lock:
        names, options = _names, _options
    if not names:
        raise RuntimeError("no shmreg table attached in this process: start the pool with "
                           "Pool(**shmreg.mp.pool_kwargs(name, ...)) "
                           "or call shmreg.mp.attach(name, ...) first")
    if name is not None and name not in names:
        raise RuntimeError(f"table {name!r} is not attached in this process (attached: "
                           f"{', '.join(map(repr, names))}): add it to pool_kwargs()/attach()")
    if _pid != os.getpid():
        attach(*names, **options)
    return _tables[name if name is not None else names[0]]


def tables() -> dict[str, Table]:
    """``{name: Table}`` of every attached table (re-attaching in a fork child)."""
    if _pid != os.getpid() and _names:
        attach(*_names, **_options)
    return dict(_tables) if _pid == os.getpid() else {}


def detach() -> None:
    """Forget (and close, if this process opened them) the attached tables."""
    global _names, _tables, _pid, _error, _options
    with _lock:
        old, pid = _tables, _pid
        _names, _tables, _pid, _error, _options = (), {}, None, None, {}
    if pid == os.getpid():
        for t in old.values():
            t.close()


def pool_kwargs(*names: str, mode: int = 0o600, trust: Trust | None = None) -> dict[str, Any]:
    """``initializer``/``initargs`` for ``Pool(**pool_kwargs(name, ...))`` or
    ``ProcessPoolExecutor(**pool_kwargs(name, ...))``; ``mode`` and ``trust``
    go to :func:`attach`.

    Checks here, in the parent, that every table exists (and is one to
    trust), so a typo fails before any worker starts.

    :raises TableNotFoundError: a table does not exist (naming close matches).
    :raises UntrustedTableError: a table's segment is not one to trust.

    >>> pool = multiprocessing.Pool(4, **shmreg.mp.pool_kwargs("jobs"))
    """
    if not names:
        raise TypeError("pool_kwargs() needs at least one table name")
    for name in names:
        _open(name, mode, trust).close()
    if mode == 0o600 and trust is None:
        return {"initializer": _pool_initializer, "initargs": tuple(names)}
    return {"initializer": functools.partial(_pool_initializer, mode=mode, trust=trust),
            "initargs": tuple(names)}
