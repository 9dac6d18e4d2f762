/* Shared declarations for the casfs test sources. Deterministic: no date,
 * time or other build-time values (and none of those macro names may appear
 * even in comments, or ccache turns its direct mode off). CASFS_VARIANT lets
 * a test compile every source several times as distinct cache entries. */
#ifndef CSRC_H
#define CSRC_H

#include <stddef.h>
#include <stdint.h>

#ifndef CASFS_VARIANT
#define CASFS_VARIANT 0
#endif

#define CSRC_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define CSRC_MIN(a, b) ((a) < (b) ? (a) : (b))
#define CSRC_MAX(a, b) ((a) > (b) ? (a) : (b))

struct csrc_buf {
    uint8_t *data;
    size_t len;
    size_t cap;
};

uint32_t csrc_crc32(const uint8_t *p, size_t n);
uint64_t csrc_fnv1a(const uint8_t *p, size_t n);
void csrc_sort_u32(uint32_t *v, size_t n);
size_t csrc_base64_encode(const uint8_t *in, size_t n, char *out);
size_t csrc_rle_encode(const uint8_t *in, size_t n, uint8_t *out, size_t cap);
size_t csrc_rle_decode(const uint8_t *in, size_t n, uint8_t *out, size_t cap);
size_t csrc_sieve(uint32_t limit, uint32_t *primes, size_t cap);
int csrc_utf8_decode(const char *s, size_t n, uint32_t *cps, size_t cap);
void csrc_matmul(const double *a, const double *b, double *c, int n);

#endif
