/* mindroom.h: everything a function includes. */
#ifndef MINDROOM_H
#define MINDROOM_H
#include "mr_common.h"
#include "mr_log.h"
#include "mr_config.h"
#include "mr_json.h"
#include "mr_jwt.h"
#include "mr_stripe.h"
#include "mr_http.h"
#include "mr_db.h"
#include "mr_httpc.h"
#include "mr_idcache.h"
#endif
