/* mr_b64.c: strict base64, both alphabets (see mr_b64.h). */
#include "mr_b64.h"

#include <stdint.h>

static const char std_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static const char url_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

size_t mr_b64_encoded_len(size_t n, int flags)
{
    if (flags & MR_B64_PAD) return (n + 2) / 3 * 4;
    return n / 3 * 4 + (n % 3 ? n % 3 + 1 : 0);
}

mr_err mr_b64_encode(const unsigned char *in, size_t len, int flags, char *out, size_t cap)
{
    const char *a = (flags & MR_B64_URL) ? url_alphabet : std_alphabet;
    if (cap < mr_b64_encoded_len(len, flags) + 1) return MR_EINVAL;
    size_t o = 0, i = 0;
    for (; i + 2 < len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = a[(v >> 18) & 63];
        out[o++] = a[(v >> 12) & 63];
        out[o++] = a[(v >> 6) & 63];
        out[o++] = a[v & 63];
    }
    if (len - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        out[o++] = a[(v >> 18) & 63];
        out[o++] = a[(v >> 12) & 63];
        if (flags & MR_B64_PAD) {
            out[o++] = '=';
            out[o++] = '=';
        }
    } else if (len - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        out[o++] = a[(v >> 18) & 63];
        out[o++] = a[(v >> 12) & 63];
        out[o++] = a[(v >> 6) & 63];
        if (flags & MR_B64_PAD) out[o++] = '=';
    }
    out[o] = '\0';
    return MR_OK;
}

static int value(char c, int url)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == (url ? '-' : '+')) return 62;
    if (c == (url ? '_' : '/')) return 63;
    return -1;
}

mr_err mr_b64_decode(const char *in, size_t len, int flags, unsigned char *out, size_t cap,
                     size_t *outlen)
{
    int url = (flags & MR_B64_URL) != 0;
    size_t data = len;
    if (flags & MR_B64_PAD) {
        if (len % 4 != 0) return MR_EINVAL;
        while (data > 0 && len - data < 2 && in[data - 1] == '=') data--;
    }
    if (data % 4 == 1) return MR_EINVAL;
    /* Padding, when asked for, is exactly what the data length implies. */
    if ((flags & MR_B64_PAD) && mr_b64_encoded_len(data / 4 * 3 + (data % 4 ? data % 4 - 1 : 0),
                                                  flags) != len)
        return MR_EINVAL;
    size_t need = data / 4 * 3 + (data % 4 ? data % 4 - 1 : 0);
    if (need > cap) return MR_EINVAL;
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < data; i++) {
        int v = value(in[i], url);
        if (v < 0) return MR_EINVAL;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (unsigned char)(acc >> bits);
            acc &= (1u << bits) - 1;
        }
    }
    if (acc != 0) return MR_EINVAL;
    *outlen = o;
    return MR_OK;
}
