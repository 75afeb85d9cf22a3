-- 189_stripe_cancel_at.sql: a cancellation made in Stripe's customer portal is seen:
-- my-instance says when the subscription ends.
--
-- Stripe's flexible billing mode (billing_mode.type = flexible, the default for new
-- subscriptions in recent API versions) says a cancellation "at the period's end",
-- made in the customer portal or through the API, only as `cancel_at` (a Unix time:
-- the period's end, or any date the merchant set) with `cancel_at_period_end: false`;
-- renewing it sets `cancel_at` back to null. Only cancel_at_period_end was recorded,
-- so a customer who cancelled in the portal saw nothing in my-instance: no notice
-- that the subscription ends, and cancel_at_period_end false.
--
-- - subscriptions.cancel_at: when Stripe will end the subscription, if it is set to
--   end: the object's `cancel_at`, else its period's end (current_period_end) when it
--   says only cancel_at_period_end, else NULL. cancel_at_period_end stays as Stripe
--   says it. Rows recorded before are filled from their last applied event. The
--   tenant reads it as every column of its own subscriptions (002's table grant).
-- - public.stripe_apply_subscription records it on insert and on update (a stale
--   event changes nothing, as before).
-- - public.tenant_instance_notice: a subscription set to end (cancel_at, or
--   cancel_at_period_end) gets `ends_at_period_end` with the date it ends (cancel_at,
--   else current_period_end). And a destroyed instance whose customer has subscribed
--   again and whose new subscription's first payment is still processing (incomplete,
--   no instance yet) gets `payment_processing`, no longer `data_kept` ("subscribe again
--   before ..."). Two arguments are added, last and defaulting to NULL: cancel_at, and
--   the status of the account's subscription without an instance (for a destroyed
--   instance). Adding arguments makes a new function: the old one is dropped, the
--   grants given again.
-- - public.tenant_subscription_without_instance(account): the one query for "the
--   account's subscription without an instance" (one still processing first, else
--   the newest), which tenant_no_instance_notice (185) had inline and tenant_instance
--   now asks too.
--
-- Redefines, each whole and unchanged but for the lines named:
-- public.stripe_apply_subscription (142_deleted_account_late_subscription.sql: cancel_at
-- computed and written), public.tenant_instance_notice (184_tenant_notice.sql: the two
-- arguments, the first branch, the ends branch), public.tenant_instance (184: the
-- notice's two arguments, the subscription's "cancel_at") and
-- public.tenant_no_instance_notice (185: its query is the new function). CREATE OR
-- REPLACE keeps their grants.

ALTER TABLE public.subscriptions ADD COLUMN cancel_at timestamptz;

