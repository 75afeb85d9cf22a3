/* test_jwks.c: JWKS documents, ES256/RS256 signatures with keys the test owns,
 * and the cache's fetch policy (times injected, no I/O). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "jwk_keys.h"
#include "mr_jwks.h"

static test_key ec1, ec2, rsa1;

static int setup(void **state)
{
    (void)state;
    tk_ec(&ec1, "ec-1");
    tk_ec(&ec2, "ec-2");
    tk_rsa(&rsa1, "rsa-1", 2048);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    EVP_PKEY_free(ec1.key);
    EVP_PKEY_free(ec2.key);
    EVP_PKEY_free(rsa1.key);
    return 0;
}

static mr_jwks *parse_ok(const char *doc)
{
    mr_jwks *set = NULL;
    char err[160] = "";
    assert_int_equal(mr_jwks_parse(doc, strlen(doc), &set, err, sizeof(err)), MR_OK);
    assert_non_null(set);
    return set;
}

static mr_err verify(const char *token, EVP_PKEY *key, char *why)
{
    mr_jwt_parts p;
    mr_err e = mr_jwt_split(token, &p, why, 160);
    return e != MR_OK ? e : mr_jwt_verify_pkey(&p, p.alg, key, why, 160);
}

static const char PAYLOAD[] = "{\"sub\":\"u\",\"role\":\"authenticated\",\"exp\":1700003600}";

static void test_es256_and_rs256_verify(void **state)
{
    (void)state;
    const test_key *keys[] = {&ec1, &rsa1};
    char *doc = tk_jwks(keys, 2);
    mr_jwks *set = parse_ok(doc);
    char why[160];
    assert_int_equal(mr_jwks_count(set), 2);
    EVP_PKEY *ek = mr_jwks_find(set, "ec-1"), *rk = mr_jwks_find(set, "rsa-1");
    assert_non_null(ek);
    assert_non_null(rk);
    assert_null(mr_jwks_find(set, "ec-2"));

    char *es = tk_sign(&ec1, "ES256", PAYLOAD), *rs = tk_sign(&rsa1, "RS256", PAYLOAD);
    assert_int_equal(verify(es, ek, why), MR_OK);
    assert_int_equal(verify(rs, rk, why), MR_OK);
    /* Signed by another key of the same type. */
    char *other = tk_sign(&ec2, "ES256", PAYLOAD);
    assert_int_equal(verify(other, ek, why), MR_EAUTH);
    assert_string_equal(why, "bad signature");
    /* The key decides the algorithm: an ES256 token against the RSA key (the
     * kid pointed there) and the other way round. */
    assert_int_equal(verify(es, rk, why), MR_EAUTH);
    assert_string_equal(why, "alg does not match the key");
    assert_int_equal(verify(rs, ek, why), MR_EAUTH);
    assert_string_equal(why, "alg does not match the key");
    /* A tampered payload under the original signature. */
    char *tampered = tk_sign(&ec1, "ES256", "{\"sub\":\"u\",\"role\":\"service_role\",\"exp\":1700003600}");
    char *sig = strrchr(es, '.');
    char *mix = malloc(strlen(tampered) + strlen(sig) + 1);
    strcpy(mix, tampered);
    strcpy(strrchr(mix, '.'), sig);
    assert_int_equal(verify(mix, ek, why), MR_EAUTH);
    free(mix);
    free(tampered);
    free(other);
    free(es);
    free(rs);
    mr_jwks_free(set);
    free(doc);
}

