/*
 * Random operation sequences against a model, shared by fuzz_ops.c (every
 * op, check after each) and fuzz_crash.c (the same, plus one simulated death
 * at a crash point chosen by the input, then repair).
 *
 * Input: byte 0 geometry, byte 1 flags, then ops of a few bytes each
 * (missing bytes read as 0).  The model holds what a reader must see: an
 * entry is visible while present, unexpired at `now` and owned by nobody or
 * by a live owner.  Evictions (SHM_PUT_EVICT) may remove visible entries of
 * the written shard, at most v->last_evicted of them.
 */
#ifndef SHM_FUZZ_MODEL_H
#define SHM_FUZZ_MODEL_H

#include "../harness.h"

#define FZ_NKEYS 48
#define FZ_VMAX 1200
#define FZ_NOWNERS 4

typedef struct { const uint8_t *p; size_t n, i; } fz_in_t;
static uint8_t fz_u8(fz_in_t *in) { return in->i < in->n ? in->p[in->i++] : 0; }
static uint32_t fz_u16(fz_in_t *in) { uint32_t a = fz_u8(in); return a | ((uint32_t)fz_u8(in) << 8); }

typedef struct {
    int present, vtype;
    uint32_t n, owner;
    uint64_t expires;
    unsigned char v[FZ_VMAX];
} fz_ent_t;

typedef struct {
    fz_ent_t e[FZ_NKEYS];
    uint32_t gen[FZ_NOWNERS];
    int alive[FZ_NOWNERS];
    uint64_t now;
} fz_model_t;

typedef struct {
    th_table_t t;
    fz_model_t m;
    unsigned char kbytes[FZ_NKEYS][300];
    shm_key_t keys[FZ_NKEYS];
} fz_state_t;

static const uint32_t fz_klens[6] = { 1, 3, 8, 17, 40, 300 };

#define FZ_FAIL(...) do { fprintf(stderr, "fuzz model: " __VA_ARGS__); fputc('\n', stderr); abort(); } while (0)

static int fz_owner_alive(const fz_model_t *m, uint32_t owner) {
    uint32_t slot;
    if (!owner) return 1;
    slot = shm_owner_slot(owner);
    return slot < FZ_NOWNERS && m->alive[slot] && (m->gen[slot] & SHM_GEN_MASK) == shm_owner_gen(owner);
}

static int fz_visible(const fz_model_t *m, const fz_ent_t *e) {
    return e->present && (e->expires == 0 || e->expires > m->now) && fz_owner_alive(m, e->owner);
}

/* Open the table the input asks for; -1 if the input is unusable. */
static int fz_open(fz_state_t *s, fz_in_t *in) {
    static const uint64_t caps[4] = { 8, 32, 64, 200 };
    static const uint64_t mems[4] = { 4096, 4096, 8192, 32768 };
    uint8_t g = fz_u8(in), f = fz_u8(in);
    uint32_t shards = 1u << (g >> 4 & 3);
    memset(&s->m, 0, sizeof s->m);
    if (th_open_grow(&s->t, caps[g & 3], mems[g >> 2 & 3], shards, f & 1, (f >> 1) & 1) != 0) return -1;
    s->m.now = 1000;
    for (unsigned i = 0; i < FZ_NKEYS; i++) {
        uint32_t n = fz_klens[i % 6];
        for (uint32_t j = 0; j < n; j++) s->kbytes[i][j] = (unsigned char)(i * 31 + j * 7);
        s->keys[i] = th_key(&s->t, i & 1 ? SHM_KT_STR : SHM_KT_BYTES, s->kbytes[i], n);
    }
    for (uint32_t o = 0; o < FZ_NOWNERS; o++) {
        th_owner_new(&s->t, o);
        s->m.gen[o] = shm_proc(&s->t.v, o)->gen;
        s->m.alive[o] = 1;
    }
    return 0;
}

static uint32_t fz_kshard(const fz_state_t *s, unsigned k) { return shm_shard_of(&s->t.v, s->keys[k].h); }

