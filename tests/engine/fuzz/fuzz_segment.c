/*
 * Fuzz target (b): arbitrary bytes in a segment.  A valid table is built and
 * filled (entries with expiries and owners, free blocks, tombstones), then
 * the input patches it - header fields, process slots, shard fields, index
 * slots, arena bytes, or anywhere - and the result is attached, read
 * (find, snap), written (put, remove, counter, expiry, purge, reap) and
 * checked, repaired and checked again.  Everything must end in a status
 * code: never a crash, a hang or a sanitizer report.
 *
 * Lock words are restored after patching: garbage there may legitimately
 * make a lock wait SHM_ABANDON_MS, which tests/engine/unit/test_locks.c
 * covers instead.
 */
#include "../harness.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct { const uint8_t *p; size_t n, i; } in_t;
static uint8_t u8(in_t *in) { return in->i < in->n ? in->p[in->i++] : 0; }
static uint32_t u16(in_t *in) { uint32_t a = u8(in); return a | ((uint32_t)u8(in) << 8); }
static uint32_t u32(in_t *in) { uint32_t a = u16(in); return a | (u16(in) << 16); }

#define NK 24
static unsigned char kb[NK][24];
static size_t kn[NK];

static void save_or_restore_locks(th_table_t *t, char *save, int restore) {
    size_t n = 0;
    char *spots[2 + SHM_MAX_SHARDS];
    spots[n++] = (char *)&t->v.hdr->procs_lock;
    spots[n++] = (char *)&t->v.hdr->lease_lock;
    for (uint32_t s = 0; s < t->plan.nshards; s++) spots[n++] = (char *)&shm_shard(&t->v, s)->lock;
    for (size_t i = 0; i < n; i++) {
        if (restore) memcpy(spots[i], save + i * 64, 64);
        else memcpy(save + i * 64, spots[i], 64);
    }
}

static void prefill(th_table_t *t, uint8_t how) {
    uint32_t owner = th_owner_new(t, 0), dead = th_owner_new(t, 1);
    th_owner_kill(t, 1);
    for (unsigned i = 0; i < NK; i++) {
        shm_key_t k;
        shm_val_t val;
        char v[300];
        kn[i] = 1 + (i * 7) % 23;
        for (size_t j = 0; j < kn[i]; j++) kb[i][j] = (unsigned char)('a' + (i + j) % 26);
        k = th_key(t, i % 3 ? SHM_KT_STR : SHM_KT_BYTES, kb[i], kn[i]);
        memset(v, (int)i, sizeof v);
        val = th_val(i % 4 == 0 ? SHM_VT_INT : SHM_VT_BYTES, v, i % 4 == 0 ? 8 : (i * 37 + how) % 300);
        shm_put(&t->v, th_shard(t, &k), &k, &val, i % 5 == 1 ? 2000 : 0,
                i % 6 == 2 ? owner : (i % 6 == 3 ? dead : 0), SHM_PUT_SET | SHM_PUT_EVICT, 1000, NULL, NULL);
        if (i % 7 == 3) shm_remove(&t->v, th_shard(t, &k), &k, 1000, 0, NULL);
    }
}

static void patch(th_table_t *t, in_t *in) {
    uint8_t sel = u8(in);
    size_t len = 1 + u8(in) % 16, off, room;
    uint32_t si = u8(in) % t->plan.nshards;
    char *base = t->mem, *at;
    switch (sel % 6) {
    case 0: at = base; room = SHM_HEADER_SIZE; off = u16(in) % 512; break;
    case 1: at = base + t->plan.procs_off; room = 4 * sizeof(shm_proc_t); off = u16(in) % room; break;
    case 2: at = (char *)shm_shard(&t->v, si); room = sizeof(shm_shard_t); off = u16(in) % room; break;
    case 3: at = (char *)shm_ix(&t->v, si).ix; room = (size_t)t->plan.slots * 8; off = (u16(in) % t->plan.slots) * 8; break;
    case 4: at = shm_arena(&t->v, si); room = t->plan.arena_size; off = u16(in) % room; break;
    default: at = base; room = t->plan.total_size; off = u32(in) % room; break;
    }
    if (sel & 0x80) {
        /* A small number into an aligned 8-byte word: sizes, offsets, counts. */
        uint64_t x = u8(in);
        if (sel & 0x40) x = (uint64_t)x * 8;
        off &= ~(size_t)7;
        if (off + 8 <= room) memcpy(at + off, &x, 8);
        return;
    }
    for (size_t j = 0; j < len && off + j < room; j++) at[off + j] = (char)u8(in);
}