static void test_es256_signature_is_raw_r_s(void **state)
{
    (void)state;
    const test_key *keys[] = {&ec1};
    char *doc = tk_jwks(keys, 1);
    mr_jwks *set = parse_ok(doc);
    EVP_PKEY *ek = mr_jwks_find(set, "ec-1");
    char why[160];
    /* The DER form OpenSSL produces is not a JWS signature. */
    char *der = tk_sign_as(&ec1, "{\"alg\":\"ES256\",\"kid\":\"ec-1\"}", PAYLOAD, 1);
    assert_int_equal(verify(der, ek, why), MR_EAUTH);
    assert_string_equal(why, "bad signature");
    free(der);
    /* r = 0 or s = 0 (64 zero bytes), and 63 or 65 bytes. */
    char *t = tk_sign(&ec1, "ES256", PAYLOAD);
    char *sig = strrchr(t, '.') + 1;
    unsigned char zeros[65] = {0};
    char enc[100];
    for (size_t len = 63; len <= 65; len++) {
        mr_b64url_encode(zeros, len, enc, sizeof(enc));
        char *forged = malloc(strlen(t) + 100);
        snprintf(forged, strlen(t) + 100, "%.*s%s", (int)(sig - t), t, enc);
        assert_int_equal(verify(forged, ek, why), MR_EAUTH);
        free(forged);
    }
    /* Every bit of the signature matters. */
    for (char *p = sig; *p; p++) {
        char orig = *p;
        *p = orig == 'A' ? 'B' : 'A';
        assert_int_equal(verify(t, ek, why), MR_EAUTH);
        *p = orig;
    }
    assert_int_equal(verify(t, ek, why), MR_OK);
    free(t);
    mr_jwks_free(set);
    free(doc);
}

static void test_algs_other_than_es256_rs256_refused(void **state)
{
    (void)state;
    char why[160];
    const char *algs[] = {"none", "HS256", "ES384", "PS256", "RS512", "es256"};
    char *t = tk_sign(&ec1, "ES256", PAYLOAD);
    mr_jwt_parts p;
    assert_int_equal(mr_jwt_split(t, &p, why, sizeof(why)), MR_OK);
    for (size_t i = 0; i < MR_ARRAY_LEN(algs); i++) {
        assert_int_equal(mr_jwt_verify_pkey(&p, algs[i], ec1.key, why, sizeof(why)), MR_EAUTH);
        assert_string_equal(why, "alg not allowed");
    }
    assert_int_equal(mr_jwt_verify_pkey(&p, "ES256", NULL, why, sizeof(why)), MR_EAUTH);
    free(t);
    /* A P-384 key is not an ES256 key, whatever the header says. */
    EVP_PKEY *p384 = EVP_EC_gen("P-384");
    t = tk_sign_as(&(test_key){.key = p384}, "{\"alg\":\"ES256\",\"kid\":\"x\"}", PAYLOAD, 1);
    assert_int_equal(verify(t, p384, why), MR_EAUTH);
    assert_string_equal(why, "alg does not match the key");
    free(t);
    EVP_PKEY_free(p384);
}

static void test_split_reads_header(void **state)
{
    (void)state;
    mr_jwt_parts p;
    char why[160];
    char *t = tk_sign(&ec1, "ES256", PAYLOAD);
    assert_int_equal(mr_jwt_split(t, &p, why, sizeof(why)), MR_OK);
    assert_string_equal(p.alg, "ES256");
    assert_string_equal(p.kid, "ec-1");
    free(t);
    /* Duplicate header members (two algs) are refused before any signature work. */
    t = tk_sign_as(&ec1, "{\"alg\":\"ES256\",\"alg\":\"none\",\"kid\":\"ec-1\"}", PAYLOAD, 0);
    assert_int_equal(mr_jwt_split(t, &p, why, sizeof(why)), MR_EAUTH);
    assert_string_equal(why, "malformed token header");
    free(t);
    t = tk_sign_as(&ec1, "{\"alg\":\"ES256\",\"kid\":7}", PAYLOAD, 0);
    assert_int_equal(mr_jwt_split(t, &p, why, sizeof(why)), MR_EAUTH);
    free(t);
    t = tk_sign_as(&ec1, "{\"alg\":\"ES256AAAAAAAAAAAAAAAAAAAAAA\"}", PAYLOAD, 0);
    assert_int_equal(mr_jwt_split(t, &p, why, sizeof(why)), MR_EAUTH);
    free(t);
}

