/* mr-secrets: an operator's hands on instance_secrets, through the same keyring
 * (MINDROOM_SECRETS_KEY, _PREVIOUS) and the same contexts as the lifecycle
 * worker. PostgreSQL only ever receives ciphertext and keyed digests.
 *
 *   mr-secrets set INSTANCE NAME     the value on stdin (one trailing newline,
 *                                    or CR LF, dropped); an update is owed only
 *                                    when the value changed (compared by keyed
 *                                    digest)
 *   mr-secrets unset INSTANCE NAME   removes it (an update is owed)
 *                                    (set and unset refuse an instance destroyed
 *                                    or being destroyed: nothing would deploy it)
 *   mr-secrets list INSTANCE         names, kinds, key ids: never a value
 *   mr-secrets reseal [--batch N]    re-seals every secret not sealed under the
 *                                    current key, and re-tags stale digests; owes
 *                                    nothing, redeploys nothing; safe while
 *                                    workers run (a row changed meanwhile is
 *                                    left to the next run)
 *
 * DATABASE_URL names the database (as a role that may act as service_role).
 * Used by mindroomctl (env set/unset/list, rotate-secrets-key). The value never
 * appears on a command line: it comes on stdin. set and reseal refuse a keyring
 * none of whose keys sealed any of the secrets stored (a value sealed with it would
 * be one the lifecycle worker cannot open); the first secret ever stored is taken
 * under any key. set takes a NAME an operator may set (mr_appenv_operator_key) and a
 * value of UTF-8 text without a NUL byte (the app's environment reaches Dokku as
 * JSON; its line end dropped) that keeps the instance's variables within
 * MR_APPENV_OPERATOR_MAX_VARS and MR_APPENV_OPERATOR_MAX_BYTES (24 KiB as they are
 * deployed: what a create or update can always carry), counted with the instance's
 * row locked. Exit 0 done, 1 failed (the database, no such instance or
 * one destroyed, stdin unreadable, or a stored value that cannot be opened), 2 bad
 * usage or configuration (arguments; a NAME or a value set does not take;
 * DATABASE_URL missing; MINDROOM_SECRETS_KEY or _PREVIOUS missing, malformed, or
 * holding none of the stored secrets' keys). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "mindroom.h"
#include "mr_appenv.h"
#include "mr_secrets.h"
#include "mr_version.h"

/* A value alone may be as large as an instance's variables may be in all. */
#define MAX_VALUE MR_APPENV_OPERATOR_MAX_BYTES
/* What set reads of stdin at most: MAX_VALUE, its line end (CR LF) and one byte
 * more, so that a value over MAX_VALUE is known as such without reading the rest
 * (the line end is dropped before the value is counted). */
#define MAX_READ (MAX_VALUE + 3)

static const mr_db_stmt delete_stmt = {
    "mr_sc_delete", "SELECT public.instance_secret_delete($1::uuid, $2, $3)::text", 3};
static const mr_db_stmt list_stmt = {
    "mr_sc_list",
    "SELECT coalesce(jsonb_agg(jsonb_build_object('kind', kind, 'name', name, 'key_id',"
    "       split_part(ciphertext, ':', 2), 'updated_at', updated_at) ORDER BY kind, name),"
    "       '[]')::text FROM public.instance_secrets WHERE instance_id = $1::uuid",
    1};
static const mr_db_stmt page_stmt = {
    "mr_sc_page",
    "SELECT coalesce(jsonb_agg(jsonb_build_object('i', instance_id, 'k', kind, 'n', name,"
    "       'c', ciphertext, 'd', digest) ORDER BY instance_id, kind, name), '[]')::text"
    "  FROM (SELECT * FROM public.instance_secrets"
    "         WHERE (instance_id, kind, name) > ($1::uuid, $2, $3)"
    "         ORDER BY instance_id, kind, name LIMIT $4::int) x",
    4};
/* Compare-and-swap: a value set meanwhile (another ciphertext) is not overwritten. */
static const mr_db_stmt swap_stmt = {
    "mr_sc_swap",
    "WITH u AS (UPDATE public.instance_secrets SET ciphertext = $5, digest = $6"
    "            WHERE instance_id = $1::uuid AND kind = $2 AND name = $3 AND ciphertext = $4"
    "            RETURNING 1) SELECT count(*)::text FROM u",
    6};
