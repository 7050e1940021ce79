/* Geometry, segment initialisation and attach-time validation. */
#define _GNU_SOURCE
#include "shm_engine.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static uint64_t align_up(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

int shm_plan(uint64_t capacity, uint64_t memory, uint32_t shards, int grows, shm_plan_t *p,
             const char **why) {
    uint32_t n, bits = 0;
    uint64_t per, slots, arena;
    double want;
    if (capacity < 1) { *why = "capacity must be at least 1"; return -1; }
    if (memory < 4096) { *why = "memory must be at least 4096 bytes"; return -1; }
    if (shards == 0) {
        /* 64 shards, halved while a shard would get under 256 KiB or under
         * 32 entries: small tables stay small, and a 64 KiB value always
         * fits a default-sized table. */
        n = 64;
        while (n > 1 && (memory / n < 256 * 1024 || capacity / n < 32)) n /= 2;
    } else {
        n = shards;
        if (n < 1 || n > SHM_MAX_SHARDS || (n & (n - 1))) {
            *why = "shards must be a power of two between 1 and 1024";
            return -1;
        }
    }
    per = capacity / n + (capacity % n != 0);
    /* Room for the uneven spread of keys over shards (mean + 4 sigma + slack)
     * at a load of at most ~0.8 when the table holds `capacity` entries. */
    want = (double)per * 1.25 + 4.0 * sqrt((double)per) + 8.0;
    if (want * n > (double)(1ULL << 40)) { *why = "capacity too large"; return -1; }
    slots = align_up((uint64_t)want, 8);
    if (slots * n > (1ULL << 40)) { *why = "capacity too large"; return -1; }
    /* Page multiples: a shard's arena grows and is given back a page at a time. */
    arena = align_up(memory / n + (memory % n != 0), SHM_PAGE);
    if (arena > 0xFFFFF000ULL) { *why = "memory too large for this shard count: pass more shards"; return -1; }
    while ((1u << bits) < n) bits++;
    p->nshards = n;
    p->shard_bits = bits;
    p->slots = (uint32_t)slots;
    p->max_fill = (uint32_t)(slots - (slots / 10 > 1 ? slots / 10 : 1));
    p->arena_size = arena;
    p->capacity = capacity;
    p->memory = memory;
    p->grows = grows ? 1 : 0;
    /* Two index buffers per shard (a resize fills one while readers use the
     * other), each with room for the limit. */
    p->index_buf = align_up(slots * 8, SHM_PAGE);
    /* A growing shard starts with a page of index (less for a small limit:
     * an eighth of it, so that even small tables are seen growing). */
    p->init_slots = (uint32_t)slots;
    if (grows) {
        uint64_t init = align_up(slots / 8, 8);
        if (init < 8) init = 8;
        if (init > SHM_INIT_SLOTS) init = SHM_INIT_SLOTS;
        p->init_slots = (uint32_t)init;
    }
    p->init_arena = grows ? SHM_PAGE : arena;
    p->procs_off = SHM_HEADER_SIZE;
    p->shards_off = p->procs_off + (uint64_t)SHM_NPROCS * sizeof(shm_proc_t);
    p->index_off = align_up(p->shards_off + (uint64_t)n * sizeof(shm_shard_t), SHM_PAGE);
    p->arena_off = p->index_off + 2 * (uint64_t)n * p->index_buf;
    p->total_size = p->arena_off + (uint64_t)n * arena;
    return 0;
}

int shm_plan_extent(const shm_plan_t *p, uint32_t i, uint64_t *off, uint64_t *len) {
    /* Header, process table and shard structs; then per shard its first
     * index buffer's initial slots and its initial arena. */
    if (i == 0) {
        *off = 0;
        *len = p->index_off;
        return 1;
    }
    i--;
    if (i >= 2 * p->nshards) return 0;
    if (i % 2 == 0) {
        /* Buffer 0 of shard i/2; a pre-sized table gets both buffers (they
         * are adjacent), so that it never needs more memory than it has. */
        *off = p->index_off + (uint64_t)i * p->index_buf;
        *len = p->grows ? align_up((uint64_t)p->init_slots * 8, SHM_PAGE) : 2 * p->index_buf;
    } else {
        *off = p->arena_off + (uint64_t)(i / 2) * p->arena_size;
        *len = p->init_arena;
    }
    return 1;
}

