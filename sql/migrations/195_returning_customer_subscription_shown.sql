-- 195_returning_customer_subscription_shown.sql: my-instance shows a returning
-- customer's new subscription beside its destroyed instance, not the one that ended.
--
-- A customer whose instance was destroyed (its subscription ended) and who has
-- subscribed again, the new subscription without an instance yet (its first payment
-- still processing by bank debit), saw in my-instance the destroyed instance with
-- the notice `payment_processing` ("your instance is created as soon as it clears")
-- beside the subscription that ended: status cancelled, the old plan and its limits.
-- The subscription a customer expects there is its current one, the one the notice
-- speaks of.
--
-- - public.tenant_subscription_without_instance_id(account): the one query for "the
--   account's subscription without an instance" (one still processing first, else the
--   newest), which tenant_subscription_without_instance (189) had; that function now
--   gives that subscription's status.
-- - public.tenant_instance: for a destroyed instance, the account's subscription
--   without an instance, unless it is older than the instance's own, is the subscription
--   shown (`subscription`, `plan`, today's `remaining`) and the one whose status the
--   notice reads (as before: `payment_processing` while it is incomplete, else the
--   destroyed instance's own notice). The instance, its health and its usage are the
--   destroyed instance's, as before. An older subscription without an instance (a
--   first payment given up before the destroyed instance's subscription began) is no
--   longer taken for the customer's new one.
--
-- Redefines, each whole and unchanged but for the lines named:
-- public.tenant_subscription_without_instance (189_stripe_cancel_at.sql: its query is
-- the new function) and public.tenant_instance (189: the subscription joined, the
-- notice's last argument). CREATE OR REPLACE keeps their grants.

-- The id of p_account's subscription that has no instance: one whose first payment is
-- still processing first, else the newest; NULL when it has none. Runs as the caller:
-- a tenant sees its own rows only.
CREATE FUNCTION public.tenant_subscription_without_instance_id(p_account uuid)
RETURNS uuid
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT s.id
      FROM public.subscriptions s
     WHERE s.account_id = p_account
       AND NOT EXISTS (SELECT 1 FROM public.instances i WHERE i.subscription_id = s.id)
     ORDER BY (s.status = 'incomplete') DESC, s.created_at DESC, s.id
     LIMIT 1
$$;

REVOKE ALL ON FUNCTION public.tenant_subscription_without_instance_id(uuid) FROM PUBLIC, anon;
GRANT EXECUTE ON FUNCTION public.tenant_subscription_without_instance_id(uuid) TO authenticated, service_role;

-- The status of p_account's subscription that has no instance
-- (tenant_subscription_without_instance_id), or NULL. Runs as the caller.
CREATE OR REPLACE FUNCTION public.tenant_subscription_without_instance(p_account uuid)
RETURNS public.subscription_status
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT s.status
      FROM public.subscriptions s
     WHERE s.id = public.tenant_subscription_without_instance_id(p_account)
$$;

CREATE OR REPLACE FUNCTION public.tenant_instance(p_instance_id uuid)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
DECLARE
    v_uid uuid := (SELECT auth.uid());
    v_id uuid;
    v_sub uuid;
    v_status public.instance_status;
    v_new uuid;
    v_new_status public.subscription_status;
    v jsonb;
BEGIN
    IF v_uid IS NULL THEN
        RAISE EXCEPTION 'a signed-in user''s call' USING ERRCODE = '42501';
    END IF;
    -- RLS shows a tenant its own rows only; the account test keeps that true for a
    -- caller that bypasses RLS.
    SELECT i.id, i.subscription_id, i.status INTO v_id, v_sub, v_status
      FROM public.instances i JOIN public.subscriptions s ON s.id = i.subscription_id
     WHERE s.account_id = v_uid AND (p_instance_id IS NULL OR i.id = p_instance_id)
     ORDER BY (i.status = 'deprovisioned'), public.is_entitled(s.status) DESC, i.created_at DESC, i.id
     LIMIT 1;
    IF v_id IS NULL THEN
        RETURN NULL;
    END IF;
    -- A destroyed instance's customer may have subscribed again: its new subscription,
    -- without an instance yet (a first payment still processing), is its current one,
    -- shown beside the destroyed instance and read by the notice.
    IF v_status = 'deprovisioned' THEN
        SELECT n.id, n.status INTO v_new, v_new_status
          FROM public.subscriptions n
         WHERE n.id = public.tenant_subscription_without_instance_id(v_uid)
           AND n.created_at >= (SELECT o.created_at FROM public.subscriptions o WHERE o.id = v_sub);
        v_sub := coalesce(v_new, v_sub);
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
                s.cancel_at, v_new_status)),
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
      JOIN public.subscriptions s ON s.id = v_sub
      LEFT JOIN public.usage_metrics u ON u.instance_id = i.id AND u.date = CURRENT_DATE
     WHERE i.id = v_id;
    RETURN v;
END;
$$;
