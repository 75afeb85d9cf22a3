/* test_secrets.c: sealed tenant secrets (mr_secrets), the homeserver's
 * secrets (mr_homeserver) and the strict base64 under both (mr_b64).
 * Known-answer vectors: AES-256-GCM (GCM specification test case 16, also
 * NIST SP 800-38D), HKDF-SHA256 (RFC 5869 case 1), Ed25519 (RFC 8032 test 1). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mr_b64.h"
#include "mr_homeserver.h"
#include "mr_secrets.h"

static size_t unhex(const char *h, unsigned char *out)
{
    size_t n = strlen(h) / 2;
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        sscanf(h + 2 * i, "%2x", &v);
        out[i] = (unsigned char)v;
    }
    return n;
}

/* Five keys, base64 of 32 bytes each (0x01.., 0x02.., ...). */
static char k1[64], k2[64], k3[64], k4[64], k5[64];

static int setup(void **state)
{
    (void)state;
    unsigned char b[32];
    memset(b, 1, 32);
    mr_b64_encode(b, 32, MR_B64_PAD, k1, sizeof k1);
    memset(b, 2, 32);
    mr_b64_encode(b, 32, MR_B64_PAD, k2, sizeof k2);
    memset(b, 3, 32);
    mr_b64_encode(b, 32, MR_B64_PAD, k3, sizeof k3);
    memset(b, 4, 32);
    mr_b64_encode(b, 32, MR_B64_PAD, k4, sizeof k4);
    memset(b, 5, 32);
    mr_b64_encode(b, 32, MR_B64_PAD, k5, sizeof k5);
    return 0;
}

static mr_secrets *ring(const char *cur, const char *prev)
{
    mr_secrets *k = NULL;
    char err[200];
    if (mr_secrets_new(cur, prev, &k, err, sizeof err) != MR_OK) fail_msg("keyring: %s", err);
    return k;
}

static void test_b64_strict(void **state)
{
    (void)state;
    unsigned char out[16];
    size_t n = 0;
    char enc[32];
    assert_int_equal(mr_b64_encode((const unsigned char *)"\xfb\xff", 2, MR_B64_PAD, enc,
                                   sizeof enc), MR_OK);
    assert_string_equal(enc, "+/8=");
    assert_int_equal(mr_b64_encode((const unsigned char *)"\xfb\xff", 2, MR_B64_URL, enc,
                                   sizeof enc), MR_OK);
    assert_string_equal(enc, "-_8");
    assert_int_equal(mr_b64_decode("+/8=", 4, MR_B64_PAD, out, sizeof out, &n), MR_OK);
    assert_int_equal(n, 2);
    assert_int_equal(mr_b64_decode("-_8", 3, MR_B64_URL, out, sizeof out, &n), MR_OK);
    const struct { const char *s; int flags; } bad[] = {
        {"+/8", MR_B64_PAD},        /* padding missing */
        {"+/8=", 0},                /* padding where none is allowed */
        {"-_8=", MR_B64_URL | MR_B64_PAD}, /* fine ... */
        {"+/9=", MR_B64_PAD},       /* stray bits in the last character */
        {"-_8", 0},                 /* url alphabet where standard is asked */
        {"+/8", MR_B64_URL},        /* and the other way round */
        {"QQ", MR_B64_PAD}, {"Q", 0}, {"QQ==QQ==", MR_B64_PAD}, {"QQ=A", MR_B64_PAD},
        {"QUJD\n", 0}, {" QUJD", 0}, {"====", MR_B64_PAD}, {"QQ===", MR_B64_PAD},
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(bad); i++) {
        mr_err e = mr_b64_decode(bad[i].s, strlen(bad[i].s), bad[i].flags, out, sizeof out, &n);
        if (i == 2) assert_int_equal(e, MR_OK);
        else if (e != MR_EINVAL) fail_msg("accepted %s", bad[i].s);
    }
    /* Too small an output buffer is refused, not truncated. */
    assert_int_equal(mr_b64_decode("QUJD", 4, 0, out, 2, &n), MR_EINVAL);
}

