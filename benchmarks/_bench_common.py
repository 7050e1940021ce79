"""Shared setup for the shmreg benchmarks (pytest-benchmark suite and report.py).

One data set for every backend, so every number compares the same keys;
it is ``shmreg._benchdata.Dataset``, the one ``shmreg bench`` uses, with
the same operation names (get-hit, get-miss, set, update_counter):
100,000 entries of 16-byte keys and 64-byte values, 1,000 hit keys sampled
from them, 1,000 keys that are absent, 1,000 counter keys (16 bytes, start
at 0).  Every timed function runs ``OPS`` (1,000) operations, so a time is
*per 1,000 ops*; divide by 1,000 for the time per operation (nanoseconds
per op = microseconds per call).

Backends:

- ``dict``: a plain dict in this process (``dict.get`` / ``d[k] = v`` /
  ``d[k] += 1``): the floor, not a peer (it is not shared between processes).
- ``shmreg``: a :class:`shmreg.Table` with capacity 110,000 (the 100,000
  entries, the counters and headroom) and default memory.
- ``lmdb``: py-lmdb in a temporary directory; gets reuse one read
  transaction, each set is its own write transaction, a counter is a
  read-modify-write (ASCII integer, like Redis) in one write transaction.
  The environment is opened with ``sync=False, metasync=False,
  writemap=True`` (LMDB's fastest, non-durable mode): shmreg is not durable
  either, so the comparison is of the in-memory cost, not of fsync or of
  ``pwrite`` copies (measured here: ~2 us a set with writemap, ~10 us
  without, ~0.6 ms with fsync on disk).
- ``redis``: a private redis-server on a unix socket (``--port 0 --save ''
  --appendonly no``) through redis-py: GET / SET / INCR, one round trip each.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

import shmreg
from shmreg import _benchdata

N_ENTRIES = 100_000

# The Redis/Valkey backend and near-cache benchmarks: 200 keys, 64-char values.
REDIS_OPS = 200
REDIS_KEYS = [f"key:{i:06d}" for i in range(REDIS_OPS)]
REDIS_VALUE = "v" * 64
KEY_LEN = _benchdata.KEY_BYTES
VALUE_LEN = _benchdata.VALUE_BYTES
OPS = 1_000                     # operations per timed call
TABLE_CAPACITY = 110_000        # the speed table: entries + counters + headroom
SEED = _benchdata.SEED

BACKENDS = ("dict", "shmreg", "lmdb", "redis")
#: The same names as ``shmreg bench`` (one definition: shmreg._benchdata).
OPERATIONS = _benchdata.OPERATIONS

#: Filled in by the pytest benchmarks (``(operation, backend) -> ns/op``)
#: and printed by the conftest's terminal summary.
RESULTS: dict = {}
NOTES: list = []

_key = _benchdata.make_key


class Dataset(_benchdata.Dataset):
    """The data set of ``shmreg bench`` at this suite's size: 100,000 entries,
    1,000 operations per timed call."""

    def __init__(self, n: int = N_ENTRIES, ops: int = OPS, seed: int = SEED) -> None:
        super().__init__(n, ops, seed)


def reader_keys(n: int, seed: int, ops: int = OPS) -> list:
    """``ops`` hit keys of a dataset of ``n`` entries, sampled with ``seed``
    (the throughput readers regenerate these in their own process)."""
    return _benchdata.reader_keys(n, seed, ops)


# -- backends ------------------------------------------------------------------

def unique_table_name(tag: str) -> str:
    return f"bench-{tag}-{os.getpid()}-{time.monotonic_ns()}"


def make_dict(ds: Dataset) -> dict:
    d = dict(ds.items())
    for k in ds.counter_keys:
        d[k] = 0
    return d


def make_shmreg(ds: Dataset, name: str, capacity: int = TABLE_CAPACITY) -> "shmreg.Table":
    t = shmreg.Table.create(name, capacity=capacity)
    try:
        for k, v in ds.items():
            t[k] = v
        for k in ds.counter_keys:
            t[k] = 0
        assert len(t) == ds.n + len(ds.counter_keys)
    except BaseException:
        t.close()
        shmreg.unlink(name)
        raise
    return t


def open_lmdb(path: str, map_size: int = 1 << 30):
    import lmdb
    return lmdb.open(path, map_size=map_size, sync=False, metasync=False, writemap=True,
                     max_readers=64, subdir=True)


def make_lmdb(ds: Dataset, path: str):
    env = open_lmdb(path)
    with env.begin(write=True) as txn:
        for k, v in ds.items():
            txn.put(k, v)
        for k in ds.counter_keys:
            txn.put(k, b"0")
    return env


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


class RedisServer:
    """A private redis-server on a unix socket in ``directory``, no persistence."""

    def __init__(self, directory: str, binary: str | None = None) -> None:
        self.binary = binary or redis_server_binary()
        if not self.binary:
            raise FileNotFoundError("redis-server is not on PATH")
        self.directory = directory
        self.socket = os.path.join(directory, "redis.sock")
        self.log = os.path.join(directory, "redis.log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> "RedisServer":
        import redis
        self.proc = subprocess.Popen(
            [self.binary, "--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", self.directory,
             "--logfile", self.log, "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self._log_tail()}")
            if os.path.exists(self.socket):
                try:
                    if redis.Redis(unix_socket_path=self.socket).ping():
                        return self
                except redis.ConnectionError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not come up in {timeout} s: {self._log_tail()}")
            time.sleep(0.02)

    def client(self):
        import redis
        return redis.Redis(unix_socket_path=self.socket)

    def _log_tail(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()[-2000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def fill_redis(ds: Dataset, client) -> None:
    client.flushdb()
    pipe = client.pipeline(transaction=False)
    for i, (k, v) in enumerate(ds.items(), 1):
        pipe.set(k, v)
        if i % 5000 == 0:
            pipe.execute()
    for k in ds.counter_keys:
        pipe.set(k, 0)
    pipe.execute()
    assert client.dbsize() == ds.n + len(ds.counter_keys)


# -- the timed loops -----------------------------------------------------------
# Each returns a zero-argument function doing OPS operations.  The loops are
# written out per backend (bound methods hoisted into locals) so that every
# backend pays the same, minimal Python loop overhead.

def dict_ops(d: dict, ds: Dataset) -> dict:
    get = d.get
    hits, misses, pairs, ctrs = ds.hit_keys, ds.miss_keys, ds.set_pairs, ds.counter_keys

    def get_hit():
        for k in hits:
            get(k)

    def get_miss():
        for k in misses:
            get(k)

    def set_loop():
        for k, v in pairs:
            d[k] = v

    def update_counter():
        for k in ctrs:
            d[k] += 1

    return {"get-hit": get_hit, "get-miss": get_miss,
            "set": set_loop, "update_counter": update_counter}


def shmreg_ops(t, ds: Dataset) -> dict:
    get, uc = t.get, t.update_counter
    hits, misses, pairs, ctrs = ds.hit_keys, ds.miss_keys, ds.set_pairs, ds.counter_keys

    def get_hit():
        for k in hits:
            get(k)

    def get_miss():
        for k in misses:
            get(k)

    def set_loop():
        for k, v in pairs:
            t[k] = v

    def update_counter():
        for k in ctrs:
            uc(k)

    return {"get-hit": get_hit, "get-miss": get_miss,
            "set": set_loop, "update_counter": update_counter}


def lmdb_ops(env, ds: Dataset, read_txn=None) -> dict:
    """``read_txn``: one read transaction reused by both get loops (the
    caller aborts it when done; without it the get loops are left out).
    Keep no read transaction open while the write loops run: an open reader
    pins old pages, so LMDB cannot reuse them and the map fills up."""
    begin = env.begin
    hits, misses, pairs, ctrs = ds.hit_keys, ds.miss_keys, ds.set_pairs, ds.counter_keys

    def set_loop():
        for k, v in pairs:
            with begin(write=True) as txn:
                txn.put(k, v)

    def update_counter():
        for k in ctrs:
            with begin(write=True) as txn:
                txn.put(k, b"%d" % (int(txn.get(k)) + 1))

    ops = {"set": set_loop, "update_counter": update_counter}
    if read_txn is not None:
        get = read_txn.get

        def get_hit():
            for k in hits:
                get(k)

        def get_miss():
            for k in misses:
                get(k)

        ops.update({"get-hit": get_hit, "get-miss": get_miss})
    return ops


def redis_ops(client, ds: Dataset) -> dict:
    get, set_, incr = client.get, client.set, client.incr
    hits, misses, pairs, ctrs = ds.hit_keys, ds.miss_keys, ds.set_pairs, ds.counter_keys

    def get_hit():
        for k in hits:
            get(k)

    def get_miss():
        for k in misses:
            get(k)

    def set_loop():
        for k, v in pairs:
            set_(k, v)

    def update_counter():
        for k in ctrs:
            incr(k)

    return {"get-hit": get_hit, "get-miss": get_miss,
            "set": set_loop, "update_counter": update_counter}


def check_read_ops(ops: dict, reader: Callable, ds: Dataset) -> None:
    """Run the get loops once and check the keys they use: hits are present,
    misses absent (so a broken loop cannot produce a fast number).
    ``reader(key)`` returns the backend's stored value or None."""
    assert reader(ds.hit_keys[0]) is not None, "hit key absent"
    assert reader(ds.hit_keys[-1]) is not None, "hit key absent"
    assert reader(ds.miss_keys[0]) is None, "miss key present"
    ops["get-hit"]()
    ops["get-miss"]()


