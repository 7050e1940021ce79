/*
 * The engine interface: a view of one mapped segment and the operations on
 * it, in plain C (no Python).  The binding (_core.pyx) turns Python objects
 * into shm_key_t / shm_val_t, calls these, and turns status codes into
 * exceptions.
 *
 * Threading rules (the binding keeps them):
 *  - Calls marked [GIL] use the view's process-local pidfd cache (through
 *    shm_owner_alive) and must be serialised per view: the binding calls
 *    them with the GIL held.
 *  - Calls marked [nogil] touch only the segment (under a lock the caller
 *    holds, or lock-free) and may run with the GIL released.
 *  - No engine call runs Python code, so none can close the view under
 *    itself; the binding pins the view for the duration of a call.
 */
#ifndef SHM_ENGINE_H
#define SHM_ENGINE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include "shm_layout.h"
#include "shm_sync.h"

/* SHMREG_DEBUG builds check a shard's invariants at every writer's unlock. */
#ifdef SHMREG_DEBUG
#define SHM_DEBUG_BUILD 1
#else
#define SHM_DEBUG_BUILD 0
#endif

/* ---- status codes --------------------------------------------------------- */
enum shm_status {
    SHM_OK = 1,            /* done */
    SHM_NO = 0,            /* not done, by the rules (present for insert_new, mismatch for CAS ...) */
    SHM_FULL = -1,         /* no room and nothing evictable */
    SHM_CORRUPT = -2,      /* an invariant does not hold */
    SHM_NOMEM = -3,        /* malloc failed */
    SHM_NOTINT = -4,       /* update_counter on a value that is not an int64 */
    SHM_OVERFLOW = -5,     /* int64 overflow */
    SHM_NOMATCH = -6,      /* present, but owned by someone else */
    SHM_BUSY = -7,         /* try-lock found the lock held */
    SHM_ABANDONED = -8,    /* lock held by a thread that does not exist */
    SHM_BADLOCK = -9,      /* lock word is not a valid robust mutex */
    SHM_TIMEOUT = -10,     /* waited as long as asked */
    SHM_TOOBIG = -11,      /* an item that can never fit a shard */
    SHM_SYSERR = -12,      /* a system call failed; errno says why */
    SHM_NOSPACE = -13      /* a shard could not grow: the filesystem is full (ENOSPC) */
};

/* Reasons shm_attach refuses a segment (shm_attach_message spells them). */
enum shm_attach_error {
    SHM_ATTACH_OK = 0,
    SHM_ATTACH_SMALL,        /* smaller than a header */
    SHM_ATTACH_UNINIT,       /* magic still 0: the creator is running or died */
    SHM_ATTACH_MAGIC,        /* not a shmreg table */
    SHM_ATTACH_VERSION,      /* another layout version */
    SHM_ATTACH_BUILD,        /* struct sizes of another build */
    SHM_ATTACH_SHARDS,       /* impossible shard count */
    SHM_ATTACH_INDEX,        /* impossible index geometry */
    SHM_ATTACH_ARENA,        /* impossible arena size */
    SHM_ATTACH_OFFSETS,      /* region offsets do not follow from the geometry */
    SHM_ATTACH_PLAN,         /* geometry does not follow from capacity and memory */
    SHM_ATTACH_SIZE          /* size does not match the geometry or the file */
};
const char *shm_attach_message(int err);

/* ---- keys, values, record buffers --------------------------------------------- */

typedef struct {
    const unsigned char *p;
    size_t n;
    unsigned ktype;
    uint64_t h;              /* shm_key_hash() */
} shm_key_t;

typedef struct {
    const char *p;
    size_t n;
    int vtype;
} shm_val_t;

/* Records copied out of a segment: u32 klen, u32 vlen, u8 ktype, u8 vtype,
 * u16 0, u32 owner, u64 expires, then key, then value, padded to 8. */
#define SHM_REC_HDR 24
typedef struct {
    char *data;
    size_t len, cap, nrec;
} shm_recbuf_t;