static void test_gcm_known_answer(void **state)
{
    (void)state;
    unsigned char key[32], nonce[12], aad[20], pt[60], want[60], ct[60], tag[16], back[60];
    unhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308", key);
    unhex("cafebabefacedbaddecaf888", nonce);
    unhex("feedfacedeadbeeffeedfacedeadbeefabaddad2", aad);
    unhex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
          "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39", pt);
    unhex("522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
          "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662", want);
    unsigned char want_tag[16];
    unhex("76fc6ece0f4e1768cddf8853bb2d551b", want_tag);
    assert_int_equal(mr_secrets_gcm_seal(key, nonce, aad, 20, pt, 60, ct, tag), MR_OK);
    assert_memory_equal(ct, want, 60);
    assert_memory_equal(tag, want_tag, 16);
    assert_int_equal(mr_secrets_gcm_open(key, nonce, aad, 20, ct, 60, tag, back), MR_OK);
    assert_memory_equal(back, pt, 60);
    /* One flipped bit anywhere: refused, and nothing of the plaintext is left behind. */
    tag[15] ^= 1;
    assert_int_equal(mr_secrets_gcm_open(key, nonce, aad, 20, ct, 60, tag, back), MR_EINVAL);
    for (size_t i = 0; i < 60; i++) assert_int_equal(back[i], 0);
    tag[15] ^= 1;
    aad[0] ^= 1;
    assert_int_equal(mr_secrets_gcm_open(key, nonce, aad, 20, ct, 60, tag, back), MR_EINVAL);
}

static void test_hkdf_known_answer(void **state)
{
    (void)state;
    unsigned char ikm[22], salt[13], info[10], okm[42], want[42];
    memset(ikm, 0x0b, sizeof ikm);
    for (int i = 0; i < 13; i++) salt[i] = (unsigned char)i;
    for (int i = 0; i < 10; i++) info[i] = (unsigned char)(0xf0 + i);
    unhex("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
          "34007208d5b887185865", want);
    assert_int_equal(mr_secrets_hkdf(ikm, 22, salt, 13, info, 10, okm, 42), MR_OK);
    assert_memory_equal(okm, want, 42);
}

static void test_seal_open_roundtrip(void **state)
{
    (void)state;
    mr_secrets *k = ring(k1, NULL);
    char *ct = NULL, err[200];
    const char secret[] = "sk-live-\0binary\nvalue";
    assert_int_equal(mr_secrets_seal(k, "instance/1/OPENAI_API_KEY", secret, sizeof secret, &ct,
                                     err, sizeof err), MR_OK);
    /* mrs1:<kid>:<base64url>, the kid of the current key, no plaintext in it. */
    assert_int_equal(strncmp(ct, "mrs1:", 5), 0);
    assert_int_equal(strncmp(ct + 5, mr_secrets_kid(k), 8), 0);
    assert_int_equal(ct[13], ':');
    assert_null(strstr(ct, "sk-live"));
    assert_true(mr_secrets_is_current(k, ct, strlen(ct)));

    unsigned char *pt = NULL;
    size_t n = 0;
    assert_int_equal(mr_secrets_open(k, "instance/1/OPENAI_API_KEY", ct, strlen(ct), &pt, &n,
                                     err, sizeof err), MR_OK);
    assert_int_equal(n, sizeof secret);
    assert_memory_equal(pt, secret, sizeof secret);
    assert_int_equal(pt[n], 0);
    free(pt);

    /* Two seals of one value differ (fresh nonce). */
    char *ct2 = NULL;
    assert_int_equal(mr_secrets_seal(k, "c", "", 0, &ct2, err, sizeof err), MR_OK);
    assert_int_equal(mr_secrets_open(k, "c", ct2, strlen(ct2), &pt, &n, err, sizeof err), MR_OK);
    assert_int_equal(n, 0);
    free(pt);
    char *ct3 = NULL;
    assert_int_equal(mr_secrets_seal(k, "c", "", 0, &ct3, err, sizeof err), MR_OK);
    assert_string_not_equal(ct2, ct3);
    free(ct2);
    free(ct3);
    free(ct);
    mr_secrets_free(k);
}

