/*
 * Locking a shard, and putting it right after its lock holder died at any
 * instant.  The index is the truth: every publish and unpublish is one
 * store of a complete item, so the repair re-derives blocks, free lists and
 * counters from it - or, when the writer died inside an index rebuild
 * (SHM_SHARD_REBUILDING), re-runs the rebuild from the arena's USED blocks,
 * which the rebuild never changes.
 */
#define _GNU_SOURCE
#include "shm_engine.h"
#include "shm_crash.h"

#include <stdlib.h>
#include <string.h>

static void recount(shm_view_t *v, uint32_t si) {
    shm_shard_t *sh = shm_shard(v, si);
    const uint64_t *ix = shm_index(v, si);
    const char *ar = shm_arena(v, si);
    uint32_t count = 0, tombs = 0, nttl = 0, nowned = 0;
    uint64_t used = 0;
    for (uint32_t i = 0; i < v->slots; i++) {
        uint64_t off = ix[i] & SHM_SLOT_OFFMASK;
        if (off == SHM_SLOT_TOMB) {
            tombs++;
        } else if (off > SHM_SLOT_TOMB) {
            const shm_item_t *it = (const shm_item_t *)(ar + off - 8);
            count++;
            used += it->size;
            if (it->expires) nttl++;
            if (it->owner) nowned++;
        }
    }
    sh->count = count;
    sh->tombs = tombs;
    sh->nttl = nttl;
    sh->nowned = nowned;
    sh->used = used;
}

/* Index is the truth: free unreferenced blocks, recount, rebuild free lists. */
static int reconcile(shm_view_t *v, uint32_t si) {
    const uint64_t *ix = shm_index(v, si);
    char *ar = shm_arena(v, si);
    uint64_t *blocks = NULL;
    size_t nb = 0;
    uint8_t *ref;
    int r = shm_walk_blocks(v, si, &blocks, &nb);
    if (r < 0) return r;
    ref = (uint8_t *)calloc(nb + 1, 1);
    if (!ref) { free(blocks); return SHM_NOMEM; }
    for (uint32_t i = 0; i < v->slots; i++) {
        uint64_t off = ix[i] & SHM_SLOT_OFFMASK;
        size_t lo;
        if (off <= SHM_SLOT_TOMB) continue;
        off -= 8;
        lo = shm_block_index(blocks, nb, off);
        if (lo == nb || blocks[lo] != off || ref[lo]) {
            /* A slot that points nowhere sane cannot come from a crash (every
             * publish is one store of a complete item): the shard is corrupt. */
            free(ref);
            free(blocks);
            return SHM_CORRUPT;
        }
        ref[lo] = 1;
    }
    for (size_t j = 0; j < nb; j++) {
        shm_item_t *it = (shm_item_t *)(ar + blocks[j]);
        if (ref[j]) {
            if (SHM_ITEM_HDR + (uint64_t)it->vlen + it->klen > it->size) {
                free(ref);
                free(blocks);
                return SHM_CORRUPT;
            }
            if (!(it->flags & SHM_BLOCK_USED))
                shm_store_rlx((uint64_t *)it, shm_word0(it->size, it->klen, it->types, SHM_BLOCK_USED));
        } else if (it->flags & SHM_BLOCK_USED) {
            /* Allocated by the dead writer but never published, or unpublished
             * but not yet freed. */
            shm_store_rlx((uint64_t *)it, shm_word0(it->size, 0, 0, 0));
        }
    }
    free(ref);
    free(blocks);
    r = shm_coalesce(v, si);
    if (r < 0) return r;
    recount(v, si);
    return 0;
}

