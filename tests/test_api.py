"""The dict/ETS surface of `shmreg.Table`, one process: every method, every
key type and value type, and the exact semantics of the ETS operations."""

from __future__ import annotations

import decimal
import enum
import math
import os
import pickle
import stat

import pytest

import shmreg
from shmreg import _core
from _helpers import run_py


class Color(enum.IntEnum):
    RED = 1
    BLUE = 2


class Label(str):
    """A str subclass: must come back as a Label, not a plain str."""


class Point:
    """A plain picklable object compared by value."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return type(other) is Point and (self.x, self.y) == (other.x, other.y)

    def __hash__(self):
        return hash((self.x, self.y))


class FakeClock:
    """A monotonic clock in seconds that only moves when told to."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

KEYS = [
    "", "a", "1", "héllo wörld", "日本語", "emoji \U0001F600", "nul\x00inside", "x" * 1000,
    b"", b"a", b"1", b"\x00\xff\xfe", bytes(range(256)), b"y" * 1000,
    0, 1, -1, 42, INT64_MAX, INT64_MIN, INT64_MAX + 1, INT64_MIN - 1,
    2**64, -(2**64), 10**40, -(10**40),
]

VALUES = [
    b"", b"bytes", b"\x00" * 17, bytes(range(256)), os.urandom(64 * 1024),
    "", "text", "héllo wörld", "日本語 \U0001F600", "nul\x00inside", "lone \udc80 surrogate",
    "\ud800", "x" * 5000,
    0, 1, -1, INT64_MAX, INT64_MIN, INT64_MAX + 1, INT64_MIN - 1, 2**200, -(2**200),
    0.0, -0.0, 1.5, -2.25e300, 5e-324, math.inf, -math.inf,
    True, False, None,
    {"a": 1, "b": [1, 2, {"c": None}]}, (1, "two", b"three"), [1, [2, [3]]], {1, 2, 3},
    frozenset({"x"}), (), [], {}, bytearray(b"ba"), 3 + 4j, decimal.Decimal("1.10"),
    Color.RED, Label("labelled"), Point(1, 2),
]