/* The engine's view of key k: 1 visible (copied into *out), 0 not. */
static int fz_engine_get(fz_state_t *s, unsigned k, fz_ent_t *out) {
    uint32_t si = fz_kshard(s, k);
    uint64_t off;
    int64_t ins, pos = shm_find(&s->t.v, si, &s->keys[k], &off, &ins);
    const shm_item_t *it;
    if (pos == -2) FZ_FAIL("find on key %u: corrupt", k);
    if (pos < 0) return 0;
    it = (const shm_item_t *)(shm_arena(&s->t.v, si) + off);
    if ((it->expires && it->expires <= s->m.now) || !shm_owner_alive(&s->t.v, it->owner)) return 0;
    if (it->vlen > FZ_VMAX) FZ_FAIL("key %u: value of %u bytes was never written", k, it->vlen);
    out->present = 1;
    out->vtype = it->types >> 4;
    out->n = it->vlen;
    out->owner = it->owner;
    out->expires = it->expires;
    memcpy(out->v, (const char *)it + SHM_ITEM_HDR, it->vlen);
    return 1;
}

static int fz_same(const fz_ent_t *a, const fz_ent_t *b) {
    return a->vtype == b->vtype && a->n == b->n && a->owner == b->owner && a->expires == b->expires
        && memcmp(a->v, b->v, a->n) == 0;
}

/* The shard an op wrote passes check (every shard when all is set: the
 * callers do that every few ops and at the end, which catches a write that
 * strayed into another shard), and every key reads as the model says.
 * Keys of shard evict_shard may have been evicted (at most *budget of them;
 * -1: any number), which the model then forgets. */
static void fz_verify(fz_state_t *s, uint32_t shard, int all, int64_t evict_shard, long *budget,
                      const char *what) {
    shm_check_t e;
    uint32_t bad = shard;
    if (all ? th_check_all(&s->t, &bad, &e) : (shm_check_shard(&s->t.v, shard, &e), e.code)) {
        th_report_check(what, bad, &e);
        abort();
    }
    for (unsigned k = 0; k < FZ_NKEYS; k++) {
        fz_ent_t got;
        int vis = fz_visible(&s->m, &s->m.e[k]);
        int eng = fz_engine_get(s, k, &got);
        if (vis && !eng && (int64_t)fz_kshard(s, k) == evict_shard && *budget != 0) {
            if (*budget > 0) (*budget)--;
            s->m.e[k].present = 0;
            continue;
        }
        if (vis != eng) FZ_FAIL("%s: key %u visible: model %d, engine %d", what, k, vis, eng);
        if (vis && !fz_same(&got, &s->m.e[k]))
            FZ_FAIL("%s: key %u: value differs (model n=%u vt=%d, engine n=%u vt=%d)", what, k,
                    s->m.e[k].n, s->m.e[k].vtype, got.n, got.vtype);
    }
}

/* ---- one operation ----------------------------------------------------------- */

enum { FZ_PUT, FZ_GET, FZ_DEL, FZ_CTR, FZ_EXPIRY, FZ_TIME, FZ_PURGE, FZ_CLEAR, FZ_REAP, FZ_SNAP,
       FZ_OWNER, FZ_REBUILD, FZ_REPAIR, FZ_NOPS };

typedef struct {
    int op;
    unsigned key;
    uint32_t shard;
    int mode, evict, flag;
    fz_ent_t val;            /* PUT: the value; CAS: expect in cas */
    fz_ent_t cas;
    long long incr, dflt;
    uint64_t expires;
    uint32_t owner;
} fz_op_t;

