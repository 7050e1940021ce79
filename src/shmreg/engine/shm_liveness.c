/*
 * Owner liveness and the process table.
 *
 * A process that owns entries itself (SHM_PROC_SELF) holds its slot's robust
 * mutex from a dedicated holder thread: when it dies, however it dies, the
 * kernel sets OWNER_DIED in the mutex word, so a reader learns of the death
 * with one load and no syscall.  A process registered by pid from elsewhere
 * (SHM_PROC_FOREIGN) is checked with a cached pidfd (poll) plus its start
 * time, so pid reuse cannot resurrect it.
 */
#define _GNU_SOURCE
#include "shm_engine.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/syscall.h>
#endif

#define PIDFD_NONE (-1)
#define PIDFD_DEAD (-2)

int shm_proc_stat(long pid, uint64_t *start, int *zombie) {
#if defined(__linux__)
    char path[64], buf[1024];
    char *p;
    int fd, field;
    ssize_t n;
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT || errno == ESRCH ? 0 : -1;
    n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    /* The command name may hold spaces and parentheses: split after the last ')'. */
    p = strrchr(buf, ')');
    if (!p || p[1] != ' ') return -1;
    p += 2;
    *zombie = (*p == 'Z' || *p == 'X');
    for (field = 3; field < 22; field++) {      /* state is field 3, start time 22 */
        p = strchr(p, ' ');
        if (!p) return -1;
        p++;
    }
    *start = strtoull(p, NULL, 10);
    return 1;
#else
    (void)pid; (void)start; (void)zombie;
    return -1;
#endif
}

static int pidfd_open_(long pid) {
#if defined(__linux__) && defined(SYS_pidfd_open)
    return (int)syscall(SYS_pidfd_open, (pid_t)pid, 0);
#else
    (void)pid;
    errno = ENOSYS;
    return -1;
#endif
}

static int pidfd_exited(int fd) {
    struct pollfd p = { fd, POLLIN, 0 };
    return poll(&p, 1, 0) > 0;
}

/* Liveness of (pid, start) without a pidfd: kill(0) plus /proc where present. */
static int pid_alive_slow(long pid, uint64_t start) {
    uint64_t st = 0;
    int z = 0, r;
    if (pid <= 0) return 0;
    if (kill((pid_t)pid, 0) != 0 && errno != EPERM) return 0;
    r = shm_proc_stat(pid, &st, &z);
    if (r == 0) return 0;
    if (r < 0) return 1;            /* no /proc: kill() is all we know */
    return !z && st == start;
}

void shm_forget_pidfd(shm_view_t *v, uint32_t slot) {
    if (!v->pidfds || slot >= SHM_NPROCS) return;
    if (v->pidfds[slot] >= 0) close(v->pidfds[slot]);
    v->pidfds[slot] = PIDFD_NONE;
}

void shm_close_pidfds(shm_view_t *v) {
    if (!v->pidfds) return;
    for (uint32_t i = 0; i < SHM_NPROCS; i++) shm_forget_pidfd(v, i);
}

static int foreign_alive(shm_view_t *v, uint32_t slot) {
    shm_proc_t *p = shm_proc(v, slot);
    uint32_t gen = shm_load32_rlx(&p->gen);
    long pid = (long)p->pid;
    uint64_t start = p->start_time, st = 0;
    int fd, z = 0, r;
    if (!v->pidfds) return pid_alive_slow(pid, start);
    if (v->pidfds[slot] != PIDFD_NONE) {
        if (v->pidfd_gen[slot] == gen) {
            if (v->pidfds[slot] == PIDFD_DEAD) return 0;
            if (!pidfd_exited(v->pidfds[slot])) return 1;
            /* Dead for good: remember the verdict, not the descriptor. */
            close(v->pidfds[slot]);
            v->pidfds[slot] = PIDFD_DEAD;
            return 0;
        }
        shm_forget_pidfd(v, slot);
    }
    if (pid <= 0) return 0;
    fd = pidfd_open_(pid);
    if (fd < 0) {
        if (errno == ESRCH) {
            v->pidfds[slot] = PIDFD_DEAD;
            v->pidfd_gen[slot] = gen;
            return 0;
        }
        return pid_alive_slow(pid, start);
    }
    /* The pidfd names whoever has the pid now: it is our owner only if the
     * start time still matches (checked after opening, so no reuse race). */
    r = shm_proc_stat(pid, &st, &z);
    if (r == 0 || (r == 1 && (z || st != start)) || pidfd_exited(fd)) {
        close(fd);
        v->pidfds[slot] = PIDFD_DEAD;
        v->pidfd_gen[slot] = gen;
        return 0;
    }
    v->pidfds[slot] = fd;
    v->pidfd_gen[slot] = gen;
    return 1;
}

