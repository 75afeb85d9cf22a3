-- 010_stripe_webhook.sql
-- What handle-stripe-webhook runs per event: one call, one transaction, one round trip.
--
--   public.process_stripe_event(p_event_id text, p_event text) -> jsonb (the webhook's)
--   public.process_stripe_event(p_event jsonb) -> jsonb
--   public.reprocess_stripe_event(p_event_id text) -> jsonb
--
-- Both return {"result", "action", "subscription_id", "instance_id", "error"}:
--   result  processed  applied
--           duplicate  this event id was already handled (processed, ignored, stale or
--                      failed permanently); nothing changed
--           ignored    a type the webhook does not handle; recorded
--           stale      older than the state already applied to its subscription; recorded,
--                      nothing changed
--           failed     permanent error recorded on the event (unknown price, bad payload);
--                      answer 200: a retry cannot fix it, operators see stripe_events.error
--           deferred   cannot be applied yet (unknown account); recorded with its error,
--                      attempts counted; answer 5xx so Stripe retries. A redelivery (or
--                      reprocess_stripe_event from the sweep) processes it again.
--   action  what the caller owes after commit: provision | resume | stop | destroy | none
--
-- Both run SECURITY INVOKER as service_role (the webhook switches role in the same
-- transaction): service_role's grants (002) are all they need.
--
-- Ordering. Each subscription row remembers the last event applied to it
-- (last_event_created, last_event_id). An event applies when its key is greater than
-- that event's key, where key = (created, type rank, status rank, event id):
--   created      event.created (Unix seconds): older events are stale
--   type rank    customer.subscription.created 1 < updated/paused/resumed 2 < deleted 3
--   status rank  the subscription status the event carries, in lifecycle order:
--                incomplete 1 < trialing 2 < active 3 < past_due 4 < unpaid 5 < paused 6
--                < incomplete_expired 7 < canceled 8
--   event id     byte order: arbitrary but total, so any arrival order of the same
--                events converges to the same row
-- So within one second an update beats the creation, a deletion beats everything, and
-- of two updates the one carrying the later lifecycle status wins.

-- Stripe's subscription status -> ours, each of the eight spelled out; anything else
-- raises MRW03 (recorded as a permanent failure on the event).
CREATE FUNCTION public.stripe_subscription_status(p_status text)
RETURNS public.subscription_status
LANGUAGE plpgsql IMMUTABLE
SET search_path = ''
AS $$
BEGIN
    CASE p_status
        WHEN 'incomplete'         THEN RETURN 'incomplete';
        WHEN 'incomplete_expired' THEN RETURN 'incomplete_expired';
        WHEN 'trialing'           THEN RETURN 'trialing';
        WHEN 'active'             THEN RETURN 'active';
        WHEN 'past_due'           THEN RETURN 'past_due';
        WHEN 'canceled'           THEN RETURN 'cancelled';
        WHEN 'unpaid'             THEN RETURN 'unpaid';
        WHEN 'paused'             THEN RETURN 'paused';
        ELSE RAISE EXCEPTION USING ERRCODE = 'MRW03', MESSAGE = 'unknown subscription status';
    END CASE;
END;
$$;

-- The ordering key of an event (see the header). Rank 0 for types/statuses that do not
-- take part in ordering.
CREATE FUNCTION public.stripe_event_rank(p_type text, p_status text)
RETURNS integer[]
LANGUAGE sql IMMUTABLE
SET search_path = ''
AS $$
    SELECT ARRAY[
        CASE p_type
            WHEN 'customer.subscription.created' THEN 1
            WHEN 'customer.subscription.updated' THEN 2
            WHEN 'customer.subscription.paused'  THEN 2
            WHEN 'customer.subscription.resumed' THEN 2
            WHEN 'customer.subscription.deleted' THEN 3
            ELSE 0 END,
        CASE p_status
            WHEN 'incomplete'         THEN 1
            WHEN 'trialing'           THEN 2
            WHEN 'active'             THEN 3
            WHEN 'past_due'           THEN 4
            WHEN 'unpaid'             THEN 5
            WHEN 'paused'             THEN 6
            WHEN 'incomplete_expired' THEN 7
            WHEN 'canceled'           THEN 8
            ELSE 0 END]
$$;

-- An id field that Stripe sends either as a string or, when expanded, as an object.
CREATE FUNCTION public.stripe_id(p_value jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = ''
AS $$
    SELECT CASE jsonb_typeof(p_value)
               WHEN 'string' THEN p_value #>> '{}'
               WHEN 'object' THEN p_value ->> 'id'
               ELSE NULL END
$$;

-- Finds the account of a Stripe customer: by accounts.stripe_customer_id, else by
-- p_account_id (metadata.account_id / client_reference_id), which is then linked to the
-- customer. Raises MRW01 (deferred: retry later) when neither finds an account, and
-- MRW02 (permanent) when the account id is not a uuid or the named account is already
-- linked to another customer.
CREATE FUNCTION public.stripe_account_for(p_customer text, p_account_id text)
RETURNS uuid
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_id   uuid;
    v_cust text;
BEGIN
    IF p_customer IS NOT NULL THEN
        SELECT a.id INTO v_id FROM public.accounts a WHERE a.stripe_customer_id = p_customer;
        IF FOUND THEN
            RETURN v_id;
        END IF;
    END IF;
    IF p_account_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'MRW01', MESSAGE = 'unknown account: no account has this customer and no account id was given';
    END IF;
    IF p_account_id !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        -- Not an id at all: no retry can make it one.
        RAISE EXCEPTION USING ERRCODE = 'MRW02', MESSAGE = 'account id is not a uuid';
    END IF;
    SELECT a.id, a.stripe_customer_id INTO v_id, v_cust
      FROM public.accounts a WHERE a.id = p_account_id::uuid FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'MRW01', MESSAGE = 'unknown account: the account id names no account';
    END IF;
    IF p_customer IS NOT NULL THEN
        IF v_cust IS NULL THEN
            UPDATE public.accounts SET stripe_customer_id = p_customer
             WHERE id = v_id;
        ELSIF v_cust <> p_customer THEN
            RAISE EXCEPTION USING ERRCODE = 'MRW02', MESSAGE = 'account is linked to another Stripe customer';
        END IF;
    END IF;
    RETURN v_id;
END;
$$;

-- Applies a customer.subscription.* event. Returns (action, subscription id, instance
-- id, stale). Raises MRW01/MRW02/MRW03 as above; the caller turns those into the
-- event's status.
CREATE FUNCTION public.stripe_apply_subscription(
    p_event jsonb, p_event_id text, p_type text, p_created timestamptz,
    OUT action text, OUT subscription_id uuid, OUT instance_id uuid, OUT stale boolean)
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_obj       jsonb := p_event -> 'data' -> 'object';
    v_stripe_id text := v_obj ->> 'id';
    v_stripe_st text := v_obj ->> 'status';
    v_status    public.subscription_status;
    v_price     text;
    v_plan      public.plans;
    v_account   uuid;
    v_period    timestamptz;
    v_sub       public.subscriptions;
    v_last      record;
    v_inst      public.instances;
    v_names     record;
    v_old_price text;
BEGIN
    action := 'none';
    stale := false;
    IF v_stripe_id IS NULL OR v_stripe_id = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'MRW03', MESSAGE = 'subscription object without id';
    END IF;

    -- Every event of one subscription is serialized by this lock, including the two
    -- that might otherwise both try to create its row.
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(v_stripe_id, 4242));
    SELECT * INTO v_sub FROM public.subscriptions s
     WHERE s.stripe_subscription_id = v_stripe_id FOR UPDATE;

    -- Ordering: compare with the last applied event before validating anything else,
    -- so that a stale event changes nothing, not even the account link.
    IF FOUND AND v_sub.last_event_created IS NOT NULL THEN
        IF p_created < v_sub.last_event_created THEN
            stale := true;
        ELSIF p_created = v_sub.last_event_created THEN
            SELECT e.type, e.payload -> 'data' -> 'object' ->> 'status' AS st
              INTO v_last FROM public.stripe_events e WHERE e.id = v_sub.last_event_id;
            IF (public.stripe_event_rank(p_type, v_stripe_st), p_event_id)
               <= (public.stripe_event_rank(v_last.type, v_last.st), v_sub.last_event_id) THEN
                stale := true;
            END IF;
        END IF;
        IF stale THEN
            subscription_id := v_sub.id;
            RETURN;
        END IF;
    END IF;

    v_status := public.stripe_subscription_status(v_stripe_st);
    -- deleted always means canceled, whatever status the payload carries.
    IF p_type = 'customer.subscription.deleted' THEN
        v_status := 'cancelled';
    END IF;

    v_price := coalesce(v_obj #>> '{items,data,0,price,id}', v_obj #>> '{plan,id}');
    SELECT * INTO v_plan FROM public.plans p WHERE p.stripe_price_id = v_price;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'MRW02', MESSAGE = 'unknown price: no plan has this price id';
    END IF;

    -- Before API version 2025-03-31 the period end is on the subscription; since, on
    -- each item.
    v_period := coalesce(pg_catalog.to_timestamp((v_obj ->> 'current_period_end')::bigint),
                         (SELECT pg_catalog.to_timestamp(max((it ->> 'current_period_end')::bigint))
                            FROM jsonb_array_elements(
                                 CASE WHEN jsonb_typeof(v_obj #> '{items,data}') = 'array'
                                      THEN v_obj #> '{items,data}' ELSE '[]'::jsonb END) AS it));

    v_old_price := v_sub.stripe_price_id;
    IF v_sub.id IS NULL THEN
        v_account := public.stripe_account_for(public.stripe_id(v_obj -> 'customer'),
                                               v_obj #>> '{metadata,account_id}');
        INSERT INTO public.subscriptions AS s (
            account_id, stripe_subscription_id, stripe_price_id, tier, status,
            trial_ends_at, current_period_end, cancelled_at, cancel_at_period_end,
            last_event_created, last_event_id)
        VALUES (v_account, v_stripe_id, v_price, v_plan.tier, v_status,
                pg_catalog.to_timestamp((v_obj ->> 'trial_end')::bigint), v_period,
                pg_catalog.to_timestamp((v_obj ->> 'canceled_at')::bigint),
                coalesce((v_obj ->> 'cancel_at_period_end')::boolean, false),
                p_created, p_event_id)
        RETURNING * INTO v_sub;
    ELSE
        UPDATE public.subscriptions AS s SET
            stripe_price_id      = v_price,
            tier                 = v_plan.tier,
            status               = v_status,
            trial_ends_at        = pg_catalog.to_timestamp((v_obj ->> 'trial_end')::bigint),
            current_period_end   = v_period,
            cancelled_at         = pg_catalog.to_timestamp((v_obj ->> 'canceled_at')::bigint),
            cancel_at_period_end = coalesce((v_obj ->> 'cancel_at_period_end')::boolean, false),
            last_event_created   = p_created,
            last_event_id        = p_event_id
        WHERE s.id = v_sub.id
        RETURNING * INTO v_sub;
    END IF;
    subscription_id := v_sub.id;

    -- The instance consequence: the row says what is owed; the caller kicks it off.
    SELECT * INTO v_inst FROM public.instances i
     WHERE i.subscription_id = v_sub.id AND i.status <> 'deprovisioned' FOR UPDATE;

    IF public.is_entitled(v_status) THEN
        IF v_inst.id IS NULL THEN
            SELECT * INTO v_names FROM public.instance_names(v_sub.id);
            -- Memory and CPU come from the plan (trigger, 004); a tier change later
            -- follows through the same trigger.
            INSERT INTO public.instances AS i (
                subscription_id, dokku_app_name, subdomain, status, desired_status)
            VALUES (v_sub.id, v_names.dokku_app_name, v_names.subdomain, 'provisioning', 'running')
            RETURNING * INTO v_inst;
            action := 'provision';
        ELSIF v_inst.status = 'deprovisioning' THEN
            -- Being destroyed: a Stripe subscription never comes back from canceled, so
            -- nothing is owed here; the destroy finishes.
            action := 'none';
        ELSE
            UPDATE public.instances AS i SET desired_status = 'running'
             WHERE i.id = v_inst.id AND i.desired_status <> 'running';
            action := CASE v_inst.status
                          WHEN 'stopped' THEN 'resume'
                          WHEN 'failed'  THEN 'provision'
                          -- A new price means new limits: provision-instance
                          -- pushes them to the provisioner (an update).
                          ELSE CASE WHEN v_inst.desired_status <> 'running'
                                      OR v_old_price IS DISTINCT FROM v_price
                                    THEN 'provision' ELSE 'none' END
                      END;
        END IF;
    ELSIF v_status IN ('unpaid', 'paused', 'incomplete_expired') THEN
        IF v_inst.id IS NOT NULL AND v_inst.status <> 'deprovisioning' THEN
            UPDATE public.instances AS i SET desired_status = 'stopped'
             WHERE i.id = v_inst.id AND i.desired_status <> 'stopped';
            action := CASE WHEN v_inst.status = 'stopped' THEN 'none' ELSE 'stop' END;
        END IF;
    ELSIF v_status = 'cancelled' THEN
        IF v_inst.id IS NOT NULL THEN
            -- Every live status may move to deprovisioning (state machine, 001/004).
            UPDATE public.instances AS i SET
                desired_status = 'deprovisioned',
                status         = 'deprovisioning'
            WHERE i.id = v_inst.id
              AND (i.desired_status <> 'deprovisioned' OR i.status <> 'deprovisioning');
            action := 'destroy';
        END IF;
    END IF;
    -- 'incomplete': not entitled yet, nothing owed (an existing instance is left alone).
    instance_id := v_inst.id;
END;
$$;

-- Records and applies one event (see the header). p_force: also redo an event whose
-- earlier attempt failed permanently (operator's reprocess after adding a plan).
CREATE FUNCTION public.stripe_handle_event(p_event jsonb, p_force boolean)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_id       text := p_event ->> 'id';
    v_type     text := p_event ->> 'type';
    v_created  timestamptz;
    v_obj      jsonb := p_event -> 'data' -> 'object';
    v_prev     text;
    v_known    boolean;
    v_result   text;
    v_action   text := 'none';
    v_sub      uuid;
    v_inst     uuid;
    v_error    text;
    v_state    text;
    v_account  uuid;
    r          record;
BEGIN
    IF v_id IS NULL OR v_type IS NULL OR jsonb_typeof(p_event -> 'created') <> 'number'
       OR jsonb_typeof(v_obj) <> 'object' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'not a Stripe event';
    END IF;
    v_created := pg_catalog.to_timestamp((p_event ->> 'created')::bigint);

    -- Dedupe, for real: every delivery of one event id is serialized by this lock,
    -- so of ten concurrent deliveries one applies and nine then read its outcome.
    -- (A read after the wait sees the first one's commit: READ COMMITTED takes a
    -- new snapshot per statement.)
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('stripe_event:' || v_id, 0));
    SELECT e.status INTO v_prev FROM public.stripe_events e WHERE e.id = v_id;
    v_known := FOUND;
    IF v_prev IN ('processed', 'ignored', 'stale') OR (v_prev = 'failed' AND NOT p_force) THEN
        RETURN jsonb_build_object('result', 'duplicate', 'action', 'none', 'status', v_prev,
                                  'subscription_id', NULL, 'instance_id', NULL, 'error', NULL);
    END IF;
    -- Otherwise new, or 'deferred' / 'failed' when forced: (re)apply.

    -- Apply in a subtransaction: an error below undoes every partial change and is
    -- recorded on the event instead.
    BEGIN
        CASE
        WHEN v_type IN ('customer.subscription.created', 'customer.subscription.updated',
                        'customer.subscription.deleted', 'customer.subscription.paused',
                        'customer.subscription.resumed') THEN
            SELECT * INTO r FROM public.stripe_apply_subscription(p_event, v_id, v_type, v_created);
            v_action := r.action;
            v_sub := r.subscription_id;
            v_inst := r.instance_id;
            v_result := CASE WHEN r.stale THEN 'stale' ELSE 'processed' END;

        WHEN v_type = 'checkout.session.completed' THEN
            IF public.stripe_id(v_obj -> 'customer') IS NULL THEN
                v_result := 'ignored';
            ELSE
                v_account := public.stripe_account_for(
                    public.stripe_id(v_obj -> 'customer'),
                    coalesce(v_obj ->> 'client_reference_id', v_obj #>> '{metadata,account_id}'));
                v_result := 'processed';
            END IF;

        WHEN v_type IN ('invoice.paid', 'invoice.payment_failed') THEN
            v_account := public.stripe_account_for(public.stripe_id(v_obj -> 'customer'), NULL);
            INSERT INTO public.audit_logs (account_id, action, details)
            VALUES (v_account, 'stripe.' || v_type, jsonb_build_object(
                'event_id', v_id,
                'invoice_id', v_obj ->> 'id',
                'subscription', public.stripe_id(coalesce(v_obj -> 'subscription',
                                                          v_obj #> '{parent,subscription_details,subscription}')),
                'amount_due', v_obj -> 'amount_due',
                'amount_paid', v_obj -> 'amount_paid',
                'currency', v_obj -> 'currency',
                'attempt_count', v_obj -> 'attempt_count',
                'status', v_obj -> 'status'));
            v_result := 'processed';

        ELSE
            v_result := 'ignored';
        END CASE;
    EXCEPTION
        WHEN SQLSTATE 'MRW01' THEN
            GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT;
            v_result := 'deferred';
        WHEN SQLSTATE 'MRW02' OR SQLSTATE 'MRW03' OR data_exception THEN
            GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT, v_state = RETURNED_SQLSTATE;
            IF v_state NOT IN ('MRW02', 'MRW03') THEN
                v_error := 'malformed event payload (' || v_state || ')';
            END IF;
            v_result := 'failed';
    END;

    IF v_result IN ('deferred', 'failed') THEN
        v_action := 'none';
        v_sub := NULL;
        v_inst := NULL;
    END IF;
    -- The event row is written once, with its outcome (a new event costs one insert,
    -- not an insert and an update of its payload-sized row).
    IF v_known THEN
        UPDATE public.stripe_events SET
            status       = v_result,
            error        = v_error,
            attempts     = attempts + 1,
            processed_at = CASE WHEN v_result = 'deferred' THEN NULL ELSE now() END
        WHERE id = v_id;
    ELSE
        INSERT INTO public.stripe_events (id, type, created, api_version, livemode, payload,
                                          status, error, processed_at)
        VALUES (v_id, v_type, v_created, p_event ->> 'api_version',
                coalesce((p_event ->> 'livemode')::boolean, false), p_event,
                v_result, v_error, CASE WHEN v_result = 'deferred' THEN NULL ELSE now() END);
    END IF;

    RETURN jsonb_build_object('result', v_result, 'action', v_action, 'status', v_result,
                              'subscription_id', v_sub, 'instance_id', v_inst, 'error', v_error);
END;
$$;

-- Dedupe, fast path first: an event already handled is answered from a plain read,
-- before anything else is looked at. No lock and no write, so a duplicate costs no
-- commit flush. (stripe_handle_event checks again under the event's lock.)
--
-- The id comes as its own parameter and the payload as text, so that a duplicate
-- costs one index lookup: the payload (a few KB) is parsed into jsonb only when the
-- event is applied. Parsing it for every delivery was most of a duplicate's cost in
-- the backend (jsonb input: lexing, key sorting). The caller takes the id from the
-- same signature-checked body; a payload whose id differs is refused (22023) before
-- anything is applied, so an event is never recorded under another id.
-- A plain read sees only committed rows (READ COMMITTED), so "duplicate" is only ever
-- said of an event whose earlier outcome committed; 'deferred' and 'received' fall
-- through to stripe_handle_event and are applied again.
CREATE FUNCTION public.process_stripe_event(p_event_id text, p_event text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_prev  text;
    v_event jsonb;
BEGIN
    SELECT e.status INTO v_prev FROM public.stripe_events e WHERE e.id = p_event_id;
    IF v_prev IN ('processed', 'ignored', 'stale', 'failed') THEN
        RETURN jsonb_build_object('result', 'duplicate', 'action', 'none', 'status', v_prev,
                                  'subscription_id', NULL, 'instance_id', NULL, 'error', NULL);
    END IF;
    v_event := p_event::jsonb;
    IF (v_event ->> 'id') IS DISTINCT FROM p_event_id THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'event id does not match the payload';
    END IF;
    RETURN public.stripe_handle_event(v_event, false);
END;
$$;

-- The same for a caller holding the parsed event (SQL tests, operators' scripts).
CREATE FUNCTION public.process_stripe_event(p_event jsonb)
RETURNS jsonb
LANGUAGE sql VOLATILE
SET search_path = ''
AS $$
    SELECT public.process_stripe_event(p_event ->> 'id', p_event::text)
$$;

-- Reprocesses a stored event that has not been handled successfully (deferred: unknown
-- account; received: interrupted; failed: permanent error, e.g. after the operator added
-- the missing plan). Same result as process_stripe_event; P0002 for an unknown id.
CREATE FUNCTION public.reprocess_stripe_event(p_event_id text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_payload jsonb;
BEGIN
    SELECT e.payload INTO v_payload FROM public.stripe_events e WHERE e.id = p_event_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown event' USING ERRCODE = 'P0002';
    END IF;
    RETURN public.stripe_handle_event(v_payload, true);
END;
$$;

DO $grants$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'public.stripe_subscription_status(text)',
        'public.stripe_event_rank(text, text)',
        'public.stripe_id(jsonb)',
        'public.stripe_account_for(text, text)',
        'public.stripe_apply_subscription(jsonb, text, text, timestamptz)',
        'public.stripe_handle_event(jsonb, boolean)',
        'public.process_stripe_event(jsonb)',
        'public.process_stripe_event(text, text)',
        'public.reprocess_stripe_event(text)']
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC, anon, authenticated', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', f);
    END LOOP;
END
$grants$;
