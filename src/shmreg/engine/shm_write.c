/*
 * Writes, shard lock held.  Every change a reader can observe is one aligned
 * 8-byte store inside a seqlock window (publish / unpublish of an index
 * slot, an in-place int64 counter, an expiry), and every seqlock window of
 * the engine is in this file.  Everything else a write touches - blocks,
 * free lists, counters - is derived state that shm_repair_shard recomputes,
 * which is why there is no intent log.
 */
#define _GNU_SOURCE
#include "shm_engine.h"
#include "shm_crash.h"

#include <string.h>

void shm_unpublish(shm_view_t *v, uint32_t si, int64_t pos, uint64_t off) {
    shm_shard_t *sh = shm_shard(v, si);
    shm_ix_t g = shm_ix(v, si);
    uint64_t *ix = g.ix;
    shm_item_t *it = (shm_item_t *)(shm_arena(v, si) + off);
    uint32_t nxt = (uint32_t)pos + 1;
    if (nxt == g.slots) nxt = 0;
    shm_seq_begin(&sh->seq);
    if ((ix[nxt] & SHM_SLOT_OFFMASK) == SHM_SLOT_EMPTY) {
        /* No probe chain runs through this slot: it can become empty again. */
        shm_store_rlx(&ix[pos], SHM_SLOT_EMPTY);
    } else {
        shm_store_rlx(&ix[pos], SHM_SLOT_TOMB);
        sh->tombs++;
    }
    sh->count--;
    SHM_CRASH_POINT(DEL_UNPUBLISHED);
    shm_seq_end(&sh->seq);
    if (it->expires) sh->nttl--;
    if (it->owner) sh->nowned--;
    shm_free_block(v, si, off);
    sh->n_dels++;
    SHM_CRASH_POINT(DEL_FREED);
}

void shm_seq_close_dead(shm_view_t *v, uint32_t si) {
    shm_shard_t *sh = shm_shard(v, si);
    if (shm_load_rlx(&sh->seq) & 1) shm_seq_end(&sh->seq);
}

void shm_mark_referenced(shm_view_t *v, uint32_t si, int64_t pos) {
    /* The one store a reader may make: the CLOCK reference bit, only when
     * clear (so a hot entry costs one store, ever). */
    shm_ix_t g = shm_ix(v, si);
    uint64_t *slot;
    if (pos < 0 || pos >= (int64_t)g.slots) return;   /* the index was resized since the probe */
    slot = &g.ix[pos];
    if (!(shm_load_rlx(slot) & SHM_SLOT_CLOCK)) shm_or_rlx(slot, SHM_SLOT_CLOCK);
}

static inline int item_live(shm_view_t *v, const shm_item_t *it, uint64_t now) {
    return (it->expires == 0 || it->expires > now) && shm_owner_alive(v, it->owner);
}

long shm_purge_shard(shm_view_t *v, uint32_t si, uint64_t now, int64_t keep, int dead_too) {
    shm_shard_t *sh = shm_shard(v, si);
    shm_ix_t g = shm_ix(v, si);
    uint64_t *ix = g.ix;
    char *ar = shm_arena(v, si);
    long n = 0;
    if (sh->nttl == 0 && (sh->nowned == 0 || !dead_too)) return 0;
    for (uint32_t i = 0; i < g.slots; i++) {
        uint64_t off = ix[i] & SHM_SLOT_OFFMASK;
        const shm_item_t *it;
        if (off <= SHM_SLOT_TOMB || (int64_t)i == keep || !shm_item_ok(v, ar, off - 8)) continue;
        it = (const shm_item_t *)(ar + off - 8);
        if ((it->expires && it->expires <= now) || (dead_too && !shm_owner_alive(v, it->owner))) {
            shm_unpublish(v, si, i, off - 8);
            sh->n_expired++;
            n++;
        }
    }
    return n;
}

/* Room for a table that does not evict: delete the shard's expired entries,
 * and only if there are none its dead owners' entries (a watcher's
 * post-mortem then misses those; they were invisible already). */
static long reclaim(shm_view_t *v, uint32_t si, uint64_t now, int64_t keep) {
    long n = shm_purge_shard(v, si, now, keep, 0);
    if (n == 0) n = shm_purge_shard(v, si, now, keep, 1);
    return n;
}

/* Evict one entry by CLOCK, never slot keep: an entry whose reference bit
 * is set gets it cleared and a second chance.  1: a live entry was evicted,
 * 0: an expired or dead-owned one, -1: nothing evictable. */