/* The key ids the stored secrets are sealed under (ciphertext "mrs1:<kid>:..."),
 * comma-separated; "" when none is stored. */
static const mr_db_stmt kids_stmt = {
    "mr_sc_kids",
    "SELECT coalesce(string_agg(kid, ',' ORDER BY kid), '') FROM (SELECT DISTINCT"
    "       split_part(ciphertext, ':', 2) AS kid FROM public.instance_secrets) x",
    0};
/* "live", or for an instance destroyed or being destroyed "gone:" and the id of its
 * subscription's live instance, if there is one; no row: no such instance. */
static const mr_db_stmt state_stmt = {
    "mr_sc_state",
    "SELECT CASE WHEN i.status <> 'deprovisioned' AND i.desired_status <> 'deprovisioned'"
    "            THEN 'live' ELSE 'gone:' || coalesce((SELECT l.id::text FROM public.instances l"
    "              WHERE l.subscription_id = i.subscription_id AND l.status <> 'deprovisioned'"
    "                AND l.id <> i.id ORDER BY l.created_at DESC LIMIT 1), '') END"
    "  FROM public.instances i WHERE i.id = $1::uuid",
    1};

static int usage(void)
{
    fprintf(stderr, "usage: mr-secrets set INSTANCE NAME   (value on stdin)\n"
                    "       mr-secrets unset INSTANCE NAME\n"
                    "       mr-secrets list INSTANCE\n"
                    "       mr-secrets reseal [--batch N]\n");
    return 2;
}

static int fail(const char *what, const char *err)
{
    fprintf(stderr, "mr-secrets: %s: %s\n", what, err);
    return 1;
}

/* Configuration missing or malformed: exit 2, as mindroomctl's own checks. */
static int bad_config(const char *what, const char *err)
{
    fail(what, err);
    return 2;
}

static void wipe_free(char *s, size_t n)
{
    if (s) {
        OPENSSL_cleanse(s, n);
        free(s);
    }
}

/* NAME's value from stdin, its line end dropped (one trailing newline, or CR LF; a
 * lone trailing CR too), into *out (wiped and freed by the caller). 0: read. 2: a
 * value set does not take, said on stderr, nothing stored: over MAX_VALUE bytes
 * (counted without the line end), a NUL byte, or not UTF-8 text (the app's
 * environment reaches Dokku as JSON); the operator's input, refused as a NAME an
 * operator may not set is. 1: stdin could not be read (or no memory). */
static int read_value(const char *name, char **out, size_t *len)
{
    char *buf = malloc(MAX_READ + 1);
    size_t n = 0;
    const char *bad = NULL;
    if (!buf)
        return fail("value", "out of memory");
    while (n < MAX_READ) {
        size_t r = fread(buf + n, 1, MAX_READ - n, stdin);
        if (r == 0)
            break;
        n += r;
    }
    if (ferror(stdin)) {
        wipe_free(buf, MAX_READ + 1);
        fprintf(stderr, "mr-secrets: cannot read the value of %s on stdin: nothing stored\n", name);
        return 1;
    }
    if (n > 0 && buf[n - 1] == '\n')
        n--;
    if (n > 0 && buf[n - 1] == '\r')
        n--;
    char over[48];
    if (n > MAX_VALUE) {
        snprintf(over, sizeof over, "is over %d bytes", MAX_VALUE);
        bad = over;
    } else {
        buf[n] = '\0';
        if (memchr(buf, '\0', n))
            bad = "holds a NUL byte";
        else if (!mr_appenv_valid_value(buf))
            bad = "is not UTF-8 text (the app's environment reaches Dokku as JSON)";
    }
    if (bad) {
        wipe_free(buf, MAX_READ + 1);
        fprintf(stderr, "mr-secrets: the value of %s %s: nothing stored\n", name, bad);
        return 2;
    }
    *out = buf;
    *len = n;
    return 0;
}

