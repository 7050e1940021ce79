/*
 * Locking a shard, and putting it right after its lock holder died at any
 * instant.  The index is the truth: every publish and unpublish is one
 * store of a complete item, and a resize fills the idle buffer and
 * publishes it with one store (geom), so the live index is always whole.
 * The repair re-derives blocks, free lists and counters from it, and gives
 * back the idle index buffer a resize may have left half-filled.
 */
#define _GNU_SOURCE
#include "shm_engine.h"
#include "shm_crash.h"

#include <stdlib.h>
#include <string.h>

static void recount(shm_view_t *v, uint32_t si) {
    shm_shard_t *sh = shm_shard(v, si);
    shm_ix_t g = shm_ix(v, si);
    const uint64_t *ix = g.ix;
    const char *ar = shm_arena(v, si);
    uint32_t count = 0, tombs = 0, nttl = 0, nowned = 0;
    uint64_t used = 0;
    for (uint32_t i = 0; i < g.slots; i++) {
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
    shm_ix_t g = shm_ix(v, si);
    const uint64_t *ix = g.ix;
    char *ar = shm_arena(v, si);
    shm_shard_t *sh = shm_shard(v, si);
    uint64_t *blocks = NULL;
    size_t nb = 0;
    uint8_t *ref;
    int r;
    if (!shm_geom_ok(v, sh->geom) || sh->arena_cap > v->arena_size || sh->arena_cap % SHM_PAGE
            || sh->top > sh->arena_cap)
        return SHM_CORRUPT;     /* no crash stores any of these out of range */
    r = shm_walk_blocks(v, si, &blocks, &nb);
    if (r < 0) return r;
    ref = (uint8_t *)calloc(nb + 1, 1);
    if (!ref) { free(blocks); return SHM_NOMEM; }
    for (uint32_t i = 0; i < g.slots; i++) {
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

int shm_repair_shard(shm_view_t *v, uint32_t si) {
    shm_shard_t *sh = shm_shard(v, si);
    int r;
    sh->n_repairs++;
    r = reconcile(v, si);
    if (r == 0) shm_punch_idle_index(v, si);
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
