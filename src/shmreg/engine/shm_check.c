/*
 * The invariant checker (shard lock held).  Each code sits next to its
 * message; the binding formats "{a}"/"{b}" with the values it reports.
 */
#define _GNU_SOURCE
#include "shm_engine.h"

#include <stdlib.h>
#include <string.h>

#define SHM_CHECKS(X) \
    X(1, SEQ_ODD, "seq is odd (a={a}) although no writer holds the lock") \
    X(2, WALK, "arena walk broke at offset {a} (block size {b})") \
    X(3, TOP, "top {a} beyond arena size {b}") \
    X(4, SLOT_NOT_BLOCK, "index slot {a} points at {b}, which is not the start of a block") \
    X(5, SLOT_FREE, "index slot {a} points at a FREE block at {b}") \
    X(6, SLOT_DUP, "block at {b} is referenced by two index slots (second: {a})") \
    X(7, LENGTHS, "item at {b} (slot {a}) has lengths that overflow its block") \
    X(8, WRONG_SHARD, "item at {b} (slot {a}) hashes to another shard") \
    X(9, UNREACHABLE, "item at {b} (slot {a}) is unreachable from its home slot or a duplicate key") \
    X(10, LEAK, "USED block at {a} is not referenced by the index (size {b})") \
    X(11, COUNT, "shard count {a} != {b} entries in the index") \
    X(12, TOMBS, "shard tombstones {a} != {b} in the index") \
    X(13, USED, "shard used bytes {a} != {b} in USED blocks") \
    X(14, LIST_BAD, "free list {a} holds offset {b}, which is not a FREE block") \
    X(15, LIST_CYCLE, "free list {a} is cyclic or longer than the arena") \
    X(16, FREE_UNLISTED, "FREE block at {a} is in no free list") \
    X(17, NTTL, "shard entries-with-ttl {a} != {b}") \
    X(18, FLAGS, "shard flags {a} (an index rebuild did not finish)") \
    X(19, TYPES, "item at {b} (slot {a}) has an unknown key/value type") \
    X(20, WRONG_LIST, "FREE block at {a} is in the wrong free list ({b})") \
    X(21, NOMEM, "out of memory while checking") \
    X(22, NOWNED, "shard owned entries {a} != {b}") \
    X(23, OWNER, "item at {b} (slot {a}) names an owner slot that does not exist") \
    X(24, BINMAP, "free list {a} is non-empty but its binmap bit is clear") \
    X(25, ITEM_FLAGS, "item at {b} (slot {a}) has unknown block flags") \
    X(26, GEOM, "index geometry {a} is out of range (at most {b} slots)") \
    X(27, CAP, "arena allocation {a} is not a page multiple within the limit {b}") \
    X(28, TOP_CAP, "top {a} beyond the allocated arena {b}")

#define SHM_CHECK_ENUM(code, id, msg) SHM_CHK_##id = code,
enum { SHM_CHECKS(SHM_CHECK_ENUM) SHM_CHK_END };
#undef SHM_CHECK_ENUM

const char *shm_check_message(int code) {
    switch (code) {
#define SHM_CHECK_CASE(code, id, msg) case code: return msg;
    SHM_CHECKS(SHM_CHECK_CASE)
#undef SHM_CHECK_CASE
    default: return "unknown check code {a} {b}";
    }
}

int shm_check_code_count(void) { return SHM_CHK_END - 1; }

#define FAIL(c, x, y) do { e->code = (c); e->a = (x); e->b = (y); goto out; } while (0)

