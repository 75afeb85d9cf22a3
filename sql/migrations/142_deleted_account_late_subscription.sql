-- 142_deleted_account_late_subscription.sql: a subscription Stripe makes for an
-- account after the account was deleted is cancelled at Stripe too.
--
-- Deleting an account owes the cancellation of the subscriptions it has rows for
-- (137_stripe_cancellations.sql). A subscription whose first event is applied only
-- after the deletion had no row then: a checkout paid in a session opened before
-- the deletion (Stripe keeps a session payable for 24 hours), or one paid just
-- before it whose event came after. Its events named an account that no longer
-- exists: refused (a security event, audited stripe.account_link_refused, logged at
-- error) or, without metadata, deferred for 72 h and then failed; nobody cancelled
-- it and Stripe charged the customer of a deleted account every period.
--
-- Now the delete of an account records it in deleted_account_customers, with each
-- Stripe customer it had (linked, or created by our checkout: billing_attempts), in
-- the same transaction. The first event of a subscription that has no row, whose
-- customer is no live account's and is such a customer or whose
-- metadata.account_id names such an account, records the cancellation owed
-- (stripe_cancellation_record's rule: only a subscription Stripe still has live),
-- creates no row and asks for no instance; the event is recorded processed, and
-- the subscription's later events are ignored as 137 ignores them. The
-- stripe-cancel job cancels it as it cancels the others.
--
-- Accounts deleted before this migration are known from the cancellations 137
-- recorded for them.
--
-- Redefines public.stripe_apply_subscription (138_operator_stop.sql) whole,
-- unchanged but for the IF after the status is decided (`IF v_sub_id IS NULL AND
-- public.stripe_deleted_account_subscription(...)`) and its comment. CREATE OR
-- REPLACE keeps its grants.

CREATE TABLE public.deleted_account_customers (
    account_id         uuid NOT NULL,    -- no foreign key: the account is gone
    stripe_customer_id text,             -- NULL: the account had no Stripe customer
    deleted_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE NULLS NOT DISTINCT (account_id, stripe_customer_id)
);
CREATE INDEX deleted_account_customers_customer_idx
    ON public.deleted_account_customers (stripe_customer_id) WHERE stripe_customer_id IS NOT NULL;
ALTER TABLE public.deleted_account_customers ENABLE ROW LEVEL SECURITY;
-- Only the functions below, as their owner, read or write it.
REVOKE ALL ON public.deleted_account_customers FROM PUBLIC, anon, authenticated, service_role;

INSERT INTO public.deleted_account_customers (account_id, stripe_customer_id)
SELECT DISTINCT c.account_id, c.stripe_customer_id FROM public.stripe_cancellations c
 WHERE c.account_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM public.accounts a WHERE a.id = c.account_id)
ON CONFLICT DO NOTHING;

-- The account's delete records it with its customers, before the cascade removes
-- its billing attempts. SECURITY DEFINER: whoever may delete the account.
CREATE FUNCTION public.accounts_record_deleted()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    INSERT INTO public.deleted_account_customers (account_id, stripe_customer_id)
    SELECT OLD.id, c.id
      FROM (SELECT OLD.stripe_customer_id
            UNION
            SELECT b.object_id FROM public.billing_attempts b
             WHERE b.account_id = OLD.id AND b.kind = 'customer' AND b.status = 'succeeded') AS c (id)
     WHERE c.id IS NOT NULL
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        INSERT INTO public.deleted_account_customers (account_id, stripe_customer_id)
        VALUES (OLD.id, NULL)
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN OLD;
END;
$$;
CREATE TRIGGER accounts_record_deleted BEFORE DELETE ON public.accounts
    FOR EACH ROW EXECUTE FUNCTION public.accounts_record_deleted();

-- Whether the new subscription p_stripe_subscription_id (it has no row) is a deleted
-- account's: its customer is no live account's, and it is a deleted account's
-- customer or p_claim (metadata.account_id) names a deleted account. If so, its
-- cancellation is recorded (stripe_cancellation_record: only while Stripe still has
-- it live). Called by stripe_apply_subscription under the subscription's lock.
-- SECURITY DEFINER: the webhook's role may neither read deleted_account_customers
-- nor write stripe_cancellations.
CREATE FUNCTION public.stripe_deleted_account_subscription(
    p_stripe_subscription_id text, p_customer text, p_claim text,
    p_status public.subscription_status)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_claim uuid;
    v_sub public.subscriptions;
BEGIN
    IF p_claim ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        v_claim := p_claim::uuid;
    END IF;
    SELECT d.account_id INTO v_sub.account_id FROM public.deleted_account_customers d
     WHERE d.stripe_customer_id = p_customer OR d.account_id = v_claim
     ORDER BY d.stripe_customer_id = p_customer DESC NULLS LAST, d.deleted_at DESC
     LIMIT 1;
    IF NOT FOUND OR EXISTS (SELECT 1 FROM public.accounts a WHERE a.stripe_customer_id = p_customer) THEN
        RETURN false;
    END IF;
    v_sub.stripe_subscription_id := p_stripe_subscription_id;
    v_sub.status := p_status;
    PERFORM public.stripe_cancellation_record(v_sub, p_customer);
    RETURN true;
END;
$$;

REVOKE ALL ON FUNCTION public.accounts_record_deleted() FROM PUBLIC, anon, authenticated, service_role;
REVOKE ALL ON FUNCTION public.stripe_deleted_account_subscription(text, text, text, public.subscription_status)
    FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.stripe_deleted_account_subscription(text, text, text, public.subscription_status)
    TO service_role;

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
    v_inst_held boolean;
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

    -- A new subscription of an account deleted before its first event: its
    -- cancellation at Stripe is owed (one probe of deleted_account_customers, only
    -- for a subscription without a row), and nothing else is recorded.
    IF v_sub_id IS NULL AND public.stripe_deleted_account_subscription(
           v_stripe_id, public.stripe_id(v_obj -> 'customer'), v_obj #>> '{metadata,account_id}',
           v_status) THEN
        RETURN;
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
    SELECT i.id, i.desired_status, i.owed_action, i.operator_stopped_at IS NOT NULL
      INTO v_inst_id, v_inst_want, owed, v_inst_held
      FROM public.instances i
     WHERE i.subscription_id = v_sub_id AND i.status <> 'deprovisioned';
    IF v_desired = 'running' AND v_inst_id IS NULL THEN
        SELECT * INTO v_names FROM public.instance_names(v_sub_id);
        -- Memory and CPU come from the plan (trigger, 004).
        INSERT INTO public.instances AS i (
            subscription_id, dokku_app_name, subdomain, status, desired_status)
        VALUES (v_sub_id, v_names.dokku_app_name, v_names.subdomain, 'provisioning', 'running')
        RETURNING i.id, i.owed_action INTO v_inst_id, owed;
    -- An operator's stop holds until the operator provisions again: billing that
    -- keeps the subscription running does not resume it (its plan still sizes it,
    -- above); billing that ends it still destroys it.
    ELSIF v_desired IS NOT NULL AND v_inst_id IS NOT NULL
          AND v_inst_want IS DISTINCT FROM v_desired
          AND NOT (v_inst_held AND v_desired = 'running') THEN
        SELECT q.owed_action INTO owed FROM public.instance_request(v_inst_id, v_desired) q;
    END IF;
    instance_id := v_inst_id;
END;
$$;
