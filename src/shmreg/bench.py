"""``shmreg bench``: shmreg against the peers installed on this host.

Four operations on one data set, timed for every peer:

- ``get-hit``: read a key that is present (1 of ``entries`` keys, sampled);
- ``get-miss``: read a key that is absent;
- ``set``: overwrite a present key with a new value of the same size;
- ``update_counter``: add 1 to an integer counter (the peer's atomic
  increment where it has one, else its safe read-modify-write).

Keys are 16 bytes, values 64 bytes.  Each timed call runs ``ops``
operations; a result is the best of ``repeat`` measurements (each long
enough to fill its share of the time budget), in operations per second.

Peers (each used only when importable / answering; never installed or
started here):

- ``dict``: a plain dict in this process: the floor, not shared.
- ``shmreg``: a :class:`shmreg.Table`.
- ``manager``: ``multiprocessing.Manager().dict()`` (a proxy to a server
  process; its counter is a read-modify-write under a manager ``Lock``).
- ``lmdb``: py-lmdb in a temporary directory (``sync=False``,
  ``writemap=True``: not durable, like shmreg); one write transaction per
  set / counter update.
- ``diskcache``: ``diskcache.Cache`` in a temporary directory
  (``incr`` for counters).
- ``ultradict``: ``UltraDict`` (counter under its lock), if importable.
- ``redis``: a Redis server already answering on loopback (127.0.0.1:6379
  or a usual unix socket; ``--redis`` to name one) through redis-py; keys
  under a unique prefix, deleted afterwards.  Never FLUSHes anything.
- ``memcached``: a memcached already answering on 127.0.0.1:11211
  (``--memcached``) through pymemcache if installed, else a minimal
  built-in text-protocol client; keys under a unique prefix, deleted
  afterwards.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from typing import Any, Callable

import shmreg

__all__ = ["PEERS", "OPERATIONS", "run", "format_table", "markdown_report", "write_chart",
           "matplotlib_available", "install_hint", "ProgressBar"]

PEERS = ("dict", "shmreg", "manager", "lmdb", "diskcache", "ultradict", "redis", "memcached")
SERVER_PEERS = ("redis", "memcached")
#: ``(entries, ops per timed call, repeat, seconds per measurement cell)``
FULL = dict(entries=100_000, ops=1_000, repeat=5, budget=0.4)
QUICK = dict(entries=2_000, ops=200, repeat=3, budget=0.04)

REDIS_SOCKETS = ("/run/redis/redis-server.sock", "/run/redis/redis.sock",
                 "/var/run/redis/redis.sock", "/tmp/redis.sock")
MEMCACHED_SOCKETS = ("/run/memcached/memcached.sock", "/var/run/memcached/memcached.sock",
                     "/tmp/memcached.sock")


class Skip(Exception):
    """A peer that cannot run here (the message says why)."""


# -- data ----------------------------------------------------------------------
# One data set and one set of operation names for this CLI and benchmarks/,
# so the README's numbers and the CLI's measure the same thing.
from shmreg._benchdata import KEY_BYTES, OPERATIONS, VALUE_BYTES, Dataset  # noqa: E402,F401


# -- peers -----------------------------------------------------------------------

class Peer:
    """One backend: ``load`` the data set, then the four timed loops.

    ``prefix`` is prepended to every key (servers shared with others)."""

    name = ""
    description = ""
    counter_note = ""
    prefix = b""

    def version(self) -> str:
        return ""

    def load(self, ds: Dataset) -> None:
        raise NotImplementedError

    def get_loop(self) -> Callable[[list], None]:
        raise NotImplementedError

    def set_loop(self) -> Callable[[list], None]:
        raise NotImplementedError

    def counter_loop(self) -> Callable[[list], None]:
        raise NotImplementedError

    def get_one(self, key: bytes) -> Any:
        raise NotImplementedError

    def counter_value(self, key: bytes) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def _remove_dir(self) -> None:
        """Remove the temporary directory a file-backed peer made (idempotent)."""
        if getattr(self, "dir", None):
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def k(self, keys: list) -> list:
        return [self.prefix + k for k in keys] if self.prefix else keys


def _simple_loops(get, setitem, incr):
    def get_loop(keys):
        for k in keys:
            get(k)

    def set_loop(pairs):
        for k, v in pairs:
            setitem(k, v)

    def counter_loop(keys):
        for k in keys:
            incr(k)

    return get_loop, set_loop, counter_loop


class DictPeer(Peer):
    name = "dict"
    description = "plain dict in this process (not shared: the floor)"
    counter_note = "d[k] += 1 (not atomic across processes)"

    def load(self, ds):
        self.d = dict(zip(ds.keys, ds.values))
        self.d.update(dict.fromkeys(ds.counter_keys, 0))

    def get_loop(self):
        g = self.d.get

        def loop(keys):
            for k in keys:
                g(k)
        return loop

    def set_loop(self):
        d = self.d

        def loop(pairs):
            for k, v in pairs:
                d[k] = v
        return loop

    def counter_loop(self):
        d = self.d

        def loop(keys):
            for k in keys:
                d[k] += 1
        return loop

    def get_one(self, key):
        return self.d.get(key)

    def counter_value(self, key):
        return self.d[key]


class ShmregPeer(Peer):
    name = "shmreg"
    description = "shmreg.Table (shared memory, lock-free reads)"
    counter_note = "Table.update_counter (atomic)"

    def version(self):
        return shmreg.__version__

    def load(self, ds):
        n = len(ds.keys) + len(ds.counter_keys)
        self.tname = f"bench-{os.getpid()}-{time.monotonic_ns()}"
        self.t = shmreg.Table.create(self.tname, capacity=int(n * 1.25) + 64)
        try:
            self.t.update(zip(ds.keys, ds.values))
            self.t.update(dict.fromkeys(ds.counter_keys, 0))
        except BaseException:
            self.close()
            raise

    def get_loop(self):
        return _simple_loops(self.t.get, None, None)[0]

    def set_loop(self):
        return _simple_loops(None, self.t.__setitem__, None)[1]

    def counter_loop(self):
        return _simple_loops(None, None, self.t.update_counter)[2]

    def get_one(self, key):
        return self.t.get(key)

    def counter_value(self, key):
        return self.t[key]

    def close(self):
        t = getattr(self, "t", None)
        if t is not None:
            t.close()
            try:
                shmreg.unlink(self.tname)
            except shmreg.TableNotFoundError:
                pass
            self.t = None


class ManagerPeer(Peer):
    name = "manager"
    description = "multiprocessing.Manager().dict() (proxy to a server process)"
    counter_note = "read-modify-write under a manager Lock"

    def load(self, ds):
        import multiprocessing

        self.mgr = multiprocessing.Manager()
        self.d = self.mgr.dict()
        self.lock = self.mgr.Lock()
        self.d.update(zip(ds.keys, ds.values))
        self.d.update(dict.fromkeys(ds.counter_keys, 0))

    def get_loop(self):
        return _simple_loops(self.d.get, None, None)[0]

    def set_loop(self):
        return _simple_loops(None, self.d.__setitem__, None)[1]

    def counter_loop(self):
        d, lock = self.d, self.lock

        def loop(keys):
            for k in keys:
                with lock:
                    d[k] = d[k] + 1
        return loop

    def get_one(self, key):
        return self.d.get(key)

    def counter_value(self, key):
        return self.d[key]

    def close(self):
        mgr = getattr(self, "mgr", None)
        if mgr is not None:
            self.d = self.lock = None
            mgr.shutdown()
            self.mgr = None


class LmdbPeer(Peer):
    name = "lmdb"
    description = "py-lmdb, temporary directory, sync=False, writemap=True"
    counter_note = "get + put in one write transaction"

    def version(self):
        import lmdb
        return f"py-lmdb {lmdb.__version__}, LMDB {'.'.join(map(str, lmdb.version()))}"

    def load(self, ds):
        try:
            import lmdb
        except ImportError:
            raise Skip("py-lmdb is not installed (pip install lmdb)") from None
        self.dir = tempfile.mkdtemp(prefix="shmreg-bench-lmdb-")
        size = (len(ds.keys) + len(ds.counter_keys)) * 512 + (64 << 20)
        self.env = lmdb.open(self.dir, map_size=size, sync=False, metasync=False,
                             writemap=True, max_readers=16)
        with self.env.begin(write=True) as txn:
            for k, v in zip(ds.keys, ds.values):
                txn.put(k, v)
            for k in ds.counter_keys:
                txn.put(k, b"0")

    def get_loop(self):
        env = self.env

        def loop(keys):
            with env.begin() as txn:
                g = txn.get
                for k in keys:
                    g(k)
        return loop

    def set_loop(self):
        env = self.env

        def loop(pairs):
            for k, v in pairs:
                with env.begin(write=True) as txn:
                    txn.put(k, v)
        return loop

    def counter_loop(self):
        env = self.env

        def loop(keys):
            for k in keys:
                with env.begin(write=True) as txn:
                    txn.put(k, b"%d" % (int(txn.get(k, b"0")) + 1))
        return loop

    def get_one(self, key):
        with self.env.begin() as txn:
            return txn.get(key)

    def counter_value(self, key):
        return int(self.get_one(key))

    def close(self):
        env = getattr(self, "env", None)
        if env is not None:
            env.close()
            self.env = None
        self._remove_dir()


class DiskcachePeer(Peer):
    name = "diskcache"
    description = "diskcache.Cache, temporary directory (SQLite + files)"
    counter_note = "Cache.incr (atomic)"

    def version(self):
        import diskcache
        return f"diskcache {diskcache.__version__}"

    def load(self, ds):
        try:
            import diskcache
        except ImportError:
            raise Skip("diskcache is not installed (pip install diskcache)") from None
        self.dir = tempfile.mkdtemp(prefix="shmreg-bench-diskcache-")
        self.c = diskcache.Cache(self.dir)
        with self.c.transact():
            for k, v in zip(ds.keys, ds.values):
                self.c.set(k, v)
            for k in ds.counter_keys:
                self.c.set(k, 0)

    def get_loop(self):
        return _simple_loops(self.c.get, None, None)[0]

    def set_loop(self):
        return _simple_loops(None, self.c.set, None)[1]

    def counter_loop(self):
        return _simple_loops(None, None, self.c.incr)[2]

    def get_one(self, key):
        return self.c.get(key)

    def counter_value(self, key):
        return self.c.get(key)

    def close(self):
        c = getattr(self, "c", None)
        if c is not None:
            c.close()
            self.c = None
        self._remove_dir()


class UltraDictPeer(Peer):
    name = "ultradict"
    description = "UltraDict (shared memory, streamed updates)"
    counter_note = "d[k] += 1 under its lock"

    def version(self):
        import UltraDict as mod
        return f"UltraDict {getattr(mod, '__version__', '?')}"

    def load(self, ds):
        try:
            from UltraDict import UltraDict
        except Exception as e:  # noqa: BLE001 - any import problem means "not usable here"
            raise Skip(f"UltraDict is not importable ({type(e).__name__})") from None
        n = len(ds.keys) + len(ds.counter_keys)
        self.d = UltraDict(create=True, buffer_size=max(1 << 20, n * (VALUE_BYTES + 64) * 4))
        for k, v in zip(ds.keys, ds.values):
            self.d[k] = v
        for k in ds.counter_keys:
            self.d[k] = 0

    def get_loop(self):
        return _simple_loops(self.d.get, None, None)[0]

    def set_loop(self):
        return _simple_loops(None, self.d.__setitem__, None)[1]

    def counter_loop(self):
        d = self.d

        def loop(keys):
            for k in keys:
                with d.lock:
                    d[k] += 1
        return loop

    def get_one(self, key):
        return self.d.get(key)

    def counter_value(self, key):
        return self.d[key]

    def close(self):
        d = getattr(self, "d", None)
        if d is not None:
            try:
                d.unlink()
            except Exception:  # noqa: BLE001 - best effort cleanup of a third-party object
                pass
            self.d = None


def _parse_addr(addr: str, default_port: int):
    """``host:port``, ``host`` or a unix socket path -> (family, address)."""
    if addr.startswith("/"):
        return socket.AF_UNIX, addr
    host, _, port = addr.rpartition(":") if ":" in addr else (addr, "", str(default_port))
    return socket.AF_INET, (host or "127.0.0.1", int(port))


def _answers(family, address, hello: bytes, expect: bytes, timeout: float = 0.3) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(address)
            s.sendall(hello)
            return s.recv(64).startswith(expect)
    except OSError:
        return False


def find_server(kind: str, addr: str | None) -> tuple | None:
    """The first address of a ``kind`` server answering on loopback (or at
    ``addr``), as ``(family, address)``, or None.  Only connects."""
    if kind == "redis":
        port, hello, expect, sockets = 6379, b"PING\r\n", b"+PONG", REDIS_SOCKETS
    else:
        port, hello, expect, sockets = 11211, b"version\r\n", b"VERSION", MEMCACHED_SOCKETS
    if addr:
        candidates = [_parse_addr(addr, port)]
    else:
        candidates = [(socket.AF_INET, ("127.0.0.1", port))]
        candidates += [(socket.AF_UNIX, p) for p in sockets if os.path.exists(p)]
    for family, address in candidates:
        if _answers(family, address, hello, expect):
            return family, address
    return None


def _where(family, address) -> str:
    return address if family == socket.AF_UNIX else f"{address[0]}:{address[1]}"


class RedisPeer(Peer):
    name = "redis"
    counter_note = "INCR (atomic)"

    def __init__(self, addr: str | None) -> None:
        self.addr = addr
        self.prefix = b"shmreg-bench:%d:%d:" % (os.getpid(), time.monotonic_ns())
        self.loaded: list = []

    def version(self):
        import redis
        return f"redis-py {redis.__version__}, server {self.r.info('server').get('redis_version', '?')}"

    def load(self, ds):
        try:
            import redis
        except ImportError:
            raise Skip("redis-py is not installed (pip install redis)") from None
        found = find_server("redis", self.addr)
        if found is None:
            raise Skip(f"no Redis server answers on {self.addr or 'loopback (port 6379 or a unix socket)'}")
        family, address = found
        self.description = f"Redis at {_where(family, address)} through redis-py (one round trip per op)"
        if family == socket.AF_UNIX:
            self.r = redis.Redis(unix_socket_path=address)
        else:
            self.r = redis.Redis(host=address[0], port=address[1])
        pipe = self.r.pipeline(transaction=False)
        for i, (k, v) in enumerate(zip(self.k(ds.keys), ds.values)):
            pipe.set(k, v, ex=3600)
            self.loaded.append(k)
            if i % 1000 == 999:
                pipe.execute()
        for k in self.k(ds.counter_keys):
            pipe.set(k, 0, ex=3600)
            self.loaded.append(k)
        pipe.execute()

    def get_loop(self):
        return _simple_loops(self.r.get, None, None)[0]

    def set_loop(self):
        return _simple_loops(None, self.r.set, None)[1]

    def counter_loop(self):
        return _simple_loops(None, None, self.r.incr)[2]

    def get_one(self, key):
        return self.r.get(key)

    def counter_value(self, key):
        return int(self.r.get(key))

    def close(self):
        r = getattr(self, "r", None)
        if r is None:
            return
        try:
            for i in range(0, len(self.loaded), 1000):
                r.delete(*self.loaded[i:i + 1000])
        finally:
            r.close()
            self.r = None


class _MiniMemcached:
    """Just enough of the memcached text protocol: get, set, incr, delete."""

    def __init__(self, family, address) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(address)
        if family != socket.AF_UNIX:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.sock.makefile("rb")

    def get(self, key):
        self.sock.sendall(b"get " + key + b"\r\n")
        line = self.f.readline()
        if line == b"END\r\n":
            return None
        if not line.startswith(b"VALUE "):
            raise OSError(f"memcached: unexpected reply {line!r}")
        n = int(line.split()[3])
        data = self.f.read(n + 2)[:-2]
        if self.f.readline() != b"END\r\n":
            raise OSError("memcached: reply without END")
        return data

    def set(self, key, value, expire=3600):
        if isinstance(value, int):
            value = b"%d" % value
        self.sock.sendall(b"set %s 0 %d %d\r\n%s\r\n" % (key, expire, len(value), value))
        line = self.f.readline()
        if line != b"STORED\r\n":
            raise OSError(f"memcached: set failed: {line!r}")

    def incr(self, key, delta=1):
        self.sock.sendall(b"incr %s %d\r\n" % (key, delta))
        line = self.f.readline()
        if not line[:1].isdigit():
            raise OSError(f"memcached: incr failed: {line!r}")
        return int(line)

    def delete(self, key):
        self.sock.sendall(b"delete " + key + b"\r\n")
        self.f.readline()

    def close(self):
        self.f.close()
        self.sock.close()


class MemcachedPeer(Peer):
    name = "memcached"
    counter_note = "incr (atomic)"

    def __init__(self, addr: str | None) -> None:
        self.addr = addr
        self.prefix = b"shmreg-bench:%d:%d:" % (os.getpid(), time.monotonic_ns())
        self.loaded: list = []

    def version(self):
        return self.client_name

    def load(self, ds):
        found = find_server("memcached", self.addr)
        if found is None:
            raise Skip(f"no memcached answers on {self.addr or 'loopback (port 11211 or a unix socket)'}")
        family, address = found
        try:
            from pymemcache.client.base import Client
        except ImportError:
            self.c = _MiniMemcached(family, address)
            self.client_name = "shmreg's minimal text-protocol client (pymemcache not installed)"
        else:
            import pymemcache
            self.c = Client(address if family == socket.AF_UNIX else address, no_delay=True)
            self.client_name = f"pymemcache {pymemcache.__version__}"
        self.description = f"memcached at {_where(family, address)} (one round trip per op)"
        for k, v in zip(self.k(ds.keys), ds.values):
            self.c.set(k, v, expire=3600)
            self.loaded.append(k)
        for k in self.k(ds.counter_keys):
            self.c.set(k, b"0", expire=3600)
            self.loaded.append(k)

    def get_loop(self):
        return _simple_loops(self.c.get, None, None)[0]

    def set_loop(self):
        return _simple_loops(None, self.c.set, None)[1]

    def counter_loop(self):
        c = self.c

        def loop(keys):
            for k in keys:
                c.incr(k, 1)
        return loop

    def get_one(self, key):
        return self.c.get(key)

    def counter_value(self, key):
        return int(self.c.get(key))

    def close(self):
        c = getattr(self, "c", None)
        if c is None:
            return
        try:
            for k in self.loaded:
                c.delete(k)
        finally:
            c.close()
            self.c = None


def make_peer(name: str, redis_addr: str | None = None, memcached_addr: str | None = None) -> Peer:
    return {
        "dict": DictPeer, "shmreg": ShmregPeer, "manager": ManagerPeer, "lmdb": LmdbPeer,
        "diskcache": DiskcachePeer, "ultradict": UltraDictPeer,
        "redis": lambda: RedisPeer(redis_addr), "memcached": lambda: MemcachedPeer(memcached_addr),
    }[name]()


# -- timing ----------------------------------------------------------------------

def measure(fn: Callable[[list], None], arg: list, budget: float, repeat: int) -> float:
    """Operations per second of ``fn(arg)`` (``len(arg)`` operations a call):
    the best of ``repeat`` measurements, each of enough calls to last about
    ``budget / repeat`` seconds."""
    t0 = time.perf_counter()
    fn(arg)
    once = max(time.perf_counter() - t0, 1e-9)
    number = max(1, int(budget / repeat / once))
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn(arg)
        best = min(best, (time.perf_counter() - t0) / number)
    return len(arg) / max(best, 1e-12)


def _verify(peer: Peer, ds: Dataset) -> None:
    """Every peer must really hit, miss, store and count: a benchmark of a
    broken backend is no benchmark."""
    hk = peer.k(ds.hit_keys[:1])[0]
    got = peer.get_one(hk)
    if got != ds.hit_values[0] and got not in ds.set_values:
        raise RuntimeError(f"{peer.name}: a loaded key reads back {got!r:.40}")
    if peer.get_one(peer.k(ds.miss_keys[:1])[0]) is not None:
        raise RuntimeError(f"{peer.name}: an absent key reads back a value")


def run(peers: list | None = None, *, quick: bool = False, entries: int | None = None,
        ops: int | None = None, repeat: int | None = None, budget: float | None = None,
        servers: bool = True, redis_addr: str | None = None, memcached_addr: str | None = None,
        progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Run the benchmark; return the results as a JSON-ready dict.

    ``peers``: names from :data:`PEERS` (default: all; those not installed
    or not answering are listed under ``skipped`` with the reason).
    ``servers=False`` leaves Redis and memcached out unless named in
    ``peers``.  ``progress(done, total, label)`` is called before each step.
    """
    cfg = dict(QUICK if quick else FULL)
    for k, v in (("entries", entries), ("ops", ops), ("repeat", repeat), ("budget", budget)):
        if v is not None:
            cfg[k] = v
    if cfg["entries"] < 1 or cfg["ops"] < 1 or cfg["repeat"] < 1 or cfg["budget"] <= 0:
        raise ValueError("entries, ops and repeat must be >= 1 and the budget > 0")
    if peers is None:
        names = [p for p in PEERS if servers or p not in SERVER_PEERS]
    else:
        unknown = [p for p in peers if p not in PEERS]
        if unknown:
            raise ValueError(f"unknown peer {unknown[0]!r}; choose from {', '.join(PEERS)}")
        names = list(dict.fromkeys(peers))
    ds = Dataset(cfg["entries"], cfg["ops"])
    set_pairs = ds.set_pairs
    total = len(names) * (1 + len(OPERATIONS))
    step = 0

    def tick(label: str) -> None:
        nonlocal step
        if progress is not None:
            progress(step, total, label)
        step += 1

    out: dict = {
        "quick": quick, "entries": cfg["entries"], "ops": cfg["ops"], "repeat": cfg["repeat"],
        "budget_seconds": cfg["budget"], "key_bytes": KEY_BYTES, "value_bytes": VALUE_BYTES,
        "python": platform.python_version(), "implementation": platform.python_implementation(),
        "platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "shmreg": shmreg.__version__, "operations": list(OPERATIONS),
        "peers": {}, "skipped": {}, "results": {}, "ratio_vs_dict": {},
    }
    for name in names:
        peer = make_peer(name, redis_addr, memcached_addr)
        tick(f"{name}: loading {cfg['entries']:,} entries")
        try:
            try:
                peer.load(ds)
                _verify(peer, ds)
            except Skip as e:
                out["skipped"][name] = str(e)
                step += len(OPERATIONS)
                continue
            except Exception as e:  # noqa: BLE001 - a broken peer is reported, not fatal
                out["skipped"][name] = f"failed to load: {type(e).__name__}: {e}"
                step += len(OPERATIONS)
                continue
            res = {}
            loops = {
                "get-hit": (peer.get_loop(), peer.k(ds.hit_keys)),
                "get-miss": (peer.get_loop(), peer.k(ds.miss_keys)),
                "set": (peer.set_loop(), list(zip(peer.k(ds.hit_keys), ds.set_values))
                        if peer.prefix else set_pairs),
                "update_counter": (peer.counter_loop(), peer.k(ds.counter_keys)),
            }
            before = peer.counter_value(peer.k(ds.counter_keys[:1])[0])
            for op in OPERATIONS:
                tick(f"{name}: {op}")
                fn, arg = loops[op]
                res[op] = measure(fn, arg, cfg["budget"], cfg["repeat"])
            after = peer.counter_value(peer.k(ds.counter_keys[:1])[0])
            if after <= before:
                raise RuntimeError(f"{name}: update_counter did not count ({before} -> {after})")
            _verify(peer, ds)
            out["results"][name] = res
            out["peers"][name] = {"description": peer.description, "version": peer.version(),
                                  "update_counter": peer.counter_note}
        finally:
            peer.close()
    if progress is not None:
        progress(total, total, "done")
    base = out["results"].get("dict")
    if base:
        for name, res in out["results"].items():
            out["ratio_vs_dict"][name] = {op: res[op] / base[op] for op in res}
    return out


