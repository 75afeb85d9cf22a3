-- 040_owed_work.sql: one owed-work model, claimed by the lifecycle worker.
--
-- Edges (the Stripe webhook, provision-instance, deprovision-instance, an
-- operator's SQL) only record intent: desired_status, the limits, the
-- environment. One function, lifecycle_owed_action(), turns an instance row into
-- what is owed, in one vocabulary (the lifecycle_action domain, which C parses once
-- at its edge). A trigger stores that answer on the row (owed_action) with the time
-- the work is next due (owed_due_at), in the same transaction that changed the row,
-- and NOTIFYs the worker when work has just become due. So:
--   * finding the next owed instance is one partial-index lookup, whatever the
--     number of instances (instances_owed_due_idx);
--   * the worker wakes within milliseconds of the commit that made work owed;
--   * there is no second copy of the rule anywhere: C, SQL and logs speak the same
--     words (create, start, update, stop, destroy, email).
--
-- Exactly once without a transaction held across a slow call: the worker takes an
-- expiring lease on the row (claimed_by, claim_expires_at) in one short transaction,
-- calls the provisioner with no transaction open, and records the outcome in another
-- that applies only while it still holds the lease. While the lease is live the row's
-- owed_due_at is the lease's end, so a worker that dies leaves work that simply
-- becomes due again when its lease runs out.
--
-- Periodic jobs (the health round, the Stripe sweep) take a lease row in
-- scheduled_jobs, so N workers on N hosts run each once per interval.

-- The vocabulary. A domain over text (not an enum) so that a later migration can
-- widen it and use the new word in the same transaction.
CREATE DOMAIN public.lifecycle_action AS text
    CONSTRAINT lifecycle_action_check
    CHECK (VALUE IN ('create', 'start', 'update', 'stop', 'destroy', 'email'));

-- What an entitled, stopped-for-billing or terminal subscription asks of its
-- instance: running, stopped, deprovisioned; NULL leaves the instance alone
-- (incomplete: not paid yet, nothing to do). The one place this is decided.
CREATE FUNCTION public.instance_desired_for(p_status public.subscription_status)
RETURNS public.instance_status
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = ''
AS $$
    SELECT CASE
        WHEN public.is_entitled(p_status) THEN 'running'::public.instance_status
        WHEN p_status IN ('unpaid', 'paused') THEN 'stopped'::public.instance_status
        WHEN p_status IN ('cancelled', 'incomplete_expired') THEN 'deprovisioned'::public.instance_status
    END
$$;

ALTER TABLE public.instances
    ADD COLUMN owed_action public.lifecycle_action,
    ADD COLUMN owed_since timestamptz,
    ADD COLUMN owed_due_at timestamptz,
    -- Bumped whenever what the app must be configured with changes (limits,
    -- subdomain, environment); applied_config_version is the version the
    -- provisioner last accepted. Unequal on a live app: an update is owed.
    ADD COLUMN config_version bigint NOT NULL DEFAULT 1,
    ADD COLUMN applied_config_version bigint,
    -- The start of the last health round whose failure was counted (at most one
    -- counted failure per interval, whoever probes).
    ADD COLUMN health_counted_at timestamptz;

-- Instances already running with the configuration they were deployed with keep it.
UPDATE public.instances i SET applied_config_version = i.config_version
 WHERE i.applied_config_hash IS NOT NULL
   AND i.applied_config_hash = public.lifecycle_config_hash(i);

ALTER TABLE public.instances DROP CONSTRAINT instances_claim_action_check;
ALTER TABLE public.instances ALTER COLUMN claim_action TYPE public.lifecycle_action;

-- The old derivation, its sweep and its callers: replaced below.
DROP FUNCTION public.lifecycle_claim_next(text, text, integer, boolean);
DROP FUNCTION public.lifecycle_owed(integer);
DROP FUNCTION public.lifecycle_due_action(public.instances, boolean, boolean);
DROP FUNCTION public.lifecycle_provision(uuid, text, integer, boolean);
DROP FUNCTION public.lifecycle_deprovision(uuid, uuid, text, text, integer, boolean);
DROP FUNCTION public.lifecycle_finish(uuid, text, jsonb, integer, integer, integer, boolean);
DROP FUNCTION public.lifecycle_claim_locked(uuid, text, integer, boolean);
DROP FUNCTION public.lifecycle_take(uuid, text, text, text, integer);
DROP FUNCTION public.lifecycle_step_json(public.instances, text);
DROP FUNCTION public.lifecycle_next_action(public.instances, boolean);
DROP FUNCTION public.lifecycle_get(uuid);
DROP FUNCTION public.lifecycle_instance_json(public.instances);
DROP FUNCTION public.lifecycle_config_hash(public.instances);
DROP FUNCTION public.health_owed_stripe_events(integer);
ALTER TABLE public.instances DROP COLUMN applied_config_hash;
DROP INDEX public.instances_lifecycle_live_idx;
DROP INDEX public.instances_status_next_attempt_idx;

-- A stop of an instance that never came up, or whose create failed, ends stopped
-- (the state machine of 004 gains provisioning -> stopped and failed -> stopped).
CREATE OR REPLACE FUNCTION public.instance_transition_allowed(p_from public.instance_status,
                                                              p_to public.instance_status)
RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = ''
AS $$
    SELECT p_from = p_to OR (p_from, p_to) IN (
        ('provisioning'::public.instance_status,   'running'::public.instance_status),
        ('provisioning',   'failed'),
        ('provisioning',   'stopped'),
        ('provisioning',   'deprovisioning'),
        ('running',        'stopped'),
        ('running',        'failed'),
        ('running',        'deprovisioning'),
        ('stopped',        'provisioning'),
        ('stopped',        'running'),
        ('stopped',        'deprovisioning'),
        ('failed',         'provisioning'),
        ('failed',         'stopped'),
        ('failed',         'deprovisioning'),
        ('deprovisioning', 'deprovisioned'),
        ('deprovisioning', 'failed'))
$$;

-- What is owed --------------------------------------------------------------------------
-- The next step the control plane owes this instance, or NULL: the one rule.
--   destroy  desired deprovisioned, or a destroy once begun (deprovisioning only
--            leads to deprovisioned)
--   stop     desired stopped and the app runs, or may run: a create whose outcome
--            was lost (provisioning, failed) may have left an app up; stopping a
--            missing app is done
--   create   desired running and the app is not up: provisioning, or failed
--            (a failed deploy, or a health-driven redeploy)
--   start    desired running and the app is stopped
--   update   running, and its configuration changed since the provisioner applied it
--   email    running, configured, and the welcome email not sent yet
CREATE FUNCTION public.lifecycle_owed_action(i public.instances)
RETURNS public.lifecycle_action
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$
    SELECT (CASE
        WHEN i.status = 'deprovisioned' THEN NULL
        WHEN i.desired_status = 'deprovisioned' OR i.status = 'deprovisioning' THEN 'destroy'
        WHEN i.desired_status = 'stopped' THEN
            CASE WHEN i.status IN ('running', 'provisioning', 'failed') THEN 'stop' END
        WHEN i.status IN ('provisioning', 'failed') THEN 'create'
        WHEN i.status = 'stopped' THEN 'start'
        WHEN i.applied_config_version IS DISTINCT FROM i.config_version THEN 'update'
        WHEN i.welcome_email_sent_at IS NULL THEN 'email'
    END)::public.lifecycle_action
$$;

-- Keeps owed_action / owed_since / owed_due_at true to the row, bumps config_version
-- when the configuration changes, and NOTIFYs mindroom_lifecycle when work has just
-- become due (a notifying transaction takes a global lock through commit in
-- PostgreSQL 15, so only then). Runs last among the row's BEFORE triggers (its
-- name sorts last), after the limits and the state machine have had their say.
--
-- Due: when the work became owed, pushed back by a retry backoff (next_attempt_at;
-- welcome_email_next_at for the email) and by a live lease (claim_expires_at: a
-- dead worker's work is due again when its lease runs out). A step the provisioner
-- rejected (4xx: last_error 'rejected: ...' and no next_attempt_at) stays owed but
-- is never due (owed_due_at NULL) until an operator asks again.
CREATE FUNCTION public.instances_work_owed()
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
            OR NEW.subdomain IS DISTINCT FROM OLD.subdomain
            OR NEW.environment_vars IS DISTINCT FROM OLD.environment_vars) THEN
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
                 CASE WHEN NEW.claimed_by IS NOT NULL THEN NEW.claim_expires_at END) END;

    IF NEW.owed_due_at <= now()
       AND (TG_OP = 'INSERT' OR OLD.owed_due_at IS NULL OR OLD.owed_due_at > now()) THEN
        PERFORM pg_catalog.pg_notify('mindroom_lifecycle', '');
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER instances_work_owed BEFORE INSERT OR UPDATE ON public.instances
    FOR EACH ROW EXECUTE FUNCTION public.instances_work_owed();

