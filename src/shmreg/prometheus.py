"""prometheus_client's multiprocess mode with the values in one shmreg table.

The application's metric objects stay prometheus_client's own (``Counter``,
``Gauge``, ``Histogram``, ``Summary``, ``Info``, ``Enum``); only where their
numbers live changes: in one shared-memory table instead of one mmap file per metric type
per process id.  Switch it on once, before the first metric is created::

    import shmreg.prometheus
    shmreg.prometheus.enable(table="metrics")      # or SHMREG_PROMETHEUS_TABLE=metrics

and scrape with the collector, as with ``MultiProcessCollector``::

    from prometheus_client import CollectorRegistry, generate_latest
    registry = CollectorRegistry()
    shmreg.prometheus.ShmregCollector(registry)
    generate_latest(registry)

How the values are kept (the design, and why):

* **Counters, histograms, summaries and ``sum`` gauges: one shared entry per
  series**, into which every process adds directly: an integral amount with
  the table's atomic ``update_counter`` (one locked write, exact), a
  fractional one (histogram and summary ``_sum``) with a compare-and-swap
  loop on a float entry.  Nothing is per process, so nothing has to be
  folded when a worker dies, the table does not grow with restarts, and a
  worker SIGKILLed at any instant has either added its increment or not:
  totals are exact and never go backwards.  (The alternative, per-process
  entries folded into a total when the process is reaped, needs a fold that
  is atomic across two entries; a reaper killed between "add to total" and
  "delete the process's entry" double-counts or loses.)
* **Gauges in ``all``/``liveall``/``live*`` modes: one entry per process**,
  keyed by pid; the ``live*`` ones are *owned* entries, so they vanish from
  every read the moment their process dies, however it dies.
* **Gauges in ``min``/``max``/``mostrecent`` modes** (which keep the last
  value of dead processes): one plain entry per process incarnation plus
  one owned *marker* entry per process; when a scrape (or
  :func:`mark_process_dead`) finds an incarnation whose marker is gone, it
  folds that value into one per-series entry for the dead (min, max or
  latest: folding twice changes nothing) and deletes it.
* **Info and Enum** (which prometheus_client's multiprocess mode does not
  export at all): one entry per series holding the latest ``info()`` /
  ``state()`` of any process, written by wrappers :func:`enable` installs
  on ``Info`` and ``Enum`` (prometheus_client has no value class for
  them); :func:`disable` removes them.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import threading
import time
import warnings
import weakref
from typing import Any, Iterable, Optional, Union

from shmreg import _core
from shmreg.table import Table

try:
    from prometheus_client import values as _pc_values
    from prometheus_client.metrics_core import Metric
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.registry import REGISTRY, CollectorRegistry
except ImportError as _e:  # pragma: no cover - exercised only without the extra
    raise ImportError("shmreg.prometheus needs prometheus_client: "
                      "pip install 'shmreg[prometheus]'") from _e

__all__ = ["enable", "disable", "enabled", "ShmregCollector", "make_registry",
           "mark_process_dead", "child_exit", "ENV_TABLE", "ShmregValue"]

#: Environment variable naming the table; ``import shmreg.prometheus`` then
#: calls :func:`enable` with it.
ENV_TABLE = "SHMREG_PROMETHEUS_TABLE"

# Key layout: kind SEP typ SEP mode SEP process SEP prometheus_client's own
# mmap key (json [metric_name, name, labels, help]).  The unit separator
# cannot occur in the first four fields.
_SEP = "\x1f"
_SHARED_INT = "i"      # integral part of a shared series (update_counter)
_SHARED_FLOAT = "f"    # fractional part of a shared series (compare-and-swap)
_PROCESS = "p"         # a gauge's value in one process
_DEAD = "d"            # min/max/mostrecent of the dead incarnations of a series
_MARKER = "m"          # owned: "this incarnation is alive"
_LATEST = "s"          # Info / Enum: the latest info() / state() of any process

_LIVE_MODES = frozenset(("liveall", "livemin", "livemax", "livesum", "livemostrecent"))
_FOLDED_MODES = frozenset(("min", "max", "mostrecent"))
_MOST_RECENT = frozenset(("mostrecent", "livemostrecent"))
_MAX_EXACT_INT = 1 << 53   # integral floats beyond this are not exact ints anyway

_pack_vt = struct.Struct("<dd").pack
_unpack_vt = struct.Struct("<dd").unpack


def _mmap_key(metric_name: str, name: str, labelnames: Any, labelvalues: Any, help_text: str) -> str:
    # The same text prometheus_client writes into its files (mmap_dict.mmap_key).
    return json.dumps([metric_name, name, dict(zip(labelnames, labelvalues)), help_text],
                      sort_keys=True)


class _State:
    """This process's switch: the table, and who this process is."""

    def __init__(self) -> None:
        self.table: Optional[Table] = None
        self.values: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self.previous_value_class: Any = None
        self.patched: Optional[dict] = None      # the original Info/Enum methods
        self._new_incarnation()

    def _new_incarnation(self) -> None:
        # A fork child is a new incarnation: new pid, new token, no marker yet.
        self.generation = getattr(self, "generation", 0) + 1
        self.pid = os.getpid()
        self.incarnation = f"{self.pid}.{secrets.token_hex(4)}"
        self.marker_written = False

    def marker_key(self) -> str:
        return _SEP.join((_MARKER, "", "", self.incarnation, ""))

    def ensure_marker(self, table: Table) -> None:
        if not self.marker_written:
            table.set(self.marker_key(), self.pid, owned=True)
            self.marker_written = True