int shm_rebuild_index(shm_view_t *v, uint32_t si, int from_repair) {
    /* SHM_SHARD_REBUILDING is set for the duration: a writer killed midway
     * leaves it set, and the repair then redoes the rebuild from the arena,
     * which is complete and unchanged throughout. */
    shm_shard_t *sh = shm_shard(v, si);
    char *ar = shm_arena(v, si);
    uint64_t *ix = shm_index(v, si);
    uint64_t *blocks = NULL;
    size_t nb = 0, done = 0, nused = 0;
    int r = shm_walk_blocks(v, si, &blocks, &nb);
    if (r < 0) return r;
    if (!from_repair) {
        /* Park each slot's CLOCK bit in its item, so the rebuilt index keeps
         * what readers marked (a repair honours what was parked). */
        for (uint32_t i = 0; i < v->slots; i++) {
            uint64_t off = ix[i] & SHM_SLOT_OFFMASK;
            if ((ix[i] & SHM_SLOT_CLOCK) && off > SHM_SLOT_TOMB && shm_item_ok(v, ar, off - 8)) {
                shm_item_t *it = (shm_item_t *)(ar + off - 8);
                shm_store_rlx((uint64_t *)it, shm_word0(it->size, it->klen, it->types, it->flags | SHM_BLOCK_REF));
            }
        }
        sh->flags |= SHM_SHARD_REBUILDING;
        shm_fence_rel();
    }
    for (uint32_t i = 0; i < v->slots; i++) shm_store_rlx(&ix[i], SHM_SLOT_EMPTY);
    SHM_CRASH_POINT(REBUILD_CLEARED);
    for (size_t j = 0; j < nb; j++)
        if (((shm_item_t *)(ar + blocks[j]))->flags & SHM_BLOCK_USED) nused++;
    for (size_t j = 0; j < nb; j++) {
        uint64_t off = blocks[j], h;
        shm_item_t *it = (shm_item_t *)(ar + off);
        uint32_t pos, i;
        if (!(it->flags & SHM_BLOCK_USED)) continue;
        if (SHM_ITEM_HDR + (uint64_t)it->vlen + it->klen > it->size) { free(blocks); return SHM_CORRUPT; }
        h = shm_hash((const unsigned char *)(ar + off + SHM_ITEM_HDR + it->vlen), it->klen,
                     it->types & 15, v->seed0, v->seed1);
        if (shm_shard_of(v, h) != si) { free(blocks); return SHM_CORRUPT; }
        pos = (uint32_t)(((h & 0xffffffffULL) * v->slots) >> 32);
        for (i = 0; i < v->slots; i++) {
            if ((ix[pos] & SHM_SLOT_OFFMASK) == SHM_SLOT_EMPTY) break;
            if (++pos == v->slots) pos = 0;
        }
        if ((ix[pos] & SHM_SLOT_OFFMASK) != SHM_SLOT_EMPTY) { free(blocks); return SHM_CORRUPT; }
        if (it->flags & SHM_BLOCK_REF) {
            shm_store_rlx(&ix[pos], (h & SHM_SLOT_TAGMASK) | (off + 8) | SHM_SLOT_CLOCK);
            shm_store_rlx((uint64_t *)it, shm_word0(it->size, it->klen, it->types, SHM_BLOCK_USED));
        } else {
            shm_store_rlx(&ix[pos], (h & SHM_SLOT_TAGMASK) | (off + 8));
        }
        done++;
        if (done * 2 >= nused) SHM_CRASH_POINT(REBUILD_HALF);
    }
    free(blocks);
    sh->n_rebuilds++;
    recount(v, si);
    shm_fence_rel();
    sh->flags &= ~(uint64_t)SHM_SHARD_REBUILDING;
    if (from_repair) return shm_coalesce(v, si);
    return 0;
}

int shm_repair_shard(shm_view_t *v, uint32_t si) {
    shm_shard_t *sh = shm_shard(v, si);
    int r;
    sh->n_repairs++;
    if (sh->flags & SHM_SHARD_REBUILDING) r = shm_rebuild_index(v, si, 1);
    else r = reconcile(v, si);
    shm_seq_close_dead(v, si);
    return r;
}

static int lock_status(int rc) {
    switch (rc) {
    case SHM_LOCK_BUSY: return SHM_BUSY;
    case SHM_LOCK_TIMEOUT: return SHM_TIMEOUT;
    case SHM_LOCK_ABANDONED: return SHM_ABANDONED;
    default: return SHM_BADLOCK;
    }
}

