#include <stdlib.h>
#include <string.h>

#include "csrc.h"

const int hashmap_variant = CASFS_VARIANT;

uint64_t csrc_fnv1a_str(const char *s);

struct entry {
    char *key;
    long value;
};

struct hashmap {
    struct entry *slots;
    size_t cap;
    size_t len;
};

static char *dup_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

struct hashmap *csrc_hashmap_new(size_t cap)
{
    struct hashmap *m = calloc(1, sizeof(*m));
    if (!m)
        return NULL;
    m->cap = cap < 8 ? 8 : cap;
    m->slots = calloc(m->cap, sizeof(struct entry));
    if (!m->slots) {
        free(m);
        return NULL;
    }
    return m;
}

int csrc_hashmap_put(struct hashmap *m, const char *key, long value)
{
    if (m->len + 1 > m->cap / 2)
        return -1;
    size_t i = csrc_fnv1a_str(key) % m->cap;
    while (m->slots[i].key) {
        if (strcmp(m->slots[i].key, key) == 0) {
            m->slots[i].value = value;
            return 0;
        }
        i = (i + 1) % m->cap;
    }
    m->slots[i].key = dup_str(key);
    if (!m->slots[i].key)
        return -1;
    m->slots[i].value = value;
    m->len++;
    return 0;
}

int csrc_hashmap_get(const struct hashmap *m, const char *key, long *value)
{
    size_t i = csrc_fnv1a_str(key) % m->cap;
    while (m->slots[i].key) {
        if (strcmp(m->slots[i].key, key) == 0) {
            *value = m->slots[i].value;
            return 1;
        }
        i = (i + 1) % m->cap;
    }
    return 0;
}

void csrc_hashmap_free(struct hashmap *m)
{
    for (size_t i = 0; i < m->cap; i++)
        free(m->slots[i].key);
    free(m->slots);
    free(m);
}
