/* Runs the registered unit tests (all, or those whose name contains argv[1]). */
#define _GNU_SOURCE
#include "check.h"

#include <stdlib.h>
#include <string.h>

#define UT_MAX 512
static struct { const char *name; ut_fn fn; } tests[UT_MAX];
static int ntests;
int ut_failed_now;

void ut_register(const char *name, ut_fn fn) {
    if (ntests == UT_MAX) abort();
    tests[ntests].name = name;
    tests[ntests].fn = fn;
    ntests++;
}

int main(int argc, char **argv) {
    int passed = 0, failed = 0;
    setvbuf(stdout, NULL, _IONBF, 0);
    for (int i = 0; i < ntests; i++) {
        if (argc > 1 && !strstr(tests[i].name, argv[1])) continue;
        ut_failed_now = 0;
        tests[i].fn();
        if (ut_failed_now) {
            printf("FAIL %s\n", tests[i].name);
            failed++;
        } else {
            printf("ok   %s\n", tests[i].name);
            passed++;
        }
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : (passed ? 0 : 2);
}
