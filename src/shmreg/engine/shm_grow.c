/*
 * Growing and shrinking a shard (shard lock held).
 *
 * The segment reserves address space for every shard at its limit (a
 * sparse file, mapped once): growing never remaps, so a process attached
 * before a growth sees it at once.  What a shard uses is allocated in the
 * file (fallocate) before any offset into it is published, so a full
 * filesystem is SHM_NOSPACE here, never a SIGBUS on a later store; what it
 * gives back is punched out of the file.
 *
 *  - The index has two buffers.  A resize fills the idle one from the live
 *    one's slots (each slot carries its hash bits: no item is read), then
 *    publishes it with one store of geom in a seqlock window.  A writer
 *    killed before that store leaves the live index untouched; after it,
 *    the new one complete.
 *  - The arena grows by raising arena_cap (allocated first); compaction
 *    moves the items at the end of the arena into free blocks further down
 *    (copy, then one publish of the new offset), then lowers arena_cap and
 *    punches the tail.  A writer killed mid-move leaves an unreferenced
 *    copy or original, which the repair frees like any other.
 */
#define _GNU_SOURCE
#include "shm_engine.h"
#include "shm_crash.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static uint64_t page_up(uint64_t n) { return (n + SHM_PAGE - 1) & ~(uint64_t)(SHM_PAGE - 1); }

long shm_fs_allocs, shm_fs_full_from;

int shm_fs_alloc(shm_view_t *v, uint64_t off, uint64_t len) {
    if (len == 0) return SHM_OK;
    /* Tests: a filesystem that fills up at a chosen allocation. */
    if (__builtin_expect(shm_fs_full_from > 0, 0) && ++shm_fs_allocs >= shm_fs_full_from) return SHM_NOSPACE;
    if (v->fd < 0) return SHM_OK;     /* process memory (tests): all there */
#ifdef __linux__
    if (fallocate(v->fd, 0, (off_t)off, (off_t)len) == 0) return SHM_OK;
    if (errno == ENOSPC || errno == EDQUOT || errno == EFBIG) return SHM_NOSPACE;
    if (errno != EOPNOTSUPP && errno != ENOSYS) return SHM_SYSERR;
#endif
    {
        /* No fallocate (macOS; some filesystems): write zeros.  The range is
         * past anything published, so nobody reads it meanwhile. */
        static const char zeros[SHM_PAGE];
        uint64_t done = 0;
        while (done < len) {
            size_t n = len - done < sizeof zeros ? (size_t)(len - done) : sizeof zeros;
            ssize_t w = pwrite(v->fd, zeros, n, (off_t)(off + done));
            if (w < 0) {
                if (errno == EINTR) continue;
                return errno == ENOSPC || errno == EDQUOT || errno == EFBIG ? SHM_NOSPACE : SHM_SYSERR;
            }
            done += (uint64_t)w;
        }
    }
    return SHM_OK;
}

void shm_fs_punch(shm_view_t *v, uint64_t off, uint64_t len) {
    /* A pre-sized table has both index buffers allocated at creation
     * (shm_plan_extent) and keeps all it has: a rebuild must not fail, nor
     * a cache evict, because the filesystem is full. */
    if (len == 0 || !v->grows) return;
    if (v->fd < 0) {
        /* Process memory: reading a punched range gives zeros, so do that. */
        memset(v->base + off, 0, len);
        return;
    }
#if defined(__linux__) && defined(FALLOC_FL_PUNCH_HOLE)
    /* Best effort: where it is not supported the memory simply stays. */
    (void)fallocate(v->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len);
#endif
}

static uint64_t buf_off(const shm_view_t *v, uint32_t si, unsigned sel) {
    return (uint64_t)((const char *)shm_index_buf(v, si, sel) - v->base);
}

void shm_punch_idle_index(shm_view_t *v, uint32_t si) {
    uint64_t g = shm_load_rlx(&shm_shard(v, si)->geom);
    shm_fs_punch(v, buf_off(v, si, (unsigned)((g >> 32) & 1) ^ 1), v->index_buf);
}