int shm_recbuf_append(shm_recbuf_t *b, const shm_item_t *it, uint32_t klen, uint32_t vlen,
                      const char *val, const char *key);
void shm_recbuf_free(shm_recbuf_t *b);

/* ---- geometry ----------------------------------------------------------------- */

typedef struct {
    uint32_t nshards, shard_bits, slots, max_fill, init_slots, grows;
    uint64_t arena_size, capacity, memory, index_buf, init_arena;
    uint64_t procs_off, shards_off, index_off, arena_off, total_size;
} shm_plan_t;

/* Geometry for at most capacity entries and memory item bytes; shards 0 =
 * choose.  grows: shards start with one page of index and of arena and
 * grow to the limit; else everything is allocated at creation.  total_size
 * is the address space reserved (the file's size; sparse when it grows).
 * Returns 0, or -1 with *why set to a message. */
int shm_plan(uint64_t capacity, uint64_t memory, uint32_t shards, int grows, shm_plan_t *out,
             const char **why);
/* The byte ranges of a fresh segment that must be allocated before
 * shm_init_segment: range i (0, 1, ...) in *off, *len; 0 past the last. */
int shm_plan_extent(const shm_plan_t *p, uint32_t i, uint64_t *off, uint64_t *len);

/* ---- the view ----------------------------------------------------------------- */

typedef struct {
    char *base;
    size_t size;
    shm_header_t *hdr;
    char *procs_base;
    char *shards_base;
    char *index_base;
    char *arena_base;
    uint32_t nsh, shard_bits;
    uint32_t max_slots;      /* index slots a shard may grow to (each buffer's room) */
    uint32_t init_slots;     /* and starts with (the smallest it shrinks to) */
    uint64_t index_buf;      /* bytes of one index buffer */
    uint64_t arena_size;     /* arena bytes a shard may grow to (reserved) */
    uint64_t init_arena;
    uint64_t seed0, seed1;
    int mark_clock;          /* a cache table: readers set CLOCK bits */
    int fd;                  /* the segment's file, to allocate and punch; -1: all memory is there */
    int grows;               /* shards start small; else all is allocated at creation, never punched */
    /* Process-local [GIL] state. */
    int *pidfds;             /* per slot: pidfd of a foreign owner, -1 none, -2 known dead */
    uint32_t *pidfd_gen;     /* generation the pidfd belongs to */
    long last_evicted;       /* live entries the last put evicted */
} shm_view_t;

/* Write a fresh table into zero-filled memory of plan->total_size bytes.
 * The magic goes last (release): an opener that sees it sees the rest. */
int shm_init_segment(char *base, const shm_plan_t *plan, uint64_t seed0, uint64_t seed1,
                     uint64_t creator_pid, uint64_t creator_start, uint64_t created_unix_ns,
                     int clock_bits);
/* Validate the untrusted header of a mapped segment and fill v.  Every
 * geometry field is recomputed and must match before any offset is used.
 * Returns SHM_ATTACH_OK or an shm_attach_error.  v->pidfds must be set by
 * the caller (or NULL: then foreign owners are checked without a cache). */
int shm_attach(shm_view_t *v, char *base, size_t size);

static inline shm_shard_t *shm_shard(const shm_view_t *v, uint32_t i) {
    return (shm_shard_t *)(v->shards_base + (size_t)i * sizeof(shm_shard_t));
}
/* A shard's live index, as geom names it.  geom is shared memory (and a
 * lock-free reader may see any value): it is clamped to the reservation,
 * so whatever it holds, the index lies inside the mapping; check() reports
 * a geom out of range. */