int shm_owner_current(shm_view_t *v, uint32_t owner) {
    uint32_t slot = shm_owner_slot(owner);
    shm_proc_t *p;
    if (slot >= SHM_NPROCS) return 0;
    p = shm_proc(v, slot);
    return shm_load32_rlx(&p->state) == SHM_PROC_LIVE &&
           (shm_load32_rlx(&p->gen) & SHM_GEN_MASK) == shm_owner_gen(owner);
}

int shm_owner_alive(shm_view_t *v, uint32_t owner) {
    uint32_t slot;
    shm_proc_t *p;
    if (owner == 0) return 1;
    slot = shm_owner_slot(owner);
    if (slot >= SHM_NPROCS) return 0;
    p = shm_proc(v, slot);
    if (shm_load32_rlx(&p->state) != SHM_PROC_LIVE || (shm_load32_rlx(&p->gen) & SHM_GEN_MASK) != shm_owner_gen(owner))
        return 0;
    if (p->kind == SHM_PROC_SELF && shm_have_alive_word())
        return shm_mutex_held_by_live(&p->alive.m);
    return foreign_alive(v, slot);
}

/* ---- the process table -------------------------------------------------------- */

int shm_procs_lock(shm_view_t *v, int try_only) {
    pthread_mutex_t *m = &v->hdr->procs_lock.m;
    uint32_t holder;
    int rc = shm_mutex_lock(m, try_only, -1, &holder);
    if (rc == 0) return SHM_OK;
    if (rc == SHM_LOCK_OWNERDEAD) {
        /* A claimant died mid-claim: its slot never became LIVE. */
        for (uint32_t i = 0; i < SHM_NPROCS; i++)
            if (shm_proc(v, i)->state == SHM_PROC_CLAIMING) shm_proc(v, i)->state = SHM_PROC_FREE;
        shm_mutex_consistent(m);
        return SHM_OK;
    }
    switch (rc) {
    case SHM_LOCK_BUSY: return SHM_BUSY;
    case SHM_LOCK_ABANDONED: return SHM_ABANDONED;
    default: return SHM_BADLOCK;
    }
}

void shm_procs_unlock(shm_view_t *v) {
    shm_mutex_unlock(&v->hdr->procs_lock.m);
}

int shm_proc_claim_locked(shm_view_t *v, uint64_t pid, uint64_t start, int own_process,
                          shm_holder_t **holder, uint32_t *owner) {
    uint32_t i, slot = UINT32_MAX, gen;
    shm_proc_t *p;
    int rc;
    *holder = NULL;
    for (i = 0; i < SHM_NPROCS; i++) {
        uint32_t oid;
        p = shm_proc(v, i);
        oid = shm_owner_id(i, p->gen);
        if (p->state == SHM_PROC_LIVE && p->pid == pid && p->start_time == start
                && (p->kind == SHM_PROC_SELF || !own_process) && shm_owner_alive(v, oid)) {
            *owner = oid;
            return SHM_NO;    /* reused: the caller already holds (or checks) it */
        }
    }
    for (i = 0; i < SHM_NPROCS; i++) {
        if (shm_proc(v, i)->state == SHM_PROC_FREE) { slot = i; break; }
    }
    if (slot == UINT32_MAX) {
        /* Recycle the slot of a dead process.  Bumping the generation makes
         * its leftover entries dead at once; sweeps purge them. */
        for (i = 0; i < SHM_NPROCS; i++) {
            p = shm_proc(v, i);
            if (p->state == SHM_PROC_LIVE && !shm_owner_alive(v, shm_owner_id(i, p->gen))) { slot = i; break; }
        }
    }
    if (slot == UINT32_MAX) return SHM_FULL;
    p = shm_proc(v, slot);
    p->state = SHM_PROC_CLAIMING;
    gen = (p->gen + 1) & SHM_GEN_MASK;
    p->gen = gen;
    p->pid = pid;
    p->start_time = start;
    p->kind = own_process ? SHM_PROC_SELF : SHM_PROC_FOREIGN;
    shm_forget_pidfd(v, slot);
    if (own_process) {
        rc = shm_mutex_init(&p->alive.m);
        if (rc == 0) rc = shm_holder_start(&p->alive.m, holder);
        if (rc) {
            p->state = SHM_PROC_FREE;
            errno = rc;
            return SHM_SYSERR;
        }
    }
    shm_fence_rel();
    p->state = SHM_PROC_LIVE;
    *owner = shm_owner_id(slot, gen);
    return SHM_OK;
}