static void fz_decode(fz_state_t *s, fz_in_t *in, fz_op_t *o) {
    uint8_t b = fz_u8(in);
    memset(o, 0, offsetof(fz_op_t, val));
    o->val.present = o->val.vtype = o->cas.present = o->cas.vtype = 0;
    o->val.n = o->cas.n = o->val.owner = o->cas.owner = 0;
    o->val.expires = o->cas.expires = 0;
    o->incr = o->dflt = 0;
    o->expires = 0;
    o->owner = 0;
    o->op = b % FZ_NOPS;
    o->key = fz_u8(in) % FZ_NKEYS;
    o->shard = fz_kshard(s, o->key);
    switch (o->op) {
    case FZ_PUT: {
        uint8_t f = fz_u8(in), fill = fz_u8(in);
        uint32_t n = fz_u16(in) % FZ_VMAX;
        o->mode = f & 3;
        if (o->mode == 3) o->mode = SHM_PUT_SET;
        o->evict = (f >> 2) & 1;
        o->val.present = 1;
        o->val.vtype = 1 + (f >> 3) % SHM_VT_MAX;
        o->val.n = f & 0x80 ? 8 : n;     /* 8-byte values: counters when vtype is int */
        for (uint32_t j = 0; j < o->val.n; j++) o->val.v[j] = (unsigned char)(fill + j * (fill | 1));
        o->val.expires = (f & 0x40) ? s->m.now + 1 + fz_u8(in) : 0;
        o->val.owner = (f & 0x20) ? shm_owner_id(fill % FZ_NOWNERS, s->m.gen[fill % FZ_NOWNERS]) : 0;
        if (o->mode == SHM_PUT_CAS) {
            /* Expect the current value (a swap that should succeed) or a wrong one. */
            o->cas = s->m.e[o->key];
            if (fill & 1) { o->cas.n = fill % 9; o->cas.vtype = SHM_VT_BYTES; memset(o->cas.v, fill, o->cas.n); }
            if (!o->cas.present) { o->cas.vtype = SHM_VT_BYTES; o->cas.n = 0; }
        }
        break;
    }
    case FZ_DEL: {
        uint8_t f = fz_u8(in);
        o->owner = f & 1 ? shm_owner_id((f >> 1) % FZ_NOWNERS, s->m.gen[(f >> 1) % FZ_NOWNERS]) : 0;
        break;
    }
    case FZ_CTR: {
        uint8_t f = fz_u8(in);
        o->incr = (int8_t)fz_u8(in);
        if (f & 1) o->incr = f & 2 ? INT64_MAX : INT64_MIN;
        o->dflt = (int8_t)fz_u8(in);
        o->expires = (f & 4) ? s->m.now + 1 + fz_u8(in) : 0;
        break;
    }
    case FZ_EXPIRY: {
        uint8_t f = fz_u8(in);
        o->expires = f == 0 ? 0 : s->m.now - 5 + f;     /* may lie in the past: expires at once */
        break;
    }
    case FZ_TIME: o->expires = fz_u8(in); break;
    case FZ_PURGE: case FZ_CLEAR: case FZ_REAP: case FZ_SNAP: case FZ_REBUILD: case FZ_REPAIR: {
        uint8_t f = fz_u8(in);
        o->shard = f % s->t.v.nsh;
        o->flag = f >> 4;
        o->owner = (f & 8) ? shm_owner_id((f >> 5) % FZ_NOWNERS, s->m.gen[(f >> 5) % FZ_NOWNERS]) : 0;
        break;
    }
    case FZ_OWNER: o->flag = fz_u8(in); break;
    default: break;
    }
}

/* Run o on the engine (no model change).  *st gets the status. */
static void fz_exec(fz_state_t *s, const fz_op_t *o, int *st, long long *res, shm_recbuf_t *rb) {
    shm_view_t *v = &s->t.v;
    const shm_key_t *k = &s->keys[o->key];
    uint32_t si = fz_kshard(s, o->key);
    switch (o->op) {
    case FZ_PUT: {
        shm_val_t val = th_val(o->val.vtype, o->val.v, o->val.n);
        shm_val_t exp = th_val(o->cas.vtype, o->cas.v, o->cas.n);
        *st = shm_put(v, si, k, &val, o->val.expires, o->val.owner, o->mode | (o->evict ? SHM_PUT_EVICT : 0),
                      s->m.now, o->mode == SHM_PUT_CAS ? &exp : NULL, o->mode == SHM_PUT_NEW ? rb : NULL);
        break;
    }
    case FZ_GET: {
        uint64_t off;
        int64_t ins, pos = shm_find(v, si, k, &off, &ins);
        if (pos >= 0 && v->mark_clock) shm_mark_referenced(v, si, pos);
        *st = pos == -2 ? SHM_CORRUPT : SHM_OK;
        break;
    }
    case FZ_DEL: *st = shm_remove(v, si, k, s->m.now, o->owner, rb); break;
    case FZ_CTR: *st = shm_counter_add(v, si, k, o->incr, o->dflt, o->expires, s->m.now, res); break;
    case FZ_EXPIRY: *st = shm_set_expiry(v, si, k, o->expires, s->m.now); break;
    case FZ_PURGE: *res = shm_purge_shard(v, o->shard, s->m.now, -1, o->flag & 1); *st = SHM_OK; break;
    case FZ_CLEAR: shm_clear_shard(v, o->shard); *st = SHM_OK; break;
    case FZ_REAP: {
        long n = 0;
        *st = shm_reap_shard(v, o->shard, o->owner, rb, o->flag & 1, &n);
        *res = n;
        break;
    }
    case FZ_SNAP: {
        size_t count = 0;
        shm_key_t prefix = *k;
        prefix.n = o->flag % 4;
        *st = shm_snap_shard(v, o->shard, s->m.now, rb, o->flag & 4 ? &prefix : NULL, &count);
        *res = (long long)count;
        break;
    }
    case FZ_REBUILD: {
        /* Index resize (same size, or the next size up) or compaction. */
        uint64_t released = 0;
        shm_ix_t g = shm_ix(v, o->shard);
        if (o->flag & 1) *st = shm_compact_shard(v, o->shard, (o->flag >> 1) & 1, &released);
        else *st = shm_resize_index(v, o->shard, (o->flag & 2) ? shm_grown_slots(v, g.slots) : g.slots);
        if (*st == SHM_OK) *st = 0;
        else if (*st == SHM_FULL && !(o->flag & 1)) *st = 0;   /* too many entries for that size: refused, unchanged */
        break;
    }
    case FZ_REPAIR: *st = shm_repair_shard(v, o->shard); break;
    default: *st = SHM_OK; break;
    }
}

