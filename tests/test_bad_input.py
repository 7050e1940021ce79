"""Bad input: wrong types, oversized keys and values, invalid names, full
tables, files that are not tables, and randomly corrupted segments (which
may raise, but must never crash the interpreter)."""

from __future__ import annotations

import json
import os
import struct
import threading

import pytest

import shmreg
from shmreg import _core
from _helpers import layout_struct, spawn_py, unique_name

# shm_header_t up to creator_pid (offsets from engine/shm_layout.h via _core.LAYOUT).
HEADER_FIELDS = ("magic layout header_size total_size nshards shard_bits slots max_fill "
                 "arena_size capacity memory seed0 seed1 procs_off shards_off index_off "
                 "arena_off nprocs proc_size shard_size bins creator_pid").split()
HEADER_FMT, FIELD_OFFSET = layout_struct("header", HEADER_FIELDS)


def segment_path(name: str) -> str:
    return os.path.join(os.environ.get("SHMREG_DIR") or "/dev/shm", "shmreg." + name)


def read_header(path: str) -> dict:
    with open(path, "rb") as f:
        raw = f.read(struct.calcsize(HEADER_FMT))
    return dict(zip(HEADER_FIELDS, struct.unpack(HEADER_FMT, raw)))


def patch_field(path: str, field: str, value: int) -> None:
    off, fmt = FIELD_OFFSET[field]
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, value))


BAD_KEYS = [1.0, None, (1,), [1], bytearray(b"x"), memoryview(b"x"), object(), {"a": 1}]


def key_ops(t, k):
    """Every operation that takes a key, as (label, thunk)."""
    return [
        ("getitem", lambda: t[k]), ("setitem", lambda: t.__setitem__(k, 1)),
        ("delitem", lambda: t.__delitem__(k)), ("contains", lambda: k in t),
        ("get", lambda: t.get(k)), ("set", lambda: t.set(k, 1)),
        ("set ttl", lambda: t.set(k, 1, ttl=5)), ("insert_new", lambda: t.insert_new(k, 1)),
        ("update_counter", lambda: t.update_counter(k)),
        ("compare_and_swap", lambda: t.compare_and_swap(k, 1, 2)),
        ("take", lambda: t.take(k, None)), ("pop", lambda: t.pop(k, None)),
        ("setdefault", lambda: t.setdefault(k, 1)), ("delete", lambda: t.delete(k)),
        ("ttl", lambda: t.ttl(k)), ("expire", lambda: t.expire(k, 5)),
        ("update", lambda: t.update([(k, 1)])),
    ]


# -- keys -----------------------------------------------------------------------------

@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda k: type(k).__name__)
def test_wrong_key_type_is_typeerror(table, key):
    table["good"] = 1
    for label, op in key_ops(table, key):
        with pytest.raises(TypeError):
            op()
            pytest.fail(label)
    assert table.items() == [("good", 1)]
    table.check()


def test_key_length_limit(table):
    for k in ("x" * 65535, b"y" * 65535, "é" * 32767 + "x"):
        table[k] = 1
        assert table[k] == 1
        assert table.take(k) == 1
    for k in ("x" * 65536, b"y" * 65536, "é" * 32768):
        for label, op in key_ops(table, k):
            with pytest.raises(ValueError):
                op()
                pytest.fail(label)
    assert len(table) == 0
    table.check()


# -- values -----------------------------------------------------------------------------

def _gen():
    yield 1


class _Local:
    pass


class _RaisesOnPickle:
    def __reduce__(self):
        raise RuntimeError("no")


UNPICKLABLE = [lambda: 1, threading.Lock(), _gen(), _RaisesOnPickle(), memoryview(b"abc")]


@pytest.mark.parametrize("value", UNPICKLABLE, ids=lambda v: type(v).__name__)
def test_unpicklable_value_is_typeerror(table, value):
    table["k"] = "orig"
    ops = [lambda: table.__setitem__("k", value), lambda: table.set("k", value),
           lambda: table.set("new", value, ttl=3), lambda: table.insert_new("new", value),
           lambda: table.setdefault("new", value), lambda: table.update({"new": value}),
           lambda: table.compare_and_swap("k", "orig", value)]
    for op in ops:
        with pytest.raises(TypeError):
            op()
    assert table.items() == [("k", "orig")]
    table.check()