_state = _State()

# One lock for every value of this process, as prometheus_client's
# multiprocess mode has: a value's table write and its process-local share
# must change together (a ``sum`` gauge's set() adds the difference from
# the local share), and the at-fork reset must not race an update.
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()     # another thread may have held it at fork time
    _state._new_incarnation()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _reset_after_fork() -> None:
    """First use of any value in a forked child (called with ``_lock`` held):
    start this process's values from zero, as prometheus_client does when it
    sees a new pid (it opens new files and writes every known series)."""
    for v in list(_state.values):
        if v._generation != _state.generation:
            v._reset()


def _integral(amount: Any) -> Optional[int]:
    """``amount`` as an int if it is integral and within +-2**53 (so the int
    entry never overflows and its float conversion is exact), else None."""
    if isinstance(amount, int):
        return int(amount) if -_MAX_EXACT_INT <= amount <= _MAX_EXACT_INT else None
    amount = float(amount)
    if amount.is_integer() and -_MAX_EXACT_INT <= amount <= _MAX_EXACT_INT:
        return int(amount)
    return None


def _add_float(table: Table, fkey: str, amount: float) -> None:
    """Add a float to a float entry with a compare-and-swap loop (exact: every
    process's addition lands once)."""
    while True:
        raw = table._get_raw(fkey)
        if raw is None:
            if table.insert_new(fkey, amount):
                return
            continue
        # Compare-and-swap on the stored bytes: a NaN or -0.0 compares as itself.
        if table._cas_raw(fkey, raw[0], raw[1], _core.decode_raw(raw[0], raw[1]) + amount):
            return


class _SharedValue:
    """A counter, histogram or summary value (and a ``sum`` gauge): one entry
    per series shared by every process.  ``get()`` is this process's own
    share, as in prometheus_client's multiprocess mode."""

    _multiprocess = True
    __slots__ = ("_table", "_ikey", "_fkey", "_int", "_float", "_generation", "__weakref__")

    def __init__(self, table: Table, typ: str, mode: str, key: str) -> None:
        self._table = table
        self._ikey = _SEP.join((_SHARED_INT, typ, mode, "", key))
        self._fkey = _SEP.join((_SHARED_FLOAT, typ, mode, "", key))
        self._reset()

    def _reset(self) -> None:
        self._int = 0
        self._float = 0.0
        self._generation = _state.generation
        # The series shows up (at 0) as soon as a process creates it.
        self._table.update_counter(self._ikey, 0)

    def inc(self, amount: float) -> None:
        with _lock:
            if self._generation != _state.generation:
                _reset_after_fork()
            # Integral amounts (every count and bucket, most counters) take the
            # atomic int path; fractional ones (a histogram's _sum) the float entry.
            n = amount if (amount.__class__ is int and -_MAX_EXACT_INT <= amount <= _MAX_EXACT_INT
                           ) else _integral(amount)
            if n is not None:
                self._table.update_counter(self._ikey, n)
                self._int += n
            else:
                _add_float(self._table, self._fkey, float(amount))
                self._float += float(amount)

    def set(self, value: float, timestamp: Optional[float] = None) -> None:
        # This process's share becomes ``value``: add the difference (a
        # counter's reset(), a sum gauge's set()).  The integral part lives in
        # the int entry, so integral gauges stay exact however often they are set.
        with _lock:
            if self._generation != _state.generation:
                _reset_after_fork()
            n = _integral(value)
            new_int, new_float = (self._int, float(value) - self._int) if n is None else (n, 0.0)
            if new_int != self._int:
                self._table.update_counter(self._ikey, new_int - self._int)
            if new_float != self._float:
                _add_float(self._table, self._fkey, new_float - self._float)
            self._int, self._float = new_int, new_float

    def set_exemplar(self, exemplar: Any) -> None:
        return  # as prometheus_client's multiprocess mode: exemplars are not kept

    def get(self) -> float:
        with _lock:
            if self._generation != _state.generation:
                _reset_after_fork()
            return float(self._int) + self._float

    def get_exemplar(self) -> None:
        return None


