-- 176_charge_events.sql: refunds and disputes are recorded in the audit log, not
-- ignored.
--
-- A dispute (a chargeback) must be answered in Stripe before its evidence is due, or
-- it is lost; a refund gives a customer's money back. Both were recorded in
-- stripe_events as ignored, so neither the operator's alerts nor an account's history
-- showed them.
--
-- - stripe_event_kind: charge.refunded, charge.dispute.created and charge.dispute.closed
--   are of kind 'charge';
-- - stripe_handle_event: an event of kind 'charge' appends one audit_logs row and
--   changes nothing else. 'stripe.charge.refunded' {event_id, charge_id, customer,
--   payment_intent, amount, amount_refunded, currency, refunded} on the account of the
--   charge's customer when it is ours, else on none (never deferred);
--   'stripe.charge.dispute.created' / '.closed' {event_id, dispute_id, charge_id,
--   payment_intent, amount, currency, reason, status, evidence_due_by} on none: a
--   dispute names no customer.
--
-- - audit_logs_dispute_idx (new, partial): the disputes' rows, for `mindroomctl
--   disputes` (the audit log is not indexed by action, and disputes are few).
--
-- Events of these types recorded before this migration stay ignored (a redelivery is
-- a duplicate). Redefines public.stripe_event_kind (129_customer_deleted.sql):
-- unchanged but for the 'charge' line. public.stripe_handle_event
-- (137_stripe_cancellations.sql): unchanged but for the WHEN 'charge' branch. Grants
-- are as before (CREATE OR REPLACE keeps them).

CREATE INDEX audit_logs_dispute_idx ON public.audit_logs ((details ->> 'dispute_id'))
    WHERE action IN ('stripe.charge.dispute.created', 'stripe.charge.dispute.closed');

-- What the webhook does with an event type: 'subscription' (customer.subscription.*),
-- 'checkout' (checkout.session.completed), 'invoice' (invoice.paid,
-- invoice.payment_failed), 'customer' (customer.deleted), 'charge' (charge.refunded,
-- charge.dispute.created, charge.dispute.closed), or NULL: recorded as ignored. The one
-- list.
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
        WHEN p_type IN ('charge.refunded', 'charge.dispute.created', 'charge.dispute.closed')
            THEN 'charge'
    END;
END;
$$;

-- Records and applies one event (010, 041, 051, 080, 129, 137), dispatching on
-- stripe_event_kind.
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

            WHEN 'charge' THEN
                -- Money that went back: an audit row, nothing else changes. A refund
                -- (the event's object is the charge) is its customer's account's when
                -- that customer is ours; a dispute names its charge but no customer, so
                -- its row names no account (the operator's, found by its action).
                -- Neither is deferred: a charge of a customer that is not ours (one
                -- paid without a customer, or another product's on the same Stripe
                -- account) is recorded without an account rather than retried.
                IF v_type = 'charge.refunded' THEN
                    v_cust := nullif(public.stripe_id(v_obj -> 'customer'), '');
                    IF v_cust IS NOT NULL THEN
                        BEGIN
                            v_account := public.stripe_account_for(v_cust, NULL);
                        EXCEPTION WHEN SQLSTATE 'MRW01' THEN
                            v_account := NULL;
                        END;
                    END IF;
                    INSERT INTO public.audit_logs (account_id, action, details)
                    VALUES (v_account, 'stripe.charge.refunded', jsonb_build_object(
                        'event_id', v_id,
                        'charge_id', v_obj ->> 'id',
                        'customer', v_cust,
                        'payment_intent', public.stripe_id(v_obj -> 'payment_intent'),
                        'amount', v_obj -> 'amount',
                        'amount_refunded', v_obj -> 'amount_refunded',
                        'currency', v_obj -> 'currency',
                        'refunded', v_obj -> 'refunded'));
                ELSE
                    INSERT INTO public.audit_logs (account_id, action, details)
                    VALUES (NULL, 'stripe.' || v_type, jsonb_build_object(
                        'event_id', v_id,
                        'dispute_id', v_obj ->> 'id',
                        'charge_id', public.stripe_id(v_obj -> 'charge'),
                        'payment_intent', public.stripe_id(v_obj -> 'payment_intent'),
                        'amount', v_obj -> 'amount',
                        'currency', v_obj -> 'currency',
                        'reason', v_obj -> 'reason',
                        'status', v_obj -> 'status',
                        'evidence_due_by', v_obj #> '{evidence_details,due_by}'));
                END IF;
                v_result := 'processed';
            END CASE;
        EXCEPTION
            WHEN SQLSTATE 'MRW01' THEN
                GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT;
                v_result := 'deferred';
            WHEN SQLSTATE 'MRW05' THEN
                GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT;
                v_result := 'ignored';
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
