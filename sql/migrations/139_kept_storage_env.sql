-- 139_kept_storage_env.sql: an instance that takes over a destroyed one's kept
-- storage keeps that instance's operator variables too, not only its homeserver.
--
-- An instance created again under its subscription's names while a destroyed one's
-- data is kept takes that storage over (124) and, since 131, the homeserver's keys
-- and server_name found there: its first step carries "predecessor" and the worker
-- seals those keys again for the new instance id. The variables an operator set on
-- the destroyed instance (mindroomctl env set: instance_secrets kind 'env', sealed
-- for that instance's id) stayed behind: MindRoom came back on its old data without
-- its model providers' API keys, and nothing said so.
--
-- 1. lifecycle_step_json's "predecessor" also carries that instance's variables,
--    "env": {"name": ciphertext} (absent when it had none): the same instance whose
--    homeserver keys are carried, under the same condition (the new instance has no
--    homeserver keys yet). The worker opens them under that instance's context and
--    seals them again for the new one; if one does not open, the step fails, naming
--    that instance and the variable, and nothing is stored.
-- 2. instance_secrets_issue(uuid, jsonb, jsonb, jsonb): the 3-argument function with
--    p_env, those variables sealed for the new instance ([{"name", "ciphertext",
--    "digest"}]). They are stored only in the call that stores the homeserver keys
--    (so a racing worker's second call, or a later one, cannot bring back a variable
--    the operator removed since), and never over a variable of the same name already
--    stored for the new instance (one the operator set on it). The answer gains "env":
--    the instance's variables in force, {"name": ciphertext}, when p_env is given.
--    With p_env NULL (every step without a predecessor) it does exactly what the
--    3-argument function does, with no statement more. The 3-argument function stays
--    as it was for the lifecycle worker built before 139 while an upgrade runs
--    (docs/schema.md, Upgrades); a later release drops it.
--
-- Redefines public.lifecycle_step_json whole from its last definition
-- (131_kept_storage_identity.sql), unchanged but for the comment above the query of
-- the takeovers and the predecessor's jsonb_build_object (wrapped in
-- jsonb_strip_nulls, with its 'env' entry). CREATE OR REPLACE keeps its grants.
-- public.instance_secrets_issue(uuid, jsonb, jsonb, jsonb) is new, copied from
-- 113_step_secrets.sql's 3-argument function: p_env, v_env, v_carry, the lock and
-- the check before instance_homeserver_keys, the INSERT of the variables after it,
-- and 'env' in the answer differ.

CREATE FUNCTION public.instance_secrets_issue(p_instance_id uuid, p_token jsonb, p_homeserver jsonb,
                                              p_env jsonb)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_token text;
    v_keys jsonb;
    v_env jsonb;
    v_carry boolean := false;
BEGIN
    IF p_token IS NOT NULL THEN
        v_token := public.instance_token_issue(p_instance_id, p_token->>'key_id', p_token->>'hash',
                                               p_token->>'ciphertext', p_token->>'digest');
    END IF;
    IF p_homeserver IS NOT NULL THEN
        -- The predecessor's variables go with its keys: only into an instance that has
        -- none yet (the lock is instance_homeserver_keys' own, taken first).
        IF p_env IS NOT NULL THEN
            PERFORM 1 FROM public.instances WHERE id = p_instance_id FOR UPDATE;
            v_carry := NOT EXISTS (SELECT 1 FROM public.instance_secrets
                                    WHERE instance_id = p_instance_id AND kind = 'homeserver');
        END IF;
        v_keys := public.instance_homeserver_keys(p_instance_id, p_homeserver);
        IF v_carry THEN
            INSERT INTO public.instance_secrets (instance_id, kind, name, ciphertext, digest)
            SELECT p_instance_id, 'env', r ->> 'name', r ->> 'ciphertext', r ->> 'digest'
              FROM jsonb_array_elements(p_env) r
            ON CONFLICT (instance_id, kind, name) DO NOTHING;
        END IF;
    END IF;
    IF p_env IS NOT NULL THEN
        v_env := (SELECT coalesce(jsonb_object_agg(name, ciphertext), '{}'::jsonb)
                    FROM public.instance_secrets
                   WHERE instance_id = p_instance_id AND kind = 'env');
        RETURN jsonb_build_object('token', v_token, 'homeserver', v_keys, 'env', v_env);
    END IF;
    RETURN jsonb_build_object('token', v_token, 'homeserver', v_keys);
END;
$$;

REVOKE ALL ON FUNCTION public.instance_secrets_issue(uuid, jsonb, jsonb, jsonb) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.instance_secrets_issue(uuid, jsonb, jsonb, jsonb) TO service_role;

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
    IF i.claim_action IN ('create', 'update', 'start', 'restart')
       AND (v_server_name IS NULL OR NOT v_has_keys) THEN
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
            'frontend_url', i.frontend_url) END,
        'target', CASE WHEN i.target_id IS NOT NULL AND i.claim_action IS DISTINCT FROM 'email'
                       THEN public.lifecycle_target_of(i.id) END);
END;
$$;
