#include "csrc.h"

const int utf8_variant = CASFS_VARIANT;

/* Returns the number of code points, or -1 on malformed input. */
int csrc_utf8_decode(const char *s, size_t n, uint32_t *cps, size_t cap)
{
    const uint8_t *p = (const uint8_t *)s;
    size_t i = 0;
    int count = 0;
    while (i < n) {
        uint32_t cp;
        int extra;
        if (p[i] < 0x80) {
            cp = p[i];
            extra = 0;
        } else if ((p[i] & 0xE0) == 0xC0) {
            cp = p[i] & 0x1F;
            extra = 1;
        } else if ((p[i] & 0xF0) == 0xE0) {
            cp = p[i] & 0x0F;
            extra = 2;
        } else if ((p[i] & 0xF8) == 0xF0) {
            cp = p[i] & 0x07;
            extra = 3;
        } else {
            return -1;
        }
        if ((size_t)extra >= n - i)
            return -1;
        for (int k = 1; k <= extra; k++) {
            if ((p[i + k] & 0xC0) != 0x80)
                return -1;
            cp = cp << 6 | (p[i + k] & 0x3F);
        }
        if ((size_t)count < cap)
            cps[count] = cp;
        count++;
        i += (size_t)extra + 1;
    }
    return count;
}
