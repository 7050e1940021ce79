/* The index: find/insert, tombstones, probe wrap-around, rebuild, eviction. */
#include "check.h"
#include "../harness.h"

static char names[4096][16];

static shm_key_t key_n(const th_table_t *t, unsigned i) {
    int n = snprintf(names[i], sizeof names[i], "key%u", i);
    return th_key(t, SHM_KT_STR, names[i], (size_t)n);
}

static uint32_t home(const th_table_t *t, const shm_key_t *k) {
    return shm_slot_home(shm_slot_tag(k->h), shm_ix(&t->v, 0).slots);
}

/* Key numbers i >= from whose home slot is want (in shard 0 of a 1-shard table). */
static unsigned key_with_home(const th_table_t *t, uint32_t want, unsigned from) {
    for (unsigned i = from; i < 4096; i++) {
        shm_key_t k = key_n(t, i);
        if (home(t, &k) == want) return i;
    }
    return 4096;
}

TEST(index_insert_find_remove) {
    th_table_t t;
    uint64_t off;
    int64_t ins;
    size_t n;
    CHECK(th_open(&t, 64, 65536, 1, 0) == 0);
    for (unsigned i = 0; i < 40; i++) {
        shm_key_t k = key_n(&t, i);
        CHECK_EQ(th_set(&t, &k, names[i], strlen(names[i])), SHM_OK);
    }
    CHECK_EQ(shm_shard(&t.v, 0)->count, 40);
    for (unsigned i = 0; i < 40; i++) {
        shm_key_t k = key_n(&t, i);
        const char *p = th_get(&t, &k, &n);
        CHECK(p != NULL);
        CHECK_EQ(n, strlen(names[i]));
        CHECK(memcmp(p, names[i], n) == 0);
    }
    {
        shm_key_t k = key_n(&t, 1000);
        CHECK_EQ(shm_find(&t.v, 0, &k, &off, &ins), -1);
        CHECK(ins >= 0);
        /* Same bytes, another key type: another key. */
        k = th_key(&t, SHM_KT_BYTES, names[3], strlen(names[3]));
        CHECK_EQ(shm_find(&t.v, 0, &k, &off, &ins), -1);
    }
    for (unsigned i = 0; i < 40; i += 2) {
        shm_key_t k = key_n(&t, i);
        CHECK_EQ(shm_remove(&t.v, 0, &k, 1, 0, NULL), SHM_OK);
        CHECK_EQ(shm_remove(&t.v, 0, &k, 1, 0, NULL), SHM_NO);
    }
    CHECK_EQ(shm_shard(&t.v, 0)->count, 20);
    CHECK_ALL_OK(&t);
    th_close(&t);
}

TEST(index_tombstone_only_inside_a_probe_chain) {
    th_table_t t;
    shm_shard_t *sh;
    unsigned a, b;
    shm_key_t ka, kb;
    size_t n;
    CHECK(th_open(&t, 64, 65536, 1, 0) == 0);
    sh = shm_shard(&t.v, 0);
    a = key_with_home(&t, 10, 0);
    b = key_with_home(&t, 10, a + 1);
    CHECK(b < 4096);
    ka = key_n(&t, a);
    kb = key_n(&t, b);
    CHECK_EQ(th_set(&t, &ka, "a", 1), SHM_OK);
    CHECK_EQ(th_set(&t, &kb, "b", 1), SHM_OK);
    CHECK(th_get(&t, &kb, &n) != NULL);
    /* a's slot has b after it: a tombstone keeps b reachable. */
    CHECK_EQ(shm_remove(&t.v, 0, &ka, 1, 0, NULL), SHM_OK);
    CHECK_EQ(sh->tombs, 1);
    CHECK_EQ(shm_ix(&t.v, 0).ix[10], SHM_SLOT_TOMB);
    CHECK(th_get(&t, &kb, &n) != NULL);
    /* b's slot ends the chain: it becomes empty. */
    CHECK_EQ(shm_remove(&t.v, 0, &kb, 1, 0, NULL), SHM_OK);
    CHECK_EQ(sh->tombs, 1);
    CHECK_EQ(shm_ix(&t.v, 0).ix[11], SHM_SLOT_EMPTY);
    /* An insert reuses the tombstone. */
    CHECK_EQ(th_set(&t, &ka, "a2", 2), SHM_OK);
    CHECK_EQ(sh->tombs, 0);
    CHECK((shm_ix(&t.v, 0).ix[10] & SHM_SLOT_OFFMASK) > SHM_SLOT_TOMB);
    CHECK_ALL_OK(&t);
    th_close(&t);
}

