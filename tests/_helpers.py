"""Helpers for tests that run real child processes."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import tempfile
import textwrap

_counter = itertools.count()


def unique_name(tag: str = "t") -> str:
    """A table name no other test (or test run) uses."""
    return f"test-{tag}-{os.getpid()}-{next(_counter)}"


def run_py(code: str, *args: str, env: dict | None = None, timeout: float = 60,
           check: bool = True) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (``sys.argv[1:] == args``)."""
    full_env = dict(os.environ)
    full_env.pop("SHMREG_CRASH_AT", None)
    if env:
        full_env.update(env)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def spawn_py(code: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    """Start ``code`` in a fresh interpreter without waiting for it."""
    full_env = dict(os.environ)
    full_env.pop("SHMREG_CRASH_AT", None)
    if env:
        full_env.update(env)
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env)


def wait_until(pred, timeout: float = 10.0, what: str = "condition", interval: float = 0.005):
    """``shmreg.testing.wait_for`` in the positional order these tests use
    (predicate, timeout, what is awaited)."""
    from shmreg.testing import wait_for

    return wait_for(pred, timeout=timeout, interval=interval, message=what)


def layout_struct(struct_name: str, fields) -> tuple:
    """``(struct format, {field: (offset, format)})`` for the named fields of a
    segment struct, in order, with pad bytes between them: built from
    ``shmreg._core.LAYOUT`` (generated from engine/shm_layout.h), so the
    tests never spell the layout out themselves."""
    import struct as _struct

    from shmreg import _core

    codes = {1: "B", 2: "H", 4: "I", 8: "Q"}
    fmt, pos, offsets = "<", 0, {}
    for field in fields:
        off, size = _core.LAYOUT[f"{struct_name}.{field}"]
        assert off >= pos, f"{struct_name}.{field} out of order"
        if off > pos:
            fmt += f"{off - pos}x"
        fmt += codes[size]
        offsets[field] = (off, "<" + codes[size])
        pos = off + size
    assert _struct.calcsize(fmt) == pos
    return fmt, offsets


def stop_process_tree(proc, leftovers=(), timeout: float = 15, sig=None) -> None:
    """Stop a server started by a test: send it ``sig`` (SIGTERM by default)
    and wait at most ``timeout`` s, then SIGKILL; then SIGKILL the children
    it may have left behind (``leftovers``: pids read before it was told to
    stop)."""
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM if sig is None else sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def unlink_tables(prefix: str) -> None:
    """Unlink every table whose name starts with ``prefix``."""
    import shmreg

    for name in shmreg.list_tables():
        if name.startswith(prefix):
            try:
                shmreg.unlink(name)
            except shmreg.TableNotFoundError:
                pass


@contextlib.contextmanager
def mounted_tmpfs(size: str, prefix: str = "shmreg-tmpfs-"):
    """A tmpfs of ``size`` ("8m") mounted on a fresh directory for the block,
    unmounted after it; needs CAP_SYS_ADMIN (root), which CI has (skips
    elsewhere, saying why)."""
    import pytest

    d = tempfile.mkdtemp(prefix=prefix)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d],
                       capture_output=True, text=True)
    if r.returncode != 0:
        os.rmdir(d)
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", d], check=True)
        os.rmdir(d)
