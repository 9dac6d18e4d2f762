#include "csrc.h"

const int fixedpoint_variant = CASFS_VARIANT;

typedef int32_t q16;

#define Q16_ONE (1 << 16)

q16 csrc_q16_mul(q16 a, q16 b)
{
    return (q16)(((int64_t)a * b) >> 16);
}

q16 csrc_q16_div(q16 a, q16 b)
{
    if (b == 0)
        return a >= 0 ? INT32_MAX : INT32_MIN;
    return (q16)(((int64_t)a << 16) / b);
}

/* Square root by Newton's method on Q16.16 values. */
q16 csrc_q16_sqrt(q16 x)
{
    if (x <= 0)
        return 0;
    q16 r = x > Q16_ONE ? x / 2 : Q16_ONE;
    for (int i = 0; i < 24; i++) {
        q16 next = (r + csrc_q16_div(x, r)) / 2;
        if (next == r)
            break;
        r = next;
    }
    return r;
}