class _ProcessValue:
    """A gauge value of this process in ``all``, ``live*``, ``min``, ``max``
    or ``mostrecent`` mode: one entry per process (owned in live modes)."""

    _multiprocess = True
    __slots__ = ("_table", "_mode", "_key", "_tail", "_owned", "_folded", "_most_recent",
                 "_value", "_timestamp", "_generation", "__weakref__")

    def __init__(self, table: Table, mode: str, key: str) -> None:
        self._table = table
        self._mode = mode
        self._tail = key
        self._owned = mode in _LIVE_MODES
        self._folded = mode in _FOLDED_MODES
        self._most_recent = mode in _MOST_RECENT
        self._reset()

    def _reset(self) -> None:
        self._generation = _state.generation
        # all/liveall show a pid label: key them by pid.  The folded modes
        # outlive their process until folded: key them by incarnation so a
        # reused pid cannot overwrite a value not folded yet.
        proc = _state.incarnation if self._folded else str(_state.pid)
        self._key = _SEP.join((_PROCESS, "gauge", self._mode, proc, self._tail))
        self._value = 0.0
        self._timestamp = 0.0
        self._write()

    def _write(self) -> None:
        if self._folded:
            _state.ensure_marker(self._table)
        value = _pack_vt(self._value, self._timestamp) if self._most_recent else float(self._value)
        self._table.set(self._key, value, owned=self._owned)

    def inc(self, amount: float) -> None:
        with _lock:
            if self._generation != _state.generation:
                _reset_after_fork()
            self._value += amount
            self._timestamp = 0.0
            self._write()

    def set(self, value: float, timestamp: Optional[float] = None) -> None:
        with _lock:
            if self._generation != _state.generation:
                _reset_after_fork()
            self._value = value
            self._timestamp = timestamp or 0.0
            self._write()

    def set_exemplar(self, exemplar: Any) -> None:
        return

    def get(self) -> float:
        with _lock:
            if self._generation != _state.generation:
                _reset_after_fork()
            return self._value

    def get_exemplar(self) -> None:
        return None


def ShmregValue(typ: str, metric_name: str, name: str, labelnames: Any, labelvalues: Any,
                help_text: str, multiprocess_mode: str = "", **kwargs: Any) -> Any:
    """The value class :func:`enable` installs as ``prometheus_client.values.ValueClass``
    (same signature as prometheus_client's ``MmapedValue``)."""
    table = _state.table
    if table is None:
        raise RuntimeError("shmreg.prometheus is not enabled")
    key = _mmap_key(metric_name, name, labelnames, labelvalues, help_text)
    if typ == "gauge" and multiprocess_mode != "sum":
        value: Any = _ProcessValue(table, multiprocess_mode or "all", key)
    else:
        value = _SharedValue(table, typ, multiprocess_mode if typ == "gauge" else "", key)
    with _lock:
        _state.values.add(value)
    return value


ShmregValue._multiprocess = True  # type: ignore[attr-defined]


# -- Info and Enum ---------------------------------------------------------------


def _latest_key(metric: Any) -> str:
    tail = _mmap_key(metric._name, metric._name, metric._labelnames, metric._labelvalues,
                     metric._documentation)
    return _SEP.join((_LATEST, metric._type, "", "", tail))


def _write_latest(metric: Any, value: dict, initial: bool) -> None:
    table = _state.table
    if table is None:
        return
    if metric._type == "stateset":
        value = {"states": list(metric._states), **value}
    # JSON, not pickle: readers of the table need not trust its writers.
    text = json.dumps({"time": 0.0 if initial else time.time(), **value}, sort_keys=True)
    if initial:
        table.insert_new(_latest_key(metric), text)   # never hides a value set earlier
    else:
        table.set(_latest_key(metric), text)


