"""shmreg: an ETS-style hash table in shared memory for Python processes on one host.

>>> import shmreg
>>> t = shmreg.Table("jobs")          # open, or create if missing
>>> t["job-1"] = {"state": "queued"}
>>> t.update_counter("jobs:done")
1
"""

from shmreg import _core
from shmreg.cache import Cache
from shmreg.errors import (
    AlreadyRegisteredError,
    AccessDeniedError,
    BackendUnavailableError,
    ConfigMismatchError,
    ConfigMismatchWarning,
    CorruptTableError,
    Error,
    EvictionPolicyWarning,
    IncompatibleTableError,
    LeaseLostError,
    NoSpaceError,
    TableExistsError,
    TableFullError,
    TableNotFoundError,
    UntrustedTableError,
    ValueTooLargeError,
)
from shmreg.registry import Registration, Registry
from shmreg.table import DEFAULT_CAPACITY, Table, list_tables, temporary, unlink
from shmreg.trust import Trust
from shmreg.watcher import Watcher

#: Sentinel for "no default given" (``pop``/``take``); ``get(k, MISSING)``
#: returns it for an absent key.
MISSING = _core.MISSING

#: A pickled value handed back unpickled (opaque ``bytes``) because others can
#: write the table (see :class:`Trust`); ``pickle.loads`` it if you trust it.
PickledValue = _core.PickledValue

__version__ = "0.1.0"

__all__ = [
    "Table",
    "Registry",
    "Registration",
    "Watcher",
    "Cache",
    "Trust",
    "PickledValue",
    "unlink",
    "list_tables",
    "temporary",
    "MISSING",
    "DEFAULT_CAPACITY",
    "Error",
    "TableExistsError",
    "TableNotFoundError",
    "TableFullError",
    "ValueTooLargeError",
    "IncompatibleTableError",
    "CorruptTableError",
    "NoSpaceError",
    "AlreadyRegisteredError",
    "ConfigMismatchError",
    "ConfigMismatchWarning",
    "UntrustedTableError",
    "AccessDeniedError",
    "BackendUnavailableError",
    "LeaseLostError",
    "EvictionPolicyWarning",
]
