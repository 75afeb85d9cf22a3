/* mr_idcache.c: see mr_idcache.h. A direct-mapped table: FNV-1a picks the slot,
 * the full id decides the hit. Ids reach it only from signature-checked events,
 * and a slot collision costs a round trip, never a wrong answer. */
#include "mr_idcache.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t expires_ms; /* 0: empty */
    char id[MR_IDCACHE_MAX_ID + 1];
} slot;

struct mr_idcache {
    size_t mask;
    int64_t ttl_ms;
    slot slots[];
};

static size_t slot_of(const mr_idcache *c, const char *id, size_t len)
{
    uint64_t h = 14695981039346656037ULL;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)id[i];
        h *= 1099511628211ULL;
    }
    return (size_t)(h ^ (h >> 32)) & c->mask;
}

mr_idcache *mr_idcache_new(size_t slots, int64_t ttl_ms)
{
    if (ttl_ms <= 0 || slots == 0 || slots > ((size_t)1 << 20))
        return NULL;
    size_t n = 1;
    while (n < slots)
        n <<= 1;
    mr_idcache *c = calloc(1, sizeof(*c) + n * sizeof(slot));
    if (c == NULL)
        return NULL;
    c->mask = n - 1;
    c->ttl_ms = ttl_ms;
    return c;
}

void mr_idcache_free(mr_idcache *c)
{
    free(c);
}

int mr_idcache_has(const mr_idcache *c, const char *id, int64_t now_ms)
{
    if (c == NULL || id == NULL)
        return 0;
    size_t len = strlen(id);
    if (len == 0 || len > MR_IDCACHE_MAX_ID)
        return 0;
    const slot *s = &c->slots[slot_of(c, id, len)];
    return s->expires_ms != 0 && now_ms < s->expires_ms && memcmp(s->id, id, len + 1) == 0;
}

void mr_idcache_put(mr_idcache *c, const char *id, int64_t now_ms)
{
    if (c == NULL || id == NULL)
        return;
    size_t len = strlen(id);
    if (len == 0 || len > MR_IDCACHE_MAX_ID)
        return;
    slot *s = &c->slots[slot_of(c, id, len)];
    memcpy(s->id, id, len + 1);
    s->expires_ms = now_ms + c->ttl_ms;
}
