/* test_idcache.c: the webhook's memory of settled event ids. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

#include "mr_idcache.h"

static void test_off_when_ttl_or_size_is_zero(void **state)
{
    (void)state;
    assert_null(mr_idcache_new(64, 0));
    assert_null(mr_idcache_new(64, -5));
    assert_null(mr_idcache_new(0, 1000));
    assert_null(mr_idcache_new(((size_t)1 << 20) + 1, 1000));
    /* NULL is an empty cache everywhere. */
    mr_idcache_put(NULL, "evt_1", 0);
    assert_int_equal(mr_idcache_has(NULL, "evt_1", 0), 0);
    mr_idcache_free(NULL);
}

static void test_put_then_has_until_ttl(void **state)
{
    (void)state;
    mr_idcache *c = mr_idcache_new(16, 1000);
    assert_non_null(c);
    assert_int_equal(mr_idcache_has(c, "evt_1", 100), 0);
    mr_idcache_put(c, "evt_1", 100);
    assert_int_equal(mr_idcache_has(c, "evt_1", 100), 1);
    assert_int_equal(mr_idcache_has(c, "evt_1", 1099), 1);
    assert_int_equal(mr_idcache_has(c, "evt_1", 1100), 0); /* expired exactly at ttl */
    /* A put refreshes. */
    mr_idcache_put(c, "evt_1", 1100);
    assert_int_equal(mr_idcache_has(c, "evt_1", 2000), 1);
    mr_idcache_free(c);
}

static void test_whole_id_decides(void **state)
{
    (void)state;
    mr_idcache *c = mr_idcache_new(16, 1000);
    mr_idcache_put(c, "evt_abc", 0);
    assert_int_equal(mr_idcache_has(c, "evt_ab", 1), 0);
    assert_int_equal(mr_idcache_has(c, "evt_abcd", 1), 0);
    assert_int_equal(mr_idcache_has(c, "EVT_ABC", 1), 0);
    assert_int_equal(mr_idcache_has(c, "", 1), 0);
    assert_int_equal(mr_idcache_has(c, NULL, 1), 0);
    assert_int_equal(mr_idcache_has(c, "evt_abc", 1), 1);
    mr_idcache_free(c);
}

static void test_long_ids_never_stored(void **state)
{
    (void)state;
    mr_idcache *c = mr_idcache_new(16, 1000);
    char id[MR_IDCACHE_MAX_ID + 2];
    memset(id, 'e', sizeof(id) - 1);
    id[sizeof(id) - 1] = '\0'; /* MAX_ID + 1 bytes */
    mr_idcache_put(c, id, 0);
    assert_int_equal(mr_idcache_has(c, id, 1), 0);
    id[MR_IDCACHE_MAX_ID] = '\0'; /* exactly MAX_ID bytes: kept */
    mr_idcache_put(c, id, 0);
    assert_int_equal(mr_idcache_has(c, id, 1), 1);
    mr_idcache_free(c);
}

/* More ids than slots: the table stays bounded, never answers for an id it
 * does not hold, and still holds every id that owns its slot (the last put). */
static void test_bounded_under_collisions(void **state)
{
    (void)state;
    mr_idcache *c = mr_idcache_new(8, 1000);
    char id[32];
    for (int i = 0; i < 1000; i++) {
        snprintf(id, sizeof id, "evt_%d", i);
        mr_idcache_put(c, id, 0);
    }
    int hits = 0;
    for (int i = 0; i < 1000; i++) {
        snprintf(id, sizeof id, "evt_%d", i);
        hits += mr_idcache_has(c, id, 1);
    }
    assert_true(hits >= 1 && hits <= 8);
    assert_int_equal(mr_idcache_has(c, "evt_999", 1), 1); /* the last put owns its slot */
    for (int i = 1000; i < 2000; i++) {
        snprintf(id, sizeof id, "evt_%d", i);
        assert_int_equal(mr_idcache_has(c, id, 1), 0);
    }
    mr_idcache_free(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_off_when_ttl_or_size_is_zero),
        cmocka_unit_test(test_put_then_has_until_ttl),
        cmocka_unit_test(test_whole_id_decides),
        cmocka_unit_test(test_long_ids_never_stored),
        cmocka_unit_test(test_bounded_under_collisions),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