UPDATE public.subscriptions s
   SET cancel_at = v.cancel_at
  FROM (SELECT x.id, coalesce(
               (SELECT pg_catalog.to_timestamp((e.payload #>> '{data,object,cancel_at}')::bigint)
                  FROM public.stripe_events e
                 WHERE e.id = x.last_event_id
                   AND jsonb_typeof(e.payload #> '{data,object,cancel_at}') = 'number'),
               CASE WHEN x.cancel_at_period_end THEN x.current_period_end END) AS cancel_at
          FROM public.subscriptions x) v
 WHERE v.id = s.id AND v.cancel_at IS NOT NULL;

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

DROP FUNCTION public.tenant_instance_notice(public.instance_status, public.instance_status,
    timestamptz, boolean, public.lifecycle_action, timestamptz, timestamptz,
    public.subscription_status, boolean, timestamptz, timestamptz);

CREATE FUNCTION public.tenant_instance_notice(
    p_status public.instance_status, p_desired public.instance_status,
    p_provisioned_at timestamptz, p_held boolean, p_owed public.lifecycle_action,
    p_storage_destroy_after timestamptz, p_storage_destroyed_at timestamptz,
    p_sub_status public.subscription_status, p_cancel_at_period_end boolean,
    p_period_end timestamptz, p_trial_ends_at timestamptz,
    p_cancel_at timestamptz DEFAULT NULL, p_new_sub_status public.subscription_status DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = ''
AS $$
DECLARE
    v_code text;
    v_msg text;
    v_is text := CASE WHEN p_status = 'stopped' THEN 'is stopped' ELSE 'is being stopped' END;
BEGIN
    IF p_status IS NULL AND p_sub_status = 'incomplete'
       OR p_status = 'deprovisioned' AND p_new_sub_status = 'incomplete' THEN
        -- No instance (tenant_no_instance_notice), or a destroyed one whose customer has
        -- subscribed again (186 gives the new instance its data if it is kept): a first
        -- payment still processing is what the customer waits for.
        v_code := 'payment_processing';
        v_msg := 'Your first payment is still processing (a bank debit takes a few days to clear): '
                 || 'your instance is created as soon as it clears.';
    ELSIF p_status IS NULL THEN
        -- No instance: only a first payment that has not gone through explains that.
        IF p_sub_status = 'incomplete_expired' THEN
            v_code := 'payment_not_completed';
            v_msg := 'Your first payment did not complete, so no instance was created: '
                     || 'subscribe again to get one.';
        END IF;
    ELSIF p_status = 'deprovisioned' THEN
        IF p_storage_destroyed_at IS NOT NULL THEN
            v_code := 'data_deleted';
            v_msg := 'This instance was removed and its data deleted.';
        ELSIF p_owed = 'destroy_storage' AND p_storage_destroy_after > now() THEN
            -- Kept for the account: a new subscription's instance takes it back (186).
            v_code := 'data_kept';
            v_msg := 'This instance was removed. Its data is kept until '
                     || to_char(p_storage_destroy_after AT TIME ZONE 'UTC', 'YYYY-MM-DD')
                     || ' (UTC): subscribe again before then and your new instance gets it back.';
        ELSE
            v_code := 'removed';
            v_msg := 'This instance was removed.';
        END IF;
    ELSIF p_status = 'deprovisioning' OR p_desired = 'deprovisioned' THEN
        v_code := 'being_removed';
        v_msg := CASE WHEN p_sub_status IN ('cancelled', 'incomplete_expired')
                      THEN 'Your subscription has ended: your instance is being removed. Its data is kept for a while after.'
                      ELSE 'Your instance is being removed.' END;
    ELSIF p_desired = 'stopped' THEN
        IF p_sub_status = 'unpaid' THEN
            v_code := 'unpaid';
            v_msg := 'Your instance ' || v_is || ': your subscription is unpaid. '
                     || 'Update your payment method and it starts again, with its data.';
        ELSIF p_sub_status = 'paused' THEN
            v_code := 'paused';
            v_msg := 'Your instance ' || v_is || ': your subscription is paused. '
                     || 'Resume it and your instance starts again, with its data.';
        ELSIF public.is_entitled(p_sub_status) THEN
            -- Billing wants an entitled subscription's instance running: this stop is
            -- an operator's, and only an operator ends it.
            v_code := 'stopped_by_operator';
            v_msg := 'Your instance ' || v_is || ' by MindRoom''s operators: '
                     || 'contact support to have it started again. Its data is kept.';
        ELSE
            v_code := 'stopped';
            v_msg := 'Your instance ' || v_is || '.';
        END IF;
    ELSIF p_status = 'provisioning' AND p_provisioned_at IS NULL THEN
        v_code := 'being_created';
        v_msg := 'Your instance is being created: this takes a few minutes.';
    ELSIF p_status IN ('provisioning', 'stopped') THEN
        v_code := 'starting';
        v_msg := 'Your instance is starting.';
    ELSIF p_status = 'failed' THEN
        v_code := 'failed';
        v_msg := CASE WHEN p_held THEN 'Your instance is not running: it waits for MindRoom''s operators.'
                      ELSE 'Your instance is not running: it is set up again automatically.' END;
    ELSIF p_sub_status = 'past_due' THEN
        v_code := 'payment_failed';
        v_msg := 'Your last payment failed: update your payment method to keep your instance running.';
    ELSIF p_cancel_at_period_end OR p_cancel_at IS NOT NULL THEN
        v_code := 'ends_at_period_end';
        v_msg := 'Your subscription ends '
                 || coalesce('on ' || to_char(coalesce(p_cancel_at, p_period_end) AT TIME ZONE 'UTC',
                                              'YYYY-MM-DD') || ' (UTC)',
                             'at the end of its period')
                 || ': your instance runs until then.';
    ELSIF p_sub_status = 'trialing' AND p_trial_ends_at IS NOT NULL THEN
        v_code := 'trial';
        v_msg := 'Your trial ends on '
                 || to_char(p_trial_ends_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') || ' (UTC).';
    END IF;
    RETURN CASE WHEN v_code IS NOT NULL
                THEN jsonb_build_object('code', v_code, 'message', v_msg) END;
END;
$$;

REVOKE ALL ON FUNCTION public.tenant_instance_notice(public.instance_status, public.instance_status,
    timestamptz, boolean, public.lifecycle_action, timestamptz, timestamptz,
    public.subscription_status, boolean, timestamptz, timestamptz,
    timestamptz, public.subscription_status) FROM PUBLIC, anon;
GRANT EXECUTE ON FUNCTION public.tenant_instance_notice(public.instance_status, public.instance_status,
    timestamptz, boolean, public.lifecycle_action, timestamptz, timestamptz,
    public.subscription_status, boolean, timestamptz, timestamptz,
    timestamptz, public.subscription_status) TO authenticated, service_role;

-- The status of p_account's subscription that has no instance: one whose first payment
-- is still processing first, else the newest; NULL when it has none. Runs as the
-- caller: a tenant sees its own rows only.
CREATE FUNCTION public.tenant_subscription_without_instance(p_account uuid)
RETURNS public.subscription_status
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT s.status
      FROM public.subscriptions s
     WHERE s.account_id = p_account
       AND NOT EXISTS (SELECT 1 FROM public.instances i WHERE i.subscription_id = s.id)
     ORDER BY (s.status = 'incomplete') DESC, s.created_at DESC, s.id
     LIMIT 1
$$;

REVOKE ALL ON FUNCTION public.tenant_subscription_without_instance(uuid) FROM PUBLIC, anon;
GRANT EXECUTE ON FUNCTION public.tenant_subscription_without_instance(uuid) TO authenticated, service_role;

CREATE OR REPLACE FUNCTION public.tenant_no_instance_notice()
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
DECLARE
    v_uid uuid := (SELECT auth.uid());
BEGIN
    IF v_uid IS NULL THEN
        RAISE EXCEPTION 'a signed-in user''s call' USING ERRCODE = '42501';
    END IF;
    -- The account test keeps RLS's answer for a caller that bypasses RLS.
    RETURN public.tenant_instance_notice(NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                                         public.tenant_subscription_without_instance(v_uid),
                                         NULL, NULL, NULL);
END;
$$;

CREATE OR REPLACE FUNCTION public.tenant_instance(p_instance_id uuid)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
DECLARE
    v_uid uuid := (SELECT auth.uid());
    v_id uuid;
    v jsonb;
BEGIN
    IF v_uid IS NULL THEN
        RAISE EXCEPTION 'a signed-in user''s call' USING ERRCODE = '42501';
    END IF;
    -- RLS shows a tenant its own rows only; the account test keeps that true for a
    -- caller that bypasses RLS.
    SELECT i.id INTO v_id
      FROM public.instances i JOIN public.subscriptions s ON s.id = i.subscription_id
     WHERE s.account_id = v_uid AND (p_instance_id IS NULL OR i.id = p_instance_id)
     ORDER BY (i.status = 'deprovisioned'), public.is_entitled(s.status) DESC, i.created_at DESC, i.id
     LIMIT 1;
    IF v_id IS NULL THEN
        RETURN NULL;
    END IF;

    SELECT jsonb_build_object(
        'instance', jsonb_build_object(
            'id', i.id, 'status', i.status, 'desired_status', i.desired_status,
            'owed_action', i.owed_action, 'owed_since', i.owed_since,
            'subdomain', i.subdomain, 'frontend_url', i.frontend_url,
            'backend_url', i.backend_url, 'matrix_server_url', i.matrix_server_url,
            'matrix_server_name', i.matrix_server_name,
            'memory_limit_mb', i.memory_limit_mb, 'cpu_limit', i.cpu_limit, 'storage_gb', i.storage_gb,
            'created_at', i.created_at, 'provisioned_at', i.provisioned_at,
            'deprovisioned_at', i.deprovisioned_at, 'storage_destroy_after', i.storage_destroy_after,
            'restart', jsonb_build_object(
                'pending', i.restart_version > i.applied_restart_version,
                'held', i.restart_version > i.applied_restart_version
                        AND coalesce('restart' = ANY (i.rejected_actions), false),
                'requested_at', i.restart_requested_at, 'restarted_at', i.restarted_at),
            -- What went wrong: the owed step while it fails (attempts counted since its
            -- last success; held for an operator while its action is rejected),
            -- whether or not the instance runs; else, for an instance that is not
            -- running, the health checks that failed it. The health checks' error
            -- while it runs is health.error.
            'error', CASE WHEN i.attempts > 0 AND coalesce(i.rejected_actions[1], i.owed_action) IS NOT NULL
                          THEN public.instance_step_error(coalesce(i.rejected_actions[1], i.owed_action),
                                                          coalesce(cardinality(i.rejected_actions), 0) > 0)
                          WHEN i.status <> 'running' THEN i.error_message END,
            -- What is happening and what the customer can do, in its words.
            'notice', public.tenant_instance_notice(
                i.status, i.desired_status, i.provisioned_at,
                coalesce(cardinality(i.rejected_actions), 0) > 0, i.owed_action,
                i.storage_destroy_after, i.storage_destroyed_at,
                s.status, s.cancel_at_period_end, s.current_period_end, s.trial_ends_at,
                s.cancel_at,
                -- A destroyed instance's customer may have subscribed again.
                CASE WHEN i.status = 'deprovisioned'
                     THEN public.tenant_subscription_without_instance(v_uid) END)),
        -- Only a running instance is probed: another one's last result is history.
        'health', CASE WHEN i.status = 'running' THEN jsonb_build_object(
            'status', i.health_status, 'checked_at', i.last_health_check,
            'error', i.error_message, 'consecutive_failures', i.consecutive_failures)
            ELSE jsonb_build_object(
            'status', 'not_checked', 'checked_at', i.last_health_check,
            'error', NULL, 'consecutive_failures', NULL) END,
        'subscription', jsonb_build_object(
            'id', s.id, 'status', s.status, 'tier', s.tier,
            'cancel_at_period_end', s.cancel_at_period_end, 'cancel_at', s.cancel_at,
            'cancelled_at', s.cancelled_at,
            'current_period_end', s.current_period_end, 'trial_ends_at', s.trial_ends_at),
        'plan', jsonb_build_object(
            'name', (SELECT p.name FROM public.plans p WHERE p.stripe_price_id = s.stripe_price_id),
            'tier', s.tier, 'max_agents', s.max_agents,
            'max_messages_per_day', s.max_messages_per_day, 'max_storage_gb', s.max_storage_gb),
        'usage', jsonb_build_object(
            'today', jsonb_build_object(
                'date', CURRENT_DATE,
                'messages_sent', coalesce(u.messages_sent, 0),
                'agents_used', coalesce(u.agents_used, '{}'::jsonb),
                'tools_used', coalesce(u.tools_used, '{}'::jsonb),
                'remaining', CASE WHEN s.max_messages_per_day IS NULL THEN NULL
                                  ELSE greatest(s.max_messages_per_day -
                                       CASE WHEN s.last_reset_at < CURRENT_DATE THEN 0
                                            ELSE coalesce(s.current_messages_today, 0) END, 0) END,
                'resets_at', (CURRENT_DATE + 1)::timestamptz),
            'last_30_days', (
                SELECT jsonb_agg(jsonb_build_object(
                           'date', d.day, 'messages_sent', coalesce(m.messages_sent, 0),
                           'agents', (SELECT count(*) FROM jsonb_object_keys(
                                          CASE WHEN jsonb_typeof(m.agents_used) = 'object'
                                               THEN m.agents_used ELSE '{}'::jsonb END)))
                           ORDER BY d.day)
                  FROM (SELECT g::date AS day FROM generate_series(CURRENT_DATE - 29, CURRENT_DATE,
                                                                   interval '1 day') g) d
                  LEFT JOIN public.usage_metrics m ON m.instance_id = i.id AND m.date = d.day)))
      INTO v
      FROM public.instances i
      JOIN public.subscriptions s ON s.id = i.subscription_id
      LEFT JOIN public.usage_metrics u ON u.instance_id = i.id AND u.date = CURRENT_DATE
     WHERE i.id = v_id;
    RETURN v;
END;
$$;