void shm_check_shard(const shm_view_t *v, uint32_t si, shm_check_t *e) {
    const shm_shard_t *sh = shm_shard(v, si);
    const char *ar = shm_arena(v, si);
    const shm_ix_t g = shm_ix(v, si);
    const uint64_t *ix = g.ix;
    uint64_t *blocks = NULL, used = 0;
    uint8_t *mark = NULL;   /* 0 unseen, 1 referenced USED, 2 listed FREE */
    size_t nb = 0;
    uint32_t count = 0, tombs = 0, nttl = 0, nowned = 0;
    int r;
    e->code = 0;
    e->a = e->b = 0;
    if (shm_load_rlx(&sh->seq) & 1) FAIL(SHM_CHK_SEQ_ODD, sh->seq, 0);
    if (sh->flags) FAIL(SHM_CHK_FLAGS, sh->flags, 0);
    if (!shm_geom_ok(v, sh->geom)) FAIL(SHM_CHK_GEOM, sh->geom, v->max_slots);
    if (sh->arena_cap > v->arena_size || sh->arena_cap % SHM_PAGE) FAIL(SHM_CHK_CAP, sh->arena_cap, v->arena_size);
    if (sh->top > v->arena_size) FAIL(SHM_CHK_TOP, sh->top, v->arena_size);
    if (sh->top > sh->arena_cap) FAIL(SHM_CHK_TOP_CAP, sh->top, sh->arena_cap);
    r = shm_walk_blocks(v, si, &blocks, &nb);
    if (r == SHM_NOMEM) FAIL(SHM_CHK_NOMEM, 0, 0);
    if (r < 0) FAIL(SHM_CHK_WALK, 0, 0);
    mark = (uint8_t *)calloc(nb + 1, 1);
    if (!mark) FAIL(SHM_CHK_NOMEM, 0, 0);
    for (uint32_t i = 0; i < g.slots; i++) {
        uint64_t off = ix[i] & SHM_SLOT_OFFMASK, dummy;
        const shm_item_t *it;
        shm_key_t k;
        int64_t fpos, ins;
        size_t lo;
        if (off == SHM_SLOT_EMPTY) continue;
        if (off == SHM_SLOT_TOMB) { tombs++; continue; }
        off -= 8;
        lo = shm_block_index(blocks, nb, off);
        if (lo == nb || blocks[lo] != off) FAIL(SHM_CHK_SLOT_NOT_BLOCK, i, off);
        if (mark[lo]) FAIL(SHM_CHK_SLOT_DUP, i, off);
        mark[lo] = 1;
        it = (const shm_item_t *)(ar + off);
        if (!(it->flags & SHM_BLOCK_USED)) FAIL(SHM_CHK_SLOT_FREE, i, off);
        if (it->flags & ~(SHM_BLOCK_USED | SHM_BLOCK_REF)) FAIL(SHM_CHK_ITEM_FLAGS, i, off);
        if (SHM_ITEM_HDR + (uint64_t)it->vlen + it->klen > it->size) FAIL(SHM_CHK_LENGTHS, i, off);
        if ((it->types & 15) < 1 || (it->types & 15) > SHM_KT_MAX || (it->types >> 4) < 1 || (it->types >> 4) > SHM_VT_MAX)
            FAIL(SHM_CHK_TYPES, i, off);
        if (it->owner && shm_owner_slot(it->owner) >= SHM_NPROCS) FAIL(SHM_CHK_OWNER, i, off);
        k.p = (const unsigned char *)(ar + off + SHM_ITEM_HDR + it->vlen);
        k.n = it->klen;
        k.ktype = it->types & 15;
        shm_key_hash(v, &k);
        if (shm_shard_of(v, k.h) != si) FAIL(SHM_CHK_WRONG_SHARD, i, off);
        fpos = shm_find(v, si, &k, &dummy, &ins);
        if (fpos != (int64_t)i) FAIL(SHM_CHK_UNREACHABLE, i, off);
        count++;
        used += it->size;
        if (it->expires) nttl++;
        if (it->owner) nowned++;
    }
    for (uint32_t b = 0; b < SHM_NBINS; b++) {
        uint64_t cur = sh->bins[b], steps = 0;
        if (cur != SHM_NIL && !(sh->binmap & (1ULL << b))) FAIL(SHM_CHK_BINMAP, b, cur);
        while (cur != SHM_NIL) {
            size_t lo = shm_block_index(blocks, nb, cur);
            /* Seen in a list already: this list loops (or two lists share a tail). */
            if (lo < nb && blocks[lo] == cur && mark[lo] == 2) FAIL(SHM_CHK_LIST_CYCLE, b, cur);
            if (lo == nb || blocks[lo] != cur || mark[lo] || (((const shm_item_t *)(ar + cur))->flags & SHM_BLOCK_USED))
                FAIL(SHM_CHK_LIST_BAD, b, cur);
            if (shm_bin_of(((const shm_item_t *)(ar + cur))->size) != b) FAIL(SHM_CHK_WRONG_LIST, cur, b);
            mark[lo] = 2;
            if (++steps > nb) FAIL(SHM_CHK_LIST_CYCLE, b, 0);
            cur = *(const uint64_t *)(ar + cur + 8);
        }
    }
    for (size_t j = 0; j < nb; j++) {
        const shm_item_t *it = (const shm_item_t *)(ar + blocks[j]);
        if (it->flags & SHM_BLOCK_USED) {
            if (mark[j] != 1) FAIL(SHM_CHK_LEAK, blocks[j], it->size);
        } else if (mark[j] != 2) {
            FAIL(SHM_CHK_FREE_UNLISTED, blocks[j], 0);
        }
    }
    if (count != sh->count) FAIL(SHM_CHK_COUNT, sh->count, count);
    if (tombs != sh->tombs) FAIL(SHM_CHK_TOMBS, sh->tombs, tombs);
    if (used != sh->used) FAIL(SHM_CHK_USED, sh->used, used);
    if (nttl != sh->nttl) FAIL(SHM_CHK_NTTL, sh->nttl, nttl);
    if (nowned != sh->nowned) FAIL(SHM_CHK_NOWNED, sh->nowned, nowned);
out:
    free(mark);
    free(blocks);
}
