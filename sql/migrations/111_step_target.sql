-- 111_step_target.sql: a claimed step carries its provisioner target.
--
-- The worker asked the database for the instance's target (lifecycle_target_of)
-- before every provisioner call: one more transaction per step, right after the
-- claim or the finish that had just read the instance. Now the step itself says,
-- read in the same transaction as the claim: "target" is what lifecycle_target_of
-- gives ({"target", "url", "token_ref", "scheduler", "enabled"}), or NULL for an
-- instance without a target (DOKKU_PROVISIONER_URL) and for the welcome email,
-- which calls no provisioner. The worker still refuses a target that was disabled
-- (functions/mindroom-lifecycle/targets.c).
--
-- Redefines public.lifecycle_step_json (070_tenant.sql): the same step, one more key.

CREATE OR REPLACE FUNCTION public.lifecycle_step_json(i public.instances)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
DECLARE
    v_tier text;
    v_email text;
    v_secrets jsonb;
    v_max_agents integer;
    v_max_messages integer;
    v_key text;
BEGIN
    SELECT s.tier::text, a.email, s.max_agents, s.max_messages_per_day
      INTO v_tier, v_email, v_max_agents, v_max_messages
      FROM public.subscriptions s
      JOIN public.accounts a ON a.id = s.account_id
     WHERE s.id = i.subscription_id;
    SELECT coalesce(jsonb_agg(jsonb_build_object('kind', x.kind, 'name', x.name,
                                                 'ciphertext', x.ciphertext)
                              ORDER BY x.kind, x.name), '[]'::jsonb)
      INTO v_secrets
      FROM public.instance_secrets x WHERE x.instance_id = i.id;
    SELECT t.key_id INTO v_key FROM public.instance_tokens t WHERE t.instance_id = i.id;

    RETURN jsonb_build_object(
        'action', i.claim_action,
        'token', i.claimed_by,
        'instance_id', i.id,
        'app', i.dokku_app_name,
        'config_version', i.config_version,
        'restart_version', i.restart_version,
        'apply', i.claim_action = 'start' AND i.applied_config_version IS DISTINCT FROM i.config_version,
        'token_key_id', v_key,
        'purge', i.purge_requested,
        'plain_env', jsonb_typeof(i.environment_vars) = 'object' AND i.environment_vars <> '{}'::jsonb,
        'payload', CASE WHEN i.claim_action IN ('create', 'update', 'start', 'restart') THEN jsonb_build_object(
            'app', i.dokku_app_name,
            'subdomain', i.subdomain,
            'memory_mb', i.memory_limit_mb,
            'cpu', i.cpu_limit,
            'storage_gb', i.storage_gb,
            'env', jsonb_strip_nulls(jsonb_build_object(
                'MINDROOM_INSTANCE_ID', i.id::text,
                'MINDROOM_SUBSCRIPTION_ID', i.subscription_id::text,
                'MINDROOM_SUBDOMAIN', i.subdomain,
                'MINDROOM_TIER', coalesce(v_tier, ''),
                'MAX_AGENTS', v_max_agents::text,
                'MAX_MESSAGES_PER_DAY', coalesce(v_max_messages::text, 'unlimited'),
                'MAX_STORAGE_GB', i.storage_gb::text)),
            'homeserver', jsonb_strip_nulls(jsonb_build_object(
                'memory_mb', coalesce(i.homeserver_memory_mb, 256),
                'cpu', coalesce(i.homeserver_cpu, 0.25),
                'storage_gb', i.storage_gb,
                'server_name', i.matrix_server_name))) END,
        'secrets', CASE WHEN i.claim_action IN ('create', 'update', 'start', 'restart') THEN v_secrets END,
        'welcome', CASE WHEN i.claim_action = 'email' THEN jsonb_build_object(
            'to', v_email,
            'frontend_url', i.frontend_url) END,
        'target', CASE WHEN i.target_id IS NOT NULL AND i.claim_action IS DISTINCT FROM 'email'
                       THEN public.lifecycle_target_of(i.id) END);
END;
$$;