def check_write_ops(ops: dict, reader: Callable, ds: Dataset) -> None:
    """Run the write loops once: sets store the new value, counters go up by one."""
    ops["set"]()
    k, v = ds.set_pairs[-1]
    assert reader(k) == v, "set did not store the new value"
    c0 = int(reader(ds.counter_keys[0]))
    ops["update_counter"]()
    assert int(reader(ds.counter_keys[0])) == c0 + 1, "counter did not go up by one"


def backend_loops(name: str, store, ds: Dataset, read_txn=None) -> dict:
    """The timed loops of backend ``name`` (LMDB: get loops only with ``read_txn``)."""
    if name == "dict":
        return dict_ops(store, ds)
    if name == "shmreg":
        return shmreg_ops(store, ds)
    if name == "lmdb":
        return lmdb_ops(store, ds, read_txn)
    if name == "redis":
        return redis_ops(store, ds)
    raise ValueError(name)


def backend_reader(name: str, store) -> Callable:
    """``reader(key)``: the value stored under key in backend ``name``, or None."""
    if name == "lmdb":
        def read(k):
            with store.begin() as txn:
                return txn.get(k)
        return read
    return store.get


def check_backend(name: str, store, ds: Dataset) -> None:
    """Check every loop of a backend once.  LMDB: no read transaction stays
    open while the write loops run (it would pin pages and bloat the file)."""
    read = backend_reader(name, store)
    txn = store.begin() if name == "lmdb" else None
    try:
        check_read_ops(backend_loops(name, store, ds, txn), read, ds)
    finally:
        if txn is not None:
            txn.abort()
    check_write_ops(backend_loops(name, store, ds), read, ds)