def test_open_file_value_is_typeerror(table):
    with open(__file__) as f:
        with pytest.raises(TypeError):
            table["f"] = f
    assert "f" not in table
    table.check()


def test_value_too_large(table_name):
    t = shmreg.Table.create(table_name, capacity=100, memory=1 << 16, shards=4)
    try:
        arena = t.stats()["max_item_bytes"]
        assert arena == 1 << 14
        hdr = _core.ITEM_OVERHEAD
        # An item of exactly one shard's arena fits (every shard is empty) ...
        exact = b"e" * (arena - hdr - 1)  # key "k": 1 byte
        t["k"] = exact
        assert t["k"] == exact
        t.check()
        del t["k"]
        # ... one byte more can never fit.
        t["small"] = "s"
        big = b"b" * (arena - hdr)
        ops = [lambda: t.__setitem__("k", big), lambda: t.set("k", big, ttl=1),
               lambda: t.insert_new("k", big), lambda: t.setdefault("k", big),
               lambda: t.update({"k": big}), lambda: t.compare_and_swap("small", "s", big),
               lambda: t.__setitem__("k", "s" * (1 << 20)),
               lambda: t.__setitem__("k", list(range(100_000))),
               lambda: t.__setitem__("x" * arena, b"")]
        for op in ops:
            with pytest.raises(shmreg.ValueTooLargeError) as ei:
                op()
            assert isinstance(ei.value, ValueError) and isinstance(ei.value, shmreg.Error)
        assert t.items() == [("small", "s")]
        assert t.stats()["full_errors"] == 0
        t.check()
    finally:
        t.close()


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("-inf"), 1e12])
def test_bad_ttl_is_valueerror(table, ttl):
    table["k"] = 1
    for op in (lambda: table.set("n", 1, ttl=ttl), lambda: table.insert_new("n", 1, ttl=ttl),
               lambda: table.update_counter("n", ttl=ttl), lambda: table.expire("k", ttl)):
        with pytest.raises(ValueError):
            op()
    assert table.items() == [("k", 1)]
    assert table.ttl("k") is None
    table.check()


def test_inf_ttl_means_never_expires(table):
    # Same meaning as in Cache: inf is "no expiry", exactly like None.
    inf = float("inf")
    table.set("a", 1, ttl=inf)
    assert table.insert_new("b", 2, ttl=inf)
    assert table.update_counter("c", ttl=inf) == 1
    table.set("d", 4, ttl=5)
    assert table.expire("d", inf)
    assert {k: table.ttl(k) for k in "abcd"} == dict.fromkeys("abcd")
    assert table.stats()["with_ttl"] == 0
    table.check()


def test_bad_ttl_type_is_typeerror(table):
    with pytest.raises(TypeError):
        table.set("n", 1, ttl="5")
    with pytest.raises(TypeError):
        table.set("n", 1, ttl=[5])
    with pytest.raises(TypeError):
        table.set("n", 1, ttl=True)
    assert "n" not in table


@pytest.mark.parametrize("kwargs", [dict(incr=1.5), dict(incr=True), dict(incr="1"),
                                    dict(incr=None), dict(default=None), dict(default=0.0),
                                    dict(default=False)])
def test_update_counter_bad_arguments(table, kwargs):
    with pytest.raises(TypeError):
        table.update_counter("c", **kwargs)
    assert "c" not in table


# -- names and constructor arguments --------------------------------------------------

