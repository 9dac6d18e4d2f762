#include "bignum.h"

const int factorial_variant = CASFS_VARIANT;

/* Writes n! in decimal; returns its length, or 0 if it does not fit. */
size_t csrc_factorial_dec(uint32_t n, char *out, size_t cap)
{
    bignum acc;
    bignum_from_u64(&acc, 1);
    for (uint32_t i = 2; i <= n; i++)
        bignum_mul_small(&acc, &acc, i);
    return bignum_to_dec(&acc, out, cap);
}

size_t csrc_fibonacci_dec(uint32_t n, char *out, size_t cap)
{
    bignum a, b, t;
    bignum_from_u64(&a, 0);
    bignum_from_u64(&b, 1);
    for (uint32_t i = 0; i < n; i++) {
        bignum_add(&t, &a, &b);
        a = b;
        b = t;
    }
    return bignum_to_dec(&a, out, cap);
}
