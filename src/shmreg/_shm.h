/*
 * shmreg shared-memory layout and the few primitives that are easier to say
 * in C than in Cython: atomics and fences, the keyed hash, robust mutexes and
 * the crash-point hook.  The layout is a contract between processes: change a
 * struct here and SHMREG_LAYOUT must change too.
 *
 * All references inside the segment are byte offsets, never pointers: every
 * process maps the segment at a different address.
 */
#ifndef SHMREG_SHM_H
#define SHMREG_SHM_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>
#include <sched.h>
#include <time.h>

#define SHMREG_MAGIC 0x3147455220484d53ULL /* "SMH REG1" little endian */
#define SHMREG_LAYOUT 1
#define SHMREG_HEADER_SIZE 4096
#define SHMREG_NPROCS 1024
#define SHMREG_NBINS 64

/* Robust mutexes let the next locker learn that the holder died (EOWNERDEAD).
 * macOS has none: there a writer killed mid-write leaves its shard locked; the
 * build still works, the crash guarantee is Linux/FreeBSD only. */
#if defined(__linux__) || defined(__FreeBSD__)
#define SHMREG_HAVE_ROBUST 1
#else
#define SHMREG_HAVE_ROBUST 0
#endif

/* ---- layout ------------------------------------------------------------ */

typedef struct {
    uint64_t magic;          /* written last by the creator */
    uint32_t layout;
    uint32_t header_size;
    uint64_t total_size;
    uint32_t nshards;        /* power of two */
    uint32_t shard_bits;
    uint32_t slots;          /* index slots per shard */
    uint32_t max_fill;       /* count + tombstones allowed per shard */
    uint64_t arena_size;     /* item bytes per shard */
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
    uint64_t table_flags;    /* TABLE_CLOCK: readers set reference bits (a cache) */
    uint64_t reserved[23];
    union { pthread_mutex_t m; char pad[64]; } procs_lock;  /* guards slot claims */
    union { pthread_mutex_t m; char pad[64]; } lease_lock;
} shm_header_t;

/* One slot per process that owns entries.  Entries name their owner by
 * (slot, generation), never by raw pid, so pid reuse cannot misattribute.
 * A SELF slot's process holds `alive` (a robust mutex) from a dedicated
 * thread for its whole life: when it dies, however it dies, the kernel marks
 * the mutex word OWNER_DIED, so any reader can tell the owner is dead with
 * one load and no syscall. */
typedef struct {
    uint32_t state;          /* PROC_FREE, PROC_CLAIMING, PROC_LIVE */
    uint32_t gen;
    uint64_t pid;
    uint64_t start_time;     /* process start (see _proc.start_time) */
    uint64_t pidns;          /* pid namespace inode, 0 if unknown */
    uint32_t kind;           /* PROC_SELF (holds `alive`) or PROC_FOREIGN (checked by pid) */
    uint32_t pad;
    uint64_t reserved[3];
    union { pthread_mutex_t m; char pad[64]; } alive;
} shm_proc_t;

#define PROC_FREE 0
#define PROC_CLAIMING 1
#define PROC_LIVE 2
#define PROC_SELF 1
#define PROC_FOREIGN 2

typedef struct {
    union { pthread_mutex_t m; char pad[64]; } lock;
    uint64_t seq;            /* seqlock: odd while a writer changes what readers see */
    uint64_t flags;          /* SHARD_REBUILDING while the index is rebuilt */
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
    uint64_t reserved[14];   /* pads the struct to 13 cache lines */
    uint64_t bins[SHMREG_NBINS];   /* free-list heads, arena offsets, NIL = empty */
} shm_shard_t;

/* Every block in a shard's arena starts with this header, so the arena can be
 * walked block by block.  Word 0 (size, klen, types, flags) is always written
 * with one 8-byte store: a split or merge is then atomic for the walker. */
