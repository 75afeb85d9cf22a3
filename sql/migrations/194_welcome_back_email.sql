-- 194_welcome_back_email.sql: a returning customer's welcome email says its MindRoom
-- is back, with its data.
--
-- A customer who subscribes again while its cancelled instance's data is kept gets a
-- new instance that takes that data over (186: the names; instances_take_kept_storage:
-- the storage, the destroyed row's storage_taken_by). Its welcome email was a new
-- customer's ("Welcome to MindRoom! Your MindRoom instance is up and running"):
-- nothing told it that its rooms, agents and settings were there again.
--
-- public.lifecycle_step_json's `welcome` (the email step) now says whether the
-- instance took over a destroyed instance's kept storage (`returning`: a row whose
-- storage_taken_by is this instance: the probe of instances_storage_taken_by_idx that
-- a deploy already made before reading the homeserver's chain, now made once for
-- both). The worker then sends the "back" email. Whether an instance took storage
-- over is settled before it is created (placement releases storage only before the
-- first create), so every retry of one email sends the same words under the same
-- Idempotency-Key.
--
-- Redefines public.lifecycle_step_json (173_plans_kept.sql) whole, unchanged but for
-- the `welcome` member and the probe it shares with the chain. CREATE OR REPLACE
-- keeps its grants.

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
    v_has_keys boolean;
    v_server_name text := i.matrix_server_name;
    v_predecessor jsonb;
    v_took_over boolean := false;
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

    -- The homeserver in the storage this instance took over: its name and keys, from
    -- the nearest instance back along the takeovers that has them (only read until
    -- this instance has its own), and that instance's operator variables, which the
    -- MindRoom in the same storage was running with.
    v_has_keys := v_secrets @> '[{"kind": "homeserver"}]'::jsonb;
    -- Whether this instance took over a destroyed instance's kept storage, asked only
    -- by the steps that use it: a deploy still without the homeserver's name or keys
    -- (only such an instance has a chain to read them from) and the welcome email (a
    -- returning customer's says its data is back). The probe is a statement of its
    -- own: its plan is the same at every call, while the chain's query, or a
    -- subquery in the RETURN's CASE, whose parameters make a plan of their own look
    -- cheaper, would be planned again at each one.
    IF i.claim_action = 'email'
       OR i.claim_action IN ('create', 'update', 'start', 'restart')
          AND (v_server_name IS NULL OR NOT v_has_keys) THEN
        v_took_over := EXISTS (SELECT 1 FROM public.instances x WHERE x.storage_taken_by = i.id);
    END IF;
    IF v_took_over AND i.claim_action <> 'email' THEN
        WITH RECURSIVE chain (id, matrix_server_name, created_at, depth) AS (
            SELECT x.id, x.matrix_server_name, x.created_at, 1
              FROM public.instances x WHERE x.storage_taken_by = i.id
            UNION ALL
            SELECT x.id, x.matrix_server_name, x.created_at, c.depth + 1
              FROM chain c JOIN public.instances x ON x.storage_taken_by = c.id
             WHERE c.depth < 64
        )
        SELECT coalesce(v_server_name,
                        (SELECT c.matrix_server_name FROM chain c
                          WHERE c.matrix_server_name IS NOT NULL
                          ORDER BY c.depth, c.created_at DESC LIMIT 1)),
               CASE WHEN NOT v_has_keys THEN
                   (SELECT jsonb_strip_nulls(jsonb_build_object('instance_id', c.id, 'homeserver',
                               (SELECT jsonb_object_agg(k.name, k.ciphertext)
                                  FROM public.instance_secrets k
                                 WHERE k.instance_id = c.id AND k.kind = 'homeserver'),
                               'env',
                               (SELECT jsonb_object_agg(k.name, k.ciphertext)
                                  FROM public.instance_secrets k
                                 WHERE k.instance_id = c.id AND k.kind = 'env')))
                      FROM chain c
                     WHERE EXISTS (SELECT 1 FROM public.instance_secrets k
                                    WHERE k.instance_id = c.id AND k.kind = 'homeserver')
                     ORDER BY c.depth, c.created_at DESC LIMIT 1) END
          INTO v_server_name, v_predecessor;
    END IF;

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
                'server_name', v_server_name))) END,
        'secrets', CASE WHEN i.claim_action IN ('create', 'update', 'start', 'restart') THEN v_secrets END,
        'predecessor', v_predecessor,
        'welcome', CASE WHEN i.claim_action = 'email' THEN jsonb_build_object(
            'to', v_email,
            'frontend_url', i.frontend_url,
            'returning', v_took_over) END,
        'target', CASE WHEN i.target_id IS NOT NULL AND i.claim_action IS DISTINCT FROM 'email'
                       THEN public.lifecycle_target_of(i.id) END);
END;
$$;