typedef struct {
    uint64_t *ix;
    uint32_t slots, max_fill;
} shm_ix_t;
static inline uint32_t shm_fill_limit(uint32_t slots) {
    return slots - (slots / 10 > 1 ? slots / 10 : 1);
}
static inline uint64_t *shm_index_buf(const shm_view_t *v, uint32_t si, unsigned sel) {
    return (uint64_t *)(v->index_base + ((size_t)si * 2 + (sel & 1)) * v->index_buf);
}
static inline int shm_geom_ok(const shm_view_t *v, uint64_t g) {
    uint32_t n = (uint32_t)g;
    return n >= 8 && n <= v->max_slots && (g >> 33) == 0;
}
static inline shm_ix_t shm_ix_of(const shm_view_t *v, uint32_t si, uint64_t g) {
    shm_ix_t r;
    uint32_t n = (uint32_t)g;
    if (n < 8) n = 8;
    if (n > v->max_slots) n = v->max_slots;
    r.ix = shm_index_buf(v, si, (unsigned)(g >> 32) & 1);
    r.slots = n;
    r.max_fill = shm_fill_limit(n);
    return r;
}
static inline shm_ix_t shm_ix(const shm_view_t *v, uint32_t si) {
    return shm_ix_of(v, si, shm_load_rlx(&shm_shard(v, si)->geom));
}
static inline char *shm_arena(const shm_view_t *v, uint32_t i) {
    return v->arena_base + (size_t)i * v->arena_size;
}
static inline shm_proc_t *shm_proc(const shm_view_t *v, uint32_t i) {
    return (shm_proc_t *)(v->procs_base + (size_t)i * sizeof(shm_proc_t));
}
static inline uint32_t shm_shard_of(const shm_view_t *v, uint64_t h) {
    return (uint32_t)((h >> 32) & (v->nsh - 1));
}
static inline void shm_key_hash(const shm_view_t *v, shm_key_t *k) {
    k->h = shm_hash(k->p, k->n, k->ktype, v->seed0, v->seed1);
}
static inline uint64_t shm_align8(uint64_t n) { return (n + 7) & ~(uint64_t)7; }
/* Block size an item of these lengths needs. */
static inline uint64_t shm_item_need(size_t klen, size_t vlen) {
    uint64_t need = shm_align8(SHM_ITEM_HDR + (uint64_t)vlen + klen);
    return need < SHM_BLOCK_MIN ? SHM_BLOCK_MIN : need;
}
/* Is the item at offset off of a shard arena plausible: aligned, inside the
 * arena, a block of at least SHM_BLOCK_MIN bytes, lengths inside the block?
 * (Shared memory is untrusted: check before use.) */
static inline int shm_item_ok(const shm_view_t *v, const char *ar, uint64_t off) {
    if ((off & 7) || off > v->arena_size - SHM_BLOCK_MIN) return 0;
    const shm_item_t *it = (const shm_item_t *)(ar + off);
    uint64_t size = it->size;
    return size >= SHM_BLOCK_MIN && !(size & 7) && size <= v->arena_size - off
        && SHM_ITEM_HDR + (uint64_t)it->vlen + it->klen <= size;
}

/* Layout table for the binding: "struct.field", offset, size; 0 past the end. */
int shm_layout_field(int i, const char **name, size_t *off, size_t *size);

/* ---- reads (shm_read.c) ---------------------------------------------------------- */

/* Key bytes equal?  Short keys (the common case) without a call to memcmp. */
static inline int shm_key_eq(const unsigned char *a, const unsigned char *b, size_t n) {
    if (n <= 16) {
        uint64_t x = 0, y = 0, x2 = 0, y2 = 0;
        if (n >= 8) {
            memcpy(&x, a, 8); memcpy(&y, b, 8);
            memcpy(&x2, a + n - 8, 8); memcpy(&y2, b + n - 8, 8);   /* overlapping tail */
            return ((x ^ y) | (x2 ^ y2)) == 0;
        }
        memcpy(&x, a, n); memcpy(&y, b, n);
        return x == y;
    }
    return memcmp(a, b, n) == 0;
}

