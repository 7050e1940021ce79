# The C engine's interface for the binding (src/shmreg/engine/*.h).
# Structs are declared by the field names the binding uses; their layout is
# the C headers' business (shm_layout.h is the one declaration of it).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t

cdef extern from "pthread.h" nogil:
    ctypedef struct pthread_mutex_t:
        pass

cdef extern from "engine/shm_layout.h" nogil:
    uint64_t SHM_MAGIC
    int SHM_LAYOUT_VERSION, SHM_HEADER_SIZE, SHM_NPROCS, SHM_NBINS, SHM_MAX_KEY
    int SHM_ITEM_HDR, SHM_BLOCK_MIN, SHM_TABLE_CLOCK, SHM_TABLE_GROWS, SHM_PAGE
    uint64_t SHM_SLOT_TAGMASK, SHM_SLOT_CLOCK
    int SHM_PROC_LIVE, SHM_PROC_SELF
    int SHM_KT_BYTES, SHM_KT_STR, SHM_KT_INT, SHM_KT_BIGINT
    int SHM_VT_NONE, SHM_VT_BOOL, SHM_VT_INT, SHM_VT_FLOAT, SHM_VT_BYTES, SHM_VT_STR, SHM_VT_PICKLE

    ctypedef union shm_lock_t:
        pthread_mutex_t m

    ctypedef struct shm_header_t:
        uint32_t layout
        uint64_t total_size
        uint32_t nshards, slots, max_fill
        uint64_t arena_size, capacity, memory
        uint32_t nprocs
        uint64_t creator_pid, created_unix_ns
        uint64_t lease_pid, lease_gen, table_flags
        uint64_t index_buf, init_arena
        uint32_t init_slots
        shm_lock_t procs_lock, lease_lock

    ctypedef struct shm_proc_t:
        uint32_t state, gen
        uint64_t pid, start_time
        uint32_t kind

    ctypedef struct shm_shard_t:
        shm_lock_t lock
        uint64_t seq, top, used
        uint32_t count, tombs, nttl, nowned
        uint64_t n_sets, n_dels, n_repairs, n_rebuilds, n_coalesces, n_full
        uint64_t n_evictions, n_expired, sampled_hits, sampled_misses
        uint64_t geom, arena_cap, n_grows, n_shrinks, n_moves, n_nospace

    ctypedef struct shm_item_t:
        uint32_t size, vlen, owner
        uint16_t klen
        uint8_t types
        uint64_t expires

    uint32_t shm_owner_id(uint32_t slot, uint32_t gen)
    uint32_t shm_owner_slot(uint32_t owner)
    uint32_t shm_owner_gen(uint32_t owner)

cdef extern from "engine/shm_sync.h" nogil:
    int SHM_HAVE_ROBUST
    int SHM_LOCK_OWNERDEAD, SHM_LOCK_BUSY, SHM_LOCK_TIMEOUT, SHM_LOCK_ABANDONED, SHM_LOCK_INVALID
    uint64_t shm_load_acq(const uint64_t *p)
    uint64_t shm_load_rlx(const uint64_t *p)
    uint32_t shm_load32_rlx(const uint32_t *p)
    void shm_fence_acq()
    void shm_add_rlx(uint64_t *p, uint64_t v)
    void shm_cpu_relax()
    uint64_t shm_now_ns()
    int shm_mutex_consistent(pthread_mutex_t *m)
    int shm_mutex_lock(pthread_mutex_t *m, int try_only, long timeout_ms, uint32_t *holder)
    void shm_mutex_unlock(pthread_mutex_t *m)
    int shm_mutex_held_by_live(const pthread_mutex_t *m)
    int shm_have_alive_word()
    uint32_t shm_mutex_holder(const pthread_mutex_t *m)
    bint shm_add_overflow(long long a, long long b, long long *r)

cdef extern from "engine/shm_crash.h" nogil:
    int SHM_CP_COUNT
    const char *shm_crash_names[]
    void shm_crash_arm(int point, long count, int stop)

