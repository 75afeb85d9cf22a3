/* files.c: what the provisioner feeds to a command's stdin.
 *
 * Two things reach Dokku as files rather than arguments, so that no secret
 * is ever on a command line (where `ps` and the host's logs would show it):
 *
 *   - the homeserver's configuration and secrets, extracted into its storage
 *     entry by `storage:exec <entry> -- tar -x -f - -C /data`;
 *   - the wildcard certificate and key, imported by `certs:add <app>`, which
 *     reads a tarball holding a .crt and a .key on stdin.
 *
 * Both are plain ustar archives built here in memory. */
#include <openssl/crypto.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mr_homeserver.h"
#include "prov.h"

/* ---- buffers and tar ---- */

static void put(prov_buf *b, const void *data, size_t len)
{
    if (b->failed) return;
    if (b->len + len > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + len) cap *= 2;
        unsigned char *d = malloc(cap);
        if (!d) {
            b->failed = 1;
            return;
        }
        /* Not realloc: the old block may hold secrets and is wiped first. */
        if (b->len) memcpy(d, b->data, b->len);
        if (b->data) OPENSSL_cleanse(b->data, b->cap);
        free(b->data);
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
}

void prov_buf_free(prov_buf *b)
{
    if (b->data) OPENSSL_cleanse(b->data, b->cap);
    free(b->data);
    memset(b, 0, sizeof *b);
}

static void tar_entry(prov_buf *b, const char *name, char type, unsigned mode, unsigned uid,
                      const void *data, size_t len)
{
    unsigned char h[512];
    memset(h, 0, sizeof h);
    size_t nl = strlen(name);
    if (nl > 99 || len > 077777777777ULL || uid > PROV_MAX_TAR_UID) {
        b->failed = 1;
        return;
    }
    memcpy(h, name, nl);
    snprintf((char *)h + 100, 8, "%07o", mode & 07777);
    snprintf((char *)h + 108, 8, "%07o", uid);
    snprintf((char *)h + 116, 8, "%07o", uid);
    snprintf((char *)h + 124, 12, "%011llo", (unsigned long long)len);
    snprintf((char *)h + 136, 12, "%011llo", (unsigned long long)time(NULL));
    h[156] = (unsigned char)type;
    memcpy(h + 257, "ustar", 6);   /* "ustar\0" then version "00" */
    memcpy(h + 263, "00", 2);
    /* The checksum is computed with its own field read as eight spaces. */
    memset(h + 148, ' ', 8);
    unsigned sum = 0;
    for (size_t i = 0; i < sizeof h; i++) sum += h[i];
    snprintf((char *)h + 148, 8, "%06o", sum);
    h[155] = ' ';
    put(b, h, sizeof h);
    put(b, data, len);
    static const unsigned char zeros[512];
    if (len % 512) put(b, zeros, 512 - len % 512);
}

void prov_tar_file(prov_buf *b, const char *name, unsigned mode, unsigned uid,
                   const void *data, size_t len)
{
    tar_entry(b, name, '0', mode, uid, data, len);
}

void prov_tar_dir(prov_buf *b, const char *name, unsigned mode, unsigned uid)
{
    tar_entry(b, name, '5', mode, uid, "", 0);
}

mr_err prov_root_files(unsigned uid, prov_buf *out)
{
    memset(out, 0, sizeof *out);
    prov_tar_dir(out, "./", 0700, uid);
    mr_err e = prov_tar_end(out);
    if (e != MR_OK) prov_buf_free(out);
    return e;
}

mr_err prov_tar_end(prov_buf *b)
{
    static const unsigned char zeros[1024];
    put(b, zeros, sizeof zeros);
    return b->failed ? MR_EINTERNAL : MR_OK;
}

/* ---- the homeserver's files ---- */

/* Secrets live in files of their own (mode 0600) named by *_path options, so
 * homeserver.yaml itself holds none and can be shown or diffed safely.
 * SQLite in the storage entry: see docs/provisioner.md for why. Synapse logs
 * to stderr without a log_config, which Dokku collects; no log file is kept. */
static const char hs_yaml[] =
    "# Written by the MindRoom dokku-provisioner before every deploy of this\n"
    "# homeserver; changes made here are overwritten. Secrets are in the files\n"
    "# named by the *_path options (mode 0600), not in this file.\n"
    "server_name: \"%s\"\n"
    "public_baseurl: \"%s/\"\n"
    "serve_server_wellknown: true\n"
    "pid_file: " PROV_HS_DATA_DIR "/homeserver.pid\n"
    "report_stats: false\n"
    "listeners:\n"
    "  - port: %d\n"
    "    type: http\n"
    "    tls: false\n"
    "    x_forwarded: true\n"
    "    resources:\n"
    "      - names: [client, federation]\n"
    "        compress: false\n"
    "database:\n"
    "  name: sqlite3\n"
    "  args:\n"
    "    database: " PROV_HS_DATA_DIR "/homeserver.db\n"
    "media_store_path: " PROV_HS_DATA_DIR "/media_store\n"
    "max_upload_size: " PROV_HS_MAX_UPLOAD "\n"
    "signing_key_path: " PROV_HS_DATA_DIR "/signing.key\n"
    "registration_shared_secret_path: " PROV_HS_DATA_DIR "/registration_shared_secret\n"
    "macaroon_secret_key_path: " PROV_HS_DATA_DIR "/macaroon_secret_key\n"
    "form_secret_path: " PROV_HS_DATA_DIR "/form_secret\n"
    "enable_registration: false\n"
    "trusted_key_servers:\n"
    "  - server_name: matrix.org\n"
    "suppress_key_server_warning: true\n";

