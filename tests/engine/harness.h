/*
 * Test harness for the engine: a table in process memory (malloc'd, so
 * ASan sees every byte past the segment), keys, simulated owners and the
 * in-process "death" used by the crash tests (a crash-point handler that
 * longjmps out of the engine).  Header-only: every test binary and fuzzer
 * includes it once.
 */
#ifndef SHM_TEST_HARNESS_H
#define SHM_TEST_HARNESS_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

#include "shm_engine.h"
#include "shm_crash.h"

typedef struct {
    shm_view_t v;
    shm_plan_t plan;
    char *mem;
    int pidfds[SHM_NPROCS];
    uint32_t pidfd_gen[SHM_NPROCS];
} th_table_t;

/* A fresh table of the given geometry (grows: starting small, growing to
 * it); 0 or -1 (plan refused).  The whole reservation is process memory
 * (the view has no file): growth allocates nothing, a punch zeroes. */
static inline int th_open_grow(th_table_t *t, uint64_t capacity, uint64_t memory, uint32_t shards,
                               int clock_bits, int grows) {
    const char *why;
    memset(t, 0, sizeof *t);
    if (shm_plan(capacity, memory, shards, grows, &t->plan, &why) != 0) return -1;
    t->mem = (char *)calloc(1, t->plan.total_size);
    if (!t->mem) abort();
    if (shm_init_segment(t->mem, &t->plan, 0x1234567890abcdefULL, 0x0fedcba987654321ULL,
                         (uint64_t)getpid(), 1, 1, clock_bits) != 0)
        abort();
    for (uint32_t i = 0; i < SHM_NPROCS; i++) { t->pidfds[i] = -1; t->pidfd_gen[i] = 0; }
    t->v.pidfds = t->pidfds;
    t->v.pidfd_gen = t->pidfd_gen;
    if (shm_attach(&t->v, t->mem, t->plan.total_size) != SHM_ATTACH_OK) abort();
    return 0;
}

static inline int th_open(th_table_t *t, uint64_t capacity, uint64_t memory, uint32_t shards, int clock_bits) {
    return th_open_grow(t, capacity, memory, shards, clock_bits, 0);
}

static inline void th_close(th_table_t *t) {
    shm_close_pidfds(&t->v);
    free(t->mem);
    t->mem = NULL;
}

/* Key over caller-owned bytes, hashed for t. */
static inline shm_key_t th_key(const th_table_t *t, unsigned ktype, const void *p, size_t n) {
    shm_key_t k;
    k.p = (const unsigned char *)p;
    k.n = n;
    k.ktype = ktype;
    shm_key_hash(&t->v, &k);
    return k;
}

static inline shm_val_t th_val(int vtype, const void *p, size_t n) {
    shm_val_t val;
    val.p = (const char *)p;
    val.n = n;
    val.vtype = vtype;
    return val;
}

static inline uint32_t th_shard(const th_table_t *t, const shm_key_t *k) { return shm_shard_of(&t->v, k->h); }

/* Set k -> val (no owner, no expiry), the plain path. */
static inline int th_set(th_table_t *t, const shm_key_t *k, const void *p, size_t n) {
    shm_val_t val = th_val(SHM_VT_BYTES, p, n);
    return shm_put(&t->v, th_shard(t, k), k, &val, 0, 0, SHM_PUT_SET, 1, NULL, NULL);
}

/* Pointer to the live value of k (NULL if absent), its length in *n. */
static inline const char *th_get(th_table_t *t, const shm_key_t *k, size_t *n) {
    uint64_t off;
    int64_t ins, pos = shm_find(&t->v, th_shard(t, k), k, &off, &ins);
    const shm_item_t *it;
    if (pos < 0) return NULL;
    it = (const shm_item_t *)(shm_arena(&t->v, th_shard(t, k)) + off);
    *n = it->vlen;
    return (const char *)it + SHM_ITEM_HDR;
}

/* Every shard's invariants; returns the first failing code (0: all hold). */
static inline int th_check_all(const th_table_t *t, uint32_t *bad_shard, shm_check_t *e) {
    for (uint32_t s = 0; s < t->v.nsh; s++) {
        shm_check_shard(&t->v, s, e);
        if (e->code) {
            if (bad_shard) *bad_shard = s;
            return e->code;
        }
    }
    return 0;
}

static inline void th_report_check(const char *where, uint32_t si, const shm_check_t *e) {
    fprintf(stderr, "%s: shard %u check code %d: %s (a=%llu b=%llu)\n", where, si, e->code,
            shm_check_message(e->code), (unsigned long long)e->a, (unsigned long long)e->b);
}

/* ---- simulated owners ---------------------------------------------------- */
/* A SELF slot's liveness is read from its mutex word alone (holder TID, and
 * the kernel's OWNER_DIED bit when that thread died), so a test can make an
 * owner live or dead by writing the word, deterministically and with no
 * thread or process. */

#define TH_OWNER_DIED 0x40000000u

static inline uint32_t th_gettid(void) { return (uint32_t)syscall(SYS_gettid); }

/* (Re)claim slot as a live SELF owner with a new generation; its owner id. */
static inline uint32_t th_owner_new(th_table_t *t, uint32_t slot) {
    shm_proc_t *p = shm_proc(&t->v, slot);
    p->gen = (p->gen + 1) & SHM_GEN_MASK;
    p->pid = (uint64_t)getpid();
    p->kind = SHM_PROC_SELF;
    p->state = SHM_PROC_LIVE;
    *(uint32_t *)&p->alive.m = th_gettid();
    return shm_owner_id(slot, p->gen);
}

/* The owner of slot dies (the kernel's OWNER_DIED on its liveness word). */
static inline void th_owner_kill(th_table_t *t, uint32_t slot) {
    shm_proc_t *p = shm_proc(&t->v, slot);
    *(uint32_t *)&p->alive.m = th_gettid() | TH_OWNER_DIED;
}

/* ---- simulated deaths ---------------------------------------------------- */

static jmp_buf th_death_jmp;
static volatile int th_death_point = -1;

static void th_death_handler(int point) {
    th_death_point = point;
    longjmp(th_death_jmp, 1);
}

static inline void th_deaths_on(void) { shm_crash_set_handler(th_death_handler); }

/* A simulated death leaks what the dead writer had malloc'd (a real death
 * frees it with the process): allocations between th_leaks_off() and
 * th_leaks_on() are not reported by LeakSanitizer. */
#if defined(__SANITIZE_ADDRESS__)
#define TH_HAVE_LSAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TH_HAVE_LSAN 1
#endif
#endif
#ifdef TH_HAVE_LSAN
#include <sanitizer/lsan_interface.h>
static inline void th_leaks_off(void) { __lsan_disable(); }
static inline void th_leaks_on(void) { __lsan_enable(); }
#else
static inline void th_leaks_off(void) {}
static inline void th_leaks_on(void) {}
#endif

#endif /* SHM_TEST_HARNESS_H */