typedef struct {
    uint32_t size;           /* whole block, multiple of 8 */
    uint16_t klen;
    uint8_t  types;          /* key type (low nibble), value type (high nibble) */
    uint8_t  flags;          /* BLOCK_USED */
    uint32_t vlen;
    uint32_t owner;          /* 0 = none, else (slot + 1) | gen << 12 */
    uint64_t expires;        /* CLOCK_MONOTONIC ns, 0 = never */
    /* value (8-aligned, so an int64 counter is updated with one store), then key */
} shm_item_t;

#define ITEM_HDR 24
#define BLOCK_MIN 32
#define BLOCK_USED 1
#define BLOCK_REF 2          /* carries an index slot's CLOCK bit through an index rebuild */
#define SHARD_REBUILDING 1
#define TABLE_CLOCK 1
#define NIL UINT64_MAX

/* Index slot: bit 63 clock (reference) bit, bits 48-62 tag, bits 0-47 offset+8.
 * offset field 0 = empty, 1 = tombstone. */
#define SLOT_OFFMASK 0x0000FFFFFFFFFFFFULL
#define SLOT_TAGMASK 0x7FFF000000000000ULL
#define SLOT_CLOCK   0x8000000000000000ULL
#define SLOT_EMPTY 0ULL
#define SLOT_TOMB  1ULL

typedef char shm_assert_item[(sizeof(shm_item_t) == ITEM_HDR) ? 1 : -1];
typedef char shm_assert_mutex[(sizeof(pthread_mutex_t) <= 64) ? 1 : -1];
typedef char shm_assert_proc[(sizeof(shm_proc_t) == 128) ? 1 : -1];
typedef char shm_assert_shard[(sizeof(shm_shard_t) % 64 == 0) ? 1 : -1];
typedef char shm_assert_sampled_line[(offsetof(shm_shard_t, sampled_hits) / 64 != offsetof(shm_shard_t, seq) / 64) ? 1 : -1];
typedef char shm_assert_hdr[(sizeof(shm_header_t) <= SHMREG_HEADER_SIZE) ? 1 : -1];

/* ---- atomics ----------------------------------------------------------- */

