/* The per-shard allocator: bins, bump pointer, split, free, coalesce, binmap. */
#include "check.h"
#include "../harness.h"

static uint64_t walk_count(const shm_view_t *v, uint32_t si, int used_only) {
    uint64_t *b = NULL, n = 0;
    size_t nb = 0;
    if (shm_walk_blocks(v, si, &b, &nb) != 0) return UINT64_MAX;
    for (size_t i = 0; i < nb; i++)
        if (!used_only || (((shm_item_t *)(shm_arena(v, si) + b[i]))->flags & SHM_BLOCK_USED)) n++;
    free(b);
    return n;
}

TEST(alloc_bins_are_monotonic_and_in_range) {
    uint32_t prev = 0;
    CHECK_EQ(shm_bin_of(0), 0);
    CHECK_EQ(shm_bin_of(31), 0);
    CHECK_EQ(shm_bin_of(32), 0);
    CHECK_EQ(shm_bin_of(48), 1);
    CHECK_EQ(shm_bin_of(528), 31);
    CHECK_EQ(shm_bin_of(544), 32);
    for (uint64_t s = 32; s < (1ULL << 34); s += (s < 4096 ? 8 : s / 7 + 8)) {
        uint32_t b = shm_bin_of(s);
        CHECK(b < SHM_NBINS);
        CHECK(b >= prev);
        prev = b;
    }
    CHECK_EQ(shm_bin_of(UINT64_MAX), SHM_NBINS - 1);
}

TEST(alloc_bump_free_reuse) {
    th_table_t t;
    shm_view_t *v = &t.v;
    shm_shard_t *sh;
    uint64_t a, b, c;
    CHECK(th_open(&t, 8, 4096, 1, 0) == 0);
    sh = shm_shard(v, 0);
    a = shm_alloc_block(v, 0, 64);
    b = shm_alloc_block(v, 0, 128);
    c = shm_alloc_block(v, 0, 32);
    CHECK_EQ(a, 0);
    CHECK_EQ(b, 64);
    CHECK_EQ(c, 192);
    CHECK_EQ(sh->top, 224);
    CHECK_EQ(sh->used, 224);
    shm_free_block(v, 0, a);
    CHECK_EQ(sh->used, 160);
    CHECK_EQ(sh->bins[shm_bin_of(64)], 0);
    CHECK(sh->binmap & (1ULL << shm_bin_of(64)));
    /* Same size again: the free list, not the bump pointer. */
    CHECK_EQ(shm_alloc_block(v, 0, 64), 0);
    CHECK_EQ(sh->top, 224);
    /* Freeing the last block gives it back to the bump pointer. */
    shm_free_block(v, 0, c);
    CHECK_EQ(sh->top, 192);
    CHECK_EQ(walk_count(v, 0, 0), 2);
    th_close(&t);
}

TEST(alloc_split_puts_remainder_in_its_bin) {
    th_table_t t;
    shm_view_t *v = &t.v;
    shm_shard_t *sh;
    uint64_t a, x;
    CHECK(th_open(&t, 8, 4096, 1, 0) == 0);
    sh = shm_shard(v, 0);
    a = shm_alloc_block(v, 0, 256);
    shm_alloc_block(v, 0, 32);            /* keeps a off the top */
    shm_free_block(v, 0, a);
    x = shm_alloc_block(v, 0, 64);
    CHECK_EQ(x, a);
    CHECK_EQ(((shm_item_t *)(shm_arena(v, 0) + x))->size, 64);
    CHECK_EQ(sh->bins[shm_bin_of(192)], a + 64);
    CHECK_EQ(((shm_item_t *)(shm_arena(v, 0) + a + 64))->size, 192);
    CHECK_EQ(sh->used, 96);
    /* A remainder under SHM_BLOCK_MIN stays with the block. */
    x = shm_alloc_block(v, 0, 168);
    CHECK_EQ(x, a + 64);
    CHECK_EQ(((shm_item_t *)(shm_arena(v, 0) + x))->size, 192);
    CHECK_EQ(walk_count(v, 0, 0), 3);
    th_close(&t);
}

TEST(alloc_coalesce_merges_neighbours_and_returns_tail) {
    th_table_t t;
    shm_view_t *v = &t.v;
    shm_shard_t *sh;
    uint64_t o[6];
    CHECK(th_open(&t, 8, 4096, 1, 0) == 0);
    sh = shm_shard(v, 0);
    for (int i = 0; i < 6; i++) o[i] = shm_alloc_block(v, 0, 64);
    shm_free_block(v, 0, o[1]);
    shm_free_block(v, 0, o[2]);
    shm_free_block(v, 0, o[4]);
    CHECK_EQ(walk_count(v, 0, 0), 6);
    CHECK_EQ(shm_coalesce(v, 0), 0);
    CHECK_EQ(walk_count(v, 0, 0), 5);      /* 1+2 merged */
    CHECK_EQ(((shm_item_t *)(shm_arena(v, 0) + o[1]))->size, 128);
    CHECK_EQ(sh->bins[shm_bin_of(128)], o[1]);
    CHECK_EQ(sh->bins[shm_bin_of(64)], o[4]);
    /* The tail block and a free run before it go back to top. */
    shm_free_block(v, 0, o[5]);
    CHECK_EQ(sh->top, o[5]);
    CHECK_EQ(shm_coalesce(v, 0), 0);
    CHECK_EQ(sh->top, o[4]);
    CHECK_EQ(sh->binmap & (1ULL << shm_bin_of(64)), 0);
    th_close(&t);
}

