-- 020_lifecycle.sql: the instance lifecycle (provision-instance, deprovision-instance).
--
-- Exactly-once work without a transaction held across a slow call: a worker takes
-- an expiring lease on the instance row (claimed_by, claim_expires_at) in one short
-- transaction, calls the provisioner with no transaction open, and records the
-- outcome in another short transaction that only applies while it still owns the
-- lease. A worker that dies leaves a lease that simply expires; the next caller (a
-- webhook retry, an operator, the health sweep) takes it over.
--
-- What is owed is derived from the row, never queued: desired_status says what the
-- control plane owes (running, stopped, deprovisioned), status says what is, and
-- lifecycle_next_action() is the one place that turns the pair into the next step.
-- The functions and the sweep (lifecycle_owed) both use it, so they cannot disagree.

ALTER TABLE public.instances
    ADD COLUMN IF NOT EXISTS claimed_by text,
    ADD COLUMN IF NOT EXISTS claim_expires_at timestamptz,
    ADD COLUMN IF NOT EXISTS claim_action text,
    -- md5 of the limits + environment last accepted by the provisioner; a mismatch
    -- with the row's current values means a running app owes an update.
    ADD COLUMN IF NOT EXISTS applied_config_hash text,
    ADD COLUMN IF NOT EXISTS welcome_email_attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS welcome_email_next_at timestamptz,
    ADD COLUMN IF NOT EXISTS welcome_email_error text;

ALTER TABLE public.instances
    ADD CONSTRAINT instances_claim_action_check
    CHECK (claim_action IN ('create', 'start', 'update', 'stop', 'destroy', 'email'));

-- The sweep scans live instances only.
CREATE INDEX IF NOT EXISTS instances_lifecycle_live_idx
    ON public.instances (next_attempt_at)
    WHERE status <> 'deprovisioned';

-- The limits and environment that the provisioner must have applied.
CREATE OR REPLACE FUNCTION public.lifecycle_config_hash(i public.instances)
RETURNS text
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT md5(jsonb_build_object(
        'memory_mb', i.memory_limit_mb,
        'cpu', i.cpu_limit,
        'subdomain', i.subdomain,
        'env', coalesce(i.environment_vars, '{}'::jsonb))::text);
$$;

-- The next step the control plane owes this instance, or NULL when nothing is owed.
-- p_email: whether welcome emails can be sent (RESEND_API_KEY configured).
CREATE OR REPLACE FUNCTION public.lifecycle_next_action(i public.instances, p_email boolean)
RETURNS text
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT CASE
        WHEN i.status = 'deprovisioned' THEN NULL
        -- A destroy once begun is finished: deprovisioning only leads to deprovisioned.
        WHEN i.desired_status = 'deprovisioned' OR i.status = 'deprovisioning' THEN 'destroy'
        -- Only a running app can be stopped (running -> stopped); an instance that
        -- never came up (provisioning, failed) owes nothing while it should be stopped.
        WHEN i.desired_status = 'stopped' THEN
            CASE WHEN i.status = 'running' THEN 'stop' END
        WHEN i.status IN ('provisioning', 'failed') THEN 'create'
        WHEN i.status = 'stopped' THEN 'start'
        WHEN i.applied_config_hash IS DISTINCT FROM public.lifecycle_config_hash(i) THEN 'update'
        WHEN p_email AND i.welcome_email_sent_at IS NULL THEN 'email'
    END;
$$;

-- The instance as callers see it: never environment_vars, never the lease token.
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
        'dokku_app_name', i.dokku_app_name,
        'subdomain', i.subdomain,
        'backend_url', i.backend_url,
        'frontend_url', i.frontend_url,
        'matrix_server_url', i.matrix_server_url,
        'memory_limit_mb', i.memory_limit_mb,
        'cpu_limit', i.cpu_limit,
        'attempts', i.attempts,
        'next_attempt_at', i.next_attempt_at,
        'last_error', i.last_error,
        'error_message', i.error_message,
        'busy', (i.claimed_by IS NOT NULL AND i.claim_expires_at > now()),
        'claim_action', CASE WHEN i.claim_expires_at > now() THEN i.claim_action END,
        'claim_expires_at', CASE WHEN i.claim_expires_at > now() THEN i.claim_expires_at END,
        'provisioned_at', i.provisioned_at,
        'deprovisioned_at', i.deprovisioned_at,
        'welcome_email_sent_at', i.welcome_email_sent_at,
        'welcome_email_error', i.welcome_email_error,
        'created_at', i.created_at,
        'updated_at', i.updated_at);