static void stay_clean(const shm_view_t *v, uint32_t si, const char *what) {
    shm_check_t e;
    shm_check_shard(v, si, &e);
    if (e.code) {
        th_report_check(what, si, &e);
        fprintf(stderr, "a shard that passed check failed it after a %s\n", what);
        abort();
    }
}

static void exercise(th_table_t *t, shm_view_t *v, uint8_t how) {
    for (uint32_t si = 0; si < v->nsh; si++) {
        shm_recbuf_t rb = { 0 };
        shm_check_t e;
        size_t count;
        long n = 0;
        long long res;
        int st = shm_shard_lock(v, si, 1), clean;
        if (st != SHM_OK) continue;
        shm_check_shard(v, si, &e);
        /* A shard the checker passes is a valid shard, however it was made:
         * every write must keep it passing. */
        clean = e.code == 0;
        (void)shm_snap_shard(v, si, 1000, NULL, NULL, &count);
        (void)shm_snap_shard(v, si, 1000, &rb, NULL, &count);
        for (unsigned i = 0; i < NK; i++) {
            shm_key_t k = th_key(t, i % 3 ? SHM_KT_STR : SHM_KT_BYTES, kb[i], kn[i]);
            uint64_t off;
            int64_t ins;
            char val[64];
            shm_val_t sv = th_val(SHM_VT_BYTES, val, (i * 13 + how) % 64);
            shm_key_hash(v, &k);      /* the seeds may be patched too */
            if (shm_shard_of(v, k.h) != si) continue;
            memset(val, 'v', sizeof val);
            (void)shm_find(v, si, &k, &off, &ins);
            switch ((i + how) % 6) {
            case 0: (void)shm_put(v, si, &k, &sv, 0, 0, SHM_PUT_SET | (how & 1 ? SHM_PUT_EVICT : 0), 1000, NULL, &rb); break;
            case 1: (void)shm_put(v, si, &k, &sv, 0, 0, SHM_PUT_NEW, 1000, NULL, &rb); break;
            case 2: (void)shm_remove(v, si, &k, 1000, 0, &rb); break;
            case 3: (void)shm_counter_add(v, si, &k, 1, 0, 0, 1000, &res); break;
            case 4: (void)shm_set_expiry(v, si, &k, 3000, 1000); break;
            default: (void)shm_put(v, si, &k, &sv, 0, 0, SHM_PUT_CAS, 1000, &sv, NULL); break;
            }
            if (clean) stay_clean(v, si, "write");
        }
        (void)shm_purge_shard(v, si, 1500, -1, 1);
        if (clean) stay_clean(v, si, "purge");
        (void)shm_reap_shard(v, si, 0, &rb, 1, &n);
        if (clean) stay_clean(v, si, "reap");
        shm_check_shard(v, si, &e);
        if (shm_repair_shard(v, si) == 0) {
            /* A repair that succeeds leaves a shard that passes check?  Not
             * promised for garbage (the repair trusts the index); it must
             * only not crash.  Read it once more. */
            (void)shm_snap_shard(v, si, 1000, NULL, NULL, &count);
        }
        shm_check_shard(v, si, &e);
        shm_recbuf_free(&rb);
        shm_shard_unlock(v, si);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static th_table_t t;
    static char locks[64 * (2 + SHM_MAX_SHARDS)];
    static const uint64_t caps[4] = { 8, 40, 100, 300 };
    shm_view_t v;
    in_t in = { data, size, 0 };
    uint8_t g = u8(&in), how = u8(&in);
    int pidfds[SHM_NPROCS];
    uint32_t gens[SHM_NPROCS];
    if (th_open_grow(&t, caps[g & 3], 4096u << (g >> 2 & 1), 1u << (g >> 3 & 3), (g >> 5) & 1, (g >> 6) & 1) != 0)
        return 0;
    prefill(&t, how);
    save_or_restore_locks(&t, locks, 0);
    for (int n = 0; in.i < in.n && n < 64; n++) patch(&t, &in);
    save_or_restore_locks(&t, locks, 1);
    memset(&v, 0, sizeof v);
    for (int i = 0; i < SHM_NPROCS; i++) { pidfds[i] = -1; gens[i] = 0; }
    v.pidfds = pidfds;
    v.pidfd_gen = gens;
    if (shm_attach(&v, t.mem, t.plan.total_size) == SHM_ATTACH_OK) exercise(&t, &v, how);
    shm_close_pidfds(&v);
    th_close(&t);
    return 0;
}
