/*
 * Tables that grow: a shard starts with a page of index and a page of arena
 * and grows both (index resizes into the idle buffer, arena_cap raised a
 * step at a time), gives them back by compaction, and never lets a value of
 * geom in shared memory point a reader outside the shard's reservation.
 * The harness's table lives in process memory: a punch zeroes, so "given
 * back" is visible as zeros.
 */
#include "check.h"
#include "../harness.h"

static char gname[64];

static shm_key_t gkey(const th_table_t *t, unsigned i) {
    int n = snprintf(gname, sizeof gname, "grow-key-%u", i);
    return th_key(t, SHM_KT_STR, gname, (size_t)n);
}

/* Value of key i: (i * 13) % maxlen bytes, each a function of i and its
 * position, so a value moved or mixed up is caught. */
static size_t gval(unsigned i, unsigned maxlen, unsigned char *buf) {
    size_t n = (i * 13u) % maxlen;
    for (size_t j = 0; j < n; j++) buf[j] = (unsigned char)(i * 7u + j);
    return n;
}

static int put_i(th_table_t *t, unsigned i, unsigned maxlen) {
    unsigned char buf[4096];
    shm_key_t k = gkey(t, i);
    size_t n = gval(i, maxlen, buf);
    shm_val_t val = th_val(SHM_VT_BYTES, buf, n);
    return shm_put(&t->v, th_shard(t, &k), &k, &val, 0, 0, SHM_PUT_SET, 1, NULL, NULL);
}

/* 1: key i holds its value, 0: absent, -1: holds something else. */
static int has_i(th_table_t *t, unsigned i, unsigned maxlen) {
    unsigned char buf[4096];
    shm_key_t k = gkey(t, i);
    size_t n = gval(i, maxlen, buf), got;
    const char *p = th_get(t, &k, &got);
    if (!p) return 0;
    return got == n && memcmp(p, buf, n) == 0 ? 1 : -1;
}

static int all_zero(const char *p, uint64_t n) {
    for (uint64_t i = 0; i < n; i++) if (p[i]) return 0;
    return 1;
}

static uint32_t geom_slots(const th_table_t *t, uint32_t si) { return (uint32_t)shm_shard(&t->v, si)->geom; }
static unsigned geom_sel(const th_table_t *t, uint32_t si) { return (unsigned)(shm_shard(&t->v, si)->geom >> 32) & 1; }

TEST(grow_from_empty_through_many_resizes) {
    static th_table_t t;
    shm_shard_t *sh;
    uint32_t resizes = 0, arena_steps = 0, last_slots;
    uint64_t last_cap;
    const unsigned N = 15000;
    CHECK(th_open_grow(&t, 16000, 4 << 20, 1, 0, 1) == 0);
    sh = shm_shard(&t.v, 0);
    CHECK_EQ(geom_slots(&t, 0), t.v.init_slots);
    CHECK_EQ(t.v.init_slots, SHM_INIT_SLOTS);
    CHECK_EQ(sh->arena_cap, SHM_PAGE);
    CHECK(t.v.max_slots > 16000);
    CHECK_ALL_OK(&t);
    last_slots = geom_slots(&t, 0);
    last_cap = sh->arena_cap;
    for (unsigned i = 0; i < N; i++) {
        CHECK_EQ(put_i(&t, i, 200), SHM_OK);
        if (geom_slots(&t, 0) != last_slots) {
            /* Doubled (or capped at the limit), only when over half full. */
            CHECK(geom_slots(&t, 0) == last_slots * 2 || geom_slots(&t, 0) == t.v.max_slots);
            CHECK(sh->count > last_slots / 2);
            resizes++;
            last_slots = geom_slots(&t, 0);
            CHECK_SHARD_OK(&t.v, 0);
            /* The buffer that was live is given back (zeros here). */
            CHECK(all_zero((const char *)shm_index_buf(&t.v, 0, geom_sel(&t, 0) ^ 1), t.v.index_buf));
        }
        if (sh->arena_cap != last_cap) {
            CHECK(sh->arena_cap > last_cap);
            CHECK_EQ(sh->arena_cap % SHM_PAGE, 0);
            CHECK(sh->top <= sh->arena_cap && sh->arena_cap <= t.v.arena_size);
            arena_steps++;
            last_cap = sh->arena_cap;
            if (arena_steps % 8 == 0) CHECK_SHARD_OK(&t.v, 0);
        }
    }
    CHECK_ALL_OK(&t);
    /* Doubling at the fill limit: 512 -> 1024 -> ... -> 16384 -> the limit
     * (20520 slots): six resizes. */
    CHECK_EQ(resizes, 6);
    CHECK_EQ(geom_slots(&t, 0), t.v.max_slots);
    CHECK(arena_steps > 20);
    CHECK_EQ(sh->n_grows, resizes + arena_steps);
    CHECK_EQ(sh->count, N);
    CHECK_EQ(sh->tombs, 0);
    /* Little is allocated and unused: at most a step (1/32) plus a page. */
    CHECK(sh->arena_cap - sh->top <= sh->arena_cap / 32 + SHM_PAGE);
    /* Nothing past arena_cap was ever written. */
    CHECK(all_zero(shm_arena(&t.v, 0) + sh->arena_cap, t.v.arena_size - sh->arena_cap));
    for (unsigned i = 0; i < N; i++) CHECK_EQ(has_i(&t, i, 200), 1);
    th_close(&t);
}