BAD_NAMES = ["", "../x", "a/b", "..", ".hidden", "x" * 300, "-dash", "a..b", "sp ace",
             "nul\x00", "é", "/abs"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_name_is_valueerror(name):
    before = set(os.listdir(os.path.dirname(segment_path("x"))))
    for op in (lambda: shmreg.Table(name), lambda: shmreg.Table.create(name),
               lambda: shmreg.Table.open(name), lambda: shmreg.unlink(name)):
        with pytest.raises(ValueError):
            op()
    assert set(os.listdir(os.path.dirname(segment_path("x")))) <= before


@pytest.mark.parametrize("name", [None, b"name", 5, ["n"]])
def test_non_str_name_is_typeerror(name):
    for op in (lambda: shmreg.Table(name), lambda: shmreg.Table.create(name),
               lambda: shmreg.Table.open(name), lambda: shmreg.unlink(name)):
        with pytest.raises(TypeError):
            op()


@pytest.mark.parametrize("kwargs,exc", [
    (dict(capacity=0), ValueError), (dict(capacity=-5), (ValueError, OverflowError)),
    (dict(capacity="10"), TypeError), (dict(capacity=True), TypeError),
    (dict(memory=100), ValueError), (dict(memory=1.5), TypeError),
    (dict(shards=3), ValueError), (dict(shards=0), ValueError), (dict(shards=2048), ValueError),
    (dict(clock="not callable"), TypeError),
])
def test_bad_constructor_arguments(table_name, kwargs, exc):
    with pytest.raises(exc):
        shmreg.Table.create(table_name, **kwargs)
    assert table_name not in shmreg.list_tables()
    assert not os.path.exists(segment_path(table_name))


def test_open_missing_and_create_existing(table_name):
    with pytest.raises(shmreg.TableNotFoundError) as ei:
        shmreg.Table.open(table_name)
    assert isinstance(ei.value, FileNotFoundError) and isinstance(ei.value, shmreg.Error)
    with pytest.raises(FileNotFoundError):
        shmreg.unlink(table_name)
    assert not os.path.exists(segment_path(table_name))
    t = shmreg.Table.create(table_name, capacity=10, memory=1 << 16)
    t["a"] = 1
    with pytest.raises(shmreg.TableExistsError) as ei:
        shmreg.Table.create(table_name, capacity=10, memory=1 << 16)
    assert isinstance(ei.value, FileExistsError)
    assert t["a"] == 1  # the existing table is untouched
    t.check()
    t.close()


# -- full tables -------------------------------------------------------------------------

def test_full_index_then_delete_makes_room(table_name):
    t = shmreg.Table.create(table_name, capacity=8, memory=1 << 16, shards=1)
    try:
        max_fill = t._header()["max_fill"]
        for i in range(max_fill):
            t[i] = i
        for op in (lambda: t.__setitem__("new", 1), lambda: t.insert_new("new", 1),
                   lambda: t.setdefault("new", 1), lambda: t.update_counter("new"),
                   lambda: t.set("new", 1, ttl=5)):
            with pytest.raises(shmreg.TableFullError):
                op()
        assert t.stats()["full_errors"] == 5
        assert "new" not in t
        t[3] = "replaced"  # replacing needs no new slot
        assert t.update_counter(4) == 5
        assert t.insert_new(5, "x") is False
        t.check()
        del t[0]
        t["new"] = 1
        assert t["new"] == 1
        with pytest.raises(shmreg.TableFullError):
            t["newer"] = 1
        assert len(t) == max_fill
        t.check()
    finally:
        t.close()


def test_full_memory_then_delete_makes_room(table_name):
    t = shmreg.Table.create(table_name, capacity=64, memory=4096, shards=1)
    try:
        stored = []
        with pytest.raises(shmreg.TableFullError):
            for i in range(100):
                t[i] = bytes([i]) * 1000
                stored.append(i)
        assert 2 <= len(stored) < 5
        assert sorted(t.keys()) == stored
        t.check()
        # An existing key cannot grow either; its old value stays.
        with pytest.raises(shmreg.TableFullError):
            t[0] = b"z" * 2000
        assert t[0] == b"\x00" * 1000
        del t[stored[0]]
        t["again"] = b"a" * 1000
        assert t["again"] == b"a" * 1000
        t.clear()
        t["whole"] = b"w" * (4096 - _core.ITEM_OVERHEAD - 5)
        t.check()
    finally:
        t.close()


# -- files that are not tables --------------------------------------------------------------

def _write_file(name: str, data: bytes) -> str:
    path = segment_path(name)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)
    return path


@pytest.mark.parametrize("data", [b"", b"junk" * 25, os.urandom(4095), os.urandom(8192),
                                  b"\0" * 8192, b"\0" * 4096 * 40],
                         ids=["empty", "small-junk", "4095-random", "8192-random",
                              "zeros", "zeros-big"])