def same(a, b) -> bool:
    """Equal and of the same type (nan equals nan, -0.0 keeps its sign)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b


@pytest.fixture
def clocked(table_name):
    clock = FakeClock()
    t = shmreg.Table.create(table_name, capacity=1000, memory=1 << 20, clock=clock)
    yield t, clock
    t.close()


# -- keys and values -----------------------------------------------------------

@pytest.mark.parametrize("value", VALUES + [math.nan], ids=lambda v: type(v).__name__)
def test_every_value_type_round_trips(table, value):
    table["v"] = value
    assert same(table["v"], value)
    assert same(table.get("v"), value)
    assert same(dict(table.items())["v"], value)
    assert same(table.values()[0], value)
    assert same(table.take("v"), value)
    assert "v" not in table
    table.check()


def test_every_key_type_is_its_own_key(table):
    for i, k in enumerate(KEYS):
        table[k] = i
    assert len(table) == len(KEYS)
    for i, k in enumerate(KEYS):
        assert k in table
        assert table[k] == i
        assert table.get(k) == i
    got = table.keys()
    assert len(got) == len(KEYS)
    for k in KEYS:
        # Keys come back equal and of the same type.
        assert any(type(g) is type(k) and g == k for g in got), k
    assert sorted(table.values()) == list(range(len(KEYS)))
    table.check()
    for i, k in enumerate(KEYS):
        assert table.pop(k) == i
    assert len(table) == 0
    table.check()


def test_one_and_string_one_are_different_keys(table):
    table[1] = "int"
    table["1"] = "str"
    table[b"1"] = "bytes"
    table[2**64] = "big"
    table[str(2**64)] = "bigstr"
    table[-1] = "neg"
    assert (table[1], table["1"], table[b"1"]) == ("int", "str", "bytes")
    assert (table[2**64], table[str(2**64)], table[-1]) == ("big", "bigstr", "neg")
    assert len(table) == 6
    del table["1"]
    assert table[1] == "int" and table[b"1"] == "bytes" and "1" not in table
    assert 2**64 + 1 not in table and -(2**64) not in table
    table.check()


def test_subclass_keys_are_their_base_keys(table):
    table[Color.RED] = "enum"
    assert table[1] == "enum"
    table[Label("k")] = "label"
    assert table["k"] == "label"
    assert len(table) == 2
    assert table.get(Color.BLUE) is None
    table.check()


def test_values_can_be_replaced_by_any_other_type(table):
    for v in VALUES:
        table["k"] = v
        assert same(table["k"], v)
    assert len(table) == 1
    assert table.stats()["bytes_used"] > 0
    table.check()


def test_int64_bounds_stay_native(table):
    # int64 values are stored natively (update_counter works on them);
    # one beyond goes through pickle (update_counter refuses it).
    table["max"] = INT64_MAX
    table["min"] = INT64_MIN
    assert table.update_counter("max", 0) == INT64_MAX
    assert table.update_counter("min", 0) == INT64_MIN
    table["big"] = INT64_MAX + 1
    with pytest.raises(TypeError):
        table.update_counter("big")
    assert table["big"] == INT64_MAX + 1
    table.check()


# -- dict protocol ---------------------------------------------------------------

def test_getitem_keyerror_vs_get_default(table):
    with pytest.raises(KeyError) as ei:
        table["missing"]
    assert ei.value.args == ("missing",)
    assert table.get("missing") is None
    assert table.get("missing", "dflt") == "dflt"
    table["present"] = None
    assert table["present"] is None
    assert table.get("present", "dflt") is None
    assert "present" in table and "missing" not in table
    with pytest.raises(KeyError):
        del table["missing"]
    assert table.delete("missing") is False
    assert table.delete("present") is True
    assert table.delete("present") is False
    table.check()


def test_iteration_and_views(table):
    data = {f"k{i}": i for i in range(200)}
    data.update({i: str(i) for i in range(50)})
    table.update(data)
    assert len(table) == len(data)
    assert sorted(map(repr, iter(table))) == sorted(map(repr, data))
    assert sorted(map(repr, table.keys())) == sorted(map(repr, data))
    assert dict(table.items()) == data
    assert sorted(map(repr, table.values())) == sorted(map(repr, data.values()))
    assert isinstance(table.keys(), list) and isinstance(table.items(), list)
    table.check()


def test_pop_and_take(table):
    table["a"] = [1, 2]
    assert table.pop("a") == [1, 2]
    assert "a" not in table
    with pytest.raises(KeyError):
        table.pop("a")
    assert table.pop("a", "d") == "d"
    assert table.pop("a", None) is None
    table["b"] = b"bee"
    assert table.take("b") == b"bee"
    with pytest.raises(KeyError):
        table.take("b")
    assert table.take("b", 7) == 7
    assert len(table) == 0
    table.check()


def test_setdefault(table):
    assert table.setdefault("a", 1) == 1
    assert table["a"] == 1
    assert table.setdefault("a", 2) == 1
    assert table["a"] == 1
    assert table.setdefault("n") is None
    assert "n" in table and table["n"] is None
    d = {"x": [1]}
    assert table.setdefault("d", d) == d
    assert table.setdefault("d", "other") == d
    table.check()


def test_update_mapping_pairs_and_kwargs(table):
    table.update({"a": 1, b"b": 2})
    table.update([(3, "three"), ("a", 10)])
    table.update(kw="arg", a=11)
    table.update()
    assert dict(table.items()) == {"a": 11, b"b": 2, 3: "three", "kw": "arg"}
    table.check()


def test_clear(table):
    table.update({f"k{i}": os.urandom(100) for i in range(500)})
    table.set("ttl", 1, ttl=100)
    assert len(table) == 501
    table.clear()
    assert len(table) == 0
    assert table.keys() == []
    assert "k1" not in table
    s = table.stats()
    assert (s["entries"], s["bytes_used"], s["tombstones"], s["with_ttl"]) == (0, 0, 0, 0)
    table.check()
    table["again"] = 1
    assert table.items() == [("again", 1)]
    table.clear()
    table.clear()
    assert len(table) == 0
    table.check()


# -- ETS operations ----------------------------------------------------------------

def test_insert_new(table):
    assert table.insert_new("k", "first") is True
    assert table.insert_new("k", "second") is False
    assert table["k"] == "first"
    del table["k"]
    assert table.insert_new("k", "third") is True
    assert table["k"] == "third"
    assert table.insert_new(5, None) is True
    assert table.insert_new(5, 1) is False
    assert table[5] is None
    table.check()


def test_update_counter(table):
    assert table.update_counter("c") == 1
    assert table.update_counter("c") == 2
    assert table.update_counter("c", 10) == 12
    assert table.update_counter("c", -20) == -8
    assert table["c"] == -8 and type(table["c"]) is int
    assert table.update_counter("d", 5, default=100) == 105
    assert table.update_counter("d", 5, default=100) == 110  # default only when absent
    assert table.update_counter("e", 0, default=-3) == -3
    assert table.update_counter(7, -1) == -1
    assert table.update_counter(b"b", incr=Color.BLUE) == 2
    table["f"] = 41
    assert table.update_counter("f") == 42
    table.check()


@pytest.mark.parametrize("stored", ["1", b"1", 1.0, True, None, [1], INT64_MAX + 1, Color.RED])
def test_update_counter_on_non_int_is_typeerror(table, stored):
    table["k"] = stored
    with pytest.raises(TypeError):
        table.update_counter("k")
    assert same(table["k"], stored)
    table.check()


def test_update_counter_overflow(table):
    table["hi"] = INT64_MAX
    with pytest.raises(OverflowError):
        table.update_counter("hi")
    assert table["hi"] == INT64_MAX
    table["lo"] = INT64_MIN
    with pytest.raises(OverflowError):
        table.update_counter("lo", -1)
    assert table["lo"] == INT64_MIN
    assert table.update_counter("lo", INT64_MAX) == -1
    with pytest.raises(OverflowError):
        table.update_counter("new", 1, default=INT64_MAX)
    assert "new" not in table
    with pytest.raises(OverflowError):
        table.update_counter("new", 2**64)
    assert "new" not in table
    table.check()


def test_compare_and_swap(table):
    assert table.compare_and_swap("absent", None, 1) is False
    assert "absent" not in table
    table["k"] = "old"
    assert table.compare_and_swap("k", "other", "new") is False
    assert table["k"] == "old"
    assert table.compare_and_swap("k", b"old", "new") is False  # bytes != str
    assert table.compare_and_swap("k", "old", "new") is True
    assert table["k"] == "new"
    assert table.compare_and_swap("k", "old", "newer") is False
    # Any value types, compared with ==.
    table["d"] = {"n": [1, 2]}
    assert table.compare_and_swap("d", {"n": [1, 2]}, (3,)) is True
    assert table["d"] == (3,)
    table["i"] = 5
    assert table.compare_and_swap("i", 5, INT64_MAX + 1) is True
    assert table.compare_and_swap("i", INT64_MAX + 1, None) is True
    assert table["i"] is None
    assert table.compare_and_swap("i", None, 0) is True
    assert table["i"] == 0
    table["f"] = math.nan
    assert table.compare_and_swap("f", math.nan, 1.0) is False  # nan != nan
    table.check()


# -- TTLs with an injected clock ---------------------------------------------------

def test_ttl_expiry_with_fake_clock(clocked):
    t, clock = clocked
    t.set("short", "s", ttl=10)
    t.set("long", "l", ttl=100.5)
    t["forever"] = "f"
    assert t.ttl("short") == pytest.approx(10.0)
    assert t.ttl("long") == pytest.approx(100.5)
    assert t.ttl("forever") is None
    with pytest.raises(KeyError):
        t.ttl("absent")
    clock.advance(4)
    assert t.ttl("short") == pytest.approx(6.0)
    assert t["short"] == "s"
    assert len(t) == 3
    clock.advance(6)  # exactly at the deadline: expired
    assert "short" not in t
    assert t.get("short", "gone") == "gone"
    with pytest.raises(KeyError):
        t["short"]
    with pytest.raises(KeyError):
        t.ttl("short")
    assert len(t) == 2  # len excludes expired entries
    assert sorted(t.keys()) == ["forever", "long"]
    assert sorted(k for k, _ in t.select()) == ["forever", "long"]
    assert t.stats()["entries"] == 2
    t.check()


def test_expired_key_behaves_absent_for_every_operation(clocked):
    t, clock = clocked
    for k in ("a", "b", "c", "d", "e", "f", "g", "h"):
        t.set(k, 1, ttl=1)
    clock.advance(1)
    assert t.insert_new("a", "new") is True and t["a"] == "new"
    assert t.ttl("a") is None
    assert t.update_counter("b", 5) == 5
    assert t.compare_and_swap("c", 1, 2) is False
    assert t.setdefault("d", "dd") == "dd"
    assert t.pop("e", "gone") == "gone"
    assert t.delete("f") is False
    assert t.expire("g", 100) is False
    with pytest.raises(KeyError):
        t.take("h")
    assert sorted(t.keys()) == ["a", "b", "d"]
    t.check()
    # The expired g and c are still stored; purge_expired removes exactly those.
    assert t.purge_expired() == 2
    assert t.purge_expired() == 0
    t.check()


def test_expire_and_persist(clocked):
    t, clock = clocked
    t["k"] = "v"
    assert t.expire("k", 5) is True
    assert t.ttl("k") == pytest.approx(5.0)
    assert t.stats()["with_ttl"] == 1
    assert t.expire("k", None) is True  # persist
    assert t.ttl("k") is None
    assert t.stats()["with_ttl"] == 0
    assert t.expire("absent", 5) is False
    assert "absent" not in t
    t.expire("k", 2)
    clock.advance(1.5)
    assert t.expire("k", 2) is True  # renew before the deadline
    clock.advance(1.5)
    assert t["k"] == "v"
    clock.advance(0.5)
    assert "k" not in t
    t.check()


def test_set_without_ttl_clears_ttl_and_counter_keeps_it(clocked):
    t, clock = clocked
    t.set("k", 1, ttl=5)
    t["k"] = 2
    assert t.ttl("k") is None
    t.set("c", 1, ttl=5)
    assert t.update_counter("c") == 2  # in place: the ttl stays
    assert t.ttl("c") == pytest.approx(5.0)
    assert t.update_counter("n", ttl=3) == 1  # ttl applies on creation
    assert t.ttl("n") == pytest.approx(3.0)
    assert t.insert_new("i", 1, ttl=7) is True
    assert t.ttl("i") == pytest.approx(7.0)
    clock.advance(5)
    assert "c" not in t and "n" not in t and "i" in t
    t.check()


def test_purge_expired(clocked):
    t, clock = clocked
    for i in range(100):
        t.set(i, i, ttl=1 + i % 4)  # 1, 2, 3, 4 seconds
    t.update({f"p{i}": i for i in range(10)})
    assert t.stats()["with_ttl"] == 100
    clock.advance(2)
    assert len(t) == 60
    assert t.purge_expired() == 50
    assert t.stats()["with_ttl"] == 50
    assert len(t) == 60
    t.check()
    clock.advance(10)
    assert t.purge_expired() == 50
    assert t.purge_expired() == 0
    assert sorted(t.keys()) == sorted(f"p{i}" for i in range(10))
    assert t.stats()["with_ttl"] == 0
    t.check()


def test_open_with_another_clock(clocked):
    t, clock = clocked
    t.set("k", 1, ttl=10)
    other = FakeClock(clock.now + 20)
    with shmreg.Table.open(t.name, clock=other) as t2:
        assert "k" not in t2
        assert "k" in t
    t.check()


# -- select -------------------------------------------------------------------------

def test_select_prefix(clocked):
    t, clock = clocked
    t.update({"user:1": 1, "user:2": 2, "usr": 3, "group:1": 4, b"user:b": 5,
              b"\x00bin": 6, 7: 7})
    t.set("user:expiring", 8, ttl=1)
    assert sorted(t.select(prefix="user:")) == [("user:1", 1), ("user:2", 2), ("user:expiring", 8)]
    assert sorted(t.select(prefix=b"user:")) == [(b"user:b", 5)]
    assert sorted(t.select(prefix=b"\x00")) == [(b"\x00bin", 6)]
    assert list(t.select(prefix="nomatch")) == []
    assert len(list(t.select(prefix=""))) == 5  # every str key
    assert len(list(t.select(prefix=b""))) == 2  # every bytes key
    assert sorted(map(repr, t.select())) == sorted(map(repr, t.items()))
    clock.advance(1)
    assert sorted(t.select(prefix="user:")) == [("user:1", 1), ("user:2", 2)]
    assert len(list(t.select())) == 7
    with pytest.raises(TypeError):
        list(t.select(prefix=1))
    assert list(t.select(owner=os.getpid())) == []   # nothing owned yet
    t.set("user:3", 3, owned=True)
    assert list(t.select(owner=os.getpid())) == [("user:3", 3)]
    assert list(t.select(prefix="nomatch", owner=os.getpid())) == []
    t.check()


# -- stats ----------------------------------------------------------------------------

def test_stats(table):
    s = table.stats()
    assert s["name"] == table.name
    assert s["entries"] == 0 and s["bytes_used"] == 0
    assert s["capacity"] == 10_000 and s["memory"] == 4 << 20
    assert s["shards"] == table.nshards >= 1
    # What the segment holds (its file is as large as its limits, sparse).
    assert s["segment_bytes"] == s["bytes_allocated"] == os.stat(table.path).st_blocks * 512
    assert s["bytes_reserved"] == os.path.getsize(table.path) >= s["segment_bytes"]
    assert s["index_slots"] >= s["capacity"]
    assert s["bytes_used"] + s["bytes_free"] == s["max_item_bytes"] * s["shards"] >= s["memory"]
    assert s["layout"] == _core.LAYOUT_VERSION
    assert s["creator_pid"] == os.getpid()
    assert (s["hits"], s["misses"], s["sets"], s["deletes"]) == (0, 0, 0, 0)

    table["a"] = 1
    table["b"] = b"x" * 1000
    table["a"] = 2
    table.set("t", 1, ttl=100)
    assert table["a"] == 2          # hit
    assert table.get("zz") is None  # miss
    assert "b" in table             # hit
    assert "zz" not in table        # miss
    with pytest.raises(KeyError):
        table["zz"]                 # miss
    assert table.ttl("t") > 0       # hit
    del table["b"]
    s = table.stats()
    assert (s["hits"], s["misses"]) == (3, 3)
    assert s["entries"] == 2 and s["with_ttl"] == 1
    assert s["sets"] == 4 and s["deletes"] == 1
    assert 0 < s["bytes_used"] < 1000
    assert s["full_errors"] == 0 and s["repairs"] == 0
    assert s["read_retries"] == 0 and s["owned"] == 0
    assert table.capacity == 10_000 and table.memory == 4 << 20
    table.check()


def test_hits_and_misses_are_per_table_object(table):
    table["a"] = 1
    with shmreg.Table.open(table.name) as other:
        other["a"]
        other.get("b")
        assert (other.stats()["hits"], other.stats()["misses"]) == (1, 1)
    assert (table.stats()["hits"], table.stats()["misses"]) == (0, 0)


def test_repr(table):
    table["a"] = 1
    assert repr(table).startswith("<shmreg.Table") and repr(table.name) in repr(table)
    table.close()
    assert "closed" in repr(table)


# -- lifecycle --------------------------------------------------------------------------

def test_create_open_and_auto_create(table_name):
    assert table_name not in shmreg.list_tables()
    with pytest.raises(shmreg.TableNotFoundError):
        shmreg.Table.open(table_name)
    t1 = shmreg.Table(table_name, capacity=100, memory=1 << 16)  # auto-creates
    assert table_name in shmreg.list_tables()
    assert all(isinstance(n, str) for n in shmreg.list_tables())
    t1["k"] = "v"
    # Opening again (any way) attaches to the same table; its geometry is
    # kept, and other options asked for are warned about.
    with pytest.warns(shmreg.ConfigMismatchWarning, match="capacity 100 .asked for 999,999."):
        t2 = shmreg.Table(table_name, capacity=999_999, memory=1 << 30)
    t3 = shmreg.Table.open(table_name)
    assert t2["k"] == "v" and t3["k"] == "v"
    assert t2.capacity == 100 and t3.memory == 1 << 16
    with pytest.raises(shmreg.TableExistsError):
        shmreg.Table.create(table_name)
    t3["k2"] = 2
    assert t1["k2"] == 2
    for t in (t1, t2, t3):
        t.check()
        t.close()
    assert table_name in shmreg.list_tables()  # close does not unlink


def test_create_mode(table_name):
    with shmreg.Table.create(table_name, capacity=10, memory=1 << 16) as t:
        assert stat.S_IMODE(os.stat(t.path).st_mode) == 0o600
    shmreg.unlink(table_name)
    with shmreg.Table.create(table_name, capacity=10, memory=1 << 16, mode=0o640) as t:
        assert stat.S_IMODE(os.stat(t.path).st_mode) == 0o640


def test_unlink_keeps_attached_tables_working(table_name):
    t = shmreg.Table.create(table_name, capacity=10, memory=1 << 16)
    t["a"] = 1
    t.unlink()
    assert table_name not in shmreg.list_tables()
    with pytest.raises(shmreg.TableNotFoundError):
        shmreg.Table.open(table_name)
    with pytest.raises(shmreg.TableNotFoundError):
        t.unlink()
    with pytest.raises(shmreg.TableNotFoundError):
        shmreg.unlink(table_name)
    t["b"] = 2
    assert dict(t.items()) == {"a": 1, "b": 2}
    t.check()
    # The name is free again: a new table is a different, empty one.
    with shmreg.Table.create(table_name, capacity=10, memory=1 << 16) as fresh:
        assert len(fresh) == 0
        fresh["c"] = 3
        assert "c" not in t
    t.close()
    shmreg.unlink(table_name)
    assert table_name not in shmreg.list_tables()


def test_context_manager_and_closed_table(table_name):
    with shmreg.Table.create(table_name, capacity=10, memory=1 << 16) as t:
        assert not t.closed
        t["a"] = 1
    assert t.closed
    t.close()  # idempotent
    t.close()
    ops = [
        lambda: t["a"], lambda: t.__setitem__("a", 2), lambda: t.__delitem__("a"),
        lambda: "a" in t, lambda: len(t), lambda: list(t), lambda: t.keys(),
        lambda: t.values(), lambda: t.items(), lambda: t.get("a"), lambda: t.pop("a", 0),
        lambda: t.setdefault("a", 1), lambda: t.clear(), lambda: t.update({"a": 1}),
        lambda: t.set("a", 1), lambda: t.insert_new("a", 1), lambda: t.update_counter("a"),
        lambda: t.compare_and_swap("a", 1, 2), lambda: t.take("a", 0), lambda: t.ttl("a"),
        lambda: t.expire("a", 1), lambda: t.purge_expired(), lambda: list(t.select()),
        lambda: t.stats(), lambda: t.check(), lambda: t.delete("a"), lambda: t.capacity,
    ]
    for op in ops:
        with pytest.raises(ValueError):
            op()
    # The table itself is intact.
    with shmreg.Table.open(table_name) as t2:
        assert t2["a"] == 1
        t2.check()


def test_pickle_attaches_by_name(table):
    table["a"] = {"x": 1}
    t2 = pickle.loads(pickle.dumps(table))
    assert isinstance(t2, shmreg.Table) and t2 is not table
    assert t2.name == table.name
    assert t2["a"] == {"x": 1}
    t2["b"] = 2
    assert table["b"] == 2
    t2.close()
    assert not table.closed
    # A pickled table crosses into a fresh interpreter the same way.
    blob = pickle.dumps(table).hex()
    run_py("""
        import pickle, sys
        t = pickle.loads(bytes.fromhex(sys.argv[1]))
        assert t["a"] == {"x": 1}
        t["from_child"] = "yes"
    """, blob)
    assert table["from_child"] == "yes"
    table.check()


def test_pickle_of_unlinked_table_fails_to_attach(table_name):
    t = shmreg.Table.create(table_name, capacity=10, memory=1 << 16)
    blob = pickle.dumps(t)
    t.unlink()
    with pytest.raises(shmreg.TableNotFoundError):
        pickle.loads(blob)
    t.close()


def test_check_after_mixed_workload(table):
    for i in range(3000):
        k = i % 700
        table[k] = os.urandom(i % 300)
        if i % 3 == 0:
            table.delete((i * 7) % 700)
        if i % 11 == 0:
            table.update_counter(f"c{i % 5}")
    table.check()
    table.clear()
    table.check()


def test_full_of_expired_entries_is_not_full(table_name):
    """A shard whose room is taken by expired entries reclaims it on the next
    write instead of raising TableFullError (nothing live is there)."""
    clock = FakeClock()
    t = shmreg.Table.create(table_name, capacity=64, memory=4096, shards=1, clock=clock)
    n = 0
    with pytest.raises(shmreg.TableFullError):
        while True:
            t.set(n, n, ttl=1)
            n += 1
    clock.advance(5)
    assert len(t) == 0
    for i in range(n):          # the whole table's worth again
        t.set(f"new-{i}", i)
    assert len(t) == n and t.stats()["expirations"] > 0
    with pytest.raises(shmreg.TableFullError):   # now it is full of live entries
        t.set("one-too-many", 0)
    t.check()
    t.close()
