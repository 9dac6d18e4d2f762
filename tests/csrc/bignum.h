/* Fixed-width unsigned big integers, little-endian 32-bit limbs. */
#ifndef BIGNUM_H
#define BIGNUM_H

#include "csrc.h"

#define BIGNUM_LIMBS 8

typedef struct {
    uint32_t limb[BIGNUM_LIMBS];
} bignum;

void bignum_from_u64(bignum *r, uint64_t v);
int bignum_add(bignum *r, const bignum *a, const bignum *b);
void bignum_mul_small(bignum *r, const bignum *a, uint32_t m);
int bignum_cmp(const bignum *a, const bignum *b);
size_t bignum_to_dec(const bignum *a, char *out, size_t cap);

#endif
