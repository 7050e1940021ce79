"""One table per worker process of a ``multiprocessing`` pool.

A ``Pool`` (or ``ProcessPoolExecutor``) initializer attaches the worker to a
table once; tasks get it with :func:`table`::

    import multiprocessing, shmreg, shmreg.mp

    def work(job):
        shmreg.mp.table().update_counter("jobs:done")

    if __name__ == "__main__":
        shmreg.Table("jobs")                            # the parent creates it
        with multiprocessing.Pool(4, initializer=shmreg.mp.attach, initargs=("jobs",)) as pool:
            pool.map(work, range(1000))

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

from shmreg.table import Table
from shmreg.trust import Trust

__all__ = ["attach", "table", "detach", "pool_kwargs"]

_lock = threading.Lock()
_name: str | None = None
_table: Table | None = None
_pid: int | None = None
_options: dict[str, Any] = {}


def attach(name: str, *, mode: int = 0o600, trust: Trust | None = None) -> Table:
    """Attach this process to the existing table ``name`` (a ``Pool``
    initializer: ``Pool(initializer=shmreg.mp.attach, initargs=(name,))``).
    ``mode`` and ``trust``: as for :meth:`Table.open` (a table shared with
    other users; :func:`pool_kwargs` passes them on).

    Opens, never creates: a worker must not create a table of its own under a
    typo'd name.  Calling it again with the same name returns the same table.
    :raises TableNotFoundError: the parent has not created it.

    >>> shmreg.mp.attach("jobs").name
    'jobs'
    """
    global _name, _table, _pid, _options
    pid = os.getpid()
    with _lock:
        if _table is not None and _pid == pid and _name == name and not _table.closed:
            return _table  # idempotent
    t = Table.open(name, mode=mode, trust=trust)
    with _lock:
        # A previous table is not closed: code of this process may still use it.
        _name, _table, _pid, _options = name, t, pid, {"mode": mode, "trust": trust}
    return t


def table() -> Table:
    """The table this process attached with :func:`attach`.

    In a ``fork`` child of an attached process, re-attaches first (by name).
    :raises RuntimeError: :func:`attach` was never called in this process or
        an ancestor.

    >>> shmreg.mp.table().update_counter("hits")
    1
    """
    t = _table
    if t is not None and _pid == os.getpid():
        return t
    with _lock:
        if _name is None:
            raise RuntimeError("no shmreg table attached in this process: start the pool with "
                               "Pool(initializer=shmreg.mp.attach, initargs=(name,)) "
                               "or call shmreg.mp.attach(name) first")
        name, options = _name, _options
    if _pid != os.getpid():
        return attach(name, **options)
    return _table  # type: ignore[return-value]


def detach() -> None:
    """Forget (and close, if this process opened it) the attached table."""
    global _name, _table, _pid
    with _lock:
        old, pid = _table, _pid
        _name = _table = _pid = None
    if old is not None and pid == os.getpid():
        old.close()


def pool_kwargs(name: str, *, mode: int = 0o600, trust: Trust | None = None) -> dict[str, Any]:
    """``initializer``/``initargs`` for ``Pool(**pool_kwargs(name))`` or
    ``ProcessPoolExecutor(**pool_kwargs(name))``; ``mode`` and ``trust`` go
    to :func:`attach`.

    >>> pool = multiprocessing.Pool(4, **shmreg.mp.pool_kwargs("jobs"))
    """
    if mode == 0o600 and trust is None:
        return {"initializer": attach, "initargs": (name,)}
    return {"initializer": functools.partial(attach, mode=mode, trust=trust), "initargs": (name,)}

