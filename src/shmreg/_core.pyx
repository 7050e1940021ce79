# cython: language_level=3, embedsignature=True, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The shared-memory hash table core.

Typed, bytes-in/bytes-out primitives over one mapped segment: layout and
validation, hashing, shards with robust mutexes and seqlocks, the per-shard
block allocator, crash repair and the invariant checker.  The Python surface
(`shmreg.Table`) subclasses :class:`CoreTable` and adds naming, creation and
the non-hot dict methods.

Protocol (DESIGN.md section 4), as built here:

* Readers load the shard's seq (must be even), probe, bounds-check every
  offset against the shard's arena, copy out, fence, re-check seq.  After
  READ_RETRIES failed attempts they take the shard lock.  Readers never store
  to shared memory.
* Writers lock one shard.  Every change a reader can observe is a single
  aligned 8-byte store (publish/unpublish of an index slot, an in-place
  int64 counter, an expiry), bracketed by seq odd/even.  Everything else - the
  allocator's blocks and free lists, the shard counters - is *derived* state
  that a repair recomputes.  This is why there is no intent log: after
  EOWNERDEAD the index is the truth (or, while an index rebuild was in flight,
  the arena's USED blocks are), and the repair re-derives the rest.
"""

cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memcmp, memset
from libc.stdlib cimport malloc, realloc, free, abort
from libc.errno cimport errno, EBUSY
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_FromLongLong
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_FromDouble
from cpython.unicode cimport PyUnicode_DecodeUTF8

import io
import os
import pickle

from shmreg.errors import (
    CorruptTableError,
    IncompatibleTableError,
    TableFullError,
    ValueTooLargeError,
)

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object o, Py_ssize_t *size) except NULL

cdef extern from "sys/mman.h":
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset) nogil
    int munmap(void *addr, size_t length) nogil
    int PROT_READ, PROT_WRITE, MAP_SHARED
    void *MAP_FAILED

cdef extern from "pthread.h" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_trylock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)

cdef extern from "_shm.h" nogil:
    uint64_t SHMREG_MAGIC
    int SHMREG_LAYOUT, SHMREG_HEADER_SIZE, SHMREG_NPROCS, SHMREG_NBINS, SHMREG_HAVE_ROBUST
    int ITEM_HDR, BLOCK_MIN, BLOCK_USED, BLOCK_REF, SHARD_REBUILDING, TABLE_CLOCK
    uint64_t NIL, SLOT_OFFMASK, SLOT_TAGMASK, SLOT_CLOCK, SLOT_EMPTY, SLOT_TOMB
    int EOWNERDEAD, ENOTRECOVERABLE
    int SHM_DEBUG
    int PROC_FREE, PROC_CLAIMING, PROC_LIVE, PROC_SELF, PROC_FOREIGN
    int shm_have_alive_word()
    int shm_mutex_held_by_live(pthread_mutex_t *m)
    int shm_hold_forever(pthread_mutex_t *m)
    int shm_proc_stat(long pid, uint64_t *start, int *zombie)
    int shm_pidfd_open(long pid)
    int shm_pidfd_exited(int fd)
    int shm_pid_alive(long pid, uint64_t start)
    int shm_mutex_lock_timeout(pthread_mutex_t *m, long ms)

    ctypedef union shm_lock_u:
        pthread_mutex_t m

    ctypedef struct shm_header_t:
        uint64_t magic
        uint32_t layout, header_size
        uint64_t total_size
        uint32_t nshards, shard_bits, slots, max_fill
        uint64_t arena_size, capacity, memory, seed0, seed1
        uint64_t procs_off, shards_off, index_off, arena_off
        uint32_t nprocs, proc_size, shard_size, bins
        uint64_t creator_pid, creator_start, created_unix_ns
        uint64_t lease_pid, lease_start, lease_gen, table_flags
        shm_lock_u procs_lock, lease_lock

    ctypedef struct shm_proc_t:
        uint32_t state, gen
        uint64_t pid, start_time, pidns
        uint32_t kind
        shm_lock_u alive

    ctypedef struct shm_shard_t:
        shm_lock_u lock
        uint64_t seq, flags, top, used
        uint32_t count, tombs, nttl, nowned
        uint64_t n_sets, n_dels, n_repairs, n_rebuilds, n_coalesces, n_full, binmap
        uint64_t hand, n_evictions, n_expired, sampled_hits, sampled_misses
        uint64_t bins[64]

    ctypedef struct shm_item_t:
        uint32_t size
        uint16_t klen
        uint8_t types
        uint8_t flags
        uint32_t vlen
        uint32_t owner
        uint64_t expires

    uint64_t shm_load_acq(const uint64_t *p)
    uint64_t shm_load_rlx(const uint64_t *p)
    uint32_t shm_load32_rlx(const uint32_t *p)
    void shm_store_rel(uint64_t *p, uint64_t v)
    void shm_store_rlx(uint64_t *p, uint64_t v)
    void shm_fence_acq()
    void shm_fence_rel()
    void shm_or_rlx(uint64_t *p, uint64_t v)
    void shm_add_rlx(uint64_t *p, uint64_t v)
    void shm_seq_begin(uint64_t *seq)
    void shm_seq_end(uint64_t *seq)
    void shm_cpu_relax()
    int shm_ctz64(uint64_t v)
    uint64_t shm_hash(const unsigned char *p, size_t n, unsigned ktype, uint64_t s0, uint64_t s1)
    int shm_mutex_init(pthread_mutex_t *m)
    int shm_mutex_consistent(pthread_mutex_t *m)
    uint64_t shm_now_ns()
    void SHM_CRASH_POINT(int step)
    void shm_crash_arm(int step, long count, int stop)
    bint shm_add_overflow(long long a, long long b, long long *r)

cdef extern from "<sched.h>" nogil:
    int sched_yield()
cdef extern from "<unistd.h>" nogil:
    int close(int fd)

cdef extern from "<errno.h>" nogil:
    int ESRCH, ETIMEDOUT

# ---- constants -------------------------------------------------------------

# Key types (part of the key: 1 != "1").
DEF KT_BYTES = 1
DEF KT_STR = 2
DEF KT_INT = 3
DEF KT_BIGINT = 4

# Value types.  0 is never written, so a zeroed block is recognisably not an item.
DEF VT_NONE = 1
DEF VT_BOOL = 2
DEF VT_INT = 3
DEF VT_FLOAT = 4
DEF VT_BYTES = 5
DEF VT_STR = 6
DEF VT_PICKLE = 7

DEF READ_RETRIES = 64
DEF SNAP_RETRIES = 8
DEF MAX_KEY = 65535

# Put modes.
DEF PUT_SET = 0
DEF PUT_NEW = 1
DEF PUT_CAS = 2
DEF PUT_EVICT = 4   # flag: make room by evicting (expired first, then CLOCK)

# Status codes of the C-level operations.
DEF ST_OK = 1
DEF ST_NO = 0
DEF ST_FULL = -1
DEF ST_CORRUPT = -2
DEF ST_NOMEM = -3
DEF ST_NOTINT = -4
DEF ST_OVERFLOW = -5
DEF ST_NOMATCH = -6

# Crash points, by name, for SHMREG_CRASH_AT=name[:n] (kill at the n-th hit).
CRASH_POINTS = (
    "set:locked",       # lock held, nothing changed
    "set:allocated",    # new block carved, not written
    "set:written",      # new item complete, not published
    "set:published",    # index points at the new item, seq odd
    "set:freed",        # old item freed, seq even, lock held
    "del:unpublished",  # tombstone stored, seq odd
    "del:freed",        # block freed, lock held
    "counter:stored",   # in-place counter store done, seq odd
    "alloc:split",      # remainder header written, head not yet shrunk
    "coalesce:merged",  # one merge done during a coalesce pass
    "rebuild:cleared",  # index rebuild: index cleared, not refilled
    "rebuild:half",     # index rebuild: half the items reinserted
    "clear:half",       # clear(): half the index cleared
)
DEF CP_SET_LOCKED = 0
DEF CP_SET_ALLOCATED = 1
DEF CP_SET_WRITTEN = 2
DEF CP_SET_PUBLISHED = 3
DEF CP_SET_FREED = 4
DEF CP_DEL_UNPUBLISHED = 5
DEF CP_DEL_FREED = 6
DEF CP_COUNTER_STORED = 7
DEF CP_ALLOC_SPLIT = 8
DEF CP_COALESCE_MERGED = 9
DEF CP_REBUILD_CLEARED = 10
DEF CP_REBUILD_HALF = 11
DEF CP_CLEAR_HALF = 12


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

LAYOUT_VERSION = SHMREG_LAYOUT
HEADER_SIZE = SHMREG_HEADER_SIZE
NPROCS = SHMREG_NPROCS
ITEM_OVERHEAD = ITEM_HDR
HAVE_ROBUST = bool(SHMREG_HAVE_ROBUST)
SHARD_STRUCT_SIZE = sizeof(shm_shard_t)

_pickle_dumps = pickle.dumps
_pickle_loads = pickle.loads


cdef inline uint64_t _align8(uint64_t n) noexcept nogil:
    return (n + 7) & ~(<uint64_t>7)


cdef inline uint64_t _align(uint64_t n, uint64_t a):
    return (n + a - 1) // a * a


def plan_layout(uint64_t capacity, uint64_t memory, shards=None):
    """Compute the layout for a table of ``capacity`` entries and ``memory``
    item bytes.  Returns a dict of the header's geometry fields.

    Shard count: 64 by default, halved while a shard would get under 256 KiB of
    memory or under 32 entries, so small tables stay small and a 64 KiB value
    always fits a default-sized table.  Index slots per shard leave room for
    the uneven spread of keys over shards (mean + 4 sigma + slack) at a load
    of at most ~0.8 when the table holds ``capacity`` entries.
    """
    cdef uint64_t n
    if capacity < 1:
        raise ValueError("capacity must be at least 1")
    if memory < 4096:
        raise ValueError("memory must be at least 4096 bytes")
    if shards is None:
        n = 64
        while n > 1 and (memory // n < 256 * 1024 or capacity // n < 32):
            n //= 2
    else:
        n = shards
        if n < 1 or n > 1024 or (n & (n - 1)):
            raise ValueError("shards must be a power of two between 1 and 1024")
    per = (capacity + n - 1) // n
    slots = int(per * 1.25 + 4 * per ** 0.5 + 8)
    slots = _align(slots, 8)
    if slots * n > (1 << 40):
        raise ValueError("capacity too large")
    max_fill = slots - max(1, slots // 10)
    arena = _align((memory + n - 1) // n, 64)
    if arena < 256:
        arena = 256
    if arena > 0xFFFFFFF8:
        raise ValueError("memory too large for this shard count: pass more shards")
    procs_off = SHMREG_HEADER_SIZE
    shards_off = procs_off + SHMREG_NPROCS * sizeof(shm_proc_t)
    index_off = _align(shards_off + n * sizeof(shm_shard_t), 64)
    arena_off = _align(index_off + n * slots * 8, 64)
    total = _align(arena_off + n * arena, 4096)
    bits = 0
    while (1 << bits) < n:
        bits += 1
    return dict(nshards=n, shard_bits=bits, slots=slots, max_fill=max_fill,
                arena_size=arena, capacity=capacity, memory=memory,
                procs_off=procs_off, shards_off=shards_off, index_off=index_off,
                arena_off=arena_off, total_size=total)


def init_segment(int fd, dict plan, uint64_t seed0, uint64_t seed1,
                 uint64_t creator_pid, uint64_t creator_start, uint64_t created_unix_ns,
                 bint clock=False):
    """Write a fresh layout into the (zero-filled, fully allocated) file ``fd``.

    The magic is stored last, with release ordering: an opener that sees the
    magic sees a complete header and initialised mutexes.
    """
    cdef size_t size = plan["total_size"]
    cdef char *base = <char *>mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    if base == <char *>MAP_FAILED:
        raise OSError(errno, os.strerror(errno))
    cdef shm_header_t *h = <shm_header_t *>base
    cdef shm_shard_t *sh
    cdef uint32_t i, b
    cdef int rc = 0
    try:
        h.layout = SHMREG_LAYOUT
        h.header_size = SHMREG_HEADER_SIZE
        h.total_size = size
        h.nshards = plan["nshards"]
        h.shard_bits = plan["shard_bits"]
        h.slots = plan["slots"]
        h.max_fill = plan["max_fill"]
        h.arena_size = plan["arena_size"]
        h.capacity = plan["capacity"]
        h.memory = plan["memory"]
        h.seed0 = seed0
        h.seed1 = seed1
        h.procs_off = plan["procs_off"]
        h.shards_off = plan["shards_off"]
        h.index_off = plan["index_off"]
        h.arena_off = plan["arena_off"]
        h.nprocs = SHMREG_NPROCS
        h.proc_size = sizeof(shm_proc_t)
        h.shard_size = sizeof(shm_shard_t)
        h.bins = SHMREG_NBINS
        h.creator_pid = creator_pid
        h.creator_start = creator_start
        h.created_unix_ns = created_unix_ns
        h.table_flags = TABLE_CLOCK if clock else 0
        rc = shm_mutex_init(&h.procs_lock.m) or shm_mutex_init(&h.lease_lock.m)
        if rc:
            raise OSError(rc, "pthread_mutex_init: " + os.strerror(rc))
        for i in range(h.nshards):
            sh = <shm_shard_t *>(base + h.shards_off + <size_t>i * sizeof(shm_shard_t))
            rc = shm_mutex_init(&sh.lock.m)
            if rc:
                raise OSError(rc, "pthread_mutex_init: " + os.strerror(rc))
            for b in range(SHMREG_NBINS):
                sh.bins[b] = NIL
        shm_fence_rel()
        shm_store_rel(&h.magic, SHMREG_MAGIC)
    finally:
        munmap(base, size)


# ---- key and value encoding ------------------------------------------------

cdef struct KeyRef:
    const unsigned char *p
    Py_ssize_t n
    unsigned ktype
    uint64_t h
    unsigned char buf[8]


cdef struct ValRef:
    const char *p
    Py_ssize_t n
    int vtype
    char buf[8]


cdef object encode_key(object key, KeyRef *k):
    """Fill ``k`` from ``key``; returns an object that must outlive ``k.p``."""
    cdef object t = type(key)
    cdef object keep = None
    cdef int overflow = 0
    cdef long long iv
    if t is str:
        k.p = <const unsigned char *>PyUnicode_AsUTF8AndSize(key, &k.n)
        k.ktype = KT_STR
    elif t is bytes:
        k.p = <const unsigned char *>PyBytes_AS_STRING(key)
        k.n = PyBytes_GET_SIZE(key)
        k.ktype = KT_BYTES
    elif t is int:
        iv = PyLong_AsLongLongAndOverflow(key, &overflow)
        if overflow == 0:
            memcpy(k.buf, &iv, 8)
            k.p = k.buf
            k.n = 8
            k.ktype = KT_INT
        else:
            keep = str(key).encode("ascii")
            k.p = <const unsigned char *>PyBytes_AS_STRING(keep)
            k.n = PyBytes_GET_SIZE(keep)
            k.ktype = KT_BIGINT
    elif isinstance(key, str):
        return encode_key(str(key), k)
    elif isinstance(key, bytes):
        return encode_key(bytes(key), k)
    elif isinstance(key, int):
        return encode_key(int(key), k)
    else:
        raise TypeError(f"keys must be str, bytes or int, not {type(key).__name__}")
    if k.n > MAX_KEY:
        raise ValueError(f"key too long: {k.n} bytes encoded (at most {MAX_KEY})")
    if t is str:
        keep = key
    return keep


cdef object decode_key(unsigned ktype, const char *p, Py_ssize_t n):
    cdef long long iv
    if ktype == KT_STR:
        return PyUnicode_DecodeUTF8(<char *>p, n, NULL)
    if ktype == KT_BYTES:
        return PyBytes_FromStringAndSize(<char *>p, n)
    if ktype == KT_INT and n == 8:
        memcpy(&iv, p, 8)
        return PyLong_FromLongLong(iv)
    if ktype == KT_BIGINT:
        return int(PyBytes_FromStringAndSize(<char *>p, n))
    raise CorruptTableError(f"item with unknown key type {ktype}")


cdef object encode_value(object v, ValRef *r):
    """Fill ``r`` from ``v``; returns an object that must outlive ``r.p``."""
    cdef object t = type(v)
    cdef int overflow = 0
    cdef long long iv
    cdef double dv
    cdef object keep
    if t is bytes:
        r.p = PyBytes_AS_STRING(v)
        r.n = PyBytes_GET_SIZE(v)
        r.vtype = VT_BYTES
        return v
    if t is str:
        try:
            r.p = PyUnicode_AsUTF8AndSize(v, &r.n)
            r.vtype = VT_STR
            return v
        except UnicodeEncodeError:
            pass  # lone surrogates: keep the exact str through pickle
    elif t is int:
        iv = PyLong_AsLongLongAndOverflow(v, &overflow)
        if overflow == 0:
            memcpy(r.buf, &iv, 8)
            r.p = r.buf
            r.n = 8
            r.vtype = VT_INT
            return None
    elif t is float:
        dv = PyFloat_AS_DOUBLE(v)
        memcpy(r.buf, &dv, 8)
        r.p = r.buf
        r.n = 8
        r.vtype = VT_FLOAT
        return None
    elif t is bool:
        r.buf[0] = 1 if v else 0
        r.p = r.buf
        r.n = 1
        r.vtype = VT_BOOL
        return None
    elif v is None:
        r.p = r.buf
        r.n = 0
        r.vtype = VT_NONE
        return None
    try:
        keep = _pickle_dumps(v, 5)
    except Exception as e:
        raise TypeError(f"cannot store a value of type {type(v).__name__}: "
                        f"not picklable ({e})") from e
    r.p = PyBytes_AS_STRING(keep)
    r.n = PyBytes_GET_SIZE(keep)
    r.vtype = VT_PICKLE
    return keep


class _ClassLookupError(Exception):
    """find_class failed: the pickle is fine, its class is not importable here."""


class _LookupTracingUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except Exception as e:
            raise _ClassLookupError() from e


cdef object unpickle(bytes raw):
    """Unpickle a stored value.

    Garbage fed to pickle can fail in any way (AttributeError from an APPEND
    on a dict, IndexError, ...).  A failure to import the pickled class is
    the caller's business and propagates as is; any other failure means the
    stored bytes are not a pickle we wrote: CorruptTableError.  (Telling the
    two apart costs a second, traced unpickling, on the error path only.)
    """
    try:
        return _pickle_loads(raw)
    except Exception as e:
        try:
            return _LookupTracingUnpickler(io.BytesIO(raw)).load()
        except _ClassLookupError as lookup:
            raise lookup.__cause__ from None
        except Exception:
            pass
        raise CorruptTableError(f"stored value is not a valid pickle: {e!r}") from e


class PickledValue(bytes):
    """A pickled value returned as its raw bytes, not unpickled.

    Unpickling runs code chosen by whoever wrote the value.  A table whose
    writers are not trusted (another user's table opened by root, for
    instance) hands back pickled values as this opaque ``bytes`` subclass
    instead; ``pickle.loads(value)`` unpickles it if you decide to trust it.
    """
    __slots__ = ()

    def __repr__(self):
        return f"<pickled value, {len(self)} bytes, not unpickled>"


cdef object decode_value(int vtype, const char *p, Py_ssize_t n, bint allow_pickle=True):
    """Decode a value from memory that no writer can change any more."""
    cdef long long iv
    cdef double dv
    if vtype == VT_BYTES:
        return PyBytes_FromStringAndSize(<char *>p, n)
    if vtype == VT_STR:
        return PyUnicode_DecodeUTF8(<char *>p, n, NULL)
    if vtype == VT_INT and n == 8:
        memcpy(&iv, p, 8)
        return PyLong_FromLongLong(iv)
    if vtype == VT_FLOAT and n == 8:
        memcpy(&dv, p, 8)
        return PyFloat_FromDouble(dv)
    if vtype == VT_BOOL and n == 1:
        return p[0] != 0
    if vtype == VT_NONE and n == 0:
        return None
    if vtype == VT_PICKLE:
        if not allow_pickle:
            return PickledValue(PyBytes_FromStringAndSize(<char *>p, n))
        return unpickle(PyBytes_FromStringAndSize(<char *>p, n))
    raise CorruptTableError(f"item with unknown value type {vtype} (length {n})")


# ---- raw record buffer (snapshots, locked reads) ----------------------------

cdef struct RecBuf:
    char *data
    size_t len
    size_t cap
    size_t nrec

# Record layout: u32 klen, u32 vlen, u8 ktype, u8 vtype, u16 pad, u32 owner,
# u64 expires, then key, then value, padded to 8.
DEF REC_HDR = 24


cdef int recbuf_append(RecBuf *b, const shm_item_t *it, uint32_t klen, uint32_t vlen,
                       const char *val, const char *key) noexcept nogil:
    """Append one record.  ``klen``/``vlen`` are the lengths the caller
    already bounds-checked: never re-read them from shared memory, where a
    concurrent writer may have changed them since."""
    cdef size_t need = REC_HDR + _align8(<uint64_t>klen + vlen)
    cdef size_t ncap
    cdef char *nd
    cdef uint32_t u
    if b.len + need > b.cap:
        ncap = b.cap * 2 if b.cap else 4096
        while ncap < b.len + need:
            ncap *= 2
        nd = <char *>realloc(b.data, ncap)
        if nd == NULL:
            return -1
        b.data = nd
        b.cap = ncap
    cdef char *r = b.data + b.len
    memcpy(r, &klen, 4)
    memcpy(r + 4, &vlen, 4)
    r[8] = <char>(it.types & 15)
    r[9] = <char>(it.types >> 4)
    r[10] = 0
    r[11] = 0
    u = it.owner
    memcpy(r + 12, &u, 4)
    memcpy(r + 16, &it.expires, 8)
    memcpy(r + REC_HDR, key, klen)
    memcpy(r + REC_HDR + klen, val, vlen)
    b.len += need
    b.nrec += 1
    return 0


cdef inline void recbuf_reset(RecBuf *b) noexcept nogil:
    b.len = 0
    b.nrec = 0


# ---- checker results -------------------------------------------------------

cdef struct CheckErr:
    int code
    uint64_t a
    uint64_t b

_CHECK_MESSAGES = {
    1: "seq is odd (a={a}) although no writer holds the lock",
    2: "arena walk broke at offset {a} (block size {b})",
    3: "top {a} beyond arena size {b}",
    4: "index slot {a} points at {b}, which is not the start of a block",
    5: "index slot {a} points at a FREE block at {b}",
    6: "block at {b} is referenced by two index slots (second: {a})",
    7: "item at {b} (slot {a}) has lengths that overflow its block",
    8: "item at {b} (slot {a}) hashes to another shard",
    9: "item at {b} (slot {a}) is unreachable from its home slot or a duplicate key",
    10: "USED block at {a} is not referenced by the index (size {b})",
    11: "shard count {a} != {b} entries in the index",
    12: "shard tombstones {a} != {b} in the index",
    13: "shard used bytes {a} != {b} in USED blocks",
    14: "free list {a} holds offset {b}, which is not a FREE block",
    15: "free list {a} is cyclic or longer than the arena",
    16: "FREE block at {a} is in no free list",
    17: "shard entries-with-ttl {a} != {b}",
    18: "shard flags {a} (an index rebuild did not finish)",
    19: "item at {b} (slot {a}) has an unknown key/value type",
    20: "FREE block at {a} is in the wrong free list ({b})",
    21: "out of memory while checking",
}


cdef inline uint32_t bin_of(uint64_t size) noexcept nogil:
    """Size class of a block: 16-byte steps up to 544, then two per power of two."""
    cdef uint32_t l = 0
    cdef uint64_t s
    if size < BLOCK_MIN:
        return 0    # never a real block; keeps a corrupt size from indexing past bins[]
    if size < 544:
        return <uint32_t>((size - 32) >> 4)
    s = size
    while s > 1:
        s >>= 1
        l += 1
    cdef uint32_t b = 32 + (l - 9) * 2 + <uint32_t>((size >> (l - 1)) & 1)
    if b >= SHMREG_NBINS:
        b = SHMREG_NBINS - 1
    return b


cdef inline size_t block_index(const uint64_t *blocks, size_t nb, uint64_t off) noexcept nogil:
    """Index of ``off`` in the ascending block starts, or where it would go
    (``nb`` if past the end): callers check ``blocks[i] == off``."""
    cdef size_t lo = 0, hi = nb, mid
    while lo < hi:
        mid = (lo + hi) // 2
        if blocks[mid] < off:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef inline uint64_t make_word0(uint64_t size, uint64_t klen, uint64_t types, uint64_t flags) noexcept nogil:
    return size | (klen << 32) | (types << 48) | (flags << 56)



class _Missing:
    __slots__ = ()

    def __repr__(self):
        return "<missing>"


_MISSING = _Missing()
#: Sentinel for "no default given" (``pop``/``take``); ``get(k, MISSING)``
#: returns it for an absent key.
MISSING = _MISSING
# Internal: makes a lookup raise KeyError instead of returning a default.
_RAISE = object()


@cython.freelist(32)
@cython.final
cdef class Registration:
    """A live registration: the owning process's ``pid`` and the ``value``.

    Behaves like the named tuple ``(pid, value)`` (unpacking, indexing,
    equality with tuples), built in C because ``Registry.lookup`` is a hot
    read path.
    """
    cdef readonly object pid
    cdef readonly object value

    def __init__(self, pid, value):
        self.pid = pid
        self.value = value

    def __iter__(self):
        return iter((self.pid, self.value))

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return (self.pid, self.value)[i]

    def __eq__(self, other):
        if isinstance(other, (Registration, tuple)):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self):
        return hash((self.pid, self.value))

    def __repr__(self):
        return f"Registration(pid={self.pid!r}, value={self.value!r})"

    def __reduce__(self):
        return (Registration, (self.pid, self.value))

    def _asdict(self):
        return {"pid": self.pid, "value": self.value}


cdef class CoreTable:
    """The mapped segment and the typed operations on it.

    Use :class:`shmreg.Table`; this base class holds the hot paths.
    """
    cdef char *base
    cdef size_t size
    cdef shm_header_t *hdr
    cdef char *shards_base
    cdef uint64_t *index_base
    cdef char *arena_base
    cdef uint32_t nsh, shard_bits, slots, max_fill
    cdef uint64_t arena_size, seed0, seed1
    cdef int inflight
    cdef bint is_closed
    cdef char *procs_base
    # Process-local pidfd cache for owners registered by pid (slot -> fd, gen).
    cdef int *pidfds
    cdef uint32_t *pidfd_gen
    #: Owner id of this process in this table (0 until its first owned write).
    cdef public uint32_t _self_owner_id
    # A cache table: readers set the CLOCK bit of what they hit (only when clear).
    cdef bint mark_clock
    #: Live entries the last write of this process evicted.
    cdef public long _last_evicted
    # Owner id of the entry the last successful lookup hit (GIL-protected).
    cdef uint32_t last_owner
    # Process-local cache of pid objects per slot (keyed by owner id), so a
    # registry lookup does not allocate an int each time.
    cdef list pid_objs
    cdef uint32_t *pid_obj_owner
    cdef object _clock
    #: False: pickled values come back as opaque :class:`PickledValue` bytes
    #: (the writers of this table are not trusted to run code here).
    cdef public bint allow_pickle
    # Per-process read counters: readers never write shared memory.
    cdef public uint64_t _hits, _misses, _read_retries, _lock_fallbacks

    def __cinit__(self, *args, **kwargs):
        cdef int i
        self.base = NULL
        self.is_closed = True
        self.allow_pickle = True
        self.pidfds = <int *>malloc(SHMREG_NPROCS * sizeof(int))
        self.pidfd_gen = <uint32_t *>malloc(SHMREG_NPROCS * sizeof(uint32_t))
        if self.pidfds == NULL or self.pidfd_gen == NULL:
            raise MemoryError()
        self.pid_obj_owner = <uint32_t *>malloc(SHMREG_NPROCS * sizeof(uint32_t))
        if self.pid_obj_owner == NULL:
            raise MemoryError()
        for i in range(SHMREG_NPROCS):
            self.pidfds[i] = -1
            self.pidfd_gen[i] = 0
            self.pid_obj_owner[i] = 0
        self.pid_objs = [None] * SHMREG_NPROCS

    def __dealloc__(self):
        cdef int i
        if self.base != NULL and self._self_owner_id == 0:
            # (A process holding a liveness lock in this mapping keeps it: the
            # kernel must still find that lock when the process dies.)
            munmap(self.base, self.size)
            self.base = NULL
        if self.pidfds != NULL:
            for i in range(SHMREG_NPROCS):
                if self.pidfds[i] >= 0:
                    close(self.pidfds[i])
            free(self.pidfds)
        free(self.pidfd_gen)
        free(self.pid_obj_owner)

    # -- attach / validate -------------------------------------------------

    def _attach(self, int fd, clock=None):
        """Map the segment open at ``fd`` and validate its header.

        The header is untrusted: every geometry field is recomputed from the
        shard count, slots and arena size and must match, and the total must
        equal the file's size, before any offset derived from it is used.
        """
        st = os.fstat(fd)
        cdef size_t fsize = st.st_size
        if fsize < <size_t>SHMREG_HEADER_SIZE:
            raise IncompatibleTableError(
                f"not a shmreg table (file is {fsize} bytes, smaller than a header)")
        cdef char *base = <char *>mmap(NULL, fsize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if base == <char *>MAP_FAILED:
            raise OSError(errno, os.strerror(errno))
        cdef shm_header_t *h = <shm_header_t *>base
        try:
            magic = shm_load_acq(&h.magic)
            if magic == 0:
                raise IncompatibleTableError("segment is not initialised (creator still running or died)")
            if magic != SHMREG_MAGIC:
                raise IncompatibleTableError("not a shmreg table (bad magic)")
            if h.layout != SHMREG_LAYOUT:
                raise IncompatibleTableError(
                    f"table has layout version {h.layout}; this shmreg reads version {SHMREG_LAYOUT}")
            if (h.header_size != SHMREG_HEADER_SIZE or h.nprocs != SHMREG_NPROCS
                    or h.proc_size != sizeof(shm_proc_t) or h.shard_size != sizeof(shm_shard_t)
                    or h.bins != SHMREG_NBINS):
                raise IncompatibleTableError("table was made by an incompatible build (struct sizes differ)")
            n = h.nshards
            if n < 1 or n > 1024 or (n & (n - 1)) or (1 << h.shard_bits) != n:
                raise CorruptTableError(f"header: bad shard count {n}")
            if h.slots < 8 or h.slots % 8 or h.slots * n > (1 << 40) or h.max_fill >= h.slots or h.max_fill < 1:
                raise CorruptTableError(f"header: bad index geometry ({h.slots} slots, fill {h.max_fill})")
            if h.arena_size < 256 or h.arena_size % 64 or h.arena_size > 0xFFFFFFF8:
                raise CorruptTableError(f"header: bad arena size {h.arena_size}")
            procs_off = SHMREG_HEADER_SIZE
            shards_off = procs_off + SHMREG_NPROCS * sizeof(shm_proc_t)
            index_off = _align(shards_off + n * sizeof(shm_shard_t), 64)
            arena_off = _align(index_off + n * h.slots * 8, 64)
            total = _align(arena_off + n * h.arena_size, 4096)
            if (h.procs_off, h.shards_off, h.index_off, h.arena_off) != (procs_off, shards_off, index_off, arena_off):
                raise CorruptTableError("header: region offsets do not match the geometry")
            try:
                plan = plan_layout(h.capacity, h.memory, n)
            except (ValueError, OverflowError) as e:
                raise CorruptTableError(f"header: impossible capacity/memory ({e})") from None
            if (plan["slots"], plan["max_fill"], plan["arena_size"]) != (h.slots, h.max_fill, h.arena_size):
                raise CorruptTableError("header: geometry does not follow from capacity and memory")
            if h.total_size != total or total != fsize:
                raise CorruptTableError(
                    f"header: size {h.total_size} does not match geometry {total} / file {fsize}")
        except BaseException:
            munmap(base, fsize)
            raise
        self.base = base
        self.size = fsize
        self.hdr = h
        self.nsh = h.nshards
        self.shard_bits = h.shard_bits
        self.slots = h.slots
        self.max_fill = h.max_fill
        self.arena_size = h.arena_size
        self.seed0 = h.seed0
        self.seed1 = h.seed1
        self.shards_base = base + h.shards_off
        self.index_base = <uint64_t *>(base + h.index_off)
        self.arena_base = base + h.arena_off
        self.procs_base = base + h.procs_off
        self.mark_clock = (h.table_flags & TABLE_CLOCK) != 0
        self._clock = clock
        self.is_closed = False

    def _close(self):
        """Unmap unless another thread is inside a blocking lock wait, or this
        process owns entries (its liveness lock lives in the mapping)."""
        self.is_closed = True
        if self.base != NULL and self.inflight == 0 and self._self_owner_id == 0:
            munmap(self.base, self.size)
            self.base = NULL

    @property
    def closed(self):
        """True once ``close()`` was called."""
        return self.is_closed

    # -- small helpers -------------------------------------------------------

    cdef inline shm_shard_t *shard(self, uint32_t i) noexcept nogil:
        return <shm_shard_t *>(self.shards_base + <size_t>i * sizeof(shm_shard_t))

    cdef inline uint64_t *idx(self, uint32_t i) noexcept nogil:
        return self.index_base + <size_t>i * self.slots

    cdef inline char *arena(self, uint32_t i) noexcept nogil:
        return self.arena_base + <size_t>i * self.arena_size

    cdef inline bint item_ok_in(self, char *ar, uint64_t off) noexcept nogil:
        """Is the item at offset ``off`` of arena ``ar`` plausible: aligned,
        inside the arena, a block of at least BLOCK_MIN bytes, lengths inside
        the block?  (Shared memory is untrusted: check before use.)"""
        cdef const shm_item_t *it
        cdef uint64_t size
        if off & 7 or off > self.arena_size - BLOCK_MIN:
            return False
        it = <const shm_item_t *>(ar + off)
        size = it.size
        return (size >= BLOCK_MIN and not (size & 7) and size <= self.arena_size - off
                and ITEM_HDR + <uint64_t>it.vlen + it.klen <= size)

    cdef inline uint32_t shard_of(self, uint64_t h) noexcept nogil:
        return <uint32_t>((h >> 32) & (self.nsh - 1))

    cdef inline object key_ref(self, object key, KeyRef *k):
        """Encode ``key`` into ``k`` and hash it with this table's seed;
        returns the object that must outlive ``k``."""
        keep = encode_key(key, k)
        k.h = shm_hash(k.p, k.n, k.ktype, self.seed0, self.seed1)
        return keep

    cdef inline int check_open(self) except -1:
        if self.is_closed:
            raise ValueError("operation on a closed table")
        return 0

    cdef uint64_t now(self) except? 0:
        if self._clock is None:
            return shm_now_ns()
        return <uint64_t>(self._clock() * 1e9)

    cdef inline uint64_t expires_at(self, object ttl, uint64_t now) except? 0:
        if ttl is None:
            return 0
        cdef double t = ttl
        if not (t > 0) or t > 1e11:
            raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
        return now + <uint64_t>(t * 1e9)

    # -- probing -------------------------------------------------------------

    cdef int64_t find(self, uint32_t si, KeyRef *k, uint64_t *out_off, int64_t *ins) noexcept nogil:
        """Probe shard ``si`` for ``k``.

        Returns the slot index, -1 when absent, or -2 when the data is
        implausible (torn under a reader, corrupt under a writer).  ``ins``
        gets the first slot an insert may use (tombstone or empty), -1 if none.
        Every offset and length is checked against the shard's arena.
        """
        cdef uint64_t *ix = self.idx(si)
        cdef char *ar = self.arena(si)
        cdef uint32_t n = self.slots
        cdef uint32_t pos = <uint32_t>(((k.h & 0xffffffffULL) * n) >> 32)
        cdef uint64_t tag = k.h & SLOT_TAGMASK
        cdef uint64_t v, off, size, vlen, klen
        cdef uint32_t i
        cdef const shm_item_t *it
        ins[0] = -1
        for i in range(n):
            v = shm_load_rlx(&ix[pos])
            off = v & SLOT_OFFMASK
            if off == SLOT_EMPTY:
                if ins[0] < 0:
                    ins[0] = pos
                return -1
            if off == SLOT_TOMB:
                if ins[0] < 0:
                    ins[0] = pos
            elif (v & SLOT_TAGMASK) == tag:
                off -= 8
                if off & 7 or off > self.arena_size - BLOCK_MIN:
                    return -2
                it = <const shm_item_t *>(ar + off)
                size = it.size
                vlen = it.vlen
                klen = it.klen
                if size < BLOCK_MIN or size & 7 or size > self.arena_size - off or ITEM_HDR + vlen + klen > size:
                    return -2
                if (klen == <uint64_t>k.n and (it.types & 15) == k.ktype
                        and memcmp(ar + off + ITEM_HDR + vlen, k.p, klen) == 0):
                    out_off[0] = off
                    return pos
            pos += 1
            if pos == n:
                pos = 0
        return -1

    # -- locking and repair ----------------------------------------------------

    cdef int lock(self, uint32_t si) except -1:
        """Lock shard ``si``; repair it first if its last holder died."""
        cdef shm_shard_t *sh = self.shard(si)
        cdef int rc = pthread_mutex_trylock(&sh.lock.m)
        cdef int r
        if rc == EBUSY:
            # Waiting for another process: let this process's other threads run.
            self.inflight += 1
            with nogil:
                rc = pthread_mutex_lock(&sh.lock.m)
            self.inflight -= 1
        if rc == 0:
            return 0
        if rc == EOWNERDEAD:
            with nogil:
                r = self.repair(si)
            shm_mutex_consistent(&sh.lock.m)
            if r < 0:
                pthread_mutex_unlock(&sh.lock.m)
                raise CorruptTableError(
                    f"shard {si}: a writer died and the shard could not be repaired "
                    f"({'out of memory' if r == ST_NOMEM else 'corrupt arena or index'})")
            return 0
        if rc == ENOTRECOVERABLE:
            raise CorruptTableError(f"shard {si}: lock is not recoverable")
        raise OSError(rc, "pthread_mutex_lock: " + os.strerror(rc))

    cdef inline void unlock(self, uint32_t si) noexcept nogil:
        cdef CheckErr e
        if SHM_DEBUG:
            # Debug build: every critical section must leave the shard valid.
            self.check_locked(si, &e)
            if e.code:
                abort()
        pthread_mutex_unlock(&self.shard(si).lock.m)

    cdef int repair(self, uint32_t si) noexcept nogil:
        """Re-derive a shard after its lock holder died at any instant."""
        cdef shm_shard_t *sh = self.shard(si)
        cdef int r
        sh.n_repairs += 1
        if sh.flags & SHARD_REBUILDING:
            r = self.rebuild_index(si, 1)
        else:
            r = self.reconcile(si)
        if shm_load_rlx(&sh.seq) & 1:
            shm_seq_end(&sh.seq)
        return r

    cdef int walk_blocks(self, uint32_t si, uint64_t **out, size_t *nout) noexcept nogil:
        """Collect every block start below top (ascending).  -2 if the walk breaks."""
        cdef shm_shard_t *sh = self.shard(si)
        cdef char *ar = self.arena(si)
        cdef uint64_t top = sh.top
        cdef uint64_t pos = 0, size
        cdef size_t n = 0, cap = 256
        cdef uint64_t *arr = <uint64_t *>malloc(cap * 8)
        cdef uint64_t *na
        if arr == NULL:
            return ST_NOMEM
        if top > self.arena_size:
            free(arr)
            return ST_CORRUPT
        while pos < top:
            size = (<shm_item_t *>(ar + pos)).size
            if size < BLOCK_MIN or size & 7 or size > top - pos:
                free(arr)
                return ST_CORRUPT
            if n == cap:
                cap *= 2
                na = <uint64_t *>realloc(arr, cap * 8)
                if na == NULL:
                    free(arr)
                    return ST_NOMEM
                arr = na
            arr[n] = pos
            n += 1
            pos += size
        out[0] = arr
        nout[0] = n
        return 0

    cdef int reconcile(self, uint32_t si) noexcept nogil:
        """Index is the truth: free unreferenced blocks, recount, rebuild free lists."""
        cdef shm_shard_t *sh = self.shard(si)
        cdef char *ar = self.arena(si)
        cdef uint64_t *ix = self.idx(si)
        cdef uint64_t *blocks = NULL
        cdef size_t nb = 0, lo, mid
        cdef uint8_t *ref
        cdef uint32_t i
        cdef uint64_t v, off
        cdef shm_item_t *it
        cdef int r = self.walk_blocks(si, &blocks, &nb)
        if r < 0:
            return r
        ref = <uint8_t *>malloc(nb + 1)
        if ref == NULL:
            free(blocks)
            return ST_NOMEM
        memset(ref, 0, nb + 1)
        for i in range(self.slots):
            v = ix[i]
            off = v & SLOT_OFFMASK
            if off <= SLOT_TOMB:
                continue
            off -= 8
            lo = block_index(blocks, nb, off)
            if lo == nb or blocks[lo] != off or ref[lo]:
                # A slot that points nowhere sane cannot come from a crash (every
                # publish is one store of a complete item): the shard is corrupt.
                free(ref)
                free(blocks)
                return ST_CORRUPT
            ref[lo] = 1
        for mid in range(nb):
            it = <shm_item_t *>(ar + blocks[mid])
            if ref[mid]:
                if not (it.flags & BLOCK_USED):
                    shm_store_rlx(<uint64_t *>it, make_word0(it.size, it.klen, it.types, BLOCK_USED))
            elif it.flags & BLOCK_USED:
                # Allocated by the dead writer but never published, or unpublished
                # but not yet freed.
                shm_store_rlx(<uint64_t *>it, make_word0(it.size, 0, 0, 0))
        free(ref)
        free(blocks)
        r = self.coalesce(si)
        if r < 0:
            return r
        self.recount(si)
        return 0

    cdef void recount(self, uint32_t si) noexcept nogil:
        """Recompute the shard's derived counters from index and arena."""
        cdef shm_shard_t *sh = self.shard(si)
        cdef uint64_t *ix = self.idx(si)
        cdef char *ar = self.arena(si)
        cdef uint32_t i, count = 0, tombs = 0, nttl = 0, nowned = 0
        cdef uint64_t v, off, used = 0
        cdef shm_item_t *it
        for i in range(self.slots):
            v = ix[i]
            off = v & SLOT_OFFMASK
            if off == SLOT_TOMB:
                tombs += 1
            elif off > SLOT_TOMB:
                it = <shm_item_t *>(ar + off - 8)
                count += 1
                used += it.size
                if it.expires:
                    nttl += 1
                if it.owner:
                    nowned += 1
        sh.count = count
        sh.tombs = tombs
        sh.nttl = nttl
        sh.nowned = nowned
        sh.used = used

    cdef int coalesce(self, uint32_t si) noexcept nogil:
        """Merge neighbouring FREE blocks, give a free tail back to the bump
        pointer and rebuild every free list from the walk."""
        cdef shm_shard_t *sh = self.shard(si)
        cdef char *ar = self.arena(si)
        cdef uint64_t pos = 0, size, nsize, top = sh.top, b
        cdef shm_item_t *it
        cdef shm_item_t *nx
        if top > self.arena_size:
            return ST_CORRUPT
        sh.n_coalesces += 1
        sh.binmap = 0
        for b in range(SHMREG_NBINS):
            sh.bins[b] = NIL
        while pos < top:
            it = <shm_item_t *>(ar + pos)
            size = it.size
            if size < BLOCK_MIN or size & 7 or size > top - pos:
                return ST_CORRUPT
            if not (it.flags & BLOCK_USED):
                while pos + size < top:
                    nx = <shm_item_t *>(ar + pos + size)
                    nsize = nx.size
                    if nsize < BLOCK_MIN or nsize & 7 or nsize > top - pos - size:
                        return ST_CORRUPT
                    if nx.flags & BLOCK_USED:
                        break
                    size += nsize
                    # One store grows the block over its neighbour: atomic for a walker.
                    shm_store_rlx(<uint64_t *>it, make_word0(size, 0, 0, 0))
                    SHM_CRASH_POINT(CP_COALESCE_MERGED)
                if pos + size == top:
                    sh.top = pos
                    break
                b = bin_of(size)
                (<uint64_t *>(ar + pos + 8))[0] = sh.bins[b]
                sh.bins[b] = pos
                sh.binmap |= 1ULL << b
            pos += size
        return 0

    cdef int rebuild_index(self, uint32_t si, bint from_repair) noexcept nogil:
        """Rebuild the shard's index from the arena's USED blocks (drops tombstones).

        SHARD_REBUILDING is set for the duration: a writer killed midway leaves
        it set, and the repair then redoes the rebuild from the arena, which
        is complete and unchanged throughout.
        """
        cdef shm_shard_t *sh = self.shard(si)
        cdef char *ar = self.arena(si)
        cdef uint64_t *ix = self.idx(si)
        cdef uint64_t *blocks = NULL
        cdef size_t nb = 0, j, done = 0, nused = 0
        cdef uint32_t i, pos
        cdef uint64_t h, off
        cdef shm_item_t *it
        cdef int r = self.walk_blocks(si, &blocks, &nb)
        if r < 0:
            return r
        if not from_repair:
            # Park each slot's CLOCK bit in its item, so the rebuilt index
            # keeps what readers marked (a repair honours what was parked).
            for i in range(self.slots):
                off = ix[i] & SLOT_OFFMASK
                if (ix[i] & SLOT_CLOCK) and off > SLOT_TOMB and self.item_ok_in(ar, off - 8):
                    it = <shm_item_t *>(ar + off - 8)
                    shm_store_rlx(<uint64_t *>it, make_word0(it.size, it.klen, it.types, it.flags | BLOCK_REF))
            sh.flags |= SHARD_REBUILDING
            shm_fence_rel()
        for i in range(self.slots):
            shm_store_rlx(&ix[i], SLOT_EMPTY)
        SHM_CRASH_POINT(CP_REBUILD_CLEARED)
        for j in range(nb):
            if (<shm_item_t *>(ar + blocks[j])).flags & BLOCK_USED:
                nused += 1
        for j in range(nb):
            off = blocks[j]
            it = <shm_item_t *>(ar + off)
            if not (it.flags & BLOCK_USED):
                continue
            if ITEM_HDR + <uint64_t>it.vlen + it.klen > it.size:
                free(blocks)
                return ST_CORRUPT
            h = shm_hash(<const unsigned char *>(ar + off + ITEM_HDR + it.vlen), it.klen,
                         it.types & 15, self.seed0, self.seed1)
            if self.shard_of(h) != si:
                free(blocks)
                return ST_CORRUPT
            pos = <uint32_t>(((h & 0xffffffffULL) * self.slots) >> 32)
            for i in range(self.slots):
                if (ix[pos] & SLOT_OFFMASK) == SLOT_EMPTY:
                    break
                pos += 1
                if pos == self.slots:
                    pos = 0
            if (ix[pos] & SLOT_OFFMASK) != SLOT_EMPTY:
                free(blocks)
                return ST_CORRUPT
            if it.flags & BLOCK_REF:
                shm_store_rlx(&ix[pos], (h & SLOT_TAGMASK) | (off + 8) | SLOT_CLOCK)
                shm_store_rlx(<uint64_t *>it, make_word0(it.size, it.klen, it.types, BLOCK_USED))
            else:
                shm_store_rlx(&ix[pos], (h & SLOT_TAGMASK) | (off + 8))
            done += 1
            if done * 2 >= nused:
                SHM_CRASH_POINT(CP_REBUILD_HALF)
        free(blocks)
        sh.n_rebuilds += 1
        self.recount(si)
        shm_fence_rel()
        sh.flags &= ~(<uint64_t>SHARD_REBUILDING)
        if from_repair:
            return self.coalesce(si)
        return 0

    # -- allocator -------------------------------------------------------------

    cdef uint64_t alloc_block(self, uint32_t si, uint64_t need) noexcept nogil:
        """A USED block of at least ``need`` bytes (multiple of 8), or NIL."""
        cdef shm_shard_t *sh = self.shard(si)
        cdef char *ar = self.arena(si)
        cdef uint32_t b = bin_of(need), bb, steps
        cdef uint64_t cur, prev, nxt, size, rest
        cdef uint64_t pending = sh.binmap & (~0ULL << b)
        while pending:
            # Only bins that may hold blocks (binmap is a hint: a stale bit
            # costs one look at an empty list).
            bb = shm_ctz64(pending)
            pending &= pending - 1
            prev = NIL
            cur = sh.bins[bb]
            if cur == NIL:
                sh.binmap &= ~(1ULL << bb)
                continue
            steps = 0
            while cur != NIL and steps < 64:
                size = (<shm_item_t *>(ar + cur)).size if cur <= self.arena_size - BLOCK_MIN else 0
                if size < BLOCK_MIN or size & 7 or size > self.arena_size - cur or cur & 7:
                    # Damaged list (shared memory is untrusted): drop it; the
                    # next coalesce rebuilds every list from the arena walk.
                    if prev == NIL:
                        sh.bins[bb] = NIL
                    else:
                        (<uint64_t *>(ar + prev + 8))[0] = NIL
                    break
                nxt = (<uint64_t *>(ar + cur + 8))[0]
                if size >= need:
                    if prev == NIL:
                        sh.bins[bb] = nxt
                    else:
                        (<uint64_t *>(ar + prev + 8))[0] = nxt
                    rest = size - need
                    if rest >= BLOCK_MIN:
                        # Remainder header first, then shrink the head: a walker
                        # sees either the old big block or both, never garbage.
                        shm_store_rlx(<uint64_t *>(ar + cur + need), make_word0(rest, 0, 0, 0))
                        (<uint64_t *>(ar + cur + need + 8))[0] = sh.bins[bin_of(rest)]
                        sh.bins[bin_of(rest)] = cur + need
                        sh.binmap |= 1ULL << bin_of(rest)
                        SHM_CRASH_POINT(CP_ALLOC_SPLIT)
                        size = need
                    shm_store_rlx(<uint64_t *>(ar + cur), make_word0(size, 0, 0, BLOCK_USED))
                    sh.used += size
                    return cur
                if bb > b:
                    break
                prev = cur
                cur = nxt
                steps += 1
        if sh.top <= self.arena_size and need <= self.arena_size - sh.top:
            cur = sh.top
            shm_store_rlx(<uint64_t *>(ar + cur), make_word0(need, 0, 0, BLOCK_USED))
            shm_fence_rel()
            sh.top = cur + need
            sh.used += need
            return cur
        return NIL

    cdef void free_block(self, uint32_t si, uint64_t off) noexcept nogil:
        cdef shm_shard_t *sh = self.shard(si)
        cdef char *ar = self.arena(si)
        cdef uint64_t size = (<shm_item_t *>(ar + off)).size
        cdef uint32_t b
        if size < BLOCK_MIN or size & 7 or off > self.arena_size - BLOCK_MIN or size > self.arena_size - off:
            return    # corrupt header: leave it for check()/coalesce to report, never index bins[] with it
        shm_store_rlx(<uint64_t *>(ar + off), make_word0(size, 0, 0, 0))
        sh.used -= size
        if off + size == sh.top:
            sh.top = off
            return
        b = bin_of(size)
        (<uint64_t *>(ar + off + 8))[0] = sh.bins[b]
        sh.bins[b] = off
        sh.binmap |= 1ULL << b

    # -- owners ------------------------------------------------------------------

    cdef inline shm_proc_t *proc(self, uint32_t i) noexcept nogil:
        return <shm_proc_t *>(self.procs_base + <size_t>i * sizeof(shm_proc_t))

    cdef bint owner_alive(self, uint32_t owner) noexcept nogil:
        """Is the owner ``(slot + 1) | gen << 12`` of an entry alive?

        A process that owns entries itself holds its slot's robust mutex from
        a dedicated thread, so its death is one load of the mutex word (the
        kernel sets OWNER_DIED): no syscall on the read path.  An owner
        registered by pid from another process costs one poll() of a cached
        pidfd (or kill() + /proc where there is no pidfd).
        """
        cdef uint32_t slot
        cdef shm_proc_t *p
        if owner == 0:
            return True
        slot = (owner & 0xfff) - 1
        if slot >= <uint32_t>SHMREG_NPROCS:
            return False
        p = self.proc(slot)
        if shm_load32_rlx(&p.state) != PROC_LIVE or (shm_load32_rlx(&p.gen) & 0xFFFFF) != (owner >> 12):
            return False
        if p.kind == PROC_SELF and shm_have_alive_word():
            return shm_mutex_held_by_live(&p.alive.m) != 0
        return self.pid_alive(slot)

    cdef bint pid_alive(self, uint32_t slot) noexcept nogil:
        cdef shm_proc_t *p = self.proc(slot)
        cdef uint32_t gen = shm_load32_rlx(&p.gen)
        cdef long pid = <long>p.pid
        cdef uint64_t start = p.start_time, st = 0
        cdef int fd, z = 0, r
        if self.pidfds[slot] >= 0:
            if self.pidfd_gen[slot] == gen:
                return not shm_pidfd_exited(self.pidfds[slot])
            close(self.pidfds[slot])
            self.pidfds[slot] = -1
        if pid <= 0:
            return False
        fd = shm_pidfd_open(pid)
        if fd < 0:
            if errno == ESRCH:
                return False
            return shm_pid_alive(pid, start) != 0
        # The pidfd names whoever has the pid now: it is our owner only if the
        # start time still matches (checked after opening, so no reuse race).
        r = shm_proc_stat(pid, &st, &z)
        if r == 0 or (r == 1 and (z or st != start)):
            close(fd)
            return False
        self.pidfds[slot] = fd
        self.pidfd_gen[slot] = gen
        return not shm_pidfd_exited(fd)

    cdef int lock_procs(self) except -1:
        cdef pthread_mutex_t *m = &self.hdr.procs_lock.m
        cdef int rc = pthread_mutex_trylock(m)
        cdef uint32_t i
        if rc == EBUSY:
            self.inflight += 1
            with nogil:
                rc = pthread_mutex_lock(m)
            self.inflight -= 1
        if rc == EOWNERDEAD:
            # A claimant died mid-claim: its slot never became LIVE.
            for i in range(SHMREG_NPROCS):
                if self.proc(i).state == PROC_CLAIMING:
                    self.proc(i).state = PROC_FREE
            shm_mutex_consistent(m)
            rc = 0
        if rc:
            raise OSError(rc, "process table lock: " + os.strerror(rc))
        return 0

    def _claim(self, uint64_t pid, uint64_t start, bint own_process):
        """Claim a process slot for ``pid`` and return its owner id.

        ``own_process``: the caller itself, which then holds the slot's
        liveness mutex for life; else another process, checked by pid.
        An existing live slot of the same process is reused.
        """
        cdef uint32_t i, slot = 0xffffffff, gen, oid
        cdef shm_proc_t *p
        cdef int rc = 0
        self.check_open()
        self.lock_procs()
        try:
            for i in range(SHMREG_NPROCS):
                p = self.proc(i)
                oid = (i + 1) | ((p.gen & 0xFFFFF) << 12)
                if (p.state == PROC_LIVE and p.pid == pid and p.start_time == start
                        and (p.kind == PROC_SELF or not own_process) and self.owner_alive(oid)):
                    return oid
            for i in range(SHMREG_NPROCS):
                if self.proc(i).state == PROC_FREE:
                    slot = i
                    break
            else:
                # Recycle the slot of a dead process.  Bumping the generation
                # makes its leftover entries dead at once; sweeps purge them.
                for i in range(SHMREG_NPROCS):
                    p = self.proc(i)
                    if p.state == PROC_LIVE and not self.owner_alive((i + 1) | ((p.gen & 0xFFFFF) << 12)):
                        slot = i
                        break
            if slot == 0xffffffff:
                raise TableFullError(f"process table full: {SHMREG_NPROCS} live processes own entries")
            p = self.proc(slot)
            p.state = PROC_CLAIMING
            gen = (p.gen + 1) & 0xFFFFF
            p.gen = gen
            p.pid = pid
            p.start_time = start
            p.kind = PROC_SELF if own_process else PROC_FOREIGN
            if own_process:
                rc = shm_mutex_init(&p.alive.m)
                if rc == 0:
                    with nogil:
                        rc = shm_hold_forever(&p.alive.m)
                if rc:
                    p.state = PROC_FREE
                    raise OSError(rc, "cannot take the liveness lock: " + os.strerror(rc))
            shm_fence_rel()
            p.state = PROC_LIVE
            return (slot + 1) | (gen << 12)
        finally:
            pthread_mutex_unlock(&self.hdr.procs_lock.m)

    def _release(self, uint32_t owner):
        """Free the slot of ``owner`` if it is dead (after its entries were reaped)."""
        cdef uint32_t slot = (owner & 0xfff) - 1
        cdef shm_proc_t *p
        self.check_open()
        if slot >= <uint32_t>SHMREG_NPROCS:
            return False
        self.lock_procs()
        try:
            p = self.proc(slot)
            if p.state == PROC_LIVE and (p.gen & 0xFFFFF) == (owner >> 12) and not self.owner_alive(owner):
                p.state = PROC_FREE
                return True
            return False
        finally:
            pthread_mutex_unlock(&self.hdr.procs_lock.m)

    def _owner_alive(self, uint32_t owner):
        """Python view of ``owner_alive``."""
        self.check_open()
        return self.owner_alive(owner)

    def _proc_table(self):
        """Claimed slots: list of dicts (owner id, pid, start time, kind, alive)."""
        cdef uint32_t i, oid
        cdef shm_proc_t *p
        self.check_open()
        out = []
        for i in range(SHMREG_NPROCS):
            p = self.proc(i)
            if p.state != PROC_LIVE:
                continue
            oid = (i + 1) | ((p.gen & 0xFFFFF) << 12)
            out.append(dict(owner=oid, slot=i, pid=p.pid, start_time=p.start_time,
                            kind="self" if p.kind == PROC_SELF else "pid",
                            alive=self.owner_alive(oid)))
        return out

    def _owner_pid(self, uint32_t owner):
        """The pid behind owner id ``owner``, or None if its slot moved on."""
        cdef uint32_t slot = (owner & 0xfff) - 1
        cdef shm_proc_t *p
        self.check_open()
        if owner == 0 or slot >= <uint32_t>SHMREG_NPROCS:
            return None
        p = self.proc(slot)
        if p.state != PROC_LIVE or (p.gen & 0xFFFFF) != (owner >> 12):
            return None
        return p.pid

    def _reap(self, uint32_t owner, bint collect, bint delete=True):
        """Delete every entry owned by ``owner`` (0: every entry whose owner is
        dead).  Returns ``(count, records)``, records as ``(key, value,
        expires_ns, owner)`` when ``collect``.  With ``delete=False`` only
        collect them (the watcher's post-mortem, before the delete).  Locking
        each shard also repairs any write a dead owner left half done."""
        cdef uint32_t si, i
        cdef uint64_t v, off
        cdef uint64_t *ix
        cdef char *ar
        cdef shm_item_t *it
        cdef long n = 0
        cdef int st = 0
        cdef RecBuf b
        self.check_open()
        b.data = NULL
        b.len = b.cap = b.nrec = 0
        try:
            for si in range(self.nsh):
                if shm_load32_rlx(&self.shard(si).nowned) == 0:
                    continue
                self.lock(si)
                ix = self.idx(si)
                ar = self.arena(si)
                for i in range(self.slots):
                    v = ix[i]
                    off = v & SLOT_OFFMASK
                    if off <= SLOT_TOMB or not self.item_ok_in(ar, off - 8):
                        continue
                    off -= 8
                    it = <shm_item_t *>(ar + off)
                    if it.owner == 0 or (it.owner != owner if owner else self.owner_alive(it.owner)):
                        continue
                    if collect:
                        if recbuf_append(&b, it, it.klen, it.vlen, ar + off + ITEM_HDR, ar + off + ITEM_HDR + it.vlen) < 0:
                            st = ST_NOMEM
                    if delete:
                        self.unpublish(si, i, off)
                    n += 1
                self.unlock(si)
                if st == ST_NOMEM:
                    raise MemoryError()
            return n, (self.parse_records(&b, 4, None) if collect else None)
        finally:
            free(b.data)

    def _lease(self, long timeout_ms):
        """Try to become the active watcher: True once this thread holds the
        lease lock (kept until ``_unlease`` or death), False on timeout."""
        cdef int rc
        cdef pthread_mutex_t *m = &self.hdr.lease_lock.m
        self.check_open()
        self.inflight += 1
        with nogil:
            rc = shm_mutex_lock_timeout(m, timeout_ms)
        self.inflight -= 1
        if rc == EOWNERDEAD:
            shm_mutex_consistent(m)   # the previous watcher died: take over
            rc = 0
        if rc == ETIMEDOUT:
            return False
        if rc:
            raise OSError(rc, "watcher lease: " + os.strerror(rc))
        self.hdr.lease_gen += 1
        self.hdr.lease_pid = os.getpid()
        return True

    def _unlease(self):
        """Give the watcher lease up (the holding thread only)."""
        self.hdr.lease_pid = 0
        pthread_mutex_unlock(&self.hdr.lease_lock.m)

    def _lease_holder(self):
        """Pid of the active watcher, or None."""
        self.check_open()
        if shm_have_alive_word() and not shm_mutex_held_by_live(&self.hdr.lease_lock.m):
            return None
        return self.hdr.lease_pid or None

    # -- the write operation ---------------------------------------------------

    cdef long purge_shard(self, uint32_t si, uint64_t now, int64_t keep, bint dead_too) noexcept nogil:
        """Delete the expired (and with ``dead_too`` the dead-owned) entries of
        shard ``si``, never slot ``keep``; lock held.  Returns how many."""
        cdef shm_shard_t *sh = self.shard(si)
        cdef uint64_t *ix = self.idx(si)
        cdef char *ar = self.arena(si)
        cdef uint64_t v, off
        cdef uint32_t i
        cdef shm_item_t *it
        cdef long n = 0
        if sh.nttl == 0 and (sh.nowned == 0 or not dead_too):
            return 0
        for i in range(self.slots):
            v = ix[i]
            off = v & SLOT_OFFMASK
            if off <= SLOT_TOMB or <int64_t>i == keep or not self.item_ok_in(ar, off - 8):
                continue
            it = <shm_item_t *>(ar + off - 8)
            if (it.expires and it.expires <= now) or (dead_too and not self.owner_alive(it.owner)):
                self.unpublish(si, i, off - 8)
                sh.n_expired += 1
                n += 1
        return n

    cdef long reclaim(self, uint32_t si, uint64_t now, int64_t keep) noexcept nogil:
        """Room for a table that does not evict: delete the shard's expired
        entries, and only if there are none its dead owners' entries (a
        watcher's post-mortem then misses those; they were invisible
        already).  Never slot ``keep``.  Returns how many were deleted."""
        cdef long n = self.purge_shard(si, now, keep, False)
        if n == 0:
            n = self.purge_shard(si, now, keep, True)
        return n

    cdef int evict_one(self, uint32_t si, uint64_t now, int64_t keep) noexcept nogil:
        """Evict one entry of shard ``si`` by CLOCK (lock held), never slot
        ``keep``: an entry whose reference bit is set gets it cleared and a
        second chance.  1: a live entry was evicted, 0: an expired or
        dead-owned one, -1: nothing evictable."""
        cdef shm_shard_t *sh = self.shard(si)
        cdef uint64_t *ix = self.idx(si)
        cdef char *ar = self.arena(si)
        cdef uint64_t v, off, h
        cdef uint32_t step
        cdef shm_item_t *it
        for step in range(2 * self.slots + 1):
            h = sh.hand % self.slots
            sh.hand = h + 1
            v = ix[h]
            off = v & SLOT_OFFMASK
            if off <= SLOT_TOMB or <int64_t>h == keep or not self.item_ok_in(ar, off - 8):
                continue
            it = <shm_item_t *>(ar + off - 8)
            if (it.expires and it.expires <= now) or not self.owner_alive(it.owner):
                self.unpublish(si, h, off - 8)
                sh.n_expired += 1
                return 0
            if v & SLOT_CLOCK:
                # Clearing the bit changes nothing a reader can see: no seqlock.
                shm_store_rlx(&ix[h], v & ~SLOT_CLOCK)
                continue
            self.unpublish(si, h, off - 8)
            sh.n_evictions += 1
            return 1
        return -1

    cdef int put(self, uint32_t si, KeyRef *k, ValRef *v, uint64_t expires, uint32_t owner,
                 int mode, uint64_t now, ValRef *expect, RecBuf *old) noexcept nogil:
        """Store ``k`` -> ``v`` in shard ``si`` (lock held).

        mode PUT_SET: always store.  PUT_NEW: only if absent or expired (else
        copy the live item into ``old`` when given).  PUT_CAS: only if the
        stored raw value equals ``expect``.  With the PUT_EVICT flag, room is
        made by evicting (``self._last_evicted`` counts live victims) instead
        of returning ST_FULL.  Returns ST_OK, ST_NO, ST_FULL, ST_CORRUPT or
        ST_NOMEM.
        """
        cdef shm_shard_t *sh = self.shard(si)
        cdef char *ar = self.arena(si)
        cdef uint64_t *ix = self.idx(si)
        cdef uint64_t off = 0, noff, need, oldv
        cdef int64_t pos, ins
        cdef shm_item_t *it
        cdef shm_item_t *ot = NULL
        cdef bint live
        cdef int r
        cdef bint evict = (mode & PUT_EVICT) != 0
        cdef int tries = 0
        cdef long reclaimed
        mode &= 3
        SHM_CRASH_POINT(CP_SET_LOCKED)
        pos = self.find(si, k, &off, &ins)
        if pos == -2:
            return ST_CORRUPT
        if pos >= 0:
            ot = <shm_item_t *>(ar + off)
            live = (ot.expires == 0 or ot.expires > now) and self.owner_alive(ot.owner)
            if mode == PUT_NEW and live:
                if old != NULL and recbuf_append(old, ot, ot.klen, ot.vlen, ar + off + ITEM_HDR,
                                                 ar + off + ITEM_HDR + ot.vlen) < 0:
                    return ST_NOMEM
                return ST_NO
            if mode == PUT_CAS:
                if not live or (ot.types >> 4) != expect.vtype or ot.vlen != <uint64_t>expect.n \
                        or memcmp(ar + off + ITEM_HDR, expect.p, expect.n) != 0:
                    return ST_NO
                # A swap replaces the value only: the entry keeps its expiry and owner.
                expires = ot.expires
                owner = ot.owner
        elif mode == PUT_CAS:
            return ST_NO
        elif ins < 0 or ((ix[ins] & SLOT_OFFMASK) == SLOT_EMPTY and sh.count + sh.tombs >= self.max_fill):
            # (Reusing a tombstone never raises count + tombs: no rebuild needed.)
            if sh.tombs == 0 or sh.count >= self.max_fill:
                if not evict:
                    # Not full while expired (or dead-owned) entries take the room.
                    if self.reclaim(si, now, -1) == 0:
                        sh.n_full += 1
                        return ST_FULL
                else:
                    self.purge_shard(si, now, -1, True)
                    # Evict a little headroom (1/32 of the shard) at once: the
                    # index rebuild that follows then happens once per headroom
                    # inserts, not on every insert at capacity.
                    while sh.count > self.max_fill - max(1, self.max_fill // 32):
                        r = self.evict_one(si, now, -1)
                        if r < 0:
                            sh.n_full += 1
                            return ST_FULL
                        self._last_evicted += r
            if sh.count + sh.tombs >= self.max_fill:
                # Tombstones use up the probe budget: rebuild the index without them.
                shm_seq_begin(&sh.seq)
                r = self.rebuild_index(si, 0)
                shm_seq_end(&sh.seq)
                if r < 0:
                    return r
            pos = self.find(si, k, &off, &ins)
            if pos != -1 or ins < 0:
                return ST_CORRUPT
        need = _align8(ITEM_HDR + <uint64_t>v.n + k.n)
        if need < BLOCK_MIN:
            need = BLOCK_MIN
        noff = self.alloc_block(si, need)
        if noff == NIL:
            if self.coalesce(si) < 0:
                return ST_CORRUPT
            noff = self.alloc_block(si, need)
        if noff == NIL:
            # No room: expired (then dead-owned) entries go first, then a cache
            # evicts by CLOCK; never the entry being replaced (it stays until
            # the new one is published).
            reclaimed = self.purge_shard(si, now, pos, True) if evict else self.reclaim(si, now, pos)
            if reclaimed > 0:
                if self.coalesce(si) < 0:
                    return ST_CORRUPT
                noff = self.alloc_block(si, need)
            while noff == NIL and evict:
                r = self.evict_one(si, now, pos)
                if r < 0:
                    break
                reclaimed += 1
                self._last_evicted += r
                noff = self.alloc_block(si, need)
                tries += 1
                if noff == NIL and tries % 8 == 0:
                    if self.coalesce(si) < 0:
                        return ST_CORRUPT
                    noff = self.alloc_block(si, need)
            if noff == NIL and reclaimed > 0:
                if self.coalesce(si) < 0:
                    return ST_CORRUPT
                noff = self.alloc_block(si, need)
            if reclaimed > 0 and pos < 0:
                # Deletions emptied slots: the insert slot found before may now
                # lie beyond an EMPTY one, out of the key's probe chain.
                pos = self.find(si, k, &off, &ins)
                if pos != -1 or ins < 0:
                    if noff != NIL:
                        self.free_block(si, noff)
                    return ST_CORRUPT
        if noff == NIL:
            sh.n_full += 1
            return ST_FULL
        SHM_CRASH_POINT(CP_SET_ALLOCATED)
        it = <shm_item_t *>(ar + noff)
        memcpy(ar + noff + ITEM_HDR, v.p, v.n)
        memcpy(ar + noff + ITEM_HDR + v.n, k.p, k.n)
        it.vlen = <uint32_t>v.n
        it.owner = owner
        it.expires = expires
        shm_store_rlx(<uint64_t *>it, make_word0(it.size, <uint64_t>k.n,
                                                  <uint64_t>(k.ktype | (v.vtype << 4)), BLOCK_USED))
        SHM_CRASH_POINT(CP_SET_WRITTEN)
        # Publish: one 8-byte store is the commit point of the write.
        shm_seq_begin(&sh.seq)
        if pos >= 0:
            oldv = ix[pos]
            shm_store_rlx(&ix[pos], (k.h & SLOT_TAGMASK) | (noff + 8))
        else:
            if (ix[ins] & SLOT_OFFMASK) == SLOT_TOMB:
                sh.tombs -= 1
            shm_store_rlx(&ix[ins], (k.h & SLOT_TAGMASK) | (noff + 8))
            sh.count += 1
        SHM_CRASH_POINT(CP_SET_PUBLISHED)
        shm_seq_end(&sh.seq)
        if expires:
            sh.nttl += 1
        if owner:
            sh.nowned += 1
        if pos >= 0:
            if ot.expires:
                sh.nttl -= 1
            if ot.owner:
                sh.nowned -= 1
            self.free_block(si, off)
            SHM_CRASH_POINT(CP_SET_FREED)
        sh.n_sets += 1
        return ST_OK

    cdef void unpublish(self, uint32_t si, int64_t pos, uint64_t off) noexcept nogil:
        """Delete the entry at slot ``pos`` (item at ``off``); lock held."""
        cdef shm_shard_t *sh = self.shard(si)
        cdef uint64_t *ix = self.idx(si)
        cdef shm_item_t *it = <shm_item_t *>(self.arena(si) + off)
        cdef uint32_t nxt = <uint32_t>pos + 1
        if nxt == self.slots:
            nxt = 0
        shm_seq_begin(&sh.seq)
        if (ix[nxt] & SLOT_OFFMASK) == SLOT_EMPTY:
            # No probe chain runs through this slot: it can become empty again.
            shm_store_rlx(&ix[pos], SLOT_EMPTY)
        else:
            shm_store_rlx(&ix[pos], SLOT_TOMB)
            sh.tombs += 1
        sh.count -= 1
        SHM_CRASH_POINT(CP_DEL_UNPUBLISHED)
        shm_seq_end(&sh.seq)
        if it.expires:
            sh.nttl -= 1
        if it.owner:
            sh.nowned -= 1
        self.free_block(si, off)
        sh.n_dels += 1
        SHM_CRASH_POINT(CP_DEL_FREED)

    # -- Python-facing primitives ------------------------------------------------

    cdef object raise_status(self, int st, uint32_t si, KeyRef *k, ValRef *v):
        if st == ST_FULL:
            need = _align8(ITEM_HDR + <uint64_t>v.n + k.n)
            if need > self.arena_size:
                raise ValueTooLargeError(
                    f"item of {need} bytes can never fit: a shard holds {self.arena_size} bytes "
                    f"(create the table with more memory)")
            raise TableFullError(
                f"table is full (shard {si}: {self.shard(si).count} entries, "
                f"{self.shard(si).used} of {self.arena_size} bytes used)")
        if st == ST_CORRUPT:
            raise CorruptTableError(f"shard {si}: index or arena is corrupt (run check())")
        if st == ST_NOMEM:
            raise MemoryError()
        raise AssertionError(f"unexpected status {st}")

    cdef int store(self, object key, object value, object ttl, int mode, ValRef *expect,
                   RecBuf *old, uint32_t owner=0) except -2:
        cdef KeyRef k
        cdef ValRef v
        self.check_open()
        kkeep = self.key_ref(key, &k)
        vkeep = encode_value(value, &v)
        if v.n > 0xFFFFFFFF or _align8(ITEM_HDR + <uint64_t>v.n + k.n) > self.arena_size:
            raise ValueTooLargeError(
                f"value of {v.n} bytes can never fit: a shard holds {self.arena_size} bytes "
                f"(create the table with more memory)")
        cdef uint64_t now = self.now()
        cdef uint64_t exp = self.expires_at(ttl, now)
        cdef uint32_t si = self.shard_of(k.h)
        cdef int st
        self._last_evicted = 0
        self.lock(si)
        st = self.put(si, &k, &v, exp, owner, mode, now, expect, old)
        self.unlock(si)
        if st < 0:
            self.raise_status(st, si, &k, &v)
        return st

    def __setitem__(self, key, value):
        self.store(key, value, None, PUT_SET, NULL, NULL)

    def set(self, key, value, *, ttl=None, owned=False):
        """Store ``value`` under ``key``, replacing any previous value.

        :param ttl: seconds until the entry expires (``None``: never).
        :param owned: tie the entry to this process: it vanishes when the
            process dies, however it dies.
        :raises TableFullError: no room left.
        :raises ValueTooLargeError: the item can never fit.

        >>> t.set("answer", 42, ttl=60.0)
        >>> t["answer"]
        42
        """
        self.store(key, value, ttl, PUT_SET, NULL, NULL, self._self_owner() if owned else 0)

    def insert_new(self, key, value, *, ttl=None, owned=False):
        """Store ``value`` only if ``key`` is absent (or expired); ETS ``insert_new``.

        Exactly one of any number of concurrent callers, in any process, gets
        ``True``.

        >>> t.insert_new("lock:job-7", "worker-3")
        True
        >>> t.insert_new("lock:job-7", "worker-4")
        False
        """
        return self.store(key, value, ttl, PUT_NEW, NULL, NULL,
                          self._self_owner() if owned else 0) == ST_OK

    def _insert_new_for(self, key, value, uint32_t owner):
        """``insert_new`` owned by owner id ``owner`` (see ``_claim``)."""
        return self.store(key, value, None, PUT_NEW, NULL, NULL, owner) == ST_OK

    def _self_owner(self):
        """This process's owner id in this table, claiming a slot on first use."""
        if self._self_owner_id == 0:
            from shmreg._proc import start_time
            pid = os.getpid()
            self._self_owner_id = self._claim(pid, start_time(pid) or 0, True)
        return self._self_owner_id

    def setdefault(self, key, default=None):
        """Return the value of ``key``; insert ``default`` first if it is absent (atomic)."""
        cdef RecBuf old
        old.data = NULL
        old.len = old.cap = old.nrec = 0
        try:
            if self.store(key, default, None, PUT_NEW, NULL, &old) == ST_OK:
                return default
            return self.parse_records(&old, 2, None)[0]
        finally:
            free(old.data)

    def _cache_put(self, key, value, ttl, bint only_new, bint evict):
        """Store for the cache layer: ``(stored, live entries evicted)``."""
        st = self.store(key, value, ttl, (PUT_NEW if only_new else PUT_SET) | (PUT_EVICT if evict else 0),
                        NULL, NULL)
        return st == ST_OK, self._last_evicted

    def _get_raw(self, key):
        """``(value type, encoded value bytes)`` of ``key``, or None if absent."""
        return self.lookup(key, None, 3)

    def _cas_raw(self, key, int vtype, bytes raw, new):
        """Replace the value of ``key`` with ``new`` if its stored encoding is
        still exactly ``(vtype, raw)`` as read by ``_get_raw``."""
        cdef ValRef e
        e.vtype = vtype
        e.p = PyBytes_AS_STRING(raw)
        e.n = PyBytes_GET_SIZE(raw)
        return self.store(key, new, None, PUT_CAS, &e, NULL) == ST_OK

    cdef object lookup(self, object key, object default, int want):
        """Lock-free read.  ``want``: 0 value, 1 membership, 2 remaining ttl (ns,
        -1 none), 3 raw ``(vtype, bytes)``, 4 ``(value, owner id)``."""
        cdef KeyRef k
        cdef uint64_t off = 0, s1, exp = 0
        cdef uint32_t own = 0
        cdef int64_t pos, ins
        cdef int attempt, vtype = 0
        cdef uint32_t vlen
        cdef shm_item_t *it
        cdef long long iv
        cdef double dv
        cdef object val
        self.check_open()
        kkeep = self.key_ref(key, &k)
        cdef uint32_t si = self.shard_of(k.h)
        cdef shm_shard_t *sh = self.shard(si)
        cdef char *ar = self.arena(si)
        for attempt in range(READ_RETRIES):
            s1 = shm_load_acq(&sh.seq)
            if s1 & 1:
                if attempt > 8:
                    sched_yield()
                else:
                    shm_cpu_relax()
                continue
            pos = self.find(si, &k, &off, &ins)
            val = None
            if pos >= 0:
                it = <shm_item_t *>(ar + off)
                exp = it.expires
                own = it.owner
                vtype = it.types >> 4
                vlen = it.vlen
                if <uint64_t>vlen > self.arena_size - ITEM_HDR - off:
                    # Changed under us since find() checked it: torn, the seq
                    # check below sends us round again.
                    vlen = 0
                    vtype = 0
                if want == 3:
                    val = PyBytes_FromStringAndSize(ar + off + ITEM_HDR, vlen)
                elif want == 0 or want == 4 or want == 5:
                    if vtype == VT_INT:
                        if vlen == 8:
                            memcpy(&iv, ar + off + ITEM_HDR, 8)
                            val = PyLong_FromLongLong(iv)
                    elif vtype == VT_BYTES or vtype == VT_PICKLE:
                        val = PyBytes_FromStringAndSize(ar + off + ITEM_HDR, vlen)
                    elif vtype == VT_STR:
                        try:
                            val = PyUnicode_DecodeUTF8(ar + off + ITEM_HDR, vlen, NULL)
                        except UnicodeDecodeError:
                            val = None
                            vtype = 0  # torn: the seq check decides
                    elif vtype == VT_FLOAT:
                        if vlen == 8:
                            memcpy(&dv, ar + off + ITEM_HDR, 8)
                            val = PyFloat_FromDouble(dv)
                    elif vtype == VT_BOOL:
                        if vlen == 1:
                            val = (ar + off + ITEM_HDR)[0] != 0
                    elif vtype == VT_NONE:
                        pass
                    else:
                        vtype = 0
            shm_fence_acq()
            if shm_load_rlx(&sh.seq) != s1:
                self._read_retries += 1
                continue
            if pos == -2 or (pos >= 0 and want != 1 and want != 2 and vtype == 0):
                break   # stable but implausible: let the locked path decide
            if pos < 0 or (exp != 0 and want != 5 and exp <= self.now()) or (own != 0 and not self.owner_alive(own)):
                return self.miss(sh, key, default, want)
            self._hits += 1
            if (self._hits & 63) == 0:
                shm_add_rlx(&sh.sampled_hits, 64)
            self.last_owner = own
            if self.mark_clock:
                # The one store a reader may make: the CLOCK reference bit,
                # only when clear (so a hot entry costs one store, ever).
                if not (shm_load_rlx(&self.idx(si)[pos]) & SLOT_CLOCK):
                    shm_or_rlx(&self.idx(si)[pos], SLOT_CLOCK)
            if want == 1:
                return True
            if want == 2:
                return -1 if exp == 0 else <int64_t>(exp - self.now())
            if want == 3:
                return (vtype, val)
            if vtype == VT_PICKLE:
                val = unpickle(val) if self.allow_pickle else PickledValue(val)
            if want == 4:
                return (val, own)
            if want == 5:
                return (val, exp)
            return val
        return self.lookup_locked(si, &k, key, default, want)

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

    cdef object lookup_locked(self, uint32_t si, KeyRef *k, object key, object default, int want):
        """The fallback read: under the shard lock, copied out, decoded after unlock."""
        cdef uint64_t off = 0, now = self.now()
        cdef int64_t pos, ins
        cdef shm_item_t *it
        cdef char *ar = self.arena(si)
        cdef int st = 0
        cdef RecBuf rb
        rb.data = NULL
        rb.len = rb.cap = rb.nrec = 0
        self._lock_fallbacks += 1
        try:
            return self.lookup_locked_into(si, k, key, default, want, now, &rb)
        finally:
            free(rb.data)

    cdef object lookup_locked_into(self, uint32_t si, KeyRef *k, object key, object default,
                                   int want, uint64_t now, RecBuf *rb):
        cdef uint64_t off = 0
        cdef int64_t pos, ins
        cdef shm_item_t *it
        cdef char *ar = self.arena(si)
        cdef int st = 0
        self.lock(si)
        pos = self.find(si, k, &off, &ins)
        if pos >= 0:
            it = <shm_item_t *>(ar + off)
            if (it.expires and it.expires <= now and want != 5) or not self.owner_alive(it.owner):
                pos = -1
            elif recbuf_append(rb, it, it.klen, it.vlen, ar + off + ITEM_HDR, ar + off + ITEM_HDR + it.vlen) < 0:
                st = ST_NOMEM
        self.unlock(si)
        if pos == -2:
            raise CorruptTableError(f"shard {si}: index points outside the arena (run check())")
        if st == ST_NOMEM:
            raise MemoryError()
        if pos < 0:
            return self.miss(self.shard(si), key, default, want)
        self._hits += 1
        memcpy(&self.last_owner, rb.data + 12, 4)
        if want == 1:
            return True
        cdef uint64_t exp
        cdef uint32_t klen, vlen
        if want == 3:
            memcpy(&klen, rb.data, 4)
            memcpy(&vlen, rb.data + 4, 4)
            return (<uint8_t>rb.data[9], PyBytes_FromStringAndSize(rb.data + REC_HDR + klen, vlen))
        memcpy(&exp, rb.data + 16, 8)
        if want == 2:
            return -1 if exp == 0 else <int64_t>(exp - now)
        if want == 4 or want == 5:
            rec = self.parse_records(rb, 4, None)[0]
            return (rec[1], rec[3]) if want == 4 else (rec[1], rec[2])
        return self.parse_records(rb, 2, None)[0]

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
        cdef uint32_t slot = (own & 0xfff) - 1
        if own == 0 or slot >= <uint32_t>SHMREG_NPROCS:
            return None
        if self.pid_obj_owner[slot] != own:
            self.pid_objs[slot] = self.proc(slot).pid
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

    cdef int remove(self, object key, RecBuf *out, uint32_t only_owner=0) except -2:
        """Delete ``key``; copy its item into ``out`` if given.  1 deleted, 0 absent."""
        cdef KeyRef k
        cdef uint64_t off = 0
        cdef int64_t pos, ins
        cdef int st = ST_NO
        cdef shm_item_t *it
        self.check_open()
        kkeep = self.key_ref(key, &k)
        cdef uint32_t si = self.shard_of(k.h)
        cdef char *ar = self.arena(si)
        cdef uint64_t now = self.now()
        self.lock(si)
        pos = self.find(si, &k, &off, &ins)
        if pos >= 0:
            it = <shm_item_t *>(ar + off)
            st = ST_OK
            if only_owner and it.owner != only_owner:
                st = ST_NOMATCH
            elif (it.expires and it.expires <= now) or not self.owner_alive(it.owner):
                st = ST_NO      # expired or owner dead: gone for the caller, purge it anyway
                self.shard(si).n_expired += 1
            elif out != NULL and recbuf_append(out, it, it.klen, it.vlen, ar + off + ITEM_HDR, ar + off + ITEM_HDR + it.vlen) < 0:
                st = ST_NOMEM
            if st != ST_NOMEM and st != ST_NOMATCH:
                self.unpublish(si, pos, off)
        self.unlock(si)
        if pos == -2:
            raise CorruptTableError(f"shard {si}: index points outside the arena (run check())")
        if st == ST_NOMEM:
            raise MemoryError()
        return st

    def _delete_owned(self, key, uint32_t owner):
        """Delete ``key`` only if owner id ``owner`` holds it; True if deleted."""
        return self.remove(key, NULL, owner) == ST_OK

    def __delitem__(self, key):
        if self.remove(key, NULL) != ST_OK:
            raise KeyError(key)

    def delete(self, key):
        """Delete ``key``; return True if it was present (no KeyError)."""
        return self.remove(key, NULL) == ST_OK

    def take(self, key, default=_MISSING):
        """Atomically look up and delete ``key`` (ETS ``take``); KeyError if absent
        and no ``default`` is given."""
        cdef RecBuf out
        out.data = NULL
        out.len = out.cap = out.nrec = 0
        try:
            if self.remove(key, &out) == ST_OK:
                return self.parse_records(&out, 2, None)[0]
        finally:
            free(out.data)
        if default is _MISSING:
            raise KeyError(key)
        return default

    def update_counter(self, key, incr=1, *, default=0, ttl=None):
        """Atomically add ``incr`` to the int stored under ``key`` and return the
        new value; an absent (or expired) key starts from ``default``.

        Exact under any number of processes.  ``ttl`` applies when the entry is
        created.  :raises TypeError: the stored value is not an int.
        :raises OverflowError: the result does not fit in 64 bits.

        >>> t.update_counter("hits")
        1
        >>> t.update_counter("hits", 10)
        11
        """
        cdef KeyRef k
        cdef ValRef v
        cdef long long inc, dflt, cur, res
        cdef uint64_t off = 0, now, exp
        cdef int64_t pos, ins
        cdef shm_item_t *it
        cdef shm_shard_t *sh
        cdef char *ar
        cdef int st
        if type(incr) is not int and not isinstance(incr, int) or isinstance(incr, bool):
            raise TypeError(f"incr must be an int, not {type(incr).__name__}")
        if type(default) is not int and not isinstance(default, int) or isinstance(default, bool):
            raise TypeError(f"default must be an int, not {type(default).__name__}")
        inc = incr
        dflt = default
        self.check_open()
        kkeep = self.key_ref(key, &k)
        cdef uint32_t si = self.shard_of(k.h)
        sh = self.shard(si)
        ar = self.arena(si)
        now = self.now()
        exp = self.expires_at(ttl, now)
        self.lock(si)
        pos = self.find(si, &k, &off, &ins)
        st = ST_OK
        if pos == -2:
            st = ST_CORRUPT
        elif pos >= 0 and ((<shm_item_t *>(ar + off)).expires == 0 or (<shm_item_t *>(ar + off)).expires > now) \
                and self.owner_alive((<shm_item_t *>(ar + off)).owner):
            it = <shm_item_t *>(ar + off)
            if (it.types >> 4) != VT_INT or it.vlen != 8:
                st = ST_NOTINT
            else:
                memcpy(&cur, ar + off + ITEM_HDR, 8)
                if shm_add_overflow(cur, inc, &res):
                    st = ST_OVERFLOW
                else:
                    # In place: one aligned 8-byte store, inside the seqlock window.
                    shm_seq_begin(&sh.seq)
                    shm_store_rlx(<uint64_t *>(ar + off + ITEM_HDR), <uint64_t>res)
                    SHM_CRASH_POINT(CP_COUNTER_STORED)
                    shm_seq_end(&sh.seq)
                    sh.n_sets += 1
        else:
            if shm_add_overflow(dflt, inc, &res):
                st = ST_OVERFLOW
            else:
                memcpy(v.buf, &res, 8)
                v.p = v.buf
                v.n = 8
                v.vtype = VT_INT
                st = self.put(si, &k, &v, exp, 0, PUT_SET, now, NULL, NULL)
        self.unlock(si)
        if st == ST_NOTINT:
            raise TypeError(f"value of {key!r} is not an int")
        if st == ST_OVERFLOW:
            raise OverflowError("counter result does not fit in 64 bits")
        if st < 0:
            v.n = 8
            self.raise_status(st, si, &k, &v)
        return res

    def expire(self, key, ttl):
        """Give ``key`` a new ``ttl`` in seconds (``None``: never expire).
        Returns False if the key is absent or already expired."""
        cdef KeyRef k
        cdef uint64_t off = 0, now, exp
        cdef int64_t pos, ins
        cdef shm_item_t *it
        cdef shm_shard_t *sh
        cdef bint done = False
        self.check_open()
        kkeep = self.key_ref(key, &k)
        cdef uint32_t si = self.shard_of(k.h)
        sh = self.shard(si)
        now = self.now()
        exp = self.expires_at(ttl, now)
        self.lock(si)
        pos = self.find(si, &k, &off, &ins)
        if pos >= 0:
            it = <shm_item_t *>(self.arena(si) + off)
            if (it.expires == 0 or it.expires > now) and self.owner_alive(it.owner):
                if it.expires and not exp:
                    sh.nttl -= 1
                elif exp and not it.expires:
                    sh.nttl += 1
                shm_seq_begin(&sh.seq)
                shm_store_rlx(&it.expires, exp)
                shm_seq_end(&sh.seq)
                done = True
        self.unlock(si)
        if pos == -2:
            raise CorruptTableError(f"shard {si}: index points outside the arena (run check())")
        return done

    def purge_expired(self):
        """Delete every expired entry now; return how many were deleted."""
        cdef uint32_t si
        cdef uint64_t now
        cdef long n = 0
        self.check_open()
        now = self.now()
        for si in range(self.nsh):
            if self.shard(si).nttl == 0:
                continue
            self.lock(si)
            n += self.purge_shard(si, now, -1, False)
            self.unlock(si)
        return n

    def clear(self):
        """Delete every entry (shard by shard; not one atomic step)."""
        cdef uint32_t si, i, b
        cdef shm_shard_t *sh
        cdef uint64_t *ix
        self.check_open()
        for si in range(self.nsh):
            sh = self.shard(si)
            self.lock(si)
            ix = self.idx(si)
            shm_seq_begin(&sh.seq)
            # Index first (slot by slot, each store atomic), then the arena:
            # a crash in between leaves unreferenced blocks, which repair frees.
            for i in range(self.slots):
                shm_store_rlx(&ix[i], SLOT_EMPTY)
                if i == self.slots // 2:
                    SHM_CRASH_POINT(CP_CLEAR_HALF)
            shm_seq_end(&sh.seq)
            sh.top = 0
            sh.binmap = 0
            for b in range(SHMREG_NBINS):
                sh.bins[b] = NIL
            sh.count = sh.tombs = sh.nttl = sh.nowned = 0
            sh.used = 0
            self.unlock(si)

    # -- snapshots (iteration) -------------------------------------------------

    cdef int snap(self, uint32_t si, uint64_t now, RecBuf *b, KeyRef *prefix,
                  bint count_only, size_t *count) noexcept nogil:
        """Copy the live entries of shard ``si`` into ``b``.  ST_OK, or
        ST_CORRUPT (implausible data: torn when lock-free), ST_NOMEM."""
        cdef uint64_t *ix = self.idx(si)
        cdef char *ar = self.arena(si)
        cdef uint64_t v, off, size, vlen, klen, exp
        cdef uint32_t i
        cdef shm_item_t *it
        count[0] = 0
        for i in range(self.slots):
            v = shm_load_rlx(&ix[i])
            off = v & SLOT_OFFMASK
            if off <= SLOT_TOMB:
                continue
            off -= 8
            if off & 7 or off > self.arena_size - BLOCK_MIN:
                return ST_CORRUPT
            it = <shm_item_t *>(ar + off)
            size = it.size
            vlen = it.vlen
            klen = it.klen
            exp = it.expires
            if size < BLOCK_MIN or size & 7 or size > self.arena_size - off or ITEM_HDR + vlen + klen > size:
                return ST_CORRUPT
            if exp and exp <= now:
                continue
            if it.owner and not self.owner_alive(it.owner):
                continue
            if prefix != NULL:
                if (it.types & 15) != prefix.ktype or klen < <uint64_t>prefix.n or \
                        memcmp(ar + off + ITEM_HDR + vlen, prefix.p, prefix.n) != 0:
                    continue
            count[0] += 1
            if not count_only and recbuf_append(b, it, <uint32_t>klen, <uint32_t>vlen, ar + off + ITEM_HDR,
                                                ar + off + ITEM_HDR + vlen) < 0:
                return ST_NOMEM
        return ST_OK

    cdef int snap_shard(self, uint32_t si, uint64_t now, RecBuf *b, KeyRef *prefix,
                        bint count_only, size_t *count) except -2:
        """Seqlock snapshot of one shard with bounded retries, then the lock."""
        cdef shm_shard_t *sh = self.shard(si)
        cdef uint64_t s1
        cdef size_t start_len = b.len, start_n = b.nrec
        cdef int attempt, st = ST_CORRUPT
        for attempt in range(SNAP_RETRIES):
            s1 = shm_load_acq(&sh.seq)
            if s1 & 1:
                sched_yield()
                continue
            # (With the GIL: owner checks use this process's pidfd cache.)
            st = self.snap(si, now, b, prefix, count_only, count)
            shm_fence_acq()
            if shm_load_rlx(&sh.seq) == s1 and st != ST_CORRUPT:
                break
            b.len = start_len
            b.nrec = start_n
            st = ST_CORRUPT
        else:
            self._lock_fallbacks += 1
            self.lock(si)
            st = self.snap(si, now, b, prefix, count_only, count)
            self.unlock(si)
        if st == ST_NOMEM:
            raise MemoryError()
        if st == ST_CORRUPT:
            raise CorruptTableError(f"shard {si}: index points outside the arena (run check())")
        return 0

    cdef list parse_records(self, RecBuf *b, int what, object _unused):
        """Decode records: what 0 keys, 1 values, 2 values (single), 3 (key, value),
        4 (key, value, expires_ns, owner)."""
        cdef list out = []
        cdef size_t pos = 0
        cdef uint32_t klen, vlen, owner
        cdef uint64_t exp
        cdef unsigned ktype
        cdef int vtype
        cdef char *r
        while pos < b.len:
            r = b.data + pos
            memcpy(&klen, r, 4)
            memcpy(&vlen, r + 4, 4)
            ktype = <uint8_t>r[8]
            vtype = <uint8_t>r[9]
            if what == 0:
                out.append(decode_key(ktype, r + REC_HDR, klen))
            elif what == 1 or what == 2:
                out.append(decode_value(vtype, r + REC_HDR + klen, vlen, self.allow_pickle))
            elif what == 3:
                out.append((decode_key(ktype, r + REC_HDR, klen),
                            decode_value(vtype, r + REC_HDR + klen, vlen, self.allow_pickle)))
            else:
                memcpy(&owner, r + 12, 4)
                memcpy(&exp, r + 16, 8)
                out.append((decode_key(ktype, r + REC_HDR, klen),
                            decode_value(vtype, r + REC_HDR + klen, vlen, self.allow_pickle), exp, owner))
            pos += REC_HDR + _align8(<uint64_t>klen + vlen)
        return out

    def _shard_entries(self, uint32_t si, int what, prefix=None):
        """Live entries of one shard as a list (see ``parse_records`` for ``what``)."""
        cdef RecBuf b
        cdef KeyRef pk
        cdef KeyRef *pp = NULL
        cdef size_t count
        self.check_open()
        if si >= self.nsh:
            raise IndexError(si)
        if prefix is not None:
            pkeep = encode_key(prefix, &pk)
            pp = &pk
        b.data = NULL
        b.len = b.cap = b.nrec = 0
        try:
            self.snap_shard(si, self.now(), &b, pp, False, &count)
            return self.parse_records(&b, what, None)
        finally:
            free(b.data)

    def __len__(self):
        """Number of live entries (expired ones and those of dead owners not counted)."""
        cdef uint32_t si
        cdef size_t total = 0, c
        cdef shm_shard_t *sh
        cdef RecBuf b
        cdef uint64_t now = 0
        self.check_open()
        b.data = NULL
        b.len = b.cap = b.nrec = 0
        for si in range(self.nsh):
            sh = self.shard(si)
            if shm_load32_rlx(&sh.nttl) == 0 and shm_load32_rlx(&sh.nowned) == 0:
                total += shm_load32_rlx(&sh.count)
            else:
                if now == 0:
                    now = self.now()
                self.snap_shard(si, now, &b, NULL, True, &c)
                total += c
        return total

    @property
    def nshards(self):
        """Number of shards (each has its own lock, seqlock, index and arena)."""
        return self.nsh

    # -- introspection ---------------------------------------------------------

    def _header(self):
        """The segment header as a dict (geometry, seeds excluded)."""
        self.check_open()
        h = self.hdr
        return dict(layout=h.layout, clock_bits=bool(h.table_flags & TABLE_CLOCK), total_size=h.total_size, nshards=h.nshards,
                    slots_per_shard=h.slots, max_fill=h.max_fill, arena_size=h.arena_size,
                    capacity=h.capacity, memory=h.memory, nprocs=h.nprocs,
                    creator_pid=h.creator_pid, created_unix_ns=h.created_unix_ns)

    def _shard_stats(self):
        """Per-shard counters summed (a racy read: writers may be running)."""
        cdef uint32_t si
        cdef shm_shard_t *sh
        self.check_open()
        tot = dict(count=0, tombstones=0, with_ttl=0, owned=0, bytes_used=0, arena_top=0,
                   sets=0, deletes=0, repairs=0, index_rebuilds=0, coalesces=0, full=0,
                   evictions=0, expirations=0, max_shard_count=0, sampled_hits=0, sampled_misses=0)
        for si in range(self.nsh):
            sh = self.shard(si)
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
        return tot

    def _check_shard(self, uint32_t si):
        """Verify every invariant of shard ``si`` under its lock.

        Returns None, or a message naming the first broken invariant.
        """
        cdef CheckErr e
        if si >= self.nsh:
            raise IndexError(si)
        self.check_open()
        self.lock(si)
        with nogil:
            self.check_locked(si, &e)
        self.unlock(si)
        if e.code == 0:
            return None
        return f"shard {si}: " + _CHECK_MESSAGES[e.code].format(a=e.a, b=e.b)

    cdef void check_locked(self, uint32_t si, CheckErr *e) noexcept nogil:
        cdef shm_shard_t *sh = self.shard(si)
        cdef char *ar = self.arena(si)
        cdef uint64_t *ix = self.idx(si)
        cdef uint64_t *blocks = NULL
        cdef size_t nb = 0, lo, mid
        cdef uint8_t *mark = NULL
        cdef uint32_t i, pos, count = 0, tombs = 0, nttl = 0, b
        cdef uint64_t v, off, used = 0, h, cur, steps, dummy
        cdef int64_t fpos, ins
        cdef shm_item_t *it
        cdef KeyRef k
        cdef int r
        e.code = 0
        e.a = e.b = 0
        if shm_load_rlx(&sh.seq) & 1:
            e.code = 1
            e.a = sh.seq
            return
        if sh.flags:
            e.code = 18
            e.a = sh.flags
            return
        if sh.top > self.arena_size:
            e.code = 3
            e.a = sh.top
            e.b = self.arena_size
            return
        r = self.walk_blocks(si, &blocks, &nb)
        if r == ST_NOMEM:
            e.code = 21
            return
        if r < 0:
            e.code = 2
            return
        # mark: 0 unseen, 1 referenced USED, 2 listed FREE
        mark = <uint8_t *>malloc(nb + 1)
        if mark == NULL:
            free(blocks)
            e.code = 21
            return
        memset(mark, 0, nb + 1)
        for i in range(self.slots):
            v = ix[i]
            off = v & SLOT_OFFMASK
            if off == SLOT_EMPTY:
                continue
            if off == SLOT_TOMB:
                tombs += 1
                continue
            off -= 8
            lo = block_index(blocks, nb, off)
            if lo == nb or blocks[lo] != off:
                e.code = 4; e.a = i; e.b = off
                break
            if mark[lo]:
                e.code = 6; e.a = i; e.b = off
                break
            mark[lo] = 1
            it = <shm_item_t *>(ar + off)
            if not (it.flags & BLOCK_USED):
                e.code = 5; e.a = i; e.b = off
                break
            if ITEM_HDR + <uint64_t>it.vlen + it.klen > it.size:
                e.code = 7; e.a = i; e.b = off
                break
            if not (1 <= (it.types & 15) <= 4) or not (1 <= (it.types >> 4) <= 7):
                e.code = 19; e.a = i; e.b = off
                break
            k.p = <const unsigned char *>(ar + off + ITEM_HDR + it.vlen)
            k.n = it.klen
            k.ktype = it.types & 15
            k.h = shm_hash(k.p, k.n, k.ktype, self.seed0, self.seed1)
            if self.shard_of(k.h) != si:
                e.code = 8; e.a = i; e.b = off
                break
            fpos = self.find(si, &k, &dummy, &ins)
            if fpos != i:
                e.code = 9; e.a = i; e.b = off
                break
            count += 1
            used += it.size
            if it.expires:
                nttl += 1
        if e.code == 0:
            for b in range(SHMREG_NBINS):
                cur = sh.bins[b]
                steps = 0
                while cur != NIL:
                    lo = block_index(blocks, nb, cur)
                    if lo == nb or blocks[lo] != cur or mark[lo] or \
                            ((<shm_item_t *>(ar + cur)).flags & BLOCK_USED):
                        e.code = 14; e.a = b; e.b = cur
                        break
                    if bin_of((<shm_item_t *>(ar + cur)).size) != b:
                        e.code = 20; e.a = cur; e.b = b
                        break
                    mark[lo] = 2
                    steps += 1
                    if steps > nb:
                        e.code = 15; e.a = b
                        break
                    cur = (<uint64_t *>(ar + cur + 8))[0]
                if e.code:
                    break
        if e.code == 0:
            for mid in range(nb):
                it = <shm_item_t *>(ar + blocks[mid])
                if it.flags & BLOCK_USED:
                    if mark[mid] != 1:
                        e.code = 10; e.a = blocks[mid]; e.b = it.size
                        break
                elif mark[mid] != 2:
                    e.code = 16; e.a = blocks[mid]
                    break
        if e.code == 0:
            if count != sh.count:
                e.code = 11; e.a = sh.count; e.b = count
            elif tombs != sh.tombs:
                e.code = 12; e.a = sh.tombs; e.b = tombs
            elif used != sh.used:
                e.code = 13; e.a = sh.used; e.b = used
            elif nttl != sh.nttl:
                e.code = 17; e.a = sh.nttl; e.b = nttl
        free(mark)
        free(blocks)



def decode_raw(int vtype, bytes raw, bint allow_pickle=True):
    """Decode a value read by ``CoreTable._get_raw``."""
    return decode_value(vtype, PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), allow_pickle)
