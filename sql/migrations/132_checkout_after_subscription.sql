-- 132_checkout_after_subscription.sql: a checkout that finds the account's
-- subscription recorded meanwhile is refused, a paid session is never answered
-- again, and a deleted customer's paid sessions block nothing.
--
-- - Step 5 of create-checkout-session (billing_checkout_older_open) answered
--   'paid' only while a paid checkout's subscription was not recorded yet: a
--   checkout that passed step 1 while another tab's session was being paid, and
--   waited at Stripe while that payment's webhook recorded the subscription, found
--   the paid session 'completed' with its subscription already there, and handed
--   out a second payable session to an account with a live subscription. 'paid' is
--   now also true when the account has such a subscription
--   (public.billing_live_status, the rule of billing_account's live_status, now
--   in one place), and a 'completed' newer attempt counts as newer.
-- - billing_attempt_begin answered a checkout attempt of the last hour again (the
--   same plan clicked twice) even when its session had been paid since: a customer
--   who cancelled and chose the same plan again within the hour got the URL of a
--   session that can no longer be paid. An attempt is answered again only while
--   no subscription of the account was recorded after it began.
-- - customer.deleted (129_customer_deleted.sql) abandoned the account's
--   'succeeded' checkout attempts but not its 'completed' ones (127), which went on
--   refusing checkouts (409 checkout_completed) for up to four days.
--
-- Redefines, each whole from its last definition and unchanged but for the lines
-- named: public.billing_checkout_older_open (v_newer's statuses, 'paid'),
-- public.billing_attempt_begin (the subscription condition), public.billing_account
-- (v_live from billing_live_status) (127_checkout_one_payable.sql) and
-- public.stripe_handle_event (the statuses a deleted customer's checkout attempts
-- are abandoned from) (129_customer_deleted.sql). CREATE OR REPLACE keeps each
-- function's grants.

-- The status of the account's subscription that a new checkout would duplicate (one
-- that is not over: a change goes through the portal), NULL when it has none.
CREATE FUNCTION public.billing_live_status(p_account_id uuid)
RETURNS public.subscription_status
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT s.status FROM public.subscriptions s
     WHERE s.account_id = p_account_id
       AND s.status IN ('trialing', 'active', 'past_due', 'unpaid', 'paused')
     ORDER BY s.updated_at DESC, s.id LIMIT 1;
$$;
REVOKE ALL ON FUNCTION public.billing_live_status(uuid) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.billing_live_status(uuid) TO service_role;

