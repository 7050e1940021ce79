/*
 * A tiny test framework: TEST(name) defines and registers a test (a
 * constructor adds it to a list), CHECK* record a failure with file:line and
 * return from the test.  main() in unit_main.c runs them all, or those whose
 * name contains argv[1].  Prints "N passed, N failed" at the end.
 */
#ifndef SHM_TEST_CHECK_H
#define SHM_TEST_CHECK_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <stdio.h>
#include <stdint.h>

typedef void (*ut_fn)(void);
void ut_register(const char *name, ut_fn fn);
extern int ut_failed_now;   /* set by a failing CHECK in the running test */

#define TEST(name) \
    static void ut_##name(void); \
    __attribute__((constructor)) static void ut_reg_##name(void) { ut_register(#name, ut_##name); } \
    static void ut_##name(void)

#define FAILF(...) do { \
    fprintf(stderr, "  %s:%d: ", __FILE__, __LINE__); fprintf(stderr, __VA_ARGS__); \
    fputc('\n', stderr); ut_failed_now = 1; } while (0)

#define CHECK(cond) do { if (!(cond)) { FAILF("CHECK(%s)", #cond); return; } } while (0)
#define CHECK_EQ(a, b) do { long long ut_a = (long long)(a), ut_b = (long long)(b); \
    if (ut_a != ut_b) { FAILF("CHECK_EQ(%s, %s): %lld != %lld", #a, #b, ut_a, ut_b); return; } } while (0)
/* Checks that a shard passes shm_check_shard. */
#define CHECK_SHARD_OK(v, si) do { shm_check_t ut_e; shm_check_shard((v), (si), &ut_e); \
    if (ut_e.code) { FAILF("shard %u: check %d: %s (a=%llu b=%llu)", (unsigned)(si), ut_e.code, \
        shm_check_message(ut_e.code), (unsigned long long)ut_e.a, (unsigned long long)ut_e.b); return; } } while (0)
#define CHECK_ALL_OK(t) do { for (uint32_t ut_s = 0; ut_s < (t)->v.nsh; ut_s++) CHECK_SHARD_OK(&(t)->v, ut_s); } while (0)

#endif /* SHM_TEST_CHECK_H */