def test_not_a_table_is_incompatible(table_name, data):
    path = _write_file(table_name, data)
    for op in (lambda: shmreg.Table.open(table_name), lambda: shmreg.Table(table_name)):
        with pytest.raises(shmreg.IncompatibleTableError):
            op()
    with pytest.raises(shmreg.TableExistsError):
        shmreg.Table.create(table_name)
    with open(path, "rb") as f:
        assert f.read() == data  # never overwritten


def _real_table(name: str) -> str:
    with shmreg.Table.create(name, capacity=100, memory=1 << 16, shards=2) as t:
        t.update({f"k{i}": i for i in range(50)})
        path = t.path
    assert path == segment_path(name)
    return path


def test_header_struct_matches_layout(table_name):
    path = _real_table(table_name)
    h = read_header(path)
    plan = _core.plan_layout(100, 1 << 16, 2)
    for f in ("nshards", "shard_bits", "slots", "max_fill", "arena_size", "capacity", "memory",
              "procs_off", "shards_off", "index_off", "arena_off", "total_size"):
        assert h[f] == plan[f], f
    assert h["layout"] == _core.LAYOUT_VERSION and h["header_size"] == _core.HEADER_SIZE
    assert h["shard_size"] == _core.SHARD_STRUCT_SIZE and h["nprocs"] == _core.NPROCS
    assert h["creator_pid"] == os.getpid()
    assert h["total_size"] == os.path.getsize(path)


@pytest.mark.parametrize("field,value", [("magic", 0x1234), ("magic", 0), ("layout", 999),
                                         ("layout", 0), ("header_size", 8192),
                                         ("shard_size", 1), ("proc_size", 1), ("bins", 63),
                                         ("nprocs", 1)])
def test_incompatible_header(table_name, field, value):
    path = _real_table(table_name)
    patch_field(path, field, value)
    with pytest.raises(shmreg.IncompatibleTableError):
        shmreg.Table.open(table_name)
    with pytest.raises(shmreg.IncompatibleTableError):
        shmreg.Table(table_name)


GEOMETRY_CORRUPTIONS = [
    ("nshards", lambda h: 3), ("nshards", lambda h: 0), ("nshards", lambda h: 4),
    ("nshards", lambda h: 2**31), ("shard_bits", lambda h: 5), ("slots", lambda h: 7),
    ("slots", lambda h: h["slots"] + 8), ("slots", lambda h: 2**32 - 8),
    ("max_fill", lambda h: h["slots"]), ("max_fill", lambda h: 0),
    ("arena_size", lambda h: 128), ("arena_size", lambda h: h["arena_size"] * 2),
    ("arena_size", lambda h: h["arena_size"] + 64), ("arena_size", lambda h: 2**63),
    ("index_off", lambda h: h["index_off"] + 64), ("arena_off", lambda h: h["arena_off"] - 64),
    ("shards_off", lambda h: 0), ("procs_off", lambda h: 2**64 - 1),
    ("total_size", lambda h: h["total_size"] + 4096), ("total_size", lambda h: 0),
]


@pytest.mark.parametrize("field,make", GEOMETRY_CORRUPTIONS,
                         ids=[f"{f}-{i}" for i, (f, _) in enumerate(GEOMETRY_CORRUPTIONS)])
def test_corrupt_geometry(table_name, field, make):
    path = _real_table(table_name)
    patch_field(path, field, make(read_header(path)))
    with pytest.raises((shmreg.CorruptTableError, shmreg.IncompatibleTableError)):
        shmreg.Table.open(table_name)


@pytest.mark.parametrize("delta", [-4096, 4096, -1, 1])
def test_file_size_mismatch(table_name, delta):
    path = _real_table(table_name)
    os.truncate(path, os.path.getsize(path) + delta)
    with pytest.raises((shmreg.CorruptTableError, shmreg.IncompatibleTableError)):
        shmreg.Table.open(table_name)


# -- a corrupt item header ---------------------------------------------------------------------

# shm_item_t's fields (offsets from engine/shm_layout.h via _core.LAYOUT).
ITEM_FIELDS = layout_struct("item", "size klen types flags vlen owner expires".split())[1]