mr_err prov_hs_files(const prov_hs_spec *hs, const char *public_url, int own_root,
                     prov_buf *out)
{
    memset(out, 0, sizeof *out);
    /* server_name and public_url are validated host names and a scheme: no
     * character that needs quoting in YAML reaches the file. */
    char yaml[sizeof hs_yaml + 2 * PROV_HOST_MAX + 64];
    int n = snprintf(yaml, sizeof yaml, hs_yaml, hs->server_name, public_url, PROV_HS_PORT);
    if (n < 0 || (size_t)n >= sizeof yaml) return MR_EINTERNAL;
    char key[MR_HS_SIGNING_KEY_MAX + 2];
    n = snprintf(key, sizeof key, "%s\n", hs->signing_key);
    if (n < 0 || (size_t)n >= sizeof key) return MR_EINTERNAL;
    if (own_root) prov_tar_dir(out, "./", 0700, PROV_HS_UID);
    prov_tar_file(out, "homeserver.yaml", 0644, PROV_HS_UID, yaml, strlen(yaml));
    prov_tar_file(out, "signing.key", 0600, PROV_HS_UID, key, strlen(key));
    /* Synapse reads these files whole: no trailing newline. */
    prov_tar_file(out, "registration_shared_secret", 0600, PROV_HS_UID,
                  hs->registration_shared_secret, strlen(hs->registration_shared_secret));
    prov_tar_file(out, "macaroon_secret_key", 0600, PROV_HS_UID, hs->macaroon_secret_key,
                  strlen(hs->macaroon_secret_key));
    prov_tar_file(out, "form_secret", 0600, PROV_HS_UID, hs->form_secret,
                  strlen(hs->form_secret));
    OPENSSL_cleanse(key, sizeof key);
    mr_err e = prov_tar_end(out);
    if (e != MR_OK) prov_buf_free(out);
    return e;
}

/* ---- the wildcard certificate ---- */

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 65536, n = 0;
    char *buf = malloc(cap + 1);
    if (buf) n = fread(buf, 1, cap, f);
    int more = buf && fgetc(f) != EOF;
    fclose(f);
    if (!buf || more || n == 0) {
        if (buf) OPENSSL_cleanse(buf, cap + 1);
        free(buf);
        return NULL;
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

mr_err prov_load_wildcard(const char *cert_path, const char *key_path, const char *base_domain,
                          prov_buf *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    size_t clen = 0, klen = 0;
    char *crt = slurp(cert_path, &clen), *key = crt ? slurp(key_path, &klen) : NULL;
    X509 *x = NULL;
    EVP_PKEY *pk = NULL;
    mr_err e = MR_EINVAL;
    if (!crt || !key) {
        mr_seterr(err, errlen, e, "cannot read %s (a PEM file of at most 64 KiB)",
                  crt ? "DOKKU_TLS_KEY" : "DOKKU_TLS_CERT");
        goto done;
    }
    BIO *bc = BIO_new_mem_buf(crt, (int)clen), *bk = BIO_new_mem_buf(key, (int)klen);
    if (bc) x = PEM_read_bio_X509(bc, NULL, NULL, NULL);
    if (bk) pk = PEM_read_bio_PrivateKey(bk, NULL, NULL, NULL);
    BIO_free(bc);
    BIO_free(bk);
    if (!x) {
        mr_seterr(err, errlen, e, "DOKKU_TLS_CERT holds no PEM certificate");
        goto done;
    }
    if (!pk) {
        mr_seterr(err, errlen, e, "DOKKU_TLS_KEY holds no PEM private key (or it is encrypted)");
        goto done;
    }
    if (X509_check_private_key(x, pk) != 1) {
        mr_seterr(err, errlen, e, "DOKKU_TLS_KEY does not belong to DOKKU_TLS_CERT");
        goto done;
    }
    if (X509_cmp_current_time(X509_get0_notAfter(x)) <= 0 ||
        X509_cmp_current_time(X509_get0_notBefore(x)) >= 0) {
        mr_seterr(err, errlen, e, "DOKKU_TLS_CERT is not valid now (expired or not yet valid)");
        goto done;
    }
    /* Any name one label under the base domain must match: that is what a
     * wildcard for *.<base domain> gives every app, the homeserver's included. */
    char probe[PROV_HOST_MAX + 16];
    snprintf(probe, sizeof probe, "mindroom-probe.%s", base_domain);
    if (X509_check_host(x, probe, 0, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS, NULL) != 1) {
        mr_seterr(err, errlen, e, "DOKKU_TLS_CERT does not cover *.%s", base_domain);
        goto done;
    }
    prov_tar_file(out, "server.crt", 0600, 0, crt, clen);
    prov_tar_file(out, "server.key", 0600, 0, key, klen);
    if (prov_tar_end(out) != MR_OK) {
        prov_buf_free(out);
        e = mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
        goto done;
    }
    e = MR_OK;
done:
    X509_free(x);
    EVP_PKEY_free(pk);
    if (key) OPENSSL_cleanse(key, klen);
    free(key);
    free(crt);
    return e;
}