static int evict_one(shm_view_t *v, uint32_t si, uint64_t now, int64_t keep) {
    shm_shard_t *sh = shm_shard(v, si);
    shm_ix_t g = shm_ix(v, si);
    uint64_t *ix = g.ix;
    char *ar = shm_arena(v, si);
    for (uint64_t step = 0; step < 2 * (uint64_t)g.slots + 1; step++) {
        uint64_t h = sh->hand % g.slots;
        uint64_t s = ix[h], off = s & SHM_SLOT_OFFMASK;
        const shm_item_t *it;
        sh->hand = h + 1;
        if (off <= SHM_SLOT_TOMB || (int64_t)h == keep || !shm_item_ok(v, ar, off - 8)) continue;
        it = (const shm_item_t *)(ar + off - 8);
        if ((it->expires && it->expires <= now) || !shm_owner_alive(v, it->owner)) {
            shm_unpublish(v, si, (int64_t)h, off - 8);
            sh->n_expired++;
            return 0;
        }
        if (s & SHM_SLOT_CLOCK) {
            /* Clearing the bit changes nothing a reader can see: no seqlock. */
            shm_store_rlx(&ix[h], s & ~SHM_SLOT_CLOCK);
            continue;
        }
        shm_unpublish(v, si, (int64_t)h, off - 8);
        sh->n_evictions++;
        return 1;
    }
    return -1;
}

/* Make an insert slot when the index is at its fill limit: grow it (up to
 * the limit), else make room as a full table does. */
static int make_index_room(shm_view_t *v, uint32_t si, uint64_t now, int evict) {
    shm_shard_t *sh = shm_shard(v, si);
    shm_ix_t g = shm_ix(v, si);
    int r, nospace = 0;
    if (g.slots < v->max_slots && sh->count + 1 > g.slots / 2) {
        /* Over half full with live entries: double (otherwise tombstones
         * are what fills it, and a rebuild at this size is enough). */
        r = shm_resize_index(v, si, shm_grown_slots(v, g.slots));
        if (r == SHM_OK) return SHM_OK;
        if (r != SHM_NOSPACE) return r;
        nospace = 1;    /* the filesystem is the limit now */
    }
    if (sh->tombs == 0 || sh->count >= g.max_fill) {
        if (!evict) {
            /* Not full while expired (or dead-owned) entries take the room. */
            if (reclaim(v, si, now, -1) == 0) return nospace ? SHM_NOSPACE : SHM_FULL;
        } else {
            uint32_t headroom = g.max_fill / 32 > 1 ? g.max_fill / 32 : 1;
            shm_purge_shard(v, si, now, -1, 1);
            /* Evict a little headroom (1/32 of the shard) at once: the index
             * rebuild that follows then happens once per headroom inserts,
             * not on every insert at capacity. */
            while (sh->count > g.max_fill - headroom) {
                r = evict_one(v, si, now, -1);
                if (r < 0) return SHM_FULL;
                v->last_evicted += r;
            }
        }
    }
    if (sh->count + sh->tombs >= g.max_fill) {
        /* Tombstones use up the probe budget: rebuild the index without
         * them (into the idle buffer, at this size). */
        r = shm_resize_index(v, si, g.slots);
        if (r == SHM_NOSPACE && evict) {
            /* The filesystem is full and the idle buffer needs pages: a
             * cache makes them by evicting half the shard and giving its
             * arena pages back, then tries once more. */
            uint64_t released;
            uint32_t target = sh->count / 2;
            while (sh->count > target && evict_one(v, si, now, -1) >= 0)
                v->last_evicted++;
            if ((r = shm_compact_shard(v, si, 1, &released)) < 0) return r;
            if (sh->count + sh->tombs >= shm_ix(v, si).max_fill)
                r = shm_resize_index(v, si, shm_ix(v, si).slots);
            else
                r = SHM_OK;
        }
        if (r < 0) return r;
    }
    return SHM_OK;
}