/* 1 when the instance exists (and, with live, is neither destroyed nor being
 * destroyed), else 0 (said on stderr) or -1 (database error). A destroyed
 * instance's environment is never deployed again, and the instance a later
 * provision creates is another row: a value set on the old one would reach nothing. */
static int instance_check(mr_db *db, const char *iid, int live)
{
    const char *p[] = {iid};
    char *out = NULL, err[256] = "";
    if (mr_db_call(db, &mr_service_identity, &state_stmt, p, NULL, &out, err, sizeof err) != MR_OK) {
        fail("database", err);
        return -1;
    }
    int ok = out && (!live || strcmp(out, "live") == 0);
    if (!out)
        fprintf(stderr, "mr-secrets: no instance %s\n", iid);
    else if (!ok && out[5])
        fprintf(stderr, "mr-secrets: instance %s is destroyed (or being destroyed): nothing "
                        "would deploy its environment; its subscription's live instance is %s\n",
                iid, out + 5);
    else if (!ok)
        fprintf(stderr, "mr-secrets: instance %s is destroyed (or being destroyed): nothing "
                        "would deploy its environment; its subscription has no live instance "
                        "(set the value on the one `mindroomctl provision` creates)\n", iid);
    free(out);
    return ok;
}

/* 1 when the keyring holds a key that sealed secrets already stored, or when none is
 * stored yet; 0 (said on stderr, one line) when every stored secret is sealed under
 * keys it does not hold: what it sealed, the lifecycle workers (which open what is
 * stored) could not open. -1: database error. A rotation in progress passes: its
 * new key is current and the old one, which sealed what is stored, is previous. */
static int keyring_check(mr_db *db, const mr_secrets *k, const char *nothing)
{
    char *out = NULL, err[256] = "";
    if (mr_db_call(db, &mr_service_identity, &kids_stmt, NULL, NULL, &out, err, sizeof err) != MR_OK) {
        fail("database", err);
        return -1;
    }
    int ok = !out || !*out;
    for (const char *p = out; !ok && p && *p;) {
        size_t n = strcspn(p, ",");
        char kid[MR_SECRETS_KID_HEX + 1] = "";
        if (n == MR_SECRETS_KID_HEX) {
            memcpy(kid, p, n);
            ok = mr_secrets_has_kid(k, kid);
        }
        p += n + (p[n] == ',');
    }
    if (!ok)
        fprintf(stderr, "mr-secrets: MINDROOM_SECRETS_KEY (key id %s) is not the key the stored "
                        "secrets are sealed with (key ids %.80s), nor is any key of "
                        "MINDROOM_SECRETS_KEY_PREVIOUS: the lifecycle workers could not open what "
                        "it would seal (give the workers' key): %s\n", mr_secrets_kid(k), out, nothing);
    free(out);
    return ok;
}

/* One set, in one transaction: the instance's row locked (two sets on one instance
 * run one after the other, so that together they cannot pass the limits either),
 * its other variables opened to count them, then the value stored. */
typedef struct {
    const mr_secrets *k;
    const char *iid, *name, *value;
    size_t len;
    int same;              /* out: the value unchanged */
    int unopened;          /* out: another of its variables cannot be opened */
    char over[160];        /* out: which of the instance's limits it would pass, or "" */
    char version[32];      /* the instance's config_version after */
} set_tx;

