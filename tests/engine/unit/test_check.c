/* shm_check_shard catches each class of corruption it claims to. */
#include "check.h"
#include "../harness.h"

enum { C_SEQ_ODD = 1, C_WALK, C_TOP, C_SLOT_NOT_BLOCK, C_SLOT_FREE, C_SLOT_DUP, C_LENGTHS, C_WRONG_SHARD,
       C_UNREACHABLE, C_LEAK, C_COUNT, C_TOMBS, C_USED, C_LIST_BAD, C_LIST_CYCLE, C_FREE_UNLISTED, C_NTTL,
       C_FLAGS, C_TYPES, C_WRONG_LIST, C_NOMEM, C_NOWNED, C_OWNER, C_BINMAP, C_ITEM_FLAGS, C_GEOM, C_CAP,
       C_TOP_CAP };

static char kb[64][16];

/* A shard 0 with entries a0..a9 (one with an expiry, one owned), a freed
 * block in a free list, and one tombstone. */
static void setup(th_table_t *t, uint64_t *offs, int64_t *slots) {
    shm_val_t val = th_val(SHM_VT_BYTES, "value", 5);
    uint32_t owner;
    th_open(t, 64, 16384, 1, 0);
    owner = th_owner_new(t, 0);
    for (int i = 0; i < 12; i++) {
        int64_t ins;
        shm_key_t k;
        snprintf(kb[i], sizeof kb[i], "a%d", i);
        k = th_key(t, SHM_KT_STR, kb[i], strlen(kb[i]));
        shm_put(&t->v, 0, &k, &val, i == 1 ? 1000 : 0, i == 2 ? owner : 0, SHM_PUT_SET, 1, NULL, NULL);
        slots[i] = shm_find(&t->v, 0, &k, &offs[i], &ins);
    }
    {
        shm_key_t k = th_key(t, SHM_KT_STR, kb[5], strlen(kb[5]));
        shm_remove(&t->v, 0, &k, 1, 0, NULL);   /* a free block in a list */
    }
}

static int code_after(void (*corrupt)(th_table_t *, const uint64_t *, const int64_t *)) {
    th_table_t t;
    uint64_t offs[12];
    int64_t slots[12];
    shm_check_t e;
    setup(&t, offs, slots);
    shm_check_shard(&t.v, 0, &e);
    if (e.code) { th_close(&t); return -e.code; }
    corrupt(&t, offs, slots);
    shm_check_shard(&t.v, 0, &e);
    th_close(&t);
    return e.code;
}

#define SH(t) shm_shard(&(t)->v, 0)
#define IX(t) shm_ix(&(t)->v, 0).ix
#define IT(t, off) ((shm_item_t *)(shm_arena(&(t)->v, 0) + (off)))
#define CORRUPTION(name, body) \
    static void name(th_table_t *t, const uint64_t *o, const int64_t *s) { (void)o; (void)s; body; }

CORRUPTION(c_seq, SH(t)->seq |= 1)
CORRUPTION(c_flags, SH(t)->flags = 1)
CORRUPTION(c_top, SH(t)->top = t->v.arena_size + 64)
CORRUPTION(c_walk, IT(t, o[3])->size = 16)
CORRUPTION(c_not_block, IX(t)[s[3]] += 8)
CORRUPTION(c_slot_free, IT(t, o[3])->flags = 0)
CORRUPTION(c_dup, IX(t)[s[4]] = (IX(t)[s[4]] & ~SHM_SLOT_OFFMASK) | (o[3] + 8))
CORRUPTION(c_lengths, IT(t, o[3])->vlen = 4000)
CORRUPTION(c_types, IT(t, o[3])->types = 0x99)
CORRUPTION(c_item_flags, IT(t, o[3])->flags |= 0x40)
CORRUPTION(c_owner, IT(t, o[3])->owner = 0xfff)
CORRUPTION(c_wrong_shard_unreachable, ((char *)IT(t, o[3]))[SHM_ITEM_HDR + 5] = 'Z')
CORRUPTION(c_leak, IX(t)[s[3]] = SHM_SLOT_TOMB)
CORRUPTION(c_count, SH(t)->count += 1)
CORRUPTION(c_tombs, SH(t)->tombs += 1)
CORRUPTION(c_used, SH(t)->used += 8)
CORRUPTION(c_nttl, SH(t)->nttl = 0)
CORRUPTION(c_nowned, SH(t)->nowned = 5)
CORRUPTION(c_list_bad, SH(t)->bins[3] = o[3]; SH(t)->binmap |= 1ULL << 3)
CORRUPTION(c_list_cycle, *(uint64_t *)((char *)IT(t, o[5]) + 8) = o[5])
CORRUPTION(c_free_unlisted, for (int b = 0; b < SHM_NBINS; b++) SH(t)->bins[b] = SHM_NIL)
CORRUPTION(c_wrong_list, int b = (int)shm_bin_of(IT(t, o[5])->size); SH(t)->bins[b + 1] = SH(t)->bins[b];
           SH(t)->bins[b] = SHM_NIL; SH(t)->binmap |= 1ULL << (b + 1))
