"""`RedisCore`: the backend primitives (see :mod:`shmreg.backends.base`) on a
Redis/Valkey server or Cluster, each one script call (see ``scripts``)."""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any

from shmreg import _proc
from shmreg._core import MISSING, Registration
from shmreg.backends.redis import codec, leases
from shmreg.backends.redis.connection import DENIED, redact, redis, scripts_for, unavailable
from shmreg.errors import (BackendUnavailableError, CorruptTableError, Error, LeaseLostError,
                           TableFullError)

# Server states that mean "not available now", not "this command is wrong".
_UNAVAILABLE = tuple(getattr(redis.exceptions, n) for n in
                     ("ClusterDownError", "TryAgainError", "ReadOnlyError")
                     if hasattr(redis.exceptions, n))

_RAISE = object()
_PAGE = 512
_MIN64, _MAX64 = -(1 << 63), (1 << 63) - 1


def _ttl_ms(ttl: Any) -> bytes:
    """PX milliseconds for ``ttl`` seconds (b'' = never), rounded up: an
    entry never expires before its ttl.  Same checks as the local engine."""
    if ttl is None:
        return b""
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(f"ttl must be a number of seconds or None, not {type(ttl).__name__}")
    if math.isinf(ttl) and ttl > 0:
        return b""
    if not ttl > 0 or math.isnan(ttl):
        raise ValueError(f"ttl must be positive (or None/inf: never), not {ttl!r}")
    return str(max(1, math.ceil(ttl * 1000))).encode()