/* Keys a JWKS may carry that must never be used. */
static void test_parse_skips_unusable_keys(void **state)
{
    (void)state;
    char doc[8192];
    /* ec1's JWK with its kid and alg/use/crv/kty replaced. */
    const char *x = strstr(ec1.jwk, "\"x\":");
    char xy[200];
    snprintf(xy, sizeof(xy), "%.*s", (int)(strstr(x, ",\"kid\"") - x), x);
    snprintf(doc, sizeof(doc),
             "{\"keys\":["
             "{\"kty\":\"oct\",\"k\":\"c2VjcmV0\",\"kid\":\"hmac\",\"alg\":\"HS256\"},"
             "{\"kty\":\"EC\",\"crv\":\"P-256\",%s,\"kid\":\"enc\",\"use\":\"enc\"},"
             "{\"kty\":\"EC\",\"crv\":\"P-256\",%s,\"kid\":\"wrong-alg\",\"alg\":\"RS256\"},"
             "{\"kty\":\"EC\",\"crv\":\"P-384\",%s,\"kid\":\"p384\"},"
             "{\"kty\":\"EC\",\"crv\":\"P-256\",%s},"
             "{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"AQ\",\"y\":\"AQ\",\"kid\":\"short\"},"
             "{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\","
             "\"y\":\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAE\",\"kid\":\"off-curve\"},"
             "\"not an object\","
             "{\"kty\":\"EC\",\"crv\":\"P-256\",%s,\"kid\":\"good\",\"use\":\"sig\"}"
             "]}", xy, xy, xy, xy, xy);
    mr_jwks *set = parse_ok(doc);
    assert_int_equal(mr_jwks_count(set), 1);
    assert_non_null(mr_jwks_find(set, "good"));
    const char *skipped[] = {"hmac", "enc", "wrong-alg", "p384", "short", "off-curve", ""};
    for (size_t i = 0; i < MR_ARRAY_LEN(skipped); i++)
        assert_null(mr_jwks_find(set, skipped[i]));
    mr_jwks_free(set);
    /* An RSA key under 2048 bits. */
    test_key small;
    tk_rsa(&small, "small", 1024);
    const test_key *keys[] = {&small};
    char *d = tk_jwks(keys, 1);
    set = parse_ok(d);
    assert_int_equal(mr_jwks_count(set), 0);
    mr_jwks_free(set);
    free(d);
    EVP_PKEY_free(small.key);
}

static void test_parse_refuses_bad_documents(void **state)
{
    (void)state;
    mr_jwks *set = (mr_jwks *)1;
    char err[160];
    const char *bad[] = {"", "[]", "{}", "{\"keys\":{}}", "{\"keys\":[]", "{\"keys\":[]} x",
                         "{\"keys\":[],\"keys\":[]}"};
    for (size_t i = 0; i < MR_ARRAY_LEN(bad); i++) {
        assert_int_equal(mr_jwks_parse(bad[i], strlen(bad[i]), &set, err, sizeof(err)), MR_EINVAL);
        assert_null(set);
    }
    /* The same kid twice: which key is meant would be a guess. */
    test_key again = ec2;
    snprintf(again.jwk, sizeof(again.jwk), "%s", ec2.jwk);
    char *p = strstr(again.jwk, "\"ec-2\"");
    memcpy(p, "\"ec-1\"", 6);
    const test_key *twice[] = {&ec1, &again};
    char *doc = tk_jwks(twice, 2);
    assert_int_equal(mr_jwks_parse(doc, strlen(doc), &set, err, sizeof(err)), MR_EINVAL);
    assert_non_null(strstr(err, "twice"));
    free(doc);
    /* A member given twice inside a key. */
    const char dup[] = "{\"keys\":[{\"kty\":\"EC\",\"kty\":\"RSA\",\"kid\":\"a\"}]}";
    assert_int_equal(mr_jwks_parse(dup, strlen(dup), &set, err, sizeof(err)), MR_EINVAL);
    /* More than MR_JWKS_MAX_KEYS usable keys. */
    test_key many[MR_JWKS_MAX_KEYS + 1];
    const test_key *mp[MR_JWKS_MAX_KEYS + 1];
    for (size_t i = 0; i <= MR_JWKS_MAX_KEYS; i++) {
        char kid[16];
        snprintf(kid, sizeof(kid), "k%zu", i);
        many[i] = ec1;
        snprintf(many[i].jwk, sizeof(many[i].jwk), "%s", ec1.jwk);
        char *k = strstr(many[i].jwk, "\"ec-1\"");
        snprintf(k, sizeof(many[i].jwk) - (size_t)(k - many[i].jwk), "\"%s\",\"alg\":\"ES256\"}", kid);
        mp[i] = &many[i];
    }
    doc = tk_jwks(mp, MR_JWKS_MAX_KEYS);
    set = parse_ok(doc);
    assert_int_equal(mr_jwks_count(set), MR_JWKS_MAX_KEYS);
    mr_jwks_free(set);
    free(doc);
    doc = tk_jwks(mp, MR_JWKS_MAX_KEYS + 1);
    assert_int_equal(mr_jwks_parse(doc, strlen(doc), &set, err, sizeof(err)), MR_EINVAL);
    free(doc);
    /* Larger than the cap. */
    char *big = malloc(MR_JWKS_MAX_DOC + 2);
    memset(big, ' ', MR_JWKS_MAX_DOC + 1);
    memcpy(big, "{\"keys\":[]}", 11);
    big[MR_JWKS_MAX_DOC + 1] = '\0';
    assert_int_equal(mr_jwks_parse(big, MR_JWKS_MAX_DOC + 1, &set, err, sizeof(err)), MR_EINVAL);
    free(big);
}