static mr_err set_fn(mr_db *db, void *arg, char *err, size_t errlen)
{
    set_tx *s = arg;
    const char *pi[] = {s->iid};
    PGresult *res = NULL;
    char ctx[MR_SECRETS_CONTEXT_MAX], digest[MR_SECRETS_DIGEST_LEN + 1];
    char *ct = NULL;
    s->same = s->unopened = 0;
    s->version[0] = s->over[0] = '\0';
    mr_err e = mr_db_exec(db, "SELECT 1 FROM public.instances WHERE id = $1::uuid FOR UPDATE",
                          1, pi, &res, NULL, err, errlen);
    PQclear(res);
    res = NULL;
    if (e != MR_OK ||
        (e = mr_db_exec(db, "SELECT name, ciphertext, digest FROM public.instance_secrets"
                            " WHERE instance_id = $1::uuid AND kind = 'env'",
                        1, pi, &res, NULL, err, errlen)) != MR_OK)
        goto out;
    size_t bytes = mr_appenv_json_size(s->name, s->value), vars = 1;
    const char *stored = NULL;
    int stale = 0;
    for (int i = 0; i < PQntuples(res); i++) {
        const char *n = PQgetvalue(res, i, 0), *c = PQgetvalue(res, i, 1);
        if (!strcmp(n, s->name)) {
            stored = PQgetvalue(res, i, 2);
            continue;
        }
        unsigned char *pt = NULL;
        size_t len = 0;
        mr_secrets_instance_context(ctx, sizeof ctx, s->iid, "env", n);
        if (mr_secrets_open(s->k, ctx, c, strlen(c), &pt, &len, err, errlen) != MR_OK) {
            s->unopened = 1;
            e = mr_seterr(err, errlen, MR_EINTERNAL, "the instance's %s cannot be opened with "
                          "MINDROOM_SECRETS_KEY or MINDROOM_SECRETS_KEY_PREVIOUS", n);
            goto out;
        }
        bytes += mr_appenv_json_size(n, (const char *)pt);
        vars++;
        OPENSSL_cleanse(pt, len);
        free(pt);
    }
    mr_secrets_instance_context(ctx, sizeof ctx, s->iid, "env", s->name);
    s->same = stored && mr_secrets_digest_matches(s->k, ctx, s->value, s->len, stored, &stale);
    if (s->same && !stale)
        goto out; /* unchanged: nothing to store, nothing owed */
    if (!s->same && vars > MR_APPENV_OPERATOR_MAX_VARS)
        snprintf(s->over, sizeof s->over, "would make the instance's %zu variables, over %d",
                 vars, MR_APPENV_OPERATOR_MAX_VARS);
    else if (!s->same && bytes > MR_APPENV_OPERATOR_MAX_BYTES)
        snprintf(s->over, sizeof s->over, "would make the instance's variables %zu bytes as "
                 "they are deployed (JSON), over %d", bytes, MR_APPENV_OPERATOR_MAX_BYTES);
    if (s->over[0]) {
        e = MR_EINVAL;
        goto out;
    }
    if (mr_secrets_seal(s->k, ctx, s->value, s->len, &ct, err, errlen) != MR_OK ||
        mr_secrets_digest(s->k, ctx, s->value, s->len, digest) != MR_OK) {
        e = mr_seterr(err, errlen, MR_EINTERNAL, "cannot seal the value");
        goto out;
    }
    const char *pp[] = {s->iid, "env", s->name, ct, digest, s->same ? "false" : "true"};
    PQclear(res);
    res = NULL;
    if ((e = mr_db_exec(db, "SELECT public.instance_secret_put($1::uuid, $2, $3, $4, $5,"
                            " $6::boolean)::text", 6, pp, &res, NULL, err, errlen)) == MR_OK &&
        PQntuples(res) == 1)
        snprintf(s->version, sizeof s->version, "%s", PQgetvalue(res, 0, 0));
out:
    PQclear(res);
    free(ct);
    return e;
}

static int cmd_set(mr_db *db, const mr_secrets *k, const char *iid, const char *name)
{
    if (!mr_appenv_operator_key(name)) {
        fprintf(stderr, "mr-secrets: %s is not a name an operator may set on an instance "
                        "(^[A-Z_][A-Z0-9_]*$; not DOKKU_*, LD_*, PATH, HOME..., nor one the "
                        "control plane or the provisioner sets): nothing stored\n", name);
        return 2;
    }
    if (instance_check(db, iid, 1) != 1)
        return 1;
    int kc = keyring_check(db, k, "nothing stored");
    if (kc != 1)
        return kc == 0 ? 2 : 1;
    size_t len = 0;
    char *value = NULL;
    int vr = read_value(name, &value, &len);
    if (vr != 0)
        return vr;
    char err[256] = "";
    set_tx s = {.k = k, .iid = iid, .name = name, .value = value, .len = len};
    mr_err e = mr_db_tx(db, &mr_service_identity, set_fn, &s, err, sizeof err);
    wipe_free(value, len);
    if (s.over[0]) {
        fprintf(stderr, "mr-secrets: the value of %s %s (mindroomctl env unset makes room): "
                        "nothing stored\n", name, s.over);
        return 2;
    }
    if (e != MR_OK)
        return fail(s.unopened ? "secret" : "database", err);
    if (s.same && !s.version[0])
        printf("%s: unchanged\n", name);
    else if (s.same)
        printf("%s: unchanged (re-sealed under key %s)\n", name, mr_secrets_kid(k));
    else
        printf("%s: set; the instance owes an update (config_version %s)\n", name,
               s.version[0] ? s.version : "?");
    return 0;
}