TEST(index_probe_wraps_around) {
    th_table_t t;
    unsigned a, b, c;
    shm_key_t ka, kb, kc;
    size_t n;
    uint32_t last;
    CHECK(th_open(&t, 64, 65536, 1, 0) == 0);
    last = shm_ix(&t.v, 0).slots - 1;
    a = key_with_home(&t, last, 0);
    b = key_with_home(&t, last, a + 1);
    c = key_with_home(&t, last, b + 1);
    CHECK(c < 4096);
    ka = key_n(&t, a);
    kb = key_n(&t, b);
    kc = key_n(&t, c);
    CHECK_EQ(th_set(&t, &ka, "a", 1), SHM_OK);
    CHECK_EQ(th_set(&t, &kb, "b", 1), SHM_OK);
    CHECK_EQ(th_set(&t, &kc, "c", 1), SHM_OK);
    CHECK((shm_ix(&t.v, 0).ix[0] & SHM_SLOT_OFFMASK) > SHM_SLOT_TOMB);
    CHECK((shm_ix(&t.v, 0).ix[1] & SHM_SLOT_OFFMASK) > SHM_SLOT_TOMB);
    CHECK_ALL_OK(&t);
    CHECK_EQ(shm_remove(&t.v, 0, &ka, 1, 0, NULL), SHM_OK);
    CHECK_EQ(shm_ix(&t.v, 0).ix[last], SHM_SLOT_TOMB);   /* next slot (0) is in use */
    CHECK(th_get(&t, &kb, &n) != NULL && n == 1);
    CHECK(th_get(&t, &kc, &n) != NULL && n == 1);
    CHECK_ALL_OK(&t);
    /* A rebuild re-places them, wrapping again. */
    CHECK_EQ(shm_resize_index(&t.v, 0, shm_ix(&t.v, 0).slots), SHM_OK);
    CHECK_EQ(shm_shard(&t.v, 0)->tombs, 0);
    CHECK(th_get(&t, &kc, &n) != NULL);
    CHECK_ALL_OK(&t);
    th_close(&t);
}

TEST(index_rebuild_keeps_clock_bits_and_drops_tombstones) {
    th_table_t t;
    uint64_t off;
    int64_t ins, pos;
    CHECK(th_open(&t, 64, 65536, 1, 1) == 0);
    CHECK(t.v.mark_clock);
    for (unsigned i = 0; i < 30; i++) {
        shm_key_t k = key_n(&t, i);
        CHECK_EQ(th_set(&t, &k, "v", 1), SHM_OK);
    }
    for (unsigned i = 0; i < 30; i += 3) {
        shm_key_t k = key_n(&t, i);
        pos = shm_find(&t.v, 0, &k, &off, &ins);
        CHECK(pos >= 0);
        shm_mark_referenced(&t.v, 0, pos);
    }
    for (unsigned i = 1; i < 30; i += 3) {
        shm_key_t k = key_n(&t, i);
        CHECK_EQ(shm_remove(&t.v, 0, &k, 1, 0, NULL), SHM_OK);
    }
    CHECK_EQ(shm_resize_index(&t.v, 0, shm_ix(&t.v, 0).slots), SHM_OK);
    CHECK_EQ(shm_shard(&t.v, 0)->tombs, 0);
    CHECK_EQ(shm_shard(&t.v, 0)->count, 20);
    for (unsigned i = 0; i < 30; i++) {
        shm_key_t k = key_n(&t, i);
        pos = shm_find(&t.v, 0, &k, &off, &ins);
        if (i % 3 == 1) { CHECK_EQ(pos, -1); continue; }
        CHECK(pos >= 0);
        CHECK_EQ(!!(shm_ix(&t.v, 0).ix[pos] & SHM_SLOT_CLOCK), i % 3 == 0);
        CHECK_EQ(((shm_item_t *)(shm_arena(&t.v, 0) + off))->flags, SHM_BLOCK_USED);
    }
    CHECK_ALL_OK(&t);
    th_close(&t);
}

