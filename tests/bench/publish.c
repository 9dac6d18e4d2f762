/* Parallel publication, for tests/bench/run: WRITERS processes each publish
 * PER results of SIZE bytes under DIR the way ccache does: create a temporary
 * file beside the result, write distinct random bytes, close, rename onto a
 * result name DIR/<2 hex>/<28 hex>R (distinct for every writer and result).
 *
 * Usage: publish DIR WRITERS PER SIZE
 * DIR and its 256 subdirectories are created first (not timed). Prints
 * "RESULTS_PER_SECOND SECONDS", timed from releasing all writers at once
 * until the last one has exited.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t mix(uint64_t x) { /* splitmix64 */
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int writer(const char *dir, int w, int per, size_t size, uint64_t salt, int gate) {
    uint64_t *buf = malloc(size + 8);
    char final[4096], tmp[4200];
    char c;
    if (!buf) return 1;
    if (read(gate, &c, 1) < 0) return 1; /* returns 0 (EOF) when released */
    for (int i = 0; i < per; i++) {
        uint64_t h = mix(salt ^ ((uint64_t)w << 32) ^ (uint64_t)i);
        uint64_t s = h;
        for (size_t k = 0; k < size / 8 + 1; k++) buf[k] = s = mix(s);
        snprintf(final, sizeof final, "%s/%02x/%016llx%04x%08xR", dir,
                 (unsigned)(h >> 56), (unsigned long long)h, w & 0xffff, i);
        snprintf(tmp, sizeof tmp, "%s.tmp.%d.tmp", final, (int)getpid());
        int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd < 0) { perror(tmp); return 1; }
        const char *p = (const char *)buf;
        size_t left = size;
        while (left) {
            ssize_t n = write(fd, p, left);
            if (n < 0) { if (errno == EINTR) continue; perror(tmp); return 1; }
            p += n; left -= n;
        }
        if (close(fd)) { perror(tmp); return 1; }
        if (rename(tmp, final)) { perror(final); return 1; }
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: publish DIR WRITERS PER SIZE\n");
        return 2;
    }
    const char *dir = argv[1];
    int writers = atoi(argv[2]), per = atoi(argv[3]);
    size_t size = strtoul(argv[4], NULL, 10);
    char sub[4096];
    if (mkdir(dir, 0755) && errno != EEXIST) { perror(dir); return 1; }
    for (int d = 0; d < 256; d++) {
        snprintf(sub, sizeof sub, "%s/%02x", dir, d);
        if (mkdir(sub, 0755) && errno != EEXIST) { perror(sub); return 1; }
    }
    uint64_t salt = mix((uint64_t)time(NULL) ^ ((uint64_t)getpid() << 20));
    int gate[2];
    if (pipe(gate)) { perror("pipe"); return 1; }
    for (int w = 0; w < writers; w++) {
        pid_t pid = fork();
        if (pid < 0) { perror("fork"); return 1; }
        if (pid == 0) {
            close(gate[1]);
            _exit(writer(dir, w, per, size, salt, gate[0]));
        }
    }
    close(gate[0]);
    usleep(100000); /* let every writer reach the gate */
    double t0 = now();
    close(gate[1]);
    int failed = 0, status;
    while (wait(&status) > 0)
        if (!WIFEXITED(status) || WEXITSTATUS(status)) failed = 1;
    double dt = now() - t0;
    if (failed) { fprintf(stderr, "publish: a writer failed\n"); return 1; }
    printf("%.1f %.4f\n", writers * (double)per / dt, dt);
    return 0;
}