static void test_refusals(void **state)
{
    (void)state;
    mr_secrets *k = ring(k1, NULL), *other = ring(k2, NULL);
    char *ct = NULL, err[200];
    unsigned char *pt = NULL;
    size_t n = 0;
    assert_int_equal(mr_secrets_seal(k, "instance/1/KEY", "value-123", 9, &ct, err, sizeof err),
                     MR_OK);
    size_t len = strlen(ct);

    /* Wrong context: a ciphertext moved to another row or field. */
    assert_int_equal(mr_secrets_open(k, "instance/2/KEY", ct, len, &pt, &n, err, sizeof err),
                     MR_EINVAL);
    assert_null(pt);
    assert_string_equal(err, "cannot open");

    /* Wrong key: its kid is unknown to the other ring. */
    assert_int_equal(mr_secrets_open(other, "instance/1/KEY", ct, len, &pt, &n, err, sizeof err),
                     MR_EINVAL);
    assert_non_null(strstr(err, "unknown key"));

    /* Wrong kid: the right key's ciphertext relabelled with another loaded key's id. */
    mr_secrets *both = ring(k2, k1);
    char *relabel = strdup(ct);
    memcpy(relabel + 5, mr_secrets_kid(both), 8);
    assert_int_equal(mr_secrets_open(both, "instance/1/KEY", relabel, len, &pt, &n, err,
                                     sizeof err), MR_EINVAL);
    assert_string_equal(err, "cannot open");
    /* ... while the original opens with the ring holding its key as previous. */
    assert_int_equal(mr_secrets_open(both, "instance/1/KEY", ct, len, &pt, &n, err, sizeof err),
                     MR_OK);
    free(pt);
    pt = NULL;

    /* Every single-character change in the body is refused. */
    for (size_t i = 14; i < len; i++) {
        char *t = strdup(ct);
        t[i] = t[i] == 'A' ? 'B' : 'A';
        mr_err e = mr_secrets_open(k, "instance/1/KEY", t, len, &pt, &n, err, sizeof err);
        if (e == MR_OK) fail_msg("tampered byte %zu accepted", i);
        free(t);
    }
    /* Truncated, or only a header. */
    assert_int_equal(mr_secrets_open(k, "instance/1/KEY", ct, len - 1, &pt, &n, err, sizeof err),
                     MR_EINVAL);
    assert_int_equal(mr_secrets_open(k, "instance/1/KEY", ct, 14, &pt, &n, err, sizeof err),
                     MR_EINVAL);
    free(relabel);
    free(ct);
    mr_secrets_free(k);
    mr_secrets_free(other);
    mr_secrets_free(both);
}

