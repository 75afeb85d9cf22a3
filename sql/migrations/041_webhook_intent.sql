-- 041_webhook_intent.sql: the webhook records intent; it owes nothing to anyone.
--
-- process_stripe_event (010) keeps its signature and its guarantees (dedupe atomic
-- with the effect, ordering by created with the 010 tie-break, deferred/failed
-- outcomes). What changes is the instance consequence: a subscription event sets
-- the instance's desired status (instance_desired_for, 040), and the owed-work
-- trigger (040) turns that into work for the lifecycle worker, notified by the same
-- commit. The answer no longer carries an action for the caller to carry out:
--   {"result", "status", "owed", "subscription_id", "instance_id", "error"}
-- where owed is the instance's owed action after the event (lifecycle_action, for
-- logs), or null.
--
-- The sweep's side (040 scheduled jobs): Stripe events stored as deferred are
-- retried with backoff, and one deferred longer than STRIPE_DEFER_MAX_HOURS is
-- marked failed (stripe_events_due / stripe_expire_deferred).

DROP FUNCTION public.stripe_apply_subscription(jsonb, text, text, timestamptz);

-- Applies a customer.subscription.* event: the subscription row, and what its
-- instance should become (instance_desired_for, 040). Records intent only: the
-- owed-work trigger (040) says what that makes owed and wakes the lifecycle worker.
-- Returns (subscription id, instance id, owed: the instance's owed action after the
-- change, stale). Raises MRW01/MRW02/MRW03 (010); the caller turns those into the
-- event's status.
CREATE FUNCTION public.stripe_apply_subscription(
    p_event jsonb, p_event_id text, p_type text, p_created timestamptz,
    OUT subscription_id uuid, OUT instance_id uuid, OUT owed text, OUT stale boolean)
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
    v_desired   public.instance_status;
BEGIN
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

    -- The instance consequence, as intent. A new price reaches the instance's limits
    -- through the plan triggers (004), which makes an update owed.
    v_desired := public.instance_desired_for(v_status);
    SELECT * INTO v_inst FROM public.instances i
     WHERE i.subscription_id = v_sub.id AND i.status <> 'deprovisioned' FOR UPDATE;
    IF v_desired = 'running' AND v_inst.id IS NULL THEN
        SELECT * INTO v_names FROM public.instance_names(v_sub.id);
        -- Memory and CPU come from the plan (trigger, 004).
        INSERT INTO public.instances AS i (
            subscription_id, dokku_app_name, subdomain, status, desired_status)
        VALUES (v_sub.id, v_names.dokku_app_name, v_names.subdomain, 'provisioning', 'running')
        RETURNING * INTO v_inst;
    ELSIF v_desired IS NOT NULL AND v_inst.id IS NOT NULL THEN
        v_inst := public.instance_request(v_inst.id, v_desired);
    END IF;
    owed := v_inst.owed_action;
    instance_id := v_inst.id;
END;
$$;

-- Records and applies one event (see the header). p_force: also redo an event whose
-- earlier attempt failed permanently (operator's reprocess after adding a plan).
CREATE OR REPLACE FUNCTION public.stripe_handle_event(p_event jsonb, p_force boolean)
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
    v_owed     text;
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
        RETURN jsonb_build_object('result', 'duplicate', 'status', v_prev, 'owed', NULL,
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
            v_owed := r.owed;
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
        v_owed := NULL;
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

    RETURN jsonb_build_object('result', v_result, 'owed', v_owed, 'status', v_result,
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
CREATE OR REPLACE FUNCTION public.process_stripe_event(p_event_id text, p_event text)
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
        RETURN jsonb_build_object('result', 'duplicate', 'owed', NULL, 'status', v_prev,
                                  'subscription_id', NULL, 'instance_id', NULL, 'error', NULL);
    END IF;
    v_event := p_event::jsonb;
    IF (v_event ->> 'id') IS DISTINCT FROM p_event_id THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'event id does not match the payload';
    END IF;
    RETURN public.stripe_handle_event(v_event, false);
END;
$$;

-- Stripe events owed a retry now: deferred (a transient reason: the account is not
-- linked yet), or left 'received' by a delivery interrupted before its transaction
-- finished (one still 'received' a minute later is owed too). Backoff per event
-- from its attempts and last touch: 30 s * 2^attempts, at most an hour.
CREATE FUNCTION public.stripe_events_due(p_limit integer)
RETURNS TABLE (id text)
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT e.id
      FROM public.stripe_events e
     WHERE (e.status = 'deferred'
            OR (e.status = 'received' AND e.received_at < now() - interval '1 minute'))
       AND e.updated_at <= now() - make_interval(secs =>
               least(3600, 30 * power(2, least(e.attempts, 20))::double precision))
     ORDER BY e.updated_at
     LIMIT greatest(p_limit, 0);
$$;

-- Gives up on events deferred for longer than p_max_hours (Stripe itself stops
-- after three days): marked failed with the reason, so an operator sees them
-- (mindroomctl failed-events) and can reprocess once the cause is fixed.
-- Returns the ids given up on.
CREATE FUNCTION public.stripe_expire_deferred(p_max_hours integer)
RETURNS TABLE (id text)
LANGUAGE sql VOLATILE
SET search_path = ''
AS $$
    UPDATE public.stripe_events e SET
           status = 'failed',
           error = left('deferred for more than ' || p_max_hours || ' h: '
                        || coalesce(e.error, 'not applicable'), 1000)
     WHERE e.status IN ('deferred', 'received')
       AND e.received_at < now() - make_interval(hours => greatest(p_max_hours, 1))
    RETURNING e.id;
$$;

-- The sweep reads deferred events by status and age.
CREATE INDEX stripe_events_deferred_idx ON public.stripe_events (updated_at)
    WHERE status IN ('deferred', 'received');

DO $grants$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'public.stripe_apply_subscription(jsonb, text, text, timestamptz)',
        'public.stripe_events_due(integer)',
        'public.stripe_expire_deferred(integer)']
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC, anon, authenticated', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', f);
    END LOOP;
END
$grants$;