TEST(alloc_exhausts_arena_then_recovers) {
    th_table_t t;
    shm_view_t *v = &t.v;
    uint64_t n = 0, off, offs[256];
    CHECK(th_open(&t, 8, 4096, 1, 0) == 0);
    while ((off = shm_alloc_block(v, 0, 64)) != SHM_NIL) {
        CHECK(n < 256);
        offs[n++] = off;
    }
    CHECK_EQ(n, v->arena_size / 64);
    CHECK_EQ(shm_shard(v, 0)->used, v->arena_size);
    CHECK_EQ(shm_alloc_block(v, 0, 32), SHM_NIL);
    for (uint64_t i = 0; i < n; i += 2) shm_free_block(v, 0, offs[i]);
    /* Free but fragmented: 64-byte holes, no 128. */
    CHECK_EQ(shm_alloc_block(v, 0, 128), SHM_NIL);
    CHECK(shm_alloc_block(v, 0, 64) != SHM_NIL);
    for (uint64_t i = 1; i < n; i += 2) shm_free_block(v, 0, offs[i]);
    CHECK_EQ(shm_coalesce(v, 0), 0);
    /* The reused hole (the last freed, offs[n-2]) is still allocated; all
     * before it merges into one free block, the tail went back to top. */
    CHECK_EQ(shm_shard(v, 0)->top, offs[n - 1]);
    CHECK_EQ(shm_alloc_block(v, 0, offs[n - 2]), 0);
    th_close(&t);
}

TEST(alloc_stale_binmap_bit_is_cleared) {
    th_table_t t;
    shm_view_t *v = &t.v;
    shm_shard_t *sh;
    CHECK(th_open(&t, 8, 4096, 1, 0) == 0);
    sh = shm_shard(v, 0);
    sh->binmap |= 1ULL << 5;               /* hint says bin 5 may hold blocks; it holds none */
    CHECK_EQ(shm_alloc_block(v, 0, 32), 0);
    CHECK_EQ(sh->binmap & (1ULL << 5), 0);
    th_close(&t);
}

TEST(alloc_damaged_free_list_is_dropped_not_followed) {
    th_table_t t;
    shm_view_t *v = &t.v;
    shm_shard_t *sh;
    uint64_t a;
    CHECK(th_open(&t, 8, 4096, 1, 0) == 0);
    sh = shm_shard(v, 0);
    a = shm_alloc_block(v, 0, 64);
    shm_alloc_block(v, 0, 64);
    shm_free_block(v, 0, a);
    /* The list's next pointer goes wild: past the arena, then misaligned. */
    *(uint64_t *)(shm_arena(v, 0) + a + 8) = v->arena_size + 4096;
    CHECK_EQ(shm_alloc_block(v, 0, 32), a);       /* head is fine, split */
    sh->bins[3] = 5;
    sh->binmap |= 1ULL << 3;
    CHECK(shm_alloc_block(v, 0, 80) != 5);
    CHECK_EQ(sh->bins[3], SHM_NIL);
    /* Freeing a corrupt block header leaves it alone (no bins[] from garbage). */
    *(uint32_t *)(shm_arena(v, 0) + 64) = 12;
    shm_free_block(v, 0, 64);
    CHECK_EQ(*(uint32_t *)(shm_arena(v, 0) + 64), 12);
    shm_free_block(v, 0, v->arena_size);          /* out of range: ignored */
    shm_free_block(v, 0, 3);
    th_close(&t);
}

TEST(alloc_walk_and_coalesce_refuse_a_broken_arena) {
    th_table_t t;
    shm_view_t *v = &t.v;
    uint64_t *b = NULL;
    size_t nb = 0;
    CHECK(th_open(&t, 8, 4096, 1, 0) == 0);
    shm_alloc_block(v, 0, 64);
    shm_alloc_block(v, 0, 64);
    *(uint32_t *)(shm_arena(v, 0) + 64) = 4000;   /* runs past top */
    CHECK_EQ(shm_walk_blocks(v, 0, &b, &nb), SHM_CORRUPT);
    CHECK_EQ(shm_coalesce(v, 0), SHM_CORRUPT);
    shm_shard(v, 0)->top = v->arena_size + 8;
    CHECK_EQ(shm_walk_blocks(v, 0, &b, &nb), SHM_CORRUPT);
    th_close(&t);
}
