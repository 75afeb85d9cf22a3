-- 060_instance.sql: an instance is MindRoom + its own Matrix homeserver, with
-- durable storage and secrets PostgreSQL never sees in clear.
--
--   * Tenant secrets (the homeserver's generated keys, API keys an operator sets
--     for an instance) live in instance_secrets, sealed by the lifecycle worker
--     with AES-256-GCM under MINDROOM_SECRETS_KEY (lib/mr_secrets.c): only
--     ciphertext and a keyed digest of the plaintext are stored, and no tenant
--     role can read the table at all. Changing a secret bumps the instance's
--     config_version (an update owed); re-sealing one under a new key does not.
--   * The homeserver's server_name is recorded once (matrix_server_name: Synapse
--     cannot change it) and sent on every later call.
--   * Plans give the homeserver its own share of memory and CPU.
--   * Destroy removes both apps and keeps the storage for a retention period
--     (storage_destroy_after); then destroy_storage is owed. A purge (operator's
--     request, account deletion) removes the data at once. Both are audited.
--   * Deleting an account (or any instance row) whose instance still has apps or
--     data records a teardown where no cascade reaches (instance_teardowns): the
--     worker destroys both apps and both storage entries.

-- The vocabulary grows by one word (the domain, not an enum, so it is used below).
ALTER DOMAIN public.lifecycle_action DROP CONSTRAINT lifecycle_action_check;
ALTER DOMAIN public.lifecycle_action ADD CONSTRAINT lifecycle_action_check
    CHECK (VALUE IN ('create', 'start', 'update', 'stop', 'destroy', 'email', 'destroy_storage'));

-- The homeserver's share of a plan ------------------------------------------------------
ALTER TABLE public.plans
    ADD COLUMN homeserver_memory_mb integer NOT NULL DEFAULT 256 CHECK (homeserver_memory_mb > 0),
    ADD COLUMN homeserver_cpu numeric(3,2) NOT NULL DEFAULT 0.25 CHECK (homeserver_cpu > 0);

ALTER TABLE public.instances
    ADD COLUMN homeserver_memory_mb integer,
    ADD COLUMN homeserver_cpu numeric(3,2),
    ADD COLUMN storage_gb integer,
    ADD COLUMN matrix_server_name text,
    ADD COLUMN purge_requested boolean NOT NULL DEFAULT false,
    ADD COLUMN storage_destroy_after timestamptz,
    ADD COLUMN storage_destroyed_at timestamptz;

-- Instances destroyed before storage existed have none to keep.
UPDATE public.instances SET storage_destroyed_at = coalesce(deprovisioned_at, now())
 WHERE status = 'deprovisioned';

-- Tenants see their instance's sizes and homeserver name, and when its data goes.
GRANT SELECT (homeserver_memory_mb, homeserver_cpu, storage_gb, matrix_server_name,
              storage_destroy_after, storage_destroyed_at)
    ON public.instances TO authenticated;

-- Instances take their limits from the plan (004's triggers, now with the homeserver's
-- share and the storage size).
CREATE OR REPLACE FUNCTION public.apply_instance_limits()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
    p public.plans;
BEGIN
    -- LATERAL calls plan_for once; `(plan_for(...)).*` would call it once per column.
    SELECT pf.* INTO p
      FROM public.subscriptions s,
           LATERAL public.plan_for(s.tier, s.stripe_price_id) pf
     WHERE s.id = NEW.subscription_id;
    IF p.stripe_price_id IS NOT NULL THEN
        NEW.memory_limit_mb := p.memory_limit_mb;
        NEW.cpu_limit := p.cpu_limit;
        NEW.homeserver_memory_mb := p.homeserver_memory_mb;
        NEW.homeserver_cpu := p.homeserver_cpu;
        NEW.storage_gb := p.max_storage_gb;
    END IF;
    RETURN NEW;
END;
$$;

CREATE OR REPLACE FUNCTION public.sync_instance_limits()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
    p public.plans;
    v_limits boolean;