def _patch_info_enum() -> None:
    """Wrap ``Info``/``Enum`` so their values also go to the table."""
    from prometheus_client.metrics import Enum, Info

    if _state.patched is not None:
        return
    orig = {"info_init": Info._metric_init, "info": Info.info,
            "enum_new": Enum.__init__, "state": Enum.state}

    def info_metric_init(self: Any) -> None:
        orig["info_init"](self)
        _write_latest(self, {"info": {}}, True)

    def info(self: Any, val: dict) -> None:
        orig["info"](self, val)
        _write_latest(self, {"info": dict(self._value)}, False)

    def enum_init(self: Any, *args: Any, **kwargs: Any) -> None:
        orig["enum_new"](self, *args, **kwargs)
        # Enum's _metric_init runs before __init__ stores the states: write
        # the initial state (the first one) once they are known.
        if self._is_observable():
            _write_latest(self, {}, True)

    def state(self: Any, state: str) -> None:
        orig["state"](self, state)
        _write_latest(self, {"state": self._states[self._value]}, False)

    Info._metric_init, Info.info = info_metric_init, info
    Enum.__init__, Enum.state = enum_init, state
    _state.patched = orig


def _unpatch_info_enum() -> None:
    from prometheus_client.metrics import Enum, Info

    orig = _state.patched
    if orig is not None:
        Info._metric_init, Info.info = orig["info_init"], orig["info"]
        Enum.__init__, Enum.state = orig["enum_new"], orig["state"]
        _state.patched = None


def _latest_metric(typ: str, tail: str, text: str) -> Metric:
    metric_name, _name, labels, help_text = json.loads(tail)
    value = json.loads(text)
    m = Metric(metric_name, help_text, typ)
    if typ == "info":
        m.add_sample(metric_name + "_info", {**labels, **value["info"]}, 1.0)
    else:
        states = value["states"]
        current = value.get("state", states[0])
        for st in states:
            m.add_sample(metric_name, {**labels, metric_name: st}, 1 if st == current else 0)
    return m


def _existing_metrics() -> list:
    from prometheus_client.metrics import MetricWrapperBase

    collectors = getattr(REGISTRY, "_collector_to_names", {})
    return [c for c in list(collectors) if isinstance(c, MetricWrapperBase)]


def enable(table: Union[str, Table, None] = None, *, capacity: Optional[int] = None,
           memory: Optional[int] = None, export_env: bool = True) -> Table:
    """Keep the values of every prometheus_client metric created from now on
    in the shmreg table ``table`` (opened, or created with ``capacity`` and
    ``memory``).  Call it once at startup, before metrics are created: in a
    gunicorn config file, the Celery app module, or before the first import
    of the application's metrics.

    :param table: a table name or an open :class:`~shmreg.Table`; default:
        ``$SHMREG_PROMETHEUS_TABLE``.
    :param capacity: entries the table is sized for if it is created (one
        per series, plus one per process per non-``sum`` gauge series).
    :param memory: bytes for keys and values if it is created.
    :param export_env: also set ``SHMREG_PROMETHEUS_TABLE`` so that child
        interpreters that ``import shmreg.prometheus`` use the same table.
    :return: the table.
    :raises ValueError: no table given and the variable is not set; an
        invalid table name.

    Metrics created before the call keep prometheus_client's previous value
    class (a ``RuntimeWarning`` lists those of the default registry).
    """
    if table is None:
        table = os.environ.get(ENV_TABLE) or None
        if table is None:
            raise ValueError(f"enable(): no table given and ${ENV_TABLE} is not set")
    if isinstance(table, str):
        t = Table(table, capacity=capacity, memory=memory)
    elif isinstance(table, Table):
        t = table
    else:
        raise TypeError(f"table must be a name or a shmreg.Table, not {type(table).__name__}")
    early = _existing_metrics()
    if early and _pc_values.ValueClass is not ShmregValue:
        warnings.warn(f"shmreg.prometheus.enable(): {len(early)} metric(s) were created before "
                      f"and keep their old values: {[str(m) for m in early[:5]]}",
                      RuntimeWarning, stacklevel=2)
    with _lock:
        if _pc_values.ValueClass is not ShmregValue:
            _state.previous_value_class = _pc_values.ValueClass
        _state.table = t
        _pc_values.ValueClass = ShmregValue
        _patch_info_enum()
    if export_env:
        os.environ[ENV_TABLE] = t.name
    return t


