/* event.c: see event.h.
 *
 * The parsed events' memory. A Stripe event is a hundred-odd JSON values, and
 * cJSON makes each a node and a string of its own: through malloc that is a few
 * hundred allocations and frees a delivery, which left glibc's fast bins full of
 * small chunks for the next large allocation to consolidate (about a third of a
 * duplicate delivery's user-space time was malloc's). Instead cJSON's hooks point
 * into a pool while an event is parsed, and the trees of the events in hand are
 * dropped together, in one step, once the last of them is freed (a batch holds up
 * to MR_BATCH_MAX at once). The trees are read, never changed, so no node is
 * freed on its own. The pool is written here, not taken from glibc's obstack:
 * obstack's macros compute addresses from a null pointer, which the
 * UndefinedBehaviorSanitizer of the sanitizer build and the fuzzers refuses. With
 * AddressSanitizer the pool's free memory is poisoned, so that a tree used after
 * its event was freed is reported as it would be with malloc. */
#include <stdalign.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <sanitizer/asan_interface.h>

#include "event.h"

#define POOL_CHUNK (16 * 1024) /* an event's tree is 5-8 KiB: a batch of two fits */

typedef struct chunk {
    struct chunk *prev;
    size_t size, used;
    max_align_t data[]; /* size bytes */
} chunk;

static chunk *pool_first; /* kept across events */
static chunk *pool_cur;   /* the one allocations come from */
static int pool_live;     /* events parsed and not yet freed */

/* NULL when malloc fails: cJSON then fails the parse. */
static void *pool_alloc(size_t n)
{
    const size_t align = alignof(max_align_t);
    if (n > SIZE_MAX / 2)
        return NULL;
    n = (n + align - 1) & ~(align - 1);
    if (!pool_cur || pool_cur->size - pool_cur->used < n) {
        size_t size = n > POOL_CHUNK ? n : POOL_CHUNK;
        chunk *c = malloc(sizeof *c + size);
        if (!c)
            return NULL;
        c->prev = pool_cur;
        c->size = size;
        c->used = 0;
        ASAN_POISON_MEMORY_REGION(c->data, size);
        if (!pool_first)
            pool_first = c;
        pool_cur = c;
    }
    void *p = (char *)pool_cur->data + pool_cur->used;
    pool_cur->used += n;
    ASAN_UNPOISON_MEMORY_REGION(p, n);
    return p;
}

static void pool_free(void *p)
{
    (void)p; /* the tree goes at once, in pool_empty */
}

static void pool_empty(void)
{
    while (pool_cur && pool_cur != pool_first) {
        chunk *prev = pool_cur->prev;
        free(pool_cur);
        pool_cur = prev;
    }
    if (pool_first) {
        pool_first->used = 0;
        ASAN_POISON_MEMORY_REGION(pool_first->data, pool_first->size);
    }
}

static cJSON *parse_in_pool(const char *body, size_t len)
{
    cJSON_Hooks hooks = {.malloc_fn = pool_alloc, .free_fn = pool_free};
    cJSON_InitHooks(&hooks);
    cJSON *root = mr_json_parse(body, len);
    cJSON_InitHooks(NULL); /* every other use of cJSON: malloc and free */
    if (root)
        pool_live++;
    else if (pool_live == 0)
        pool_empty();
    return root;
}

static void drop_tree(void)
{
    if (--pool_live == 0)
        pool_empty();
}

mr_err wh_event_parse(const char *body, size_t len, wh_event *ev, const char **code,
                      char *err, size_t errlen)
{
    memset(ev, 0, sizeof *ev);
    cJSON *root = parse_in_pool(body, len);
    if (root == NULL) {
        *code = "malformed_json";
        return mr_seterr(err, errlen, MR_EINVAL, "the body is not valid JSON");
    }
    const cJSON *obj = mr_json_path(root, "data.object");
    const cJSON *live = cJSON_IsObject(root) ? cJSON_GetObjectItemCaseSensitive(root, "livemode")
                                             : NULL;
    if (!cJSON_IsObject(root) || mr_json_str(root, "id", &ev->id) != MR_OK || !*ev->id
        || strlen(ev->id) > 255
        || mr_json_str(root, "type", &ev->type) != MR_OK || !*ev->type || strlen(ev->type) > 255
        || mr_json_i64(root, "created", 0, 253402300799LL, &ev->created) != MR_OK
        || !cJSON_IsObject(obj) || (live != NULL && !cJSON_IsBool(live))) {
        drop_tree();
        memset(ev, 0, sizeof *ev);
        *code = "invalid_event";
        return mr_seterr(err, errlen, MR_EINVAL,
                         "an event needs a string id and type, an integer created and data.object "
                         "(and a boolean livemode, when present)");
    }
    ev->root = root;
    ev->object = obj;
    ev->livemode = cJSON_IsTrue(live);
    return MR_OK;
}

void wh_event_free(wh_event *ev)
{
    if (ev->root)
        drop_tree();
    memset(ev, 0, sizeof *ev);
}
