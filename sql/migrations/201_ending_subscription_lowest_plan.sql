-- 201_ending_subscription_lowest_plan.sql: a subscription first seen ending (or
-- not running) with a price the catalogue lacks is recorded under the lowest tier
-- that has a plan, not under 'free' whether or not a plan of that tier exists.
--
-- public.stripe_apply_subscription (121, last 189) applies a cancellation, a pause or
-- an unpaid subscription whatever its price, so that an unknown price never loses
-- it: a subscription it has a row for keeps its recorded plan, one it has none for
-- got the tier 'free'. The row's plan trigger (apply_plan_limits, 004) needs a plan
-- of that tier, and only the local seed has one: production's catalogue holds the
-- tiers it sells (docs/billing.md). There the insert raised 23514 "no plan for tier
-- free", the webhook answered 400 and recorded nothing, and Stripe delivered it again
-- until it gave up: a subscription's cancellation that arrived before its delayed
-- creation was lost, and the creation then started an instance for a subscription
-- Stripe had cancelled; a subscription made in Stripe's Dashboard with a price of its
-- own, first seen paused or unpaid, was never recorded. Now the row gets the lowest
-- tier of the catalogue ('free' where it has one, as before); nothing runs for it,
-- so its limits are never used.
--
-- Redefines public.stripe_apply_subscription (189_stripe_cancel_at.sql), whole and
-- unchanged but for that one assignment. CREATE OR REPLACE keeps its grants.

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
    v_cancel_at timestamptz;
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
            -- (first seen ending: the lowest tier the catalogue has; nothing runs for
            -- it), so that a cancellation is never lost to a price the catalogue lacks,
            -- nor undone by an older event that arrives after it.
            IF public.instance_desired_for(v_status) IS DISTINCT FROM 'running' THEN
                IF v_sub_id IS NOT NULL THEN
                    SELECT s.stripe_price_id, s.tier INTO v_price, v_tier
                      FROM public.subscriptions s WHERE s.id = v_sub_id;
                ELSE
                    SELECT p.tier INTO v_tier FROM public.plans p
                     ORDER BY p.tier, p.created_at, p.stripe_price_id LIMIT 1;
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
    -- When Stripe will end it, if it is set to end. Flexible billing mode (the default
    -- for new subscriptions in recent API versions) says a cancellation at the
    -- period's end, the customer portal's among them, only as cancel_at (a Unix time:
    -- the period's end, or any date the merchant set) with cancel_at_period_end false;
    -- a renewal sets it back to null. An object that says only cancel_at_period_end
    -- ends at its period's end.
    v_cancel_at := coalesce(pg_catalog.to_timestamp((v_obj ->> 'cancel_at')::bigint),
                            CASE WHEN (v_obj ->> 'cancel_at_period_end')::boolean THEN v_period END);

    IF v_sub_id IS NULL THEN
        v_account := public.stripe_account_for(public.stripe_id(v_obj -> 'customer'),
                                               v_obj #>> '{metadata,account_id}');
        INSERT INTO public.subscriptions AS s (
            account_id, stripe_subscription_id, stripe_price_id, tier, status,
            trial_ends_at, current_period_end, cancelled_at, cancel_at_period_end, cancel_at,
            last_event_created, last_event_id)
        VALUES (v_account, v_stripe_id, v_price, v_tier, v_status,
                pg_catalog.to_timestamp((v_obj ->> 'trial_end')::bigint), v_period,
                pg_catalog.to_timestamp((v_obj ->> 'canceled_at')::bigint),
                coalesce((v_obj ->> 'cancel_at_period_end')::boolean, false), v_cancel_at,
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
            cancel_at            = v_cancel_at,
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