BEGIN
    p := public.plan_for(NEW.tier, NEW.stripe_price_id);
    IF p.stripe_price_id IS NOT NULL THEN
        -- The limits MindRoom receives in its environment (MAX_AGENTS...) are the
        -- subscription's: when they change, so does the instance's configuration.
        v_limits := NEW.max_agents IS DISTINCT FROM OLD.max_agents
                    OR NEW.max_messages_per_day IS DISTINCT FROM OLD.max_messages_per_day;
        UPDATE public.instances
           SET memory_limit_mb = p.memory_limit_mb, cpu_limit = p.cpu_limit,
               homeserver_memory_mb = p.homeserver_memory_mb, homeserver_cpu = p.homeserver_cpu,
               storage_gb = p.max_storage_gb,
               config_version = config_version + CASE WHEN v_limits THEN 1 ELSE 0 END
         WHERE subscription_id = NEW.id AND status <> 'deprovisioned'
           AND (v_limits OR memory_limit_mb IS DISTINCT FROM p.memory_limit_mb
                OR cpu_limit IS DISTINCT FROM p.cpu_limit
                OR homeserver_memory_mb IS DISTINCT FROM p.homeserver_memory_mb
                OR homeserver_cpu IS DISTINCT FROM p.homeserver_cpu
                OR storage_gb IS DISTINCT FROM p.max_storage_gb);
    END IF;
    RETURN NULL;
END;
$$;

-- Live instances get their share now (with a config_version bump: an update owed).
UPDATE public.instances i SET homeserver_memory_mb = p.homeserver_memory_mb,
       homeserver_cpu = p.homeserver_cpu, storage_gb = p.max_storage_gb
  FROM public.subscriptions s, LATERAL public.plan_for(s.tier, s.stripe_price_id) p
 WHERE s.id = i.subscription_id AND i.status <> 'deprovisioned';

-- Sealed secrets ------------------------------------------------------------------------
CREATE TABLE public.instance_secrets (
    instance_id uuid NOT NULL REFERENCES public.instances (id) ON DELETE CASCADE,
    -- env: a variable of MindRoom's environment; homeserver: one of its generated keys
    kind        text NOT NULL CHECK (kind IN ('env', 'homeserver')),
    name        text NOT NULL CHECK (name ~ '^[A-Za-z_][A-Za-z0-9_]{0,254}$'),
    ciphertext  text NOT NULL CHECK (ciphertext LIKE 'mrs1:%'),
    digest      text NOT NULL CHECK (digest LIKE 'mrd1:%'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, kind, name)
);
CREATE TRIGGER instance_secrets_updated_at BEFORE UPDATE ON public.instance_secrets
    FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();
ALTER TABLE public.instance_secrets ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON public.instance_secrets FROM PUBLIC, anon, authenticated;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.instance_secrets TO service_role;
CREATE POLICY "Service role manages instance secrets" ON public.instance_secrets
    FOR ALL TO service_role USING (true) WITH CHECK (true);

-- Stores one sealed secret. p_changed: whether the plaintext changed (the caller
-- compared it with the stored digest: mr_secrets_digest_matches); when it did, the
-- instance owes an update. A re-seal under a new key passes false: nothing is
-- redeployed. Returns the instance's config_version after.
CREATE FUNCTION public.instance_secret_put(p_instance_id uuid, p_kind text, p_name text,
                                           p_ciphertext text, p_digest text, p_changed boolean)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v bigint;
BEGIN
    INSERT INTO public.instance_secrets (instance_id, kind, name, ciphertext, digest)
    VALUES (p_instance_id, p_kind, p_name, p_ciphertext, p_digest)
    ON CONFLICT (instance_id, kind, name) DO UPDATE
       SET ciphertext = EXCLUDED.ciphertext, digest = EXCLUDED.digest;
    UPDATE public.instances SET config_version = config_version + CASE WHEN p_changed THEN 1 ELSE 0 END
     WHERE id = p_instance_id
    RETURNING config_version INTO v;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown instance' USING ERRCODE = 'P0002';
    END IF;
    RETURN v;
END;
$$;