static void test_rotation(void **state)
{
    (void)state;
    char *old = NULL, *new = NULL, err[200], dg[MR_SECRETS_DIGEST_LEN + 1];
    mr_secrets *before = ring(k1, NULL);
    assert_int_equal(mr_secrets_seal(before, "ctx", "v", 1, &old, err, sizeof err), MR_OK);
    assert_int_equal(mr_secrets_digest(before, "env", "A=1", 3, dg), MR_OK);

    /* During the rotation: k2 current, k1 previous. */
    mr_secrets *during = ring(k2, k1);
    /* Both keys' ids are known to it (the id an old ciphertext names among them). */
    char kid1[MR_SECRETS_KID_HEX + 1];
    snprintf(kid1, sizeof kid1, "%s", mr_secrets_kid(before));
    assert_true(mr_secrets_has_kid(during, kid1));
    assert_true(mr_secrets_has_kid(during, mr_secrets_kid(during)));
    assert_int_equal(strncmp(old + 5, kid1, MR_SECRETS_KID_HEX), 0);
    assert_false(mr_secrets_has_kid(before, mr_secrets_kid(during)));
    assert_false(mr_secrets_has_kid(during, "0000000"));
    assert_false(mr_secrets_has_kid(during, ""));
    assert_false(mr_secrets_has_kid(during, NULL));
    assert_false(mr_secrets_is_current(during, old, strlen(old)));
    assert_int_equal(mr_secrets_reseal(during, "ctx", old, strlen(old), &new, err, sizeof err),
                     MR_OK);
    assert_true(mr_secrets_is_current(during, new, strlen(new)));
    /* The old digest still says "unchanged" (no redeploy), and says it is stale. */
    int stale = 0;
    assert_true(mr_secrets_digest_matches(during, "env", "A=1", 3, dg, &stale));
    assert_int_equal(stale, 1);
    assert_false(mr_secrets_digest_matches(during, "env", "A=2", 3, dg, &stale));
    char fresh[MR_SECRETS_DIGEST_LEN + 1];
    assert_int_equal(mr_secrets_digest(during, "env", "A=1", 3, fresh), MR_OK);
    assert_true(mr_secrets_digest_matches(during, "env", "A=1", 3, fresh, &stale));
    assert_int_equal(stale, 0);

    /* After it: k1 gone. The re-sealed value opens, the old one no longer does. */
    mr_secrets *after = ring(k2, NULL);
    unsigned char *pt = NULL;
    size_t n = 0;
    assert_int_equal(mr_secrets_open(after, "ctx", new, strlen(new), &pt, &n, err, sizeof err),
                     MR_OK);
    assert_memory_equal(pt, "v", 1);
    free(pt);
    assert_int_equal(mr_secrets_open(after, "ctx", old, strlen(old), &pt, &n, err, sizeof err),
                     MR_EINVAL);
    assert_false(mr_secrets_digest_matches(after, "env", "A=1", 3, dg, NULL));
    assert_true(mr_secrets_digest_matches(after, "env", "A=1", 3, fresh, NULL));
    free(old);
    free(new);
    mr_secrets_free(before);
    mr_secrets_free(during);
    mr_secrets_free(after);
}

static void test_digest(void **state)
{
    (void)state;
    mr_secrets *k = ring(k1, NULL);
    char a[MR_SECRETS_DIGEST_LEN + 1], b[MR_SECRETS_DIGEST_LEN + 1];
    assert_int_equal(mr_secrets_digest(k, "ab", "c", 1, a), MR_OK);
    assert_int_equal(mr_secrets_digest(k, "a", "bc", 2, b), MR_OK);
    assert_string_not_equal(a, b);                /* context and value cannot slide */
    assert_int_equal(strlen(a), MR_SECRETS_DIGEST_LEN);
    assert_int_equal(strncmp(a, "mrd1:", 5), 0);
    assert_int_equal(mr_secrets_digest(k, "ab", "c", 1, b), MR_OK);
    assert_string_equal(a, b);                    /* deterministic */
    /* Not a plain hash: another key gives another digest of the same value. */
    mr_secrets *o = ring(k2, NULL);
    assert_int_equal(mr_secrets_digest(o, "ab", "c", 1, b), MR_OK);
    assert_memory_not_equal(a + 14, b + 14, 64);
    assert_false(mr_secrets_digest_matches(k, "ab", "c", 1, "mrd1:zz", NULL));
    assert_false(mr_secrets_digest_matches(k, "ab", "c", 1, NULL, NULL));
    a[20] = a[20] == '0' ? '1' : '0';
    assert_false(mr_secrets_digest_matches(k, "ab", "c", 1, a, NULL));
    mr_secrets_free(k);
    mr_secrets_free(o);
}

/* The context names the instance as PostgreSQL gives its id back (lower case),
 * however the id was typed; the kind and name are kept as they are. */
