/*
 * The shared-memory layout: the one declaration of every struct that lives
 * in a segment.  It is a contract between processes (and between versions
 * of shmreg): change a struct here and SHM_LAYOUT_VERSION must change too.
 * The binding exports the sizes and offsets below (_core.LAYOUT) so that the
 * tests never spell the layout out a second time.
 *
 * All references inside a segment are byte offsets, never pointers: every
 * process maps the segment at a different address.
 */
#ifndef SHM_LAYOUT_H
#define SHM_LAYOUT_H

#include <stddef.h>
#include <stdint.h>
#include <pthread.h>

#define SHM_MAGIC 0x3147455220484d53ULL /* "SMH REG1" little endian */
#define SHM_LAYOUT_VERSION 2
#define SHM_HEADER_SIZE 4096
#define SHM_NPROCS 1024
#define SHM_NBINS 64
#define SHM_MAX_SHARDS 1024
#define SHM_MAX_KEY 65535
/* Granularity of what a growing table allocates (and punches back): each
 * shard's index buffers and arena start on such a boundary. */
#define SHM_PAGE 4096
/* Index slots a growing shard starts with (one page). */
#define SHM_INIT_SLOTS 512

/* A process-shared mutex padded to its own 64 bytes (glibc's is 40). */
typedef union { pthread_mutex_t m; char pad[64]; } shm_lock_t;

typedef struct {
    uint64_t magic;          /* written last by the creator */
    uint32_t layout;
    uint32_t header_size;
    uint64_t total_size;
    uint32_t nshards;        /* power of two */
    uint32_t shard_bits;
    uint32_t slots;          /* index slots per shard at the limit (each buffer's room) */
    uint32_t max_fill;       /* count + tombstones allowed per shard at the limit */
    uint64_t arena_size;     /* item bytes per shard at the limit (reserved, page multiple) */
    uint64_t capacity;       /* as asked at creation */
    uint64_t memory;         /* as asked at creation */
    uint64_t seed0, seed1;   /* keyed hash: Python's hash() differs per process */
    uint64_t procs_off, shards_off, index_off, arena_off;
    uint32_t nprocs, proc_size, shard_size, bins;
    uint64_t creator_pid, creator_start;
    uint64_t created_unix_ns;
    /* Watcher lease: the active watcher holds lease_lock for its lifetime;
     * standbys wait on it and the kernel hands it over (EOWNERDEAD) when the
     * holder dies. */
    uint64_t lease_pid, lease_start, lease_gen, lease_reserved;
    uint64_t table_flags;    /* SHM_TABLE_CLOCK: readers set reference bits (a cache);
                              * SHM_TABLE_GROWS: shards start small and grow to the limit */
    uint64_t index_buf;      /* bytes of one index buffer (two per shard), page multiple */
    uint32_t init_slots;     /* index slots a shard starts with */
    uint32_t pad0;
    uint64_t init_arena;     /* arena bytes a shard starts with (page multiple) */
    uint64_t reserved[20];
    shm_lock_t procs_lock;   /* guards slot claims */
    shm_lock_t lease_lock;
} shm_header_t;

/* One slot per process that owns entries.  Entries name their owner by
 * (slot, generation), never by raw pid, so pid reuse cannot misattribute.
 * A SELF slot's process holds `alive` (a robust mutex) from a dedicated
 * thread for as long as it owns entries there: when it dies, however it
 * dies, the kernel marks the mutex word OWNER_DIED, so any reader can tell
 * the owner is dead with one load and no syscall. */
typedef struct {
    uint32_t state;          /* SHM_PROC_FREE, _CLAIMING, _LIVE */
    uint32_t gen;
    uint64_t pid;
    uint64_t start_time;     /* process start (see _proc.start_time) */
    uint64_t pidns;          /* pid namespace inode, 0 if unknown */
    uint32_t kind;           /* SHM_PROC_SELF (holds `alive`) or SHM_PROC_FOREIGN (checked by pid) */
    uint32_t pad;
    uint64_t reserved[3];
    shm_lock_t alive;
} shm_proc_t;

enum { SHM_PROC_FREE = 0, SHM_PROC_CLAIMING = 1, SHM_PROC_LIVE = 2 };
enum { SHM_PROC_SELF = 1, SHM_PROC_FOREIGN = 2 };