int shm_init_segment(char *base, const shm_plan_t *plan, uint64_t seed0, uint64_t seed1,
                     uint64_t creator_pid, uint64_t creator_start, uint64_t created_unix_ns,
                     int clock_bits) {
    shm_header_t *h = (shm_header_t *)base;
    int rc;
    h->layout = SHM_LAYOUT_VERSION;
    h->header_size = SHM_HEADER_SIZE;
    h->total_size = plan->total_size;
    h->nshards = plan->nshards;
    h->shard_bits = plan->shard_bits;
    h->slots = plan->slots;
    h->max_fill = plan->max_fill;
    h->arena_size = plan->arena_size;
    h->capacity = plan->capacity;
    h->memory = plan->memory;
    h->seed0 = seed0;
    h->seed1 = seed1;
    h->procs_off = plan->procs_off;
    h->shards_off = plan->shards_off;
    h->index_off = plan->index_off;
    h->arena_off = plan->arena_off;
    h->nprocs = SHM_NPROCS;
    h->proc_size = sizeof(shm_proc_t);
    h->shard_size = sizeof(shm_shard_t);
    h->bins = SHM_NBINS;
    h->creator_pid = creator_pid;
    h->creator_start = creator_start;
    h->created_unix_ns = created_unix_ns;
    h->table_flags = (clock_bits ? SHM_TABLE_CLOCK : 0) | (plan->grows ? SHM_TABLE_GROWS : 0);
    h->index_buf = plan->index_buf;
    h->init_slots = plan->init_slots;
    h->init_arena = plan->init_arena;
    if ((rc = shm_mutex_init(&h->procs_lock.m)) != 0) return rc;
    if ((rc = shm_mutex_init(&h->lease_lock.m)) != 0) return rc;
    for (uint32_t i = 0; i < plan->nshards; i++) {
        shm_shard_t *sh = (shm_shard_t *)(base + plan->shards_off + (size_t)i * sizeof(shm_shard_t));
        if ((rc = shm_mutex_init(&sh->lock.m)) != 0) return rc;
        for (uint32_t b = 0; b < SHM_NBINS; b++) sh->bins[b] = SHM_NIL;
        sh->geom = plan->init_slots;
        sh->arena_cap = plan->init_arena;
    }
    shm_fence_rel();
    shm_store_rel(&h->magic, SHM_MAGIC);
    return 0;
}

const char *shm_attach_message(int err) {
    switch (err) {
    case SHM_ATTACH_OK: return "ok";
    case SHM_ATTACH_SMALL: return "not a shmreg table (file is smaller than a header)";
    case SHM_ATTACH_UNINIT: return "segment is not initialised (creator still running or died)";
    case SHM_ATTACH_MAGIC: return "not a shmreg table (bad magic)";
    case SHM_ATTACH_VERSION: return "table has another layout version";
    case SHM_ATTACH_BUILD: return "table was made by an incompatible build (struct sizes differ)";
    case SHM_ATTACH_SHARDS: return "header: bad shard count";
    case SHM_ATTACH_INDEX: return "header: bad index geometry";
    case SHM_ATTACH_ARENA: return "header: bad arena size";
    case SHM_ATTACH_OFFSETS: return "header: region offsets do not match the geometry";
    case SHM_ATTACH_PLAN: return "header: geometry does not follow from capacity and memory";
    case SHM_ATTACH_SIZE: return "header: size does not match the geometry or the file";
    default: return "unknown attach error";
    }
}

