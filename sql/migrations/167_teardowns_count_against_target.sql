-- 167_teardowns_count_against_target.sql: a target's teardowns in flight count
-- against its max_in_flight.
--
-- A target's limit counted only instances' leases: the teardown job called a target's
-- teardowns whatever its steps in flight, and the claim handed out its steps whatever
-- its teardowns in flight. Against a provisioner that accepts and never answers, a
-- teardown held one worker and a step of the same target another, beyond its limit,
-- while sign-ups on healthy targets waited for a free worker. Now:
-- - public.target_in_flight(target) is the one count of what a target has in flight:
--   instances' leases in force and teardowns under lease (166);
-- - lifecycle_target_wait says 'target_busy' when that count reaches max_in_flight;
-- - instance_teardown_begin takes the claim's lock (lifecycle_claim's advisory lock,
--   so that a claim and a begin, or two begins, never both pass the check) and refuses
--   a teardown whose target is at its limit: it stays due, no attempt counted.
--
-- Redefines, each whole from its last definition and unchanged but for the lines
-- named: public.lifecycle_target_wait (152_storage_destroy_under_way.sql: the
-- 'target_busy' count) and public.instance_teardown_begin (166_teardown_lease.sql: the
-- lock and the limit). CREATE OR REPLACE keeps each function's grants.

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

CREATE OR REPLACE FUNCTION public.instance_teardown_begin(p_instance_id uuid, p_lease_s integer)
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
