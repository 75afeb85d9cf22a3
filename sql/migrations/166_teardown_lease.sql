-- 166_teardown_lease.sql: a teardown in flight is never called a second time.
--
-- The teardown job listed the due teardowns (instance_teardowns_due) and called
-- each in turn; nothing marked one as under way. A call may last up to
-- MR_PROVISION_TIMEOUT_MS, and scheduled_job_take presumes a run dead after ten
-- intervals (five minutes at least), so against a provisioner that accepts and never
-- answers another worker took the job over and called the same teardown again, and
-- so on, until every worker sat in the same hung call.
--
-- Now the worker takes a teardown's lease before its call
-- (public.instance_teardown_begin, with the worker's MR_LIFECYCLE_LEASE_S, the
-- instances' lease, which outlives the longest call); a teardown under lease is not
-- due; instance_teardown_finish gives the lease back with the outcome. A worker that
-- dies in the call leaves the lease to run out: the teardown is due again then.
--
-- Redefines public.instance_teardowns_due (100_provisioner_targets.sql) and
-- public.instance_teardown_finish (060_instance.sql), whole and unchanged but for the
-- lease. CREATE OR REPLACE keeps their grants.

ALTER TABLE public.instance_teardowns ADD COLUMN claimed_until timestamptz;

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
-- lease, or its target disabled meanwhile).
CREATE FUNCTION public.instance_teardown_begin(p_instance_id uuid, p_lease_s integer)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
BEGIN
    IF p_instance_id IS NULL OR p_lease_s IS NULL OR p_lease_s < 1 THEN
        RAISE EXCEPTION 'a teardown and a positive lease are required' USING ERRCODE = '22023';
    END IF;
    UPDATE public.instance_teardowns t
       SET claimed_until = now() + make_interval(secs => p_lease_s)
     WHERE t.instance_id = p_instance_id AND t.done_at IS NULL AND t.not_before <= now()
       AND (t.claimed_until IS NULL OR t.claimed_until <= now())
       AND (t.target_id IS NULL
            OR EXISTS (SELECT 1 FROM public.provisioner_targets p
                        WHERE p.id = t.target_id AND p.enabled));
    RETURN FOUND;
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
