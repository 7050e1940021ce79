"""pytest plugin: shared-memory tables for tests, and ``wait_for``.

Installed with shmreg and loaded by pytest automatically (entry point
``pytest11: shmreg``; disable with ``-p no:shmreg``).  It only defines
fixtures: nothing is created, imported from the core or started until a
test asks for one.

Fixtures:

* ``shm_table`` - a fresh :class:`shmreg.Table` with a unique name, closed
  and **unlinked at teardown whatever the test's outcome**.  Options
  (``capacity``, ``memory``, ``shards``, ``clock``, ``mode``) through
  indirect parametrization::

      @pytest.mark.parametrize("shm_table", [{"capacity": 100}], indirect=True)
      def test_small(shm_table): ...

* ``shm_table_factory`` - ``make(**options) -> Table``, for tests that need
  several tables or options computed in the test; every table it made is
  unlinked at teardown.

Helper (a plain function, import it): :func:`wait_for` polls a condition
until it holds, instead of ``time.sleep`` in tests that wait for another
process.
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Any, Callable, TypeVar

import pytest

__all__ = ["wait_for", "WaitTimeout", "unique_table_name", "DEFAULT_TABLE_OPTIONS"]

T = TypeVar("T")

#: Options of a ``shm_table`` when the test gives none: small, quick to
#: create, still holds a 64 KiB value.
DEFAULT_TABLE_OPTIONS: dict = {"capacity": 10_000, "memory": 4 << 20}


class WaitTimeout(AssertionError, TimeoutError):
    """:func:`wait_for` gave up: both an ``AssertionError`` (a test failure,
    reported as such by pytest) and a ``TimeoutError``."""


def wait_for(condition: Callable[[], T], timeout: float = 5.0, interval: float = 0.005,
             message: str | None = None) -> T:
    """Call ``condition()`` until it returns something truthy; return that.

    Checked once more at the deadline, so a condition that holds in time is
    never reported as a timeout.  Exceptions raised by ``condition``
    propagate at once (wrap it if some are expected).

    :param timeout: seconds to keep trying.
    :param interval: seconds between two calls.
    :param message: what was awaited, for the failure message.
    :raises WaitTimeout: (an ``AssertionError`` and a ``TimeoutError``)
        still falsy after ``timeout`` seconds; the message names what was
        awaited and the last value seen.

    >>> t["ready"] = False
    >>> wait_for(lambda: t.get("ready") is False, timeout=1)
    True
    >>> wait_for(lambda: t.get("ready"), timeout=0.05, message="worker ready")
    Traceback (most recent call last):
    ...
    shmreg.testing.WaitTimeout: timed out after 0.05 s waiting for worker ready (last value: False)
    """
    if not callable(condition):
        raise TypeError(f"condition must be callable, not {type(condition).__name__}")
    if timeout < 0:
        raise ValueError("timeout must be >= 0")
    if interval <= 0:
        raise ValueError("interval must be > 0")
    deadline = time.monotonic() + timeout
    calls = 0
    while True:
        value = condition()
        calls += 1
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    what = message or _describe(condition)
    raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what} (last value: {value!r})"
                      + ("" if calls > 1 else "; checked once"))


def _describe(condition: Callable) -> str:
    name = getattr(condition, "__qualname__", None) or repr(condition)
    return f"condition {name}"


def unique_table_name(tag: str = "pytest") -> str:
    """A table name no other test, process or run uses (short enough for
    macOS's 31-character ``shm_open`` limit)."""
    return f"{tag}-{os.getpid()}-{secrets.token_hex(4)}"


class _Tables:
    """Tables made for one test; all unlinked at teardown."""

    def __init__(self) -> None:
        self.made: list = []

    def make(self, **options: Any):
        from shmreg.table import Table  # not at plugin import: projects without shmreg fixtures pay nothing

        name = options.pop("name", None) or unique_table_name()
        for key, value in DEFAULT_TABLE_OPTIONS.items():
            options.setdefault(key, value)
        table = Table.create(name, **options)
        self.made.append(table)
        return table

    def cleanup(self) -> None:
        from shmreg.errors import TableNotFoundError

        errors = []
        for table in self.made:
            # Unlink first: even if closing fails, the segment is gone.
            try:
                table.unlink()
            except TableNotFoundError:
                pass  # the test unlinked it itself
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)
            try:
                table.close()
            except Exception as exc:  # pragma: no cover
                errors.append(exc)
        self.made.clear()
        if errors:
            raise errors[0]


@pytest.fixture
def shm_table_factory():
    """``make(**options) -> shmreg.Table``: fresh tables with unique names
    (``name=`` to choose one), each unlinked at teardown.  Options default to
    ``DEFAULT_TABLE_OPTIONS`` (capacity 10,000, 4 MiB)."""
    tables = _Tables()
    try:
        yield tables.make
    finally:
        tables.cleanup()


@pytest.fixture
def shm_table(request, shm_table_factory):
    """A fresh :class:`shmreg.Table` with a unique name, unlinked at teardown
    even when the test fails.  Parametrize indirectly with a dict of options
    (``capacity``, ``memory``, ``shards``, ``clock``, ``mode``)."""
    options = getattr(request, "param", None) or {}
    if not isinstance(options, dict):
        raise TypeError("shm_table is parametrized with a dict of Table options, "
                        f"not {type(options).__name__}")
    return shm_table_factory(**options)
