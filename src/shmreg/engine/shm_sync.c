/* Robust process-shared mutexes with bounded waits (see shm_sync.h). */
#define _GNU_SOURCE
#include "shm_sync.h"

#include <errno.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/stat.h>
#endif

#ifndef EOWNERDEAD
#define EOWNERDEAD 130
#endif
#ifndef ENOTRECOVERABLE
#define ENOTRECOVERABLE 131
#endif

/* The futex word of a glibc mutex: owner TID in the low 30 bits, and
 * FUTEX_OWNER_DIED (set by the kernel when the owning thread dies). */
#define SHM_FUTEX_OWNER_DIED 0x40000000u
#define SHM_FUTEX_TID_MASK 0x3fffffffu

uint64_t shm_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

int shm_have_alive_word(void) {
#if SHM_HAVE_ROBUST && defined(__linux__) && defined(__GLIBC__)
    return 1;
#else
    return 0;
#endif
}

int shm_mutex_init(pthread_mutex_t *m) {
    pthread_mutexattr_t a;
    int rc = pthread_mutexattr_init(&a);
    if (rc) return rc;
    rc = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
#if SHM_HAVE_ROBUST
    if (!rc) rc = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
#endif
    if (!rc) rc = pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
    return rc;
}

int shm_mutex_consistent(pthread_mutex_t *m) {
#if SHM_HAVE_ROBUST
    return pthread_mutex_consistent(m);
#else
    (void)m;
    return 0;
#endif
}

int shm_mutex_kind_ok(const pthread_mutex_t *m) {
#if defined(__GLIBC__)
    /* The kind a fresh shm_mutex_init writes, learnt once: a corrupted kind
     * can turn a robust mutex into one that hangs when its holder dies. */
    static int expected = -1;
    if (expected == -1) {
        pthread_mutex_t probe;
        if (shm_mutex_init(&probe) != 0) return 1;
        expected = probe.__data.__kind;
        pthread_mutex_destroy(&probe);
    }
    return __atomic_load_n(&m->__data.__kind, __ATOMIC_RELAXED) == expected;
#else
    (void)m;
    return 1;
#endif
}

uint32_t shm_mutex_holder(const pthread_mutex_t *m) {
    if (!shm_have_alive_word()) return 0;
    return __atomic_load_n((const uint32_t *)m, __ATOMIC_ACQUIRE) & SHM_FUTEX_TID_MASK;
}

int shm_mutex_held_by_live(const pthread_mutex_t *m) {
    uint32_t w = __atomic_load_n((const uint32_t *)m, __ATOMIC_ACQUIRE);
    return (w & SHM_FUTEX_TID_MASK) != 0 && !(w & SHM_FUTEX_OWNER_DIED);
}

int shm_thread_exists(uint32_t tid) {
#if defined(__linux__)
    /* /proc/TID exists for every thread (hidden from listings), zombies
     * included; a thread that exited has none. */
    char path[32];
    struct stat st;
    if (tid == 0) return 0;
    snprintf(path, sizeof path, "/proc/%u", tid);
    if (stat(path, &st) == 0) return 1;
    return errno != ENOENT;   /* no /proc, or no permission: assume it exists */
#else
    (void)tid;
    return 1;
#endif
}

static int map_rc(int rc) {
    if (rc == 0) return 0;
    if (rc == EOWNERDEAD) return SHM_LOCK_OWNERDEAD;
    if (rc == EBUSY) return SHM_LOCK_BUSY;
    if (rc == ETIMEDOUT) return SHM_LOCK_TIMEOUT;
    return SHM_LOCK_INVALID;   /* EINVAL, ENOTRECOVERABLE, EDEADLK ...: not a sane robust mutex */
}

static long ms_since(const struct timespec *t0) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long)(t.tv_sec - t0->tv_sec) * 1000 + (t.tv_nsec - t0->tv_nsec) / 1000000;
}

int shm_mutex_lock(pthread_mutex_t *m, int try_only, long timeout_ms, uint32_t *holder) {
    int rc;
    struct timespec t0;
    long waited;
    uint32_t last_word = 0, w;
    long suspect_since = -1;   /* ms at which the word started naming a missing thread */
    if (holder) *holder = 0;
    if (!shm_mutex_kind_ok(m)) return SHM_LOCK_INVALID;
    rc = pthread_mutex_trylock(m);
    if (rc != EBUSY || try_only) return map_rc(rc);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        /* Wait in short slices, so that a lock word naming a thread that does
         * not exist (corruption: a real death sets OWNER_DIED at once) is
         * noticed in bounded time instead of hanging forever. */
#if defined(__APPLE__)
        usleep(1000);
        rc = pthread_mutex_trylock(m);
        if (rc != EBUSY) return map_rc(rc);
#else
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 100 * 1000000L;
        if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
        rc = pthread_mutex_timedlock(m, &ts);
        if (rc != ETIMEDOUT) return map_rc(rc);
#endif
        waited = ms_since(&t0);
        if (timeout_ms >= 0 && waited >= timeout_ms) return SHM_LOCK_TIMEOUT;
        if (!shm_mutex_kind_ok(m)) return SHM_LOCK_INVALID;
        if (!shm_have_alive_word()) continue;
        w = __atomic_load_n((const uint32_t *)m, __ATOMIC_ACQUIRE);
        if (w != last_word) {
            last_word = w;
            suspect_since = -1;
        }
        /* A live holder (running, slow or stopped) is never robbed. */
        if ((w & SHM_FUTEX_TID_MASK) != 0 && shm_thread_exists(w & SHM_FUTEX_TID_MASK)) {
            suspect_since = -1;
            continue;
        }
        if (suspect_since < 0) suspect_since = waited;
        else if (waited - suspect_since >= SHM_ABANDON_MS) {
            if (holder) *holder = w & SHM_FUTEX_TID_MASK;
            return SHM_LOCK_ABANDONED;
        }
    }
}

void shm_mutex_unlock(pthread_mutex_t *m) {
    pthread_mutex_unlock(m);
}