$$;

-- What a worker needs to carry out one step, with no further query.
CREATE OR REPLACE FUNCTION public.lifecycle_step_json(i public.instances, p_action text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
DECLARE
    v_env jsonb;
    v_tier text;
    v_email text;
BEGIN
    SELECT s.tier::text, a.email INTO v_tier, v_email
      FROM public.subscriptions s
      JOIN public.accounts a ON a.id = s.account_id
     WHERE s.id = i.subscription_id;

    -- The app's environment: the instance's own variables (as text) plus what the
    -- instance must know about itself. Ours win over a same-named stored variable.
    SELECT coalesce(jsonb_object_agg(e.key, e.value), '{}'::jsonb) INTO v_env
      FROM jsonb_each_text(CASE WHEN jsonb_typeof(i.environment_vars) = 'object'
                                THEN i.environment_vars ELSE '{}'::jsonb END) AS e;
    v_env := v_env || jsonb_build_object(
        'MINDROOM_INSTANCE_ID', i.id::text,
        'MINDROOM_SUBSCRIPTION_ID', i.subscription_id::text,
        'MINDROOM_SUBDOMAIN', i.subdomain,
        'MINDROOM_TIER', coalesce(v_tier, ''));

    RETURN jsonb_build_object(
        'action', p_action,
        'token', i.claimed_by,
        'instance_id', i.id,
        'app', i.dokku_app_name,
        'config_hash', public.lifecycle_config_hash(i),
        'payload', CASE WHEN p_action IN ('create', 'update', 'start') THEN jsonb_build_object(
            'app', i.dokku_app_name,
            'subdomain', i.subdomain,
            'memory_mb', i.memory_limit_mb,
            'cpu', i.cpu_limit,
            'env', v_env) END,
        'email', CASE WHEN p_action = 'email' THEN jsonb_build_object(
            'to', v_email,
            'frontend_url', i.frontend_url) END);
END;
$$;

-- Takes (or, with p_token, renews) the lease on a locked row for its next action and
-- moves status into the in-progress state that action implies. The caller holds the
-- row lock (SELECT ... FOR UPDATE) and has checked there is no live foreign lease.
-- Returns the claimed row; its claimed_by is the token for lifecycle_finish.
CREATE OR REPLACE FUNCTION public.lifecycle_take(p_id uuid, p_action text, p_token text,
                                                  p_owner text, p_lease_s integer)
RETURNS public.instances
LANGUAGE sql VOLATILE
SET search_path = ''
AS $$
    UPDATE public.instances SET
        claimed_by = coalesce(p_token, gen_random_uuid()::text || '/' || left(p_owner, 100)),
        claim_expires_at = now() + make_interval(secs => p_lease_s),
        claim_action = p_action,
        status = CASE
            WHEN p_action IN ('create', 'start') THEN 'provisioning'::public.instance_status
            WHEN p_action = 'destroy' THEN 'deprovisioning'::public.instance_status
            ELSE status END
     WHERE id = p_id
    RETURNING *;
$$;

-- The live instance of a subscription (one at most, by the partial unique index).
CREATE OR REPLACE FUNCTION public.lifecycle_live_instance_id(p_subscription_id uuid)
RETURNS uuid
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT id FROM public.instances
     WHERE subscription_id = p_subscription_id AND status <> 'deprovisioned'
     ORDER BY created_at DESC
     LIMIT 1;
$$;

-- Claims the instance's next action if there is one and nobody holds a live lease.
-- Runs on a row the caller has locked. Returns {outcome, instance, step?}.
--   outcome 'done': nothing owed; 'busy': another worker's lease is live;
--   'claimed': step holds the action and token; 'queued': p_owner is NULL (the
--   caller has no free worker to do the work): owed, left unclaimed for the sweep.
CREATE OR REPLACE FUNCTION public.lifecycle_claim_locked(p_id uuid, p_owner text,
                                                         p_lease_s integer, p_email boolean)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    i public.instances;
    v_action text;
BEGIN
    SELECT * INTO i FROM public.instances WHERE id = p_id;
    v_action := public.lifecycle_next_action(i, p_email);
    -- Without a Resend key the email cannot be sent here; say so on the row and keep
    -- the sweep from asking every minute (an hour later it asks again, in case a
    -- key has been configured since).
    IF v_action IS NULL AND NOT p_email AND i.status = 'running'
       AND i.welcome_email_sent_at IS NULL
       AND (i.welcome_email_next_at IS NULL OR i.welcome_email_next_at <= now()) THEN
        UPDATE public.instances SET welcome_email_error = 'skipped: RESEND_API_KEY is not set',
               welcome_email_next_at = now() + interval '1 hour'
         WHERE id = p_id RETURNING * INTO i;
    END IF;
    IF v_action IS NULL THEN
        RETURN jsonb_build_object('outcome', 'done', 'instance', public.lifecycle_instance_json(i));
    END IF;
    IF i.claimed_by IS NOT NULL AND i.claim_expires_at > now() THEN
        RETURN jsonb_build_object('outcome', 'busy', 'instance', public.lifecycle_instance_json(i));
    END IF;
    IF p_owner IS NULL THEN
        RETURN jsonb_build_object('outcome', 'queued', 'action', v_action,
                                  'instance', public.lifecycle_instance_json(i));
    END IF;
    i := public.lifecycle_take(p_id, v_action, NULL, p_owner, p_lease_s);
    RETURN jsonb_build_object('outcome', 'claimed',
                              'instance', public.lifecycle_instance_json(i),
                              'step', public.lifecycle_step_json(i, v_action));
END;
$$;

-- provision-instance's one round trip.
-- Returns {outcome, instance?, step?, subscription_status?}; outcome is one of
--   not_found     no such subscription
--   not_entitled  subscription status is not trialing/active/past_due (nothing written)
--   conflict      the live instance is being destroyed, or its names are taken
--   done | busy | claimed | queued   as lifecycle_claim_locked
-- Ensures the live instance row exists (names from instance_names(), limits from
-- plans, status provisioning), sets desired_status running and the plan's limits.
CREATE OR REPLACE FUNCTION public.lifecycle_provision(p_subscription_id uuid, p_owner text,
                                                      p_lease_s integer, p_email boolean)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    s public.subscriptions;
    i public.instances;
    v_id uuid;
    v_mem integer;
    v_cpu numeric;
BEGIN
    -- Serializes every provision of this subscription (and the webhook's own writes
    -- to it) for the few statements below; never held across the provisioner call.
    SELECT * INTO s FROM public.subscriptions WHERE id = p_subscription_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'not_found');
    END IF;
    IF s.status NOT IN ('trialing', 'active', 'past_due') THEN
        RETURN jsonb_build_object('outcome', 'not_entitled', 'subscription_status', s.status,
            'instance', (SELECT public.lifecycle_instance_json(x) FROM public.instances x
                          WHERE x.id = public.lifecycle_live_instance_id(p_subscription_id)));
    END IF;

    -- The same plan the tier -> limits triggers (004) use.
    SELECT p.memory_limit_mb, p.cpu_limit INTO v_mem, v_cpu
      FROM public.plan_for(s.tier, s.stripe_price_id) p;

    v_id := public.lifecycle_live_instance_id(p_subscription_id);
    IF v_id IS NULL THEN
        BEGIN
            INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status,
                                          desired_status, memory_limit_mb, cpu_limit)
            SELECT p_subscription_id, n.dokku_app_name, n.subdomain, 'provisioning', 'running',
                   coalesce(v_mem, 512), coalesce(v_cpu, 0.5)
              FROM public.instance_names(p_subscription_id) n
            RETURNING id INTO v_id;
        EXCEPTION WHEN unique_violation THEN
            -- A destroyed instance of this subscription still holds the names.
            RETURN jsonb_build_object('outcome', 'conflict',
                'message', 'the instance names of this subscription are still taken');
        END;
    END IF;

    SELECT * INTO i FROM public.instances WHERE id = v_id FOR UPDATE;
    IF i.status = 'deprovisioning' OR i.desired_status = 'deprovisioned' THEN
        RETURN jsonb_build_object('outcome', 'conflict',
            'message', 'the instance is being destroyed',
            'instance', public.lifecycle_instance_json(i));
    END IF;

    UPDATE public.instances SET
        desired_status = 'running',
        memory_limit_mb = coalesce(v_mem, memory_limit_mb),
        cpu_limit = coalesce(v_cpu, cpu_limit)
     WHERE id = v_id
       AND (desired_status IS DISTINCT FROM 'running'
            OR memory_limit_mb IS DISTINCT FROM coalesce(v_mem, memory_limit_mb)
            OR cpu_limit IS DISTINCT FROM coalesce(v_cpu, cpu_limit));

    RETURN public.lifecycle_claim_locked(v_id, p_owner, p_lease_s, p_email);