static int cmd_unset(mr_db *db, const char *iid, const char *name)
{
    if (instance_check(db, iid, 1) != 1)
        return 1;
    const char *p[] = {iid, "env", name};
    char *out = NULL, err[256] = "";
    if (mr_db_call(db, &mr_service_identity, &delete_stmt, p, NULL, &out, err, sizeof err) != MR_OK)
        return fail("database", err);
    int removed = out && !strcmp(out, "true");
    free(out);
    printf(removed ? "%s: removed; the instance owes an update\n" : "%s: was not set\n", name);
    return 0;
}

static int cmd_list(mr_db *db, const char *iid)
{
    if (instance_check(db, iid, 0) != 1)
        return 1;
    const char *p[] = {iid};
    char *out = NULL, err[256] = "";
    if (mr_db_call(db, &mr_service_identity, &list_stmt, p, NULL, &out, err, sizeof err) != MR_OK)
        return fail("database", err);
    cJSON *rows = out ? mr_json_parse(out, strlen(out)) : NULL;
    free(out);
    printf("%-10s  %-40s  %-8s  %s\n", "KIND", "NAME", "KEY", "UPDATED");
    for (const cJSON *r = rows ? rows->child : NULL; r; r = r->next) {
        const char *kind = "", *name = "", *kid = "", *at = "";
        mr_json_str(r, "kind", &kind);
        mr_json_str(r, "name", &name);
        mr_json_str(r, "key_id", &kid);
        mr_json_str(r, "updated_at", &at);
        printf("%-10s  %-40s  %-8s  %s\n", kind, name, kid, at);
    }
    cJSON_Delete(rows);
    return 0;
}

/* Whether a digest is tagged with the current key. */
static int digest_current(const mr_secrets *k, const char *d)
{
    const char *kid = mr_secrets_kid(k);
    return strncmp(d, "mrd1:", 5) == 0 && strncmp(d + 5, kid, strlen(kid)) == 0 &&
           d[5 + strlen(kid)] == ':';
}

