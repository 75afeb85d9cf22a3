/* libFuzzer harness: what track-usage reads from an instance before any database
 * work: the bearer token (mr_itoken_parse, mr_itoken_verify) and the report body
 * (tu_report_parse, functions/track-usage/report.c, compiled into this harness).
 * Invariants beyond "no crash": an accepted token is 64 bytes, its key id the 16
 * lowercase hex digits after "mri_", and it verifies against its own hash and not
 * against a hash of anything else; an accepted report's names are 0..64 characters
 * of the allowed set, and a refused one leaves both names empty.
 * fuzz-targets: lib/mr_itoken.c functions/track-usage/report.c lib/mr_json.c lib/mr_b64.c */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mindroom.h"
#include "mr_itoken.h"
#include "report.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_name(const char *s)
{
    size_t n = strlen(s);
    if (n > TU_NAME_MAX)
        abort();
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_' || c == '.' || c == ':' || c == '@'))
            abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s = (const char *)data;
    char kid[MR_ITOKEN_KEY_ID_LEN + 1], hash[MR_ITOKEN_HASH_HEX_LEN + 1], err[256];

    if (mr_itoken_parse(s, size, kid) == MR_OK) {
        if (size != MR_ITOKEN_LEN || memcmp(s, "mri_", 4) != 0 ||
            memcmp(s + 4, kid, MR_ITOKEN_KEY_ID_LEN) != 0 || strlen(kid) != MR_ITOKEN_KEY_ID_LEN)
            abort();
        mr_itoken_hash_hex(s, size, hash);
        if (!mr_itoken_verify(s, size, hash))
            abort();
        mr_itoken_hash_hex(s, size - 1, hash);
        if (mr_itoken_verify(s, size, hash))
            abort();
    } else if (kid[0] != '\0') {
        abort();
    }
    /* Any bytes as a stored hash: only its own SHA-256 matches. */
    char stored[MR_ITOKEN_HASH_HEX_LEN + 1];
    size_t n = size < MR_ITOKEN_HASH_HEX_LEN ? size : MR_ITOKEN_HASH_HEX_LEN;
    memcpy(stored, s, n);
    stored[n] = '\0';
    mr_itoken_hash_hex(s, size, hash);
    if (mr_itoken_verify(s, size, stored) && strcmp(stored, hash) != 0)
        abort();

    tu_report rep;
    if (tu_report_parse(s, size, &rep, err, sizeof err) == MR_OK) {
        check_name(rep.agent);
        check_name(rep.tool);
    } else if (rep.agent[0] || rep.tool[0] || !err[0]) {
        abort();
    }
    return 0;
}