/* shm_find, inlinable into the binding's lock-free read (the hottest path). */
static inline __attribute__((always_inline)) int64_t shm_find_inline(const shm_view_t *v, uint32_t si, const shm_key_t *k, uint64_t *out_off, int64_t *ins) {
    const shm_ix_t g = shm_ix(v, si);
    const uint64_t *ix = g.ix;
    const char *ar = shm_arena(v, si);
    uint32_t n = g.slots;
    uint64_t tag = shm_slot_tag(k->h);
    uint32_t pos = shm_slot_home(tag, n);
    *ins = -1;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t s = shm_load_rlx(&ix[pos]);
        uint64_t off = s & SHM_SLOT_OFFMASK;
        if (off == SHM_SLOT_EMPTY) {
            if (*ins < 0) *ins = pos;
            return -1;
        }
        if (off == SHM_SLOT_TOMB) {
            if (*ins < 0) *ins = pos;
        } else if ((s & SHM_SLOT_TAGMASK) == tag) {
            const shm_item_t *it;
            uint64_t size, vlen, klen;
            off -= 8;
            if ((off & 7) || off > v->arena_size - SHM_BLOCK_MIN) return -2;
            it = (const shm_item_t *)(ar + off);
            size = it->size;
            vlen = it->vlen;
            klen = it->klen;
            if (size < SHM_BLOCK_MIN || (size & 7) || size > v->arena_size - off || SHM_ITEM_HDR + vlen + klen > size)
                return -2;
            if (klen == k->n && (unsigned)(it->types & 15) == k->ktype
                    && shm_key_eq((const unsigned char *)ar + off + SHM_ITEM_HDR + vlen, k->p, klen)) {
                *out_off = off;
                return pos;
            }
        }
        if (++pos == n) pos = 0;
    }
    return -1;
}


/* Probe shard si for k [nogil, lock-free or locked].  Returns the slot, -1
 * absent, -2 implausible data (torn under a reader, corrupt under a
 * writer).  *ins gets the first slot an insert may use, -1 if none. */
int64_t shm_find(const shm_view_t *v, uint32_t si, const shm_key_t *k, uint64_t *off, int64_t *ins);

/* Copy the live entries of shard si into b (only count them when b is
 * NULL), optionally only keys of prefix's type starting with it [GIL].
 * SHM_OK, SHM_CORRUPT (torn when lock-free), SHM_NOMEM. */
int shm_snap_shard(shm_view_t *v, uint32_t si, uint64_t now, shm_recbuf_t *b,
                   const shm_key_t *prefix, size_t *count);

/* ---- locking and repair (shm_repair.c) ----------------------------------------------- */

/* Lock shard si, repairing it first if its last holder died [nogil unless
 * it repairs... repair never needs the GIL: nogil].  try_only: SHM_BUSY
 * instead of waiting.  SHM_OK, SHM_BUSY, SHM_CORRUPT (repair failed; not
 * locked), SHM_NOMEM, SHM_ABANDONED, SHM_BADLOCK. */
int shm_shard_lock(shm_view_t *v, uint32_t si, int try_only);
void shm_shard_unlock(shm_view_t *v, uint32_t si);
/* Re-derive a shard after its lock holder died at any instant (lock held). */
int shm_repair_shard(shm_view_t *v, uint32_t si);
/* Reinitialise an abandoned or invalid lock (its holder does not exist) and
 * repair what it guarded.  which: 0..nsh-1 a shard, -1 the process table
 * lock, -2 the watcher lease.  SHM_OK repaired, SHM_NO nothing to repair
 * (free, or a live holder: never robbed), or an error status. */
int shm_repair_lock(shm_view_t *v, int which);
/* State of a lock without waiting: 0 free or held by a live thread,
 * SHM_ABANDONED, SHM_BADLOCK. */
int shm_lock_state(const pthread_mutex_t *m, uint32_t *holder);
static inline pthread_mutex_t *shm_lock_of(const shm_view_t *v, int which) {
    if (which >= 0) return &shm_shard(v, (uint32_t)which)->lock.m;
    return which == -1 ? &v->hdr->procs_lock.m : &v->hdr->lease_lock.m;
}

/* ---- allocator (shm_alloc.c), shard lock held [nogil] ------------------------------- */

uint64_t shm_alloc_block(shm_view_t *v, uint32_t si, uint64_t need);
/* From the free lists only (never past top), at an offset under below
 * (SHM_NIL: anywhere): compaction's destinations. */