TEST(grow_shards_grow_independently) {
    static th_table_t t;
    unsigned grown = 0;
    CHECK(th_open_grow(&t, 40000, 8 << 20, 4, 0, 1) == 0);
    /* Only shard 2's keys: the other shards stay at their first page. */
    for (unsigned i = 0, n = 0; n < 3000; i++) {
        shm_key_t k = gkey(&t, i);
        if (th_shard(&t, &k) != 2) continue;
        CHECK_EQ(put_i(&t, i, 64), SHM_OK);
        n++;
    }
    for (uint32_t s = 0; s < 4; s++) {
        if (s == 2) continue;
        CHECK_EQ(geom_slots(&t, s), t.v.init_slots);
        CHECK_EQ(shm_shard(&t.v, s)->arena_cap, t.v.init_arena);
        CHECK_EQ(shm_shard(&t.v, s)->n_grows, 0);
    }
    grown = geom_slots(&t, 2);
    CHECK(grown >= 4096);
    CHECK(shm_shard(&t.v, 2)->arena_cap > 64 * 3000 / 2);
    CHECK_ALL_OK(&t);
    th_close(&t);
}

TEST(grow_shrink_and_compact_return_to_initial_sizes) {
    static th_table_t t;
    shm_shard_t *sh;
    const unsigned N = 6000;
    unsigned kept = 0;
    uint64_t released = 0, used_before;
    CHECK(th_open_grow(&t, 8000, 2 << 20, 1, 0, 1) == 0);
    sh = shm_shard(&t.v, 0);
    for (unsigned i = 0; i < N; i++) CHECK_EQ(put_i(&t, i, 120), SHM_OK);
    CHECK(geom_slots(&t, 0) >= 8192);
    CHECK(sh->arena_cap > 100 * SHM_PAGE);
    /* Keep 16 entries spread over the whole arena (the last ones written lie
     * at its end: they must move down). */
    for (unsigned i = 0; i < N; i++) {
        shm_key_t k = gkey(&t, i);
        if (i % 397 == 5 || i == N - 1) { kept++; continue; }
        CHECK_EQ(shm_remove(&t.v, 0, &k, 1, 0, NULL), SHM_OK);
    }
    CHECK_EQ(sh->count, kept);
    CHECK_SHARD_OK(&t.v, 0);
    used_before = sh->used;
    CHECK_EQ(shm_compact_shard(&t.v, 0, 0, &released), SHM_OK);
    CHECK_SHARD_OK(&t.v, 0);
    /* Index back to its first size, arena back to its first page. */
    CHECK_EQ(geom_slots(&t, 0), t.v.init_slots);
    CHECK_EQ(sh->arena_cap, t.v.init_arena);
    CHECK(sh->n_moves > 0);
    CHECK(sh->n_shrinks >= 2);
    CHECK_EQ(sh->used, used_before);
    CHECK_EQ(sh->count, kept);
    CHECK(released > 100 * SHM_PAGE);
    /* What was given back is gone (zeros), the idle index buffer too. */
    CHECK(all_zero(shm_arena(&t.v, 0) + sh->arena_cap, t.v.arena_size - sh->arena_cap));
    CHECK(all_zero((const char *)shm_index_buf(&t.v, 0, geom_sel(&t, 0) ^ 1), t.v.index_buf));
    for (unsigned i = 0; i < N; i++)
        CHECK_EQ(has_i(&t, i, 120), (i % 397 == 5 || i == N - 1) ? 1 : 0);
    /* Nothing left to do: a second compaction changes nothing. */
    CHECK_EQ(shm_compact_shard(&t.v, 0, 0, &released), SHM_OK);
    CHECK_EQ(released, 0);
    /* And it grows again from there. */
    for (unsigned i = N; i < N + 3000; i++) CHECK_EQ(put_i(&t, i, 120), SHM_OK);
    CHECK_SHARD_OK(&t.v, 0);
    CHECK(geom_slots(&t, 0) >= 4096);
    for (unsigned i = N; i < N + 3000; i++) CHECK_EQ(has_i(&t, i, 120), 1);
    CHECK_EQ(has_i(&t, N - 1, 120), 1);
    th_close(&t);
}

