#include <string.h>

#include "bignum.h"

const int bignum_variant = CASFS_VARIANT;

void bignum_from_u64(bignum *r, uint64_t v)
{
    memset(r, 0, sizeof(*r));
    r->limb[0] = (uint32_t)v;
    r->limb[1] = (uint32_t)(v >> 32);
}

int bignum_add(bignum *r, const bignum *a, const bignum *b)
{
    uint64_t carry = 0;
    for (int i = 0; i < BIGNUM_LIMBS; i++) {
        uint64_t s = (uint64_t)a->limb[i] + b->limb[i] + carry;
        r->limb[i] = (uint32_t)s;
        carry = s >> 32;
    }
    return (int)carry;
}

void bignum_mul_small(bignum *r, const bignum *a, uint32_t m)
{
    uint64_t carry = 0;
    for (int i = 0; i < BIGNUM_LIMBS; i++) {
        uint64_t p = (uint64_t)a->limb[i] * m + carry;
        r->limb[i] = (uint32_t)p;
        carry = p >> 32;
    }
}

int bignum_cmp(const bignum *a, const bignum *b)
{
    for (int i = BIGNUM_LIMBS; i-- > 0;) {
        if (a->limb[i] != b->limb[i])
            return a->limb[i] < b->limb[i] ? -1 : 1;
    }
    return 0;
}

static uint32_t divmod_small(bignum *a, uint32_t d)
{
    uint64_t rem = 0;
    for (int i = BIGNUM_LIMBS; i-- > 0;) {
        uint64_t cur = rem << 32 | a->limb[i];
        a->limb[i] = (uint32_t)(cur / d);
        rem = cur % d;
    }
    return (uint32_t)rem;
}

size_t bignum_to_dec(const bignum *a, char *out, size_t cap)
{
    bignum t = *a;
    bignum zero;
    char tmp[BIGNUM_LIMBS * 10 + 1];
    size_t n = 0;
    memset(&zero, 0, sizeof(zero));
    do {
        tmp[n++] = (char)('0' + divmod_small(&t, 10));
    } while (bignum_cmp(&t, &zero) != 0 && n < sizeof(tmp));
    if (n + 1 > cap)
        return 0;
    for (size_t i = 0; i < n; i++)
        out[i] = tmp[n - 1 - i];
    out[n] = '\0';
    return n;
}
