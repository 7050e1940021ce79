/*
 * Repair after a death at every crash point: a deterministic workload runs
 * with one crash point armed (at its 1st, 2nd, ... hit); the handler longjmps
 * out of the engine, as if the writer died there with the shard locked.
 * shm_repair_shard must then leave a shard that passes shm_check_shard,
 * every committed entry intact, and the write in flight done or not done.
 */
#include "check.h"
#include "../harness.h"

#define NKEYS 120
#define VMAX 400

typedef struct { int present; size_t n; unsigned char v[VMAX]; } mval_t;
typedef struct { mval_t m[NKEYS + 1]; } model_t;   /* key NKEYS: the counter */

static char kname[NKEYS + 1][16];

static shm_key_t wkey(const th_table_t *t, unsigned i) {
    int n = i == NKEYS ? snprintf(kname[i], 16, "counter") : snprintf(kname[i], 16, "k%u", i);
    return th_key(t, SHM_KT_STR, kname[i], (size_t)n);
}

static int engine_val(th_table_t *t, unsigned i, mval_t *out) {
    shm_key_t k = wkey(t, i);
    const char *p = th_get(t, &k, &out->n);
    out->present = p != NULL;
    if (!p) return 0;
    if (out->n > VMAX) return -1;
    memcpy(out->v, p, out->n);
    return 1;
}

static int same(const mval_t *a, const mval_t *b) {
    if (a->present != b->present) return 0;
    return !a->present || (a->n == b->n && memcmp(a->v, b->v, a->n) == 0);
}

enum { OP_PUT, OP_DEL, OP_CTR, OP_CLEAR, OP_COMPACT };

/* Step i of the workload: which op on which key, and the value it writes. */
static int plan_op(int mode, unsigned i, unsigned *key, mval_t *val) {
    int op;
    if (i % 197 == 196) op = OP_CLEAR;
    else if (i % 53 == 52) op = OP_COMPACT;
    else if (i % 6 == 4) op = OP_DEL;
    else if (i % 6 == 5) op = OP_CTR;
    else op = OP_PUT;
    /* mode 0: 24 keys, values up to 400 bytes (the arena fills: coalescing);
     * mode 1: 120 keys, small values (the index fills: rebuilds). */
    *key = op == OP_CTR ? NKEYS : ((i * 2654435761u) >> 11) % (mode & 1 ? NKEYS : 24);
    val->present = 1;
    val->n = !(mode & 1) || i % 5 == 0 ? (i * 37) % VMAX : i % 17;
    for (size_t j = 0; j < val->n; j++) val->v[j] = (unsigned char)(i + j);
    return op;
}

/* Runs one op; 1 if the writer "died" inside it. */
static int do_op(th_table_t *t, int op, unsigned key, const mval_t *val, int *st) {
    shm_key_t k = wkey(t, key);
    if (setjmp(th_death_jmp)) return 1;
    if (op == OP_PUT) {
        shm_val_t sv = th_val(SHM_VT_BYTES, val->v, val->n);
        *st = shm_put(&t->v, 0, &k, &sv, 0, 0, SHM_PUT_SET, 1, NULL, NULL);
    } else if (op == OP_DEL) {
        *st = shm_remove(&t->v, 0, &k, 1, 0, NULL);
    } else if (op == OP_CTR) {
        long long r;
        *st = shm_counter_add(&t->v, 0, &k, 3, 100, 0, 1, &r);
    } else if (op == OP_COMPACT) {
        uint64_t released;
        *st = shm_compact_shard(&t->v, 0, 1, &released);
    } else {
        shm_clear_shard(&t->v, 0);
        *st = SHM_OK;
    }
    return 0;
}

static void apply(model_t *m, int op, unsigned key, const mval_t *val, int st, th_table_t *t) {
    if (op == OP_CLEAR) {
        for (unsigned i = 0; i <= NKEYS; i++) m->m[i].present = 0;
    } else if (op == OP_DEL) {
        m->m[key].present = 0;
    } else if (st == SHM_OK) {
        if (op == OP_PUT) m->m[key] = *val;
        else engine_val(t, key, &m->m[key]);   /* the counter: read back, checked below */
    }
}

/* Run the workload with point armed at its count-th hit.  Returns 1 if the
 * death happened (and everything checked out), 0 if the point was never
 * reached, -1 on a failure (reported). */