int shm_shard_lock(shm_view_t *v, uint32_t si, int try_only) {
    shm_shard_t *sh = shm_shard(v, si);
    uint32_t holder;
    int rc = shm_mutex_lock(&sh->lock.m, try_only, -1, &holder), r;
    if (rc == 0) return SHM_OK;
    if (rc != SHM_LOCK_OWNERDEAD) return lock_status(rc);
    r = shm_repair_shard(v, si);
    shm_mutex_consistent(&sh->lock.m);
    if (r < 0) {
        shm_mutex_unlock(&sh->lock.m);
        return r;
    }
    return SHM_OK;
}

void shm_shard_unlock(shm_view_t *v, uint32_t si) {
#ifdef SHMREG_DEBUG
    /* Debug build: every critical section must leave the shard valid. */
    shm_check_t e;
    shm_check_shard(v, si, &e);
    if (e.code) abort();
#endif
    shm_mutex_unlock(&shm_shard(v, si)->lock.m);
}

int shm_lock_state(const pthread_mutex_t *m, uint32_t *holder) {
    uint32_t tid, w;
    *holder = 0;
    if (!shm_mutex_kind_ok(m)) return SHM_BADLOCK;
    if (!shm_have_alive_word()) return 0;
    w = __atomic_load_n((const uint32_t *)m, __ATOMIC_ACQUIRE);
    tid = shm_mutex_holder(m);
    *holder = tid;
    if (tid == 0 || !shm_mutex_held_by_live(m)) return 0;   /* free, or OWNER_DIED: the next locker repairs */
    if (shm_thread_exists(tid)) return 0;
    /* The holder may have died (or unlocked) just now: the kernel marks a
     * dead holder's word before its /proc entry goes, so only a word that
     * did not change meanwhile names a thread that never will. */
    return __atomic_load_n((const uint32_t *)m, __ATOMIC_ACQUIRE) == w ? SHM_ABANDONED : 0;
}

int shm_repair_lock(shm_view_t *v, int which) {
    pthread_mutex_t *m;
    uint32_t holder;
    int st, rc, r = 0;
    if (which >= (int)v->nsh || which < -2) return SHM_NO;
    m = shm_lock_of(v, which);
    st = shm_lock_state(m, &holder);
    if (st == 0) {
        /* It may still be a word that names no thread but will not let us in
         * (waiters bit alone): try it the bounded way. */
        rc = shm_mutex_lock(m, 0, 2 * SHM_ABANDON_MS + 500, &holder);
        if (rc == 0 || rc == SHM_LOCK_OWNERDEAD) {
            if (rc == SHM_LOCK_OWNERDEAD) {
                if (which >= 0) r = shm_repair_shard(v, (uint32_t)which);
                shm_mutex_consistent(m);
            }
            shm_mutex_unlock(m);
            return r < 0 ? r : SHM_NO;
        }
        if (rc == SHM_LOCK_TIMEOUT) return SHM_NO;    /* a live holder: never robbed */
        st = lock_status(rc);
    }
    if (st != SHM_ABANDONED && st != SHM_BADLOCK) return st;
    /* Nobody holds it for real: start it afresh, then repair what it guarded
     * as if its holder had died mid-write. */
    memset(m, 0, sizeof(*m));
    if ((rc = shm_mutex_init(m)) != 0) return SHM_SYSERR;
    if (which >= 0) {
        if (shm_mutex_lock(m, 1, 0, &holder) != 0) return SHM_BUSY;
        r = shm_repair_shard(v, (uint32_t)which);
        shm_mutex_unlock(m);
        if (r < 0) return r;
    } else if (which == -1) {
        /* A claimant that died mid-claim never made its slot LIVE. */
        if (shm_mutex_lock(m, 1, 0, &holder) != 0) return SHM_BUSY;
        for (uint32_t i = 0; i < SHM_NPROCS; i++)
            if (shm_proc(v, i)->state == SHM_PROC_CLAIMING) shm_proc(v, i)->state = SHM_PROC_FREE;
        shm_mutex_unlock(m);
    }
    return SHM_OK;
}
