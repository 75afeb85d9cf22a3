-- 131_kept_storage_identity.sql: storage is taken over only where the new instance
-- is; an instance that takes over kept storage keeps the homeserver it finds there.
--
-- An instance created again under its subscription's names while a destroyed one's
-- data is kept mounts the same storage entries and takes them over
-- (instances_take_kept_storage, 124_kept_storage_taken.sql).
--
-- 1. instances_take_kept_storage took a destroyed instance's kept storage by app
--    name alone. An instance destroyed on DOKKU_PROVISIONER_URL (no target) and
--    created again once targets exist is placed on a target: the new instance
--    started empty there, and the old host's data, marked taken, was never owed its
--    destruction (it outlived its retention for good). Now storage is taken only
--    where the new instance is (the same target_id, NULL being
--    DOKKU_PROVISIONER_URL). An instance that waited for room and is then placed
--    (its target_id set before it was ever provisioned, instance_place) gives back
--    what it took elsewhere, which it never mounted (audited
--    instance.storage_released: the destroyed row owes its storage's destruction
--    again, on its own clock), and takes what is kept on its target. Adopting the
--    legacy host (mindroomctl target add --adopt) moves the destroyed rows with the
--    live ones in one statement: nothing is given back.
--
-- 2. The homeserver's keys are generated once per instance id, and the new row has
--    a new id: its first create generated new keys, and the provisioner wrote them
--    over the kept homeserver's signing.key and secrets, under its existing database
--    (a new federation identity). Its server_name restarted from nothing too (the
--    provisioner's default host, which may no longer be the name in Synapse's
--    database). Now the step of an instance that has no homeserver keys yet and took
--    over a destroyed instance's storage carries "predecessor": {"instance_id",
--    "homeserver": {"name": ciphertext}}: the keys of the nearest instance back along
--    its takeovers that has some (its predecessor, or that one's when the
--    predecessor never got as far as its first deploy). The worker opens them under
--    their own context and seals them again for the new instance
--    (instance_secrets_issue, as it stores new keys); if they do not open, the step
--    fails and names that instance rather than generating new keys. The payload's
--    homeserver.server_name is the instance's recorded one, else the nearest one
--    recorded back along its takeovers. Both are read from storage_taken_by when the
--    step is built, so storage given back (1.) carries nothing over.
--
-- Redefines, each whole from its last definition and unchanged but for the lines
-- named: public.instances_take_kept_storage (125_purge_before_takeover.sql: the
-- target condition, the TG_OP = 'UPDATE' block) and public.lifecycle_step_json
-- (111_step_target.sql: v_has_keys, v_server_name, v_predecessor, the query of the
-- takeovers, 'server_name' and 'predecessor'). CREATE OR REPLACE keeps each
-- function's grants.

-- The takeovers walked back from an instance, without reading every row.
CREATE INDEX instances_storage_taken_by_idx ON public.instances (storage_taken_by)
    WHERE storage_taken_by IS NOT NULL;

CREATE OR REPLACE FUNCTION public.instances_take_kept_storage()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    r record;
BEGIN
    -- Placed (instances_take_kept_storage_placed) before it was ever provisioned:
    -- storage it took elsewhere was never mounted, and is the destroyed row's again.
    IF TG_OP = 'UPDATE' THEN
        FOR r IN
            UPDATE public.instances x SET storage_taken_by = NULL
             WHERE x.storage_taken_by = NEW.id
               AND x.target_id IS DISTINCT FROM NEW.target_id
            RETURNING x.id, x.subscription_id
        LOOP
            INSERT INTO public.audit_logs (account_id, action, details)
            SELECT s.account_id, 'instance.storage_released',
                   jsonb_build_object('instance_id', r.id, 'by', NEW.id, 'app', NEW.dokku_app_name)
              FROM public.subscriptions s WHERE s.id = r.subscription_id;
        END LOOP;
    END IF;
    FOR r IN
        UPDATE public.instances x SET storage_taken_by = NEW.id
         WHERE x.dokku_app_name = NEW.dokku_app_name AND x.id <> NEW.id
           AND x.target_id IS NOT DISTINCT FROM NEW.target_id
           AND x.status = 'deprovisioned' AND x.storage_destroyed_at IS NULL
           AND x.storage_taken_by IS NULL AND NOT x.purge_requested
        RETURNING x.id, x.subscription_id
    LOOP
        INSERT INTO public.audit_logs (account_id, action, details)
        SELECT s.account_id, 'instance.storage_taken',
               jsonb_build_object('instance_id', r.id, 'by', NEW.id, 'app', NEW.dokku_app_name)
          FROM public.subscriptions s WHERE s.id = r.subscription_id;
    END LOOP;
    RETURN NULL;
END;
$$;

-- AFTER: a statement that moves several rows at once (an adoption) has moved them all
-- when this runs.
CREATE TRIGGER instances_take_kept_storage_placed AFTER UPDATE OF target_id ON public.instances
    FOR EACH ROW
    WHEN (OLD.target_id IS DISTINCT FROM NEW.target_id AND NEW.provisioned_at IS NULL
          AND NEW.status <> 'deprovisioned')
    EXECUTE FUNCTION public.instances_take_kept_storage();

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
    -- this instance has its own).
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
                   (SELECT jsonb_build_object('instance_id', c.id, 'homeserver',
                               (SELECT jsonb_object_agg(k.name, k.ciphertext)
                                  FROM public.instance_secrets k
                                 WHERE k.instance_id = c.id AND k.kind = 'homeserver'))
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
