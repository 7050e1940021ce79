/*
 * The per-shard block allocator (shard lock held).  Blocks are carved from
 * the arena with a bump pointer (top) and recycled through 64 segregated
 * free lists; binmap says which lists may be non-empty.  All of it is
 * derived state: a repair rebuilds it from an arena walk (shm_coalesce).
 */
#define _GNU_SOURCE
#include "shm_engine.h"
#include "shm_crash.h"

#include <stdlib.h>

uint32_t shm_bin_of(uint64_t size) {
    /* 16-byte steps up to 544, then two classes per power of two. */
    uint32_t l = 0, b;
    uint64_t s;
    if (size < SHM_BLOCK_MIN) return 0;    /* never a real block; keeps a corrupt size in range */
    if (size < 544) return (uint32_t)((size - 32) >> 4);
    s = size;
    while (s > 1) { s >>= 1; l++; }
    b = 32 + (l - 9) * 2 + (uint32_t)((size >> (l - 1)) & 1);
    return b >= SHM_NBINS ? SHM_NBINS - 1 : b;
}

static inline uint64_t *next_of(char *ar, uint64_t off) { return (uint64_t *)(ar + off + 8); }

uint64_t shm_alloc_listed(shm_view_t *v, uint32_t si, uint64_t need, uint64_t below) {
    shm_shard_t *sh = shm_shard(v, si);
    char *ar = shm_arena(v, si);
    uint32_t b = shm_bin_of(need);
    uint64_t pending = sh->binmap & (~0ULL << b);
    while (pending) {
        /* Only bins that may hold blocks (binmap is a hint: a stale bit
         * costs one look at an empty list). */
        uint32_t bb = (uint32_t)shm_ctz64(pending);
        uint64_t prev = SHM_NIL, cur = sh->bins[bb];
        uint32_t steps = 0;
        pending &= pending - 1;
        if (cur == SHM_NIL) {
            sh->binmap &= ~(1ULL << bb);
            continue;
        }
        while (cur != SHM_NIL && steps < 64) {
            uint64_t size = (cur <= v->arena_size - SHM_BLOCK_MIN && !(cur & 7))
                          ? ((shm_item_t *)(ar + cur))->size : 0;
            uint64_t nxt;
            if (size < SHM_BLOCK_MIN || (size & 7) || size > v->arena_size - cur) {
                /* A damaged list (shared memory is untrusted): drop it; the
                 * next coalesce rebuilds every list from the arena walk. */
                if (prev == SHM_NIL) sh->bins[bb] = SHM_NIL;
                else *next_of(ar, prev) = SHM_NIL;
                break;
            }
            nxt = *next_of(ar, cur);
            if (size >= need && cur < below) {
                uint64_t rest = size - need;
                if (prev == SHM_NIL) sh->bins[bb] = nxt;
                else *next_of(ar, prev) = nxt;
                if (rest >= SHM_BLOCK_MIN) {
                    /* Remainder header first, then shrink the head: a walker
                     * sees either the old big block or both, never garbage. */
                    uint32_t rb = shm_bin_of(rest);
                    shm_store_rlx((uint64_t *)(ar + cur + need), shm_word0(rest, 0, 0, 0));
                    *next_of(ar, cur + need) = sh->bins[rb];
                    sh->bins[rb] = cur + need;
                    sh->binmap |= 1ULL << rb;
                    SHM_CRASH_POINT(ALLOC_SPLIT);
                    size = need;
                }
                shm_store_rlx((uint64_t *)(ar + cur), shm_word0(size, 0, 0, SHM_BLOCK_USED));
                sh->used += size;
                return cur;
            }
            if (bb > b && below == SHM_NIL) break;   /* (any block of a larger bin fits) */
            prev = cur;
            cur = nxt;
            steps++;
        }
    }
    return SHM_NIL;
}

uint64_t shm_alloc_block(shm_view_t *v, uint32_t si, uint64_t need) {
    shm_shard_t *sh = shm_shard(v, si);
    char *ar = shm_arena(v, si);
    uint64_t cur = shm_alloc_listed(v, si, need, SHM_NIL), cap = sh->arena_cap;
    if (cur != SHM_NIL) return cur;
    if (cap > v->arena_size) cap = v->arena_size;
    /* top is untrusted too: a misaligned one would carve a misaligned block. */
    if (!(sh->top & 7) && sh->top <= cap && need <= cap - sh->top) {
        cur = sh->top;
        shm_store_rlx((uint64_t *)(ar + cur), shm_word0(need, 0, 0, SHM_BLOCK_USED));
        shm_fence_rel();
        sh->top = cur + need;
        sh->used += need;
        return cur;
    }
    return SHM_NIL;
}