/* FZ_TRACE=1 in the environment: print each op (to read a failing input). */
static void fz_trace(const fz_state_t *s, const fz_op_t *o, int st, long long res) {
    static int on = -1;
    if (on < 0) on = getenv("FZ_TRACE") != NULL;
    if (!on) return;
    fprintf(stderr, "op %d key %u shard %u mode %d evict %d flag %d: st %d res %lld | val n=%u vt=%d exp=%llu owner=%x"
            " | now %llu expires %llu owner %x incr %lld | evicted %ld\n", o->op, o->key, o->shard, o->mode, o->evict,
            o->flag, st, res, o->val.n, o->val.vtype, (unsigned long long)o->val.expires, o->val.owner,
            (unsigned long long)s->m.now, (unsigned long long)o->expires, o->owner, o->incr, s->t.v.last_evicted);
}

static int fz_is_int8(const fz_ent_t *e) { return e->vtype == SHM_VT_INT && e->n == 8; }

/* Apply o's effect to model m given the engine's status st; check what can
 * be checked (status, returned records).  Returns the shard in which
 * evictions may have happened, or -1. */
static int64_t fz_apply(fz_state_t *s, fz_model_t *m, const fz_op_t *o, int st, long long res,
                        const shm_recbuf_t *rb, int strict) {
    fz_ent_t *e = &m->e[o->key];
    int vis = fz_visible(m, e);
    switch (o->op) {
    case FZ_PUT:
        if (st == SHM_TOOBIG || st == SHM_FULL) return o->evict ? (int64_t)o->shard : -1;
        if (o->mode == SHM_PUT_NEW && vis) {
            if (strict && st != SHM_NO) FZ_FAIL("insert_new over a live entry: %d", st);
            if (strict && (rb->nrec != 1 || memcmp(rb->data + SHM_REC_HDR + s->keys[o->key].n, e->v, e->n) != 0))
                FZ_FAIL("insert_new did not return the live entry");
            return -1;
        }
        if (o->mode == SHM_PUT_CAS) {
            int match = vis && e->vtype == o->cas.vtype && e->n == o->cas.n && memcmp(e->v, o->cas.v, e->n) == 0;
            if (!match) {
                if (strict && st != SHM_NO) FZ_FAIL("CAS without a match: %d", st);
                return -1;
            }
            if (strict && st != SHM_OK) FZ_FAIL("CAS with a match: %d", st);
            e->vtype = o->val.vtype;
            e->n = o->val.n;
            memcpy(e->v, o->val.v, o->val.n);
            return o->evict ? (int64_t)o->shard : -1;    /* a swap allocates: it may evict */
        }
        if (strict && st != SHM_OK) FZ_FAIL("put: %d", st);
        *e = o->val;
        return o->evict ? (int64_t)o->shard : -1;
    case FZ_DEL:
        if (!vis) {
            if (strict && st != SHM_NO && st != SHM_NOMATCH) FZ_FAIL("remove of an absent key: %d", st);
        } else if (o->owner && e->owner != o->owner) {
            if (strict && st != SHM_NOMATCH) FZ_FAIL("remove by a non-owner: %d", st);
        } else {
            if (strict && (st != SHM_OK || (rb && rb->nrec != 1))) FZ_FAIL("remove: %d", st);
            e->present = 0;
        }
        return -1;
    case FZ_CTR: {
        long long r;
        if (vis) {
            long long cur;
            if (!fz_is_int8(e)) { if (strict && st != SHM_NOTINT) FZ_FAIL("counter on a non-int: %d", st); return -1; }
            memcpy(&cur, e->v, 8);
            if (__builtin_add_overflow(cur, o->incr, &r)) {
                if (strict && st != SHM_OVERFLOW) FZ_FAIL("counter overflow: %d", st);
                return -1;
            }
            if (strict && (st != SHM_OK || res != r)) FZ_FAIL("counter: %d, %lld != %lld", st, res, r);
            memcpy(e->v, &r, 8);
            return -1;
        }
        if (__builtin_add_overflow(o->dflt, o->incr, &r)) {
            if (strict && st != SHM_OVERFLOW) FZ_FAIL("counter default overflow: %d", st);
            return -1;
        }
        if (st == SHM_FULL) return -1;
        if (strict && st != SHM_OK) FZ_FAIL("counter create: %d", st);
        e->present = 1;
        e->vtype = SHM_VT_INT;
        e->n = 8;
        memcpy(e->v, &r, 8);
        e->owner = 0;
        e->expires = o->expires;
        return -1;
    }
    case FZ_EXPIRY:
        if (strict && st != (vis ? SHM_OK : SHM_NO)) FZ_FAIL("set_expiry: %d (visible %d)", st, vis);
        if (vis) e->expires = o->expires;
        return -1;
    case FZ_TIME: m->now += o->expires; return -1;
    case FZ_CLEAR:
        for (unsigned k = 0; k < FZ_NKEYS; k++) if (fz_kshard(s, k) == o->shard) m->e[k].present = 0;
        return -1;
    case FZ_REAP: {
        long want = 0;
        if (strict && st != SHM_OK) FZ_FAIL("reap: %d", st);
        for (unsigned k = 0; k < FZ_NKEYS; k++) {
            fz_ent_t *x = &m->e[k];
            if (fz_kshard(s, k) != o->shard || !x->present || !x->owner) continue;
            if (o->owner ? x->owner == o->owner : !fz_owner_alive(m, x->owner)) {
                want += fz_visible(m, x);
                if (o->flag & 1) x->present = 0;
            }
        }
        if (strict && res < want) FZ_FAIL("reap found %lld, the model has %ld visible", res, want);
        if (strict && rb && (long long)rb->nrec != res) FZ_FAIL("reap collected %zu of %lld", rb->nrec, res);
        return -1;
    }
    case FZ_SNAP: {
        long want = 0;
        size_t pn = o->flag & 4 ? o->flag % 4 : 0;
        if (strict && st != SHM_OK) FZ_FAIL("snap: %d", st);
        for (unsigned k = 0; k < FZ_NKEYS; k++) {
            if (fz_kshard(s, k) != o->shard || !fz_visible(m, &m->e[k])) continue;
            if (o->flag & 4) {
                if (s->keys[k].ktype != s->keys[o->key].ktype || s->keys[k].n < pn
                        || memcmp(s->keys[k].p, s->keys[o->key].p, pn) != 0)
                    continue;
            }
            want++;
        }
        if (strict && (res != want || (rb && (long long)rb->nrec != res)))
            FZ_FAIL("snap counted %lld, the model %ld", res, want);
        return -1;
    }
    case FZ_OWNER: {
        uint32_t slot = o->flag % FZ_NOWNERS;
        if (o->flag & 4) {
            th_owner_new(&s->t, slot);
            m->gen[slot] = shm_proc(&s->t.v, slot)->gen;
            m->alive[slot] = 1;
        } else {
            th_owner_kill(&s->t, slot);
            m->alive[slot] = 0;
        }
        return -1;
    }
    case FZ_REBUILD: case FZ_REPAIR:
        if (strict && st != 0) FZ_FAIL("resize/compact/repair of a healthy shard: %d", st);
        return -1;
    default:
        return -1;
    }
}

#endif /* SHM_FUZZ_MODEL_H */
