#include <stdlib.h>
#include <string.h>

#include "csrc.h"

const int sieve_variant = CASFS_VARIANT;

size_t csrc_sieve(uint32_t limit, uint32_t *primes, size_t cap)
{
    if (limit < 2)
        return 0;
    uint8_t *composite = calloc(limit + 1, 1);
    if (!composite)
        return 0;
    size_t count = 0;
    for (uint32_t i = 2; i <= limit; i++) {
        if (composite[i])
            continue;
        if (count < cap)
            primes[count] = i;
        count++;
        for (uint64_t j = (uint64_t)i * i; j <= limit; j += i)
            composite[j] = 1;
    }
    free(composite);
    return CSRC_MIN(count, cap);
}
