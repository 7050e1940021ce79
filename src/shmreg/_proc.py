"""Process identity: a pid plus its start time, so pid reuse is detectable."""

from __future__ import annotations

import os
import sys


def _stat_fields(pid: int) -> list | None:
    """Fields of ``/proc/PID/stat`` after the command name (state first), or
    None if the process is gone.  The name may contain spaces and
    parentheses, so split after the last ')'."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(b")") + 2:].split()


def start_time(pid: int) -> int | None:
    """Start time of ``pid`` in an opaque integer unit, or None if it is gone.

    On Linux this is field 22 of ``/proc/PID/stat`` (clock ticks since boot),
    read without psutil because it is cheap and exact; elsewhere psutil's
    create time in microseconds.
    """
    if sys.platform.startswith("linux"):
        fields = _stat_fields(pid)
        return None if fields is None else int(fields[19])
    try:
        import psutil

        return int(psutil.Process(pid).create_time() * 1e6)
    except Exception:  # psutil.NoSuchProcess and friends
        return None


def is_alive(pid: int, started: int | None = None) -> bool:
    """True if ``pid`` runs, is not a zombie, and (if given) started at ``started``."""
    if pid <= 0:
        return False
    if sys.platform.startswith("linux"):
        fields = _stat_fields(pid)
        if fields is None or fields[0] in (b"Z", b"X"):
            return False
        return started is None or int(fields[19]) == started
    try:
        import psutil

        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or int(p.create_time() * 1e6) == started
    except Exception:
        return False
