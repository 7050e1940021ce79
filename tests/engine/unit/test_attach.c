/* shm_plan and shm_attach: every refusal of an untrusted header. */
#include "check.h"
#include "../harness.h"

TEST(plan_refuses_impossible_geometry) {
    shm_plan_t p;
    const char *why = NULL;
    CHECK_EQ(shm_plan(0, 4096, 0, 0, &p, &why), -1);
    CHECK(why != NULL);
    CHECK_EQ(shm_plan(10, 100, 0, 0, &p, &why), -1);
    CHECK_EQ(shm_plan(10, 4096, 3, 0, &p, &why), -1);
    CHECK_EQ(shm_plan(10, 4096, 2048, 0, &p, &why), -1);
    CHECK_EQ(shm_plan(1ULL << 50, 4096, 0, 0, &p, &why), -1);
    CHECK_EQ(shm_plan(10, 1ULL << 40, 1, 0, &p, &why), -1);
    CHECK_EQ(shm_plan(1000, 1 << 20, 0, 0, &p, &why), 0);
    CHECK(p.nshards >= 1 && (p.nshards & (p.nshards - 1)) == 0);
    CHECK(p.max_fill < p.slots);
    CHECK_EQ(p.total_size % 4096, 0);
    CHECK(p.arena_off + (uint64_t)p.nshards * p.arena_size <= p.total_size);
}

static int attach_patched(th_table_t *t, size_t field_off, uint64_t value, int width, size_t size) {
    shm_view_t v;
    char *copy = (char *)malloc(t->plan.total_size);
    int r;
    memcpy(copy, t->mem, t->plan.total_size);
    if (width == 4) { uint32_t x = (uint32_t)value; memcpy(copy + field_off, &x, 4); }
    else if (width == 8) memcpy(copy + field_off, &value, 8);
    memset(&v, 0, sizeof v);
    r = shm_attach(&v, copy, size);
    free(copy);
    return r;
}

#define H(f) offsetof(shm_header_t, f)

TEST(attach_reports_each_error) {
    th_table_t t;
    size_t sz;
    CHECK(th_open(&t, 100, 65536, 2, 0) == 0);
    sz = t.plan.total_size;
    CHECK_EQ(attach_patched(&t, 0, 0, 0, sz), SHM_ATTACH_OK);
    CHECK_EQ(attach_patched(&t, 0, 0, 0, 100), SHM_ATTACH_SMALL);
    CHECK_EQ(attach_patched(&t, H(magic), 0, 8, sz), SHM_ATTACH_UNINIT);
    CHECK_EQ(attach_patched(&t, H(magic), 0x1234, 8, sz), SHM_ATTACH_MAGIC);
    CHECK_EQ(attach_patched(&t, H(layout), 99, 4, sz), SHM_ATTACH_VERSION);
    CHECK_EQ(attach_patched(&t, H(shard_size), 64, 4, sz), SHM_ATTACH_BUILD);
    CHECK_EQ(attach_patched(&t, H(nprocs), 7, 4, sz), SHM_ATTACH_BUILD);
    CHECK_EQ(attach_patched(&t, H(nshards), 3, 4, sz), SHM_ATTACH_SHARDS);
    CHECK_EQ(attach_patched(&t, H(nshards), 0, 4, sz), SHM_ATTACH_SHARDS);
    CHECK_EQ(attach_patched(&t, H(shard_bits), 40, 4, sz), SHM_ATTACH_SHARDS);
    CHECK_EQ(attach_patched(&t, H(slots), 12, 4, sz), SHM_ATTACH_INDEX);
    CHECK_EQ(attach_patched(&t, H(max_fill), t.plan.slots, 4, sz), SHM_ATTACH_INDEX);
    CHECK_EQ(attach_patched(&t, H(arena_size), 100, 8, sz), SHM_ATTACH_ARENA);
    CHECK_EQ(attach_patched(&t, H(arena_size), 1ULL << 33, 8, sz), SHM_ATTACH_ARENA);
    CHECK_EQ(attach_patched(&t, H(capacity), 0, 8, sz), SHM_ATTACH_PLAN);
    CHECK_EQ(attach_patched(&t, H(slots), t.plan.slots + 8, 4, sz), SHM_ATTACH_PLAN);
    CHECK_EQ(attach_patched(&t, H(index_off), t.plan.index_off + 64, 8, sz), SHM_ATTACH_OFFSETS);
    CHECK_EQ(attach_patched(&t, H(arena_off), 0, 8, sz), SHM_ATTACH_OFFSETS);
    CHECK_EQ(attach_patched(&t, H(total_size), sz + 4096, 8, sz), SHM_ATTACH_SIZE);
    CHECK_EQ(attach_patched(&t, 0, 0, 0, sz - 4096), SHM_ATTACH_SIZE);
    /* Every code has a message. */
    for (int e = SHM_ATTACH_OK; e <= SHM_ATTACH_SIZE; e++)
        CHECK(strcmp(shm_attach_message(e), "unknown attach error") != 0);
    th_close(&t);
}

TEST(attach_fills_the_view_from_checked_values) {
    th_table_t t;
    CHECK(th_open(&t, 100, 65536, 4, 1) == 0);
    CHECK_EQ(t.v.nsh, 4);
    CHECK_EQ(t.v.max_slots, t.plan.slots);
    CHECK_EQ(t.v.arena_size, t.plan.arena_size);
    CHECK(t.v.mark_clock);
    CHECK((char *)shm_arena(&t.v, 3) + t.v.arena_size == t.mem + t.plan.arena_off + 4 * t.plan.arena_size);
    th_close(&t);
}