-- Rows written before this migration get their owed columns.
UPDATE public.instances SET config_version = config_version;

-- The claim: the oldest due row, one index lookup.
CREATE INDEX instances_owed_due_idx ON public.instances (owed_due_at)
    WHERE owed_due_at IS NOT NULL;
-- Live leases, counted against the concurrency limit.
CREATE INDEX instances_claimed_idx ON public.instances (claim_expires_at)
    WHERE claimed_by IS NOT NULL;

-- Tenants see what is being done to their instance (the lease token stays private).
GRANT SELECT (owed_action, owed_since) ON public.instances TO authenticated;

-- Limits and leases shared by every worker on every host ---------------------------------

-- How many steps may run at once across all workers ('global'; per provisioner
-- target once there are several). An operator changes it with one UPDATE.
CREATE TABLE public.lifecycle_limits (
    scope         text PRIMARY KEY,
    max_in_flight integer NOT NULL CHECK (max_in_flight >= 0),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
INSERT INTO public.lifecycle_limits (scope, max_in_flight) VALUES ('global', 8);

-- Periodic jobs: a row per job is its lease. Whoever moves `until` forward runs the
-- job; nobody else can before `until`.
CREATE TABLE public.scheduled_jobs (
    name             text PRIMARY KEY,
    owner            text,
    until            timestamptz NOT NULL DEFAULT '-infinity',
    last_started_at  timestamptz,
    last_finished_at timestamptz,
    last_error       text,
    runs             bigint NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TRIGGER lifecycle_limits_updated_at BEFORE UPDATE ON public.lifecycle_limits
    FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();

-- A raised limit may free work that waited for a slot: wake the workers.
CREATE FUNCTION public.lifecycle_limits_raised()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
    PERFORM pg_catalog.pg_notify('mindroom_lifecycle', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER lifecycle_limits_raised AFTER UPDATE OF max_in_flight ON public.lifecycle_limits
    FOR EACH ROW WHEN (NEW.max_in_flight > OLD.max_in_flight)
    EXECUTE FUNCTION public.lifecycle_limits_raised();
CREATE TRIGGER scheduled_jobs_updated_at BEFORE UPDATE ON public.scheduled_jobs
    FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();

ALTER TABLE public.lifecycle_limits ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.scheduled_jobs ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON public.lifecycle_limits, public.scheduled_jobs FROM PUBLIC, anon, authenticated;
GRANT SELECT, UPDATE ON public.lifecycle_limits TO service_role;
GRANT SELECT, INSERT, UPDATE ON public.scheduled_jobs TO service_role;
CREATE POLICY "Service role manages lifecycle limits" ON public.lifecycle_limits
    FOR ALL TO service_role USING (true) WITH CHECK (true);
CREATE POLICY "Service role manages scheduled jobs" ON public.scheduled_jobs
    FOR ALL TO service_role USING (true) WITH CHECK (true);

-- Takes the lease of periodic job p_name for p_interval_s if nobody holds it and the
-- last run has finished (a run longer than its interval is never joined by a second
-- one; a run unfinished for ten intervals, and at least five minutes, is presumed
-- dead with its worker). Returns the run's start (the database's clock) when the
-- caller runs the job now, NULL otherwise.
CREATE FUNCTION public.scheduled_job_take(p_name text, p_owner text, p_interval_s integer)
RETURNS timestamptz
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_started timestamptz;
BEGIN
    INSERT INTO public.scheduled_jobs (name) VALUES (p_name) ON CONFLICT (name) DO NOTHING;
    UPDATE public.scheduled_jobs SET owner = left(p_owner, 200),
           until = now() + make_interval(secs => greatest(p_interval_s, 1)),
           last_started_at = now(), runs = runs + 1
     WHERE name = p_name AND until <= now()
       AND (last_started_at IS NULL OR last_finished_at >= last_started_at
            OR last_started_at < now() - make_interval(secs => greatest(10 * p_interval_s, 300)))
    RETURNING last_started_at INTO v_started;
    RETURN v_started;
END;
$$;

-- Records how a run the caller took ended (p_error NULL: fine).
CREATE FUNCTION public.scheduled_job_done(p_name text, p_owner text, p_error text)
RETURNS void
LANGUAGE sql VOLATILE
SET search_path = ''
AS $$
    UPDATE public.scheduled_jobs SET last_finished_at = now(), last_error = left(p_error, 1000)
     WHERE name = p_name AND owner = left(p_owner, 200);
$$;

-- The instance as callers see it: never environment_vars, never the lease token.
CREATE FUNCTION public.lifecycle_instance_json(i public.instances)
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
CREATE FUNCTION public.lifecycle_step_json(i public.instances)
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
        'action', i.claim_action,
        'token', i.claimed_by,
        'instance_id', i.id,
        'app', i.dokku_app_name,
        'config_version', i.config_version,
        'payload', CASE WHEN i.claim_action IN ('create', 'update', 'start') THEN jsonb_build_object(
            'app', i.dokku_app_name,
            'subdomain', i.subdomain,
            'memory_mb', i.memory_limit_mb,
            'cpu', i.cpu_limit,
            'env', v_env) END,
        'welcome', CASE WHEN i.claim_action = 'email' THEN jsonb_build_object(
            'to', v_email,
            'frontend_url', i.frontend_url) END);
END;
$$;

-- Takes (p_token NULL) or renews (p_token: the holder's) the lease on a locked row
-- for its owed action and moves status into the in-progress state that action
-- implies. Returns the claimed row.
CREATE FUNCTION public.lifecycle_take(p_id uuid, p_token text, p_owner text, p_lease_s integer)
RETURNS public.instances
LANGUAGE sql VOLATILE
SET search_path = ''
AS $$
    UPDATE public.instances SET
        claimed_by = coalesce(p_token, gen_random_uuid()::text || '/' || left(p_owner, 100)),
        claim_expires_at = now() + make_interval(secs => p_lease_s),
        claim_action = owed_action,
        status = CASE
            WHEN owed_action IN ('create', 'start') THEN 'provisioning'::public.instance_status
            WHEN owed_action = 'destroy' THEN 'deprovisioning'::public.instance_status
            ELSE status END
     WHERE id = p_id
    RETURNING *;
$$;

-- The worker's claim. Takes the lease on the instance whose owed work has been due
-- longest, unless lifecycle_limits('global') steps are already in flight.
-- Returns {"outcome": "claimed", "step", "instance"} or {"outcome": "none" | "full",
-- "next_due_in_ms": ms until the next owed work falls due, or null}.
-- Claimers are serialized by a transaction-scoped advisory lock for the few
-- statements of the count and the take, so the limit holds across hosts.
CREATE FUNCTION public.lifecycle_claim(p_owner text, p_lease_s integer)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_limit integer;
    v_busy integer;
    v_id uuid;
    i public.instances;
    v_next timestamptz;
BEGIN
    IF p_owner IS NULL OR p_lease_s IS NULL OR p_lease_s < 1 THEN
        RAISE EXCEPTION 'owner and a positive lease are required' USING ERRCODE = '22023';
    END IF;
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('mindroom:lifecycle_claim', 0));
    SELECT l.max_in_flight INTO v_limit FROM public.lifecycle_limits l WHERE l.scope = 'global';
    SELECT count(*) INTO v_busy FROM public.instances x
     WHERE x.claimed_by IS NOT NULL AND x.claim_expires_at > now();
    IF v_busy < coalesce(v_limit, 0) THEN
        SELECT x.id INTO v_id FROM public.instances x
         WHERE x.owed_due_at <= now()
         ORDER BY x.owed_due_at
         LIMIT 1
           FOR UPDATE SKIP LOCKED;
        IF v_id IS NOT NULL THEN
            i := public.lifecycle_take(v_id, NULL, p_owner, p_lease_s);
            RETURN jsonb_build_object('outcome', 'claimed',
                                      'step', public.lifecycle_step_json(i),
                                      'instance', public.lifecycle_instance_json(i));
        END IF;
    END IF;
    SELECT min(x.owed_due_at) INTO v_next FROM public.instances x WHERE x.owed_due_at IS NOT NULL;
    RETURN jsonb_build_object(
        'outcome', CASE WHEN v_busy >= coalesce(v_limit, 0) THEN 'full' ELSE 'none' END,
        'next_due_in_ms', CASE WHEN v_next IS NOT NULL THEN
            greatest(0, ceil(extract(epoch FROM v_next - pg_catalog.clock_timestamp()) * 1000))::bigint END);
END;
$$;

-- Records the outcome of a step and, on success, takes the next owed step under the
-- same (renewed) lease when it is due now. Applies only while p_token holds the lease.
-- p_result: {"ok": bool, "rejected": bool, "error": text, "retry_in_s": int,
--            "config_version": int, "backend_url", "frontend_url", "matrix_server_url"}.
-- Returns {outcome, instance, step?}: 'lost' (the lease was taken over: nothing
-- written), 'failed' (recorded, lease released), 'claimed' (step is the next one),
-- 'done' (nothing more due now, lease released).
-- Backoff after the n-th consecutive failure: min(cap, base * 2^(n-1)) seconds
-- (retry_in_s, when given, instead). A rejection (the provisioner's 4xx) gets no
-- next_attempt_at: it stays owed but waits for an operator.
CREATE FUNCTION public.lifecycle_finish(p_instance_id uuid, p_token text, p_result jsonb,
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
                   welcome_email_next_at = now() + make_interval(secs => coalesce(v_retry,
                       least(p_backoff_cap_s::double precision,
                             p_backoff_base_s * power(2, least(welcome_email_attempts, 30)))))
             WHERE id = i.id RETURNING * INTO i;
        END IF;
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
               provisioned_at = CASE WHEN v_action IN ('create', 'start', 'update')
                                     THEN coalesce(provisioned_at, now()) ELSE provisioned_at END,
               deprovisioned_at = CASE WHEN v_action = 'destroy' THEN now() ELSE deprovisioned_at END,
               applied_config_version = CASE WHEN v_action IN ('create', 'update')
                                             THEN (p_result->>'config_version')::bigint
                                             ELSE applied_config_version END,
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
                   now() + make_interval(secs => coalesce(v_retry,
                       least(p_backoff_cap_s::double precision,
                             p_backoff_base_s * power(2, least(attempts, 30))))) END
         WHERE id = i.id RETURNING * INTO i;
    END IF;

    -- Chain the next step while the lease is ours, when it is due now and is not the
    -- step just done (a success that left the same step owed, e.g. limits changed
    -- again meanwhile, is an update owed afresh: the next claim takes it).
    IF v_ok AND i.owed_action IS NOT NULL
       AND (i.owed_action <> v_action OR v_action = 'update')
       AND (CASE WHEN i.owed_action = 'email'
                 THEN i.welcome_email_next_at IS NULL OR i.welcome_email_next_at <= now()
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

-- Gives a lease back without an outcome (a worker stopping before its step ended):
-- the work is due again at once, for whichever worker claims next.
CREATE FUNCTION public.lifecycle_release(p_instance_id uuid, p_token text)
RETURNS boolean
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = ''
AS $$
    WITH r AS (
        UPDATE public.instances SET claimed_by = NULL, claim_expires_at = NULL, claim_action = NULL
         WHERE id = p_instance_id AND claimed_by = p_token
        RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM r);
$$;

-- Records what an instance should become: running, stopped or deprovisioned.
-- Never downgrades: deprovisioned is final (a stop or a start asked of an instance
-- owed destruction changes nothing). Returns the row as it is now.
-- The caller holds the row lock or has just inserted it.
CREATE FUNCTION public.instance_request(p_id uuid, p_desired public.instance_status)
RETURNS public.instances
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    i public.instances;
BEGIN
    UPDATE public.instances SET desired_status = p_desired
     WHERE id = p_id AND desired_status <> p_desired AND desired_status <> 'deprovisioned'
       AND status NOT IN ('deprovisioning', 'deprovisioned')
    RETURNING * INTO i;
    IF NOT FOUND THEN
        SELECT * INTO i FROM public.instances WHERE id = p_id;
    END IF;
    RETURN i;
END;
$$;

-- provision-instance's one round trip: records that the subscription's instance
-- should run, with its plan's limits. Returns {outcome, instance?, subscription_status?}:
--   not_found     no such subscription
--   not_entitled  the subscription is not trialing/active/past_due (nothing written)
--   conflict      the live instance is being destroyed, or its names are taken
--   ok            recorded; instance.owed_action says what the worker will do
-- An explicit request also lifts a retry backoff or an operator hold (a rejected
-- step): the work is due now.
CREATE FUNCTION public.lifecycle_provision(p_subscription_id uuid)
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
    -- Serializes every request for this subscription (and the webhook's own writes
    -- to it) for the few statements below.
    SELECT * INTO s FROM public.subscriptions WHERE id = p_subscription_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'not_found');
    END IF;
    IF NOT public.is_entitled(s.status) THEN
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
                                          desired_status)
            SELECT p_subscription_id, n.dokku_app_name, n.subdomain, 'provisioning', 'running'
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
        cpu_limit = coalesce(v_cpu, cpu_limit),
        next_attempt_at = CASE WHEN next_attempt_at > now()
                                 OR (next_attempt_at IS NULL AND last_error IS NOT NULL)
                               THEN now() ELSE next_attempt_at END,
        welcome_email_next_at = CASE WHEN welcome_email_next_at > now() THEN now()
                                     ELSE welcome_email_next_at END
     WHERE id = v_id
       AND (desired_status IS DISTINCT FROM 'running'
            OR memory_limit_mb IS DISTINCT FROM coalesce(v_mem, memory_limit_mb)
            OR cpu_limit IS DISTINCT FROM coalesce(v_cpu, cpu_limit)
            OR next_attempt_at > now() OR (next_attempt_at IS NULL AND last_error IS NOT NULL)
            OR welcome_email_next_at > now())
    RETURNING * INTO i;
    IF NOT FOUND THEN
        SELECT * INTO i FROM public.instances WHERE id = v_id;
    END IF;
    RETURN jsonb_build_object('outcome', 'ok', 'instance', public.lifecycle_instance_json(i));
END;
$$;

-- deprovision-instance's one round trip. p_instance_id, or p_subscription_id (its
-- live instance, else its most recent one). p_mode 'stop' | 'destroy' | NULL (NULL:
-- what the subscription's status asks for, instance_desired_for, and a stop when
-- that is running). Returns {outcome, mode, instance?}: not_found, none (the
-- subscription never had an instance), ok.
CREATE FUNCTION public.lifecycle_deprovision(p_instance_id uuid, p_subscription_id uuid,
                                             p_mode text)
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
    -- An explicit request lifts a retry backoff or an operator hold on the stop or
    -- destroy it asks for: the work is due now.
    IF i.owed_action IN ('stop', 'destroy')
       AND (i.next_attempt_at > now() OR (i.next_attempt_at IS NULL AND i.last_error IS NOT NULL)) THEN
        UPDATE public.instances SET next_attempt_at = now() WHERE id = v_id RETURNING * INTO i;
    END IF;
    RETURN jsonb_build_object('outcome', 'ok', 'mode', v_mode,
                              'instance', public.lifecycle_instance_json(i));
END;
$$;

-- Re-reads an instance (for "wait": true).
CREATE FUNCTION public.lifecycle_get(p_instance_id uuid)
RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT public.lifecycle_instance_json(i) FROM public.instances i WHERE i.id = p_instance_id;
$$;

-- Least privilege: only service_role (the functions' and the worker's identity) runs
-- the entry points; the helpers are for the functions above alone.
DO $grants$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'public.instance_desired_for(public.subscription_status)',
        'public.lifecycle_owed_action(public.instances)',
        'public.instances_work_owed()',
        'public.lifecycle_limits_raised()',
        'public.lifecycle_instance_json(public.instances)',
        'public.lifecycle_step_json(public.instances)',
        'public.lifecycle_take(uuid, text, text, integer)',
        'public.instance_request(uuid, public.instance_status)',
        'public.scheduled_job_take(text, text, integer)',
        'public.scheduled_job_done(text, text, text)',
        'public.lifecycle_claim(text, integer)',
        'public.lifecycle_finish(uuid, text, jsonb, integer, integer, integer)',
        'public.lifecycle_release(uuid, text)',
        'public.lifecycle_provision(uuid)',
        'public.lifecycle_deprovision(uuid, uuid, text)',
        'public.lifecycle_get(uuid)']
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC, anon, authenticated', f);
    END LOOP;
    -- lifecycle_owed_action runs in the owed-work trigger and instance_request in the
    -- webhook's SQL, both as the writer of the row (service_role).
    FOREACH f IN ARRAY ARRAY[
        'public.instance_desired_for(public.subscription_status)',
        'public.lifecycle_owed_action(public.instances)',
        'public.instance_request(uuid, public.instance_status)',
        'public.scheduled_job_take(text, text, integer)',
        'public.scheduled_job_done(text, text, text)',
        'public.lifecycle_claim(text, integer)',
        'public.lifecycle_finish(uuid, text, jsonb, integer, integer, integer)',
        'public.lifecycle_release(uuid, text)',
        'public.lifecycle_provision(uuid)',
        'public.lifecycle_deprovision(uuid, uuid, text)',
        'public.lifecycle_get(uuid)']
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', f);
    END LOOP;
END
$grants$;