/* ---- the cache's policy ---- */

#define S 1000 /* ms */

static mr_jwks_cache *cache(void)
{
    mr_jwks_policy pol = {.ttl_ms = 600 * S, .refetch_ms = 30 * S, .stale_ms = 3600 * S};
    mr_jwks_cache *c = mr_jwks_cache_new(&pol);
    assert_non_null(c);
    return c;
}

static void store(mr_jwks_cache *c, const char *doc, int64_t t)
{
    char err[160];
    mr_jwks_cache_store(c, doc, doc ? strlen(doc) : 0, t, err, sizeof(err));
}

static mr_err key_at(mr_jwks_cache *c, const char *kid, int64_t t)
{
    EVP_PKEY *k;
    char err[160];
    return mr_jwks_cache_key(c, kid, t, &k, err, sizeof(err));
}

static void test_cache_fetches_first_then_on_ttl(void **state)
{
    (void)state;
    const test_key *one[] = {&ec1};
    char *doc = tk_jwks(one, 1);
    mr_jwks_cache *c = cache();
    /* Nothing yet: a fetch is due, and without one there is nothing to trust. */
    assert_true(mr_jwks_cache_should_fetch(c, "ec-1", 0));
    assert_int_equal(key_at(c, "ec-1", 0), MR_ETRANSIENT);
    store(c, doc, 0);
    assert_false(mr_jwks_cache_should_fetch(c, "ec-1", 1 * S));
    assert_int_equal(key_at(c, "ec-1", 1 * S), MR_OK);
    assert_false(mr_jwks_cache_should_fetch(c, "ec-1", 599 * S));
    assert_true(mr_jwks_cache_should_fetch(c, "ec-1", 600 * S));
    store(c, doc, 600 * S);
    assert_false(mr_jwks_cache_should_fetch(c, "ec-1", 601 * S));
    mr_jwks_cache_free(c);
    free(doc);
}

static void test_cache_unknown_kid_refetches_at_most_once_per_interval(void **state)
{
    (void)state;
    const test_key *one[] = {&ec1}, *two[] = {&ec1, &ec2};
    char *d1 = tk_jwks(one, 1), *d2 = tk_jwks(two, 2);
    mr_jwks_cache *c = cache();
    store(c, d1, 0);
    /* Within the refetch interval of the last fetch: no fetch, unknown kid. */
    assert_false(mr_jwks_cache_should_fetch(c, "new", 10 * S));
    assert_int_equal(key_at(c, "new", 10 * S), MR_EAUTH);
    /* After it: one fetch; the set did not have it: 401, and no fetch again
     * for another interval however many tokens name it. */
    assert_true(mr_jwks_cache_should_fetch(c, "new", 40 * S));
    store(c, d1, 40 * S);
    assert_int_equal(key_at(c, "new", 40 * S), MR_EAUTH);
    for (int64_t t = 41; t < 70; t++)
        assert_false(mr_jwks_cache_should_fetch(c, "other", t * S));
    /* Rotation: a kid that appeared is picked up by the next refetch. */
    assert_true(mr_jwks_cache_should_fetch(c, "ec-2", 70 * S));
    store(c, d2, 70 * S);
    assert_int_equal(key_at(c, "ec-2", 70 * S), MR_OK);
    assert_int_equal(key_at(c, "ec-1", 70 * S), MR_OK);
    /* A key removed from the set is gone with the next document. */
    assert_true(mr_jwks_cache_should_fetch(c, "x", 670 * S));
    const test_key *only2[] = {&ec2};
    char *d3 = tk_jwks(only2, 1);
    store(c, d3, 670 * S);
    assert_int_equal(key_at(c, "ec-1", 671 * S), MR_EAUTH);
    mr_jwks_cache_free(c);
    free(d1);
    free(d2);
    free(d3);
}