CREATE OR REPLACE FUNCTION public.billing_checkout_older_open(p_account_id uuid, p_session_id text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
DECLARE
    v_at    timestamptz;
    v_id    uuid;
    v_newer boolean;
BEGIN
    SELECT b.created_at, b.id INTO v_at, v_id FROM public.billing_attempts b
     WHERE b.account_id = p_account_id AND b.kind = 'checkout' AND b.object_id = p_session_id;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('older', '[]'::jsonb);
    END IF;
    SELECT EXISTS (
        SELECT 1 FROM public.billing_attempts b
         WHERE b.account_id = p_account_id AND b.kind = 'checkout' AND b.status IN ('succeeded', 'completed')
           AND b.object_id IS NOT NULL AND b.object_id <> p_session_id
           AND (b.expires_at IS NULL OR b.expires_at > now())
           AND (b.created_at, b.id) > (v_at, v_id)) INTO v_newer;
    RETURN jsonb_build_object('attempt_id', v_id, 'newer', v_newer,
                              'paid', public.billing_checkout_paid_pending(p_account_id)
                                      OR public.billing_live_status(p_account_id) IS NOT NULL,
                              'older', coalesce((
        SELECT jsonb_agg(jsonb_build_object('attempt_id', b.id, 'session_id', b.object_id)
                         ORDER BY b.created_at, b.id)
          FROM public.billing_attempts b
         WHERE b.account_id = p_account_id AND b.kind = 'checkout' AND b.status = 'succeeded'
           AND b.object_id IS NOT NULL AND b.object_id <> p_session_id
           AND (b.expires_at IS NULL OR b.expires_at > now())
           AND (b.created_at, b.id) < (v_at, v_id)), '[]'::jsonb));
END;
$$;

CREATE OR REPLACE FUNCTION public.billing_attempt_begin(p_account_id uuid, p_kind text, p_fingerprint text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_cust   text;
    v        public.billing_attempts;
    v_window interval := CASE p_kind WHEN 'portal' THEN interval '1 minute'
                                     ELSE interval '23 hours' END;
BEGIN
    SELECT a.stripe_customer_id INTO v_cust FROM public.accounts a
     WHERE a.id = p_account_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown account' USING ERRCODE = 'P0002';
    END IF;
    IF p_kind = 'customer' AND v_cust IS NOT NULL THEN
        RETURN jsonb_build_object('state', 'done', 'object_id', v_cust, 'url', NULL,
                                  'expires_at', NULL);
    END IF;

    SELECT * INTO v FROM public.billing_attempts b
     WHERE b.account_id = p_account_id AND b.kind = p_kind AND b.fingerprint = p_fingerprint
     ORDER BY b.created_at DESC, b.id LIMIT 1;
    IF FOUND THEN
        IF v.status = 'succeeded' AND p_kind = 'checkout'
           AND v.created_at > now() - interval '1 hour'
           AND v.expires_at > now() + interval '10 minutes'
           AND NOT EXISTS (SELECT 1 FROM public.billing_attempts n
                            WHERE n.account_id = p_account_id AND n.kind = 'checkout'
                              AND (n.created_at, n.id) > (v.created_at, v.id))
           AND NOT EXISTS (SELECT 1 FROM public.subscriptions s
                            WHERE s.account_id = p_account_id AND s.created_at >= v.created_at) THEN
            RETURN jsonb_build_object('state', 'done', 'object_id', v.object_id, 'url', v.url,
                                      'expires_at', extract(epoch FROM v.expires_at)::bigint);
        END IF;
        IF v.status = 'pending' AND v.created_at > now() - v_window THEN
            UPDATE public.billing_attempts SET calls = calls + 1 WHERE id = v.id;
            RETURN jsonb_build_object('state', 'send', 'attempt_id', v.id,
                                      'idempotency_key', v.idempotency_key, 'resumed', true);
        END IF;
    END IF;

    UPDATE public.billing_attempts SET status = 'abandoned'
     WHERE account_id = p_account_id AND kind = p_kind AND status = 'pending';
    INSERT INTO public.billing_attempts (account_id, kind, idempotency_key, fingerprint)
    VALUES (p_account_id, p_kind, 'mindroom-' || p_kind || '-' || gen_random_uuid(), p_fingerprint)
    RETURNING * INTO v;
    RETURN jsonb_build_object('state', 'send', 'attempt_id', v.id,
                              'idempotency_key', v.idempotency_key, 'resumed', false);
END;
$$;

CREATE OR REPLACE FUNCTION public.billing_account(p_account_id text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
DECLARE
    v_acc  public.accounts;
    v_live public.subscription_status;
    v_any  boolean;
BEGIN
    IF p_account_id IS NULL
       OR p_account_id !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        RETURN jsonb_build_object('found', false);
    END IF;
    SELECT * INTO v_acc FROM public.accounts a WHERE a.id = p_account_id::uuid;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('found', false);
    END IF;
    v_live := public.billing_live_status(v_acc.id);
    SELECT EXISTS (SELECT 1 FROM public.subscriptions s WHERE s.account_id = v_acc.id) INTO v_any;
    RETURN jsonb_build_object('found', true, 'email', v_acc.email,
                              'customer', v_acc.stripe_customer_id,
                              'live_status', v_live, 'had_subscription', v_any,
                              'checkout_paid', public.billing_checkout_paid_pending(v_acc.id));
END;
$$;

CREATE OR REPLACE FUNCTION public.stripe_handle_event(p_event jsonb, p_force boolean)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_id       text := p_event ->> 'id';
    v_type     text := p_event ->> 'type';
    v_kind     text := public.stripe_event_kind(p_event ->> 'type');
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
    v_cust     text;
    r          record;
BEGIN
    IF v_id IS NULL OR v_type IS NULL
       OR coalesce(jsonb_typeof(p_event -> 'created'), '') <> 'number'
       OR coalesce(jsonb_typeof(v_obj), '') <> 'object' THEN
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

    IF v_kind IS NULL THEN
        v_result := 'ignored';
    ELSE
        -- Apply in a subtransaction: an error below undoes every partial change and
        -- is recorded on the event instead.
        BEGIN
            CASE v_kind
            WHEN 'subscription' THEN
                SELECT * INTO r FROM public.stripe_apply_subscription(p_event, v_id, v_type, v_created);
                v_owed := r.owed;
                v_sub := r.subscription_id;
                v_inst := r.instance_id;
                v_result := CASE WHEN r.stale THEN 'stale' ELSE 'processed' END;

            WHEN 'checkout' THEN
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

            WHEN 'customer' THEN
                -- customer.deleted: Stripe never brings a deleted customer back, so the
                -- event needs no ordering key; applied whenever it comes, and again
                -- (a forced reprocess) it changes nothing more. The account is unlinked
                -- only while it is linked to this customer: one linked to a newer
                -- customer since keeps it. Our record of creating the customer is
                -- marked, so that a late event of it does not link it again
                -- (stripe_account_for).
                v_cust := v_obj ->> 'id';
                IF v_cust IS NULL OR v_cust = '' THEN
                    RAISE EXCEPTION USING ERRCODE = 'MRW03', MESSAGE = 'customer object without id';
                END IF;
                UPDATE public.billing_attempts SET customer_deleted_at = v_created
                 WHERE kind = 'customer' AND status = 'succeeded' AND object_id = v_cust
                   AND customer_deleted_at IS NULL;
                UPDATE public.accounts SET stripe_customer_id = NULL
                 WHERE stripe_customer_id = v_cust
                RETURNING id INTO v_account;
                IF v_account IS NOT NULL THEN
                    -- The account's sessions so far were the deleted customer's: none can
                    -- be paid any more, and a paid one's subscription went with the
                    -- customer. The next checkout neither expires them nor takes one for
                    -- a payment whose subscription is on its way (122).
                    UPDATE public.billing_attempts
                       SET status = 'abandoned', error = 'its customer was deleted in Stripe'
                     WHERE account_id = v_account AND kind = 'checkout'
                       AND status IN ('succeeded', 'completed');
                    INSERT INTO public.audit_logs (account_id, action, details)
                    VALUES (v_account, 'stripe.customer.deleted',
                            jsonb_build_object('event_id', v_id, 'customer', v_cust));
                END IF;
                v_result := 'processed';

            WHEN 'invoice' THEN
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
    END IF;

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
