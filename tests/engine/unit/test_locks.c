/*
 * Lock words: a word naming a thread that does not exist (corruption; a real
 * death sets OWNER_DIED) is called abandoned in bounded time and
 * shm_repair_lock restarts it; a lock held by a live thread is never
 * robbed; a holder that dies hands the lock on with a repair.
 */
#include "check.h"
#include "../harness.h"

#include <pthread.h>
#include <time.h>

/* A thread id no thread has: above any pid_max (at most 2^22). */
#define BOGUS_TID 0x3ffffff0u

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void fill(th_table_t *t) {
    for (int i = 0; i < 20; i++) {
        char kb[16];
        shm_key_t k;
        snprintf(kb, sizeof kb, "l%d", i);
        k = th_key(t, SHM_KT_STR, kb, strlen(kb));
        (void)th_set(t, &k, kb, strlen(kb));
    }
}

static int all_present(th_table_t *t) {
    for (int i = 0; i < 20; i++) {
        char kb[16];
        size_t n;
        shm_key_t k;
        snprintf(kb, sizeof kb, "l%d", i);
        k = th_key(t, SHM_KT_STR, kb, strlen(kb));
        if (!th_get(t, &k, &n)) return 0;
    }
    return 1;
}

TEST(lock_word_with_a_missing_thread_is_abandoned_then_repaired) {
    th_table_t t;
    double t0, waited;
    uint32_t holder;
    CHECK(th_open(&t, 64, 16384, 1, 0) == 0);
    fill(&t);
    *(uint32_t *)&shm_shard(&t.v, 0)->lock.m = BOGUS_TID;
    CHECK_EQ(shm_lock_state(&shm_shard(&t.v, 0)->lock.m, &holder), SHM_ABANDONED);
    CHECK_EQ(holder, BOGUS_TID);
    CHECK_EQ(shm_shard_lock(&t.v, 0, 1), SHM_BUSY);
    t0 = now_s();
    CHECK_EQ(shm_shard_lock(&t.v, 0, 0), SHM_ABANDONED);
    waited = now_s() - t0;
    /* SHM_ABANDON_MS (1 s) plus polling slices; a generous bound catches a hang. */
    CHECK(waited >= SHM_ABANDON_MS / 1000.0 * 0.9);
    CHECK(waited < 10.0);
    CHECK_EQ(shm_repair_lock(&t.v, 0), SHM_OK);
    CHECK_EQ(shm_shard_lock(&t.v, 0, 1), SHM_OK);
    CHECK_SHARD_OK(&t.v, 0);
    CHECK(all_present(&t));
    shm_shard_unlock(&t.v, 0);
    /* Nothing left to repair. */
    CHECK_EQ(shm_repair_lock(&t.v, 0), SHM_NO);
    CHECK_EQ(shm_repair_lock(&t.v, 5), SHM_NO);     /* no such shard */
    th_close(&t);
}

TEST(lock_with_a_bad_kind_is_refused_then_repaired) {
    th_table_t t;
    CHECK(th_open(&t, 64, 16384, 1, 0) == 0);
    fill(&t);
    shm_shard(&t.v, 0)->lock.m.__data.__kind = 0;   /* a plain, non-robust mutex */
    CHECK_EQ(shm_shard_lock(&t.v, 0, 0), SHM_BADLOCK);
    CHECK_EQ(shm_repair_lock(&t.v, 0), SHM_OK);
    CHECK_EQ(shm_shard_lock(&t.v, 0, 0), SHM_OK);
    shm_shard_unlock(&t.v, 0);
    CHECK(all_present(&t));
    th_close(&t);
}

typedef struct { pthread_mutex_t *m; volatile int state; int die; } holder_arg_t;

