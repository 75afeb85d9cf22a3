-- 174_teardown_owner.sql: a teardown's lease has an owner, and a worker whose lease
-- ran out and was taken over no longer records a failure over the new one.
--
-- instance_teardown_finish recorded any worker's outcome. Take a worker whose call
-- outlived its lease (MR_LIFECYCLE_LEASE_S) while another worker took the teardown
-- over and called it again: when the first one's call then failed, its finish gave
-- the second one's lease back and set a backoff, so the teardown was due again
-- (another call to the same app) while the second call was still in flight, and
-- the second one's outcome counted one attempt more.
--
-- - instance_teardowns.claimed_by: the lease's token, "<uuid>/<owner>" as an
--   instance's lease (lifecycle_take), set by the begin that takes the lease.
-- - public.instance_teardown_begin(instance, lease_s, owner) takes the lease as
--   before and returns its token (NULL: not taken, as false before).
-- - public.instance_teardown_finish(instance, ok, error, base_s, cap_s, token)
--   records a failure only while the lease is still that token's (false: not
--   recorded, the lease is another worker's). A success is recorded whoever called:
--   the apps and the data are gone, and the other worker's call, which finds
--   nothing to destroy, records nothing more (the teardown is done).
-- - The forms without the owner and the token (166_teardown_lease.sql) are what a
--   worker built before this migration calls while an upgrade runs: the begin takes
--   a lease as the new one does, and the finish records as before, whoever's lease.
ALTER TABLE public.instance_teardowns ADD COLUMN claimed_by text;

CREATE FUNCTION public.instance_teardown_begin(p_instance_id uuid, p_lease_s integer, p_owner text)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    t public.instance_teardowns;
    p public.provisioner_targets;
    v_token text;
BEGIN
    IF p_instance_id IS NULL OR p_lease_s IS NULL OR p_lease_s < 1 OR p_owner IS NULL THEN
        RAISE EXCEPTION 'a teardown, a positive lease and an owner are required' USING ERRCODE = '22023';
    END IF;
    -- The claim's lock: the count below and the lease taken stand together against
    -- every claim and every other begin.
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('mindroom:lifecycle_claim', 0));
    SELECT * INTO t FROM public.instance_teardowns x
     WHERE x.instance_id = p_instance_id AND x.done_at IS NULL AND x.not_before <= now()
       AND (x.claimed_until IS NULL OR x.claimed_until <= now())
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF t.target_id IS NOT NULL THEN
        SELECT * INTO p FROM public.provisioner_targets x WHERE x.id = t.target_id;
        IF NOT p.enabled OR public.target_in_flight(p.id) >= p.max_in_flight THEN
            RETURN NULL;
        END IF;
    END IF;
    v_token := gen_random_uuid()::text || '/' || left(p_owner, 100);
    UPDATE public.instance_teardowns SET claimed_until = now() + make_interval(secs => p_lease_s),
           claimed_by = v_token
     WHERE instance_id = p_instance_id;
    RETURN v_token;
END;
$$;

CREATE FUNCTION public.instance_teardown_finish(p_instance_id uuid, p_ok boolean, p_error text,
                                                p_base_s integer, p_cap_s integer, p_token text)
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
               attempts = attempts + 1, claimed_until = NULL, claimed_by = NULL
         WHERE instance_id = p_instance_id;
        INSERT INTO public.audit_logs (account_id, action, details)
        VALUES (NULL, 'instance.storage_destroyed', jsonb_build_object(
            'instance_id', t.instance_id, 'app', t.dokku_app_name,
            'subscription_id', t.subscription_id, 'purged', true, 'teardown', true));
        RETURN true;
    END IF;
    -- A worker built before 174 (no token) records as before.
    IF p_token IS NOT NULL AND t.claimed_by IS DISTINCT FROM p_token THEN
        RETURN false;
    END IF;
    UPDATE public.instance_teardowns
       SET attempts = attempts + 1, last_error = left(p_error, 500),
           claimed_until = NULL, claimed_by = NULL,
           not_before = now() + make_interval(secs => least(
               p_cap_s::double precision,
               p_base_s::double precision * power(2, least(t.attempts, 30))))
     WHERE instance_id = p_instance_id;
    RETURN true;
END;
$$;

-- The forms a worker built before 174 calls.
CREATE OR REPLACE FUNCTION public.instance_teardown_begin(p_instance_id uuid, p_lease_s integer)
RETURNS boolean
LANGUAGE sql VOLATILE
SET search_path = ''
AS $$
    SELECT public.instance_teardown_begin(p_instance_id, p_lease_s, 'a worker built before 174') IS NOT NULL
$$;

CREATE OR REPLACE FUNCTION public.instance_teardown_finish(p_instance_id uuid, p_ok boolean, p_error text,
                                                           p_base_s integer, p_cap_s integer)
RETURNS boolean
LANGUAGE sql VOLATILE
SET search_path = ''
AS $$
    SELECT public.instance_teardown_finish(p_instance_id, p_ok, p_error, p_base_s, p_cap_s, NULL::text)
$$;

REVOKE ALL ON FUNCTION public.instance_teardown_begin(uuid, integer, text) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.instance_teardown_begin(uuid, integer, text) TO service_role;
REVOKE ALL ON FUNCTION public.instance_teardown_finish(uuid, boolean, text, integer, integer, text)
    FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.instance_teardown_finish(uuid, boolean, text, integer, integer, text)
    TO service_role;