# -- reader scaling ------------------------------------------------------------

_READER_CODE = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import _bench_common as bc
import shmreg
t = shmreg.Table.open(sys.argv[2])
duration, seed, n = float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
keys = bc.reader_keys(n, seed)
get = t.get
for k in keys:                       # warm up, and prove these are hits
    assert get(k) is not None, k
print("ready", flush=True)
sys.stdin.readline()                 # wait for "go"
ops = 0
cpu0 = time.process_time()
start = time.perf_counter()
end = start + duration
while True:
    for k in keys:
        get(k)
    ops += len(keys)
    now = time.perf_counter()
    if now >= end:
        break
print(ops, now - start, time.process_time() - cpu0, flush=True)
"""


def reader_throughput(table_name: str, nreaders: int, duration: float, n_entries: int = N_ENTRIES,
                      timeout: float = 60.0) -> dict:
    """Start ``nreaders`` processes that each do ``get`` (hits) on table
    ``table_name`` for ``duration`` seconds, all starting together.
    Returns total ops/s and per-reader ops/s."""
    env = dict(os.environ)
    env.pop("SHMREG_CRASH_AT", None)
    here = os.path.dirname(os.path.abspath(__file__))
    procs = [subprocess.Popen([sys.executable, "-c", _READER_CODE, here, table_name, str(duration),
                               str(SEED + 1 + i), str(n_entries)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
             for i in range(nreaders)]
    try:
        for p in procs:
            line = _readline(p, timeout)
            if line.strip() != "ready":
                raise RuntimeError(f"reader failed to start: {line!r} {p.stderr.read() if p.poll() is not None else ''}")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        per, share, per_cpu = [], [], []
        for p in procs:
            out, err = p.communicate(timeout=duration + timeout)
            if p.returncode != 0:
                raise RuntimeError(f"reader exited with {p.returncode}: {err}")
            ops, secs, cpu = out.split()
            per.append(int(ops) / float(secs))
            share.append(float(cpu) / float(secs))
            per_cpu.append(int(ops) / max(float(cpu), 1e-9))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    # cpu_share < 1: the reader did not get a whole CPU (other processes ran);
    # ops per CPU second then shows whether the readers slowed each other down.
    return {"readers": nreaders, "total_ops_per_s": sum(per), "per_reader_ops_per_s": per,
            "cpu_share": share, "ops_per_cpu_s": per_cpu}


def _readline(p: subprocess.Popen, timeout: float) -> str:
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise RuntimeError(f"reader did not report ready within {timeout} s")
    finally:
        sel.close()
    return p.stdout.readline()


def reader_scaling(table_name: str, duration: float = 1.5, repeats: int = 2) -> dict:
    """N=1 vs N=2 readers, alternated ``repeats`` times; best of each."""
    best = {1: None, 2: None}
    for _ in range(repeats):
        for n in (1, 2):
            r = reader_throughput(table_name, n, duration)
            if best[n] is None or r["total_ops_per_s"] > best[n]["total_ops_per_s"]:
                best[n] = r
    one, two = best[1]["total_ops_per_s"], best[2]["total_ops_per_s"]
    return {"duration_s": duration, "repeats": repeats, "cpus": os.cpu_count(),
            "ops_per_s_1_reader": one, "ops_per_s_2_readers": two,
            "per_reader_ops_per_s_2_readers": best[2]["per_reader_ops_per_s"],
            "cpu_share_1_reader": best[1]["cpu_share"], "cpu_share_2_readers": best[2]["cpu_share"],
            "ops_per_cpu_s_1_reader": best[1]["ops_per_cpu_s"][0],
            "ops_per_cpu_s_2_readers": best[2]["ops_per_cpu_s"],
            "ratio_2_vs_1": two / one, "target_ratio": 1.8, "meets_target": two / one >= 1.8,
            # Work per CPU second of a reader with a second reader running, over
            # that of a lone reader: ~1.0 means readers do not slow each other
            # down, whatever other processes on the machine took.
            "per_cpu_efficiency_2_vs_1": (sum(best[2]["ops_per_cpu_s"]) / 2) / best[1]["ops_per_cpu_s"][0]}


# -- memory per entry ----------------------------------------------------------

def shmreg_fixed_bytes(t) -> int:
    """Header + process table + shard structs of table ``t`` (from its layout)."""
    from shmreg import _core
    h = t._header()
    plan = _core.plan_layout(h["capacity"], h["memory"], h["nshards"])
    assert plan["total_size"] == h["total_size"], "plan_layout does not reproduce the header"
    return plan["shards_off"] + h["nshards"] * _core.SHARD_STRUCT_SIZE


def _fill_all(ds: Dataset, t) -> bool:
    try:
        for k, v in ds.items():
            t[k] = v
    except shmreg.TableFullError:
        return False
    assert len(t) == ds.n
    return True


def shmreg_memory(ds: Dataset, capacity: int = N_ENTRIES, steps: int = 8) -> dict:
    """(a) bytes actually used per entry in a capacity=100k, default-memory
    table; (b) whole segment per entry for capacity=100k and the smallest
    ``memory`` that still holds the entries (bisection, ``steps`` tries)."""
    name = unique_table_name("mem")
    t = shmreg.Table.create(name, capacity=capacity)
    try:
        assert _fill_all(ds, t), "default-memory table could not hold the data set"
        st = t.stats()
        fixed = shmreg_fixed_bytes(t)
        index = st["index_slots"] * 8
        used = st["bytes_used"] + index + fixed
        t.check()
        out = {"entries": st["entries"], "item_bytes_used": st["bytes_used"], "index_bytes": index,
               "fixed_bytes": fixed, "used_bytes_per_entry": used / st["entries"],
               "item_bytes_per_entry": st["bytes_used"] / st["entries"],
               "default_memory_segment_per_entry": st["segment_bytes"] / st["entries"]}
        lo, hi = st["bytes_used"], st["memory"]     # lo is a lower bound: it cannot hold less
    finally:
        t.close()
        shmreg.unlink(name)

    def fits(memory: int):
        name = unique_table_name("memfit")
        t = shmreg.Table.create(name, capacity=capacity, memory=memory)
        try:
            return t.stats()["segment_bytes"] if _fill_all(ds, t) else None
        finally:
            t.close()
            shmreg.unlink(name)

    best_mem, best_seg = hi, None
    tries = []
    for _ in range(steps):
        mid = (lo + hi) // 2
        seg = fits(mid)
        tries.append((mid, seg is not None))
        if seg is not None:
            hi, best_mem, best_seg = mid, mid, seg
        else:
            lo = mid
    if best_seg is None:
        best_seg = fits(best_mem)
        assert best_seg is not None
    out.update({"smallest_memory": best_mem, "smallest_segment_bytes": best_seg,
                "smallest_segment_per_entry": best_seg / ds.n,
                "memory_search": tries})
    return out


def lmdb_memory(ds: Dataset, path: str) -> dict:
    env = open_lmdb(path)
    try:
        with env.begin(write=True) as txn:
            for k, v in ds.items():
                txn.put(k, v)
        info, stat = env.info(), env.stat()
        assert stat["entries"] == ds.n
        size = (info["last_pgno"] + 1) * stat["psize"]
    finally:
        env.close()
    return {"bytes": size, "bytes_per_entry": size / ds.n, "page_size": stat["psize"],
            "depth": stat["depth"], "leaf_pages": stat["leaf_pages"],
            "overflow_pages": stat["overflow_pages"]}


def dict_memory(ds: Dataset) -> dict:
    d = dict(ds.items())
    size = sys.getsizeof(d) + sum(map(sys.getsizeof, d)) + sum(map(sys.getsizeof, d.values()))
    return {"bytes": size, "bytes_per_entry": size / len(d),
            "dict_only_bytes_per_entry": sys.getsizeof(d) / len(d)}


def redis_memory(ds: Dataset, client) -> dict:
    """used_memory growth of the server while it takes the data set (db 15)."""
    import redis
    c = redis.Redis(connection_pool=redis.ConnectionPool(
        connection_class=redis.UnixDomainSocketConnection,
        path=client.connection_pool.connection_kwargs["path"], db=15))
    c.flushdb()
    before = c.info("memory")["used_memory"]
    pipe = c.pipeline(transaction=False)
    for i, (k, v) in enumerate(ds.items(), 1):
        pipe.set(k, v)
        if i % 5000 == 0:
            pipe.execute()
    pipe.execute()
    assert c.dbsize() == ds.n
    after = c.info("memory")["used_memory"]
    c.flushdb()
    c.close()
    return {"bytes": after - before, "bytes_per_entry": (after - before) / ds.n}


# -- formatting ----------------------------------------------------------------

def _versus(shm: float | None, other: float | None) -> str:
    if shm is None or other is None:
        return "n/a"
    r = other / shm
    return f"{r:,.1f}x faster" if r >= 1 else f"{1 / r:.2f}x slower"


def markdown_ops_table(ns: dict, backends=BACKENDS) -> str:
    """``ns[(operation, backend)] -> ns/op`` as a Markdown table, with shmreg
    compared to each other backend ("2.0x slower" = twice the time)."""
    have = [b for b in backends if any((op, b) in ns for op in OPERATIONS)]
    peers = [b for b in have if b != "shmreg"]
    head = ["operation"] + [f"{b} ns/op" for b in have] + [f"shmreg vs {b}" for b in peers]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for op in OPERATIONS:
        row = [op]
        for b in have:
            v = ns.get((op, b))
            row.append("n/a" if v is None else f"{v:,.0f}")
        for b in peers:
            row.append(_versus(ns.get((op, "shmreg")), ns.get((op, b))))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def redis_wire_floor_ns(socket_path: str, key: bytes, n: int = 2000, repeat: int = 3) -> float:
    """ns per GET round trip over the unix socket with no client library
    (hand-written RESP): the floor under any Redis client's number."""
    import socket
    import timeit
    msg = b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key)
    with socket.socket(socket.AF_UNIX) as so:
        so.connect(socket_path)
        so.sendall(msg)
        first = so.recv(65536)
        assert first.startswith(b"$"), first

        def once():
            so.sendall(msg)
            so.recv(65536)
        return min(timeit.repeat(once, number=n, repeat=repeat)) / n * 1e9


