"""Shared fixtures: unique table names that are always unlinked."""

from __future__ import annotations

import pytest

import shmreg
from _helpers import unique_name


@pytest.fixture
def table_name():
    """A fresh table name; whatever table gets that name is unlinked afterwards."""
    name = unique_name()
    yield name
    try:
        shmreg.unlink(name)
    except shmreg.TableNotFoundError:
        pass


@pytest.fixture
def table(table_name):
    """A small fresh table (capacity 10,000, 4 MiB)."""
    t = shmreg.Table.create(table_name, capacity=10_000, memory=4 << 20)
    yield t
    t.close()
