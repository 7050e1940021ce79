"""Leases: how a process proves to the server that it is alive.

A process that owns entries of a Redis/Valkey table holds a lease key there
(``P:L:<token>``, PX ``lease_ttl``).  One daemon thread per process, the
heartbeat, renews every lease of the process every ``lease_ttl / 3``; a
lease it finds gone is never recreated: the process was paused or cut off
longer than its lease, its entries are gone, and its owned writes fail with
:class:`~shmreg.LeaseLostError` (fencing) until it takes a new lease.

The host's watcher deletes the lease of a local process the moment its pidfd
says it died; a whole host that dies loses its leases when they expire.
A process exiting normally drops its leases (``atexit``).

Which host a process is on: ``SHMREG_HOST_ID`` if set (tests simulate two
hosts on one machine with it), else the hostname and the kernel's boot id.
"""

from __future__ import annotations

import atexit
import os
import secrets
import socket
import threading
import weakref
from typing import Any

_handles: "weakref.WeakSet[Any]" = weakref.WeakSet()
_thread: threading.Thread | None = None
_wake = threading.Event()
_guard = threading.Lock()
TICK = 0.05


def host_id() -> str:
    """This host's identity in lease records (no spaces)."""
    env = os.environ.get("SHMREG_HOST_ID")
    if env:
        return env.replace(" ", "_")
    boot = ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()[:8]
    except OSError:
        pass
    return f"{socket.gethostname()}:{boot}".replace(" ", "_")


def new_token() -> str:
    """A fresh lease token (unguessable, so no process forges another's)."""
    return secrets.token_hex(8)


def track(handle: Any) -> None:
    """Have the heartbeat renew ``handle``'s leases (``handle._heartbeat()``,
    called when ``handle._next_beat`` is due)."""
    global _thread
    _handles.add(handle)
    with _guard:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="shmreg-redis-heartbeat", daemon=True)
            _thread.start()
    _wake.set()


def _run() -> None:
    import time

    while True:
        _wake.wait(TICK)
        _wake.clear()
        now = time.monotonic()
        for h in list(_handles):
            if h._next_beat <= now:
                try:
                    h._heartbeat()
                except Exception:  # a server outage: try again next tick
                    h._next_beat = now + TICK


def _after_fork_in_child() -> None:
    # The child is another process: it holds none of the parent's leases,
    # and the heartbeat thread did not come along.
    global _thread, _wake, _guard
    _thread = None
    _wake = threading.Event()
    _guard = threading.Lock()
    for h in list(_handles):
        h._forget_leases()
    _handles.clear()


def _at_exit() -> None:
    for h in list(_handles):
        try:
            h._drop_leases()
        except Exception:
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)
