-- 166_teardown_lease.sql: a teardown in flight is never called a second time, and
-- a target's teardowns in flight count against its max_in_flight.
--
-- The teardown job listed the due teardowns (instance_teardowns_due) and called
-- each in turn; nothing marked one as under way, and a target's limit counted only
-- instances' leases. A call may last up to MR_PROVISION_TIMEOUT_MS, and
-- scheduled_job_take presumes a run dead after ten intervals (five minutes at
-- least), so against a provisioner that accepts and never answers another worker
-- took the job over and called the same teardown again, and so on, until every
-- worker sat in the same hung call; and a teardown held one worker and a step of
-- the same target another, beyond its limit, while sign-ups on healthy targets
-- waited for a free worker. Now:
-- - the worker takes a teardown's lease before its call
--   (public.instance_teardown_begin, with the worker's MR_LIFECYCLE_LEASE_S, the
--   instances' lease, which outlives the longest call); a teardown under lease is
--   not due; instance_teardown_finish gives the lease back with the outcome. A
--   worker that dies in the call leaves the lease to run out: the teardown is due
--   again then;
-- - public.target_in_flight(target) is the one count of what a target has in
--   flight: instances' leases in force and teardowns under lease;
--   lifecycle_target_wait says 'target_busy' when it reaches max_in_flight;
-- - instance_teardown_begin takes the claim's lock (lifecycle_claim's advisory
--   lock, so that a claim and a begin, or two begins, never both pass the check)
--   and refuses a teardown whose target is at its limit.
--
-- Redefines, each whole from its last definition and unchanged but for the lines
-- named (CREATE OR REPLACE keeps their grants): public.lifecycle_target_wait
-- (152_storage_destroy_under_way.sql: the 'target_busy' count),
-- public.instance_teardowns_due (100_provisioner_targets.sql: not under lease) and
-- public.instance_teardown_finish (060_instance.sql: the lease given back).

ALTER TABLE public.instance_teardowns ADD COLUMN claimed_until timestamptz;

-- The teardowns under lease, by target: read by every count below.
CREATE INDEX instance_teardowns_in_flight_idx ON public.instance_teardowns (target_id, claimed_until)
    WHERE claimed_until IS NOT NULL;

-- What target p_target_id has in flight now: its instances whose lease is in force
-- (a step, a welcome email) and its teardowns under lease.
CREATE FUNCTION public.target_in_flight(p_target_id bigint)
RETURNS integer
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT ((SELECT count(*) FROM public.instances b
              WHERE b.target_id = p_target_id AND b.claimed_by IS NOT NULL
                AND b.claim_expires_at > now())
            + (SELECT count(*) FROM public.instance_teardowns d
                WHERE d.target_id = p_target_id AND d.claimed_until IS NOT NULL
                  AND d.claimed_until > now()))::integer
$$;
REVOKE ALL ON FUNCTION public.target_in_flight(bigint) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.target_in_flight(bigint) TO service_role;

CREATE OR REPLACE FUNCTION public.lifecycle_target_wait(i public.instances)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
DECLARE
    t public.provisioner_targets;