void shm_free_block(shm_view_t *v, uint32_t si, uint64_t off) {
    shm_shard_t *sh = shm_shard(v, si);
    char *ar = shm_arena(v, si);
    uint64_t size;
    uint32_t b;
    if ((off & 7) || off > v->arena_size - SHM_BLOCK_MIN) return;
    size = ((shm_item_t *)(ar + off))->size;
    if (size < SHM_BLOCK_MIN || (size & 7) || size > v->arena_size - off)
        return;   /* corrupt header: leave it for check()/coalesce to report, never index bins[] with it */
    shm_store_rlx((uint64_t *)(ar + off), shm_word0(size, 0, 0, 0));
    sh->used -= size;
    if (off + size == sh->top) {
        sh->top = off;
        return;
    }
    b = shm_bin_of(size);
    *next_of(ar, off) = sh->bins[b];
    sh->bins[b] = off;
    sh->binmap |= 1ULL << b;
}

int shm_walk_blocks(const shm_view_t *v, uint32_t si, uint64_t **out, size_t *nout) {
    const shm_shard_t *sh = shm_shard(v, si);
    const char *ar = shm_arena(v, si);
    uint64_t top = sh->top, pos = 0;
    size_t n = 0, cap = 256;
    uint64_t *arr;
    if (top > v->arena_size) return SHM_CORRUPT;
    arr = (uint64_t *)malloc(cap * 8);
    if (!arr) return SHM_NOMEM;
    while (pos < top) {
        uint64_t size = ((const shm_item_t *)(ar + pos))->size;
        if (size < SHM_BLOCK_MIN || (size & 7) || size > top - pos) {
            free(arr);
            return SHM_CORRUPT;
        }
        if (n == cap) {
            uint64_t *na = (uint64_t *)realloc(arr, cap * 2 * 8);
            if (!na) { free(arr); return SHM_NOMEM; }
            arr = na;
            cap *= 2;
        }
        arr[n++] = pos;
        pos += size;
    }
    *out = arr;
    *nout = n;
    return 0;
}

int shm_coalesce(shm_view_t *v, uint32_t si) {
    /* Merge neighbouring FREE blocks, give a free tail back to the bump
     * pointer and rebuild every free list from the walk. */
    shm_shard_t *sh = shm_shard(v, si);
    char *ar = shm_arena(v, si);
    uint64_t pos = 0, top = sh->top;
    if (top > v->arena_size) return SHM_CORRUPT;
    sh->n_coalesces++;
    sh->binmap = 0;
    for (uint32_t b = 0; b < SHM_NBINS; b++) sh->bins[b] = SHM_NIL;
    while (pos < top) {
        shm_item_t *it = (shm_item_t *)(ar + pos);
        uint64_t size = it->size;
        if (size < SHM_BLOCK_MIN || (size & 7) || size > top - pos) return SHM_CORRUPT;
        if (!(it->flags & SHM_BLOCK_USED)) {
            uint32_t b;
            while (pos + size < top) {
                shm_item_t *nx = (shm_item_t *)(ar + pos + size);
                uint64_t nsize = nx->size;
                if (nsize < SHM_BLOCK_MIN || (nsize & 7) || nsize > top - pos - size) return SHM_CORRUPT;
                if (nx->flags & SHM_BLOCK_USED) break;
                size += nsize;
                /* One store grows the block over its neighbour: atomic for a walker. */
                shm_store_rlx((uint64_t *)it, shm_word0(size, 0, 0, 0));
                SHM_CRASH_POINT(COALESCE_MERGED);
            }
            if (pos + size == top) {
                sh->top = pos;
                break;
            }
            b = shm_bin_of(size);
            *next_of(ar, pos) = sh->bins[b];
            sh->bins[b] = pos;
            sh->binmap |= 1ULL << b;
        }
        pos += size;
    }
    return 0;
}
