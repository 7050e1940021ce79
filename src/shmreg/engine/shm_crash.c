/* Crash points (see shm_crash.h): the only globals of the engine. */
#define _GNU_SOURCE
#include "shm_crash.h"

#include <signal.h>
#include <unistd.h>

#define SHM_CRASH_NAME(id, name) name,
const char *const shm_crash_names[SHM_CP_COUNT] = { SHM_CRASH_POINTS(SHM_CRASH_NAME) };
#undef SHM_CRASH_NAME

int shm_crash_armed_point = -1;
static long countdown = 0;
static int stop_mode = 0;
static shm_crash_handler_t handler = 0;

void shm_crash_arm(int point, long count, int stop) {
    countdown = count;
    stop_mode = stop;
    shm_crash_armed_point = point;
}

void shm_crash_set_handler(shm_crash_handler_t h) {
    handler = h;
}

void shm_crash_hit(int point) {
    if (--countdown > 0) return;
    if (handler) {
        shm_crash_armed_point = -1;
        handler(point);        /* the fuzzer longjmps out: a simulated death */
        return;
    }
    if (stop_mode) {
        /* Stop mode: freeze right here (lock held) until SIGCONT, then go on. */
        shm_crash_armed_point = -1;
        kill(getpid(), SIGSTOP);
        return;
    }
    kill(getpid(), SIGKILL);
    for (;;) pause();
}