static inline uint64_t shm_load_acq(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t shm_load_rlx(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void shm_store_rel(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void shm_store_rlx(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline void shm_fence_acq(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
static inline void shm_fence_rel(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
static inline void shm_fence_seq(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline uint32_t shm_load32_rlx(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void shm_or_rlx(uint64_t *p, uint64_t v) { __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
static inline void shm_add_rlx(uint64_t *p, uint64_t v) { __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline int shm_ctz64(uint64_t v) { return __builtin_ctzll(v); }

/* Seqlock writer: seq odd, then (release) the data stores, then seq even. */
static inline void shm_seq_begin(uint64_t *seq) {
    __atomic_store_n(seq, __atomic_load_n(seq, __ATOMIC_RELAXED) + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
}
static inline void shm_seq_end(uint64_t *seq) {
    __atomic_store_n(seq, __atomic_load_n(seq, __ATOMIC_RELAXED) + 1, __ATOMIC_RELEASE);
}

static inline void shm_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* ---- keyed hash -------------------------------------------------------- */
/* A wyhash-style multiply-fold hash keyed by the segment's seed.  Not a MAC,
 * but an attacker who cannot read the segment cannot aim keys at one shard. */

static inline uint64_t shm_mix(uint64_t a, uint64_t b) {
    __uint128_t r = (__uint128_t)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}
static inline uint64_t shm_rd64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static inline uint64_t shm_hash(const unsigned char *p, size_t n, unsigned ktype,
                                uint64_t s0, uint64_t s1) {
    uint64_t h = s0 ^ ((uint64_t)n * 0x9E3779B97F4A7C15ULL) ^ ((uint64_t)ktype << 56);
    while (n >= 16) {
        h = shm_mix(shm_rd64(p) ^ s1 ^ 0xa0761d6478bd642fULL, shm_rd64(p + 8) ^ h);
        p += 16; n -= 16;
    }
    if (n >= 8) {
        h = shm_mix(shm_rd64(p) ^ s1 ^ 0xe7037ed1a0b428dbULL, h ^ 0x8ebc6af09c88c6e3ULL);
        p += 8; n -= 8;
    }
    if (n) {
        uint64_t t = 0; memcpy(&t, p, n);
        h = shm_mix(t ^ s1 ^ 0x589965cc75374cc3ULL, h ^ 0x1d8e4e27c47d124fULL);
    }
    return shm_mix(h ^ s0, 0x9E3779B97F4A7C15ULL ^ s1);
}

/* ---- robust process-shared mutex -------------------------------------- */

static int shm_mutex_init(pthread_mutex_t *m) {
    pthread_mutexattr_t a;
    int rc = pthread_mutexattr_init(&a);
    if (rc) return rc;
    rc = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
#if SHMREG_HAVE_ROBUST
    if (!rc) rc = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
#endif
    if (!rc) rc = pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
    return rc;
}

static inline int shm_mutex_consistent(pthread_mutex_t *m) {
#if SHMREG_HAVE_ROBUST
    return pthread_mutex_consistent(m);
#else
    (void)m; return 0;
#endif
}

#ifndef EOWNERDEAD
#define EOWNERDEAD 130
#endif
#ifndef ENOTRECOVERABLE
#define ENOTRECOVERABLE 131
#endif

/* ---- clock ------------------------------------------------------------- */

static inline uint64_t shm_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* ---- crash points (tests kill a writer at a named step) ---------------- */
/* Armed only when SHMREG_CRASH_AT names a step; otherwise one well-predicted
 * branch per step. */
static int shm_crash_step = -1;
static long shm_crash_countdown = 0;
static int shm_crash_signal = SIGKILL;

static void shm_crash_hit(void) {
    if (--shm_crash_countdown <= 0) {
        if (shm_crash_signal == SIGSTOP) {
            /* Stop mode: freeze right here (lock held) until SIGCONT, then go on. */
            shm_crash_step = -1;
            kill(getpid(), SIGSTOP);
            return;
        }
        kill(getpid(), SIGKILL);
        for (;;) pause();
    }
}
#define SHM_CRASH_POINT(step) do { \
    if (__builtin_expect(shm_crash_step == (step), 0)) shm_crash_hit(); } while (0)

static inline void shm_crash_arm(int step, long count, int stop) {
    shm_crash_step = step; shm_crash_countdown = count; shm_crash_signal = stop ? SIGSTOP : SIGKILL;
}

static inline int shm_add_overflow(long long a, long long b, long long *r) { return __builtin_add_overflow(a, b, r); }

/* ---- process liveness -------------------------------------------------- */
#include <poll.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#if defined(__linux__)
#include <sys/syscall.h>
#endif

/* The futex word of a glibc/musl mutex: owner TID in the low 30 bits, and
 * FUTEX_OWNER_DIED (set by the kernel when the owning thread dies). */
#define SHM_FUTEX_OWNER_DIED 0x40000000u
#define SHM_FUTEX_TID_MASK 0x3fffffffu

static inline int shm_have_alive_word(void) {
#if SHMREG_HAVE_ROBUST && defined(__linux__) && (defined(__GLIBC__) || defined(__UCLIBC__))
    return 1;
#else
    return 0;
#endif
}

/* 1 while the mutex is held by a live thread, 0 once it was released or its
 * holder died.  Only meaningful where shm_have_alive_word(). */
static inline int shm_mutex_held_by_live(pthread_mutex_t *m) {
    uint32_t w = __atomic_load_n((uint32_t *)m, __ATOMIC_ACQUIRE);
    return (w & SHM_FUTEX_TID_MASK) != 0 && !(w & SHM_FUTEX_OWNER_DIED);
}

/* A thread that takes `m` and holds it until the process ends.  It must not
 * be a Python thread: those end before the process does. */
typedef struct { pthread_mutex_t *m; volatile int state; } shm_holder_t;

static void *shm_holder_main(void *arg) {
    shm_holder_t *h = (shm_holder_t *)arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);   /* signals are the main thread's business */
    int rc = pthread_mutex_lock(h->m);
    if (rc == EOWNERDEAD) { shm_mutex_consistent(h->m); rc = 0; }
    __atomic_store_n(&h->state, rc == 0 ? 1 : -1, __ATOMIC_RELEASE);
    if (rc) return NULL;
    for (;;) pause();
    return NULL;
}

/* Start a holder thread on `m` and wait until it holds it.  0 or an errno. */
static int shm_hold_forever(pthread_mutex_t *m) {
    shm_holder_t *h = (shm_holder_t *)malloc(sizeof(shm_holder_t));  /* lives as long as the thread */
    pthread_attr_t a;
    pthread_t t;
    int rc, st;
    if (!h) return ENOMEM;
    h->m = m;
    h->state = 0;
    pthread_attr_init(&a);
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&a, 64 * 1024);
    rc = pthread_create(&t, &a, shm_holder_main, h);
    pthread_attr_destroy(&a);
    if (rc) { free(h); return rc; }
    while ((st = __atomic_load_n(&h->state, __ATOMIC_ACQUIRE)) == 0) sched_yield();
    return st == 1 ? 0 : EDEADLK;
}

/* Start time (field 22 of /proc/PID/stat) and zombie state of pid.
 * Returns 1 found, 0 gone, -1 unknown (no /proc). */
static int shm_proc_stat(long pid, uint64_t *start, int *zombie) {
#if defined(__linux__)
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT || errno == ESRCH ? 0 : -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p || p[1] != ' ') return -1;
    p += 2;
    *zombie = (*p == 'Z' || *p == 'X');
    for (int field = 3; field < 22; field++) {      /* state is field 3 */
        p = strchr(p, ' ');
        if (!p) return -1;
        p++;
    }
    *start = strtoull(p, NULL, 10);
    return 1;
#else
    (void)pid; (void)start; (void)zombie;
    return -1;
#endif
}

static inline int shm_pidfd_open(long pid) {
#if defined(__linux__) && defined(SYS_pidfd_open)
    return (int)syscall(SYS_pidfd_open, (pid_t)pid, 0);
#else
    (void)pid; errno = ENOSYS; return -1;
#endif
}

/* 1 if the process behind pidfd has exited (zombie included), 0 if it runs. */
static inline int shm_pidfd_exited(int fd) {
    struct pollfd p = { fd, POLLIN, 0 };
    return poll(&p, 1, 0) > 0;
}

/* Liveness of (pid, start) without a pidfd: kill(0) plus /proc where present. */
static int shm_pid_alive(long pid, uint64_t start) {
    uint64_t st = 0; int z = 0;
    if (pid <= 0) return 0;
    if (kill((pid_t)pid, 0) != 0 && errno != EPERM) return 0;
    int r = shm_proc_stat(pid, &st, &z);
    if (r == 0) return 0;
    if (r < 0) return 1;            /* no /proc: kill() is all we know */
    return !z && st == start;
}

/* Lock with a timeout in ms: 0, ETIMEDOUT, EOWNERDEAD ... (macOS has no timedlock). */
static int shm_mutex_lock_timeout(pthread_mutex_t *m, long ms) {
#if defined(__APPLE__)
    for (long waited = 0;; waited++) {
        int rc = pthread_mutex_trylock(m);
        if (rc != EBUSY) return rc;
        if (waited >= ms) return ETIMEDOUT;
        usleep(1000);
    }
#else
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
    return pthread_mutex_timedlock(m, &ts);
#endif
}

/* SHMREG_DEBUG builds re-verify a shard's invariants after every write. */
#ifdef SHMREG_DEBUG
#define SHM_DEBUG 1
#else
#define SHM_DEBUG 0
#endif

#endif /* SHMREG_SHM_H */
