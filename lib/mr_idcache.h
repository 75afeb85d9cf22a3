/* mr_idcache.h: a small per-process memory of ids whose outcome is settled for
 * good, so that a repeat is answered without a database round trip.
 *
 * The webhook keeps one per worker for Stripe event ids that PostgreSQL has
 * committed as final (processed, ignored, stale, failed): a redelivery of such
 * an event changes nothing there, so it can be answered "duplicate" from memory.
 * The database stays the only source of truth; the cache only remembers its
 * answers, for at most ttl_ms each (the bound on how far behind the database it
 * can be, e.g. after an operator deletes a row by hand).
 *
 * Bounded and allocation-free after creation: a fixed table of slots, each id
 * hashed to one slot; a colliding id replaces the older one (a miss costs only
 * the round trip the cache would have saved). Ids longer than MR_IDCACHE_MAX_ID
 * bytes are never stored. Not thread-safe (one per worker process). */
#ifndef MR_IDCACHE_H
#define MR_IDCACHE_H

#include <stddef.h>
#include <stdint.h>

#define MR_IDCACHE_MAX_ID 63

typedef struct mr_idcache mr_idcache;

/* A cache of `slots` entries (rounded up to a power of two, at most 1 << 20)
 * that keeps each id for ttl_ms. Returns NULL when ttl_ms <= 0 or slots == 0
 * (caching off) or memory is short; every function below accepts NULL as an
 * empty cache. */
mr_idcache *mr_idcache_new(size_t slots, int64_t ttl_ms);
void mr_idcache_free(mr_idcache *c);

/* 1 when id was put less than ttl_ms before now_ms (a monotonic clock). */
int mr_idcache_has(const mr_idcache *c, const char *id, int64_t now_ms);

/* Remembers id from now_ms on (replacing whatever held its slot). */
void mr_idcache_put(mr_idcache *c, const char *id, int64_t now_ms);

#endif