-- Removes one secret (the instance owes an update when there was one).
CREATE FUNCTION public.instance_secret_delete(p_instance_id uuid, p_kind text, p_name text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
BEGIN
    DELETE FROM public.instance_secrets
     WHERE instance_id = p_instance_id AND kind = p_kind AND name = p_name;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE public.instances SET config_version = config_version + 1 WHERE id = p_instance_id;
    RETURN true;
END;
$$;

-- The homeserver's keys, generated once: p_rows [{"name","ciphertext","digest"}] are
-- stored unless the instance already has keys (two workers racing after a lost
-- lease keep the first). Returns the stored rows, {"name": ciphertext}.
CREATE FUNCTION public.instance_homeserver_keys(p_instance_id uuid, p_rows jsonb)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
BEGIN
    PERFORM 1 FROM public.instances WHERE id = p_instance_id FOR UPDATE;
    IF NOT EXISTS (SELECT 1 FROM public.instance_secrets
                    WHERE instance_id = p_instance_id AND kind = 'homeserver') THEN
        INSERT INTO public.instance_secrets (instance_id, kind, name, ciphertext, digest)
        SELECT p_instance_id, 'homeserver', r ->> 'name', r ->> 'ciphertext', r ->> 'digest'
          FROM jsonb_array_elements(p_rows) r;
    END IF;
    RETURN (SELECT coalesce(jsonb_object_agg(name, ciphertext), '{}'::jsonb)
              FROM public.instance_secrets
             WHERE instance_id = p_instance_id AND kind = 'homeserver');
END;
$$;

-- The legacy plaintext environment_vars of an instance, handed to the worker once so
-- it can seal them into instance_secrets; the column is emptied in the same call.
-- (New secrets never pass through it; emptying it is not a configuration change:
-- the same values now come from instance_secrets.)
CREATE FUNCTION public.instance_take_plain_env(p_instance_id uuid)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v jsonb;
BEGIN
    SELECT environment_vars INTO v FROM public.instances WHERE id = p_instance_id FOR UPDATE;
    UPDATE public.instances SET environment_vars = '{}'::jsonb
     WHERE id = p_instance_id AND environment_vars IS DISTINCT FROM '{}'::jsonb;
    RETURN CASE WHEN jsonb_typeof(v) = 'object' THEN v ELSE '{}'::jsonb END;
END;
$$;

-- What is owed: the one rule, with storage's last step --------------------------------
CREATE OR REPLACE FUNCTION public.lifecycle_owed_action(i public.instances)
RETURNS public.lifecycle_action
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$
    SELECT (CASE
        WHEN i.status = 'deprovisioned' THEN
            CASE WHEN i.storage_destroyed_at IS NULL THEN 'destroy_storage' END
        WHEN i.desired_status = 'deprovisioned' OR i.status = 'deprovisioning' THEN 'destroy'
        WHEN i.desired_status = 'stopped' THEN
            CASE WHEN i.status IN ('running', 'provisioning', 'failed') THEN 'stop' END
        WHEN i.status IN ('provisioning', 'failed') THEN 'create'
        WHEN i.status = 'stopped' THEN 'start'
        WHEN i.applied_config_version IS DISTINCT FROM i.config_version THEN 'update'
        WHEN i.welcome_email_sent_at IS NULL THEN 'email'
    END)::public.lifecycle_action
$$;

-- The owed-work trigger (040), with the retention deadline in the due time and the
-- homeserver's limits and the storage size in the configuration.
CREATE OR REPLACE FUNCTION public.instances_work_owed()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
    v_action public.lifecycle_action;
    v_held boolean;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.config_version = OLD.config_version
       AND (NEW.memory_limit_mb IS DISTINCT FROM OLD.memory_limit_mb
            OR NEW.cpu_limit IS DISTINCT FROM OLD.cpu_limit
            OR NEW.homeserver_memory_mb IS DISTINCT FROM OLD.homeserver_memory_mb
            OR NEW.homeserver_cpu IS DISTINCT FROM OLD.homeserver_cpu
            OR NEW.storage_gb IS DISTINCT FROM OLD.storage_gb
            OR NEW.subdomain IS DISTINCT FROM OLD.subdomain
            OR (NEW.environment_vars IS DISTINCT FROM OLD.environment_vars
                AND NEW.environment_vars IS DISTINCT FROM '{}'::jsonb)) THEN
        NEW.config_version := OLD.config_version + 1;
    END IF;

    v_action := public.lifecycle_owed_action(NEW);
    NEW.owed_action := v_action;
    IF v_action IS NULL THEN
        NEW.owed_since := NULL;
        NEW.owed_due_at := NULL;
        RETURN NEW;
    END IF;
    IF TG_OP = 'INSERT' OR OLD.owed_action IS DISTINCT FROM v_action OR OLD.owed_since IS NULL THEN
        NEW.owed_since := now();
    END IF;
    v_held := v_action <> 'email' AND NEW.next_attempt_at IS NULL
              AND NEW.last_error LIKE 'rejected: %';
    NEW.owed_due_at := CASE WHEN v_held THEN NULL ELSE
        greatest(NEW.owed_since,
                 CASE WHEN v_action = 'email' THEN NEW.welcome_email_next_at ELSE NEW.next_attempt_at END,
                 CASE WHEN v_action = 'destroy_storage' THEN NEW.storage_destroy_after END,
                 CASE WHEN NEW.claimed_by IS NOT NULL THEN NEW.claim_expires_at END) END;

    IF NEW.owed_due_at <= now()
       AND (TG_OP = 'INSERT' OR OLD.owed_due_at IS NULL OR OLD.owed_due_at > now()) THEN
        PERFORM pg_catalog.pg_notify('mindroom_lifecycle', '');
    END IF;
    RETURN NEW;
END;
$$;

-- Rows get their owed columns under the new rule.
UPDATE public.instances SET config_version = config_version;

-- What a worker needs for one step: no plaintext secret, only their ciphertexts (the
-- worker opens them), the non-secret environment, both components' sizes, the
-- homeserver's recorded name, whether a destroy purges.
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

    RETURN jsonb_build_object(
        'action', i.claim_action,
        'token', i.claimed_by,
        'instance_id', i.id,
        'app', i.dokku_app_name,
        'config_version', i.config_version,
        'purge', i.purge_requested,
        'plain_env', jsonb_typeof(i.environment_vars) = 'object' AND i.environment_vars <> '{}'::jsonb,
        'payload', CASE WHEN i.claim_action IN ('create', 'update', 'start') THEN jsonb_build_object(
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
        'secrets', CASE WHEN i.claim_action IN ('create', 'update', 'start') THEN v_secrets END,
        'welcome', CASE WHEN i.claim_action = 'email' THEN jsonb_build_object(
            'to', v_email,
            'frontend_url', i.frontend_url) END);
END;
$$;

-- Recording outcomes (040's lifecycle_finish, with the homeserver's name, the
-- retention after a destroy and the storage's destruction). p_result also may hold:
--   "matrix_server_name"  the name the provisioner gave the homeserver (recorded once)
--   "retention_s"         on a destroy: how long the storage is kept
--   "purged"              on a destroy: the storage went with the apps
CREATE OR REPLACE FUNCTION public.lifecycle_finish(p_instance_id uuid, p_token text, p_result jsonb,
                                                   p_lease_s integer, p_backoff_base_s integer,
                                                   p_backoff_cap_s integer)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    i public.instances;
    v_action public.lifecycle_action;
    v_ok boolean := coalesce((p_result->>'ok')::boolean, false);
    v_rejected boolean := coalesce((p_result->>'rejected')::boolean, false);
    v_error text := left(coalesce(p_result->>'error', 'unknown error'), 1000);
    v_retry double precision := (p_result->>'retry_in_s')::double precision;
    v_target public.instance_status;
    v_account uuid;
BEGIN
    SELECT * INTO i FROM public.instances WHERE id = p_instance_id FOR UPDATE;
    IF NOT FOUND OR i.claimed_by IS DISTINCT FROM p_token THEN
        RETURN jsonb_build_object('outcome', 'lost',
            'instance', CASE WHEN FOUND THEN public.lifecycle_instance_json(i) END);
    END IF;
    v_action := i.claim_action;
    IF v_rejected THEN
        v_error := 'rejected: ' || v_error;
    END IF;
    SELECT s.account_id INTO v_account FROM public.subscriptions s WHERE s.id = i.subscription_id;

    IF v_action = 'email' THEN
        IF v_ok THEN
            UPDATE public.instances SET welcome_email_sent_at = now(),
                   welcome_email_error = NULL, welcome_email_next_at = NULL
             WHERE id = i.id RETURNING * INTO i;
        ELSE
            UPDATE public.instances SET
                   welcome_email_attempts = welcome_email_attempts + 1,
                   welcome_email_error = v_error,
                   welcome_email_next_at = now() + make_interval(secs => coalesce(v_retry,
                       least(p_backoff_cap_s::double precision,
                             p_backoff_base_s * power(2, least(welcome_email_attempts, 30)))))
             WHERE id = i.id RETURNING * INTO i;
        END IF;
    ELSIF v_ok AND v_action = 'destroy_storage' THEN
        UPDATE public.instances SET storage_destroyed_at = now(),
               error_message = NULL, last_error = NULL, attempts = 0, next_attempt_at = NULL
         WHERE id = i.id RETURNING * INTO i;
        INSERT INTO public.audit_logs (account_id, action, details)
        VALUES (v_account, 'instance.storage_destroyed', jsonb_build_object(
            'instance_id', i.id, 'app', i.dokku_app_name, 'purged', i.purge_requested));
    ELSIF v_ok THEN
        v_target := CASE v_action
                        WHEN 'stop' THEN 'stopped'::public.instance_status
                        WHEN 'destroy' THEN 'deprovisioned'::public.instance_status
                        ELSE 'running'::public.instance_status END;
        -- The row may have moved on while we held the lease (an operator marked it
        -- for destruction): then the outcome is recorded, the newer intent stays,
        -- and the next step follows from it.
        UPDATE public.instances SET
               status = CASE WHEN public.instance_transition_allowed(status, v_target)
                             THEN v_target ELSE status END,
               backend_url = coalesce(p_result->>'backend_url', backend_url),
               frontend_url = coalesce(p_result->>'frontend_url', frontend_url),
               matrix_server_url = coalesce(p_result->>'matrix_server_url', matrix_server_url),
               matrix_server_name = coalesce(matrix_server_name, p_result->>'matrix_server_name'),
               provisioned_at = CASE WHEN v_action IN ('create', 'start', 'update')
                                     THEN coalesce(provisioned_at, now()) ELSE provisioned_at END,
               deprovisioned_at = CASE WHEN v_action = 'destroy' THEN now() ELSE deprovisioned_at END,
               storage_destroy_after = CASE WHEN v_action = 'destroy' THEN
                   now() + make_interval(secs => coalesce((p_result->>'retention_s')::double precision, 0))
                   ELSE storage_destroy_after END,
               storage_destroyed_at = CASE WHEN v_action = 'destroy' AND coalesce((p_result->>'purged')::boolean, false)
                                           THEN now() ELSE storage_destroyed_at END,
               applied_config_version = CASE WHEN v_action IN ('create', 'update')
                                             THEN (p_result->>'config_version')::bigint
                                             ELSE applied_config_version END,
               error_message = NULL, last_error = NULL, attempts = 0, next_attempt_at = NULL
         WHERE id = i.id RETURNING * INTO i;
        IF v_action = 'destroy' AND i.storage_destroyed_at IS NOT NULL THEN
            INSERT INTO public.audit_logs (account_id, action, details)
            VALUES (v_account, 'instance.storage_destroyed', jsonb_build_object(
                'instance_id', i.id, 'app', i.dokku_app_name, 'purged', true));
        END IF;
    ELSE
        UPDATE public.instances SET
               -- A failed update or stop leaves the app as it was: still running.
               status = CASE WHEN v_action IN ('update', 'stop', 'destroy_storage') THEN status
                             WHEN public.instance_transition_allowed(status, 'failed') THEN 'failed'
                             ELSE status END,
               error_message = v_error,
               last_error = v_error,
               attempts = attempts + 1,
               next_attempt_at = CASE WHEN v_rejected THEN NULL ELSE
                   now() + make_interval(secs => coalesce(v_retry,
                       least(p_backoff_cap_s::double precision,
                             p_backoff_base_s * power(2, least(attempts, 30))))) END
         WHERE id = i.id RETURNING * INTO i;
    END IF;

    -- Chain the next step while the lease is ours, when it is due now and is not the
    -- step just done.
    IF v_ok AND i.owed_action IS NOT NULL
       AND (i.owed_action <> v_action OR v_action = 'update')
       AND i.owed_due_at IS NOT NULL
       AND (CASE WHEN i.owed_action = 'email'
                 THEN i.welcome_email_next_at IS NULL OR i.welcome_email_next_at <= now()
                 WHEN i.owed_action = 'destroy_storage'
                 THEN i.storage_destroy_after <= now()
                 ELSE i.next_attempt_at IS NULL OR i.next_attempt_at <= now() END) THEN
        i := public.lifecycle_take(i.id, p_token, NULL, p_lease_s);
        RETURN jsonb_build_object('outcome', 'claimed',
                                  'instance', public.lifecycle_instance_json(i),
                                  'step', public.lifecycle_step_json(i));
    END IF;

    UPDATE public.instances SET claimed_by = NULL, claim_expires_at = NULL, claim_action = NULL
     WHERE id = i.id RETURNING * INTO i;
    RETURN jsonb_build_object('outcome', CASE WHEN v_ok THEN 'done' ELSE 'failed' END,
                              'instance', public.lifecycle_instance_json(i));
END;
$$;

-- deprovision-instance's one round trip, with purge: the data goes at once (with the
-- apps, or after them when they are already gone). Audited with who asked.
DROP FUNCTION public.lifecycle_deprovision(uuid, uuid, text);
CREATE FUNCTION public.lifecycle_deprovision(p_instance_id uuid, p_subscription_id uuid,
                                             p_mode text, p_purge boolean DEFAULT false)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    i public.instances;
    v_sub_status public.subscription_status;
    v_id uuid := p_instance_id;
    v_mode text := p_mode;
BEGIN
    IF p_mode IS NOT NULL AND p_mode NOT IN ('stop', 'destroy') THEN
        RAISE EXCEPTION 'mode must be stop or destroy' USING ERRCODE = '22023';
    END IF;
    IF p_purge AND p_mode IS DISTINCT FROM 'destroy' THEN
        RAISE EXCEPTION 'purge goes with mode destroy' USING ERRCODE = '22023';
    END IF;
    IF v_id IS NULL THEN
        PERFORM 1 FROM public.subscriptions WHERE id = p_subscription_id;
        IF NOT FOUND THEN
            RETURN jsonb_build_object('outcome', 'not_found');
        END IF;
        v_id := coalesce(public.lifecycle_live_instance_id(p_subscription_id),
                         (SELECT id FROM public.instances WHERE subscription_id = p_subscription_id
                           ORDER BY created_at DESC LIMIT 1));
        IF v_id IS NULL THEN
            RETURN jsonb_build_object('outcome', 'none', 'mode', coalesce(v_mode, 'stop'));
        END IF;
    END IF;

    SELECT * INTO i FROM public.instances WHERE id = v_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'not_found');
    END IF;
    IF v_mode IS NULL THEN
        SELECT status INTO v_sub_status FROM public.subscriptions WHERE id = i.subscription_id;
        v_mode := CASE WHEN public.instance_desired_for(v_sub_status) = 'deprovisioned'
                       THEN 'destroy' ELSE 'stop' END;
    END IF;
    i := public.instance_request(v_id, CASE v_mode WHEN 'destroy' THEN 'deprovisioned'::public.instance_status
                                                   ELSE 'stopped'::public.instance_status END);
    IF p_purge AND NOT i.purge_requested AND i.storage_destroyed_at IS NULL THEN
        UPDATE public.instances SET purge_requested = true,
               storage_destroy_after = CASE WHEN status = 'deprovisioned' THEN now()
                                            ELSE storage_destroy_after END
         WHERE id = v_id RETURNING * INTO i;
        INSERT INTO public.audit_logs (account_id, action, details)
        SELECT s.account_id, 'instance.purge_requested',
               jsonb_build_object('instance_id', i.id, 'app', i.dokku_app_name,
                                  'by', coalesce(current_setting('request.jwt.claims', true), '{}')::jsonb ->> 'role')
          FROM public.subscriptions s WHERE s.id = i.subscription_id;
    END IF;
    -- An explicit request lifts a retry backoff or an operator hold on what it asks for.
    IF i.owed_action IN ('stop', 'destroy', 'destroy_storage')
       AND (i.next_attempt_at > now() OR (i.next_attempt_at IS NULL AND i.last_error IS NOT NULL)) THEN
        UPDATE public.instances SET next_attempt_at = now() WHERE id = v_id RETURNING * INTO i;
    END IF;
    RETURN jsonb_build_object('outcome', 'ok', 'mode', v_mode, 'purge', i.purge_requested,
                              'instance', public.lifecycle_instance_json(i));
END;
$$;

-- The instance JSON (040's, with what this migration adds; never a secret).
CREATE OR REPLACE FUNCTION public.lifecycle_instance_json(i public.instances)
RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT jsonb_build_object(
        'id', i.id,
        'subscription_id', i.subscription_id,
        'status', i.status,
        'desired_status', i.desired_status,
        'owed_action', i.owed_action,
        'owed_since', i.owed_since,
        'owed_due_at', i.owed_due_at,
        'dokku_app_name', i.dokku_app_name,
        'subdomain', i.subdomain,
        'backend_url', i.backend_url,
        'frontend_url', i.frontend_url,
        'matrix_server_url', i.matrix_server_url,
        'matrix_server_name', i.matrix_server_name,
        'memory_limit_mb', i.memory_limit_mb,
        'cpu_limit', i.cpu_limit,
        'homeserver_memory_mb', i.homeserver_memory_mb,
        'homeserver_cpu', i.homeserver_cpu,
        'storage_gb', i.storage_gb,
        'attempts', i.attempts,
        'next_attempt_at', i.next_attempt_at,
        'last_error', i.last_error,
        'error_message', i.error_message,
        'busy', (i.claimed_by IS NOT NULL AND i.claim_expires_at > now()),
        'claim_action', CASE WHEN i.claim_expires_at > now() THEN i.claim_action END,
        'claim_expires_at', CASE WHEN i.claim_expires_at > now() THEN i.claim_expires_at END,
        'purge_requested', i.purge_requested,
        'storage_destroy_after', i.storage_destroy_after,
        'storage_destroyed_at', i.storage_destroyed_at,
        'provisioned_at', i.provisioned_at,
        'deprovisioned_at', i.deprovisioned_at,
        'welcome_email_sent_at', i.welcome_email_sent_at,
        'welcome_email_error', i.welcome_email_error,
        'created_at', i.created_at,
        'updated_at', i.updated_at);
$$;

-- Account deletion (auth.users -> accounts -> subscriptions -> instances, all
-- ON DELETE CASCADE) must not orphan apps or data on the Dokku host. When an
-- instance row goes while it still has either, its delete records the teardown
-- here, where no cascade reaches: the lifecycle worker's teardown job destroys
-- both apps and both storage entries (a purge: the account is being erased), with
-- retries, and records it in audit_logs.
CREATE TABLE public.instance_teardowns (
    instance_id    uuid PRIMARY KEY,          -- no foreign key: the row is gone
    dokku_app_name text NOT NULL,
    subscription_id uuid,                     -- the same: kept for the audit trail
    not_before     timestamptz NOT NULL DEFAULT now(),
    attempts       integer NOT NULL DEFAULT 0,
    last_error     text,
    done_at        timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX instance_teardowns_due_idx ON public.instance_teardowns (not_before)
    WHERE done_at IS NULL;
CREATE TRIGGER instance_teardowns_updated_at BEFORE UPDATE ON public.instance_teardowns
    FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();
ALTER TABLE public.instance_teardowns ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON public.instance_teardowns FROM PUBLIC, anon, authenticated;
GRANT SELECT, UPDATE ON public.instance_teardowns TO service_role;
CREATE POLICY "Service role manages instance teardowns" ON public.instance_teardowns
    FOR ALL TO service_role USING (true) WITH CHECK (true);

-- SECURITY DEFINER: the delete may come from any role allowed to delete the row
-- (service_role, Supabase Auth deleting a user), none of which may write here.
CREATE FUNCTION public.instances_record_teardown()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    IF OLD.dokku_app_name IS NULL
       OR (OLD.status = 'deprovisioned' AND OLD.storage_destroyed_at IS NOT NULL) THEN
        RETURN OLD;
    END IF;
    INSERT INTO public.instance_teardowns (instance_id, dokku_app_name, subscription_id, not_before)
    VALUES (OLD.id, OLD.dokku_app_name, OLD.subscription_id,
            -- A step in flight on the row ends (or its lease does) first.
            CASE WHEN OLD.claimed_by IS NOT NULL THEN greatest(now(), OLD.claim_expires_at)
                 ELSE now() END)
    ON CONFLICT (instance_id) DO NOTHING;
    -- No account_id: the account (and the subscription) may be going in this very
    -- statement (the cascade), and audit_logs refers to live accounts only.
    INSERT INTO public.audit_logs (account_id, action, details)
    VALUES (NULL, 'instance.teardown_requested', jsonb_build_object(
        'instance_id', OLD.id, 'app', OLD.dokku_app_name, 'subscription_id', OLD.subscription_id,
        'status', OLD.status));
    RETURN OLD;
END;
$$;

CREATE TRIGGER instances_record_teardown BEFORE DELETE ON public.instances
    FOR EACH ROW EXECUTE FUNCTION public.instances_record_teardown();

-- The teardowns due now (the worker's teardown job), oldest first.
CREATE FUNCTION public.instance_teardowns_due(p_limit integer)
RETURNS TABLE (instance_id uuid, dokku_app_name text, attempts integer)
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT t.instance_id, t.dokku_app_name, t.attempts
      FROM public.instance_teardowns t
     WHERE t.done_at IS NULL AND t.not_before <= now()
     ORDER BY t.not_before, t.instance_id
     LIMIT greatest(p_limit, 0)
$$;

-- Records a teardown's outcome: done (audited), or retried after a backoff that
-- doubles from p_base_s up to p_cap_s.
CREATE FUNCTION public.instance_teardown_finish(p_instance_id uuid, p_ok boolean, p_error text,
                                                p_base_s integer, p_cap_s integer)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    t public.instance_teardowns;
BEGIN
    SELECT * INTO t FROM public.instance_teardowns
     WHERE instance_id = p_instance_id AND done_at IS NULL FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF p_ok THEN
        UPDATE public.instance_teardowns SET done_at = now(), last_error = NULL,
               attempts = attempts + 1
         WHERE instance_id = p_instance_id;
        INSERT INTO public.audit_logs (account_id, action, details)
        VALUES (NULL, 'instance.storage_destroyed', jsonb_build_object(
            'instance_id', t.instance_id, 'app', t.dokku_app_name,
            'subscription_id', t.subscription_id, 'purged', true, 'teardown', true));
    ELSE
        UPDATE public.instance_teardowns
           SET attempts = attempts + 1, last_error = left(p_error, 500),
               not_before = now() + make_interval(secs => least(
                   p_cap_s::double precision,
                   p_base_s::double precision * power(2, least(t.attempts, 30))))
         WHERE instance_id = p_instance_id;
    END IF;
    RETURN true;
END;
$$;

DO $grants$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'public.instance_secret_put(uuid, text, text, text, text, boolean)',
        'public.instance_secret_delete(uuid, text, text)',
        'public.instance_homeserver_keys(uuid, jsonb)',
        'public.instance_take_plain_env(uuid)',
        'public.lifecycle_deprovision(uuid, uuid, text, boolean)',
        'public.instances_record_teardown()',
        'public.instance_teardowns_due(integer)',
        'public.instance_teardown_finish(uuid, boolean, text, integer, integer)']
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC, anon, authenticated', f);
    END LOOP;
    FOREACH f IN ARRAY ARRAY[
        'public.instance_secret_put(uuid, text, text, text, text, boolean)',
        'public.instance_secret_delete(uuid, text, text)',
        'public.instance_homeserver_keys(uuid, jsonb)',
        'public.instance_take_plain_env(uuid)',
        'public.lifecycle_deprovision(uuid, uuid, text, boolean)',
        'public.instance_teardowns_due(integer)',
        'public.instance_teardown_finish(uuid, boolean, text, integer, integer)']
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', f);
    END LOOP;
END
$grants$;