ITEM_CORRUPTOR = r"""
import faulthandler, mmap, os, struct, sys
faulthandler.enable()
faulthandler.dump_traceback_later(50, exit=True)
import shmreg

name, key, field_off, fmt, value, header_fmt = sys.argv[1:7]
field_off, value = int(field_off), int(value)
ALLOWED = (shmreg.Error, KeyError, ValueError, TypeError)

class Clock:
    now = 1000.0  # the entries were written at 1000 with ttl 5
    def __call__(self):
        return self.now

with shmreg.Table.open(name) as t0:
    path, regions = t0.path, t0._shard_regions()
with open(path, "r+b") as f:
    mm = mmap.mmap(f.fileno(), 0)
    target = None
    for index, slots, arena, _cap in regions:
        for i in range(slots):
            off = struct.unpack_from("<Q", mm, index + 8 * i)[0] & 0xFFFFFFFF
            if off > 1:
                item = arena + off - 8
                klen, vlen = struct.unpack_from("<H", mm, item + 4)[0], struct.unpack_from("<I", mm, item + 8)[0]
                if mm[item + 24 + vlen: item + 24 + vlen + klen] == key.encode():
                    target = item
    assert target is not None
    struct.pack_into(fmt, mm, target + field_off, value)
    mm.close()

clock = Clock()
t = shmreg.Table.open(name, clock=clock)

def later():
    clock.now = 2000.0  # everything with a ttl has expired

ops = [
    lambda: t[key], lambda: t.get(key), lambda: key in t, lambda: t.ttl(key),
    lambda: len(t), t.keys, t.values, t.items, lambda: list(t.select(prefix="")), t.stats,
    t.check, lambda: t.compare_and_swap(key, t.get(key), 2), lambda: t.setdefault(key, 3),
    lambda: t.insert_new(key, 1), lambda: t.expire(key, 5), lambda: t.update_counter(key),
    later, t.purge_expired, lambda: t.__setitem__(key, b"x" * 40), lambda: t.delete(key),
    lambda: t.take(key, None), lambda: t.insert_new(key, 1), lambda: t.update_counter(key),
    lambda: t.update({f"n{i}": b"n" * i for i in range(30)}), lambda: t.__delitem__("a"),
    t.purge_expired, t.check, t.items, t.clear, lambda: t.__setitem__(key, 1), t.check,
]
for i, op in enumerate(ops):
    print("op", i, file=sys.stderr, flush=True)
    try:
        op()
    except ALLOWED:
        pass
    except BaseException as e:
        print(f"op {i} raised {type(e).__module__}.{type(e).__qualname__}: {e}"[:300])
"""

ITEM_CASES = [
    ("size", 0), ("size", 8), ("size", 24), ("size", 28), ("size", 33), ("size", 2**32 - 8),
    ("size", 1 << 20), ("klen", 0), ("klen", 0xFFFF), ("vlen", 0), ("vlen", 1000),
    ("vlen", 2**32 - 1), ("types", 0), ("types", 0xFF), ("types", 0x72), ("flags", 0),
    ("flags", 0xFF), ("owner", 0xFFFFFFFF), ("expires", 1), ("expires", 2**64 - 1),
]


@pytest.mark.parametrize("key,field,value",
                         [("target", f, v) for f, v in ITEM_CASES]
                         + [("", "size", v) for v in (0, 8, 24, 28, 33)])
def test_corrupt_item_header_never_crashes(table_name, key, field, value):
    """One field of one item's header overwritten, then every operation on
    that key (and the whole table) in a child: each works or raises a
    shmreg.Error / KeyError / ValueError / TypeError, and the child exits
    normally.  The "" key holds None: its item is exactly one minimal block,
    so a size of 24 still passes the lookup's length check."""
    class Clock:
        def __call__(self):
            return 1000.0

    with shmreg.Table.create(table_name, capacity=64, memory=1 << 14, shards=1, clock=Clock()) as t:
        t["a"] = b"a" * 10
        t.set("target", b"value", ttl=5)
        t.set("", None, ttl=5)
        t.set("z", "z" * 50, ttl=5)
        t.check()
    off, fmt = ITEM_FIELDS[field]
    p = spawn_py(ITEM_CORRUPTOR, table_name, key, str(off), fmt, str(value), HEADER_FMT)
    try:
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    last_op = [line for line in err.splitlines() if line.startswith("op ")][-1:]
    assert p.returncode == 0, f"child died with {p.returncode} at {last_op}:\n{err[-2000:]}"
    assert out.strip() == "", out