typedef struct {
    shm_lock_t lock;
    uint64_t seq;            /* seqlock: odd while a writer changes what readers see */
    /* The live index: slots (bits 0-31) and which of the shard's two buffers
     * holds it (bit 32), on the seqlock's cache line (readers load both).
     * A resize fills the other buffer under the lock and publishes it with
     * one store of geom inside a seqlock window; a reader that raced it
     * retries. */
    uint64_t geom;
    uint64_t flags;          /* none defined in layout 2: always 0 */
    uint64_t top;            /* arena bytes carved into blocks (bump pointer) */
    uint64_t used;           /* bytes in USED blocks */
    uint32_t count;          /* live index entries (expired ones included) */
    uint32_t tombs;          /* tombstones in the index */
    uint32_t nttl;           /* entries with an expiry */
    uint32_t nowned;         /* entries with an owner */
    uint64_t n_sets, n_dels, n_repairs, n_rebuilds, n_coalesces, n_full;
    uint64_t binmap;         /* hint: bit b set if bins[b] may be non-empty (derived) */
    uint64_t hand;           /* CLOCK hand: next index slot the evictor looks at */
    uint64_t n_evictions;    /* live entries evicted to make room */
    uint64_t n_expired;      /* expired entries removed (purge, eviction, delete) */
    /* Sampled read counters, on their own cache line (away from seq): each
     * reader adds 64 once per 64 of its hits / misses. */
    uint64_t sampled_hits, sampled_misses;
    /* Growth (see geom above).  arena_cap: arena bytes allocated in the
     * file (top <= arena_cap <= arena_size); nothing past it is published. */
    uint64_t arena_cap;
    uint64_t n_grows;        /* index or arena grown */
    uint64_t n_shrinks;      /* index shrunk or arena given back (compaction) */
    uint64_t n_moves;        /* items moved down by compaction */
    uint64_t n_nospace;      /* growth refused: the filesystem is full */
    uint64_t reserved[8];    /* pads the struct to 13 cache lines */
    uint64_t bins[SHM_NBINS];   /* free-list heads, arena offsets, SHM_NIL = empty */
} shm_shard_t;

/* Every block in a shard's arena starts with this header, so the arena can be
 * walked block by block.  Word 0 (size, klen, types, flags) is always written
 * with one 8-byte store: a split or merge is then atomic for the walker. */
typedef struct {
    uint32_t size;           /* whole block, multiple of 8 */
    uint16_t klen;
    uint8_t  types;          /* key type (low nibble), value type (high nibble) */
    uint8_t  flags;          /* SHM_BLOCK_USED, SHM_BLOCK_REF */
    uint32_t vlen;
    uint32_t owner;          /* 0 = none, else shm_owner_id(slot, gen) */
    uint64_t expires;        /* CLOCK_MONOTONIC ns, 0 = never */
    /* value (8-aligned, so an int64 counter is updated with one store), then key */
} shm_item_t;

#define SHM_ITEM_HDR 24
#define SHM_BLOCK_MIN 32
#define SHM_BLOCK_USED 1
#define SHM_BLOCK_REF 2          /* (layout 1: a CLOCK bit parked during a rebuild; never set now) */
#define SHM_TABLE_CLOCK 1
#define SHM_TABLE_GROWS 2
#define SHM_GEOM_SEL (1ULL << 32)
#define SHM_NIL UINT64_MAX

/* Index slot: bit 63 clock (reference) bit, bits 32-62 the low 31 bits of
 * the key's hash (they place the slot, and filter probes), bits 0-31
 * offset+8 (an arena is under 4 GiB).  Offset field 0 = empty, 1 =
 * tombstone.  A resize places slots from these bits alone: it never reads
 * an item. */
#define SHM_SLOT_OFFMASK 0x00000000FFFFFFFFULL
#define SHM_SLOT_TAGMASK 0x7FFFFFFF00000000ULL
#define SHM_SLOT_CLOCK   0x8000000000000000ULL
#define SHM_SLOT_EMPTY 0ULL
#define SHM_SLOT_TOMB  1ULL

/* The tag bits of a slot for hash h, and the home slot of those bits in an
 * index of n slots. */
static inline uint64_t shm_slot_tag(uint64_t h) { return (h & 0x7FFFFFFFULL) << 32; }
static inline uint32_t shm_slot_home(uint64_t slot, uint32_t n) {
    return (uint32_t)((((slot & SHM_SLOT_TAGMASK) >> 32) * (uint64_t)n) >> 31);
}

