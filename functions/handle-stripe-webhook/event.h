/* event.h: the webhook's own extraction of a Stripe event's envelope, kept apart
 * from main.c so that the libFuzzer harness (tests/fuzz/fuzz_webhook_event.c) and
 * the handler run the same code. */
#ifndef WH_EVENT_H
#define WH_EVENT_H

#include <stddef.h>
#include <stdint.h>

#include "mindroom.h"

typedef struct {
    cJSON *root;          /* the parsed event; owned, freed by wh_event_free (event.c:
                           * read only: its nodes are not malloc's) */
    const char *id;       /* "evt_...": 1..255 bytes, points into root */
    const char *type;     /* 1..255 bytes, points into root */
    int64_t created;      /* Unix seconds, 0..253402300799 (year 9999) */
    const cJSON *object;  /* data.object, an object; points into root */
    int livemode;         /* the event's livemode: 1 true, 0 false or absent */
} wh_event;

/* Parses the raw (already signature-checked) body with its explicit length and
 * checks the envelope: a JSON object with a string id and type, an integer
 * created, an object data.object and, when present, a boolean livemode.
 * Returns MR_OK with *ev filled (caller calls wh_event_free), or MR_EINVAL
 * with *code set to a static "malformed_json" or "invalid_event", err filled
 * and nothing left to free. */
mr_err wh_event_parse(const char *body, size_t len, wh_event *ev, const char **code,
                      char *err, size_t errlen);

/* Frees what wh_event_parse kept; safe on a zeroed or already freed wh_event. */
void wh_event_free(wh_event *ev);

#endif