def disable() -> None:
    """Put prometheus_client's previous value class back (metrics created
    while enabled keep using the table)."""
    with _lock:
        if _pc_values.ValueClass is ShmregValue:
            _pc_values.ValueClass = _state.previous_value_class or _pc_values.get_value_class()
        _unpatch_info_enum()
        _state.table = None


def enabled() -> Optional[Table]:
    """The table in use, or None when not enabled."""
    return _state.table if _pc_values.ValueClass is ShmregValue else None


# -- scraping ------------------------------------------------------------------


def _fold(table: Table, mode: str, tail: str, value: Any) -> None:
    """Merge one dead incarnation's gauge value into the series' dead entry."""
    key = _SEP.join((_DEAD, "gauge", mode, "", tail))
    while True:
        raw = table._get_raw(key)
        if raw is None:
            if table.insert_new(key, value):
                return
            continue
        old = _core.decode_raw(raw[0], raw[1])
        if mode == "min":
            new = value if value < old else old
        elif mode == "max":
            new = value if value > old else old
        else:  # mostrecent: (value, timestamp) packed; the later timestamp wins
            new = value if _unpack_vt(value)[1] > _unpack_vt(old)[1] else old
        if new == old or table._cas_raw(key, raw[0], raw[1], new):
            return


def _fold_dead(table: Table, entries: Iterable[tuple], only_pid: Optional[int] = None) -> list:
    """Fold the per-incarnation entries whose marker is gone; return the
    entries that remain (live)."""
    live = []
    alive_cache: dict = {}
    for key, value, mode, proc, tail in entries:
        if only_pid is not None and proc.split(".", 1)[0] != str(only_pid):
            live.append((key, value, mode, proc, tail))
            continue
        alive = alive_cache.get(proc)
        if alive is None:
            # A point read after the traversal: the marker is written before
            # any of the incarnation's entries, so if we saw an entry and the
            # process is alive, its marker is visible now.
            alive = alive_cache[proc] = _SEP.join((_MARKER, "", "", proc, "")) in table
        if alive:
            live.append((key, value, mode, proc, tail))
        else:
            _fold(table, mode, tail, value)
            table.pop(key, None)
    return live


