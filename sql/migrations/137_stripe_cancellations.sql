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
-- Redefines, each whole from its last definition and unchanged but for the lines
-- named (CREATE OR REPLACE, so their grants stay):
-- - public.stripe_apply_subscription (128_subscription_items.sql): the IF v_sub_id
--   IS NULL block, with its comment, after the SELECT of the subscription row: it
--   raises MRW05 when stripe_cancellations has the subscription, before anything is
--   read or written (so before the price or the account is checked).
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

CREATE OR REPLACE FUNCTION public.stripe_apply_subscription(
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
    v_tier      public.subscription_tier;
    v_account   uuid;
    v_period    timestamptz;
    v_sub_id    uuid;
    v_sub_last  timestamptz;
    v_sub_lastid text;
    v_last      record;
    v_inst_id   uuid;
    v_inst_want public.instance_status;
    v_names     record;
    v_desired   public.instance_status;
BEGIN
    stale := false;
    IF v_stripe_id IS NULL OR v_stripe_id = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'MRW03', MESSAGE = 'subscription object without id';
    END IF;

    -- Every event of one subscription is serialized by this lock, including the two
    -- that might otherwise both try to create its row. The row lock keeps
    -- provision-instance's requests (FOR UPDATE) out meanwhile; the worker's
    -- foreign-key checks (FOR KEY SHARE) do not wait for it.
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(v_stripe_id, 4242));
    SELECT s.id, s.last_event_created, s.last_event_id INTO v_sub_id, v_sub_last, v_sub_lastid
      FROM public.subscriptions s
     WHERE s.stripe_subscription_id = v_stripe_id FOR NO KEY UPDATE;

    -- A subscription with no row that was deleted on purpose (with its account)
    -- is not new: its events (our own cancellation's among them) are ignored.
    IF v_sub_id IS NULL AND EXISTS (SELECT 1 FROM public.stripe_cancellations c
                                     WHERE c.stripe_subscription_id = v_stripe_id) THEN
        RAISE EXCEPTION USING ERRCODE = 'MRW05',
            MESSAGE = 'ignored: its subscription was deleted with its account and is cancelled at Stripe by us';
    END IF;

    -- Ordering: compare with the last applied event before validating anything else,
    -- so that a stale event changes nothing, not even the account link.
    IF FOUND AND v_sub_last IS NOT NULL THEN
        IF p_created < v_sub_last THEN
            stale := true;
        ELSIF p_created = v_sub_last THEN
            SELECT e.type, e.payload -> 'data' -> 'object' ->> 'status' AS st
              INTO v_last FROM public.stripe_events e WHERE e.id = v_sub_lastid;
            IF (public.stripe_event_rank(p_type, v_stripe_st), p_event_id)
               <= (public.stripe_event_rank(v_last.type, v_last.st), v_sub_lastid) THEN
                stale := true;
            END IF;
        END IF;
        IF stale THEN
            subscription_id := v_sub_id;
            RETURN;
        END IF;
    END IF;

    v_status := public.stripe_subscription_status(v_stripe_st);
    -- deleted always means canceled, whatever status the payload carries.
    IF p_type = 'customer.subscription.deleted' THEN
        v_status := 'cancelled';
    END IF;

    -- The plan: among several items (a plan and an add-on, or two plans, in no order
    -- Stripe promises), the highest tier whose price is a plan. One item, or no item a
    -- plan: the first item's price (or the legacy `plan`), looked up as it is.
    IF v_obj #>> '{items,data,1,price,id}' IS NOT NULL
       AND jsonb_typeof(v_obj #> '{items,data}') = 'array' THEN
        SELECT p.stripe_price_id, p.tier INTO v_price, v_tier
          FROM jsonb_array_elements(v_obj #> '{items,data}') AS it
          JOIN public.plans p ON p.stripe_price_id = it #>> '{price,id}'
         ORDER BY p.tier DESC, p.stripe_price_id
         LIMIT 1;
    END IF;
    IF v_price IS NULL THEN
        v_price := coalesce(v_obj #>> '{items,data,0,price,id}', v_obj #>> '{plan,id}');
        SELECT p.tier INTO v_tier FROM public.plans p WHERE p.stripe_price_id = v_price;
        IF NOT FOUND THEN
            -- A subscription that stops or ends needs no plan: it keeps the one recorded
            -- (first seen ending: the lowest tier; nothing runs for it), so that a
            -- cancellation is never lost to a price the catalogue lacks, nor undone by an
            -- older event that arrives after it.
            IF public.instance_desired_for(v_status) IS DISTINCT FROM 'running' THEN
                IF v_sub_id IS NOT NULL THEN
                    SELECT s.stripe_price_id, s.tier INTO v_price, v_tier
                      FROM public.subscriptions s WHERE s.id = v_sub_id;
                ELSE
                    v_tier := 'free';
                END IF;
            ELSE
                RAISE EXCEPTION USING ERRCODE = 'MRW02', MESSAGE = 'unknown price: no plan has this price id';
            END IF;
        END IF;
    END IF;

    -- Before API version 2025-03-31 the period end is on the subscription; since, on
    -- each item.
    v_period := coalesce(pg_catalog.to_timestamp((v_obj ->> 'current_period_end')::bigint),
                         (SELECT pg_catalog.to_timestamp(max((it ->> 'current_period_end')::bigint))
                            FROM jsonb_array_elements(
                                 CASE WHEN jsonb_typeof(v_obj #> '{items,data}') = 'array'
                                      THEN v_obj #> '{items,data}' ELSE '[]'::jsonb END) AS it));

    IF v_sub_id IS NULL THEN
        v_account := public.stripe_account_for(public.stripe_id(v_obj -> 'customer'),
                                               v_obj #>> '{metadata,account_id}');
        INSERT INTO public.subscriptions AS s (
            account_id, stripe_subscription_id, stripe_price_id, tier, status,
            trial_ends_at, current_period_end, cancelled_at, cancel_at_period_end,
            last_event_created, last_event_id)
        VALUES (v_account, v_stripe_id, v_price, v_tier, v_status,
                pg_catalog.to_timestamp((v_obj ->> 'trial_end')::bigint), v_period,
                pg_catalog.to_timestamp((v_obj ->> 'canceled_at')::bigint),
                coalesce((v_obj ->> 'cancel_at_period_end')::boolean, false),
                p_created, p_event_id)
        RETURNING s.id INTO v_sub_id;
    ELSE
        UPDATE public.subscriptions AS s SET
            stripe_price_id      = v_price,
            tier                 = v_tier,
            status               = v_status,
            trial_ends_at        = pg_catalog.to_timestamp((v_obj ->> 'trial_end')::bigint),
            current_period_end   = v_period,
            cancelled_at         = pg_catalog.to_timestamp((v_obj ->> 'canceled_at')::bigint),
            cancel_at_period_end = coalesce((v_obj ->> 'cancel_at_period_end')::boolean, false),
            last_event_created   = p_created,
            last_event_id        = p_event_id
        WHERE s.id = v_sub_id;
    END IF;
    subscription_id := v_sub_id;

    -- The instance consequence, as intent. A new price reaches the instance's limits
    -- through the plan triggers (004), which makes an update owed. The row is read
    -- without a lock: what it is asked to become (desired_status) changes only under
    -- this subscription's lock or the instance's own, and instance_request's UPDATE
    -- re-checks the row it writes; an event that asks nothing new writes nothing.
    v_desired := public.instance_desired_for(v_status);
    SELECT i.id, i.desired_status, i.owed_action INTO v_inst_id, v_inst_want, owed
      FROM public.instances i
     WHERE i.subscription_id = v_sub_id AND i.status <> 'deprovisioned';
    IF v_desired = 'running' AND v_inst_id IS NULL THEN
        SELECT * INTO v_names FROM public.instance_names(v_sub_id);
        -- Memory and CPU come from the plan (trigger, 004).
        INSERT INTO public.instances AS i (
            subscription_id, dokku_app_name, subdomain, status, desired_status)
        VALUES (v_sub_id, v_names.dokku_app_name, v_names.subdomain, 'provisioning', 'running')
        RETURNING i.id, i.owed_action INTO v_inst_id, owed;
    ELSIF v_desired IS NOT NULL AND v_inst_id IS NOT NULL
          AND v_inst_want IS DISTINCT FROM v_desired THEN
        SELECT q.owed_action INTO owed FROM public.instance_request(v_inst_id, v_desired) q;
    END IF;
    instance_id := v_inst_id;
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
