/*
 * A plain main() for a fuzz target, for compilers without libFuzzer: runs
 * LLVMFuzzerTestOneInput on every file given, and on every file of every
 * directory given (sorted, not recursive).  A crash or sanitizer report
 * aborts with a non-zero exit, naming the input first.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int run_file(const char *path) {
    FILE *f = fopen(path, "rb");
    uint8_t *buf;
    long n;
    if (!f) { perror(path); return -1; }
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = (uint8_t *)malloc(n > 0 ? (size_t)n : 1);
    if (!buf || (n > 0 && fread(buf, 1, (size_t)n, f) != (size_t)n)) { fclose(f); free(buf); return -1; }
    fclose(f);
    fprintf(stderr, "input %s\n", path);
    LLVMFuzzerTestOneInput(buf, (size_t)n);
    free(buf);
    return 0;
}

static int cmp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

int main(int argc, char **argv) {
    long count = 0;
    for (int i = 1; i < argc; i++) {
        struct stat st;
        if (stat(argv[i], &st) != 0) continue;      /* a missing regression dir: nothing to replay */
        if (S_ISDIR(st.st_mode)) {
            DIR *d = opendir(argv[i]);
            struct dirent *de;
            char **names = NULL;
            size_t nn = 0;
            if (!d) { perror(argv[i]); return 1; }
            while ((de = readdir(d)) != NULL) {
                if (de->d_name[0] == '.') continue;
                names = (char **)realloc(names, (nn + 1) * sizeof *names);
                names[nn++] = strdup(de->d_name);
            }
            closedir(d);
            qsort(names, nn, sizeof *names, cmp);
            for (size_t j = 0; j < nn; j++) {
                char path[4096];
                snprintf(path, sizeof path, "%s/%s", argv[i], names[j]);
                if (run_file(path) != 0) return 1;
                count++;
                free(names[j]);
            }
            free(names);
        } else {
            if (run_file(argv[i]) != 0) return 1;
            count++;
        }
    }
    printf("replayed %ld inputs\n", count);
    return 0;
}