static void *hold(void *p) {
    holder_arg_t *a = (holder_arg_t *)p;
    if (pthread_mutex_lock(a->m) != 0) { a->state = -1; return NULL; }
    __atomic_store_n(&a->state, 1, __ATOMIC_RELEASE);
    if (a->die) return NULL;             /* exits holding it: the kernel marks OWNER_DIED */
    while (__atomic_load_n(&a->state, __ATOMIC_ACQUIRE) != 2) usleep(1000);
    pthread_mutex_unlock(a->m);
    return NULL;
}

TEST(lock_held_by_a_live_thread_is_never_robbed) {
    th_table_t t;
    pthread_t th;
    static holder_arg_t a;
    uint32_t word, holder;
    int robbed;
    CHECK(th_open(&t, 64, 16384, 1, 0) == 0);
    a.m = &shm_shard(&t.v, 0)->lock.m;
    a.state = 0;
    a.die = 0;
    CHECK(pthread_create(&th, NULL, hold, &a) == 0);
    while (__atomic_load_n(&a.state, __ATOMIC_ACQUIRE) == 0) usleep(1000);
    CHECK_EQ(a.state, 1);
    word = *(uint32_t *)a.m;
    CHECK_EQ(shm_lock_state(a.m, &holder), 0);
    if (shm_shard_lock(&t.v, 0, 1) != SHM_BUSY) FAILF("try-lock got a held lock");
    if (shm_repair_lock(&t.v, 0) != SHM_NO) FAILF("repair_lock did not leave a live holder's lock"); /* waits its bounded time */
    /* Still the same holder (a waiter may have added the FUTEX_WAITERS bit). */
    robbed = (*(uint32_t *)a.m & 0x3fffffffu) != (word & 0x3fffffffu);
    __atomic_store_n(&a.state, 2, __ATOMIC_RELEASE);
    pthread_join(th, NULL);
    CHECK(!robbed);
    CHECK_EQ(shm_shard_lock(&t.v, 0, 0), SHM_OK);
    shm_shard_unlock(&t.v, 0);
    th_close(&t);
}

TEST(lock_of_a_dead_holder_is_handed_on_with_a_repair) {
    th_table_t t;
    pthread_t th;
    static holder_arg_t a;
    uint64_t repairs;
    CHECK(th_open(&t, 64, 16384, 1, 0) == 0);
    fill(&t);
    repairs = shm_shard(&t.v, 0)->n_repairs;
    a.m = &shm_shard(&t.v, 0)->lock.m;
    a.state = 0;
    a.die = 1;
    CHECK(pthread_create(&th, NULL, hold, &a) == 0);
    pthread_join(th, NULL);
    CHECK_EQ(a.state, 1);
    CHECK_EQ(shm_shard_lock(&t.v, 0, 0), SHM_OK);
    CHECK_EQ(shm_shard(&t.v, 0)->n_repairs, repairs + 1);
    CHECK_SHARD_OK(&t.v, 0);
    shm_shard_unlock(&t.v, 0);
    CHECK(all_present(&t));
    th_close(&t);
}

TEST(process_table_lock_repair_frees_half_claimed_slots) {
    th_table_t t;
    CHECK(th_open(&t, 64, 16384, 1, 0) == 0);
    shm_proc(&t.v, 7)->state = SHM_PROC_CLAIMING;
    *(uint32_t *)&t.v.hdr->procs_lock.m = BOGUS_TID;
    CHECK_EQ(shm_procs_lock(&t.v, 1), SHM_BUSY);
    CHECK_EQ(shm_repair_lock(&t.v, -1), SHM_OK);
    CHECK_EQ(shm_proc(&t.v, 7)->state, SHM_PROC_FREE);
    CHECK_EQ(shm_procs_lock(&t.v, 1), SHM_OK);
    shm_procs_unlock(&t.v);
    /* The watcher lease lock: abandoned the same way, restarted. */
    *(uint32_t *)&t.v.hdr->lease_lock.m = BOGUS_TID;
    CHECK_EQ(shm_repair_lock(&t.v, -2), SHM_OK);
    CHECK_EQ(shm_repair_lock(&t.v, -3), SHM_NO);
    th_close(&t);
}