# -- random corruption of a live segment -------------------------------------------------------

CORRUPTOR = r"""
import faulthandler, json, mmap, os, pickle, random, struct, sys
faulthandler.enable()
faulthandler.dump_traceback_later(100, exit=True)  # a hang prints where it hangs
import shmreg

name, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
HEADER_FMT = sys.argv[4]
SHARD_SIZE = shmreg._core.SHARD_STRUCT_SIZE
LOCK_BYTES = shmreg._core.LAYOUT["shard.lock"][1]   # the pthread mutex: not ours to corrupt
TOP_OFF = shmreg._core.LAYOUT["shard.top"][0]
ALLOWED = (shmreg.Error, KeyError, ValueError, TypeError)

with shmreg.Table.open(name) as t0:
    path, regions = t0.path, t0._shard_regions()
fd = os.open(path, os.O_RDWR)
mm = mmap.mmap(fd, 0)
(magic, layout, hsize, total, nsh, bits, slots, max_fill, arena, cap, mem, s0, s1,
 procs_off, shards_off, index_off, arena_off) = struct.unpack_from(HEADER_FMT, mm, 0)[:17]
assert total == len(mm)
pristine = bytes(mm)

def shard_top(si):
    return struct.unpack_from("<Q", pristine, shards_off + si * SHARD_SIZE + TOP_OFF)[0]

used_slots = [index + 8 * i for index, n, _, _ in regions for i in range(n)
              if struct.unpack_from("<Q", pristine, index + 8 * i)[0] & 0xFFFFFFFF > 1]
used_arena = [(regions[si][2], regions[si][2] + shard_top(si)) for si in range(nsh)]
used_arena = [r for r in used_arena if r[1] > r[0]]
assert used_slots and used_arena

def target(rng):
    region = rng.choice(["index", "slot", "arena", "arena", "shard", "header"])
    if region == "index":
        return region, rng.randrange(index_off, arena_off)
    if region == "slot":
        return region, rng.choice(used_slots) + rng.randrange(8)
    if region == "arena":
        lo, hi = rng.choice(used_arena)
        return region, rng.randrange(lo, hi)
    if region == "shard":
        si = rng.randrange(nsh)
        return region, shards_off + si * SHARD_SIZE + rng.randrange(LOCK_BYTES, SHARD_SIZE)
    return region, rng.randrange(0, 256)

KEYS = [f"k{i}" for i in range(0, 120, 7)] + [b"b1", b"b2", 5, -5, 2**70, "counter",
                                             "absent", b"absent", 12345]

def ops(t, rng):
    for k in KEYS:
        yield lambda: t[k]
        yield lambda: t.get(k)
        yield lambda: k in t
        yield lambda: t.ttl(k)
    yield lambda: len(t)
    yield lambda: list(t)
    yield t.keys
    yield t.values
    yield t.items
    yield lambda: list(t.select(prefix="k1"))
    yield lambda: list(t.select(prefix=b"b"))
    yield t.stats
    yield t.check
    for k in KEYS:
        v = rng.choice([b"x" * rng.randrange(0, 300), "s", 7, {"d": [1]}, None, 2**80])
        yield lambda: t.__setitem__(k, v)
        yield lambda: t.set(k, v, ttl=50)
        yield lambda: t.insert_new(k, v)
        yield lambda: t.update_counter("counter")
        yield lambda: t.update_counter(k, 2)
        yield lambda: t.compare_and_swap(k, t.get(k), "cas")
        yield lambda: t.setdefault(k, 1)
        yield lambda: t.expire(k, 10)
        yield lambda: t.take(k, None)
        yield lambda: t.pop(k, None)
        yield lambda: t.delete(k)
        yield lambda: t.__delitem__(k)
        yield lambda: t.get(k)
    yield lambda: t.update({f"new{i}": b"n" * i for i in range(40)})
    yield t.purge_expired
    yield t.check
    yield t.items
    yield t.clear
    yield lambda: t.__setitem__("after-clear", 1)
    yield t.items
    yield t.check

unexpected = []
stats = {"ok": 0, "raised": 0, "attach_failed": 0, "check_failed_first": 0}
for seed in range(first, last):
    print("seed", seed, file=sys.stderr, flush=True)  # the last one names a crash
    rng = random.Random(seed)
    mm[:] = pristine
    hits = []
    for _ in range(rng.choice([1, 1, 2, 4, 16, 64])):
        region, off = target(rng)
        if rng.random() < 0.5:
            mm[off] ^= 1 << rng.randrange(8)
        else:
            mm[off] = rng.randrange(256)
        hits.append((region, off))
    try:
        t = shmreg.Table.open(name)
    except ALLOWED:
        stats["attach_failed"] += 1
        continue
    try:
        t.check()
    except shmreg.CorruptTableError:
        stats["check_failed_first"] += 1
    for i, op in enumerate(ops(t, rng)):
        try:
            op()
            stats["ok"] += 1
        except ALLOWED:
            stats["raised"] += 1
        except BaseException as e:
            unexpected.append(dict(seed=seed, op=i, hits=hits[:4],
                                   error=f"{type(e).__module__}.{type(e).__qualname__}: {e}"[:300]))
    t.close()
print(json.dumps(dict(unexpected=unexpected, stats=stats)))
"""


