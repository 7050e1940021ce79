/*
 * Synchronisation primitives: atomics and fences, the seqlock, the keyed
 * hash, the clock and robust process-shared mutexes with bounded waits.
 *
 * Memory ordering: a writer brackets every change readers can observe with
 * seq odd/even (shm_seq_begin / shm_seq_end, release); a reader loads seq
 * (acquire), reads, fences (acquire) and re-loads seq.  Everything else a
 * writer touches is derived state, recomputed by a repair.
 */
#ifndef SHM_SYNC_H
#define SHM_SYNC_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <pthread.h>

/* Robust mutexes let the next locker learn that the holder died (EOWNERDEAD).
 * macOS has none: there a writer killed mid-write leaves its shard locked; the
 * build still works, the crash guarantee is Linux/FreeBSD only. */
#if defined(__linux__) || defined(__FreeBSD__)
#define SHM_HAVE_ROBUST 1
#else
#define SHM_HAVE_ROBUST 0
#endif

/* ---- atomics ----------------------------------------------------------- */

static inline uint64_t shm_load_acq(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t shm_load_rlx(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void shm_store_rel(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void shm_store_rlx(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline void shm_fence_acq(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
static inline void shm_fence_rel(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
static inline uint32_t shm_load32_rlx(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline uint32_t shm_load32_acq(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void shm_or_rlx(uint64_t *p, uint64_t v) { __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
static inline void shm_add_rlx(uint64_t *p, uint64_t v) { __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline int shm_ctz64(uint64_t v) { return __builtin_ctzll(v); }
static inline int shm_add_overflow(long long a, long long b, long long *r) { return __builtin_add_overflow(a, b, r); }

/* Seqlock writer: seq odd, then (release) the data stores, then seq even.
 * Only shm_write.c calls these (every seqlock window lives in that file). */
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

/* ---- clock ------------------------------------------------------------- */

/* CLOCK_MONOTONIC in ns: the clock of every expiry in a segment. */
uint64_t shm_now_ns(void);

/* ---- robust process-shared mutexes (shm_sync.c) ------------------------- */

/* Results of shm_mutex_lock besides 0 (locked): */
#define SHM_LOCK_OWNERDEAD 1   /* locked; the previous holder died: repair, then shm_mutex_consistent */
#define SHM_LOCK_BUSY 2        /* try_only and somebody holds it */
#define SHM_LOCK_TIMEOUT 3     /* the caller's deadline passed (a live holder) */
#define SHM_LOCK_ABANDONED 4   /* held by a thread that does not exist: corruption */
#define SHM_LOCK_INVALID 5     /* not a valid robust mutex (EINVAL, ENOTRECOVERABLE, bad kind) */

/* How long a lock word must name a holder thread that does not exist before
 * it is called abandoned.  A dead holder normally hands the lock on at once
 * (the kernel marks it OWNER_DIED); this bound only catches corruption. */
#define SHM_ABANDON_MS 1000

int shm_mutex_init(pthread_mutex_t *m);
int shm_mutex_consistent(pthread_mutex_t *m);
/* Lock m.  try_only: never wait (SHM_LOCK_BUSY).  timeout_ms < 0: wait as
 * long as a live thread holds it.  *holder gets the holder's thread id when
 * the result is SHM_LOCK_ABANDONED (0 when the word names none). */
int shm_mutex_lock(pthread_mutex_t *m, int try_only, long timeout_ms, uint32_t *holder);
void shm_mutex_unlock(pthread_mutex_t *m);
/* Is the mutex's type field the one shm_mutex_init writes?  (1 where it
 * cannot be told.) */
int shm_mutex_kind_ok(const pthread_mutex_t *m);
/* 1 if a thread holds m and has not died (the kernel sets OWNER_DIED when it
 * does); needs shm_have_alive_word(). */
int shm_mutex_held_by_live(const pthread_mutex_t *m);
/* Whether held_by_live can be answered from the mutex word on this platform. */
int shm_have_alive_word(void);
/* Thread id a lock word names (0: none or unknowable). */
uint32_t shm_mutex_holder(const pthread_mutex_t *m);
/* 1 if thread id tid exists on this host (in our pid namespace). */
int shm_thread_exists(uint32_t tid);

#endif /* SHM_SYNC_H */