/* Key types (part of the key: 1 != "1"). */
enum { SHM_KT_BYTES = 1, SHM_KT_STR = 2, SHM_KT_INT = 3, SHM_KT_BIGINT = 4, SHM_KT_MAX = 4 };
/* Value types.  0 is never written, so a zeroed block is recognisably not an item. */
enum { SHM_VT_NONE = 1, SHM_VT_BOOL = 2, SHM_VT_INT = 3, SHM_VT_FLOAT = 4, SHM_VT_BYTES = 5,
       SHM_VT_STR = 6, SHM_VT_PICKLE = 7, SHM_VT_MAX = 7 };

/* ---- owner ids ---------------------------------------------------------- */
/* An owner id packs (slot + 1) in bits 0-11 and the slot's generation (20
 * bits) above; 0 means "not owned".  The one place the encoding is spelled. */
#define SHM_GEN_MASK 0xFFFFFu

static inline uint32_t shm_owner_id(uint32_t slot, uint32_t gen) {
    return (slot + 1) | ((gen & SHM_GEN_MASK) << 12);
}
/* Slot of an owner id; SHM_NPROCS or more when the id names no slot. */
static inline uint32_t shm_owner_slot(uint32_t owner) { return (owner & 0xfffu) - 1u; }
static inline uint32_t shm_owner_gen(uint32_t owner) { return owner >> 12; }

/* ---- compile-time layout checks ------------------------------------------- */
_Static_assert(sizeof(shm_item_t) == SHM_ITEM_HDR, "item header is 24 bytes");
_Static_assert(sizeof(pthread_mutex_t) <= 64, "a mutex fits its 64-byte slot");
_Static_assert(sizeof(shm_lock_t) == 64, "lock slots are one cache line");
_Static_assert(sizeof(shm_proc_t) == 128, "process slots are 128 bytes");
_Static_assert(sizeof(shm_shard_t) % 64 == 0, "shards are whole cache lines");
_Static_assert(sizeof(shm_shard_t) == 13 * 64, "shard struct is 13 cache lines");
_Static_assert(offsetof(shm_shard_t, sampled_hits) / 64 != offsetof(shm_shard_t, seq) / 64,
               "sampled read counters live away from the seqlock's cache line");
_Static_assert(sizeof(shm_header_t) <= SHM_HEADER_SIZE, "header fits its page");
/* Layout version 2, pinned: these moved means SHM_LAYOUT_VERSION must move. */
_Static_assert(offsetof(shm_header_t, procs_lock) == 376 && offsetof(shm_header_t, lease_lock) == 440,
               "header layout of version 2");
_Static_assert(offsetof(shm_header_t, index_buf) == 192 && offsetof(shm_header_t, init_arena) == 208,
               "header layout of version 2");
_Static_assert(offsetof(shm_shard_t, bins) == 320 && offsetof(shm_shard_t, geom) == 72,
               "shard layout of version 2");
_Static_assert(offsetof(shm_item_t, expires) % 8 == 0, "expiry is one aligned store");
_Static_assert(SHM_NPROCS <= 4095, "slot + 1 fits the owner id's 12 bits");

/* The field offsets tests poke at, in one table (name, offset, size). */
#define SHM_LAYOUT_FIELDS(X) \
    X(header, magic) X(header, layout) X(header, header_size) X(header, total_size) \
    X(header, nshards) X(header, shard_bits) X(header, slots) X(header, max_fill) \
    X(header, arena_size) X(header, capacity) X(header, memory) X(header, seed0) \
    X(header, seed1) X(header, procs_off) X(header, shards_off) X(header, index_off) \
    X(header, arena_off) X(header, nprocs) X(header, proc_size) X(header, shard_size) \
    X(header, bins) X(header, creator_pid) X(header, table_flags) X(header, index_buf) \
    X(header, init_slots) X(header, init_arena) X(header, procs_lock) \
    X(header, lease_lock) \
    X(proc, state) X(proc, gen) X(proc, pid) X(proc, start_time) X(proc, kind) X(proc, alive) \
    X(shard, lock) X(shard, seq) X(shard, flags) X(shard, top) X(shard, used) X(shard, count) \
    X(shard, tombs) X(shard, nttl) X(shard, nowned) X(shard, binmap) X(shard, hand) \
    X(shard, geom) X(shard, arena_cap) X(shard, n_grows) X(shard, bins) \
    X(item, size) X(item, klen) X(item, types) X(item, flags) X(item, vlen) X(item, owner) \
    X(item, expires)

#endif /* SHM_LAYOUT_H */
