-- 184_tenant_notice.sql: my-instance tells a customer what is happening to its
-- instance and what it can do about it, in every state.
--
-- my-instance answered every state truthfully but in the control plane's words: a
-- status, a desired status, a subscription status and some dates. A customer whose
-- payment failed saw "past_due", or its instance "stopped" with nothing saying why
-- (unpaid, paused, or stopped by an operator: three different things to do) and a
-- restart refused as "the instance is stopped"; one who cancelled saw
-- "deprovisioned" and a storage_destroy_after it had to know was the last day to get
-- its data back.
--
-- - public.tenant_instance_notice: the one place for those words. From the
--   instance's and the subscription's columns a tenant reads (never
--   operator_stopped_at: a stop while the subscription is entitled is an
--   operator's, since billing would want it running), {"code", "message"} or NULL
--   when there is nothing to say (running, paid). With no instance (p_status
--   NULL: 185's tenant_no_instance_notice), the notice of a subscription whose
--   first payment has not gone through: `payment_processing` while `incomplete`,
--   `payment_not_completed` once `incomplete_expired`.
-- - public.tenant_instance: the instance object gets "notice" (added; nothing
--   else changes).
-- - public.tenant_instance_restart: a refusal (not_running) carries the notice's
--   message, which my-instance/restart adds to its 409.
--
-- Redefines (CREATE OR REPLACE keeps their grants), each whole and unchanged but for
-- the lines named: public.tenant_instance (172_step_error_shown.sql: "notice") and
-- public.tenant_instance_restart (146_account_lock_no_key.sql: the not_running
-- answer's "notice").

CREATE FUNCTION public.tenant_instance_notice(
    p_status public.instance_status, p_desired public.instance_status,
    p_provisioned_at timestamptz, p_held boolean, p_owed public.lifecycle_action,
    p_storage_destroy_after timestamptz, p_storage_destroyed_at timestamptz,
    p_sub_status public.subscription_status, p_cancel_at_period_end boolean,
    p_period_end timestamptz, p_trial_ends_at timestamptz)
RETURNS jsonb
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = ''
AS $$
DECLARE
    v_code text;
    v_msg text;
    v_is text := CASE WHEN p_status = 'stopped' THEN 'is stopped' ELSE 'is being stopped' END;
BEGIN
    IF p_status IS NULL THEN
        -- No instance (tenant_no_instance_notice): only a first payment that has not
        -- gone through explains that.
        IF p_sub_status = 'incomplete' THEN
            v_code := 'payment_processing';
            v_msg := 'Your first payment is still processing (a bank debit takes a few days to clear): '
                     || 'your instance is created as soon as it clears.';
        ELSIF p_sub_status = 'incomplete_expired' THEN
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
    ELSIF p_cancel_at_period_end THEN
        v_code := 'ends_at_period_end';
        v_msg := 'Your subscription ends '
                 || coalesce('on ' || to_char(p_period_end AT TIME ZONE 'UTC', 'YYYY-MM-DD') || ' (UTC)',
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
    public.subscription_status, boolean, timestamptz, timestamptz) FROM PUBLIC, anon;
GRANT EXECUTE ON FUNCTION public.tenant_instance_notice(public.instance_status, public.instance_status,
    timestamptz, boolean, public.lifecycle_action, timestamptz, timestamptz,
    public.subscription_status, boolean, timestamptz, timestamptz) TO authenticated, service_role;

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
                s.status, s.cancel_at_period_end, s.current_period_end, s.trial_ends_at)),
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

CREATE OR REPLACE FUNCTION public.tenant_instance_restart(p_instance_id uuid)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    c_max constant integer := 3;
    c_window constant interval := '10 minutes';
    v_uid uuid := (SELECT auth.uid());
    v_id uuid;
    i public.instances;
    v_recent integer;
    v_oldest timestamptz;
BEGIN
    IF v_uid IS NULL THEN
        RAISE EXCEPTION 'a signed-in user''s call' USING ERRCODE = '42501';
    END IF;
    -- One request of an account at a time: the count below cannot race. NO KEY: rows
    -- that only reference the account (the worker's audit rows) are not in its way.
    PERFORM 1 FROM public.accounts a WHERE a.id = v_uid FOR NO KEY UPDATE;
    SELECT x.id INTO v_id
      FROM public.instances x JOIN public.subscriptions s ON s.id = x.subscription_id
     WHERE s.account_id = v_uid AND (p_instance_id IS NULL OR x.id = p_instance_id)
     ORDER BY (x.status = 'deprovisioned'), public.is_entitled(s.status) DESC, x.created_at DESC, x.id
     LIMIT 1;
    IF v_id IS NULL THEN
        RETURN jsonb_build_object('outcome', 'not_found');
    END IF;
    SELECT * INTO i FROM public.instances x WHERE x.id = v_id FOR UPDATE;
    IF i.status <> 'running' OR i.desired_status <> 'running' THEN
        RETURN jsonb_build_object('outcome', 'not_running', 'status', i.status,
                                  'desired_status', i.desired_status,
                                  'notice', public.tenant_instance(v_id) #>> '{instance,notice,message}');
    END IF;
    IF i.restart_version > i.applied_restart_version THEN
        RETURN jsonb_build_object('outcome', 'pending', 'my_instance', public.tenant_instance(v_id));
    END IF;
    SELECT count(*)::integer, min(a.created_at) INTO v_recent, v_oldest
      FROM public.audit_logs a
     WHERE a.account_id = v_uid AND a.action = 'instance.restart_requested'
       AND a.created_at > now() - c_window;
    IF v_recent >= c_max THEN
        RETURN jsonb_build_object('outcome', 'rate_limited', 'limit', c_max,
                                  'window_s', extract(epoch FROM c_window)::integer,
                                  'retry_after_s',
                                  greatest(1, ceil(extract(epoch FROM v_oldest + c_window - now())))::integer);
    END IF;
    UPDATE public.instances SET restart_version = restart_version + 1, restart_requested_at = now()
     WHERE id = v_id RETURNING * INTO i;
    INSERT INTO public.audit_logs (account_id, action, details)
    VALUES (v_uid, 'instance.restart_requested',
            jsonb_build_object('instance_id', i.id, 'restart_version', i.restart_version));
    RETURN jsonb_build_object('outcome', 'ok', 'my_instance', public.tenant_instance(v_id));
END;
$$;