TEST(grow_clock_bits_survive_resizes) {
    static th_table_t t;
    const unsigned N = 100;
    uint64_t off;
    int64_t ins, pos;
    uint64_t released;
    CHECK(th_open_grow(&t, 4000, 1 << 20, 1, 1, 1) == 0);
    CHECK(t.v.mark_clock);
    for (unsigned i = 0; i < N; i++) CHECK_EQ(put_i(&t, i, 40), SHM_OK);
    for (unsigned i = 0; i < N; i += 3) {
        shm_key_t k = gkey(&t, i);
        pos = shm_find(&t.v, 0, &k, &off, &ins);
        CHECK(pos >= 0);
        shm_mark_referenced(&t.v, 0, pos);
    }
    /* Grow (doubling), shrink (compaction), and a rebuild at the same size:
     * each slot keeps its CLOCK bit. */
    for (int step = 0; step < 3; step++) {
        uint32_t before = geom_slots(&t, 0);
        if (step == 0) {
            CHECK_EQ(shm_resize_index(&t.v, 0, shm_grown_slots(&t.v, before)), SHM_OK);
            CHECK(geom_slots(&t, 0) > before);
        } else if (step == 1) {
            CHECK_EQ(shm_compact_shard(&t.v, 0, 0, &released), SHM_OK);
            CHECK(geom_slots(&t, 0) < before);
        } else {
            CHECK_EQ(shm_resize_index(&t.v, 0, before), SHM_OK);
        }
        CHECK_SHARD_OK(&t.v, 0);
        for (unsigned i = 0; i < N; i++) {
            shm_key_t k = gkey(&t, i);
            pos = shm_find(&t.v, 0, &k, &off, &ins);
            CHECK(pos >= 0);
            CHECK_EQ((shm_ix(&t.v, 0).ix[pos] & SHM_SLOT_CLOCK) != 0, i % 3 == 0);
            CHECK_EQ(has_i(&t, i, 40), 1);
        }
    }
    th_close(&t);
}

TEST(grow_resize_refused_when_too_small) {
    static th_table_t t;
    shm_shard_t *sh;
    uint64_t g;
    CHECK(th_open_grow(&t, 4000, 1 << 20, 1, 0, 1) == 0);
    sh = shm_shard(&t.v, 0);
    for (unsigned i = 0; i < 500; i++) CHECK_EQ(put_i(&t, i, 30), SHM_OK);
    g = sh->geom;
    CHECK_EQ((uint32_t)g, 1024);
    /* 500 entries do not fit 256 slots (fill limit 231), nor 555 (500). */
    CHECK_EQ(shm_resize_index(&t.v, 0, 256), SHM_FULL);
    CHECK_EQ(shm_resize_index(&t.v, 0, 555), SHM_FULL);
    /* Sizes outside the reservation are refused, not clamped. */
    CHECK(shm_resize_index(&t.v, 0, 4) < 0);
    CHECK(shm_resize_index(&t.v, 0, t.v.max_slots + 1) < 0);
    CHECK_EQ(sh->geom, g);
    CHECK_EQ(sh->seq & 1, 0);
    CHECK_SHARD_OK(&t.v, 0);
    for (unsigned i = 0; i < 500; i++) CHECK_EQ(has_i(&t, i, 30), 1);
    /* 556 is just enough (fill limit 501). */
    CHECK_EQ(shm_resize_index(&t.v, 0, 556), SHM_OK);
    CHECK_EQ(geom_slots(&t, 0), 556);
    CHECK_SHARD_OK(&t.v, 0);
    for (unsigned i = 0; i < 500; i++) CHECK_EQ(has_i(&t, i, 30), 1);
    th_close(&t);
}