END;
$$;

-- deprovision-instance's one round trip. p_instance_id or p_subscription_id (the
-- live instance, else the most recent one). p_mode 'stop' | 'destroy' | NULL (NULL:
-- destroy when the subscription is cancelled or incomplete_expired, else stop).
-- Returns {outcome, mode, instance?, step?}; outcome one of not_found, none (the
-- subscription has no instance), done, busy, claimed, queued.
-- Never downgrades: a stop asked of an instance owed destruction changes nothing.
CREATE OR REPLACE FUNCTION public.lifecycle_deprovision(p_instance_id uuid, p_subscription_id uuid,
                                                        p_mode text, p_owner text,
                                                        p_lease_s integer, p_email boolean)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    i public.instances;
    v_sub_status public.subscription_status;
    v_id uuid := p_instance_id;
    v_mode text := p_mode;
    v_result jsonb;
BEGIN
    IF p_mode IS NOT NULL AND p_mode NOT IN ('stop', 'destroy') THEN
        RAISE EXCEPTION 'mode must be stop or destroy' USING ERRCODE = '22023';
    END IF;
    IF v_id IS NULL THEN
        SELECT status INTO v_sub_status FROM public.subscriptions WHERE id = p_subscription_id;
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
        v_mode := CASE WHEN v_sub_status IN ('cancelled', 'incomplete_expired')
                       THEN 'destroy' ELSE 'stop' END;
    END IF;

    IF v_mode = 'destroy' THEN
        UPDATE public.instances SET desired_status = 'deprovisioned'
         WHERE id = v_id AND desired_status <> 'deprovisioned' AND status <> 'deprovisioned';
    ELSE
        UPDATE public.instances SET desired_status = 'stopped'
         WHERE id = v_id AND desired_status = 'running';
    END IF;

    v_result := public.lifecycle_claim_locked(v_id, p_owner, p_lease_s, p_email);
    RETURN v_result || jsonb_build_object('mode', v_mode);