CORRUPTION(c_binmap, SH(t)->binmap = 0)
CORRUPTION(c_geom, SH(t)->geom = 4)
CORRUPTION(c_geom_sel, SH(t)->geom |= 1ULL << 40)
CORRUPTION(c_cap, SH(t)->arena_cap = SHM_PAGE + 8)
CORRUPTION(c_top_cap, SH(t)->arena_cap = 0)

TEST(check_catches_each_corruption) {
    CHECK_EQ(code_after(c_seq), C_SEQ_ODD);
    CHECK_EQ(code_after(c_flags), C_FLAGS);
    CHECK_EQ(code_after(c_top), C_TOP);
    CHECK_EQ(code_after(c_walk), C_WALK);
    CHECK_EQ(code_after(c_not_block), C_SLOT_NOT_BLOCK);
    CHECK_EQ(code_after(c_slot_free), C_SLOT_FREE);
    CHECK_EQ(code_after(c_dup), C_SLOT_DUP);
    CHECK_EQ(code_after(c_lengths), C_LENGTHS);
    CHECK_EQ(code_after(c_types), C_TYPES);
    CHECK_EQ(code_after(c_item_flags), C_ITEM_FLAGS);
    CHECK_EQ(code_after(c_owner), C_OWNER);
    {
        /* A changed key byte: another hash, so (1 shard) unreachable. */
        CHECK_EQ(code_after(c_wrong_shard_unreachable), C_UNREACHABLE);
    }
    CHECK_EQ(code_after(c_leak), C_LEAK);
    CHECK_EQ(code_after(c_count), C_COUNT);
    CHECK_EQ(code_after(c_tombs), C_TOMBS);
    CHECK_EQ(code_after(c_used), C_USED);
    CHECK_EQ(code_after(c_nttl), C_NTTL);
    CHECK_EQ(code_after(c_nowned), C_NOWNED);
    CHECK_EQ(code_after(c_list_bad), C_LIST_BAD);
    CHECK_EQ(code_after(c_list_cycle), C_LIST_CYCLE);
    CHECK_EQ(code_after(c_free_unlisted), C_FREE_UNLISTED);
    CHECK_EQ(code_after(c_wrong_list), C_WRONG_LIST);
    CHECK_EQ(code_after(c_binmap), C_BINMAP);
    CHECK_EQ(code_after(c_geom), C_GEOM);
    CHECK_EQ(code_after(c_geom_sel), C_GEOM);
    CHECK_EQ(code_after(c_cap), C_CAP);
    CHECK_EQ(code_after(c_top_cap), C_TOP_CAP);
}

TEST(check_catches_an_item_in_the_wrong_shard) {
    th_table_t t;
    shm_check_t e;
    shm_val_t val = th_val(SHM_VT_BYTES, "v", 1);
    shm_key_t k;
    CHECK(th_open(&t, 64, 16384, 2, 0) == 0);
    k = th_key(&t, SHM_KT_STR, "x", 1);
    /* Stored in the shard it does not hash to. */
    CHECK_EQ(shm_put(&t.v, th_shard(&t, &k) ^ 1, &k, &val, 0, 0, SHM_PUT_SET, 1, NULL, NULL), SHM_OK);
    shm_check_shard(&t.v, th_shard(&t, &k) ^ 1, &e);
    CHECK_EQ(e.code, C_WRONG_SHARD);
    th_close(&t);
}

TEST(check_codes_all_have_messages) {
    CHECK_EQ(shm_check_code_count(), C_TOP_CAP);
    for (int c = 1; c <= shm_check_code_count(); c++)
        CHECK(strncmp(shm_check_message(c), "unknown", 7) != 0);
}
