/* Latency of one system call on one path, for tests/bench/run.
 *
 * Usage: lat OP PATH [N=20000] [WARMUP=2000]
 *   OP: stat       stat(PATH)
 *       utime      utimensat(AT_FDCWD, PATH, NULL, 0)   (touch to now)
 *       openclose  open(PATH, O_RDONLY) + close
 * Times every call with clock_gettime(CLOCK_MONOTONIC) after WARMUP
 * untimed calls, and prints "MEDIAN_US P90_US".
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static int one(int op, const char *path) {
    struct stat st;
    int fd;
    switch (op) {
    case 0: return stat(path, &st);
    case 1: return utimensat(AT_FDCWD, path, NULL, 0);
    default:
        fd = open(path, O_RDONLY);
        if (fd < 0) return -1;
        return close(fd);
    }
}

static int cmp(const void *a, const void *b) {
    long x = *(const long *)a, y = *(const long *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: lat stat|utime|openclose PATH [N] [WARMUP]\n");
        return 2;
    }
    int op = !strcmp(argv[1], "stat") ? 0 : !strcmp(argv[1], "utime") ? 1
           : !strcmp(argv[1], "openclose") ? 2 : -1;
    if (op < 0) { fprintf(stderr, "lat: unknown op %s\n", argv[1]); return 2; }
    const char *path = argv[2];
    long n = argc > 3 ? atol(argv[3]) : 20000;
    long warm = argc > 4 ? atol(argv[4]) : 2000;
    long *ns = malloc(n * sizeof *ns);
    if (!ns) return 1;
    for (long i = 0; i < warm; i++)
        if (one(op, path)) { perror(path); return 1; }
    for (long i = 0; i < n; i++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        if (one(op, path)) { perror(path); return 1; }
        clock_gettime(CLOCK_MONOTONIC, &b);
        ns[i] = (b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec);
    }
    qsort(ns, n, sizeof *ns, cmp);
    printf("%.2f %.2f\n", ns[n / 2] / 1000.0, ns[n * 9 / 10] / 1000.0);
    return 0;
}
