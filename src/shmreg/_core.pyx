# cython: language_level=3, embedsignature=True, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The binding between Python objects and the C engine (``engine/``).

The engine holds every operation on a mapped segment: layout and
validation, the allocator, locked writes (every seqlock window), crash
repair, the checker and owner liveness.  This module does what needs
Python: codecs between objects and bytes, the lock-free read loop that
builds the result object inside its seqlock window, mapping management
(one mapping per segment per process, pinned while operations run) and the
``CoreTable`` methods that ``shmreg.Table`` builds on.

Rules kept here (see engine/shm_engine.h for the engine's side):

* Every method pins the mapping for its whole duration (``enter``/``leave``)
  so that ``close()`` from another thread - or from Python code that runs
  mid-operation: pickling, a custom clock, a finalizer - never unmaps
  memory in use; the last operation out unmaps.
* Engine calls marked [GIL] run with the GIL held (they use the mapping's
  process-local pidfd cache); lock waits release it.
"""

cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memset
from libc.stdlib cimport malloc, free
from libc.errno cimport errno
from libc.math cimport INFINITY
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_FromLongLong
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_FromDouble
from cpython.unicode cimport PyUnicode_DecodeUTF8

from shmreg._engine cimport *

import io
import os
import pickle

from shmreg.errors import (
    CorruptTableError,
    IncompatibleTableError,
    NoSpaceError,
    TableFullError,
    ValueTooLargeError,
)

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object o, Py_ssize_t *size) except NULL

cdef extern from "sys/mman.h" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int PROT_READ, PROT_WRITE, MAP_SHARED
    int MAP_NORESERVE
    void *MAP_FAILED

cdef extern from "<sched.h>" nogil:
    int sched_yield()

DEF READ_RETRIES = 64
DEF SNAP_RETRIES = 8

# ---- crash points ----------------------------------------------------------

#: Crash point names (engine/shm_crash.h), for SHMREG_CRASH_AT=name[:n].
CRASH_POINTS = tuple(shm_crash_names[i].decode() for i in range(SHM_CP_COUNT))


def _arm_crash_point(spec, stop=False):
    """Arm the crash hook from ``name`` or ``name:n``: SIGKILL this process the
    n-th time it reaches that step (with ``stop``: SIGSTOP it there instead,
    once, and carry on after SIGCONT).  Armed at import from
    ``SHMREG_CRASH_AT`` (and ``SHMREG_CRASH_SIGNAL=STOP``)."""
    name, _, count = spec.rpartition(":")
    if not count.isdigit():
        name, count = spec, ""
    if name not in CRASH_POINTS:
        raise ValueError(f"unknown crash point {name!r}; known: {', '.join(CRASH_POINTS)}")
    shm_crash_arm(CRASH_POINTS.index(name), int(count or 1), 1 if stop else 0)


if os.environ.get("SHMREG_CRASH_AT"):
    _arm_crash_point(os.environ["SHMREG_CRASH_AT"],
                     os.environ.get("SHMREG_CRASH_SIGNAL", "KILL").upper() == "STOP")

LAYOUT_VERSION = SHM_LAYOUT_VERSION
HEADER_SIZE = SHM_HEADER_SIZE
NPROCS = SHM_NPROCS
ITEM_OVERHEAD = SHM_ITEM_HDR
HAVE_ROBUST = bool(SHM_HAVE_ROBUST)
#: True in a SHMREG_DEBUG=1 build (every writer's unlock re-checks its shard).
DEBUG_BUILD = bool(SHM_DEBUG_BUILD)
SHARD_STRUCT_SIZE = sizeof(shm_shard_t)


def _layout():
    cdef int i = 0
    cdef const char *name
    cdef size_t off, size
    out = {}
    while shm_layout_field(i, &name, &off, &size):
        out[name.decode()] = (off, size)
        i += 1
    return out


#: Offsets and sizes of the segment's fields, from engine/shm_layout.h:
#: ``{"shard.seq": (offset, size), ...}`` (offsets within their struct).
LAYOUT = _layout()

_pickle_dumps = pickle.dumps
_pickle_loads = pickle.loads


# ---- geometry and creation ---------------------------------------------------

def plan_layout(uint64_t capacity, uint64_t memory, shards=None, bint grows=False):
    """Compute the layout for a table of at most ``capacity`` entries and
    ``memory`` item bytes.  Returns a dict of the header's geometry fields.

    ``grows``: shards start with a page of index and a page of arena and
    grow to the limit; otherwise all of it is allocated at creation.
    ``total_size`` is the address space reserved (the file's size, sparse
    for a table that grows); ``extents`` the ``(offset, length)`` ranges to
    allocate before the segment is initialised.

    Shard count: 64 by default, halved while a shard would get under 256 KiB of
    memory or under 32 entries, so small tables stay small and a 64 KiB value
    always fits a default-sized table.  Index slots per shard leave room for
    the uneven spread of keys over shards (mean + 4 sigma + slack) at a load
    of at most ~0.8 when the table holds ``capacity`` entries.
    """
    cdef shm_plan_t p
    cdef const char *why = NULL
    cdef uint32_t n = 0
    if shards is not None:
        if not (1 <= shards <= 1024):
            raise ValueError("shards must be a power of two between 1 and 1024")
        n = shards
    cdef uint64_t off = 0, length = 0
    cdef uint32_t i = 0
    if shm_plan(capacity, memory, n, grows, &p, &why) != 0:
        raise ValueError(why.decode())
    extents = []
    while shm_plan_extent(&p, i, &off, &length):
        extents.append((off, length))
        i += 1
    return dict(nshards=p.nshards, shard_bits=p.shard_bits, slots=p.slots, max_fill=p.max_fill,
                arena_size=p.arena_size, capacity=p.capacity, memory=p.memory, grows=bool(p.grows),
                init_slots=p.init_slots, init_arena=p.init_arena, index_buf=p.index_buf,
                procs_off=p.procs_off, shards_off=p.shards_off, index_off=p.index_off,
                arena_off=p.arena_off, total_size=p.total_size, extents=extents)


def init_segment(int fd, dict plan, uint64_t seed0, uint64_t seed1,
                 uint64_t creator_pid, uint64_t creator_start, uint64_t created_unix_ns,
                 bint clock=False):
    """Write a fresh layout into the zero-filled file ``fd`` (its size the
    plan's ``total_size``, its ``extents`` allocated).

    The magic is stored last, with release ordering: an opener that sees the
    magic sees a complete header and initialised mutexes.
    """
    cdef shm_plan_t p
    cdef const char *why = NULL
    cdef int rc
    if shm_plan(plan["capacity"], plan["memory"], plan["nshards"], plan["grows"], &p, &why) != 0:
        raise ValueError(why.decode())
    if p.total_size != plan["total_size"]:
        raise ValueError("plan does not match its capacity and memory")
    cdef size_t size = p.total_size
    cdef char *base = <char *>mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0)
    if base == <char *>MAP_FAILED:
        raise OSError(errno, os.strerror(errno))
    try:
        rc = shm_init_segment(base, &p, seed0, seed1, creator_pid, creator_start, created_unix_ns, clock)
        if rc:
            raise OSError(rc, "pthread_mutex_init: " + os.strerror(rc))
    finally:
        munmap(base, size)


cdef object nospace_error(shm_view_t *v, uint32_t si):
    """The table is below its limit, but the filesystem holding it is full."""
    import errno as _errno
    from shmreg._segment import segment_dir
    sh = shm_shard(v, si)
    return NoSpaceError(
        _errno.ENOSPC,
        f"no room to grow the table: the filesystem holding it ({segment_dir()}) is full "
        f"(shard {si}: {sh.count} entries, {sh.arena_cap} bytes of items allocated); free "
        "space there, delete entries and compact(), or enlarge it (docker: --shm-size)")


include "_codec.pxi"
include "_registration.pxi"
include "_mapping.pxi"


@cython.binding(False)
cdef class CoreTable:
    """A handle on a mapped segment and the typed operations on it.

    Use :class:`shmreg.Table`; this base class holds the hot paths.
    """
    cdef _Mapping m
    cdef shm_view_t *v
    cdef bint is_closed
    cdef bint lease_held
    cdef bint unpickle_ok
    #: Live entries the last write of this handle evicted.
    cdef public long _last_evicted
    # Owner id of the entry the last successful lookup hit (GIL-protected).
    cdef uint32_t last_owner
    # Process-local cache of pid objects per slot (keyed by owner id), so a
    # registry lookup does not allocate an int each time.
    cdef list pid_objs
    cdef uint32_t *pid_obj_owner
    cdef object _clock
    # Per-process read counters: readers never write shared memory.
    cdef public uint64_t _hits, _misses, _read_retries, _lock_fallbacks

    def __cinit__(self, *args, **kwargs):
        cdef int i
        self.m = None
        self.v = NULL
        self.is_closed = True
        self.unpickle_ok = True
        self.pid_obj_owner = <uint32_t *>malloc(SHM_NPROCS * sizeof(uint32_t))
        if self.pid_obj_owner == NULL:
            raise MemoryError()
        for i in range(SHM_NPROCS):
            self.pid_obj_owner[i] = 0
        self.pid_objs = [None] * SHM_NPROCS

    def __dealloc__(self):
        if not self.is_closed and self.m is not None:
            self.is_closed = True
            self.m.handles -= 1
            self.m.maybe_unmap()
        free(self.pid_obj_owner)

    # -- attach / close / pinning -------------------------------------------

    def _attach(self, int fd, clock=None):
        """Map the segment open at ``fd`` and validate its header.

        The header is untrusted: the engine recomputes every geometry field
        and checks it against the file's size before any offset derived
        from it is used.  A segment this process has mapped already shares
        that mapping (its header is validated again all the same).
        """
        cdef _Mapping m
        cdef shm_view_t probe
        cdef int err
        cdef char *base
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        cdef size_t fsize = st.st_size
        m = _mappings.get(key)
        if m is not None and m.view.base != NULL and m.view.size == fsize:
            probe.pidfds = NULL
            err = shm_attach(&probe, m.view.base, fsize)
            if err != SHM_ATTACH_OK:
                raise attach_error(err, m.view.hdr)
        else:
            if fsize < <size_t>SHM_HEADER_SIZE:
                raise IncompatibleTableError(
                    f"not a shmreg table (file is {fsize} bytes, smaller than a header)")
            # Address space for the table at its limit, reserved once: growing
            # never remaps (MAP_NORESERVE: only what is allocated counts).
            base = <char *>mmap(NULL, fsize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0)
            if base == <char *>MAP_FAILED:
                raise OSError(errno, os.strerror(errno))
            m = _Mapping()
            err = shm_attach(&m.view, base, fsize)
            if err != SHM_ATTACH_OK:
                exc = attach_error(err, <shm_header_t *>base)
                munmap(base, fsize)
                raise exc
            m.fd = os.dup(fd)
            m.view.fd = m.fd
            m.key = key
            _mappings[key] = m
        m.handles += 1
        self.m = m
        self.v = &m.view
        self._clock = clock
        self.is_closed = False

    def _close(self):
        """Close this handle (idempotent).  The mapping goes when no handle
        is open, no operation of any thread is in flight and no watcher
        lease is held - and, if this process owns entries (its liveness lock
        lives in the mapping), once the segment is unlinked."""
        if self.is_closed or self.m is None:
            self.is_closed = True
            return
        self.is_closed = True
        self.m.handles -= 1
        self.m.maybe_unmap()

    @property
    def closed(self):
        """True once ``close()`` was called."""
        return self.is_closed

    @property
    def allow_pickle(self):
        """Whether pickled values are unpickled when read.  False: they come
        back as opaque :class:`PickledValue` bytes, because unpickling would
        run code chosen by writers this process does not trust (set by the
        trust checks when the table is opened; see ``shmreg.Trust``)."""
        return self.unpickle_ok

    @allow_pickle.setter
    def allow_pickle(self, bint value):
        self.unpickle_ok = value

    cdef inline int enter(self) except -1:
        """Pin the mapping for one operation."""
        if self.is_closed:
            raise ValueError("operation on a closed table")
        self.m.pins += 1
        return 0

    cdef inline void leave(self) noexcept:
        cdef _Mapping m = self.m
        m.pins -= 1
        if m.pins == 0 and m.handles <= 0:
            m.maybe_unmap()

    # -- small helpers -------------------------------------------------------

    cdef uint64_t now(self) except? 0:
        if self._clock is None:
            return shm_now_ns()
        return <uint64_t>(self._clock() * 1e9)

    cdef inline uint64_t expires_at(self, object ttl, uint64_t now) except? 0:
        # None and inf: never expires.
        if ttl is None:
            return 0
        if ttl is True or ttl is False:
            raise TypeError("ttl must be a number of seconds, not a bool")
        cdef double t = ttl
        if t == INFINITY:
            return 0
        if not (t > 0) or t > 1e11:
            raise ValueError(f"ttl must be a positive number of seconds (or None/inf: never), not {ttl!r}")
        return now + <uint64_t>(t * 1e9)

    cdef int raise_lock(self, int st, int which) except -1:
        what = lock_name(which)
        fix = "`shmreg check --repair NAME` (Table.check(repair=True)) reinitialises it"
        if st == SHM_ABANDONED:
            tid = shm_mutex_holder(shm_lock_of(self.v, which))
            raise CorruptTableError(
                f"{what}: its lock is held by thread {tid}, which does not exist "
                f"(a corrupt or abandoned lock word); {fix}")
        if st == SHM_BADLOCK:
            raise CorruptTableError(f"{what}: its lock word is not a valid robust mutex (corrupt); {fix}")
        if st == SHM_CORRUPT:
            raise CorruptTableError(
                f"{what}: a writer died and the shard could not be repaired (corrupt arena or index)")
        if st == SHM_NOMEM:
            raise MemoryError()
        raise OSError(errno, f"{what}: cannot take the lock (status {st})")

    cdef int lock_shard(self, uint32_t si) except -1:
        """Lock shard ``si`` (repairing it if its last holder died); waits
        for another process with the GIL released."""
        cdef int st = shm_shard_lock(self.v, si, 1)
        if st == SHM_BUSY:
            with nogil:
                st = shm_shard_lock(self.v, si, 0)
        if st == SHM_OK:
            return 0
        return self.raise_lock(st, si)

    cdef int lock_procs(self) except -1:
        cdef int st = shm_procs_lock(self.v, 1)
        if st == SHM_BUSY:
            with nogil:
                st = shm_procs_lock(self.v, 0)
        if st == SHM_OK:
            return 0
        return self.raise_lock(st, -1)

    cdef object raise_status(self, int st, uint32_t si, KeyRef *k, ValRef *v):
        if (st == SHM_FULL or st == SHM_TOOBIG) and k != NULL and v != NULL:
            if st == SHM_TOOBIG or shm_item_need(k.k.n, v.v.n) > self.v.arena_size:
                raise ValueTooLargeError(
                    f"item of {shm_item_need(k.k.n, v.v.n)} bytes can never fit: a shard holds "
                    f"{self.v.arena_size} bytes (create the table with more memory)")
            raise TableFullError(
                f"table is full (shard {si}: {shm_shard(self.v, si).count} entries, "
                f"{shm_shard(self.v, si).used} of {self.v.arena_size} bytes used)")
        if st == SHM_FULL:
            raise TableFullError(f"table is full (shard {si})")
        if st == SHM_NOSPACE:
            raise nospace_error(self.v, si)
        if st == SHM_CORRUPT:
            raise CorruptTableError(f"shard {si}: index or arena is corrupt (run check())")
        if st == SHM_NOMEM:
            raise MemoryError()
        if st == SHM_SYSERR:
            raise OSError(errno, os.strerror(errno))
        raise AssertionError(f"unexpected status {st}")

    # -- writes ----------------------------------------------------------------

    cdef int store(self, object key, object value, object ttl, int mode, shm_val_t *expect,
                   shm_recbuf_t *old, uint32_t owner=0) except -2:
        cdef KeyRef k
        cdef ValRef v
        cdef uint64_t now, exp
        cdef uint32_t si
        cdef int st
        kkeep = encode_key(key, &k)
        vkeep = encode_value(value, &v)     # (may run Python: pickling)
        self.enter()
        try:
            shm_key_hash(self.v, &k.k)
            now = self.now()
            exp = self.expires_at(ttl, now)
            si = shm_shard_of(self.v, k.k.h)
            self.v.last_evicted = 0
            self.lock_shard(si)
            st = shm_put(self.v, si, &k.k, &v.v, exp, owner, mode, now, expect, old)
            shm_shard_unlock(self.v, si)
            self._last_evicted = self.v.last_evicted
            if st < 0:
                self.raise_status(st, si, &k, &v)
            return st
        finally:
            self.leave()

    def __setitem__(self, key, value):
        self.store(key, value, None, SHM_PUT_SET, NULL, NULL)

    def set(self, key, value, *, ttl=None, owned=False):
        """Store ``value`` under ``key``, replacing any previous value.

        :param ttl: seconds until the entry expires (``None`` or ``inf``:
            never).  :raises ValueError: ``ttl`` is nan, zero or negative.
        :param owned: tie the entry to this process: it vanishes when the
            process dies, however it dies.
        :raises TableFullError: no room left.
        :raises ValueTooLargeError: the item can never fit.

        >>> t.set("answer", 42, ttl=60.0)
        >>> t["answer"]
        42
        """
        self.store(key, value, ttl, SHM_PUT_SET, NULL, NULL, self._self_owner() if owned else 0)

    def insert_new(self, key, value, *, ttl=None, owned=False):
        """Store ``value`` only if ``key`` is absent (or expired); ETS ``insert_new``.
        ``ttl`` and ``owned`` as for :meth:`set`.

        Exactly one of any number of concurrent callers, in any process, gets
        ``True``.

        >>> t.insert_new("lock:job-7", "worker-3")
        True
        >>> t.insert_new("lock:job-7", "worker-4")
        False
        """
        return self.store(key, value, ttl, SHM_PUT_NEW, NULL, NULL,
                          self._self_owner() if owned else 0) == SHM_OK

    def _insert_new_for(self, key, value, uint32_t owner):
        """``insert_new`` owned by owner id ``owner`` (see ``_claim``)."""
        return self.store(key, value, None, SHM_PUT_NEW, NULL, NULL, owner) == SHM_OK

    def setdefault(self, key, default=None):
        """Return the value of ``key``; insert ``default`` first if it is absent (atomic)."""
        cdef shm_recbuf_t old
        recbuf_init(&old)
        try:
            if self.store(key, default, None, SHM_PUT_NEW, NULL, &old) == SHM_OK:
                return default
            return parse_records(&old, 2, self.unpickle_ok)[0]
        finally:
            shm_recbuf_free(&old)

    def _cache_put(self, key, value, ttl, bint only_new, bint evict):
        """Store for the cache layer: ``(stored, live entries evicted)``."""
        st = self.store(key, value, ttl, (SHM_PUT_NEW if only_new else SHM_PUT_SET) | (SHM_PUT_EVICT if evict else 0),
                        NULL, NULL)
        return st == SHM_OK, self._last_evicted

    def _get_raw(self, key):
        """``(value type, encoded value bytes)`` of ``key``, or None if absent."""
        return self.lookup(key, None, 3)

    def _cas_raw(self, key, int vtype, bytes raw, new):
        """Replace the value of ``key`` with ``new`` if its stored encoding is
        still exactly ``(vtype, raw)`` as read by ``_get_raw``."""
        cdef shm_val_t e
        e.vtype = vtype
        e.p = PyBytes_AS_STRING(raw)
        e.n = PyBytes_GET_SIZE(raw)
        return self.store(key, new, None, SHM_PUT_CAS, &e, NULL) == SHM_OK

    cdef int remove(self, object key, shm_recbuf_t *out, uint32_t only_owner=0) except -2:
        """Delete ``key``; copy its item into ``out`` if given.  SHM_OK deleted,
        SHM_NO absent, SHM_NOMATCH held by another owner."""
        cdef KeyRef k
        cdef uint32_t si
        cdef int st
        kkeep = encode_key(key, &k)
        self.enter()
        try:
            shm_key_hash(self.v, &k.k)
            si = shm_shard_of(self.v, k.k.h)
            now = self.now()
            self.lock_shard(si)
            st = shm_remove(self.v, si, &k.k, now, only_owner, out)
            shm_shard_unlock(self.v, si)
            if st == SHM_CORRUPT:
                raise CorruptTableError(f"shard {si}: index points outside the arena (run check())")
            if st == SHM_NOMEM:
                raise MemoryError()
            return st
        finally:
            self.leave()

    def _delete_owned(self, key, uint32_t owner):
        """Delete ``key`` only if owner id ``owner`` holds it; True if deleted."""
        return self.remove(key, NULL, owner) == SHM_OK

    def __delitem__(self, key):
        if self.remove(key, NULL) != SHM_OK:
            raise KeyError(key)

    def delete(self, key):
        """Delete ``key``; return True if it was present (no KeyError)."""
        return self.remove(key, NULL) == SHM_OK

    def take(self, key, default=MISSING):
        """Atomically look up and delete ``key`` (ETS ``take``); KeyError if absent
        and no ``default`` is given."""
        cdef shm_recbuf_t out
        recbuf_init(&out)
        try:
            if self.remove(key, &out) == SHM_OK:
                return parse_records(&out, 2, self.unpickle_ok)[0]
        finally:
            shm_recbuf_free(&out)
        if default is _MISSING:
            raise KeyError(key)
        return default

    def update_counter(self, key, incr=1, *, default=0, ttl=None):
        """Atomically add ``incr`` to the int stored under ``key`` and return the
        new value; an absent (or expired) key starts from ``default``.

        Exact under any number of processes.  ``ttl`` (``None``/``inf``:
        never expires) applies when the entry is created.
        :raises TypeError: the stored value is not an int.
        :raises OverflowError: the result does not fit in 64 bits.

        >>> t.update_counter("hits")
        1
        >>> t.update_counter("hits", 10)
        11
        """
        cdef KeyRef k
        cdef ValRef v
        cdef long long inc, dflt, res = 0
        cdef uint64_t now, exp
        cdef uint32_t si
        cdef int st
        if type(incr) is not int and not isinstance(incr, int) or isinstance(incr, bool):
            raise TypeError(f"incr must be an int, not {type(incr).__name__}")
        if type(default) is not int and not isinstance(default, int) or isinstance(default, bool):
            raise TypeError(f"default must be an int, not {type(default).__name__}")
        inc = incr
        dflt = default
        kkeep = encode_key(key, &k)
        self.enter()
        try:
            shm_key_hash(self.v, &k.k)
            si = shm_shard_of(self.v, k.k.h)
            now = self.now()
            exp = self.expires_at(ttl, now)
            self.lock_shard(si)
            st = shm_counter_add(self.v, si, &k.k, inc, dflt, exp, now, &res)
            shm_shard_unlock(self.v, si)
            if st == SHM_NOTINT:
                raise TypeError(f"value of {key!r} is not an int")
            if st == SHM_OVERFLOW:
                raise OverflowError("counter result does not fit in 64 bits")
            if st < 0:
                v.v.n = 8
                self.raise_status(st, si, &k, &v)
            return res
        finally:
            self.leave()

    def expire(self, key, ttl):
        """Give ``key`` a new ``ttl`` in seconds (``None`` or ``inf``: never
        expire).  Returns False if the key is absent or already expired."""
        cdef KeyRef k
        cdef uint64_t now, exp
        cdef uint32_t si
        cdef int st
        kkeep = encode_key(key, &k)
        self.enter()
        try:
            shm_key_hash(self.v, &k.k)
            si = shm_shard_of(self.v, k.k.h)
            now = self.now()
            exp = self.expires_at(ttl, now)
            self.lock_shard(si)
            st = shm_set_expiry(self.v, si, &k.k, exp, now)
            shm_shard_unlock(self.v, si)
            if st == SHM_CORRUPT:
                raise CorruptTableError(f"shard {si}: index points outside the arena (run check())")
            return st == SHM_OK
        finally:
            self.leave()

    def purge_expired(self):
        """Delete every expired entry now; return how many were deleted."""
        cdef uint32_t si
        cdef uint64_t now
        cdef long n = 0
        self.enter()
        try:
            now = self.now()
            for si in range(self.v.nsh):
                if shm_load32_rlx(&shm_shard(self.v, si).nttl) == 0:
                    continue
                self.lock_shard(si)
                n += shm_purge_shard(self.v, si, now, -1, 0)
                shm_shard_unlock(self.v, si)
            return n
        finally:
            self.leave()

    def clear(self):
        """Delete every entry (shard by shard; not one atomic step)."""
        cdef uint32_t si
        self.enter()
        try:
            for si in range(self.v.nsh):
                self.lock_shard(si)
                shm_clear_shard(self.v, si)
                shm_shard_unlock(self.v, si)
        finally:
            self.leave()

    # -- reads -------------------------------------------------------------------

    @cython.final
    cdef object lookup(self, object key, object default, int want):
        """Lock-free read.  ``want``: 0 value, 1 membership, 2 remaining ttl (ns,
        -1 none), 3 raw ``(vtype, bytes)``, 4 ``(value, owner id)``, 5
        ``(value, expires_ns)`` even if expired."""
        cdef KeyRef k
        cdef uint64_t off = 0, s1, exp = 0
        cdef uint32_t own = 0, vlen, si
        cdef int64_t pos, ins
        cdef int attempt, vtype = 0
        cdef const shm_item_t *it
        cdef shm_shard_t *sh
        cdef char *ar
        cdef shm_view_t *v
        cdef long long iv
        cdef double dv
        cdef object val
        kkeep = encode_key(key, &k)
        self.enter()
        try:
            v = self.v
            shm_key_hash(v, &k.k)
            si = shm_shard_of(v, k.k.h)
            sh = shm_shard(v, si)
            ar = shm_arena(v, si)
            for attempt in range(READ_RETRIES):
                s1 = shm_load_acq(&sh.seq)
                if s1 & 1:
                    if attempt > 8:
                        sched_yield()
                    else:
                        shm_cpu_relax()
                    continue
                pos = shm_find_inline(v, si, &k.k, &off, &ins)
                val = None
                if pos >= 0:
                    # Build the result inside the window: the copy is what
                    # the seq re-check below vouches for.
                    it = <const shm_item_t *>(ar + off)
                    exp = it.expires
                    own = it.owner
                    vtype = it.types >> 4
                    vlen = it.vlen
                    if <uint64_t>vlen > v.arena_size - SHM_ITEM_HDR - off:
                        # Changed under us since shm_find checked it: torn, the
                        # seq check below sends us round again.
                        vlen = 0
                        vtype = 0
                    if want == 3:
                        val = PyBytes_FromStringAndSize(ar + off + SHM_ITEM_HDR, vlen)
                    elif want == 0 or want == 4 or want == 5:
                        if vtype == SHM_VT_INT:
                            if vlen == 8:
                                memcpy(&iv, ar + off + SHM_ITEM_HDR, 8)
                                val = PyLong_FromLongLong(iv)
                        elif vtype == SHM_VT_BYTES or vtype == SHM_VT_PICKLE:
                            val = PyBytes_FromStringAndSize(ar + off + SHM_ITEM_HDR, vlen)
                        elif vtype == SHM_VT_STR:
                            try:
                                val = PyUnicode_DecodeUTF8(ar + off + SHM_ITEM_HDR, vlen, NULL)
                            except UnicodeDecodeError:
                                val = None
                                vtype = 0  # torn, or corrupt: the seq check decides
                        elif vtype == SHM_VT_FLOAT:
                            if vlen == 8:
                                memcpy(&dv, ar + off + SHM_ITEM_HDR, 8)
                                val = PyFloat_FromDouble(dv)
                        elif vtype == SHM_VT_BOOL:
                            if vlen == 1:
                                val = (ar + off + SHM_ITEM_HDR)[0] != 0
                        elif vtype == SHM_VT_NONE:
                            pass
                        else:
                            vtype = 0
                shm_fence_acq()
                if shm_load_rlx(&sh.seq) != s1:
                    self._read_retries += 1
                    continue
                if pos == -2 or (pos >= 0 and want != 1 and want != 2 and vtype == 0):
                    break   # stable but implausible: let the locked path decide
                if pos < 0 or (exp != 0 and want != 5 and exp <= self.now()) or (own != 0 and not shm_owner_alive(v, own)):
                    return self.miss(sh, key, default, want)
                self._hits += 1
                if (self._hits & 63) == 0:
                    shm_add_rlx(&sh.sampled_hits, 64)
                self.last_owner = own
                if v.mark_clock:
                    shm_mark_referenced(v, si, pos)
                if want == 1:
                    return True
                if want == 2:
                    return -1 if exp == 0 else <int64_t>(exp - self.now())
                if want == 3:
                    return (vtype, val)
                if vtype == SHM_VT_PICKLE:
                    val = unpickle(val) if self.unpickle_ok else PickledValue(val)
                if want == 4:
                    return (val, own)
                if want == 5:
                    return (val, exp)
                return val
            return self.lookup_locked(si, &k.k, key, default, want)
        finally:
            self.leave()

    cdef object miss(self, shm_shard_t *sh, object key, object default, int want):
        """Count a miss and give the caller what a miss means for ``want``."""
        self._misses += 1
        if (self._misses & 63) == 0:
            shm_add_rlx(&sh.sampled_misses, 64)
        if want == 0 or want == 4 or want == 5:
            if default is _RAISE:
                raise KeyError(key)
            return default
        if want == 1:
            return False
        if want == 3:
            return None
        raise KeyError(key)

    cdef object lookup_locked(self, uint32_t si, shm_key_t *k, object key, object default, int want):
        """The fallback read: under the shard lock, copied out, decoded after unlock."""
        cdef uint64_t off = 0, now = self.now(), exp
        cdef int64_t pos, ins
        cdef const shm_item_t *it
        cdef char *ar = shm_arena(self.v, si)
        cdef int st = 0
        cdef uint32_t klen, vlen
        cdef shm_recbuf_t rb
        recbuf_init(&rb)
        self._lock_fallbacks += 1
        try:
            self.lock_shard(si)
            pos = shm_find(self.v, si, k, &off, &ins)
            if pos >= 0:
                it = <const shm_item_t *>(ar + off)
                if (it.expires and it.expires <= now and want != 5) or not shm_owner_alive(self.v, it.owner):
                    pos = -1
                elif shm_recbuf_append(&rb, it, it.klen, it.vlen, ar + off + SHM_ITEM_HDR,
                                       ar + off + SHM_ITEM_HDR + it.vlen) < 0:
                    st = SHM_NOMEM
            shm_shard_unlock(self.v, si)
            if pos == -2:
                raise CorruptTableError(f"shard {si}: index points outside the arena (run check())")
            if st == SHM_NOMEM:
                raise MemoryError()
            if pos < 0:
                return self.miss(shm_shard(self.v, si), key, default, want)
            self._hits += 1
            memcpy(&self.last_owner, rb.data + 12, 4)
            if want == 1:
                return True
            if want == 3:
                memcpy(&klen, rb.data, 4)
                memcpy(&vlen, rb.data + 4, 4)
                return (<uint8_t>rb.data[9], PyBytes_FromStringAndSize(rb.data + SHM_REC_HDR + klen, vlen))
            memcpy(&exp, rb.data + 16, 8)
            if want == 2:
                return -1 if exp == 0 else <int64_t>(exp - now)
            if want == 4 or want == 5:
                rec = parse_records(&rb, 4, self.unpickle_ok)[0]
                return (rec[1], rec[3]) if want == 4 else (rec[1], rec[2])
            return parse_records(&rb, 2, self.unpickle_ok)[0]
        finally:
            shm_recbuf_free(&rb)

    def get(self, key, default=None):
        """Return the value of ``key``, or ``default`` if it is absent or expired.

        Lock-free: never blocks on a writer of another process, never writes
        shared memory.

        >>> t.get("missing", "n/a")
        'n/a'
        """
        return self.lookup(key, default, 0)

    def __getitem__(self, key):
        return self.lookup(key, _RAISE, 0)

    def __contains__(self, key):
        return self.lookup(key, None, 1)

    cdef object owner_pid_of_last(self):
        cdef uint32_t own = self.last_owner
        cdef uint32_t slot = shm_owner_slot(own)
        if own == 0 or slot >= <uint32_t>SHM_NPROCS:
            return None
        if self.pid_obj_owner[slot] != own:
            self.enter()
            try:
                self.pid_objs[slot] = shm_proc(self.v, slot).pid
            finally:
                self.leave()
            self.pid_obj_owner[slot] = own
        return self.pid_objs[slot]

    def _registration(self, key):
        """The live registration of ``key`` as a :class:`Registration`, or None
        (absent, not owned, or owner dead): one lock-free read."""
        cdef Registration reg
        val = self.lookup(key, _MISSING, 0)
        if val is _MISSING:
            return None
        pid = self.owner_pid_of_last()
        if pid is None:
            return None
        reg = Registration.__new__(Registration)
        reg.pid = pid
        reg.value = val
        return reg

    def _whereis(self, key):
        """Pid of the live owner of ``key``, or None (no value is copied)."""
        if not self.lookup(key, None, 1):
            return None
        return self.owner_pid_of_last()

    def _owner_of(self, key):
        """Owner id of the live entry ``key`` (0: not owned), without
        decoding its value; KeyError if absent (or its owner is dead)."""
        if not self.lookup(key, None, 1):
            raise KeyError(key)
        return self.last_owner

    def _get_owned(self, key, default=None):
        """``(value, owner id)`` of ``key`` (owner 0: not owned), or ``default``."""
        return self.lookup(key, default, 4)

    def _get_stale(self, key, default=None):
        """``(value, expires_ns)`` of ``key`` even if it has expired (until it
        is purged or evicted), or ``default``; ``expires_ns`` 0 = never."""
        return self.lookup(key, default, 5)

    def _ttl_ns(self, key):
        """Remaining lifetime of ``key`` in ns, -1 if it never expires; KeyError if absent."""
        return self.lookup(key, None, 2)

    # -- owners ------------------------------------------------------------------

    @property
    def _self_owner_id(self):
        """Owner id of this process in this table (0 until its first owned write)."""
        return self.m.self_owner if self.m is not None else 0

    def _self_owner(self):
        """This process's owner id in this table, claiming a slot on first use."""
        if self.is_closed:
            raise ValueError("operation on a closed table")
        if self.m.self_owner == 0:
            from shmreg._proc import start_time
            pid = os.getpid()
            self.m.self_owner = self._claim(pid, start_time(pid) or 0, True)
        return self.m.self_owner

    def _claim(self, uint64_t pid, uint64_t start, bint own_process):
        """Claim a process slot for ``pid`` and return its owner id.

        ``own_process``: the caller itself, which then holds the slot's
        liveness mutex (from a holder thread) until it exits, or until it
        closes the table after the table was unlinked; else another
        process, checked by pid.  An existing live slot of the same process
        is reused.
        """
        cdef shm_holder_t *holder = NULL
        cdef uint32_t owner = 0
        cdef int st
        self.enter()
        try:
            self.lock_procs()
            try:
                st = shm_proc_claim_locked(self.v, pid, start, own_process, &holder, &owner)
            finally:
                shm_procs_unlock(self.v)
            if st == SHM_FULL:
                raise TableFullError(f"process table full: {SHM_NPROCS} live processes own entries")
            if st == SHM_SYSERR:
                raise OSError(errno, "cannot take the liveness lock: " + os.strerror(errno))
            if holder != NULL:
                if self.m.holder != NULL:
                    shm_holder_release(self.m.holder)   # its slot was recycled: stale
                self.m.holder = holder
            return owner
        finally:
            self.leave()

    def _release(self, uint32_t owner):
        """Free the slot of ``owner`` if it is dead (after its entries were
        reaped); closes this process's pidfd of it."""
        cdef int st
        self.enter()
        try:
            if shm_owner_slot(owner) >= <uint32_t>SHM_NPROCS:
                return False
            self.lock_procs()
            try:
                st = shm_proc_release_locked(self.v, owner)
            finally:
                shm_procs_unlock(self.v)
            return st == SHM_OK
        finally:
            self.leave()

    def _owner_alive(self, uint32_t owner):
        """Python view of ``shm_owner_alive``."""
        self.enter()
        try:
            return bool(shm_owner_alive(self.v, owner))
        finally:
            self.leave()

    def _proc_table(self):
        """Claimed slots: list of dicts (owner id, pid, start time, kind, alive)."""
        cdef uint32_t i, oid
        cdef shm_proc_t *p
        self.enter()
        try:
            out = []
            for i in range(SHM_NPROCS):
                p = shm_proc(self.v, i)
                if p.state != SHM_PROC_LIVE:
                    continue
                oid = shm_owner_id(i, p.gen)
                out.append(dict(owner=oid, slot=i, pid=p.pid, start_time=p.start_time,
                                kind="self" if p.kind == SHM_PROC_SELF else "pid",
                                alive=bool(shm_owner_alive(self.v, oid))))
            return out
        finally:
            self.leave()

    def _owner_pid(self, uint32_t owner):
        """The pid behind owner id ``owner``, or None if its slot moved on."""
        cdef uint32_t slot = shm_owner_slot(owner)
        cdef shm_proc_t *p
        self.enter()
        try:
            if owner == 0 or slot >= <uint32_t>SHM_NPROCS:
                return None
            p = shm_proc(self.v, slot)
            if p.state != SHM_PROC_LIVE or (p.gen & 0xFFFFF) != shm_owner_gen(owner):
                return None
            return p.pid
        finally:
            self.leave()

    def _reap(self, uint32_t owner, bint collect, bint delete=True):
        """Delete every entry owned by ``owner`` (0: every entry whose owner is
        dead).  Returns ``(count, records)``, records as ``(key, value,
        expires_ns, owner)`` when ``collect``.  With ``delete=False`` only
        collect them (the watcher's post-mortem, before the delete).  Locking
        each shard also repairs any write a dead owner left half done."""
        cdef uint32_t si
        cdef long n = 0
        cdef int st
        cdef shm_recbuf_t b
        recbuf_init(&b)
        self.enter()
        try:
            for si in range(self.v.nsh):
                if shm_load32_rlx(&shm_shard(self.v, si).nowned) == 0:
                    continue
                self.lock_shard(si)
                st = shm_reap_shard(self.v, si, owner, &b if collect else NULL, delete, &n)
                shm_shard_unlock(self.v, si)
                if st == SHM_NOMEM:
                    raise MemoryError()
            return n, (parse_records(&b, 4, self.unpickle_ok) if collect else None)
        finally:
            shm_recbuf_free(&b)
            self.leave()

    def _reap_stale(self):
        """Delete the entries of owners that no longer hold their process
        slot (freed or recycled) and return how many.  Never those of a dead
        owner still in the process table: the watcher reports them through
        ``on_death`` first (``_reap(0, ...)`` would take them from it)."""
        return self._reap(SHM_OWNER_STALE, False)[0]

    # -- the watcher lease ---------------------------------------------------------

    def _lease(self, long timeout_ms):
        """Try to become the active watcher: True once this thread holds the
        lease lock (kept until ``_unlease`` or death), False on timeout."""
        cdef int rc
        cdef uint32_t holder = 0
        cdef pthread_mutex_t *m
        self.enter()
        try:
            m = &self.v.hdr.lease_lock.m
            with nogil:
                rc = shm_mutex_lock(m, 0, timeout_ms, &holder)
            if rc == SHM_LOCK_TIMEOUT:
                # A watcher that exited after its mapping was gone could not
                # have the kernel hand the lease on: a lease whose holder
                # thread does not exist is started afresh (never a live one).
                if shm_lock_state(m, &holder) == SHM_ABANDONED:
                    with nogil:
                        shm_repair_lock(self.v, -2)
                return False
            if rc == SHM_LOCK_ABANDONED or rc == SHM_LOCK_INVALID:
                with nogil:
                    shm_repair_lock(self.v, -2)
                return False
            if rc == SHM_LOCK_OWNERDEAD:
                shm_mutex_consistent(m)   # the previous watcher died: take over
            elif rc != 0:
                raise OSError(errno, f"watcher lease: cannot take the lock (status {rc})")
            self.v.hdr.lease_gen += 1
            self.v.hdr.lease_pid = os.getpid()
            self.m.leases += 1
            self.lease_held = True
            return True
        finally:
            self.leave()

    def _unlease(self):
        """Give the watcher lease up (the holding thread only).  Works on a
        closed handle: the held lease keeps the mapping."""
        if not self.lease_held or self.m is None:
            return
        self.lease_held = False
        self.v.hdr.lease_pid = 0
        shm_mutex_unlock(&self.v.hdr.lease_lock.m)
        self.m.leases -= 1
        self.m.maybe_unmap()

    def _lease_holder(self):
        """Pid of the active watcher, or None."""
        self.enter()
        try:
            if shm_have_alive_word() and not shm_mutex_held_by_live(&self.v.hdr.lease_lock.m):
                return None
            return self.v.hdr.lease_pid or None
        finally:
            self.leave()

    # -- snapshots (iteration) -------------------------------------------------

    cdef int snap_shard(self, uint32_t si, uint64_t now, shm_recbuf_t *b, shm_key_t *prefix,
                        size_t *count) except -2:
        """Seqlock snapshot of one shard with bounded retries, then the lock.
        ``b`` NULL: count only."""
        cdef shm_shard_t *sh = shm_shard(self.v, si)
        cdef uint64_t s1
        cdef size_t start_len = b.len if b != NULL else 0
        cdef size_t start_n = b.nrec if b != NULL else 0
        cdef int attempt, st = SHM_CORRUPT
        for attempt in range(SNAP_RETRIES):
            s1 = shm_load_acq(&sh.seq)
            if s1 & 1:
                sched_yield()
                continue
            # (With the GIL: owner checks use the mapping's pidfd cache.)
            st = shm_snap_shard(self.v, si, now, b, prefix, count)
            shm_fence_acq()
            if shm_load_rlx(&sh.seq) == s1 and st != SHM_CORRUPT:
                break
            if b != NULL:
                b.len = start_len
                b.nrec = start_n
            st = SHM_CORRUPT
        else:
            self._lock_fallbacks += 1
            self.lock_shard(si)
            st = shm_snap_shard(self.v, si, now, b, prefix, count)
            shm_shard_unlock(self.v, si)
        if st == SHM_NOMEM:
            raise MemoryError()
        if st == SHM_CORRUPT:
            raise CorruptTableError(f"shard {si}: index points outside the arena (run check())")
        return 0

    def _shard_entries(self, uint32_t si, int what, prefix=None):
        """Live entries of one shard as a list (see ``parse_records`` for ``what``)."""
        cdef shm_recbuf_t b
        cdef KeyRef pk
        cdef shm_key_t *pp = NULL
        cdef size_t count
        if prefix is not None:
            pkeep = encode_key(prefix, &pk)
            pp = &pk.k
        recbuf_init(&b)
        self.enter()
        try:
            if si >= self.v.nsh:
                raise IndexError(si)
            self.snap_shard(si, self.now(), &b, pp, &count)
            return parse_records(&b, what, self.unpickle_ok)
        finally:
            shm_recbuf_free(&b)
            self.leave()

    def __len__(self):
        """Number of live entries (expired ones and those of dead owners not counted)."""
        cdef uint32_t si
        cdef size_t total = 0, c
        cdef shm_shard_t *sh
        cdef uint64_t now = 0
        self.enter()
        try:
            for si in range(self.v.nsh):
                sh = shm_shard(self.v, si)
                if shm_load32_rlx(&sh.nttl) == 0 and shm_load32_rlx(&sh.nowned) == 0:
                    total += shm_load32_rlx(&sh.count)
                else:
                    if now == 0:
                        now = self.now()
                    self.snap_shard(si, now, NULL, NULL, &c)
                    total += c
            return total
        finally:
            self.leave()

    @property
    def nshards(self):
        """Number of shards (each has its own lock, seqlock, index and arena)."""
        self.enter()
        try:
            return self.v.nsh
        finally:
            self.leave()

    # -- introspection ---------------------------------------------------------

    def _header(self):
        """The segment header as a dict (geometry, seeds excluded)."""
        self.enter()
        try:
            h = self.v.hdr
            return dict(layout=h.layout, clock_bits=bool(h.table_flags & SHM_TABLE_CLOCK),
                        grows=bool(h.table_flags & SHM_TABLE_GROWS),
                        total_size=h.total_size, nshards=h.nshards,
                        slots_per_shard=h.slots, max_fill=h.max_fill, arena_size=h.arena_size,
                        init_slots=h.init_slots, init_arena=h.init_arena, index_buf=h.index_buf,
                        capacity=h.capacity, memory=h.memory, nprocs=h.nprocs,
                        creator_pid=h.creator_pid, created_unix_ns=h.created_unix_ns)
        finally:
            self.leave()

    def _shard_stats(self):
        """Per-shard counters summed (a racy read: writers may be running)."""
        cdef uint32_t si
        cdef shm_shard_t *sh
        self.enter()
        try:
            tot = dict(count=0, tombstones=0, with_ttl=0, owned=0, bytes_used=0, arena_top=0,
                       sets=0, deletes=0, repairs=0, index_rebuilds=0, coalesces=0, full=0,
                       evictions=0, expirations=0, max_shard_count=0, sampled_hits=0, sampled_misses=0,
                       index_slots=0, arena_allocated=0, grows=0, shrinks=0, moves=0, nospace=0)
            for si in range(self.v.nsh):
                sh = shm_shard(self.v, si)
                tot["count"] += sh.count
                tot["tombstones"] += sh.tombs
                tot["with_ttl"] += sh.nttl
                tot["owned"] += sh.nowned
                tot["bytes_used"] += sh.used
                tot["arena_top"] += sh.top
                tot["sets"] += sh.n_sets
                tot["deletes"] += sh.n_dels
                tot["repairs"] += sh.n_repairs
                tot["index_rebuilds"] += sh.n_rebuilds
                tot["coalesces"] += sh.n_coalesces
                tot["full"] += sh.n_full
                tot["evictions"] += sh.n_evictions
                tot["expirations"] += sh.n_expired
                tot["sampled_hits"] += sh.sampled_hits
                tot["sampled_misses"] += sh.sampled_misses
                tot["max_shard_count"] = max(tot["max_shard_count"], sh.count)
                tot["index_slots"] += shm_ix(self.v, si).slots
                tot["arena_allocated"] += sh.arena_cap
                tot["grows"] += sh.n_grows
                tot["shrinks"] += sh.n_shrinks
                tot["moves"] += sh.n_moves
                tot["nospace"] += sh.n_nospace
            return tot
        finally:
            self.leave()

    def _shard_regions(self):
        """Where each shard lies in the segment, as byte offsets: a list of
        ``(live index, its slots, arena, arena bytes allocated)`` (tests,
        tools; racy while writers run)."""
        cdef uint32_t si
        cdef shm_ix_t g
        self.enter()
        try:
            out = []
            for si in range(self.v.nsh):
                g = shm_ix(self.v, si)
                out.append((<char *>g.ix - self.v.base, g.slots, shm_arena(self.v, si) - self.v.base,
                            shm_shard(self.v, si).arena_cap))
            return out
        finally:
            self.leave()

    def _compact(self, bint force):
        """Shrink mostly empty indexes and move items down into free blocks,
        then give the freed pages back, shard by shard under its lock.
        ``force``: every shard, not only the mostly empty ones.  Returns
        the bytes given back."""
        cdef uint32_t si
        cdef uint64_t released = 0, total = 0
        cdef int st
        self.enter()
        try:
            for si in range(self.v.nsh):
                self.lock_shard(si)
                st = shm_compact_shard(self.v, si, force, &released)
                shm_shard_unlock(self.v, si)
                if st < 0:
                    self.raise_status(st, si, NULL, NULL)
                total += released
            return total
        finally:
            self.leave()

    def _lock_problems(self):
        """Locks that are corrupt right now, without waiting: a list of
        messages (a lock word naming a thread that does not exist, or not a
        valid robust mutex).  A lock held by a live thread is no problem."""
        cdef int which, st
        cdef uint32_t holder = 0
        self.enter()
        try:
            out = []
            for which in range(-2, <int>self.v.nsh):
                st = shm_lock_state(shm_lock_of(self.v, which), &holder)
                if st == SHM_ABANDONED:
                    out.append(f"{lock_name(which)}: its lock is held by thread {holder}, which does "
                               f"not exist (a corrupt or abandoned lock word)")
                elif st == SHM_BADLOCK:
                    out.append(f"{lock_name(which)}: its lock word is not a valid robust mutex (corrupt)")
            return out
        finally:
            self.leave()

    def _repair_locks(self):
        """Reinitialise every lock whose holder does not exist (or whose word
        is not a valid robust mutex) and repair what it guarded; a lock held
        by a live thread, even a stopped one, is never touched.  Returns the
        names of the locks repaired."""
        cdef int which, st
        self.enter()
        try:
            done = []
            for which in range(-2, <int>self.v.nsh):
                with nogil:
                    st = shm_repair_lock(self.v, which)
                if st == SHM_OK:
                    done.append(lock_name(which))
                elif st < 0 and st != SHM_TIMEOUT:
                    self.raise_lock(st, which)
            return done
        finally:
            self.leave()

    def _check_shard(self, uint32_t si):
        """Verify every invariant of shard ``si`` under its lock.

        Returns None, or a message naming the first broken invariant (a
        corrupt lock word included: reported, never waited on forever).
        """
        cdef shm_check_t e
        cdef int st
        self.enter()
        try:
            if si >= self.v.nsh:
                raise IndexError(si)
            st = shm_shard_lock(self.v, si, 1)
            if st == SHM_BUSY:
                with nogil:
                    st = shm_shard_lock(self.v, si, 0)
            if st == SHM_ABANDONED or st == SHM_BADLOCK or st == SHM_CORRUPT:
                try:
                    self.raise_lock(st, si)
                except CorruptTableError as exc:
                    return str(exc)
            elif st != SHM_OK:
                self.raise_lock(st, si)
            with nogil:
                shm_check_shard(self.v, si, &e)
            # Unlock without the debug build's re-check: its abort is for
            # writers, and this shard may be reported corrupt right now.
            shm_mutex_unlock(shm_lock_of(self.v, si))
            if e.code == 0:
                return None
            return f"shard {si}: " + shm_check_message(e.code).decode().format(a=e.a, b=e.b)
        finally:
            self.leave()
