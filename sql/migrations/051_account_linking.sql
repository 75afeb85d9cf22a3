-- 051_account_linking.sql: a Stripe customer belongs to an account only because we
-- created it for that account; what an event claims never makes the link.
--
-- The account of an event is found by its customer, in this order:
--   1. accounts.stripe_customer_id: the customer create-checkout-session created and
--      stored on the account (billing_attempt_succeeded, 050), or an operator's link;
--   2. a succeeded billing_attempts row of kind 'customer' for that customer: we
--      created it for that account; the account is linked to it when it has no
--      customer yet.
-- An event's claim (checkout's client_reference_id / metadata.account_id, a
-- subscription's metadata.account_id) is checked against that account and never
-- looked up on its own:
--   customer ours, no claim or the claim names its account     applied
--   customer ours, the claim names another account             refused
--   customer not ours, no claim                                deferred (MRW01): may
--                                                              still be linked (an
--                                                              operator); Stripe and
--                                                              the sweep retry, 72 h
--   customer not ours, the claimed account has a customer
--     creation of ours still pending (attempt < 24 h old)      deferred (MRW01): our
--                                                              write may land; the
--                                                              retry then applies it
--                                                              or refuses it
--   customer not ours, any other claim (an account linked to
--     another customer, one without a customer of ours, no
--     such account, not an account id)                         refused
-- Refused (SQLSTATE MRW04 inside, stripe_events.status 'refused' outside) is a
-- security event: recorded with the reason, an audit_logs row
-- 'stripe.account_link_refused' {event_id, type, customer, claimed_account, reason}
-- on the claimed account when it exists, answered 200 so Stripe stops (a retry
-- cannot change the answer), logged at error level by the webhook. Nothing of
-- the claimed account is touched, so its owner's own events apply as always.
-- Counted by stripe_events rows in status 'refused' (indexed by status and time;
-- mindroomctl refused-links).

ALTER TABLE public.stripe_events DROP CONSTRAINT stripe_events_status_check;
ALTER TABLE public.stripe_events ADD CONSTRAINT stripe_events_status_check
    CHECK (status IN ('received', 'processed', 'ignored', 'stale', 'deferred', 'failed', 'refused'));

-- Step 2 above reads customer attempts by the customer Stripe created.
CREATE INDEX billing_attempts_customer_idx ON public.billing_attempts (object_id)
    WHERE kind = 'customer' AND status = 'succeeded';

-- The account of a Stripe customer (see the header); p_account_id is the event's
-- claim, or NULL. Raises MRW01 (deferred), MRW03 (no customer: a malformed event)
-- or MRW04 (refused; DETAIL is {"customer", "claimed_account"} as JSON).
CREATE OR REPLACE FUNCTION public.stripe_account_for(p_customer text, p_account_id text)
RETURNS uuid
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_id     uuid;
    v_claim  uuid;
    v_cust   text;
    v_reason text;
BEGIN
    IF p_customer IS NULL OR p_customer = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'MRW03', MESSAGE = 'the event names no Stripe customer';
    END IF;
    IF p_account_id ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        v_claim := p_account_id::uuid;
    END IF;

    SELECT a.id INTO v_id FROM public.accounts a WHERE a.stripe_customer_id = p_customer;
    IF NOT FOUND THEN
        SELECT b.account_id INTO v_id FROM public.billing_attempts b
         WHERE b.kind = 'customer' AND b.status = 'succeeded' AND b.object_id = p_customer
         ORDER BY b.created_at, b.id LIMIT 1;
        IF FOUND THEN
            UPDATE public.accounts SET stripe_customer_id = p_customer
             WHERE id = v_id AND stripe_customer_id IS NULL;
        END IF;
    END IF;

    IF v_id IS NOT NULL THEN
        IF p_account_id IS NULL OR v_claim = v_id THEN
            RETURN v_id;
        END IF;
        v_reason := 'it names an account other than its customer''s';
    ELSIF p_account_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'MRW01',
            MESSAGE = 'unknown account: no account has this customer and no account id was given';
    ELSIF v_claim IS NULL THEN
        v_reason := 'the account id it names is not an account id';
    ELSE
        SELECT a.stripe_customer_id INTO v_cust FROM public.accounts a WHERE a.id = v_claim;
        IF NOT FOUND THEN
            v_reason := 'the account it names does not exist';
        ELSIF v_cust IS NOT NULL THEN
            v_reason := 'the account it names is linked to another Stripe customer';
        ELSIF EXISTS (SELECT 1 FROM public.billing_attempts b
                       WHERE b.account_id = v_claim AND b.kind = 'customer'
                         AND b.status = 'pending' AND b.created_at > now() - interval '24 hours') THEN
            RAISE EXCEPTION USING ERRCODE = 'MRW01',
                MESSAGE = 'unknown account: the named account''s Stripe customer is still being created';
        ELSE
            v_reason := 'the account it names has no Stripe customer of ours';
        END IF;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'MRW04', MESSAGE = 'account link refused: ' || v_reason,
        DETAIL = jsonb_build_object('customer', p_customer, 'claimed_account', p_account_id)::text;