# -- output ------------------------------------------------------------------------

def ratio(r: float) -> str:
    """``0.35x``, ``12.5x``, ``1,210x``; below 0.1 as a fraction: ``1/1,587x``."""
    if r <= 0:
        return "0x"
    if r < 0.1:
        return f"1/{1 / r:,.0f}x"
    if r >= 100:
        return f"{r:,.0f}x"
    if r >= 10:
        return f"{r:.1f}x"
    return f"{r:.2g}x"


def human(n: float) -> str:
    """``12.3M``, ``456k``, ``789``."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}" if n / div < 100 else f"{n / div:.0f}{unit}"
    return f"{n:.3g}" if n < 100 else f"{n:.0f}"


def _title(res: dict) -> str:
    mode = "quick" if res["quick"] else "full"
    return (f"shmreg bench ({mode}): {res['entries']:,} entries, {res['key_bytes']}-byte keys, "
            f"{res['value_bytes']}-byte values, {res['ops']:,} ops per timed call, "
            f"best of {res['repeat']}")


def format_table(res: dict) -> str:
    """The results as a plain-text table: ops/s and (where a dict ran) the
    ratio to dict, per operation and peer."""
    ops = res["operations"]
    rows = [["peer"] + ops]
    for name, r in res["results"].items():
        row = [name]
        for op in ops:
            cell = human(r[op])
            rel = res["ratio_vs_dict"].get(name, {}).get(op)
            if rel is not None:
                cell += f" ({ratio(rel)})"
            row.append(cell)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [_title(res), "ops/s, higher is better" +
             ("; (ratio to dict)" if res["ratio_vs_dict"] else ""), ""]
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    for name, why in res["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def markdown_report(res: dict, chart: str | None = None, chart_note: str | None = None) -> str:
    """A Markdown report of ``res``; ``chart`` is the path (relative to the
    report) of a PNG to embed."""
    ops = res["operations"]
    md = ["# shmreg benchmark", "",
          f"{_title(res)}.", "",
          f"- Python {res['python']} ({res['implementation']}) on {res['platform']}, "
          f"{res['machine']}, {res['cpus']} CPUs",
          f"- shmreg {res['shmreg']}",
          f"- Each result is the best of {res['repeat']} measurements of about "
          f"{res['budget_seconds'] / res['repeat'] * 1000:.0f} ms, in operations per second "
          "(higher is better), one process, one thread.",
          "- get-hit: read a present key; get-miss: read an absent key; set: overwrite a "
          "present key; update_counter: add 1 to a counter.", ""]
    md += ["## Operations per second", "",
           "| peer | " + " | ".join(ops) + " |", "|---|" + "---:|" * len(ops)]
    for name, r in res["results"].items():
        md.append(f"| {name} | " + " | ".join(f"{r[op]:,.0f}" for op in ops) + " |")
    md += ["", "## Time per operation (ns)", "",
           "| peer | " + " | ".join(ops) + " |", "|---|" + "---:|" * len(ops)]
    for name, r in res["results"].items():
        md.append(f"| {name} | " + " | ".join(f"{1e9 / r[op]:,.0f}" for op in ops) + " |")
    if res["ratio_vs_dict"]:
        md += ["", "## Ratio to dict (ops/s of the peer / ops/s of dict)", "",
               "| peer | " + " | ".join(ops) + " |", "|---|" + "---:|" * len(ops)]
        for name, r in res["ratio_vs_dict"].items():
            md.append(f"| {name} | " + " | ".join(ratio(r[op]) for op in ops) + " |")
    sh = res["results"].get("shmreg")
    others = [n for n in res["results"] if n not in ("shmreg", "dict")]
    if sh and others:
        md += ["", "## shmreg speed-up over each shared peer (shmreg ops/s / peer ops/s)", "",
               "| peer | " + " | ".join(ops) + " |", "|---|" + "---:|" * len(ops)]
        for name in others:
            r = res["results"][name]
            md.append(f"| {name} | " + " | ".join(ratio(sh[op] / r[op]) for op in ops) + " |")
    if chart:
        md += ["", "## Chart", "", f"![ops/s per peer and operation]({chart})"]
    md += ["", "## Peers", ""]
    for name, p in res["peers"].items():
        ver = f" ({p['version']})" if p["version"] else ""
        md.append(f"- **{name}**{ver}: {p['description']}; update_counter: {p['update_counter']}.")
    for name, why in res["skipped"].items():
        md.append(f"- **{name}**: skipped: {why}.")
    if chart_note:
        md += ["", f"Chart: {chart_note}."]
    return "\n".join(md) + "\n"


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def install_hint(extra: str = "plot", package: str = "matplotlib") -> str:
    """The command that installs an extra from where this shmreg came from:
    ``pip install 'shmreg[plot]'`` from an index or a wheel; from a checkout
    (``pip install .`` / ``-e .``) the checkout's path, which no index has;
    and the bare dependency as an alternative.  E.g. from PyPI:
    ``pip install 'shmreg[plot]' (or: pip install matplotlib)``; from an
    editable install of the current directory: ``pip install -e '.[plot]'
    (or: pip install matplotlib)``.
    """
    source = f"shmreg[{extra}]"
    try:
        from importlib.metadata import distribution

        direct = json.loads(distribution("shmreg").read_text("direct_url.json") or "null")
    except Exception:   # not installed (run from a source tree), or no metadata
        direct = None
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if isinstance(direct, dict) and "dir_info" in direct and direct.get("url", "").startswith("file://"):
        path = direct["url"][len("file://"):]
        edit = "-e " if direct["dir_info"].get("editable") else ""
        return f"pip install {edit}'{_shell_path(path)}[{extra}]' (or: pip install {package})"
    if direct is None and os.path.exists(os.path.join(root, "pyproject.toml")):
        return f"pip install -e '{_shell_path(root)}[{extra}]' (or: pip install {package})"
    return f"pip install '{source}' (or: pip install {package})"


def _shell_path(path: str) -> str:
    """``.`` for the current directory, else the path (relative if shorter)."""
    from urllib.parse import unquote

    path = unquote(path)
    rel = os.path.relpath(path)
    return "." if rel == "." else rel if len(rel) < len(path) else path


def write_chart(res: dict, path: str) -> None:
    """A grouped bar chart (log scale) of ops/s per operation and peer, as PNG.
    :raises ImportError: matplotlib is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = res["operations"]
    names = list(res["results"])
    # The legend goes right of the axes: inside, it covers the tallest bars.
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(ops) + 0.4 * len(names)) + 1.8, 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(ops))]
        ax.bar(xs, [res["results"][name][op] for op in ops], width, label=name)
    ax.set_xticks(range(len(ops)))
    ax.set_xticklabels(ops)
    ax.set_yscale("log")
    ax.set_ylabel("operations per second (log scale)")
    ax.set_title(f"shmreg bench: {res['entries']:,} entries, {res['value_bytes']}-byte values")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.grid(axis="y", which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class ProgressBar:
    """A plain-text progress bar on a stream: redrawn in place on a terminal,
    one line per step otherwise."""

    def __init__(self, stream=None, width: int = 30) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.width = width

    def __call__(self, done: int, total: int, label: str) -> None:
        frac = done / total if total else 1.0
        fill = int(frac * self.width)
        bar = "#" * fill + "." * (self.width - fill)
        line = f"[{bar}] {done:>{len(str(total))}}/{total} {label}"
        if self.tty:
            end = "\n" if done >= total else ""
            self.stream.write("\r\x1b[K" + line + end)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

