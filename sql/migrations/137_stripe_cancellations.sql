-- 137_stripe_cancellations.sql: deleting an account cancels its Stripe subscriptions.
--
-- Deleting an account (Supabase Auth, or DELETE FROM auth.users) cascades to its
-- subscriptions and instances; the instances' apps and data are torn down
-- (instance_teardowns, 060), but the subscription at Stripe stayed live and
-- Stripe kept charging a customer who no longer had an account or an instance
-- (its later events named nothing we know: deferred, then failed after 72 h).
--
-- Now the delete of a subscription row that is still live at Stripe records the
-- cancellation owed in stripe_cancellations, in the same transaction, where no
-- cascade reaches; the lifecycle worker's stripe-cancel job cancels it at once at
-- Stripe (DELETE /v1/subscriptions/{id}), with retries and backoff, and records
-- the outcome here and in audit_logs. A subscription Stripe no longer has (already
-- cancelled, or unknown) counts as done.
--
-- Two triggers write it. The delete cascades accounts -> subscriptions after the
-- account row is gone, so the subscription's own trigger cannot read the customer
-- any more: the account's delete trigger records its subscriptions first, with the
-- customer (for the operator, who finds it in Stripe's dashboard), and the
-- subscriptions' trigger, which also covers a subscription row deleted alone,
-- finds them recorded.
--
-- Stripe then sends customer.subscription.deleted (and maybe .updated before or
-- after it) for a subscription whose row and account are gone; taken for a new
-- subscription, it was refused (with our checkout's metadata.account_id naming the
-- deleted account: a security event, audited stripe.account_link_refused, logged at
-- error, counted by mindroomctl refused-links) or deferred for 72 h and then failed.
-- An event of a subscription that has no row and is recorded here is recorded
-- 'ignored' instead, whatever its type and whether our cancellation has run yet: it
-- creates no subscription row, links or refuses no account, asks for no instance.
-- The check costs one primary-key probe, made only when the subscription has no row.
--
-- The check is in public.stripe_apply_subscription, which the next migration
-- (138_operator_stop.sql) redefines with it, once for both (the IF v_sub_id IS NULL
-- block after the SELECT of the subscription row raises MRW05, before anything is
-- read or written). Here, redefined whole from its last definition and unchanged
-- but for the lines named (CREATE OR REPLACE, so its grants stay):
-- - public.stripe_handle_event (129_customer_deleted.sql): the WHEN SQLSTATE 'MRW05'
--   handler, which records the event 'ignored' with the reason in error (the
--   subtransaction's rollback undoes nothing: nothing was written).

CREATE TABLE public.stripe_cancellations (
    stripe_subscription_id text PRIMARY KEY,  -- subscriptions.stripe_subscription_id
    subscription_id    uuid,                  -- no foreign keys: the rows are gone
    account_id         uuid,
    stripe_customer_id text,                  -- NULL when the account was not linked
    status             public.subscription_status NOT NULL,  -- ours when the row went
    not_before         timestamptz NOT NULL DEFAULT now(),
    attempts           integer NOT NULL DEFAULT 0,
    last_error         text,
    done_at            timestamptz,
    outcome            text CHECK (outcome IN ('cancelled', 'not_found')),
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CHECK ((done_at IS NULL) = (outcome IS NULL))
);
CREATE INDEX stripe_cancellations_due_idx ON public.stripe_cancellations (not_before)
    WHERE done_at IS NULL;
CREATE TRIGGER stripe_cancellations_updated_at BEFORE UPDATE ON public.stripe_cancellations
    FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();
ALTER TABLE public.stripe_cancellations ENABLE ROW LEVEL SECURITY;
-- service_role too (Supabase's default privileges give it everything): it reads and
-- updates, only the delete triggers insert.
REVOKE ALL ON public.stripe_cancellations FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT, UPDATE ON public.stripe_cancellations TO service_role;
CREATE POLICY "Service role manages Stripe cancellations" ON public.stripe_cancellations
    FOR ALL TO service_role USING (true) WITH CHECK (true);

-- Records the cancellation of p_sub at Stripe, once, if Stripe still has it live:
-- every status but cancelled (Stripe's canceled) and incomplete_expired, the two
-- terminal ones (001_initial_schema.sql's subscription_status). Called by the two
-- triggers below, as their owner.
CREATE FUNCTION public.stripe_cancellation_record(p_sub public.subscriptions, p_customer text)
RETURNS void
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
    IF p_sub.stripe_subscription_id IS NULL
       OR p_sub.status IN ('cancelled', 'incomplete_expired') THEN
        RETURN;
    END IF;
    INSERT INTO public.stripe_cancellations (stripe_subscription_id, subscription_id, account_id,
                                             stripe_customer_id, status)
    VALUES (p_sub.stripe_subscription_id, p_sub.id, p_sub.account_id, p_customer, p_sub.status)
    ON CONFLICT (stripe_subscription_id) DO NOTHING;
    IF FOUND THEN
        -- No account_id: the account may be going in this very statement, and
        -- audit_logs refers to live accounts only.
        INSERT INTO public.audit_logs (account_id, action, details)
        VALUES (NULL, 'stripe.cancellation_requested', jsonb_build_object(
            'stripe_subscription_id', p_sub.stripe_subscription_id, 'subscription_id', p_sub.id,
            'account_id', p_sub.account_id, 'customer', p_customer, 'status', p_sub.status));
    END IF;
END;
$$;

-- SECURITY DEFINER, both: the delete may come from any role allowed to delete the
-- row (service_role, Supabase Auth deleting a user), none of which may write here.
CREATE FUNCTION public.accounts_record_stripe_cancellations()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    PERFORM public.stripe_cancellation_record(s, OLD.stripe_customer_id)
       FROM public.subscriptions s
      WHERE s.account_id = OLD.id;
    RETURN OLD;
END;
$$;

CREATE FUNCTION public.subscriptions_record_stripe_cancellation()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    PERFORM public.stripe_cancellation_record(OLD, (SELECT a.stripe_customer_id
                                                      FROM public.accounts a
                                                     WHERE a.id = OLD.account_id));
    RETURN OLD;
END;
$$;

CREATE TRIGGER accounts_record_stripe_cancellations BEFORE DELETE ON public.accounts
    FOR EACH ROW EXECUTE FUNCTION public.accounts_record_stripe_cancellations();
CREATE TRIGGER subscriptions_record_stripe_cancellation BEFORE DELETE ON public.subscriptions
    FOR EACH ROW EXECUTE FUNCTION public.subscriptions_record_stripe_cancellation();

-- The cancellations due now (the worker's stripe-cancel job), oldest first.
CREATE FUNCTION public.stripe_cancellations_due(p_limit integer)
RETURNS TABLE (stripe_subscription_id text, attempts integer)
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT c.stripe_subscription_id, c.attempts
      FROM public.stripe_cancellations c
     WHERE c.done_at IS NULL AND c.not_before <= now()
     ORDER BY c.not_before, c.stripe_subscription_id
     LIMIT greatest(p_limit, 0)
$$;

-- Records a cancellation's outcome: p_outcome 'cancelled' (Stripe cancelled it) or
-- 'not_found' (Stripe has no live subscription of that id: cancelled before, or
-- never there), both done and audited; NULL: it failed with p_error and is retried
-- after a backoff that doubles from p_base_s up to p_cap_s. Returns false when the
-- row is not owed (done meanwhile, or unknown).
CREATE FUNCTION public.stripe_cancellation_finish(p_stripe_subscription_id text, p_outcome text,
                                                  p_error text, p_base_s integer, p_cap_s integer)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    c public.stripe_cancellations;
BEGIN
    IF p_outcome IS NOT NULL AND p_outcome NOT IN ('cancelled', 'not_found') THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'outcome is cancelled, not_found or NULL';
    END IF;
    SELECT * INTO c FROM public.stripe_cancellations
     WHERE stripe_subscription_id = p_stripe_subscription_id AND done_at IS NULL FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF p_outcome IS NOT NULL THEN
        UPDATE public.stripe_cancellations
           SET done_at = now(), outcome = p_outcome, last_error = NULL, attempts = attempts + 1
         WHERE stripe_subscription_id = p_stripe_subscription_id;
        INSERT INTO public.audit_logs (account_id, action, details)
        VALUES (NULL, 'stripe.subscription_cancelled', jsonb_build_object(
            'stripe_subscription_id', c.stripe_subscription_id, 'subscription_id', c.subscription_id,
            'account_id', c.account_id, 'customer', c.stripe_customer_id, 'outcome', p_outcome));
    ELSE
        UPDATE public.stripe_cancellations
           SET attempts = attempts + 1, last_error = left(coalesce(p_error, 'failed'), 500),
               not_before = now() + make_interval(secs => least(
                   p_cap_s::double precision,
                   p_base_s::double precision * power(2, least(c.attempts, 30))))
         WHERE stripe_subscription_id = p_stripe_subscription_id;
    END IF;
    RETURN true;
END;
$$;

REVOKE ALL ON FUNCTION public.stripe_cancellation_record(public.subscriptions, text),
    public.accounts_record_stripe_cancellations(),
    public.subscriptions_record_stripe_cancellation()
    FROM PUBLIC, anon, authenticated, service_role;
REVOKE ALL ON FUNCTION public.stripe_cancellations_due(integer),
    public.stripe_cancellation_finish(text, text, text, integer, integer)
    FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.stripe_cancellations_due(integer),
    public.stripe_cancellation_finish(text, text, text, integer, integer) TO service_role;

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