def mark_process_dead(pid: int, table: Union[str, Table, None] = None, *, reap: bool = True) -> None:
    """What prometheus_client's ``multiprocess.mark_process_dead`` is for:
    call it when process ``pid`` has exited (gunicorn's ``child_exit``).  It
    folds the dead process's ``min``/``max``/``mostrecent`` gauge values and
    (``reap``) frees its owned entries now instead of at the next scrape.
    Optional: live-mode values vanish without it, and a scrape folds what is
    left.  A live ``pid`` is left alone."""
    t = _resolve(table)
    folded = []
    for key, value in t.select(prefix=_PROCESS + _SEP):
        kind, typ, mode, proc, tail = key.split(_SEP, 4)
        if mode in _FOLDED_MODES:
            folded.append((key, value, mode, proc, tail))
    _fold_dead(t, folded, only_pid=pid)
    if reap:
        t.reap(pid)


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn ``child_exit`` hook: shmreg.gunicorn's (reap the worker in
    every configured table), then :func:`mark_process_dead`.  In
    ``gunicorn.conf.py``: ``from shmreg.prometheus import child_exit`` after
    ``from shmreg.gunicorn import *``."""
    from shmreg import gunicorn as _sg

    _sg.child_exit(server, worker)
    pid = getattr(worker, "pid", None)
    if isinstance(pid, int) and _state.table is not None:
        try:
            mark_process_dead(pid)
        except Exception:
            (getattr(server, "log", None) or _sg._log).exception(
                "shmreg.prometheus: cannot fold worker %d's gauges", pid)


def _resolve(table: Union[str, Table, None]) -> Table:
    if table is None:
        if _state.table is not None:
            return _state.table
        name = os.environ.get(ENV_TABLE)
        if not name:
            raise ValueError(f"no table: call enable() or set ${ENV_TABLE}")
        return Table.open(name)
    if isinstance(table, str):
        return Table.open(table)
    if isinstance(table, Table):
        return table
    raise TypeError(f"table must be a name or a shmreg.Table, not {type(table).__name__}")


class ShmregCollector:
    """The collector for the table: plays the part of prometheus_client's
    ``MultiProcessCollector`` and produces the same metrics.

    ``ShmregCollector(registry)`` registers itself in ``registry`` (a fresh
    ``CollectorRegistry``, as with ``MultiProcessCollector``; not the default
    ``REGISTRY``, whose own metrics are this process's only).  Each scrape
    reads the table once, frees the entries of dead owners and folds dead
    processes' ``min``/``max``/``mostrecent`` gauge values.

    :param registry: where to register (``None``: do not register).
    :param table: the table (name or :class:`~shmreg.Table`); default: the
        enabled one, else ``$SHMREG_PROMETHEUS_TABLE``.
    :raises TableNotFoundError: the named table does not exist.
    """

    def __init__(self, registry: Optional[CollectorRegistry], table: Union[str, Table, None] = None
                 ) -> None:
        self._table = _resolve(table)
        if registry is not None:
            registry.register(self)

    @property
    def table(self) -> Table:
        """The table this collector reads."""
        return self._table

    def collect(self) -> Iterable[Metric]:
        """The merged metrics (what ``generate_latest`` calls)."""
        t = self._table
        t.reap_dead()
        metrics: dict = {}
        shared: dict = {}
        folded_modes: list = []
        parsed: dict = {}
        latest: list = []

        def metric_for(typ: str, tail: str) -> tuple:
            p = parsed.get(tail)
            if p is None:
                metric_name, name, labels, help_text = json.loads(tail)
                p = parsed[tail] = (metric_name, name, tuple(sorted(labels.items())), help_text)
            m = metrics.get(p[0])
            if m is None:
                m = metrics[p[0]] = Metric(p[0], p[3], typ)
            return m, p

        for key, value in t.items():
            if not isinstance(key, str):
                continue
            parts = key.split(_SEP, 4)
            if len(parts) != 5:
                continue
            kind, typ, mode, proc, tail = parts
            if kind == _SHARED_INT or kind == _SHARED_FLOAT:
                k = (typ, mode, tail)
                shared[k] = shared.get(k, 0) + value
            elif kind == _PROCESS:
                if mode in _FOLDED_MODES:
                    folded_modes.append((key, value, mode, proc, tail))
                else:
                    self._gauge_sample(metric_for(typ, tail), mode, proc, value)
            elif kind == _DEAD:
                self._gauge_sample(metric_for(typ, tail), mode, "", value)
            elif kind == _LATEST and isinstance(value, str):
                latest.append((typ, tail, value))
        _fold_dead(t, folded_modes)
        # A value just folded is in this scrape through its own entry (the
        # dead entry it went into may have been read before the fold).
        for key, value, mode, proc, tail in folded_modes:
            self._gauge_sample(metric_for("gauge", tail), mode, proc, value)
        for (typ, mode, tail), value in shared.items():
            m, (metric_name, name, labels, help_text) = metric_for(typ, tail)
            if typ == "gauge":
                self._gauge_sample((m, (metric_name, name, labels, help_text)), mode, "", value)
            else:
                m.add_sample(name, labels, float(value))
        # The very merge prometheus_client applies to its files (pid labels,
        # gauge modes, cumulative buckets, _count): same input, same output.
        merged = list(MultiProcessCollector._accumulate_metrics(metrics, True))
        # Info and Enum (absent from prometheus_client's multiprocess scrape):
        # one labelled child's series per entry, merged per metric name.
        by_name: dict = {}
        for typ, tail, text in latest:
            m = _latest_metric(typ, tail, text)
            if m.name in by_name:
                by_name[m.name].samples.extend(m.samples)
            else:
                by_name[m.name] = m
        return merged + list(by_name.values())

    @staticmethod
    def _gauge_sample(mp: tuple, mode: str, proc: str, value: Any) -> None:
        m, (metric_name, name, labels, help_text) = mp
        m._multiprocess_mode = mode
        if isinstance(value, bytes):
            v, ts = _unpack_vt(value)
        else:
            v, ts = float(value), 0.0
        pid = proc.split(".", 1)[0]
        m.add_sample(name, labels + (("pid", pid),), v, ts)


def make_registry(table: Union[str, Table, None] = None) -> CollectorRegistry:
    """A fresh ``CollectorRegistry`` holding a :class:`ShmregCollector`: pass
    it to ``generate_latest``, ``make_wsgi_app``, ``make_asgi_app``,
    ``start_http_server`` or ``PrometheusDjangoView.as_view(registry=...)``."""
    registry = CollectorRegistry()
    ShmregCollector(registry, table)
    return registry


if os.environ.get(ENV_TABLE) and _state.table is None:
    enable(os.environ[ENV_TABLE])