uint64_t shm_alloc_listed(shm_view_t *v, uint32_t si, uint64_t need, uint64_t below);
void shm_free_block(shm_view_t *v, uint32_t si, uint64_t off);
int shm_coalesce(shm_view_t *v, uint32_t si);
int shm_walk_blocks(const shm_view_t *v, uint32_t si, uint64_t **out, size_t *nout);
/* Index of off in the ascending block starts of a walk, or where it would go
 * (nb if past the end): callers check blocks[i] == off. */
static inline size_t shm_block_index(const uint64_t *blocks, size_t nb, uint64_t off) {
    size_t lo = 0, hi = nb;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (blocks[mid] < off) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}
uint32_t shm_bin_of(uint64_t size);
static inline uint64_t shm_word0(uint64_t size, uint64_t klen, uint64_t types, uint64_t flags) {
    return size | (klen << 32) | (types << 48) | (flags << 56);
}

/* ---- writes (shm_write.c), shard lock held ------------------------------------------ */

/* Put modes. */
#define SHM_PUT_SET 0
#define SHM_PUT_NEW 1
#define SHM_PUT_CAS 2
#define SHM_PUT_EVICT 4   /* flag: make room by evicting (expired first, then CLOCK) */

/* Store k -> val in shard si [GIL].  SHM_PUT_NEW: only if absent (or dead);
 * a live item is then copied into old (if given).  SHM_PUT_CAS: only if the
 * stored raw value equals *expect.  v->last_evicted counts live victims. */
int shm_put(shm_view_t *v, uint32_t si, const shm_key_t *k, const shm_val_t *val, uint64_t expires,
            uint32_t owner, int mode, uint64_t now, const shm_val_t *expect, shm_recbuf_t *old);
/* Delete k [GIL].  Copies the item into out when given.  only_owner: delete
 * only if that owner holds it (else SHM_NOMATCH).  SHM_OK deleted, SHM_NO
 * absent (an expired or dead-owned item is purged and counts as absent). */
int shm_remove(shm_view_t *v, uint32_t si, const shm_key_t *k, uint64_t now, uint32_t only_owner,
               shm_recbuf_t *out);
/* Atomic add [GIL]; absent (or dead) -> default + incr with expiry expires. */
int shm_counter_add(shm_view_t *v, uint32_t si, const shm_key_t *k, long long incr, long long dflt,
                    uint64_t expires, uint64_t now, long long *result);
/* New expiry for a live k [GIL]: SHM_OK, SHM_NO (absent/expired/dead). */
int shm_set_expiry(shm_view_t *v, uint32_t si, const shm_key_t *k, uint64_t expires, uint64_t now);
/* Delete every entry of the shard [nogil]. */
void shm_clear_shard(shm_view_t *v, uint32_t si);
/* Delete the expired (dead_too: and dead-owned) entries, never slot keep [GIL]. */
long shm_purge_shard(shm_view_t *v, uint32_t si, uint64_t now, int64_t keep, int dead_too);
/* Delete (and/or collect into b) the entries of owner (0: of every dead owner;
 * SHM_OWNER_STALE: of every owner whose process slot is no longer its own,
 * freed or recycled - never of a dead owner still in the process table,
 * whose entries are the watcher's to report) [GIL]. */
#define SHM_OWNER_STALE 0xffffffffu
int shm_reap_shard(shm_view_t *v, uint32_t si, uint32_t owner, shm_recbuf_t *b, int delete_, long *n);
/* Unpublish slot pos (item at off): the one delete path [nogil]. */
void shm_unpublish(shm_view_t *v, uint32_t si, int64_t pos, uint64_t off);
/* Close a seqlock window a dead writer left open (repair) [nogil]. */
void shm_seq_close_dead(shm_view_t *v, uint32_t si);
/* Set the CLOCK bit of slot pos, only if clear (the one store a reader makes). */
void shm_mark_referenced(shm_view_t *v, uint32_t si, int64_t pos);

/* ---- growth and compaction (shm_grow.c), shard lock held [nogil] ---------------------- */