cdef extern from "engine/shm_engine.h" nogil:
    int SHM_DEBUG_BUILD
    enum:
        SHM_OK, SHM_NO, SHM_FULL, SHM_CORRUPT, SHM_NOMEM, SHM_NOTINT, SHM_OVERFLOW,
        SHM_NOMATCH, SHM_BUSY, SHM_ABANDONED, SHM_BADLOCK, SHM_TIMEOUT, SHM_TOOBIG, SHM_SYSERR,
        SHM_NOSPACE
    int SHM_ATTACH_OK, SHM_ATTACH_SMALL, SHM_ATTACH_UNINIT, SHM_ATTACH_MAGIC, SHM_ATTACH_VERSION, SHM_ATTACH_BUILD
    const char *shm_attach_message(int err)

    ctypedef struct shm_key_t:
        const unsigned char *p
        size_t n
        unsigned ktype
        uint64_t h

    ctypedef struct shm_val_t:
        const char *p
        size_t n
        int vtype

    int SHM_REC_HDR
    ctypedef struct shm_recbuf_t:
        char *data
        size_t len, cap, nrec
    int shm_recbuf_append(shm_recbuf_t *b, const shm_item_t *it, uint32_t klen, uint32_t vlen,
                          const char *val, const char *key)
    void shm_recbuf_free(shm_recbuf_t *b)

    ctypedef struct shm_plan_t:
        uint32_t nshards, shard_bits, slots, max_fill, init_slots, grows
        uint64_t arena_size, capacity, memory, index_buf, init_arena
        uint64_t procs_off, shards_off, index_off, arena_off, total_size
    int shm_plan(uint64_t capacity, uint64_t memory, uint32_t shards, int grows, shm_plan_t *out,
                 const char **why)
    int shm_plan_extent(const shm_plan_t *p, uint32_t i, uint64_t *off, uint64_t *len)

    ctypedef struct shm_view_t:
        char *base
        size_t size
        shm_header_t *hdr
        uint32_t nsh, max_slots, init_slots
        uint64_t arena_size, init_arena, index_buf
        int mark_clock
        int fd
        int *pidfds
        uint32_t *pidfd_gen
        long last_evicted

    int shm_init_segment(char *base, const shm_plan_t *plan, uint64_t seed0, uint64_t seed1,
                         uint64_t creator_pid, uint64_t creator_start, uint64_t created_unix_ns,
                         int clock_bits)
    int shm_attach(shm_view_t *v, char *base, size_t size)
    shm_shard_t *shm_shard(const shm_view_t *v, uint32_t i)
    ctypedef struct shm_ix_t:
        uint64_t *ix
        uint32_t slots, max_fill
    shm_ix_t shm_ix(const shm_view_t *v, uint32_t si)
    char *shm_arena(const shm_view_t *v, uint32_t i)
    shm_proc_t *shm_proc(const shm_view_t *v, uint32_t i)
    uint32_t shm_shard_of(const shm_view_t *v, uint64_t h)
    void shm_key_hash(const shm_view_t *v, shm_key_t *k)
    uint64_t shm_item_need(size_t klen, size_t vlen)

    int64_t shm_find(const shm_view_t *v, uint32_t si, const shm_key_t *k, uint64_t *off, int64_t *ins)
    int64_t shm_find_inline(const shm_view_t *v, uint32_t si, const shm_key_t *k, uint64_t *off, int64_t *ins)
    int shm_snap_shard(shm_view_t *v, uint32_t si, uint64_t now, shm_recbuf_t *b,
                       const shm_key_t *prefix, size_t *count)

    int shm_shard_lock(shm_view_t *v, uint32_t si, int try_only)
    void shm_shard_unlock(shm_view_t *v, uint32_t si)
    int shm_repair_lock(shm_view_t *v, int which)
    int shm_lock_state(const pthread_mutex_t *m, uint32_t *holder)
    pthread_mutex_t *shm_lock_of(const shm_view_t *v, int which)

    int SHM_PUT_SET, SHM_PUT_NEW, SHM_PUT_CAS, SHM_PUT_EVICT
    int shm_put(shm_view_t *v, uint32_t si, const shm_key_t *k, const shm_val_t *val, uint64_t expires,
                uint32_t owner, int mode, uint64_t now, const shm_val_t *expect, shm_recbuf_t *old)
    int shm_remove(shm_view_t *v, uint32_t si, const shm_key_t *k, uint64_t now, uint32_t only_owner,
                   shm_recbuf_t *out)
    int shm_counter_add(shm_view_t *v, uint32_t si, const shm_key_t *k, long long incr, long long dflt,
                        uint64_t expires, uint64_t now, long long *result)
    int shm_set_expiry(shm_view_t *v, uint32_t si, const shm_key_t *k, uint64_t expires, uint64_t now)
    void shm_clear_shard(shm_view_t *v, uint32_t si)
    long shm_purge_shard(shm_view_t *v, uint32_t si, uint64_t now, int64_t keep, int dead_too)
    int shm_reap_shard(shm_view_t *v, uint32_t si, uint32_t owner, shm_recbuf_t *b, int delete_, long *n)
    void shm_mark_referenced(shm_view_t *v, uint32_t si, int64_t pos)

    ctypedef struct shm_holder_t:
        pass
    int shm_owner_alive(shm_view_t *v, uint32_t owner)
    int shm_owner_current(shm_view_t *v, uint32_t owner)
    uint32_t SHM_OWNER_STALE
    int shm_procs_lock(shm_view_t *v, int try_only)
    void shm_procs_unlock(shm_view_t *v)
    int shm_proc_claim_locked(shm_view_t *v, uint64_t pid, uint64_t start, int own_process,
                              shm_holder_t **holder, uint32_t *owner)
    int shm_proc_release_locked(shm_view_t *v, uint32_t owner)
    void shm_close_pidfds(shm_view_t *v)
    void shm_holder_release(shm_holder_t *h)
    void shm_holder_forget(shm_holder_t *h)

    ctypedef struct shm_check_t:
        int code
        uint64_t a, b
    void shm_check_shard(const shm_view_t *v, uint32_t si, shm_check_t *e)
    const char *shm_check_message(int code)

    int shm_layout_field(int i, const char **name, size_t *off, size_t *size)

    int shm_compact_shard(shm_view_t *v, uint32_t si, int force, uint64_t *released)
