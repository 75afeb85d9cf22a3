/* libFuzzer harness: the webhook's own event extraction, exactly as the handler
 * runs it: the body is signed (as Stripe would sign any bytes), the signature
 * verified over those raw bytes, then wh_event_parse (functions/handle-stripe-
 * webhook/event.c, compiled into this harness) checks the envelope.
 * Invariants beyond "no crash": an accepted event has 1..255-byte id and type,
 * created within range, an object data.object and livemode 0 or 1; a one-byte change to the body
 * never verifies with the original signature; a second event parsed while the
 * first is in hand is whole after the first is freed.
 * fuzz-targets: functions/handle-stripe-webhook/event.c lib/mr_json.c lib/mr_stripe.c */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mindroom.h"
#include "event.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const secrets[] = {"whsec_fuzz_webhook"};
    const long long t = 1700000000;
    char hex[65], header[96], err[200];
    const char *code = NULL;
    wh_event ev;

    mr_stripe_sign_hex(secrets[0], t, (const char *)data, size, hex);
    snprintf(header, sizeof header, "t=%lld,v1=%s", t, hex);
    if (mr_stripe_verify(header, (const char *)data, size, secrets, 1, t, 300, err, sizeof err) != MR_OK)
        abort();
    if (size > 0) {
        char *flipped = malloc(size);
        if (flipped == NULL)
            return 0;
        memcpy(flipped, data, size);
        flipped[size / 2] ^= 0x01;
        if (mr_stripe_verify(header, flipped, size, secrets, 1, t, 300, err, sizeof err) == MR_OK)
            abort();
        free(flipped);
    }

    if (wh_event_parse((const char *)data, size, &ev, &code, err, sizeof err) == MR_OK) {
        size_t il = strlen(ev.id), tl = strlen(ev.type);
        if (il == 0 || il > 255 || tl == 0 || tl > 255 || ev.created < 0
            || ev.created > 253402300799LL || !cJSON_IsObject(ev.object)
            || (ev.livemode != 0 && ev.livemode != 1))
            abort();
        /* Two events in hand at once, as in a batch: freeing the first leaves the
         * second whole (the trees share one pool: event.c). */
        wh_event ev2;
        const char *code2 = NULL;
        if (wh_event_parse((const char *)data, size, &ev2, &code2, err, sizeof err) != MR_OK)
            abort();
        wh_event_free(&ev);
        wh_event_free(&ev);  /* idempotent by contract */
        if (strlen(ev2.id) != il || strlen(ev2.type) != tl || !cJSON_IsObject(ev2.object))
            abort();
        wh_event_free(&ev2);
    } else if (code == NULL || ev.root != NULL
               || (strcmp(code, "malformed_json") != 0 && strcmp(code, "invalid_event") != 0)) {
        abort();
    }
    return 0;
}
