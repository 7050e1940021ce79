"""Naming, creating, opening and unlinking table segments.

A table is one file in a shared-memory filesystem: ``/dev/shm/shmreg.<name>``
on Linux.  Elsewhere (macOS) it is a file in ``$TMPDIR/shmreg-<uid>``: a
mapped file there is just as shared, and plain files give us what
``shm_open`` cannot - an atomic "create fully initialised or not at all"
through ``link()``.  ``SHMREG_DIR`` overrides the directory (tests use it to
put tables on a tiny tmpfs).

Never the standard library's ``shared_memory`` module: its resource tracker unlinks
segments that other processes still use.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import tempfile
import time

from shmreg import _core
from shmreg._proc import start_time
from shmreg.errors import NoSpaceError, TableExistsError, TableNotFoundError

PREFIX = "shmreg."
_INIT_PREFIX = ".shmreg-init."
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
MAX_NAME = 200


def segment_dir() -> str:
    """The directory holding table segments on this host."""
    env = os.environ.get("SHMREG_DIR")
    if env:
        return env
    if os.path.isdir("/dev/shm"):
        return "/dev/shm"
    d = os.path.join(tempfile.gettempdir(), f"shmreg-{os.getuid()}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def check_name(name) -> str:
    """Return ``name`` if it is a valid table name, else raise.

    :raises TypeError: not a str.
    :raises ValueError: empty, too long, or with characters other than
        letters, digits, ``_``, ``.``, ``-`` (so no path separators and no
        ``..``), or starting with ``.`` or ``-``.
    """
    if not isinstance(name, str):
        raise TypeError(f"table name must be a str, not {type(name).__name__}")
    if not name or len(name) > MAX_NAME:
        raise ValueError(f"table name must be 1 to {MAX_NAME} characters, got {len(name)}")
    if not _NAME_RE.match(name) or ".." in name:
        raise ValueError(
            f"invalid table name {name!r}: use letters, digits, '_', '.', '-' "
            "(no path separators, no '..', not starting with '.' or '-')")
    return name


def path_of(name: str) -> str:
    return os.path.join(segment_dir(), PREFIX + check_name(name))


def _reserve(fd: int, size: int, name: str) -> None:
    """Allocate every page now, so a full filesystem fails here, not as a
    SIGBUS on some later write."""
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:  # macOS: no fallocate; write the zeros ourselves
            os.ftruncate(fd, size)
            chunk = b"\0" * (1 << 20)
            off = 0
            while off < size:
                off += os.pwrite(fd, chunk[: min(len(chunk), size - off)], off)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise NoSpaceError(
                e.errno,
                f"no room for table {name!r}: it needs {size / 2**20:.1f} MiB in "
                f"{segment_dir()} ({os.strerror(e.errno)}); free space there, give "
                "the table less capacity/memory, or enlarge /dev/shm "
                "(docker: --shm-size)") from None
        raise


def _sweep_orphans(directory: str) -> None:
    """Remove init files of creators that died before publishing their table."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for fn in names:
        if not fn.startswith(_INIT_PREFIX):
            continue
        try:
            pid = int(fn.rsplit(".", 2)[-2])
        except (ValueError, IndexError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            try:
                os.unlink(os.path.join(directory, fn))
            except OSError:
                pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create(name: str, plan: dict, mode: int, clock_bits: bool = False) -> None:
    """Create and publish a fully initialised segment, or raise TableExistsError.

    The segment is built under a private name and then hard-linked to its
    public name: ``link`` fails if the name exists, so concurrent creators
    race safely and no opener ever sees a half-initialised table.
    """
    final = path_of(name)
    directory = os.path.dirname(final)
    if os.path.exists(final):
        raise TableExistsError(errno.EEXIST, f"table {name!r} already exists", final)
    _sweep_orphans(directory)
    tmp = os.path.join(directory, f"{_INIT_PREFIX}{name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        os.fchmod(fd, mode)  # umask must not widen or narrow what was asked
        _reserve(fd, plan["total_size"], name)
        seed = secrets.randbits(128)
        _core.init_segment(fd, plan, seed & (2**64 - 1), seed >> 64, os.getpid(),
                           start_time(os.getpid()) or 0, time.time_ns(), clock_bits)
        try:
            os.link(tmp, final)
        except FileExistsError:
            raise TableExistsError(errno.EEXIST, f"table {name!r} already exists", final) from None
    finally:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass


def open_fd(name: str) -> int:
    """Open the segment of ``name`` read-write; TableNotFoundError if missing."""
    path = path_of(name)
    try:
        return os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise TableNotFoundError(errno.ENOENT, f"no table named {name!r}", path) from None


def unlink(name: str) -> None:
    """Remove the name of table ``name``.  Processes that have it open keep
    using it; the memory is freed when the last one closes it.

    :raises TableNotFoundError: no such table.
    """
    path = path_of(name)
    try:
        os.unlink(path)
    except FileNotFoundError:
        raise TableNotFoundError(errno.ENOENT, f"no table named {name!r}", path) from None


def list_tables() -> list:
    """Names of the tables on this host (in this user's segment directory), sorted."""
    try:
        names = os.listdir(segment_dir())
    except FileNotFoundError:
        return []
    return sorted(n[len(PREFIX):] for n in names if n.startswith(PREFIX))