static void test_cache_serves_stale_keys_for_the_bound_then_503(void **state)
{
    (void)state;
    const test_key *one[] = {&ec1};
    char *doc = tk_jwks(one, 1);
    mr_jwks_cache *c = cache();
    store(c, doc, 0);
    /* Fresh until 600 s; the fetches after fail (endpoint down). */
    for (int64_t t = 600; t < 4200; t += 30) {
        if (mr_jwks_cache_should_fetch(c, "ec-1", t * S))
            store(c, NULL, t * S);
        assert_int_equal(key_at(c, "ec-1", t * S), MR_OK);
    }
    /* ttl + stale after the last good fetch: nothing is trusted any more. */
    assert_int_equal(key_at(c, "ec-1", 4200 * S), MR_ETRANSIENT);
    /* A document that does not parse is a failure too, and keeps nothing. */
    store(c, "{\"keys\":", 4230 * S);
    assert_int_equal(key_at(c, "ec-1", 4230 * S), MR_ETRANSIENT);
    /* The endpoint is back: keys are trusted again at once. */
    assert_true(mr_jwks_cache_should_fetch(c, "ec-1", 4260 * S));
    store(c, doc, 4260 * S);
    assert_int_equal(key_at(c, "ec-1", 4260 * S), MR_OK);
    /* While stale keys are served, a kid they lack cannot be judged: 503. */
    store(c, NULL, 4900 * S);
    assert_int_equal(key_at(c, "ec-2", 4900 * S), MR_ETRANSIENT);
    mr_jwks_cache_free(c);
    free(doc);
}

static void test_cache_stale_bound_counts_from_the_first_failure(void **state)
{
    (void)state;
    const test_key *one[] = {&ec1};
    char *doc = tk_jwks(one, 1);
    mr_jwks_cache *c = cache();
    store(c, doc, 0);
    /* Nobody asked for two hours: nothing failed, so the outage starts with the
     * first fetch that fails, and the keys serve for the bound from then. */
    assert_true(mr_jwks_cache_should_fetch(c, "ec-1", 7200 * S));
    store(c, NULL, 7200 * S);
    assert_int_equal(key_at(c, "ec-1", 7200 * S), MR_OK);
    assert_int_equal(key_at(c, "ec-1", 10799 * S), MR_OK);
    store(c, NULL, 10000 * S); /* later failures do not move the start */
    assert_int_equal(key_at(c, "ec-1", 10800 * S), MR_ETRANSIENT);
    /* A failure while the keys are fresh is no outage of stale keys. */
    store(c, doc, 20000 * S);
    store(c, NULL, 20100 * S);
    assert_true(mr_jwks_cache_should_fetch(c, "ec-1", 27000 * S));
    store(c, NULL, 27000 * S);
    assert_int_equal(key_at(c, "ec-1", 30599 * S), MR_OK);
    assert_int_equal(key_at(c, "ec-1", 30600 * S), MR_ETRANSIENT);
    mr_jwks_cache_free(c);
    free(doc);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_es256_and_rs256_verify),
        cmocka_unit_test(test_es256_signature_is_raw_r_s),
        cmocka_unit_test(test_algs_other_than_es256_rs256_refused),
        cmocka_unit_test(test_split_reads_header),
        cmocka_unit_test(test_parse_skips_unusable_keys),
        cmocka_unit_test(test_parse_refuses_bad_documents),
        cmocka_unit_test(test_cache_fetches_first_then_on_ttl),
        cmocka_unit_test(test_cache_unknown_kid_refetches_at_most_once_per_interval),
        cmocka_unit_test(test_cache_serves_stale_keys_for_the_bound_then_503),
        cmocka_unit_test(test_cache_stale_bound_counts_from_the_first_failure),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
