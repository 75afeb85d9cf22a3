/* test_provisioner_state.c: the dokku-provisioner's records (fingerprints, the
 * dry-run registry): lines in bucket files, read and rewritten in place. What an
 * operator would notice if it went wrong: one instance's record changed or lost
 * by another's, a record read back wrong, a file written through a link. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* The module under test is part of the function's binary, not of libmindroom. */
#include "../../functions/dokku-provisioner/state.c"

static char dir[64];
static prov_config c;

static int setup(void **state)
{
    (void)state;
    snprintf(dir, sizeof dir, "/tmp/mr-prov-state-XXXXXX");
    if (!mkdtemp(dir)) return -1;
    memset(&c, 0, sizeof c);
    c.state_dir = dir;
    c.app_lock_wait_ms = 100;
    char err[256];
    return prov_state_init(&c, err, sizeof err) == MR_OK ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

static const char *get(const char *name)
{
    static char v[80];
    int r = prov_state_record(&c, "dry-run/apps", name, NULL, v, sizeof v);
    assert_true(r >= 0);
    return r ? v : NULL;
}

static void set(const char *name, const char *value)
{
    assert_true(prov_state_record(&c, "dry-run/apps", name, value, NULL, 0) >= 0);
}

/* Names whose records share the bucket of `first`, found by the same hash. */
static void same_bucket(const char *first, char names[][32], int n)
{
    unsigned want = (unsigned)(name_hash(first) % RECORD_BUCKETS);
    snprintf(names[0], 32, "%s", first);
    for (int i = 0, k = 1; k < n; i++) {
        snprintf(names[k], 32, "%s%d", first, i); /* also: names that extend another */
        if ((unsigned)(name_hash(names[k]) % RECORD_BUCKETS) == want) k++;
    }
}

static void test_records_in_one_file_keep_their_own_values(void **state)
{
    (void)state;
    char n[5][32];
    same_bucket("mindroom-a", n, 5);
    assert_null(get(n[0]));
    for (int i = 0; i < 5; i++) set(n[i], "created");
    set(n[2], "running");              /* a line in the middle changes */
    set(n[0], "");                     /* the first line goes */
    set(n[4], "stopped");              /* the last line changes */
    set(n[3], "running");
    set(n[3], "running");              /* unchanged: nothing to write */
    assert_null(get(n[0]));
    assert_string_equal(get(n[1]), "created");
    assert_string_equal(get(n[2]), "running");
    assert_string_equal(get(n[3]), "running");
    assert_string_equal(get(n[4]), "stopped");
    set(n[0], "running");              /* back, at the end */
    assert_string_equal(get(n[0]), "running");
    for (int i = 0; i < 5; i++) set(n[i], "");
    for (int i = 0; i < 5; i++) assert_null(get(n[i]));
    /* Removing what is not there is not an error, and makes no file. */
    assert_int_equal(prov_state_record(&c, "dry-run/networks", "mindroom-none", "", NULL, 0), 0);
    char path[256];
    snprintf(path, sizeof path, "%s/dry-run/networks/%02x", dir,
             (unsigned)(name_hash("mindroom-none") % RECORD_BUCKETS));
    assert_int_equal(access(path, F_OK), -1);
}

static void test_a_fingerprint_round_trips_and_is_private(void **state)
{
    (void)state;
    const char *fp = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    char v[80];
    assert_int_equal(prov_state_record(&c, "apps", "mindroom-fp", fp, NULL, 0), 0);
    assert_int_equal(prov_state_record(&c, "apps", "mindroom-fp", NULL, v, sizeof v), 1);
    assert_string_equal(v, fp);
    char path[256];
    snprintf(path, sizeof path, "%s/apps/%02x", dir,
             (unsigned)(name_hash("mindroom-fp") % RECORD_BUCKETS));
    struct stat st;
    assert_int_equal(lstat(path, &st), 0);
    assert_true(S_ISREG(st.st_mode));
    assert_int_equal(st.st_mode & 07777, 0600);
}

static void test_a_line_cut_short_is_not_joined_to_the_next(void **state)
{
    (void)state;
    char n[2][32];
    same_bucket("mindroom-cut", n, 2);
    char path[256];
    snprintf(path, sizeof path, "%s/dry-run/apps/%02x", dir,
             (unsigned)(name_hash(n[0]) % RECORD_BUCKETS));
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(fd >= 0);
    char line[64];
    int len = snprintf(line, sizeof line, "%s runn", n[0]); /* no newline */
    assert_int_equal(write(fd, line, (size_t)len), len);
    close(fd);
    set(n[1], "created");
    assert_string_equal(get(n[1]), "created");
    assert_string_equal(get(n[0]), "runn");
}

static void test_a_planted_link_is_refused_and_followed_nowhere(void **state)
{
    (void)state;
    char victim[128], path[256];
    snprintf(victim, sizeof victim, "%s/victim", dir);
    snprintf(path, sizeof path, "%s/dry-run/storage/%02x", dir,
             (unsigned)(name_hash("mindroom-link-data") % RECORD_BUCKETS));
    assert_int_equal(symlink(victim, path), 0);
    assert_int_equal(prov_state_record(&c, "dry-run/storage", "mindroom-link-data", "created",
                                       NULL, 0), -1);
    assert_int_equal(prov_state_record(&c, "dry-run/storage", "mindroom-link-data", NULL, NULL,
                                       0), -1);
    assert_int_equal(access(victim, F_OK), -1);
    unlink(path);
}

static void test_names_and_values_that_would_break_a_line_are_refused(void **state)
{
    (void)state;
    assert_int_equal(prov_state_record(&c, "apps", "a b", "x", NULL, 0), -1);
    assert_int_equal(prov_state_record(&c, "apps", "a\nb", "x", NULL, 0), -1);
    assert_int_equal(prov_state_record(&c, "apps", "ab", "x y", NULL, 0), -1);
    assert_int_equal(prov_state_record(&c, "apps", "", "x", NULL, 0), -1);
}

static void test_one_request_an_instance_at_a_time(void **state)
{
    (void)state;
    char err[256];
    int a = -1, b = -1, other = -1;
    assert_int_equal(prov_lock(&c, "mindroom-lock1", &a, err, sizeof err), MR_OK);
    /* Another open file description (another worker) waits, then gives up. */
    assert_int_equal(prov_lock(&c, "mindroom-lock1", &b, err, sizeof err), MR_ETRANSIENT);
    assert_int_equal(b, -1);
    assert_non_null(strstr(err, "another request"));
    /* Another instance is not held up by it. */
    assert_int_equal(prov_lock(&c, "mindroom-lock2", &other, err, sizeof err), MR_OK);
    prov_unlock(a);
    assert_int_equal(prov_lock(&c, "mindroom-lock1", &b, err, sizeof err), MR_OK);
    prov_unlock(b);
    prov_unlock(other);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_records_in_one_file_keep_their_own_values),
        cmocka_unit_test(test_a_fingerprint_round_trips_and_is_private),
        cmocka_unit_test(test_a_line_cut_short_is_not_joined_to_the_next),
        cmocka_unit_test(test_a_planted_link_is_refused_and_followed_nowhere),
        cmocka_unit_test(test_names_and_values_that_would_break_a_line_are_refused),
        cmocka_unit_test(test_one_request_an_instance_at_a_time),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
