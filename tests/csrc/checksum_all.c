#include <string.h>

#include "bignum.h"
#include "csrc.h"

const int checksum_all_variant = CASFS_VARIANT;

/* Ties several of the other units together, so this object has many
 * undefined references and a larger body than the others. */
uint64_t csrc_checksum_all(const char *text)
{
    size_t n = strlen(text);
    uint64_t h = csrc_fnv1a((const uint8_t *)text, n);
    h ^= (uint64_t)csrc_crc32((const uint8_t *)text, n) << 32;

    char b64[256];
    if (n <= 180)
        h += csrc_base64_encode((const uint8_t *)text, n, b64);

    uint32_t primes[64];
    size_t np = csrc_sieve(300, primes, CSRC_ARRAY_LEN(primes));
    for (size_t i = 0; i < np; i++)
        h = h * 31 + primes[i];

    uint32_t cps[128];
    int ncp = csrc_utf8_decode(text, n, cps, CSRC_ARRAY_LEN(cps));
    h += (uint64_t)(ncp < 0 ? 0 : ncp);

    bignum a, b;
    bignum_from_u64(&a, h);
    bignum_from_u64(&b, h >> 7);
    bignum_add(&a, &a, &b);
    h ^= a.limb[0] | (uint64_t)a.limb[1] << 32;
    return h;
}