static int cmd_reseal(mr_db *db, const mr_secrets *k, int batch)
{
    char last_i[40] = "00000000-0000-0000-0000-000000000000", last_k[16] = "", last_n[260] = "";
    char bs[16], err[256] = "";
    long seen = 0, resealed = 0, skipped = 0;
    int kc = keyring_check(db, k, "nothing re-sealed");
    if (kc != 1)
        return kc == 0 ? 2 : 1;
    snprintf(bs, sizeof bs, "%d", batch);
    for (;;) {
        const char *p[] = {last_i, last_k, last_n, bs};
        char *out = NULL;
        if (mr_db_call(db, &mr_service_identity, &page_stmt, p, NULL, &out, err, sizeof err) != MR_OK)
            return fail("database", err);
        cJSON *rows = out ? mr_json_parse(out, strlen(out)) : NULL;
        free(out);
        int n = cJSON_GetArraySize(rows);
        for (const cJSON *r = rows ? rows->child : NULL; r; r = r->next) {
            const char *iid = "", *kind = "", *name = "", *ct = "", *dg = "";
            mr_json_str(r, "i", &iid);
            mr_json_str(r, "k", &kind);
            mr_json_str(r, "n", &name);
            mr_json_str(r, "c", &ct);
            mr_json_str(r, "d", &dg);
            snprintf(last_i, sizeof last_i, "%s", iid);
            snprintf(last_k, sizeof last_k, "%s", kind);
            snprintf(last_n, sizeof last_n, "%s", name);
            seen++;
            if (mr_secrets_is_current(k, ct, strlen(ct)) && digest_current(k, dg))
                continue;
            char ctx[MR_SECRETS_CONTEXT_MAX], digest[MR_SECRETS_DIGEST_LEN + 1];
            unsigned char *pt = NULL;
            size_t len = 0;
            char *nct = NULL, *cnt = NULL;
            mr_secrets_instance_context(ctx, sizeof ctx, iid, kind, name);
            mr_err e = mr_secrets_open(k, ctx, ct, strlen(ct), &pt, &len, err, sizeof err);
            if (e == MR_OK && (e = mr_secrets_seal(k, ctx, pt, len, &nct, err, sizeof err)) == MR_OK &&
                mr_secrets_digest(k, ctx, pt, len, digest) != MR_OK)
                e = mr_seterr(err, sizeof err, MR_EINTERNAL, "cannot digest");
            if (pt) {
                OPENSSL_cleanse(pt, len);
                free(pt);
            }
            if (e != MR_OK) {
                /* Named before rows (which iid, kind and name point into) go. */
                fprintf(stderr, "mr-secrets: instance %s %s/%s cannot be opened with "
                        "MINDROOM_SECRETS_KEY or MINDROOM_SECRETS_KEY_PREVIOUS (%s): add the key "
                        "it was sealed with to MINDROOM_SECRETS_KEY_PREVIOUS\n", iid, kind, name, err);
                cJSON_Delete(rows);
                free(nct);
                return 1;
            }
            const char *ps[] = {iid, kind, name, ct, nct, digest};
            e = mr_db_call(db, &mr_service_identity, &swap_stmt, ps, NULL, &cnt, err, sizeof err);
            free(nct);
            if (e != MR_OK) {
                cJSON_Delete(rows);
                return fail("database", err);
            }
            if (cnt && !strcmp(cnt, "1"))
                resealed++;
            else
                skipped++; /* changed meanwhile: sealed by whoever changed it */
            free(cnt);
        }
        cJSON_Delete(rows);
        if (n < batch)
            break;
    }
    printf("%ld secrets, %ld re-sealed under key %s, %ld changed meanwhile (left as they are)\n",
           seen, resealed, mr_secrets_kid(k), skipped);
    return 0;
}

int main(int argc, char **argv)
{
    if (mr_version_arg("mr-secrets", argc, argv))
        return 0;
    mr_log_init_env("mr-secrets");
    if (argc < 2)
        return usage();
    const char *cmd = argv[1];
    int batch = 200;
    if (!strcmp(cmd, "reseal")) {
        if (argc == 4 && !strcmp(argv[2], "--batch"))
            batch = atoi(argv[3]);
        else if (argc != 2)
            return usage();
        if (batch < 1 || batch > 10000)
            return usage();
    } else if ((!strcmp(cmd, "set") || !strcmp(cmd, "unset")) ? argc != 4
               : !strcmp(cmd, "list") ? argc != 3 : 1) {
        return usage();
    }
    if (argc >= 3 && strcmp(cmd, "reseal") != 0 && !mr_is_uuid(argv[2])) {
        fprintf(stderr, "mr-secrets: INSTANCE must be an instance id (uuid)\n");
        return 2;
    }
    mr_secrets *k = NULL;
    char err[256];
    if (strcmp(cmd, "list") != 0 && strcmp(cmd, "unset") != 0 &&
        mr_secrets_load_env(&k, err, sizeof err) != MR_OK)
        return bad_config("keyring", err);
    const char *url = getenv("DATABASE_URL");
    if (!url || !*url) {
        mr_secrets_free(k);
        return bad_config("config", "DATABASE_URL is required");
    }
    mr_db *db = mr_db_open(url);
    int rc = !db ? fail("database", "out of memory")
             : !strcmp(cmd, "set")   ? cmd_set(db, k, argv[2], argv[3])
             : !strcmp(cmd, "unset") ? cmd_unset(db, argv[2], argv[3])
             : !strcmp(cmd, "list")  ? cmd_list(db, argv[2])
                                     : cmd_reseal(db, k, batch);
    mr_db_close(db);
    mr_secrets_free(k);
    return rc;
}
