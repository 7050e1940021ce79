"""Table metrics: one snapshot dict for ``shmreg ls`` / ``shmreg top``, and
the Prometheus text exposition format for ``shmreg stat --prometheus``.

>>> print(prometheus_text(t))                     # doctest: +SKIP
# HELP shmreg_entries Live entries (expired and dead-owned ones excluded).
# TYPE shmreg_entries gauge
shmreg_entries{table="jobs"} 3
...

Every metric carries a ``table`` label, so the output of several tables can
be concatenated into one scrape (``prometheus_text([t1, t2])`` writes each
``# HELP``/``# TYPE`` once).  Counters are the table's shared counters
(exact, kept by writers), except ``reads_hit_total``/``reads_missed_total``:
table-wide but *sampled* (each reading process adds 64 once per 64 of its
own reads, so each process contributes up to 63 less than it did).
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Union

from shmreg.table import Table

__all__ = ["table_metrics", "prometheus_text", "METRICS"]

#: ``(metric name, type, metrics-dict key, help)``, in exposition order.
METRICS: tuple = (
    ("shmreg_entries", "gauge", "entries",
     "Live entries (expired and dead-owned ones excluded)."),
    ("shmreg_capacity", "gauge", "capacity", "Most entries the table holds (its limit)."),
    ("shmreg_bytes_used", "gauge", "bytes_used", "Arena bytes in use by items (keys, values, headers)."),
    ("shmreg_bytes_free", "gauge", "bytes_free", "Arena bytes not in use by items."),
    ("shmreg_segment_bytes", "gauge", "segment_bytes",
     "Bytes the shared-memory segment holds in its filesystem (allocated)."),
    ("shmreg_bytes_reserved", "gauge", "bytes_reserved",
     "Address space reserved for the table at its limits (the sparse file's size)."),
    ("shmreg_growth_events_total", "counter", "growth_events",
     "Index or arena growth steps of the table's shards."),
    ("shmreg_shrink_events_total", "counter", "shrink_events",
     "Index shrinks and arena pages given back by compaction."),
    ("shmreg_sets_total", "counter", "sets", "Stores (set, insert, counter update) since creation."),
    ("shmreg_deletes_total", "counter", "deletes", "Deletes since creation."),
    ("shmreg_evictions_total", "counter", "evictions", "Live entries evicted to make room."),
    ("shmreg_expirations_total", "counter", "expirations", "Expired entries removed."),
    ("shmreg_reads_hit_total", "counter", "reads_hit",
     "Reads that found their key, all processes (sampled: +64 per 64 reads of a process)."),
    ("shmreg_reads_missed_total", "counter", "reads_missed",
     "Reads that missed, all processes (sampled: +64 per 64 reads of a process)."),
    ("shmreg_repairs_total", "counter", "repairs",
     "Shard repairs after a writer died holding a lock."),
    ("shmreg_owner_processes", "gauge", "owner_processes",
     "Live processes holding a slot (owned entries, registrations, watcher)."),
    ("shmreg_watcher_active", "gauge", "watcher_active", "1 if a watcher holds the lease, else 0."),
)


def table_metrics(table: Table) -> dict:
    """A snapshot of ``table``: its ``stats()`` (without this process's own
    read counters, meaningless to an observer) plus ``load_factor``
    (entries / capacity), ``memory_used_ratio``, ``owner_pids`` (live owner
    processes, sorted), ``watcher_active`` (bool) and ``time`` (monotonic
    seconds of the snapshot, for rates)."""
    st = table.stats()
    for k in ("hits", "misses", "read_retries", "lock_fallbacks"):
        st.pop(k, None)
    procs = table._proc_table()
    total = st["bytes_used"] + st["bytes_free"]
    st["load_factor"] = st["entries"] / st["capacity"] if st["capacity"] else 0.0
    st["memory_used_ratio"] = st["bytes_used"] / total if total else 0.0
    st["owner_pids"] = sorted({p["pid"] for p in procs if p["alive"]})
    st["watcher_active"] = st["watcher_pid"] is not None
    st["time"] = time.monotonic()
    return st


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


def prometheus_text(table: Union[Table, Iterable[Table], dict, Iterable[dict]]) -> str:
    """The metrics of ``table`` (a Table, a ``table_metrics`` dict, or an
    iterable of either) in the Prometheus text exposition format (0.0.4):
    ``# HELP`` and ``# TYPE`` once per metric, then one sample line
    ``name{table="NAME"} value`` per table that reports it (a Redis table
    has no segment: no ``shmreg_segment_bytes``).  Ends with a newline."""
    if isinstance(table, (Table, dict)):
        table = [table]
    snaps = [t if isinstance(t, dict) else table_metrics(t) for t in table]
    lines = []
    for name, kind, key, help_ in METRICS:
        # A backend exposes what it tracks: a Redis table has no segment.
        have = [s for s in snaps if s.get(key) is not None]
        if not have:
            continue
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for s in have:
            lines.append(f'{name}{{table="{_label(s["name"])}"}} {_number(s[key])}')
    return "\n".join(lines) + "\n"
