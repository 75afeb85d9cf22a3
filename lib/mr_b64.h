/* mr_b64.h: strict base64 (RFC 4648), both alphabets, with or without padding.
 *
 * Decoding is strict so that every byte string has exactly one accepted text:
 * no whitespace, no mixed alphabets, padding exactly as asked for, and no
 * stray bits in the last character. Secrets are parsed with it, so a key that
 * "almost" decodes is an error, never a different key. */
#ifndef MR_B64_H
#define MR_B64_H

#include <stddef.h>
#include "mr_common.h"

#define MR_B64_URL 1   /* '-' '_' instead of '+' '/' */
#define MR_B64_PAD 2   /* '=' padding to a multiple of 4 */

/* Characters (without the NUL) that encoding n bytes takes with flags. */
size_t mr_b64_encoded_len(size_t n, int flags);

/* Encodes len bytes into out (cap must hold mr_b64_encoded_len + 1, NUL
 * included). Returns MR_OK, or MR_EINVAL when out is too small. */
mr_err mr_b64_encode(const unsigned char *in, size_t len, int flags, char *out, size_t cap);

/* Decodes exactly len characters into out (cap bytes). Returns MR_OK with
 * *outlen set, or MR_EINVAL for anything but the one canonical encoding in
 * the alphabet and padding that flags name, or when out is too small. */
mr_err mr_b64_decode(const char *in, size_t len, int flags, unsigned char *out, size_t cap,
                     size_t *outlen);

#endif