int shm_attach(shm_view_t *v, char *base, size_t size) {
    const shm_header_t *h = (const shm_header_t *)base;
    shm_plan_t plan;
    const char *why;
    uint64_t magic;
    uint32_t n;
    if (size < SHM_HEADER_SIZE) return SHM_ATTACH_SMALL;
    magic = shm_load_acq(&h->magic);
    if (magic == 0) return SHM_ATTACH_UNINIT;
    if (magic != SHM_MAGIC) return SHM_ATTACH_MAGIC;
    if (h->layout != SHM_LAYOUT_VERSION) return SHM_ATTACH_VERSION;
    if (h->header_size != SHM_HEADER_SIZE || h->nprocs != SHM_NPROCS || h->proc_size != sizeof(shm_proc_t)
            || h->shard_size != sizeof(shm_shard_t) || h->bins != SHM_NBINS)
        return SHM_ATTACH_BUILD;
    /* The header is untrusted: read each field once, check it, and derive
     * every offset from checked values only. */
    n = h->nshards;
    if (n < 1 || n > SHM_MAX_SHARDS || (n & (n - 1)) || h->shard_bits >= 31 || (1u << h->shard_bits) != n)
        return SHM_ATTACH_SHARDS;
    if (h->slots < 8 || h->slots % 8 || (uint64_t)h->slots * n > (1ULL << 40)
            || h->max_fill >= h->slots || h->max_fill < 1)
        return SHM_ATTACH_INDEX;
    if (h->arena_size < SHM_PAGE || h->arena_size % SHM_PAGE || h->arena_size > 0xFFFFF000ULL)
        return SHM_ATTACH_ARENA;
    if (shm_plan(h->capacity, h->memory, n, (h->table_flags & SHM_TABLE_GROWS) != 0, &plan, &why) != 0)
        return SHM_ATTACH_PLAN;
    if (plan.procs_off != h->procs_off || plan.shards_off != h->shards_off
            || plan.index_off != h->index_off || plan.arena_off != h->arena_off)
        return SHM_ATTACH_OFFSETS;
    if (plan.slots != h->slots || plan.max_fill != h->max_fill || plan.arena_size != h->arena_size
            || plan.index_buf != h->index_buf || plan.init_slots != h->init_slots
            || plan.init_arena != h->init_arena)
        return SHM_ATTACH_PLAN;
    if (h->total_size != plan.total_size || plan.total_size != size)
        return SHM_ATTACH_SIZE;
    v->base = base;
    v->size = size;
    v->hdr = (shm_header_t *)base;
    v->nsh = n;
    v->shard_bits = plan.shard_bits;
    v->max_slots = plan.slots;
    v->init_slots = plan.init_slots;
    v->index_buf = plan.index_buf;
    v->arena_size = plan.arena_size;
    v->init_arena = plan.init_arena;
    v->seed0 = h->seed0;
    v->seed1 = h->seed1;
    v->procs_base = base + plan.procs_off;
    v->shards_base = base + plan.shards_off;
    v->index_base = base + plan.index_off;
    v->arena_base = base + plan.arena_off;
    v->mark_clock = (h->table_flags & SHM_TABLE_CLOCK) != 0;
    v->fd = -1;     /* the binding sets it: without one, growth allocates nothing */
    v->grows = (h->table_flags & SHM_TABLE_GROWS) != 0;
    v->last_evicted = 0;
    return SHM_ATTACH_OK;
}

int shm_recbuf_append(shm_recbuf_t *b, const shm_item_t *it, uint32_t klen, uint32_t vlen,
                      const char *val, const char *key) {
    /* klen/vlen are the lengths the caller already bounds-checked: never
     * re-read them from shared memory, where a concurrent writer may have
     * changed them since. */
    size_t need = SHM_REC_HDR + shm_align8((uint64_t)klen + vlen);
    char *r;
    uint32_t u;
    uint64_t exp;
    if (b->len + need > b->cap) {
        size_t ncap = b->cap ? b->cap * 2 : 4096;
        char *nd;
        while (ncap < b->len + need) ncap *= 2;
        nd = (char *)realloc(b->data, ncap);
        if (!nd) return -1;
        b->data = nd;
        b->cap = ncap;
    }
    r = b->data + b->len;
    memcpy(r, &klen, 4);
    memcpy(r + 4, &vlen, 4);
    r[8] = (char)(it->types & 15);
    r[9] = (char)(it->types >> 4);
    r[10] = 0;
    r[11] = 0;
    u = it->owner;
    memcpy(r + 12, &u, 4);
    exp = it->expires;
    memcpy(r + 16, &exp, 8);
    memcpy(r + SHM_REC_HDR, key, klen);
    memcpy(r + SHM_REC_HDR + klen, val, vlen);
    /* Zero the padding: records are compared byte-wise by some callers. */
    memset(r + SHM_REC_HDR + klen + vlen, 0, need - SHM_REC_HDR - klen - vlen);
    b->len += need;
    b->nrec += 1;
    return 0;
}

void shm_recbuf_free(shm_recbuf_t *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = b->nrec = 0;
}

/* The layout table of shm_layout.h (SHM_LAYOUT_FIELDS) for the binding:
 * field i's "struct.field" name, offset and size; 0 past the end. */
#define SHM_FIELD_ROW(st, f) { #st "." #f, offsetof(shm_##st##_t, f), sizeof(((shm_##st##_t *)0)->f) },
static const struct { const char *name; size_t off, size; } layout_rows[] = { SHM_LAYOUT_FIELDS(SHM_FIELD_ROW) };
#undef SHM_FIELD_ROW

int shm_layout_field(int i, const char **name, size_t *off, size_t *size) {
    if (i < 0 || (size_t)i >= sizeof layout_rows / sizeof layout_rows[0]) return 0;
    *name = layout_rows[i].name;
    *off = layout_rows[i].off;
    *size = layout_rows[i].size;
    return 1;
}
