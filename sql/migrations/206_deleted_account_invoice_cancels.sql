-- 206_deleted_account_invoice_cancels.sql: an invoice of a deleted account's customer
-- has its subscription cancelled at Stripe, also one the database never recorded.
--
-- An account's deletion cancels at Stripe the subscriptions it has rows for (137). A
-- subscription whose first event was recorded failed (a price the catalogue lacked,
-- or an event deferred past STRIPE_DEFER_MAX_HOURS) has none: the customer deleted the
-- account and Stripe went on billing it every period, each invoice.paid recorded on no
-- account (180) and nothing else. Now such an invoice records its subscription's
-- cancellation (stripe_deleted_account_subscription, as a subscription event of a
-- deleted account does, 159): once per subscription (ON CONFLICT DO NOTHING), and one
-- Stripe cancelled already answers 404, which the worker counts as done.
--
-- Redefines public.stripe_handle_event (202_resubscribed_while_removed.sql) whole and
-- unchanged but for the WHEN 'invoice' branch. CREATE OR REPLACE keeps its grants.

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
    v_code     text;
    v_state    text;
    v_detail   text;
    v_refusal  jsonb;
    v_account  uuid;
    v_ref      text;
    v_stripe_sub text;
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
                -- An invoice of a deleted account's customer (the last period's, a
                -- proration, a payment retried after the deletion) is recorded on no
                -- account, with its customer, and its subscription is to be cancelled
                -- at Stripe (stripe_cancellations: once; one cancelled already is
                -- Stripe's 404, done): the deletion cancelled only the subscriptions
                -- it had rows for, and one whose first event failed has none. One of a
                -- customer not known yet (its checkout's link still on its way) is
                -- deferred as before.
                v_cust := public.stripe_id(v_obj -> 'customer');
                v_stripe_sub := public.stripe_id(coalesce(v_obj -> 'subscription',
                                                          v_obj #> '{parent,subscription_details,subscription}'));
                BEGIN
                    v_account := public.stripe_account_for(v_cust, NULL);
                EXCEPTION WHEN SQLSTATE 'MRW01' THEN
                    IF NOT public.stripe_deleted_account_subscription(
                               v_stripe_sub, v_cust, NULL,
                               CASE WHEN v_type = 'invoice.paid' THEN 'active'
                                    ELSE 'past_due' END::public.subscription_status) THEN
                        RAISE;
                    END IF;
                    v_account := NULL;
                END;
                INSERT INTO public.audit_logs (account_id, action, details)
                VALUES (v_account, 'stripe.' || v_type, jsonb_build_object(
                    'event_id', v_id,
                    'customer', v_cust,
                    'invoice_id', v_obj ->> 'id',
                    'subscription', v_stripe_sub,
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
                v_code := 'account_not_found';
            -- The instance's names are still held (the account's earlier instance
            -- being destroyed, another subscription's live instance or kept data under
            -- the same names): applied again once they are free.
            WHEN unique_violation THEN
                GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT;
                v_result := 'deferred';
                v_code := 'instance_names_taken';
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
           || CASE WHEN v_result = 'deferred' THEN jsonb_build_object('code', v_code)
                   ELSE '{}'::jsonb END
           || CASE WHEN v_result = 'refused'
                   THEN jsonb_build_object('customer', v_refusal -> 'customer',
                                           'claimed_account', v_refusal -> 'claimed_account')
                   ELSE '{}'::jsonb END;
END;
$$;
