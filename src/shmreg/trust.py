"""Which segment files a process agrees to use as tables.

A table's values go through pickle, so whoever can write a segment can run
code in every process that reads it.  A process therefore uses a segment
only if

- it is a regular file (never a symbolic link, a FIFO, a directory);
- it is owned by the process's effective uid, or by a user named in
  ``Trust(uids=...)``;
- it is not writable by the file's group unless that group is named in
  ``Trust(gids=...)``, or the caller asked for a group-shared ``mode``
  (``0o660``) and the group is the caller's effective group (or it is
  world-writable and accepted as such);
- it is not writable by every user unless the caller asked for a
  world-shared ``mode`` (``0o666``).

Anything else raises :class:`~shmreg.UntrustedTableError`, naming the file,
its owner, its mode and the fix.

Even a segment that passes is unpickled only when the caller is its only
writer; when anyone else can write it (another owner, a group, every user),
pickled values come back as opaque :class:`~shmreg.PickledValue` bytes
unless ``Trust(unpickle=True)``.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from typing import Iterable, Union

from shmreg.errors import UntrustedTableError

__all__ = ["Trust", "check_segment", "untrusted_error", "describe_owner"]

_Who = Union[int, str]


def _uid_of(who: _Who) -> int:
    if isinstance(who, bool) or not isinstance(who, (int, str)):
        raise TypeError(f"a trusted user is a uid (int) or a user name (str), not {who!r}")
    if isinstance(who, int) or who.isdigit():
        uid = int(who)
        if uid < 0:
            raise ValueError(f"not a uid: {who!r}")
        return uid
    import pwd

    try:
        return pwd.getpwnam(who).pw_uid
    except KeyError:
        raise ValueError(f"no user named {who!r}") from None


def _gid_of(who: _Who) -> int:
    if isinstance(who, bool) or not isinstance(who, (int, str)):
        raise TypeError(f"a trusted group is a gid (int) or a group name (str), not {who!r}")
    if isinstance(who, int) or who.isdigit():
        gid = int(who)
        if gid < 0:
            raise ValueError(f"not a gid: {who!r}")
        return gid
    import grp

    try:
        return grp.getgrnam(who).gr_gid
    except KeyError:
        raise ValueError(f"no group named {who!r}") from None


def _ids(value: _Who | Iterable[_Who], convert) -> frozenset:
    if isinstance(value, (int, str)):
        value = (value,)
    return frozenset(convert(v) for v in value)


@dataclass(frozen=True)
class Trust:
    """Who besides you may own or write a table you open: the explicit
    opt-in to share tables across users.

    :param uids: users (uids or names, or one of them) whose segment files
        you accept; kept as a frozenset of uids.
    :param gids: groups (gids or names, or one of them) that may have write
        access to a segment you accept (its group-write bit set, the file's
        group one of these); kept as a frozenset of gids.
    :param unpickle: unpickle the values of a table someone else can write.
        Unpickling runs code chosen by the writer, *as you*; without this,
        such values come back as opaque :class:`~shmreg.PickledValue` bytes.

    >>> t = Table("shared-jobs", mode=0o660, trust=Trust(uids=["deploy"], gids=["app"]))
    """

    uids: frozenset[int] | Iterable[int | str] = field(default=frozenset())
    gids: frozenset[int] | Iterable[int | str] = field(default=frozenset())
    unpickle: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "uids", _ids(self.uids, _uid_of))
        object.__setattr__(self, "gids", _ids(self.gids, _gid_of))
        if not isinstance(self.unpickle, bool):
            raise TypeError(f"unpickle must be a bool, not {type(self.unpickle).__name__}")


NO_TRUST = Trust()


def check_trust(trust: Trust | None) -> Trust:
    """``trust`` itself, or the default (nobody else) for ``None``."""
    if trust is None:
        return NO_TRUST
    if not isinstance(trust, Trust):
        raise TypeError(f"trust must be a shmreg.Trust, not {type(trust).__name__}")
    return trust


def check_mode(mode: int) -> int:
    """``mode`` if it is a plain permission mode (``0`` to ``0o777``)."""
    if isinstance(mode, bool) or not isinstance(mode, int):
        raise TypeError(f"mode must be an int such as 0o600, not {type(mode).__name__}")
    if not 0 <= mode <= 0o777:
        raise ValueError(f"mode must be a permission mode between 0o000 and 0o777, not {mode:#o}")
    return mode


def _user_name(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return "?"


def _group_name(gid: int) -> str:
    try:
        import grp

        return grp.getgrgid(gid).gr_name
    except (ImportError, KeyError):
        return "?"


def describe_owner(uid: int) -> str:
    """``"alice (uid 1000)"``."""
    return f"{_user_name(uid)} (uid {uid})"


def _kind(st: os.stat_result) -> str:
    m = st.st_mode
    for test, what in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(m):
            return what
    return "not a regular file"


def untrusted_error(name: str, path: str, st: os.stat_result, problem: str, fix: str
                    ) -> UntrustedTableError:
    """The error for segment ``path`` of table ``name``: who owns it, its
    mode, what is wrong and how to fix it."""
    owner = describe_owner(st.st_uid)
    me = describe_owner(os.geteuid())
    msg = (f"refusing table {name!r}: {path} is {problem}: owned by {owner}, "
           f"group {_group_name(st.st_gid)} (gid {st.st_gid}), mode {stat.S_IMODE(st.st_mode):#o}; "
           f"you are {me}. {fix}")
    err = UntrustedTableError(errno.EPERM, msg, path)
    err.owner_uid = st.st_uid
    err.mode = stat.S_IMODE(st.st_mode)
    return err


def _remove_hint(path: str) -> str:
    return (f"If it is not a table of yours, its owner (or root) can remove it "
            f"(rm {path}), or use another table name")


def check_segment(name: str, path: str, st: os.stat_result, *, mode: int, trust: Trust) -> bool:
    """Refuse segment ``path`` (``st``: its ``fstat``/``lstat``) unless this
    process may use it as table ``name``; return whether its pickled values
    may be unpickled here (True only when this process is its only writer,
    or ``trust.unpickle``).

    :raises UntrustedTableError: see the module docstring.
    """
    euid = os.geteuid()
    if not stat.S_ISREG(st.st_mode):
        raise untrusted_error(name, path, st, f"{_kind(st)}, not a table segment",
                              f"shmreg never follows links or opens special files. {_remove_hint(path)}.")
    if st.st_uid != euid and st.st_uid not in trust.uids:
        user = _user_name(st.st_uid)
        py, cli = f"trust=shmreg.Trust(uids=[{st.st_uid}])", f"--trust {user if user != '?' else st.st_uid}"
        if st.st_mode & stat.S_IWOTH:   # name all it takes, not one step at a time
            py, cli = f"mode=0o666, {py}", f"{cli} --mode 666"
        elif st.st_mode & stat.S_IWGRP:
            py = f"mode=0o660, trust=shmreg.Trust(uids=[{st.st_uid}], gids=[{st.st_gid}])"
            cli += f" --trust-group {st.st_gid} --mode 660"
        raise untrusted_error(
            name, path, st, "not yours",
            "Whoever controls a table can run code in the processes that read it (values are "
            f"pickles), so shmreg opens only your own. {_remove_hint(path)}; to share it with "
            f"that user on purpose: Table(name, {py}) (CLI: {cli}).")
    world = bool(st.st_mode & stat.S_IWOTH)
    if world and not mode & stat.S_IWOTH:
        raise untrusted_error(
            name, path, st, "writable by every user",
            "Any user could change its values and run code in your process (values are "
            f"pickles). If it should be private: chmod go-w {path}; to accept a world-writable "
            "table on purpose: Table(name, mode=0o666) (CLI: --mode 666).")
    # (A world-writable file accepted as such needs no say on its group.)
    if st.st_mode & stat.S_IWGRP and not world and st.st_gid not in trust.gids \
            and not (mode & stat.S_IWGRP and st.st_gid == os.getegid()):
        group = _group_name(st.st_gid)
        raise untrusted_error(
            name, path, st, f"writable by group {group}",
            "Every member of that group could change its values and run code in your process "
            f"(values are pickles). If it should be private: chmod g-w {path}; to share it with "
            f"that group on purpose: Table(name, mode=0o660, trust=shmreg.Trust(gids=[{st.st_gid}])) "
            f"(CLI: --trust-group {group if group != '?' else st.st_gid}).")
    only_writer = st.st_uid == euid and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    return only_writer or trust.unpickle


def is_own_file(st: os.stat_result) -> bool:
    """A regular file owned by this process's effective uid."""
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
