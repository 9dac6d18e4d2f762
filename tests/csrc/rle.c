#include "csrc.h"

const int rle_variant = CASFS_VARIANT;

size_t csrc_rle_encode(const uint8_t *in, size_t n, uint8_t *out, size_t cap)
{
    size_t o = 0;
    size_t i = 0;
    while (i < n) {
        uint8_t b = in[i];
        size_t run = 1;
        while (i + run < n && in[i + run] == b && run < 255)
            run++;
        if (o + 2 > cap)
            return 0;
        out[o++] = (uint8_t)run;
        out[o++] = b;
        i += run;
    }
    return o;
}

size_t csrc_rle_decode(const uint8_t *in, size_t n, uint8_t *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i + 1 < n; i += 2) {
        size_t run = in[i];
        if (o + run > cap)
            return 0;
        for (size_t k = 0; k < run; k++)
            out[o++] = in[i + 1];
    }
    return o;
}
