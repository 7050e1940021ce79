/*
 * Crash points: tests kill (or stop) a writer at a named step to prove that
 * a death at any instant leaves a repairable shard.  One list gives both the
 * enum and the names.  Armed only when the binding arms one (from
 * SHMREG_CRASH_AT); otherwise one well-predicted branch per step.
 */
#ifndef SHM_CRASH_H
#define SHM_CRASH_H

#define SHM_CRASH_POINTS(X) \
    X(SET_LOCKED, "set:locked")             /* lock held, nothing changed */ \
    X(SET_ALLOCATED, "set:allocated")       /* new block carved, not written */ \
    X(SET_WRITTEN, "set:written")           /* new item complete, not published */ \
    X(SET_PUBLISHED, "set:published")       /* index points at the new item, seq odd */ \
    X(SET_FREED, "set:freed")               /* old item freed, seq even, lock held */ \
    X(DEL_UNPUBLISHED, "del:unpublished")   /* tombstone stored, seq odd */ \
    X(DEL_FREED, "del:freed")               /* block freed, lock held */ \
    X(COUNTER_STORED, "counter:stored")     /* in-place counter store done, seq odd */ \
    X(ALLOC_SPLIT, "alloc:split")           /* remainder header written, head not yet shrunk */ \
    X(COALESCE_MERGED, "coalesce:merged")   /* one merge done during a coalesce pass */ \
    X(RESIZE_HALF, "resize:half")           /* index resize: half the slots copied to the idle buffer */ \
    X(RESIZE_PUBLISHED, "resize:published") /* index resize: geom names the new buffer, seq odd */ \
    X(ARENA_ALLOCATED, "arena:allocated")   /* arena growth: file space allocated, cap not raised */ \
    X(COMPACT_COPIED, "compact:copied")     /* compaction: item copied down, index not yet moved */ \
    X(COMPACT_MOVED, "compact:moved")       /* compaction: index names the copy, seq odd */ \
    X(CLEAR_HALF, "clear:half")             /* clear(): half the index cleared */

#define SHM_CRASH_ENUM(id, name) SHM_CP_##id,
enum shm_crash_point { SHM_CRASH_POINTS(SHM_CRASH_ENUM) SHM_CP_COUNT };
#undef SHM_CRASH_ENUM

/* Names, indexed by enum shm_crash_point. */
extern const char *const shm_crash_names[SHM_CP_COUNT];

/* What a crash point does when hit.  The default kills the process (SIGKILL)
 * or stops it (SIGSTOP); the in-process fuzzer installs a handler that
 * longjmps out instead, to simulate a death and then repair. */
typedef void (*shm_crash_handler_t)(int point);

extern int shm_crash_armed_point;
void shm_crash_hit(int point);
/* Arm point (SHM_CP_*) to fire at its count-th hit; stop: SIGSTOP instead of
 * SIGKILL (once; the process carries on after SIGCONT).  point -1 disarms. */
void shm_crash_arm(int point, long count, int stop);
void shm_crash_set_handler(shm_crash_handler_t h);

#define SHM_CRASH_POINT(id) do { \
    if (__builtin_expect(shm_crash_armed_point == (SHM_CP_##id), 0)) shm_crash_hit(SHM_CP_##id); \
} while (0)

#endif /* SHM_CRASH_H */