int shm_resize_index(shm_view_t *v, uint32_t si, uint32_t nslots) {
    shm_shard_t *sh = shm_shard(v, si);
    uint64_t g = shm_load_rlx(&sh->geom);
    shm_ix_t cur = shm_ix_of(v, si, g);
    unsigned sel = (unsigned)((g >> 32) & 1) ^ 1;
    uint64_t *nix = shm_index_buf(v, si, sel);
    uint32_t moved = 0, half = (sh->count + 1) / 2;
    int r;
    if (!shm_geom_ok(v, g) || nslots < 8 || nslots > v->max_slots) return SHM_CORRUPT;
    if (sh->count >= shm_fill_limit(nslots)) return SHM_FULL;
    if (v->grows && v->fd >= 0) {
        /* Punched first (a no-op unless a failed resize left data there),
         * the idle buffer's new pages come zeroed: all EMPTY already. */
        shm_fs_punch(v, buf_off(v, si, sel), v->index_buf);
        r = shm_fs_alloc(v, buf_off(v, si, sel), page_up((uint64_t)nslots * 8));
    } else {
        /* A pre-sized table allocated both buffers at creation. */
        r = v->grows ? shm_fs_alloc(v, buf_off(v, si, sel), page_up((uint64_t)nslots * 8)) : SHM_OK;
        if (r == SHM_OK)
            for (uint32_t i = 0; i < nslots; i++) shm_store_rlx(&nix[i], SHM_SLOT_EMPTY);
    }
    if (r != SHM_OK) {
        if (r == SHM_NOSPACE) sh->n_nospace++;
        return r;
    }
    for (uint32_t i = 0; i < cur.slots; i++) {
        uint64_t s = cur.ix[i], off = s & SHM_SLOT_OFFMASK;
        uint32_t pos, j;
        if (off <= SHM_SLOT_TOMB) continue;
        /* The slot alone places it: no item is read (a resize of a big
         * shard would otherwise miss the cache once per entry). */
        if (((off - 8) & 7) || off - 8 > v->arena_size - SHM_BLOCK_MIN) return SHM_CORRUPT;
        pos = shm_slot_home(s, nslots);
        for (j = 0; j < nslots && nix[pos] != SHM_SLOT_EMPTY; j++)
            if (++pos == nslots) pos = 0;
        if (j == nslots) return SHM_CORRUPT;   /* more entries than count says */
        shm_store_rlx(&nix[pos], s);
        if (++moved == half) SHM_CRASH_POINT(RESIZE_HALF);
    }
    if (moved != sh->count) return SHM_CORRUPT;
    shm_seq_begin(&sh->seq);
    shm_store_rlx(&sh->geom, nslots | ((uint64_t)sel << 32));
    sh->tombs = 0;
    SHM_CRASH_POINT(RESIZE_PUBLISHED);
    shm_seq_end(&sh->seq);
    if (nslots > cur.slots) sh->n_grows++;
    else if (nslots < cur.slots) sh->n_shrinks++;
    else sh->n_rebuilds++;
    /* The old buffer's memory goes back; a reader still probing it (it
     * will retry: seq moved) reads zeros. */
    shm_fs_punch(v, buf_off(v, si, sel ^ 1), v->index_buf);
    return SHM_OK;
}

uint32_t shm_grown_slots(const shm_view_t *v, uint32_t slots) {
    uint64_t n = (uint64_t)slots * 2;
    return n > v->max_slots ? v->max_slots : (uint32_t)n;
}

int shm_grow_arena(shm_view_t *v, uint32_t si, uint64_t need) {
    shm_shard_t *sh = shm_shard(v, si);
    uint64_t cap = sh->arena_cap, top = sh->top, ncap, step;
    int r;
    if (cap > v->arena_size || top > cap || (cap % SHM_PAGE)) return SHM_CORRUPT;
    if (need > v->arena_size - top) return SHM_FULL;
    /* Steps of 1/32 of what the shard holds: few allocations on the way up
     * (about 22 per doubling), little allocated and unused at any time. */
    step = cap / 32 > SHM_PAGE ? cap / 32 : SHM_PAGE;
    ncap = page_up(top + need > cap + step ? top + need : cap + step);
    if (ncap > v->arena_size) ncap = v->arena_size;
    r = shm_fs_alloc(v, (uint64_t)(shm_arena(v, si) - v->base) + cap, ncap - cap);
    if (r != SHM_OK) {
        if (r == SHM_NOSPACE) sh->n_nospace++;
        return r;
    }
    SHM_CRASH_POINT(ARENA_ALLOCATED);
    sh->arena_cap = ncap;
    sh->n_grows++;
    return SHM_OK;
}

typedef struct { uint64_t off, size; } hole_t;

/* Slots an index of count entries shrinks to: halved while it would stay at
 * most half full, never under the initial size. */
static uint32_t shrunk_slots(const shm_view_t *v, uint32_t slots, uint32_t count) {
    while (slots / 2 >= v->init_slots && slots / 2 >= 8 && (uint64_t)count * 8 <= slots) slots /= 2;
    return slots;
}