def _check_int(name: str, v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, not {type(v).__name__}")
    if not _MIN64 <= v <= _MAX64:
        raise OverflowError(f"{name} does not fit in 64 bits")
    return int(v)


class RedisCore:
    """Backend primitives on one table of a Redis/Valkey server (or Cluster).

    Set up by :class:`~shmreg.backends.redis.RedisTable`; not used alone.
    """

    name: str
    url: str
    allow_pickle: bool
    lease_ttl: float

    def _setup(self, client: Any, name: str, lease_ttl: float) -> None:
        self._client = client
        self._s = scripts_for(client)
        self._p = f"{{shmreg:{name}}}"
        self._pb = self._p.encode()
        self._kp = self._pb + b":k:"
        self._idx = self._p + ":idx"
        self._procs_key = self._p + ":procs"
        self._closed = False
        self._hits = self._misses = 0
        self._read_retries = self._lock_fallbacks = 0
        self.lease_ttl = float(lease_ttl)
        self._host = leases.host_id()
        self._token: str | None = None        # this process's lease
        self._foreign: dict[str, tuple[int, int]] = {}   # leases held for other pids
        self._watching = False                # holds this host's watcher key
        self._me = f"{self._host}:{os.getpid()}:{leases.new_token()}"
        self._pids: dict[str, int] = {}
        self._next_beat = 0.0
        self._lease_lock = threading.Lock()   # one lease per process, whichever thread asks

    # -- plumbing ----------------------------------------------------------------

    def _ek(self, key: Any) -> bytes:
        return self._kp + codec.key_suffix(key)

    def _key_of(self, ek: bytes) -> Any:
        if not isinstance(ek, bytes) or not ek.startswith(self._kp):
            raise CorruptTableError(f"index of table {self.name!r} names a foreign key: {ek!r:.60}")
        return codec.decode_key_suffix(ek[len(self._kp):])

    def _run(self, script: Any, key: Any, *args: Any) -> Any:
        """Run ``script`` with ``KEYS[1] = key``, ``ARGV = [P, *args]``,
        mapping server errors onto shmreg's."""
        if self._closed:
            raise ValueError("operation on a closed table")
        try:
            return script(keys=[key], args=[self._p, *args])
        except DENIED as e:
            raise unavailable(self.url, e) from e
        except _UNAVAILABLE as e:
            # Cluster down, a slot being moved, a read-only replica after a
            # failover: the server cannot answer now (redis-py makes some
            # of these ResponseErrors, caught below otherwise).
            raise unavailable(self.url, e) from e
        except redis.exceptions.ResponseError as e:
            msg = str(e)
            if "LEASE" in msg:
                self._token = None        # the next owned write takes a new lease
                raise LeaseLostError(f"table {self.name!r}: this process's lease expired "
                                     "(paused or cut off longer than lease_ttl); its "
                                     "entries are gone and the write was refused") from None
            if "NOTINT" in msg:
                raise TypeError("value is not an int") from None
            if "OVERFLOW" in msg:
                raise OverflowError("counter result does not fit in 64 bits") from None
            if msg.startswith("OOM"):
                raise TableFullError(f"{redact(self.url)}: {msg}") from None
            raise Error(f"{redact(self.url)}: {msg}") from e
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            raise unavailable(self.url, e) from e
        except redis.exceptions.RedisError as e:   # cluster down, MOVED storms ...
            raise unavailable(self.url, e) from e

    def _read(self, key: Any) -> list | None:
        """``[value, owner token or b'', pttl]`` of a live entry (one script)."""
        r = self._run(self._s.read, self._ek(key))
        if r is None:
            self._misses += 1
            return None
        if not isinstance(r, list) or len(r) != 3:
            raise CorruptTableError(f"unexpected reply from the server: {r!r:.60}")
        self._hits += 1
        return r

    def _fast(self, key: Any) -> tuple | None:
        """``(value, owner token or b'')`` of a live entry: one plain ``GET``
        (no script), and for an owned entry one ``EXISTS`` of its owner's
        lease.  Leases never come back, so an owner alive after the ``GET``
        was alive at it: the ``GET`` is the read's linearization point."""
        if self._closed:
            raise ValueError("operation on a closed table")
        ek = self._ek(key)
        try:
            v = self._client.get(ek)
            if v is not None and v[:1] == b"\x00":
                token = v[1:17]
                if len(token) != 16 or not self._client.exists(self._p + ":L:" + token.decode("ascii", "replace")):
                    v = None
                else:
                    v = (v[17:], token)
            elif v is not None:
                v = (v, b"")
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            raise unavailable(self.url, e) from e
        except redis.exceptions.RedisError as e:
            raise unavailable(self.url, e) from e
        if v is None:
            self._misses += 1
            return None
        self._hits += 1
        return v

    def _decode(self, stored: Any) -> Any:
        return codec.decode_value(stored, self.allow_pickle)

    @staticmethod
    def _owner(o: Any) -> Any:
        return o.decode("ascii", "replace") if o else 0

    @staticmethod
    def _exp_ns(pttl: Any) -> int:
        return 0 if not isinstance(pttl, int) or pttl < 0 else time.monotonic_ns() + pttl * 1_000_000

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    @property
    def nshards(self) -> int:
        """1: one index, traversed in pages (not a snapshot)."""
        return 1

    def _close(self) -> None:
        if not self._closed:
            try:
                self._drop_leases()
            except BackendUnavailableError:
                pass   # the server is away: the leases expire by themselves
            self._closed = True

    # -- reads -------------------------------------------------------------------

    def get(self, key: Any, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` if absent, expired, or owned by
        a process whose lease is gone (one round trip)."""
        r = self._fast(key)
        return default if r is None else self._decode(r[0])

    def __getitem__(self, key: Any) -> Any:
        r = self._fast(key)
        if r is None:
            raise KeyError(key)
        return self._decode(r[0])

    def __contains__(self, key: Any) -> bool:
        return self._fast(key) is not None

    def _get_raw(self, key: Any) -> tuple | None:
        r = self._fast(key)
        return None if r is None else codec.to_raw(r[0])

    # The reads that expect an owned entry (Registry's) run the read script:
    # one round trip, where GET + EXISTS would be two.

    def _get_owned(self, key: Any, default: Any = None) -> Any:
        r = self._read(key)
        return default if r is None else (self._decode(r[0]), self._owner(r[1]))

    def _get_stale(self, key: Any, default: Any = None) -> Any:
        # The server deletes expired keys itself: nothing stale to serve.
        r = self._read(key)
        return default if r is None else (self._decode(r[0]), self._exp_ns(r[2]))

    def _ttl_ns(self, key: Any) -> int:
        r = self._read(key)
        if r is None:
            raise KeyError(key)
        return -1 if r[2] < 0 else r[2] * 1_000_000

    def _owner_of(self, key: Any) -> Any:
        r = self._read(key)
        if r is None:
            raise KeyError(key)
        return self._owner(r[1])

    def _registration(self, key: Any) -> Registration | None:
        r = self._read(key)
        if r is None or not r[1]:
            return None
        pid = self._owner_pid(self._owner(r[1]))
        return None if pid is None else Registration(pid, self._decode(r[0]))

    def _whereis(self, key: Any) -> int | None:
        r = self._read(key)
        return None if r is None or not r[1] else self._owner_pid(self._owner(r[1]))

    def __len__(self) -> int:
        """Number of live entries (expired ones and those of dead owners not counted)."""
        return int(self._run(self._s.len, self._idx))

    def _shard_entries(self, si: int, what: int, prefix: Any = None) -> list:
        if si != 0:
            raise IndexError(si)
        if prefix is None:
            lo, hi = b"-", b"+"
        else:
            start = self._kp + codec.prefix_suffix(prefix)
            # Exactly the members starting with ``start``: up to (not
            # including) its lexicographic successor.
            succ = start.rstrip(b"\xff")
            lo, hi = b"[" + start, b"(" + succ[:-1] + bytes((succ[-1] + 1,))
        out: list = []
        while True:
            page = self._run(self._s.entries, self._idx, lo, hi, _PAGE)
            if not isinstance(page, list) or len(page) % 4 != 1:
                raise CorruptTableError(f"unexpected reply from the server: {page!r:.60}")
            for i in range(0, len(page) - 1, 4):
                ek, v, o, pttl = page[i:i + 4]
                key = self._key_of(ek)
                if what == 0:
                    out.append(key)
                elif what == 1:
                    out.append(self._decode(v))
                elif what == 3:
                    out.append((key, self._decode(v)))
                else:
                    out.append((key, self._decode(v), self._exp_ns(pttl), self._owner(o)))
            last = page[-1]
            if not last:
                break
            lo = b"(" + last
        return out

    # -- writes ------------------------------------------------------------------

    def _put(self, key: Any, value: Any, mode: bytes, ttl: Any = None, token: Any = b"",
             expect: bytes = b"") -> list:
        ek = self._ek(key)
        r = self._run(self._s.put, ek, mode, codec.encode_value(value), _ttl_ms(ttl), token or b"",
                      expect)
        if not isinstance(r, list) or not r or r[0] not in (0, 1):
            raise CorruptTableError(f"unexpected reply from the server: {r!r:.60}")
        return r

    def __setitem__(self, key: Any, value: Any) -> None:
        self._put(key, value, b"set")

    def set(self, key: Any, value: Any, *, ttl: float | None = None, owned: bool = False) -> None:
        """Store ``value`` under ``key`` (see :meth:`shmreg.Table.set`).  An
        owned entry lives as long as this process's lease.

        :raises LeaseLostError: ``owned`` and this process's lease expired."""
        self._put(key, value, b"set", ttl, self._self_owner() if owned else b"")

    def insert_new(self, key: Any, value: Any, *, ttl: float | None = None,
                   owned: bool = False) -> bool:
        """Store only if ``key`` is absent; exactly one concurrent caller on
        any host wins (one script on the server)."""
        return self._put(key, value, b"new", ttl, self._self_owner() if owned else b"")[0] == 1

    def _insert_new_for(self, key: Any, value: Any, owner: Any) -> bool:
        return self._put(key, value, b"new", None, owner)[0] == 1

    def setdefault(self, key: Any, default: Any = None) -> Any:
        """Return the value of ``key``; insert ``default`` first if it is absent (atomic)."""
        r = self._put(key, default, b"new")
        return default if r[0] == 1 else self._decode(r[1])

    def _cache_put(self, key: Any, value: Any, ttl: Any, only_new: bool, evict: bool) -> tuple:
        # The server never evicts for us (noeviction): nothing is evicted.
        return self._put(key, value, b"new" if only_new else b"set", ttl)[0] == 1, 0

    def _cas_raw(self, key: Any, vtype: int, raw: bytes, new: Any) -> bool:
        return self._put(key, new, b"cas", None, b"", codec.from_raw(vtype, raw))[0] == 1

    def _remove(self, key: Any, token: Any = b"") -> Any:
        return self._run(self._s.delete, self._ek(key), token or b"")

    def __delitem__(self, key: Any) -> None:
        if self._remove(key) is None:
            raise KeyError(key)

    def delete(self, key: Any) -> bool:
        """Delete ``key``; True if it was present."""
        return self._remove(key) is not None

    def _delete_owned(self, key: Any, owner: Any) -> bool:
        return bool(owner) and self._remove(key, owner) is not None

    def take(self, key: Any, default: Any = MISSING) -> Any:
        """Atomically look up and delete ``key``; KeyError if absent and no default."""
        v = self._remove(key)
        if v is None:
            if default is MISSING:
                raise KeyError(key)
            return default
        return self._decode(v)

    def update_counter(self, key: Any, incr: int = 1, *, default: int = 0,
                       ttl: float | None = None) -> int:
        """Atomically add ``incr`` (the server's ``INCRBY``: exact across
        hosts); an absent key starts from ``default``, with ``ttl``."""
        incr = _check_int("incr", incr)
        default = _check_int("default", default)
        r = self._run(self._s.incr, self._ek(key), incr, default, _ttl_ms(ttl))
        try:
            return int(r)
        except (TypeError, ValueError):
            raise CorruptTableError(f"unexpected reply from the server: {r!r:.60}") from None

    def expire(self, key: Any, ttl: float | None) -> bool:
        """Give ``key`` a new ttl (None/inf: never); False if absent."""
        return self._run(self._s.expire, self._ek(key), _ttl_ms(ttl)) == 1

    def purge_expired(self) -> int:
        """Drop expired entries from the index (the server already deleted
        their values); returns how many."""
        return int(self._run(self._s.purge, self._idx))

    def _compact(self, force: bool) -> int:
        # The server manages its own memory: nothing to give back from here.
        return 0

    def clear(self) -> None:
        """Delete every entry (in pages of 512; not one atomic step)."""
        while self._run(self._s.clear, self._idx, _PAGE):
            pass

    # -- owners and leases ---------------------------------------------------------

    @property
    def _self_owner_id(self) -> Any:
        return self._token or 0

    def _info(self, pid: int, start: int) -> str:
        return f"{self._host} {pid} {start}"

    def _take_lease(self, pid: int, start: int) -> str:
        token = leases.new_token()
        self._run(self._s.lease_take, self._procs_key, token, self._info(pid, start),
                  int(self.lease_ttl * 1000))
        self._pids[token] = pid
        self._next_beat = time.monotonic() + self.lease_ttl / 3
        leases.track(self)
        return token

    def _self_owner(self) -> str:
        """This process's lease token, taking a lease on first use."""
        if self._closed:
            raise ValueError("operation on a closed table")
        token = self._token
        if token is None:
            with self._lease_lock:
                if self._token is None:
                    pid = os.getpid()
                    self._token = self._take_lease(pid, _proc.start_time(pid) or 0)
                token = self._token
        return token

    def _claim(self, pid: int, start: int, own_process: bool) -> str:
        """A lease for ``pid``: this process's own, or one this process's
        heartbeat renews while ``pid`` lives (so it also ends if this
        process dies: documented)."""
        if own_process or pid == os.getpid():
            return self._self_owner()
        for tok, (p, s) in self._foreign.items():
            if (p, s) == (pid, start):
                return tok
        tok = self._take_lease(pid, start)
        self._foreign[tok] = (pid, start)
        return tok

    def _heartbeat(self) -> None:
        """Renew this handle's leases (called by the heartbeat thread)."""
        self._next_beat = time.monotonic() + self.lease_ttl / 3
        if self._closed:
            return
        ms = int(self.lease_ttl * 1000)
        for tok, (pid, start) in list(self._foreign.items()):
            if not _proc.is_alive(pid, start or None):
                self._foreign.pop(tok, None)
                self._run(self._s.lease_drop, self._procs_key, tok)
        toks = [t for t in [self._token, *self._foreign] if t]
        if toks:
            renewed = self._run(self._s.lease_renew, self._procs_key, ms, *toks)
            for tok, ok in zip(toks, renewed):
                if not ok and tok in self._foreign:
                    self._foreign.pop(tok, None)
            # A lost own lease stays set: the next owned write fails (fencing).
        if self._watching:
            self._watching = bool(self._run(self._s.watcher, self._wkey(), self._me, ms, b"renew"))

    def _forget_leases(self) -> None:
        # In a forked child: the parent's leases are not ours.
        self._lease_lock = threading.Lock()
        self._token = None
        self._foreign = {}
        self._watching = False
        self._me = f"{self._host}:{os.getpid()}:{leases.new_token()}"

    def _drop_leases(self) -> None:
        """Give up this process's leases (its owned entries vanish at once)."""
        if self._closed:
            return
        for tok in [t for t in [self._token, *self._foreign] if t]:
            self._run(self._s.lease_drop, self._procs_key, tok)
        self._token = None
        self._foreign = {}
        if self._watching:
            self._unlease()

    def _parse_info(self, info: Any) -> tuple[str, int, int]:
        try:
            host, pid, start = info.decode("utf-8").split(" ")
            return host, int(pid), int(start)
        except (AttributeError, ValueError, UnicodeDecodeError):
            raise CorruptTableError(f"table {self.name!r}: malformed lease record {info!r:.60}") from None

    def _proc_table(self) -> list:
        """Known owners (every host's); a local one whose process is gone has
        its lease deleted here, so every host stops seeing its entries."""
        flat = self._run(self._s.procs, self._procs_key)
        out = []
        for i in range(0, len(flat) - 2, 3):
            tok, info, alive = flat[i].decode("ascii", "replace"), flat[i + 1], flat[i + 2] == 1
            host, pid, start = self._parse_info(info)
            self._pids[tok] = pid
            local = host == self._host
            if alive and local and not _proc.is_alive(pid, start or None):
                self._run(self._s.lease_drop, self._procs_key, tok)
                alive = False
            out.append(dict(owner=tok, slot=None, pid=pid, start_time=start, kind="self",
                            alive=alive, local=local, host=host))
        return out

    def _owner_alive(self, owner: Any) -> bool:
        for p in self._proc_table():
            if p["owner"] == owner:
                return bool(p["alive"])
        return False

    def _owner_pid(self, owner: Any) -> int | None:
        if not owner:
            return None
        pid = self._pids.get(owner)
        if pid is None:
            try:
                info = self._client.hget(self._procs_key, owner)
            except redis.exceptions.RedisError as e:
                raise unavailable(self.url, e) from e
            if info is None:
                return None
            pid = self._pids[owner] = self._parse_info(info)[1]
        return pid

    def _reap(self, owner: Any, collect: bool, delete: bool = True) -> tuple:
        """Delete (or only collect) the entries of ``owner`` (0: of every
        owner whose lease is gone).  A watcher claims the owner first (a
        claim key, PX); another watcher's claim makes this a no-op, so one
        ``on_death`` runs per death, again if its watcher died meanwhile."""
        if not owner:
            n, recs = 0, []
            for p in self._proc_table():
                if not p["alive"]:
                    c, r = self._reap(p["owner"], collect, delete)
                    n += c
                    recs.extend(r or [])
                    if delete:
                        self._release(p["owner"])
            return n, (recs if collect else None)
        claim_ms = max(5000, int(self.lease_ttl * 3000))
        r = self._run(self._s.reap, self._procs_key, owner, int(collect), int(delete), self._me,
                      claim_ms, 1)
        if not isinstance(r, list) or not r or r[0] < 0:
            return 0, ([] if collect else None)
        recs = []
        if collect:
            for i in range(1, len(r) - 2, 3):
                recs.append((self._key_of(r[i]), self._decode(r[i + 1]), self._exp_ns(r[i + 2]), owner))
        return int(r[0]), (recs if collect else None)

    def _reap_stale(self) -> int:
        """Nothing to do here: a token leaves ``P:procs`` only after a reap
        deleted its entries, and fencing refuses any owned write after its
        lease is gone, so no entry outlives its token's place in the table."""
        return 0

    def _release(self, owner: Any) -> bool:
        """Forget ``owner`` once its lease is gone (after its entries were reaped)."""
        self._pids.pop(owner, None)
        return self._run(self._s.release, self._procs_key, owner, self._me) == 1

    # -- the watcher lease (one active watcher per host) -------------------------------

    def _wkey(self) -> str:
        return f"{self._p}:W:{self._host}"

    def _lease(self, timeout_ms: int) -> bool:
        deadline = time.monotonic() + timeout_ms / 1000
        ms = int(self.lease_ttl * 1000)
        while True:
            try:
                if self._run(self._s.watcher, self._wkey(), self._me, ms, b"take") == 1:
                    self._watching = True
                    leases.track(self)
                    return True
            except BackendUnavailableError:
                pass   # the server is away: stand by, and try again
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _unlease(self) -> None:
        if self._watching:
            self._watching = False
            try:
                self._run(self._s.watcher, self._wkey(), self._me, 0, b"drop")
            except (BackendUnavailableError, ValueError):
                pass

    def _lease_holder(self) -> int | None:
        try:
            v = self._client.get(self._wkey())
        except redis.exceptions.RedisError as e:
            raise unavailable(self.url, e) from e
        try:
            return int(v.split(b":")[-2]) if v else None
        except (ValueError, IndexError):
            return None