TEST(grow_corrupt_geom_is_clamped_into_the_reservation) {
    static th_table_t t;
    static const uint64_t bad[] = {
        0, 1, 7, 0xFFFFFFFFULL, 0x1FFFFFFFFULL, (1ULL << 33) | 512, 0xFFFFFFFFFFFFFFFFULL,
        SHM_GEOM_SEL | 3, 0x8000000000000200ULL,
    };
    CHECK(th_open_grow(&t, 4000, 1 << 20, 4, 0, 1) == 0);
    for (unsigned i = 0; i < 400; i++) CHECK_EQ(put_i(&t, i, 50), SHM_OK);
    for (uint32_t si = 0; si < 4; si++) {
        shm_shard_t *sh = shm_shard(&t.v, si);
        uint64_t good = sh->geom;
        const char *lo = (const char *)shm_index_buf(&t.v, si, 0);
        const char *hi = lo + 2 * t.v.index_buf;
        for (size_t b = 0; b < sizeof bad / sizeof bad[0]; b++) {
            shm_ix_t g;
            shm_check_t e;
            sh->geom = bad[b];
            g = shm_ix(&t.v, si);
            /* Whatever geom holds, the index a reader probes lies inside this
             * shard's two buffers. */
            CHECK(g.slots >= 8 && g.slots <= t.v.max_slots);
            CHECK((const char *)g.ix >= lo && (const char *)(g.ix + g.slots) <= hi);
            CHECK(g.max_fill < g.slots);
            /* Probes end in a status, never outside the mapping (ASan). */
            for (unsigned i = 0; i < 400; i++) {
                shm_key_t k = gkey(&t, i);
                uint64_t off;
                int64_t ins;
                if (th_shard(&t, &k) == si) (void)shm_find(&t.v, si, &k, &off, &ins);
            }
            shm_check_shard(&t.v, si, &e);
            CHECK(e.code != 0);
            if (!shm_geom_ok(&t.v, bad[b])) {
                uint64_t rel;
                CHECK_EQ(e.code, 26);     /* GEOM */
                CHECK_EQ(shm_repair_shard(&t.v, si), SHM_CORRUPT);
                CHECK_EQ(shm_resize_index(&t.v, si, t.v.init_slots), SHM_CORRUPT);
                CHECK(shm_compact_shard(&t.v, si, 1, &rel) < 0);
            }
        }
        sh->geom = good;
        CHECK_SHARD_OK(&t.v, si);
    }
    for (unsigned i = 0; i < 400; i++) CHECK_EQ(has_i(&t, i, 50), 1);
    th_close(&t);
}

TEST(grow_compaction_fills_holes_of_mixed_sizes) {
    static th_table_t t;
    shm_shard_t *sh;
    const unsigned N = 900;
    uint64_t released = 0, top_before, used_before;
    unsigned kept = 0;
    CHECK(th_open_grow(&t, 2000, 2 << 20, 1, 0, 1) == 0);
    sh = shm_shard(&t.v, 0);
    /* Values of 0 to 2000 bytes: blocks of 32 to ~2 KiB. */
    for (unsigned i = 0; i < N; i++) CHECK_EQ(put_i(&t, i, 2003), SHM_OK);
    /* Holes of every size: single small blocks, runs of 2-5 blocks that
     * coalesce, and big ones; keep the rest. */
    for (unsigned i = 0; i < N; i++) {
        shm_key_t k = gkey(&t, i);
        unsigned r = (i * 2654435761u) >> 27;    /* 0..31 */
        if (r < 14 || (i / 7) % 5 == 2) {
            CHECK_EQ(shm_remove(&t.v, 0, &k, 1, 0, NULL), SHM_OK);
        } else {
            kept++;
        }
    }
    CHECK(kept > 200 && kept < N - 200);
    CHECK_SHARD_OK(&t.v, 0);
    top_before = sh->top;
    used_before = sh->used;
    CHECK_EQ(shm_compact_shard(&t.v, 0, 1, &released), SHM_OK);
    CHECK_SHARD_OK(&t.v, 0);
    CHECK(sh->n_moves > 50);
    CHECK(sh->top < top_before);
    CHECK(released > 0);
    CHECK_EQ(sh->arena_cap, (sh->top + SHM_PAGE - 1) / SHM_PAGE * SHM_PAGE);
    /* A moved item may take a whole hole (a remainder under 32 bytes is no
     * block): used grows by those few bytes at most. */
    CHECK(sh->used >= used_before && sh->used - used_before < 24 * sh->n_moves + 1);
    for (unsigned i = 0; i < N; i++) {
        unsigned r = (i * 2654435761u) >> 27;
        CHECK_EQ(has_i(&t, i, 2003), (r < 14 || (i / 7) % 5 == 2) ? 0 : 1);
    }
    /* The free space left lies in the holes nothing fitted: the arena
     * remains usable (writes of every size succeed, checked). */
    for (unsigned i = N; i < N + 300; i++) CHECK_EQ(put_i(&t, i, 2003), SHM_OK);
    CHECK_SHARD_OK(&t.v, 0);
    th_close(&t);
}