def _fill_for_corruption(name: str) -> None:
    with shmreg.Table.create(name, capacity=256, memory=1 << 16, shards=4) as t:
        for i in range(120):
            v = [b"v" * (i * 3), f"str-{i}-é", i * 1000, 2**70 + i, float(i), i % 2 == 0, None,
                 {"i": i, "l": [i] * 3}, (i, "t")][i % 9]
            if i % 5 == 0:
                t.set(f"k{i}", v, ttl=1e6)
            else:
                t[f"k{i}"] = v
        t.update({b"b1": b"bytes-key", b"b2": "x", 5: 5, -5: -5, 2**70: "big", "counter": 10})
        for i in range(0, 120, 11):
            del t[f"k{i}"]  # some tombstones and free blocks
        t.check()


def test_random_corruption_never_crashes():
    """200 corruptions (bit flips and random bytes in the index, the used
    arena, the shard headers past the mutex, and the table header), each
    followed by every read and write operation: each either works or raises
    a shmreg.Error / KeyError / ValueError / TypeError, and the process
    survives."""
    nchildren, per_child = 4, 50
    names = [unique_name("corrupt") for _ in range(nchildren)]
    procs = []
    try:
        for n in names:
            _fill_for_corruption(n)
        for i, n in enumerate(names):
            procs.append(spawn_py(CORRUPTOR, n, str(i * per_child), str((i + 1) * per_child),
                                  HEADER_FMT))
        reports = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            seeds = [line for line in err.splitlines() if line.startswith("seed ")]
            rest = "\n".join(line for line in err.splitlines() if not line.startswith("seed "))
            assert p.returncode == 0, \
                f"corruption child died with {p.returncode} at {seeds[-1:]}:\n{rest[-3000:]}"
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for n in names:
            try:
                shmreg.unlink(n)
            except shmreg.TableNotFoundError:
                pass
    unexpected = [u for r in reports for u in r["unexpected"]]
    assert not unexpected, json.dumps(unexpected[:10], indent=1)
    total = {k: sum(r["stats"][k] for r in reports) for k in reports[0]["stats"]}
    # The corruptions must actually have been noticed somewhere, and most
    # operations still work.
    assert total["check_failed_first"] > 0 and total["raised"] > 0
    assert total["ok"] > total["raised"]


def test_garbage_pickle_is_corruption_but_missing_class_is_not():
    import pickle

    """A stored 'pickle' that is garbage (here a dict fed an APPEND) can only
    come from a corrupted segment: CorruptTableError.  A valid pickle whose
    class is not importable in the reader is the caller's business: the
    import error passes through unchanged."""
    import sys
    import types

    from shmreg import _core

    with pytest.raises(shmreg.CorruptTableError):
        _core.decode_raw(7, b"\x80\x05}\x94K\x01a.")
    mod = types.ModuleType("shmreg_test_vanishing")

    class Gone:
        pass

    Gone.__module__, Gone.__qualname__ = mod.__name__, "Gone"
    mod.Gone = Gone
    sys.modules[mod.__name__] = mod
    try:
        raw = pickle.dumps(Gone())
    finally:
        del sys.modules[mod.__name__]
    with pytest.raises(ModuleNotFoundError):
        _core.decode_raw(7, raw)
