/*
 * Fuzz target (c): the ops of fuzz_ops.c with one simulated death.  The
 * input picks a crash point and at which hit it fires; the handler longjmps
 * out of the engine (the writer "dies" with the shard in whatever state that
 * point leaves).  Then shm_repair_shard, shm_check_shard on every shard, and
 * every key must read as before the op or as after it (an op that deletes
 * many - clear, reap, purge, evictions - may be partly done: each entry is
 * then either intact or gone).  Then the sequence goes on, unarmed.
 */
#include "fuzz_model.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int exec_may_die(fz_state_t *s, const fz_op_t *o, int *st, long long *res, shm_recbuf_t *rb) {
    if (setjmp(th_death_jmp)) return 1;
    fz_exec(s, o, st, res, rb);
    return 0;
}

static int matches(const fz_model_t *m, const fz_ent_t *want, int eng, const fz_ent_t *got) {
    int vis = fz_visible(m, want);
    return vis == eng && (!vis || fz_same(want, got));
}

static void after_death(fz_state_t *s, const fz_op_t *o, const fz_model_t *pre) {
    static fz_model_t post;
    shm_check_t e;
    uint32_t bad;
    int r = shm_repair_shard(&s->t.v, o->shard);
    if (r != 0) FZ_FAIL("repair after a death at %s: %d", shm_crash_names[th_death_point], r);
    if (th_check_all(&s->t, &bad, &e)) {
        th_report_check(shm_crash_names[th_death_point], bad, &e);
        abort();
    }
    post = *pre;
    fz_apply(s, &post, o, SHM_OK, 0, NULL, 0);
    for (unsigned k = 0; k < FZ_NKEYS; k++) {
        fz_ent_t got;
        int eng = fz_engine_get(s, k, &got);
        int gone_ok = fz_kshard(s, k) == o->shard
            && (o->op == FZ_CLEAR || o->op == FZ_REAP || o->op == FZ_PURGE || (o->op == FZ_PUT && o->evict));
        if (matches(pre, &pre->e[k], eng, &got) || matches(pre, &post.e[k], eng, &got) || (!eng && gone_ok)) {
            if (eng) s->m.e[k] = got;
            else s->m.e[k].present = 0;
            continue;
        }
        FZ_FAIL("death at %s in op %d on key %u: key %u reads neither as before nor as after",
                shm_crash_names[th_death_point], o->op, o->key, k);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static fz_state_t s;
    static fz_op_t o;
    static fz_model_t pre;
    fz_in_t in = { data, size, 0 };
    int armed;
    if (fz_open(&s, &in) < 0) return 0;
    {
        uint8_t p = fz_u8(&in), c = fz_u8(&in);
        th_deaths_on();
        th_death_point = -1;
        shm_crash_arm(p % SHM_CP_COUNT, 1 + c % 64, 0);
        armed = 1;
    }
    for (int n = 0; in.i < in.n && n < 300; n++) {
        shm_recbuf_t rb = { 0 };
        int st = 0, died;
        long long res = 0;
        int64_t es;
        long budget;
        fz_decode(&s, &in, &o);
        s.t.v.last_evicted = 0;
        if (armed) pre = s.m;
        th_leaks_off();
        died = exec_may_die(&s, &o, &st, &res, &rb);
        th_leaks_on();
        fz_trace(&s, &o, died ? 99 : st, res);
        if (died) {
            armed = 0;
            free(rb.data);
            after_death(&s, &o, &pre);
            continue;
        }
        if (st == SHM_CORRUPT || st == SHM_NOMEM) FZ_FAIL("op %d: status %d on a healthy table", o.op, st);
        es = fz_apply(&s, &s.m, &o, st, res, &rb, 1);
        budget = s.t.v.last_evicted;
        shm_recbuf_free(&rb);
        fz_verify(&s, o.shard, n % 16 == 15 || in.i >= in.n, es, &budget, "crash");
    }
    shm_crash_arm(-1, 0, 0);
    shm_crash_set_handler(NULL);
    {
        long none = 0;
        fz_verify(&s, 0, 1, -1, &none, "end");
    }
    th_close(&s.t);
    return 0;
}