def markdown_memory_table(mem: dict) -> str:
    lines = ["| store | bytes/entry | how |", "|---|---:|---|"]
    s = mem["shmreg"]
    lines.append(f"| shmreg (used) | {s['used_bytes_per_entry']:.1f} | items {s['item_bytes_per_entry']:.1f}"
                 f" + index {s['index_bytes'] / s['entries']:.1f} + fixed {s['fixed_bytes'] / s['entries']:.1f}"
                 " (capacity=100k) |")
    lines.append(f"| shmreg (segment, smallest memory) | {s['smallest_segment_per_entry']:.1f} |"
                 f" whole segment, capacity=100k, memory={s['smallest_memory']:,} |")
    lines.append(f"| shmreg (segment, default memory) | {s['default_memory_segment_per_entry']:.1f} |"
                 " whole segment, capacity=100k, default memory |")
    if "lmdb" in mem:
        m = mem["lmdb"]
        lines.append(f"| lmdb | {m['bytes_per_entry']:.1f} | (last_pgno+1) x {m['page_size']} B pages |")
    if "redis" in mem:
        lines.append(f"| redis | {mem['redis']['bytes_per_entry']:.1f} | used_memory growth |")
    if "dict" in mem:
        lines.append(f"| dict | {mem['dict']['bytes_per_entry']:.1f} | getsizeof(dict) + keys + values |")
    return "\n".join(lines)
