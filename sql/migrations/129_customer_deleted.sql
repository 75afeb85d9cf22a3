-- 129_customer_deleted.sql: a customer deleted in Stripe is no longer the account's.
--
-- customer.deleted was not a type the webhook handled: recorded 'ignored', and
-- accounts.stripe_customer_id kept the deleted customer. create-checkout-session then
-- named that customer in every new session, Stripe refused it (no such customer), and
-- every checkout of the account answered 502 stripe_error for good. Now:
-- 1. stripe_event_kind: customer.deleted is of kind 'customer'.
-- 2. stripe_handle_event applies it: the account linked to that customer is unlinked
--    (stripe_customer_id NULL, only while it is that customer), with an audit_logs row
--    'stripe.customer.deleted' {event_id, customer}; the succeeded 'customer' billing
--    attempts that created it are marked (billing_attempts.customer_deleted_at, new).
--    The account's succeeded checkout attempts are abandoned: their sessions were the
--    deleted customer's, so the next checkout neither expires them nor, finding one
--    paid, answers 409 checkout_completed (122) for a subscription that went with the
--    customer. The next checkout creates a new customer (billing_attempt_begin: the
--    account has none). Deleting a customer in Stripe also cancels its
--    subscriptions; their customer.subscription.deleted events take the instances
--    down as always.
-- 3. stripe_account_for: its fallback (the account through our succeeded creation of
--    the customer) still finds the account of a deleted customer, so that the
--    customer's late events are that account's, but no longer links it to the account
--    again.
--
-- Redefines public.stripe_event_kind (080_webhook_cost.sql): unchanged but for the
-- customer.deleted line. public.stripe_handle_event (080): unchanged but for the
-- declaration of v_cust and the WHEN 'customer' branch. public.stripe_account_for
-- (051_account_linking.sql): unchanged but for the declaration of v_gone and the
-- fallback's select and condition. Grants are as before (CREATE OR REPLACE keeps them).

-- Kind customer: when Stripe deleted the customer (the customer.deleted event's
-- created); such a customer is never linked to an account again.
ALTER TABLE public.billing_attempts ADD COLUMN customer_deleted_at timestamptz;

-- What the webhook does with an event type: 'subscription' (customer.subscription.*),
-- 'checkout' (checkout.session.completed), 'invoice' (invoice.paid,
-- invoice.payment_failed), 'customer' (customer.deleted), or NULL: recorded as
-- ignored. The one list.
CREATE OR REPLACE FUNCTION public.stripe_event_kind(p_type text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = ''
AS $$
BEGIN
    RETURN CASE
        WHEN p_type IN ('customer.subscription.created', 'customer.subscription.updated',
                        'customer.subscription.deleted', 'customer.subscription.paused',
                        'customer.subscription.resumed') THEN 'subscription'
        WHEN p_type = 'checkout.session.completed' THEN 'checkout'
        WHEN p_type IN ('invoice.paid', 'invoice.payment_failed') THEN 'invoice'
        WHEN p_type = 'customer.deleted' THEN 'customer'
    END;
END;
$$;

-- The account of a Stripe customer (051's rules); p_account_id is the event's claim,
-- or NULL. Raises MRW01 (deferred), MRW03 (no customer) or MRW04 (refused).
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
    v_gone   boolean;
BEGIN
    IF p_customer IS NULL OR p_customer = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'MRW03', MESSAGE = 'the event names no Stripe customer';
    END IF;
    IF p_account_id ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        v_claim := p_account_id::uuid;
    END IF;

    SELECT a.id INTO v_id FROM public.accounts a WHERE a.stripe_customer_id = p_customer;
    IF NOT FOUND THEN
        SELECT b.account_id, b.customer_deleted_at IS NOT NULL INTO v_id, v_gone
          FROM public.billing_attempts b
         WHERE b.kind = 'customer' AND b.status = 'succeeded' AND b.object_id = p_customer
         ORDER BY b.created_at, b.id LIMIT 1;
        -- A customer Stripe deleted still names its account (its late events are that
        -- account's) but is never its customer again (129).
        IF FOUND AND NOT v_gone THEN
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

-- Records and applies one event (010, 041, 051, 080), dispatching on stripe_event_kind.
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