/* Find a block of need bytes, reclaiming or evicting (never slot keep). */
static uint64_t make_block(shm_view_t *v, uint32_t si, uint64_t need, uint64_t now, int64_t keep,
                           int evict, long *reclaimed, int *st) {
    shm_shard_t *sh = shm_shard(v, si);
    uint64_t noff = shm_alloc_block(v, si, need), freeb;
    int tries = 0, r;
    *reclaimed = 0;
    *st = SHM_OK;
    if (noff != SHM_NIL) return noff;
    /* Merging free blocks walks the arena: worth it only when there is a
     * fair amount free (not on every step of a growing shard). */
    /* (What is free below top, merged, joins what lies past it.) */
    freeb = sh->top > sh->used ? sh->top - sh->used : 0;
    if (freeb + (sh->arena_cap > sh->top ? sh->arena_cap - sh->top : 0) >= need
            && (freeb >= sh->top / 16 || sh->arena_cap >= v->arena_size)) {
        if (shm_coalesce(v, si) < 0) { *st = SHM_CORRUPT; return SHM_NIL; }
        noff = shm_alloc_block(v, si, need);
        if (noff != SHM_NIL) return noff;
    }
    if (sh->arena_cap < v->arena_size) {
        r = shm_grow_arena(v, si, need);
        if (r == SHM_OK) {
            noff = shm_alloc_block(v, si, need);
            if (noff != SHM_NIL) return noff;
        } else if (r != SHM_FULL && !(r == SHM_NOSPACE && evict)) {
            /* A table that does not evict reports the full filesystem; a
             * cache makes room as at its limit. */
            if (r == SHM_NOSPACE) {
                *reclaimed = reclaim(v, si, now, keep);
                if (*reclaimed > 0 && shm_coalesce(v, si) == 0) {
                    noff = shm_alloc_block(v, si, need);
                    if (noff != SHM_NIL) return noff;
                }
            }
            *st = r;
            return SHM_NIL;
        }
        if (shm_coalesce(v, si) < 0) { *st = SHM_CORRUPT; return SHM_NIL; }
        noff = shm_alloc_block(v, si, need);
        if (noff != SHM_NIL) return noff;
    }
    /* No room: expired (then dead-owned) entries go first, then a cache
     * evicts by CLOCK; never the entry being replaced (it stays until the
     * new one is published). */
    *reclaimed = evict ? shm_purge_shard(v, si, now, keep, 1) : reclaim(v, si, now, keep);
    if (*reclaimed > 0) {
        if (shm_coalesce(v, si) < 0) { *st = SHM_CORRUPT; return SHM_NIL; }
        noff = shm_alloc_block(v, si, need);
    }
    while (noff == SHM_NIL && evict) {
        r = evict_one(v, si, now, keep);
        if (r < 0) break;
        (*reclaimed)++;
        v->last_evicted += r;
        noff = shm_alloc_block(v, si, need);
        tries++;
        if (noff == SHM_NIL && tries % 8 == 0) {
            if (shm_coalesce(v, si) < 0) { *st = SHM_CORRUPT; return SHM_NIL; }
            noff = shm_alloc_block(v, si, need);
        }
    }
    if (noff == SHM_NIL && *reclaimed > 0) {
        if (shm_coalesce(v, si) < 0) { *st = SHM_CORRUPT; return SHM_NIL; }
        noff = shm_alloc_block(v, si, need);
    }
    return noff;
}

