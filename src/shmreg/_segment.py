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
import stat
import tempfile
import time

from shmreg import _core
from shmreg._proc import start_time
from shmreg.errors import NoSpaceError, TableExistsError, TableNotFoundError
from shmreg.trust import NO_TRUST, Trust, check_segment, describe_owner, is_own_file, untrusted_error

PREFIX = "shmreg."
_INIT_PREFIX = ".shmreg-init."
# Never follow a link planted at a table's name, never block on a FIFO there.
_OPEN_FLAGS = (os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
               | getattr(os, "O_NONBLOCK", 0))
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
    # In a shared temp directory another user may have made this directory
    # first, to control every table we would put in it.
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise untrusted_error("*", d, st, "not a safe segment directory",
                              "It must be a directory of yours that no one else can write: "
                              "remove it, or set SHMREG_DIR to such a directory.")
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


def _reserve(fd: int, plan: dict, name: str) -> None:
    """Size the file for the table at its limit (sparse: only address space)
    and allocate what it uses from the start, so a full filesystem fails
    here, not as a SIGBUS on some later write.  Growth allocates the rest
    piece by piece, each before it is used."""
    size = plan["total_size"]
    try:
        os.ftruncate(fd, size)
        for off, length in plan["extents"]:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, off, length)
            else:  # macOS: no fallocate; write the zeros ourselves
                chunk = b"\0" * (1 << 20)
                end = off + length
                while off < end:
                    off += os.pwrite(fd, chunk[: min(len(chunk), end - off)], off)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            need = sum(length for _, length in plan["extents"])
            raise NoSpaceError(
                e.errno,
                f"no room for table {name!r}: it needs {need / 2**20:.1f} MiB in "
                f"{segment_dir()} ({os.strerror(e.errno)}); free space there, give "
                "the table less capacity/memory, or enlarge /dev/shm "
                "(docker: --shm-size)") from None
        raise


def _sweep_orphans(directory: str) -> None:
    """Remove init files of creators that died before publishing their table
    (only our own: a file of another user is not ours to judge, and its pid
    may be one of another pid namespace)."""
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
            path = os.path.join(directory, fn)
            try:
                if is_own_file(os.lstat(path)):
                    os.unlink(path)
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
    if os.path.lexists(final):  # a dangling link too: link() below would fail on it
        _exists(name, final)
    _sweep_orphans(directory)
    tmp = os.path.join(directory, f"{_INIT_PREFIX}{name}.{os.getpid()}.{secrets.token_hex(4)}")
    # O_EXCL: never through a file or link someone planted at our temp name.
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
                 | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)  # umask must not widen or narrow what was asked
        _reserve(fd, plan, name)
        seed = secrets.randbits(128)
        _core.init_segment(fd, plan, seed & (2**64 - 1), seed >> 64, os.getpid(),
                           start_time(os.getpid()) or 0, time.time_ns(), clock_bits)
        try:
            os.link(tmp, final)
        except FileExistsError:
            _exists(name, final)
    finally:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _exists(name: str, path: str) -> None:
    """Raise TableExistsError for ``path``, saying who owns it if not us."""
    msg = f"table {name!r} already exists"
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    if st is not None and not is_own_file(st):
        what = "a regular file" if stat.S_ISREG(st.st_mode) else "not a regular file"
        msg += f" ({path} is {what} owned by {describe_owner(st.st_uid)}, not a table of yours)"
    raise TableExistsError(errno.EEXIST, msg, path) from None


def open_fd(name: str, *, mode: int = 0o600, trust: Trust = NO_TRUST) -> tuple:
    """Open the segment of ``name`` read-write, if this process may use it.

    Returns ``(fd, unpickle)``: ``unpickle`` says whether its pickled values
    may be unpickled here (see :func:`shmreg.trust.check_segment`).

    :raises TableNotFoundError: no such table.
    :raises UntrustedTableError: a link, a special file, a file of another
        user or one writable by others (see :mod:`shmreg.trust`).
    """
    path = path_of(name)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise TableNotFoundError(errno.ENOENT, f"no table named {name!r}", path) from None
    except OSError:
        # ELOOP: a link (O_NOFOLLOW); EACCES: another user's file; EISDIR,
        # ENXIO ...: something else.  Say what is there and whose it is.
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise TableNotFoundError(errno.ENOENT, f"no table named {name!r}", path) from None
        if not is_own_file(st):
            check_segment(name, path, st, mode=mode, trust=trust)
        raise
    try:
        return fd, check_segment(name, path, os.fstat(fd), mode=mode, trust=trust)
    except BaseException:
        os.close(fd)
        raise


def unlink(name: str, *, trust: Trust = NO_TRUST) -> None:
    """Remove the name of table ``name``.  Processes that have it open keep
    using it; the memory is freed when the last one closes it.

    Only a file of this user (or of a user named in ``trust``) is removed:
    root unlinking another user's table must name that user.

    :raises TableNotFoundError: no such table.
    :raises UntrustedTableError: the file is another user's.
    """
    path = path_of(name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise TableNotFoundError(errno.ENOENT, f"no table named {name!r}", path) from None
    if st.st_uid != os.geteuid() and st.st_uid not in trust.uids:
        raise untrusted_error(
            name, path, st, "not yours",
            "shmreg removes only your own tables; to remove it anyway: "
            f"unlink(name, trust=shmreg.Trust(uids=[{st.st_uid}])) (CLI: --trust), or rm {path}.")
    try:
        os.unlink(path)
    except FileNotFoundError:
        raise TableNotFoundError(errno.ENOENT, f"no table named {name!r}", path) from None


def list_tables(*, all_users: bool = False) -> list:
    """Names of this user's tables (segment files owned by the effective
    uid) in the segment directory, sorted; every user's with ``all_users``."""
    directory = segment_dir()
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if not n.startswith(PREFIX):
            continue
        if not all_users:
            try:
                if not is_own_file(os.lstat(os.path.join(directory, n))):
                    continue
            except FileNotFoundError:
                continue
        out.append(n[len(PREFIX):])
    return sorted(out)


def owner_of(name: str) -> int | None:
    """uid owning the file at the name of table ``name`` (None: no file)."""
    try:
        return os.lstat(path_of(name)).st_uid
    except FileNotFoundError:
        return None