int shm_compact_shard(shm_view_t *v, uint32_t si, int force, uint64_t *released) {
    shm_shard_t *sh = shm_shard(v, si);
    char *ar = shm_arena(v, si);
    shm_ix_t g = shm_ix(v, si);
    uint64_t *blocks = NULL, cap = sh->arena_cap, ncap;
    hole_t *holes;
    size_t nb = 0, nh = 0, h = 0;
    uint32_t nslots;
    int r;
    *released = 0;
    /* Refuse before touching anything when the shard's geometry is off (as
     * the repair does): g is then a clamped view of no real index, and a
     * move would copy items it cannot publish. */
    if (!shm_geom_ok(v, shm_load_rlx(&sh->geom)) || cap > v->arena_size || cap % SHM_PAGE || sh->top > cap)
        return SHM_CORRUPT;
    if (!v->grows) {
        /* A pre-sized table keeps its memory: only drop tombstones. */
        int rr = force && sh->tombs ? shm_resize_index(v, si, g.slots) : SHM_OK;
        return rr == SHM_FULL || rr == SHM_NOSPACE ? SHM_OK : rr;
    }
    /* The index: shrink when under a quarter full (or, forced, drop
     * tombstones at its size). */
    nslots = shrunk_slots(v, g.slots, sh->count);
    if (nslots < g.slots || (force && sh->tombs)) {
        r = shm_resize_index(v, si, nslots);
        if (r == SHM_OK && nslots < g.slots)
            *released += page_up((uint64_t)g.slots * 8) - page_up((uint64_t)nslots * 8);
        else if (r != SHM_OK && r != SHM_NOSPACE) return r;
    }
    /* The arena: worth it when at least half of what is carved is free. */
    if (!force && (sh->top - sh->used < sh->top / 2 || cap <= v->init_arena)) goto tail;
    if (shm_coalesce(v, si) < 0) return SHM_CORRUPT;
    r = shm_walk_blocks(v, si, &blocks, &nb);
    if (r < 0) return r;
    holes = (hole_t *)malloc((nb + 1) * sizeof *holes);
    if (!holes) { free(blocks); return SHM_NOMEM; }
    for (size_t j = 0; j < nb; j++) {
        const shm_item_t *it = (const shm_item_t *)(ar + blocks[j]);
        if (!(it->flags & SHM_BLOCK_USED)) {
            holes[nh].off = blocks[j];
            holes[nh++].size = it->size;
        }
    }
    /* The holes are tracked here until the final coalesce rebuilds the
     * free lists from the walk (a repair would do the same). */
    sh->binmap = 0;
    for (uint32_t b = 0; b < SHM_NBINS; b++) sh->bins[b] = SHM_NIL;
    r = SHM_OK;
    while (nb > 0) {
        uint64_t off = blocks[--nb], need, dest = SHM_NIL, dsize = 0, fnd;
        shm_item_t *it = (shm_item_t *)(ar + off), *dt;
        shm_key_t k;
        int64_t pos, ins;
        size_t x;
        if (!(it->flags & SHM_BLOCK_USED)) continue;
        need = it->size;
        if (SHM_ITEM_HDR + (uint64_t)it->vlen + it->klen > need) { r = SHM_CORRUPT; break; }
        while (h < nh && holes[h].size < SHM_BLOCK_MIN) h++;
        /* First fit among the next holes below the item (bounded look-ahead). */
        for (x = h; x < nh && x < h + 64 && holes[x].off < off; x++) {
            if (holes[x].size >= need) {
                dest = holes[x].off;
                if (holes[x].size - need >= SHM_BLOCK_MIN) {
                    /* Remainder header first: a walker sees the old hole or both. */
                    shm_store_rlx((uint64_t *)(ar + dest + need), shm_word0(holes[x].size - need, 0, 0, 0));
                    dsize = need;
                } else {
                    dsize = holes[x].size;
                }
                holes[x].off += dsize;
                holes[x].size -= dsize;
                break;
            }
        }
        if (dest == SHM_NIL) break;                 /* no hole below fits it: the tail stays */
        dt = (shm_item_t *)(ar + dest);
        memcpy(ar + dest + 8, ar + off + 8, SHM_ITEM_HDR - 8 + (size_t)it->vlen + it->klen);
        shm_store_rlx((uint64_t *)dt, shm_word0(dsize, it->klen, it->types, SHM_BLOCK_USED));
        sh->used += dsize;
        SHM_CRASH_POINT(COMPACT_COPIED);
        k.p = (const unsigned char *)(ar + off + SHM_ITEM_HDR + it->vlen);
        k.n = it->klen;
        k.ktype = it->types & 15;
        shm_key_hash(v, &k);
        pos = shm_find(v, si, &k, &fnd, &ins);
        if (pos < 0 || fnd != off) { r = SHM_CORRUPT; break; }   /* the repair frees the copy */
        g = shm_ix(v, si);
        shm_seq_begin(&sh->seq);
        shm_store_rlx(&g.ix[pos], (g.ix[pos] & ~SHM_SLOT_OFFMASK) | (dest + 8));
        SHM_CRASH_POINT(COMPACT_MOVED);
        shm_seq_end(&sh->seq);
        shm_store_rlx((uint64_t *)it, shm_word0(need, 0, 0, 0));   /* the original: free */
        sh->used -= need;
        sh->n_moves++;
    }
    free(holes);
    free(blocks);
    if (shm_coalesce(v, si) < 0) return SHM_CORRUPT;
    if (r < 0) return r;
tail:
    /* Give back the pages past top (keeping the initial allocation). */
    ncap = page_up(sh->top);
    if (ncap < v->init_arena) ncap = v->init_arena;
    if (ncap < cap) {
        sh->arena_cap = ncap;
        shm_fence_rel();
        shm_fs_punch(v, (uint64_t)(ar - v->base) + ncap, cap - ncap);
        *released += cap - ncap;
        sh->n_shrinks++;
    }
    return SHM_OK;
}