END;
$$;

-- Records the outcome of a step and, on success, claims the next one under the same
-- lease (renewed). Applies only while p_token still owns the lease.
-- p_result: {"ok": bool, "rejected": bool, "error": text, "config_hash": text,
--            "backend_url", "frontend_url", "matrix_server_url"}.
-- Returns {outcome, instance, step?}: 'lost' (the lease was taken over: nothing
-- written), 'failed' (recorded, lease released), 'claimed' (step is the next
-- action), 'done' (nothing more owed, lease released).
-- Backoff after the n-th consecutive failure: min(cap, base * 2^(n-1)) seconds; a
-- rejection (the provisioner's 4xx) gets no next_attempt_at, so the sweep leaves it
-- for an operator.
CREATE OR REPLACE FUNCTION public.lifecycle_finish(p_instance_id uuid, p_token text,
                                                   p_result jsonb, p_lease_s integer,
                                                   p_backoff_base_s integer, p_backoff_cap_s integer,
                                                   p_email boolean)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    i public.instances;
    v_action text;
    v_ok boolean := coalesce((p_result->>'ok')::boolean, false);
    v_rejected boolean := coalesce((p_result->>'rejected')::boolean, false);
    v_error text := left(coalesce(p_result->>'error', 'unknown error'), 1000);
    v_next text;
    v_target public.instance_status;
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

    IF v_action = 'email' THEN
        IF v_ok THEN
            UPDATE public.instances SET welcome_email_sent_at = now(),
                   welcome_email_error = NULL, welcome_email_next_at = NULL
             WHERE id = i.id RETURNING * INTO i;
        ELSE
            UPDATE public.instances SET
                   welcome_email_attempts = welcome_email_attempts + 1,
                   welcome_email_error = v_error,
                   welcome_email_next_at = now() + make_interval(secs =>
                       least(p_backoff_cap_s::double precision,
                             p_backoff_base_s * power(2, least(welcome_email_attempts, 30))))
             WHERE id = i.id RETURNING * INTO i;
        END IF;
    ELSIF v_ok THEN
        v_target := CASE v_action
                        WHEN 'stop' THEN 'stopped'::public.instance_status
                        WHEN 'destroy' THEN 'deprovisioned'::public.instance_status
                        ELSE 'running'::public.instance_status END;
        -- The webhook may have moved the row on while we held the lease (a
        -- cancellation marks it deprovisioning at once): then the outcome is
        -- recorded but the newer status stays, and the next step follows from it.
        UPDATE public.instances SET
               status = CASE WHEN public.instance_transition_allowed(status, v_target)
                             THEN v_target ELSE status END,
               backend_url = coalesce(p_result->>'backend_url', backend_url),
               frontend_url = coalesce(p_result->>'frontend_url', frontend_url),
               matrix_server_url = coalesce(p_result->>'matrix_server_url', matrix_server_url),
               provisioned_at = CASE WHEN v_action IN ('create', 'start', 'update')
                                     THEN coalesce(provisioned_at, now()) ELSE provisioned_at END,
               deprovisioned_at = CASE WHEN v_action = 'destroy' THEN now() ELSE deprovisioned_at END,
               applied_config_hash = CASE WHEN v_action IN ('create', 'update')
                                          THEN p_result->>'config_hash' ELSE applied_config_hash END,
               error_message = NULL, last_error = NULL, attempts = 0, next_attempt_at = NULL
         WHERE id = i.id RETURNING * INTO i;
    ELSE
        UPDATE public.instances SET
               -- A failed update or stop leaves the app as it was: still running.
               status = CASE WHEN v_action IN ('update', 'stop') THEN status
                             WHEN public.instance_transition_allowed(status, 'failed') THEN 'failed'
                             ELSE status END,
               error_message = v_error,
               last_error = v_error,
               attempts = attempts + 1,
               next_attempt_at = CASE WHEN v_rejected THEN NULL ELSE
                   now() + make_interval(secs => least(p_backoff_cap_s::double precision,
                                         p_backoff_base_s * power(2, least(attempts, 30)))) END
         WHERE id = i.id RETURNING * INTO i;
    END IF;

    IF v_ok THEN
        v_next := public.lifecycle_next_action(i, p_email);
        -- Never loop on the same step: a success that did not change what is owed
        -- (e.g. limits changed again meanwhile) is picked up by the next caller.
        IF v_next IS NOT NULL AND NOT (v_next = v_action AND v_action <> 'update') THEN
            i := public.lifecycle_take(i.id, v_next, p_token, NULL, p_lease_s);
            RETURN jsonb_build_object('outcome', 'claimed',
                                      'instance', public.lifecycle_instance_json(i),
                                      'step', public.lifecycle_step_json(i, v_next));
        END IF;
    END IF;

    UPDATE public.instances SET claimed_by = NULL, claim_expires_at = NULL, claim_action = NULL
     WHERE id = i.id RETURNING * INTO i;
    RETURN jsonb_build_object('outcome', CASE WHEN v_ok THEN 'done' ELSE 'failed' END,
                              'instance', public.lifecycle_instance_json(i));
END;
$$;

-- Re-reads an instance (for "wait": true while another worker holds the lease).
CREATE OR REPLACE FUNCTION public.lifecycle_get(p_instance_id uuid)
RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT public.lifecycle_instance_json(i) FROM public.instances i WHERE i.id = p_instance_id;
$$;

-- The action an instance owes *now*, or NULL: no live lease, its backoff passed
-- (next_attempt_at), not a rejected failure (last_error 'rejected: ...' with no
-- next_attempt_at: left to an operator), the welcome email past its own backoff,
-- and provisioning work only for an entitled subscription (p_entitled).
CREATE OR REPLACE FUNCTION public.lifecycle_due_action(i public.instances, p_entitled boolean,
                                                       p_email boolean)
RETURNS text
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT a FROM (SELECT public.lifecycle_next_action(i, p_email) AS a) x
     WHERE a IS NOT NULL
       AND i.status <> 'deprovisioned'
       AND (i.claimed_by IS NULL OR i.claim_expires_at <= now())
       AND CASE WHEN a = 'email'
                THEN i.welcome_email_next_at IS NULL OR i.welcome_email_next_at <= now()
                ELSE i.next_attempt_at <= now()
                     OR (i.next_attempt_at IS NULL AND i.last_error IS NULL) END
       AND (a IN ('stop', 'destroy') OR p_entitled);
$$;

-- For the periodic sweep: the instances that owe work now, with the exact call that
-- does it (POST /functions/v1/<function_name> with body, service_role JWT), oldest
-- due first. The sweep only asks; the functions' lease decides who works.
CREATE OR REPLACE FUNCTION public.lifecycle_owed(p_limit integer DEFAULT 100)
RETURNS TABLE (instance_id uuid, subscription_id uuid, action text,
               function_name text, body jsonb)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT o.id, o.subscription_id, o.action,
           CASE WHEN o.action IN ('stop', 'destroy') THEN 'deprovision-instance'
                ELSE 'provision-instance' END,
           CASE WHEN o.action IN ('stop', 'destroy')
                THEN jsonb_build_object('instance_id', o.id, 'mode', o.action)
                ELSE jsonb_build_object('subscription_id', o.subscription_id) END
      FROM (SELECT i.id, i.subscription_id, i.next_attempt_at, i.updated_at,
                   public.lifecycle_due_action(i, s.status IN ('trialing', 'active', 'past_due'),
                                               true) AS action
              FROM public.instances i
              JOIN public.subscriptions s ON s.id = i.subscription_id
             WHERE i.status <> 'deprovisioned') o
     WHERE o.action IS NOT NULL
     ORDER BY o.next_attempt_at NULLS FIRST, o.updated_at
     LIMIT greatest(p_limit, 0);
$$;

-- A worker that has finished its own steps drains what is owed before it goes back
-- to accepting requests: claims the oldest instance owing an action of its
-- function ('provision-instance': create, start, update, email;
-- 'deprovision-instance': stop, destroy), skipping rows other workers have locked.
-- Returns lifecycle_claim_locked's answer, or {"outcome": "none"}.
CREATE OR REPLACE FUNCTION public.lifecycle_claim_next(p_function text, p_owner text,
                                                       p_lease_s integer, p_email boolean)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_id uuid;
    v_actions text[] := CASE p_function
        WHEN 'provision-instance' THEN ARRAY['create', 'start', 'update', 'email']
        WHEN 'deprovision-instance' THEN ARRAY['stop', 'destroy'] END;
BEGIN
    IF v_actions IS NULL OR p_owner IS NULL THEN
        RAISE EXCEPTION 'unknown function or no owner' USING ERRCODE = '22023';
    END IF;
    SELECT i.id INTO v_id
      FROM public.instances i
      JOIN public.subscriptions s ON s.id = i.subscription_id
     WHERE i.status <> 'deprovisioned'
       AND public.lifecycle_due_action(i, s.status IN ('trialing', 'active', 'past_due'), p_email)
           = ANY (v_actions)
     ORDER BY i.next_attempt_at NULLS FIRST, i.updated_at
     LIMIT 1
       FOR UPDATE OF i SKIP LOCKED;
    IF v_id IS NULL THEN
        RETURN jsonb_build_object('outcome', 'none');
    END IF;
    RETURN public.lifecycle_claim_locked(v_id, p_owner, p_lease_s, p_email);
END;
$$;

-- Least privilege: only service_role (the functions' request identity) runs these.
REVOKE ALL ON FUNCTION public.lifecycle_config_hash(public.instances) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.lifecycle_next_action(public.instances, boolean) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.lifecycle_instance_json(public.instances) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.lifecycle_step_json(public.instances, text) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.lifecycle_take(uuid, text, text, text, integer) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.lifecycle_live_instance_id(uuid) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.lifecycle_claim_locked(uuid, text, integer, boolean) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.lifecycle_provision(uuid, text, integer, boolean) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.lifecycle_deprovision(uuid, uuid, text, text, integer, boolean) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.lifecycle_finish(uuid, text, jsonb, integer, integer, integer, boolean) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.lifecycle_get(uuid) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.lifecycle_due_action(public.instances, boolean, boolean) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.lifecycle_owed(integer) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.lifecycle_claim_next(text, text, integer, boolean) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.lifecycle_provision(uuid, text, integer, boolean) TO service_role;
GRANT EXECUTE ON FUNCTION public.lifecycle_deprovision(uuid, uuid, text, text, integer, boolean) TO service_role;
GRANT EXECUTE ON FUNCTION public.lifecycle_finish(uuid, text, jsonb, integer, integer, integer, boolean) TO service_role;
GRANT EXECUTE ON FUNCTION public.lifecycle_get(uuid) TO service_role;
GRANT EXECUTE ON FUNCTION public.lifecycle_owed(integer) TO service_role;
GRANT EXECUTE ON FUNCTION public.lifecycle_claim_next(text, text, integer, boolean) TO service_role;