int shm_put(shm_view_t *v, uint32_t si, const shm_key_t *k, const shm_val_t *val, uint64_t expires,
            uint32_t owner, int mode, uint64_t now, const shm_val_t *expect, shm_recbuf_t *old) {
    shm_shard_t *sh = shm_shard(v, si);
    char *ar = shm_arena(v, si);
    uint64_t *ix = shm_ix(v, si).ix;
    uint64_t off = 0, noff, need;
    int64_t pos, ins;
    shm_item_t *it, *ot = NULL;
    int evict = (mode & SHM_PUT_EVICT) != 0, st;
    long reclaimed;
    mode &= 3;
    SHM_CRASH_POINT(SET_LOCKED);
    need = shm_item_need(k->n, val->n);
    if (need > v->arena_size || val->n > 0xFFFFFFFFu || k->n > SHM_MAX_KEY) return SHM_TOOBIG;
    pos = shm_find(v, si, k, &off, &ins);
    if (pos == -2) return SHM_CORRUPT;
    if (pos >= 0) {
        ot = (shm_item_t *)(ar + off);
        int live = item_live(v, ot, now);
        if (mode == SHM_PUT_NEW && live) {
            if (old && shm_recbuf_append(old, ot, ot->klen, ot->vlen, ar + off + SHM_ITEM_HDR,
                                         ar + off + SHM_ITEM_HDR + ot->vlen) < 0)
                return SHM_NOMEM;
            return SHM_NO;
        }
        if (mode == SHM_PUT_CAS) {
            if (!live || (ot->types >> 4) != expect->vtype || ot->vlen != expect->n
                    || memcmp(ar + off + SHM_ITEM_HDR, expect->p, expect->n) != 0)
                return SHM_NO;
            /* A swap replaces the value only: the entry keeps its expiry and owner. */
            expires = ot->expires;
            owner = ot->owner;
        }
    } else if (mode == SHM_PUT_CAS) {
        return SHM_NO;
    } else if (ins < 0 || ((ix[ins] & SHM_SLOT_OFFMASK) == SHM_SLOT_EMPTY
                           && sh->count + sh->tombs >= shm_ix(v, si).max_fill)) {
        /* (Reusing a tombstone never raises count + tombs: no rebuild needed.) */
        st = make_index_room(v, si, now, evict);
        if (st != SHM_OK) {
            if (st == SHM_FULL) sh->n_full++;
            return st;
        }
        pos = shm_find(v, si, k, &off, &ins);
        if (pos != -1 || ins < 0) return SHM_CORRUPT;
        ix = shm_ix(v, si).ix;    /* (a resize moved it) */
    }
    noff = make_block(v, si, need, now, pos, evict, &reclaimed, &st);
    if (st != SHM_OK && st != SHM_NOSPACE) return st;
    if (reclaimed > 0 && pos < 0) {
        /* Deletions emptied slots: the insert slot found before may now lie
         * beyond an EMPTY one, out of the key's probe chain. */
        pos = shm_find(v, si, k, &off, &ins);
        if (pos != -1 || ins < 0) {
            if (noff != SHM_NIL) shm_free_block(v, si, noff);
            return SHM_CORRUPT;
        }
    }
    if (noff == SHM_NIL) {
        if (st == SHM_OK) st = SHM_FULL;
        if (st == SHM_FULL) sh->n_full++;
        return st;
    }
    SHM_CRASH_POINT(SET_ALLOCATED);
    it = (shm_item_t *)(ar + noff);
    memcpy(ar + noff + SHM_ITEM_HDR, val->p, val->n);
    memcpy(ar + noff + SHM_ITEM_HDR + val->n, k->p, k->n);
    it->vlen = (uint32_t)val->n;
    it->owner = owner;
    it->expires = expires;
    shm_store_rlx((uint64_t *)it, shm_word0(it->size, (uint64_t)k->n,
                                            (uint64_t)(k->ktype | ((unsigned)val->vtype << 4)), SHM_BLOCK_USED));
    SHM_CRASH_POINT(SET_WRITTEN);
    /* Publish: one 8-byte store is the commit point of the write. */
    shm_seq_begin(&sh->seq);
    if (pos >= 0) {
        shm_store_rlx(&ix[pos], shm_slot_tag(k->h) | (noff + 8));
    } else {
        if ((ix[ins] & SHM_SLOT_OFFMASK) == SHM_SLOT_TOMB) sh->tombs--;
        shm_store_rlx(&ix[ins], shm_slot_tag(k->h) | (noff + 8));
        sh->count++;
    }
    SHM_CRASH_POINT(SET_PUBLISHED);
    shm_seq_end(&sh->seq);
    if (expires) sh->nttl++;
    if (owner) sh->nowned++;
    if (pos >= 0) {
        if (ot->expires) sh->nttl--;
        if (ot->owner) sh->nowned--;
        shm_free_block(v, si, off);
        SHM_CRASH_POINT(SET_FREED);
    }
    sh->n_sets++;
    return SHM_OK;
}

int shm_remove(shm_view_t *v, uint32_t si, const shm_key_t *k, uint64_t now, uint32_t only_owner,
               shm_recbuf_t *out) {
    char *ar = shm_arena(v, si);
    uint64_t off = 0;
    int64_t ins, pos = shm_find(v, si, k, &off, &ins);
    const shm_item_t *it;
    int st = SHM_OK;
    if (pos == -2) return SHM_CORRUPT;
    if (pos < 0) return SHM_NO;
    it = (const shm_item_t *)(ar + off);
    if (only_owner && it->owner != only_owner) return SHM_NOMATCH;
    if (!item_live(v, it, now)) {
        st = SHM_NO;       /* expired or owner dead: gone for the caller, purge it anyway */
        shm_shard(v, si)->n_expired++;
    } else if (out && shm_recbuf_append(out, it, it->klen, it->vlen, ar + off + SHM_ITEM_HDR,
                                        ar + off + SHM_ITEM_HDR + it->vlen) < 0) {
        return SHM_NOMEM;
    }
    shm_unpublish(v, si, pos, off);
    return st;
}

