"""The Redis/Valkey backend: ``shmreg.Table(name, url="redis://host:6379/0")``.

Modules, one job each: ``connection`` (URL -> client, eviction-policy
check, scripts registered per client), ``scripts`` (the Lua, and the key
layout), ``codec`` (keys and values as Redis strings), ``leases`` (host
identity, heartbeat thread), ``core`` (the backend primitives),
``table`` (:class:`RedisTable`: lifecycle and introspection).
"""

from shmreg.backends.redis.table import RedisTable, list_tables
from shmreg.table import Table

# isinstance(t, shmreg.Table) holds for a Redis table too.
Table.register(RedisTable)

__all__ = ["RedisTable", "list_tables"]