TEST(grow_presized_table_never_grows) {
    static th_table_t t;
    shm_shard_t *sh;
    unsigned i;
    int st = SHM_OK;
    CHECK(th_open_grow(&t, 100, 16384, 1, 0, 0) == 0);
    sh = shm_shard(&t.v, 0);
    CHECK_EQ(geom_slots(&t, 0), t.v.max_slots);
    CHECK_EQ(sh->arena_cap, t.v.arena_size);
    for (i = 0; i < 10000 && st == SHM_OK; i++) st = put_i(&t, i, 100);
    CHECK_EQ(st, SHM_FULL);
    CHECK_EQ(sh->n_grows, 0);
    CHECK_EQ(geom_slots(&t, 0), t.v.max_slots);
    CHECK_EQ(sh->arena_cap, t.v.arena_size);
    CHECK_SHARD_OK(&t.v, 0);
    th_close(&t);
}

TEST(grow_at_the_limit_is_full) {
    static th_table_t t;
    shm_shard_t *sh;
    unsigned i, n = 0;
    int st = SHM_OK;
    /* A growing table stops at its limits with SHM_FULL, like a pre-sized one. */
    CHECK(th_open_grow(&t, 600, 32768, 1, 0, 1) == 0);
    sh = shm_shard(&t.v, 0);
    for (i = 0; i < 5000 && st == SHM_OK; i++) {
        st = put_i(&t, i, 100);
        if (st == SHM_OK) n++;
    }
    CHECK_EQ(st, SHM_FULL);
    CHECK_EQ(sh->arena_cap, t.v.arena_size);
    CHECK(geom_slots(&t, 0) <= t.v.max_slots);
    CHECK_EQ(sh->count, n);
    CHECK(sh->n_full >= 1);
    CHECK_SHARD_OK(&t.v, 0);
    for (i = 0; i < n; i++) CHECK_EQ(has_i(&t, i, 100), 1);
    th_close(&t);
}

TEST(grow_plan_keeps_slots_within_32_bits) {
    /* A slot count per shard is a u32 everywhere (header, geom, probes): a
     * capacity that needs more per shard is refused, not truncated into a
     * much smaller index than the limit promises. */
    static const uint64_t caps[] = { 1ULL << 20, 1ULL << 31, 3ULL << 31, 1ULL << 32, 1ULL << 33, 1ULL << 35, 1ULL << 38 };
    static const uint32_t shards[] = { 1, 8, 64, 1024 };
    for (size_t c = 0; c < sizeof caps / sizeof caps[0]; c++) {
        for (size_t s = 0; s < sizeof shards / sizeof shards[0]; s++) {
            for (int grows = 0; grows < 2; grows++) {
                shm_plan_t p;
                const char *why = NULL;
                double per = (double)caps[c] / shards[s];
                if (shm_plan(caps[c], 1 << 20, shards[s], grows, &p, &why) != 0) {
                    CHECK(why != NULL);
                    continue;
                }
                /* Accepted: the index holds the shard's share at a load of at most 0.8. */
                CHECK((double)p.slots * 0.8 >= per);
                CHECK_EQ(p.index_buf, ((uint64_t)p.slots * 8 + SHM_PAGE - 1) / SHM_PAGE * SHM_PAGE);
                CHECK(p.max_fill < p.slots && p.init_slots <= p.slots);
            }
        }
    }
    {
        shm_plan_t p;
        const char *why = NULL;
        CHECK(shm_plan(1ULL << 33, 1 << 20, 1, 1, &p, &why) != 0);
        CHECK(why != NULL);
    }
}

