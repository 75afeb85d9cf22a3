-- 173_plans_kept.sql: two statements of the paths that create an instance are no
-- longer planned again at each call.
--
-- PL/pgSQL keeps one plan for each statement of a function, unless the plans it makes
-- for the parameters of each call look cheaper than the kept one: then it plans the
-- statement again at every call. A condition that tests a variable and runs a query
-- (`NOT FOUND OR EXISTS (...)`) is such a statement (with the variable's value, the
-- query folds away), and so can be a query whose parameters a call's values simplify
-- (an `OR` with a NULL, a `CASE` on a flag). pg_stat_statements with track_planning
-- (scripts/bench's profile) counted them:
--
-- - public.stripe_deleted_account (159_deleted_account_checkout.sql), run by every
--   new subscription's first event: its `NOT FOUND OR EXISTS` was planned at every
--   call, and its lookup by customer or claim (`OR` of the two) at every call in some
--   sessions. It now looks the customer up, then the claim only when the customer
--   is no deleted account's, and asks whether the customer is a live account's in a
--   statement of its own, only when a deleted account was found. The same answers:
--   a deleted account the customer names before one the claim names, the newest of
--   each, none when the customer is a live account's.
-- - public.lifecycle_step_json (139_kept_storage_env.sql), run by every step a worker
--   takes: for a create, update, start or restart before the instance has its
--   homeserver's name and keys, the query that reads the chain of kept storage taken
--   over (recursive, with four subqueries) was planned at every call in some
--   sessions, and run for every instance though nearly none took storage over. It now
--   runs only when an instance took this one's storage over (a probe of
--   instances_storage_taken_by_idx, a statement of its own).
--
-- Both are redefined whole (CREATE OR REPLACE keeps their grants), unchanged but for
-- the lines named.

-- The deleted account that p_customer (no live account's) or p_claim names, if any:
-- the customer's first, else the claim's. SECURITY DEFINER: the webhook's role may not
-- read deleted_account_customers.
CREATE OR REPLACE FUNCTION public.stripe_deleted_account(p_customer text, p_claim text)
RETURNS uuid
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_account uuid;
BEGIN
    SELECT d.account_id INTO v_account FROM public.deleted_account_customers d
     WHERE d.stripe_customer_id = p_customer
     ORDER BY d.deleted_at DESC
     LIMIT 1;
    IF NOT FOUND
       AND p_claim ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        SELECT d.account_id INTO v_account FROM public.deleted_account_customers d
         WHERE d.account_id = p_claim::uuid
         ORDER BY d.deleted_at DESC
         LIMIT 1;
    END IF;
    IF v_account IS NULL THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM public.accounts a WHERE a.stripe_customer_id = p_customer) THEN
        RETURN NULL;
    END IF;
    RETURN v_account;
END;
$$;

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
        -- Only an instance that took storage over has a chain. The probe is a
        -- statement of its own: its plan is the same at every call, while the
        -- chain's query, whose parameters make a plan of their own look cheaper,
        -- would be planned again at each one.
        IF EXISTS (SELECT 1 FROM public.instances x WHERE x.storage_taken_by = i.id) THEN
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

