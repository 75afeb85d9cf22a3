-- 128_subscription_items.sql: a subscription's plan is the highest plan among its
-- items, not whatever item Stripe lists first.
--
-- stripe_apply_subscription took the price of items.data[0]. Stripe does not order a
-- subscription's items, and an operator may add a second price to one: an add-on the
-- catalogue does not know, or a bigger plan. With the add-on listed first, every event
-- that keeps the subscription running failed (MRW02, unknown price) and the customer
-- who paid got no instance; [starter, enterprise] was sized as starter. Now, when a
-- subscription has more than one item, the plan is the one of highest tier among the
-- items whose price is in public.plans (subscription_tier is ordered; ties go to the
-- lowest price id), and its price is what the subscription records. Only when no item
-- is a plan does the price come from the first item (or the legacy `plan`), with 121's
-- rules for a price the catalogue lacks. A subscription of one item (nearly all) costs
-- what it did and one look for a second item's price: one lookup of its price by
-- primary key, no copy of or pass over the items.
--
-- Redefines public.stripe_apply_subscription (121_unknown_price_ends.sql): unchanged
-- but for the choice of v_price and v_tier (the
-- multi-item query before the first item's lookup, which now runs only when that query
-- found no plan).

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
