/* Probing and snapshots: the read side.  Every offset and length read from
 * the segment is checked against the shard's arena before it is used. */
#define _GNU_SOURCE
#include "shm_engine.h"

#include <string.h>

int64_t shm_find(const shm_view_t *v, uint32_t si, const shm_key_t *k, uint64_t *out_off, int64_t *ins) {
    return shm_find_inline(v, si, k, out_off, ins);
}

int shm_snap_shard(shm_view_t *v, uint32_t si, uint64_t now, shm_recbuf_t *b,
                   const shm_key_t *prefix, size_t *count) {
    const shm_ix_t g = shm_ix(v, si);
    const uint64_t *ix = g.ix;
    const char *ar = shm_arena(v, si);
    *count = 0;
    for (uint32_t i = 0; i < g.slots; i++) {
        uint64_t s = shm_load_rlx(&ix[i]);
        uint64_t off = s & SHM_SLOT_OFFMASK, size, vlen, klen, exp;
        uint32_t owner;
        const shm_item_t *it;
        if (off <= SHM_SLOT_TOMB) continue;
        off -= 8;
        if ((off & 7) || off > v->arena_size - SHM_BLOCK_MIN) return SHM_CORRUPT;
        it = (const shm_item_t *)(ar + off);
        size = it->size;
        vlen = it->vlen;
        klen = it->klen;
        exp = it->expires;
        owner = it->owner;
        if (size < SHM_BLOCK_MIN || (size & 7) || size > v->arena_size - off || SHM_ITEM_HDR + vlen + klen > size)
            return SHM_CORRUPT;
        if (exp && exp <= now) continue;
        if (owner && !shm_owner_alive(v, owner)) continue;
        if (prefix) {
            if ((unsigned)(it->types & 15) != prefix->ktype || klen < prefix->n
                    || memcmp(ar + off + SHM_ITEM_HDR + vlen, prefix->p, prefix->n) != 0)
                continue;
        }
        (*count)++;
        if (b && shm_recbuf_append(b, it, (uint32_t)klen, (uint32_t)vlen, ar + off + SHM_ITEM_HDR,
                                   ar + off + SHM_ITEM_HDR + vlen) < 0)
            return SHM_NOMEM;
    }
    return SHM_OK;
}
