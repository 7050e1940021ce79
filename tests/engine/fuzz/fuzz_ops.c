/*
 * Fuzz target (a): random operation sequences on a small table (few shards,
 * an arena that fills and evicts), shm_check_shard on every shard after each
 * op, and every key compared with a model (fuzz_model.h).
 */
#include "fuzz_model.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static fz_state_t s;
    static fz_op_t o;
    fz_in_t in = { data, size, 0 };
    if (fz_open(&s, &in) < 0) return 0;
    for (int n = 0; in.i < in.n && n < 400; n++) {
        shm_recbuf_t rb = { 0 };
        int st = 0;
        long long res = 0;
        int64_t es;
        long budget;
        fz_decode(&s, &in, &o);
        s.t.v.last_evicted = 0;
        fz_exec(&s, &o, &st, &res, &rb);
        fz_trace(&s, &o, st, res);
        if (st == SHM_CORRUPT || st == SHM_NOMEM) FZ_FAIL("op %d: status %d on a healthy table", o.op, st);
        es = fz_apply(&s, &s.m, &o, st, res, &rb, 1);
        budget = s.t.v.last_evicted;
        shm_recbuf_free(&rb);
        fz_verify(&s, o.shard, n % 16 == 15 || in.i >= in.n, es, &budget, "ops");
    }
    {
        long none = 0;
        fz_verify(&s, 0, 1, -1, &none, "end");
    }
    th_close(&s.t);
    return 0;
}