static int run_with_death(int mode, int point, long count) {
    static th_table_t t;
    static model_t m;
    int result = 0;
    long long ctr = 0;
    memset(&m, 0, sizeof m);
    /* mode bit 1: a table that starts small and grows (index and arena). */
    if ((mode & 2 ? th_open_grow(&t, 64, 16384, 1, 0, 1) : th_open(&t, 16, 4096, 1, 0)) != 0) return -1;
    th_deaths_on();
    th_death_point = -1;
    shm_crash_arm(point, count, 0);
    for (unsigned i = 0; i < 600; i++) {
        unsigned key;
        mval_t val, got, before;
        int st = 0, died, op = plan_op(mode, i, &key, &val);
        if (op == OP_CTR) {
            /* The counter's expected value: +3, or 103 when absent. */
            memcpy(&ctr, m.m[NKEYS].v, 8);
            ctr = m.m[NKEYS].present ? ctr + 3 : 103;
            val.n = 8;
            memcpy(val.v, &ctr, 8);
        }
        before = m.m[key];
        th_leaks_off();
        died = do_op(&t, op, key, &val, &st);
        th_leaks_on();
        if (died) {
            shm_check_t e;
            model_t after = m;
            if (th_death_point != point) { fprintf(stderr, "  died at %d, armed %d\n", th_death_point, point); result = -1; break; }
            if (shm_repair_shard(&t.v, 0) != 0) { fprintf(stderr, "  %s#%ld: repair failed\n", shm_crash_names[point], count); result = -1; break; }
            shm_check_shard(&t.v, 0, &e);
            if (e.code) { th_report_check(shm_crash_names[point], 0, &e); result = -1; break; }
            apply(&after, op, key, &val, SHM_OK, &t);
            for (unsigned j = 0; j <= NKEYS; j++) {
                if (engine_val(&t, j, &got) < 0) { result = -1; break; }
                if (op == OP_CLEAR) {
                    /* clear() is slot by slot: each entry gone or intact. */
                    if (got.present && !same(&got, &m.m[j])) result = -1;
                } else if (j == key) {
                    if (op == OP_CTR) {
                        mval_t newv = val;
                        if (!same(&got, &before) && !same(&got, &newv)) result = -1;
                    } else if (!same(&got, &before) && !same(&got, &after.m[j])) {
                        result = -1;
                    }
                } else if (!same(&got, &m.m[j])) {
                    result = -1;
                }
                if (result < 0) {
                    fprintf(stderr, "  %s#%ld: step %u op %d key %u: key %u has the wrong value after repair\n",
                            shm_crash_names[point], count, i, op, key, j);
                    break;
                }
            }
            if (result == 0) {
                /* The repaired shard takes writes again. */
                shm_key_t k = wkey(&t, 0);
                shm_clear_shard(&t.v, 0);
                if (th_set(&t, &k, "x", 1) != SHM_OK) result = -1;
                shm_check_shard(&t.v, 0, &e);
                if (e.code) result = -1;
                else if (result == 0) result = 1;
            }
            break;
        }
        apply(&m, op, key, &val, st, &t);
        if (op == OP_CTR && st == SHM_OK) {
            if (!same(&m.m[NKEYS], &val)) { fprintf(stderr, "  counter value wrong\n"); result = -1; break; }
        }
    }
    shm_crash_arm(-1, 0, 0);
    shm_crash_set_handler(NULL);
    th_close(&t);
    return result;
}

TEST(repair_after_death_at_every_crash_point) {
    static const long counts[] = { 1, 2, 3, 5, 8, 13, 40 };
    for (int p = 0; p < SHM_CP_COUNT; p++) {
        int reached = 0;
        for (size_t c = 0; c < 4 * sizeof counts / sizeof counts[0]; c++) {
            int r = run_with_death(c & 3, p, counts[c / 4]);
            if (r < 0) FAILF("crash point %s, hit %ld, mode %d", shm_crash_names[p], counts[c / 4], (int)(c & 3));
            CHECK(r >= 0);
            reached += r;
        }
        if (!reached) FAILF("the workload never reached crash point %s", shm_crash_names[p]);
        CHECK(reached > 0);
    }
}

TEST(repair_is_idempotent_and_keeps_a_healthy_shard) {
    th_table_t t;
    size_t n;
    CHECK(th_open(&t, 64, 16384, 2, 0) == 0);
    for (unsigned i = 0; i < 40; i++) {
        shm_key_t k = wkey(&t, i);
        CHECK_EQ(th_set(&t, &k, "abc", 3), SHM_OK);
    }
    for (uint32_t s = 0; s < t.v.nsh; s++) {
        CHECK_EQ(shm_repair_shard(&t.v, s), 0);
        CHECK_EQ(shm_repair_shard(&t.v, s), 0);
    }
    CHECK_ALL_OK(&t);
    for (unsigned i = 0; i < 40; i++) {
        shm_key_t k = wkey(&t, i);
        CHECK(th_get(&t, &k, &n) != NULL);
    }
    th_close(&t);
}

TEST(repair_refuses_an_index_slot_that_points_nowhere) {
    th_table_t t;
    shm_key_t k;
    uint64_t off;
    int64_t ins, pos;
    CHECK(th_open(&t, 16, 4096, 1, 0) == 0);
    k = wkey(&t, 1);
    CHECK_EQ(th_set(&t, &k, "abc", 3), SHM_OK);
    pos = shm_find(&t.v, 0, &k, &off, &ins);
    CHECK(pos >= 0);
    /* Not something a death can leave: a slot into the middle of a block. */
    shm_ix(&t.v, 0).ix[pos] += 8;
    CHECK_EQ(shm_repair_shard(&t.v, 0), SHM_CORRUPT);
    th_close(&t);
}