int shm_proc_release_locked(shm_view_t *v, uint32_t owner) {
    uint32_t slot = shm_owner_slot(owner);
    shm_proc_t *p;
    if (slot >= SHM_NPROCS) return SHM_NO;
    p = shm_proc(v, slot);
    if (p->state == SHM_PROC_LIVE && (p->gen & SHM_GEN_MASK) == shm_owner_gen(owner) && !shm_owner_alive(v, owner)) {
        p->state = SHM_PROC_FREE;
        shm_forget_pidfd(v, slot);
        return SHM_OK;
    }
    return SHM_NO;
}

/* ---- holder threads ----------------------------------------------------------------- */
/* A thread that takes a liveness mutex and holds it until released (or
 * until the process ends).  It must not be a Python thread: those end
 * before the process does. */

struct shm_holder {
    pthread_mutex_t *m;
    pthread_t thread;
    int pipe_r, pipe_w;       /* a byte on the pipe: unlock and end */
    volatile int state;       /* 0 starting, 1 holding, -1 failed */
};

static void *holder_main(void *arg) {
    shm_holder_t *h = (shm_holder_t *)arg;
    sigset_t all;
    char c;
    int rc;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);   /* signals are the main thread's business */
    rc = pthread_mutex_lock(h->m);
    if (rc == EOWNERDEAD) { shm_mutex_consistent(h->m); rc = 0; }
    __atomic_store_n(&h->state, rc == 0 ? 1 : -1, __ATOMIC_RELEASE);
    if (rc) return NULL;
    while (read(h->pipe_r, &c, 1) < 0 && errno == EINTR) {}
    pthread_mutex_unlock(h->m);
    return NULL;
}

int shm_holder_start(pthread_mutex_t *m, shm_holder_t **out) {
    shm_holder_t *h = (shm_holder_t *)calloc(1, sizeof *h);
    pthread_attr_t a;
    int fds[2], rc, st;
    if (!h) return ENOMEM;
    if (pipe(fds) != 0) { rc = errno; free(h); return rc; }
    fcntl(fds[0], F_SETFD, FD_CLOEXEC);
    fcntl(fds[1], F_SETFD, FD_CLOEXEC);
    h->m = m;
    h->pipe_r = fds[0];
    h->pipe_w = fds[1];
    pthread_attr_init(&a);
    pthread_attr_setstacksize(&a, 64 * 1024);
    rc = pthread_create(&h->thread, &a, holder_main, h);
    pthread_attr_destroy(&a);
    if (rc) { close(fds[0]); close(fds[1]); free(h); return rc; }
    while ((st = __atomic_load_n(&h->state, __ATOMIC_ACQUIRE)) == 0) sched_yield();
    if (st != 1) {
        pthread_join(h->thread, NULL);
        close(fds[0]);
        close(fds[1]);
        free(h);
        return EDEADLK;
    }
    *out = h;
    return 0;
}

void shm_holder_release(shm_holder_t *h) {
    char c = 1;
    if (!h) return;
    while (write(h->pipe_w, &c, 1) < 0 && errno == EINTR) {}
    pthread_join(h->thread, NULL);
    close(h->pipe_r);
    close(h->pipe_w);
    free(h);
}

void shm_holder_forget(shm_holder_t *h) {
    if (!h) return;
    close(h->pipe_r);
    close(h->pipe_w);
    free(h);
}
