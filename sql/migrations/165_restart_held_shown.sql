-- 165_restart_held_shown.sql: a tenant's restart that the provisioner refused says
-- so in my-instance.
--
-- A restart goes ahead of an update the provisioner rejected (164), but one the
-- provisioner rejects in turn (its app gone, and the POST /apps that would make it
-- again rejected) waits for an operator, and my-instance showed only
-- "restart": {"pending": true} for good. The restart member now has "held": true
-- then (a pending restart the provisioner rejected, waiting for an operator); the
-- tenant may read instances.rejected_actions, which says which of its instance's
-- actions were rejected and nothing more.
--
-- Redefines public.tenant_instance (147_health_only_while_running.sql) whole,
-- unchanged but for the 'held' member of 'restart'. CREATE OR REPLACE keeps its
-- grants.

GRANT SELECT (rejected_actions) ON public.instances TO authenticated;

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
                'requested_at', i.restart_requested_at, 'restarted_at', i.restarted_at)),
        -- Only a running instance is probed: another one's last result is history.
        'health', CASE WHEN i.status = 'running' THEN jsonb_build_object(
            'status', i.health_status, 'checked_at', i.last_health_check,
            'error', i.error_message, 'consecutive_failures', i.consecutive_failures)
            ELSE jsonb_build_object(
            'status', 'not_checked', 'checked_at', i.last_health_check,
            'error', NULL, 'consecutive_failures', NULL) END,
        'subscription', jsonb_build_object(
            'id', s.id, 'status', s.status, 'tier', s.tier,
            'cancel_at_period_end', s.cancel_at_period_end, 'cancelled_at', s.cancelled_at,
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