static void test_instance_context_case(void **state)
{
    (void)state;
    char a[MR_SECRETS_CONTEXT_MAX], b[MR_SECRETS_CONTEXT_MAX];
    assert_int_equal(mr_secrets_instance_context(a, sizeof a, "ABCDEF01-0000-4000-8000-0000000000AA",
                                                 "env", "OPENAI_API_KEY"), 0);
    assert_int_equal(mr_secrets_instance_context(b, sizeof b, "abcdef01-0000-4000-8000-0000000000aa",
                                                 "env", "OPENAI_API_KEY"), 0);
    assert_string_equal(a, "instance/abcdef01-0000-4000-8000-0000000000aa/env/OPENAI_API_KEY");
    assert_string_equal(a, b);
    assert_int_equal(mr_secrets_instance_context(a, 20, "abcdef01-0000-4000-8000-0000000000aa",
                                                 "env", "X"), -1);
}

static void test_loader_refuses_bad_keys(void **state)
{
    (void)state;
    mr_secrets *k = NULL;
    char err[200];
    unsigned char b[31];
    char short_key[64];
    memset(b, 7, sizeof b);
    mr_b64_encode(b, sizeof b, MR_B64_PAD, short_key, sizeof short_key);
    char spaced[80];
    snprintf(spaced, sizeof spaced, " %s", k1);
    char unpadded[64];
    snprintf(unpadded, sizeof unpadded, "%.43s", k1);
    char two_same[200];
    snprintf(two_same, sizeof two_same, "%s,%s", k2, k2);
    char four[300];
    snprintf(four, sizeof four, "%s,%s,%s,%s", k2, k3, k4, k5);
    const struct { const char *cur, *prev; const char *needle; } bad[] = {
        {NULL, NULL, "required"}, {"", NULL, "required"}, {short_key, NULL, "32 bytes"},
        {spaced, NULL, "32 bytes"}, {unpadded, NULL, "32 bytes"}, {"not base64!", NULL, "32 bytes"},
        {k1, short_key, "PREVIOUS"}, {k1, k1, "repeats"}, {k1, two_same, "repeats"},
        {k1, four, "more than"}, {k1, ",", "PREVIOUS"},
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(bad); i++) {
        err[0] = '\0';
        if (mr_secrets_new(bad[i].cur, bad[i].prev, &k, err, sizeof err) == MR_OK)
            fail_msg("accepted case %zu", i);
        assert_null(k);
        if (!strstr(err, bad[i].needle)) fail_msg("case %zu: %s", i, err);
        assert_null(strstr(err, k1));              /* never the key itself */
    }
    char three[300];
    snprintf(three, sizeof three, "%s,%s", k2, k3);
    assert_int_equal(mr_secrets_new(k1, three, &k, err, sizeof err), MR_OK);
    mr_secrets_free(k);
}