END;
$$;

-- Records and applies one event (010, 041): as before, plus the refused outcome.
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
    v_detail   text;
    v_refusal  jsonb;
    v_account  uuid;
    v_ref      text;
    v_meta     text;
    r          record;
BEGIN
    IF v_id IS NULL OR v_type IS NULL OR jsonb_typeof(p_event -> 'created') <> 'number'
       OR jsonb_typeof(v_obj) <> 'object' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'not a Stripe event';
    END IF;
    v_created := pg_catalog.to_timestamp((p_event ->> 'created')::bigint);

    -- Dedupe, for real: every delivery of one event id is serialized by this lock,
    -- so of ten concurrent deliveries one applies and nine then read its outcome.
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('stripe_event:' || v_id, 0));
    SELECT e.status INTO v_prev FROM public.stripe_events e WHERE e.id = v_id;
    v_known := FOUND;
    IF v_prev IN ('processed', 'ignored', 'stale')
       OR (v_prev IN ('failed', 'refused') AND NOT p_force) THEN
        RETURN jsonb_build_object('result', 'duplicate', 'status', v_prev, 'owed', NULL,
                                  'subscription_id', NULL, 'instance_id', NULL, 'error', NULL);
    END IF;
    -- Otherwise new, or 'deferred' / 'failed' / 'refused' when forced: (re)apply.

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
                -- Our sessions carry the account in both; two different accounts is a
                -- claim no customer can back.
                v_ref := v_obj ->> 'client_reference_id';
                v_meta := v_obj #>> '{metadata,account_id}';
                IF v_ref IS NOT NULL AND v_meta IS NOT NULL AND v_ref <> v_meta THEN
                    RAISE EXCEPTION USING ERRCODE = 'MRW04',
                        MESSAGE = 'account link refused: client_reference_id and metadata.account_id name different accounts',
                        DETAIL = jsonb_build_object('customer', public.stripe_id(v_obj -> 'customer'),
                                                    'claimed_account', v_ref)::text;
                END IF;
                v_account := public.stripe_account_for(public.stripe_id(v_obj -> 'customer'),
                                                       coalesce(v_ref, v_meta));
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
        WHEN SQLSTATE 'MRW04' THEN
            GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL;
            v_refusal := v_detail::jsonb;
            v_result := 'refused';
        WHEN SQLSTATE 'MRW02' OR SQLSTATE 'MRW03' OR data_exception THEN
            GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT, v_state = RETURNED_SQLSTATE;
            IF v_state NOT IN ('MRW02', 'MRW03') THEN
                v_error := 'malformed event payload (' || v_state || ')';
            END IF;
            v_result := 'failed';
    END;

    IF v_result IN ('deferred', 'failed', 'refused') THEN
        v_owed := NULL;
        v_sub := NULL;
        v_inst := NULL;
    END IF;
    IF v_result = 'refused' THEN
        -- The claimed account's owner sees that a link to it was refused; the
        -- operator finds every refusal by action.
        INSERT INTO public.audit_logs (account_id, action, details)
        VALUES ((SELECT a.id FROM public.accounts a
                  WHERE (v_refusal ->> 'claimed_account')
                        ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                    AND a.id = (v_refusal ->> 'claimed_account')::uuid),
                'stripe.account_link_refused',
                jsonb_build_object('event_id', v_id, 'type', v_type,
                                   'customer', v_refusal -> 'customer',
                                   'claimed_account', v_refusal -> 'claimed_account',
                                   'reason', v_error));
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
                              'subscription_id', v_sub, 'instance_id', v_inst, 'error', v_error)
           || CASE WHEN v_result = 'refused'
                   THEN jsonb_build_object('customer', v_refusal -> 'customer',
                                           'claimed_account', v_refusal -> 'claimed_account')
                   ELSE '{}'::jsonb END;
END;
$$;

-- The webhook's entry (041): a refused event is settled, like a failed one.
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
    IF v_prev IN ('processed', 'ignored', 'stale', 'failed', 'refused') THEN
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