BEGIN
    IF i.owed_action IS NULL OR i.owed_action = 'email' THEN
        RETURN NULL;
    END IF;
    IF i.owed_action IN ('create', 'start') AND i.provisioned_at IS NULL THEN
        IF EXISTS (SELECT 1 FROM public.instances x
                    WHERE x.dokku_app_name = i.dokku_app_name AND x.id <> i.id
                      AND x.target_id IS NOT DISTINCT FROM i.target_id
                      AND x.status = 'deprovisioned' AND x.storage_destroyed_at IS NULL
                      AND x.storage_taken_by IS NULL
                      AND (x.purge_requested OR x.storage_destroy_after <= now())) THEN
            RETURN 'purge_pending';
        END IF;
        IF EXISTS (SELECT 1 FROM public.instance_teardowns d
                    WHERE d.dokku_app_name = i.dokku_app_name AND d.done_at IS NULL
                      AND d.target_id IS NOT DISTINCT FROM i.target_id) THEN
            RETURN 'teardown_pending';
        END IF;
    END IF;
    IF i.target_id IS NULL THEN
        IF i.owed_action NOT IN ('stop', 'destroy')
           AND i.provisioned_at IS NULL AND i.status <> 'deprovisioned' AND i.placement_waited
           AND EXISTS (SELECT 1 FROM public.provisioner_targets) THEN
            RETURN 'no_capacity';
        END IF;
        RETURN NULL;
    END IF;
    SELECT * INTO t FROM public.provisioner_targets x WHERE x.id = i.target_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF NOT t.enabled THEN
        RETURN 'target_disabled';
    END IF;
    IF public.target_in_flight(t.id) >= t.max_in_flight THEN
        RETURN 'target_busy';
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION public.instance_teardowns_due(p_limit integer)
RETURNS TABLE (instance_id uuid, dokku_app_name text, attempts integer, target jsonb)
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT t.instance_id, t.dokku_app_name, t.attempts,
           CASE WHEN p.id IS NOT NULL THEN
               jsonb_build_object('target', p.name, 'url', p.url, 'token_ref', p.token_ref,
                                  'scheduler', p.scheduler, 'enabled', p.enabled) END
      FROM public.instance_teardowns t
      LEFT JOIN public.provisioner_targets p ON p.id = t.target_id
     WHERE t.done_at IS NULL AND t.not_before <= now()
       AND (t.claimed_until IS NULL OR t.claimed_until <= now())
       AND (t.target_id IS NULL OR p.enabled)
     ORDER BY t.not_before, t.instance_id
     LIMIT greatest(p_limit, 0)
$$;

-- Takes the lease of a teardown for p_lease_s before its call: true when the caller
-- calls it now; false when it is no longer due (done, backing off, under another
-- lease, or its target disabled meanwhile) or its target is at its max_in_flight
-- (it stays due, no attempt counted).
CREATE FUNCTION public.instance_teardown_begin(p_instance_id uuid, p_lease_s integer)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    t public.instance_teardowns;
    p public.provisioner_targets;
BEGIN
    IF p_instance_id IS NULL OR p_lease_s IS NULL OR p_lease_s < 1 THEN
        RAISE EXCEPTION 'a teardown and a positive lease are required' USING ERRCODE = '22023';
    END IF;
    -- The claim's lock: the count below and the lease taken stand together against
    -- every claim and every other begin.
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('mindroom:lifecycle_claim', 0));
    SELECT * INTO t FROM public.instance_teardowns x
     WHERE x.instance_id = p_instance_id AND x.done_at IS NULL AND x.not_before <= now()
       AND (x.claimed_until IS NULL OR x.claimed_until <= now())
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF t.target_id IS NOT NULL THEN
        SELECT * INTO p FROM public.provisioner_targets x WHERE x.id = t.target_id;
        IF NOT p.enabled OR public.target_in_flight(p.id) >= p.max_in_flight THEN
            RETURN false;
        END IF;
    END IF;
    UPDATE public.instance_teardowns SET claimed_until = now() + make_interval(secs => p_lease_s)
     WHERE instance_id = p_instance_id;
    RETURN true;
END;
$$;
REVOKE ALL ON FUNCTION public.instance_teardown_begin(uuid, integer) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.instance_teardown_begin(uuid, integer) TO service_role;

CREATE OR REPLACE FUNCTION public.instance_teardown_finish(p_instance_id uuid, p_ok boolean, p_error text,
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
               attempts = attempts + 1, claimed_until = NULL
         WHERE instance_id = p_instance_id;
        INSERT INTO public.audit_logs (account_id, action, details)
        VALUES (NULL, 'instance.storage_destroyed', jsonb_build_object(
            'instance_id', t.instance_id, 'app', t.dokku_app_name,
            'subscription_id', t.subscription_id, 'purged', true, 'teardown', true));
    ELSE
        UPDATE public.instance_teardowns
           SET attempts = attempts + 1, last_error = left(p_error, 500), claimed_until = NULL,
               not_before = now() + make_interval(secs => least(
                   p_cap_s::double precision,
                   p_base_s::double precision * power(2, least(t.attempts, 30))))
         WHERE instance_id = p_instance_id;
    END IF;
    RETURN true;
END;
$$;