static void test_parse(void **state)
{
    (void)state;
    unsigned char raw[256];
    mr_secrets_parts p;
    const char *bad[] = {"", "mrs1:", "mrs1:0123abcd:", "mrs2:0123abcd:AAAA",
                         "mrs1:0123ABCD:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                         "mrs1:0123abc:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                         "mrs1:0123abcd;AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                         "mrs1:0123abcd:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", /* 27 bytes */
                         "mrs1:0123abcd:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                         NULL};
    for (size_t i = 0; bad[i]; i++)
        if (mr_secrets_parse(bad[i], strlen(bad[i]), raw, sizeof raw, &p) == MR_OK)
            fail_msg("parsed %s", bad[i]);
    /* 28 bytes: a nonce and a tag around an empty ciphertext. */
    const char *ok = "mrs1:0123abcd:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    assert_int_equal(mr_secrets_parse(ok, strlen(ok), raw, sizeof raw, &p), MR_OK);
    assert_string_equal(p.kid, "0123abcd");
    assert_int_equal(p.body_len, 16);
}

static void test_signing_key_known_answer(void **state)
{
    (void)state;
    unsigned char seed[32], back[32];
    unhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60", seed);
    char line[MR_HS_SIGNING_KEY_MAX], verify[48], id[40];
    assert_int_equal(mr_homeserver_signing_key(seed, "a_AbCd", line, sizeof line, verify,
                                               sizeof verify), MR_OK);
    assert_string_equal(line, "ed25519 a_AbCd nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A");
    /* RFC 8032's public key d75a9801...511a, base64 unpadded. */
    assert_string_equal(verify, "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo");
    assert_int_equal(mr_homeserver_parse_signing_key(line, strlen(line), back, id, sizeof id),
                     MR_OK);
    assert_memory_equal(back, seed, 32);
    assert_string_equal(id, "a_AbCd");
    char nl[120];
    snprintf(nl, sizeof nl, "%s\n", line);
    assert_int_equal(mr_homeserver_parse_signing_key(nl, strlen(nl), back, id, sizeof id), MR_OK);
    const char *bad[] = {
        "ed25519 a_AbCd nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=",   /* padded */
        "ed25519 a_AbCd nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2",    /* short */
        "ed25519 a_AbCd  nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A",  /* two spaces */
        "ed25519 a-AbCd nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A",   /* id alphabet */
        "ed448 a_AbCd nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A",
        "ed25519 nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A",
        "ed25519 a_AbCd nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A\n\n",
        "ed25519 a_AbCd nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A",   /* url alphabet */
        "", NULL};
    for (size_t i = 0; bad[i]; i++)
        if (mr_homeserver_parse_signing_key(bad[i], strlen(bad[i]), back, id, sizeof id) == MR_OK)
            fail_msg("parsed %s", bad[i]);
}

static void test_generate(void **state)
{
    (void)state;
    mr_homeserver_secrets a, b;
    char err[100];
    assert_int_equal(mr_homeserver_generate(&a, err, sizeof err), MR_OK);
    assert_int_equal(mr_homeserver_generate(&b, err, sizeof err), MR_OK);
    unsigned char seed[32];
    char id[40], line[MR_HS_SIGNING_KEY_MAX], verify[48];
    assert_int_equal(mr_homeserver_parse_signing_key(a.signing_key, strlen(a.signing_key), seed,
                                                     id, sizeof id), MR_OK);
    assert_string_equal(id, a.key_id);
    assert_int_equal(strlen(a.key_id), 6);
    assert_int_equal(strncmp(a.key_id, "a_", 2), 0);
    /* The verify key belongs to the seed in the line. */
    assert_int_equal(mr_homeserver_signing_key(seed, id, line, sizeof line, verify, sizeof verify),
                     MR_OK);
    assert_string_equal(verify, a.verify_key);
    const char *s[] = {a.registration_shared_secret, a.macaroon_secret_key, a.form_secret};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(strlen(s[i]), MR_HS_SECRET_LEN);
        assert_true(mr_homeserver_valid_secret(s[i]));
    }
    assert_string_not_equal(a.registration_shared_secret, a.macaroon_secret_key);
    assert_string_not_equal(a.signing_key, b.signing_key);
    assert_string_not_equal(a.form_secret, b.form_secret);
    mr_homeserver_wipe(&a);
    for (size_t i = 0; i < sizeof a; i++) assert_int_equal(((unsigned char *)&a)[i], 0);
    assert_false(mr_homeserver_valid_secret("short"));
    assert_false(mr_homeserver_valid_secret("0123456789abcdef0123456789abcdef with space"));
    assert_true(mr_homeserver_valid_secret("0123456789abcdef0123456789abcdef"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_b64_strict),
        cmocka_unit_test(test_gcm_known_answer),
        cmocka_unit_test(test_hkdf_known_answer),
        cmocka_unit_test(test_seal_open_roundtrip),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_rotation),
        cmocka_unit_test(test_digest),
        cmocka_unit_test(test_instance_context_case),
        cmocka_unit_test(test_loader_refuses_bad_keys),
        cmocka_unit_test(test_parse),
        cmocka_unit_test(test_signing_key_known_answer),
        cmocka_unit_test(test_generate),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