/* Allocate [off, off+len) of the segment's file: SHM_OK, SHM_NOSPACE, SHM_SYSERR. */
int shm_fs_alloc(shm_view_t *v, uint64_t off, uint64_t len);
/* Tests (process-global, like the crash points): when shm_fs_full_from > 0,
 * every allocation from the shm_fs_full_from-th on (counted in
 * shm_fs_allocs) fails with SHM_NOSPACE, as on a filesystem that filled up. */
extern long shm_fs_allocs, shm_fs_full_from;
/* Give [off, off+len) back to the filesystem (best effort). */
void shm_fs_punch(shm_view_t *v, uint64_t off, uint64_t len);
/* Rebuild shard si's index into its idle buffer at nslots and publish it
 * (grow, shrink, or drop tombstones at the same size).  SHM_OK, SHM_FULL
 * (too many entries for nslots), SHM_NOSPACE, SHM_CORRUPT. */
int shm_resize_index(shm_view_t *v, uint32_t si, uint32_t nslots);
/* The next size up from slots (doubling, capped at the limit). */
uint32_t shm_grown_slots(const shm_view_t *v, uint32_t slots);
/* Allocate more arena so that need bytes fit past top.  SHM_OK, SHM_FULL
 * (the limit), SHM_NOSPACE, SHM_CORRUPT. */
int shm_grow_arena(shm_view_t *v, uint32_t si, uint64_t need);
/* Give the idle index buffer's memory back (after a repair). */
void shm_punch_idle_index(shm_view_t *v, uint32_t si);
/* Shrink a mostly empty index and move items at the end of the arena into
 * free blocks below, then give the freed tail back; force: even when the
 * shard is not mostly empty.  *released: bytes given back. */
int shm_compact_shard(shm_view_t *v, uint32_t si, int force, uint64_t *released);

/* ---- owners (shm_liveness.c) ---------------------------------------------------------- */

/* Is owner alive [GIL: pidfd cache]?  0 is "not owned": alive. */
int shm_owner_alive(shm_view_t *v, uint32_t owner);
/* Does owner still hold its process slot (alive or not) [nogil]? */
int shm_owner_current(shm_view_t *v, uint32_t owner);
/* Claim a process slot for (pid, start) [GIL; takes the process-table lock,
 * may wait: the binding releases the GIL around a busy lock through
 * shm_procs_lock].  own_process: the caller, which then holds the slot's
 * liveness mutex through a holder thread (*holder). */
typedef struct shm_holder shm_holder_t;
int shm_procs_lock(shm_view_t *v, int try_only);
void shm_procs_unlock(shm_view_t *v);
int shm_proc_claim_locked(shm_view_t *v, uint64_t pid, uint64_t start, int own_process,
                          shm_holder_t **holder, uint32_t *owner);
/* Free owner's slot if it is dead (procs lock held); closes its pidfd. */
int shm_proc_release_locked(shm_view_t *v, uint32_t owner);
/* Forget the cached pidfd of a slot (closing it). */
void shm_forget_pidfd(shm_view_t *v, uint32_t slot);
void shm_close_pidfds(shm_view_t *v);
/* Holder threads: hold m from a dedicated thread until released. */
int shm_holder_start(pthread_mutex_t *m, shm_holder_t **out);
/* Unlock and end the holder thread (and wait for it). */
void shm_holder_release(shm_holder_t *h);
/* After fork, in the child: the thread is gone; free the record only. */
void shm_holder_forget(shm_holder_t *h);

/* Process stat: start time (clock ticks) and zombie state. 1 found, 0 gone, -1 unknown. */
int shm_proc_stat(long pid, uint64_t *start, int *zombie);

/* ---- checker (shm_check.c) ---------------------------------------------------------------- */

typedef struct {
    int code;
    uint64_t a, b;
} shm_check_t;

/* Verify every invariant of shard si (lock held) [nogil]. */
void shm_check_shard(const shm_view_t *v, uint32_t si, shm_check_t *e);
/* The message format of a check code: "{a}" and "{b}" stand for e.a, e.b. */
const char *shm_check_message(int code);
int shm_check_code_count(void);

#endif /* SHM_ENGINE_H */