/* Does the union of the plan's extents cover [off, off + len)? */
static int extents_cover(const shm_plan_t *p, uint64_t off, uint64_t len) {
    uint64_t eo, el;
    for (uint64_t pos = off; pos < off + len; pos += SHM_PAGE) {
        int hit = 0;
        for (uint32_t i = 0; shm_plan_extent(p, i, &eo, &el); i++)
            if (pos >= eo && pos < eo + el) { hit = 1; break; }
        if (!hit) return 0;
    }
    return 1;
}

TEST(grow_presized_table_allocates_both_index_buffers) {
    /* A pre-sized table must not need the filesystem after creation: an
     * index rebuild (tombstones) fills the idle buffer, so both are
     * allocated up front and kept; a growing table allocates one page. */
    for (int grows = 0; grows < 2; grows++) {
        shm_plan_t p;
        const char *why;
        CHECK(shm_plan(5000, 1 << 20, 4, grows, &p, &why) == 0);
        for (uint32_t s = 0; s < p.nshards; s++) {
            uint64_t b0 = p.index_off + (uint64_t)s * 2 * p.index_buf;
            if (!grows) CHECK(extents_cover(&p, b0, p.index_buf));
            CHECK_EQ(extents_cover(&p, b0 + p.index_buf, p.index_buf), !grows);
            CHECK(extents_cover(&p, b0, ((uint64_t)p.init_slots * 8 + SHM_PAGE - 1) / SHM_PAGE * SHM_PAGE));
            CHECK(extents_cover(&p, p.arena_off + (uint64_t)s * p.arena_size, p.init_arena));
            CHECK_EQ(extents_cover(&p, p.arena_off + (uint64_t)s * p.arena_size, p.arena_size), !grows);
        }
    }
    {
        /* And its rebuilds keep both buffers (nothing punched: the old
         * slots are still there in process memory). */
        static th_table_t t;
        shm_ix_t before;
        CHECK(th_open(&t, 200, 1 << 16, 1, 0) == 0);
        for (unsigned i = 0; i < 100; i++) CHECK_EQ(put_i(&t, i, 20), SHM_OK);
        before = shm_ix(&t.v, 0);
        CHECK_EQ(shm_resize_index(&t.v, 0, before.slots), SHM_OK);
        CHECK(shm_ix(&t.v, 0).ix != before.ix);
        CHECK(!all_zero((const char *)before.ix, (uint64_t)before.slots * 8));
        CHECK_SHARD_OK(&t.v, 0);
        th_close(&t);
    }
}

/* ---- a filesystem that fills up (shm_fs_full_from) ------------------------------ */

static void fs_full_from(long n) {
    shm_fs_allocs = 0;
    shm_fs_full_from = n;
}

static int put_evict_i(th_table_t *t, unsigned i, unsigned maxlen) {
    unsigned char buf[4096];
    shm_key_t k = gkey(t, i);
    size_t n = gval(i, maxlen, buf);
    shm_val_t val = th_val(SHM_VT_BYTES, buf, n);
    return shm_put(&t->v, th_shard(t, &k), &k, &val, 0, 0, SHM_PUT_SET | SHM_PUT_EVICT, 1, NULL, NULL);
}

TEST(grow_nospace_is_an_error_and_the_shard_stays_intact) {
    static th_table_t t;
    shm_shard_t *sh;
    unsigned n = 3000, i;
    int st = SHM_OK;
    uint64_t geom, cap, released = 0;
    CHECK(th_open_grow(&t, 16000, 4 << 20, 1, 0, 1) == 0);
    sh = shm_shard(&t.v, 0);
    for (i = 0; i < n; i++) CHECK_EQ(put_i(&t, i, 200), SHM_OK);
    fs_full_from(1);
    for (; i < 20000 && st == SHM_OK; i++) {
        geom = sh->geom;
        cap = sh->arena_cap;
        st = put_i(&t, i, 200);
        if (st == SHM_OK) n++;
    }
    /* The shard could not grow: NOSPACE, nothing changed by the failed put. */
    CHECK_EQ(st, SHM_NOSPACE);
    CHECK_EQ(sh->geom, geom);
    CHECK_EQ(sh->arena_cap, cap);
    CHECK(sh->n_nospace > 0);
    CHECK_EQ(sh->count, n);
    CHECK_SHARD_OK(&t.v, 0);
    for (unsigned j = 0; j < n; j++) CHECK_EQ(has_i(&t, j, 200), 1);
    CHECK_EQ(has_i(&t, n, 200), 0);
    /* Deletes and a compaction (its index shrink needs the filesystem and
     * is skipped; its moves do not) give room back without allocating. */
    for (unsigned j = 0; j < n; j += 2) {
        shm_key_t k = gkey(&t, j);
        CHECK_EQ(shm_remove(&t.v, 0, &k, 1, 0, NULL), SHM_OK);
    }
    CHECK_EQ(shm_compact_shard(&t.v, 0, 1, &released), SHM_OK);
    CHECK(released > 0);
    CHECK_SHARD_OK(&t.v, 0);
    for (unsigned j = 0; j < n; j++) CHECK_EQ(has_i(&t, j, 200), j % 2);
    for (unsigned j = 0; j < 200; j++) CHECK_EQ(put_i(&t, 100000 + j, 200), SHM_OK);
    /* Room on the filesystem again: it grows on. */
    fs_full_from(0);
    for (unsigned j = 0; j < 8000; j++) CHECK_EQ(put_i(&t, 200000 + j, 200), SHM_OK);
    CHECK_SHARD_OK(&t.v, 0);
    for (unsigned j = 0; j < n; j++) CHECK_EQ(has_i(&t, j, 200), j % 2);
    for (unsigned j = 0; j < 8000; j++) CHECK_EQ(has_i(&t, 200000 + j, 200), 1);
    th_close(&t);
}