TEST(index_fill_limit_rebuilds_or_reports_full) {
    th_table_t t;
    shm_shard_t *sh;
    unsigned i, n = 0;
    CHECK(th_open(&t, 16, 65536, 1, 0) == 0);
    sh = shm_shard(&t.v, 0);
    for (i = 0; i < 1000; i++) {
        shm_key_t k = key_n(&t, i);
        int st = th_set(&t, &k, "v", 1);
        if (st == SHM_FULL) break;
        CHECK_EQ(st, SHM_OK);
        n++;
    }
    CHECK_EQ(n, shm_ix(&t.v, 0).max_fill);
    CHECK(sh->n_full > 0);
    /* Churn: delete the oldest, insert a new key; tombstones pile up until
     * an insert rebuilds the index. */
    for (i = 0; i < 400; i++) {
        shm_key_t k = key_n(&t, i);
        shm_key_t k2 = key_n(&t, n + i);
        CHECK_EQ(shm_remove(&t.v, 0, &k, 1, 0, NULL), SHM_OK);
        CHECK_EQ(th_set(&t, &k2, "w", 1), SHM_OK);
        CHECK_ALL_OK(&t);
    }
    CHECK(sh->n_rebuilds > 0);
    CHECK_EQ(sh->count, n);
    th_close(&t);
}

TEST(index_expired_entries_make_room_without_evict) {
    th_table_t t;
    unsigned i, n = 0;
    shm_val_t val = th_val(SHM_VT_BYTES, "v", 1);
    CHECK(th_open(&t, 16, 65536, 1, 0) == 0);
    for (i = 0; i < 1000; i++) {
        shm_key_t k = key_n(&t, i);
        int st = shm_put(&t.v, 0, &k, &val, 100, 0, SHM_PUT_SET, 10, NULL, NULL);
        if (st != SHM_OK) break;
        n++;
    }
    CHECK_EQ(n, shm_ix(&t.v, 0).max_fill);
    {
        /* At now=200 they are all expired: an insert purges instead of failing. */
        shm_key_t k = key_n(&t, 3000);
        CHECK_EQ(shm_put(&t.v, 0, &k, &val, 0, 0, SHM_PUT_SET, 200, NULL, NULL), SHM_OK);
        CHECK_EQ(shm_shard(&t.v, 0)->nttl, 0);
    }
    CHECK_ALL_OK(&t);
    th_close(&t);
}

TEST(index_clock_eviction_gives_a_second_chance) {
    th_table_t t;
    unsigned i, hot = 0;
    uint64_t off;
    int64_t ins, pos;
    char big[200];
    size_t n;
    memset(big, 'x', sizeof big);
    CHECK(th_open(&t, 64, 4096, 1, 1) == 0);
    /* Arena of 4096 bytes: about 17 items of 232 bytes. */
    for (i = 0; i < 10; i++) {
        shm_key_t k = key_n(&t, i);
        shm_val_t val = th_val(SHM_VT_BYTES, big, sizeof big);
        CHECK_EQ(shm_put(&t.v, 0, &k, &val, 0, 0, SHM_PUT_SET | SHM_PUT_EVICT, 1, NULL, NULL), SHM_OK);
    }
    {
        shm_key_t k = key_n(&t, 0);
        pos = shm_find(&t.v, 0, &k, &off, &ins);
        CHECK(pos >= 0);
        shm_mark_referenced(&t.v, 0, pos);
        hot = 0;
    }
    t.v.last_evicted = 0;
    for (i = 10; i < 40; i++) {
        shm_key_t k = key_n(&t, i);
        shm_val_t val = th_val(SHM_VT_BYTES, big, sizeof big);
        CHECK_EQ(shm_put(&t.v, 0, &k, &val, 0, 0, SHM_PUT_SET | SHM_PUT_EVICT, 1, NULL, NULL), SHM_OK);
        CHECK_ALL_OK(&t);
        if (i == 12) {
            /* The hot entry survived the first evictions (its bit was cleared instead). */
            shm_key_t kh = key_n(&t, hot);
            CHECK(th_get(&t, &kh, &n) != NULL);
        }
    }
    CHECK(t.v.last_evicted > 0);
    CHECK_EQ(shm_shard(&t.v, 0)->n_evictions, (uint64_t)t.v.last_evicted);
    /* Without SHM_PUT_EVICT a full arena is reported, nothing evicted. */
    {
        shm_key_t k = key_n(&t, 100);
        shm_val_t val = th_val(SHM_VT_BYTES, big, sizeof big);
        CHECK_EQ(shm_put(&t.v, 0, &k, &val, 0, 0, SHM_PUT_SET, 1, NULL, NULL), SHM_FULL);
        val.n = 5000;
        CHECK_EQ(shm_put(&t.v, 0, &k, &val, 0, 0, SHM_PUT_SET | SHM_PUT_EVICT, 1, NULL, NULL), SHM_TOOBIG);
    }
    th_close(&t);
}