int shm_counter_add(shm_view_t *v, uint32_t si, const shm_key_t *k, long long incr, long long dflt,
                    uint64_t expires, uint64_t now, long long *result) {
    shm_shard_t *sh = shm_shard(v, si);
    char *ar = shm_arena(v, si);
    uint64_t off = 0;
    int64_t ins, pos = shm_find(v, si, k, &off, &ins);
    long long cur, res;
    shm_val_t val;
    char buf[8];
    if (pos == -2) return SHM_CORRUPT;
    if (pos >= 0 && item_live(v, (const shm_item_t *)(ar + off), now)) {
        const shm_item_t *it = (const shm_item_t *)(ar + off);
        if ((it->types >> 4) != SHM_VT_INT || it->vlen != 8) return SHM_NOTINT;
        memcpy(&cur, ar + off + SHM_ITEM_HDR, 8);
        if (shm_add_overflow(cur, incr, &res)) return SHM_OVERFLOW;
        /* In place: one aligned 8-byte store, inside the seqlock window. */
        shm_seq_begin(&sh->seq);
        shm_store_rlx((uint64_t *)(ar + off + SHM_ITEM_HDR), (uint64_t)res);
        SHM_CRASH_POINT(COUNTER_STORED);
        shm_seq_end(&sh->seq);
        sh->n_sets++;
        *result = res;
        return SHM_OK;
    }
    if (shm_add_overflow(dflt, incr, &res)) return SHM_OVERFLOW;
    memcpy(buf, &res, 8);
    val.p = buf;
    val.n = 8;
    val.vtype = SHM_VT_INT;
    *result = res;
    return shm_put(v, si, k, &val, expires, 0, SHM_PUT_SET, now, NULL, NULL);
}

int shm_set_expiry(shm_view_t *v, uint32_t si, const shm_key_t *k, uint64_t expires, uint64_t now) {
    shm_shard_t *sh = shm_shard(v, si);
    uint64_t off = 0;
    int64_t ins, pos = shm_find(v, si, k, &off, &ins);
    shm_item_t *it;
    if (pos == -2) return SHM_CORRUPT;
    if (pos < 0) return SHM_NO;
    it = (shm_item_t *)(shm_arena(v, si) + off);
    if (!item_live(v, it, now)) return SHM_NO;
    if (it->expires && !expires) sh->nttl--;
    else if (expires && !it->expires) sh->nttl++;
    shm_seq_begin(&sh->seq);
    shm_store_rlx(&it->expires, expires);
    shm_seq_end(&sh->seq);
    return SHM_OK;
}

void shm_clear_shard(shm_view_t *v, uint32_t si) {
    shm_shard_t *sh = shm_shard(v, si);
    shm_ix_t g = shm_ix(v, si);
    uint64_t *ix = g.ix;
    shm_seq_begin(&sh->seq);
    /* Index first (slot by slot, each store atomic), then the arena: a crash
     * in between leaves unreferenced blocks, which the repair frees.  Two
     * passes: entries become tombstones first, so that a death midway never
     * leaves an entry behind an EMPTY slot of its probe chain (unreachable,
     * yet counted: the repair trusts the index); only then, with no entry
     * left, do the tombstones become EMPTY. */
    for (uint32_t i = 0; i < g.slots; i++) {
        if ((ix[i] & SHM_SLOT_OFFMASK) != SHM_SLOT_EMPTY) shm_store_rlx(&ix[i], SHM_SLOT_TOMB);
        if (i == g.slots / 2) SHM_CRASH_POINT(CLEAR_HALF);
    }
    for (uint32_t i = 0; i < g.slots; i++) shm_store_rlx(&ix[i], SHM_SLOT_EMPTY);
    shm_seq_end(&sh->seq);
    sh->top = 0;
    sh->binmap = 0;
    for (uint32_t b = 0; b < SHM_NBINS; b++) sh->bins[b] = SHM_NIL;
    sh->count = sh->tombs = sh->nttl = sh->nowned = 0;
    sh->used = 0;
}

int shm_reap_shard(shm_view_t *v, uint32_t si, uint32_t owner, shm_recbuf_t *b, int delete_, long *n) {
    shm_ix_t g = shm_ix(v, si);
    uint64_t *ix = g.ix;
    char *ar = shm_arena(v, si);
    for (uint32_t i = 0; i < g.slots; i++) {
        uint64_t off = ix[i] & SHM_SLOT_OFFMASK;
        const shm_item_t *it;
        if (off <= SHM_SLOT_TOMB || !shm_item_ok(v, ar, off - 8)) continue;
        off -= 8;
        it = (const shm_item_t *)(ar + off);
        if (it->owner == 0) continue;
        if (owner == SHM_OWNER_STALE ? shm_owner_current(v, it->owner)
            : owner ? it->owner != owner : shm_owner_alive(v, it->owner)) continue;
        if (b && shm_recbuf_append(b, it, it->klen, it->vlen, ar + off + SHM_ITEM_HDR,
                                   ar + off + SHM_ITEM_HDR + it->vlen) < 0)
            return SHM_NOMEM;
        if (delete_) shm_unpublish(v, si, i, off);
        (*n)++;
    }
    return SHM_OK;
}