TEST(grow_nospace_cache_evicts_and_stays_intact) {
    static th_table_t t;
    shm_shard_t *sh;
    unsigned refused = 0;
    CHECK(th_open_grow(&t, 16000, 4 << 20, 2, 1, 1) == 0);
    for (unsigned i = 0; i < 2000; i++) CHECK_EQ(put_evict_i(&t, i, 200), SHM_OK);
    fs_full_from(1);
    for (unsigned i = 2000; i < 12000; i++) {
        int st = put_evict_i(&t, i, 200);
        CHECK(st == SHM_OK || st == SHM_NOSPACE);
        if (st == SHM_OK) CHECK_EQ(has_i(&t, i, 200), 1);
        else refused++;
        if (i % 500 == 0) CHECK_ALL_OK(&t);
    }
    fs_full_from(0);
    CHECK_ALL_OK(&t);
    sh = shm_shard(&t.v, 0);
    CHECK(sh->n_evictions + shm_shard(&t.v, 1)->n_evictions > 1000);
    CHECK(refused < 1000);
    /* Every entry still there reads as written. */
    for (unsigned i = 0; i < 12000; i++) CHECK(has_i(&t, i, 200) >= 0);
    th_close(&t);
}

TEST(grow_nospace_at_every_allocation) {
    /* The filesystem fills at the 1st, 2nd, ... allocation of a growing
     * table or cache: every put ends in a status, every shard checks out,
     * and every key reads as its last successful write or absent. */
    for (long from = 1; from <= 48; from++) {
        static th_table_t t;
        static unsigned char ok[3000];
        int cache = from & 1;
        memset(ok, 0, sizeof ok);
        CHECK(th_open_grow(&t, 4000, 1 << 20, 2, cache, 1) == 0);
        fs_full_from(from);
        for (unsigned i = 0; i < 3000; i++) {
            unsigned key = (i * 7u) % 1500;
            int st = cache ? put_evict_i(&t, key, 300) : put_i(&t, key, 300);
            if (st != SHM_OK && st != SHM_NOSPACE && st != SHM_FULL) {
                FAILF("full from %ld: put %u: status %d", from, i, st);
                fs_full_from(0);
                return;
            }
            if (st == SHM_OK) ok[key] = 1;
            if (i % 3 == 2) {
                shm_key_t k = gkey(&t, (key * 3u) % 1500);
                if (shm_remove(&t.v, th_shard(&t, &k), &k, 1, 0, NULL) == SHM_OK) ok[(key * 3u) % 1500] = 0;
            }
            if (i % 1000 == 999) {
                uint64_t rel;
                CHECK_EQ(shm_compact_shard(&t.v, i / 1000 % 2, i % 2000 == 999, &rel), SHM_OK);
            }
        }
        fs_full_from(0);
        CHECK_ALL_OK(&t);
        for (unsigned key = 0; key < 1500; key++) {
            int h = has_i(&t, key, 300);
            CHECK(h >= 0);
            if (!cache) CHECK_EQ(h, ok[key]);
            else CHECK(h <= ok[key]);
        }
        th_close(&t);
    }
}
